"""The dinode: one block per inode, whose block number is the inode number.

The block holds the inode's fields (the table ``DINODE_LAYOUT`` of ``layout``), its
inline extended attributes (``XATTR_INLINE_OFF``) and its data area (``DATA_OFF``):
inline bytes, or the root node of its extent or directory tree.  ``docs/FORMAT.md``
("DINODE") describes them.
"""

from __future__ import annotations

import struct

from ..errors import CorruptBlock
from . import blockhdr
from .blockhdr import BLOCK_SIZE, HEADER_SIZE, BlockType
from .layout import (DATA_OFF, DATA_SIZE, DF_DIRTREE, DF_EXTENTS, DF_INLINE, DF_PREALLOC,
                     DINODE_LAYOUT, DIRENT, EXTENT, INLINE_MAX, MAX_FILE_BLOCKS,
                     XATTR_INLINE_OFF, XATTR_INLINE_SIZE)
from .meta import MetaObject, _blank, _copier
from .tree import TreeNode
from .xattr import decode_xattrs, encode_xattrs

_DI = DINODE_LAYOUT.struct
_HDR_DI = struct.Struct(blockhdr.HEADER.format + _DI.format[1:])   # header, then _DI
_MAGIC = blockhdr.MAGIC
_T_DINODE = int(BlockType.DINODE)


