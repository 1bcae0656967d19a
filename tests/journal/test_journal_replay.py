"""Replay rules, one named test per case, each asserting what was replayed or dropped.

Layout reminder (jtools): journal header at block 64, log indexes 0..62 at blocks
65..127.  A transaction of k images written at log index p occupies: descriptor p,
images p+1..p+k, commit p+k+1.
"""

from __future__ import annotations

import random
import struct

import pytest

from clusterfs.ondisk.blockdev import PowerCut, PowerLossDevice
from clusterfs.ondisk.blockhdr import reseal
from journal import Journal, JournalCorrupt, JournalError
from journal.format import RECORDS_OFFSET
from tests.journal.jtools import (LENGTH, START, ZERO, FaultyDevice, again, blk, flip,
                                  log_bno, make)


def commit(j: Journal, blocks: dict[int, bytes], revokes=()) -> int:
    for b in revokes:
        j.revoke(b)
    for b, data in blocks.items():
        j.add(b, data)
    return j.commit()


def home(dev, blocks) -> dict[int, bytes]:
    return {b: dev.read(b) for b in blocks}


# -- empty and clean logs -------------------------------------------------------------

def test_fresh_journal_is_clean_and_replays_nothing():
    dev, j = make(opened=False)
    assert j.is_clean()
    report = j.replay()
    assert report.clean and report.transactions == 0 and not report.replayed
    assert report.next_seq == 1
    j.open()
    assert j.commit() is None


def test_opened_journal_with_empty_log_replays_nothing():
    dev, j = make()
    crashed = dev.crash()
    j2 = again(crashed)
    assert not j2.is_clean()
    report = j2.replay()
    assert (report.transactions, report.blocks, report.torn) == (0, {}, None)
    assert report.end_reason == "block never written"
    assert j2.is_clean()


def test_closed_journal_is_clean_and_replays_nothing():
    dev, j = make()
    commit(j, {1: blk(1)})
    j.close()
    j2 = again(dev.crash())
    assert j2.is_clean() and j2.replay().clean
    assert dev.read(1) == blk(1)


# -- committed transactions -------------------------------------------------------------

def test_one_transaction_replays():
    dev, j = make()
    assert commit(j, {1: blk(1), 2: blk(2), 200: blk(200)}) == 1
    crashed = dev.crash()
    assert home(crashed, [1, 2, 200]) == {1: ZERO, 2: ZERO, 200: ZERO}
    report = again(crashed).replay()
    assert report.replayed and report.seqs == [1]
    assert report.blocks == {1: 1, 2: 1, 200: 1} and report.images == 3
    assert report.torn is None and report.end_pos == 5 and report.next_seq == 2
    assert home(crashed, [1, 2, 200]) == {1: blk(1), 2: blk(2), 200: blk(200)}


def test_newest_image_of_a_block_wins():
    dev, j = make()
    commit(j, {1: blk(1, "a"), 2: blk(2, "a")})
    commit(j, {1: blk(1, "b")})
    crashed = dev.crash()
    report = again(crashed).replay()
    assert report.seqs == [1, 2] and report.blocks == {1: 2, 2: 1}
    assert home(crashed, [1, 2]) == {1: blk(1, "b"), 2: blk(2, "a")}


def test_many_transactions_wrap_around():
    dev, j = make()
    latest = {}
    for i in range(1, 11):                 # 6 images + descriptor + commit = 8 blocks
        blocks = {(6 * i + k) % 40: blk("w", i, k) for k in range(6)}
        assert commit(j, blocks) == i
        latest.update(blocks)
    # Txns 1-7 filled indexes 0..55; txn 8 did not fit, so the log was checkpointed and
    # txn 8 wrapped: indexes 56..62 and 0.  Txns 9 and 10 follow at 1..8 and 9..16.
    assert j.stats()["checkpoints"] == 1
    crashed = dev.crash()
    report = again(crashed).replay()
    assert report.seqs == [8, 9, 10]
    assert (report.tail_pos, report.end_pos, report.torn) == (56, 17, None)
    assert home(crashed, latest) == latest


def test_stale_blocks_of_an_earlier_lap_end_the_log():
    dev, j = make()
    for i in range(1, 12):                 # 5 images: 7 blocks, 9 txns fill the log
        commit(j, {k: blk("s", i, k) for k in range(5)})
    crashed = dev.crash()
    report = again(crashed).replay()
    # Txns 10 and 11 at 0..13; index 14 still holds txn 3's descriptor.
    assert report.seqs == [10, 11] and report.torn is None
    assert report.end_reason == "block holds seq 3, expected 12"
    assert home(crashed, range(5)) == {k: blk("s", 11, k) for k in range(5)}


