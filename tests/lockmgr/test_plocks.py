"""The POSIX byte-range lock table: conflicts, splitting and merging of an owner's
locks, waiting and waking, deadlock detection, and a hypothesis state machine that
drives it against a byte-level model."""

import errno
import itertools

import pytest
from hypothesis import HealthCheck, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from lockmgr.plocks import (F_RDLCK, F_UNLCK, F_WRLCK, OFFSET_MAX, Conflict, Deadlock,
                            Plock, PlockError, PlockTable)

R, W = F_RDLCK, F_WRLCK
F, G = b"f", b"g"


def held(t, res=F):
    """The locks of ``res`` as (owner, ltype, start, end), by start."""
    return [(lk.owner, lk.ltype, lk.start, lk.end) for _, lk in t.locks(res)]


def drain(t):
    tokens, t.woken = t.woken, []
    return tokens


# ---- conflicts ------------------------------------------------------------------------

@pytest.mark.parametrize("first,second,conflict", [
    (R, R, False), (R, W, True), (W, R, True), (W, W, True)])
def test_conflict_needs_a_write_lock(first, second, conflict):
    t = PlockTable()
    assert t.lock(F, "a", first, 0, 9, 1, wait=False)
    if conflict:
        with pytest.raises(Conflict) as e:
            t.lock(F, "b", second, 5, 15, 2, wait=False)
        assert e.value.errno == errno.EAGAIN
        assert t.test(F, "b", second, 5, 15) == Plock("a", first, 0, 9, 1)
    else:
        assert t.lock(F, "b", second, 5, 15, 2, wait=False)
        assert t.test(F, "b", second, 5, 15) is None
    t.check()


def test_no_conflict_without_overlap_ends_are_inclusive():
    t = PlockTable()
    t.lock(F, "a", W, 0, 9, 1, wait=False)
    assert t.lock(F, "b", W, 10, 19, 2, wait=False)
    assert t.test(F, "c", W, 9, 9).owner == "a"
    assert t.test(F, "c", W, 19, 19).owner == "b"
    assert t.test(F, "c", W, 20, OFFSET_MAX) is None
    with pytest.raises(Conflict):
        t.lock(F, "c", R, 9, 10, 3, wait=False)


def test_no_conflict_across_resources():
    t = PlockTable()
    t.lock(F, "a", W, 0, OFFSET_MAX, 1, wait=False)
    assert t.lock(G, "b", W, 0, OFFSET_MAX, 2, wait=False)
    assert t.test(G, "c", R, 0, 0).owner == "b"


def test_own_locks_never_conflict():
    t = PlockTable()
    t.lock(F, "a", W, 0, 9, 1, wait=False)
    assert t.test(F, "a", W, 0, 9) is None
    assert t.lock(F, "a", W, 5, 14, 1, wait=False)
    assert held(t) == [("a", W, 0, 14)]


def test_owners_compare_by_equality():
    t = PlockTable()
    t.lock(F, (1, 77), W, 0, 9, 1, wait=False)
    assert t.test(F, (1, 77), W, 0, 9) is None
    assert t.test(F, (2, 77), W, 0, 9).owner == (1, 77)


@pytest.mark.parametrize("args", [
    (F, "a", F_UNLCK, 0, 1), (F, "a", 7, 0, 1), (F, "a", True, 0, 1),
    (F, "a", R, -1, 1), (F, "a", R, 5, 4), (F, "a", R, 0, OFFSET_MAX + 1),
    (F, "a", R, 0.0, 1), (F, "a", R, 0, "9")])
def test_bad_arguments_raise_value_error(args):
    t = PlockTable()
    with pytest.raises(ValueError):
        t.lock(*args, 1, wait=False)
    with pytest.raises(ValueError):
        t.test(*args)
    assert held(t) == []


def test_bad_unlock_range_raises_value_error():
    t = PlockTable()
    with pytest.raises(ValueError):
        t.unlock(F, "a", 10, 9)
    with pytest.raises(ValueError):
        t.unlock(F, "a", 0, OFFSET_MAX + 1)


def test_errnos():
    assert issubclass(Conflict, PlockError) and issubclass(Deadlock, PlockError)
    assert Conflict.errno == errno.EAGAIN and Deadlock.errno == errno.EDEADLK


