"""The delta-lease master election (lockmgr.election) under trio's autojump clock.

The shared "disk" is one record in memory.  Each candidate reaches it through its own
``Port``, where every read and write follows an ``Io`` the test chooses: the caller's
task may stall before the I/O is issued (a pause between the algorithm's clock reading or
validity check and its I/O) or after it returned (a pause before the algorithm sees the
result); the I/O itself takes ``delay``, a write lands and a read samples at ``at`` of
the way through it.  The hypothesis test drives 2-4 candidates through chaos (pauses,
slow I/O, step-downs, deaths), then calm, and checks that no two candidates are ever
``valid()`` at the same instant and that someone holds the lease once things are calm.
"""

import math
from dataclasses import dataclass, field, replace

import pytest
import trio
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from hypothesis import target

from lockmgr.election import FREE, DeltaLease, LeaseRecord, LeaseTimings
from tests.lockmgr.lockmgr_testutil import autojump

T = LeaseTimings()
GHOST = LeaseRecord(99, 5, 7, "ghost", "ghost:1", 0, 0, round(T.expire * 1000))


def now() -> float:
    return trio.current_time()


# ---- the adversarial shared disk ------------------------------------------------------

@dataclass(frozen=True)
class Io:
    """How one read or write goes (seconds)."""

    delay: float = 0.01     # issue -> return
    at: float = 0.5         # the fraction of delay after which it lands / samples
    pause: float = 0.0      # the caller stalls this long before the I/O is issued
    after: float = 0.0      # ... or this long after it returned
    error: bool = False     # the I/O fails with OSError (a write may still land)


class Disk:
    """The one shared record, and every write that landed: (time, writer, record)."""

    def __init__(self, value: LeaseRecord | None):
        self.value = value
        self.landed: list[tuple[float, int, LeaseRecord]] = []


class Port:
    """One candidate's view of the disk (a ``LeaseStore``).

    ``plan(kind)`` gives the ``Io`` of each operation; ``queued`` lists ``Io`` used
    first, in order, for the next operations (unit tests use it to place a stall)."""

    def __init__(self, disk: Disk, who: int, plan=None):
        self.disk = disk
        self.who = who
        self.plan = plan or (lambda kind: Io())
        self.queued: list[Io] = []
        self.calls: list[tuple[str, float]] = []    # (kind, time the algorithm called)
        self.on_write = None                        # a check run as a write is called

    async def _io(self, kind: str, rec: LeaseRecord | None):
        self.calls.append((kind, now()))
        if kind == "write" and self.on_write is not None:
            self.on_write(rec)
        io = self.queued.pop(0) if self.queued else self.plan(kind)
        if io.pause:
            await trio.sleep(io.pause)
        await trio.sleep(io.delay * io.at)
        if kind == "read":
            value = self.disk.value
        else:
            self.disk.value = rec
            self.disk.landed.append((now(), self.who, rec))
        if io.delay * (1 - io.at) + io.after:
            await trio.sleep(io.delay * (1 - io.at) + io.after)
        if io.error:
            raise OSError(5, "injected I/O error")
        return value if kind == "read" else None

    async def read(self) -> LeaseRecord | None:
        return await self._io("read", None)

    async def write(self, rec: LeaseRecord) -> None:
        await self._io("write", rec)

    def writes(self) -> list[float]:
        return [t for kind, t in self.calls if kind == "write"]


def lease(disk: Disk, me: int, plan=None, timings: LeaseTimings = T, cls=DeltaLease):
    """A candidate with its own port; the wall clock is constant so that only the
    algorithm's own fields make records unique."""
    port = Port(disk, me, plan)
    return cls(port, me, f"n{me}", f"h{me}:7000", timings, wall=lambda: 0), port


# ---- timings ----------------------------------------------------------------------------

def test_timings_validation():
    assert LeaseTimings() == LeaseTimings(0.3, 1.2, 1.6, 0.15, 0.4)
    LeaseTimings(renew=0.03, valid=0.12, expire=0.16, io_bound=0.015, settle=0.04)  # scaled
    for bad in [dict(expire=1.2), dict(expire=1.0),          # valid < expire
                dict(settle=0.29),                           # settle >= 2 io_bound
                dict(renew=0.8),                             # renew + 3 io_bound < valid
                dict(settle=0.6),                            # settle + 4 io_bound < valid
                dict(renew=0), dict(valid=-1), dict(io_bound=math.nan),
                dict(expire=math.inf), dict(settle="0.4"), dict(renew=True)]:
        with pytest.raises(ValueError):
            LeaseTimings(**bad)


