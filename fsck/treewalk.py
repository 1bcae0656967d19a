"""The tolerant walk of an inode's trees and xattr block (layer 3's scan).

Every node is read through ``salvage`` and checked for its owner, level, emptiness
and key range; what is wrong goes into the inode's record (``tree_issues``,
``tree_bad``) for layers 4 and 5 to report and repair, and the blocks of valid nodes
are claimed.  A node that cannot be used is *deferred*: its block is held
(``C_DEFER``) until layer 4 drops the pointer to it and frees it.
"""

from __future__ import annotations

import bisect

from clusterfs.errors import CorruptBlock
from clusterfs.ondisk.blockhdr import BlockType
from clusterfs.ondisk.format import (DF_DIRTREE, DF_EXTENTS, DIRENT, EXTENT, MAX_DEPTH,
                                     XattrBlock)

from . import salvage
from .claims import C_DEFER, META_CODES, claim_meta
from .records import Rec


def scan_trees(s, rec: Rec) -> None:
    """Walk the trees and read the xattr block of one inode."""
    di = rec.di
    if di.flags & DF_EXTENTS:
        walk_tree(s, rec, EXTENT)
    elif di.flags & DF_DIRTREE:
        walk_tree(s, rec, DIRENT)
    if di.xattr_block:
        _scan_xattr_block(s, rec)


def _defer(s, rec: Rec, bno: int) -> None:
    """A damaged block that ``rec`` points at: held until layer 4 frees it."""
    if not s.claims[bno]:
        s.claims[bno] = C_DEFER
    rec.deferred.append(bno)


def _scan_xattr_block(s, rec: Rec) -> None:
    rec.own_lists()
    di = rec.di
    bno = di.xattr_block
    why = None
    if not s.in_data(bno):
        why = f"points outside the data area (block {bno})"
    elif s.claims[bno] in META_CODES:
        why = f"points at block {bno}, which holds other metadata"
    else:
        buf = s.read(bno)
        try:
            if buf is None:
                raise CorruptBlock(bno, "unreadable")
            xb, notes = salvage.decode_simple(buf, bno, BlockType.XATTR,
                                              XattrBlock.decode)
        except CorruptBlock as e:
            why = f"block {bno} is damaged ({e.reason})"
            _defer(s, rec, bno)
        else:
            if xb.owner != di.bno:
                why = f"block {bno} belongs to inode {xb.owner}"
            else:
                if notes:
                    rec.tree_issues.append(("xattr-block",
                                            f"xattr block {bno} damaged ({', '.join(notes)})"))
                    rec.dirty = True
                claim_meta(s, bno)
                return
    rec.xattr_ok = False
    rec.tree_issues.append(("xattr-block", f"extended attribute block {why}"))


def walk_tree(s, rec: Rec, kind: int) -> None:
    """Collect the records of one inode's tree into ``rec.items``, in key order."""
    rec.own_lists()
    di = rec.di
    root = di.root
    items: list = []
    seen: set[int] = set()
    issues = rec.tree_issues
    what = "extent tree" if kind == EXTENT else "directory tree"
    if root.level >= MAX_DEPTH:
        issues.append(("tree", f"{what} root level {root.level} is impossible"))
        rec.tree_bad = True
        root.level, root.keys, root.vals = 0, [], []
        root.recount()
    if root.level > 0 and root.keys:
        # the root's level field against its first child's
        child = _peek_node(s, root.vals[0], kind, di.bno)
        if child is not None and child.level != root.level - 1 and \
                child.level + 1 < MAX_DEPTH:
            issues.append(("tree", f"{what} root level {root.level} disagrees with "
                                   f"its children (level {child.level})"))
            rec.tree_bad = True
            root.level = child.level + 1
    if root.level == 0:
        rec.items = list(zip(root.keys, root.vals))    # decode checked the order
        if rec.notes and any("tree root" in n for n in rec.notes):
            rec.tree_bad = True
        return
    walk_node(s, rec, root, kind, None, None, items, seen, what)
    # records must be in key order across nodes, each key once
    for a, b in zip(items, items[1:]):
        if a[0] >= b[0]:
            issues.append(("tree", f"{what} keys out of order across nodes"))
            rec.tree_bad = True
            items.sort(key=lambda kv: kv[0])
            uniq = []
            for kv in items:
                if uniq and uniq[-1][0] == kv[0]:
                    continue
                uniq.append(kv)
            items = uniq
            break
    rec.items = items
    if rec.notes and any("tree root" in n for n in rec.notes):
        rec.tree_bad = True