def test_a_queued_request_needs_a_unique_token():
    t = PlockTable()
    t.lock(F, "a", W, 0, 9, 1, wait=False)
    with pytest.raises(ValueError):
        t.lock(F, "b", W, 0, 9, 2, wait=True)
    assert not t.lock(F, "b", W, 0, 9, 2, wait=True, token=1)
    with pytest.raises(ValueError):
        t.lock(F, "c", W, 0, 9, 3, wait=True, token=1)
    assert [w[0] for w in t.waiting()] == [1]


# ---- an owner's own locks -------------------------------------------------------------

def test_upgrade_own_read_lock():
    t = PlockTable()
    t.lock(F, "a", R, 0, 99, 1, wait=False)
    assert t.lock(F, "a", W, 20, 29, 1, wait=False)
    assert held(t) == [("a", R, 0, 19), ("a", W, 20, 29), ("a", R, 30, 99)]
    t.lock(F, "a", W, 0, 99, 1, wait=False)
    assert held(t) == [("a", W, 0, 99)]


def test_upgrade_blocked_by_another_reader():
    t = PlockTable()
    t.lock(F, "a", R, 0, 99, 1, wait=False)
    t.lock(F, "b", R, 50, 50, 2, wait=False)
    with pytest.raises(Conflict):
        t.lock(F, "a", W, 0, 99, 1, wait=False)
    assert held(t) == [("a", R, 0, 99), ("b", R, 50, 50)]


def test_downgrade_own_write_lock_lets_readers_in():
    t = PlockTable()
    t.lock(F, "a", W, 0, 99, 1, wait=False)
    assert not t.lock(F, "b", R, 10, 19, 2, wait=True, token="b")
    assert t.lock(F, "a", R, 0, 99, 1, wait=False)
    assert drain(t) == ["b"]
    assert held(t) == [("a", R, 0, 99), ("b", R, 10, 19)]


def test_split_on_partial_unlock():
    t = PlockTable()
    t.lock(F, "a", W, 0, 99, 1, wait=False)
    t.unlock(F, "a", 40, 59)
    assert held(t) == [("a", W, 0, 39), ("a", W, 60, 99)]
    assert t.lock(F, "b", W, 40, 59, 2, wait=False)
    t.unlock(F, "a", 0, 0)
    t.unlock(F, "a", 99, OFFSET_MAX)
    assert held(t) == [("a", W, 1, 39), ("b", W, 40, 59), ("a", W, 60, 98)]
    t.check()


def test_unlock_of_nothing_is_a_no_op():
    t = PlockTable()
    t.unlock(F, "a", 0, OFFSET_MAX)
    t.lock(F, "a", R, 10, 19, 1, wait=False)
    t.unlock(F, "a", 0, 9)
    t.unlock(F, "b", 0, OFFSET_MAX)
    assert held(t) == [("a", R, 10, 19)]


def test_unlock_to_the_end_of_the_file():
    t = PlockTable()
    t.lock(F, "a", W, 10, OFFSET_MAX, 1, wait=False)
    t.unlock(F, "a", 20, OFFSET_MAX)
    assert held(t) == [("a", W, 10, 19)]
    t.unlock(F, "a", 0, 15)
    assert held(t) == [("a", W, 16, 19)]


def test_merge_adjacent_same_type_locks():
    t = PlockTable()
    t.lock(F, "a", R, 0, 9, 1, wait=False)
    t.lock(F, "a", R, 10, 19, 1, wait=False)
    assert held(t) == [("a", R, 0, 19)]
    t.lock(F, "a", R, 30, 39, 1, wait=False)
    assert held(t) == [("a", R, 0, 19), ("a", R, 30, 39)]
    t.lock(F, "a", R, 20, 29, 1, wait=False)  # fills the hole: one lock
    assert held(t) == [("a", R, 0, 39)]


def test_merge_overlapping_same_type_locks():
    t = PlockTable()
    t.lock(F, "a", W, 10, 19, 1, wait=False)
    t.lock(F, "a", W, 15, 30, 1, wait=False)
    t.lock(F, "a", W, 5, 12, 1, wait=False)
    assert held(t) == [("a", W, 5, 30)]
    t.lock(F, "a", W, 0, OFFSET_MAX, 1, wait=False)
    assert held(t) == [("a", W, 0, OFFSET_MAX)]