def test_free_record_and_candidate_id():
    assert LeaseRecord.free().is_free and LeaseRecord.free().owner == FREE
    assert not GHOST.is_free
    with pytest.raises(ValueError):
        DeltaLease(Port(Disk(None), 0), -1, "n", "a")


# ---- acquisition ------------------------------------------------------------------------

@autojump
async def test_free_record_taken_at_once():
    disk = Disk(LeaseRecord.free())
    a, port = lease(disk, 3)
    t0 = now()
    assert await a.acquire()
    claim = LeaseRecord(3, 1, 0, "n3", "h3:7000", 0, 0, 1600)
    assert disk.value == claim == a.record and a.generation == 1 and a.valid()
    assert now() - t0 == pytest.approx(0.01 + 0.01 + T.settle + 0.01)  # read, write, verify
    assert a.deadline == pytest.approx(port.writes()[0] + T.valid)
    assert await a.read_current() == claim


@pytest.mark.parametrize("initial, wait", [(GHOST, T.expire), (None, T.expire),
                                           (replace(GHOST, expire_ms=3000), 3.0)])
@autojump
async def test_held_record_waits_expire(initial, wait):
    disk = Disk(initial)
    a, port = lease(disk, 1)
    t0 = now()
    assert await a.acquire()
    first_read_returned = t0 + 0.01
    claim_issued = port.writes()[0]
    # the last read before the claim was issued at or after the wait had passed
    last_read = max(t for kind, t in port.calls if kind == "read" and t < claim_issued)
    assert last_read >= first_read_returned + wait
    assert claim_issued < first_read_returned + wait + T.renew / 2 + 0.05
    assert a.generation == (initial.generation + 1 if initial else 0)
    assert disk.value.owner == 1


@autojump
async def test_the_wait_counts_only_reads_issued_after_it():
    """The read that spans the end of the wait (issued before, returned after) proves
    nothing about the moments after its sample: the holder renewed meanwhile, so one
    more read is needed, which sees the renewal and restarts the wait."""
    disk = Disk(GHOST)
    slow = Io(delay=0.3, at=0.0)
    a, port = lease(disk, 1, lambda kind: slow if 1.45 < now() < 1.6 else Io())

    async def ghost_renews():
        await trio.sleep(1.7)
        disk.value = replace(GHOST, counter=GHOST.counter + 1)

    async with trio.open_nursery() as n:
        n.start_soon(ghost_renews)
        assert await a.acquire()
    assert port.writes()[0] >= 1.7 + T.expire
    assert a.generation == GHOST.generation + 1


@autojump
async def test_acquire_gives_up_on_request():
    a, port = lease(Disk(GHOST), 1)
    assert not await a.acquire(give_up_after=1.0)
    assert 1.0 <= now() < 1.2 and not port.writes() and not a.valid()


@autojump
async def test_renewing_holder_is_never_taken():
    disk = Disk(GHOST)
    h, _ = lease(disk, 0)
    c, cport = lease(disk, 1)
    assert await h.acquire()
    async with trio.open_nursery() as n:
        n.start_soon(h.hold)
        assert not await c.acquire(give_up_after=20)
        assert h.valid() and not cport.writes()
        h.step_down()
    assert not h.valid() and h.record is None


@given(delays=st.lists(st.tuples(st.floats(0, 0.07), st.floats(0, 0.07), st.floats(0, 1),
                                 st.floats(0, 0.3)), min_size=2, max_size=4),
       initial=st.sampled_from([LeaseRecord.free(), GHOST, None]))
@settings(max_examples=60, deadline=None)
def test_competing_acquirers_exactly_one(delays, initial):
    """Candidates start nearly together, I/O within bounds; each makes one attempt
    (giving up after 5 s) and a winner goes on holding: exactly one wins."""
    @autojump
    async def main():
        disk = Disk(initial)
        results = {}
        cands = []
        for i, (rd, wd, at, start) in enumerate(delays):
            plan = (lambda rd, wd, at: lambda kind: Io(rd if kind == "read" else wd, at))(
                rd, wd, at)
            cands.append((start, lease(disk, i, plan)[0]))

        async def one(start, cand):
            await trio.sleep(start)
            results[cand.me] = await cand.acquire(give_up_after=5.0)
            if results[cand.me]:
                await cand.hold()

        with trio.move_on_after(8.0):
            async with trio.open_nursery() as n:
                for c in cands:
                    n.start_soon(one, *c)
        winners = [me for me, ok in results.items() if ok]
        assert len(winners) == 1, results
        assert cands[winners[0]][1].valid()
        winner = cands[winners[0]][1]
        assert (disk.value.owner, disk.value.generation) == (winner.me, winner.generation)
    main()


