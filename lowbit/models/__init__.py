"""Reference models and how to build any model from a name or ``package.module:factory``."""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from torch import nn

from lowbit.errors import ModelError
from lowbit.io import extract_state_dict, load_torch, load_weights
from lowbit.models.psg_resnet import psg_resnet32
from lowbit.models.resnet_cifar import resnet20, resnet32, resnet44, resnet56
from lowbit.models.small import digits_cnn
from lowbit.models.vgg import vgg16_bn

CIFAR10_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # akamaster checkpoints
PSG_NORM = ((129.3 / 255, 124.1 / 255, 112.4 / 255), (68.2 / 255, 65.4 / 255, 70.4 / 255))


@dataclass(frozen=True)
class ModelInfo:
    factory: object
    num_classes: int
    normalization: tuple | None  # (mean, std) per channel for inputs scaled to [0, 1]
    input_shape: tuple | None = (3, 32, 32)  # (C, H, W) of one input, for exporters
    # the checkpoint was trained on reflection-padded crops: fine-tuning it on zero-padded ones
    # shifts the first layers' BatchNorm statistics (the PSG ResNet-32 loses 3.7 points from
    # 100 steps of BN re-estimation on zero-padded crops, 0.2 on reflection-padded ones)
    reflect_pad: bool = False


MODELS = {
    "resnet20": ModelInfo(resnet20, 10, CIFAR10_NORM),
    "resnet32": ModelInfo(resnet32, 10, CIFAR10_NORM),
    "resnet44": ModelInfo(resnet44, 10, CIFAR10_NORM),
    "resnet56": ModelInfo(resnet56, 10, CIFAR10_NORM),
    "psg_resnet32": ModelInfo(psg_resnet32, 100, PSG_NORM, reflect_pad=True),
    "vgg16_bn": ModelInfo(vgg16_bn, 10, CIFAR10_NORM),
    "digits_cnn": ModelInfo(digits_cnn, 10, None, (1, 8, 8)),
}


def model_info(spec: str) -> ModelInfo:
    """Registry entry for a name, or an entry for ``package.module:factory`` (no normalization)."""
    if spec in MODELS:
        return MODELS[spec]
    if ":" not in spec:
        raise ModelError(f"unknown model {spec!r}: use one of {', '.join(MODELS)} "
                         "or package.module:factory")
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ModelError(f"cannot import model factory {spec!r}: {e}") from None
    return ModelInfo(factory, 0, None, None)


def build_model(spec: str, checkpoint=None, num_classes: int | None = None) -> nn.Module:
    """Build a model by name or ``package.module:factory`` and load a checkpoint strictly."""
    info = model_info(spec)
    try:
        model = info.factory(num_classes) if num_classes else info.factory()
    except Exception as e:
        raise ModelError(f"model factory {spec!r} failed: {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"model factory {spec!r} returned {type(model).__name__}, not nn.Module")
    if checkpoint is not None:
        load_weights(model, extract_state_dict(load_torch(checkpoint), checkpoint), checkpoint)
    return model.eval()
