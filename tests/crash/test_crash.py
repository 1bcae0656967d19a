"""Crash tests: power cuts at hundreds of points of random workloads (no FUSE).

Each workload runs on a ``PowerLossDevice`` through ``Filesystem`` (the code behind
every FUSE request).  A reference run counts the device events (writes + flushes);
then, for each chosen crash point N, the workload runs again with ``cut_after(N)``,
the device left by the power cut (unflushed writes dropped, kept, or kept/dropped/torn
at random) is mounted (journal replay, orphans freed) and checked:

* the replayed volume is consistent (``check_consistency``: every block referenced
  once, bitmaps and counters agree, link counts, tree shapes);
* the tree equals the workload's model at an operation boundary no older than the
  last fsync that returned (so every fsynced file has exactly its data);
* the recovered volume keeps working: more operations, a clean unmount, consistent
  (the walk above, and the ``fsck`` checker run in-process).

Some crash points also cut the power again during the recovery itself (replay must
be idempotent).
"""

from __future__ import annotations

import os
import random

import pytest

from clusterfs.ondisk.blockdev import PowerCut
from tests.crash.crash_workload import CTX, Runner, check_recovered, read_tree
from tests.helpers import DeviceMount, check_consistency, fsck_device, power_loss_volume

NOPS = 60


def reference(seed: int, nops: int = NOPS, ops=None):
    """Run the workload to the end (and unmount); return (runner, events used)."""
    dev = power_loss_volume()
    m = DeviceMount(dev)
    fs = m.start()
    start = dev.events
    runner = Runner(fs, seed, ops=ops)
    # note the device events of every checkpoint: each one becomes crash points
    runner.checkpoint_events = []
    real = m.journal._checkpoint

    def checkpoint(*a, **kw):
        first = dev.events - start + 1
        try:
            return real(*a, **kw)
        finally:
            runner.checkpoint_events.extend(range(first, dev.events - start + 1))
    m.journal._checkpoint = checkpoint
    runner.run(nops)
    runner.journal_stats = m.journal.stats()
    m.journal._checkpoint = real
    m.stop()
    assert check_consistency(dev, tail_zero=True) == []
    return runner, start, dev.events - start


def crash_run(seed: int, nops: int, cut: int, ops=None):
    """Replay the workload until the cut; return (device, history index reached)."""
    dev = power_loss_volume()
    m = DeviceMount(dev)
    fs = m.start()
    runner = Runner(fs, seed, ops=ops)
    dev.cut_after(cut)
    try:
        runner.run(nops)
        m.stop()
    except PowerCut:
        pass
    else:
        raise AssertionError(f"no power cut within the workload (cut {cut})")
    return dev, len(runner.history) - 1, runner.synced


def recover_and_check(crashed, ref: Runner, done: int, synced: int, *, rng: random.Random,
                      recut: int | None = None) -> None:
    if recut is not None:
        # power fails again while the volume is being recovered
        crashed.cut_after(recut)
        try:
            DeviceMount(crashed).start()
        except PowerCut:
            pass
        crashed.cut_at = None
        crashed = crashed.crash(rng=rng)
    m = DeviceMount(crashed)
    fs = m.start()
    # the replayed (and orphan-freed) state, as fsck would see it after a clean stop
    tree = read_tree(fs)
    why = check_recovered(ref, tree, done, synced)
    assert why is None, why + "\nops:\n  " + "\n  ".join(ref.log)
    # the recovered volume keeps working
    fh, di = fs.create(fs.root_ino, b"after-crash", 0o644, os.O_RDWR, CTX)
    payload = rng.randbytes(50000)
    fs.write(fh, 0, payload)
    fs.fsync(fh, False)
    fs.release(fh)
    for name in [p for p in tree if p and "/" not in p][:3]:
        kind = tree[name][0]
        if kind == "d":
            continue
        fs.unlink(fs.root_ino, name.encode())
    m.stop()
    problems = check_consistency(crashed, tail_zero=False)
    assert problems == [], "\n".join(problems[:20]) + "\nops:\n  " + "\n  ".join(ref.log)
    code, text = fsck_device(crashed)           # the fsck checker agrees
    assert code == 0, f"fsck -fn exit {code}:\n{text}"
    m = DeviceMount(crashed)
    fs = m.start()
    fh = fs.open(fs.lookup(fs.root_ino, b"after-crash").bno, os.O_RDONLY)
    assert fs.read(fh, 0, 60000) == payload
    fs.release(fh)
    m.stop()


