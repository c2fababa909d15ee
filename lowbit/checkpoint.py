"""Saving and reloading quantized models.

A quantized checkpoint is a ``torch.save`` dict readable with ``weights_only=True``: the model
reference (registry name or ``package.module:factory``), the method and its config, the layer
plan, and the state_dict. Reloading rebuilds the float model, lets the method rebuild the
quantized structure, and loads the state strictly, so evaluating it gives the same accuracy.

The file is untrusted (:mod:`lowbit.untrusted`): every header value is checked before use, and
the model it names is built from lowbit's registry or torchvision's builders only, unless the
caller passes ``trust_model_code``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from lowbit import untrusted
from lowbit.errors import CheckpointError, ConfigError
from lowbit.io import load_torch, load_weights, save_torch
from lowbit.methods import METHODS, TRAINING_METHODS, training_method
from lowbit.models import build_model
from lowbit.nn.layers import QUANT_LAYERS
from lowbit.nn.lsq import LSQQuantizer
from lowbit.nn.quantizer import CorrectedQuantizer, affine_part
from lowbit.nn.shared_weights import KMeansQuantizer
from lowbit.policy import LayerBits
from lowbit.quant.affine import MAX_BITS, MIN_BITS

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


def check_model_fields(header: dict, where: str) -> tuple[str, int | None]:
    """The (model spec, num_classes) of a file's header, checked by type and range."""
    spec = untrusted.text(header.get("model"), f"{where}: 'model'")
    num_classes = untrusted.optional_integer(header.get("num_classes"),
                                             f"{where}: 'num_classes'", 1, untrusted.MAX_CLASSES)
    return spec, num_classes


def check_quantized_header(header: dict, where: str) -> None:
    """Refuse a PTQ header whose values are not what :func:`quantized_header` writes."""
    check_model_fields(header, where)
    untrusted.text(header.get("method"), f"{where}: 'method'", METHODS)
    untrusted.mapping(header.get("config"), f"{where}: 'config'")
    untrusted.flag(header.get("folded"), f"{where}: 'folded'")
    for i, note in enumerate(untrusted.sequence(header.get("notes", []), f"{where}: 'notes'")):
        untrusted.text(note, f"{where}: 'notes'[{i}]")
    plan = untrusted.mapping(header.get("plan"), f"{where}: 'plan'")
    for name, bits in plan.items():
        w_bits, a_bits = untrusted.sequence(bits, f"{where}: plan {name!r}", 2)
        untrusted.integer(w_bits, f"{where}: plan {name!r} w_bits", MIN_BITS, MAX_BITS)
        untrusted.optional_integer(a_bits, f"{where}: plan {name!r} a_bits", MIN_BITS, MAX_BITS)


def check_loaded_state(model, where: str) -> None:
    """Refuse state that no lowbit run produces, before it reaches a forward pass: NaN or Inf
    in any parameter or buffer (the message names it); affine qparams shaped per tensor or per
    channel of their layer, scales finite and positive, integer ranges of 1..16 bits; LSQ steps
    positive; bias corrections one finite gain and shift per output channel; k-means indices
    shaped like the weight and inside the codebook (state sized at calibration adopts whatever
    shape a file holds)."""
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{where}: {name} holds NaN or Inf")
    for name, layer in model.named_modules():
        if not isinstance(layer, QUANT_LAYERS):
            continue
        channels = {"weight_quantizer": layer.weight.shape[0],
                    "input_quantizer": layer.weight.shape[1] * getattr(layer, "groups", 1)}
        for slot, count in channels.items():
            q = affine_part(getattr(layer, slot))
            if q is not None and q.calibrated:
                _check_affine(q, count, f"{where}: {name}.{slot}")
        slot = layer.weight_quantizer
        if isinstance(slot, CorrectedQuantizer) and (slot.gain.numel() or slot.shift.numel()):
            rows = (layer.weight.shape[0],)
            if slot.gain.shape != rows or slot.shift.shape != rows or not (
                    torch.isfinite(slot.gain).all() and torch.isfinite(slot.shift).all()):
                raise CheckpointError(f"{where}: {name} bias correction is not {rows[0]} finite "
                                      "gains and shifts")
        for q in (layer.weight_quantizer, layer.input_quantizer):
            if isinstance(q, LSQQuantizer) and not (q.step > 0).all():
                raise CheckpointError(f"{where}: {name} has an LSQ step <= 0")
        if isinstance(slot, KMeansQuantizer) and slot.indices.numel():
            k = slot.codebook.shape[-1] if slot.codebook.dim() else 0
            if slot.indices.shape != layer.weight.shape or slot.indices.is_floating_point() \
                    or int(slot.indices.min()) < -1 or int(slot.indices.max()) >= k:
                raise CheckpointError(f"{where}: {name} k-means indices do not fit its weight "
                                      f"{tuple(layer.weight.shape)} and {k}-entry codebook")


