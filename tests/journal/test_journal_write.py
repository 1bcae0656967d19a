"""The write side: commit, ordered mode, checkpoint, space, sources, states, errors."""

from __future__ import annotations

import random

import pytest

from clusterfs.ondisk.blockdev import PowerCut, PowerLossDevice
from journal import Journal, JournalAborted, JournalError
from tests.journal.jtools import (BS, LENGTH, START, ZERO, FaultyDevice, ImageObj,
                                  RecordingDevice, again, blk, make)

# -- ordered mode -------------------------------------------------------------------------

def test_ordered_mode_data_is_durable_whenever_the_commit_is():
    outcomes = set()
    for cut in range(1, 5):                # commit = log write, flush, commit write, flush
        for seed in range(20):
            dev, j = make()
            j.add(1, blk(1, "old"))
            j.commit()
            dev.write(10, blk("file data"))    # file data, never journaled
            j.add(1, blk(1, "new"))            # metadata pointing at it
            dev.cut_after(cut)
            with pytest.raises(PowerCut):
                j.commit()
            crashed = dev.crash(rng=random.Random(seed))
            again(crashed).replay()
            committed = crashed.read(1) == blk(1, "new")
            assert committed or crashed.read(1) == blk(1, "old")
            if committed:
                assert crashed.read(10) == blk("file data"), (cut, seed)
            outcomes.add(committed)
    assert outcomes == {True, False}


def test_ordered_mode_commit_returns_with_data_durable():
    dev, j = make()
    dev.write(10, blk("file data"))
    j.add(1, blk(1))
    j.commit()
    crashed = dev.crash()                  # drop everything not flushed
    assert crashed.read(10) == blk("file data")
    again(crashed).replay()
    assert crashed.read(1) == blk(1)


def test_commit_io_order_and_one_write_per_run():
    rec = RecordingDevice(PowerLossDevice(256))
    Journal.format(rec, START, LENGTH)
    j = Journal(rec, START, LENGTH)
    j.open()
    for b in range(20):
        j.add(b, blk(b))
    rec.ops.clear()
    assert j.commit() == 1
    assert rec.ops == [("write", START + 1, 21), ("flush",), ("write", START + 22, 1),
                       ("flush",)]


def test_commit_that_wraps_writes_two_runs():
    rec = RecordingDevice(PowerLossDevice(256))
    Journal.format(rec, START, LENGTH)
    j = Journal(rec, START, LENGTH)
    j.open()
    for i in range(5):                     # 5 x 11 blocks: head at index 55
        for b in range(9):
            j.add(b, blk(b, i))
        j.commit()
    j.checkpoint()
    for b in range(9):
        j.add(b, blk(b, "wrap"))
    rec.ops.clear()
    j.commit()                             # indexes 55..62, 0..1, commit at 2
    assert rec.ops == [("write", START + 1 + 55, 8), ("write", START + 1, 2), ("flush",),
                       ("write", START + 1 + 2, 1), ("flush",)]
    crashed = rec.inner.crash()
    report = again(crashed).replay()
    assert report.seqs == [6] and report.tail_pos == 55 and report.end_pos == 3
    assert all(crashed.read(b) == blk(b, "wrap") for b in range(9))


def test_commit_of_1000_blocks_does_no_work_per_block_beyond_two_crc_passes(monkeypatch):
    """A big transaction costs a fixed number of device calls and two crc32c passes
    over what it writes (the images' tags, then the log for the commit block); its
    checkpoint one write per run of adjacent home blocks and no crc32c of the images.
    (How fast that is, is the benchmarks' business.)"""
    import journal.log
    from clusterfs.ondisk import blockhdr
    crc_bytes = []
    real_crc = blockhdr.crc32c

    def counting_crc(data, *crc):
        crc_bytes.append(len(data))
        return real_crc(data, *crc)

    # every crc32c the journal computes: its own calls and the block headers' seals
    monkeypatch.setattr(journal.log, "crc32c", counting_crc)
    monkeypatch.setattr(blockhdr, "crc32c", counting_crc)
    rec = RecordingDevice(PowerLossDevice(8192))
    Journal.format(rec, 4096, 2048)
    j = Journal(rec, 4096, 2048)
    j.open()
    images = [blk(b) for b in range(1000)]
    for b, image in enumerate(images):
        j.add(b, image)
    rec.ops.clear()
    crc_bytes.clear()
    j.commit()
    logged = 1000 + 4                      # the images and their 4 descriptor blocks
    assert rec.ops == [("write", 4097, logged), ("flush",), ("write", 4097 + logged, 1),
                       ("flush",)]
    assert sum(crc_bytes) <= 2 * (logged + 1) * BS
    rec.ops.clear()
    crc_bytes.clear()
    j.checkpoint()
    assert rec.ops == [("write", 0, 1000), ("flush",), ("write", 4096, 1), ("flush",)]
    assert sum(crc_bytes) <= BS            # the journal header's seal
    assert all(rec.inner.read(b) == images[b] for b in range(1000))


