"""Adding node slots (``clusterfs add-slots``, ``fs.addslots``): the new slots'
blocks, their use by mounts and journal replay, fsck, and every refusal."""

from __future__ import annotations

import json
import os

import pytest

from clusterfs.commands.mkfs import make_volume
from clusterfs.errors import CorruptBlock, NoSpace, UsageError, VolumeError
from clusterfs.fs.addslots import add_slots_on_disk
from clusterfs.fs.volume import Volume, read_superblock
from clusterfs.ondisk import slots as slotmod
from clusterfs.ondisk.blockdev import BLOCK_SIZE, BlockDevice, PowerLossDevice
from clusterfs.ondisk.format import (FORMAT_REVISION, HB_CLUSTER, HB_FREE, USED, SlotTable,
                                     Superblock, bitmap_blocks_for)
from tests.crash.crash_workload import CTX
from tests.helpers import (DeviceMount, check_consistency, fsck_device, power_loss_volume,
                           run_cli)

MiB = 1 << 20


def _state(dev, sb, bno: int) -> int:
    from clusterfs.ondisk.format import BLOCKS_PER_BITMAP, Bitmap
    rg = sb.rgrp_of(bno)
    start, _n = sb.rgrp_range(rg)
    j, i = divmod(bno - start, BLOCKS_PER_BITMAP)
    bm = Bitmap.decode(dev.read(start + 1 + j), start + 1 + j, rg, j * BLOCKS_PER_BITMAP)
    return bm.get(i)


def _fsck_clean(dev) -> None:
    code, text = fsck_device(dev)
    assert code == 0, text


def test_added_slots_have_a_heartbeat_and_a_clean_journal_in_used_blocks():
    dev = power_loss_volume(32 * MiB, slots=2)
    sb = read_superblock(dev)
    assert (sb.nslots, sb.fixed_slots, sb.slot_table, sb.added) == (2, 2, 0, [])
    new = add_slots_on_disk(dev, sb, 2)
    back = read_superblock(dev)
    assert back == new and (back.nslots, back.fixed_slots) == (4, 2)
    assert back.format_rev == FORMAT_REVISION and back.slot_table   # (never lowered)
    assert Superblock.decode(dev.read(back.backup_bno), back.backup_bno).slot_table == \
        back.slot_table
    for slot in (2, 3):
        hb = slotmod.read_heartbeat(dev, back, slot)
        assert hb is not None and (hb.slot, hb.state) == (slot, HB_FREE)
        start, length = back.journal_range(slot)
        assert length == back.journal_blocks and back.heartbeat_bno(slot) == start - 1
        assert back.in_data_area(start, length)
        hdr = slotmod.slot_journal(dev, back, slot).read_header()
        assert hdr.clean and (hdr.slot, hdr.start, hdr.length) == (slot, start, length)
        assert {_state(dev, back, b) for b in range(start - 1, start + length)} == {USED}
    assert _state(dev, back, back.slot_table) == USED
    # the fixed slots did not move
    assert [back.heartbeat_bno(i) for i in (0, 1)] == [2, 3]
    assert back.journal_range(1) == sb.journal_range(1)
    _fsck_clean(dev)
    # a second addition writes a new table and frees the old one
    old_table = back.slot_table
    again = add_slots_on_disk(dev, back, 1)
    assert again.nslots == 5 and again.slot_table != old_table
    assert again.added[:2] == back.added
    assert _state(dev, again, old_table) == 0
    assert SlotTable.decode(dev.read(again.slot_table), again.slot_table, again).seq == 2
    _fsck_clean(dev)


def test_a_node_in_an_added_slot_writes_and_its_journal_is_replayed():
    dev = power_loss_volume(32 * MiB, slots=2)
    add_slots_on_disk(dev, read_superblock(dev), 2)
    m = DeviceMount(dev, slot=3)
    fs = m.start()
    assert m.journal.start == read_superblock(dev).journal_range(3)[0]
    fh, _attr = fs.create(fs.root_ino, b"from-slot-3", 0o644, os.O_RDWR, CTX)
    fs.write(fh, 0, b"x" * 10000)
    fs.fsync(fh, False)
    # the node dies: its journal stays dirty, nothing checkpointed
    crashed = dev.crash()
    assert not slotmod.slot_journal(crashed, read_superblock(crashed), 3).is_clean()
    m2 = DeviceMount(crashed, slot=0)           # replays every dirty journal
    fs2 = m2.start()
    attr = fs2.lookup(fs2.root_ino, b"from-slot-3")
    fh2 = fs2.open(attr.bno, os.O_RDONLY)
    assert fs2.read(fh2, 0, 20000) == b"x" * 10000
    fs2.release(fh2)
    m2.stop()
    assert slotmod.slot_journal(crashed, read_superblock(crashed), 3).is_clean()
    _fsck_clean(crashed)