def test_checkpoint_then_replay_replays_nothing():
    dev, j = make()
    commit(j, {1: blk(1)})
    commit(j, {2: blk(2)})
    j.checkpoint()
    crashed = dev.crash()
    assert home(crashed, [1, 2]) == {1: blk(1), 2: blk(2)}
    report = again(crashed).replay()
    assert (report.transactions, report.blocks, report.torn) == (0, {}, None)
    assert report.tail_seq == 3 and report.next_seq == 3


# -- revokes -------------------------------------------------------------------------------

def test_revoke_suppresses_older_images():
    dev, j = make()
    commit(j, {1: blk(1), 2: blk(2)})
    commit(j, {3: blk(3)}, revokes=[1])
    crashed = dev.crash()
    report = again(crashed).replay()
    assert report.seqs == [1, 2] and report.revoked == {1}
    assert report.blocks == {2: 1, 3: 2} and report.suppressed == 1
    assert home(crashed, [1, 2, 3]) == {1: ZERO, 2: blk(2), 3: blk(3)}


def test_revoke_does_not_suppress_later_images():
    dev, j = make()
    commit(j, {1: blk(1, "old")})
    commit(j, {2: blk(2)}, revokes=[1])
    commit(j, {1: blk(1, "new")})
    crashed = dev.crash()
    report = again(crashed).replay()
    assert report.blocks == {1: 3, 2: 2} and report.suppressed == 1
    assert crashed.read(1) == blk(1, "new")


def test_revoke_only_transaction_commits():
    dev, j = make()
    commit(j, {1: blk(1)})
    j.revoke(1)
    assert j.commit() == 2
    report = again(dev.crash()).replay()
    assert report.seqs == [1, 2] and report.blocks == {} and report.revoked == {1}


def test_add_after_revoke_cancels_the_revoke():
    dev, j = make()
    commit(j, {1: blk(1, "a")})
    j.revoke(1)
    j.add(1, blk(1, "b"))
    assert j.commit() == 2
    crashed = dev.crash()
    report = again(crashed).replay()
    assert report.revoked == set() and report.suppressed == 0
    assert report.blocks == {1: 2} and crashed.read(1) == blk(1, "b")


def test_revoke_after_add_drops_the_image_from_the_running_transaction():
    dev, j = make()
    commit(j, {2: blk(2)})
    j.add(1, blk(1))
    j.revoke(1)                            # never in the log: no record either
    assert j.running_blocks() == 0 and j.commit() is None
    report = again(dev.crash()).replay()
    assert report.seqs == [1] and report.revoked == set()


def test_revoke_in_a_torn_transaction_is_ignored():
    dev, j = make()
    commit(j, {1: blk(1)})
    j.revoke(1)
    j.add(2, blk(2))
    dev.cut_after(3)                       # log write, flush, then the commit write fails
    with pytest.raises(PowerCut):
        j.commit()
    crashed = dev.crash()
    report = again(crashed).replay()
    assert report.seqs == [1] and report.torn.seq == 2 and report.revoked == set()
    assert crashed.read(1) == blk(1) and crashed.read(2) == ZERO


# -- torn tails: dropped and reported ------------------------------------------------------

def _two_txns_second_cut(cut: int):
    """Txn 1 = {1} at 0..2 committed; txn 2 = {2, 3} at 3..6 cut at event ``cut``.

    The log blocks hold junk from before ``format``, as on a reused disk.
    """
    dev = PowerLossDevice(256, {b: blk("junk", b) for b in range(START + 1, START + LENGTH)})
    Journal.format(dev, START, LENGTH)
    j = again(dev)
    j.open()
    commit(j, {1: blk(1)})
    j.add(2, blk(2))
    j.add(3, blk(3))
    dev.cut_after(cut)
    with pytest.raises(PowerCut):
        j.commit()
    return dev


def test_torn_tail_commit_missing():
    crashed = _two_txns_second_cut(3).crash()
    report = again(crashed).replay()
    assert report.seqs == [1] and report.blocks == {1: 1}
    torn = report.torn
    assert (torn.seq, torn.pos, torn.bno, torn.blocks) == (2, 3, log_bno(6), 3)
    assert torn.reason == "transaction ends before its commit block (no journal block)"
    assert home(crashed, [1, 2, 3]) == {1: blk(1), 2: ZERO, 3: ZERO}
    assert report.next_seq == 3


def test_torn_tail_descriptor_torn():
    dev = _two_txns_second_cut(2)          # the flush after the log write fails
    crashed = dev.crash(tear={0: 2})       # 2 sectors of the descriptor, no images
    report = again(crashed).replay()
    assert report.seqs == [1]
    torn = report.torn
    assert (torn.seq, torn.bno, torn.blocks) == (2, log_bno(3), 0)
    assert torn.reason == "descriptor block: crc32c mismatch"
    assert home(crashed, [2, 3]) == {2: ZERO, 3: ZERO}
    assert report.next_seq == 3


