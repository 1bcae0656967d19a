"""Cluster-wide fcntl, OFD and flock locks (clusterfs/cluster/filelocks.py, the lock
manager's plock table) through real mounts: the same lock program gives the same
transcript on ext4, on one clusterfs node and across two nodes; a killed node's
locks are released only after its recovery; they survive a master failover.

Files written from two nodes at once are marked multi-writer (the cluster open mode
otherwise refuses a second node's write-open with EBUSY, docs/CLUSTER.md)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from tests.cluster.cluster_util import running_cluster, wait_for
from tests.cluster.lockprog import Actor, Run, run_scenario

MULTI = "user.clusterfs.multiwriter"


def shared_file(path: str) -> None:
    """Create ``path`` marked multi-writer (every node may open it for writing)."""
    with open(path, "wb"):
        pass
    os.setxattr(path, MULTI, b"1")

def test_same_answers_as_ext4_on_one_and_two_nodes(topdir):
    # /tmp is ext4 here; the reference transcript comes from the kernel's own locks
    ref_dir = tempfile.mkdtemp(prefix="cfs-lockprog-")
    try:
        reference = run_scenario({"a": ref_dir, "b": ref_dir, "c": ref_dir})
    finally:
        for name in os.listdir(ref_dir):
            os.unlink(os.path.join(ref_dir, name))
        os.rmdir(ref_dir)
    assert any("EDEADLOCK" in line for line in reference)   # the scenario is not idle
    with running_cluster(topdir) as c:
        a = c.mount("n1")
        b = c.mount("n2")
        os.mkdir(a.p("one"))
        os.mkdir(a.p("two"))
        shared_file(a.p("two", "data"))
        one = run_scenario({"a": a.p("one"), "b": a.p("one"), "c": a.p("one")})
        assert one == reference
        two = run_scenario({"a": a.p("two"), "b": b.p("two"), "c": b.p("two")})
        assert two == reference


def test_lock_is_seen_by_the_other_node_and_goes_with_close(topdir):
    with running_cluster(topdir) as c:
        a = c.mount("n1")
        b = c.mount("n2")
        shared_file(a.p("img"))
        r = Run({"a": a.path, "b": b.path})
        try:
            r.do("a", "open", fd="f", file="img")
            r.do("b", "open", fd="f", file="img")
            assert r.do("a", "ofd_setlk", fd="f", type="w", start=0, len=0) == "ok"
            assert r.do("b", "ofd_setlk", fd="f", type="r", start=0, len=1) == "EAGAIN"
            assert r.do("b", "ofd_getlk", fd="f", type="r", start=0, len=1)[0] == "w"
            assert r.do("b", "flock", fd="f", how="ex", nb=True) == "ok"  # independent
            r.do("a", "close", fd="f")
            # (the kernel sends the release of a's open file after close() returned:
            # wait for it rather than race it)
            assert r.do("b", "ofd_setlkw", fd="f", type="w", start=0, len=0,
                        wait=30.0) == "ok"
        finally:
            r.close()


def test_killed_node_keeps_its_locks_until_recovered(topdir):
    with running_cluster(topdir, crashes=True) as c:
        nodes = {n: c.mount(n) for n in ("n1", "n2")}
        master = c.master_node()
        (victim,) = [n for n in nodes if n != master]   # its locks are in the table
        slot = c.slot_of(victim)
        shared_file(nodes[master].p("data"))
        holder = Actor("h", nodes[victim].path)
        waiter = Actor("w", nodes[master].path)
        try:
            holder.call("open", fd="f", file="data")
            assert holder.call("setlk", fd="f", type="w", start=0, len=0) == "ok"
            waiter.call("open", fd="f", file="data")
            assert waiter.call("setlk", fd="f", type="r", start=0, len=1) == "EAGAIN"
            waiter.send("setlkw", fd="f", type="r", start=0, len=1)
            assert waiter.answer(0.5) == "blocked"
            c.kill(victim)
            holder.kill()
            # granted only once the victim's slot is recovered (its journal replayed):
            # the lock of a dead node is not given away while its writes may be unseen
            assert waiter.answer(60.0) == "ok"
            c.wait_recovered(victim, slot, timeout=5.0)
        finally:
            holder.kill()
            waiter.stop()


def test_locks_survive_a_master_failover(topdir):
    with running_cluster(topdir, crashes=True) as c:
        nodes = {n: c.mount(n) for n in ("n1", "n2", "n3")}
        master = c.master_node()
        survivors = [n for n in nodes if n != master]
        shared_file(nodes[survivors[0]].p("data"))
        holder = Actor("h", nodes[survivors[0]].path)
        other = Actor("o", nodes[survivors[1]].path)
        try:
            holder.call("open", fd="f", file="data")
            other.call("open", fd="f", file="data")
            assert holder.call("setlk", fd="f", type="w", start=10, len=10) == "ok"
            assert holder.call("flock", fd="f", how="sh", nb=True) == "ok"
            c.kill(master)
            wait_for(lambda: c.master_node() != master, 60, "a new master")
            # the holder's locks were reclaimed from the new master
            assert other.call("setlk", fd="f", type="w", start=15, len=1,
                              timeout=60) == "EAGAIN"
            assert other.call("flock", fd="f", how="ex", nb=True) == "EAGAIN"
            assert other.call("setlk", fd="f", type="w", start=0, len=10) == "ok"
            holder.call("close", fd="f")
            assert other.call("setlk", fd="f", type="w", start=15, len=1) == "ok"
        finally:
            holder.stop()
            other.stop()


def qemu(path: str) -> subprocess.Popen:
    """A paused QEMU with ``path`` as its virtio disk (it takes QEMU's image locks, OFD
    locks on bytes of the image, as a running VM does)."""
    return subprocess.Popen(
        ["qemu-system-x86_64", "-nodefaults", "-display", "none", "-S", "-machine", "pc",
         "-accel", "tcg", "-monitor", "none", "-serial", "none",
         "-drive", f"file={path},format=raw,if=none,id=d0",
         "-device", "virtio-blk-pci,drive=d0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_all(*procs) -> None:
    """Kill and reap each process still running (None: not started)."""
    for p in procs:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()


def ofd_probe(m) -> object:
    """What F_OFD_GETLK for a write lock on the whole image answers on mount ``m``."""
    probe = Actor("p", m.path)
    try:
        probe.call("open", fd="f", file="disk.img")
        return probe.call("ofd_getlk", fd="f", type="w", start=0, len=0)
    finally:
        probe.stop()


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                    reason="QEMU is not installed")
def test_qemu_image_lock_holds_across_nodes(topdir):
    with running_cluster(topdir) as c:
        a = c.mount("n1")
        b = c.mount("n2")
        shared_file(a.p("disk.img"))        # a shared disk: opens for writing everywhere
        os.truncate(a.p("disk.img"), 64 << 20)
        first = qemu(a.p("disk.img"))
        second = None
        try:
            # the first QEMU holds its write lock once its device is realized
            probe = Actor("p", b.path)
            try:
                probe.call("open", fd="f", file="disk.img")
                wait_for(lambda: probe.call("ofd_getlk", fd="f", type="w", start=0,
                                            len=0) != "unlocked", 60, "QEMU's locks")
            finally:
                probe.stop()
            second = qemu(b.p("disk.img"))
            try:
                out, _ = second.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                # it should have failed at once: say whether it runs the guest (the
                # lock not seen) or hangs in a lock request, and what node b sees
                seen = ofd_probe(b)
                second.kill()
                out, _ = second.communicate()
                pytest.fail(f"the second QEMU ran 60 s; node b sees {seen!r} on the "
                            f"image; its output: {out!r}")
            assert second.returncode != 0
            assert 'Failed to get "write" lock' in out, out
            # the first QEMU gone, its locks are gone: the other node can start it
            first.kill()
            first.wait()
            second = qemu(b.p("disk.img"))
            time.sleep(3)
            assert second.poll() is None, second.communicate()[0]
        finally:
            kill_all(first, second)


SQLITE_WRITER = r"""
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], timeout=60, isolation_level=None)
db.execute("PRAGMA journal_mode=DELETE")
for i in range(int(sys.argv[3])):
    db.execute("BEGIN IMMEDIATE")
    n = db.execute("SELECT count(*) FROM t").fetchone()[0]
    db.execute("INSERT INTO t VALUES (?, ?, ?)", (sys.argv[2], i, n))
    db.execute("COMMIT")
