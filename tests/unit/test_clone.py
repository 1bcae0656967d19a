"""Reflink clones through ``Filesystem`` (copy_file_range), without FUSE.

The volume is a ``PowerLossDevice`` mounted with ``DeviceMount``; every test ends with
the fsck oracle.  Named tests check each rule (blocks shared, copy-on-write, counts,
space freed with the last sharer, unaligned heads and tails copied, errors, the
revision raised at the first clone); the model test drives random writes, clones
between a few files, truncations, punches, zeroings and unlinks against bytearrays
and checks the bytes, the counts and the free space after every step.
"""

from __future__ import annotations

import errno
import os

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from clusterfs.errors import FSError
from clusterfs.fs import inode, refcount
from clusterfs.fs.filedata import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE,
                                   FALLOC_FL_ZERO_RANGE)
from clusterfs.fs.posix import Ctx
from clusterfs.ondisk.format import (BLOCK_SIZE, EXT_SHARED, REFCOUNT, SHARED_SINCE,
                                     Superblock)
from tests.helpers import DeviceMount, check_consistency, fsck_device, power_loss_volume

BS = BLOCK_SIZE
PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
CTX = Ctx(uid=0, gid=0)


def _mount(dev):
    m = DeviceMount(dev)
    return m, m.start()


def _clean(dev) -> None:
    code, text = fsck_device(dev)
    assert code == 0, text
    assert check_consistency(dev) == []


@pytest.fixture
def vol():
    dev = power_loss_volume(32 << 20)
    m, fs = _mount(dev)
    yield dev, fs
    m.stop()
    _clean(dev)


def _file(fs, name: bytes, data: bytes = b""):
    fh, di = fs.create(fs.root_ino, name, 0o644, os.O_RDWR, CTX)
    if data:
        fs.write(fh, 0, data)
    return fh, di


def _read(fs, fh) -> bytes:
    return fs.read(fh, 0, 1 << 30)


def _phys(fs, di) -> set[int]:
    return {pb + i for _lb, pb, n in inode.extents(fs.vol, di) for i in range(n)}


def _count(fs, pblk: int) -> int:
    (_s, _n, c), = refcount.counts(fs.vol, pblk, 1)
    return c


def _free(fs) -> int:
    return fs.vol.alloc_free_blocks()


# -- the rules, one by one -----------------------------------------------------------------

def test_clone_shares_blocks_and_copies_on_write(vol):
    _dev, fs = vol
    data = os.urandom(300 * BS)
    fa, a = _file(fs, b"a", data)
    fb, b = _file(fs, b"b")
    free = _free(fs)
    assert fs.copy_file_range(fa, 0, fb, 0, len(data)) == len(data)
    assert _free(fs) == free                 # no data block more
    assert _phys(fs, a) == _phys(fs, b) and len(_phys(fs, a)) == 300
    assert all(f & EXT_SHARED for *_r, f in inode.extents(fs.vol, a, flags=True))
    assert all(f & EXT_SHARED for *_r, f in inode.extents(fs.vol, b, flags=True))
    assert {_count(fs, p) for p in _phys(fs, a)} == {2}
    assert b.size == len(data) and b.blocks == 300 and _read(fs, fb) == data
    # a write to the source copies the blocks it writes (head and tail kept)
    fs.write(fa, 10 * BS + 100, b"X" * (2 * BS))
    want = bytearray(data)
    want[10 * BS + 100:12 * BS + 100] = b"X" * (2 * BS)
    assert _read(fs, fa) == want and _read(fs, fb) == data
    assert len(_phys(fs, a) - _phys(fs, b)) == 3 and _free(fs) == free - 3
    moved = _phys(fs, b) - _phys(fs, a)
    assert {_count(fs, p) for p in moved} == {1}
    # a write to the clone too; in place where its blocks are its own now
    fs.write(fb, 10 * BS, b"Y" * BS)
    assert _free(fs) == free - 3
    fs.write(fb, 200 * BS, b"Z" * BS)
    assert _free(fs) == free - 4
    assert _read(fs, fa) == want
    fs.release(fa)
    fs.release(fb)


