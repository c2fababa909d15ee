"""Mutations of real lowbit files, as someone crafting a hostile file would make them: random
byte flips, truncation at every section boundary, and replacement of one header field by an
arbitrary value with the checksum rewritten to match (whoever writes a file writes its checksum
too). :func:`outcome` loads a mutated file and classifies what happened. Shared by
``tests/test_file_safety.py`` and ``benchmarks/file_safety.py`` (the larger campaign)."""
from __future__ import annotations

import base64
import copy
import io
import json
import signal
import zipfile
import zlib

import torch
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import lowbit
from lowbit.checkpoint import load_quantized, save_quantized
from lowbit.data.core import Batches
from lowbit.deploy.packed import _checksum, export_packed, load_packed
from lowbit.errors import LowbitError
from lowbit.io import load_torch
from lowbit.methods import training_method
from lowbit.training.run import TRAINED_FORMAT, load_trained

KINDS = ("packed", "packed_kmeans", "packed_huffman", "quantized", "trained")

SPECS = ["os:system", "subprocess:getoutput", "lowbit.io:write_text", "builtins:eval",
         "torchvision.models:vit_h_14", "torchvision.models:get_model", "resnet20", "digits_cnn",
         "tests.user_models:UserNet"]
WORDS = ["affine", "kmeans", "binary", "ternary", "ttq", "lsq", "scaled_binary", "uint8",
         "float32", "int32", "int64", "ptq", "qat", "fp", "twn", "scale", "zero_point",
         "codebook", "alpha", "0.weight", "touch /tmp/lowbit-pwned", "(.|.|.)*z", "minmax", "mse"]
SCALARS = (st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 63)
           | st.sampled_from([0, 1, -1, 2, 3, 7, 8, 15, 16, 17, 255, 2 ** 31, 10 ** 12])
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
           | st.sampled_from(SPECS + WORDS))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.sampled_from(WORDS) | st.text(max_size=6), inner,
                                        max_size=4), max_leaves=12)


def make_files(root, data, fp):
    """Real files of every format lowbit loads, from a float digits CNN: a PTQ packed file
    (per-channel widths, bias correction), a k-means packed file (a trained method), a pruned
    k-means packed file with Huffman-coded, relative-index codes, the PTQ
    ``quantized.pt`` and the k-means ``model.pt``; returns (paths, input, outputs)."""
    calib = Batches(data.train, data.normalization(), 256)
    x = next(iter(Batches(data.test, data.normalization(), 64)))[0]
    q = lowbit.quantize(fp, lowbit.PTQConfig(w_bits=3, a_bits=4, w_bit_alloc=True,
                                             a_bit_alloc=True, bias_correction="mean"), calib)
    method = training_method("kmeans", {"w_bits": 3})
    km = method.prepare(copy.deepcopy(fp), x[:8])
    trained = {"method": "kmeans", "method_config": method.config.to_dict(),
               "input_shape": list(x.shape[1:])}
    sparse = training_method("kmeans", {"w_bits": 3, "prune": 0.6})  # Huffman, relative indices
    pruned = sparse.prepare(copy.deepcopy(fp), x[:8])
    pruned_trained = {**trained, "method_config": sparse.config.to_dict()}
    paths = {"packed": export_packed(q, root / "q.lowbit", "digits_cnn"),
             "packed_kmeans": export_packed(km, root / "km.lowbit", "digits_cnn", 10,
                                            trained=trained),
             "packed_huffman": export_packed(pruned, root / "huff.lowbit", "digits_cnn", 10,
                                             trained=pruned_trained, entropy="huffman"),
             "quantized": save_quantized(root / "q.pt", q, "digits_cnn"),
             "trained": root / "model.pt"}
    torch.save({"format": TRAINED_FORMAT, "state_dict": km.state_dict(), "model": "digits_cnn",
                "num_classes": 10, "method": "kmeans",
                "method_config": trained["method_config"]}, paths["trained"])
    with torch.no_grad():
        outputs = {"packed": q(x), "quantized": q(x), "packed_kmeans": km(x), "trained": km(x),
                   "packed_huffman": pruned(x)}
    return paths, x, outputs


def loader(kind: str, example: torch.Tensor):
    """The API call that loads a file of ``kind``: ``path -> (model, header)``."""
    if kind.startswith("packed"):
        return load_packed
    if kind == "quantized":
        return load_quantized
    return lambda path: (load_trained(load_torch(path), example, path), None)


def header_of(kind: str, path):
    """What the header-field mutations edit: the packed JSON header, or a torch file's payload
    without its state_dict."""
    if kind.startswith("packed"):
        return packed_parts(path.read_bytes())[0]
    payload = torch.load(path, weights_only=True)
    return {k: v for k, v in payload.items() if k != "state_dict"}


