"""The superblock and the volume's geometry; the node slots' heartbeat blocks and
the slot table.

Geometry (all in 4096-byte blocks)::

    0                       superblock
    1                       the lease area: the lock manager's master lease
    2 .. 2+fixed-1          heartbeat block of each fixed slot (fixed = the slots of
                            mkfs = journal_start - slot_start)
    journal_start ..        journal of fixed slot i at journal_start + i * journal_blocks
    rgrp_start ..           resource groups, rgrp_blocks each (the last may be shorter);
                            slots added later (add-slots) have their heartbeat block
                            and journal here, allocated in the bitmaps, listed by the
                            slot table (a block here too), which gives their journals'
                            length (the same for all of them, may differ from
                            journal_blocks: a journal must fit in one group)
    total_blocks - 1        backup superblock

``Superblock.heartbeat_bno`` and ``Superblock.journal_range`` are the one place that
says where a slot's blocks are; everything goes through them.  The fields of the
blocks are the tables ``SB_LAYOUT``, ``HB_LAYOUT`` and ``SLOT_TABLE_LAYOUT`` of
``layout``; ``docs/FORMAT.md`` ("SUPERBLOCK", "HEARTBEAT", "SLOT_TABLE") describes
them.
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
                     LEASE_START, MAX_SLOTS, OLDEST_REVISION, SB_FLAG_GROWING, SB_LAYOUT,
                     SLOT_ENTRIES_OFF, SLOT_ENTRY, SLOT_TABLE_LAYOUT, SLOT_TABLE_MAX,
                     SLOT_TABLE_SINCE)
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
    lease_blocks``; ``journal_start = slot_start + fixed_slots`` (the slots of mkfs,
    1 .. ``nslots``); ``rgrp_start = journal_start + fixed_slots * journal_blocks``;
    resource group i starts at ``rgrp_start + i * rgrp_blocks`` and the last one ends
    before the backup superblock.  ``nslots`` counts every slot; the ones past
    ``fixed_slots`` are listed by the slot table at block ``slot_table`` (0 when there
    are none), which ``load_slot_table`` reads into ``added`` and
    ``added_journal_blocks`` (``read_superblock`` does it: a superblock only decoded
    knows where its added slots are once it is loaded).  ``journal_blocks`` is the
    length of the fixed slots' journals; the added slots' journals are
    ``added_journal_blocks`` long (the table's ``journal_blocks``): a journal must lie
    in one group's data area, which may be shorter than the fixed journals.

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
    slot_table: int = 0
    seq: int = 1
    # (heartbeat block, journal start) of each added slot, from the slot table; None:
    # not loaded yet (``load_slot_table``)
    added: list[tuple[int, int]] | None = None
    # the length of every added slot's journal, from the slot table; 0 without one
    added_journal_blocks: int = 0

    def __post_init__(self):
        if self.added is None and not self.slot_table:
            self.added = []

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
            self.grow_from, self.slot_table, b"", 0)
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
         cname, lease_start, lease_blocks, grow_from, slot_table, _reserved,
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
                 grow_from=grow_from, slot_table=slot_table, seq=seq)
        sb.check_geometry(bno)
        if backup != sb.backup_bno:
            raise CorruptBlock(bno, f"backup location {backup} != {sb.backup_bno}")
        return sb

    def check_geometry(self, bno: int = 0) -> None:
        """Raise CorruptBlock when the recorded geometry is not self-consistent."""
        problems = []
        if not (1 <= self.nslots <= MAX_SLOTS):
            problems.append(f"slot count {self.nslots}")
        if self.lease_start != LEASE_START or self.lease_blocks != LEASE_BLOCKS:
            problems.append(f"lease area at {self.lease_start} ({self.lease_blocks} blocks)")
        if self.slot_start != self.lease_start + self.lease_blocks:
            problems.append(f"heartbeat blocks at {self.slot_start}")
        fixed = self.fixed_slots
        if not 1 <= fixed <= self.nslots:
            problems.append(f"journal start {self.journal_start}")
        if self.journal_blocks < 64:
            problems.append(f"journal size {self.journal_blocks}")
        if self.rgrp_start != self.journal_start + fixed * self.journal_blocks:
            problems.append(f"rgrp start {self.rgrp_start}")
        if (self.nslots > fixed) != bool(self.slot_table):
            problems.append(f"{self.nslots} slots ({fixed} fixed) with slot table "
                            f"{self.slot_table}")
        elif self.slot_table and (self.format_rev < SLOT_TABLE_SINCE or
                                  not self.rgrp_start <= self.slot_table < self.backup_bno
                                  or self.nslots - fixed > SLOT_TABLE_MAX):
            problems.append(f"slot table {self.slot_table} ({self.nslots - fixed} "
                            f"slots, revision {self.format_rev})")
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

    @property
    def fixed_slots(self) -> int:
        """The slots of mkfs: their heartbeat blocks and journals lie before the
        resource groups.  Slots from this number up were added (the slot table)."""
        return self.journal_start - self.slot_start

    def _added(self, slot: int) -> tuple[int, int]:
        if not 0 <= slot < self.nslots:
            raise ValueError(f"slot {slot} does not exist (the volume has {self.nslots})")
        if self.added is None:
            raise RuntimeError("the slot table is not loaded (Superblock.load_slot_table)")
        return self.added[slot - self.fixed_slots]

    def heartbeat_bno(self, slot: int) -> int:
        """The heartbeat block of ``slot``."""
        if 0 <= slot < self.fixed_slots:
            return self.slot_start + slot
        return self._added(slot)[0]

    def journal_range(self, slot: int) -> tuple[int, int]:
        """(first block, length) of the journal of ``slot``: ``journal_blocks`` long
        for a fixed slot, ``added_journal_blocks`` (the slot table's) for an added
        one."""
        if 0 <= slot < self.fixed_slots:
            return self.journal_start + slot * self.journal_blocks, self.journal_blocks
        return self._added(slot)[1], self.added_journal_blocks

    def added_extents(self) -> list[tuple[str, int, int]]:
        """(what, first block, blocks) of every block the added slots hold in the
        resource groups: the slot table, each added slot's heartbeat and journal."""
        if not self.slot_table:
            return []
        out = [("slot table", self.slot_table, 1)]
        for i, (hb, jstart) in enumerate(self._table(), self.fixed_slots):
            out.append((f"heartbeat of slot {i}", hb, 1))
            out.append((f"journal of slot {i}", jstart, self.added_journal_blocks))
        return out

    def _table(self) -> list[tuple[int, int]]:
        if self.added is None:
            raise RuntimeError("the slot table is not loaded (Superblock.load_slot_table)")
        return self.added

    def load_slot_table(self, dev) -> None:
        """Read and check the slot table (nothing to do without added slots).

        Raises:
            CorruptBlock: the slot table is damaged or does not fit the superblock
                (the block named is the table's).
        """
        if self.slot_table:
            try:
                buf = dev.read(self.slot_table)
            except OSError as e:
                raise CorruptBlock(self.slot_table, f"slot table unreadable: {e}") \
                    from None
            table = SlotTable.decode(buf, self.slot_table, self)
            self.added = table.entries
            self.added_journal_blocks = table.journal_blocks
        else:
            self.added = []
            self.added_journal_blocks = 0

    def in_data_area(self, bno: int, n: int = 1) -> bool:
        """Whether blocks [bno, bno+n) lie in the data area of one resource group."""
        rg = self.rgrp_of(bno)
        if rg < 0 or n < 1:
            return False
        start, length = self.rgrp_range(rg)
        return bno >= start + 1 + self.bitmap_blocks and bno + n <= start + length

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


class SlotTable:
    """The slot table: where each slot added after mkfs has its heartbeat block and
    its journal (``journal_blocks`` long), in the resource groups.

    Args:
        bno: its block.
        first_slot: the number of the first slot it lists (= the fixed slots).
        journal_blocks: the length of each journal it lists, the same for all of them
            (chosen by the first add-slots, kept by the later ones; it may differ
            from the superblock's, the fixed slots' length), at least 64 blocks (the
            journal's ``MIN_LENGTH``).
        entries: (heartbeat block, journal start) of slots ``first_slot``, ``first_slot
            + 1``, ...
        seq: header ``seq``: 1 for a volume's first table, +1 for each new one.
    """

    __slots__ = ("bno", "first_slot", "journal_blocks", "entries", "seq")

    def __init__(self, bno: int, first_slot: int, journal_blocks: int,
                 entries: list[tuple[int, int]], seq: int = 1):
        self.bno = bno
        self.first_slot = first_slot
        self.journal_blocks = journal_blocks
        self.entries = entries
        self.seq = seq

    def image(self) -> bytes:
        if len(self.entries) > SLOT_TABLE_MAX:
            raise ValueError(f"a slot table holds {SLOT_TABLE_MAX} slots at most")
        buf = _blank()
        SLOT_TABLE_LAYOUT.struct.pack_into(buf, HEADER_SIZE, len(self.entries),
                                           self.first_slot, self.journal_blocks, 0)
        for k, (hb, jstart) in enumerate(self.entries):
            SLOT_ENTRY.struct.pack_into(buf, SLOT_ENTRIES_OFF + k * SLOT_ENTRY.size,
                                        hb, jstart)
        return bytes(blockhdr.seal(buf, BlockType.SLOT_TABLE, self.bno, self.seq))

    @classmethod
    def decode(cls, buf, bno: int, sb: "Superblock") -> "SlotTable":
        """Parse the table and check it against ``sb``: one entry per added slot,
        journals of at least 64 blocks (the journal's ``MIN_LENGTH``, as the
        superblock's ``journal_blocks``), each heartbeat block and journal inside one
        group's data area, none overlapping another or the table.

        Raises:
            CorruptBlock: naming ``bno``.
        """
        seq = blockhdr.verify(buf, BlockType.SLOT_TABLE, bno)
        count, first, jblocks, reserved = SLOT_TABLE_LAYOUT.struct.unpack_from(
            buf, HEADER_SIZE)
        want = sb.nslots - sb.fixed_slots
        if count != want or first != sb.fixed_slots:
            raise CorruptBlock(bno, f"slot table lists {count} slot(s) from slot {first}; "
                                    f"the superblock says {want} from slot "
                                    f"{sb.fixed_slots}")
        if reserved:
            raise CorruptBlock(bno, "slot table: its reserved field is not zero")
        if jblocks < 64:
            raise CorruptBlock(bno, f"slot table: journals of {jblocks} blocks, below "
                                    f"the minimum of 64")
        entries = [SLOT_ENTRY.struct.unpack_from(buf, SLOT_ENTRIES_OFF + k * SLOT_ENTRY.size)
                   for k in range(count)]
        if any(buf[SLOT_ENTRIES_OFF + count * SLOT_ENTRY.size:]):
            raise CorruptBlock(bno, "slot table: bytes after its entries are not zero")
        spans = [(bno, 1, "the slot table")]
        for k, (hb, jstart) in enumerate(entries):
            slot = first + k
            if not sb.in_data_area(hb):
                raise CorruptBlock(bno, f"slot table: heartbeat of slot {slot} at block "
                                        f"{hb}, outside the groups' data areas")
            if not sb.in_data_area(jstart, jblocks):
                raise CorruptBlock(bno, f"slot table: journal of slot {slot} at blocks "
                                        f"{jstart}-{jstart + jblocks - 1}, not inside one "
                                        f"group's data area")
            spans.append((hb, 1, f"the heartbeat of slot {slot}"))
            spans.append((jstart, jblocks, f"the journal of slot {slot}"))
        spans.sort()
        for (a, n, what), (b, _m, other) in zip(spans, spans[1:]):
            if b < a + n:
                raise CorruptBlock(bno, f"slot table: {other} overlaps {what} "
                                        f"(block {b})")
        return cls(bno, first, jblocks, [tuple(e) for e in entries], seq)


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
