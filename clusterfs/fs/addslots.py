"""Adding node slots to a volume (``clusterfs add-slots``, as gfs2_jadd or
``tunefs.ocfs2 -N``).

Each new slot gets a heartbeat block and a journal, one contiguous run taken from
free space in a resource group; the slot table (a new block, the old one is
replaced) lists them; the superblock counts them in ``nslots`` and points at the
table.

The added journals' length is the table's ``journal_blocks``, the same for every
slot it lists (``added_journal_length``): the first add-slots chooses it, the later
ones keep it.  By default it is the mkfs journal length when a heartbeat block and
such a journal fit in one group's data area; otherwise (mkfs's journals of 32768
blocks do not fit in its groups of 32768 blocks: volumes from about 16-32 GiB up,
by slot count) the largest power of two of blocks that fits, 16384.  It is never
below the journal's ``MIN_LENGTH`` (64 blocks: its header and 63 log blocks, the
smallest region ``journal`` formats or opens, and the smallest ``journal_blocks`` a
superblock or mkfs's ``--journal-size`` accepts).

The volume must be quiet: nobody mounted, every journal clean (a replay of an older
journal would write back bitmap blocks that predate the allocation).

The order of the writes, each step flushed before the next (``STEPS`` names them;
the primary superblock is the commit point)::

    written     the new heartbeat blocks (free), journal headers (clean, as mkfs
                writes them) and slot table, all into blocks still free
    allocated   each group's bitmap blocks and header (one write from the header):
                the new runs and the table block marked used, ``free`` lowered
    backup      the backup superblock: nslots + n, slot_table = the new table,
                revision raised to 4 if it was lower
    primary     the primary superblock, the same: the slots exist from here on
    released    (when the volume had a table already) the old table's block freed

What a power cut leaves, by the last step completed:

* none, or ``written``: the volume as it was, clean (the new blocks are free; their
  contents are never read).
* ``allocated`` or ``backup``: the volume as it was (mount reads the primary
  superblock), plus blocks marked used that nothing references (leaked; never
  handed out, so mounting is safe) and, after ``backup``, a backup superblock ahead
  of the primary.  The rollback is fsck's repair: it rewrites the backup from the
  primary (reporting an interrupted add-slots) and frees the leaked blocks.
* ``primary``: the new volume; with an old table, its block leaked (fsck frees it).
* ``released``: the new volume, clean.
"""

from __future__ import annotations

import dataclasses
import re

from journal import Journal, JournalCorrupt
from journal.format import MIN_LENGTH

from ..errors import NoSpace, UsageError, VolumeError
from ..ondisk import slots as slotmod
from ..ondisk.blockhdr import BLOCK_SIZE
from ..ondisk.format import (BLOCKS_PER_BITMAP, FREE, MAX_SLOTS, SLOT_TABLE_MAX,
                             SLOT_TABLE_SINCE, USED, Bitmap, Heartbeat, RgrpHeader,
                             SlotTable, Superblock, expand_bits)

STEPS = ("written", "allocated", "backup", "primary", "released")

_FREE_RUNS = re.compile(b"\x00+")


class _Group:
    """One resource group's header and bitmaps, as read, and the runs taken in it."""

    def __init__(self, dev, sb: Superblock, rg: int):
        self.rg = rg
        self.start, self.length = sb.rgrp_range(rg)
        nbm = sb.bitmap_blocks
        data = dev.read(self.start, 1 + nbm)
        self.hdr = RgrpHeader.decode(data[:BLOCK_SIZE], self.start)
        self.bms = [Bitmap.decode(data[(1 + j) * BLOCK_SIZE:(2 + j) * BLOCK_SIZE],
                                  self.start + 1 + j, rg, j * BLOCKS_PER_BITMAP)
                    for j in range(nbm)]
        self.states = expand_bits(b"".join(bytes(bm.bits) for bm in self.bms),
                                  self.length)
        self.data_from = 1 + nbm          # first entry of the data area

    def free_runs(self) -> list[list[int]]:
        """[first block, blocks] of each run of free blocks in the data area."""
        return [[self.start + m.start(), m.end() - m.start()]
                for m in _FREE_RUNS.finditer(self.states, self.data_from)]

    def set_states(self, bno: int, n: int, state: int) -> None:
        e = bno - self.start
        while n:
            j, i = divmod(e, BLOCKS_PER_BITMAP)
            k = min(n, BLOCKS_PER_BITMAP - i)
            self.bms[j].set_run(i, k, state)
            self.states[e:e + k] = bytes([state]) * k
            e += k
            n -= k

    def image(self) -> bytes:
        """The header (free recounted from the bitmap) and bitmap blocks, to be
        written in one write from the group's first block."""
        self.hdr.free = self.states.count(FREE)
        return self.hdr.image() + b"".join(bm.image() for bm in self.bms)


