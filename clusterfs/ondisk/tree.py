"""Tree nodes: extent trees, directory trees and refcount trees share one B+tree
node format.

A root lives in its dinode's data area, or (refcount trees) in its resource group's
header (``ROOT_CAPACITY`` bytes of records); every other node in a block of its own
(``NODE_CAPACITY``).  The node header and the four kinds of records are the tables
``NODE_LAYOUT``, ``INDEX_REC``, ``EXTENT_REC``, ``DIRENT_REC`` and ``REFCOUNT_REC``
of ``layout``; ``docs/FORMAT.md`` ("Trees") describes them.
"""

from __future__ import annotations

import bisect
import itertools
import operator
import struct

from ..errors import CorruptBlock
from . import blockhdr
from .blockhdr import BLOCK_SIZE, HEADER_SIZE, BlockType
from .layout import (DIRENT, DIRENT_REC, EXTENT, EXTENT_REC, INDEX_REC, NODE_CAPACITY, NODE_HDR,
                     NODE_LAYOUT, REFCOUNT, REFCOUNT_REC, ROOT_CAPACITY)
from .meta import MetaObject, _blank

_NODE = NODE_LAYOUT.struct              # level, nrecs, kind, owner
_EXT = EXTENT_REC.struct                # lblk, pblk, len, flags  (24 bytes)
_IDX = INDEX_REC.struct                 # key, child              (16 bytes)
_DIRREC = DIRENT_REC.struct             # key, ino, dtype, namelen (18 bytes + name)
_REF = REFCOUNT_REC.struct              # pblk, len, count        (16 bytes)
_IDX_SIZE, _EXT_SIZE, _REF_SIZE = _IDX.size, _EXT.size, _REF.size
# block type of each kind's non-root nodes
NODE_TYPES = {EXTENT: BlockType.EXTENT_NODE, DIRENT: BlockType.DIR_NODE,
              REFCOUNT: BlockType.REFCOUNT_NODE}