# -- transaction size and log space ------------------------------------------------------

def test_transaction_larger_than_the_log_raises_value_error():
    dev, j = make()
    limit = j.max_transaction_blocks()
    assert limit == LENGTH - 1 - 2         # one descriptor and the commit block
    for b in range(limit + 1):
        j.add(b, blk(b))
    writes = dev.stats["writes"]
    with pytest.raises(ValueError, match="at most 61 blocks per transaction"):
        j.commit()
    assert dev.stats["writes"] == writes and j.running_blocks() == limit + 1
    j.revoke(limit)                        # drop one: it fits exactly
    assert j.commit() == 1
    assert j.stats()["log_used"] == LENGTH - 1


def test_commit_checkpoints_when_the_log_is_full():
    dev, j = make()
    for i in range(1, 8):                  # 8 blocks each: 7 fit in 63
        for b in range(6):
            j.add(b, blk(b, i))
        j.commit()
    assert j.stats()["checkpoints"] == 0 and j.stats()["log_used"] == 56
    assert dev.read(0) == ZERO
    for b in range(6):
        j.add(b, blk(b, 8))
    j.commit()
    st = j.stats()
    assert st["checkpoints"] == 1 and st["log_used"] == 8
    assert dev.read(0) == blk(0, 7)        # txn 7 was written home before txn 8 went in
    assert j.checkpoint_pending() == set(range(6))


def test_should_commit():
    dev, j = make()
    assert not j.should_commit()
    for b in range(12):                    # 12 + descriptor + commit = 14 < 63 // 4
        j.add(b, blk(b))
    assert not j.should_commit()
    j.add(12, blk(12))
    assert j.should_commit()
    j.commit()
    assert not j.should_commit()


def test_should_commit_when_log_space_is_short():
    dev, j = make()
    for i in range(5):
        for b in range(10):
            j.add(b, blk(b, i))
        j.commit()                         # 12 blocks each: 60 used, 3 free
    j.add(0, blk(0))
    j.add(1, blk(1))
    assert j.running_blocks() == 2 and j.should_commit()


def test_empty_commit_returns_none_and_writes_nothing():
    dev, j = make()
    writes, flushes = dev.stats["writes"], dev.stats["flushes"]
    assert j.commit() is None
    assert (dev.stats["writes"], dev.stats["flushes"]) == (writes, flushes)


def test_sequence_numbers_continue_across_close_and_open():
    dev, j = make()
    j.add(1, blk(1))
    assert j.commit() == 1
    j.close()
    j2 = again(dev)
    j2.open("again")
    j2.add(1, blk(1, 2))
    assert j2.commit() == 2
    hdr = j2.read_header()
    assert (hdr.mount_count, hdr.owner, hdr.clean) == (2, "again", False)


# -- checkpoint --------------------------------------------------------------------------

def test_checkpoint_writes_committed_images_home_and_empties_the_log():
    dev, j = make()
    j.add(1, blk(1))
    j.add(2, blk(2))
    j.add(3, blk(3))
    j.commit()
    j.add(7, blk(7))                       # running, not committed
    assert j.checkpoint_pending() == {1, 2, 3}
    rec = RecordingDevice(dev)
    j.dev = rec
    j.checkpoint()
    assert rec.ops == [("write", 1, 3), ("flush",), ("write", START, 1), ("flush",)]
    assert j.checkpoint_pending() == set() and j.stats()["log_used"] == 0
    assert dev.read(7) == ZERO and j.running_blocks() == 1
    j.checkpoint()                         # nothing to do: no I/O
    assert len(rec.ops) == 4


