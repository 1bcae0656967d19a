"""On-disk format v1: the one canonical definition of every structure.

``docs/FORMAT.md`` is the byte-level specification; each class here matches one
heading there.  Every metadata block is a Python object with ``image()`` (the sealed
4096 bytes, crc32c included) and a ``decode`` classmethod that verifies the header
first.  fsck, mkfs and the mounted file system all use these classes: there is no
second parser.

Geometry (all in 4096-byte blocks)::

    0                       superblock
    1 .. 1+nslots-1         heartbeat block of each node slot
    journal_start ..        journal of slot i at journal_start + i * journal_blocks
    rgrp_start ..           resource groups, rgrp_blocks each (the last may be shorter)
    total_blocks - 1        backup superblock
"""

from __future__ import annotations

import bisect
import itertools
import operator
import os
import struct
import time
import uuid as uuidlib
from dataclasses import dataclass, field

from ..errors import CorruptBlock, FormatMismatch
from . import blockhdr
from .blockhdr import BLOCK_SIZE, HEADER_SIZE, BlockType

FORMAT_REVISION = 1

# -- bitmap states (2 bits per block) ---------------------------------------------
FREE = 0        # not in use
USED = 1        # file data, tree node, xattr block, or rgrp header/bitmap block
UNLINKED = 2    # a dinode with nlink 0 still open somewhere: freed at last close/recovery
DINODE = 3      # an in-use dinode

STATE_NAMES = {FREE: "free", USED: "used", UNLINKED: "unlinked", DINODE: "dinode"}
BLOCKS_PER_BITMAP = (BLOCK_SIZE - HEADER_SIZE) * 4   # 16256


def now_ns() -> int:
    return time.time_ns()


def _blank() -> bytearray:
    return bytearray(BLOCK_SIZE)


# =============================================================================
# Superblock
# =============================================================================

_SB = struct.Struct("<II Q 16s 64s q II QQQ III I Q Q Q 32s 128s Q")
# format_rev, block_size, total_blocks, uuid, label, created_ns,
# nslots, journal_blocks, slot_start, journal_start, rgrp_start,
# rgrp_blocks, rgrp_count, bitmap_blocks, flags, root_ino, features, backup_bno,
# cluster_name, lockd_addr, mkfs_seq

SB_FLAG_CLUSTER_INFO = 1   # cluster_name / lockd_addr are set


