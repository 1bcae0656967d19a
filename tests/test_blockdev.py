"""The block device layer: image files (buffered and O_DIRECT) and the power-loss device."""

import os
import random

import pytest

from clusterfs.ondisk.blockdev import BLOCK_SIZE, BlockDevice, PowerCut, PowerLossDevice


def _blk(byte: int) -> bytes:
    return bytes([byte]) * BLOCK_SIZE


@pytest.mark.parametrize("direct", [False, True])
def test_image_file_roundtrip(tmp_path, direct):
    path = tmp_path / "vol.img"
    with open(path, "wb") as f:
        f.truncate(64 * BLOCK_SIZE)
    with BlockDevice(str(path), direct=direct) as dev:
        assert dev.nblocks == 64
        dev.write(3, _blk(7) + _blk(8))
        dev.flush()
        assert dev.read(3, 2) == _blk(7) + _blk(8)
        assert dev.read(0) == bytes(BLOCK_SIZE)
        with pytest.raises(OSError):
            dev.read(63, 2)
        with pytest.raises(ValueError):
            dev.write(1, b"short")
    assert os.path.getsize(path) == 64 * BLOCK_SIZE


def test_write_guard_stops_writes(tmp_path):
    path = tmp_path / "vol.img"
    with open(path, "wb") as f:
        f.truncate(8 * BLOCK_SIZE)

    def fenced():
        raise OSError(5, "fenced")

    with BlockDevice(str(path)) as dev:
        dev.write_guard = fenced
        with pytest.raises(OSError):
            dev.write(0, _blk(1))
        with pytest.raises(OSError):
            dev.flush()
        assert dev.read(0) == bytes(BLOCK_SIZE)


def test_powerloss_drops_unflushed():
    dev = PowerLossDevice(16)
    dev.write(1, _blk(1))
    dev.flush()
    dev.write(1, _blk(2))
    dev.write(2, _blk(3))
    assert dev.read(1) == _blk(2)
    after = dev.crash()
    assert after.read(1) == _blk(1)
    assert after.read(2) == bytes(BLOCK_SIZE)
    kept = dev.crash(keep=[1])
    assert kept.read(1) == _blk(1) and kept.read(2) == _blk(3)


def test_powerloss_tears_at_sector_granularity():
    dev = PowerLossDevice(4)
    dev.write(0, _blk(0xAA))
    dev.flush()
    dev.write(0, _blk(0x55))
    torn = dev.crash(tear={0: 3}).read(0)
    assert torn[:3 * 512] == bytes([0x55]) * 1536
    assert torn[1536:] == bytes([0xAA]) * (BLOCK_SIZE - 1536)


def test_powerloss_cut_after_and_random_subsets():
    dev = PowerLossDevice(8)
    dev.cut_after(2)
    dev.write(0, _blk(1))
    with pytest.raises(PowerCut):
        dev.write(1, _blk(2))
    assert dev.read(1) == bytes(BLOCK_SIZE)   # the cut write never happened
    rng = random.Random(5)
    outcomes = {dev.crash(rng=rng).read(0) for _ in range(50)}
    assert _blk(1) in outcomes and bytes(BLOCK_SIZE) in outcomes