def test_torn_tail_commit_written_but_image_torn():
    dev, j = make()
    commit(j, {1: blk(1)})
    commit(j, {2: blk(2), 3: blk(3)})
    dev.write(log_bno(5), blk("garbage"))  # the write cache lied: image 3 half written
    crashed = dev.crash(tear={0: 3})
    report = again(crashed).replay()
    assert report.seqs == [1]
    torn = report.torn
    assert (torn.seq, torn.bno, torn.blocks) == (2, log_bno(5), 2)
    assert torn.reason == "image of block 3: crc32c mismatch"
    assert home(crashed, [1, 2, 3]) == {1: blk(1), 2: ZERO, 3: ZERO}


def test_torn_tail_unreadable_block():
    dev, j = make()
    commit(j, {1: blk(1)})
    commit(j, {2: blk(2)})
    faulty = FaultyDevice(dev.crash(), bad_reads={log_bno(4)})   # txn 2's image
    report = again(faulty).scan()
    assert report.seqs == [1] and report.torn.bno == log_bno(4)
    assert report.torn.reason == "image of block 2 unreadable"


def test_torn_tail_leftovers_never_taken_for_new_transactions():
    dev, j = make()
    commit(j, {1: blk(1)})
    for b in range(2, 22):                 # txn 2: 20 images at 3..23, commit missing
        j.add(b, blk(b, "torn"))
    dev.cut_after(3)
    with pytest.raises(PowerCut):
        j.commit()
    crashed = dev.crash()
    j2 = again(crashed)
    report = j2.replay()
    assert report.torn.seq == 2 and report.torn.blocks == 21 and report.next_seq == 3
    j2.open()
    assert commit(j2, {2: blk(2, "new")}) == 3     # overwrites indexes 3..5 only
    j2.add(4, blk(4, "new"))
    crashed.cut_after(3)
    with pytest.raises(PowerCut):
        j2.commit()
    again_dev = crashed.crash()
    report = again(again_dev).replay()
    assert report.seqs == [3] and report.torn.seq == 4
    assert again_dev.read(2) == blk(2, "new")
    assert all(again_dev.read(b) == ZERO for b in range(3, 22))


def test_leftovers_of_an_earlier_format_are_ignored():
    dev, j = make()
    for i in range(1, 6):
        commit(j, {1: blk(1, i)})
    crashed = dev.crash()
    Journal.format(crashed, START, LENGTH)      # mkfs again: log not zeroed
    j2 = again(crashed)
    j2.open()
    assert commit(j2, {2: blk(2)}) == 1
    crashed2 = crashed.crash()
    report = again(crashed2).replay()
    assert report.seqs == [1] and report.blocks == {2: 1} and report.torn is None
    assert report.next_seq == 2 and crashed2.read(1) == ZERO


# -- corruption in the middle: refused, naming the block -------------------------------

def _three_txns():
    """Txns {9} at 0..2, {1} at 3..5, {2} + revoke 9 at 6..9, {3} at 10..12."""
    dev, j = make()
    commit(j, {9: blk(9)})
    commit(j, {1: blk(1)})
    commit(j, {2: blk(2)}, revokes=[9])
    commit(j, {3: blk(3)})
    return dev.crash()


@pytest.mark.parametrize("what,pos", [("descriptor", 0), ("image", 1), ("commit", 2),
                                      ("descriptor", 3), ("image", 4), ("commit", 5),
                                      ("descriptor", 6), ("image", 7), ("revoke", 8),
                                      ("commit", 9)])
def test_corruption_in_the_middle_raises_naming_the_block(what, pos):
    dev = _three_txns()
    assert again(dev).scan().seqs == [1, 2, 3, 4]
    flip(dev, log_bno(pos))
    writes = dev.stats["writes"]
    j = again(dev)
    for call in (j.scan, j.replay):
        with pytest.raises(JournalCorrupt) as exc:
            call()
        assert exc.value.bno == log_bno(pos)
        assert "was committed after it" in str(exc.value)
    assert dev.stats["writes"] == writes and not j.is_clean()
    with pytest.raises(JournalError):
        j.open()


def _reseal_first_tag(dev, pos: int, target: int) -> None:
    """Point a descriptor's first tag elsewhere and fix up the block's own crc."""
    buf = bytearray(dev.read(log_bno(pos)))
    struct.pack_into("<Q", buf, RECORDS_OFFSET, target)
    reseal(buf)
    dev.write(log_bno(pos), bytes(buf))
    dev.flush()


def test_resealed_descriptor_in_the_middle_is_caught_by_the_commit_crc():
    dev = _three_txns()
    _reseal_first_tag(dev, 3, 7)           # txn 2's descriptor: block crc valid again
    with pytest.raises(JournalCorrupt) as exc:
        again(dev).replay()
    assert exc.value.bno == log_bno(5)     # txn 2's commit block
    assert "transaction crc32c mismatch" in str(exc.value)
    assert dev.read(7) == ZERO


