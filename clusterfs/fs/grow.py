"""Growing a volume into space added at the end of its device (``clusterfs grow``).

The volume must be quiet: offline (the ``grow`` command), or a single-node mount
that has committed and checkpointed its journal (``grow_mounted``), or a cluster
whose every node is frozen with its journal checkpointed.  The old last group, if
short, is extended to full length where the new size allows, new groups follow it,
and the backup superblock moves to the new end.  ``docs/FORMAT.md`` ("Growing a
volume") is the rule; the checklist, each step flushed before the next one starts
(T0: the old ``total_blocks``, T1: the new one):

1. The new groups' headers and bitmaps, written fresh; and a placeholder (zeros) at
   T1 - 1, the new backup's place, so that an image file's host space for every
   block the grow writes later is taken now.  None of these blocks is used by the
   old geometry, except the old backup superblock at T0 - 1 when a new group's
   header or bitmap lands on it: that one block is left for step 3.  A power cut
   up to here leaves the old volume, untouched.
2. The primary superblock: the new geometry, ``SB_FLAG_GROWING`` and ``grow_from`` =
   T0.  From here on the volume has the new geometry and every reader finishes the
   grow (``finish_grow``, steps 3-7, idempotent) before it uses the groups.
3. Each new group's header or bitmap block that is not valid (the one at T0 - 1, a
   torn write) is written fresh; the valid ones are kept.
4. The old last group, when its length changes: bitmap entries past its old length
   cleared (they are free by the format; cleared should one not be), then its
   header's ``length`` and ``free``.  A header written torn at sector granularity is
   the old or the new one: only its first sector changes.
5. The old backup superblock, now a block of a group's data area, zeroed.
6. The backup superblock at T1 - 1 (without the flag).
7. The primary superblock without the flag, ``grow_from`` = 0.

The superblock's fields all lie in its first sector, so each superblock write is
atomic under sector-granular tearing, like the journal header's.
"""

from __future__ import annotations

import logging
from typing import Callable

from ..errors import CorruptBlock, UsageError, VolumeError
from ..ondisk import blockhdr
from ..ondisk.blockhdr import BLOCK_SIZE, BlockType
from ..ondisk.format import (BLOCKS_PER_BITMAP, FREE, SB_FLAG_GROWING, Bitmap, RgrpHeader,
                             Superblock, expand_bits)
from ..ondisk.rgrp import new_group_image

log = logging.getLogger(__name__)

# the points where ``crash`` is called, each right after its step is durable
STEPS = ("new-groups", "primary", "groups", "last-group", "backup", "done")

Crash = Callable[[str], None]


def _size(blocks: int) -> str:
    n = blocks * BLOCK_SIZE
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} bytes" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"


def min_grow_blocks(sb: Superblock) -> int:
    """The smallest ``total_blocks`` that gives the groups of ``sb``'s volume at
    least one more block."""
    last = sb.rgrp_count - 1
    start, length = sb.rgrp_range(last)
    if length < sb.rgrp_blocks:
        return sb.total_blocks + 1          # the short last group grows at once
    # a new group needs its header, its bitmaps and 16 blocks; then the backup
    return start + sb.rgrp_blocks + sb.bitmap_blocks + 1 + 16 + 1


def plan_grow(sb: Superblock, new_total: int) -> Superblock:
    """The superblock of ``sb``'s volume grown to ``new_total`` blocks (no I/O).

    Raises:
        UsageError: ``new_total`` is smaller than the volume, the same, or too small
            to add a block to the groups.
        VolumeError: a grow of the volume is unfinished.
    """
    if sb.growing:
        raise VolumeError("an interrupted grow is not finished yet")
    if new_total < sb.total_blocks:
        raise UsageError(f"the new size ({_size(new_total)}) is smaller than the volume "
                         f"({_size(sb.total_blocks)}): a volume never shrinks")
    if new_total == sb.total_blocks:
        raise UsageError(f"the volume already has that size ({_size(new_total)})")
    new = sb.resized(new_total)
    if new.data_blocks() <= sb.data_blocks():
        need = min_grow_blocks(sb)
        raise UsageError(f"{_size(new_total - sb.total_blocks)} more add nothing usable: "
                         f"a new resource group needs its header, its bitmaps and 16 "
                         f"blocks; grow to {need * BLOCK_SIZE} bytes at least")
    return new


