"""fallocate and SEEK_DATA / SEEK_HOLE through ``Filesystem``, without FUSE.

The volume is a ``PowerLossDevice`` (or an image file for the big case) mounted with
``DeviceMount``; every test ends with the fsck oracle.  The model test drives random
writes, truncations, preallocations, punches and zeroings against a bytearray and a
per-block hole model, and checks reads, the extent map and lseek's answers.
"""

from __future__ import annotations

import errno
import os
import stat as S

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from clusterfs.errors import FSError
from clusterfs.fs import inode
from clusterfs.fs.filedata import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE,
                                   FALLOC_FL_ZERO_RANGE)
from clusterfs.fs.posix import Ctx
from clusterfs.ondisk.format import BLOCK_SIZE, DF_EXTENTS, DF_INLINE
from tests.helpers import DeviceMount, fsck_device, power_loss_volume

BS = BLOCK_SIZE
KEEP = FALLOC_FL_KEEP_SIZE
PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
ZERO = FALLOC_FL_ZERO_RANGE
CTX = Ctx(uid=0, gid=0)


def _mount(dev):
    m = DeviceMount(dev)
    return m, m.start()


def _fsck(dev) -> None:
    code, text = fsck_device(dev)
    assert code == 0, text


def _errno(fn, *args) -> int:
    with pytest.raises(FSError) as ei:
        fn(*args)
    return ei.value.errno


def _mapped(fs, di) -> set[int]:
    """The file's mapped logical blocks."""
    return {lb + i for lb, _pb, n in inode.extents(fs.vol, di) for i in range(n)}


def _phys(fs, di) -> set[int]:
    return {pb + i for _lb, pb, n in inode.extents(fs.vol, di) for i in range(n)}


def _extent_file(fs, name: bytes = b"f"):
    """An open, empty file past its inline stage (an extent file: holes are
    holes, not inline bytes)."""
    fh, di = fs.create(fs.root_ino, name, 0o644, os.O_RDWR, CTX)
    fs.write(fh, 0, b"x" * (2 * BS))
    fs.setattr(di.bno, size=0)
    assert di.flags & DF_EXTENTS and di.blocks == 0
    return fh, di


@pytest.fixture
def vol():
    dev = power_loss_volume(16 << 20)
    m, fs = _mount(dev)
    yield dev, fs
    m.stop()
    _fsck(dev)


# -- errors ------------------------------------------------------------------------------