def test_no_merge_across_types_or_owners():
    t = PlockTable()
    t.lock(F, "a", R, 0, 9, 1, wait=False)
    t.lock(F, "a", W, 10, 19, 1, wait=False)
    t.lock(F, "b", R, 20, 29, 2, wait=False)
    t.lock(F, "a", R, 30, 39, 1, wait=False)
    assert held(t) == [("a", R, 0, 9), ("a", W, 10, 19), ("b", R, 20, 29),
                       ("a", R, 30, 39)]


def test_downgrade_inside_write_lock_splits_it_in_three():
    t = PlockTable()
    t.lock(F, "a", W, 0, 99, 1, wait=False)
    t.lock(F, "a", R, 40, 59, 1, wait=False)
    assert held(t) == [("a", W, 0, 39), ("a", R, 40, 59), ("a", W, 60, 99)]
    assert t.lock(F, "b", R, 50, 50, 2, wait=False)
    with pytest.raises(Conflict):
        t.lock(F, "b", R, 39, 40, 2, wait=False)


def test_test_returns_the_oldest_owners_conflict_with_the_lowest_start():
    # as Linux lists an inode's locks: by owner, in the order the owners first
    # locked there; an owner's own by start
    t = PlockTable()
    t.lock(F, "c", R, 50, 59, 3, wait=False)
    t.lock(F, "b", R, 20, 29, 2, wait=False)
    t.lock(F, "a", W, 30, 39, 1, wait=False)
    t.lock(F, "c", R, 0, 9, 3, wait=False)
    assert t.test(F, "d", W, 0, 99) == Plock("c", R, 0, 9, 3)
    assert t.test(F, "d", W, 10, 99) == Plock("c", R, 50, 59, 3)
    assert t.test(F, "d", W, 20, 49) == Plock("b", R, 20, 29, 2)
    assert t.test(F, "d", R, 0, 99) == Plock("a", W, 30, 39, 1)
    assert t.test(F, "b", W, 20, 49) == Plock("a", W, 30, 39, 1)  # not its own
    assert t.test(F, "d", W, 40, 49) is None
    t.unlock(F, "c", 0, OFFSET_MAX)          # c gone: b is the oldest now
    t.lock(F, "c", R, 21, 21, 3, wait=False)
    assert t.test(F, "d", W, 0, 99) == Plock("b", R, 20, 29, 2)


def test_locks_are_ordered_by_resource_then_start():
    t = PlockTable()
    t.lock(G, "a", R, 5, 5, 1, wait=False)
    t.lock(F, "b", R, 7, 7, 2, wait=False)
    t.lock(F, "a", R, 1, 1, 1, wait=False)
    assert [(r, lk.start) for r, lk in t.locks()] == [(F, 1), (F, 7), (G, 5)]
    assert [(r, lk.start) for r, lk in t.locks(G)] == [(G, 5)]
    assert t.locks(b"none") == []
    t.lock(("flock", F), "a", W, 0, OFFSET_MAX, 1, wait=False, detect_deadlock=False)
    assert len(t.locks()) == 4  # keys of mixed types still list


# ---- waiting and waking ---------------------------------------------------------------

def test_wait_and_wake_in_fifo_order():
    t = PlockTable()
    t.lock(F, "a", W, 0, 99, 1, wait=False)
    assert not t.lock(F, "b", W, 0, 9, 2, wait=True, token="b")
    assert not t.lock(F, "c", W, 5, 14, 3, wait=True, token="c")
    assert not t.lock(F, "d", R, 20, 29, 4, wait=True, token="d")
    assert not t.lock(F, "e", R, 0, 0, 5, wait=True, token="e")
    assert [w[0] for w in t.waiting()] == ["b", "c", "d", "e"]
    assert t.waiting()[0] == ("b", F, "b", W, 0, 9, 2)
    t.unlock(F, "a", 0, 99)
    # b first; c overlaps b so keeps waiting; d does not overlap; e is behind b
    assert drain(t) == ["b", "d"]
    assert [w[0] for w in t.waiting()] == ["c", "e"]
    t.unlock(F, "b", 0, 9)
    assert drain(t) == ["c", "e"]
    assert held(t) == [("e", R, 0, 0), ("c", W, 5, 14), ("d", R, 20, 29)]
    t.check()