def _step(crash: Crash | None, name: str) -> None:
    if crash is not None:
        crash(name)


def grow_on_disk(dev, sb: Superblock, new_total: int, *, progress=None,
                 crash: Crash | None = None) -> Superblock:
    """Grow the quiet volume on ``dev`` (superblock ``sb``) to ``new_total`` blocks.

    Args:
        dev: the volume's device, at least ``new_total`` blocks.
        sb: its superblock as on the device (no grow in progress).
        new_total: the new ``total_blocks``.
        progress: a ``clusterfs.progress.Progress`` (its total is set here), or None.
        crash: called with each name of ``STEPS`` once that step is durable (tests
            raise there to cut the power).

    Returns:
        The new superblock (as on the device).

    Raises:
        UsageError: see ``plan_grow``.
        VolumeError: the device is too small, or the old last group's header is
            damaged (fsck first); nothing was written then.
        OSError: a write failed (ENOSPC on an image's host...): before step 2 the
            volume is the old one; after it, ``finish_grow`` completes the grow.
    """
    new = plan_grow(sb, new_total)
    if dev.nblocks < new_total:
        raise VolumeError(f"the device has {dev.nblocks} blocks, fewer than the "
                          f"{new_total} asked for")
    last = sb.rgrp_count - 1
    start, length = sb.rgrp_range(last)
    try:
        hdr = RgrpHeader.decode(dev.read(start), start)
    except CorruptBlock as e:
        raise VolumeError(f"resource group {last} header (block {start}) is damaged "
                          f"({e.reason}); run 'clusterfs fsck' first") from None
    if hdr.length != length or hdr.index != last:
        raise VolumeError(f"resource group {last} header (block {start}) disagrees with "
                          f"the superblock; run 'clusterfs fsck' first")
    # 1. the new groups, beyond what the old geometry uses
    nb = 1 + sb.bitmap_blocks
    old_backup = sb.backup_bno
    if progress is not None:
        progress.total = new.rgrp_count - sb.rgrp_count
        progress.update(0, "writing resource groups")
    for rg in range(sb.rgrp_count, new.rgrp_count):
        gstart, glen = new.rgrp_range(rg)
        image = new_group_image(rg, gstart, glen, new.bitmap_blocks)
        if gstart <= old_backup < gstart + nb:
            k = old_backup - gstart        # left for step 3 (finish_grow)
            if k:
                dev.write(gstart, image[:k * BLOCK_SIZE])
            if k + 1 < nb:
                dev.write(old_backup + 1, image[(k + 1) * BLOCK_SIZE:])
        else:
            dev.write(gstart, image)
        if progress is not None:
            progress.advance()
    dev.write(new.backup_bno, bytes(BLOCK_SIZE))
    dev.flush()
    _step(crash, "new-groups")
    # 2. the grow record
    rec = Superblock(**{**new.__dict__, "flags": new.flags | SB_FLAG_GROWING,
                        "grow_from": sb.total_blocks})
    dev.write(0, rec.image(0))
    dev.flush()
    _step(crash, "primary")
    return finish_grow(dev, rec, progress=progress, crash=crash)