@dataclasses.dataclass
class Plan:
    """Where ``add_slots_on_disk`` puts the new slots (nothing written yet)."""

    first_slot: int                         # the first new slot's number
    journal_blocks: int                     # each new journal's length (the table's)
    runs: list[tuple[int, int]]             # (heartbeat, journal start) per new slot
    table: int                              # the new slot table's block
    groups: dict[int, _Group]               # the groups it allocates in


def check_quiet(dev, sb: Superblock, live=frozenset()) -> None:
    """Refuse a volume whose journals are not all clean, but for those of ``live``
    (slots of members whose journals the cluster's freeze emptied: open, so not
    marked clean, but with nothing to replay).

    Raises:
        VolumeError: naming the first slot whose journal needs replay or is damaged.
    """
    for slot in range(sb.nslots):
        if slot in live:
            continue
        try:
            clean = slotmod.slot_journal(dev, sb, slot).is_clean()
        except JournalCorrupt as e:
            raise VolumeError(f"journal of slot {slot} is damaged ({e.reason}); run "
                              f"'clusterfs fsck' first") from None
        if not clean:
            raise VolumeError(f"journal of slot {slot} needs replay (a node died "
                              f"mounted); mount the volume once or run 'clusterfs "
                              f"fsck' first")


def group_room(sb: Superblock) -> int:
    """The most blocks a slot can take in one group: the data area of group 0, the
    longest (every group is ``rgrp_blocks`` long but the last, which may be
    shorter)."""
    return sb.rgrp_range(0)[1] - 1 - sb.bitmap_blocks


def size_text(blocks: int) -> str:
    """``blocks`` as a size for messages: "64 MiB", "256 KiB"."""
    size = blocks * BLOCK_SIZE
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    return f"{size / (1 << 20):.2f} MiB"


def added_journal_length(sb: Superblock, requested: int | None = None) -> int:
    """The length in blocks of the journals of the slots to add (module doc).

    Args:
        sb: the superblock, its slot table loaded.
        requested: a length asked for (``--journal-size``), or None for the default.

    Raises:
        UsageError: ``requested`` is below ``MIN_LENGTH``, does not fit in a group's
            data area with its heartbeat block, or differs from the length of the
            slots added before.
        NoSpace: (the default) not even a journal of ``MIN_LENGTH`` blocks fits in a
            group.
    """
    if sb.added is None:
        raise RuntimeError("the slot table is not loaded (Superblock.load_slot_table)")
    room = group_room(sb)
    if sb.added_journal_blocks:             # slots were added: their length
        have = sb.added_journal_blocks
        if requested is not None and requested != have:
            raise UsageError(f"--journal-size {size_text(requested)} differs from the "
                             f"journals of the slots added before ({size_text(have)}, "
                             f"{have} blocks): every added slot's journal has the "
                             f"slot table's length")
        return have
    if requested is not None:
        if requested < MIN_LENGTH:
            raise UsageError(f"--journal-size {size_text(requested)} is below the smallest "
                             f"journal ({size_text(MIN_LENGTH)}, {MIN_LENGTH} blocks)")
        if 1 + requested > room:
            raise UsageError(f"--journal-size {size_text(requested)} ({requested} blocks) "
                             f"does not fit in a resource group: its data area of "
                             f"{room} blocks holds a heartbeat block and a journal of "
                             f"{room - 1} blocks at most")
        return requested
    if 1 + sb.journal_blocks <= room:
        return sb.journal_blocks
    length = 1 << ((room - 1).bit_length() - 1) if room > 1 else 0
    if length < MIN_LENGTH:
        raise NoSpace(f"the resource groups are too small for a slot: a data area of "
                      f"{room} blocks cannot hold a heartbeat block and a journal of "
                      f"{MIN_LENGTH} blocks")
    return length