def test_fsck_replays_a_dirty_journal_of_an_added_slot(tmp_path):
    dev = power_loss_volume(32 * MiB, slots=1)
    add_slots_on_disk(dev, read_superblock(dev), 1)
    m = DeviceMount(dev, slot=1)
    fs = m.start()
    fh, _attr = fs.create(fs.root_ino, b"f", 0o644, os.O_RDWR, CTX)
    fs.fsync(fh, False)
    crashed = dev.crash()
    code, text = fsck_device(crashed)
    assert "journal of slot 1 needs replay" in text, text
    img = str(tmp_path / "v.img")
    crashed.save(img)
    assert run_cli("fsck", "-fy", img, check=False).returncode in (1, 0)
    assert run_cli("fsck", "-fn", img, check=False).returncode == 0


def test_cli_add_slots_and_status(tmp_path):
    img = str(tmp_path / "v.img")
    make_volume(img, 64 * MiB, slots=2)
    out = run_cli("add-slots", img, "2").stdout
    assert "added 2 slot(s), now 4" in out and "slot 3: heartbeat block" in out
    st = json.loads(run_cli("status", img, "--json", "--watch", "0").stdout)
    assert (st["nslots"], st["fixed_slots"]) == (4, 2)
    assert [s["added"] for s in st["slots"]] == [False, False, True, True]
    assert all(s["journal"] == "clean" and s["state"] == "free" for s in st["slots"])
    text = run_cli("status", img, "--watch", "0").stdout
    assert "4 slots (2 made by mkfs, 2 added" in text and "  +3  " in text
    assert run_cli("fsck", "-fn", img, check=False).returncode == 0


def _image(img: str, ignore: int | None) -> bytes:
    data = bytearray(open(img, "rb").read())
    if ignore is not None:
        data[ignore * 4096:(ignore + 1) * 4096] = bytes(4096)
    return bytes(data)


def _refused(img: str, *args: str, status: int, ignore: int | None = None) -> str:
    """Run add-slots, which must fail with one line and ``status`` and leave the
    volume as it was (but block ``ignore``)."""
    before = _image(img, ignore)
    proc = run_cli("add-slots", img, *args, check=False)
    assert proc.returncode == status, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert _image(img, ignore) == before       # untouched
    return lines[0]


def test_cli_bad_inputs_leave_the_volume_untouched(tmp_path):
    img = str(tmp_path / "v.img")
    make_volume(img, 64 * MiB, slots=2)
    assert "at least 1" in _refused(img, "0", status=2)
    assert "N must be a number" in _refused(img, "two", status=2)
    assert "at most 253 more" in _refused(img, "254", status=2)
    # 64 MiB with 2 slots: journals of 256 blocks, 16 groups of 1024: 3 slots fit in
    # a group, a few dozen in all
    line = _refused(img, "100", status=1)
    assert "not enough contiguous free space for 100 slot(s)" in line, line
    assert run_cli("fsck", "-fn", img, check=False).returncode == 0


def test_cli_refuses_a_mounted_volume(tmp_path):
    img = str(tmp_path / "v.img")
    make_volume(img, 64 * MiB, slots=2)
    dev = BlockDevice(img)
    sb = read_superblock(dev)
    w = slotmod.HeartbeatWriter(dev, sb, 1, "nodeB", HB_CLUSTER, 0.2)
    w.set_state(HB_CLUSTER)
    w.start()
    try:
        line = _refused(img, "1", status=16, ignore=sb.heartbeat_bno(1))
    finally:
        w.stop()
        w.set_state(HB_FREE)
        dev.close()
    assert line.endswith(f"{img} is mounted (node nodeB) and no cluster member of this "
                         f"machine has it: add the slots where one has, or unmount it"), line


def test_a_dirty_journal_is_refused(tmp_path):
    dev = power_loss_volume(32 * MiB, slots=2)
    m = DeviceMount(dev, slot=1)
    fs = m.start()
    fh, _attr = fs.create(fs.root_ino, b"f", 0o644, os.O_RDWR, CTX)
    fs.fsync(fh, False)
    crashed = dev.crash()
    before = dict(crashed.durable)
    with pytest.raises(VolumeError, match="journal of slot 1 needs replay"):
        add_slots_on_disk(crashed, read_superblock(crashed), 1)
    assert crashed.durable == before


