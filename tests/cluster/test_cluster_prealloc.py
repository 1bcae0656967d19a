"""Blocks mapped ahead of EOF on a cluster: a file that node A writes as a stream
gets blocks past its end (``DF_PREALLOC``).  Node B sees the file's size and bytes,
never those blocks' old contents: not when it grows the file while A still has it
open, nor after A was killed with the blocks mapped.  A's close frees them."""

from __future__ import annotations

import errno
import os
import time

import pytest

from clusterfs import control
from tests.cluster.cluster_util import make_topdir, running_cluster, volume_superblock
from tests.cluster.test_freeze import cli, control_ready

MiB = 1 << 20
CHUNK = 64 << 10


def _stale_free_space(path: str) -> None:
    """Fill most of the volume with nonzero bytes and free them again: the blocks
    files get next hold those bytes."""
    old = os.path.join(path, "old")
    with open(old, "wb") as f:
        for _ in range(160):
            f.write(b"\xee" * MiB)
    os.unlink(old)
    fd = os.open(os.path.join(path, "sync"), os.O_WRONLY | os.O_CREAT)
    os.fsync(fd)        # commits the frees: the blocks may be taken again
    os.close(fd)


def _stream(fd: int, chunks: int) -> bytes:
    out = bytearray()
    for i in range(chunks):
        data = bytes([i % 251 + 1]) * CHUNK
        assert os.write(fd, data) == CHUNK
        out += data
    return bytes(out)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# write sizes of a stream whose writes start and end inside blocks, as a VM save
# through a pipe gives them
UNALIGNED = (10000, CHUNK, 1, 4095, 4097, 30000, 12288)


def _stream_sizes(fd: int, sizes, total: int, seed: int = 0) -> bytes:
    """Write ``total`` bytes to ``fd`` in writes of ``sizes`` (in turn)."""
    out = bytearray()
    i = 0
    while len(out) < total:
        n = sizes[i % len(sizes)]
        data = bytes([(i + seed) % 251 + 1]) * n
        assert os.write(fd, data) == n
        out += data
        i += 1
    return bytes(out)


def _writes_at_hand(path: str) -> int:
    """Writes the node of mount ``path`` served with the locks at hand, in one
    operation, without allocating (``frontend.ClusterFrontend.write``)."""
    return control.call(control_ready(path), {"op": "status"})["operations"]["writes_at_hand"]