def test_errors(vol):
    _dev, fs = vol
    fh, di = _extent_file(fs)
    assert _errno(fs.fallocate, fh, 0, -1, 10) == errno.EINVAL
    assert _errno(fs.fallocate, fh, 0, 0, 0) == errno.EINVAL
    assert _errno(fs.fallocate, fh, 0, 0, -5) == errno.EINVAL
    assert _errno(fs.fallocate, fh, 0x20, 0, 10) == errno.EOPNOTSUPP     # unknown bit
    assert _errno(fs.fallocate, fh, 0x08, 0, 10) == errno.EOPNOTSUPP     # collapse
    assert _errno(fs.fallocate, fh, KEEP | 0x40, 0, 10) == errno.EOPNOTSUPP
    # as Linux's vfs_fallocate: a punch must keep the size and is no zeroing
    assert _errno(fs.fallocate, fh, FALLOC_FL_PUNCH_HOLE, 0, 10) == errno.EOPNOTSUPP
    assert _errno(fs.fallocate, fh, PUNCH | ZERO, 0, 10) == errno.EOPNOTSUPP
    assert _errno(fs.fallocate, fh, 0, 0, inode.MAX_FILE_BLOCKS * BS + 1) == errno.EFBIG
    assert _errno(fs.fallocate, fh, 0, 0, inode.MAX_FILE_BLOCKS * BS) == errno.ENOSPC
    assert _errno(fs.fallocate, 9999, 0, 0, 10) == errno.EBADF
    ro = fs.open(di.bno, os.O_RDONLY)
    for mode in (0, KEEP, PUNCH, ZERO):
        assert _errno(fs.fallocate, ro, mode, 0, 10) == errno.EBADF
    fs.release(ro)
    fifo = fs.mknod(fs.root_ino, b"fifo", S.S_IFIFO | 0o644, 0, CTX)
    h = fs.open(fifo.bno, os.O_RDWR)
    assert _errno(fs.fallocate, h, 0, 0, 10) == errno.ESPIPE
    fs.release(h)
    dev = fs.mknod(fs.root_ino, b"chr", S.S_IFCHR | 0o644, 0x0103, CTX)
    h = fs.open(dev.bno, os.O_RDWR)
    assert _errno(fs.fallocate, h, 0, 0, 10) == errno.ENODEV
    assert _errno(fs.lseek, h, 0, os.SEEK_DATA) == errno.EINVAL
    fs.release(h)
    d = fs.mkdir(fs.root_ino, b"d", 0o755, CTX)
    h = fs.opendir(d.bno)
    # a directory is never open for writing
    assert _errno(fs.fallocate, h, 0, 0, 10) == errno.EBADF
    assert _errno(fs.lseek, h, 0, os.SEEK_HOLE) == errno.EINVAL
    fs.releasedir(h)
    # nothing above changed the file
    assert di.size == 0 and di.blocks == 0
    # lseek
    fs.write(fh, 0, b"y" * 100)
    assert _errno(fs.lseek, fh, 0, os.SEEK_SET) == errno.EINVAL
    assert _errno(fs.lseek, fh, 100, os.SEEK_DATA) == errno.ENXIO
    assert _errno(fs.lseek, fh, 100, os.SEEK_HOLE) == errno.ENXIO
    assert _errno(fs.lseek, fh, -1, os.SEEK_DATA) == errno.ENXIO
    assert _errno(fs.lseek, 9999, 0, os.SEEK_DATA) == errno.EBADF
    fs.release(fh)


# -- each mode ---------------------------------------------------------------------------

def test_mode0_preallocates_and_extends(vol):
    _dev, fs = vol
    fh, di = _extent_file(fs)
    data = os.urandom(5000)
    fs.write(fh, 0, data)
    fs.fallocate(fh, 0, 3 * BS + 100, 2 * BS)     # blocks 3..5, size to 5 blocks + 100
    assert di.size == 5 * BS + 100
    assert _mapped(fs, di) == {0, 1, 3, 4, 5}
    assert di.blocks == 5
    assert fs.read(fh, 0, 10 * BS) == data + bytes(di.size - 5000)
    # within the file: only holes are filled, the bytes stay
    fs.fallocate(fh, 0, 0, 4 * BS)
    assert _mapped(fs, di) == {0, 1, 2, 3, 4, 5} and di.size == 5 * BS + 100
    assert fs.read(fh, 0, 10 * BS) == data + bytes(di.size - 5000)
    # a range wholly inside the file does not shrink it
    fs.fallocate(fh, 0, 10, 10)
    assert di.size == 5 * BS + 100
    fs.release(fh)


def test_keep_size_preallocates_inside_eof_only(vol):
    _dev, fs = vol
    fh, di = _extent_file(fs)
    fs.setattr(di.bno, size=4 * BS + 10)          # all holes
    fs.fallocate(fh, KEEP, BS, 100 * BS)
    assert di.size == 4 * BS + 10
    # the format maps nothing past EOF: blocks 1..4 (4 holds the last 10 bytes)
    assert _mapped(fs, di) == {1, 2, 3, 4}
    assert fs.read(fh, 0, 10 * BS) == bytes(di.size)
    fs.fallocate(fh, KEEP, 50 * BS, BS)           # wholly past EOF: nothing to do
    assert _mapped(fs, di) == {1, 2, 3, 4} and di.size == 4 * BS + 10
    fs.release(fh)