def test_api_refusals_write_nothing():
    dev = power_loss_volume(16 * MiB, slots=1)
    sb = read_superblock(dev)
    before = dict(dev.durable)
    with pytest.raises(UsageError):
        add_slots_on_disk(dev, sb, 0)
    with pytest.raises(UsageError):
        add_slots_on_disk(dev, sb, 256)
    # 16 MiB: groups of 256 blocks (data area 254), too small for mkfs's journals of
    # 256 blocks: the added ones get 128
    with pytest.raises(NoSpace, match="each needs 129 contiguous free blocks"):
        add_slots_on_disk(dev, sb, 60)
    # a length that does not fit a group, or below the journal's minimum
    with pytest.raises(UsageError, match="does not fit in a resource group"):
        add_slots_on_disk(dev, sb, 1, journal_blocks=254)
    with pytest.raises(UsageError, match="below the smallest journal"):
        add_slots_on_disk(dev, sb, 1, journal_blocks=63)
    assert dev.durable == before and not dev.pending


def _sparse_device(img: str) -> PowerLossDevice:
    """The image as a ``PowerLossDevice``, reading only its data extents (a sparse
    image of 40 GiB holds a few MiB)."""
    blocks = {}
    zero = bytes(BLOCK_SIZE)
    size = os.path.getsize(img)
    with open(img, "rb") as f:
        fd = f.fileno()
        pos = 0
        while pos < size:
            try:
                pos = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:                         # ENXIO: no data after pos
                break
            end = os.lseek(fd, pos, os.SEEK_HOLE)
            first = pos // BLOCK_SIZE
            data = os.pread(fd, (-(-end // BLOCK_SIZE) - first) * BLOCK_SIZE,
                            first * BLOCK_SIZE)
            for k in range(0, len(data), BLOCK_SIZE):
                if data[k:k + BLOCK_SIZE] != zero:
                    blocks[first + k // BLOCK_SIZE] = data[k:k + BLOCK_SIZE]
            pos = end
    return PowerLossDevice(size // BLOCK_SIZE, blocks)


def test_slots_added_to_a_large_volume_have_shorter_journals_that_work(tmp_path):
    """40 GiB (sparse): mkfs's journals of 32768 blocks do not fit in its groups of
    32768; the added slots get 16384 (the largest power of two that fits), and work:
    a node mounts in one, writes, dies, its journal is replayed; fsck and status.
    (No ``check_consistency``: it walks every block, 10 million here; fsck does the
    same checks, and the smaller volumes below have it.)"""
    img = str(tmp_path / "v.img")
    sb = make_volume(img, 40 << 30, slots=2)
    room = sb.rgrp_blocks - 1 - sb.bitmap_blocks
    assert (sb.journal_blocks, sb.rgrp_blocks) == (32768, 32768) and room < 32769
    out = run_cli("add-slots", img, "2").stdout
    assert "added 2 slot(s), now 4 (journal 64 MiB each; the 2 of mkfs have 128 MiB)" \
        in out, out
    dev = _sparse_device(img)
    new = read_superblock(dev)
    assert (new.nslots, new.added_journal_blocks) == (4, 16384)
    assert SlotTable.decode(dev.read(new.slot_table), new.slot_table, new) \
        .journal_blocks == 16384
    assert [new.journal_range(i)[1] for i in range(4)] == [32768, 32768, 16384, 16384]
    for slot in (2, 3):
        start, length = new.journal_range(slot)
        assert f"slot {slot}: heartbeat block {start - 1}, journal blocks {start}-" \
               f"{start + length - 1}" in out, out
        assert new.in_data_area(start - 1, 1 + length)
        hdr = slotmod.slot_journal(dev, new, slot).read_header()
        assert hdr.clean and (hdr.start, hdr.length) == (start, 16384)
        assert {_state(dev, new, b) for b in (start - 1, start + length - 1)} == {USED}
    st = json.loads(run_cli("status", img, "--json", "--watch", "0").stdout)
    assert [(s["slot"], s["added"], s["journal"], s["state"]) for s in st["slots"]] == \
        [(0, False, "clean", "free"), (1, False, "clean", "free"),
         (2, True, "clean", "free"), (3, True, "clean", "free")]
    assert [s["journal_block"] for s in st["slots"][2:]] == \
        [new.journal_range(2)[0], new.journal_range(3)[0]]
    assert run_cli("fsck", "-fn", img, check=False).returncode == 0
    # a node in an added slot, its journal 16384 blocks long
    m = DeviceMount(dev, slot=3)
    fs = m.start()
    assert (m.journal.start, m.journal.length) == new.journal_range(3)
    fh, _attr = fs.create(fs.root_ino, b"on-a-large-volume", 0o644, os.O_RDWR, CTX)
    fs.write(fh, 0, b"y" * 300000)
    fs.fsync(fh, False)
    crashed = dev.crash()                       # the node dies: nothing checkpointed
    sb3 = read_superblock(crashed)
    assert not slotmod.slot_journal(crashed, sb3, 3).is_clean()
    m2 = DeviceMount(crashed, slot=2)           # replays slot 3's journal
    fs2 = m2.start()
    attr = fs2.lookup(fs2.root_ino, b"on-a-large-volume")
    fh2 = fs2.open(attr.bno, os.O_RDONLY)
    assert fs2.read(fh2, 0, 400000) == b"y" * 300000
    fs2.release(fh2)
    m2.stop()
    assert all(slotmod.slot_journal(crashed, sb3, i).is_clean() for i in range(4))
    _fsck_clean(crashed)
    # a later addition keeps the table's length
    again = add_slots_on_disk(crashed, read_superblock(crashed), 1)
    assert again.journal_range(4)[1] == 16384 and again.added_journal_blocks == 16384
    _fsck_clean(crashed)


def test_a_journal_larger_than_a_group_gets_the_largest_power_of_two(tmp_path):
    img = str(tmp_path / "v.img")
    sb = make_volume(img, 64 * MiB, slots=1, journal_blocks=1024, rgrp_blocks=1024)
    assert sb.rgrp_blocks - 1 - bitmap_blocks_for(1024) == 1022
    out = run_cli("add-slots", img, "1").stdout
    assert "(journal 2 MiB each; the 1 of mkfs have 4 MiB)" in out, out
    vol = Volume.open(img)
    try:
        assert vol.sb.journal_range(1)[1] == 512 and vol.sb.journal_range(0)[1] == 1024
    finally:
        vol.close()
    assert run_cli("fsck", "-fn", img, check=False).returncode == 0


def test_journal_size_option(tmp_path):
    img = str(tmp_path / "v.img")
    make_volume(img, 64 * MiB, slots=1, journal_blocks=1024, rgrp_blocks=1024)
    for bad, says in [("4M", "--journal-size 4 MiB (1024 blocks) does not fit in a "
                             "resource group: its data area of 1022 blocks holds a "
                             "heartbeat block and a journal of 1021 blocks at most"),
                      ("10K", "--journal-size 10K is not a whole number of"),
                      ("128K", "--journal-size 128 KiB is below the smallest journal "
                               "(256 KiB, 64 blocks)"),
                      ("lots", "--journal-size: bad size 'lots'"),
                      ("0", "--journal-size 0 is not a whole number")]:
        line = _refused(img, "1", "--journal-size", bad, status=2)
        assert says in line, line
    out = run_cli("add-slots", img, "2", "--journal-size", "1M").stdout
    assert "now 3 (journal 1 MiB each; the 1 of mkfs have 4 MiB)" in out, out
    # every later slot has the table's length: another one is refused
    line = _refused(img, "1", "--journal-size", "2M", status=2)
    assert "--journal-size 2 MiB differs from the journals of the slots added before " \
           "(1 MiB, 256 blocks)" in line, line
    assert "now 4 (journal 1 MiB each" in \
        run_cli("add-slots", img, "1", "--journal-size", "1M").stdout
    assert "now 5 (journal 1 MiB each" in run_cli("add-slots", img, "1").stdout
    vol = Volume.open(img)
    try:
        assert [vol.sb.journal_range(i)[1] for i in range(5)] == [1024] + [256] * 4
    finally:
        vol.close()
    assert run_cli("fsck", "-fn", img, check=False).returncode == 0


def test_the_smallest_journal_is_accepted_and_works():
    """64 blocks (256K): the journal's ``MIN_LENGTH``, as mkfs's --journal-size."""
    dev = power_loss_volume(32 * MiB, slots=1)
    with pytest.raises(UsageError, match="below the smallest journal"):
        add_slots_on_disk(dev, read_superblock(dev), 1, journal_blocks=63)
    new = add_slots_on_disk(dev, read_superblock(dev), 1, journal_blocks=64)
    assert new.journal_range(1)[1] == 64
    m = DeviceMount(dev, slot=1)
    fs = m.start()
    for k in range(40):          # many commits: the log wraps around its 63 blocks
        fh, _attr = fs.create(fs.root_ino, b"f%d" % k, 0o644, os.O_RDWR, CTX)
        fs.write(fh, 0, b"z" * 5000)
        fs.fsync(fh, False)
        fs.release(fh)
    crashed = dev.crash()
    m2 = DeviceMount(crashed, slot=0)
    m2.start()
    m2.stop()
    assert slotmod.slot_journal(crashed, read_superblock(crashed), 1).is_clean()
    assert not check_consistency(crashed)
    _fsck_clean(crashed)


def test_a_slot_table_with_too_short_journals_is_damaged():
    dev = power_loss_volume(32 * MiB, slots=1)
    new = add_slots_on_disk(dev, read_superblock(dev), 1, journal_blocks=64)
    table = SlotTable.decode(dev.read(new.slot_table), new.slot_table, new)
    table.journal_blocks = 63
    with pytest.raises(CorruptBlock, match="journals of 63 blocks, below the minimum"):
        SlotTable.decode(table.image(), new.slot_table, new)


def test_a_damaged_slot_table_is_named_by_mount_and_fsck(tmp_path):
    img = str(tmp_path / "v.img")
    make_volume(img, 64 * MiB, slots=2)
    run_cli("add-slots", img, "1")
    vol = Volume.open(img)
    table = vol.sb.slot_table
    vol.close()
    with open(img, "r+b") as f:
        f.seek(table * 4096 + 40)
        f.write(b"\x07")                      # journal_blocks, crc now wrong
    with pytest.raises(VolumeError, match=f"slot table \\(block {table}\\) is damaged"):
        Volume.open(img)
    proc = run_cli("fsck", "-fn", img, check=False)
    assert proc.returncode != 0
    assert f"slot table (block {table}) is damaged" in proc.stdout, proc.stdout
    # a repair run repairs nothing (it would free the added slot's blocks); it
    # only beats in a free slot meanwhile (block 2: slot 0's heartbeat)
    before = _image(img, 2)
    proc = run_cli("fsck", "-fy", img, check=False)
    assert "no repairs" in proc.stdout and _image(img, 2) == before, proc.stdout


def test_a_revision_3_volume_is_raised_to_4():
    dev = power_loss_volume(32 * MiB, slots=1)
    sb = read_superblock(dev)
    sb.format_rev = 3
    dev.write(sb.backup_bno, sb.image(sb.backup_bno))
    dev.write(0, sb.image(0))
    dev.flush()
    new = add_slots_on_disk(dev, read_superblock(dev), 1)
    assert new.format_rev == 4
    assert Superblock.decode(dev.read(0), 0).format_rev == 4
    assert Superblock.decode(dev.read(new.backup_bno), new.backup_bno).format_rev == 4
    _fsck_clean(dev)


def test_lockd_slot_watch_and_member_follow_added_slots():
    import trio

    from clusterfs.cluster.lockd import SlotWatch
    dev = power_loss_volume(32 * MiB, slots=2)
    sb = read_superblock(dev)
    watch = SlotWatch(dev, sb)
    trio.run(watch.update)
    assert sorted(watch.hbs) == [0, 1]
    add_slots_on_disk(dev, sb, 2)
    trio.run(watch.update)
    assert sorted(watch.hbs) == [0, 1, 2, 3] and watch.sb.nslots == 4


def test_a_member_adopts_a_superblock_with_added_slots():
    from clusterfs.cluster.coherence import Coherence
    from clusterfs.cluster.member import ClusterMount
    dev = power_loss_volume(32 * MiB, slots=2)
    sb = read_superblock(dev)
    m = ClusterMount("<dev>", key=b"k" * 32, slot=1)
    m.vol = Volume(dev, sb, slot=1)
    m.coh = Coherence.__new__(Coherence)
    m.coh.slot = 1
    m.coh.prefer_groups(sb)
    assert m.coh.preferred[0] == 1 and m.coh.preferred[1] == 3
    new = add_slots_on_disk(dev, sb, 2)
    m.adopt_superblock(read_superblock(dev))
    assert m.vol.sb.nslots == 4 and m.vol.sb.heartbeat_bno(3) == new.heartbeat_bno(3)
    assert m.coh.preferred[:2] == [1, 5]           # g % 4 == 1 now
    assert sorted(m.coh.rank, key=m.coh.rank.get) == m.coh.preferred
    # anything but added slots is refused, and the old superblock kept
    other = read_superblock(dev)
    other.rgrp_count -= 1
    with pytest.raises(ValueError, match="rgrp_count"):
        m.adopt_superblock(other)
    stranger = read_superblock(dev)
    stranger.uuid = bytes(16)
    with pytest.raises(ValueError, match="uuid"):
        m.adopt_superblock(stranger)
    with pytest.raises(ValueError, match="slots"):
        m.adopt_superblock(read_superblock(power_loss_volume(32 * MiB, slots=2)))
    assert m.vol.sb.nslots == 4
