"""``lowbit train``: load a model and data, train with a method, write the run folder.

The folder holds ``checkpoint.pt`` (every epoch; ``--resume`` continues it), ``metrics.csv`` /
``metrics.json`` / ``tensorboard/``, and at the end ``report.json`` and ``model.pt``:
the float state_dict for float and PSG training (ready for ``lowbit quantize`` / ``eval``), the
fake-quant model's state_dict (with its quantizer state) for QAT and LSQ.
"""
from __future__ import annotations

from pathlib import Path

import copy

import torch

from lowbit import untrusted
from lowbit.checkpoint import check_loaded_state, rebuild_trained
from lowbit.data import Batches, Dataset, load_dataset
from lowbit.evaluate import evaluate
from lowbit.io import load_weights, save_torch, write_json
from lowbit.methods import training_method
from lowbit.methods.kmeans import KMeansMethod
from lowbit.methods.psg import PSGMethod, ptq_config, sparsity
from lowbit.methods.ptq import quantize
from lowbit.models import build_model, model_info
from lowbit.report import float_size_bytes, huffman_size_bytes, quantized_size_bytes
from lowbit.training.config import TrainConfig
from lowbit.training.distributed import world
from lowbit.training.engine import train

TRAINED_FORMAT = "lowbit-trained"
SPARSITY_THRESHOLDS = (1e-3, 1e-2, 3e-2)


def run_training(*, model_spec: str, checkpoint: str | None, data_spec: str, method: str,
                 method_values: dict, config: TrainConfig, out: Path, resume: bool = False,
                 train_limit: int | None = None, test_limit: int | None = None,
                 input_size: int | None = None, workers: int | None = None) -> dict:
    dataset = load_dataset(data_spec, input_size, workers)
    train_split = dataset.train if train_limit is None else \
        dataset.train.subset(min(train_limit, len(dataset.train)), config.seed)
    data = Dataset(dataset.name, train_split, dataset.test.head(test_limit), dataset.num_classes)
    model = build_model(model_spec, checkpoint, num_classes=dataset.num_classes
                        if checkpoint is None else None)
    norm = model_info(model_spec).normalization or dataset.normalization()
    test = Batches(data.test, norm, 500)
    fp_top1 = evaluate(model, test, desc="eval fp")
    trainer = training_method(method, method_values)
    result = train(model, data, norm, config, method=trainer, out=out, resume=resume)
    report = {"model": model_spec, "checkpoint": checkpoint, "data": data_spec,
              "method": method, "method_config": trainer.config.to_dict() if trainer else None,
              "train": config.to_dict(), "train_images": len(train_split),
              "test_images": len(data.test), "fp_top1": fp_top1,
              "top1": result.metrics[-1]["test_top1"], "epochs": result.metrics}
    trained = trainer.finalize(result.model) if trainer is not None else result.model
    report["fp_bytes"] = float_size_bytes(model)
    report["bytes"] = quantized_size_bytes(trained)
    if isinstance(trainer, KMeansMethod):
        report["huffman_bytes"] = huffman_size_bytes(trained)
    if isinstance(trainer, PSGMethod):
        calib = Batches(train_split.subset(min(256, len(train_split)), 0), norm, 256)
        if trainer.config.sparse:
            report["pruned"] = pruned_accuracy(trained, test, SPARSITY_THRESHOLDS)
        else:
            q = quantize(trained, ptq_config(trainer.config), calib)
            report[f"ptq_w{trainer.config.w_bits}a32_top1"] = evaluate(q, test)
    if world()[0] == 0:
        float_model = trainer is None or isinstance(trainer, PSGMethod)
        save_torch(out / "model.pt", {
            "format": TRAINED_FORMAT, "state_dict": trained.state_dict(), "model": model_spec,
            "num_classes": dataset.num_classes, "method": "fp" if float_model else method,
            "method_config": None if float_model else trainer.config.to_dict()})
        write_json(out / "report.json", report)
    return report


@torch.no_grad()
def pruned_accuracy(model, test, thresholds) -> list[dict]:
    """Sparsity and top-1 after zeroing the Conv / Linear weights with |w| <= threshold."""
    rows = []
    for threshold in thresholds:
        pruned = copy.deepcopy(model)
        for m in pruned.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.masked_fill_(m.weight.abs() <= threshold, 0.0)
        rows.append({"threshold": threshold, "sparsity": sparsity(pruned, 0.0),
                     "top1": evaluate(pruned, test)})
    return rows


def is_trained_checkpoint(obj) -> bool:
    return isinstance(obj, dict) and obj.get("format") == TRAINED_FORMAT


def load_trained(payload: dict, example: torch.Tensor, path="model.pt",
                 trust_model_code: bool | str = False) -> torch.nn.Module:
    """Rebuild the model a ``lowbit train`` run saved in ``model.pt`` (``example``: one input
    batch, to find the layer order the method's policy needs). The payload is checked first, and
    the model it names must be lowbit's or torchvision's unless ``trust_model_code``."""
    where = str(path)
    state = untrusted.tensor_dict(payload.get("state_dict"), f"{where}: 'state_dict'")
    size = Path(path).stat().st_size if Path(path).is_file() else None
    model = rebuild_trained(payload, payload, example, where, trust_model_code, size)
    load_weights(model, state, where, exact_dtypes=True)
    check_loaded_state(model, where)
    return model.eval()
