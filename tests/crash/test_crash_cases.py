"""Named crash scenarios (no FUSE), one per property, each with a precise check."""

from __future__ import annotations

import os

import pytest

from clusterfs.ondisk.blockdev import PowerCut
from clusterfs.ondisk.format import BLOCK_SIZE
from tests.crash.crash_workload import CTX
from tests.helpers import DeviceMount, check_consistency, power_loss_volume


def _mount(dev):
    m = DeviceMount(dev)
    return m, m.start()


def _read(fs, name: bytes) -> bytes:
    di = fs.lookup(fs.root_ino, name)
    fh = fs.open(di.bno, os.O_RDONLY)
    try:
        return fs.read(fh, 0, di.size + 1)
    finally:
        fs.release(fh)


@pytest.mark.parametrize("extend", ["truncate", "gap-write", "append"])
def test_uncommitted_write_past_eof_never_shows_after_extension(extend):
    """A write into the last block past EOF reaches the disk, its size change never
    commits (power cut).  Extending the file later must read zeros there."""
    dev = power_loss_volume()
    m, fs = _mount(dev)
    base = os.urandom(5000)
    fh, di = fs.create(fs.root_ino, b"f", 0o644, os.O_RDWR, CTX)
    fs.write(fh, 0, base)
    fs.fsync(fh, False)
    fs.write(fh, 5000, b"\xff" * 2000)      # in place into block 1, not committed
    crashed = dev.crash(keep=range(len(dev.pending)))
    m, fs = _mount(crashed)
    assert _read(fs, b"f") == base
    ino = fs.lookup(fs.root_ino, b"f").bno
    if extend == "truncate":
        fs.setattr(ino, size=3 * BLOCK_SIZE)
        want = base + bytes(3 * BLOCK_SIZE - 5000)
    elif extend == "gap-write":
        fh = fs.open(ino, os.O_RDWR)
        fs.write(fh, 6500, b"x")
        fs.release(fh)
        want = base + bytes(1500) + b"x"
    else:
        fh = fs.open(ino, os.O_RDWR)
        fs.write(fh, 5000, b"y")
        fs.setattr(ino, size=8000)
        fs.release(fh)
        want = base + b"y" + bytes(2999)
    assert _read(fs, b"f") == want
    m.stop()
    assert check_consistency(crashed, tail_zero=False) == []


def test_fsynced_file_survives_crash_in_later_fsync():
    """Power cut in every event of a later fsync: the earlier fsynced file is exact."""
    for cut in range(1, 12):
        dev = power_loss_volume()
        m, fs = _mount(dev)
        data = os.urandom(70000)
        fh, _ = fs.create(fs.root_ino, b"a", 0o644, os.O_RDWR, CTX)
        fs.write(fh, 0, data)
        fs.fsync(fh, False)
        fs.release(fh)
        fh, _ = fs.create(fs.root_ino, b"b", 0o644, os.O_RDWR, CTX)
        fs.write(fh, 0, os.urandom(40000))
        dev.cut_after(cut)
        try:
            fs.fsync(fh, False)
            fs.release(fh)
            m.stop()
        except PowerCut:
            pass
        for crashed in (dev.crash(), dev.crash(keep=range(len(dev.pending)))):
            m2, fs2 = _mount(crashed)
            assert _read(fs2, b"a") == data
            m2.stop()
            assert check_consistency(crashed, tail_zero=False) == []


def test_orphan_of_a_crash_is_freed_at_next_mount():
    dev = power_loss_volume()
    m, fs = _mount(dev)
    free0 = fs.statfs()["bfree"]
    fh, di = fs.create(fs.root_ino, b"o", 0o644, os.O_RDWR, CTX)
    fs.write(fh, 0, os.urandom(200000))
    fs.unlink(fs.root_ino, b"o")
    fs.write(fh, 200000, b"still writable")
    assert fs.read(fh, 199990, 100) .endswith(b"still writable")
    fs.fsync(fh, False)
    assert check_consistency(dev.crash(), allow_unlinked=True) == []
    crashed = dev.crash()
    m, fs = _mount(crashed)
    assert fs.statfs()["bfree"] == free0
    m.stop()
    assert check_consistency(crashed, tail_zero=False) == []


