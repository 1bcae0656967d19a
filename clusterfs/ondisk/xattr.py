"""Extended attributes: the entries (inline in the dinode, and in the overflow block)
and the overflow block (``XATTR``).

The fields are the tables ``XATTR_ENTRY`` and ``XATTR_BLOCK_LAYOUT`` of ``layout``;
``docs/FORMAT.md`` ("XATTR", "Extended attributes") describes them.
"""

from __future__ import annotations

from ..errors import CorruptBlock
from . import blockhdr
from .blockhdr import HEADER_SIZE, BlockType
from .layout import XATTR_BLOCK_LAYOUT, XATTR_BLOCK_OFF, XATTR_BLOCK_SIZE, XATTR_ENTRY
from .meta import MetaObject, _blank

_XA = XATTR_ENTRY.struct        # namelen, valuelen
_XB = XATTR_BLOCK_LAYOUT.struct  # owner, used


def encode_xattrs(items) -> bytes:
    out = bytearray()
    for name, value in items:
        out += _XA.pack(len(name), len(value))
        out += name
        out += value
    return bytes(out)


def decode_xattrs(data: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    p = 0
    while p < len(data):
        if p + _XA.size > len(data):
            raise ValueError("truncated entry")
        nlen, vlen = _XA.unpack_from(data, p)
        p += _XA.size
        if nlen == 0 or p + nlen + vlen > len(data):
            raise ValueError("entry overflows")
        out.append((bytes(data[p:p + nlen]), bytes(data[p + nlen:p + nlen + vlen])))
        p += nlen + vlen
    return out


def xattr_size(name: bytes, value: bytes) -> int:
    return _XA.size + len(name) + len(value)


class XattrBlock(MetaObject):
    """The overflow block of a dinode's extended attributes."""

    __slots__ = ("owner", "items")

    def __init__(self, bno: int, owner: int, items=None, seq: int = 1):
        self.bno = bno
        self.seq = seq
        self.owner = owner
        self.items = items if items is not None else []

    def clone(self):
        return XattrBlock(self.bno, self.owner, list(self.items), self.seq)

    def image(self) -> bytes:
        buf = _blank()
        data = encode_xattrs(self.items)
        if len(data) > XATTR_BLOCK_SIZE:
            raise ValueError("xattr block overflows")
        _XB.pack_into(buf, HEADER_SIZE, self.owner, len(data))
        buf[XATTR_BLOCK_OFF:XATTR_BLOCK_OFF + len(data)] = data
        self.seq += 1
        return bytes(blockhdr.seal(buf, BlockType.XATTR, self.bno, self.seq))

    @classmethod
    def decode(cls, buf, bno: int) -> "XattrBlock":
        seq = blockhdr.verify(buf, BlockType.XATTR, bno)
        owner, used = _XB.unpack_from(buf, HEADER_SIZE)
        if used > XATTR_BLOCK_SIZE:
            raise CorruptBlock(bno, f"xattr block length {used}")
        try:
            items = decode_xattrs(bytes(buf[XATTR_BLOCK_OFF:XATTR_BLOCK_OFF + used]))
        except ValueError as e:
            raise CorruptBlock(bno, f"xattrs: {e}") from None
        return cls(bno, owner, items, seq)