def test_space_comes_back_with_the_last_sharer(vol):
    _dev, fs = vol
    data = os.urandom(500 * BS)
    free0 = _free(fs)
    fa, a = _file(fs, b"a", data)
    fb, b = _file(fs, b"b")
    fc, c = _file(fs, b"c")
    fs.copy_file_range(fa, 0, fb, 0, len(data))
    fs.copy_file_range(fb, 0, fc, 0, len(data))
    used = free0 - _free(fs)
    assert 503 <= used <= 505             # the data, three dinodes (tree nodes?)
    pblk = min(_phys(fs, a))
    assert _count(fs, pblk) == 3
    for h in (fa, fb, fc):
        fs.release(h)
    fs.unlink(fs.root_ino, b"a")            # its dinode goes, not its data
    assert free0 - _free(fs) == used - 1 and _count(fs, pblk) == 2
    fs.unlink(fs.root_ino, b"c")
    assert free0 - _free(fs) == used - 2 and _count(fs, pblk) == 1
    assert not refcount.tree(fs.vol, fs.vol.sb.rgrp_of(pblk)).root.keys
    fb = fs.open(b.bno, os.O_RDONLY)
    assert _read(fs, fb) == data
    fs.release(fb)
    fs.unlink(fs.root_ino, b"b")
    assert _free(fs) == free0


def test_unaligned_heads_and_tails_are_copied(vol):
    _dev, fs = vol
    data = os.urandom(40 * BS + 333)
    fa, a = _file(fs, b"a", data)
    fb, b = _file(fs, b"b", b"o" * (3 * BS))
    # same offset within a block: head and tail copied, middle shared
    n = fs.copy_file_range(fa, 1000, fb, 1000, 20 * BS)
    assert n == 20 * BS
    want = bytearray(b"o" * (3 * BS))
    want[1000:] = b""
    want += data[1000:1000 + 20 * BS]
    assert _read(fs, fb) == want
    shared = _phys(fs, a) & _phys(fs, b)
    assert len(shared) == 19                    # blocks 1..19; 0 and 20 copied
    # offsets apart by a non-multiple of the block: all copied as data
    fc, c = _file(fs, b"c")
    assert fs.copy_file_range(fa, 5, fc, 7, 30 * BS) == 30 * BS
    assert _read(fs, fc) == bytes(7) + data[5:5 + 30 * BS]
    assert not _phys(fs, a) & _phys(fs, c)
    # to the end of the source: a short count, the tail block copied
    fd, d = _file(fs, b"d")
    assert fs.copy_file_range(fa, 2 * BS, fd, 0, 1 << 30) == len(data) - 2 * BS
    assert _read(fs, fd) == data[2 * BS:] and d.size == len(data) - 2 * BS
    assert len(_phys(fs, a) & _phys(fs, d)) == 38
    # past the end of the source: nothing
    assert fs.copy_file_range(fa, len(data), fd, 0, 100) == 0
    assert fs.copy_file_range(fa, len(data) + 5, fd, 0, 100) == 0
    for h in (fa, fb, fc, fd):
        fs.release(h)


def test_clone_over_data_and_holes(vol):
    """The destination's old blocks there lose a reference (freed when theirs);
    the source's holes become holes; the destination grows over the range, and
    bytes past its old end read as zeros."""
    _dev, fs = vol
    src = os.urandom(64 * BS)
    fa, a = _file(fs, b"a", src)
    fs.fallocate(fa, PUNCH, 8 * BS, 8 * BS)         # a hole in the source
    src = src[:8 * BS] + bytes(8 * BS) + src[16 * BS:]
    fb, b = _file(fs, b"b", os.urandom(20 * BS + 10))
    old_b = _read(fs, fb)
    free = _free(fs)
    assert fs.copy_file_range(fa, 0, fb, 4 * BS, 64 * BS) == 64 * BS
    want = old_b[:4 * BS] + src
    assert _read(fs, fb) == want and b.size == 68 * BS
    # b's blocks 4..20 went (17 blocks, the one past its old end included)
    assert _free(fs) == free + 17
    assert {lb for lb, _pb, _n in inode.extents(fs.vol, b)} >= {0, 4}
    assert not any(lb <= 13 < lb + n for lb, _pb, n in inode.extents(fs.vol, b))
    # growing past the old end of a file whose last block is partial: zeros
    fc, c = _file(fs, b"c", b"c" * 5000)
    fs.copy_file_range(fa, 16 * BS, fc, 3 * BS, 2 * BS)
    assert _read(fs, fc) == b"c" * 5000 + bytes(3 * BS - 5000) + src[16 * BS:18 * BS]
    for h in (fa, fb, fc):
        fs.release(h)