def test_image_source_latest_contents_win_at_commit():
    dev, j = make()
    src = ImageObj(blk("v1"))
    j.add(5, src)
    src.data = blk("v2")
    assert src.calls == 0
    j.commit()
    assert src.calls == 1
    src.data = blk("v3")                   # newer, uncommitted contents
    j.checkpoint()
    assert dev.read(5) == blk("v2")


def test_bytes_sources_are_copied_and_re_add_replaces():
    dev, j = make()
    buf = bytearray(blk("a"))
    j.add(5, buf)
    buf[:4] = b"XXXX"
    j.add(6, blk("b"))
    j.add(6, blk("c"))
    j.commit()
    j.checkpoint()
    assert dev.read(5) == blk("a") and dev.read(6) == blk("c")


def test_bad_image_from_source_is_refused_before_any_write():
    dev, j = make()
    j.add(5, ImageObj(b"short"))
    writes = dev.stats["writes"]
    with pytest.raises(ValueError):
        j.commit()
    assert dev.stats["writes"] == writes


@pytest.mark.parametrize("bno,source,exc", [
    (1, b"short", ValueError), (START, ZERO, ValueError), (START + LENGTH - 1, ZERO, ValueError),
    (256, ZERO, ValueError), (-1, ZERO, ValueError), (1, 42, TypeError)])
def test_add_rejects_bad_input(bno, source, exc):
    dev, j = make()
    with pytest.raises(exc):
        j.add(bno, source)


# -- revoke and the checkpoint set ----------------------------------------------------------

def test_revoke_leaves_the_checkpoint_set_when_it_commits():
    dev, j = make()
    j.add(1, blk(1))
    j.commit()
    j.revoke(1)
    assert j.checkpoint_pending() == {1}   # still the committed state until the free commits
    j.add(2, blk(2))
    j.commit()
    assert j.checkpoint_pending() == {2}
    j.checkpoint()
    assert dev.read(1) == ZERO             # the stale image never went home


def test_revoked_block_reused_as_file_data_is_never_overwritten():
    dev, j = make()
    j.add(1, blk(1, "meta"))
    j.commit()
    j.revoke(1)
    j.add(2, blk(2))
    j.commit()                             # block 1 is free now
    dev.write(1, blk("file data"))         # reused as file data
    j.add(3, blk(3))
    j.commit()
    crashed = dev.crash()
    report = again(crashed).replay()       # the log still holds block 1's old image
    assert report.suppressed == 1 and crashed.read(1) == blk("file data")
    j.checkpoint()
    assert dev.read(1) == blk("file data")


def test_checkpoint_before_the_revoke_commits_keeps_the_committed_state():
    dev, j = make()
    j.add(1, blk(1, "committed"))
    j.commit()
    j.revoke(1)                            # freed in the running transaction only
    j.checkpoint()
    crashed = dev.crash()                  # the free never committed
    assert again(crashed).replay().transactions == 0
    assert crashed.read(1) == blk(1, "committed")


# -- states and errors --------------------------------------------------------------------

def test_open_requires_replay_after_a_crash():
    dev, j = make()
    j.add(1, blk(1))
    j.commit()
    crashed = dev.crash()
    j2 = again(crashed)
    with pytest.raises(JournalError, match="replay it before opening"):
        j2.open()
    j2.replay()
    j2.open()
    j2.add(2, blk(2))
    assert j2.commit() == 2
    assert crashed.read(1) == blk(1)


def test_operations_need_an_open_journal():
    dev, j = make(opened=False)
    for call in (lambda: j.add(1, ZERO), lambda: j.revoke(1), j.commit, j.checkpoint,
                 j.close):
        with pytest.raises(JournalError, match="not open"):
            call()
    j.open()
    with pytest.raises(JournalError, match="already open"):
        j.open()
    j.close()
    assert not j.is_open and j.is_clean()


def test_device_error_aborts_the_journal():
    dev, j = make()
    j.add(1, blk(1))
    j.commit()
    faulty = FaultyDevice(dev, fail_writes=True)
    j.dev = faulty
    j.add(2, blk(2))
    with pytest.raises(OSError):
        j.commit()
    faulty.fail_writes = False
    for call in (lambda: j.add(3, ZERO), j.commit, j.checkpoint, j.close):
        with pytest.raises(JournalAborted):
            call()
    crashed = dev.crash()
    report = again(crashed).replay()
    assert report.seqs == [1] and crashed.read(1) == blk(1) and crashed.read(2) == ZERO


