"""The superblock and the volume's geometry; the node slots' heartbeat blocks.

Geometry (all in 4096-byte blocks)::

    0                       superblock
    1                       the lease area: the lock manager's master lease
    2 .. 2+nslots-1         heartbeat block of each node slot
    journal_start ..        journal of slot i at journal_start + i * journal_blocks
    rgrp_start ..           resource groups, rgrp_blocks each (the last may be shorter)
    total_blocks - 1        backup superblock

The fields of both blocks are the tables ``SB_LAYOUT`` and ``HB_LAYOUT`` of
``layout``; ``docs/FORMAT.md`` ("SUPERBLOCK", "HEARTBEAT") describes them.
"""

from __future__ import annotations

import os
import struct
import time
import uuid as uuidlib
from dataclasses import dataclass, field

from ..errors import CorruptBlock, FormatMismatch
from . import blockhdr
from .blockhdr import BLOCK_SIZE, HEADER_SIZE, BlockType
from .layout import (BLOCKS_PER_BITMAP, FORMAT_REVISION, HB_FREE, HB_LAYOUT, LEASE_BLOCKS,
                     LEASE_START, OLDEST_REVISION, SB_FLAG_GROWING, SB_LAYOUT)
from .meta import _blank

_SB = SB_LAYOUT.struct
_HB = HB_LAYOUT.struct


def now_ns() -> int:
    return time.time_ns()


def random_mount_id() -> int:
    return int.from_bytes(os.urandom(8), "little")


@dataclass
class Superblock:
    """Block 0 (and a backup copy at ``total_blocks - 1``).

    Invariants: ``lease_start = 1``, ``lease_blocks = 1``, ``slot_start = lease_start +
    lease_blocks``; ``journal_start = slot_start + nslots``; ``rgrp_start = journal_start +
    nslots * journal_blocks``; resource group i starts at ``rgrp_start + i *
    rgrp_blocks`` and the last one ends before the backup superblock.

    While a grow is unfinished (``SB_FLAG_GROWING`` in ``flags``) the geometry is
    already the new one and ``grow_from`` is the old ``total_blocks``
    (``clusterfs.fs.grow``); otherwise ``grow_from`` is 0.
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
    lease_start: int = LEASE_START
    lease_blocks: int = LEASE_BLOCKS
    slot_start: int = LEASE_START + LEASE_BLOCKS
    journal_start: int = 0
    rgrp_start: int = 0
    flags: int = 0
    features: int = 0
    cluster_name: str = ""
    grow_from: int = 0
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
            self.cluster_name.encode()[:32], self.lease_start, self.lease_blocks,
            self.grow_from, 0, b"", 0)
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
         cname, lease_start, lease_blocks, grow_from, _slot_table, _reserved,
         _pad) = _SB.unpack_from(buf, HEADER_SIZE)
        if not OLDEST_REVISION <= rev <= FORMAT_REVISION:
            raise FormatMismatch(
                f"volume has format revision {rev}; this clusterfs reads revisions "
                f"{OLDEST_REVISION} to {FORMAT_REVISION} only")
        if bsize != BLOCK_SIZE:
            raise CorruptBlock(bno, f"block size {bsize}, expected {BLOCK_SIZE}")
        sb = cls(total_blocks=total, nslots=nslots, journal_blocks=jblocks,
                 rgrp_blocks=rblocks, rgrp_count=rcount, bitmap_blocks=bmblocks,
                 root_ino=root, uuid=uid, label=label.rstrip(b"\0").decode(errors="replace"),
                 created_ns=created, format_rev=rev, block_size=bsize,
                 slot_start=slot_start, journal_start=jstart, rgrp_start=rstart,
                 flags=flags, features=features,
                 cluster_name=cname.rstrip(b"\0").decode(errors="replace"),
                 lease_start=lease_start, lease_blocks=lease_blocks,
                 grow_from=grow_from, seq=seq)
        sb.check_geometry(bno)
        if backup != sb.backup_bno:
            raise CorruptBlock(bno, f"backup location {backup} != {sb.backup_bno}")
        return sb

    def check_geometry(self, bno: int = 0) -> None:
        """Raise CorruptBlock when the recorded geometry is not self-consistent."""
        problems = []
        if not (1 <= self.nslots <= 256):
            problems.append(f"slot count {self.nslots}")
        if self.lease_start != LEASE_START or self.lease_blocks != LEASE_BLOCKS:
            problems.append(f"lease area at {self.lease_start} ({self.lease_blocks} blocks)")
        if self.slot_start != self.lease_start + self.lease_blocks:
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
        if self.growing:
            if not self.rgrp_start + self.bitmap_blocks + 2 < self.grow_from < \
                    self.total_blocks:
                problems.append(f"grow from {self.grow_from} blocks")
        elif self.grow_from:
            problems.append(f"grow from {self.grow_from} blocks, but no grow in progress")
        if problems:
            raise CorruptBlock(bno, "bad geometry: " + ", ".join(problems))

    # geometry helpers
    @property
    def growing(self) -> bool:
        """Whether a grow of the volume is unfinished (``clusterfs.fs.grow``)."""
        return bool(self.flags & SB_FLAG_GROWING)

    def resized(self, total_blocks: int) -> "Superblock":
        """A copy with ``total_blocks`` and the group count that follows from it (the
        groups' size and start stay), no grow in progress."""
        sb = Superblock(**{**self.__dict__, "total_blocks": total_blocks,
                           "flags": self.flags & ~SB_FLAG_GROWING, "grow_from": 0})
        sb.rgrp_count = rgrp_count_for(total_blocks, self.rgrp_start, self.rgrp_blocks)
        return sb

    def data_blocks(self) -> int:
        """Blocks in all the resource groups (headers and bitmaps included)."""
        return sum(self.rgrp_range(i)[1] for i in range(self.rgrp_count))

    @property
    def lease_bno(self) -> int:
        """The master lease's block."""
        return self.lease_start

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
    slot_start = LEASE_START + LEASE_BLOCKS
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