@dataclass
class Superblock:
    """Block 0 (and a backup copy at ``total_blocks - 1``).

    Invariants: ``journal_start = slot_start + nslots``; ``rgrp_start = journal_start +
    nslots * journal_blocks``; resource group i starts at ``rgrp_start + i *
    rgrp_blocks`` and the last one ends before the backup superblock.
    """

    total_blocks: int
    nslots: int
    journal_blocks: int
    rgrp_blocks: int
    rgrp_count: int
    bitmap_blocks: int
    root_ino: int = 0
    uuid: bytes = field(default_factory=lambda: uuidlib.uuid4().bytes)
    label: str = ""
    created_ns: int = field(default_factory=now_ns)
    format_rev: int = FORMAT_REVISION
    block_size: int = BLOCK_SIZE
    slot_start: int = 1
    journal_start: int = 0
    rgrp_start: int = 0
    flags: int = 0
    features: int = 0
    cluster_name: str = ""
    lockd_addr: str = ""
    seq: int = 1

    @property
    def backup_bno(self) -> int:
        return self.total_blocks - 1

    def image(self, bno: int = 0) -> bytes:
        buf = _blank()
        _SB.pack_into(
            buf, HEADER_SIZE, self.format_rev, self.block_size, self.total_blocks,
            self.uuid, self.label.encode()[:64], self.created_ns, self.nslots,
            self.journal_blocks, self.slot_start, self.journal_start, self.rgrp_start,
            self.rgrp_blocks, self.rgrp_count, self.bitmap_blocks, self.flags,
            self.root_ino, self.features, self.backup_bno,
            self.cluster_name.encode()[:32], self.lockd_addr.encode()[:128], 0)
        return bytes(blockhdr.seal(buf, BlockType.SUPERBLOCK, bno, self.seq))

    @classmethod
    def decode(cls, buf, bno: int = 0) -> "Superblock":
        """Parse and check a superblock (raises CorruptBlock or FormatMismatch)."""
        magic = struct.unpack_from("<I", buf, 0)[0] if len(buf) >= 4 else 0
        if magic != blockhdr.MAGIC:
            raise FormatMismatch(f"no clusterfs superblock at block {bno}")
        seq = blockhdr.verify(buf, BlockType.SUPERBLOCK, bno)
        (rev, bsize, total, uid, label, created, nslots, jblocks, slot_start,
         jstart, rstart, rblocks, rcount, bmblocks, flags, root, features, backup,
         cname, laddr, _pad) = _SB.unpack_from(buf, HEADER_SIZE)
        if rev != FORMAT_REVISION:
            raise FormatMismatch(
                f"volume has format revision {rev}; this clusterfs reads revision "
                f"{FORMAT_REVISION} only")
        if bsize != BLOCK_SIZE:
            raise CorruptBlock(bno, f"block size {bsize}, expected {BLOCK_SIZE}")
        sb = cls(total_blocks=total, nslots=nslots, journal_blocks=jblocks,
                 rgrp_blocks=rblocks, rgrp_count=rcount, bitmap_blocks=bmblocks,
                 root_ino=root, uuid=uid, label=label.rstrip(b"\0").decode(errors="replace"),
                 created_ns=created, format_rev=rev, block_size=bsize,
                 slot_start=slot_start, journal_start=jstart, rgrp_start=rstart,
                 flags=flags, features=features,
                 cluster_name=cname.rstrip(b"\0").decode(errors="replace"),
                 lockd_addr=laddr.rstrip(b"\0").decode(errors="replace"), seq=seq)
        sb.check_geometry(bno)
        if backup != sb.backup_bno:
            raise CorruptBlock(bno, f"backup location {backup} != {sb.backup_bno}")
        return sb

    def check_geometry(self, bno: int = 0) -> None:
        """Raise CorruptBlock when the recorded geometry is not self-consistent."""
        problems = []
        if not (1 <= self.nslots <= 256):
            problems.append(f"slot count {self.nslots}")
        if self.slot_start != 1:
            problems.append(f"slot table at {self.slot_start}")
        if self.journal_start != self.slot_start + self.nslots:
            problems.append(f"journal start {self.journal_start}")
        if self.journal_blocks < 64:
            problems.append(f"journal size {self.journal_blocks}")
        if self.rgrp_start != self.journal_start + self.nslots * self.journal_blocks:
            problems.append(f"rgrp start {self.rgrp_start}")
        if self.rgrp_blocks < 64 or self.bitmap_blocks != bitmap_blocks_for(self.rgrp_blocks):
            problems.append(f"rgrp size {self.rgrp_blocks}/{self.bitmap_blocks}")
        elif self.rgrp_count != rgrp_count_for(self.total_blocks, self.rgrp_start,
                                               self.rgrp_blocks):
            problems.append(f"rgrp count {self.rgrp_count}")
        if problems:
            raise CorruptBlock(bno, "bad geometry: " + ", ".join(problems))

    # geometry helpers
    def heartbeat_bno(self, slot: int) -> int:
        return self.slot_start + slot

    def journal_range(self, slot: int) -> tuple[int, int]:
        return self.journal_start + slot * self.journal_blocks, self.journal_blocks

    def rgrp_range(self, index: int) -> tuple[int, int]:
        """(first block, length) of resource group ``index``."""
        start = self.rgrp_start + index * self.rgrp_blocks
        end = min(start + self.rgrp_blocks, self.total_blocks - 1)
        return start, end - start

    def rgrp_of(self, bno: int) -> int:
        """Index of the resource group holding block ``bno`` (-1 if none)."""
        if bno < self.rgrp_start or bno >= self.total_blocks - 1:
            return -1
        return min((bno - self.rgrp_start) // self.rgrp_blocks, self.rgrp_count - 1)


def bitmap_blocks_for(rgrp_blocks: int) -> int:
    return -(-rgrp_blocks // BLOCKS_PER_BITMAP)


def rgrp_count_for(total_blocks: int, rgrp_start: int, rgrp_blocks: int) -> int:
    """Number of resource groups: whole groups, plus a shorter last one when the
    remainder holds its header, bitmaps and at least 16 blocks."""
    usable = total_blocks - 1 - rgrp_start
    count = usable // rgrp_blocks
    if usable - count * rgrp_blocks >= bitmap_blocks_for(rgrp_blocks) + 1 + 16:
        count += 1
    return max(count, 1)


def plan_geometry(total_blocks: int, nslots: int, journal_blocks: int | None = None,
                  rgrp_blocks: int | None = None) -> Superblock:
    """Choose the layout of a new volume.

    Journal: 1/64 of the volume per slot, clamped to [256 blocks, 32768 blocks]
    (1 MiB .. 128 MiB).  Resource groups: 32768 blocks (128 MiB), smaller on small
    volumes so there are at least ``max(8, 2 * nslots)`` of them, never below 256.
    """
    if journal_blocks is None:
        journal_blocks = max(256, min(32768, total_blocks // 64 // max(1, nslots)))
    slot_start = 1
    journal_start = slot_start + nslots
    rgrp_start = journal_start + nslots * journal_blocks
    usable = total_blocks - 1 - rgrp_start
    if rgrp_blocks is None:
        rgrp_blocks = 32768
        want = max(8, 2 * nslots)
        while rgrp_blocks > 256 and usable // rgrp_blocks < want:
            rgrp_blocks //= 2
    bm = bitmap_blocks_for(rgrp_blocks)
    if usable < bm + 2 + 64:
        raise ValueError("volume too small for its journals and one resource group")
    count = rgrp_count_for(total_blocks, rgrp_start, rgrp_blocks)
    sb = Superblock(total_blocks=total_blocks, nslots=nslots, journal_blocks=journal_blocks,
                    rgrp_blocks=rgrp_blocks, rgrp_count=count, bitmap_blocks=bm,
                    slot_start=slot_start, journal_start=journal_start, rgrp_start=rgrp_start)
    return sb


# =============================================================================
# Heartbeat (one block per node slot)
# =============================================================================

_HB = struct.Struct("<II Q q Q 64s I I Q 64s")
# slot, state, counter, timestamp_ns, mount_id, node, interval_ms, flags, pid, host

HB_FREE = 0             # slot unused (never mounted, or cleanly unmounted)
HB_NOLOCK = 1           # mounted in single-node mode
HB_CLUSTER = 2          # mounted as a cluster member
HB_FENCED = 3           # the node fenced itself: writes stopped
HB_STATE_NAMES = {HB_FREE: "free", HB_NOLOCK: "single-node", HB_CLUSTER: "cluster",
                  HB_FENCED: "fenced"}


@dataclass
class Heartbeat:
    """A node slot's disk heartbeat, rewritten every interval while mounted."""

    slot: int
    state: int = HB_FREE
    counter: int = 0
    timestamp_ns: int = 0
    mount_id: int = 0
    node: str = ""
    interval_ms: int = 1000
    flags: int = 0
    pid: int = 0
    host: str = ""

    def image(self, bno: int) -> bytes:
        buf = _blank()
        _HB.pack_into(buf, HEADER_SIZE, self.slot, self.state, self.counter,
                      self.timestamp_ns, self.mount_id, self.node.encode()[:64],
                      self.interval_ms, self.flags, self.pid, self.host.encode()[:64])
        return bytes(blockhdr.seal(buf, BlockType.HEARTBEAT, bno, self.counter))

    @classmethod
    def decode(cls, buf, bno: int) -> "Heartbeat":
        blockhdr.verify(buf, BlockType.HEARTBEAT, bno)
        (slot, state, counter, ts, mid, node, interval, flags, pid,
         host) = _HB.unpack_from(buf, HEADER_SIZE)
        return cls(slot=slot, state=state, counter=counter, timestamp_ns=ts,
                   mount_id=mid, node=node.rstrip(b"\0").decode(errors="replace"),
                   interval_ms=interval, flags=flags, pid=pid,
                   host=host.rstrip(b"\0").decode(errors="replace"))


# =============================================================================
# Resource groups: header + bitmap blocks
# =============================================================================

_RG = struct.Struct("<II Q II III I Q")
# index, flags, start, length, bitmap_blocks, free, dinodes, unlinked, pad, igeneration


class MetaObject:
    """Base of the cached metadata objects: one per block, ``image()`` seals it."""

    __slots__ = ("bno", "seq")

    def clone(self):
        raise NotImplementedError

    def restore(self, snap) -> None:
        _copier(type(self))(snap, self)

    @classmethod
    def _state_slots(cls):
        out = []
        for k in cls.__mro__:
            out.extend(getattr(k, "__slots__", ()))
        return out


_COPIERS: dict = {}


def _copier(cls):
    """A function ``copy(src, dst)`` assigning every slot of ``cls``, made once per
    class (objects are cloned at every metadata change, for rollback: a generic
    getattr/setattr loop was a measurable share of each request)."""
    fn = _COPIERS.get(cls)
    if fn is None:
        body = "".join(f"    dst.{k} = src.{k}\n" for k in cls._state_slots())
        ns: dict = {}
        exec(f"def copy(src, dst):\n{body or '    pass'}\n", ns)
        fn = _COPIERS[cls] = ns["copy"]
    return fn


class RgrpHeader(MetaObject):
    """First block of a resource group: counters for its blocks.

    ``free`` counts FREE blocks, ``dinodes`` DINODE blocks, ``unlinked`` UNLINKED
    blocks; ``igeneration`` is the generation given to the next dinode created here
    (so a reused inode number never repeats an old generation).
    """

    __slots__ = ("index", "flags", "start", "length", "bitmap_blocks", "free",
                 "dinodes", "unlinked", "igeneration")

    def __init__(self, bno, index, start, length, bitmap_blocks, free, dinodes=0,
                 unlinked=0, igeneration=1, flags=0, seq=1):
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

    def clone(self):
        c = RgrpHeader.__new__(RgrpHeader)
        _copier(RgrpHeader)(self, c)
        return c

    def image(self) -> bytes:
        buf = _blank()
        _RG.pack_into(buf, HEADER_SIZE, self.index, self.flags, self.start, self.length,
                      self.bitmap_blocks, self.free, self.dinodes, self.unlinked, 0,
                      self.igeneration)
        self.seq += 1
        return bytes(blockhdr.seal(buf, BlockType.RGRP, self.bno, self.seq))

    @classmethod
    def decode(cls, buf, bno: int) -> "RgrpHeader":
        seq = blockhdr.verify(buf, BlockType.RGRP, bno)
        (index, flags, start, length, bmb, free, dinodes, unlinked, _pad,
         igen) = _RG.unpack_from(buf, HEADER_SIZE)
        if start != bno:
            raise CorruptBlock(bno, f"resource group says it starts at {start}")
        return cls(bno, index, start, length, bmb, free, dinodes, unlinked, igen, flags, seq)


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

    def count(self, state: int, n: int) -> int:
        """How many of the first ``n`` entries are in ``state``."""
        full = n >> 2
        table = _COUNT_TABLE[state]
        total = sum(table[b] for b in self.bits[:full])
        for i in range(full * 4, n):
            if self.get(i) == state:
                total += 1
        return total


def _count_table():
    tables = []
    for state in range(4):
        t = []
        for b in range(256):
            t.append(sum(1 for k in range(4) if (b >> (2 * k)) & 3 == state))
        tables.append(t)
    return tables


_COUNT_TABLE = _count_table()


# =============================================================================
# Dinode
# =============================================================================

_DI = struct.Struct("<Q IIII QQ qqqq Q I H H Q Q Q")
# generation, mode, uid, gid, nlink, size, blocks, atime, mtime, ctime, btime,
# rdev, flags, xattr_len, reserved, xattr_block, parent, entries
assert _DI.size <= 256 - HEADER_SIZE
_HDR_DI = struct.Struct(blockhdr.HEADER.format + _DI.format[1:])   # header, then _DI
_MAGIC = blockhdr.MAGIC
_T_DINODE = int(BlockType.DINODE)

XATTR_INLINE_OFF = 256
XATTR_INLINE_SIZE = 384
DATA_OFF = XATTR_INLINE_OFF + XATTR_INLINE_SIZE   # 640
DATA_SIZE = BLOCK_SIZE - DATA_OFF                  # 3456
INLINE_MAX = DATA_SIZE

DF_INLINE = 1      # the data area holds the file's bytes (size <= INLINE_MAX)
DF_EXTENTS = 2     # the data area holds the root node of the extent tree
DF_DIRTREE = 4     # the data area holds the root node of the directory tree


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


# =============================================================================
# Tree nodes (extent tree and directory tree share one B+tree node format)
# =============================================================================

EXTENT = 1
DIRENT = 2
_NODE = struct.Struct("<HHIQ")          # level, nrecs, kind, owner
NODE_HDR = _NODE.size                   # 16
_EXT = struct.Struct("<QQII")           # lblk, pblk, len, flags  (24 bytes)
_IDX = struct.Struct("<QQ")             # key, child              (16 bytes)
_DIRREC = struct.Struct("<QQBB")        # key, ino, dtype, namelen (18 bytes + name)
_IDX_SIZE, _EXT_SIZE = _IDX.size, _EXT.size
NODE_CAPACITY = BLOCK_SIZE - HEADER_SIZE - NODE_HDR   # 4048 payload bytes in a block
ROOT_CAPACITY = DATA_SIZE - NODE_HDR                  # 3440 in the dinode


class TreeNode(MetaObject):
    """A B+tree node: a root inside a dinode's data area, or a block of its own.

    ``keys[i]`` orders the records.  Level 0 (leaf) values: for EXTENT trees a tuple
    (pblk, length, flags); for DIRENT trees a tuple (ino, dtype, name).  Level > 0
    values are child block numbers; ``keys[i]`` is the smallest key under child i
    (``keys[0]`` is 0 in a leftmost index node's first slot and never compared).
    ``owner`` is the inode the tree belongs to (fsck uses it).
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
        return _DIRREC.size + len(val[2])

    def _size(self) -> int:
        if self.level > 0:
            return _IDX.size * len(self.keys)
        if self.kind == EXTENT:
            return _EXT.size * len(self.keys)
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
        btype = BlockType.EXTENT_NODE if self.kind == EXTENT else BlockType.DIR_NODE
        return bytes(blockhdr.seal(buf, btype, self.bno, self.seq))

    @classmethod
    def decode(cls, buf, bno: int, kind: int) -> "TreeNode":
        btype = BlockType.EXTENT_NODE if kind == EXTENT else BlockType.DIR_NODE
        seq = blockhdr.verify(buf, btype, bno)
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


# =============================================================================
# Extended attributes
# =============================================================================

_XA = struct.Struct("<BH")     # namelen, valuelen


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


_XB = struct.Struct("<QH")     # owner, used
XATTR_BLOCK_OFF = HEADER_SIZE + 16
XATTR_BLOCK_SIZE = BLOCK_SIZE - XATTR_BLOCK_OFF   # 4048


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


# =============================================================================
# Directory hashing
# =============================================================================

NAME_MAX = 255
HASH_SHIFT = 16                 # key = crc32c(name) << 16 | collision index
MAX_COLLISIONS = 1 << HASH_SHIFT
READDIR_BASE = 3                # readdir offsets: 1 = ".", 2 = "..", key + 3 = entry

DT_UNKNOWN, DT_FIFO, DT_CHR, DT_DIR, DT_BLK, DT_REG, DT_LNK, DT_SOCK = 0, 1, 2, 4, 6, 8, 10, 12


# A directory entry's hash: crc32c of its name (the function itself, not a wrapper:
# fsck hashes every name of the volume).
name_hash = blockhdr.crc32c


def dtype_of(mode: int) -> int:
    return (mode >> 12) & 0xF


def random_mount_id() -> int:
    return int.from_bytes(os.urandom(8), "little")