def _peek_node(s, bno: int, kind: int, owner: int):
    if not s.in_data(bno) or s.claims[bno] in META_CODES:
        return None
    buf = s.read(bno)
    if buf is None:
        return None
    try:
        node, _ = salvage.decode_node(buf, bno, kind)
    except CorruptBlock:
        return None
    return node if node.owner == owner else None


def walk_node(s, rec, node, kind, lo, hi, items, seen, what) -> None:
    """Add the records under ``node`` to ``items``; keys must lie in [lo, hi)."""
    issues = rec.tree_issues
    if node.level == 0:
        keys = node.keys            # in order (decoding checked): the ends suffice
        if keys and lo is not None and keys[0] < lo:
            k = keys[0]
        elif keys and hi is not None and keys[-1] >= hi:
            k = keys[bisect.bisect_left(keys, hi)]
        else:
            k = None
        if k is not None:
            issues.append(("tree", f"{what} node {node.bno}: key {k} outside the "
                                   f"range of its parent"))
            rec.tree_bad = True
        items.extend(zip(keys, node.vals))
        return
    n = len(node.keys)
    for i in range(n):
        k = node.keys[i]
        nhi = node.keys[i + 1] if i + 1 < n else hi
        child = _load_node(s, rec, node.vals[i], kind, node.level - 1, seen, what)
        if child is None:
            rec.tree_bad = True
            continue
        if child.keys[0] != k:
            issues.append(("tree", f"{what} index key {k} != first key {child.keys[0]} "
                                   f"of node {child.bno}"))
            rec.tree_bad = True
        walk_node(s, rec, child, kind, k if lo is None else max(k, lo), nhi, items,
                  seen, what)


def _load_node(s, rec, bno, kind, level, seen, what):
    issues = rec.tree_issues
    ino = rec.di.bno
    if bno in seen:
        issues.append(("tree", f"{what} points at node {bno} twice"))
        return None
    if not s.in_data(bno):
        issues.append(("tree", f"{what} points outside the data area (block {bno})"))
        return None
    if s.claims[bno] in META_CODES:
        issues.append(("tree", f"{what} points at block {bno}, which holds other "
                               f"metadata"))
        return None
    buf = s.read(bno)
    try:
        if buf is None:
            raise CorruptBlock(bno, "unreadable")
        node, notes = salvage.decode_node(buf, bno, kind)
    except CorruptBlock as e:
        issues.append(("tree", f"{what} node {bno} is unreadable ({e.reason})"))
        _defer(s, rec, bno)
        return None
    if node.owner != ino:
        if node.owner in s.inodes or node.owner in s.bad_inodes:
            issues.append(("tree", f"{what} points at node {bno} of inode {node.owner}"))
            return None
        issues.append(("tree", f"{what} node {bno} names owner {node.owner}"))
        node.owner = ino
        notes = notes + ["owner"]
    if node.level != level:
        issues.append(("tree", f"{what} node {bno} has level {node.level}, expected "
                               f"{level}"))
        _defer(s, rec, bno)
        return None
    if not node.keys:
        issues.append(("tree", f"{what} node {bno} is empty"))
        _defer(s, rec, bno)
        return None
    if notes:
        issues.append(("tree", f"{what} node {bno} is damaged ({', '.join(notes)})"))
        rec.tree_bad = True
    seen.add(bno)
    rec.nodes.append(bno)
    claim_meta(s, bno)
    return node
