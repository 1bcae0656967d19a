"""Resource groups: the header block (the group's counters and the root of its
refcount tree) and its bitmap blocks.

The fields are the table ``RGRP_LAYOUT`` of ``layout``, the refcount tree's root is
a tree node at ``REFROOT_OFF``, and the bitmap states (2 bits a block) are ``FREE``,
``USED``, ``UNLINKED`` and ``DINODE`` there; ``docs/FORMAT.md`` ("RGRP", "BITMAP",
"Trees") describes them.
"""

from __future__ import annotations

from ..errors import CorruptBlock
from . import blockhdr
from .blockhdr import HEADER_SIZE, BlockType
from .layout import (BITMAP_BYTES, BLOCKS_PER_BITMAP, NODE_HDR, REFCOUNT, REFROOT_OFF,
                     REFROOT_SIZE, RGRP_LAYOUT, USED)
from .meta import MetaObject, _blank, _copier
from .tree import TreeNode

_RG = RGRP_LAYOUT.struct


class RgrpHeader(MetaObject):
    """First block of a resource group: counters for its blocks.

    ``free`` counts FREE blocks, ``dinodes`` DINODE blocks, ``unlinked`` UNLINKED
    blocks; ``igeneration`` is the generation given to the next dinode created here
    (so a reused inode number never repeats an old generation).  ``refroot`` is the
    root node of the group's refcount tree (kind ``REFCOUNT``, owner the group's
    index): the reference counts of the group's shared blocks.
    """

    __slots__ = ("index", "flags", "start", "length", "bitmap_blocks", "free",
                 "dinodes", "unlinked", "igeneration", "refroot")

    def __init__(self, bno, index, start, length, bitmap_blocks, free, dinodes=0,
                 unlinked=0, igeneration=1, flags=0, seq=1, refroot=None):
        self.bno = bno
        self.seq = seq
        self.index = index
        self.flags = flags
        self.start = start
        self.length = length
        self.bitmap_blocks = bitmap_blocks
        self.free = free
        self.dinodes = dinodes
        self.unlinked = unlinked
        self.igeneration = igeneration
        self.refroot = refroot if refroot is not None else \
            TreeNode(bno, REFCOUNT, 0, index, is_root=True)

    def clone(self):
        c = RgrpHeader.__new__(RgrpHeader)
        _copier(RgrpHeader)(self, c)
        c.refroot = self.refroot.clone()
        return c

    def image(self) -> bytes:
        buf = _blank()
        _RG.pack_into(buf, HEADER_SIZE, self.index, self.flags, self.start, self.length,
                      self.bitmap_blocks, self.free, self.dinodes, self.unlinked, 0,
                      self.igeneration)
        self.refroot.owner = self.index
        self.refroot.encode_into(buf, REFROOT_OFF, REFROOT_SIZE)
        self.seq += 1
        return bytes(blockhdr.seal(buf, BlockType.RGRP, self.bno, self.seq))

    @classmethod
    def decode(cls, buf, bno: int) -> "RgrpHeader":
        seq = blockhdr.verify(buf, BlockType.RGRP, bno)
        (index, flags, start, length, bmb, free, dinodes, unlinked, _pad,
         igen) = _RG.unpack_from(buf, HEADER_SIZE)
        if start != bno:
            raise CorruptBlock(bno, f"resource group says it starts at {start}")
        return cls(bno, index, start, length, bmb, free, dinodes, unlinked, igen, flags,
                   seq, decode_refroot(buf, bno, index))


def decode_refroot(buf, bno: int, index: int) -> TreeNode:
    """The root of a group's refcount tree in its header block ``buf``.  A root
    area of zeros (a group header written by revision 2) is an empty tree.

    Raises:
        CorruptBlock: the root does not decode, or names another group.
    """
    if not any(buf[REFROOT_OFF:REFROOT_OFF + NODE_HDR]):
        return TreeNode(bno, REFCOUNT, 0, index, is_root=True)
    try:
        root = TreeNode.decode_from(buf, REFROOT_OFF, REFROOT_SIZE, REFCOUNT, bno,
                                    root=True)
    except CorruptBlock as e:
        raise CorruptBlock(bno, f"refcount root: {e.reason}") from None
    if root.owner != index:
        raise CorruptBlock(bno, f"refcount root: owner {root.owner}, expected {index}")
    return root