def test_clone_within_one_file(vol):
    _dev, fs = vol
    data = os.urandom(50 * BS)
    fa, a = _file(fs, b"a", data)
    assert fs.copy_file_range(fa, 0, fa, 20 * BS, 10 * BS) == 10 * BS
    want = data[:20 * BS] + data[:10 * BS] + data[30 * BS:]
    assert _read(fs, fa) == want
    p0 = min(_phys(fs, a))
    assert _count(fs, p0) == 2
    with pytest.raises(FSError) as e:
        fs.copy_file_range(fa, 0, fa, 5 * BS, 10 * BS)       # overlapping
    assert e.value.errno == errno.EINVAL
    fs.write(fa, 0, b"w" * BS)
    assert _read(fs, fa)[20 * BS:21 * BS] == data[:BS]
    fs.setattr(a.bno, size=25 * BS)
    assert _read(fs, fa) == b"w" * BS + data[BS:20 * BS] + data[:5 * BS]
    fs.release(fa)


def test_errors(vol):
    _dev, fs = vol
    fa, a = _file(fs, b"a", b"x" * (4 * BS))
    fb, b = _file(fs, b"b")
    ro = fs.open(b.bno, os.O_RDONLY)
    wo = fs.open(a.bno, os.O_WRONLY)
    ap = fs.open(b.bno, os.O_WRONLY | os.O_APPEND)
    d = fs.mkdir(fs.root_ino, b"d", 0o755, CTX)
    dh = fs.opendir(d.bno)
    cases = [((fa, 0, fb, 0, BS, 1), errno.EINVAL),
             ((fa, -1, fb, 0, BS), errno.EINVAL),
             ((fa, 0, ro, 0, BS), errno.EBADF),
             ((wo, 0, fb, 0, BS), errno.EBADF),
             ((fa, 0, ap, 0, BS), errno.EBADF),
             ((9999, 0, fb, 0, BS), errno.EBADF),
             ((dh, 0, fb, 0, BS), errno.EISDIR),
             ((fa, 0, fb, inode.MAX_FILE_BLOCKS * BS, BS), errno.EFBIG)]
    for args, err in cases:
        with pytest.raises(FSError) as e:
            fs.copy_file_range(*args)
        assert e.value.errno == err, args
    assert b.size == 0
    for h in (fa, fb, ro, wo, ap):
        fs.release(h)
    fs.releasedir(dh)


def test_inline_source_is_copied(vol):
    _dev, fs = vol
    fa, a = _file(fs, b"a", b"small" * 100)
    fb, b = _file(fs, b"b")
    assert fs.copy_file_range(fa, 0, fb, BS, 500) == 500
    assert _read(fs, fb) == bytes(BS) + b"small" * 100
    fs.release(fa)
    fs.release(fb)


def test_write_into_a_shared_partial_block_past_a_truncation(vol):
    """A source truncated inside a shared block, then extended: the bytes past the
    old end are zeroed in its own copy, the clone keeps them."""
    _dev, fs = vol
    data = os.urandom(8 * BS)
    fa, a = _file(fs, b"a", data)
    fb, b = _file(fs, b"b")
    fs.copy_file_range(fa, 0, fb, 0, len(data))
    fs.setattr(a.bno, size=3 * BS + 100)     # block 3 stays, shared
    fs.setattr(a.bno, size=6 * BS)
    assert _read(fs, fa) == data[:3 * BS + 100] + bytes(3 * BS - 100)
    assert _read(fs, fb) == data
    # zero range and punch inside shared blocks
    fs.fallocate(fb, FALLOC_FL_ZERO_RANGE, BS + 10, 20)
    fs.fallocate(fb, PUNCH, 5 * BS + 7, 2 * BS)
    want = bytearray(data)
    want[BS + 10:BS + 30] = bytes(20)
    want[5 * BS + 7:7 * BS + 7] = bytes(2 * BS)
    assert _read(fs, fb) == want
    assert _read(fs, fa) == data[:3 * BS + 100] + bytes(3 * BS - 100)
    fs.release(fa)
    fs.release(fb)