def test_resealed_descriptor_at_the_tail_is_dropped_as_torn():
    dev = _three_txns()
    _reseal_first_tag(dev, 10, 7)          # txn 4, the last one
    report = again(dev).replay()
    assert report.seqs == [1, 2, 3] and report.torn.bno == log_bno(12)
    assert report.torn.reason == "commit block: transaction crc32c mismatch"
    assert dev.read(7) == ZERO and dev.read(3) == ZERO


def test_corruption_in_the_middle_lost_block():
    dev = _three_txns()
    dev.write(log_bno(5), ZERO)            # txn 2's commit block never reached the disk
    with pytest.raises(JournalCorrupt) as exc:
        again(dev).replay()
    assert exc.value.bno == log_bno(5)
    assert "block never written" in str(exc.value)


def test_corruption_in_the_middle_unreadable_block():
    dev = FaultyDevice(_three_txns(), bad_reads={log_bno(4)})
    with pytest.raises(JournalCorrupt) as exc:
        again(dev).scan()
    assert exc.value.bno == log_bno(4)


def test_corruption_before_a_torn_transaction_is_still_corruption():
    dev, j = make()
    commit(j, {1: blk(1)})
    commit(j, {2: blk(2)})
    j.add(3, blk(3))
    dev.cut_after(3)
    with pytest.raises(PowerCut):
        j.commit()
    crashed = dev.crash()
    flip(crashed, log_bno(1))              # txn 1's image; txn 2 committed after it
    with pytest.raises(JournalCorrupt) as exc:
        again(crashed).scan()
    assert exc.value.bno == log_bno(1)


# -- idempotence and crash safety ---------------------------------------------------------

def _busy_log():
    """A crashed device whose log holds 4 committed txns (one revoke) and a torn tail."""
    dev, j = make()
    commit(j, {1: blk(1, "a"), 2: blk(2, "a"), 3: blk(3, "a"), 40: blk(40, "a")})
    commit(j, {1: blk(1, "b"), 130: blk(130, "b")})
    commit(j, {4: blk(4, "c")}, revokes=[2])
    commit(j, {3: blk(3, "d"), 41: blk(41, "d")})
    j.add(5, blk(5, "torn"))
    dev.cut_after(3)
    with pytest.raises(PowerCut):
        j.commit()
    return dev.crash()


HOME = [1, 2, 3, 4, 5, 40, 41, 130]


def test_replay_result_of_busy_log():
    dev = _busy_log()
    report = again(dev).replay()
    assert report.seqs == [1, 2, 3, 4] and report.torn.seq == 5
    assert report.blocks == {1: 2, 3: 4, 4: 3, 40: 1, 41: 4, 130: 2}
    assert home(dev, HOME) == {1: blk(1, "b"), 2: ZERO, 3: blk(3, "d"), 4: blk(4, "c"),
                               5: ZERO, 40: blk(40, "a"), 41: blk(41, "d"),
                               130: blk(130, "b")}


def test_replay_twice():
    dev = _busy_log()
    j = again(dev)
    first = j.replay()
    state = home(dev, HOME)
    writes = dev.stats["writes"]
    second = again(dev).replay()
    assert first.transactions == 4 and second.clean and second.transactions == 0
    assert dev.stats["writes"] == writes and home(dev, HOME) == state


def test_scan_is_read_only_and_matches_replay():
    dev = _busy_log()
    writes = dev.stats["writes"]
    scanned = again(dev).scan()
    assert dev.stats["writes"] == writes and not scanned.replayed
    replayed = again(dev).replay()
    assert (scanned.seqs, scanned.blocks, scanned.torn) == \
        (replayed.seqs, replayed.blocks, replayed.torn)


def test_crash_during_replay_at_every_write_then_replay_again():
    base = _busy_log()
    ref = base.crash()
    ref_report = again(ref).replay()
    expected = home(ref, HOME)
    events = ref.events - base.crash().events
    assert events == 4 + 3                 # runs {1} {3,4} {40,41} {130}, flush, header, flush
    for n in range(1, events + 1):
        for seed in range(4):
            dev = base.crash()             # a private copy of the crashed volume
            dev.cut_after(n)
            with pytest.raises(PowerCut):
                again(dev).replay()
            after = dev.crash(rng=random.Random(seed))
            report = again(after).replay()
            assert home(after, HOME) == expected, (n, seed)
            assert report.clean or report.seqs == ref_report.seqs
            assert again(after).is_clean()


def test_replay_refused_while_open():
    dev, j = make()
    with pytest.raises(JournalError):
        j.replay()