def test_punch_hole(vol):
    _dev, fs = vol
    fh, di = _extent_file(fs)
    data = bytearray(os.urandom(10 * BS + 300))
    fs.write(fh, 0, bytes(data))
    fs.fallocate(fh, PUNCH, BS + 1, 4 * BS)       # bytes BS+1 .. 5BS+1: frees 2, 3, 4
    data[BS + 1:5 * BS + 1] = bytes(4 * BS)
    assert _mapped(fs, di) == set(range(11)) - {2, 3, 4}
    assert di.blocks == 8 and di.size == len(data)
    assert fs.read(fh, 0, 20 * BS) == bytes(data)
    # inside one block: only zeroes
    fs.fallocate(fh, PUNCH, 6 * BS + 10, 20)
    data[6 * BS + 10:6 * BS + 30] = bytes(20)
    assert 6 in _mapped(fs, di)
    # to past EOF: the last, partial block goes too
    fs.fallocate(fh, PUNCH, 9 * BS, 100 * BS)
    data[9 * BS:] = bytes(len(data) - 9 * BS)
    assert _mapped(fs, di) == {0, 1, 5, 6, 7, 8} and di.size == len(data)
    assert fs.read(fh, 0, 20 * BS) == bytes(data)
    # a punch in the middle of one extent splits it
    fs.fallocate(fh, PUNCH, 6 * BS, BS)
    data[6 * BS:7 * BS] = bytes(BS)
    assert _mapped(fs, di) == {0, 1, 5, 7, 8}
    assert fs.read(fh, 0, 20 * BS) == bytes(data)
    # wholly past EOF: nothing
    fs.fallocate(fh, PUNCH, 100 * BS, BS)
    assert di.size == len(data)
    fs.release(fh)


def test_punch_hole_many_extents_in_steps(vol):
    """A punch over more extents than one step frees (TRUNCATE_STEP) takes several
    operations and leaves nothing mapped."""
    _dev, fs = vol
    fh, di = _extent_file(fs)
    nblocks = 4 * inode.TRUNCATE_STEP
    fs.write(fh, 0, os.urandom(nblocks * BS))
    for b in range(1, nblocks, 2):                 # every other block: many extents
        fs.fallocate(fh, PUNCH, b * BS, BS)
    assert len(inode.extents(fs.vol, di)) == nblocks // 2
    ops = fs.vol.stats["ops"]
    fs.fallocate(fh, PUNCH, 0, nblocks * BS)
    assert fs.vol.stats["ops"] - ops == 3            # 64 extents, 64, the edges and times
    assert _mapped(fs, di) == set() and di.blocks == 0 and di.size == nblocks * BS
    assert fs.read(fh, 0, nblocks * BS) == bytes(nblocks * BS)
    fs.release(fh)


def test_zero_range(vol):
    _dev, fs = vol
    fh, di = _extent_file(fs)
    data = bytearray(os.urandom(6 * BS))
    fs.write(fh, 0, bytes(data))
    fs.fallocate(fh, PUNCH, 2 * BS, BS)           # a hole at block 2
    data[2 * BS:3 * BS] = bytes(BS)
    fs.fallocate(fh, ZERO, 100, 3 * BS)
    data[100:3 * BS + 100] = bytes(3 * BS)
    assert fs.read(fh, 0, 10 * BS) == bytes(data)
    assert _mapped(fs, di) == set(range(6))        # the hole was preallocated
    fs.fallocate(fh, ZERO, 5 * BS + 7, 2 * BS)     # past EOF: grows
    data[5 * BS + 7:] = bytes(BS - 7)
    data += bytes(BS + 7)
    assert di.size == 7 * BS + 7 == len(data)
    assert fs.read(fh, 0, 10 * BS) == bytes(data)
    fs.fallocate(fh, ZERO | KEEP, 7 * BS, 5 * BS)   # keeps the size
    data[7 * BS:] = bytes(7)
    assert di.size == len(data)
    assert fs.read(fh, 0, 20 * BS) == bytes(data)
    fs.release(fh)