@autojump
async def test_slow_claim_is_abandoned_but_stands():
    disk = Disk(LeaseRecord.free())
    a, port = lease(disk, 2)
    port.queued = [Io(), Io(delay=T.io_bound)]
    assert not await a.acquire()
    assert disk.value.owner == 2 and not a.valid() and a.record is None
    assert len(port.writes()) == 1                  # no verify, no second write
    b, port = lease(Disk(LeaseRecord.free()), 3)
    port.queued = [Io(pause=T.io_bound - 0.01)]     # stalled after taking the time, before
    assert not await b.acquire()                    # the read was issued: the same


@autojump
async def test_lost_race_and_io_errors():
    disk = Disk(LeaseRecord.free())
    a, aport = lease(disk, 0)
    b, _ = lease(disk, 1)
    aport.queued = [Io(), Io(), Io(pause=0.2)]      # a's verify is late: b's claim is there
    async with trio.open_nursery() as n:
        n.start_soon(a.acquire)
        await trio.sleep(0.05)
        assert await b.acquire()
    assert not a.valid() and b.valid()
    c, cport = lease(Disk(LeaseRecord.free()), 2)
    cport.queued = [Io(error=True)]
    assert not await c.acquire()
    cport.queued = [Io(), Io(error=True)]
    assert not await c.acquire()
    assert await c.acquire()
    cport.queued = [Io(error=True)]
    assert not await c.renew() and not c.valid()


@autojump
async def test_claims_never_repeat_a_generation():
    """An abandoned claim, then a late write moving the block's generation back: the
    next claim takes a generation above every one this candidate wrote, so no record is
    ever written twice (an observer could not tell the repeat from 'unchanged')."""
    disk = Disk(GHOST)
    a, port = lease(disk, 1)
    port.queued = [Io()] * 12 + [Io(delay=1.0)]     # the claim write is too slow
    assert not await a.acquire()
    assert disk.value.generation == GHOST.generation + 1
    disk.value = replace(GHOST, counter=8)      # the ghost's late renewal
    assert await a.acquire()
    assert a.generation == GHOST.generation + 2


# ---- renewal, pauses, step-down ---------------------------------------------------------

@autojump
async def test_renew_moves_deadline_from_write_issue():
    a, port = lease(Disk(LeaseRecord.free()), 0)
    assert await a.acquire()
    port.queued = [Io(pause=0.2), Io(pause=0.1, delay=0.3)]
    assert await a.renew()
    issued = port.writes()[-1]
    assert a.deadline == pytest.approx(issued + T.valid) and a.record.counter == 1


@autojump
async def test_renewal_write_returning_late_is_lost():
    disk = Disk(LeaseRecord.free())
    a, port = lease(disk, 0)
    assert await a.acquire()
    deadline = a.deadline
    port.queued = [Io(), Io(delay=deadline - now())]   # returns exactly at the deadline
    assert not await a.renew()
    assert not a.valid() and a.deadline is None and a.record is None
    assert disk.value.counter == 1                  # it landed all the same
    n = len(port.calls)
    assert not await a.renew() and not await a.renew()
    assert len(port.calls) == n                     # nothing more for this holding


@pytest.mark.parametrize("where", ["before renew", "during the read",
                                   "between the check and the write"])
