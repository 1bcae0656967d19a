"""B+tree algorithms over ``format.TreeNode``: extent trees and hashed directories.

The root node lives inside the owning dinode's data area (``dinode.root``); every
other node is a metadata block.  Index keys are exact: ``keys[i]`` of an index node
equals the first key stored under child ``i``, so a floor search descends straight to
the one leaf that holds the answer.

The tree never touches the device or the allocator directly; it works through a
``TreeStore`` (``load``, ``modify``, ``alloc_node``, ``free_node``), which the volume
implements (with journaling and rollback) and tests implement in memory.
"""

from __future__ import annotations

from typing import Iterator, Protocol

from ..ondisk.format import MAX_DEPTH, NODE_CAPACITY, TreeNode

MERGE_THRESHOLD = NODE_CAPACITY // 4


class TreeStore(Protocol):
    def load(self, bno: int, kind: int) -> TreeNode: ...
    def modify(self, node: TreeNode) -> None: ...
    def alloc_node(self, kind: int, level: int, owner: int) -> TreeNode: ...
    def free_node(self, node: TreeNode) -> None: ...


class TreeCorrupt(Exception):
    """The tree's shape is impossible (depth, empty index node)."""


class BTree:
    """Operations on one tree, rooted at ``root`` (a TreeNode with ``is_root``)."""

    __slots__ = ("store", "root", "kind", "owner")

    def __init__(self, store: TreeStore, root: TreeNode):
        self.store = store
        self.root = root
        self.kind = root.kind
        self.owner = root.owner

    # -- navigation -----------------------------------------------------------

    def _child(self, node: TreeNode, i: int) -> TreeNode:
        child = self.store.load(node.vals[i], self.kind)
        if child.level != node.level - 1:
            raise TreeCorrupt(f"node {child.bno} has level {child.level} under level "
                              f"{node.level} node {node.bno}")
        return child

    def _path(self, key: int) -> list[tuple[TreeNode, int]]:
        """Root-to-leaf path for ``key``: (node, index taken) per index level, and
        (leaf, floor index) last (-1 when key precedes every key in the leaf)."""
        path = []
        node = self.root
        depth = 0
        while node.level > 0:
            if not node.keys:
                raise TreeCorrupt(f"empty index node {node.bno}")
            i = max(node.find(key), 0)
            path.append((node, i))
            node = self._child(node, i)
            depth += 1
            if depth > MAX_DEPTH:
                raise TreeCorrupt("tree too deep")
        path.append((node, node.find(key)))
        return path

    def floor(self, key: int):
        """(key, value) of the last record with key <= ``key``, or None."""
        leaf, i = self._path(key)[-1]
        if i < 0:
            return None
        return leaf.keys[i], leaf.vals[i]

    def get(self, key: int):
        rec = self.floor(key)
        if rec is None or rec[0] != key:
            return None
        return rec[1]

    def items_from(self, key: int = 0) -> Iterator[tuple[int, object]]:
        """Records with key >= ``key`` in order.  The tree must not change meanwhile."""
        path = self._path(key)
        leaf, i = path[-1]
        if i < 0 or leaf.keys[i] < key:
            i += 1
        stack = path[:-1]
        while True:
            while i < len(leaf.keys):
                yield leaf.keys[i], leaf.vals[i]
                i += 1
            # climb to the next subtree
            while stack:
                node, j = stack.pop()
                if j + 1 < len(node.keys):
                    stack.append((node, j + 1))
                    child = self._child(node, j + 1)
                    while child.level > 0:
                        stack.append((child, 0))
                        child = self._child(child, 0)
                    leaf, i = child, 0
                    break
            else:
                return

    def last(self):
        """The record with the largest key, or None."""
        node = self.root
        while node.level > 0:
            if not node.keys:
                raise TreeCorrupt(f"empty index node {node.bno}")
            node = self._child(node, len(node.keys) - 1)
        if not node.keys:
            return None
        return node.keys[-1], node.vals[-1]

    def nodes(self) -> Iterator[TreeNode]:
        """Every node block below the root (the root itself is not a block)."""
        stack = [self.root]
        while stack:
            node = stack.pop()
            if node is not self.root:
                yield node
            if node.level > 0:
                for i in range(len(node.keys)):
                    stack.append(self._child(node, i))

    def depth(self) -> int:
        return self.root.level + 1

    # -- modification ---------------------------------------------------------

    def insert(self, key: int, val) -> None:
        """Insert a record; ``key`` must not be present."""
        path = self._path(key)
        leaf, i = path[-1]
        if i >= 0 and leaf.keys[i] == key:
            raise KeyError(key)
        self.store.modify(leaf)
        leaf.insert_at(i + 1, key, val)
        if i + 1 == 0:
            self._fix_first_key(path, len(path) - 1)
        self._rebalance_up(path)

    def replace(self, key: int, new_key: int, val) -> None:
        """Replace the record at ``key`` (which must exist) by (new_key, val); the new
        key must keep the record's position (between its neighbours)."""
        path = self._path(key)
        leaf, i = path[-1]
        if i < 0 or leaf.keys[i] != key:
            raise KeyError(key)
        if i > 0 and leaf.keys[i - 1] >= new_key or \
                i + 1 < len(leaf.keys) and leaf.keys[i + 1] <= new_key:
            raise ValueError("replace would reorder the tree")
        self.store.modify(leaf)
        leaf.replace_at(i, new_key, val)
        if i == 0 and new_key != key:
            self._fix_first_key(path, len(path) - 1)
        if not leaf.fits(0):
            self._rebalance_up(path)

    def delete(self, key: int):
        """Delete the record at ``key`` (which must exist); return its value."""
        path = self._path(key)
        leaf, i = path[-1]
        if i < 0 or leaf.keys[i] != key:
            raise KeyError(key)
        val = leaf.vals[i]
        self.store.modify(leaf)
        leaf.delete_at(i)
        if i == 0 and leaf.keys:
            self._fix_first_key(path, len(path) - 1)
        self._shrink_up(path)
        return val

    # -- internals ------------------------------------------------------------

    def _fix_first_key(self, path, depth: int) -> None:
        """After node path[depth]'s first key changed, update separators above."""
        node = path[depth][0]
        first = node.keys[0]
        d = depth - 1
        while d >= 0:
            parent, j = path[d]
            if parent.keys[j] != first:
                self.store.modify(parent)
                parent.keys[j] = first
            if j != 0:
                break
            d -= 1

    def _split(self, node: TreeNode) -> TreeNode:
        """Move the upper half of ``node`` (by bytes) into a new right sibling."""
        half = node.nbytes // 2
        acc = 0
        cut = 0
        for cut, v in enumerate(node.vals):
            acc += node.rec_size(v)
            if acc > half:
                break
        cut = max(1, min(cut, len(node.keys) - 1))
        right = self.store.alloc_node(self.kind, node.level, self.owner)
        right.keys = node.keys[cut:]
        right.vals = node.vals[cut:]
        right.recount()
        del node.keys[cut:]
        del node.vals[cut:]
        node.recount()
        return right

    def _rebalance_up(self, path) -> None:
        """Split overfull nodes from the leaf upwards; grow the root if needed."""
        for d in range(len(path) - 1, -1, -1):
            node = path[d][0]
            if node.fits(0):
                return
            if node.is_root:
                self._grow_root()
                # the old root contents now live in one child block; split it if needed
                child = self._child(self.root, 0)
                if not child.fits(0):
                    self.store.modify(self.root)
                    right = self._split(child)
                    self.root.insert_at(1, right.keys[0], right.bno)
                return
            parent, j = path[d - 1]
            self.store.modify(node)
            self.store.modify(parent)
            right = self._split(node)
            parent.insert_at(j + 1, right.keys[0], right.bno)

    def _grow_root(self) -> None:
        """Move the root's records into a new block; the root becomes its parent."""
        root = self.root
        if root.level + 1 >= MAX_DEPTH:
            raise TreeCorrupt("tree would exceed the maximum depth")
        self.store.modify(root)
        child = self.store.alloc_node(self.kind, root.level, self.owner)
        child.keys, child.vals = root.keys, root.vals
        child.recount()
        root.level += 1
        root.keys = [child.keys[0] if child.keys else 0]
        root.vals = [child.bno]
        root.recount()

    def _shrink_up(self, path) -> None:
        """Free empty nodes, merge small neighbours, collapse a single-child root."""
        for d in range(len(path) - 1, 0, -1):
            node = path[d][0]
            parent, j = path[d - 1]
            if not node.keys:
                self.store.modify(parent)
                parent.delete_at(j)
                self.store.free_node(node)
                if j == 0 and parent.keys:
                    self._fix_first_key(path, d - 1)
                continue
            if node.nbytes < MERGE_THRESHOLD and len(parent.keys) > 1:
                # merge with the left neighbour (or the right one when leftmost)
                if j > 0:
                    left, right, rj = self._child(parent, j - 1), node, j
                else:
                    left, right, rj = node, self._child(parent, j + 1), j + 1
                if left.nbytes + right.nbytes <= NODE_CAPACITY:
                    self.store.modify(left)
                    self.store.modify(parent)
                    left.keys.extend(right.keys)
                    left.vals.extend(right.vals)
                    left.recount()
                    parent.delete_at(rj)
                    self.store.free_node(right)
                    continue
            break
        self._collapse_root()

    def _collapse_root(self) -> None:
        root = self.root
        while root.level > 0:
            if not root.keys:
                self.store.modify(root)
                root.level = 0
                root.keys, root.vals = [], []
                root.recount()
                return
            if len(root.keys) != 1:
                return
            child = self._child(root, 0)
            size = sum(child.rec_size(v) for v in child.vals)
            if size > root.capacity:
                return
            self.store.modify(root)
            root.level = child.level
            root.keys, root.vals = list(child.keys), list(child.vals)
            root.recount()
            self.store.free_node(child)

    def clear(self) -> list[TreeNode]:
        """Detach every node below the root (returned for freeing); empty the root."""
        nodes = list(self.nodes())
        self.store.modify(self.root)
        self.root.level = 0
        self.root.keys, self.root.vals = [], []
        self.root.recount()
        return nodes
