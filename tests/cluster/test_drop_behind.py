"""Drop-behind (``-o dropbehind``): a cluster member drops the kernel's pages of a
file behind a reader that goes through it in order, keeping the last 32 to 64 MiB
(``pages.KernelPages.read_done``), or the size the option gives.  Node b mounts
with the option, node c without, node d (in one test) with a size; node a writes
the files.  What a reader gets never changes: the same bytes on the
first read and the next, and a page dirtied through a shared mapping is written
back before it goes, not lost.  Residency is what ``fincore`` reports of the file
on the reading node's mount."""

from __future__ import annotations

import hashlib
import mmap
import os
import random
import subprocess
import threading
import time

import pytest

from clusterfs import control
from tests.cluster.cluster_util import mounted_cluster, wait_for

MiB = 1 << 20
SIZE = 160 * MiB


@pytest.fixture(scope="module")
def nodes():
    with mounted_cluster("a", size="1G") as c:
        c.mount("b", "-o", "dropbehind")
        c.mount("c")
        yield c


def _write(path: str, seed: int) -> str:
    """A file of SIZE bytes, a different MiB each time; returns its sha256."""
    h = hashlib.sha256()
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        for _ in range(SIZE // MiB):
            chunk = rnd.randbytes(MiB)
            f.write(chunk)
            h.update(chunk)
        f.flush()
        os.fsync(f.fileno())
    return h.hexdigest()


def _read_in_order(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def _resident(path: str) -> int:
    """Bytes of the file that the kernel holds in its page cache."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", path],
                         check=True, capture_output=True, text=True).stdout
    return int(out.split()[0])


def _dropped(nodes, name: str) -> int:
    path = nodes.nodes[name].path
    return control.call(control.find(path), {"op": "status"})["pages"]["dropped_behind"]


def test_a_reader_in_order_keeps_only_the_last_pages_with_the_option(nodes):
    a, b, c = (nodes.nodes[n].path for n in "abc")
    digest = _write(os.path.join(a, "state"), 1)
    before = _dropped(nodes, "b")
    assert _read_in_order(os.path.join(b, "state")) == digest
    # (the drops run on a worker thread: the last one may still be under way)
    wait_for(lambda: _resident(os.path.join(b, "state")) <= 72 * MiB, 15,
             "the pages behind the reader to go")
    assert _dropped(nodes, "b") - before >= 96 * MiB
    # the next read gets the same bytes (from the mount again)
    assert _read_in_order(os.path.join(b, "state")) == digest
    # without the option the whole file stays cached
    assert _read_in_order(os.path.join(c, "state")) == digest
    assert _resident(os.path.join(c, "state")) >= SIZE - 8 * MiB
    assert _dropped(nodes, "c") == 0
    os.unlink(os.path.join(a, "state"))


def test_the_size_kept_behind_is_a_mount_option(nodes):
    """``-o dropbehind=96M`` keeps the last 96 to 128 MiB behind the reader: more
    than the default's 32 to 64, less than the whole file."""
    a = nodes.nodes["a"].path
    digest = _write(os.path.join(a, "kept"), 5)
    nodes.mount("d", "-o", "dropbehind=96M")
    try:
        d = os.path.join(nodes.nodes["d"].path, "kept")
        assert _read_in_order(d) == digest
        wait_for(lambda: _dropped(nodes, "d") >= 32 * MiB, 15,
                 "a drop behind the reader")
        time.sleep(0.5)             # (a second drop may still be under way)
        assert 88 * MiB <= _resident(d) <= 128 * MiB
        assert _read_in_order(d) == digest
    finally:
        nodes.unmount("d")
    os.unlink(os.path.join(a, "kept"))


def test_reads_out_of_order_drop_nothing(nodes):
    a, b = nodes.nodes["a"].path, nodes.nodes["b"].path
    _write(os.path.join(a, "random"), 2)
    before = _dropped(nodes, "b")
    offsets = list(range(MiB, SIZE, MiB))
    random.Random(3).shuffle(offsets)
    offsets.insert(0, 0)        # (from the start: any later read is far ahead of it)
    fd = os.open(os.path.join(b, "random"), os.O_RDONLY)
    try:
        for off in offsets:
            assert len(os.pread(fd, MiB, off)) == MiB
    finally:
        os.close(fd)
    time.sleep(1)               # (a drop would run on a worker thread meanwhile)
    assert _dropped(nodes, "b") == before
    os.unlink(os.path.join(a, "random"))


def test_a_page_dirtied_through_a_mapping_is_written_back_before_it_goes(nodes):
    a, b = nodes.nodes["a"].path, nodes.nodes["b"].path
    _write(os.path.join(a, "mapped"), 4)
    mark = b"written through b's mapping"
    fd = os.open(os.path.join(b, "mapped"), os.O_RDWR)
    try:
        with mmap.mmap(fd, SIZE) as m:
            m[5 * MiB:5 * MiB + len(mark)] = mark      # a dirty page, not synced
            before = _dropped(nodes, "b")
            _read_in_order(os.path.join(b, "mapped"))  # drops the pages behind it
            assert _dropped(nodes, "b") > before
            assert os.pread(fd, len(mark), 5 * MiB) == mark
            assert m[5 * MiB:5 * MiB + len(mark)] == mark
    finally:
        os.close(fd)
    with open(os.path.join(a, "mapped"), "rb") as f:
        f.seek(5 * MiB)
        assert f.read(len(mark)) == mark
    os.unlink(os.path.join(a, "mapped"))


def test_drops_behind_a_reader_while_another_node_takes_the_file_away(nodes):
    """Node a appends to the file while b reads it in order: each append takes the
    file's lock from b, which drops all of b's pages of it (``KernelPages.drop``)
    while drops behind the reader may be under way.  Neither waits for the other
    for good: the read ends with the bytes it was given, and the appends land."""
    a, b = nodes.nodes["a"].path, nodes.nodes["b"].path
    _write(os.path.join(a, "busy"), 5)
    before = _dropped(nodes, "b")
    errors: list[BaseException] = []
    done, first = threading.Event(), threading.Event()

    def append():
        try:
            with open(os.path.join(a, "busy"), "ab", buffering=0) as f:
                while not done.is_set():
                    f.write(b"x" * 4096)
                    first.set()
                    time.sleep(0.05)
        except BaseException as e:      # (reported by the test's thread)
            errors.append(e)

    t = threading.Thread(target=append)
    try:
        got = 0
        with open(os.path.join(b, "busy"), "rb", buffering=0) as f:
            while chunk := f.read(MiB):
                got += len(chunk)
                if got == 80 * MiB:
                    # (drops behind the reader have begun: from here on the lock
                    # goes back and forth while they run)
                    wait_for(lambda: _dropped(nodes, "b") > before, 15,
                             "a drop behind the reader")
                    t.start()
                    assert first.wait(30), errors      # (a's open and first append)
                if got >= SIZE:
                    break
    finally:
        done.set()
        if t.is_alive():
            t.join(60)
    assert not t.is_alive() and not errors, errors
    assert got >= SIZE
    with open(os.path.join(b, "busy"), "rb") as f:
        f.seek(SIZE)
        tail = f.read()
    assert tail and tail == b"x" * len(tail)
    os.unlink(os.path.join(a, "busy"))
