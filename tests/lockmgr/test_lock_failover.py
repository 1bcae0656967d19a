"""What a lock server elected as master needs, over in-memory streams under the
autojump clock: a server that stops acting the instant its lease says so, a grace
period that ends when every expected member is back, dead members declared from
outside, recovery locks served while dead nodes' unknown locks freeze the table, and
clients that follow the master from one server to the next (join wait, silence
detection, handshake time-out, prompt retries)."""

import pytest
import trio
import trio.testing

from lockmgr import EX, NL, PR, ConnectError, LockClient, LockServer
from lockmgr.server import LIVE
from tests.lockmgr.lockmgr_testutil import KEY, autojump

LEASE = 5.0


class Tap(trio.abc.Stream):
    """A stream end that records when bytes were sent through it, and that can be
    made to swallow what it is asked to send (a paused or cut-off peer whose TCP
    connection stays up)."""

    def __init__(self, inner, log: list | None = None):
        self.inner = inner
        self.log = log
        self.mute = False

    async def send_all(self, data):
        if self.log is not None:
            self.log.append((trio.current_time(), bytes(data)))
        if not self.mute:
            await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self):
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes=None):
        return await self.inner.receive_some(max_bytes)

    async def aclose(self):
        if not self.mute:                         # a cut-off peer never sees the close
            await self.inner.aclose()


async def held_back(cl: LockClient, name: bytes, mode) -> None:
    """A try-lock of a frozen name is neither granted nor refused: it waits (the
    server cannot know yet whether a conflicting lock exists).  Cancelled here."""
    with trio.move_on_after(1.0) as scope:
        await cl.lock(name, mode, try_lock=True)
    assert scope.cancelled_caught, f"{name!r}: a try-lock was answered while frozen"
    await trio.sleep(0.1)                         # the cancellation's answer comes back


class Masters:
    """Lock servers started one after another in one nursery, like the masters of
    successive election terms; ``connector`` reaches the current one (``last``
    names it), or fails with ConnectError when there is none."""

    def __init__(self, nursery):
        self.nursery = nursery
        self.current: LockServer | None = None
        self.name = ""
        self.sent: list = []          # (time, frame bytes) every server sent
        self.taps: list[Tap] = []     # the servers' ends of every connection
        self.calls: list[float] = []  # when the connector was called
        self.blackhole = False        # the next connection reaches nothing
        self.done: dict[str, trio.Event] = {}
        self.last = None

    async def start(self, name: str, **kw) -> LockServer:
        kw.setdefault("lease", LEASE)
        server = LockServer(KEY, **kw)
        self.done[name] = trio.Event()

        async def run(task_status=trio.TASK_STATUS_IGNORED):
            try:
                await server.run(task_status=task_status)
            finally:
                self.done[name].set()
        await self.nursery.start(run)
        self.current, self.name = server, name
        return server

    async def __call__(self):
        self.calls.append(trio.current_time())
        if self.blackhole:
            self.blackhole = False
            a, _b = trio.testing.memory_stream_pair()
            self._unserved = _b                  # kept open, never answered
            return a
        server = self.current
        if server is None or server.stopped:
            raise ConnectError("no master")
        self.last = self.name
        a, b = trio.testing.memory_stream_pair()
        tap = Tap(b, self.sent)
        self.taps.append(tap)
        server._nursery.start_soon(server.serve_stream, tap)
        return a

    async def client(self, node: str, slot: int, **kw) -> LockClient:
        kw.setdefault("lease", LEASE)
        return await LockClient.connect("master", KEY, node, slot, nursery=self.nursery,
                                        connector=self, **kw)