def _check_affine(q, channels: int, where: str) -> None:
    shapes = {tuple(getattr(q, key).shape) for key in ("scale", "zero_point", "quant_min",
                                                       "quant_max")}
    allowed = ((),) if q.axis is None else ((), (channels,))  # a per-channel quantizer's axis
    if len(shapes) != 1 or shapes.pop() not in allowed:
        raise CheckpointError(f"{where}: qparams are not shaped per tensor"
                              f"{'' if q.axis is None else f' or per {channels} channels'}")
    span = q.quant_max - q.quant_min + 1  # 2^b levels, or 2^b - 1 on a narrow grid

    def power_of_two(t):
        return t == 2 ** torch.log2(t).round()
    if not (torch.isfinite(q.scale).all() and (q.scale > 0).all()
            and torch.isfinite(q.zero_point).all() and (span >= 1).all()
            and (span <= 2 ** MAX_BITS).all()
            and (power_of_two(span) | power_of_two(span + 1)).all()):
        raise CheckpointError(f"{where}: qparams are not finite positive scales over a 1..16-bit "
                              "integer range")


def _model_from(header: dict, where: str, trust_model_code, file_bytes) -> tuple:
    """(spec, the float model) a header names, built by :func:`lowbit.models.build_model` under
    the caller's trust and the file's size."""
    spec, num_classes = check_model_fields(header, where)
    return spec, build_model(spec, num_classes=num_classes, trust_model_code=trust_model_code,
                             file_bytes=file_bytes)


def rebuild_quantized(header: dict, path, trust_model_code: bool | str = False,
                      file_bytes: int | None = None):
    """The uncalibrated quantized structure a checked header describes (weights not loaded)."""
    where = str(path)
    check_quantized_header(header, where)
    method = METHODS[header["method"]]
    spec, model = _model_from(header, where, trust_model_code, file_bytes)
    plan = {k: LayerBits(*v) for k, v in header["plan"].items()}
    layers = {name for name, m in model.named_modules()}
    unknown = [name for name in plan if name not in layers]
    if unknown:
        raise CheckpointError(f"{where}: the plan names layers the model {spec!r} does not have: "
                              f"{', '.join(unknown[:4])}")
    info = method.QuantInfo(header["method"], header["config"], plan, header["folded"],
                            list(header.get("notes", [])))
    try:
        return method.restore(model, info)
    except ConfigError as e:
        raise CheckpointError(f"{where}: its method config is invalid: {e}") from None


def rebuild_trained(header: dict, method_fields: dict, example, where: str,
                    trust_model_code: bool | str = False, file_bytes: int | None = None,
                    methods=("fp", *TRAINING_METHODS)):
    """The model a trained file describes (``model`` / ``num_classes`` in ``header``,
    ``method`` / ``method_config`` in ``method_fields``), prepared by its training method on
    ``example`` as ``lowbit train`` prepared it (weights not loaded)."""
    name = untrusted.text(method_fields.get("method"), f"{where}: 'method'", methods)
    config = method_fields.get("method_config")
    if config is not None:
        untrusted.mapping(config, f"{where}: 'method_config'")
    try:
        method = training_method(name, config)
    except ConfigError as e:
        raise CheckpointError(f"{where}: its method config is invalid: {e}") from None
    spec, model = _model_from(header, where, trust_model_code, file_bytes)
    if method is None:
        return model
    try:  # the method traces the layer order on the example
        return method.prepare(model, example)
    except (RuntimeError, ValueError) as e:  # what a forward raises on a misfit input
        raise CheckpointError(f"{where}: input shape {tuple(example.shape[1:])} does not fit the "
                              f"model {spec!r}: {' '.join(str(e).split())[:160]}") from None


def load_quantized(path, trust_model_code: bool | str = False):
    """Rebuild a quantized model saved by :func:`save_quantized`; returns ``(model, payload)``.

    The model the file names must be in lowbit's registry or among torchvision's builders;
    ``trust_model_code=True`` also allows the ``package.module:factory`` it names (that code
    runs), and a spec string allows exactly that spec."""
    payload = load_torch(path)
    if not is_quantized_checkpoint(payload):
        raise CheckpointError(f"{path} is not a lowbit quantized checkpoint")
    version = untrusted.integer(payload.get("version"), f"{path}: 'version'", 1)
    if version > VERSION:
        raise CheckpointError(f"{path} has format version {version}; this lowbit reads up to "
                              f"{VERSION}: upgrade lowbit")
    state = untrusted.tensor_dict(payload.get("state_dict"), f"{path}: 'state_dict'")
    qmodel = rebuild_quantized(payload, path, trust_model_code, Path(path).stat().st_size)
    load_weights(qmodel, state, path, exact_dtypes=True)
    check_loaded_state(qmodel, str(path))
    return qmodel.eval(), payload