def test_many_extents_take_several_steps(vol):
    """A fragmented source (more records than one step shares): several
    operations; counts alternating block by block: a refcount tree with node
    blocks, gone again with the sharers."""
    _dev, fs = vol
    fa, a = _file(fs, b"a")
    nrec = 300                                  # more records than a root holds
    want = bytearray()
    for i in range(nrec):
        blk = os.urandom(BS)
        fs.write(fa, 2 * i * BS, blk)         # every other block: one extent each
        want += blk + bytes(BS)
    want = want[:-BS]
    fb, b = _file(fs, b"b")
    ops = fs.vol.stats["ops"]
    assert fs.copy_file_range(fa, 0, fb, 0, len(want)) == len(want)
    assert fs.vol.stats["ops"] - ops >= nrec // inode.CLONE_STEP
    assert _read(fs, fb) == want
    # a third sharer of every other source block: counts alternate 3 and 2
    fc, c = _file(fs, b"c")
    for i in range(0, nrec, 2):
        fs.copy_file_range(fa, 2 * i * BS, fc, 2 * i * BS, BS)
    groups = {fs.vol.sb.rgrp_of(p) for p in _phys(fs, a)}
    recs, levels = [], []
    for rg in groups:
        t = refcount.tree(fs.vol, rg)
        recs += list(t.items_from(0))
        levels.append(t.root.level)
        assert all(n.kind == REFCOUNT and n.owner == rg for n in t.nodes())
    assert len(recs) == nrec and {c for _k, (_n, c) in recs} == {2, 3}
    assert max(levels) >= 1                     # node blocks
    for h in (fa, fb, fc):
        fs.release(h)
    for name in (b"a", b"c"):
        fs.unlink(fs.root_ino, name)
    for rg in groups:
        t = refcount.tree(fs.vol, rg)
        assert not t.root.keys and t.root.level == 0
    fb = fs.open(b.bno, os.O_RDONLY)
    assert _read(fs, fb) == want
    fs.release(fb)


def test_revision_2_volume_is_raised_at_the_first_clone():
    dev = power_loss_volume(32 << 20)
    sb = Superblock.decode(dev.read(0), 0)
    sb.format_rev = 2
    dev.write(sb.backup_bno, sb.image(sb.backup_bno))
    dev.write(0, sb.image(0))
    dev.flush()
    m, fs = _mount(dev)
    assert fs.vol.sb.format_rev == 2
    fa, a = _file(fs, b"a", os.urandom(10 * BS + 5))
    fb, b = _file(fs, b"b")
    fs.copy_file_range(fa, 1, fb, 2, 5 * BS)        # a copy as data: no raise
    assert Superblock.decode(dev.read(0), 0).format_rev == 2
    fs.copy_file_range(fa, 0, fb, 0, 5 * BS)        # the first clone
    for bno in (0, sb.backup_bno):
        assert Superblock.decode(dev.read(bno), bno).format_rev == SHARED_SINCE
    fs.release(fa)
    fs.release(fb)
    m.stop()
    _clean(dev)


# -- the model --------------------------------------------------------------------------------

NAMES = [b"f0", b"f1", b"f2", b"f3"]
MAXB = 24                       # blocks a file may span


