"""The page cache and shared writable mappings on cluster mounts (issue 15, item 6).

Files are cached by each node's kernel while the node holds the file's lock and
dropped when it gives the lock up (``clusterfs.cluster.pages``).  Bytes stored
through a shared mapping on node A are read by node B after A's ``msync`` or
``munmap``; B's writes reach A's mapping.  Two nodes share one volume for the
module; each test works in its own directory.
"""

from __future__ import annotations

import errno
import itertools
import mmap
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading

import pytest

from clusterfs import control
from tests.cluster.cluster_util import (dir_for_test, fails_with_eio, mounted_cluster,
                                        running_cluster, wait_for)
from tests.cluster.test_freeze import cli

PAGE = mmap.PAGESIZE


@pytest.fixture(scope="module")
def nodes():
    with mounted_cluster("a", "b", fast=False) as c:
        yield c


@pytest.fixture
def on(nodes, request):
    """``on(node, name)``: the path of ``name`` in this test's directory on a node."""
    d = dir_for_test(request)
    os.mkdir(nodes.nodes["a"].p(d))

    def path(node: str, name: str = "") -> str:
        return nodes.nodes[node].p(d, name) if name else nodes.nodes[node].p(d)
    return path


def multiwriter(path: str) -> None:
    """Let both nodes open ``path`` for writing at once (the cluster open mode)."""
    os.setxattr(path, "user.clusterfs.multiwriter", b"1")


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_shared_writable_mmap_is_allowed(on):
    """The mapping a cluster mount refused with ENODEV (files were direct_io)."""
    with open(on("a", "f"), "w+b") as f:
        f.truncate(PAGE)
        m = mmap.mmap(f.fileno(), PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        m[:5] = b"hello"
        m.flush()
        m.close()
    assert read(on("b", "f"))[:5] == b"hello"


def test_msync_then_read_on_other_node(on):
    with open(on("a", "f"), "w+b") as f:
        f.truncate(4 * PAGE)
        m = mmap.mmap(f.fileno(), 4 * PAGE)
        for i in range(10):
            m[i * 1000:i * 1000 + 6] = b"A%05d" % i
            m.flush()                    # msync(MS_SYNC)
            got = read(on("b", "f"))
            assert got[i * 1000:i * 1000 + 6] == b"A%05d" % i, i
        m.close()


def test_munmap_then_read_on_other_node(on):
    """Dirty pages of a mapping that is unmapped (no msync) and closed."""
    with open(on("a", "f"), "w+b") as f:
        f.truncate(3 * PAGE)
        m = mmap.mmap(f.fileno(), 3 * PAGE)
        m[PAGE + 7:PAGE + 12] = b"mmapd"
        m.close()
    assert read(on("b", "f"))[PAGE + 7:PAGE + 12] == b"mmapd"


def test_other_nodes_write_reaches_mapping(on):
    """A mapping on A (kept open) sees each write B makes, as soon as B's write
    returned, and A's stores through it are seen by B in turn."""
    with open(on("a", "f"), "w+b") as f:
        f.truncate(8 * PAGE)
    multiwriter(on("a", "f"))
    fa = open(on("a", "f"), "r+b")
    m = mmap.mmap(fa.fileno(), 8 * PAGE)
    try:
        fb = os.open(on("b", "f"), os.O_RDWR)
        try:
            for i in range(20):
                off = (i * 3 * PAGE // 2 + 100) % (7 * PAGE)
                data = b"B-%04d" % i
                os.pwrite(fb, data, off)
                assert m[off:off + len(data)] == data, (i, off)
                m[off:off + 2] = b"A!"
                m.flush()
                assert os.pread(fb, len(data), off) == b"A!" + data[2:], (i, off)
        finally:
            os.close(fb)
    finally:
        m.close()
        fa.close()


def test_page_cache_serves_rereads(on, nodes):
    """A second read of a file the node holds is answered by the kernel's cache:
    no READ reaches the mount (its read count is unchanged)."""
    data = os.urandom(1 << 20)
    with open(on("a", "f"), "wb") as f:
        f.write(data)
    assert read(on("b", "f")) == data
    before = _reads(nodes, "b")
    for _ in range(3):
        assert read(on("b", "f")) == data
    assert _reads(nodes, "b") == before
    # a change on A reaches B's next read all the same
    with open(on("a", "f"), "r+b") as f:
        f.seek(12345)
        f.write(b"changed")
    got = read(on("b", "f"))
    assert got[12345:12352] == b"changed" and got[:12345] == data[:12345]


def test_write_only_open_reaches_cached_readers_on_the_same_node(on, nodes):
    """A write-only open is served with direct I/O (one request per write, no
    page-cache copy); the pages another descriptor on the same node cached of the
    written range go, so its next read has the new bytes."""
    data = os.urandom(256 * 1024)
    with open(on("a", "f"), "wb") as f:
        f.write(data)
    fr = os.open(on("a", "f"), os.O_RDONLY)
    fw = os.open(on("a", "f"), os.O_WRONLY)
    try:
        assert os.pread(fr, len(data), 0) == data
        before = _reads(nodes, "a")
        assert os.pread(fr, len(data), 0) == data      # cached
        assert _reads(nodes, "a") == before
        for off in (0, 5000, 100_000):
            os.pwrite(fw, b"W-%06d" % off, off)
            assert os.pread(fr, 8, off) == b"W-%06d" % off
    finally:
        os.close(fw)
        os.close(fr)


def test_read_of_a_file_open_for_writing_goes_on_while_frozen(on, nodes):
    """A file open for writing here has its inode lock taken EX even to read (the
    page cache's rule), yet a read changes nothing: it goes on while the volume
    is frozen, as every read does."""
    path = on("a", "f")
    with open(path, "wb") as f:
        f.write(b"x" * 100_000)
    fw = os.open(path, os.O_RDWR)
    try:
        cli("freeze", nodes.nodes["a"].path, "--timeout", "60")
        try:
            # (the kernel's clean pages go, so that the read reaches the mount)
            os.posix_fadvise(fw, 0, 0, os.POSIX_FADV_DONTNEED)
            got = []
            t = threading.Thread(target=lambda: got.append(os.pread(fw, 10, 50_000)),
                                 daemon=True)
            t.start()
            t.join(15)
            assert got == [b"x" * 10], "the read waited for the thaw"
        finally:
            cli("thaw", nodes.nodes["a"].path)
    finally:
        os.close(fw)


def _reads(nodes, name: str) -> int:
    """READ requests that reached node ``name``'s mount (its control channel)."""
    info = control.find(nodes.nodes[name].path)
    return control.call(info, {"op": "status"})["pages"]["reads"]


# -- against a model -----------------------------------------------------------------------

NPAGES = 6


class Side:
    """One node's view of the file: a descriptor and, at times, a shared mapping."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDWR)
        self.map: mmap.mmap | None = None

    def mapping(self) -> mmap.mmap:
        if self.map is None:
            self.map = mmap.mmap(self.fd, NPAGES * PAGE)
        return self.map

    def close(self):
        if self.map is not None:
            self.map.close()
            self.map = None
        os.close(self.fd)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_mmap_and_write_against_model(on, seed):
    """Random steps on random nodes: stores through a mapping (then msync or
    munmap), write(), reads through a mapping and read(), truncation under a
    mapping (down, then back up); every read matches the model."""
    rnd = random.Random(seed)
    size = NPAGES * PAGE
    model = bytearray(size)
    with open(on("a", "f"), "wb") as f:
        f.truncate(size)
    multiwriter(on("a", "f"))
    sides = {n: Side(on(n, "f")) for n in ("a", "b")}
    try:
        for step in range(120):
            n = rnd.choice("ab")
            s = sides[n]
            op = rnd.choice(["store_sync", "store_unmap", "write", "read_map", "read",
                             "truncate"])
            off = rnd.randrange(size - 64)
            ln = rnd.randrange(1, 64)
            data = bytes(rnd.randrange(256) for _ in range(ln))
            if op == "store_sync":
                m = s.mapping()
                m[off:off + ln] = data
                m.flush()
                model[off:off + ln] = data
            elif op == "store_unmap":
                m = s.mapping()
                m[off:off + ln] = data
                m.close()
                s.map = None
                model[off:off + ln] = data
            elif op == "write":
                os.pwrite(s.fd, data, off)
                model[off:off + ln] = data
            elif op == "read_map":
                got = s.mapping()[off:off + ln]
                assert got == model[off:off + ln], (step, n, op, off, ln)
            elif op == "read":
                got = os.pread(s.fd, ln, off)
                assert got == model[off:off + ln], (step, n, op, off, ln)
            else:
                # shrink and grow back: what was past the cut reads as zeros,
                # through the other node's mapping too (no access in between)
                if s.map is not None:
                    s.map.flush()
                cut = rnd.randrange(size)
                os.ftruncate(s.fd, cut)
                os.ftruncate(s.fd, size)
                model[cut:] = bytes(size - cut)
        for n, s in sides.items():
            assert bytes(s.mapping()[:]) == bytes(model), n
            assert os.pread(s.fd, size, 0) == bytes(model), n
    finally:
        for s in sides.values():
            s.close()


# -- SQLite in WAL mode ----------------------------------------------------------------------

SQL_WRITER = textwrap.dedent("""
    import sqlite3, sys
    db, node, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    c = sqlite3.connect(db, timeout=30)
    assert c.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
    c.execute("CREATE TABLE IF NOT EXISTS t (node TEXT, i INTEGER, pad BLOB)")
    for i in range(rounds):
        with c:
            c.execute("INSERT INTO t VALUES (?, ?, randomblob(500))", (node, i))
    print(c.execute("SELECT count(*) FROM t").fetchone()[0])
    c.close()
""")


def test_sqlite_wal_in_turn_on_two_nodes(on):
    """SQLite in WAL mode (its -shm file is a shared writable mapping) written in
    turn from both nodes; integrity_check ok on each, every row there."""
    total = 0
    for turn in range(6):
        node = "ab"[turn % 2]
        out = subprocess.run([sys.executable, "-c", SQL_WRITER, on(node, "db"), node, "50"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        total += 50
        assert int(out.stdout) == total
    for node in "ab":
        c = sqlite3.connect(on(node, "db"))
        try:
            assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert c.execute("SELECT count(*) FROM t").fetchone()[0] == total
            assert c.execute("SELECT count(*) FROM t WHERE node='a'").fetchone()[0] == 150
        finally:
            c.close()


# -- a node that fences itself ------------------------------------------------------------

READER = textwrap.dedent("""
    import os, sys
    fd = os.open(sys.argv[1], os.O_RDONLY)
    for line in sys.stdin:
        try:
            print(os.pread(fd, 6, 0).decode(), flush=True)
        except OSError as e:
            print(f"errno {e.errno}", flush=True)
""")


def test_fenced_node_reads_nothing_it_had_cached(topdir):
    """b caches a file's pages, is paused past its lease, recovered, and the file
    changes on a; woken, b fences itself, and a read through a descriptor kept open
    on b fails with EIO instead of answering the old bytes from the page cache.
    (The descriptor lives in a reader process of its own: a descriptor of the test
    process on the paused mount would hang each subprocess it starts, whose child
    closes it, FUSE FLUSH, before its exec.)"""
    with running_cluster(topdir, crashes=True) as c:
        a = c.mount("a")
        b = c.mount("b")
        with open(a.p("f"), "wb") as f:
            f.write(b"old" * 2000)
        reader = subprocess.Popen([sys.executable, "-c", READER, b.p("f")],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

        def read_on_b() -> str:
            reader.stdin.write("read\n")
            reader.stdin.flush()
            return reader.stdout.readline().strip()
        try:
            assert read_on_b() == "oldold"
            os.stat(b.p("f"))       # the kernel caches the attributes too (lock held)
            assert read_on_b() == "oldold"
            slot = c.slot_of("b")
            paused = [b.proc.pid, c.candidate_pid("b")]
            for pid in paused:
                os.kill(pid, signal.SIGSTOP)
            try:
                c.wait_recovered("b", slot)
                with open(a.p("f"), "r+b") as f:
                    f.write(b"new")
            finally:
                for pid in paused:
                    os.kill(pid, signal.SIGCONT)
            probes = itertools.count()
            wait_for(lambda: fails_with_eio(b.p(f"probe-{next(probes)}")), 30,
                     "b to fence itself")
            got = wait_for(lambda: (r := read_on_b()) != "oldold" and r, 10,
                           "b's read of what it had cached to stop answering it")
            assert got == f"errno {errno.EIO}", got
        finally:
            reader.stdin.close()
            reader.wait(timeout=30)
        c.unmount("b", check_log=False)
        assert read(a.p("f"))[:6] == b"newold"
