"""The entry cache's rules without a mount (docs/CLUSTER.md, "Coherence"): which
replies carry an entry timeout, when the kernel's epoch is raised, and that a mount
stops caching before the kernel's epoch could wrap.  The mounted behaviour is
``tests/cluster/test_entry_cache.py``."""

import errno
import stat

import trio

from clusterfs.cluster import coherence
from clusterfs.cluster.coherence import Coherence
from clusterfs.errors import FSError
from clusterfs.fuse.ops import Operations
from clusterfs.ondisk.dinode import Dinode

DIR, FILE, ROOT_INO = 2000, 3000, 1031


class _FS:
    root_ino = ROOT_INO

    def __init__(self):
        self.remembered = []

    def remember(self, di):
        self.remembered.append(di.bno)


class _Front:
    async def lookup(self, parent, name):
        if name == b"missing":
            raise FSError(errno.ENOENT, "no such entry")
        return Dinode(FILE, mode=stat.S_IFREG | 0o644)


def _ops(cacheable_dirs):
    fs = _FS()
    ops = Operations(fs, _Front(), attr_timeout=1.0, entry_timeout=1.0,
                     cacheable=lambda ino: True,
                     entries_cacheable=lambda parent: parent in cacheable_dirs)
    return fs, ops


def test_an_entry_is_cached_only_under_its_directorys_lock():
    fs, ops = _ops({DIR})

    async def go():
        held = await ops.lookup(DIR, b"f")
        other = await ops.lookup(DIR + 1, b"f")
        return held, other
    held, other = trio.run(go)
    assert (held.st_ino, held.entry_timeout) == (FILE, 1.0)
    assert (other.st_ino, other.entry_timeout) == (FILE, 0)
    assert fs.remembered == [FILE, FILE]          # both gave the kernel a reference
    # replies that no directory's lock covers (getattr, READDIRPLUS) carry none
    assert ops.attrs(Dinode(FILE, mode=stat.S_IFREG)).entry_timeout == 0


def test_a_missing_name_is_cached_only_under_its_directorys_lock():
    fs, ops = _ops({DIR})

    async def go():
        neg = await ops.lookup(DIR, b"missing")
        try:
            await ops.lookup(DIR + 1, b"missing")
        except Exception as e:      # pyfuse3.FUSEError
            return neg, e.errno
        return neg, None
    neg, err = trio.run(go)
    assert (neg.st_ino, neg.entry_timeout) == (0, 1.0)
    assert err == errno.ENOENT
    assert fs.remembered == []                  # no reference for a negative entry


def test_a_single_node_caches_found_names_only():
    fs = _FS()
    ops = Operations(fs, _Front())                  # no entries_cacheable: one node

    async def go():
        found = await ops.lookup(DIR, b"f")
        try:
            await ops.lookup(DIR, b"missing")
        except Exception as e:
            return found, e.errno
    found, err = trio.run(go)
    assert found.entry_timeout == 300.0
    assert err == errno.ENOENT
    assert ops.attrs(Dinode(FILE, mode=stat.S_IFREG)).entry_timeout == 300.0


class _Vol:
    def __init__(self, cached):
        self._cached = cached

    def cached(self, ino):
        return self._cached.get(ino)


def _coherence(cached):
    coh = Coherence.__new__(Coherence)
    coh.vol = _Vol(cached)
    coh.entry_epochs = True
    coh.entry_stats = {"lookups": 0, "epochs": 0}
    raised = []
    coh.forget_kernel_entries = lambda: raised.append(1)
    return coh, raised


def test_the_epoch_goes_up_for_directories_and_unknown_inodes():
    coh, raised = _coherence({DIR: Dinode(DIR, mode=stat.S_IFDIR | 0o755),
                              FILE: Dinode(FILE, mode=stat.S_IFREG | 0o644)})
    coh.forget_entries(FILE)
    assert raised == []                         # a file's lock covers no entries
    coh.forget_entries(DIR)
    coh.forget_entries(4000)                    # not cached: maybe a directory
    coh.forget_entries()                        # every lock (fencing)
    assert len(raised) == 3 and coh.entry_stats["epochs"] == 3
    coh.entry_epochs = False                    # not mounted with entrycache
    coh.forget_entries(DIR)
    assert len(raised) == 3


def test_no_more_cached_entries_before_the_kernels_epoch_wraps(monkeypatch):
    monkeypatch.setattr(coherence, "EPOCH_LIMIT", 5)
    coh, raised = _coherence({})
    for _ in range(4):
        coh.forget_entries()
    assert coh.entry_epochs
    coh.forget_entries()
    assert not coh.entry_epochs and len(raised) == 5
    coh.forget_entries()                        # from now on nothing is cached
    assert len(raised) == 5
