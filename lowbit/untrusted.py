"""Reading files someone else may have written: every value is data, never an instruction.

A lowbit file (a ``quantized.pt``, a training run's ``model.pt``, a packed ``.lowbit`` file, a
resume ``checkpoint.pt``) travels: it is downloaded, attached to bug reports, passed between
teams. So a file *names* things and lowbit decides what they mean:

* the model a file names resolves only against lowbit's registry and torchvision's model
  builders (:func:`lowbit.models.resolve_model`); other model code runs only when the caller
  trusts it;
* every header value is checked by type and range before use (the helpers below), configs by
  their dataclass field types (:mod:`lowbit.config`);
* nothing a file holds can make lowbit allocate much more than the file's own bytes: a torch
  archive's entries must be stored uncompressed, fit in the file and pass their CRC-32
  (:func:`check_torch_archive`, since ``torch.load`` inflates deflated entries and checks no
  CRC), every tensor must be backed by its own bytes (:func:`check_tensors`: no stride-0 view
  claiming more elements than its storage holds), zlib streams inflate to a bound
  (:func:`inflate`), and JSON that nests too deep is refused (:func:`parse_json`).

Every refusal is a :class:`~lowbit.errors.CheckpointError` naming the file and the field.
"""
from __future__ import annotations

import json
import math
import zipfile
import zlib
from pathlib import Path

import torch

from lowbit.errors import CheckpointError

MAX_CLASSES = 100_000          # ImageNet-21k has 21,841
MAX_DIMS = 8                   # tensor rank
MAX_DIM = 2 ** 31 - 1          # one dimension
MAX_TEXT = 4096                # characters of one string value
ZIP_MAGIC = b"PK\x03\x04"      # torch.save's archive format; the older format is a pickle


def refuse(where: str, message: str) -> CheckpointError:
    return CheckpointError(f"{where}: {message}")


def integer(value, where: str, low: int | None = None, high: int | None = None) -> int:
    """``value`` if it is an int (not a bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise refuse(where, f"must be an integer, got {_show(value)}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise refuse(where, f"must be in [{low}, {high}], got {value}")
    return value


def optional_integer(value, where: str, low: int | None = None, high: int | None = None):
    return None if value is None else integer(value, where, low, high)


def text(value, where: str, choices=None) -> str:
    """``value`` if it is a string of at most MAX_TEXT characters (one of ``choices``)."""
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise refuse(where, f"must be a string, got {_show(value)}")
    if choices is not None and value not in choices:
        raise refuse(where, f"must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def flag(value, where: str) -> bool:
    if not isinstance(value, bool):
        raise refuse(where, f"must be true or false, got {_show(value)}")
    return value


def mapping(value, where: str) -> dict:
    """``value`` if it is a dict with string keys."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise refuse(where, f"must be a mapping with string keys, got {_show(value)}")
    return value


def sequence(value, where: str, length: int | None = None) -> list:
    if not isinstance(value, (list, tuple)) or (length is not None and len(value) != length):
        size = "" if length is None else f" of {length} items"
        raise refuse(where, f"must be a list{size}, got {_show(value)}")
    return list(value)


def shape(value, where: str, max_numel: int | None = None) -> list[int]:
    """A tensor shape: at most MAX_DIMS non-negative ints, ``max_numel`` elements at most."""
    dims = sequence(value, where)
    if len(dims) > MAX_DIMS:
        raise refuse(where, f"has {len(dims)} dimensions, at most {MAX_DIMS} allowed")
    dims = [integer(d, f"{where}[{i}]", 0, MAX_DIM) for i, d in enumerate(dims)]
    if max_numel is not None and math.prod(dims) > max_numel:
        raise refuse(where, f"claims {math.prod(dims)} elements, more than the file holds")
    return dims


def tensor_dict(value, where: str) -> dict[str, torch.Tensor]:
    state = mapping(value, where)
    for key, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise refuse(where, f"entry {key!r} is {type(t).__name__}, not a tensor")
    return state


def inflate(data: bytes, where: str, max_bytes: int) -> bytes:
    """zlib-decompress at most ``max_bytes`` (a compression bomb is refused, not inflated)."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, max_bytes)
    except zlib.error as e:
        raise refuse(where, f"is not a valid zlib stream ({e})") from None
    if inflater.unconsumed_tail or not inflater.eof:
        raise refuse(where, f"inflates beyond {max_bytes} bytes or is cut short")
    return out


def parse_json(data: bytes | str, where: str):
    """json.loads that turns every failure, nesting too deep for the parser included, into a
    refusal (the validators that read the result never recurse)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:
        raise refuse(where, f"is not valid JSON ({str(e)[:120]})") from None


def check_torch_archive(path: Path) -> None:
    """Refuse a ``torch.save`` zip archive that could inflate or was altered: every entry stored
    uncompressed (as torch.save writes them; torch.load would inflate a deflated one), the
    entries' sizes within the file's, and every CRC-32 intact (torch.load checks none). The older
    pickle format is left to torch.load, which checks each storage's size against the file."""
    with path.open("rb") as f:
        if f.read(4) != ZIP_MAGIC:
            return
    where = str(path)
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
            if any(e.compress_type != zipfile.ZIP_STORED for e in entries):
                raise refuse(where, "has compressed entries, which torch.save never writes")
            if sum(e.file_size for e in entries) > path.stat().st_size:
                raise refuse(where, "claims entries larger than the file itself")
            damaged = archive.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError,
            NotImplementedError) as e:
        raise refuse(where, f"is not a readable archive (truncated or corrupt): "
                            f"{str(e)[:160]}") from None
    if damaged is not None:
        raise refuse(where, f"entry {damaged} fails its CRC-32: the file was modified or "
                            "damaged")


def check_tensors(obj, where: str, max_depth: int = 16) -> None:
    """Every tensor in ``obj`` (nested dicts / lists) is backed by its own bytes: a view whose
    elements outnumber its storage (stride 0) would let a tiny file ask for a huge copy."""
    stack = [(obj, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, torch.Tensor):
            if item.numel() * item.element_size() > item.untyped_storage().nbytes():
                raise refuse(where, f"holds a {tuple(item.shape)} tensor backed by only "
                                    f"{item.untyped_storage().nbytes()} bytes")
        elif isinstance(item, (dict, list, tuple)):
            if depth >= max_depth:
                raise refuse(where, f"nests more than {max_depth} levels deep")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


def _show(value) -> str:
    shown = repr(value)
    return f"{type(value).__name__} {shown[:60]}{'...' if len(shown) > 60 else ''}"
