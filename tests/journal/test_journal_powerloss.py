"""Power loss anywhere: random journal work on a PowerLossDevice, cut, crash, replay, check.

The oracle is a model of the committed state.  ``S_K`` is every home block's state
after the last transaction whose ``commit()`` returned; ``S_K+1`` the state the
interrupted commit (if any) would have made.  After a crash and replay the home blocks
must equal ``S_K`` everywhere, or ``S_K+1`` everywhere when replay found that commit's
block: never a mix of the two, never an image of an uncommitted transaction.  Blocks
freed by a committed revoke are then written as file data (allowed once the free has
committed): a stale image replayed or checkpointed over them shows up as a mismatch.
File data written before an interrupted commit must be there when that commit
survived (ordered mode); before that it may or may not be.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule)

from clusterfs.ondisk.blockdev import PowerCut, PowerLossDevice
from journal import Journal
from tests.journal.jtools import LENGTH, START, ZERO, ImageObj, blk

HOME = [0, 1, 2, 3, 4, 5, 128, 129]     # metadata / data blocks under test (few: collisions)
META, FREE, DATA = "meta", "free", "data"


def _note(msg: str) -> None:
    """``hypothesis.note`` inside a hypothesis test; nothing in a plain test."""
    try:
        note(msg)
    except InvalidArgument:
        pass


class Harness:
    """A journal on a power-loss device, driven side by side with a model."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.dev = PowerLossDevice(256)
        Journal.format(self.dev, START, LENGTH)
        self.j = Journal(self.dev, START, LENGTH)
        self.j.open("model")
        self.state = {b: (META, ZERO) for b in HOME}  # S_K
        self.r_meta: dict[int, bytes | ImageObj] = {}  # running: journaled images
        self.r_free: set[int] = set()                  # running: revoked
        self.r_data: dict[int, bytes] = {}             # running: file data written
        self.dirty: set[int] = set()                   # data written since S_K
        self.counter = 0
        self.crashes = 0

    # -- model ---------------------------------------------------------------------

    def _content(self, b: int) -> bytes:
        self.counter += 1
        return blk(b, self.counter)

    def _next_state(self) -> dict:
        nxt = dict(self.state)
        for b in self.r_free:
            nxt[b] = (FREE, None)
        for b, src in self.r_meta.items():
            nxt[b] = (META, src if isinstance(src, bytes) else src.data)
        for b, data in self.r_data.items():
            nxt[b] = (DATA, data)
        return nxt

    def _committed(self, nxt: dict) -> None:
        self.state = nxt
        self.r_meta.clear()
        self.r_free.clear()
        self.r_data.clear()
        self.dirty.clear()

    # -- operations (each may be cut by the power) ------------------------------------

    def add(self, b: int, as_object: bool) -> None:
        if b in self.r_data:
            return
        data = self._content(b)
        src = ImageObj(data) if as_object else data
        _note(f"add {b} {'object' if as_object else 'bytes'} #{self.counter}")
        self.j.add(b, src)
        self.r_free.discard(b)
        self.r_meta[b] = src

    def mutate(self, b: int) -> None:
        src = self.r_meta.get(b)
        if isinstance(src, ImageObj):
            src.data = self._content(b)
            _note(f"mutate {b} #{self.counter}")

    def revoke(self, b: int) -> None:
        if b in self.r_data or (self.state[b][0] != META and b not in self.r_meta):
            return
        _note(f"revoke {b}")
        self.j.revoke(b)
        self.r_meta.pop(b, None)
        self.r_free.add(b)

    def write_data(self, b: int) -> None:
        if self.state[b][0] == META or b in self.r_meta or b in self.r_free:
            return
        data = self._content(b)
        _note(f"data {b} #{self.counter}")
        self.r_data[b] = data
        self.dirty.add(b)
        self._guard(lambda: self.dev.write(b, data), commits=False)

    def commit(self) -> None:
        _note("commit")
        nxt = self._next_state()
        seq = self._guard(self.j.commit, commits=True)
        if seq is not None and seq is not _CRASHED:
            self._committed(nxt)

    def checkpoint(self) -> None:
        _note("checkpoint")
        self._guard(self.j.checkpoint, commits=False)

    def close_and_reopen(self) -> None:
        _note("close, reopen")
        nxt = self._next_state()
        before = self.j.stats()["commits"]
        if self._guard(self.j.close, commits=True) is _CRASHED:
            return
        if self.j.stats()["commits"] > before:
            self._committed(nxt)
        self._guard(self._reopen, commits=False)

    def _reopen(self) -> None:
        self.j = Journal(self.dev, START, LENGTH)
        assert self.j.replay().clean
        self.j.open("model")

    def run(self, op: tuple) -> None:
        name, *args = op
        getattr(self, name)(*args)

    # -- power cuts --------------------------------------------------------------------

    def _guard(self, fn, *, commits: bool):
        """Run ``fn``; if the power fails inside, crash, recover and check the oracle."""
        nxt = self._next_state() if commits else None
        st = self.j.stats()
        seq, before = st["next_seq"], st["commits"]
        try:
            return fn()
        except PowerCut:
            done = self.j.stats()["commits"] > before
            if done:
                self._committed(nxt)
            inflight = (seq, nxt) if commits and not done else None
            self.power_off(inflight)
            return _CRASHED

    def power_off(self, inflight=None) -> None:
        """Crash now (random survivors among unflushed writes), replay, check, go on."""
        crashed = self.dev.crash(rng=self.rng)
        self.crashes += 1
        j = Journal(crashed, START, LENGTH)
        report = j.replay()
        _note(f"power off: {report.summary()}")
        if inflight is not None and inflight[0] in report.seqs:
            expected, unknown = inflight[1], set()
        else:
            expected, unknown = self.state, set(self.dirty)
        for b in HOME:
            kind, content = expected[b]
            if kind == FREE or b in unknown:
                continue
            got = crashed.read(b)
            assert got == content, (f"block {b} ({kind}) after power off: replay "
                                    f"{report.summary()}")
        # Carry on from the recovered volume, as the next mount would.
        self.dev = crashed
        self.j = j
        self.j.open("model")
        self.state = dict(expected)
        for b in unknown:
            if expected[b][0] == DATA:
                self.state[b] = (DATA, crashed.read(b))
        self.r_meta.clear()
        self.r_free.clear()
        self.r_data.clear()
        self.dirty.clear()

    # -- checks without a crash ---------------------------------------------------------

    def check_clean_stop(self) -> None:
        """Everything written so far survives: replay gives S_K plus the latest data."""
        snap = self.dev.snapshot()
        Journal(snap, START, LENGTH).replay()
        for b in HOME:
            kind, content = self.state[b]
            if b in self.r_data:
                content = self.r_data[b]
            elif kind == FREE:
                continue
            assert snap.read(b) == content, f"block {b} ({kind}) after a clean stop"
        assert self.j.checkpoint_pending() <= {b for b in HOME if self.state[b][0] == META}
        st = self.j.stats()
        assert 0 <= st["log_used"] <= st["log_size"] == LENGTH - 1


