"""fsck's block reader (``fsck.device.read_blocks``): bytes, bad blocks, read-ahead."""

from __future__ import annotations

import os

import pytest

from clusterfs.ondisk.blockdev import BlockDevice
from fsck import device as fdev
from fsck.device import PREFETCH_MAX, PREFETCH_MIN, read_blocks

BS = 4096
NBLOCKS = 4096


@pytest.fixture
def image(tmp_path):
    """An image file whose block b holds b's number in every 8-byte word."""
    path = str(tmp_path / "img")
    with open(path, "wb") as f:
        for b in range(NBLOCKS):
            f.write(b.to_bytes(8, "little") * (BS // 8))
    dev = BlockDevice(path, direct=False, readonly=True)
    yield dev
    dev.close()


def block_no(data) -> int:
    data = bytes(data)
    assert len(data) == BS
    assert data == data[:8] * (BS // 8)
    return int.from_bytes(data[:8], "little")


@pytest.mark.parametrize("max_gap", [0, 3])
def test_every_block_read_whole_and_in_order(image, max_gap):
    bnos = [1, 2, 3, 7, 8, 20, 21, 100, 4000, 4095]
    got = [(b, block_no(d)) for b, d in read_blocks(image, bnos, max_gap=max_gap)]
    assert got == [(b, b) for b in bnos]


class Faulty:
    """A direct device whose chosen blocks fail to read (EIO)."""

    def __init__(self, dev, bad):
        self.dev, self.bad = dev, set(bad)

    def read(self, bno, count=1):
        if self.bad & set(range(bno, bno + count)):
            raise OSError(5, f"I/O error at {bno}")
        return self.dev.read(bno, count)


def test_unreadable_block_costs_only_itself(image):
    dev = Faulty(image, {11})
    got = dict(read_blocks(dev, list(range(8, 15))))
    assert got[11] is None
    assert all(block_no(got[b]) == b for b in got if b != 11)


@pytest.mark.skipif(not hasattr(os, "RWF_NOWAIT") or not hasattr(os, "posix_fadvise"),
                    reason="needs RWF_NOWAIT and posix_fadvise")
@pytest.mark.parametrize("pattern", ["warm", "few", "cold"])
def test_read_ahead_follows_the_misses(image, monkeypatch, pattern):
    """Blocks missing from the page cache are simulated (RWF_NOWAIT fails for them):
    a warm cache announces nothing, a few misses announce a short window each, a
    cold cache grows the window to its largest."""
    bnos = list(range(0, NBLOCKS, 2))
    if pattern == "warm":
        missing = set()
    elif pattern == "few":
        missing = {bnos[100], bnos[900], bnos[1500]}
    else:
        missing = set(bnos)
    advised = []
    asked = []              # blocks asked of the page cache alone
    real_preadv = os.preadv

    def preadv(fd, bufs, offset, flags=0):
        if flags & os.RWF_NOWAIT:
            asked.append(offset // BS)
            if offset // BS in missing:
                raise BlockingIOError(11, "would block")
        return real_preadv(fd, bufs, offset, flags)

    monkeypatch.setattr(fdev.os, "preadv", preadv)
    monkeypatch.setattr(fdev.os, "posix_fadvise",
                        lambda fd, off, ln, adv: advised.append(off // BS))
    got = [(b, block_no(d)) for b, d in read_blocks(image, bnos)]
    assert got == [(b, b) for b in bnos]
    if pattern == "warm":
        assert advised == []
        assert asked == bnos
    elif pattern == "few":
        # one short window from each miss, never the blocks far behind or ahead
        assert len(advised) == 3 * PREFETCH_MIN
        for m in sorted(missing):
            i = bnos.index(m)
            assert bnos[i:i + PREFETCH_MIN] == [b for b in advised if m <= b < m + 2 *
                                                PREFETCH_MIN]
    else:
        # every block announced once, in windows that double up to PREFETCH_MAX,
        # each opened by one block asked of the page cache alone
        assert advised == bnos
        starts, i, w = [], 0, PREFETCH_MIN
        while i < len(bnos):
            starts.append(i)
            i, w = i + w, min(2 * w, PREFETCH_MAX)
        assert len(starts) == 7         # 32 + 64 + ... + 1024, then the last 32
        assert [bnos.index(b) for b in asked] == starts