@autojump
async def test_paused_holder_steps_down(where):
    """The holder stalls past its deadline; a successor takes over; the holder wakes:
    renew() returns False.  When the stall ended before its write was issued it wrote
    nothing; a stall inside the write makes a write that returns late (not counted)."""
    disk = Disk(LeaseRecord.free())
    old, oport = lease(disk, 0)
    new, _ = lease(disk, 1)
    assert await old.acquire()
    stall = 5.0
    oport.queued = {"before renew": [],
                    "during the read": [Io(delay=stall, at=0.0)],
                    "between the check and the write": [Io(), Io(pause=stall)]}[where]
    result = {}

    async def old_holder():
        if where == "before renew":
            await trio.sleep(stall)
        result["renew"] = await old.renew()
        result["valid"] = old.valid()

    async with trio.open_nursery() as n:
        n.start_soon(old_holder)
        await trio.sleep(0.1)
        assert await new.acquire()
        assert not old.valid()
        successor = new.record
    assert result == {"renew": False, "valid": False}
    if where == "between the check and the write":
        # the late write landed over the successor's claim; the successor finds out
        assert disk.value.owner == 0 and not await new.renew()
    else:
        assert disk.value == successor and len(oport.writes()) == 1   # only its claim


@autojump
async def test_hold_renews_and_step_down_writes_nothing():
    disk = Disk(LeaseRecord.free())
    a, port = lease(disk, 0)
    assert await a.acquire()
    async with trio.open_nursery() as n:
        await n.start(a.hold)
        await trio.sleep(3.0)
        assert a.valid() and a.record.counter >= 9
        writes = len(port.writes())
        a.step_down()
    assert not a.valid() and len(port.writes()) == writes
    b, _ = lease(disk, 1)
    t0 = now()
    assert await b.acquire() and now() - t0 >= T.expire   # still waits the expiry


@autojump
async def test_hold_returns_when_lost():
    disk = Disk(LeaseRecord.free())
    a, _ = lease(disk, 0)
    assert await a.acquire()
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(a.hold)
            await trio.sleep(1.0)
            disk.value = GHOST                       # someone else's record
    assert not a.valid()


# ---- the schedule-driven invariant ------------------------------------------------------

CALM = 12.0                  # chaos before, calm I/O and no step-downs after
SETTLED = CALM + 14.0        # someone must hold by then (> max stall + expiry + retry)


@dataclass
class Holding:
    me: int
    claim: float            # when its claim write was issued
    start: float            # when acquire() returned True
    deadline: float         # the last deadline it reached


class World:
    """The candidates, their holdings, and the checks.

    At every acquisition and renewal (and every 250 ms): nobody else is ``valid()``.
    Validity only begins when ``acquire`` returns True, so this sees every overlap.
    At the end, part (2) of the module's argument: a holding's claim was issued at least
    ``expire - valid`` after the final deadline of every holding that began before it;
    ``margins`` keeps the slack, which hypothesis is asked to minimise.
    """

    def __init__(self):
        self.leases: list[DeltaLease] = []
        self.violations: list[str] = []
        self.holdings: list[Holding] = []
        self.current: dict[int, Holding] = {}
        self.final: list[int] = []              # who is valid at SETTLED

    def check(self, who: int, what: str):
        valid = [c.me for c in self.leases if c.valid()]
        if len(valid) > 1:
            self.violations.append(f"t={now():.4f} after {who}'s {what}: valid {valid}")
        if what == "acquire":
            c = self.leases[who]
            claim = c.store.writes()[-1]           # as the port saw it, not the lease
            self.current[who] = Holding(who, claim, now(), c.deadline)
            self.holdings.append(self.current[who])
        elif what == "renew":
            self.current[who].deadline = self.leases[who].deadline

    def margins(self) -> list[float]:
        out = []
        for i, h in enumerate(self.holdings):
            for later in self.holdings[i + 1:]:
                margin = later.claim - (h.deadline + T.expire - T.valid)
                out.append(margin)
                if margin < -1e-9:
                    self.violations.append(
                        f"{later.me} claimed at t={later.claim:.4f}, {-margin:.4f} s too "
                        f"early after {h.me}'s deadline {h.deadline:.4f}")
        return out


class Watched(DeltaLease):
    world: World

    async def acquire(self, give_up_after=None):
        ok = await super().acquire(give_up_after)
        if ok:
            self.world.check(self.me, "acquire")
        return ok

    async def renew(self):
        ok = await super().renew()
        if ok:
            self.world.check(self.me, "renew")
        return ok


AT = st.sampled_from([0.0, 1.0]) | st.floats(0, 1)   # where in the I/O it takes effect
calm_io = st.builds(Io, delay=st.floats(0, 0.07), at=AT)
slow_io = st.builds(Io, delay=st.floats(0.1, 3.0), at=AT)
paused_io = (st.builds(Io, delay=st.floats(0, 0.07), at=AT, pause=st.floats(0.1, 3.0))
             | st.builds(Io, delay=st.floats(0, 0.07), at=AT, after=st.floats(0.1, 3.0)))
