"""Master election: a delta lease on one shared block, with plain reads and writes.

The algorithm of Chockler and Malkhi ("Light-weight leases for storage-centric
coordination") as sanlock's delta leases use it.  The caller gives a ``LeaseStore``
(one record on the shared volume); this module knows nothing of the volume's format.
Every time below is trio's clock (``trio.current_time()``); wall-clock fields in the
record are informational only.

Protocol (``DeltaLease``; constants in ``LeaseTimings``):

* acquire: read the record.  FREE: claim at once.  Held, or unreadable (``None``): re-read
  every ``renew / 2``; a read returning a value different from the previous one restarts
  the observation at the instant that read *returned* (``f``).  Claim once a read *issued*
  at or after ``f + E`` (``E = max(expire, record.expire_ms / 1000)``) still shows the
  value.  The claim is ``(owner=me, generation=g+1, counter=0)``.  If the claim write
  returned ``io_bound`` or more after that last read was issued, give up (the claim
  stands; we just do not hold).  Sleep ``settle``, read: hold only if the record is
  exactly the claim.  The deadline is ``w + valid``, ``w`` the instant just before the
  claim write was issued.
* renew: if not ``valid()``: lost.  Read; not exactly our record: lost.  Write
  ``counter + 1``; if that write returned at or after the deadline: lost; else the
  deadline becomes ``w + valid``, ``w`` the instant just before the write was issued.
  Lost is final for the holding: no further write.
* ``valid()``: held and ``now < deadline``.  The holder acts (grants, writes) only right
  after ``valid()`` said yes, with no wait in between.

Assumptions.  (A1) Writes are atomic and a write that returned has landed: it took
effect at one instant between its issue and its return.  (A2) A read returns the value
at one instant between its issue and its return (never older than its issue).  (A3) Every
record is written at most once (unique): records of different candidates differ in
``owner``; one candidate's renewals differ in ``counter``, and its claims in
``generation``, which is ``max(observed, highest it ever claimed) + 1`` (the second term
only matters when late writes moved the block's generation back); across a restart the
wall-clock ``acquired_ns`` differs.  FREE and ``None`` are never written (mkfs writes FREE
once; the record fits one atomically written sector).  (A4) All members share one
``LeaseTimings`` table and their clocks advance at rates within
``(expire - valid) / expire`` of each other, so an ``expire`` measured by one member is
longer than a ``valid`` measured by another, and a ``settle`` longer than an ``io_bound``.

Lemma (no ABA).  By A3 a value, once overwritten, never comes back.  So if two reads
sampled the same value at instants ``s1 < s2``, no write landed in ``(s1, s2]``.

(1) Racing claims.  Let A and B both end ``acquire`` holding, A's claim ``W0`` having
landed first (at ``l0``, returned at ``w0'``).  A's verify read, issued at
``>= w0' + settle``, sampled ``W0`` at some ``sA``: nothing landed in ``(l0, sA]``, so B's
claim landed after ``sA``.  B's last read was issued less than ``io_bound`` before B's
claim returned, hence after ``sA - io_bound >= w0' + settle - io_bound >= l0``: a
competitor whose write lands after my verify read issued its last read after my claim had
landed, so it saw my claim or a later record, never the value it waited on before
(lemma), and restarted its wait.  (2) then bounds when B can hold at all.  ``settle >=
2 * io_bound`` leaves room for settle and io_bound being measured on different clocks.
(A FREE record is claimed without waiting, but B cannot sample FREE after ``l0``.)

(2) Nobody else holds before ``D + (expire - valid)``, ``D`` the holder's final deadline.
Let A hold, with writes ``W0, W1, ...`` (``Wi`` issued at ``wi``, landed at ``li``); let B
claim after seeing ``Z`` from a first sample ``sf`` to a last sample ``sB`` issued at
``>= sf + E >= sf + expire``.  By (1) ``sB > l0``, and by the lemma nothing landed in
``(sf, sB]``, so ``l0 <= sf``.  Let ``Wj`` be A's last write landed at or before ``sf``.
``W(j+1)``, if A ever issues it, lands after ``sB >= sf + expire >= wj + expire`` and so
returns after ``wj + valid``, at or after A's deadline then: it is not counted, and A's
final deadline is at most ``wj + valid``.  B holds only after ``sB``, later than
``wj + expire >= D + (expire - valid)``.  A renewal not counted may still have landed,
even over a successor's record: the successor then fails its verify or its next renewal
and loses the lease (liveness, not safety).  So of any two holdings, the one whose
claim landed later begins after the other's final deadline (plus ``expire - valid``):
no two candidates are ever ``valid()`` at the same instant.

(3) A paused holder (SIGSTOP, an I/O stall) wakes and calls ``valid()`` before acting:
past its deadline it is not valid, whatever happened meanwhile, so it steps down.  When
the pause fell inside ``renew``, between the ``valid()`` check and the write, the write
returns after the deadline and is not counted (the late write is harmless, see (2)).
A pause cannot extend a deadline: a deadline only comes from a write that returned
before the previous deadline, and it counts from that write's issue.

Liveness (not safety): with every read and write under ``io_bound``, the holder renews
before its deadline (``renew + 3 io_bound < valid``, ``settle + 4 io_bound < valid``) and,
once the record stops changing, a waiting candidate holds within about
``expire + renew / 2 + settle + 3 io_bound``; of simultaneous claimants the last to land
wins.  ``hold`` renews at once, then every ``renew``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Callable, Protocol

import trio

FREE = -1  # owner of a record nobody holds (a fresh volume)


@dataclass(frozen=True)
class LeaseTimings:
    """The election's constants, in seconds (one table for every member).

    Attributes:
        renew: the holder rewrites the record this often.
        valid: the holder acts only until ``valid`` after it issued its last renewal
            write that returned in time.
        expire: a candidate takes over after seeing the record unchanged this long
            (must exceed ``valid`` plus the clock-rate margin).
        io_bound: a candidate's last read issued -> its claim write returned must take
            less than this, else the attempt is abandoned.
        settle: after its claim write a candidate waits this long, then reads again
            (at least ``2 * io_bound``).

    Raises:
        ValueError: a constant is not a positive finite number, or an inequality of the
            module docstring does not hold.
    """

    renew: float = 0.3
    valid: float = 1.2
    expire: float = 1.6
    io_bound: float = 0.15
    settle: float = 0.4

    def __post_init__(self):
        for name in ("renew", "valid", "expire", "io_bound", "settle"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) \
                    or not math.isfinite(v) or v <= 0:
                raise ValueError(f"lease timing {name} must be a positive number: {v!r}")
        rules = [
            (self.valid < self.expire, "valid < expire"),
            (self.settle >= 2 * self.io_bound, "settle >= 2 * io_bound"),
            (self.renew + 3 * self.io_bound < self.valid, "renew + 3 * io_bound < valid"),
            (self.settle + 4 * self.io_bound < self.valid, "settle + 4 * io_bound < valid"),
        ]
        for ok, text in rules:
            if not ok:
                raise ValueError(f"lease timings break {text}: {self}")


@dataclass(frozen=True)
class LeaseRecord:
    """The lease block's content.

    Attributes:
        owner: the holder's candidate id (e.g. a node slot); FREE: nobody.
        generation: +1 on every acquisition (the election generation).
        counter: +1 on every renewal; 0 at acquisition.
        node: the holder's name.
        addr: where the holder serves (``host:port``).
        acquired_ns: wall clock (``time.time_ns``) of the acquisition (informational).
        renewed_ns: wall clock of the last renewal (informational).
        expire_ms: the holder's ``expire``; a candidate waits max(its own, this).
    """

    owner: int
    generation: int
    counter: int
    node: str
    addr: str
    acquired_ns: int
    renewed_ns: int
    expire_ms: int

    @classmethod
    def free(cls) -> LeaseRecord:
        """The record of a fresh volume (what mkfs writes)."""
        return cls(FREE, 0, 0, "", "", 0, 0, 0)

    @property
    def is_free(self) -> bool:
        """True when nobody holds this record."""
        return self.owner == FREE


class LeaseStore(Protocol):
    """The shared block, provided by the caller."""

    async def read(self) -> LeaseRecord | None:
        """The record, or None when the block is unreadable or corrupt.

        Raises ``OSError`` on an I/O error."""

    async def write(self, rec: LeaseRecord) -> None:
        """Write ``rec``; return once it landed (visible to every later read)."""


def _now() -> float:
    return trio.current_time()


class DeltaLease:
    """One candidate's view of the lease: acquire, renew, hold, step down.

    Args:
        store: the shared block.
        me: this candidate's id (>= 0), unique in the cluster.
        node: this candidate's name, written in the record.
        addr: where this candidate serves when master, written in the record.
        timings: the constants (the same for every member).
        wall: the wall clock for the informational fields (nanoseconds).

    Not reentrant: one task calls ``acquire``, ``renew`` or ``hold`` at a time;
    ``valid``, ``step_down`` and the properties may be used from anywhere.
    """

    def __init__(self, store: LeaseStore, me: int, node: str, addr: str,
                 timings: LeaseTimings | None = None, *,
                 wall: Callable[[], int] = time.time_ns):
        if me < 0:
            raise ValueError(f"candidate id must be >= 0, not {me}")
        self.store = store
        self.me = me
        self.node = node
        self.addr = addr
        self.timings = timings or LeaseTimings()
        self._wall = wall
        self._record: LeaseRecord | None = None
        self._deadline: float | None = None
        self._generation: int | None = None
        self._top_generation = -1     # highest generation this candidate ever claimed
        self._holding = 0             # bumped on every acquisition and every loss
        self._nap: trio.CancelScope | None = None

    @property
    def deadline(self) -> float | None:
        """The trio time until which we may act, or None when not holding."""
        return self._deadline

    @property
    def generation(self) -> int | None:
        """The election generation of the current (or last) holding; None before any."""
        return self._generation

    @property
    def record(self) -> LeaseRecord | None:
        """The record we hold (the last one we wrote), or None when not holding."""
        return self._record

    def valid(self) -> bool:
        """True when we hold the lease and its deadline has not passed: we may act."""
        return self._deadline is not None and _now() < self._deadline

    def step_down(self) -> None:
        """Stop holding now, without writing.

        A release write ("FREE", or an expired record) would let a successor take over
        at once instead of after ``expire``; but that write could be delayed or paused
        and land after the lease has already passed to a successor, over the
        successor's record, which is exactly the clobbering the timing argument rules
        out for counted writes.  So nothing is written: the others take over after
        ``expire`` as for a dead holder.
        """
        self._lose()

    def _lose(self) -> None:
        self._record = None
        self._deadline = None
        self._holding += 1
        if self._nap is not None:
            self._nap.cancel()

    async def read_current(self) -> LeaseRecord | None:
        """The record as it is now (for members that only want the master's address).

        Raises:
            OSError: from the store.
        """
        return await self.store.read()

    async def acquire(self, give_up_after: float | None = None) -> bool:
        """One attempt to take the lease (see the module docstring).

        Args:
            give_up_after: stop watching a held record after this many seconds.

        Returns:
            True when we hold the lease (``valid()``); False when the attempt was given
            up, abandoned (a slow claim, a lost race, an I/O error) or its deadline
            passed before it finished.
        """
        if self.valid():
            return True
        self._lose()
        t = self.timings
        start = _now()
        try:
            issued = _now()
            seen = await self.store.read()
            since = _now()                  # when the read that first showed it returned
            while seen is None or not seen.is_free:
                wait = t.expire if seen is None else max(t.expire, seen.expire_ms / 1000)
                if issued >= since + wait:
                    break                   # a read issued after the wait still shows it
                if give_up_after is not None and _now() - start >= give_up_after:
                    return False
                await trio.sleep_until(min(_now() + t.renew / 2, since + wait))
                issued = _now()
                rec = await self.store.read()
                if rec != seen:
                    seen, since = rec, _now()
            gen = max(-1 if seen is None else seen.generation, self._top_generation) + 1
            self._top_generation = gen
            ns = self._wall()
            claim = LeaseRecord(self.me, gen, 0, self.node, self.addr, ns, ns,
                                round(t.expire * 1000))
            w = _now()
            await self.store.write(claim)
            if _now() - issued >= t.io_bound:
                return False                # too slow: a competitor may not have seen it
            await trio.sleep(t.settle)
            if await self.store.read() != claim:
                return False
        except OSError:
            return False
        if _now() >= w + t.valid:
            return False
        self._record, self._deadline, self._generation = claim, w + t.valid, gen
        self._holding += 1
        return True

    async def renew(self) -> bool:
        """Renew the lease once.

        Returns:
            True when renewed (the deadline moved); False when the lease is lost, which
            is final: the caller must stop acting, and nothing more is written for this
            holding.
        """
        holding = self._holding
        if not self.valid():
            self._lose()
            return False
        try:
            rec = await self.store.read()
            if holding != self._holding:
                return False                # stepped down meanwhile
            if rec != self._record or not self.valid():
                self._lose()
                return False
            new = replace(rec, counter=rec.counter + 1, renewed_ns=self._wall())
            w = _now()
            await self.store.write(new)
        except OSError:
            if holding == self._holding:
                self._lose()
            return False
        if holding != self._holding:
            return False
        if _now() >= self._deadline:
            self._lose()                    # it may have overwritten a successor's claim
            return False
        self._record, self._deadline = new, w + self.timings.valid
        return True

    async def hold(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Renew every ``timings.renew`` (the first time at once) until the lease is lost
        or ``step_down`` is called; then return."""
        holding = self._holding
        task_status.started()
        while holding == self._holding:
            due = _now() + self.timings.renew
            if not await self.renew():
                return
            try:
                with trio.CancelScope(deadline=due) as self._nap:
                    await trio.sleep_forever()
            finally:
                self._nap = None
