"""Blocks mapped ahead of EOF (``DF_PREALLOC``): a file written as a stream gets
blocks past its end, so that its next appends do not allocate; they are never
its bytes, and go when the writer closes the file or before anything else could
take them in (a truncation, a preallocation, a clone, a write past them), also
after a crash.  Older volumes are raised to revision 5 first."""

from __future__ import annotations

import contextlib
import errno
import os

import pytest

from clusterfs.errors import FSError
from clusterfs.fs import inode
from clusterfs.fs.alloc import AHEAD_SPARE
from clusterfs.fs.posix import Ctx
from clusterfs.fs.volume import read_superblock
from clusterfs.ondisk.format import BLOCK_SIZE, DF_PREALLOC, PREALLOC_SINCE
from clusterfs.ondisk.slots import replay_slot
from tests.helpers import DeviceMount, check_consistency, fsck_device, power_loss_volume

ROOT = Ctx(uid=0, gid=0)
CHUNK = 16 * BLOCK_SIZE          # 64 KiB, what `cat` writes through a pipe
STALE = b"\xee" * BLOCK_SIZE


def _ahead(fs, ino: int) -> int:
    """Blocks the file maps wholly past EOF."""
    di = fs.vol.dinode(ino)
    eof = -(-di.size // BLOCK_SIZE)
    return sum(max(0, lb + n - max(lb, eof)) for lb, _pb, n in inode.extents(fs.vol, di))


def _stream(fs, fh, chunks: int, start: int = 0) -> bytes:
    """``chunks`` appends of CHUNK bytes from ``start``; returns what was written."""
    out = bytearray()
    for i in range(chunks):
        data = bytes([(start // CHUNK + i) % 251 + 1]) * CHUNK
        assert fs.write(fh, start + i * CHUNK, data, ROOT) == CHUNK
        out += data
    return bytes(out)


def _stain_ahead(fs, ino: int) -> None:
    """Put nonzero bytes in the blocks mapped past EOF (a freed file's old data)."""
    di = fs.vol.dinode(ino)
    eof = -(-di.size // BLOCK_SIZE)
    for lb, pb, n in inode.extents(fs.vol, di):
        for b in range(max(lb, eof), lb + n):
            fs.vol.write_data(pb + b - lb, STALE)


def _fill(fs, name: bytes) -> int:
    """A new file written a block at a time until ENOSPC; returns its blocks."""
    fh, _di = fs.create(fs.root_ino, name, 0o100644, os.O_WRONLY, ROOT)
    n = 0
    with pytest.raises(FSError) as e:
        while True:
            fs.write(fh, n * BLOCK_SIZE, b"\x06" * BLOCK_SIZE, ROOT)
            n += 1
    assert e.value.errno == errno.ENOSPC
    fs.release(fh)
    return n


def _fsck_clean(dev) -> None:
    code, text = fsck_device(dev)
    assert code == 0, text


@contextlib.contextmanager
def _mounted(size: int, *, walk: bool = True):
    """A fresh volume of ``size`` bytes mounted without FUSE: yields (dev, fs).
    Unmounted after the body; when the body passed, fsck (and with ``walk`` the
    test walk too) must find the volume clean."""
    dev = power_loss_volume(size)
    m = DeviceMount(dev)
    fs = m.start()
    try:
        yield dev, fs
    finally:
        m.stop()
    if walk:
        assert check_consistency(dev) == []
    _fsck_clean(dev)


def _replayed(dev):
    """What a crash would leave of ``dev`` now, its journal replayed."""
    snap = dev.snapshot()
    replay_slot(snap, read_superblock(snap), 0)
    return snap


def test_streaming_writes_map_blocks_ahead_and_the_close_frees_them():
    with _mounted(64 << 20) as (dev, fs):
        fh, di = fs.create(fs.root_ino, b"state", 0o100644, os.O_WRONLY, ROOT)
        assert fs.write(fh, 0, b"\x01" * CHUNK, ROOT) == CHUNK
        assert _ahead(fs, di.bno) == 0           # one write is no stream yet
        data = bytearray(b"\x01" * CHUNK)
        most = 0
        for i in range(1, 41):
            data += _stream(fs, fh, 1, i * CHUNK)
            most = max(most, _ahead(fs, di.bno))
        data = bytes(data)
        assert fs.vol.dinode(di.bno).flags & DF_PREALLOC
        # the blocks ahead grew with the file: 16, 48, 112, ... (the group's room
        # allowing), so the appends allocate now and then, not each time
        assert most >= 100 and _ahead(fs, di.bno) > 0
        ext = inode.extents(fs.vol, fs.vol.dinode(di.bno))
        assert len(ext) <= 2, ext
        fh2 = fs.open(di.bno, os.O_RDONLY)
        assert fs.read(fh2, 0, len(data) + CHUNK) == data
        assert fs.getattr(di.bno).size == len(data)
        # blocks ahead, flag set: a consistent volume (what a crash would leave)
        fs.vol.commit()
        assert check_consistency(_replayed(dev)) == []
        _fsck_clean(_replayed(dev))
        fs.release(fh)
        assert _ahead(fs, di.bno) > 0            # another handle is still open
        fs.release(fh2)
        di = fs.vol.dinode(di.bno)
        assert _ahead(fs, di.bno) == 0 and not di.flags & DF_PREALLOC
        assert di.blocks == len(data) // BLOCK_SIZE


def _streamed(fs, name: bytes, chunks: int = 6):
    """A file written as a stream, left open with blocks ahead that hold old bytes."""
    fh, di = fs.create(fs.root_ino, name, 0o100644, os.O_RDWR, ROOT)
    data = _stream(fs, fh, chunks)
    assert _ahead(fs, di.bno) > 0
    _stain_ahead(fs, di.bno)
    return fh, di.bno, data


@pytest.mark.parametrize("how", ["truncate", "write-past", "fallocate", "clone",
                                 "unaligned-append"])
def test_blocks_ahead_never_become_the_files_bytes(how):
    with _mounted(64 << 20) as (_dev, fs):
        fh, ino, data = _streamed(fs, b"f")
        size = len(data)
        grow = 5 * BLOCK_SIZE + 100
        if how == "truncate":
            fs.setattr(ino, size=size + grow, ctx=ROOT)
            want = data + bytes(grow)
        elif how == "write-past":
            tail = b"\x07" * 10
            fs.write(fh, size + grow, tail, ROOT)
            want = data + bytes(grow) + tail
        elif how == "fallocate":
            fs.fallocate(fh, 0, size, grow)
            want = data + bytes(grow)
        elif how == "clone":
            src, _sdi = fs.create(fs.root_ino, b"src", 0o100644, os.O_RDWR, ROOT)
            fs.write(src, 0, b"\x09" * (4 * BLOCK_SIZE), ROOT)
            # whole blocks, landing two blocks past EOF: shared, not copied
            assert fs.copy_file_range(src, 0, fh, size + 2 * BLOCK_SIZE,
                                      4 * BLOCK_SIZE) == 4 * BLOCK_SIZE
            want = data + bytes(2 * BLOCK_SIZE) + b"\x09" * (4 * BLOCK_SIZE)
            fs.release(src)
        else:
            # an append that starts inside the stream's last block: the bytes of
            # the blocks ahead it does not write read as zeros
            fs.setattr(ino, size=size - 100, ctx=ROOT)
            fs.write(fh, size + 50, b"\x05" * 30, ROOT)
            want = data[:-100] + bytes(150) + b"\x05" * 30
        assert fs.getattr(ino).size == len(want)
        assert fs.read(fh, 0, len(want) + BLOCK_SIZE) == want
        fs.release(fh)


def test_a_crash_leaves_the_blocks_ahead_flagged_and_harmless():
    dev = power_loss_volume(64 << 20)
    m = DeviceMount(dev)
    fs = m.start()
    fh, ino, data = _streamed(fs, b"f")
    fs.vol.commit()
    ahead = _ahead(fs, ino)
    crashed = dev.crash(keep=range(len(dev.pending)))   # no close, no trim
    # fsck takes the flagged blocks as they are: no size repair, no lost blocks
    assert check_consistency(_replayed(crashed)) == []
    _fsck_clean(_replayed(crashed))
    m2 = DeviceMount(crashed)
    fs = m2.start()
    try:
        assert _ahead(fs, ino) == ahead
        fh = fs.open(ino, os.O_RDWR)
        assert fs.read(fh, 0, len(data) + CHUNK) == data
        fs.setattr(ino, size=len(data) + 3 * BLOCK_SIZE, ctx=ROOT)
        assert fs.read(fh, len(data), 4 * BLOCK_SIZE) == bytes(3 * BLOCK_SIZE)
        assert _ahead(fs, ino) == 0 and not fs.vol.dinode(ino).flags & DF_PREALLOC
        fs.release(fh)
    finally:
        m2.stop()
    assert check_consistency(crashed) == []
    _fsck_clean(crashed)


def test_a_handle_that_writes_once_or_far_from_eof_maps_nothing_ahead():
    dev = power_loss_volume(64 << 20)
    m = DeviceMount(dev)
    fs = m.start()
    try:
        # open, append, close: each write is a handle's first
        fh, di = fs.create(fs.root_ino, b"log", 0o100644, os.O_WRONLY, ROOT)
        fs.release(fh)
        for i in range(6):
            fh = fs.open(di.bno, os.O_WRONLY | os.O_APPEND)
            fs.write(fh, 0, b"\x03" * CHUNK, ROOT)
            assert _ahead(fs, di.bno) == 0
            fs.release(fh)
        # writes that do not continue where the last one ended
        fh, dj = fs.create(fs.root_ino, b"sparse", 0o100644, os.O_WRONLY, ROOT)
        for i in range(6):
            fs.write(fh, (2 * i + 1) * CHUNK, b"\x04" * CHUNK, ROOT)
        assert _ahead(fs, dj.bno) == 0 and not fs.vol.dinode(dj.bno).flags & DF_PREALLOC
        fs.release(fh)
    finally:
        m.stop()


def test_blocks_ahead_take_a_small_part_of_the_free_space():
    with _mounted(16 << 20) as (_dev, fs):
        free = fs.vol.alloc.free_blocks()
        fha, a = fs.create(fs.root_ino, b"a", 0o100644, os.O_WRONLY, ROOT)
        _stream(fs, fha, 8)
        ahead = _ahead(fs, a.bno)
        # at most 1/AHEAD_SPARE of the free blocks of the group it was taken from
        assert 0 < ahead <= fs.vol.sb.rgrp_blocks // AHEAD_SPARE
        # another file fills the rest; out of space, this node takes the stream's
        # blocks ahead back (as XFS does), so every free block is written
        written = _fill(fs, b"b")
        assert _ahead(fs, a.bno) == 0
        assert written >= free - 8 * CHUNK // BLOCK_SIZE - 32
        fs.vol.commit()
        assert fs.vol.alloc.free_blocks() < 4
        fs.release(fha)


def test_the_first_blocks_ahead_raise_an_older_volume_to_revision_5():
    dev = power_loss_volume(64 << 20)
    sb = read_superblock(dev)
    sb.format_rev = 4
    dev.write(sb.backup_bno, sb.image(sb.backup_bno))
    dev.write(0, sb.image(0))
    dev = dev.snapshot()
    m = DeviceMount(dev)
    fs = m.start()
    try:
        fh, di = fs.create(fs.root_ino, b"f", 0o100644, os.O_WRONLY, ROOT)
        fs.write(fh, 0, b"\x01" * CHUNK, ROOT)
        assert read_superblock(dev).format_rev == 4      # not for one write
        _stream(fs, fh, 3, CHUNK)
        assert fs.vol.dinode(di.bno).flags & DF_PREALLOC
        assert read_superblock(dev).format_rev == PREALLOC_SINCE
        fs.vol.commit()
        # a volume whose revision says there are no such blocks: fsck raises it
        bad = dev.snapshot()
        sb = read_superblock(bad)
        sb.format_rev = 4
        bad.write(sb.backup_bno, sb.image(sb.backup_bno))
        bad.write(0, sb.image(0))
        code, text = fsck_device(bad.snapshot())
        assert code != 0 and "DF_PREALLOC" in text and "revision 4" in text, text
        fs.release(fh)
    finally:
        m.stop()
    _fsck_clean(dev)


def test_blocks_freed_in_other_groups_do_not_stop_blocks_ahead():
    """Only the group's own blocks still pending count against its room: a big
    file just truncated elsewhere leaves the stream its blocks ahead."""
    with _mounted(64 << 20, walk=False) as (_dev, fs):
        fhx, x = fs.create(fs.root_ino, b"x", 0o100644, os.O_WRONLY, ROOT)
        fs.write(fhx, 0, b"\x02" * (12 << 20), ROOT)
        fs.vol.commit()
        fs.setattr(x.bno, size=0, ctx=ROOT)        # 3,072 blocks pending a commit
        assert fs.vol.alloc.pending_blocks() > fs.vol.sb.rgrp_blocks
        fh, y = fs.create(fs.root_ino, b"y", 0o100644, os.O_WRONLY, ROOT)
        _stream(fs, fh, 4)
        assert _ahead(fs, y.bno) > 0
        fs.release(fh)
        fs.release(fhx)


def test_a_clone_planned_before_the_source_shrank_shares_none_of_its_blocks_ahead(
        monkeypatch):
    """A cluster runs a copy_file_range clone step by step, other requests in
    between: the source truncated and streamed again meanwhile has blocks mapped
    ahead inside the planned range, which stay holes in the copy."""
    monkeypatch.setattr(inode, "CLONE_STEP", 1)
    with _mounted(64 << 20) as (_dev, fs):
        fv, _v = fs.create(fs.root_ino, b"victim", 0o100644, os.O_RDWR, ROOT)
        fs.write(fv, 0, STALE * 64, ROOT)
        fs.release(fv)
        fs.unlink(fs.root_ino, b"victim")
        fs.vol.commit()                      # its blocks, holding STALE, are free
        fsrc, src = fs.create(fs.root_ino, b"src", 0o100644, os.O_RDWR, ROOT)
        for i in range(0, 64, 2):            # 32 extents: many clone steps
            fs.write(fsrc, i * BLOCK_SIZE, b"A" * BLOCK_SIZE, ROOT)
        fs.write(fsrc, 63 * BLOCK_SIZE, b"A" * BLOCK_SIZE, ROOT)
        fdst, dst = fs.create(fs.root_ino, b"dst", 0o100644, os.O_RDWR, ROOT)
        plan = fs.copy_range_begin(fsrc, 0, fdst, 0, 64 * BLOCK_SIZE)
        where = fs.copy_range_step(plan, (0, 0))
        fs.setattr(src.bno, size=0, ctx=ROOT)
        fs.vol.commit()
        h2 = fs.open(src.bno, os.O_WRONLY)
        new = _stream(fs, h2, 2)
        assert _ahead(fs, src.bno) > 0
        _stain_ahead(fs, src.bno)
        while where is not None:
            where = fs.copy_range_step(plan, where)
        size = fs.getattr(dst.bno).size
        got = fs.read(fdst, 0, size)
        for b in range(0, size, BLOCK_SIZE):
            blk = got[b:b + BLOCK_SIZE]
            assert blk in (b"A" * BLOCK_SIZE, bytes(BLOCK_SIZE)) or \
                blk == new[b:b + BLOCK_SIZE], f"block {b // BLOCK_SIZE}: {blk[:8]!r}"
        for fh in (fsrc, fdst, h2):
            fs.release(fh)


def _full_but_ahead(fs):
    """A file ``f`` with blocks mapped ahead that no handle of this node streamed
    into (as after its writer's crash), and a volume full but for them."""
    fh, f = fs.create(fs.root_ino, b"f", 0o100644, os.O_RDWR, ROOT)
    _stream(fs, fh, 8)
    fs.mapped_ahead.discard(f.bno)           # (a crashed node's, for this node)
    ahead = _ahead(fs, f.bno)
    assert ahead >= 8
    _fill(fs, b"g")
    fs.vol.commit()
    assert fs.vol.alloc.free_blocks() < 4
    return fh, f, ahead


@pytest.mark.parametrize("how", ["write-past", "fallocate"])
def test_a_full_volume_gives_a_files_own_blocks_ahead_to_its_next_extension(how):
    with _mounted(16 << 20) as (_dev, fs):
        fh, f, ahead = _full_but_ahead(fs)
        size = fs.getattr(f.bno).size
        if how == "write-past":
            at = size + (ahead + 2) * BLOCK_SIZE
            fs.write(fh, at, b"z" * 4 * BLOCK_SIZE, ROOT)
            assert fs.read(fh, size, at + 4 * BLOCK_SIZE - size) == \
                bytes(at - size) + b"z" * 4 * BLOCK_SIZE
        else:
            fs.fallocate(fh, 0, size, 4 * BLOCK_SIZE)
            assert fs.read(fh, size, 4 * BLOCK_SIZE) == bytes(4 * BLOCK_SIZE)
        fs.release(fh)



def test_a_grow_that_cannot_read_the_revision_thaws_the_volume(monkeypatch):
    """A grow reads the format revision from the disk while frozen (another node
    may have raised it); when that read fails, the volume is thawed all the same."""
    import trio

    from clusterfs.errors import CorruptBlock
    from clusterfs.fs import admin
    from clusterfs.fuse.ops import DirectFrontend

    dev = power_loss_volume(16 << 20)
    m = DeviceMount(dev)
    fs = m.start()
    try:
        class Node:
            vol = fs.vol
            slot = 0
            node = "n1"

        def unreadable(buf, bno):
            raise CorruptBlock(bno, "unreadable superblock (test)")

        adm = admin.SingleNodeAdmin(Node, DirectFrontend(fs))
        monkeypatch.setattr(admin.Superblock, "decode", unreadable)
        with pytest.raises(CorruptBlock):
            trio.run(adm.grow, fs.vol.sb.total_blocks + 4096)
        assert not adm.frozen and not fs.vol.frozen
    finally:
        monkeypatch.undo()
        m.stop()
    _fsck_clean(dev)
