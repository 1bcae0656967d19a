"""Named crash scenarios (no FUSE), one per property, each with a precise check."""

from __future__ import annotations

import os

import pytest

from clusterfs.blockdev import PowerCut
from clusterfs.format import BLOCK_SIZE
from tests.crash.workload import CTX
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
