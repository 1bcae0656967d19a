"""Helpers shared by the journal tests: a small volume, block contents, odd devices."""

from __future__ import annotations

import hashlib

from clusterfs.ondisk.blockdev import BLOCK_SIZE, PowerLossDevice
from journal import Journal

BS = BLOCK_SIZE
START = 64          # journal header block
LENGTH = 64         # the minimum: header + 63 log blocks
NBLOCKS = 256       # home blocks: 0..63 and 128..255
ZERO = bytes(BS)


def blk(*key) -> bytes:
    """A 4096-byte block whose contents depend on ``key`` (and differ for each key)."""
    seed = hashlib.sha256(repr(key).encode()).digest()
    return (seed * (BS // len(seed)))[:BS]


def make(*, length: int = LENGTH, nblocks: int = NBLOCKS, start: int = START,
         slot: int = 0, opened: bool = True) -> tuple[PowerLossDevice, Journal]:
    """A formatted journal on a fresh power-loss device, opened unless told otherwise."""
    dev = PowerLossDevice(nblocks)
    Journal.format(dev, start, length, slot=slot)
    j = Journal(dev, start, length, slot=slot)
    if opened:
        j.open("test")
    return dev, j


def again(dev, *, length: int = LENGTH, start: int = START, slot: int = 0) -> Journal:
    """A new Journal instance on ``dev`` (as a remount or another node would make)."""
    return Journal(dev, start, length, slot=slot)


def log_bno(pos: int, start: int = START) -> int:
    """Absolute block number of log index ``pos``."""
    return start + 1 + pos


def flip(dev: PowerLossDevice, bno: int, offset: int = 100) -> None:
    """Flip one byte of a block, durably (media corruption)."""
    buf = bytearray(dev.read(bno))
    buf[offset] ^= 0xFF
    dev.write(bno, bytes(buf))
    dev.flush()


class ImageObj:
    """An ``image()`` source whose contents can change until commit."""

    def __init__(self, data: bytes):
        self.data = data
        self.calls = 0

    def image(self) -> bytes:
        self.calls += 1
        return self.data


class RecordingDevice:
    """Wraps a device and records its writes and flushes, in order."""

    def __init__(self, inner):
        self.inner = inner
        self.nblocks = inner.nblocks
        self.ops: list[tuple] = []

    def read(self, bno, count=1):
        return self.inner.read(bno, count)

    def write(self, bno, data):
        self.ops.append(("write", bno, len(data) // BS))
        self.inner.write(bno, data)

    def flush(self):
        self.ops.append(("flush",))
        self.inner.flush()


class FaultyDevice:
    """Wraps a device: reads of ``bad_reads`` raise EIO; writes fail once armed."""

    def __init__(self, inner, bad_reads=(), fail_writes: bool = False):
        self.inner = inner
        self.nblocks = inner.nblocks
        self.bad_reads = set(bad_reads)
        self.fail_writes = fail_writes

    def read(self, bno, count=1):
        if any(b in self.bad_reads for b in range(bno, bno + count)):
            raise OSError(5, f"I/O error reading block {bno}+{count}")
        return self.inner.read(bno, count)

    def write(self, bno, data):
        if self.fail_writes:
            raise OSError(5, f"I/O error writing block {bno}")
        self.inner.write(bno, data)

    def flush(self):
        if self.fail_writes:
            raise OSError(5, "I/O error on flush")
        self.inner.flush()
