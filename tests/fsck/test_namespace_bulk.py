"""The namespace layer's whole-directory checks against the record-by-record rule.

``namespace.entries_plain`` passes a directory over when every record is one the
record-by-record check of ``check_dir_entries`` has nothing to say about.  Here
directories with random damage to their records (targets, types, keys, names) are
given to both: the bulk check must never pass a directory that the rule would stop
at, and must pass every one the rule passes whole.  Likewise the tree walk, which
checks only the ends of a leaf's (ordered) keys against its parent's range.
"""

from __future__ import annotations

import stat as S

from hypothesis import given, settings
from hypothesis import strategies as st

from clusterfs.ondisk.format import (DF_DIRTREE, DF_EXTENTS, HASH_SHIFT, NAME_MAX, Dinode,
                                     dtype_of, name_hash)
from fsck.namespace import entries_plain
from fsck.records import Rec
from fsck.report import Report
from fsck.state import State
from fsck.treewalk import walk_node

ROOT, DIR = 100, 101
FILES = list(range(200, 216))
MODES = {ROOT: S.S_IFDIR | 0o755, DIR: S.S_IFDIR | 0o755,
         **{ino: (S.S_IFLNK if ino % 5 == 0 else S.S_IFREG) | 0o644 for ino in FILES}}


class _SB:
    root_ino = ROOT


def checker() -> State:
    f = State(path="", mode="n", report=Report("n", quiet=True))
    f.sb = _SB()
    for ino, mode in MODES.items():
        flags = DF_DIRTREE if S.S_ISDIR(mode) else DF_EXTENTS
        f.inodes[ino] = Rec(Dinode(ino, mode=mode, nlink=1, flags=flags), ())
    return f


def rule(f: State, ino: int, items) -> bool:
    """The common-case test of ``check_dir_entries``, one record at a time."""
    names = set()
    for key, (child, dtype, name) in items:
        target = f.inodes.get(child)
        if not (target is not None and key >> HASH_SHIFT == name_hash(name) and
                child != f.sb.root_ino and child != ino and
                dtype == (target.di.mode >> 12) & 0xF and name not in names and
                b"/" not in name and b"\0" not in name and len(name) <= NAME_MAX and
                name != b"." and name != b".."):
            return False
        names.add(name)
    return True


BAD_NAMES = {"dot": b".", "dotdot": b"..", "slash": b"a/b", "nul": b"x\0y",
             "too-long": b"n" * (NAME_MAX + 1), "longest": b"n" * NAME_MAX}
DEFECTS = ["target-missing", "target-root", "target-self", "dtype", "key", "dup-name",
           *BAD_NAMES]


def _record(i: int, child: int, name: bytes, dtype: int | None = None):
    key = (name_hash(name) << HASH_SHIFT) | i
    return key, (child, dtype_of(MODES[child]) if dtype is None else dtype, name)


@st.composite
def directory(draw):
    """A clean directory, then none, one or two defects of the kinds in DEFECTS."""
    n = draw(st.integers(1, 12))
    children = draw(st.lists(st.sampled_from(FILES), min_size=n, max_size=n))
    recs = [list(_record(i, c, b"f%d" % i)) for i, c in enumerate(children)]
    for defect in draw(st.lists(st.sampled_from(DEFECTS), max_size=2)):
        i = draw(st.integers(0, n - 1))
        key, (child, dtype, name) = recs[i]
        if defect == "target-missing":
            child = draw(st.sampled_from([999, 0]))
        elif defect == "target-root":
            child = ROOT
        elif defect == "target-self":
            child = DIR
        elif defect == "dtype":
            dtype = draw(st.sampled_from([d for d in (0, 1, 2, 4, 6, 8, 10, 12)
                                          if d != dtype]))
        elif defect == "key":
            key ^= 1 << draw(st.integers(HASH_SHIFT, HASH_SHIFT + 31))
        elif defect == "dup-name":
            name = recs[(i + 1) % n][1][2]
            key = (name_hash(name) << HASH_SHIFT) | (n + i)
        else:                               # a name (the longest one is legal)
            name = BAD_NAMES[defect]
            key = (name_hash(name) << HASH_SHIFT) | i
        recs[i] = [key, (child, dtype, name)]
    items = sorted({r[0]: (r[0], r[1]) for r in recs}.values())
    return items


@settings(max_examples=600, deadline=None)
@given(items=directory())
def test_bulk_check_agrees_with_the_record_rule(items):
    f = checker()
    assert entries_plain(f, DIR, items) == rule(f, DIR, items)


def test_a_clean_directory_is_passed_whole():
    f = checker()
    items = sorted(((name_hash(b"f%d" % c) << HASH_SHIFT, (c, dtype_of(MODES[c]), b"f%d" % c))
                    for c in FILES))
    assert entries_plain(f, DIR, items)
    assert entries_plain(f, DIR, [])


def _first_out_of_range(keys, lo, hi):
    """The rule: the first key (in order) below ``lo`` or at/above ``hi``."""
    for k in keys:
        if (lo is not None and k < lo) or (hi is not None and k >= hi):
            return k
    return None


@settings(max_examples=300, deadline=None)
@given(keys=st.lists(st.integers(0, 60), unique=True).map(sorted),
       lo=st.one_of(st.none(), st.integers(0, 60)),
       hi=st.one_of(st.none(), st.integers(0, 60)))
def test_leaf_keys_against_the_parent_range(keys, lo, hi):
    """A leaf's keys are in order, so the walk looks at its ends only: it must name
    the same key as a look at every key would."""
    from clusterfs.ondisk.format import TreeNode
    f = checker()
    rec = Rec(f.inodes[DIR].di, ()).own_lists()
    leaf = TreeNode(500, 2, 0, DIR, list(keys), [(200, 8, b"f%d" % k) for k in keys])
    items: list = []
    walk_node(f, rec, leaf, 2, lo, hi, items, set(), "directory tree")
    want = _first_out_of_range(keys, lo, hi)
    if want is None:
        assert rec.tree_issues == [] and not rec.tree_bad
    else:
        assert rec.tree_issues == [("tree", f"directory tree node 500: key {want} "
                                            f"outside the range of its parent")]
        assert rec.tree_bad
    assert [k for k, _v in items] == keys
