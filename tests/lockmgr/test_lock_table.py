"""The pure lock table: modes, FIFO, conversions, callbacks, value blocks, deadlocks,
reclaim, and a hypothesis state machine that drives it against a model."""

import itertools

import pytest
from hypothesis import HealthCheck, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from lockmgr.modes import (COMPAT, CR, CW, EX, NL, PR, PW, Mode, compatible, covers,
                           downgrade_for, supremum)
from lockmgr.table import Bast, Fail, Grant, LockTable, TableError

LVB_A = b"A" * 32
LVB_B = b"B" * 32


# ---- modes ----------------------------------------------------------------------------

def test_compat_matrix_is_the_standard_one():
    expected = {
        NL: {NL, CR, CW, PR, PW, EX},
        CR: {NL, CR, CW, PR, PW},
        CW: {NL, CR, CW},
        PR: {NL, CR, PR},
        PW: {NL, CR},
        EX: {NL},
    }
    for a, b in itertools.product(Mode, Mode):
        assert compatible(a, b) == (b in expected[a])
        assert COMPAT[a][b] == COMPAT[b][a]


def test_mode_lattice():
    assert covers(EX, PR) and covers(PW, CW) and covers(PR, CR) and covers(CR, NL)
    assert not covers(PR, CW) and not covers(CW, PR)
    assert supremum(CW, PR) == PW and supremum(NL, CR) == CR and supremum(EX, NL) == EX
    assert downgrade_for(EX, PR) == PR
    assert downgrade_for(EX, EX) == NL
    assert downgrade_for(PW, PR) == PR and downgrade_for(PW, EX) == NL
    assert downgrade_for(PR, CW) == CR
    for held, req in itertools.product(Mode, Mode):
        d = downgrade_for(held, req)
        assert covers(held, d) and compatible(d, req)


# ---- unit behaviour -------------------------------------------------------------------

def grants(out):
    return [(e.owner, e.name, e.mode) for e in out if isinstance(e, Grant)]


def test_shared_then_exclusive_waits_fifo_and_basts():
    t = LockTable()
    t.request("a", b"r", PR, 1)
    t.request("b", b"r", PR, 2)
    assert grants(t.drain()) == [("a", b"r", PR), ("b", b"r", PR)]
    t.request("c", b"r", EX, 3)
    out = t.drain()
    assert sorted((e.owner, e.mode) for e in out if isinstance(e, Bast)) == \
        [("a", EX), ("b", EX)]
    # a compatible PR that arrives later still queues behind the EX (FIFO, no starvation)
    t.request("d", b"r", PR, 4)
    assert not grants(t.drain())
    t.unlock("a", b"r")
    assert not grants(t.drain())
    t.unlock("b", b"r")
    assert grants(t.drain()) == [("c", b"r", EX)]
    t.unlock("c", b"r")
    assert grants(t.drain()) == [("d", b"r", PR)]
    t.check()


def test_conversions_served_before_waiting_requests():
    t = LockTable()
    t.request("a", b"r", PR, 1)
    t.request("b", b"r", PR, 2)
    t.request("c", b"r", PR, 3)
    t.drain()
    t.request("w", b"r", PW, 4)       # waits for the PR holders
    t.convert("a", b"r", EX, 5)       # waits too, but as a conversion
    t.drain()
    t.unlock("b", b"r")
    t.unlock("c", b"r")
    assert grants(t.drain()) == [("a", b"r", EX)]
    t.convert("a", b"r", NL, 6)       # down: at once, then the waiter
    assert grants(t.drain()) == [("a", b"r", NL), ("w", b"r", PW)]
    t.check()