def test_waiters_do_not_block_new_requests():
    t = PlockTable()
    t.lock(F, "a", R, 0, 9, 1, wait=False)
    assert not t.lock(F, "b", W, 0, 9, 2, wait=True, token="b")
    assert t.lock(F, "c", R, 0, 9, 3, wait=False)  # as Linux: no fairness


def test_partial_unlock_wakes_only_what_it_frees():
    t = PlockTable()
    t.lock(F, "a", W, 0, 99, 1, wait=False)
    t.lock(F, "b", R, 10, 10, 2, wait=True, token="b10")
    t.lock(F, "b", R, 60, 60, 2, wait=True, token="b60")
    t.unlock(F, "a", 40, 59)
    assert drain(t) == []
    t.unlock(F, "a", 60, 60)
    assert drain(t) == ["b60"]
    assert held(t) == [("a", W, 0, 39), ("b", R, 60, 60), ("a", W, 61, 99)]


def test_a_grant_that_downgrades_frees_an_earlier_waiter():
    t = PlockTable()
    t.lock(F, "a", W, 0, 9, 1, wait=False)
    t.lock(F, "b", W, 10, 19, 2, wait=False)
    assert not t.lock(F, "c", R, 5, 5, 3, wait=True, token="c")
    assert not t.lock(F, "a", R, 0, 19, 1, wait=True, token="a")
    t.unlock(F, "b", 10, 19)
    # a's grant turns its write lock into a read lock, which lets c (ahead of it) in
    assert drain(t) == ["a", "c"]
    assert held(t) == [("a", R, 0, 19), ("c", R, 5, 5)]


def test_waiter_merges_with_its_owners_locks_when_granted():
    t = PlockTable()
    t.lock(F, "a", R, 0, 9, 1, wait=False)
    t.lock(F, "b", W, 10, 19, 2, wait=False)
    t.lock(F, "a", R, 10, 19, 1, wait=True, token="a")
    t.drop(F, "b")
    assert drain(t) == ["a"]
    assert held(t) == [("a", R, 0, 19)]


def test_waiter_granted_after_the_holders_drop():
    t = PlockTable()
    t.lock(F, "a", W, 0, 9, 1, wait=False)
    t.lock(F, "a", W, 50, 59, 1, wait=False)
    t.lock(G, "a", W, 0, 9, 1, wait=False)
    assert not t.lock(F, "b", W, 0, 99, 2, wait=True, token="b")
    t.drop(F, "a")
    assert drain(t) == ["b"]
    assert held(t) == [("b", W, 0, 99)]
    assert held(t, G) == [("a", W, 0, 9)]  # other resources untouched


def test_drop_cancels_the_owners_waiters_without_waking_them():
    t = PlockTable()
    t.lock(F, "d", W, 0, 9, 4, wait=False)
    t.lock(F, "b", R, 100, 109, 2, wait=False)
    t.lock(G, "c", W, 0, 9, 3, wait=False)
    assert not t.lock(G, "b", W, 0, 9, 2, wait=True, token="bg")
    assert not t.lock(F, "a", W, 100, 100, 1, wait=True, token="af")
    assert not t.lock(F, "b", W, 0, 9, 2, wait=True, token="bf")
    t.drop(F, "b")
    assert drain(t) == ["af"]  # a's waiter freed by b's drop; b's own one cancelled
    assert [w[0] for w in t.waiting()] == ["bg"]  # b's waiter elsewhere stays
    assert held(t) == [("d", W, 0, 9), ("a", W, 100, 100)]
    t.unlock(F, "d", 0, 9)
    assert drain(t) == []


def test_cancel():
    t = PlockTable()
    t.lock(F, "a", W, 0, 9, 1, wait=False)
    t.lock(F, "b", W, 0, 9, 2, wait=True, token="b")
    t.lock(F, "c", W, 0, 9, 3, wait=True, token="c")
    assert t.cancel("b")
    assert not t.cancel("b") and not t.cancel("nobody")
    assert [w[0] for w in t.waiting()] == ["c"]
    t.unlock(F, "a", 0, 9)
    assert drain(t) == ["c"]
    assert held(t) == [("c", W, 0, 9)]