def new_group_image(index: int, start: int, length: int, bitmap_blocks: int) -> bytes:
    """The header and bitmap blocks of an empty resource group (``1 + bitmap_blocks``
    blocks from ``start``): every block free but the group's own header and bitmaps,
    an empty refcount tree (what mkfs and grow write)."""
    own = 1 + bitmap_blocks
    out = bytearray(RgrpHeader(start, index, start, length, bitmap_blocks,
                               free=length - own).image())
    for j in range(bitmap_blocks):
        bm = Bitmap(start + 1 + j, index, j * BLOCKS_PER_BITMAP, bytearray(BITMAP_BYTES))
        n = min(own, (j + 1) * BLOCKS_PER_BITMAP) - j * BLOCKS_PER_BITMAP
        if n > 0:
            bm.set_run(0, n, USED)
        out += bm.image()
    return bytes(out)


class Bitmap(MetaObject):
    """One bitmap block: 2 bits per block of its resource group, 4 blocks a byte,
    least significant bits first.  Block ``rg.start + first + i`` is entry ``i``."""

    __slots__ = ("rgrp", "first", "bits")

    def __init__(self, bno: int, rgrp: int, first: int, bits: bytearray, seq: int = 1):
        self.bno = bno
        self.seq = seq
        self.rgrp = rgrp
        self.first = first
        self.bits = bits

    def clone(self):
        c = Bitmap.__new__(Bitmap)
        c.bno, c.seq, c.rgrp, c.first = self.bno, self.seq, self.rgrp, self.first
        c.bits = bytearray(self.bits)
        return c

    def image(self) -> bytes:
        buf = _blank()
        buf[HEADER_SIZE:HEADER_SIZE + len(self.bits)] = self.bits
        self.seq += 1
        return bytes(blockhdr.seal(buf, BlockType.BITMAP, self.bno, self.seq,
                                   flags=self.rgrp & 0xFFFF))

    @classmethod
    def decode(cls, buf, bno: int, rgrp: int, first: int) -> "Bitmap":
        seq = blockhdr.verify(buf, BlockType.BITMAP, bno)
        return cls(bno, rgrp, first, bytearray(buf[HEADER_SIZE:]), seq)

    def get(self, i: int) -> int:
        return (self.bits[i >> 2] >> ((i & 3) * 2)) & 3

    def set(self, i: int, state: int) -> None:
        sh = (i & 3) * 2
        b = i >> 2
        self.bits[b] = (self.bits[b] & ~(3 << sh)) | (state << sh)

    def set_run(self, i: int, n: int, state: int) -> None:
        """Set entries i .. i+n-1 to ``state`` (whole bytes at a time where possible)."""
        end = i + n
        while i < end and i & 3:
            self.set(i, state)
            i += 1
        full = (end - i) >> 2
        if full:
            self.bits[i >> 2:(i >> 2) + full] = bytes([state * 0x55]) * full
            i += full * 4
        while i < end:
            self.set(i, state)
            i += 1

    def free_from(self, i: int) -> bool:
        """Whether every entry from ``i`` on is FREE (0)."""
        nb = i >> 2
        return not (any(self.bits[nb + (1 if i & 3 else 0):]) or
                    (i & 3 and self.bits[nb] >> ((i & 3) * 2)))

    def count(self, state: int, n: int) -> int:
        """How many of the first ``n`` entries are in ``state``."""
        full = n >> 2
        table = _COUNT_TABLE[state]
        total = sum(table[b] for b in self.bits[:full])
        for i in range(full * 4, n):
            if self.get(i) == state:
                total += 1
        return total


_EXPAND = [bytes(((b >> (2 * k)) & 3) for b in range(256)) for k in range(4)]


def expand_bits(bits, n: int) -> bytearray:
    """The first ``n`` entries of bitmap bytes ``bits``, one byte per entry (its
    state), in entry order: a whole group's bitmap at C speed."""
    out = bytearray(len(bits) * 4)
    for k in range(4):
        out[k::4] = bits.translate(_EXPAND[k])
    del out[n:]
    return out


def _count_table():
    tables = []
    for state in range(4):
        t = []
        for b in range(256):
            t.append(sum(1 for k in range(4) if (b >> (2 * k)) & 3 == state))
        tables.append(t)
    return tables


_COUNT_TABLE = _count_table()
