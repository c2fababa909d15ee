"""Bit packing: round trips, exact sizes, layout, per-row widths and bad input."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.deploy.bitpack import pack_bits, pack_rows, packed_size, unpack_bits, unpack_rows
from lowbit.errors import ConfigError


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 16), count=st.integers(0, 300), seed=st.integers(0, 2 ** 16))
def test_round_trip_and_exact_size(bits, count, seed):
    codes = np.random.default_rng(seed).integers(0, 2 ** bits, count)
    packed = pack_bits(codes, bits)
    assert packed.dtype == np.uint8 and packed.size == packed_size(count, bits)
    assert np.array_equal(unpack_bits(packed, bits, count), codes)


def test_little_endian_layout():
    # codes 1, 2, 3 at 2 bits: 01 | 10 | 11 from bit 0 upwards -> 0b00111001
    assert pack_bits([1, 2, 3], 2).tolist() == [0b00111001]
    assert pack_bits([1, 0, 1, 1, 0, 0, 0, 0, 1], 1).tolist() == [0b00001101, 0b1]
    assert pack_bits([0xABC], 12).tolist() == [0xBC, 0x0A]


def test_rows_with_their_own_widths():
    rng = np.random.default_rng(0)
    widths = np.array([1, 4, 3, 8])
    codes = np.stack([rng.integers(0, 2 ** b, 10) for b in widths])
    packed = pack_rows(codes, widths)
    assert packed.size == sum(packed_size(10, b) for b in widths)
    assert np.array_equal(unpack_rows(packed, widths, 4, 10), codes)
    same = pack_rows(codes[:, :5] % 2, 1)
    assert np.array_equal(unpack_rows(same, 1, 4, 5), codes[:, :5] % 2)


@pytest.mark.parametrize("codes,bits", [([4], 2), ([-1], 3), ([0], 0), ([0], 17)])
def test_bad_codes_or_widths(codes, bits):
    with pytest.raises(ConfigError):
        pack_bits(codes, bits)


def test_truncated_buffer_is_refused():
    with pytest.raises(ConfigError, match="need 2"):
        unpack_bits(np.zeros(1, np.uint8), 4, 3)
