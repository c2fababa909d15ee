"""Reference models and how to build any model from a name or ``package.module:factory``."""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from lowbit.errors import ModelError
from lowbit.io import extract_state_dict, load_torch, load_weights
from lowbit.models.mobilenet_cifar import mobilenet_v2_cifar, mobilenet_v2_cifar_050
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
    # built by name (lowbit's registry, torchvision's builders), not imported from user code
    known: bool = True


MODELS = {
    "resnet20": ModelInfo(resnet20, 10, CIFAR10_NORM),
    "resnet32": ModelInfo(resnet32, 10, CIFAR10_NORM),
    "resnet44": ModelInfo(resnet44, 10, CIFAR10_NORM),
    "resnet56": ModelInfo(resnet56, 10, CIFAR10_NORM),
    "psg_resnet32": ModelInfo(psg_resnet32, 100, PSG_NORM, reflect_pad=True),
    "vgg16_bn": ModelInfo(vgg16_bn, 10, CIFAR10_NORM),
    "mobilenet_v2_cifar": ModelInfo(mobilenet_v2_cifar, 100, None),
    "mobilenet_v2_cifar_050": ModelInfo(mobilenet_v2_cifar_050, 100, None),
    "digits_cnn": ModelInfo(digits_cnn, 10, None, (1, 8, 8)),
}


TORCHVISION_MODULES = ("torchvision.models", "torchvision.models.detection",
                       "torchvision.models.segmentation", "torchvision.models.video",
                       "torchvision.models.optical_flow", "torchvision.models.quantization")
# a file of n bytes holds at most 8n weights (1-bit codes): a larger model is not in the file
PARAMS_PER_FILE_BYTE, PARAMS_SLACK = 8, 2 ** 20


def resolve_model(spec: str, trust_model_code: bool | str = True) -> ModelInfo:
    """The registry entry of a model spec, or an entry for ``package.module:factory``
    (``torchvision:NAME`` names torchvision's builder ``NAME``).

    ``trust_model_code`` says whether importing ``package.module`` is allowed: True (a spec the
    caller wrote itself), False (a spec read from a file: only lowbit's registry and
    torchvision's model builders, looked up by name, resolve), or a spec string (trust that
    exact spec only: the CLI's ``--model``)."""
    if not isinstance(spec, str) or not spec:
        raise ModelError(f"a model spec must be a non-empty string, got {spec!r}")
    if spec in MODELS:
        return MODELS[spec]
    if ":" not in spec:
        raise ModelError(f"unknown model {spec!r}: use one of {', '.join(MODELS)} "
                         "or package.module:factory")
    module_name, _, attr = spec.partition(":")
    if module_name == "torchvision":  # torchvision:NAME, short for torchvision.models:NAME
        module_name = "torchvision.models"
    builder = _torchvision_builder(module_name, attr)
    if builder is not None:
        return ModelInfo(builder, 0, None, None)
    if trust_model_code is not True and trust_model_code != spec:
        raise ModelError(f"the file asks to import and run model code {spec!r}; lowbit runs "
                         f"model code named by a file only when you trust it: pass --model "
                         f"{spec} (CLI) or trust_model_code=True (API)")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ModelError(f"cannot import model factory {spec!r}: {e}") from None
    return ModelInfo(factory, 0, None, None, known=False)


def model_info(spec: str) -> ModelInfo:
    """Registry entry for a name, or an entry for ``package.module:factory`` (no normalization);
    the spec is the caller's own, so its code is trusted."""
    return resolve_model(spec)


def _torchvision_builder(module_name: str, attr: str):
    """torchvision's builder ``attr`` of one of its model modules, found by name in
    ``torchvision.models.list_models`` (None: not one, or torchvision does not import)."""
    if module_name not in TORCHVISION_MODULES:
        return None
    try:
        models = importlib.import_module("torchvision.models")
        module = importlib.import_module(module_name)
        if attr not in models.list_models(module=module):
            return None
        builder = models.get_model_builder(attr)
    except Exception:  # torchvision absent or broken: the spec is then not a known builder
        return None

    def factory(num_classes=None):  # torchvision builders take keyword arguments only
        return builder(num_classes=num_classes) if num_classes else builder()
    return factory


def build_model(spec: str, checkpoint=None, num_classes: int | None = None, *,
                trust_model_code: bool | str = True, file_bytes: int | None = None) -> nn.Module:
    """Build a model by name or ``package.module:factory`` and load a checkpoint strictly.

    A spec read from a file passes ``trust_model_code`` (see :func:`resolve_model`) and the
    file's size: a registry or torchvision model is first built on the meta device, and one with
    more parameters than ``file_bytes`` can hold is refused before any memory is allocated
    (a registry model at its own class count has lowbit's fixed size and is not sized; trusted
    user code is built as it is: it may not run on the meta device)."""
    info = resolve_model(spec, trust_model_code)
    kwargs = {} if not num_classes else {"num_classes": num_classes}
    if file_bytes is not None and info.known and (num_classes or spec not in MODELS):
        count = _parameter_count(info.factory, spec, kwargs)
        if count > PARAMS_PER_FILE_BYTE * file_bytes + PARAMS_SLACK:
            raise ModelError(f"model {spec!r}{f' with {num_classes} classes' if num_classes else ''}"
                             f" has {count} parameters, more than a {file_bytes}-byte file "
                             "can hold")
    model = _call_factory(info.factory, spec, kwargs)
    if checkpoint is not None:
        load_weights(model, extract_state_dict(load_torch(checkpoint), checkpoint), checkpoint)
    return model.eval()


class _NoInitOnMeta(TorchFunctionMode):
    """Skips in-place ops (``normal_``, ``kaiming_uniform_``, ``zero_``, ...) on meta tensors:
    counting parameters needs no initialisation, and on meta tensors those ops route through
    ``torch._refs``, whose first use imports ``torch._dynamo`` (about 2.7 s here)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.startswith("_") and args and \
                isinstance(args[0], torch.Tensor) and args[0].is_meta:
            return args[0]
        return func(*args, **(kwargs or {}))


def _parameter_count(factory, spec: str, kwargs: dict) -> int:
    """Parameters and buffers of the model, built on the meta device (nothing allocated).

    A builder that reads tensor values while it builds (torchvision's RegNets round their
    widths with ``torch`` ops and ``tolist``) cannot run there. Its count is affine in the class
    count (only the classifier grows with it), so it is extrapolated from two real builds at
    one and two classes, whose size the known builder itself bounds."""
    try:
        with torch.device("meta"), _NoInitOnMeta():
            return _count(_call_factory(factory, spec, kwargs))
    except ModelError:
        if "num_classes" not in kwargs:
            return _count(_call_factory(factory, spec, {}))
        one, two = (_count(_call_factory(factory, spec, {"num_classes": n})) for n in (1, 2))
        return one + (kwargs["num_classes"] - 1) * (two - one)


def _count(model: nn.Module) -> int:
    return sum(t.numel() for t in (*model.parameters(), *model.buffers()))


def _call_factory(factory, spec: str, kwargs: dict) -> nn.Module:
    """``factory(num_classes)`` (positional, as user factories take it) checked to be a model."""
    try:
        model = factory(*kwargs.values())
    except Exception as e:
        raise ModelError(f"model factory {spec!r} failed: {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"model factory {spec!r} returned {type(model).__name__}, not nn.Module")
    return model