def plan_add_slots(dev, sb: Superblock, n: int,
                   journal_blocks: int | None = None) -> Plan:
    """Choose the runs of ``n`` new slots and the block of the new slot table.

    Each slot takes ``1 + length`` contiguous free blocks of one group's data area
    (its heartbeat block, then its journal; ``length`` from
    ``added_journal_length(sb, journal_blocks)``), the table one more free block.
    Groups are searched from the last one down (group 0 holds the root directory and
    mkfs's first inodes).

    Raises:
        UsageError: ``n`` below 1 or past the slot limits; a bad ``journal_blocks``.
        NoSpace: not enough contiguous free space.
        CorruptBlock: a group header or bitmap block is damaged.
    """
    if n < 1:
        raise UsageError(f"the number of slots to add must be at least 1, not {n}")
    fixed = sb.fixed_slots
    if sb.nslots + n > MAX_SLOTS or sb.nslots + n - fixed > SLOT_TABLE_MAX:
        room = min(MAX_SLOTS - sb.nslots, SLOT_TABLE_MAX - (sb.nslots - fixed))
        raise UsageError(f"the volume has {sb.nslots} slots: at most {room} more can "
                         f"be added (limits: {MAX_SLOTS} slots, {SLOT_TABLE_MAX} added "
                         f"ones)")
    jblocks = added_journal_length(sb, journal_blocks)
    need = 1 + jblocks
    runs: list[tuple[int, int]] = []
    groups: dict[int, _Group] = {}
    leftovers = []
    for rg in reversed(range(sb.rgrp_count)):
        g = _Group(dev, sb, rg)
        for first, length in g.free_runs():
            while len(runs) < n and length >= need:
                runs.append((first, first + 1))
                g.set_states(first, need, USED)
                groups[rg] = g
                first += need
                length -= need
            if length:
                leftovers.append((g, first))
        if len(runs) == n and leftovers:
            break
    if len(runs) < n or not leftovers:
        mib = need * BLOCK_SIZE / (1 << 20)
        raise NoSpace(f"not enough contiguous free space for {n} slot(s): each needs "
                      f"{need} contiguous free blocks ({mib:.1f} MiB: its heartbeat and "
                      f"a journal of {jblocks} blocks) in one resource group "
                      f"(data area {group_room(sb)} blocks), and "
                      f"the slot table one more; there is room for {len(runs)}"
                      + ("" if sb.added_journal_blocks else
                         " (a shorter --journal-size may fit more)"))
    g, table = leftovers[0]
    g.set_states(table, 1, USED)
    groups[g.rg] = g
    return Plan(first_slot=sb.nslots, journal_blocks=jblocks, runs=runs, table=table,
                groups=groups)


def add_slots_on_disk(dev, sb: Superblock, n: int, *, journal_blocks: int | None = None,
                      crash=None, live=frozenset()) -> Superblock:
    """Add ``n`` node slots to a quiet volume (module doc: the steps and what a
    power cut leaves after each).

    Args:
        dev: the volume's device (nobody else writes to it meanwhile).
        sb: its superblock, as read (``read_superblock``: the slot table loaded).
        n: slots to add.
        journal_blocks: the new journals' length in blocks; None: the default
            (``added_journal_length``).
        crash: called with each step's name (``STEPS``) once the step is durable; a
            test raises there to stop the work at that point.
        live: slots of cluster members frozen by the caller (``cluster.admin``),
            whose open journals are empty (``check_quiet``).

    Returns:
        The new superblock (as written).

    Raises:
        UsageError, NoSpace: the request cannot be met, or ``journal_blocks`` does
            not fit a group or differs from the slot table's (nothing written).
        VolumeError: a journal is not clean (nothing written).
        CorruptBlock: a group header, bitmap or the slot table is damaged.
    """
    if sb.added is None:
        sb.load_slot_table(dev)
    check_quiet(dev, sb, live)
    plan = plan_add_slots(dev, sb, n, journal_blocks)
    step = crash or (lambda _name: None)
    old_seq = 0
    if sb.slot_table:
        old_seq = SlotTable.decode(dev.read(sb.slot_table), sb.slot_table, sb).seq
    # written: everything into blocks still free
    for k, (hb, jstart) in enumerate(plan.runs):
        slot = plan.first_slot + k
        dev.write(hb, Heartbeat(slot=slot).image(hb))
        Journal.format(dev, jstart, plan.journal_blocks, slot=slot)
    entries = list(sb.added) + plan.runs
    table = SlotTable(plan.table, sb.fixed_slots, plan.journal_blocks, entries,
                      old_seq + 1)
    dev.write(plan.table, table.image())
    dev.flush()
    step("written")
    # allocated: the bitmaps, a group at a time (header and bitmaps in one write)
    for rg in sorted(plan.groups):
        g = plan.groups[rg]
        dev.write(g.start, g.image())
    dev.flush()
    step("allocated")
    # the superblocks: the backup, then the primary (the commit point)
    new = dataclasses.replace(sb, nslots=sb.nslots + n, slot_table=plan.table,
                              added=entries, added_journal_blocks=plan.journal_blocks,
                              seq=sb.seq + 1,
                              format_rev=max(sb.format_rev, SLOT_TABLE_SINCE))
    dev.write(new.backup_bno, new.image(new.backup_bno))
    dev.flush()
    step("backup")
    dev.write(0, new.image(0))
    dev.flush()
    step("primary")
    if sb.slot_table:
        g = _Group(dev, sb, sb.rgrp_of(sb.slot_table))
        g.set_states(sb.slot_table, 1, FREE)
        dev.write(g.start, g.image())
        dev.flush()
        step("released")
    return new