def test_inline_files(vol):
    """Inline files stay inline while the result fits the dinode."""
    _dev, fs = vol
    fh, di = fs.create(fs.root_ino, b"i", 0o644, os.O_RDWR, CTX)
    fs.write(fh, 0, b"abcdefgh")
    fs.fallocate(fh, 0, 0, 1000)
    assert di.flags & DF_INLINE and di.size == 1000
    assert fs.read(fh, 0, 2000) == b"abcdefgh" + bytes(992)
    assert fs.lseek(fh, 0, os.SEEK_DATA) == 0
    assert fs.lseek(fh, 10, os.SEEK_DATA) == 10
    assert fs.lseek(fh, 10, os.SEEK_HOLE) == 1000
    fs.fallocate(fh, PUNCH, 2, 3)
    assert fs.read(fh, 0, 8) == b"ab\0\0\0fgh"
    fs.fallocate(fh, ZERO, 6, 1)
    assert fs.read(fh, 0, 8) == b"ab\0\0\0f\0h"
    fs.fallocate(fh, KEEP, 0, 100 * BS)
    assert di.flags & DF_INLINE and di.size == 1000
    # growing past the inline limit: an extent file, preallocated
    fs.fallocate(fh, 0, 0, 3 * BS)
    assert di.flags & DF_EXTENTS and di.size == 3 * BS
    assert _mapped(fs, di) == {0, 1, 2}
    assert fs.read(fh, 0, 4 * BS) == b"ab\0\0\0f\0h" + bytes(3 * BS - 8)
    fs.release(fh)
    # zeroing past the limit converts too
    fh, di = fs.create(fs.root_ino, b"j", 0o644, os.O_RDWR, CTX)
    fs.write(fh, 0, b"q" * 100)
    fs.fallocate(fh, ZERO, 50, 2 * BS)
    assert di.flags & DF_EXTENTS and di.size == 2 * BS + 50
    assert fs.read(fh, 0, 4 * BS) == b"q" * 50 + bytes(2 * BS)
    fs.release(fh)


def test_times(vol):
    _dev, fs = vol
    fh, di = _extent_file(fs)
    fs.write(fh, 0, os.urandom(3 * BS))

    def old_times():
        def change():
            fs.vol.touch(di)
            di.mtime = di.ctime = 1
        fs._change(change)

    cases = [  # mode, off, length, ctime changes, mtime changes
        (KEEP, 0, BS, True, False),
        (0, 0, BS, True, False),               # no growth: ctime only (ext4)
        (0, 0, 4 * BS, True, True),            # grows
        (PUNCH, 0, 10, True, True),
        (PUNCH, 10 * BS, 10, False, False),    # wholly past EOF: nothing
        (ZERO | KEEP, 0, 10, True, True),
        (ZERO, 0, 10, True, True),
    ]
    for mode, off, length, c, m in cases:
        old_times()
        fs.fallocate(fh, mode, off, length)
        assert (di.ctime != 1, di.mtime != 1) == (c, m), (mode, off, length)
    fs.release(fh)


# -- stale data --------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [0, KEEP, ZERO, ZERO | KEEP])
def test_preallocated_blocks_never_show_old_data(mode):
    """Blocks freed by a removed file get preallocated to another: they read zeros,
    before and after a power cut (the zeros reached the device before the map)."""
    dev = power_loss_volume(16 << 20)
    m, fs = _mount(dev)
    # the old file takes (nearly) all the space: the new one can only reuse it
    nblocks = fs.vol.alloc.free_blocks() - 16
    fh, old = fs.create(fs.root_ino, b"old", 0o644, os.O_RDWR, CTX)
    fs.write(fh, 0, b"\xa5" * (nblocks * BS))
    fs.fsync(fh, False)
    old_blocks = _phys(fs, old)
    fs.release(fh)
    fs.unlink(fs.root_ino, b"old")
    fs.vol.commit()                    # the freed blocks are reusable now
    fh, di = _extent_file(fs, b"new")
    if mode & KEEP:
        fs.setattr(di.bno, size=64 * BS)
    fs.fallocate(fh, mode, 0, 64 * BS)
    assert di.size == 64 * BS and len(_mapped(fs, di)) == 64
    assert len(_phys(fs, di) & old_blocks) > 32, "the test needs the old blocks reused"
    assert fs.read(fh, 0, 64 * BS) == bytes(64 * BS)
    fs.fsync(fh, False)
    # the power goes: the journal is replayed, the blocks read from the device
    crashed = dev.crash()
    m, fs = _mount(crashed)
    fh = fs.open(di.bno, os.O_RDONLY)
    assert fs.read(fh, 0, 64 * BS) == bytes(64 * BS)
    fs.release(fh)
    m.stop()
    _fsck(crashed)