class Dinode(MetaObject):
    """One block per inode; the block number is the inode number.

    ``root`` is the data area decoded: ``bytes`` of inline data (DF_INLINE), or a
    ``TreeNode`` (DF_EXTENTS / DF_DIRTREE).  ``xattrs`` is the inline xattr list of
    (name, value) pairs (the overflow block holds the rest).
    """

    __slots__ = ("generation", "mode", "uid", "gid", "nlink", "size", "blocks",
                 "atime", "mtime", "ctime", "btime", "rdev", "flags", "xattr_block",
                 "parent", "entries", "root", "xattrs")

    def __init__(self, bno: int, generation: int = 1, mode: int = 0, uid: int = 0,
                 gid: int = 0, nlink: int = 0, size: int = 0, blocks: int = 0,
                 atime: int = 0, mtime: int = 0, ctime: int = 0, btime: int = 0,
                 rdev: int = 0, flags: int = DF_INLINE, xattr_block: int = 0,
                 parent: int = 0, entries: int = 0, root=b"", xattrs=None, seq: int = 1):
        self.bno = bno
        self.seq = seq
        self.generation = generation
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.nlink = nlink
        self.size = size
        self.blocks = blocks
        self.atime = atime
        self.mtime = mtime
        self.ctime = ctime
        self.btime = btime
        self.rdev = rdev
        self.flags = flags
        self.xattr_block = xattr_block
        self.parent = parent
        self.entries = entries
        self.root = root
        self.xattrs = xattrs if xattrs is not None else []

    @property
    def ino(self) -> int:
        return self.bno

    def map_end(self) -> int:
        """The logical block no extent of the file reaches past: ⌈size / 4096⌉, or
        MAX_FILE_BLOCKS for a file with blocks mapped ahead of EOF (DF_PREALLOC)."""
        if self.flags & DF_PREALLOC:
            return MAX_FILE_BLOCKS
        return -(-self.size // BLOCK_SIZE)

    def clone(self):
        c = Dinode.__new__(Dinode)
        _copier(Dinode)(self, c)
        if isinstance(self.root, TreeNode):
            c.root = self.root.clone()
        c.xattrs = list(self.xattrs)
        return c

    def image(self) -> bytes:
        buf = _blank()
        xa = encode_xattrs(self.xattrs)
        if len(xa) > XATTR_INLINE_SIZE:
            raise ValueError("inline xattrs overflow")
        _DI.pack_into(buf, HEADER_SIZE, self.generation, self.mode, self.uid, self.gid,
                      self.nlink, self.size, self.blocks, self.atime, self.mtime,
                      self.ctime, self.btime, self.rdev, self.flags, len(xa), 0,
                      self.xattr_block, self.parent, self.entries)
        buf[XATTR_INLINE_OFF:XATTR_INLINE_OFF + len(xa)] = xa
        if self.flags & DF_INLINE:
            buf[DATA_OFF:DATA_OFF + len(self.root)] = self.root
        else:
            self.root.encode_into(buf, DATA_OFF, DATA_SIZE)
        self.seq += 1
        return bytes(blockhdr.seal(buf, BlockType.DINODE, self.bno, self.seq))

    @classmethod
    def decode(cls, buf, bno: int) -> "Dinode":
        return cls.from_tuple(cls.decode_values(buf, bno))

    @staticmethod
    def decode_values(buf, bno: int) -> tuple:
        """The dinode in ``buf`` as the plain values ``as_tuple`` gives (the parser:
        ``decode`` builds the object from these).  fsck's reader processes hand the
        values back as they are, so that only the process that keeps a dinode builds
        it."""
        # the header and the fields in one unpack; ``blockhdr.verify`` says what is
        # wrong when the header does not check (fsck decodes every dinode of the
        # volume through here, so the common case is kept to a few calls)
        if len(buf) != BLOCK_SIZE:
            blockhdr.verify(buf, BlockType.DINODE, bno)
        (magic, btype, _hflags, crc, _hres, own, seq, gen, mode, uid, gid, nlink, size,
         blocks, atime, mtime, ctime, btime, rdev, flags, xlen, _res, xblock, parent,
         entries) = _HDR_DI.unpack_from(buf, 0)
        if magic != _MAGIC or btype != _T_DINODE or own != bno or \
                not blockhdr.crc_ok(buf, crc):
            seq = blockhdr.verify(buf, BlockType.DINODE, bno)
        if not xlen:
            xattrs = []
        elif xlen > XATTR_INLINE_SIZE:
            raise CorruptBlock(bno, f"inline xattr length {xlen}")
        else:
            try:
                xattrs = decode_xattrs(bytes(buf[XATTR_INLINE_OFF:XATTR_INLINE_OFF + xlen]))
            except ValueError as e:
                raise CorruptBlock(bno, f"inline xattrs: {e}") from None
        kind = flags & (DF_INLINE | DF_EXTENTS | DF_DIRTREE)
        if kind == DF_INLINE:
            if size > INLINE_MAX:
                raise CorruptBlock(bno, f"inline file of size {size}")
            root = bytes(buf[DATA_OFF:DATA_OFF + size])
        elif kind == DF_EXTENTS:
            root = TreeNode.decode_values(buf, DATA_OFF, DATA_SIZE, EXTENT, bno)
        elif kind == DF_DIRTREE:
            root = TreeNode.decode_values(buf, DATA_OFF, DATA_SIZE, DIRENT, bno)
        else:
            raise CorruptBlock(bno, f"bad dinode flags {flags:#x}")
        return (bno, gen, mode, uid, gid, nlink, size, blocks, atime, mtime, ctime, btime,
                rdev, flags, xblock, parent, entries, root, xattrs, seq)

    def as_tuple(self) -> tuple:
        """The decoded dinode as plain values (ints, bytes, tuples and lists), for
        ``marshal``: what ``decode_values`` gives."""
        root = self.root
        if not isinstance(root, bytes):
            root = (root.kind, root.level, root.owner, root.keys, root.vals)
        return (self.bno, self.generation, self.mode, self.uid, self.gid, self.nlink,
                self.size, self.blocks, self.atime, self.mtime, self.ctime, self.btime,
                self.rdev, self.flags, self.xattr_block, self.parent, self.entries, root,
                self.xattrs, self.seq)

    @classmethod
    def from_tuple(cls, t: tuple) -> "Dinode":
        """The dinode of ``decode_values`` or ``as_tuple`` (without checking it again)."""
        (bno, gen, mode, uid, gid, nlink, size, blocks, atime, mtime, ctime, btime, rdev,
         flags, xblock, parent, entries, root, xattrs, seq) = t
        if type(root) is tuple:        # a tree root; else inline bytes
            kind, level, owner, keys, vals = root
            root = TreeNode(bno, kind, level, owner, keys, vals, True)
        return cls(bno, gen, mode, uid, gid, nlink, size, blocks, atime, mtime, ctime,
                   btime, rdev, flags, xblock, parent, entries, root, xattrs, seq)