db.close()
"""


def test_sqlite_writers_on_two_nodes(topdir):
    """SQLite (rollback journal) relies on fcntl locks: writers on two nodes at once,
    each transaction counting the rows before its insert, lose nothing."""
    import sqlite3
    with running_cluster(topdir) as c:
        a = c.mount("n1")
        b = c.mount("n2")
        db = sqlite3.connect(a.p("db.sqlite"))
        db.execute("PRAGMA journal_mode=DELETE")
        db.execute("CREATE TABLE t (node TEXT, i INT, before INT)")
        db.commit()
        db.close()
        os.setxattr(a.p("db.sqlite"), MULTI, b"1")
        procs = [subprocess.Popen([sys.executable, "-c", SQLITE_WRITER, m.p("db.sqlite"),
                                   name, "100"], stderr=subprocess.PIPE, text=True)
                 for name, m in (("a", a), ("b", b))]
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err
        db = sqlite3.connect(b.p("db.sqlite"))
        try:
            assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            rows = db.execute("SELECT before FROM t ORDER BY rowid").fetchall()
        finally:
            db.close()
        # every transaction saw all the rows committed before it: 0, 1, 2, ...
        assert [r[0] for r in rows] == list(range(200))


def test_more_waiters_than_request_workers(topdir):
    """150 processes wait for one flock (more than pyfuse3's 99 request workers): a
    waiting lock does not hold a worker, so the holder's close is still served and
    every waiter gets the lock in turn."""
    with running_cluster(topdir) as c:
        a = c.mount("n1")
        path = a.p("busy")
        with open(path, "wb"):
            pass
        holder = Actor("h", a.path)
        waiters = []
        try:
            holder.call("open", fd="f", file="busy")
            assert holder.call("flock", fd="f", how="ex", nb=True) == "ok"
            waiters = [subprocess.Popen(["flock", "-x", path, "true"])
                       for _ in range(150)]
            time.sleep(2.0)
            assert all(w.poll() is None for w in waiters)     # all waiting
            # requests are still served (an F_GETLK is one)
            assert holder.call("getlk", fd="f", type="w", start=0, len=0) == "unlocked"
            holder.call("close", fd="f")
            for w in waiters:
                assert w.wait(timeout=120) == 0
        finally:
            holder.stop()
            for w in waiters:
                if w.poll() is None:
                    w.kill()
                    w.wait()


INTERRUPTED_WAITER = r"""
import fcntl, os, signal, struct, sys
class Interrupted(Exception): pass
def on_signal(*a): raise Interrupted()
signal.signal(signal.SIGUSR1, on_signal)
fd = os.open(sys.argv[1], os.O_RDWR)
lk = lambda t, s, n: struct.pack("hh4xqqi4x", t, 0, s, n, 0)
fcntl.fcntl(fd, fcntl.F_SETLK, lk(fcntl.F_RDLCK, 0, 100))
print("holding", flush=True)
try:
    fcntl.fcntl(fd, fcntl.F_SETLKW, lk(fcntl.F_WRLCK, 0, 100))   # upgrade: waits
    print("upgraded", flush=True)
except Interrupted:
    print("interrupted", flush=True)
sys.stdin.readline()
"""


def test_interrupted_wait_on_another_nodes_lock(topdir):
    """A process waiting for a lock another node holds is interrupted by a signal:
    its request is withdrawn, and it keeps the read lock it had (the upgrade it asked
    for is not granted behind its back when the other node lets go)."""
    with running_cluster(topdir) as c:
        a = c.mount("n1")
        b = c.mount("n2")
        shared_file(a.p("data"))
        other = Actor("o", b.path)
        other.call("open", fd="f", file="data")
        assert other.call("setlk", fd="f", type="r", start=50, len=1) == "ok"
        p = subprocess.Popen([sys.executable, "-c", INTERRUPTED_WAITER, a.p("data")],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert p.stdout.readline().strip() == "holding"
            time.sleep(0.5)                                  # p waits for o's read lock
            p.send_signal(signal.SIGUSR1)
            assert p.stdout.readline().strip() == "interrupted"
            assert other.call("setlk", fd="f", type="u", start=0, len=0) == "ok"
            time.sleep(0.5)
            # p still holds its read lock, not a write lock: o may read-lock, not write
            assert other.call("setlk", fd="f", type="r", start=0, len=1) == "ok"
            assert other.call("setlk", fd="f", type="w", start=10, len=1) == "EAGAIN"
            got = other.call("getlk", fd="f", type="w", start=10, len=1)
            assert got[:3] == ["r", 0, 100] and got[3] == p.pid
        finally:
            other.stop()
            p.stdin.close()
            p.wait(timeout=30)
