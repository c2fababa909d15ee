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

The checksum detects damage, not intent: whoever writes a file writes its checksum too. So the
header is untrusted (:mod:`lowbit.untrusted`): it may only name a model of lowbit's registry or
a torchvision builder (unless the caller trusts its model code), every value is checked by
type and range, the index must tile the data exactly, and each packed weight must be what its
layer's own encoding would write (kind, shape, rows, widths, parameter shapes, a codes buffer
of exactly the implied size) before anything is decoded.
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
import zlib
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from torch import nn

from lowbit import untrusted
from lowbit.checkpoint import check_loaded_state, quantized_header, rebuild_quantized, \
    rebuild_trained
from lowbit.deploy.bitpack import MAX_BITS, pack_rows, packed_size, unpack_rows
from lowbit.deploy.codes import decode, encode
from lowbit.deploy.entropy import CODINGS, decode_codes, encode_codes
from lowbit.errors import CheckpointError, ConfigError
from lowbit.io import atomic_write, load_weights
from lowbit.methods import TRAINING_METHODS
from lowbit.nn.layers import QUANT_LAYERS
from lowbit.nn.quantizer import AffineQuantizer, CorrectedQuantizer, affine_part
from lowbit.quant.affine import integer_range

FORMAT, VERSION = "lowbit-packed", 2  # 2: Huffman-coded weights
MAX_HEADER_BYTES = 64 << 20     # the inflated JSON header (a compression bomb is refused)
MAX_INPUT_NUMEL = 3 * 2048 * 2048  # the input a trained model is rebuilt on


def affine_codes(w: torch.Tensor, q: AffineQuantizer):
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


def _checksum(blobs: dict[str, torch.Tensor], header: bytes) -> str:
    digest = hashlib.sha256(header)
    for kind in sorted(blobs):
        digest.update(kind.encode())
        digest.update(blobs[kind].numpy().tobytes())
    return digest.hexdigest()


def export_packed(qmodel, path, model_spec: str, num_classes: int | None = None,
                  trained: dict | None = None, entropy: str | None = None) -> Path:
    """Write a quantized model as a packed file; returns the path.

    ``qmodel`` comes from :func:`lowbit.quantize`, or, with ``trained`` = ``{"method",
    "method_config", "input_shape"}``, from a ``lowbit train`` run (its ``model.pt``).
    ``entropy="huffman"`` Huffman-codes every weight's codes of up to 8 bits, pruned k-means
    weights stored sparsely where that is smaller (:mod:`lowbit.deploy.entropy`; such a file
    is format version 2)."""
    if entropy is not None and entropy not in CODINGS:
        raise ConfigError(f"entropy must be one of {', '.join(CODINGS)}, got {entropy!r}")
    if trained is not None:
        header = {"model": model_spec, "num_classes": num_classes, "trained": trained}
    else:
        header = quantized_header(qmodel, model_spec, num_classes)
    header.update(format=FORMAT, version=1, weights={})
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
            codes, widths = affine_codes(layer.weight, q)
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
        coded = encode_codes(codes.numpy(), _pruned_code(entry["kind"], params)) \
            if entropy else None
        if coded is None:
            tensors[f"{key}.codes"] = torch.from_numpy(pack_rows(codes.numpy(), widths.numpy()))
        else:
            tensors[f"{key}.codes"] = _byte_tensor(coded.codes)
            if coded.gaps is not None:
                tensors[f"{key}.gaps"] = _byte_tensor(coded.gaps)
            entry["entropy"] = coded.header()
            header["version"] = 2
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
    metadata = {"format": FORMAT, "version": str(header["version"]),
                "header": base64.b64encode(packed_header).decode(),
                "sha256": _checksum(blobs, packed_header)}
    data = st_save(blobs, metadata=metadata)
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def _pruned_code(kind: str, params: dict) -> int | None:
    """The code of a pruned weight (k-means: the code past the k clusters), else None."""
    return params["codebook"].shape[-1] if kind == "kmeans" else None


