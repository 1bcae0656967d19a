"""Growing a volume (``clusterfs.fs.grow``, ``clusterfs grow``), without FUSE.

Volumes are image files with groups of 1024 blocks and one slot, so that the old
last group can be made short, full with a little slack after it, or full with a new
group's header or bitmap landing on the old backup superblock.  Each test ends with
the fsck oracle; the files written before a grow must read back unchanged.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess

import pytest

from clusterfs.commands.grow import grow_volume
from clusterfs.commands.mkfs import make_volume
from clusterfs.errors import UsageError, VolumeBusy, VolumeError
from clusterfs.fs.grow import STEPS, grow_mounted, grow_on_disk, plan_grow
from clusterfs.fs.posix import Ctx
from clusterfs.fs.single_node import SingleNodeMount
from clusterfs.ondisk import blockhdr
from clusterfs.ondisk.blockdev import BlockDevice
from clusterfs.ondisk.format import (BLOCK_SIZE, HB_FREE, SB_FLAG_GROWING, BlockType,
                                     Heartbeat, RgrpHeader, Superblock)
from fsck.checker import Fsck
from fsck.report import Report
from tests.helpers import run_cli

BS = BLOCK_SIZE
CTX = Ctx(0, 0)
RGRP = 1024
RSTART = 2 + 1 + 256            # one slot, a journal of 256 blocks
GROUPS = 6

# the old volume's blocks past its last whole group (the backup superblock included)
TAILS = {"short": 600,          # a short last group of 599 blocks
         "slack": 12,           # the last group full, 11 unused blocks, the backup
         "on-header": 1,        # the last group full: a new group's header at the backup
         "on-bitmap": 2}        # ... a new group's bitmap block at the backup


class Stop(Exception):
    """Stands for a power cut between two steps of the grow."""


def _blocks(tail: str) -> int:
    return RSTART + GROUPS * RGRP + TAILS[tail]


def _volume(tmp_path, tail: str = "short") -> str:
    path = str(tmp_path / "v.img")
    make_volume(path, _blocks(tail) * BS, slots=1, rgrp_blocks=RGRP)
    sb = _sb(path)
    assert sb.rgrp_start == RSTART and sb.rgrp_blocks == RGRP
    return path


def _sb(path: str, bno: int = 0) -> Superblock:
    with BlockDevice(path, readonly=True) as dev:
        return Superblock.decode(dev.read(bno), bno)


def _fsck(path: str, mode: str = "n", force: bool = True) -> tuple[int, list[str], str]:
    out = io.StringIO()
    fk = Fsck(path, mode=mode, force=force, report=Report(mode, out=out, err=out),
              live_watch=0, hold_slot=False)
    code = fk.check()
    text = out.getvalue() + (fk.internal_error or "")
    return code, [f.code for f in fk.state.report.findings], text


def _clean(path: str) -> None:
    code, codes, text = _fsck(path)
    assert code == 0 and not codes, text


def _write_files(path: str, seed: int, count: int = 4, size: int = 300 * BS + 17) -> dict:
    """Files written through a single-node mount; name -> content."""
    rnd = __import__("random").Random(seed)
    files = {}
    m = SingleNodeMount(path, heartbeat_interval=0.2)
    fs = m.start()
    try:
        for i in range(count):
            name = f"f{seed}-{i}".encode()
            data = rnd.randbytes(size)
            fh, _di = fs.create(fs.root_ino, name, 0o644, os.O_RDWR, CTX)
            fs.write(fh, 0, data)
            fs.release(fh)
            files[name] = data
    finally:
        m.stop()
    return files


def _read_all(path: str) -> dict:
    m = SingleNodeMount(path, heartbeat_interval=0.2, readonly=True)
    fs = m.start()
    out = {}
    try:
        dh = fs.opendir(fs.root_ino)
        for name, di, _off in fs.readdir(dh, 0):
            if name in (b".", b".."):
                continue
            fh = fs.open(di.bno, os.O_RDONLY)
            out[name] = fs.read(fh, 0, di.size + 1)
            fs.release(fh)
        fs.releasedir(dh)
    finally:
        m.stop()
    return out


def _check_geometry(path: str, old_total: int) -> Superblock:
    """The grown volume: every group header as the geometry says, the backup at
    the new end, no superblock left at the old end."""
    sb = _sb(path)
    assert not sb.growing and sb.grow_from == 0
    assert _sb(path, sb.backup_bno) == Superblock(**{**sb.__dict__})
    with BlockDevice(path, readonly=True) as dev:
        assert dev.nblocks >= sb.total_blocks
        for rg in range(sb.rgrp_count):
            start, length = sb.rgrp_range(rg)
            hdr = RgrpHeader.decode(dev.read(start), start)
            assert (hdr.index, hdr.length) == (rg, length)
        assert not blockhdr.is_valid(dev.read(old_total - 1), BlockType.SUPERBLOCK,
                                     old_total - 1)
    return sb


# -- the geometry ---------------------------------------------------------------------

@pytest.mark.parametrize("tail", list(TAILS))
def test_grow_each_kind_of_last_group(tmp_path, tail):
    """The old last group is lengthened (short) or kept (full), new groups follow,
    the backup moves; files written before read back; fsck clean."""
    path = _volume(tmp_path, tail)
    old = _sb(path)
    files = _write_files(path, 1)
    new_total = old.total_blocks + 3 * RGRP + 700
    before, after = grow_volume(path, new_total * BS)
    assert before.total_blocks == old.total_blocks and after.total_blocks == new_total
    sb = _check_geometry(path, old.total_blocks)
    assert sb.rgrp_count == old.resized(new_total).rgrp_count
    last = old.rgrp_count - 1
    assert sb.rgrp_range(last)[1] == RGRP
    assert sb.rgrp_count > old.rgrp_count
    assert sb.data_blocks() > old.data_blocks()
    assert os.path.getsize(path) == new_total * BS
    assert _read_all(path) == files
    _clean(path)


def test_grow_twice_and_fill_the_new_space(tmp_path):
    """Grow, fill the volume beyond its old size (the new groups take the data, df
    shows the new size), grow again, fill again: fsck clean, every file intact."""
    path = _volume(tmp_path, "short")
    files = _write_files(path, 2)
    old = _sb(path)
    for k, extra in enumerate((2 * RGRP + 300, 5 * RGRP)):
        before = _sb(path)
        grow_volume(path, (before.total_blocks + extra) * BS)
        sb = _check_geometry(path, before.total_blocks)
        m = SingleNodeMount(path, heartbeat_interval=0.2)
        fs = m.start()
        try:
            st = fs.statfs()
            added = sb.data_blocks() - before.data_blocks()
            assert st["blocks"] == sb.data_blocks() and st["bfree"] > added
            old_free = st["bfree"] - added
            # more than the old volume and its lengthened last group have room for:
            # the new groups must take some
            big = os.urandom((old_free + added // 2) * BS)
            name = f"big{k}".encode()
            fh, di = fs.create(fs.root_ino, name, 0o644, os.O_RDWR, CTX)
            fs.write(fh, 0, big)
            fs.release(fh)
            files[name] = big
            used_new = [rg for rg in range(before.rgrp_count, sb.rgrp_count)
                        if fs.vol.rgrp(rg).free < sb.rgrp_range(rg)[1] - 2]
            assert used_new, "no new group was allocated from"
            assert fs.statfs()["bfree"] <= st["bfree"] - len(big) // BS
        finally:
            m.stop()
        _clean(path)
    assert _sb(path).total_blocks == old.total_blocks + 2 * RGRP + 300 + 5 * RGRP
    assert _read_all(path) == files


def test_grow_mounted_single_node(tmp_path):
    """``grow_mounted`` on a live single-node mount: the journal is checkpointed, the
    volume grows, the mount allocates from the new groups at once (the old last
    group's cached header is dropped: its counters stay right), df shows it."""
    path = _volume(tmp_path, "short")
    old = _sb(path)
    m = SingleNodeMount(path, heartbeat_interval=0.2)
    fs = m.start()
    data = os.urandom(200 * BS + 5)
    fh, _di = fs.create(fs.root_ino, b"before", 0o644, os.O_RDWR, CTX)
    fs.write(fh, 0, data)
    fs.release(fh)          # (its transaction is left running: grow_mounted commits it)
    last = old.rgrp_count - 1
    fs.vol.rgrp(last)       # the old last group's header is cached
    new_total = old.total_blocks + 4 * RGRP
    try:
        with pytest.raises(VolumeError, match="fewer than"):
            grow_mounted(fs.vol, new_total)     # the image is not bigger yet
        os.truncate(path, new_total * BS)
        sb = grow_mounted(fs.vol, new_total)
        assert fs.vol.sb.total_blocks == new_total and fs.vol.sb is not sb
        assert fs.vol.rgrp(last).length == RGRP
        assert fs.statfs()["blocks"] == sb.data_blocks()
        free = fs.statfs()["bfree"]
        assert free > old.data_blocks() - 300
        big = os.urandom((free - 80) * BS)      # nearly all of it: every group
        fh, _di = fs.create(fs.root_ino, b"big", 0o644, os.O_RDWR, CTX)
        fs.write(fh, 0, big)
        fs.release(fh)
        assert all(fs.vol.rgrp(rg).free < 200 for rg in range(sb.rgrp_count))
    finally:
        m.stop()
    _check_geometry(path, old.total_blocks)
    _clean(path)
    assert _read_all(path) == {b"before": data, b"big": big}


# -- interrupted grows -------------------------------------------------------------------

@pytest.mark.parametrize("step", STEPS[1:-1])
def test_fsck_on_an_interrupted_grow(tmp_path, step):
    """A grow stopped after a step that recorded it: ``fsck -n`` reports exactly one
    finding, a read-only mount refuses, ``fsck -y`` finishes it, ``fsck -fn`` is then
    clean and the files are intact."""
    path = _volume(tmp_path, "on-header")
    files = _write_files(path, 3)
    old = _sb(path)
    new_total = old.total_blocks + 2 * RGRP
    os.truncate(path, new_total * BS)

    def crash(name):
        if name == step:
            raise Stop(name)
    with BlockDevice(path) as dev:
        with pytest.raises(Stop):
            grow_on_disk(dev, old, new_total, crash=crash)
    assert _sb(path).growing and _sb(path).grow_from == old.total_blocks
    code, codes, text = _fsck(path, "n", force=False)
    assert code == 4 and codes == ["grow-interrupted"], text
    assert "an interrupted grow (from" in text and "mount or fsck -y completes it" in text
    assert _sb(path).growing                # -n wrote nothing
    with pytest.raises(VolumeError, match="grow of the volume was interrupted"):
        SingleNodeMount(path, readonly=True).start()
    code, codes, text = _fsck(path, "y")
    assert code == 1 and codes == ["grow-interrupted"], text
    _check_geometry(path, old.total_blocks)
    _clean(path)
    assert _read_all(path) == files


def test_mount_finishes_an_interrupted_grow(tmp_path):
    path = _volume(tmp_path, "short")
    files = _write_files(path, 4)
    old = _sb(path)
    new_total = old.total_blocks + 3 * RGRP
    os.truncate(path, new_total * BS)

    def crash(name):
        if name == "groups":
            raise Stop(name)
    with BlockDevice(path) as dev:
        with pytest.raises(Stop):
            grow_on_disk(dev, old, new_total, crash=crash)
    more = _write_files(path, 5)            # the mount finishes it first
    assert not _sb(path).growing
    _check_geometry(path, old.total_blocks)
    _clean(path)
    assert _read_all(path) == {**files, **more}


def test_grow_command_finishes_an_interrupted_grow_then_grows(tmp_path):
    path = _volume(tmp_path, "slack")
    old = _sb(path)
    mid = old.total_blocks + 2 * RGRP
    os.truncate(path, mid * BS)

    def crash(name):
        if name == "primary":
            raise Stop(name)
    with BlockDevice(path) as dev:
        with pytest.raises(Stop):
            grow_on_disk(dev, old, mid, crash=crash)
    said = []
    before, after = grow_volume(path, (mid + RGRP) * BS, say=said.append)
    assert len(said) == 1 and "finishing an interrupted grow" in said[0]
    assert before.total_blocks == old.total_blocks and after.total_blocks == mid + RGRP
    _check_geometry(path, mid)
    _clean(path)


# -- refusals -------------------------------------------------------------------------------

def _digest(path: str, heartbeats: bool = True) -> tuple[int, str]:
    """Size and hash of an image (without the slots' heartbeat blocks, when told:
    the grow command beats in a free slot while it works, and frees it after)."""
    with open(path, "rb") as f:
        data = bytearray(f.read())
    if not heartbeats:
        sb = Superblock.decode(data[:BS], 0)
        for slot in range(sb.nslots):
            bno = sb.heartbeat_bno(slot)
            hb = Heartbeat.decode(data[bno * BS:(bno + 1) * BS], bno)
            assert hb.state == HB_FREE
            data[bno * BS:(bno + 1) * BS] = bytes(BS)
    return len(data), hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("case", ["smaller", "same", "not-whole", "adds-nothing",
                                  "device-not-bigger", "bad-size"])
def test_bad_sizes_leave_the_volume_untouched(tmp_path, case):
    path = _volume(tmp_path, "slack")
    sb = _sb(path)
    size = {"smaller": f"{(sb.total_blocks - 100) * BS}",
            "same": f"{sb.total_blocks * BS}",
            "not-whole": f"{sb.total_blocks * BS + 1000}",
            "adds-nothing": f"{(sb.total_blocks + 4) * BS}",
            "device-not-bigger": None,
            "bad-size": "12 bananas"}[case]
    want = {"smaller": "smaller than the volume",
            "same": "already has that size",
            "not-whole": "not a whole number of 4096-byte blocks",
            "adds-nothing": "add nothing usable",
            "device-not-bigger": "no bigger than the volume",
            "bad-size": "bad size"}[case]
    before = _digest(path)
    args = ["grow", path] + (["--size", size] if size else [])
    proc = run_cli(*args, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and want in lines[0], proc.stderr
    assert _digest(path) == before
    if case == "adds-nothing":
        need = plan_grow.__globals__["min_grow_blocks"](sb)
        assert str(need * BS) in lines[0]
        with pytest.raises(UsageError):
            plan_grow(sb, need - 1)
        plan_grow(sb, need)


def test_mounted_volume_is_refused(tmp_path):
    path = _volume(tmp_path, "short")
    m = SingleNodeMount(path, heartbeat_interval=0.2)
    m.start()
    try:
        before = _digest(path)
        with pytest.raises(VolumeBusy, match=r"is mounted \(node .*\) and no cluster "
                                             r"member of this machine has it"):
            grow_volume(path, (_sb(path).total_blocks + RGRP) * BS)
        assert _digest(path) == before
    finally:
        m.stop()


def test_enospc_on_the_host_leaves_the_volume_untouched(tmp_path):
    """The image lives on a small tmpfs that has not room for the new groups: a
    clear error, the image cut back to its size, the volume unchanged."""
    where = tmp_path / "small"
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.decode().strip()}")
    try:
        path = str(where / "v.img")
        make_volume(path, _blocks("short") * BS, slots=1, rgrp_blocks=RGRP)
        with open(where / "filler", "wb") as f:    # leave ~200 KiB free on the tmpfs
            st = os.statvfs(str(where))
            f.write(bytes(st.f_bavail * st.f_frsize - 200 * 1024))
        before = _digest(path, heartbeats=False)
        proc = run_cli("grow", path, "--size", "400M", check=False)
        assert proc.returncode == 1, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "No space left on device" in lines[0] and \
            "the volume is unchanged" in lines[0], proc.stderr
        assert _digest(path, heartbeats=False) == before
        _clean(path)
    finally:
        subprocess.run(["umount", str(where)], capture_output=True)


def test_superblock_grow_fields():
    """``grow_from`` and the flag round-trip; a flag without ``grow_from`` (or the
    reverse) is bad geometry."""
    from clusterfs.errors import CorruptBlock
    from clusterfs.ondisk.format import SB_LAYOUT, plan_geometry
    sb = plan_geometry(1 << 16, 2)
    grown = sb.resized(sb.total_blocks + 5000)
    rec = Superblock(**{**grown.__dict__, "flags": SB_FLAG_GROWING,
                        "grow_from": sb.total_blocks})
    buf = rec.image(0)
    assert SB_LAYOUT.get(buf, "grow_from") == sb.total_blocks
    assert SB_LAYOUT.get(buf, "slot_table") == 0
    back = Superblock.decode(buf, 0)
    assert back.growing and back.grow_from == sb.total_blocks
    for flags, grow_from in ((SB_FLAG_GROWING, 0), (0, sb.total_blocks),
                             (SB_FLAG_GROWING, grown.total_blocks)):
        bad = Superblock(**{**grown.__dict__, "flags": flags, "grow_from": grow_from})
        with pytest.raises(CorruptBlock, match="grow from"):
            Superblock.decode(bad.image(0), 0)


def test_bitmap_entries_past_the_old_length_are_cleared(tmp_path):
    """Entries past a group's length are free by the format; should the old last
    group's bitmap hold any, the grow clears them before the group takes them."""
    from clusterfs.ondisk.format import USED, Bitmap
    path = _volume(tmp_path, "short")
    sb = _sb(path)
    start, length = sb.rgrp_range(sb.rgrp_count - 1)
    with BlockDevice(path) as dev:
        bm = Bitmap.decode(dev.read(start + 1), start + 1, sb.rgrp_count - 1, 0)
        bm.set_run(length + 5, 30, USED)
        dev.write(start + 1, bm.image())
    code, codes, text = _fsck(path)         # damage fsck knows, that grow repairs
    assert code == 4 and codes == ["bitmap-tail"], text
    grow_volume(path, (sb.total_blocks + RGRP) * BS)
    _check_geometry(path, sb.total_blocks)
    _clean(path)
