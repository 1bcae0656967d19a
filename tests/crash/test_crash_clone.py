"""Reflink clones and copy-on-write under power cuts (no FUSE).

Every step of a long clone is a consistent volume; a power cut at any device event
of a clone, of a copy-on-write write or of the first clone on a revision-2 volume
(the superblocks raised) leaves a volume that fsck finds clean, where the source
never changes and the destination shows, sector by sector, its old bytes or the
new ones.
"""

from __future__ import annotations

import os
import random

import pytest

from clusterfs.fs import inode
from clusterfs.ondisk.blockdev import PowerCut
from clusterfs.ondisk.format import BLOCK_SIZE, Superblock
from tests.crash.crash_workload import CTX
from tests.helpers import DeviceMount, check_consistency, fsck_device, power_loss_volume

BS = BLOCK_SIZE
SECTOR = 512


def _mount(dev):
    m = DeviceMount(dev)
    return m, m.start()


def _recovered(dev) -> dict[bytes, bytes]:
    """Mount a crashed device (journal replay), read every file, unmount, fsck."""
    m, fs = _mount(dev)
    out = {}
    dh = fs.opendir(fs.root_ino)
    for name, di, _off in fs.readdir(dh, 0):
        if name in (b".", b".."):
            continue
        fh = fs.open(di.bno, os.O_RDONLY)
        out[name] = fs.read(fh, 0, di.size + BS)
        assert len(out[name]) == di.size
        fs.release(fh)
    fs.releasedir(dh)
    m.stop()
    code, text = fsck_device(dev)
    assert code == 0, text
    assert check_consistency(dev, tail_zero=False) == []
    return out


def _sectors_from(data: bytes, *versions: bytes) -> None:
    """Every 512-byte sector of ``data`` is the same sector of one of ``versions``
    (zeros past a version's end)."""
    for i in range(0, len(data), SECTOR):
        got = data[i:i + SECTOR]
        assert any(got == v[i:i + SECTOR].ljust(len(got), b"\0") for v in versions), \
            f"sector at byte {i} is none of the versions"


def _fragmented(fs, name: bytes, nblocks: int) -> tuple[int, bytes]:
    """A file of one extent per written block (every other block a hole)."""
    fh, _di = fs.create(fs.root_ino, name, 0o644, os.O_RDWR, CTX)
    want = bytearray(nblocks * BS)
    for i in range(0, nblocks, 2):
        blk = os.urandom(BS)
        fs.write(fh, i * BS, blk)
        want[i * BS:(i + 1) * BS] = blk
    return fh, bytes(want)


def _steps(fs, fi, off_in, fo, off_out, length, after_step) -> int:
    """``Filesystem.copy_file_range``'s steps one by one, ``after_step()`` after
    each; returns the bytes copied."""
    plan = fs.copy_range_begin(fi, off_in, fo, off_out, length)
    where = (0, 0) if plan.phases else None
    while where is not None:
        where = fs.copy_range_step(plan, where)
        after_step()
    return plan.done


def test_every_clone_step_is_a_consistent_copy():
    """The volume a power cut right after each step's commit leaves: fsck clean,
    the source intact, the destination a prefix of the copy (its size grows with
    the steps) over its old bytes."""
    dev = power_loss_volume(32 << 20)
    m, fs = _mount(dev)
    nblocks = 2 * 3 * inode.CLONE_STEP + 1
    fi, src = _fragmented(fs, b"src", nblocks)
    fo, _di = fs.create(fs.root_ino, b"dst", 0o644, os.O_RDWR, CTX)
    old = os.urandom(10 * BS + 100)
    fs.write(fo, 0, old)
    fs.fsync(fo, False)
    states = []

    def after_step():
        fs.vol.commit()
        states.append(dev.snapshot())
    assert _steps(fs, fi, 0, fo, 3 * BS, len(src), after_step) == len(src)
    assert len(states) >= 4
    fs.release(fi)
    fs.release(fo)
    m.stop()
    sizes = []
    for snap in states:
        files = _recovered(snap)
        assert files[b"src"] == src
        got = files[b"dst"]
        sizes.append(len(got))
        assert got[:3 * BS] == old[:3 * BS]
        copied = got[3 * BS:]
        assert copied == src[:len(copied)] or len(got) == len(old) and \
            copied[:len(copied)] in (old[3 * BS:], src[:len(copied)])
    assert sizes == sorted(sizes) and sizes[-1] == 3 * BS + len(src)


