"""Blocks mapped ahead of EOF on a cluster: a file that node A writes as a stream
gets blocks past its end (``DF_PREALLOC``).  Node B sees the file's size and bytes,
never those blocks' old contents: not when it grows the file while A still has it
open, nor after A was killed with the blocks mapped.  A's close frees them."""

from __future__ import annotations

import os

from tests.cluster.cluster_util import make_topdir, running_cluster

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


def test_a_killed_writers_blocks_ahead_stay_out_of_the_file():
    with make_topdir() as top, running_cluster(top, crashes=True) as c:
        a, b = c.mount("a"), c.mount("b")
        _stale_free_space(a.path)
        fd = os.open(os.path.join(a.path, "state"), os.O_WRONLY | os.O_CREAT, 0o644)
        data = _stream(fd, 48)
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
        assert os.stat(fb).st_blocks * 512 == len(data)     # freed by the truncation