def test_drop_owners_with_a_predicate():
    t = PlockTable()
    t.lock(F, (1, "x"), W, 0, 9, 1, wait=False)
    t.lock(F, (1, "x"), W, 20, 29, 1, wait=False)
    t.lock(G, (1, "y"), R, 0, 9, 1, wait=False)
    t.lock(G, (2, "z"), R, 0, 9, 2, wait=False)
    t.lock(F, (2, "z"), W, 0, 29, 2, wait=True, token="z")
    t.lock(G, (3, "w"), W, 5, 5, 3, wait=True, token="w")
    t.lock(F, (1, "v"), R, 0, 0, 1, wait=True, token="v")  # node 1's waiter goes too
    assert t.drop_owners(lambda owner: owner[0] == 1) == 3
    assert drain(t) == ["z"]
    assert held(t) == [((2, "z"), W, 0, 29)]
    assert held(t, G) == [((2, "z"), R, 0, 9)]
    assert [w[0] for w in t.waiting()] == ["w"]
    assert t.drop_owners(lambda owner: owner[0] == 1) == 0


def test_resources_with_nothing_are_forgotten():
    t = PlockTable()
    for i in range(100):
        t.lock(i, "a", W, 0, 9, 1, wait=False)
        t.lock(i, "b", R, 0, 0, 2, wait=True, token=i)
        t.lock(i, "c", R, 5, 5, 3, wait=True, token=-i - 1)
        t.cancel(-i - 1)
        t.unlock(i, "a", 0, 9)
        t.drop(i, "b")
    t.lock(b"x", "a", W, 0, 9, 1, wait=False)
    t.drop_owners(lambda owner: True)
    assert not t.locks() and not t.waiting()
    assert not t._locks and not t._queues and not t._waiters
    t.check()


# ---- deadlocks ------------------------------------------------------------------------

def test_deadlock_two_owners_across_two_resources():
    t = PlockTable()
    t.lock(F, "A", W, 0, 9, 1, wait=False)
    t.lock(G, "B", W, 0, 9, 2, wait=False)
    assert not t.lock(G, "A", W, 0, 9, 1, wait=True, token="A")
    with pytest.raises(Deadlock) as e:
        t.lock(F, "B", W, 5, 5, 2, wait=True, token="B")
    assert e.value.errno == errno.EDEADLK
    assert [w[0] for w in t.waiting()] == ["A"]  # the refused one is not queued
    # a non-waiting request is refused with EAGAIN, as ever
    with pytest.raises(Conflict):
        t.lock(F, "B", W, 5, 5, 2, wait=False)


def test_deadlock_three_owner_cycle():
    t = PlockTable()
    for owner, res in (("A", b"r1"), ("B", b"r2"), ("C", b"r3")):
        t.lock(res, owner, W, 0, OFFSET_MAX, 1, wait=False)
    assert not t.lock(b"r2", "A", R, 0, 0, 1, wait=True, token="A")
    assert not t.lock(b"r3", "B", R, 0, 0, 1, wait=True, token="B")
    with pytest.raises(Deadlock):
        t.lock(b"r1", "C", R, 100, 200, 1, wait=True, token="C")
    # on another range of r1 that A does not hold there is nothing to wait for
    t.unlock(b"r1", "A", 100, OFFSET_MAX)
    assert t.lock(b"r1", "C", R, 100, 200, 1, wait=True, token="C")


def test_deadlock_through_one_of_several_blockers():
    t = PlockTable()
    t.lock(F, "A", R, 0, 9, 1, wait=False)
    t.lock(F, "B", R, 0, 9, 2, wait=False)
    t.lock(G, "C", W, 0, 9, 3, wait=False)
    assert not t.lock(F, "C", W, 0, 0, 3, wait=True, token="C")  # waits for A and B
    for owner in ("A", "B"):
        with pytest.raises(Deadlock):
            t.lock(G, owner, R, 0, 0, 1, wait=True, token=owner)
    assert not t.lock(G, "D", R, 0, 0, 4, wait=True, token="D")
    assert [w[0] for w in t.waiting()] == ["C", "D"]


@pytest.mark.timeout(20)  # the search must end on a cycle that misses the requester
def test_no_deadlock_without_detection():
    t = PlockTable()
    t.lock(F, "A", W, 0, 9, 1, wait=False)
    t.lock(G, "B", W, 0, 9, 2, wait=False)
    t.lock(G, "A", W, 0, 9, 1, wait=True, token="A")
    assert not t.lock(F, "B", W, 0, 9, 2, wait=True, token="B", detect_deadlock=False)
    assert [w[0] for w in t.waiting()] == ["A", "B"]
    # the search still ends on a graph with a cycle that does not involve the requester
    t.lock(b"h", "A", W, 0, 9, 1, wait=False)
    assert not t.lock(b"h", "C", W, 0, 9, 3, wait=True, token="C")
    t.drop_owners(lambda owner: owner == "B")
    assert drain(t) == ["A"]


