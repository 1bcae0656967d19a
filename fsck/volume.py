"""Layer 1, Volume: the superblock and its backup, the revision, the geometry, the
slot table.

A damaged copy is rewritten from the other; when both are damaged, one whose header
alone is damaged is used.  No usable superblock, another revision, or a device
smaller than the volume is an operational error (the run ends there).  A primary
superblock that records an unfinished grow is one finding; the run goes on with the
grown geometry, and layer 2 finishes the grow (``cluster.finish_grow``: for real, or
in the overlay under ``-n``) before any group is read.  The slot table's blocks (it,
and each added slot's heartbeat block and journal) are claimed as in use; a damaged
table is a finding fsck cannot repair: the run goes on without the added slots and
repairs nothing (it would free their blocks).
"""

from __future__ import annotations

import dataclasses

from clusterfs.errors import CorruptBlock, FormatMismatch
from clusterfs.ondisk import blockhdr
from clusterfs.ondisk.blockhdr import MAGIC, BlockType, is_valid
from clusterfs.ondisk.format import FORMAT_REVISION, OLDEST_REVISION, SB_LAYOUT, Superblock

from . import salvage
from .claims import C_SLOT
from .device import OverlayDevice
from .report import FsckError


def check_superblock(s) -> None:
    rep = s.report
    nblocks = s.real.nblocks
    buf0 = s.read(0)
    prim = prim_err = None
    if buf0 is None:
        prim_err = "unreadable"
    else:
        prim, prim_err = _decode_sb(buf0, 0)
    if prim is not None:
        _check_fits(s, prim)
        if prim.growing:
            _interrupted_grow(s, prim)
            return
    # where is the backup?
    cands = []
    if prim is not None:
        cands.append(prim.backup_bno)
    elif buf0 is not None and blockhdr.header(buf0)[0] == MAGIC:
        raw_total = SB_LAYOUT.get(buf0, "total_blocks")
        if 2 <= raw_total <= nblocks:
            cands.append(raw_total - 1)
    cands.append(nblocks - 1)
    backup = backup_err = None
    backup_bno = cands[0]
    for bno in dict.fromkeys(cands):
        if not 0 < bno < nblocks:
            continue
        buf = s.read(bno)
        if buf is None:
            backup_err = backup_err or "unreadable"
            continue
        sb, err = _decode_sb(buf, bno)
        if sb is not None and sb.backup_bno == bno:
            backup, backup_bno, backup_err = sb, bno, None
            break
        backup_err = backup_err or err or "not at its own backup location"
    if prim is None and backup is None:
        # both damaged: accept one whose header alone is damaged
        for bno, buf in ((0, buf0), (backup_bno, s.read(backup_bno))):
            if buf is None:
                continue
            try:
                sb, notes = salvage.decode_superblock(buf, bno)
            except (CorruptBlock, FormatMismatch):
                continue
            if sb.total_blocks <= nblocks:
                if rep.problem("superblocks-damaged",
                               f"both superblocks are damaged (primary: {prim_err}; "
                               f"backup: {backup_err}); block {bno} is usable "
                               f"({', '.join(notes)})",
                               "rewrite both from it", safe=False):
                    s.write_primary = s.write_backup = True
                s.sb = sb
                return
        raise FsckError(f"no usable clusterfs superblock (primary: {prim_err}; "
                        f"backup: {backup_err}): not a clusterfs volume, or damaged "
                        f"beyond repair")
    if prim is None:
        _check_fits(s, backup)
        s.sb = backup
        if rep.problem("primary-superblock", f"primary superblock is damaged "
                       f"({prim_err})", "rewrite it from the backup", safe=False,
                       block=0):
            s.write_primary = True
        return
    s.sb = prim
    if backup is None:
        if rep.problem("backup-superblock", f"backup superblock at block "
                       f"{prim.backup_bno} is damaged ({backup_err})",
                       "rewrite it from the primary", safe=True,
                       block=prim.backup_bno):
            s.write_backup = True
        return
    a = Superblock(**{**prim.__dict__, "seq": 0}).image(0)
    b = Superblock(**{**backup.__dict__, "seq": 0}).image(0)
    if a != b and backup.format_rev > prim.format_rev and \
            a == Superblock(**{**backup.__dict__, "seq": 0,
                               "format_rev": prim.format_rev}).image(0):
        # a raise of the revision (at a volume's first clone) stopped after the
        # backup: the primary, which mounts read, still says the volume shares no
        # block, which is true (the next clone raises both again)
        rep.warn("revision-raise", f"the backup superblock says revision "
                 f"{backup.format_rev}, the primary {prim.format_rev}: a raise of the "
                 f"revision was interrupted (harmless)", block=prim.backup_bno)
        return
    if a != b and backup.nslots > prim.nslots and backup.slot_table != prim.slot_table \
            and a == Superblock(**{**backup.__dict__, "seq": 0, "nslots": prim.nslots,
                                   "slot_table": prim.slot_table,
                                   "format_rev": prim.format_rev}).image(0):
        # add-slots wrote the backup but not the primary (its commit point): its
        # blocks, marked used, are freed below as leaked
        if rep.problem("add-slots-interrupted", f"the backup superblock has "
                       f"{backup.nslots} slots (slot table at block "
                       f"{backup.slot_table}), the primary {prim.nslots}: an add-slots "
                       f"stopped before its commit", "roll it back: rewrite the backup "
                       "from the primary (the blocks it took are leaked, see below)",
                       safe=True, block=prim.backup_bno):
            s.write_backup = True
        return
    if a != b:
        if rep.problem("superblocks-differ", "primary and backup superblocks "
                       "disagree", "rewrite the backup from the primary", safe=True,
                       block=prim.backup_bno):
            s.write_backup = True