def crash_points(seed: int, count: int, nops: int = NOPS) -> list[int]:
    """``count`` cut points spread over the workload's events (plus the first few)."""
    _ref, _start, events = reference(seed, nops)
    rng = random.Random(seed * 7919)
    pts = set(range(1, min(6, events)))
    while len(pts) < min(count, events):
        pts.add(rng.randrange(1, events + 1))
    return sorted(pts)


def run_campaign(seed: int, count: int, modes=("drop", "keep", "random"),
                 nops: int = NOPS, ops=None, min_checkpoints: int = 0) -> int:
    ref, _start, events = reference(seed, nops, ops)
    assert ref.journal_stats["checkpoints"] >= min_checkpoints, ref.journal_stats
    rng = random.Random(seed)
    pts = set(range(1, min(6, events))) | set(ref.checkpoint_events)
    while len(pts) < min(count, events):
        pts.add(rng.randrange(1, events + 1))
    n = 0
    for i, cut in enumerate(sorted(pts)):
        dev, done, synced = crash_run(seed, nops, cut, ops)
        mode = modes[i % len(modes)]
        if mode == "drop":
            crashed = dev.crash()
        elif mode == "keep":
            crashed = dev.crash(keep=range(len(dev.pending)))
        else:
            crashed = dev.crash(rng=random.Random(cut))
        recut = 1 + (cut % 7) if i % 5 == 4 else None
        try:
            recover_and_check(crashed, ref, done, synced, rng=random.Random(cut), recut=recut)
        except AssertionError as e:
            raise AssertionError(f"seed {seed}, cut {cut}/{events}, mode {mode}, "
                                 f"recut {recut}: {e}") from None
        n += 1
    return n


@pytest.mark.parametrize("seed", range(1, 9))
def test_crash_points(seed):
    # 8 seeds x up to 60 points: about 400 crash points in the default run
    assert run_campaign(seed, 60) >= 30


@pytest.mark.parametrize("seed", [11, 12])
def test_crash_points_while_the_journal_wraps(seed):
    # many small fsynced transactions: the 255-block log fills, checkpoints, wraps
    assert run_campaign(seed, 60, nops=220, ops=Runner.SYNC_HEAVY, min_checkpoints=1) >= 30


@pytest.mark.parametrize("seed", [31])
def test_crash_points_in_fragmented_files(seed):
    # files of hundreds of extents: extent-tree splits and merges, multi-step truncate
    assert run_campaign(seed, 50, nops=40, ops=Runner.FRAGMENTED) >= 30


@pytest.mark.parametrize("seed", [41])
def test_crash_points_in_streamed_files(seed):
    # appends through one handle map blocks ahead of EOF: power cuts while they are
    # mapped, trimmed at the release, by a truncation or a write past them
    assert run_campaign(seed, 50, nops=40, ops=Runner.STREAMED) >= 30


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(400, 406))
def test_crash_campaign_streamed_slow(seed):
    run_campaign(seed, 200, nops=60, ops=Runner.STREAMED)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(300, 306))
def test_crash_campaign_fragmented_slow(seed):
    run_campaign(seed, 200, nops=60, ops=Runner.FRAGMENTED)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(200, 206))
def test_crash_campaign_journal_wrap_slow(seed):
    run_campaign(seed, 200, nops=400, ops=Runner.SYNC_HEAVY, min_checkpoints=2)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 120))
def test_crash_campaign_slow(seed):
    run_campaign(seed, 150, nops=90)