# -- ENOSPC ------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [0, ZERO])
@pytest.mark.parametrize("checked", [True, False], ids=["refused", "undone"])
def test_enospc_keeps_the_file(mode, checked, monkeypatch):
    """More than the free space: ENOSPC, the size as it was, the volume consistent.

    ``refused``: the up-front check refuses before anything changes.  ``undone``:
    without it (a cluster member has none) the steps run out of space midway and
    the size goes back; the blocks preallocated past the old size are freed again.
    A zeroing may have zeroed part of its range by then (not the bytes outside)."""
    dev = power_loss_volume(16 << 20)
    m, fs = _mount(dev)
    fh, di = _extent_file(fs)
    data = os.urandom(3 * BS + 123)
    fs.write(fh, 0, data)
    fs.fsync(fh, False)
    free = fs.vol.alloc.free_blocks()
    if not checked:
        monkeypatch.setattr(inode, "fill_need", lambda *a: 0)
    ops = fs.vol.stats["ops"]
    off = BS + 10
    assert _errno(fs.fallocate, fh, mode, off, (free + 10) * BS) == errno.ENOSPC
    if checked:
        assert fs.vol.stats["ops"] == ops          # refused before any change
    else:
        assert fs.vol.stats["ops"] - ops > 2       # it did run steps
    assert di.size == len(data)
    got = fs.read(fh, 0, len(data) + BS)
    if checked or mode == 0:
        assert got == data
    else:
        assert got[:off] == data[:off] and not any(got[off:])
    assert _mapped(fs, di) <= {0, 1, 2, 3}
    fs.vol.commit()
    # all the space is usable again
    assert fs.vol.alloc.free_blocks() >= free
    fs.fallocate(fh, 0, 0, (free - 40) * BS)
    fs.release(fh)
    m.stop()
    _fsck(dev)


def test_failed_step_changes_no_byte(monkeypatch):
    """A step that runs out of space has changed nothing: a zeroing that fails in
    its one step leaves the bytes it would have zeroed."""
    dev = power_loss_volume(16 << 20)
    m, fs = _mount(dev)
    fh, di = _extent_file(fs)
    data = os.urandom(8 * BS)
    fs.write(fh, 0, data)
    fs.fallocate(fh, PUNCH, 4 * BS, 4 * BS)        # blocks 4..7: holes
    data = data[:4 * BS] + bytes(4 * BS)
    fh2, _ = fs.create(fs.root_ino, b"filler", 0o644, os.O_RDWR, CTX)
    fs.vol.commit()                                 # the punched blocks are free
    fs.vol.alloc.drop_reservation(di.bno)           # (kept free for the file's growth)
    fs.fallocate(fh2, 0, 0, (fs.vol.alloc.free_blocks() - 2) * BS)
    fs.vol.commit()
    monkeypatch.setattr(inode, "fill_need", lambda *a: 0)
    assert _errno(fs.fallocate, fh, ZERO | KEEP, 0, 8 * BS) == errno.ENOSPC
    assert fs.read(fh, 0, 8 * BS) == data
    assert _mapped(fs, di) == {0, 1, 2, 3}
    fs.release(fh)
    fs.release(fh2)
    m.stop()
    _fsck(dev)


# -- a big preallocation -----------------------------------------------------------------