def test_blocks_ahead_of_a_writer_never_show_on_another_node():
    with make_topdir() as top, running_cluster(top) as c:
        a, b = c.mount("a"), c.mount("b")
        _stale_free_space(a.path)
        fa, fb = os.path.join(a.path, "state"), os.path.join(b.path, "state")
        fd = os.open(fa, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            data = _stream(fd, 48)
            st = os.stat(fb)
            assert st.st_size == len(data)
            assert st.st_blocks * 512 > len(data)        # blocks ahead, on A's side
            assert _read(fb) == data
            # B grows the file over them while A still has it open
            os.truncate(fb, len(data) + MiB)
            assert _read(fb) == data + bytes(MiB)
            assert _read(fa) == data + bytes(MiB)
        finally:
            os.close(fd)
        # A writes another as a stream and closes it: nothing stays mapped past EOF
        fd = os.open(os.path.join(a.path, "second"), os.O_WRONLY | os.O_CREAT, 0o644)
        second = _stream(fd, 48)
        os.close(fd)
        st = os.stat(os.path.join(b.path, "second"))
        assert (st.st_size, st.st_blocks * 512) == (len(second), len(second))
        assert _read(os.path.join(b.path, "second")) == second


def test_unaligned_writes_of_a_stream_served_at_hand_read_right_on_another_node():
    """Most writes of a stream land in blocks mapped ahead, served with the locks
    at hand: whatever their sizes, the other node reads what was written, and zeros
    where it grows the file past the last byte (the last block's tail)."""
    with make_topdir() as top, running_cluster(top) as c:
        a, b = c.mount("a"), c.mount("b")
        _stale_free_space(a.path)
        fa, fb = os.path.join(a.path, "state"), os.path.join(b.path, "state")
        before = _writes_at_hand(a.path)
        fd = os.open(fa, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            data = _stream_sizes(fd, UNALIGNED, 3 * MiB)
            writes = -(-len(data) * len(UNALIGNED) // sum(UNALIGNED))
            assert _writes_at_hand(a.path) - before >= writes * 3 // 4
            assert os.stat(fb).st_size == len(data)
            assert _read(fb) == data
            # B grows the file while A has it open: the tail of A's last block
            os.truncate(fb, len(data) + 20000)
            assert _read(fb) == data + bytes(20000)
            # A carries on from where it was, over B's zeros (its lock went to
            # B: the first write takes it back, not at hand)
            more = _stream_sizes(fd, UNALIGNED, MiB, seed=7)
        finally:
            os.close(fd)
        assert _read(fb) == data + more
        assert _read(fa) == data + more


def test_two_nodes_appending_to_one_log_lose_no_record():
    """O_APPEND writers on two nodes (a file marked for writers on several nodes),
    in turns and in runs: every record lands whole after the ones before it,
    whichever node wrote them, also when a run's writes are served at hand."""
    with make_topdir() as top, running_cluster(top) as c:
        a, b = c.mount("a"), c.mount("b")
        log = os.path.join(a.path, "app.log")
        open(log, "wb").close()
        os.setxattr(log, "user.clusterfs.multiwriter", b"1")
        fds = {m: os.open(os.path.join(m.path, "app.log"),
                          os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) for m in (a, b)}
        expect = bytearray()
        at_hand = _writes_at_hand(a.path) + _writes_at_hand(b.path)
        try:
            for turn in range(40):
                m = (a, b)[turn % 2]
                for i in range(1 + turn % 7):       # runs of 1 to 7 records
                    rec = f"{m is a and 'a' or 'b'} {turn} {i} ".encode() * (3 + i * 29) + b"\n"
                    assert os.write(fds[m], rec) == len(rec)
                    expect += rec
        finally:
            for fd in fds.values():
                os.close(fd)
        for m in (a, b):
            assert _read(os.path.join(m.path, "app.log")) == expect
        # (the runs' later records were served at hand)
        assert _writes_at_hand(a.path) + _writes_at_hand(b.path) - at_hand >= 40


@pytest.mark.parametrize("sizes", [(CHUNK,), UNALIGNED], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("where", ["same node", "other node"])
def test_a_clone_taken_in_the_middle_of_a_stream_keeps_its_bytes(where, sizes):
    """A clone of a file being written as a stream shares its blocks: the writer's
    next appends must not write into them (the clone's bytes, and the zeros past its
    end, stay as they were)."""
    with make_topdir() as top, running_cluster(top) as c:
        a, b = c.mount("a"), c.mount("b")
        _stale_free_space(a.path)
        fd = os.open(os.path.join(a.path, "log"), os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            head = _stream_sizes(fd, sizes, MiB)
            side = a if where == "same node" else b
            src = os.open(os.path.join(side.path, "log"), os.O_RDONLY)
            dst = os.open(os.path.join(side.path, "copy"), os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                assert os.copy_file_range(src, dst, len(head)) == len(head)
            finally:
                os.close(src)
                os.close(dst)
            tail = _stream_sizes(fd, sizes, MiB, seed=3)
        finally:
            os.close(fd)
        for m in (a, b):
            assert _read(os.path.join(m.path, "log")) == head + tail
        copy = os.path.join(b.path, "copy")
        assert _read(copy) == head
        os.truncate(copy, len(head) + 3 * 4096)
        assert _read(os.path.join(a.path, "copy")) == head + bytes(3 * 4096)


@pytest.mark.parametrize("sizes", [(CHUNK,), UNALIGNED], ids=["aligned", "unaligned"])
def test_a_killed_writers_blocks_ahead_stay_out_of_the_file(sizes):
    with make_topdir() as top, running_cluster(top, crashes=True) as c:
        a, b = c.mount("a"), c.mount("b")
        _stale_free_space(a.path)
        fd = os.open(os.path.join(a.path, "state"), os.O_WRONLY | os.O_CREAT, 0o644)
        data = _stream_sizes(fd, sizes, 3 * MiB)
        os.fsync(fd)            # the size and the blocks ahead are in A's journal
        slot = c.slot_of("a")
        c.kill("a")
        try:
            os.close(fd)
        except OSError:
            pass                # (the connection to A's mount is gone)
        c.wait_recovered("a", slot)
        fb = os.path.join(b.path, "state")
        st = os.stat(fb)
        assert st.st_size == len(data) and st.st_blocks * 512 > len(data)
        assert _read(fb) == data
        os.truncate(fb, len(data) + MiB)
        assert _read(fb) == data + bytes(MiB)
        # (freed by the truncation: what holds the data is left)
        assert os.stat(fb).st_blocks * 512 == -(-len(data) // 4096) * 4096


def _revision(volume: str) -> int:
    return volume_superblock(volume).format_rev


def _set_revision(volume: str, rev: int) -> None:
    """Make a fresh volume look like one of an older revision (both superblocks)."""
    from clusterfs.fs.volume import read_superblock
    from clusterfs.ondisk.blockdev import BlockDevice
    dev = BlockDevice(volume)
    try:
        sb = read_superblock(dev)
        sb.format_rev = rev
        dev.write(sb.backup_bno, sb.image(sb.backup_bno))
        dev.write(0, sb.image(0))
        dev.flush()
    finally:
        dev.close()


def test_a_grow_on_a_node_that_read_the_older_revision_keeps_the_new_one():
    with make_topdir() as top, running_cluster(top, size="128M") as c:
        _set_revision(c.volume, 4)
        a, b = c.mount("a"), c.mount("b")
        control_ready(b.path)
        fd = os.open(os.path.join(a.path, "state"), os.O_WRONLY | os.O_CREAT, 0o644)
        _stream(fd, 8)
        os.close(fd)
        assert _revision(c.volume) == 5          # raised by A's stream
        c.unmount("a")                           # B, which read 4, grows the volume
        os.truncate(c.volume, 192 * MiB)
        r = cli("grow", c.volume)
        assert "grown from" in r.stdout, r.stdout
        assert _revision(c.volume) == 5


def test_out_of_space_on_a_cluster_mount_takes_back_the_blocks_ahead():
    with make_topdir() as top, running_cluster(top, size="128M") as c:
        a, b = c.mount("a"), c.mount("b")
        fa = os.path.join(a.path, "state")
        fd = os.open(fa, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            data = _stream(fd, 48)
            # (asked through A: B's stat would take the file's lock from A, and a
            # write out of space takes back only the blocks ahead of files whose
            # lock its node has at hand)
            assert os.stat(fa).st_blocks * 512 > len(data)
            filled = 0
            with open(os.path.join(a.path, "fill"), "wb", buffering=0) as f:
                try:
                    while True:
                        filled += f.write(b"\x06" * MiB)
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e
            st = os.stat(os.path.join(b.path, "state"))
            assert (st.st_size, st.st_blocks * 512) == (len(data), len(data))
            assert _read(os.path.join(b.path, "state")) == data
        finally:
            os.close(fd)


@pytest.mark.parametrize("freezer", ["writer", "other"])
def test_a_close_while_frozen_leaves_the_blocks_ahead_for_later(freezer):
    """The close does not wait for the thaw, whichever node froze the volume: the
    blocks ahead stay mapped, flagged, and the next truncation frees them."""
    with make_topdir() as top, running_cluster(top) as c:
        a, b = c.mount("a"), c.mount("b")
        control_ready(a.path)
        control_ready(b.path)
        fa, fb = os.path.join(a.path, "state"), os.path.join(b.path, "state")
        fd = os.open(fa, os.O_WRONLY | os.O_CREAT, 0o644)
        data = _stream(fd, 48)
        via = a.path if freezer == "writer" else b.path
        cli("freeze", via, "--timeout", "60")
        try:
            os.close(fd)
            time.sleep(0.5)         # (the kernel's release reaches the mount)
        finally:
            cli("thaw", via)
        st = os.stat(fb)
        assert st.st_size == len(data) and st.st_blocks * 512 > len(data)
        os.truncate(fb, len(data))
        assert os.stat(fb).st_blocks * 512 == len(data)
        assert _read(fa) == data

