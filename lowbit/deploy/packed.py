"""The packed file: one safetensors file whose size is the quantized model's real size.

Layout. Every quantized weight is stored as its integer codes bit-packed at their real width
(``<layer>.weight.codes``, uint8; per-channel widths from bit allocation packed row by row), with
its per-channel float32 scale and int32 zero point; every other tensor (biases, input-quantizer
parameters, any float layer) is stored as it is. To keep the file at the model's size, tensors
of one dtype are concatenated into a single safetensors tensor (a model has hundreds of small
ones, whose per-tensor safetensors entries would cost more than 2% at 2 bits), and the JSON
header (format and version, the model reference, the method's settings and layer plan, each
packed weight's shape and widths, and where every tensor lies in the concatenations) is stored
zlib-compressed in the safetensors metadata, beside a SHA-256 of the data and the header, so a
truncated or tampered file is detected.

:func:`load_packed` rebuilds the model. An affine weight (PTQ, STE QAT) is set to
``S * (code + q_min - Z)``, which its restored quantizer maps back to the same code. Every other
kind (k-means, binary, BWN, TWN, TTQ, LSQ; :mod:`lowbit.deploy.codes`) is decoded to the exact
quantized tensor the network computed with, and its weight slot becomes an ``nn.Identity``. Either
way the rebuilt model's outputs are bit-identical to the fake-quant model it came from.

Two origins are stored: a PTQ model (rebuilt by its method from the header, as a quantized
checkpoint is) and a model trained by ``lowbit train`` (rebuilt by the training method's
``prepare`` on a zero input of the recorded shape).
"""
from __future__ import annotations

import base64
import hashlib
import json
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from torch import nn

from lowbit.checkpoint import quantized_header, rebuild_quantized
from lowbit.deploy.bitpack import pack_rows, unpack_rows
from lowbit.deploy.codes import decode, encode
from lowbit.errors import CheckpointError, ConfigError
from lowbit.io import atomic_write
from lowbit.nn.layers import QUANT_LAYERS
from lowbit.nn.quantizer import AffineQuantizer, CorrectedQuantizer, affine_part
from lowbit.quant.affine import integer_range

FORMAT, VERSION = "lowbit-packed", 1


def _codes(w: torch.Tensor, q: AffineQuantizer):
    """([rows, n] codes - q_min as int64, per-row widths) of a weight on its quantizer's grid."""
    rows = q.codes(w.detach()).reshape(w.shape[0] if q.axis is not None else 1, -1)
    col = (lambda t: t.reshape(-1, 1)) if q.scale.dim() else (lambda t: t)
    widths = q.bits.reshape(-1) if q.bits.dim() else q.bits.reshape(1)
    return (rows - col(q.quant_min)).to(torch.int64), widths


def _bundle(tensors: dict[str, torch.Tensor]):
    """One flat tensor per dtype, and the index [key, dtype, offset, shape] of each tensor."""
    parts: dict[str, list[torch.Tensor]] = {}
    sizes: dict[str, int] = {}
    index = []
    for key, t in tensors.items():
        kind = str(t.dtype).removeprefix("torch.")
        index.append([key, kind, sizes.get(kind, 0), list(t.shape)])
        parts.setdefault(kind, []).append(t.detach().reshape(-1))
        sizes[kind] = sizes.get(kind, 0) + t.numel()
    return {kind: torch.cat(ts) for kind, ts in parts.items()}, index


def _unbundle(blobs: dict[str, torch.Tensor], index) -> dict[str, torch.Tensor]:
    out = {}
    for key, kind, offset, shape in index:
        n = int(np.prod(shape)) if shape else 1
        out[key] = blobs[kind][offset:offset + n].reshape(shape)
    return out


def _checksum(blobs: dict[str, torch.Tensor], header: bytes) -> str:
    digest = hashlib.sha256(header)
    for kind in sorted(blobs):
        digest.update(kind.encode())
        digest.update(blobs[kind].numpy().tobytes())
    return digest.hexdigest()