def test_no_deadlock_when_the_chain_does_not_come_back():
    t = PlockTable()
    t.lock(F, "A", W, 0, 9, 1, wait=False)
    t.lock(G, "B", W, 0, 9, 2, wait=False)
    t.lock(b"h", "C", W, 0, 9, 3, wait=False)
    assert not t.lock(G, "A", W, 0, 9, 1, wait=True, token="A")   # A waits for B
    assert not t.lock(b"h", "B", W, 0, 9, 2, wait=True, token="B")  # B waits for C
    # D waits for A -> B -> C: a chain, no cycle
    assert not t.lock(F, "D", W, 0, 9, 4, wait=True, token="D")
    # C waits on k for X, not for E, whose lock on k is elsewhere: E may wait for C
    t.lock(b"k", "X", W, 0, 9, 6, wait=False)
    t.lock(b"k", "E", R, 20, 29, 5, wait=False)
    assert not t.lock(b"k", "C", W, 0, 9, 3, wait=True, token="C")
    t.lock(F, "C", R, 50, 59, 3, wait=False)
    assert not t.lock(F, "E", W, 55, 55, 5, wait=True, token="E")


def test_flock_locks_are_whole_file_ranges_without_deadlock_detection():
    t = PlockTable()
    fa, fb = ("flock", F), ("flock", G)
    t.lock(fa, "A", W, 0, OFFSET_MAX, 1, wait=False, detect_deadlock=False)
    t.lock(fb, "B", W, 0, OFFSET_MAX, 2, wait=False, detect_deadlock=False)
    t.lock(fb, "A", W, 0, OFFSET_MAX, 1, wait=True, token=1, detect_deadlock=False)
    assert not t.lock(fa, "B", W, 0, OFFSET_MAX, 2, wait=True, token=2,
                      detect_deadlock=False)
    assert held(t, F) == [] and t.test(F, "C", W, 0, OFFSET_MAX) is None
    t.drop(fa, "A")
    assert drain(t) == [2]


# ---- the state machine ----------------------------------------------------------------

OWNERS = ["a", "b", "c"]
RESOURCES = [b"r0", b"r1"]
TAIL = 41  # the model's byte for all of [41, OFFSET_MAX]: ranges start at 40 at most

ltypes = st.sampled_from([R, W])
ranges = st.one_of(
    st.tuples(st.integers(0, 40), st.integers(0, 12)).map(
        lambda sl: (sl[0], min(40, sl[0] + sl[1]))),
    st.tuples(st.integers(0, 40), st.integers(0, 40)).map(sorted),
    st.tuples(st.integers(0, 40), st.just(OFFSET_MAX)))


def span(start, end):
    """The model bytes of a range."""
    return range(start, (TAIL if end == OFFSET_MAX else end) + 1)


