"""Saving and reloading quantized models.

A quantized checkpoint is a ``torch.save`` dict readable with ``weights_only=True``: the model
reference (registry name or ``package.module:factory``), the method and its config, the layer
plan, and the state_dict. Reloading rebuilds the float model, lets the method rebuild the
quantized structure, and loads the state strictly, so evaluating it gives the same accuracy.
"""
from __future__ import annotations

from lowbit.errors import CheckpointError
from lowbit.io import load_torch, load_weights, save_torch
from lowbit.methods import METHODS
from lowbit.models import build_model
from lowbit.policy import LayerBits

FORMAT, VERSION = "lowbit-quantized", 1


def quantized_header(qmodel, model_spec: str, num_classes: int | None = None) -> dict:
    """Everything but the tensors: what rebuilds the quantized structure."""
    info = getattr(qmodel, "lowbit", None)
    if info is None:
        raise CheckpointError("this model was not made by lowbit.quantize: nothing to save")
    return {"format": FORMAT, "version": VERSION, "model": model_spec, "num_classes": num_classes,
            "method": info.method, "config": info.config, "folded": info.folded,
            "notes": info.notes, "plan": {name: [b.w_bits, b.a_bits]
                                          for name, b in info.plan.items()}}


def save_quantized(path, qmodel, model_spec: str, num_classes: int | None = None):
    """Write ``qmodel`` (made by a lowbit method) atomically to ``path``."""
    payload = {**quantized_header(qmodel, model_spec, num_classes),
               "state_dict": qmodel.state_dict()}
    return save_torch(path, payload)


def is_quantized_checkpoint(obj) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def rebuild_quantized(header: dict, path):
    """The uncalibrated quantized structure a header describes (weights not loaded)."""
    method = METHODS.get(header["method"])
    if method is None:
        raise CheckpointError(f"{path} was made by unknown method {header['method']!r}")
    model = build_model(header["model"], num_classes=header.get("num_classes"))
    info = method.QuantInfo(header["method"], header["config"],
                            {k: LayerBits(*v) for k, v in header["plan"].items()},
                            header["folded"], list(header.get("notes", [])))
    return method.restore(model, info)


def load_quantized(path):
    """Rebuild a quantized model saved by :func:`save_quantized`; returns ``(model, payload)``."""
    payload = load_torch(path)
    if not is_quantized_checkpoint(payload):
        raise CheckpointError(f"{path} is not a lowbit quantized checkpoint")
    if payload.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} has format version {payload['version']}; this lowbit "
                              f"reads up to {VERSION}: upgrade lowbit")
    qmodel = rebuild_quantized(payload, path)
    load_weights(qmodel, payload["state_dict"], path)
    return qmodel.eval(), payload
