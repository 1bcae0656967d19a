"""Cluster open modes (VM disks): opening a file for writing is exclusive across
nodes (EBUSY elsewhere), read-only opens share, ``user.clusterfs.multiwriter=1``
lets writers on several nodes share; the mode goes at the last close and when the
holding node dies (once it is recovered); ``clusterfs status`` shows who holds what.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time

import pytest

from tests.cluster.cluster_util import (dir_for_test, mounted_cluster, running_cluster,
                                        wait_for)

MULTI = "user.clusterfs.multiwriter"


@pytest.fixture(scope="module")
def nodes():
    with mounted_cluster("a", "b", "c", fast=False) as c:
        yield c


@pytest.fixture
def f(nodes, request):
    """A fresh file (made on a); ``f.on(node)`` is its path on that node."""
    name = dir_for_test(request)
    with open(nodes.nodes["a"].p(name), "wb") as fh:
        fh.write(b"0123456789")

    class File:
        def on(self, node: str) -> str:
            return nodes.nodes[node].p(name)
    return File()


def busy(path: str, flags: int = os.O_WRONLY) -> bool:
    """Whether an open with ``flags`` fails with EBUSY (else it is closed again)."""
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.EBUSY:
            return True
        raise
    os.close(fd)
    return False


def test_write_open_is_exclusive_across_nodes(f):
    fd = os.open(f.on("a"), os.O_WRONLY)
    try:
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_APPEND,
                      os.O_RDWR | os.O_TRUNC, os.O_WRONLY | os.O_CREAT):
            assert busy(f.on("b"), flags), f"flags {flags:#o} opened on b"
            assert busy(f.on("c"), flags)
        # the file is untouched by the refused opens (no truncation)
        with open(f.on("b"), "rb") as r:
            assert r.read() == b"0123456789"
        # the holder itself opens it for writing again, as often as it likes
        fd2 = os.open(f.on("a"), os.O_RDWR)
        os.write(fd2, b"AB")
        os.close(fd2)
        assert busy(f.on("b"))
    finally:
        os.close(fd)
    assert not busy(f.on("b"))
    with open(f.on("c"), "r+b", buffering=0) as w:
        w.write(b"c")
    with open(f.on("a"), "rb") as r:
        assert r.read() == b"cB23456789"


def test_read_only_opens_share(f):
    readers = [open(f.on(n), "rb") for n in ("a", "b", "c")]
    try:
        assert [r.read() for r in readers] == [b"0123456789"] * 3
        # readers do not keep a writer out, and a writer does not keep readers out
        with open(f.on("b"), "r+b", buffering=0) as w:
            w.write(b"W")
            assert busy(f.on("a")) and busy(f.on("c"))
            more = open(f.on("c"), "rb")
            assert more.read() == b"W123456789"
            more.close()
        for r in readers:
            r.seek(0)
            assert r.read() == b"W123456789"
        assert not busy(f.on("a"))
    finally:
        for r in readers:
            r.close()


def test_released_at_last_close(f):
    fds = [os.open(f.on("a"), os.O_WRONLY) for _ in range(3)]
    ro = os.open(f.on("a"), os.O_RDONLY)
    try:
        for fd in fds[:-1]:
            os.close(fd)
            assert busy(f.on("b")), "released before the last writer closed"
        os.close(fds[-1])
        # a read-only descriptor left open on a does not hold the mode
        assert not busy(f.on("b"))
        assert not busy(f.on("c"))
    finally:
        os.close(ro)


def test_create_holds_the_mode(nodes, f):
    path_a = nodes.nodes["a"].p("created-" + os.path.basename(f.on("a")))
    path_b = nodes.nodes["b"].p(os.path.basename(path_a))
    fd = os.open(path_a, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        assert busy(path_b)
    finally:
        os.close(fd)
    assert not busy(path_b)
    os.unlink(path_b)


def test_multiwriter_files_share(f):
    os.setxattr(f.on("a"), MULTI, b"1")
    wa = os.open(f.on("a"), os.O_RDWR)
    wb = os.open(f.on("b"), os.O_RDWR)
    wc = os.open(f.on("c"), os.O_WRONLY)
    try:
        os.pwrite(wa, b"a", 0)
        os.pwrite(wb, b"b", 1)
        os.pwrite(wc, b"c", 2)
        assert os.pread(wa, 10, 0) == b"abc3456789"
        assert os.pread(wb, 10, 0) == b"abc3456789"
    finally:
        os.close(wa)
        os.close(wb)
    try:
        # not multi-writer any more: an exclusive open waits for c's last close
        os.removexattr(f.on("a"), MULTI)
        assert busy(f.on("a"))
    finally:
        os.close(wc)
    assert not busy(f.on("a"))
    # and exclusive again
    fd = os.open(f.on("a"), os.O_WRONLY)
    try:
        assert busy(f.on("b"))
    finally:
        os.close(fd)


def test_status_shows_who_holds_what(nodes, f):
    ino = os.stat(f.on("a")).st_ino
    fd = os.open(f.on("b"), os.O_WRONLY)
    try:
        st = nodes.status("--watch", "0")
        # the master as the lease block names it, and as it answers itself
        m, lm = st["master"], st["lock_manager"]
        rec = nodes.master()
        assert (m["node"], m["address"], m["generation"]) == \
            (rec.node, rec.addr, rec.generation)
        assert m["slot"] == nodes.slot_of(rec.node) and m["renewed_age"] < 5
        assert (lm["master"], lm["address"], lm["generation"]) == \
            (rec.node, rec.addr, rec.generation)
        assert {n["node"] for n in lm["nodes"]} >= {"a", "b", "c"}
        assert all(n["connected"] and n["lease_age"] < 5 for n in lm["nodes"]), lm
        assert [(m["node"], m["mode"]) for m in lm["open_modes"] if m["inode"] == ino] \
            == [("b", "EX")], lm
        text = nodes.run_status("--watch", "0")
        assert f"node b has inode {ino} open for writing" in text
        assert f"lock manager master: node {rec.node} (slot {m['slot']}) at " \
               f"{rec.addr}" in text
    finally:
        os.close(fd)
    # (the kernel sends the release after close returns)
    wait_for(lambda: not modes_of(nodes, ino), 30, "the open mode to go")
    # the writers of a multi-writer file
    os.setxattr(f.on("a"), MULTI, b"1")
    fds = [os.open(f.on(n), os.O_RDWR) for n in ("a", "c")]
    try:
        assert modes_of(nodes, ino) == [("a", "CW"), ("c", "CW")]
        text = nodes.run_status("--watch", "0")
        assert f"node c has inode {ino} open for writing (multi-writer)" in text
    finally:
        for fd in fds:
            os.close(fd)
    wait_for(lambda: not modes_of(nodes, ino), 30, "the open modes to go")


def modes_of(nodes, ino: int) -> list:
    lm = nodes.status("--watch", "0")["lock_manager"]
    return sorted((m["node"], m["mode"]) for m in lm["open_modes"] if m["inode"] == ino)


def test_mode_released_when_the_holder_dies(topdir):
    """SIGKILL of the node that has a file open for writing: once a survivor has
    recovered it, the file can be opened for writing elsewhere."""
    with running_cluster(topdir, crashes=True) as c:
        a, b = c.mount("a"), c.mount("b")
        slot = c.slot_of("a")
        with open(a.p("disk.img"), "wb") as w:
            w.write(b"x" * 100_000)
            os.fsync(w.fileno())
        holder = os.open(a.p("disk.img"), os.O_RDWR)
        try:
            assert busy(b.p("disk.img"))
            c.kill("a")
        finally:
            with contextlib.suppress(OSError):
                os.close(holder)    # (its mount is gone: the descriptor is dead)
        deadline = time.monotonic() + 60
        while busy(b.p("disk.img")):
            assert time.monotonic() < deadline, "the dead node's open mode stayed"
        with open(b.p("disk.img"), "r+b") as w:
            assert w.read() == b"x" * 100_000
            w.write(b"y")
        c.wait_recovered("a", slot)
        assert not c.status("--watch", "0")["lock_manager"]["open_modes"]
        # the dead node comes back (in its old slot) and sees the change
        a = c.mount("a")
        assert os.stat(a.p("disk.img")).st_size == 100_001


def _open_locks_of(c, node: str) -> set[int]:
    """The inodes whose open lock (``O``) the lock manager says ``node`` holds."""
    return {int.from_bytes(h["name"][1:], "big") for h in c.view()["held"]
            if h["node"] == node and h["name"].startswith(b"O")}


def test_open_lock_cache_is_bounded_and_called_back(topdir):
    """A node keeps the open locks of files it made as a cache, at most ``open_cache``
    of them (the newest); a file removed elsewhere is freed either way, and another
    node opens any of them."""
    with running_cluster(topdir, fast=False) as c:
        a = c.mount("a", "-o", "open_cache=4")
        b = c.mount("b", "-o", "open_cache=0")
        inos = []
        for i in range(12):
            with open(a.p(f"f{i}"), "wb") as fh:
                fh.write(b"%d" % i)
            inos.append(os.stat(a.p(f"f{i}")).st_ino)
        wait_for(lambda: _open_locks_of(c, "a") == set(inos[-4:]), 10,
                 "a to keep the open locks of its newest 4 files only")
        with open(b.p("f11"), "rb") as fh:        # a gives the cached lock up
            assert fh.read() == b"11"
            assert inos[-1] not in _open_locks_of(c, "a")
        with open(b.p("g"), "wb") as fh:          # b keeps none (open_cache=0)
            fh.write(b"g")
        assert not _open_locks_of(c, "b")
        for i in range(12):
            os.unlink(b.p(f"f{i}"))
        assert sorted(os.listdir(a.p())) == ["g"]
    # leaving the cluster, fsck (running_cluster) finds no inode left unfreed


def test_open_cache_option_checked(topdir):
    from tests.helpers import run_cli
    proc = run_cli("mount", os.path.join(topdir, "none.img"), topdir, "-o", "open_cache=x",
                   check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "clusterfs mount: mount option open_cache wants a number of locks (0 or more), "
        "not 'x'"]