def _valid_group_block(buf, bno: int, rg: int, k: int, sb: Superblock) -> bool:
    """Whether ``buf`` is block ``k`` of group ``rg`` as the geometry of ``sb`` wants
    it (header: its fields; bitmap: a valid one of the group)."""
    start, length = sb.rgrp_range(rg)
    if k == 0:
        try:
            hdr = RgrpHeader.decode(buf, bno)
        except CorruptBlock:
            return False
        return (hdr.index, hdr.length, hdr.bitmap_blocks) == (rg, length, sb.bitmap_blocks)
    return blockhdr.is_valid(buf, BlockType.BITMAP, bno) and \
        blockhdr.header(buf)[2] == rg & 0xFFFF


def finish_grow(dev, sb: Superblock, *, progress=None, crash: Crash | None = None,
                tolerate_damage: bool = False) -> Superblock:
    """Finish the grow that the superblock ``sb`` records (steps 3-7 of the module's
    checklist); idempotent: a power cut anywhere leaves a volume this finishes.
    Returns ``sb`` itself when no grow is in progress.

    Args:
        dev: the volume's device (an overlay under ``fsck -n``).
        sb: the primary superblock as on the device.
        progress, crash: as for ``grow_on_disk``.
        tolerate_damage: a damaged header of the old last group is left alone (fsck
            rebuilds it later) instead of raising.

    Returns:
        The superblock of the grown volume, as written.

    Raises:
        VolumeError: the device is smaller than the volume, or the old last group's
            header is damaged and ``tolerate_damage`` is not given.
    """
    if not sb.growing:
        return sb
    if dev.nblocks < sb.total_blocks:
        raise VolumeError(f"the superblock describes {sb.total_blocks} blocks (an "
                          f"interrupted grow) but the device has only {dev.nblocks}")
    old = sb.resized(sb.grow_from)
    done = sb.resized(sb.total_blocks)
    done.seq = sb.seq
    nb = 1 + sb.bitmap_blocks
    # 3. the new groups' blocks that are not right yet
    if progress is not None:
        progress.total = sb.rgrp_count - old.rgrp_count
        progress.update(0, "checking the new resource groups")
    for rg in range(old.rgrp_count, sb.rgrp_count):
        gstart, glen = sb.rgrp_range(rg)
        have = dev.read(gstart, nb)
        fresh = None
        for k in range(nb):
            if not _valid_group_block(have[k * BLOCK_SIZE:(k + 1) * BLOCK_SIZE],
                                      gstart + k, rg, k, sb):
                if fresh is None:
                    fresh = new_group_image(rg, gstart, glen, sb.bitmap_blocks)
                dev.write(gstart + k, fresh[k * BLOCK_SIZE:(k + 1) * BLOCK_SIZE])
        if progress is not None:
            progress.advance()
    dev.flush()
    _step(crash, "groups")
    # 4. the old last group
    last = old.rgrp_count - 1
    gstart, old_len = old.rgrp_range(last)
    _s, new_len = sb.rgrp_range(last)
    if new_len != old_len:
        _extend_group(dev, sb, last, gstart, old_len, new_len, tolerate_damage)
    _step(crash, "last-group")
    # 5. the old backup superblock, a block of a data area now
    ob = sb.grow_from - 1
    rg = sb.rgrp_of(ob)
    if rg >= 0 and ob >= sb.rgrp_range(rg)[0] + nb and \
            blockhdr.is_valid(dev.read(ob), BlockType.SUPERBLOCK, ob):
        dev.write(ob, bytes(BLOCK_SIZE))
    # 6. the backup at the new end, 7. the primary
    dev.write(done.backup_bno, done.image(done.backup_bno))
    dev.flush()
    _step(crash, "backup")
    dev.write(0, done.image(0))
    dev.flush()
    _step(crash, "done")
    log.debug("volume grown from %d to %d blocks (%d resource groups)", sb.grow_from,
             done.total_blocks, done.rgrp_count)
    return done