@autojump
async def test_a_server_that_may_no_longer_act_sends_nothing_and_stops():
    flip = [float("inf")]
    async with trio.open_nursery() as n:
        m = Masters(n)
        server = await m.start("m1", grace=0,
                               may_act=lambda: trio.current_time() < flip[0])
        a = await m.client("a", 0)
        b = await m.client("b", 1)
        await a.lock(b"x", EX)
        got = []

        async def busy(cl, name):
            # a workload that keeps asking: converts up and down, forever
            while True:
                try:
                    await cl.lock(name, EX)
                    await cl.convert(name, PR)
                    got.append((cl.node, trio.current_time()))
                except Exception:
                    return
                await trio.sleep(0.01)
        n.start_soon(busy, a, b"y")
        n.start_soon(busy, b, b"z")
        n.start_soon(b.lock, b"x", PR)           # waits for a's EX: callbacks go out
        await trio.sleep(1.0)
        assert got and m.sent
        flip[0] = trio.current_time() + 0.0123
        await trio.sleep(1.0)
        # run() returned; not one frame went out at or after the flip
        assert m.done["m1"].is_set() and server.stopped
        late = [t for t, _ in m.sent if t >= flip[0]]
        assert not late, f"{len(late)} frames after the flip"
        assert all(t < flip[0] for _, t in got)
        n.cancel_scope.cancel()


@autojump
async def test_the_housekeeping_of_a_server_that_may_not_act_declares_nobody_dead():
    ok = [True]
    async with trio.open_nursery() as n:
        m = Masters(n)
        server = await m.start("m1", grace=0, may_act=lambda: ok[0])
        a = await m.client("a", 0)
        b = await m.client("b", 1)
        await a.lock(b"x", EX)
        await b.lock(b"y", EX)
        for cl in (a, b):                         # both die: no message comes in
            cl._closed = True
            cl._main_scope.cancel()
        await trio.sleep(1.0)
        ok[0] = False
        sent = len(m.sent)
        await trio.sleep(3 * LEASE)               # their leases would have run out
        assert server.stopped and m.done["m1"].is_set()
        assert [s.state for s in server.sessions.values()] == [LIVE, LIVE]
        assert len(m.sent) == sent
        n.cancel_scope.cancel()


@autojump
async def test_grace_ends_when_every_expected_slot_is_back():
    async with trio.open_nursery() as n:
        m = Masters(n)
        first = await m.start("m1", grace=0)
        a = await m.client("a", 0, silence=1.0)
        b = await m.client("b", 1, silence=1.0)
        await a.lock(b"x", EX)
        await b.lock(b"y", PR)
        first.stop("test: the master lost its lease")
        second = await m.start("m2", grace=LEASE)
        second.expect_slots({0, 1})
        t0 = trio.current_time()
        # a try-lock in the grace period is held back, then decided (not refused:
        # a reclaim might still bring a conflicting lock in)
        tried = []

        async def try_in_grace():
            tried.append(await b.lock(b"t", EX, try_lock=True))
        n.start_soon(try_in_grace)
        while second.in_grace:
            await trio.sleep(0.01)
        assert trio.current_time() - t0 < 1.0     # not the whole grace period
        await trio.sleep(0.1)
        assert [g.mode for g in tried] == [EX]
        assert second.table.lock_of(a.session_id, b"x").granted == EX
        assert (await b.lock(b"w", EX)).mode == EX
        assert a.generation == b.generation == 0

        # without expect_slots the grace period lasts its full length
        second.stop("test")
        third = await m.start("m3", grace=LEASE / 2)
        t0 = trio.current_time()
        await b.lock(b"v", EX)
        assert trio.current_time() - t0 >= LEASE / 2 - 0.1
        assert not third.in_grace
        n.cancel_scope.cancel()


