"""Reference counts of shared data blocks: one refcount tree per resource group.

A block mapped by k >= 2 extent records (a reflink clone) has count k in its group's
refcount tree; a block the tree does not name has count 1.  The tree maps runs of
blocks to their count (records ``pblk -> (length, count)``, count >= 2); its root
lives in the group header (``RgrpHeader.refroot``), its other nodes are
``REFCOUNT_NODE`` blocks.  Everything here changes the group header, so it runs
under the group's lock in EX (``vol.touch`` asks for it), like an allocation.

The run arithmetic (``adjust``) is a pure function of the records that overlap a
range: fsck applies the same rules to its own map of the counts.
"""

from __future__ import annotations

import errno

from ..errors import CorruptBlock, FSError
from ..ondisk.format import EXT_SHARED, MAX_REFCOUNT, TreeNode
from .btree import BTree


class RefcountStore:
    """``btree.TreeStore`` for the refcount tree of one group (journaled, rolled
    back with the operation like every tree)."""

    __slots__ = ("vol", "hdr")

    def __init__(self, vol, hdr):
        self.vol = vol
        self.hdr = hdr

    def load(self, bno: int, kind: int) -> TreeNode:
        node = self.vol.tree_node(bno, kind)
        if node.owner != self.hdr.index:
            raise CorruptBlock(bno, f"refcount node of group {node.owner} found in group "
                                    f"{self.hdr.index}")
        return node

    def modify(self, node: TreeNode) -> None:
        self.vol.touch(self.hdr if node.is_root else node)

    def alloc_node(self, kind: int, level: int, owner: int) -> TreeNode:
        # in the group itself when it has room (its lock, held EX, covers both)
        bno = self.vol.alloc.alloc_meta(self.hdr.start)
        node = TreeNode(bno, kind, level, owner)
        self.vol.created(node)
        return node

    def free_node(self, node: TreeNode) -> None:
        self.vol.free_meta(node)


def tree(vol, rg: int) -> BTree:
    """The refcount tree of group ``rg`` (its header read under the group's lock)."""
    hdr = vol.rgrp(rg)
    return BTree(RefcountStore(vol, hdr), hdr.refroot)


def _group_of(vol, pblk: int, n: int) -> int:
    rg = vol.sb.rgrp_of(pblk)
    if rg < 0 or vol.sb.rgrp_of(pblk + n - 1) != rg:
        raise FSError(errno.EIO, f"blocks {pblk}+{n} are not inside one resource group")
    return rg


def _records(t: BTree, pblk: int, n: int) -> list[tuple[int, int, int]]:
    """The records (start, length, count) overlapping [pblk, pblk+n), in order."""
    out = []
    end = pblk + n
    fl = t.floor(pblk)
    if fl is not None and fl[0] < pblk and fl[0] + fl[1][0] > pblk:
        out.append((fl[0], fl[1][0], fl[1][1]))
    for k, (ln, c) in t.items_from(pblk):
        if k >= end:
            break
        out.append((k, ln, c))
    return out


def counts(vol, pblk: int, n: int) -> list[tuple[int, int, int]]:
    """The reference counts of blocks [pblk, pblk+n) (one group's) as runs
    (start, length, count) covering the range in order; blocks the tree does not
    name count 1."""
    t = tree(vol, _group_of(vol, pblk, n))
    return fill_gaps(_records(t, pblk, n), pblk, n)


def any_shared(vol, pblk: int, n: int) -> bool:
    """Whether a block of [pblk, pblk+n) has a count of 2 or more."""
    t = tree(vol, _group_of(vol, pblk, n))
    fl = t.floor(pblk + n - 1)
    return fl is not None and fl[0] + fl[1][0] > pblk


def fill_gaps(recs, pblk: int, n: int) -> list[tuple[int, int, int]]:
    """``recs`` (start, length, count), sorted and disjoint, clipped to [pblk,
    pblk+n), with the blocks between them as runs of count 1."""
    out = []
    pos, end = pblk, pblk + n
    for s, ln, c in recs:
        a, b = max(s, pos), min(s + ln, end)
        if a >= b:
            continue
        if a > pos:
            out.append((pos, a - pos, 1))
        out.append((a, b - a, c))
        pos = b
    if pos < end:
        out.append((pos, end - pos, 1))
    return out


