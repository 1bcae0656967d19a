"""Adding slots under power cuts (``fs.addslots``, no FUSE).

After each step of ``add_slots_on_disk`` (and at every device event, with the
unflushed writes kept, dropped or torn at random) the volume mounts, a file can be
made, and fsck finds at most what the module's doc promises for that point (leaked
blocks, the backup superblock ahead of the primary); its repair (the rollback)
leaves it clean.  Before the primary superblock is written the volume has its old
slots, after it the new ones.  Each runs on two volumes: one whose added journals
are as long as mkfs's, one whose groups are too short for them (the added journals
are shorter: the slot table's length).
"""

from __future__ import annotations

import io
import os
import random
import tempfile

import pytest

from clusterfs.commands.mkfs import make_volume
from clusterfs.fs.addslots import STEPS, add_slots_on_disk
from clusterfs.fs.volume import read_superblock
from clusterfs.ondisk.blockdev import BLOCK_SIZE, PowerCut, PowerLossDevice
from fsck.checker import Fsck
from fsck.report import Report
from tests.crash.crash_workload import CTX
from tests.helpers import DeviceMount, power_loss_volume

MiB = 1 << 20
ROLLBACK = {"leaked-blocks", "add-slots-interrupted", "rgrp-counts"}


GEOMETRIES = ["same", "shorter"]
_SHORTER: dict[int, bytes] = {}


class Stop(Exception):
    pass


def _volume(geometry: str):
    """32 MiB, 2 slots.  "same": mkfs's journals of 256 blocks fit in its groups of
    512.  "shorter": journals of 512 blocks, as long as a group, so the added ones
    get 256 (the largest power of two that fits a data area of 510 blocks)."""
    if geometry == "same":
        return power_loss_volume(32 * MiB, slots=2)
    if not _SHORTER:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "v.img")
            make_volume(path, 32 * MiB, slots=2, journal_blocks=512, rgrp_blocks=512)
            with open(path, "rb") as f:
                for bno in range(32 * MiB // BLOCK_SIZE):
                    buf = f.read(BLOCK_SIZE)
                    if any(buf):
                        _SHORTER[bno] = buf
    dev = PowerLossDevice(32 * MiB // BLOCK_SIZE, _SHORTER)
    assert read_superblock(dev).journal_blocks == 512
    return dev


def _fsck(dev, mode: str = "n") -> tuple[int, set[str], str]:
    out = io.StringIO()
    rep = Report(mode, out=out, err=out, quiet=False)
    fk = Fsck("<device>", mode=mode, force=True, report=rep, device=dev, live_watch=0,
              hold_slot=False)
    code = fk.check()
    assert fk.internal_error is None, fk.internal_error
    return code, {f.code for f in rep.findings}, out.getvalue()


def _mount_and_write(dev, slot: int, name: bytes) -> None:
    m = DeviceMount(dev, slot=slot)
    fs = m.start()
    fh, _di = fs.create(fs.root_ino, name, 0o644, os.O_RDWR, CTX)
    fs.write(fh, 0, os.urandom(50000))
    fs.release(fh)
    m.stop()


def _recover(dev, old_nslots: int, new_nslots: int, allowed: set[str]) -> int:
    """The checks after a power cut; returns the slot count the volume has."""
    nslots = read_superblock(dev).nslots
    assert nslots in (old_nslots, new_nslots)
    code, found, text = _fsck(dev)
    assert found <= allowed, text
    # mounting is safe before any repair: what add-slots took is never handed out
    _mount_and_write(dev, 0, b"before-repair")
    if nslots == new_nslots:
        _mount_and_write(dev, new_nslots - 1, b"in-a-new-slot")
    code, found2, text = _fsck(dev)
    assert found2 <= allowed, text
    if found2:
        code, _f, text = _fsck(dev, "y")
        assert code in (0, 1), text
    code, found3, text = _fsck(dev)
    assert code == 0 and not found3, text
    return nslots


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("again", [False, True], ids=["first", "second"])
@pytest.mark.parametrize("step", STEPS)
def test_power_cut_after_each_step(step, again, geometry):
    """``again``: the volume has added slots already (a table to replace)."""
    if step == "released" and not again:
        pytest.skip("there is no old table to release on the first addition")
    dev = _volume(geometry)
    if again:
        add_slots_on_disk(dev, read_superblock(dev), 1)
    sb = read_superblock(dev)

    def crash(name):
        if name == step:
            raise Stop(name)
    with pytest.raises(Stop):
        add_slots_on_disk(dev, sb, 2, crash=crash)
    crashed = dev.crash()
    committed = STEPS.index(step) >= STEPS.index("primary")
    after = read_superblock(crashed)
    assert after.nslots == sb.nslots + (2 if committed else 0)
    if committed:           # the added journals: 256 blocks; the fixed ones: mkfs's
        assert after.journal_range(sb.nslots + 1)[1] == 256
        assert after.journal_range(0)[1] == (512 if geometry == "shorter" else 256)
    _code, found, text = _fsck(crashed)
    expect = {"written": set(), "allocated": {"leaked-blocks"},
              "backup": {"leaked-blocks", "add-slots-interrupted"},
              "primary": {"leaked-blocks"} if again else set(),
              "released": set()}[step]
    assert found == expect, text
    if step == "primary" and again:
        assert f"block {sb.slot_table} marked used but referenced by nothing" in text
    _recover(crashed, sb.nslots, sb.nslots + 2, expect)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("again", [False, True], ids=["first", "second"])
def test_power_cut_at_every_device_event(again, geometry):
    seen = set()
    for cut in range(1, 200):
        dev = _volume(geometry)
        if again:
            add_slots_on_disk(dev, read_superblock(dev), 1)
        sb = read_superblock(dev)
        dev.cut_after(cut)
        try:
            add_slots_on_disk(dev, sb, 2)
        except PowerCut:
            pass
        else:
            break
        crashed = dev.crash(rng=random.Random(cut))
        seen.add(_recover(crashed, sb.nslots, sb.nslots + 2, ROLLBACK))
    else:
        raise AssertionError("add_slots_on_disk never finished")
    assert read_superblock(dev).nslots == sb.nslots + 2
    # (the first addition's last event is the flush of the primary: a cut there
    # keeps or drops it; after a second one, the release of the old table follows)
    assert cut > 10 and seen == ({sb.nslots, sb.nslots + 2} if again else {sb.nslots}) \
        or seen == {sb.nslots, sb.nslots + 2}, (cut, seen)
