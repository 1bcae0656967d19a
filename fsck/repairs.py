"""Repairs more than one layer makes: rebuild a tree, free an inode, make a directory.

Each writes in an order that a crash of fsck leaves repairable: new blocks are
allocated and written before the dinode points at them, and old ones are freed
after it no longer does.
"""

from __future__ import annotations

import errno
import time

from clusterfs.ondisk.format import (DF_DIRTREE, DF_EXTENTS, DINODE, DIRENT, DIRENT_REC,
                                     EXTENT, EXTENT_REC, INDEX_REC, NODE_CAPACITY, REFCOUNT,
                                     REFCOUNT_REC, ROOT_CAPACITY, USED, Dinode, TreeNode)

from . import allocator
from .claims import C_DEFER, C_DINODE, C_META
from .records import Rec
from .shared import release_data

# room left free in the nodes of a rebuilt tree (for the inserts that follow)
LEAF_SLACK = 64                 # bytes of each leaf
INDEX_SLACK = 4                 # records of each index node


def free_deferred(s, rec: Rec) -> None:
    """Free the damaged blocks ``rec`` pointed at (now that it no longer does)."""
    for bno in rec.deferred:
        if s.claims[bno] == C_DEFER:
            allocator.release(s, bno)
    rec.deferred = []
    allocator.flush(s)


def _leaf_rec_size(kind: int, val) -> int:
    if kind == EXTENT:
        return EXTENT_REC.size
    if kind == REFCOUNT:
        return REFCOUNT_REC.size
    return DIRENT_REC.size + len(val[2])


def rebuild_tree(s, rec: Rec, kind: int, items: list) -> bool:
    """Write a new tree holding ``items`` (sorted) for ``rec``; free the old nodes.

    New node blocks are allocated and written first, then the dinode, then the old
    nodes are freed: a crash in between leaves only leaked blocks.
    """
    di = rec.di
    ino = di.bno
    built = write_new_tree(s, kind, ino, items, ino, ino)
    if built is None:
        return False
    root, new_nodes = built
    old = list(rec.nodes)
    di.root = root
    rec.nodes = [n.bno for n in new_nodes]
    rec.tree_bad = False
    recount_blocks(rec)
    s.write_obj(di)
    rec.dirty = False
    for b in old:
        if s.claims[b] == C_META:
            allocator.release(s, b)
    allocator.flush(s)
    return True


def write_new_tree(s, kind: int, owner: int, items, goal: int, root_bno: int):
    """Build a tree of ``items`` (``build_tree``) and write its new node blocks,
    the first half of replacing a tree (the caller then points its owner at the
    root and frees the old nodes).  Returns (root, new nodes), or None when no
    blocks could be had (reported as not fixed)."""
    try:
        root, new_nodes = build_tree(s, kind, owner, items, goal, root_bno)
    except OSError as e:
        s.report.unfix(why=str(e))
        return None
    allocator.flush(s)
    for node in new_nodes:
        s.write_obj(node)
    return root, new_nodes


def build_tree(s, kind: int, owner: int, items: list, goal: int,
               root_bno: int) -> tuple[TreeNode, list[TreeNode]]:
    """The nodes of a new tree holding ``items`` (sorted): its root (numbered
    ``root_bno``, the block that holds it) and its other nodes, whose blocks are
    allocated near ``goal`` (in memory; the caller flushes the bitmaps, then writes
    the nodes).  Raises OSError (ENOSPC) having allocated nothing."""
    leaf_cap = NODE_CAPACITY - LEAF_SLACK
    idx_cap = (NODE_CAPACITY // INDEX_REC.size) - INDEX_SLACK
    total = sum(_leaf_rec_size(kind, v) for _k, v in items)
    new_nodes: list[TreeNode] = []
    try:
        if total <= ROOT_CAPACITY:
            root = TreeNode(root_bno, kind, 0, owner, [k for k, _ in items],
                            [v for _, v in items], is_root=True)
        else:
            if not s.alloc_ok:
                raise OSError(errno.ENOSPC, "allocation map not trusted")
            level = 0
            chunks, cur, size = [], [], 0
            for k, v in items:
                n = _leaf_rec_size(kind, v)
                if cur and size + n > leaf_cap:
                    chunks.append(cur)
                    cur, size = [], 0
                cur.append((k, v))
                size += n
            if cur:
                chunks.append(cur)
            nodes = []
            for chunk in chunks:
                (b, _n), = allocator.alloc(s, goal, 1, USED, C_META)
                node = TreeNode(b, kind, 0, owner, [k for k, _ in chunk],
                                [v for _, v in chunk])
                nodes.append(node)
                new_nodes.append(node)
            while len(nodes) * INDEX_REC.size > ROOT_CAPACITY:
                level += 1
                parents = []
                for i in range(0, len(nodes), idx_cap):
                    group = nodes[i:i + idx_cap]
                    (b, _n), = allocator.alloc(s, goal, 1, USED, C_META)
                    node = TreeNode(b, kind, level, owner, [c.keys[0] for c in group],
                                    [c.bno for c in group])
                    parents.append(node)
                    new_nodes.append(node)
                nodes = parents
            root = TreeNode(root_bno, kind, level + 1, owner, [c.keys[0] for c in nodes],
                            [c.bno for c in nodes], is_root=True)
    except OSError:
        for node in new_nodes:
            allocator.release(s, node.bno)
        raise
    return root, new_nodes


def recount_blocks(rec: Rec) -> int:
    """Set the dinode's block count to the blocks the record holds."""
    di = rec.di
    n = len(rec.nodes) + (1 if di.xattr_block else 0)
    if rec.ext is not None and di.flags & DF_EXTENTS:
        n += sum(e[2] for e in rec.ext)
    di.blocks = n
    return n


def free_inode(s, rec: Rec) -> None:
    """Free a dinode and everything it holds (the dinode first)."""
    di = rec.di
    allocator.release(s, di.bno)
    allocator.flush(s)
    if rec.ext:
        for _l, p, n, _f in rec.ext:
            if not s.dups or not any(p <= d < p + n for d in s.dups):
                release_data(s, p, n)
            else:
                for b in range(p, p + n):
                    if b not in s.dups:
                        release_data(s, b, 1)
    for b in rec.nodes:
        allocator.release(s, b)
    if di.xattr_block and rec.xattr_ok and s.claims[di.xattr_block] == C_META:
        allocator.release(s, di.xattr_block)
    for b in rec.deferred:
        if s.claims[b] == C_DEFER:
            allocator.release(s, b)
    allocator.flush(s)


def new_dinode(s, goal: int, mode: int, parent: int, at: int | None = None) -> Rec:
    """Create an empty directory dinode (allocated now, written by the caller)."""
    if at is not None:
        ino = at
        allocator.set_state(s, ino, DINODE)
        s.claims[ino] = C_DINODE
    else:
        (ino, _n), = allocator.alloc(s, goal, 1, DINODE, C_DINODE)
    rg = s.sb.rgrp_of(ino)
    hdr = s.hdrs[rg]
    gen = hdr.igeneration
    hdr.igeneration += 1
    s.dirty_hdr.add(rg)
    allocator.flush(s)
    t = time.time_ns()
    di = Dinode(ino, generation=gen, mode=mode, nlink=2, atime=t, mtime=t, ctime=t,
                btime=t, flags=DF_DIRTREE, parent=parent,
                root=TreeNode(ino, DIRENT, 0, ino, is_root=True))
    rec = Rec(di, [])
    rec.ext = None
    s.inodes[ino] = rec
    s.dir_inos.add(ino)
    return rec