def adjust(recs, pblk: int, n: int, delta: int):
    """The run arithmetic of a count change: ``recs`` are the records (start, length,
    count) that overlap [pblk, pblk+n) or touch it (the neighbours, for merging),
    sorted and disjoint.  Adds ``delta`` to the count of every block of the range.

    Returns:
        (records, zeroed): the records that replace ``recs`` (counts >= 2, adjacent
        equal counts merged), and the runs (start, length) of the range whose count
        went to 0 (their last reference went: the caller frees them).

    Raises:
        FSError: EMLINK when a count would pass ``MAX_REFCOUNT``; EIO when one would
            go below 0 (the tree and the extents disagree: damage for fsck).
    """
    end = pblk + n
    pieces: list[list[int]] = []        # [start, length, count], in order
    lo = min([pblk] + [s for s, _l, _c in recs])
    hi = max([end] + [s + ln for s, ln, _c in recs])
    # every block of [lo, hi) with its count after the change
    inside = fill_gaps(recs, lo, hi - lo)
    zeroed: list[tuple[int, int]] = []
    for s, ln, c in inside:
        for a, b, in_range in ((s, min(s + ln, pblk), False),
                               (max(s, pblk), min(s + ln, end), True),
                               (max(s, end), s + ln, False)):
            if a >= b:
                continue
            cnt = c
            if in_range:
                cnt = c + delta
                if cnt < 0:
                    raise FSError(errno.EIO, f"reference count of blocks {a}+{b - a} "
                                             f"would go below zero")
                if cnt > MAX_REFCOUNT:
                    raise FSError(errno.EMLINK, "too many references to one block")
                if cnt == 0:
                    zeroed.append((a, b - a))
            if pieces and pieces[-1][2] == cnt and pieces[-1][0] + pieces[-1][1] == a:
                pieces[-1][1] += b - a
            else:
                pieces.append([a, b - a, cnt])
    out = [(s, ln, c) for s, ln, c in pieces if c >= 2]
    return out, _merge_zeroed(zeroed)


def _merge_zeroed(runs):
    out: list[tuple[int, int]] = []
    for s, n in runs:
        if out and out[-1][0] + out[-1][1] == s:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((s, n))
    return out


def change(vol, pblk: int, n: int, delta: int) -> list[tuple[int, int]]:
    """Add ``delta`` (+1 or -1) to the count of blocks [pblk, pblk+n) (inside one
    group).  Returns the runs whose count went to 0: no reference is left to them,
    the caller frees them."""
    rg = _group_of(vol, pblk, n)
    t = tree(vol, rg)
    recs = _records(t, pblk, n)
    # the neighbours that touch the range, so that equal counts merge
    first = recs[0][0] if recs else pblk
    if first > 0:
        left = t.floor(first - 1)
        if left is not None and left[0] + left[1][0] == min(first, pblk):
            recs.insert(0, (left[0], left[1][0], left[1][1]))
    last_end = max(pblk + n, recs[-1][0] + recs[-1][1] if recs else 0)
    right = t.get(last_end)
    if right is not None:
        recs.append((last_end, right[0], right[1]))
    new, zeroed = adjust(recs, pblk, n, delta)
    old_keys = [s for s, _l, _c in recs]
    new_map = {s: (ln, c) for s, ln, c in new}
    for k in old_keys:
        if k in new_map:
            if t.get(k) != new_map[k]:
                t.replace(k, k, new_map[k])
            del new_map[k]
        else:
            t.delete(k)
    for k, v in sorted(new_map.items()):
        t.insert(k, v)
    return zeroed


def release(vol, pblk: int, n: int, flags: int) -> int:
    """Drop one reference to data blocks [pblk, pblk+n) that an extent with
    ``flags`` mapped: a block is freed when that was its last reference (always
    for an extent without ``EXT_SHARED``).  Returns the blocks freed."""
    if not flags & EXT_SHARED:
        vol.alloc.free(pblk, n, data=True)
        return n
    freed = 0
    while n > 0:
        # an extent lies in one group; split anyway should a caller pass more
        rg = vol.sb.rgrp_of(pblk)
        start, length = vol.sb.rgrp_range(rg)
        take = min(n, start + length - pblk)
        for s, ln in change(vol, pblk, take, -1):
            vol.alloc.free(s, ln, data=True)
            freed += ln
        pblk += take
        n -= take
    return freed


def share(vol, pblk: int, n: int) -> None:
    """Add one reference to data blocks [pblk, pblk+n) (a clone maps them once
    more)."""
    while n > 0:
        rg = vol.sb.rgrp_of(pblk)
        start, length = vol.sb.rgrp_range(rg)
        take = min(n, start + length - pblk)
        change(vol, pblk, take, +1)
        pblk += take
        n -= take