@autojump
async def test_declared_dead_slot_freezes_all_but_recovery_locks_until_recovered():
    async with trio.open_nursery() as n:
        m = Masters(n)
        server = await m.start("m1", grace=0, thaw_prefix=b"J")
        a = await m.client("a", 0)
        server.declare_slot_dead("gone", 2)
        server.declare_slot_dead("gone", 2)       # again: a no-op
        with pytest.raises(ValueError, match="live session"):
            server.declare_slot_dead("a", 0)
        await trio.sleep(0.5)
        assert a.dead_nodes() == {2: "gone"}
        late = await m.client("late", 1)          # joins later: told too
        await trio.sleep(0.5)
        assert late.dead_nodes() == {2: "gone"}
        # its locks are unknown: nothing is granted but the recovery locks
        await held_back(a, b"I7", PR)
        assert (await a.lock(b"J2", EX)).mode == EX
        got = []

        async def want():
            got.append(await late.lock(b"I7", EX))

        async def try_later():                    # decided once the name is served
            got.append(await a.lock(b"I8", PR, try_lock=True))
        n.start_soon(want)
        n.start_soon(try_later)
        await trio.sleep(1.0)
        assert not got
        assert (await late.status())["frozen"]
        assert not got
        await a.report_recovered(2)
        await a.unlock(b"J2")
        await trio.sleep(0.5)
        assert sorted((g.name, g.mode) for g in got) == [(b"I7", EX), (b"I8", PR)]
        assert not a.dead_nodes() and not (await a.status())["frozen"]
        n.cancel_scope.cancel()


@autojump
async def test_declaring_a_missing_member_dead_ends_the_grace_period_too():
    async with trio.open_nursery() as n:
        m = Masters(n)
        await m.start("m1", grace=0)
        a = await m.client("a", 0, silence=1.0)
        await a.lock(b"x", EX)
        m.current.stop("test")
        second = await m.start("m2", grace=3 * LEASE, thaw_prefix=b"J")
        second.expect_slots({0, 1})               # slot 1 never comes back
        await trio.sleep(2.0)
        assert second.in_grace
        second.declare_slot_dead("b", 1)
        await trio.sleep(0.2)
        assert not second.in_grace
        assert (await a.lock(b"J1", EX)).mode == EX
        n.cancel_scope.cancel()


@autojump
async def test_clients_follow_the_master_and_reclaim_everything():
    async with trio.open_nursery() as n:
        m = Masters(n)
        first = await m.start("m1", grace=0)
        a = await m.client("a", 0, silence=1.0)
        b = await m.client("b", 1, silence=1.0)
        gone = await m.client("gone", 2, silence=1.0)
        await a.lock(b"x", EX)
        await a.convert(b"x", EX, lvb=b"v" * 32)
        await gone.lock(b"g", EX)
        got = {}

        async def want(cl, name, mode):
            got[name] = await cl.lock(name, mode)
        n.start_soon(want, b, b"x", PR)           # waits for a's EX, across the failover
        await trio.sleep(0.5)
        gone._closed = True
        gone._main_scope.cancel()                 # dies with the old master
        # the master is cut off: its connections stay up, nothing comes through
        for tap in m.taps:
            tap.mute = True
        first.may_act = lambda: False
        await trio.sleep(0.3)
        second = await m.start("m2", grace=LEASE, thaw_prefix=b"J")
        second.expect_slots({0, 1, 2})
        while not (a.connected and b.connected and m.last == "m2"):
            await trio.sleep(0.05)
        await trio.sleep(0.2)
        assert a.lease_valid() and b.lease_valid()
        assert a.generation == b.generation == 0
        assert second.table.lock_of(a.session_id, b"x").granted == EX
        assert second.table.resource(b"x").lvb == b"v" * 32
        assert second.in_grace                    # slot 2 is not back
        second.declare_slot_dead("gone", 2)
        await trio.sleep(0.2)
        # g: held by a node that never came back: nobody gets it before recovery
        await held_back(b, b"g", EX)
        await a.unlock(b"x")
        await trio.sleep(1.0)
        assert b"x" not in got                    # frozen: slot 2's locks are unknown
        await b.lock(b"J2", EX)                   # but its recovery lock is served
        await b.report_recovered(2)
        while b"x" not in got:
            await trio.sleep(0.05)
        # the value a reclaimed was right, but slot 2's locks were unknown: every
        # value block is invalid after its recovery (the next holder rereads)
        assert got[b"x"].lvb is None
        assert (await b.lock(b"g", EX, try_lock=True)).mode == EX
        n.cancel_scope.cancel()