def test_big_fallocate_goes_in_bounded_steps(tmp_path):
    """256 MiB preallocated on a real image: many operations, each small, the
    journal's transactions bounded; all zeros, all data, fsck clean."""
    from clusterfs.commands.mkfs import make_volume
    from clusterfs.ondisk.blockdev import BlockDevice
    path = str(tmp_path / "vol.img")
    make_volume(path, 512 << 20, slots=1)
    dev = BlockDevice(path)
    m, fs = _mount(dev)
    vol = fs.vol
    sizes = []
    finish = vol._finish

    def record(op):
        sizes.append(len(op.snaps) + len(op.created) + len(op.freed))
        finish(op)
    vol._finish = record
    fh, di = _extent_file(fs)
    size = 256 << 20
    fs.fallocate(fh, 0, 0, size)
    assert di.size == size and di.blocks >= size // BS
    assert len(sizes) >= size // (inode.FALLOC_STEP * BS)
    assert max(sizes) <= 16, max(sizes)
    # the journal commits as its transaction fills, never one for the whole range
    assert vol.journal.running_blocks() < vol.journal.log_size // 2
    for off in (0, 12345678, size - BS):
        assert fs.read(fh, off, BS) == bytes(BS)
    assert fs.lseek(fh, 0, os.SEEK_HOLE) == size
    assert fs.lseek(fh, size // 2, os.SEEK_DATA) == size // 2
    # and punched away again, in steps too
    fs.fallocate(fh, PUNCH, 0, size)
    assert di.blocks == 0 and di.size == size
    assert _errno(fs.lseek, fh, 0, os.SEEK_DATA) == errno.ENXIO
    fs.release(fh)
    m.stop()
    _fsck(dev)
    dev.close()


# -- lseek -------------------------------------------------------------------------------

def test_lseek_data_and_holes(vol):
    _dev, fs = vol
    fh, di = _extent_file(fs)
    fs.setattr(di.bno, size=20 * BS + 100)
    assert fs.lseek(fh, 0, os.SEEK_HOLE) == 0
    assert _errno(fs.lseek, fh, 0, os.SEEK_DATA) == errno.ENXIO
    fs.write(fh, 3 * BS + 5, b"a")                 # block 3
    fs.write(fh, 4 * BS, b"b" * BS)                # block 4 (another write: adjacent)
    fs.write(fh, 10 * BS, b"c" * (2 * BS))         # blocks 10, 11
    fs.write(fh, 20 * BS, b"d")                    # block 20, the last
    assert fs.lseek(fh, 0, os.SEEK_DATA) == 3 * BS
    assert fs.lseek(fh, 3 * BS + 100, os.SEEK_DATA) == 3 * BS + 100
    assert fs.lseek(fh, 3 * BS + 100, os.SEEK_HOLE) == 5 * BS
    assert fs.lseek(fh, 5 * BS, os.SEEK_DATA) == 10 * BS
    assert fs.lseek(fh, 11 * BS + 9, os.SEEK_HOLE) == 12 * BS
    assert fs.lseek(fh, 12 * BS, os.SEEK_DATA) == 20 * BS
    assert fs.lseek(fh, 20 * BS + 50, os.SEEK_HOLE) == di.size   # EOF is a hole
    assert fs.lseek(fh, 19 * BS, os.SEEK_HOLE) == 19 * BS
    fs.fallocate(fh, PUNCH, 20 * BS, BS)
    assert _errno(fs.lseek, fh, 12 * BS, os.SEEK_DATA) == errno.ENXIO
    fs.release(fh)
    # a read-only handle may seek
    h = fs.open(di.bno, os.O_RDONLY)
    assert fs.lseek(h, 0, os.SEEK_DATA) == 3 * BS
    fs.release(h)


# -- the model ---------------------------------------------------------------------------

HOLE, DATA, EITHER = "H", "D", "E"
MAXB = 48                       # blocks the offsets reach


def _offsets():
    return st.one_of(st.integers(0, MAXB * BS),
                     st.integers(0, MAXB).map(lambda b: b * BS),
                     st.integers(0, MAXB).map(lambda b: max(0, b * BS - 1)))


def _lengths():
    return st.one_of(st.integers(1, 3 * BS), st.integers(1, 12).map(lambda b: b * BS),
                     st.integers(1, 20 * BS))


class FallocateModel(RuleBasedStateMachine):
    """A file against a bytearray and a block state model: HOLE (never written or
    punched, or cut off by a truncation: must be unmapped), DATA (written or
    preallocated: must be mapped) or EITHER (zeroed: may be either)."""

    def __init__(self):
        super().__init__()
        self.dev = power_loss_volume(16 << 20)
        self.m, self.fs = _mount(self.dev)
        self.fh, self.di = _extent_file(self.fs)
        self.data = bytearray()
        self.blocks: dict[int, str] = {}

    def state(self, b: int) -> str:
        return self.blocks.get(b, HOLE)

    def mark(self, first: int, stop: int, st_: str) -> None:
        for b in range(first, stop):
            self.blocks[b] = st_

    def eof_blocks(self) -> int:
        return -(-len(self.data) // BS)

    def resize(self, n: int) -> None:
        if n < len(self.data):
            del self.data[n:]
        else:
            self.data += bytes(n - len(self.data))

    @rule(off=_offsets(), n=st.integers(1, 3 * BS))
    def write(self, off, n):
        buf = os.urandom(n)
        assert self.fs.write(self.fh, off, buf) == n
        self.resize(max(len(self.data), off + n))
        self.data[off:off + n] = buf
        self.mark(off // BS, -(-(off + n) // BS), DATA)

    @rule(size=_offsets())
    def truncate(self, size):
        self.fs.setattr(self.di.bno, size=size)
        self.resize(size)
        for b in list(self.blocks):
            if b >= self.eof_blocks():
                del self.blocks[b]

    @rule(off=_offsets(), n=_lengths(), keep=st.booleans())
    def preallocate(self, off, n, keep):
        self.fs.fallocate(self.fh, KEEP if keep else 0, off, n)
        if not keep:
            self.resize(max(len(self.data), off + n))
        self.mark(off // BS, min(-(-(off + n) // BS), self.eof_blocks()), DATA)

    @rule(off=_offsets(), n=_lengths())
    def punch(self, off, n):
        self.fs.fallocate(self.fh, PUNCH, off, n)
        end = min(off + n, len(self.data))
        if off < end:
            self.data[off:end] = bytes(end - off)
        # whole blocks inside the range, and the last block when it runs to EOF
        stop = (off + n) // BS if off + n < len(self.data) else self.eof_blocks()
        self.mark(-(-off // BS), stop, HOLE)

    @rule(off=_offsets(), n=_lengths(), keep=st.booleans())
    def zero(self, off, n, keep):
        self.fs.fallocate(self.fh, ZERO | (KEEP if keep else 0), off, n)
        if not keep:
            self.resize(max(len(self.data), off + n))
        end = min(off + n, len(self.data))
        if off < end:
            self.data[off:end] = bytes(end - off)
        self.mark(off // BS, min(-(-(off + n) // BS), self.eof_blocks()), EITHER)

    @rule(off=_offsets())
    def seek(self, off):
        size = len(self.data)
        if off >= size:
            for whence in (os.SEEK_DATA, os.SEEK_HOLE):
                assert _errno(self.fs.lseek, self.fh, off, whence) == errno.ENXIO
            return
        first = off // BS
        last = self.eof_blocks()
        try:
            r = self.fs.lseek(self.fh, off, os.SEEK_DATA)
        except FSError as e:
            assert e.errno == errno.ENXIO
            assert all(self.state(b) != DATA for b in range(first, last)), "data missed"
        else:
            assert off <= r < size and (r == off or r % BS == 0), r
            assert self.state(r // BS) != HOLE, (off, r)
            assert all(self.state(b) != DATA for b in range(first, r // BS)), (off, r)
        r = self.fs.lseek(self.fh, off, os.SEEK_HOLE)
        assert off <= r <= size and (r in (off, size) or r % BS == 0), r
        if r < size:
            assert self.state(r // BS) != DATA, (off, r)
            before = r // BS           # r == off inside a hole, or a block's start
        else:
            before = last              # data up to EOF
        assert all(self.state(b) != HOLE for b in range(first, before)), (off, r)

    @invariant()
    def contents(self):
        assert self.di.size == len(self.data)
        assert self.fs.read(self.fh, 0, len(self.data) + BS) == bytes(self.data)

    @invariant()
    def holes(self):
        mapped = _mapped(self.fs, self.di)
        assert not mapped or max(mapped) < self.eof_blocks()
        for b in range(self.eof_blocks()):
            s = self.state(b)
            assert s == EITHER or (b in mapped) == (s == DATA), (b, s)

    def teardown(self):
        self.fs.release(self.fh)
        self.m.stop()
        _fsck(self.dev)


FallocateModel.TestCase.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_model = FallocateModel.TestCase