class CloneModel(RuleBasedStateMachine):
    """Files as bytearrays; every step checked against the volume.  The free
    space must equal what the files' distinct blocks (and their metadata) leave:
    a block shared by several files is counted once, and goes back only with its
    last sharer."""

    def __init__(self):
        super().__init__()
        self.dev = power_loss_volume(16 << 20)
        self.m, self.fs = _mount(self.dev)
        self.free0 = _free(self.fs)
        self.files: dict[bytes, tuple[int, object]] = {}
        self.model: dict[bytes, bytearray] = {}

    def teardown(self):
        try:
            self.m.stop()
            _clean(self.dev)
        finally:
            self.dev = None

    names = st.sampled_from(NAMES)
    offsets = st.one_of(st.integers(0, MAXB).map(lambda b: b * BS),
                        st.integers(0, MAXB * BS))
    lengths = st.one_of(st.integers(1, 12).map(lambda b: b * BS), st.integers(1, 6 * BS))

    def _open(self, name):
        if name not in self.files:
            fh, di = _file(self.fs, name)
            self.files[name] = (fh, di)
            self.model[name] = bytearray()
        return self.files[name]

    @rule(name=names, off=offsets, length=lengths, seed=st.integers(0, 255))
    def write(self, name, off, length, seed):
        fh, _di = self._open(name)
        data = bytes([seed]) * length
        self.fs.write(fh, off, data)
        m = self.model[name]
        if off > len(m):
            m += bytes(off - len(m))
        m[off:off + length] = data

    @rule(src=names, dst=names, off_out=offsets,
          aligned=st.sampled_from([True, True, True, False]), data=st.data())
    def clone(self, src, dst, off_out, aligned, data):
        full = sorted(n for n, m in self.model.items() if len(m) > BS)
        if full and src not in full:
            src = data.draw(st.sampled_from(full), label="src")
        fi, _ = self._open(src)
        fo, _ = self._open(dst)
        m_in, m_out = self.model[src], self.model[dst]
        # mostly inside the source, often in whole blocks (shared then)
        off_in = data.draw(st.integers(0, len(m_in) + BS), label="off_in")
        length = data.draw(st.one_of(st.integers(1, MAXB).map(lambda b: b * BS),
                                     st.integers(1, MAXB * BS)), label="length")
        if aligned:
            off_in, off_out = off_in // BS * BS, off_out // BS * BS
        n = max(0, min(length, len(m_in) - off_in))
        if src == dst and n and off_in < off_out + n and off_out < off_in + n:
            with pytest.raises(FSError):
                self.fs.copy_file_range(fi, off_in, fo, off_out, length)
            return
        assert self.fs.copy_file_range(fi, off_in, fo, off_out, length) == n
        if n:
            piece = bytes(m_in[off_in:off_in + n])
            if off_out > len(m_out):
                m_out += bytes(off_out - len(m_out))
            m_out[off_out:off_out + n] = piece

    @rule(name=names, size=st.integers(0, MAXB * BS))
    def truncate(self, name, size):
        _fh, di = self._open(name)
        self.fs.setattr(di.bno, size=size)
        m = self.model[name]
        if size < len(m):
            del m[size:]
        else:
            m += bytes(size - len(m))

    @rule(name=names, off=offsets, length=lengths, zero=st.booleans())
    def punch(self, name, off, length, zero):
        fh, _di = self._open(name)
        m = self.model[name]
        if zero:
            self.fs.fallocate(fh, FALLOC_FL_ZERO_RANGE, off, length)
            if off + length > len(m):
                m += bytes(off + length - len(m))
            m[off:off + length] = bytes(length)
        else:
            self.fs.fallocate(fh, PUNCH, off, length)
            end = min(off + length, len(m))
            if off < end:
                m[off:end] = bytes(end - off)

    @precondition(lambda self: self.files)
    @rule(data=st.data(), really=st.integers(0, 3))
    def unlink(self, data, really):
        if really:
            return          # (1 in 4: files live long enough to share)
        name = data.draw(st.sampled_from(sorted(self.files)))
        fh, _di = self.files.pop(name)
        del self.model[name]
        self.fs.release(fh)
        self.fs.unlink(self.fs.root_ino, name)

    @invariant()
    def contents(self):
        for name, (fh, di) in self.files.items():
            assert di.size == len(self.model[name]), name
            assert self.fs.read(fh, 0, di.size + BS) == self.model[name], name

    @invariant()
    def space_and_counts(self):
        fs = self.fs
        refs: dict[int, int] = {}
        meta = 0
        for _fh, di in self.files.values():
            exts = inode.extents(fs.vol, di, flags=True)
            meta += di.blocks - sum(n for _lb, _pb, n, _f in exts)
            for _lb, pb, n, f in exts:
                for p in range(pb, pb + n):
                    refs[p] = refs.get(p, 0) + 1
                    assert refs[p] == 1 or f & EXT_SHARED
        for p, k in refs.items():
            assert _count(fs, p) == k, (p, k)
        nodes = sum(len(list(refcount.tree(fs.vol, rg).nodes()))
                    for rg in range(fs.vol.sb.rgrp_count))
        assert _free(fs) == self.free0 - len(refs) - meta - len(self.files) - nodes


CloneModel.TestCase.settings = settings(
    max_examples=int(os.environ.get("CFS_CLONE_EXAMPLES", "25")), stateful_step_count=30,
    deadline=None, suppress_health_check=[HealthCheck.too_slow])
test_clone_model = CloneModel.TestCase
