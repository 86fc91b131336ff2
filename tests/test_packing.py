"""Bit packing round-trips and layout (LSB-first, as MatMulNBits)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from onnxq.packing import pack_bits, packed_length, unpack_bits


@settings(max_examples=200, deadline=None)
@given(bits=st.sampled_from([1, 2, 3, 4, 5, 8]), rows=st.integers(1, 4), count=st.integers(0, 70), data=st.data())
def test_pack_unpack_round_trip(bits, rows, count, data):
    values = data.draw(arrays(np.uint8, (rows, count), elements=st.integers(0, (1 << bits) - 1)))
    packed = pack_bits(values, bits)
    assert packed.shape == (rows, packed_length(count, bits))
    np.testing.assert_array_equal(unpack_bits(packed, bits, count), values)


def test_layout_is_lsb_first():
    assert pack_bits(np.array([1, 2, 3, 0]), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    assert pack_bits(np.array([0xA, 0x5]), 4).tolist() == [0x5A]
    # 3 bits straddle bytes: values 7,0,7 → bits 111 000 111 → 0b11000111, 0b1
    assert pack_bits(np.array([7, 0, 7]), 3).tolist() == [0b11000111, 0b1]


def test_out_of_range_values_are_refused():
    try:
        pack_bits(np.array([4]), 2)
    except ValueError as exc:
        assert "out of range" in str(exc)
    else:
        raise AssertionError("expected ValueError")