failed_io = st.builds(Io, delay=st.floats(0, 1.0), at=AT, error=st.just(True))
death_io = (st.builds(Io, delay=st.floats(0, 0.07), at=AT, pause=st.just(math.inf))
            | st.builds(Io, delay=st.floats(0, 3.0), at=AT, after=st.just(math.inf)))
wild_io = st.one_of(slow_io, paused_io, failed_io, death_io)


@dataclass
class Script:
    """One candidate's behaviour; its n-th I/O is ``wild[n]`` if there is one, else
    calm (chaos must leave room for holdings, or there is nothing to check)."""

    calm: list[Io]
    wild: dict[int, Io]                 # slow, paused, failed, or the last (death)
    start: float
    holds: list[float | None]           # step down after this long; None: until lost
    gap: float                          # wait before retrying
    n: int = field(default=0)

    def io(self, kind):
        self.n += 1
        if now() >= CALM:
            return Io(delay=0.02)
        return self.wild.get(self.n, self.calm[self.n % len(self.calm)])


scripts = st.builds(Script,
                    calm=st.lists(calm_io, min_size=1, max_size=5),
                    wild=st.dictionaries(st.integers(0, 100), wild_io, min_size=1,
                                         max_size=16),   # among ~80 I/Os before CALM
                    start=st.floats(0, 3.0),
                    holds=st.lists(st.none() | st.floats(0, 4.0), min_size=1, max_size=4),
                    gap=st.floats(0.01, 1.0))


async def run_candidate(c: Watched, s: Script):
    """Acquire, hold (stepping down after a while, before CALM), retry."""
    await trio.sleep(s.start)
    held = 0
    while True:
        if await c.acquire():
            hold_for = s.holds[held % len(s.holds)]
            held += 1
            async with trio.open_nursery() as n:
                async def step_down_later():
                    await trio.sleep(hold_for)
                    if now() < CALM:
                        c.step_down()
                if hold_for is not None:
                    n.start_soon(step_down_later)
                await c.hold()
                n.cancel_scope.cancel()
        await trio.sleep(s.gap)


def simulate(scripts: list[Script], initial: LeaseRecord | None) -> World:
    """Run the candidates through chaos until CALM, then calm until SETTLED."""
    world = World()

    @autojump
    async def main():
        disk = Disk(initial)
        for i, s in enumerate(scripts):
            c, port = lease(disk, i, s.io, cls=Watched)
            c.world = world

            def on_write(rec, c=c):
                if rec.counter > 0 and not c.valid():
                    world.violations.append(f"t={now():.4f} {c.me} renews while invalid")
            port.on_write = on_write
            world.leases.append(c)

        async def sampler():                        # between the event checks, too
            while True:
                world.check(-1, "sample")
                await trio.sleep(0.25)

        async with trio.open_nursery() as n:
            n.start_soon(sampler)
            for c, s in zip(world.leases, scripts):
                n.start_soon(run_candidate, c, s)
            await trio.sleep_until(SETTLED)
            world.final = [c.me for c in world.leases if c.valid()]
            n.cancel_scope.cancel()

    main()
    return world


def one_survivor(scripts: list[Script]) -> list[Script]:
    """The first candidate never dies, so someone can hold once things are calm."""
    alive = {n: io for n, io in scripts[0].wild.items()
             if math.inf not in (io.pause, io.after)}
    return [replace(scripts[0], wild=alive)] + scripts[1:]


@given(scripts=st.lists(scripts, min_size=2, max_size=4).map(one_survivor),
       initial=st.sampled_from([LeaseRecord.free(), GHOST, None]))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_never_two_valid_and_someone_holds_when_calm(scripts, initial):
    """12 s of chaos, then calm: safety throughout, and someone holds at the end."""
    world = simulate(scripts, initial)
    margins = world.margins()
    note(f"holdings: {world.holdings}")
    event(f"distinct holders: {min(len({h.me for h in world.holdings}), 3)}")
    if margins:
        target(-min(margins), label="closest takeover")
    assert not world.violations, world.violations[:5]
    assert len(world.final) == 1, f"nobody holds at t={SETTLED} after calm from t={CALM}"