def test_try_lock_and_cancel_and_timeout():
    t = LockTable()
    t.request("a", b"r", EX, 1)
    t.request("b", b"r", PR, 2, try_lock=True)
    assert [e for e in t.drain() if isinstance(e, Fail)] == [Fail("b", b"r", 2, "tryagain")]
    assert t.lock_of("b", b"r") is None
    t.request("b", b"r", PR, 3, now=10.0)
    t.request("c", b"r", CR, 4, now=11.0)
    deadlines = {("b", b"r", 3): 12.0}
    t.expire(11.5, deadlines)
    assert not [e for e in t.drain() if isinstance(e, Fail)]
    t.expire(12.0, deadlines)
    assert [e for e in t.drain() if isinstance(e, Fail)] == [Fail("b", b"r", 3, "timeout")]
    assert not deadlines
    assert t.cancel("c", b"r") is True
    assert t.cancel("c", b"r") is False
    t.check()


def test_failed_try_lock_with_notify_basts_the_holders_once():
    t = LockTable()
    t.request("a", b"r", PR, 1)
    t.request("b", b"r", PR, 2)
    t.request("c", b"r", CR, 3)
    t.drain()
    t.request("d", b"r", EX, 4, try_lock=True)               # plain try: no callbacks
    assert t.drain() == [Fail("d", b"r", 4, "tryagain")]
    t.request("d", b"r", EX, 5, try_lock=True, notify=True)
    out = t.drain()
    assert out[0] == Fail("d", b"r", 5, "tryagain")
    assert sorted(out[1:]) == [Bast("a", b"r", EX), Bast("b", b"r", EX),
                               Bast("c", b"r", EX)]
    t.request("d", b"r", EX, 6, try_lock=True, notify=True)  # told already
    assert t.drain() == [Fail("d", b"r", 6, "tryagain")]
    assert t.lock_of("d", b"r") is None
    # a holder converting up by try with notify: only the others are told, and
    # only of what they were not told yet
    t.convert("a", b"r", EX, 7, try_lock=True, notify=True)
    assert t.drain() == [Fail("a", b"r", 7, "tryagain")]    # b, c know of EX
    t.convert("a", b"r", PW, 8, try_lock=True, notify=True)
    out = t.drain()
    assert out[0] == Fail("a", b"r", 8, "tryagain")
    assert sorted(out[1:]) == [Bast("b", b"r", PW)]         # CR is compatible with PW
    t.unlock("b", b"r")
    t.unlock("c", b"r")
    t.drain()
    t.convert("a", b"r", EX, 9, try_lock=True, notify=True)
    assert t.drain() == [Grant("a", b"r", 9, EX, None, 0)]
    t.check()


def test_value_block_rules():
    t = LockTable()
    t.request("a", b"r", EX, 1)
    assert t.drain()[0].lvb is None             # new resource: invalid
    t.convert("a", b"r", PR, 2, lvb=LVB_A)      # EX down-converts: written
    assert t.drain()[0].lvb == LVB_A
    t.convert("a", b"r", PR, 3, lvb=LVB_B)      # PR holder: not written
    t.unlock("a", b"r", lvb=LVB_B)               # PR holder: not written
    t.request("b", b"r", CR, 4)
    assert t.drain()[0].lvb == LVB_A             # remembered while unlocked
    t.request("c", b"r", PW, 5)
    t.unlock("c", b"r", lvb=LVB_B)
    t.request("c", b"r", PW, 6)
    assert t.drain()[-1].lvb == LVB_B
    t.mark_dead("c")
    t.release_owner("c")                         # dead PW writer: invalid
    t.request("d", b"r", PR, 7)
    assert t.drain()[-1].lvb is None
    t.request("e", b"s", EX, 8)
    with pytest.raises(TableError):
        t.convert("e", b"s", NL, 9, lvb=b"short")
    t.check()


def test_dead_owner_keeps_locks_until_released():
    t = LockTable()
    t.request("a", b"r", EX, 1)
    t.request("b", b"r", EX, 2)
    t.drain()
    t.mark_dead("a")
    t.request("c", b"r", PR, 3, try_lock=True)
    out = t.drain()
    assert Fail("c", b"r", 3, "notrecovered") in out
    assert not [e for e in out if isinstance(e, Bast) and e.owner == "a"]
    t.repeat_basts()
    assert not t.drain()                          # no callbacks to the dead
    assert t.release_owner("a") == 1
    assert grants(t.drain()) == [("b", b"r", EX)]
    t.check()