def _byte_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def is_packed_file(path) -> bool:
    """True when ``path`` starts like a safetensors file carrying a lowbit header."""
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as f:
        head = f.read(8 + 4096)
    return len(head) > 8 and f'"format":"{FORMAT}"'.encode() in head[8:].replace(b" ", b"")


def read_packed(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(header, tensors) of a packed file, after checking format, version, checksum, the
    header's size and the index, which must tile each concatenated tensor exactly."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise CheckpointError(f"packed file not found: {path}")
    raw = path.read_bytes()
    try:
        blobs = st_load(raw)
        length = int.from_bytes(raw[:8], "little")
        metadata = json.loads(raw[8:8 + length])["__metadata__"]
        version = int(metadata.get("version", 0))
        packed_header = base64.b64decode(metadata.get("header", ""), validate=True)
    except (SafetensorError, ValueError, KeyError, TypeError, AttributeError,
            RecursionError) as e:
        raise CheckpointError(f"{path} is not a readable lowbit packed file (truncated or "
                              f"corrupt): {str(e).splitlines()[0][:160] if str(e) else e!r}") \
            from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a lowbit packed file")
    if version > VERSION:
        raise CheckpointError(f"{path} has packed format version {version}; this "
                              f"lowbit reads up to {VERSION}: upgrade lowbit")
    if version < 1:
        raise CheckpointError(f"{path} has packed format version {version}, which no lowbit "
                              "wrote")
    if _checksum(blobs, packed_header) != metadata.get("sha256"):
        raise CheckpointError(f"{path} fails its checksum: the file was modified or damaged")
    header = untrusted.mapping(untrusted.parse_json(
        untrusted.inflate(packed_header, f"{where}: header", MAX_HEADER_BYTES),
        f"{where}: header"), f"{where}: header")
    return header, _unbundle(blobs, header.get("index"), where)


def _unbundle(blobs: dict[str, torch.Tensor], index, where: str) -> dict[str, torch.Tensor]:
    """The tensors an index names; refused unless it tiles every blob in order, end to end."""
    out, ends = {}, {}
    for i, entry in enumerate(untrusted.sequence(index, f"{where}: index")):
        at = f"{where}: index[{i}]"
        key, kind, offset, dims = untrusted.sequence(entry, at, 4)
        key = untrusted.text(key, f"{at} key")
        untrusted.text(kind, f"{at} dtype", blobs)
        untrusted.integer(offset, f"{at} offset", ends.get(kind, 0), ends.get(kind, 0))
        dims = untrusted.shape(dims, f"{at} shape", blobs[kind].numel() - offset)
        if key in out:
            raise untrusted.refuse(at, f"names {key!r} twice")
        ends[kind] = offset + math.prod(dims)
        out[key] = blobs[kind][offset:ends[kind]].reshape(dims)
    for kind, blob in blobs.items():
        if str(blob.dtype).removeprefix("torch.") != kind or ends.get(kind, 0) != blob.numel():
            raise untrusted.refuse(f"{where}: index", f"does not cover the {kind} data exactly")
    return out


def _rebuild(header: dict, path, trust_model_code, file_bytes: int):
    """The (unloaded) model structure a header describes."""
    trained = header.get("trained")
    if trained is None:
        return rebuild_quantized(header, path, trust_model_code, file_bytes)
    where = f"{path}: 'trained'"
    untrusted.mapping(trained, where)
    input_shape = untrusted.shape(trained.get("input_shape"), f"{where} input_shape",
                                  MAX_INPUT_NUMEL)
    if not 1 <= len(input_shape) <= 3 or 0 in input_shape:
        raise untrusted.refuse(f"{where} input_shape", f"must be 1 to 3 positive sizes, got "
                                                       f"{input_shape}")
    return rebuild_trained(header, trained, torch.zeros(1, *input_shape), where,
                           trust_model_code, file_bytes, methods=TRAINING_METHODS)


def load_packed(path, trust_model_code: bool | str = False):
    """Rebuild the quantized model stored in a packed file (outputs bit-identical to the model
    that was exported); returns ``(model, header)``.

    The model the file names must be in lowbit's registry or among torchvision's builders;
    ``trust_model_code=True`` also allows the ``package.module:factory`` it names (that code
    runs), and a spec string allows exactly that spec."""
    header, tensors = read_packed(path)
    where = str(path)
    weights = untrusted.mapping(header.get("weights"), f"{where}: 'weights'")
    qmodel = _rebuild(header, path, trust_model_code, Path(path).stat().st_size)
    modules = dict(qmodel.named_modules())
    state = {k: v for k, v in tensors.items()
             if not any(k.startswith(w + ".") for w in weights)}
    for key, meta in weights.items():
        try:
            state.update(_load_weight(key, meta, modules, tensors, f"{where}: weight {key!r}"))
        except ConfigError as e:
            raise CheckpointError(f"{where}: weight {key!r}: {e}") from None
    load_weights(qmodel, state, where, exact_dtypes=True)
    check_loaded_state(qmodel, where)
    return qmodel.eval(), header


def _load_weight(key: str, meta, modules: dict, tensors: dict, where: str) -> dict:
    """The state entries of one packed weight, after checking its header entry against the
    layer it names: the encoding the layer uses, its shape, rows, widths and parameters, and
    a codes buffer of exactly the size those imply."""
    layer = modules.get(key.removesuffix(".weight")) if key.endswith(".weight") else None
    if not isinstance(layer, QUANT_LAYERS) or isinstance(layer.weight_quantizer, nn.Identity):
        raise untrusted.refuse(where, "names no quantized layer of the model")
    meta = untrusted.mapping(meta, where)
    slot = layer.weight_quantizer
    q = affine_part(slot)
    reference = None if q is not None else encode(slot, layer.weight, key)
    kind = "affine" if q is not None else reference.kind
    untrusted.text(meta.get("kind", "affine"), f"{where} kind", [kind])
    if untrusted.shape(meta.get("shape"), f"{where} shape") != list(layer.weight.shape):
        raise untrusted.refuse(f"{where} shape", f"is not the layer's {list(layer.weight.shape)}")
    rows = layer.weight.shape[0] if q is None or q.axis is not None else 1
    untrusted.integer(meta.get("rows"), f"{where} rows", rows, rows)
    names = untrusted.sequence(meta.get("params"), f"{where} params")
    if q is not None:
        channels = (rows,) if q.axis is not None else ()
        expected = {"scale": torch.zeros(channels),
                    "zero_point": torch.zeros(channels, dtype=torch.int32)}
    else:
        expected = reference.params
    if names != list(expected):
        raise untrusted.refuse(f"{where} params", f"must be {list(expected)}, got {names!r}")
    params = {}
    for name, like in expected.items():
        value = tensors.get(f"{key}.{name}")
        if value is None or value.shape != like.shape or value.dtype.is_floating_point != \
                like.dtype.is_floating_point:
            raise untrusted.refuse(f"{where} {name}", f"must be a tensor shaped "
                                                      f"{tuple(like.shape)}")
        params[name] = value
    widths = _widths(meta, tensors.get(f"{key}.bits"), rows, q, reference, where)
    per_row = layer.weight.numel() // rows
    packed = tensors.get(f"{key}.codes")
    if meta.get("entropy") is not None:
        codes = _entropy_codes(meta["entropy"], packed, tensors.get(f"{key}.gaps"), rows,
                               per_row, widths, _pruned_code(kind, params), where)
    else:
        need = sum(packed_size(per_row, int(b)) for b in widths) \
            if len(set(widths.tolist())) > 1 else packed_size(rows * per_row, int(widths[0]))
        if packed is None or packed.dtype != torch.uint8 or packed.shape != (need,):
            raise untrusted.refuse(f"{where} codes", f"must be {need} bytes of uint8 codes")
        codes = torch.from_numpy(unpack_rows(packed.numpy(), widths.numpy(), rows, per_row))
    if q is None:
        layer.weight_quantizer = nn.Identity()
        return {key: decode(kind, codes, params).reshape(layer.weight.shape)}
    return _affine_state(key, meta, slot, q, codes, params, widths, where)


def _entropy_codes(coding, packed, gaps, rows: int, per_row: int, widths: torch.Tensor,
                   pruned: int | None, where: str) -> torch.Tensor:
    """The ``[rows, per_row]`` codes of a Huffman-coded weight, after checking its header
    entry, and that every code fits its row's width."""
    coding = untrusted.mapping(coding, f"{where} entropy")
    kind = untrusted.text(coding.get("coding"), f"{where} entropy coding",
                          ["huffman", "huffman-sparse"])
    count = rows * per_row
    untrusted.integer(coding.get("count"), f"{where} entropy count", count, count)
    untrusted.integer(coding.get("kept"), f"{where} entropy kept", 0, count)
    streams = [packed] + ([gaps] if kind == "huffman-sparse" else [])
    if any(t is None or t.dtype != torch.uint8 or t.dim() != 1 for t in streams):
        raise untrusted.refuse(f"{where} codes", "must be uint8 Huffman streams")
    try:
        flat = decode_codes(coding, packed.numpy().tobytes(),
                            gaps.numpy().tobytes() if gaps is not None else None, pruned, where)
    except ConfigError as e:
        raise untrusted.refuse(f"{where} codes", str(e).removeprefix(f"{where}: ")) from None
    codes = torch.from_numpy(flat.reshape(rows, per_row))
    if bool((codes >= (2 ** widths).reshape(-1, 1)).any()):
        raise untrusted.refuse(f"{where} codes", "hold a code past the row's width")
    return codes


def _widths(meta: dict, stored, rows: int, q, reference, where: str) -> torch.Tensor:
    """Bits of every row: the header's one width, or the per-row ``.bits`` tensor."""
    bits = meta.get("bits")
    if bits is None and q is not None:
        if stored is None or stored.dtype != torch.uint8 or stored.shape != (rows,) or \
                not ((stored >= 1) & (stored <= MAX_BITS)).all():
            raise untrusted.refuse(f"{where} bits", f"need {rows} per-row widths of 1..{MAX_BITS}")
        return stored.to(torch.int64)
    untrusted.integer(bits, f"{where} bits", 1, MAX_BITS)
    if reference is not None and bits != reference.bits and not (
            reference.kind == "kmeans" and bits == _kmeans_bits(reference.params["codebook"])):
        raise untrusted.refuse(f"{where} bits", f"must be {reference.bits} for {reference.kind} "
                                                f"codes, got {bits}")
    return torch.full((rows,), bits, dtype=torch.int64)


def _kmeans_bits(codebook: torch.Tensor) -> int:
    """Width of k-means codes with a pruned-weight code beside the k cluster indices."""
    return max(1, math.ceil(math.log2(codebook.shape[-1] + 1)))


def _affine_state(key, meta, slot, q, codes, params, widths, where) -> dict:
    """Weight and quantizer state of an affine weight: ``W = S * (code + q_min - Z)``."""
    prefix = f"{key}_quantizer." + ("quantizer." if isinstance(slot, CorrectedQuantizer) else "")
    untrusted.text(meta.get("prefix", prefix), f"{where} prefix", [prefix])
    per_channel = q.axis is not None
    qmin, qmax = integer_range(widths if per_channel else widths[0], q.scheme.signed,
                               q.scheme.narrow)
    qmin, qmax = torch.as_tensor(qmin).float(), torch.as_tensor(qmax).float()
    scale, zero = params["scale"].float(), params["zero_point"].float()
    col = (lambda t: t.reshape(-1, 1)) if per_channel else (lambda t: t)
    weight = (codes.float() + col(qmin) - col(zero)) * col(scale)
    return {key: weight.reshape(meta["shape"]), prefix + "scale": scale,
            prefix + "zero_point": zero, prefix + "quant_min": qmin.reshape(scale.shape),
            prefix + "quant_max": qmax.reshape(scale.shape)}
