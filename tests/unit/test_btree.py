"""The B+tree on its own, with an in-memory node store, against a dict model."""

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from clusterfs.fs.btree import BTree
from clusterfs.ondisk.format import BLOCK_SIZE, DIRENT, EXTENT, TreeNode


class MemStore:
    def __init__(self):
        self.nodes = {}
        self.next = 1000
        self.freed = []

    def load(self, bno, kind):
        return self.nodes[bno]

    def modify(self, node):
        pass

    def alloc_node(self, kind, level, owner):
        self.next += 1
        node = TreeNode(self.next, kind, level, owner)
        self.nodes[node.bno] = node
        return node

    def free_node(self, node):
        del self.nodes[node.bno]
        self.freed.append(node.bno)


def _check_shape(tree, store):
    """Index keys exact, levels consistent, nodes fit, every node reachable once."""
    seen = set()

    def walk(node, lo):
        assert node.fits(0), f"node {node.bno} overflows"
        assert node.keys == sorted(node.keys)
        if node.level == 0:
            return list(node.keys)
        out = []
        for k, child_bno in zip(node.keys, node.vals):
            assert child_bno not in seen
            seen.add(child_bno)
            child = store.nodes[child_bno]
            assert child.level == node.level - 1
            assert child.keys, "empty child"
            assert child.keys[0] == k, "separator not exact"
            out.extend(walk(child, k))
        return out

    keys = walk(tree.root, 0)
    assert seen == set(store.nodes), "leaked or dangling nodes"
    return keys


def _dirval(name):
    return (7, 8, name)


class DirTreeMachine(RuleBasedStateMachine):
    @initialize()
    def init(self):
        self.store = MemStore()
        self.tree = BTree(self.store, TreeNode(1, DIRENT, 0, 1, is_root=True))
        self.model = {}

    @rule(key=st.integers(0, 2**48), n=st.integers(1, 40))
    def insert(self, key, n):
        name = (b"n%d-" % key) * n
        name = name[:255]
        if key in self.model:
            return
        self.tree.insert(key, _dirval(name))
        self.model[key] = _dirval(name)

    @rule(data=st.data())
    def delete(self, data):
        if not self.model:
            return
        key = data.draw(st.sampled_from(sorted(self.model)))
        assert self.tree.delete(key) == self.model.pop(key)

    @rule(count=st.integers(50, 300), seed=st.integers(0, 1000))
    def bulk_insert(self, count, seed):
        rng = random.Random(seed)
        for _ in range(count):
            key = rng.randrange(2**48)
            if key not in self.model:
                v = _dirval(b"x" * rng.randrange(1, 60))
                self.tree.insert(key, v)
                self.model[key] = v

    @rule(frac=st.floats(0.1, 1.0), seed=st.integers(0, 1000))
    def bulk_delete(self, frac, seed):
        rng = random.Random(seed)
        for key in list(self.model):
            if rng.random() < frac:
                self.tree.delete(key)
                del self.model[key]

    @rule(key=st.integers(0, 2**48))
    def floor(self, key):
        below = [k for k in self.model if k <= key]
        want = (max(below), self.model[max(below)]) if below else None
        assert self.tree.floor(key) == want

    @rule(key=st.integers(0, 2**48))
    def iterate_from(self, key):
        want = [(k, self.model[k]) for k in sorted(self.model) if k >= key]
        assert list(self.tree.items_from(key)) == want

    @invariant()
    def shape(self):
        if hasattr(self, "tree"):
            assert _check_shape(self.tree, self.store) == sorted(self.model)


TestDirTree = DirTreeMachine.TestCase
TestDirTree.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


def test_extent_tree_large_and_back_to_inline():
    store = MemStore()
    tree = BTree(store, TreeNode(1, EXTENT, 0, 1, is_root=True))
    n = 20000
    for i in range(n):
        tree.insert(i * 10, (100000 + i * 10, 5, 0))
    assert tree.depth() >= 3
    assert tree.floor(12345) == (12340, (112340, 5, 0))
    assert tree.last() == ((n - 1) * 10, (100000 + (n - 1) * 10, 5, 0))
    _check_shape(tree, store)
    for i in range(n):
        tree.delete(i * 10)
    assert tree.root.level == 0 and not tree.root.keys
    assert not store.nodes


def test_replace_keeps_order_and_separators():
    store = MemStore()
    tree = BTree(store, TreeNode(1, EXTENT, 0, 1, is_root=True))
    for i in range(1000):
        tree.insert(i * 4, (i, 1, 0))
    tree.replace(400, 401, (9, 9, 0))
    assert tree.get(401) == (9, 9, 0) and tree.get(400) is None
    _check_shape(tree, store)