def test_deadlock_one_victim_others_proceed():
    t = LockTable()
    t.request("a", b"x", EX, 1, now=0)
    t.request("b", b"y", EX, 2, now=0)
    t.request("a", b"y", EX, 3, now=1)
    t.request("b", b"x", EX, 4, now=2)
    t.drain()
    assert t.break_deadlocks(now=2.5, min_wait=1.0) == []   # too young to count
    victims = t.break_deadlocks(now=3.5, min_wait=1.0)
    assert [(v.owner, v.name) for v in victims] == [("b", b"x")]  # the youngest
    assert Fail("b", b"x", 4, "deadlock") in t.drain()
    t.unlock("b", b"y")
    assert grants(t.drain()) == [("a", b"y", EX)]
    t.check()


def test_conversion_deadlock():
    t = LockTable()
    t.request("a", b"r", PR, 1)
    t.request("b", b"r", PR, 2)
    t.convert("a", b"r", EX, 3)
    t.convert("b", b"r", EX, 4)
    t.drain()
    victims = t.break_deadlocks()
    assert [v.owner for v in victims] == ["b"]
    assert t.lock_of("b", b"r").granted == PR    # keeps what it had
    t.unlock("b", b"r")
    assert grants(t.drain()) == [("a", b"r", EX)]


def test_three_way_deadlock():
    t = LockTable()
    for i, o in enumerate("abc"):
        t.request(o, bytes([97 + i]), EX, i + 1)
    t.request("a", b"b", EX, 10)
    t.request("b", b"c", EX, 11)
    t.request("c", b"a", EX, 12)
    t.drain()
    victims = t.break_deadlocks()
    assert [(v.owner, v.name) for v in victims] == [("c", b"a")]
    assert t.break_deadlocks() == []


def test_frozen_queues_are_no_deadlock():
    """Queues that cross between owners while the table is frozen (each node first in
    line for one counter, second for the other) are paused, not stuck; once served
    again, the requests left queued count their wait from the thaw."""
    t = LockTable()
    t.set_frozen(True, now=0)                      # a restarted server's grace
    t.request("a", b"c0", EX, 1, now=0.1)
    t.request("b", b"c1", EX, 2, now=0.1)
    t.request("b", b"c0", EX, 3, now=0.2)
    t.request("a", b"c1", EX, 4, now=0.2)
    assert t.break_deadlocks(now=3.0, min_wait=1.0) == []      # nothing moves yet
    t.set_frozen(False, now=3.0)
    assert sorted(grants(t.drain())) == [("a", b"c0", EX), ("b", b"c1", EX)]
    # b waits for a's c0 and a for b's c1: a cycle, but not yet an old one
    assert t.break_deadlocks(now=3.5, min_wait=1.0) == []
    victims = t.break_deadlocks(now=4.5, min_wait=1.0)        # it lasted: a deadlock
    assert [(v.owner, v.name) for v in victims] == [("a", b"c1")]
    t.check()
    # a frozen name's queue gives no edges even among names that are served
    t2 = LockTable()
    t2.request("x", b"J1", EX, 1, now=0)
    t2.request("y", b"R1", EX, 2, now=0)
    t2.set_frozen(True, thaw_prefix=b"J", now=0)
    t2.request("x", b"R1", EX, 3, now=0)           # held back: R is frozen
    t2.request("y", b"J1", EX, 4, now=0)           # served: waits for x's J1
    t2.drain()
    assert t2.break_deadlocks(now=5.0, min_wait=1.0) == []
    t2.set_frozen(True, thaw_prefix=b"J", now=5.0)  # the prefix again: no new thaw
    t2.set_frozen(False, now=6.0)
    assert t2.break_deadlocks(now=6.5, min_wait=1.0) == []
    assert [(v.owner, v.name) for v in t2.break_deadlocks(now=7.0, min_wait=1.0)] \
        == [("y", b"J1")]


