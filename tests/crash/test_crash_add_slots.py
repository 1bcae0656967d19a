"""Adding slots under power cuts (``fs.addslots``, no FUSE).

After each step of ``add_slots_on_disk`` (and at every device event, with the
unflushed writes kept, dropped or torn at random) the volume mounts, a file can be
made, and fsck finds at most what the module's doc promises for that point (leaked
blocks, the backup superblock ahead of the primary); its repair (the rollback)
leaves it clean.  Before the primary superblock is written the volume has its old
slots, after it the new ones.
"""

from __future__ import annotations

import io
import os
import random

import pytest

from clusterfs.fs.addslots import STEPS, add_slots_on_disk
from clusterfs.fs.volume import read_superblock
from clusterfs.ondisk.blockdev import PowerCut
from fsck.checker import Fsck
from fsck.report import Report
from tests.crash.crash_workload import CTX
from tests.helpers import DeviceMount, power_loss_volume

MiB = 1 << 20
ROLLBACK = {"leaked-blocks", "add-slots-interrupted", "rgrp-counts"}


class Stop(Exception):
    pass


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


@pytest.mark.parametrize("again", [False, True], ids=["first", "second"])
@pytest.mark.parametrize("step", STEPS)
def test_power_cut_after_each_step(step, again):
    """``again``: the volume has added slots already (a table to replace)."""
    if step == "released" and not again:
        pytest.skip("there is no old table to release on the first addition")
    dev = power_loss_volume(32 * MiB, slots=2)
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
    assert read_superblock(crashed).nslots == sb.nslots + (2 if committed else 0)
    _code, found, text = _fsck(crashed)
    expect = {"written": set(), "allocated": {"leaked-blocks"},
              "backup": {"leaked-blocks", "add-slots-interrupted"},
              "primary": {"leaked-blocks"} if again else set(),
              "released": set()}[step]
    assert found == expect, text
    if step == "primary" and again:
        assert f"block {sb.slot_table} marked used but referenced by nothing" in text
    _recover(crashed, sb.nslots, sb.nslots + 2, expect)


@pytest.mark.parametrize("again", [False, True], ids=["first", "second"])
def test_power_cut_at_every_device_event(again):
    seen = set()
    for cut in range(1, 200):
        dev = power_loss_volume(32 * MiB, slots=2)
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
