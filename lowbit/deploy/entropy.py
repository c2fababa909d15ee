"""Entropy-coded weight codes: Deep Compression's third stage (Han et al. 2016, section 4).

A layer's integer codes (k-means indices, affine codes, any width up to 8 bits) are one stream
of byte symbols, Huffman-coded. Pruned weights (the k-means "pruned" code) may instead be stored
sparsely, as Han et al. store them: only the kept weights' codes, each preceded by its *relative
index*, the number of pruned weights since the previous kept one. A gap of more than
``MAX_GAP`` is split by filler entries (a pruned code after ``MAX_GAP`` pruned weights, which
decodes to zero like them), so every gap is one byte symbol; both streams are Huffman-coded.
The exporter keeps whichever of the dense and the sparse form is smaller (both are exact).

The Huffman coder is DEFLATE's Huffman-only mode (RFC 1951; ``zlib`` with ``Z_HUFFMAN_ONLY``,
raw streams): canonical Huffman codes over the 256 byte symbols, lengths limited to 15 bits, a
fresh table per block of at most 2^15 symbols, and no LZ77 matching. It is used rather than a
hand-written coder because zlib's C decoder is bit-exact, fast and hardened against malformed
input; decoding here is bounded by the count the header gives, so a corrupt stream cannot
expand past it.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from lowbit.errors import ConfigError

MAX_GAP = 255      # relative indices are bytes; longer runs of pruned weights take fillers
MAX_SYMBOL = 255   # codes above this (widths over 8 bits) are not entropy-coded
CODINGS = ("huffman",)


@dataclass
class CodedStream:
    """A layer's codes, entropy-coded: ``codes`` (and ``gaps`` when sparse) are Huffman
    streams; ``count`` codes in all, ``kept`` of them stored when sparse."""

    codes: bytes
    gaps: bytes | None
    count: int
    kept: int

    @property
    def nbytes(self) -> int:
        return len(self.codes) + len(self.gaps or b"")

    def header(self) -> dict:
        return {"coding": "huffman-sparse" if self.gaps is not None else "huffman",
                "count": self.count, "kept": self.kept}


def huffman_encode(symbols: np.ndarray) -> bytes:
    """The raw DEFLATE Huffman-only stream of uint8 ``symbols``."""
    coder = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_HUFFMAN_ONLY)
    return coder.compress(symbols.astype(np.uint8).tobytes()) + coder.flush()


def huffman_decode(data: bytes, count: int, what: str) -> np.ndarray:
    """Exactly ``count`` uint8 symbols from a stream of :func:`huffman_encode`, or
    ConfigError naming ``what`` when the stream is corrupt, short or longer."""
    decoder = zlib.decompressobj(-15)
    try:
        out = decoder.decompress(data, count)
        if len(out) == count and not decoder.eof:  # only the end of the last block is left
            out += decoder.decompress(decoder.unconsumed_tail, 1)
    except zlib.error as e:
        raise ConfigError(f"{what}: the Huffman stream is corrupt ({e})") from None
    if len(out) != count or not decoder.eof or decoder.unused_data:
        raise ConfigError(f"{what}: the Huffman stream does not hold exactly {count} codes")
    return np.frombuffer(out, dtype=np.uint8)


def relative_indices(codes: np.ndarray, pruned: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, gaps): the codes that are not ``pruned`` and the pruned run before each, runs
    longer than ``MAX_GAP`` split by filler entries (value ``pruned``, gap ``MAX_GAP``)."""
    kept = np.flatnonzero(codes != pruned)
    runs = np.diff(kept, prepend=-1) - 1
    fillers = runs // (MAX_GAP + 1)
    entries = fillers + 1                      # fillers, then the kept code itself
    values = np.full(int(entries.sum()), pruned, dtype=np.int64)
    gaps = np.full(len(values), MAX_GAP, dtype=np.int64)
    last = np.cumsum(entries) - 1
    values[last] = codes[kept]
    gaps[last] = runs % (MAX_GAP + 1)
    return values, gaps


def from_relative_indices(values: np.ndarray, gaps: np.ndarray, count: int, pruned: int,
                          what: str) -> np.ndarray:
    """The ``count`` codes back from :func:`relative_indices` (trailing codes pruned)."""
    positions = np.cumsum(gaps.astype(np.int64) + 1) - 1
    if len(positions) and positions[-1] >= count:
        raise ConfigError(f"{what}: the relative indices run past the {count} codes")
    codes = np.full(count, pruned, dtype=np.int64)
    codes[positions] = values
    return codes


def encode_codes(codes: np.ndarray, pruned: int | None = None) -> CodedStream | None:
    """The smaller exact entropy coding of a layer's flat non-negative ``codes`` (dense, or
    sparse when a ``pruned`` code is given), or None when a code exceeds a byte."""
    flat = codes.reshape(-1)
    if flat.size == 0 or int(flat.max()) > MAX_SYMBOL:
        return None
    dense = CodedStream(huffman_encode(flat), None, flat.size, flat.size)
    if pruned is None or not (flat == pruned).any():
        return dense
    values, gaps = relative_indices(flat, pruned)
    sparse = CodedStream(huffman_encode(values), huffman_encode(gaps), flat.size, len(values))
    return sparse if sparse.nbytes < dense.nbytes else dense


def decode_codes(meta: dict, codes: bytes, gaps: bytes | None, pruned: int | None,
                 what: str) -> np.ndarray:
    """A layer's flat int64 codes from its header entry ``meta`` (:meth:`CodedStream.header`,
    counts already checked) and streams."""
    if meta["coding"] == "huffman":
        return huffman_decode(codes, meta["count"], what).astype(np.int64)
    if pruned is None or gaps is None:
        raise ConfigError(f"{what}: sparse codes need a pruned code and a gap stream")
    values = huffman_decode(codes, meta["kept"], what).astype(np.int64)
    return from_relative_indices(values, huffman_decode(gaps, meta["kept"], what),
                                 meta["count"], pruned, what)


def coded_bytes(codes: np.ndarray, pruned: int | None = None) -> int | None:
    """Bytes :func:`encode_codes` gives ``codes`` (None: not coded)."""
    stream = encode_codes(codes, pruned)
    return None if stream is None else stream.nbytes
