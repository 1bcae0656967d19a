"""Growing a volume under power cuts (no FUSE).

The volume is a ``PowerLossDevice`` larger than the file system on it (the device
was enlarged).  A grow stopped after any of its steps, or by a power cut at any of
its device writes and flushes with the unflushed writes kept, dropped or torn at
random, leaves a volume that mounts (the mount finishes the grow when the primary
superblock recorded it), whose files read back unchanged, that fsck finds clean and
whose new space is usable.  The old last group is short, full with slack after it,
or full with a new group's header or bitmap block on the old backup superblock.
"""

from __future__ import annotations

import os
import random

import pytest

from clusterfs.commands.mkfs import make_volume
from clusterfs.fs.grow import STEPS, grow_on_disk
from clusterfs.ondisk.blockdev import PowerCut, PowerLossDevice
from clusterfs.ondisk.format import BLOCK_SIZE, Superblock
from tests.crash.crash_workload import CTX
from tests.helpers import DeviceMount, check_consistency, fsck_device

BS = BLOCK_SIZE
RGRP = 1024
RSTART = 2 + 1 + 256            # one slot, a journal of 256 blocks
GROUPS = 4
TAILS = {"short": 600, "slack": 12, "on-header": 1, "on-bitmap": 2}
EXTRA = 2 * RGRP + 500          # blocks the device grew by

_BASE: dict[str, tuple[dict[int, bytes], dict[bytes, bytes]]] = {}


def _base(tail: str, tmp_path_factory) -> tuple[dict[int, bytes], dict[bytes, bytes]]:
    """The blocks of a volume with a few files on it, and the files (made once per
    kind of tail)."""
    if tail not in _BASE:
        total = RSTART + GROUPS * RGRP + TAILS[tail]
        path = str(tmp_path_factory.mktemp("base") / "v.img")
        make_volume(path, total * BS, slots=1, rgrp_blocks=RGRP)
        with open(path, "rb") as f:
            image = f.read()
        blocks = {b: image[b * BS:(b + 1) * BS] for b in range(total)
                  if any(image[b * BS:(b + 1) * BS])}
        dev = PowerLossDevice(total, blocks)
        m = DeviceMount(dev)
        fs = m.start()
        rnd = random.Random(tail)
        files = {}
        for i, n in enumerate((5, 700 * BS + 3, 40 * BS)):
            data = rnd.randbytes(n)
            fh, _di = fs.create(fs.root_ino, f"f{i}".encode(), 0o644, os.O_RDWR, CTX)
            fs.write(fh, 0, data)
            fs.release(fh)
            files[f"f{i}".encode()] = data
        m.stop()
        dev.flush()
        _BASE[tail] = (dict(dev.durable), files)
    return _BASE[tail]


def _device(tail: str, tmp_path_factory) -> tuple[PowerLossDevice, Superblock, dict]:
    blocks, files = _base(tail, tmp_path_factory)
    total = RSTART + GROUPS * RGRP + TAILS[tail]
    dev = PowerLossDevice(total + EXTRA, blocks)
    sb = Superblock.decode(dev.read(0), 0)
    assert sb.total_blocks == total
    return dev, sb, files


def _recovered(dev, files: dict, old: Superblock) -> Superblock:
    """Mount (finishing the grow if recorded), read every file, fill the free space
    with a new file, unmount; fsck clean.  Returns the superblock after."""
    m = DeviceMount(dev)
    fs = m.start()
    sb = fs.vol.sb
    assert not sb.growing
    assert sb.total_blocks in (old.total_blocks, old.total_blocks + EXTRA)
    for name, data in files.items():
        di = fs.lookup(fs.root_ino, name)
        fh = fs.open(di.bno, os.O_RDONLY)
        assert fs.read(fh, 0, di.size + 1) == data, name
        fs.release(fh)
    st = fs.statfs()
    assert st["blocks"] == sb.data_blocks()
    fh, _di = fs.create(fs.root_ino, b"fill", 0o644, os.O_RDWR, CTX)
    fs.write(fh, 0, bytes(range(256)) * 16 * (st["bfree"] - 40))
    fs.release(fh)
    m.stop()
    code, text = fsck_device(dev)
    assert code == 0, text
    assert check_consistency(dev, tail_zero=False) == []
    return sb


@pytest.mark.parametrize("tail", list(TAILS))
@pytest.mark.parametrize("step", STEPS)
def test_grow_stopped_after_each_step(tail, step, tmp_path_factory):
    """Stopped right after a step (all of it durable): the old volume before the
    grow is recorded, the grown one after; a second finish changes nothing."""
    dev, sb, files = _device(tail, tmp_path_factory)

    def crash(name):
        if name == step:
            raise PowerCut(name)
    with pytest.raises(PowerCut):
        grow_on_disk(dev, sb, sb.total_blocks + EXTRA, crash=crash)
    recorded = STEPS.index(step) >= STEPS.index("primary")
    assert Superblock.decode(dev.read(0), 0).total_blocks == \
        sb.total_blocks + (EXTRA if recorded else 0)
    after = _recovered(dev.crash(), files, sb)
    assert after.total_blocks == sb.total_blocks + (EXTRA if recorded else 0)


@pytest.mark.parametrize("tail", ["short", "on-header"])
def test_power_cut_anywhere(tail, tmp_path_factory):
    """A power cut at each device event of the grow, the unflushed writes kept,
    dropped or torn at random: the volume recovers old or grown, never between."""
    seen = 0
    for cut in range(1, 400):
        dev, sb, files = _device(tail, tmp_path_factory)
        dev.cut_after(cut)
        try:
            grow_on_disk(dev, sb, sb.total_blocks + EXTRA)
        except PowerCut:
            seen += 1
        else:
            dev.cut_at = None
            assert _recovered(dev, files, sb).total_blocks == sb.total_blocks + EXTRA
            break
        for seed in range(2):
            _recovered(dev.crash(rng=random.Random(cut * 10 + seed)), files, sb)
    assert seen >= 8, seen


def test_a_torn_group_header_is_old_or_new(tmp_path_factory):
    """Step 4 changes only the first sector of the old last group's header: torn at
    any sector, the write leaves the old header or the new one, both valid."""
    from clusterfs.ondisk.format import RgrpHeader
    dev, sb, files = _device("short", tmp_path_factory)
    start, _length = sb.rgrp_range(sb.rgrp_count - 1)

    def crash(name):
        if name == "groups":
            dev.cut_after(2)        # the header write of step 4, then its flush
    with pytest.raises(PowerCut):
        grow_on_disk(dev, sb, sb.total_blocks + EXTRA, crash=crash)
    i = next(i for i, (bno, _b) in enumerate(dev.pending) if bno == start)
    for sectors in range(1, BS // 512):
        torn = dev.crash(tear={i: sectors})
        hdr = RgrpHeader.decode(torn.read(start), start)
        assert hdr.length in (TAILS["short"] - 1, RGRP)
        _recovered(torn, files, sb)