@autojump
async def test_without_silence_detection_a_mute_master_costs_the_lease():
    async with trio.open_nursery() as n:
        m = Masters(n)
        first = await m.start("m1", grace=0)
        a = await m.client("a", 0)                # silence=None: today's behaviour
        await a.lock(b"x", EX)
        for tap in m.taps:
            tap.mute = True
        first.may_act = lambda: False
        await m.start("m2", grace=LEASE)
        await trio.sleep(LEASE)
        assert not a.lease_valid()
        n.cancel_scope.cancel()


@autojump
async def test_join_waits_for_a_master_and_retries_promptly():
    async with trio.open_nursery() as n:
        m = Masters(n)
        with pytest.raises(ConnectError):
            await m.client("a", 0)                # join_wait=0: fails at once

        async def elect_later():
            await trio.sleep(2.0)
            await m.start("m1", grace=0)
        n.start_soon(elect_later)
        m.calls.clear()
        a = await m.client("a", 0, join_wait=10.0, lease=20.0)
        assert 2.0 <= trio.current_time() - m.calls[0] <= 2.3
        gaps = [t1 - t0 for t0, t1 in zip(m.calls, m.calls[1:])]
        assert max(gaps) <= 0.25 + 1e-6
        # a reconnection to an address that refuses retries as promptly, although
        # the lease would allow waits of lease / 10 = 2 s
        m.current.stop("test")
        await trio.sleep(3.0)
        m.calls.clear()
        await m.start("m2", grace=20.0)
        t0 = trio.current_time()
        await a.wait_connected()
        assert trio.current_time() - t0 <= 0.3
        assert a.lease_valid()
        n.cancel_scope.cancel()


@autojump
async def test_a_handshake_that_hangs_is_given_up_and_tried_again():
    async with trio.open_nursery() as n:
        m = Masters(n)
        await m.start("m1", grace=0)
        m.blackhole = True                        # accepted, then never answered
        t0 = trio.current_time()
        a = await m.client("a", 0, join_wait=5.0, handshake_timeout=0.5)
        assert 0.5 <= trio.current_time() - t0 < 1.0
        assert a.lease_valid() and len(m.calls) == 2
        n.cancel_scope.cancel()


@autojump
async def test_status_carries_the_masters_info():
    async with trio.open_nursery() as n:
        m = Masters(n)
        server = await m.start("m1", grace=0)
        server.info = {"master": "n1", "generation": 7}
        a = await m.client("a", 0)
        st = await a.status()
        assert st["master"] == "n1" and st["generation"] == 7
        assert st["nodes"][0]["lease_age"] >= 0
        n.cancel_scope.cancel()


@autojump
async def test_recovering_a_node_whose_locks_were_unknown_invalidates_value_blocks():
    """A value block reclaimed from a node holding the lock in NL may be older than
    what the dead node (unknown to the new master: maybe an EX holder) wrote."""
    async with trio.open_nursery() as n:
        m = Masters(n)
        await m.start("m1", grace=0)
        a = await m.client("a", 0, silence=1.0)
        await a.lock(b"x", EX)
        await a.convert(b"x", EX, lvb=b"v" * 32)
        await a.convert(b"x", PR)
        await a.convert(b"x", NL)                    # kept as a cache, value known
        m.current.stop("test")
        second = await m.start("m2", grace=LEASE)
        second.expect_slots({0, 1})
        while not (a.connected and m.last == "m2"):
            await trio.sleep(0.05)
        assert second.table.resource(b"x").lvb == b"v" * 32     # reclaimed
        second.declare_slot_dead("gone", 1)
        await a.report_recovered(1)
        g = await a.lock(b"x", PR)
        assert g.lvb is None
        st = await a.status()
        assert st["nodes"][0]["opened"] == "reclaimed"
        n.cancel_scope.cancel()