def with_header(kind: str, path, header) -> bytes:
    """The file at ``path`` with ``header`` in place of its own, consistent in every check
    lowbit cannot tell from intent (checksum, CRC)."""
    if kind.startswith("packed"):
        return packed_with(path.read_bytes(), header)
    state = torch.load(path, weights_only=True)["state_dict"]
    return torch_bytes({**header, "state_dict": state})


def sections(kind: str, raw: bytes) -> list[int]:
    return packed_sections(raw) if kind.startswith("packed") else torch_sections(raw)


def field_paths(obj, prefix=(), limit=6):
    """Every path (a tuple of keys / indices) to a value inside nested dicts and lists."""
    paths = [prefix] if prefix else []
    if len(prefix) < limit:
        items = obj.items() if isinstance(obj, dict) else enumerate(obj) \
            if isinstance(obj, list) else ()
        for key, value in items:
            paths += field_paths(value, prefix + (key,), limit)
    return paths


def edit(header, draw):
    """``header`` with one field (drawn by hypothesis's ``draw``) replaced by an arbitrary value,
    or now and then removed."""
    path = draw(st.sampled_from(field_paths(header)))
    if draw(st.integers(0, 9)) == 0:
        return without(header, path)
    return replaced(header, path, draw(VALUES))


def replaced(obj, path, value):
    obj = copy.deepcopy(obj)
    target = obj
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return obj


def without(obj, path):
    obj = copy.deepcopy(obj)
    target = obj
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return obj


# -- the packed file ---------------------------------------------------------------------------

def packed_parts(raw: bytes) -> tuple[dict, dict, dict]:
    """(header, blobs, metadata) of a packed file."""
    length = int.from_bytes(raw[:8], "little")
    metadata = json.loads(raw[8:8 + length])["__metadata__"]
    header = json.loads(zlib.decompress(base64.b64decode(metadata["header"])))
    return header, st_load(raw), metadata


def packed_with(raw: bytes, header=None, packed_header: bytes | None = None) -> bytes:
    """The packed file with its header replaced and the checksum recomputed to match."""
    _, blobs, metadata = packed_parts(raw)
    if packed_header is None:
        packed_header = zlib.compress(json.dumps(header).encode())
    metadata = {**metadata, "header": base64.b64encode(packed_header).decode(),
                "sha256": _checksum(blobs, packed_header)}
    return st_save(blobs, metadata=metadata)


def packed_sections(raw: bytes) -> list[int]:
    """Byte offsets where the packed file's sections start and end."""
    length = int.from_bytes(raw[:8], "little")
    table = json.loads(raw[8:8 + length])
    cuts = {0, 8, 8 + length, len(raw)}
    for name, entry in table.items():
        if name != "__metadata__":
            cuts.update(8 + length + offset for offset in entry["data_offsets"])
    return sorted(cuts)


# -- the torch checkpoint (quantized.pt, model.pt) ---------------------------------------------

def torch_bytes(payload) -> bytes:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def torch_sections(raw: bytes) -> list[int]:
    """Byte offsets of every zip entry's header, data and end, and of the central directory."""
    cuts = {0, len(raw)}
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        for info in archive.infolist():
            start = info.header_offset
            name_len = int.from_bytes(raw[start + 26:start + 28], "little")
            extra_len = int.from_bytes(raw[start + 28:start + 30], "little")
            data = start + 30 + name_len + extra_len
            cuts.update((start, data, data + info.compress_size))
        cuts.add(max(cuts - {len(raw)}) + 1)
    return sorted(cuts)


# -- outcomes ----------------------------------------------------------------------------------

class Hang(Exception):
    pass


def outcome(load, path, reference: torch.Tensor, x: torch.Tensor, seconds: int = 30) -> str:
    """'identical' (loads, outputs bit-equal to the original's), 'refused' (a LowbitError),
    'different' (loads, other outputs) or 'other: ...' (any other exception or a hang)."""
    def alarm(*_):
        raise Hang()
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        model, _ = load(path)
        with torch.no_grad():
            out = model(x)
        return "identical" if torch.equal(out, reference) else "different"
    except LowbitError:
        return "refused"
    except Hang:
        return f"other: no answer within {seconds} s"
    except Exception as e:  # the suite exists to find these
        return f"other: {type(e).__name__}: {str(e)[:200]}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def flips(raw: bytes, changes) -> bytes:
    data = bytearray(raw)
    for position, mask in changes:
        data[position % len(data)] ^= mask
    return bytes(data)


def cut_points(sections: list[int], size: int) -> list[int]:
    """Truncation lengths at and around every section boundary (the whole file excluded)."""
    return sorted({c + d for c in sections for d in (-1, 0, 1)} & set(range(size)))