def test_frozen_and_reclaim():
    t = LockTable()
    t.set_frozen(True)
    assert t.reclaim("a", b"r", PR, LVB_A, 3)
    assert t.reclaim("b", b"r", PR, LVB_B, 2)      # lower version: A stays
    assert not t.reclaim("c", b"r", EX, None, 9)   # conflicts: refused, never twice
    t.request("d", b"r", CR, 1)                     # compatible, but frozen
    assert not grants(t.drain())
    t.set_frozen(False)
    out = t.drain()
    assert grants(out) == [("d", b"r", CR)] and out[0].lvb == LVB_A
    t.check()


def test_frozen_with_a_thaw_prefix_serves_only_those_names():
    t = LockTable()
    t.request("dead", b"I1", EX, 1)                 # a dead node's lock (unknown here)
    t.request("dead", b"J0", CR, 2)
    t.mark_dead("dead")
    t.drain()
    t.set_frozen(True, thaw_prefix=b"J")
    assert t.frozen and t.thaw_prefix == b"J"
    t.request("a", b"J1", EX, 3)                    # a recovery lock: granted
    t.request("b", b"I2", PR, 4)                    # anything else: waits
    t.request("b", b"J1", EX, 5)                    # queued behind a's J1
    assert grants(t.drain()) == [("a", b"J1", EX)]
    t.convert("a", b"J1", PR, 6)                    # down: always granted
    t.request("a", b"J0", PR, 7)                    # compatible with the dead CR
    t.convert("a", b"J0", EX, 8)                    # up: blocked by the dead CR
    assert grants(t.drain()) == [("a", b"J1", PR), ("a", b"J0", PR)]
    t.unlock("a", b"J1")                            # b's queued J1 follows at once
    assert grants(t.drain()) == [("b", b"J1", EX)]
    t.release_owner("dead")                         # J0 (thawed) is served at once
    assert grants(t.drain()) == [("a", b"J0", EX)]
    t.check()
    # thawing a frozen table serves the prefix's queues, and only them
    t2 = LockTable()
    t2.request("x", b"J9", EX, 1)
    t2.request("x", b"R9", EX, 2)
    t2.drain()
    t2.set_frozen(True)
    t2.unlock("x", b"J9")
    t2.unlock("x", b"R9")
    t2.request("y", b"J9", EX, 3)
    t2.request("y", b"R9", EX, 4)
    assert not grants(t2.drain())
    t2.set_frozen(True, thaw_prefix=b"J")
    assert grants(t2.drain()) == [("y", b"J9", EX)]
    t2.set_frozen(False)
    assert grants(t2.drain()) == [("y", b"R9", EX)]
    assert t2.thaw_prefix is None
    t2.check()


def test_rule_violations_raise():
    t = LockTable()
    t.request("a", b"r", PR, 1)
    with pytest.raises(TableError):
        t.request("a", b"r", EX, 2)
    with pytest.raises(TableError):
        t.unlock("b", b"r")
    with pytest.raises(TableError):
        t.convert("b", b"r", EX, 3)
    t.request("b", b"r", EX, 4)
    with pytest.raises(TableError):
        t.convert("b", b"r", PR, 5)                 # waiting, not granted


def test_idle_value_blocks_are_bounded():
    t = LockTable(max_idle=2)
    for i in range(4):
        name = b"r%d" % i
        t.request("a", name, EX, i)
        t.unlock("a", name, lvb=LVB_A)
    assert len(list(t.names())) == 2
    t.check()


# ---- the state machine ------------------------------------------------------------------

OWNERS = ["a", "b", "c", "d"]
NAMES = [b"r0", b"r1", b"r2"]
modes = st.sampled_from(list(Mode))
lvbs = st.one_of(st.none(), st.sampled_from([LVB_A, LVB_B, b"C" * 32]))