@autojump
async def test_a_member_whose_lease_ran_out_during_the_failover_is_recovered():
    """A member that comes back after its lease ran out had locks nobody knows now
    and a journal nobody replayed: it is a dead node with unknown locks."""
    async with trio.open_nursery() as n:
        m = Masters(n)
        await m.start("m1", grace=0)
        a = await m.client("a", 0, silence=1.0)
        late = await m.client("late", 1, silence=1.0)
        await late.lock(b"y", EX)
        m.current.stop("test")
        slow = m.__call__

        async def late_connector():                # late's network is down a while
            if trio.current_time() < t_back:
                raise ConnectError("unreachable")
            return await slow()
        late._connector = late_connector
        t_back = trio.current_time() + 2 * LEASE
        second = await m.start("m2", grace=1.0, thaw_prefix=b"J")
        while not a.connected or m.last != "m2":
            await trio.sleep(0.05)
        await trio.sleep(2 * LEASE)
        assert not late.lease_valid()
        while not late.connected:
            await trio.sleep(0.05)
        await trio.sleep(0.2)
        assert late.generation == 1 and late.held(b"y") is None
        assert a.dead_nodes() == {1: "late"}
        await held_back(a, b"y", EX)               # y: maybe late's, unknown
        await a.lock(b"J1", EX)
        await a.report_recovered(1)
        assert (await a.lock(b"y", EX, try_lock=True)).mode == EX
        assert [s.node for s in second.sessions.values()] == ["a", "late"]
        n.cancel_scope.cancel()


@autojump
async def test_an_unlock_while_reconnecting_is_not_lost_in_the_reclaim():
    """The reclaim list is made before the connection is up; an unlock posted while
    connecting must still reach the new master after the reclaim."""
    async with trio.open_nursery() as n:
        m = Masters(n)
        first = await m.start("m1", grace=0)
        a = await m.client("a", 0, silence=1.0)
        b = await m.client("b", 1, silence=1.0)
        await a.lock(b"x", EX)
        await a.lock(b"y", EX)
        await a.convert(b"y", PR)
        for tap in m.taps:
            tap.mute = True
        first.may_act = lambda: False
        await m.start("m2", grace=LEASE)
        m.current.expect_slots({0, 1})
        connecting = trio.Event()
        direct = m.__call__

        async def slow_connector():                # the connection takes a while
            connecting.set()
            await trio.sleep(0.5)
            return await direct()
        a._connector = slow_connector
        await connecting.wait()
        await a.unlock(b"x")                       # while a reconnects
        await a.convert(b"y", NL)
        with trio.fail_after(3 * LEASE):
            assert (await b.lock(b"x", EX)).mode == EX
            assert (await b.lock(b"y", EX)).mode == EX
        assert a.held(b"x") is None and a.generation == 0
        n.cancel_scope.cancel()


@autojump
async def test_a_member_already_recovered_as_unknown_comes_back_as_expired_only():
    """A paused member declared dead (its heartbeat stopped) and recovered by the new
    master wakes and reconnects: its slot's unknown locks were recovered already, so
    it is not declared dead a second time."""
    async with trio.open_nursery() as n:
        m = Masters(n)
        await m.start("m1", grace=0)
        a = await m.client("a", 0, silence=1.0)
        paused = await m.client("p", 1, silence=1.0)
        real = m.__call__

        async def down():
            raise ConnectError("paused")
        paused._connector = down
        m.current.stop("test")
        second = await m.start("m2", grace=LEASE, thaw_prefix=b"J")
        second.expect_slots({0, 1})
        while not (a.connected and m.last == "m2"):
            await trio.sleep(0.05)
        second.declare_slot_dead("p", 1)
        await a.lock(b"J1", EX)
        await a.report_recovered(1)
        await a.unlock(b"J1")
        await trio.sleep(2 * LEASE)
        paused._connector = real                   # it wakes, its lease long gone
        while not paused.connected:
            await trio.sleep(0.05)
        await trio.sleep(0.5)
        assert paused.generation == 1
        assert a.dead_nodes() == {} and not (await a.status())["frozen"]
        n.cancel_scope.cancel()