def _freed_inode_then_data(checkpoint_first: bool):
    """b, then a right after it (a's dinode is b's data goal); a is committed (and
    checkpointed home), then unlinked; b's data is written before that commits."""
    dev = power_loss_volume()
    m, fs = _mount(dev)
    fh_b, b = fs.create(fs.root_ino, b"b", 0o644, os.O_RDWR, CTX)
    fh_a, a = fs.create(fs.root_ino, b"a", 0o644, os.O_RDWR, CTX)
    fs.write(fh_a, 0, b"inline bytes of a")
    fs.release(fh_a)
    fs.fsync(fh_b, False)
    if checkpoint_first:
        fs.vol.checkpoint()
    fs.unlink(fs.root_ino, b"a")                   # a's dinode block: free, uncommitted
    data = os.urandom(64 * BLOCK_SIZE)
    fs.write(fh_b, 0, data)                        # b's data goes right after b
    return dev, m, fs, fh_b, data


def test_freed_inode_block_not_reused_for_data_before_commit_crash():
    """An inode freed in the running transaction is still the committed state: after
    a power cut it is back, so file data must not have been written over it."""
    dev, m, fs, fh_b, data = _freed_inode_then_data(checkpoint_first=True)
    crashed = dev.crash(keep=range(len(dev.pending)))
    m2, fs2 = _mount(crashed)
    assert _read(fs2, b"a") == b"inline bytes of a"
    m2.stop()
    assert check_consistency(crashed, tail_zero=False) == []


def test_freed_inode_block_not_reused_for_data_before_commit_checkpoint():
    """The journal checkpoints committed images home before it writes the running
    transaction when the log is full: the freed inode's old image must not land on
    file data written in the meantime."""
    dev, m, fs, fh_b, data = _freed_inode_then_data(checkpoint_first=False)
    j = fs.vol.journal
    j._used = j.log_size          # the log is full: the next commit checkpoints first
    fs.fsync(fh_b, False)
    assert fs.read(fh_b, 0, len(data) + 1) == data
    fs.release(fh_b)
    m.stop()
    m3, fs3 = _mount(dev)
    assert _read(fs3, b"b") == data
    m3.stop()
    assert check_consistency(dev, tail_zero=True) == []


def test_background_commit_keeps_freed_blocks_until_it_is_written():
    """The periodic commit is sealed on the event loop and written on a worker
    thread (``commit_in_thread``: ``commit_begin``, the writes, ``commit_end``).  Blocks the sealed
    transaction frees must not take new file data before its writes are done: a
    power cut in between brings the deleted file back, with its own data."""
    dev = power_loss_volume()
    m, fs = _mount(dev)
    old = os.urandom(64 * BLOCK_SIZE)
    fh, di = fs.create(fs.root_ino, b"old", 0o644, os.O_RDWR, CTX)
    fs.write(fh, 0, old)
    fs.release(fh)
    fs.vol.commit()
    fs.unlink(fs.root_ino, b"old")
    token = fs.vol.commit_begin()          # sealed, not written
    assert token is not None
    new = os.urandom(256 * BLOCK_SIZE)
    fh, di2 = fs.create(fs.root_ino, b"new", 0o644, os.O_RDWR, CTX)
    fs.write(fh, 0, new)                   # data goes to the device now
    fs.release(fh)
    crashed = dev.crash(keep=range(len(dev.pending)))   # before the sealed writes
    m2, fs2 = _mount(crashed)
    assert _read(fs2, b"old") == old       # its blocks were never reused
    m2.stop()
    assert check_consistency(crashed, tail_zero=False) == []
    fs.vol.commit_end(token)              # the writes, then the frees are released
    assert not fs.vol.alloc.pending_free   # released: reusable now
    assert _read(fs, b"new") == new
    m.stop()
    assert check_consistency(dev) == []