class PlockMachine(RuleBasedStateMachine):
    """Drive PlockTable with random calls against a byte-level model."""

    @initialize()
    def setup(self):
        self.t = PlockTable()
        self.bytes = {r: [{} for _ in range(TAIL + 1)] for r in RESOURCES}  # owner->type
        self.waiters = {}  # token -> (res, owner, ltype, start, end, pid), in order
        self.next_token = 0

    # -- the model --

    def blockers(self, res, owner, ltype, start, end):
        return {o for b in span(start, end) for o, lt in self.bytes[res][b].items()
                if o != owner and W in (lt, ltype)}

    def model_set(self, res, owner, ltype, start, end):
        for b in span(start, end):
            if ltype is None:
                self.bytes[res][b].pop(owner, None)
            else:
                self.bytes[res][b][owner] = ltype

    def model_deadlock(self, owner, blockers):
        edges = {}
        for res, o, lt, s, e, _ in self.waiters.values():
            edges.setdefault(o, set()).update(self.blockers(res, o, lt, s, e))
        seen, todo = set(), list(blockers)
        while todo:
            o = todo.pop()
            if o == owner:
                return True
            if o not in seen:
                seen.add(o)
                todo.extend(edges.get(o, ()))
        return False

    def take_woken(self, step):
        woken = drain(self.t)
        note(f"{step} woke {woken}")
        for token in woken:
            assert token in self.waiters, f"woke {token} that was not waiting"
            res, owner, ltype, start, end, _ = self.waiters.pop(token)
            self.model_set(res, owner, ltype, start, end)

    # -- rules --

    @rule(res=st.sampled_from(RESOURCES), owner=st.sampled_from(OWNERS), ltype=ltypes,
          rng=ranges, wait=st.booleans(), detect=st.sampled_from([True, True, False]))
    def lock(self, res, owner, ltype, rng, wait, detect):
        start, end = rng
        self.next_token += 1
        token, pid = self.next_token, 1000 + self.next_token
        blockers = self.blockers(res, owner, ltype, start, end)
        step = f"lock({res}, {owner}, {ltype}, {start}, {end}, wait={wait}, {detect})"
        if not blockers:
            assert self.t.lock(res, owner, ltype, start, end, pid, wait=wait,
                               token=token, detect_deadlock=detect) is True
            self.model_set(res, owner, ltype, start, end)
        elif not wait:
            with pytest.raises(Conflict):
                self.t.lock(res, owner, ltype, start, end, pid, wait=False)
        elif detect and self.model_deadlock(owner, blockers):
            with pytest.raises(Deadlock):
                self.t.lock(res, owner, ltype, start, end, pid, wait=True, token=token)
        else:
            assert self.t.lock(res, owner, ltype, start, end, pid, wait=True,
                               token=token, detect_deadlock=detect) is False
            self.waiters[token] = (res, owner, ltype, start, end, pid)
        self.take_woken(step)

    @rule(res=st.sampled_from(RESOURCES), owner=st.sampled_from(OWNERS), ltype=ltypes,
          rng=ranges)
    def lock_and_wait(self, res, owner, ltype, rng):
        self.lock(res, owner, ltype, rng, True, True)

    @rule(res=st.sampled_from(RESOURCES), owner=st.sampled_from(OWNERS), rng=ranges)
    def unlock(self, res, owner, rng):
        self.t.unlock(res, owner, *rng)
        self.model_set(res, owner, None, *rng)
        self.take_woken(f"unlock({res}, {owner}, {rng})")

    @rule(i=st.integers(0, 7), cut=st.integers(0, 3), data=st.data())
    def unlock_part_of_a_held_lock(self, i, cut, data):
        """Releases that hit something: all of a held lock, its head, tail or middle."""
        locks = self.t.locks()
        if not locks:
            return
        res, lk = locks[i % len(locks)]
        start, end = lk.start, min(lk.end, 41)
        a = data.draw(st.integers(start, end)) if cut in (1, 3) else start
        b = data.draw(st.integers(a, end)) if cut in (2, 3) else lk.end
        self.unlock(res, lk.owner, (a, OFFSET_MAX if b == 41 else b))

    @rule(res=st.sampled_from(RESOURCES), owner=st.sampled_from(OWNERS))
    def drop(self, res, owner):
        self.t.drop(res, owner)
        self.model_set(res, owner, None, 0, OFFSET_MAX)
        for token, w in list(self.waiters.items()):
            if w[:2] == (res, owner):
                del self.waiters[token]
        self.take_woken(f"drop({res}, {owner})")

    @rule(i=st.integers(0, 7), how=st.sampled_from(["unlock", "overlap", "drop"]))
    def release_a_blocker(self, i, how):
        """Releases that may wake someone: of a lock in a waiter's way."""
        if not self.waiters:
            return
        waiters = list(self.waiters.values())
        res, owner, ltype, start, end, _ = waiters[i % len(waiters)]
        lk = self.t.test(res, owner, ltype, start, end)
        if how == "drop":
            self.drop(res, lk.owner)
        elif how == "unlock":
            self.unlock(res, lk.owner, (lk.start, lk.end))
        else:  # only where it is in the waiter's way
            self.unlock(res, lk.owner, (max(start, lk.start), min(end, lk.end)))

    @rule(dead=st.sets(st.sampled_from(OWNERS), max_size=2))
    def drop_owners(self, dead):
        expected = sum(lk.owner in dead for _, lk in self.t.locks())
        assert self.t.drop_owners(lambda owner: owner in dead) == expected
        for res in RESOURCES:
            for o in dead:
                self.model_set(res, o, None, 0, OFFSET_MAX)
        self.waiters = {k: w for k, w in self.waiters.items() if w[1] not in dead}
        self.take_woken(f"drop_owners({dead})")

    @rule(i=st.integers(0, 5))
    def cancel(self, i):
        tokens = list(self.waiters)
        token = tokens[i] if i < len(tokens) else "unknown"
        assert self.t.cancel(token) == (token in self.waiters)
        self.waiters.pop(token, None)
        self.take_woken(f"cancel({token})")

    @rule(res=st.sampled_from(RESOURCES), owner=st.sampled_from(OWNERS), ltype=ltypes,
          rng=ranges)
    def test(self, res, owner, ltype, rng):
        self.check_test(res, owner, ltype, *rng)

    def check_test(self, res, owner, ltype, start, end):
        got = self.t.test(res, owner, ltype, start, end)
        note(f"test({res}, {owner}, {ltype}, {start}, {end}) -> {got}")
        assert (got is not None) == bool(self.blockers(res, owner, ltype, start, end))
        if got is not None:
            conflicting = [lk for _, lk in self.t.locks(res)
                           if lk.owner != owner and lk.start <= end and start <= lk.end
                           and W in (lk.ltype, ltype)]
            assert got in conflicting
            # of the chosen owner's conflicting locks, the lowest (which owner: the
            # oldest, as Linux lists them; tests/cluster compares with ext4)
            assert got.start == min(lk.start for lk in conflicting
                                    if lk.owner == got.owner)

    # -- invariants --

    @invariant()
    def locks_match_the_model(self):
        if not hasattr(self, "t"):
            return
        self.t.check()
        for res in RESOURCES:
            table = [{} for _ in range(TAIL + 1)]
            for r, lk in self.t.locks(res):
                assert r == res and lk.ltype in (R, W)
                assert lk.start <= TAIL and (lk.end <= 40 or lk.end == OFFSET_MAX), lk
                for b in span(lk.start, lk.end):
                    assert lk.owner not in table[b], f"{lk} overlaps its owner's lock"
                    table[b][lk.owner] = lk.ltype
            assert table == self.bytes[res]
        assert [lk for r, lk in self.t.locks() if r in RESOURCES] == \
            [lk for r in RESOURCES for _, lk in self.t.locks(r)]

    @invariant()
    def no_held_locks_conflict(self):
        if not hasattr(self, "t"):
            return
        for res in RESOURCES:
            for a, b in itertools.combinations([lk for _, lk in self.t.locks(res)], 2):
                assert a.owner == b.owner or a.end < b.start or b.end < a.start \
                    or (a.ltype == R and b.ltype == R), (a, b)

    @invariant()
    def own_locks_disjoint_and_merged(self):
        if not hasattr(self, "t"):
            return
        for res in RESOURCES:
            locks = [lk for _, lk in self.t.locks(res)]
            assert [lk.start for lk in locks] == sorted(lk.start for lk in locks)
            for owner in OWNERS:
                mine = [lk for lk in locks if lk.owner == owner]
                for a, b in zip(mine, mine[1:]):
                    assert a.end < b.start, (a, b)
                    assert a.ltype != b.ltype or a.end + 1 < b.start, f"unmerged {a} {b}"

    @invariant()
    def waiters_match_and_none_could_be_granted(self):
        if not hasattr(self, "t"):
            return
        assert self.t.waiting() == [(k, *w) for k, w in self.waiters.items()]
        for res, owner, ltype, start, end, _ in self.waiters.values():
            assert self.blockers(res, owner, ltype, start, end), "a waiter left waiting"
            assert self.t.test(res, owner, ltype, start, end) is not None

    @invariant()
    def test_agrees_on_whole_files(self):
        if not hasattr(self, "t"):
            return
        for res, owner, ltype in itertools.product(RESOURCES, OWNERS, (R, W)):
            self.check_test(res, owner, ltype, 0, OFFSET_MAX)
            self.check_test(res, owner, ltype, 20, 40)

    @invariant()
    def empty_resources_forgotten(self):
        if not hasattr(self, "t"):
            return
        used = {r for r in RESOURCES if any(self.bytes[r])}
        assert set(self.t._locks) == used
        assert set(self.t._queues) == {w[0] for w in self.waiters.values()}


PlockMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestPlockMachine = PlockMachine.TestCase