class TreeNode(MetaObject):
    """A B+tree node: a root inside a dinode's data area, or a block of its own.

    ``keys[i]`` orders the records.  Level 0 (leaf) values: for EXTENT trees a tuple
    (pblk, length, flags); for DIRENT trees a tuple (ino, dtype, name); for REFCOUNT
    trees a tuple (length, count) (the key is the first physical block).  Level > 0
    values are child block numbers; ``keys[i]`` is the smallest key under child i
    (``keys[0]`` is 0 in a leftmost index node's first slot and never compared).
    ``owner`` is the inode the tree belongs to (a refcount tree: its group).
    """

    __slots__ = ("kind", "level", "owner", "keys", "vals", "is_root", "nbytes")

    def __init__(self, bno: int, kind: int, level: int, owner: int, keys=None, vals=None,
                 is_root=False, seq: int = 1):
        self.bno = bno
        self.seq = seq
        self.kind = kind
        self.level = level
        self.owner = owner
        self.keys = keys = keys if keys is not None else []
        self.vals = vals if vals is not None else []
        self.is_root = is_root
        # _size(), inline for the common nodes (fsck builds one per dinode)
        self.nbytes = _IDX_SIZE * len(keys) if level else \
            _EXT_SIZE * len(keys) if kind == EXTENT else self._size()
        # (REFCOUNT records are _REF_SIZE each: _size())

    def clone(self):
        c = TreeNode.__new__(TreeNode)
        c.bno, c.seq, c.kind, c.level, c.owner = self.bno, self.seq, self.kind, self.level, self.owner
        c.keys = list(self.keys)
        c.vals = list(self.vals)
        c.is_root, c.nbytes = self.is_root, self.nbytes
        return c

    def restore(self, snap) -> None:
        self.seq, self.kind, self.level, self.owner = snap.seq, snap.kind, snap.level, snap.owner
        self.keys, self.vals = snap.keys, snap.vals
        self.is_root, self.nbytes = snap.is_root, snap.nbytes

    # record sizes
    def rec_size(self, val) -> int:
        if self.level > 0:
            return _IDX.size
        if self.kind == EXTENT:
            return _EXT.size
        if self.kind == REFCOUNT:
            return _REF_SIZE
        return _DIRREC.size + len(val[2])

    def _size(self) -> int:
        if self.level > 0:
            return _IDX.size * len(self.keys)
        if self.kind == EXTENT:
            return _EXT.size * len(self.keys)
        if self.kind == REFCOUNT:
            return _REF_SIZE * len(self.keys)
        return sum(_DIRREC.size + len(v[2]) for v in self.vals)

    @property
    def capacity(self) -> int:
        return ROOT_CAPACITY if self.is_root else NODE_CAPACITY

    def fits(self, extra: int) -> bool:
        return self.nbytes + extra <= self.capacity

    def find(self, key: int) -> int:
        """Index of the last record with key <= ``key`` (-1 if none)."""
        return bisect.bisect_right(self.keys, key) - 1

    def insert_at(self, i: int, key: int, val) -> None:
        self.keys.insert(i, key)
        self.vals.insert(i, val)
        self.nbytes += self.rec_size(val)

    def delete_at(self, i: int) -> None:
        self.nbytes -= self.rec_size(self.vals[i])
        del self.keys[i]
        del self.vals[i]

    def replace_at(self, i: int, key: int, val) -> None:
        self.nbytes += self.rec_size(val) - self.rec_size(self.vals[i])
        self.keys[i] = key
        self.vals[i] = val

    def recount(self) -> None:
        self.nbytes = self._size()

    # encoding
    def encode_into(self, buf, off: int, size: int) -> None:
        _NODE.pack_into(buf, off, self.level, len(self.keys), self.kind, self.owner)
        p = off + NODE_HDR
        end = off + size
        if self.level > 0:
            for k, v in zip(self.keys, self.vals):
                _IDX.pack_into(buf, p, k, v)
                p += _IDX.size
        elif self.kind == EXTENT:
            for k, (pblk, length, flags) in zip(self.keys, self.vals):
                _EXT.pack_into(buf, p, k, pblk, length, flags)
                p += _EXT.size
        elif self.kind == REFCOUNT:
            for k, (length, count) in zip(self.keys, self.vals):
                _REF.pack_into(buf, p, k, length, count)
                p += _REF_SIZE
        else:
            for k, (ino, dtype, name) in zip(self.keys, self.vals):
                _DIRREC.pack_into(buf, p, k, ino, dtype, len(name))
                p += _DIRREC.size
                buf[p:p + len(name)] = name
                p += len(name)
        if p > end:
            raise ValueError(f"tree node {self.bno} overflows ({p - off} > {size})")

    def image(self) -> bytes:
        buf = _blank()
        self.encode_into(buf, HEADER_SIZE, BLOCK_SIZE - HEADER_SIZE)
        self.seq += 1
        return bytes(blockhdr.seal(buf, NODE_TYPES[self.kind], self.bno, self.seq))

    @classmethod
    def decode(cls, buf, bno: int, kind: int) -> "TreeNode":
        seq = blockhdr.verify(buf, NODE_TYPES[kind], bno)
        node = cls.decode_from(buf, HEADER_SIZE, BLOCK_SIZE - HEADER_SIZE, kind, bno, root=False)
        node.seq = seq
        return node

    @classmethod
    def decode_from(cls, buf, off: int, size: int, kind: int, bno: int, root: bool) -> "TreeNode":
        _kind, level, owner, keys, vals = cls.decode_values(buf, off, size, kind, bno)
        return cls(bno, kind, level, owner, keys, vals, is_root=root)

    @staticmethod
    def decode_values(buf, off: int, size: int, kind: int, bno: int) -> tuple:
        """(kind, level, owner, keys, vals) of the node at ``buf[off:off + size]``."""
        level, nrecs, nkind, owner = _NODE.unpack_from(buf, off)
        if nkind != kind:
            raise CorruptBlock(bno, f"tree node kind {nkind}, expected {kind}")
        if level > 16:
            raise CorruptBlock(bno, f"tree node level {level}")
        p = off + NODE_HDR
        end = off + size
        keys, vals = [], []
        try:
            if level > 0:
                if p + nrecs * _IDX.size > end:
                    raise ValueError("index records overflow")
                for _ in range(nrecs):
                    k, child = _IDX.unpack_from(buf, p)
                    keys.append(k)
                    vals.append(child)
                    p += _IDX.size
            elif kind == EXTENT:
                if p + nrecs * _EXT.size > end:
                    raise ValueError("extent records overflow")
                if nrecs == 1:          # most files (fsck decodes every dinode)
                    k, pblk, length, flags = _EXT.unpack_from(buf, p)
                    return kind, level, owner, [k], [(pblk, length, flags)]
                for k, pblk, length, flags in _EXT.iter_unpack(buf[p:p + nrecs * _EXT.size]):
                    keys.append(k)
                    vals.append((pblk, length, flags))
            elif kind == REFCOUNT:
                if p + nrecs * _REF_SIZE > end:
                    raise ValueError("refcount records overflow")
                for k, length, count in _REF.iter_unpack(buf[p:p + nrecs * _REF_SIZE]):
                    keys.append(k)
                    vals.append((length, count))
            else:
                # one record after another (names vary in length); the loop is kept
                # tight: a volume's every entry passes here when fsck runs
                unpack, kadd, vadd, rsize = _DIRREC.unpack_from, keys.append, vals.append, \
                    _DIRREC.size
                if type(buf) is not bytes:
                    buf = bytes(buf)    # one copy: then each name is one slice
                last = end - rsize
                for _ in range(nrecs):
                    if p > last:
                        raise ValueError("directory records overflow")
                    k, ino, dtype, nlen = unpack(buf, p)
                    p += rsize
                    q = p + nlen
                    if nlen == 0 or q > end:
                        raise ValueError("directory record name overflows")
                    kadd(k)
                    vadd((ino, dtype, buf[p:q]))
                    p = q
        except (ValueError, struct.error) as e:
            raise CorruptBlock(bno, f"tree node: {e}") from None
        if not all(map(operator.lt, keys, itertools.islice(keys, 1, None))):
            raise CorruptBlock(bno, "tree node keys out of order")
        return kind, level, owner, keys, vals