def _extend_group(dev, sb: Superblock, rg: int, start: int, old_len: int, new_len: int,
                  tolerate_damage: bool) -> None:
    """Step 4: group ``rg`` goes from ``old_len`` to ``new_len`` blocks (if its header
    does not say ``new_len`` already)."""
    try:
        hdr = RgrpHeader.decode(dev.read(start), start)
        if hdr.length not in (old_len, new_len) or hdr.index != rg:
            raise CorruptBlock(start, f"length {hdr.length}, index {hdr.index}: neither "
                                      f"the old geometry nor the new one")
    except CorruptBlock as e:
        if tolerate_damage:
            return
        raise VolumeError(f"cannot finish the grow: resource group {rg} header (block "
                          f"{start}) is damaged ({e.reason}); run 'clusterfs fsck'") from None
    if hdr.length == new_len:
        return
    wrote = False
    for j in range(sb.bitmap_blocks):
        lo = j * BLOCKS_PER_BITMAP
        a, b = max(old_len, lo) - lo, min(new_len, lo + BLOCKS_PER_BITMAP) - lo
        if b <= a:
            continue
        bno = start + 1 + j
        try:
            bm = Bitmap.decode(dev.read(bno), bno, rg, lo)
        except CorruptBlock:
            continue            # fsck rebuilds a damaged bitmap block
        if any(expand_bits(bytes(bm.bits), b)[a:b]):
            bm.set_run(a, b - a, FREE)
            dev.write(bno, bm.image())
            wrote = True
    if wrote:
        dev.flush()
    hdr.length = new_len
    hdr.free += new_len - old_len
    dev.write(start, hdr.image())
    dev.flush()


# -- the volume of a mount ---------------------------------------------------------------

def finish_interrupted_grow(vol) -> bool:
    """Finish a grow that a crash interrupted, on a volume opened for writing, and
    let the volume use the grown geometry.  Returns whether there was one.

    The single-node mount calls this after replaying the journals, before the file
    system starts.  A cluster member must call it only while it holds the cluster's
    freeze lock (nobody else uses the groups meanwhile), likewise after the journal
    replay of its slot and before its ``Filesystem`` exists.
    """
    if not vol.sb.growing:
        return False
    log.warning("finishing an interrupted grow (from %d to %d blocks)", vol.sb.grow_from,
                vol.sb.total_blocks)
    vol.adopt_geometry(finish_grow(vol.dev, vol.sb))
    return True


def grow_mounted(vol, new_total: int, *, progress=None, crash: Crash | None = None) -> Superblock:
    """Grow the volume of a single-node mount (its control channel calls this, between
    two requests): commit and checkpoint the journal, grow on disk, then let the
    mounted volume use the new groups.

    Args:
        vol: the mounted ``Volume`` (single-node: no cluster).
        new_total: the new ``total_blocks``; the device must have that many blocks
            (an image file is extended before).
        progress, crash: as for ``grow_on_disk``.

    Returns:
        The new superblock.

    Raises:
        UsageError, VolumeError: as ``grow_on_disk`` (nothing changed then).
    """
    if vol.cluster is not None:
        raise VolumeError("a cluster member grows the volume through the cluster's "
                          "freeze, not alone")
    if vol.op is not None:
        raise RuntimeError("grow_mounted inside a metadata operation")
    check_device(vol.dev, vol.sb, new_total)
    vol.checkpoint()
    new = grow_on_disk(vol.dev, vol.sb, new_total, progress=progress, crash=crash)
    vol.adopt_geometry(new)
    return new


def check_device(dev, sb: Superblock, new_total: int) -> None:
    """Before a grow of a mounted volume: read the device's size again (it was made
    bigger since the mount opened it) and check the request against it.

    Raises:
        UsageError, VolumeError: the request cannot be met (nothing changed).
    """
    refresh = getattr(dev, "refresh_size", None)
    if refresh is not None:
        refresh()
    plan_grow(sb, new_total)
    if dev.nblocks < new_total:
        raise VolumeError(f"the device has {dev.nblocks} blocks, fewer than the "
                          f"{new_total} asked for")
