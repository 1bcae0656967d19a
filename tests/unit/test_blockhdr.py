"""The block header's crc32c: the one-call check agrees with the reference sum."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clusterfs.errors import CorruptBlock
from clusterfs.ondisk.blockhdr import BLOCK_SIZE, BlockType, block_crc, crc_ok, seal, verify


def _sealed(body: bytes) -> bytearray:
    buf = bytearray(body.ljust(BLOCK_SIZE, b"\0")[:BLOCK_SIZE])
    return seal(buf, BlockType.DINODE, 1234, 7)


@settings(max_examples=300, deadline=None)
@given(body=st.binary(min_size=0, max_size=BLOCK_SIZE), crc=st.integers(0, 2**32 - 1))
def test_crc_ok_is_block_crc_equality(body, crc):
    """For any block and any value in the field, ``crc_ok`` says what comparing
    with ``block_crc`` says (the field's own bytes do not enter ``block_crc``)."""
    buf = bytearray(body.ljust(BLOCK_SIZE, b"\0"))
    struct.pack_into("<I", buf, 8, crc)
    assert crc_ok(buf, crc) == (block_crc(buf) == crc)
    right = block_crc(buf)
    struct.pack_into("<I", buf, 8, right)
    assert crc_ok(buf, right)
    assert crc_ok(memoryview(bytes(buf)), right)


@settings(max_examples=200, deadline=None)
@given(body=st.binary(min_size=64, max_size=BLOCK_SIZE),
       pos=st.integers(0, BLOCK_SIZE - 1), bit=st.integers(0, 7))
def test_any_flipped_bit_is_caught(body, pos, bit):
    buf = _sealed(body)
    crc = struct.unpack_from("<I", buf, 8)[0]
    assert crc_ok(buf, crc)
    buf[pos] ^= 1 << bit
    if 8 <= pos < 12:               # the field itself: the stored value no longer fits
        crc = struct.unpack_from("<I", buf, 8)[0]
    assert not crc_ok(buf, crc)
    with pytest.raises(CorruptBlock):
        verify(buf, BlockType.DINODE, 1234)


@settings(max_examples=100, deadline=None)
@given(body=st.binary(min_size=12, max_size=BLOCK_SIZE - 1), crc=st.integers(0, 2**32 - 1))
def test_crc_ok_on_other_lengths_is_block_crc_equality(body, crc):
    """The tables hold for 4096-byte blocks only: other lengths are summed as they are."""
    assert crc_ok(body, crc) == (block_crc(body) == crc)
    assert crc_ok(body, block_crc(body))