_CRASHED = object()

_block = st.sampled_from(HOME)
OPS = st.lists(st.one_of(
    st.tuples(st.just("add"), _block, st.booleans()),
    st.tuples(st.just("add"), _block, st.booleans()),
    st.tuples(st.just("mutate"), _block),
    st.tuples(st.just("revoke"), _block),
    st.tuples(st.just("write_data"), _block),
    st.just(("commit",)),
    st.just(("commit",)),
    st.just(("checkpoint",)),
    st.just(("close_and_reopen",)),
), min_size=20, max_size=80)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, cut=st.integers(1, 150), seed=st.integers(0, 2**32 - 1))
def test_power_cut_at_a_random_write(ops, cut, seed):
    h = Harness(seed)
    h.dev.cut_after(cut)
    for op in ops:
        h.run(op)
    h.power_off()


def test_power_cut_at_every_write_of_a_fixed_workload():
    """Deterministic sweep: the same workload cut at each write/flush in turn."""
    ops = [("add", b, b % 2 == 0) for b in HOME] + [("commit",)]
    n = len(HOME)
    for i in range(10):
        a, c, r = HOME[i % n], HOME[(i + 3) % n], HOME[(i + 5) % n]
        ops += [("add", a, False), ("add", c, True), ("mutate", c), ("revoke", r)]
        if i % 2:
            ops.append(("checkpoint",))    # while the free is not committed yet
        ops += [("commit",), ("write_data", r), ("add", HOME[(i + 1) % n], False),
                ("commit",)]
        if i % 3 == 2:
            ops.append(("checkpoint",))
    total = Harness(0)
    armed_at = total.dev.events
    for op in ops:
        total.run(op)
    events = total.dev.events - armed_at
    assert events > 60
    for cut in range(1, events + 1):
        for seed in range(3):
            h = Harness(seed)
            h.dev.cut_after(cut)
            for op in ops:
                h.run(op)
            assert h.crashes == 1
            h.power_off()


class JournalMachine(RuleBasedStateMachine):
    """The journal and the model side by side; power cuts armed at random."""

    @initialize(seed=st.integers(0, 2**32 - 1))
    def start(self, seed):
        self.h = Harness(seed)

    @rule(b=_block, as_object=st.booleans())
    def add(self, b, as_object):
        self.h.add(b, as_object)

    @rule(b=_block)
    def mutate(self, b):
        self.h.mutate(b)

    @rule(b=_block)
    def revoke(self, b):
        self.h.revoke(b)

    @rule(b=_block)
    def write_data(self, b):
        self.h.write_data(b)

    @rule()
    def commit(self):
        self.h.commit()

    @rule()
    def checkpoint(self):
        self.h.checkpoint()

    @rule()
    def close_and_reopen(self):
        self.h.close_and_reopen()

    @rule(n=st.integers(1, 12))
    def arm_power_cut(self, n):
        note(f"power cut armed: event {n} from now")
        self.h.dev.cut_after(n)

    @precondition(lambda self: self.h.dev.cut_at is None)
    @rule()
    def power_off_between_operations(self):
        self.h.power_off()

    @invariant()
    def clean_stop_replays_to_the_committed_state(self):
        self.h.check_clean_stop()


TestJournalMachine = JournalMachine.TestCase
TestJournalMachine.settings = settings(max_examples=60, stateful_step_count=50,
                                       deadline=None,
                                       suppress_health_check=[HealthCheck.too_slow])