@pytest.mark.parametrize("target", ["clone", "cow"])
def test_power_cut_anywhere(target):
    """A power cut at each device event of a clone (steps committed as they go,
    then an fsync), or of copy-on-write writes into a clone and its source (then an
    fsync), with the unflushed writes kept, dropped or torn at random: the
    recovered volume is consistent, the file not written keeps its bytes, and the
    written one shows old or new bytes, sector by sector."""
    rng_data = random.Random(7)
    src = rng_data.randbytes(200 * BS + 77)
    old_dst = rng_data.randbytes(30 * BS)
    patch = rng_data.randbytes(5 * BS)
    seen_cut = 0
    for cut in range(1, 300):
        dev = power_loss_volume(32 << 20)
        m, fs = _mount(dev)
        fi, _a = fs.create(fs.root_ino, b"src", 0o644, os.O_RDWR, CTX)
        fs.write(fi, 0, src)
        fo, _b = fs.create(fs.root_ino, b"dst", 0o644, os.O_RDWR, CTX)
        fs.write(fo, 0, old_dst)
        if target == "cow":
            fs.copy_file_range(fi, 0, fo, 0, len(src))
            before = (src, src)
        else:
            before = (src, old_dst)
        fs.fsync(fo, False)
        dev.cut_after(cut)
        try:
            if target == "clone":
                _steps(fs, fi, 0, fo, 0, len(src), fs.vol.commit)
            else:
                fs.write(fo, 10 * BS + 100, patch)          # partial blocks at both ends
                fs.write(fi, 50 * BS, patch)                # whole blocks, the source
                fs.write(fo, 120 * BS, patch[:BS])
            fs.fsync(fo, False)
        except PowerCut:
            seen_cut += 1
        else:
            dev.cut_at = None
            fs.release(fi)
            fs.release(fo)
            m.stop()
            files = _recovered(dev)
            if target == "clone":
                assert files == {b"src": src, b"dst": src}
            break
        files = _recovered(dev.crash(rng=random.Random(cut)))
        if target == "clone":
            assert files[b"src"] == src
            assert len(old_dst) <= len(files[b"dst"]) <= len(src)
            _sectors_from(files[b"dst"], old_dst, src)
        else:
            new_src = bytearray(src)
            new_src[50 * BS:55 * BS] = patch
            new_dst = bytearray(src)
            new_dst[10 * BS + 100:15 * BS + 100] = patch
            new_dst[120 * BS:121 * BS] = patch[:BS]
            # the clone never sees the source's writes, nor the other way round
            _sectors_from(files[b"src"], before[0], new_src)
            _sectors_from(files[b"dst"], before[1], new_dst)
            assert files[b"dst"][50 * BS:55 * BS] == src[50 * BS:55 * BS]
            assert files[b"src"][10 * BS + 100:15 * BS + 100] == \
                src[10 * BS + 100:15 * BS + 100]
            assert files[b"src"][120 * BS:121 * BS] == src[120 * BS:121 * BS]
    assert seen_cut >= 6, seen_cut


def test_power_cut_while_the_revision_is_raised():
    """The first clone of a revision-2 volume writes both superblocks before it
    shares a block: a power cut at any of those events leaves a volume fsck finds
    clean, of revision 2 without shared blocks or 3."""
    for cut in range(1, 12):
        dev = power_loss_volume(32 << 20)
        sb = Superblock.decode(dev.read(0), 0)
        sb.format_rev = 2
        dev.write(sb.backup_bno, sb.image(sb.backup_bno))
        dev.write(0, sb.image(0))
        dev.flush()
        m, fs = _mount(dev)
        fi, _a = fs.create(fs.root_ino, b"src", 0o644, os.O_RDWR, CTX)
        data = os.urandom(20 * BS)
        fs.write(fi, 0, data)
        fo, _b = fs.create(fs.root_ino, b"dst", 0o644, os.O_RDWR, CTX)
        fs.fsync(fo, False)
        dev.cut_after(cut)
        try:
            fs.copy_file_range(fi, 0, fo, 0, len(data))
            fs.fsync(fo, False)
        except PowerCut:
            pass
        else:
            break
        crashed = dev.crash(rng=random.Random(cut))
        files = _recovered(crashed)
        assert files[b"src"] == data and files[b"dst"] in (b"", data)
        rev = Superblock.decode(crashed.read(0), 0).format_rev
        assert rev == 3 or files[b"dst"] == b""