def export_packed(qmodel, path, model_spec: str, num_classes: int | None = None,
                  trained: dict | None = None) -> Path:
    """Write a quantized model as a packed file; returns the path.

    ``qmodel`` comes from :func:`lowbit.quantize`, or, with ``trained`` = ``{"method",
    "method_config", "input_shape"}``, from a ``lowbit train`` run (its ``model.pt``)."""
    if trained is not None:
        header = {"model": model_spec, "num_classes": num_classes, "trained": trained}
    else:
        header = quantized_header(qmodel, model_spec, num_classes)
    header.update(format=FORMAT, version=VERSION, weights={})
    tensors: dict[str, torch.Tensor] = {}
    state = qmodel.state_dict()
    skip = set()
    for name, layer in qmodel.named_modules():
        if not isinstance(layer, QUANT_LAYERS) or isinstance(layer.weight_quantizer, nn.Identity):
            continue
        key = f"{name}.weight"
        slot_prefix = f"{key}_quantizer."
        q = affine_part(layer.weight_quantizer)
        if q is not None:
            if not q.calibrated:
                raise ConfigError(f"{name}: the weight quantizer was never calibrated; quantize "
                                  "the model before exporting it")
            codes, widths = _codes(layer.weight, q)
            prefix = slot_prefix + ("quantizer." if isinstance(layer.weight_quantizer,
                                                               CorrectedQuantizer) else "")
            params = {"scale": q.scale.float(), "zero_point": q.zero_point.to(torch.int32)}
            skip.update(prefix + field for field in ("scale", "zero_point", "quant_min",
                                                       "quant_max"))
            entry = {"kind": "affine", "prefix": prefix}
        else:
            encoded = encode(layer.weight_quantizer, layer.weight, name)
            codes, widths = encoded.codes, torch.tensor([encoded.bits])
            params = encoded.params
            skip.update(k for k in state if k.startswith(slot_prefix))
            entry = {"kind": encoded.kind}
        packed = pack_rows(codes.numpy(), widths.numpy())
        tensors[f"{key}.codes"] = torch.from_numpy(packed)
        for param, value in params.items():
            tensors[f"{key}.{param}"] = value
        varying = bool((widths != widths[0]).any())
        if varying:
            tensors[f"{key}.bits"] = widths.to(torch.uint8)
        header["weights"][key] = {**entry, "shape": list(layer.weight.shape),
                                  "rows": codes.shape[0], "params": list(params),
                                  "bits": None if varying else int(widths[0])}
        skip.add(key)
    for key, value in state.items():
        if key not in skip:
            tensors[key] = value.contiguous()
    blobs, header["index"] = _bundle(tensors)
    packed_header = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    metadata = {"format": FORMAT, "version": str(VERSION),
                "header": base64.b64encode(packed_header).decode(),
                "sha256": _checksum(blobs, packed_header)}
    data = st_save(blobs, metadata=metadata)
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def is_packed_file(path) -> bool:
    """True when ``path`` starts like a safetensors file carrying a lowbit header."""
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as f:
        head = f.read(8 + 4096)
    return len(head) > 8 and f'"format":"{FORMAT}"'.encode() in head[8:].replace(b" ", b"")


def read_packed(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(header, tensors) of a packed file, after checking format, version and checksum."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"packed file not found: {path}")
    raw = path.read_bytes()
    try:
        blobs = st_load(raw)
        length = int.from_bytes(raw[:8], "little")
        metadata = json.loads(raw[8:8 + length])["__metadata__"]
    except (SafetensorError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not a readable lowbit packed file (truncated or "
                              f"corrupt): {str(e).splitlines()[0][:160]}") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a lowbit packed file")
    if int(metadata.get("version", 0)) > VERSION:
        raise CheckpointError(f"{path} has packed format version {metadata['version']}; this "
                              f"lowbit reads up to {VERSION}: upgrade lowbit")
    packed_header = base64.b64decode(metadata.get("header", ""))
    if _checksum(blobs, packed_header) != metadata.get("sha256"):
        raise CheckpointError(f"{path} fails its checksum: the file was modified or damaged")
    header = json.loads(zlib.decompress(packed_header))
    return header, _unbundle(blobs, header["index"])


def _rebuild(header: dict, path):
    """The (unloaded) model structure a header describes."""
    trained = header.get("trained")
    if trained is None:
        return rebuild_quantized(header, path)
    from lowbit.methods import training_method
    from lowbit.models import build_model

    model = build_model(header["model"], num_classes=header.get("num_classes"))
    method = training_method(trained["method"], trained["method_config"])
    if method is not None:
        model = method.prepare(model, torch.zeros(1, *trained["input_shape"]))
    return model


def load_packed(path):
    """Rebuild the quantized model stored in a packed file (outputs bit-identical to the model
    that was exported); returns ``(model, header)``."""
    header, tensors = read_packed(path)
    qmodel = _rebuild(header, path)
    modules = dict(qmodel.named_modules())
    state = {k: v for k, v in tensors.items()
             if not any(k.startswith(w + ".") for w in header["weights"])}
    for key, meta in header["weights"].items():
        layer = modules[key.rsplit(".", 1)[0]]
        kind = meta.get("kind", "affine")
        if kind == "affine":
            q = affine_part(layer.weight_quantizer)
            widths = tensors[f"{key}.bits"].to(torch.int64) if meta["bits"] is None else \
                torch.tensor(meta["bits"])
            qmin, qmax = integer_range(widths, q.scheme.signed, q.scheme.narrow)
            qmin, qmax = torch.as_tensor(qmin).float(), torch.as_tensor(qmax).float()
        else:
            widths = torch.tensor(meta["bits"])
        rows = meta["rows"]
        codes = torch.from_numpy(unpack_rows(tensors[f"{key}.codes"].numpy(), widths.numpy(),
                                             rows, int(np.prod(meta["shape"])) // rows))
        if kind != "affine":
            params = {p: tensors[f"{key}.{p}"] for p in meta["params"]}
            layer.weight_quantizer = nn.Identity()
            state[key] = decode(kind, codes, params).reshape(meta["shape"])
            continue
        scale, zero = tensors[f"{key}.scale"], tensors[f"{key}.zero_point"].float()
        col = (lambda t: t.reshape(-1, 1)) if scale.dim() else (lambda t: t)
        weight = (codes.float() + col(qmin) - col(zero)) * col(scale)
        state[key] = weight.reshape(meta["shape"])
        per_channel = scale.dim() > 0
        state[meta["prefix"] + "scale"] = scale
        state[meta["prefix"] + "zero_point"] = zero
        state[meta["prefix"] + "quant_min"] = qmin.expand(scale.shape).clone() \
            if per_channel else qmin.reshape(())
        state[meta["prefix"] + "quant_max"] = qmax.expand(scale.shape).clone() \
            if per_channel else qmax.reshape(())
    qmodel.load_state_dict(state, strict=True)
    return qmodel.eval(), header