class LockTableMachine(RuleBasedStateMachine):
    """Drive LockTable with random operations; a model checks every effect."""

    @initialize()
    def setup(self):
        self.t = LockTable()
        self.rid = 0
        self.now = 0.0
        self.held = {}        # (owner, name) -> granted mode
        self.pending = {}     # (owner, name) -> (rid, mode, is_conversion)
        self.waitq = {n: [] for n in NAMES}   # order of new requests (owner, rid)
        self.convq = {n: [] for n in NAMES}
        self.lvb = {n: None for n in NAMES}
        self.dead = set()
        self.seen_rids = set()

    def next_rid(self):
        self.rid += 1
        return self.rid

    def apply(self, step):
        """Check the effects of one operation against the model and update it."""
        out = self.t.drain()
        note(f"{step} -> {out}")
        for e in out:
            key = (e.owner, e.name)
            if isinstance(e, Grant):
                assert key in self.pending, f"grant without a request: {e}"
                rid, mode, conv = self.pending.pop(key)
                if self.t.frozen and not (self.t.thaw_prefix is not None
                                          and e.name.startswith(self.t.thaw_prefix)):
                    assert conv and covers(self.held[key], mode), \
                        f"granted while frozen: {e}"
                assert e.rid == rid and e.mode == mode
                assert rid not in self.seen_rids, "granted twice"
                self.seen_rids.add(rid)
                q = self.convq[e.name] if conv else self.waitq[e.name]
                if (e.owner, rid) in q:
                    # FIFO: nothing queued before it in its own queue is still waiting
                    assert q[0] == (e.owner, rid), f"FIFO broken: {q} granted {e}"
                    q.pop(0)
                    if not conv:
                        assert not self.convq[e.name], "waiter granted before conversions"
                self.held[key] = mode
                assert e.lvb == self.lvb[e.name], "stale value block on grant"
            elif isinstance(e, Fail):
                assert key in self.pending
                rid, mode, conv = self.pending.pop(key)
                assert e.rid == rid
                for q in (self.convq[e.name], self.waitq[e.name]):
                    if (e.owner, rid) in q:
                        q.remove((e.owner, rid))
            elif isinstance(e, Bast):
                assert e.owner not in self.dead
                assert not COMPAT[self.held[key]][e.mode]
        # what is still pending was queued
        for (owner, name), (rid, mode, conv) in self.pending.items():
            q = self.convq[name] if conv else self.waitq[name]
            if (owner, rid) not in q:
                q.append((owner, rid))

    # -- rules --

    @rule(owner=st.sampled_from(OWNERS), name=st.sampled_from(NAMES), mode=modes,
          try_lock=st.booleans())
    def request(self, owner, name, mode, try_lock):
        key = (owner, name)
        if owner in self.dead or key in self.held or key in self.pending:
            return
        rid = self.next_rid()
        self.pending[key] = (rid, mode, False)
        queued_before = bool(self.waitq[name] or self.convq[name])
        self.t.request(owner, name, mode, rid, try_lock=try_lock, now=self.now)
        if queued_before and not self.t.frozen:
            assert self.t.lock_of(owner, name) is None or \
                self.t.lock_of(owner, name).granted is None, "jumped the queue"
        self.apply(f"request({owner}, {name}, {mode.name}, try={try_lock})")

    @rule(owner=st.sampled_from(OWNERS), name=st.sampled_from(NAMES), mode=modes,
          lvb=lvbs, try_lock=st.booleans())
    def convert(self, owner, name, mode, lvb, try_lock):
        key = (owner, name)
        if owner in self.dead or key not in self.held or key in self.pending:
            return
        held = self.held[key]
        if lvb is not None and held in (PW, EX):
            self.lvb[name] = lvb
        rid = self.next_rid()
        self.pending[key] = (rid, mode, True)
        self.t.convert(owner, name, mode, rid, lvb=lvb, try_lock=try_lock, now=self.now)
        self.apply(f"convert({owner}, {name}, {mode.name}, lvb={lvb!r}, try={try_lock})")
        if covers(held, mode):
            assert key not in self.pending, "a conversion down must be granted at once"

    @rule(owner=st.sampled_from(OWNERS), name=st.sampled_from(NAMES), lvb=lvbs)
    def unlock(self, owner, name, lvb):
        key = (owner, name)
        if owner in self.dead or (key not in self.held and key not in self.pending):
            return
        held = self.held.pop(key, None)
        if lvb is not None and held in (PW, EX):
            self.lvb[name] = lvb
        self.t.unlock(owner, name, lvb=lvb)
        self.apply(f"unlock({owner}, {name}, lvb={lvb!r})")
        assert key not in self.pending

    @rule(owner=st.sampled_from(OWNERS), name=st.sampled_from(NAMES))
    def cancel(self, owner, name):
        self.t.cancel(owner, name)
        self.apply(f"cancel({owner}, {name})")

    @rule(owner=st.sampled_from(OWNERS))
    def die(self, owner):
        if owner in self.dead:
            return
        self.dead.add(owner)
        self.t.mark_dead(owner)
        self.apply(f"mark_dead({owner})")

    @rule(owner=st.sampled_from(OWNERS))
    def recover(self, owner):
        if owner not in self.dead:
            return
        for (o, n), mode in list(self.held.items()):
            if o == owner:
                if mode in (PW, EX):
                    self.lvb[n] = None
                del self.held[(o, n)]
        self.dead.discard(owner)
        self.t.release_owner(owner)
        self.apply(f"release_owner({owner})")

    @rule(dt=st.sampled_from([0.0, 0.5, 2.0]))
    def tick_and_break_deadlocks(self, dt):
        self.now += dt
        self.t.break_deadlocks(self.now, 1.0)
        self.apply("break_deadlocks")

    @rule()
    def repeat_basts(self):
        self.t.repeat_basts()
        self.apply("repeat_basts")

    @rule(frozen=st.booleans(), thaw=st.sampled_from([None, b"r0", b"r"]))
    def freeze(self, frozen, thaw):
        self.t.set_frozen(frozen, thaw_prefix=thaw)
        self.apply(f"set_frozen({frozen}, thaw_prefix={thaw!r})")

    @rule()
    def everyone_releases(self):
        """Once the holders let go, every waiter is granted."""
        self.t.set_frozen(False)
        self.apply("set_frozen(False)")
        for owner in list(self.dead):
            self.recover(owner)
        for _ in range(100):
            if not self.pending:
                break
            idle = [k for k in self.held if k not in self.pending]
            if idle:
                for owner, name in idle:
                    self.unlock(owner, name, None)
            else:
                # only conversions stuck on each other remain: a deadlock
                assert self.t.break_deadlocks(self.now, 0.0), \
                    "waiters stuck with nobody to release"
                self.apply("break_deadlocks")
        assert not self.pending, f"waiters never granted: {self.pending}"

    # -- invariants --

    @invariant()
    def table_consistent(self):
        if hasattr(self, "t"):
            self.t.check()
            for (owner, name), mode in self.held.items():
                lk = self.t.lock_of(owner, name)
                assert lk is not None and lk.granted == mode

    @invariant()
    def no_incompatible_grants(self):
        if hasattr(self, "t"):
            for name in NAMES:
                modes_ = [(o, m) for (o, n), m in self.held.items() if n == name]
                for (o1, m1), (o2, m2) in itertools.combinations(modes_, 2):
                    assert COMPAT[m1][m2], (name, o1, m1, o2, m2)

    @invariant()
    def nobody_waits_for_nothing(self):
        """A queued request at the head of an unfrozen (or thawed) queue is blocked by
        someone."""
        if hasattr(self, "t"):
            thaw = self.t.thaw_prefix
            for name in NAMES:
                res = self.t.resource(name)
                if res is None or (self.t.frozen and not (thaw is not None
                                                          and name.startswith(thaw))):
                    continue
                if res.converting:
                    head = res.converting[0]
                    assert not self.t._compatible(res, head.requested, head)
                elif res.waiting:
                    head = res.waiting[0]
                    assert not self.t._compatible(res, head.requested, None)


LockTableMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestLockTableMachine = LockTableMachine.TestCase
