"""Orphans: inodes whose last name went while they were open (bitmap state UNLINKED).

Such an inode is freed by the last close.  When the node that had it open dies
first, the inode stays UNLINKED on disk: the single-node mount frees those of every
group when it mounts (``free_unlinked``), a cluster member after it recovered a dead
node (``cluster/recovery.py``, under the locks).  Both find them with
``unlinked_inodes``.
"""

from __future__ import annotations

import logging

from ..ondisk.format import BLOCKS_PER_BITMAP, DINODE, UNLINKED

log = logging.getLogger(__name__)


def unlinked_inodes(vol, rg: int) -> list[int]:
    """The inodes of resource group ``rg`` whose bitmap state is UNLINKED (read
    through the volume: in a cluster, under the group's lock)."""
    start, length = vol.sb.rgrp_range(rg)
    out = []
    for j in range(vol.sb.bitmap_blocks):
        bm = vol.bitmap(rg, j)
        base = j * BLOCKS_PER_BITMAP
        for i in range(max(0, min(BLOCKS_PER_BITMAP, length - base))):
            if bm.get(i) == UNLINKED:
                out.append(start + base + i)
    return out


def free_unlinked(vol, fs, groups=None) -> int:
    """Free every inode left UNLINKED in ``groups`` (default: all) that no handle of
    this mount has open (single-node mounts: no other node has anything open);
    returns how many."""
    freed = 0
    for rg in groups if groups is not None else range(vol.sb.rgrp_count):
        if not vol.rgrp(rg).unlinked:
            continue
        for ino in unlinked_inodes(vol, rg):
            if fs.in_use(ino):
                continue
            if vol.dinode(ino).nlink:
                # linked after all: the state was left behind; repair it
                fs._change(vol.alloc.set_state, ino, DINODE)
                continue
            fs.purge(ino)
            freed += 1
    if freed:
        log.info("freed %d inode(s) left unlinked by a crash", freed)
    return freed
