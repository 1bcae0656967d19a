"""fallocate and power cuts (no FUSE): every step of a long fallocate is a consistent
file, a power cut anywhere leaves a consistent volume whose file shows only its old
bytes or zeros, and no byte left on the device past EOF shows after a preallocation
or a zeroing grows the file."""

from __future__ import annotations

import os
import random

import pytest

from clusterfs.fs import inode
from clusterfs.fs.filedata import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE,
                                   FALLOC_FL_ZERO_RANGE)
from clusterfs.ondisk.blockdev import PowerCut
from clusterfs.ondisk.format import BLOCK_SIZE
from tests.crash.crash_workload import CTX
from tests.helpers import DeviceMount, fsck_device, power_loss_volume

BS = BLOCK_SIZE
KEEP = FALLOC_FL_KEEP_SIZE
PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
ZERO = FALLOC_FL_ZERO_RANGE


def _mount(dev):
    m = DeviceMount(dev)
    return m, m.start()


def _recovered(dev, name: bytes = b"f") -> tuple[int, bytes]:
    """Mount a crashed device (journal replay), read the file, unmount, fsck."""
    m, fs = _mount(dev)
    di = fs.lookup(fs.root_ino, name)
    fh = fs.open(di.bno, os.O_RDONLY)
    data = fs.read(fh, 0, di.size + BS)
    fs.release(fh)
    m.stop()
    code, text = fsck_device(dev)
    assert code == 0, text
    return di.size, data


@pytest.mark.parametrize("mode", [0, ZERO])
def test_uncommitted_bytes_past_eof_never_show_after_growth(mode):
    """A write into the last block past EOF reaches the disk, its size change never
    commits (power cut).  A preallocation or zeroing that grows the file over that
    block reads zeros there."""
    dev = power_loss_volume()
    m, fs = _mount(dev)
    base = os.urandom(5000)
    fh, _di = fs.create(fs.root_ino, b"f", 0o644, os.O_RDWR, CTX)
    fs.write(fh, 0, base)
    fs.fsync(fh, False)
    fs.write(fh, 5000, b"\xff" * 2000)      # in place into block 1, not committed
    crashed = dev.crash(keep=range(len(dev.pending)))
    m, fs = _mount(crashed)
    ino = fs.lookup(fs.root_ino, b"f").bno
    fh = fs.open(ino, os.O_RDWR)
    fs.fallocate(fh, mode, 6000, 3 * BS)
    assert fs.read(fh, 0, 6 * BS) == base + bytes(6000 + 3 * BS - 5000)
    fs.release(fh)
    m.stop()


def _steps(fs, fh, mode, off, length, after_step) -> None:
    """``Filesystem.fallocate``'s steps one by one, ``after_step()`` after each."""
    fs.fallocate_begin(fh, mode, off, length)
    pos = 0
    while pos is not None:
        pos = fs.fallocate_step(fh, mode, off, length, pos)
        after_step()


@pytest.mark.parametrize("mode", [0, ZERO, PUNCH])
def test_every_step_is_a_consistent_file(mode):
    """The volume as a power cut right after each step's commit leaves it: fsck
    clean, the size between the old and the new one, the old bytes where the
    range is not, zeros elsewhere (a punch: the old bytes or zeros in the range)."""
    dev = power_loss_volume(32 << 20)
    m, fs = _mount(dev)
    fh, _di = fs.create(fs.root_ino, b"f", 0o644, os.O_RDWR, CTX)
    nblocks = 5 * inode.FALLOC_STEP // 2
    if mode == PUNCH:
        # many extents: every other block, several punch steps
        base = os.urandom(2 * inode.TRUNCATE_STEP * 3 * BS)
        fs.write(fh, 0, base)
        for b in range(1, len(base) // BS, 2):
            fs.fallocate(fh, PUNCH, b * BS, BS)
        base = fs.read(fh, 0, len(base))
        off, length = 10, len(base)
    else:
        base = os.urandom(10 * BS + 7)
        fs.write(fh, 0, base)
        off, length = 5 * BS + 3, nblocks * BS
    fs.fsync(fh, False)
    states = []

    def after_step():
        fs.vol.commit()
        states.append(dev.snapshot())
    _steps(fs, fh, mode, off, length, after_step)
    assert len(states) >= 3
    fs.release(fh)
    m.stop()
    end = off + length
    for snap in states:
        size, data = _recovered(snap)
        assert len(base) <= size <= max(len(base), end)
        assert data[:off] == base[:off]
        if mode == PUNCH:
            _old_or_zero(data[off:size], base[off:size])
        elif mode == ZERO:
            assert not any(data[off:size])
        else:
            assert data[off:len(base)] == base[off:]
            assert not any(data[len(base):size])
    # the last state is the whole fallocate
    if mode == PUNCH:
        assert size == len(base) and not any(data[off:size])
    else:
        assert size == max(len(base), end)


def _old_or_zero(data: bytes, old: bytes) -> None:
    """Every byte of ``data`` is the one of ``old`` or zero."""
    for i in range(0, len(data), 512):
        got, was = data[i:i + 512], old[i:i + 512]
        if got != was and any(got):
            # a sector half written (an edge block zeroed in place): byte by byte
            bad = [j for j, (g, w) in enumerate(zip(got, was)) if g not in (w, 0)]
            assert not bad, f"byte {i + bad[0]} is neither the old one nor zero"


@pytest.mark.parametrize("mode", [0, KEEP, ZERO, PUNCH])
def test_power_cut_anywhere(mode):
    """A power cut at each device event of a fallocate (steps committed as they go),
    with the unflushed writes kept, dropped or torn at random: the recovered volume
    is consistent and the file shows its old bytes or zeros, never anything else."""
    nblocks = 3 * inode.FALLOC_STEP // 2
    base = os.urandom(6 * BS + 100)
    off, length = 2 * BS + 50, nblocks * BS
    seen_cut = 0
    for cut in range(1, 400):
        dev = power_loss_volume(32 << 20)
        m, fs = _mount(dev)
        fh, di = fs.create(fs.root_ino, b"f", 0o644, os.O_RDWR, CTX)
        fs.write(fh, 0, base)
        fs.setattr(di.bno, size=len(base) + 3 * BS)     # a hole at the end
        fs.fsync(fh, False)
        old = fs.read(fh, 0, di.size)
        dev.cut_after(cut)
        try:
            _steps(fs, fh, mode, off, length, fs.vol.commit)
            fs.fsync(fh, False)
        except PowerCut:
            seen_cut += 1
        else:
            dev.cut_at = None
            fs.release(fh)
            m.stop()
            break
        size, data = _recovered(dev.crash(rng=random.Random(cut)))
        assert len(old) <= size <= max(len(old), off + length)
        assert data[:off] == old[:off]
        _old_or_zero(data[:size], old.ljust(size, b"\0"))
    assert seen_cut >= 5, seen_cut