def _interrupted_grow(s, prim: Superblock) -> None:
    """The primary records an unfinished grow: the backup is not looked at (the
    grow's last steps write it); the run checks the grown volume."""
    s.grow_sb = prim
    s.grow_fix = s.report.problem(
        "grow-interrupted", f"an interrupted grow (from {prim.grow_from} to "
        f"{prim.total_blocks} blocks); mount or fsck -y completes it", "complete it",
        safe=True, block=0)
    s.sb = prim.resized(prim.total_blocks)
    s.sb.seq = prim.seq


def _decode_sb(buf, bno: int):
    """(Superblock, None) or (None, reason); a valid block of another revision is
    an operational error (exit 8)."""
    if is_valid(buf, BlockType.SUPERBLOCK, bno):
        rev = SB_LAYOUT.get(buf, "format_rev")
        if not OLDEST_REVISION <= rev <= FORMAT_REVISION:
            raise FsckError(f"volume has format revision {rev}; this fsck handles "
                            f"revisions {OLDEST_REVISION} to {FORMAT_REVISION} only")
    try:
        return Superblock.decode(buf, bno), None
    except CorruptBlock as e:
        return None, e.reason
    except FormatMismatch as e:         # no magic
        return None, str(e)


def _check_fits(s, sb: Superblock) -> None:
    if sb.total_blocks > s.real.nblocks:
        raise FsckError(f"the superblock describes {sb.total_blocks} blocks but the "
                        f"device has only {s.real.nblocks}: wrong device, or a "
                        f"truncated image")


def check_geometry(s) -> None:
    """The superblock's geometry against the device; the group tables of the run."""
    sb = s.sb
    _check_fits(s, sb)
    s.claims = bytearray(sb.total_blocks)
    s.gstart = [sb.rgrp_range(i)[0] for i in range(sb.rgrp_count)]
    s.glen = [sb.rgrp_range(i)[1] for i in range(sb.rgrp_count)]
    s.rstart, s.rend = sb.rgrp_start, sb.total_blocks - 1
    s.rblocks, s.rcount = sb.rgrp_blocks, sb.rgrp_count
    s.dstart = [g + 1 + sb.bitmap_blocks for g in s.gstart]
    s.gend = [g + n for g, n in zip(s.gstart, s.glen)]


def check_slot_table(s) -> None:
    """The slot table (slots added after mkfs): it must decode and fit the
    superblock; its blocks and those of the slots it lists are claimed."""
    sb = s.sb
    if not sb.slot_table:
        sb.added = []
        return
    bno = sb.slot_table
    try:
        sb.load_slot_table(s.dev)
    except CorruptBlock as e:
        fixed = sb.fixed_slots
        slots = f"slot {fixed}" if fixed == sb.nslots - 1 else \
            f"slots {fixed}-{sb.nslots - 1}"
        s.report.problem("slot-table", f"slot table (block {bno}) is damaged: {e.reason}; "
                         f"{slots} cannot be checked and their blocks show as leaked",
                         "", block=bno)
        if s.dev is s.real:
            s.dev = OverlayDevice(s.real)       # nothing is written from here on
        if s.report.repairs_allowed:
            s.report.repairs_allowed = False
            s.report.note("  (no repairs: they would free the blocks of the added "
                          "slots)")
        # the rest of the run sees the slots of mkfs only
        s.sb = dataclasses.replace(sb, nslots=fixed, slot_table=0, added=[])
        return
    for _what, start, n in sb.added_extents():
        s.claims[start:start + n] = bytes([C_SLOT]) * n
    s.stats["added_slots"] = len(sb.added)


def summary(s) -> str:
    sb = s.sb
    return (f"revision {sb.format_rev}, {sb.total_blocks} blocks, "
            f"{sb.rgrp_count} resource groups, {sb.nslots} slots")