def test_stats():
    dev, j = make()
    for b in range(3):
        j.add(b, blk(b))
    j.commit()
    j.revoke(0)
    j.commit()
    j.checkpoint()
    st = j.stats()
    assert (st["commits"], st["blocks_logged"], st["revokes_logged"]) == (2, 3, 1)
    assert (st["log_blocks_written"], st["checkpoints"], st["blocks_checkpointed"]) == (7, 1, 2)
    assert st["flushes"] == 1 + 2 + 2 + 2  # open, two commits, checkpoint
    assert (st["log_used"], st["log_free"], st["log_size"]) == (0, LENGTH - 1, LENGTH - 1)
    assert (st["running_blocks"], st["checkpoint_pending"], st["next_seq"]) == (0, 0, 3)


def test_two_slots_on_one_device_are_independent():
    dev = PowerLossDevice(512)
    Journal.format(dev, 256, 64, slot=0)
    Journal.format(dev, 320, 64, slot=1)
    a, b = Journal(dev, 256, 64, slot=0), Journal(dev, 320, 64, slot=1)
    a.open("node-a")
    b.open("node-b")
    a.add(1, blk("a"))
    b.add(2, blk("b"))
    a.commit()
    b.commit()
    crashed = dev.crash()
    ra = Journal(crashed, 256, 64, slot=0).replay()      # a survivor recovers both
    rb = Journal(crashed, 320, 64, slot=1).replay()
    assert ra.blocks == {1: 1} and rb.blocks == {2: 1}
    assert crashed.read(1) == blk("a") and crashed.read(2) == blk("b")


# -- sealed commits (writes on another thread) ------------------------------------------

def test_sealed_commit_written_on_a_thread_while_the_next_transaction_fills():
    import threading
    dev, j = make()
    j.add(1, blk(1, "a"))
    dev.write(10, blk("data before the seal"))
    sealed = j.seal()
    assert sealed is not None and sealed.seq == 1
    # the next transaction fills while the sealed one is not yet written
    j.add(1, blk(1, "b"))
    j.add(2, blk(2, "b"))
    assert j.running_blocks() == 2
    crashed = dev.crash()                  # power cut before its writes: nothing there
    assert again(crashed).replay().seqs == []
    t = threading.Thread(target=sealed.write)
    t.start()
    t.join()
    assert j.stats()["commits"] == 1
    crashed = dev.crash()                  # written and flushed: durable, data too
    assert again(crashed).replay().seqs == [1]
    assert crashed.read(1) == blk(1, "a") and crashed.read(10) == blk("data before the seal")
    assert j.commit() == 2
    crashed = dev.crash()
    again(crashed).replay()
    assert crashed.read(1) == blk(1, "b") and crashed.read(2) == blk(2, "b")


@pytest.mark.parametrize("call", ["commit", "checkpoint", "close", "seal"])
def test_io_calls_write_a_sealed_commit_first(call):
    dev, j = make()
    j.add(1, blk(1, "sealed"))
    sealed = j.seal()
    j.add(2, blk(2, "next"))
    getattr(j, call)()
    crashed = dev.crash()
    again(crashed).replay()
    assert crashed.read(1) == blk(1, "sealed")
    if call in ("commit", "close"):
        assert crashed.read(2) == blk(2, "next")
    sealed.write()                         # a late writer does nothing more
    assert j.stats()["commits"] == (1 if call in ("checkpoint", "seal") else 2)


def test_revoke_after_seal_suppresses_the_sealed_image():
    dev, j = make()
    j.add(5, blk(5, "meta"))
    j.seal().write()
    j.add(5, blk(5, "meta again"))
    j.seal()
    j.revoke(5)                            # freed in the next transaction
    dev.write(5, blk("file data now"))
    j.commit()                             # writes the sealed one, then the revoke
    crashed = dev.crash()
    again(crashed).replay()
    assert crashed.read(5) == blk("file data now")


def test_failed_sealed_write_aborts_the_journal():
    dev, j = make()
    j.add(1, blk(1))
    sealed = j.seal()
    dev.cut_after(1)
    with pytest.raises(PowerCut):
        sealed.write()
    with pytest.raises(JournalAborted):
        sealed.write()
    with pytest.raises(JournalAborted):
        j.commit()
    assert j.stats()["commits"] == 0
