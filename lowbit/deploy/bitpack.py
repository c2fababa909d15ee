"""Bit packing of integer codes at their real width, so a file's size is the model's size.

Codes are non-negative integers below 2^bits (a signed code is stored as ``q - q_min``). The
stream is little-endian at both levels: code i occupies bits [i*b, (i+1)*b) of the stream, and
bit j of the stream is bit (j mod 8) of byte j // 8. n codes of b bits take ceil(n*b / 8) bytes.
NumPy's ``packbits`` / ``unpackbits`` do the byte-level work; 8-bit codes are stored as bytes.
Rows with different widths (per-channel bit allocation) are packed one after the other, each
starting on a byte boundary.
"""
from __future__ import annotations

import numpy as np

from lowbit.errors import ConfigError

MAX_BITS = 16


def _check(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or \
            not 1 <= bits <= MAX_BITS:
        raise ConfigError(f"packed codes need 1..{MAX_BITS} bits, got {bits!r}")


def packed_size(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def pack_bits(codes, bits: int) -> np.ndarray:
    """uint8 array holding ``codes`` (any shape, flattened) at ``bits`` bits each."""
    _check(bits)
    codes = np.asarray(codes).reshape(-1)
    if codes.size and (codes.min() < 0 or codes.max() >= 2 ** bits):
        raise ConfigError(f"codes must lie in [0, {2 ** bits - 1}] for {bits} bits, got "
                          f"[{codes.min()}, {codes.max()}]")
    if bits == 8:
        return codes.astype(np.uint8)
    planes = (codes.astype(np.uint32)[:, None] >> np.arange(bits, dtype=np.uint32)) & 1
    return np.packbits(planes.astype(np.uint8).reshape(-1), bitorder="little")


def unpack_bits(buffer, bits: int, count: int) -> np.ndarray:
    """The first ``count`` codes of ``bits`` bits from a packed uint8 buffer (int64)."""
    _check(bits)
    buffer = np.asarray(buffer, dtype=np.uint8).reshape(-1)
    if buffer.size < packed_size(count, bits):
        raise ConfigError(f"packed buffer holds {buffer.size} bytes, {count} codes of {bits} "
                          f"bits need {packed_size(count, bits)}")
    if bits == 8:
        return buffer[:count].astype(np.int64)
    planes = np.unpackbits(buffer, bitorder="little")[: count * bits].reshape(count, bits)
    return (planes.astype(np.int64) << np.arange(bits, dtype=np.int64)).sum(1)


def pack_rows(codes: np.ndarray, bits) -> np.ndarray:
    """Pack a [rows, n] code matrix with per-row widths ``bits`` (an int or one per row)."""
    codes = np.asarray(codes)
    widths = np.broadcast_to(np.asarray(bits), (codes.shape[0],))
    if np.all(widths == widths[0]):
        return pack_bits(codes, int(widths[0]))
    return np.concatenate([pack_bits(row, int(b)) for row, b in zip(codes, widths)])


def unpack_rows(buffer, bits, rows: int, per_row: int) -> np.ndarray:
    """Inverse of :func:`pack_rows`: a [rows, per_row] int64 code matrix."""
    widths = np.broadcast_to(np.asarray(bits), (rows,))
    if np.all(widths == widths[0]):
        return unpack_bits(buffer, int(widths[0]), rows * per_row).reshape(rows, per_row)
    buffer = np.asarray(buffer, dtype=np.uint8)
    out, offset = [], 0
    for b in widths:
        size = packed_size(per_row, int(b))
        out.append(unpack_bits(buffer[offset:offset + size], int(b), per_row))
        offset += size
    return np.stack(out)
