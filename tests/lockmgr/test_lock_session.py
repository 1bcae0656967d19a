"""Server and clients in one trio run over in-memory streams, under the autojump
clock: callbacks, try-lock, timeouts, deadlocks, leases, recovery, resumption,
server restart and reclaim, authentication."""

import logging

import pytest
import trio
import trio.testing

from lockmgr import (CR, EX, NL, PR, PW, AuthError, Deadlock, LeaseLost, LockClient,
                     LockError, LockTimeout, NodeBusy, NotRecovered, ProtocolError,
                     TryAgain, downgrade_for, query_status, wire)
from lockmgr.messages import Op
from tests.lockmgr.lockmgr_testutil import KEY, autojump, mem_cluster, realtime

V1 = b"1" * 32
V2 = b"2" * 32


@autojump
async def test_lock_convert_unlock_and_value_blocks():
    async with mem_cluster("a", "b", grace=0) as c:
        server = c.server
        a, b = c.nodes
        g = await a.lock(b"r", EX)
        assert g.mode == EX and g.lvb is None
        await a.convert(b"r", PR, lvb=V1)           # EX down: value block written
        assert a.held(b"r").mode == PR
        g = await b.lock(b"r", CR)
        assert g.lvb == V1
        await b.unlock(b"r")
        await a.convert(b"r", PW)                   # up
        await a.unlock(b"r", lvb=V2)
        g = await b.lock(b"r", PR)
        assert g.lvb == V2
        # a cached lock: no message to the server
        rid = server.sessions[b.session_id].last_rid
        for _ in range(10):
            assert (await b.lock(b"r", CR)).mode == PR
        assert server.sessions[b.session_id].last_rid == rid
        with pytest.raises(LockError):
            await a.unlock(b"nothing")
        with pytest.raises(LockError):
            await a.convert(b"nothing", EX)
        await a.close()
        await b.close()
        await trio.testing.wait_all_tasks_blocked()
        assert not server.sessions and not list(server.table.names()) == [b"x"]


@autojump
async def test_blocking_callback_carries_requested_mode():
    async with mem_cluster("a", "b", grace=0) as c:
        a, b = c.nodes
        seen = []

        async def on_blocking(name, mode):
            seen.append(mode)
            await trio.sleep(0.3)                   # flushing
            await a.convert(name, downgrade_for(a.held(name).mode, mode), lvb=V1)

        await a.lock(b"r", EX, on_blocking=on_blocking)
        t0 = trio.current_time()
        g = await b.lock(b"r", PR)
        assert g.mode == PR and g.lvb == V1
        assert seen == [PR] and a.held(b"r").mode == PR
        assert trio.current_time() - t0 >= 0.3
        # now b wants EX: a gets EX and gives the lock up entirely
        await b.convert(b"r", EX)
        assert seen == [PR, EX] and a.held(b"r").mode == NL


@autojump
async def test_failed_try_lock_with_notify_calls_the_holder_back():
    async with mem_cluster("a", "b", grace=0) as c:
        a, b = c.nodes
        seen = []

        async def give_up(name, mode):         # a caches the lock: gives it up
            seen.append(mode)
            await a.unlock(name)

        await a.lock(b"r", EX, on_blocking=give_up)
        with pytest.raises(TryAgain):
            await b.lock(b"r", PR, try_lock=True)
        await trio.testing.wait_all_tasks_blocked()
        assert seen == [] and a.held(b"r").mode == EX      # a plain try tells nobody
        with pytest.raises(TryAgain):
            await b.lock(b"r", EX, try_lock=True, notify=True)
        await trio.testing.wait_all_tasks_blocked()
        assert seen == [EX] and a.held(b"r") is None
        assert (await b.lock(b"r", EX, try_lock=True, notify=True)).mode == EX


@autojump
async def test_slow_holder_gets_the_callback_again():
    async with mem_cluster("a", "b", grace=0, bast_repeat=2.0) as c:
        a, b = c.nodes
        calls = []

        async def stubborn(name, mode):
            calls.append(trio.current_time())
            if len(calls) >= 3:
                await a.unlock(name)

        await a.lock(b"r", PR, on_blocking=stubborn)
        t0 = trio.current_time()
        await b.lock(b"r", EX)
        assert len(calls) == 3
        assert 3.9 <= trio.current_time() - t0 <= 4.5   # repeated every 2 s


@autojump
async def test_try_lock_timeout_and_cancellation():
    async with mem_cluster("a", "b", grace=0) as c:
        server = c.server
        a, b = c.nodes
        await a.lock(b"r", PW)
        with pytest.raises(TryAgain):
            await b.lock(b"r", PR, try_lock=True)
        assert (await b.lock(b"r", CR, try_lock=True)).mode == CR   # compatible
        t0 = trio.current_time()
        with pytest.raises(LockTimeout):
            await b.convert(b"r", EX, timeout=1.5)
        assert 1.5 <= trio.current_time() - t0 < 1.7
        assert b.held(b"r").mode == CR                # a failed conversion keeps CR
        with pytest.raises(LockTimeout):
            await _timeout_on_new_lock(a, b)
        # a caller cancelled while waiting: the request goes away at the server
        with trio.move_on_after(1):
            await _wait_blocked(a, b)
        await trio.testing.wait_all_tasks_blocked()
        assert server.table.lock_of(b.session_id, b"q") is None
        await a.unlock(b"q")
        await trio.testing.wait_all_tasks_blocked()
        assert b.held(b"q") is None and server.table.resource(b"q") is None


async def _timeout_on_new_lock(a, b):
    await a.lock(b"s", EX)
    await b.lock(b"s", EX, timeout=0.5)


async def _wait_blocked(a, b):
    await a.lock(b"q", EX)
    await b.lock(b"q", EX)


@autojump
async def test_deadlock_between_nodes():
    async with mem_cluster("a", "b", grace=0, deadlock_wait=1.0) as c:
        a, b = c.nodes
        await a.lock(b"x", EX)
        await b.lock(b"y", EX)
        results = {}

        async def worker(cl, want, have, name):
            try:
                await cl.lock(want, EX)
                results[name] = "granted"
                await cl.unlock(want)
            except Deadlock:
                results[name] = "deadlock"
            await cl.unlock(have)

        async with trio.open_nursery() as w:
            w.start_soon(worker, a, b"y", b"x", "a")
            await trio.sleep(0.1)
            w.start_soon(worker, b, b"x", b"y", "b")
        assert sorted(results.values()) == ["deadlock", "granted"]
        assert results["b"] == "deadlock"     # the younger request is the victim


@autojump
async def test_lease_expiry_recovery_and_value_block_invalidation():
    async with mem_cluster("a", "b", "c", slots=(3, 1, 2), grace=0, lease=5.0) as c:
        server = c.server
        a, b, cc = c.nodes
        downs = []

        async def node_down(node, slot):
            downs.append((node, slot, trio.current_time()))

        b.on_node_down(node_down)
        await a.lock(b"r", EX)
        await a.convert(b"r", EX, lvb=V1)
        got = trio.Event()
        box = {}

        async def waiter():
            box["g"] = await b.lock(b"r", PR)
            got.set()

        c.nursery.start_soon(waiter)
        await trio.sleep(1)
        t_crash = trio.current_time()
        c.crash(a)
        await trio.sleep(3.5)
        assert not downs                       # lease not over yet
        await trio.sleep(2)
        assert [(d[0], d[1]) for d in downs] == [("a", 3)]
        # the lease counts from the last heartbeat (every 1 s) before the crash
        assert 4.0 <= downs[0][2] - t_crash <= 5.2
        assert b.dead_nodes() == {3: "a"}
        # the dead node's lock stays held, however long it takes
        await trio.sleep(60)
        assert not got.is_set()
        with pytest.raises(NotRecovered):
            await cc.lock(b"r", EX, try_lock=True)
        st = await cc.status()
        assert [(r["node"], r["slot"], r["locks"]) for r in st["recovering"]] == \
            [("a", 3, 1)]
        assert await b.report_recovered(3) == 1
        await got.wait()
        assert box["g"].mode == PR and box["g"].lvb is None   # writer died: invalid
        assert b.dead_nodes() == {} and cc.dead_nodes() == {}
        assert not (await cc.status())["recovering"]
        assert await b.report_recovered(3) == 0
        del server


@autojump
async def test_client_fences_itself_before_the_server_declares_it_dead():
    async with mem_cluster("a", "b", grace=0, lease=5.0) as c:
        a, b = c.nodes
        downs = []

        async def node_down(node, slot):
            downs.append(trio.current_time())

        b.on_node_down(node_down)
        assert a.lease_valid()
        await trio.sleep(3.3)
        c.refuse = True
        a._conn_scope.cancel()                 # the network goes away
        await a.wait_lease_lost()
        t_lost = trio.current_time()
        assert not a.lease_valid()
        while not downs:
            await trio.sleep(0.1)
        # fenced at least the margin (lease/5) before the server's verdict
        assert downs[0] - t_lost >= 1.0 - 0.01


@autojump
async def test_dead_node_reconnecting_gets_a_new_session():
    async with mem_cluster("a", "b", grace=0, lease=5.0) as c:
        server = c.server
        a = c.nodes[0]
        await a.lock(b"r", EX)
        old = a.session_id
        c.refuse = True
        a._conn_scope.cancel()
        await a.wait_lease_lost()
        pending = trio.Event()

        async def later():
            with pytest.raises(LeaseLost):
                await a.lock(b"s", EX)
            pending.set()

        c.nursery.start_soon(later)
        await trio.sleep(6)                    # declared dead meanwhile
        c.refuse = False
        await pending.wait()                   # its waiting request failed
        await a.wait_connected()
        await trio.testing.wait_all_tasks_blocked()
        assert a.session_id != old and a.generation == 1
        assert a.held(b"r") is None
        assert a.dead_nodes() == {0: "a"}      # its own old session waits for recovery
        with pytest.raises(NotRecovered):
            await a.lock(b"r", EX, try_lock=True)
        await a.report_recovered(0)
        assert (await a.lock(b"r", EX, try_lock=True)).mode == EX
        assert a.lease_valid()
        assert [s.node for s in server.sessions.values()] == ["b", "a"]


@autojump
async def test_dropped_connection_resumes_the_session():
    async with mem_cluster("a", "b", grace=0, lease=5.0) as c:
        server = c.server
        a, b = c.nodes
        calls = []

        async def on_blocking(name, mode):
            calls.append(mode)
            await a.unlock(name)

        await a.lock(b"r", EX, on_blocking=on_blocking)
        sid = a.session_id
        c.refuse = True
        a._conn_scope.cancel()
        await trio.sleep(0.01)
        # while a is away: b asks for r (the callback waits in a's session stream),
        # a asks for s (its request waits in a's outbox)
        async with trio.open_nursery() as w:
            w.start_soon(b.lock, b"r", PR)
            w.start_soon(a.lock, b"s", EX)
            await trio.sleep(2)
            assert calls == []
            c.refuse = False
        assert calls == [PR]
        assert a.session_id == sid and a.generation == 0 and a.lease_valid()
        assert a.held(b"s").mode == EX and b.held(b"r").mode == PR
        assert server.sessions[sid].state == "live"


@autojump
async def test_server_restart_reclaim_and_grace():
    async with mem_cluster("a", "b", "d", first_grace=0, lease=5.0, grace=3.0) as c:
        a, b, d = c.nodes
        await a.lock(b"x", EX)
        await a.convert(b"x", EX, lvb=V1)
        await b.lock(b"y", PR)
        await d.lock(b"y", PR)
        got = {}

        async def want(cl, name, mode, key):
            got[key] = await cl.lock(name, mode)

        c.nursery.start_soon(want, b, b"x", PR, "b-x")     # waits for a's EX
        await trio.sleep(0.5)
        c.kill_server()
        await trio.sleep(0.5)
        server = await c.start_server()
        t0 = trio.current_time()
        await trio.sleep(1.0)
        assert a.connected and b.connected and d.connected
        # reclaimed: modes and value blocks, nothing granted twice
        assert server.table.lock_of(a.session_id, b"x").granted == EX
        assert server.table.resource(b"x").lvb == V1
        assert {server.sessions[s].node for s in server.table.resource(b"y").granted} \
            == {"b", "d"}
        # during the grace period nothing new is granted, even a free lock
        c.nursery.start_soon(want, d, b"z", EX, "d-z")
        await trio.sleep(0.5)
        assert "d-z" not in got and "b-x" not in got
        while "d-z" not in got:
            await trio.sleep(0.05)
        assert trio.current_time() - t0 >= 3.0
        assert "b-x" not in got                    # a still holds x
        await a.unlock(b"x")
        while "b-x" not in got:
            await trio.sleep(0.05)
        assert got["b-x"].lvb == V1
        assert a.generation == b.generation == d.generation == 0


@autojump
async def test_restart_while_a_dead_node_is_unrecovered():
    async with mem_cluster("a", "b", first_grace=0, lease=5.0, grace=1.0) as c:
        a, b = c.nodes
        await a.lock(b"r", EX)
        c.crash(a)
        while not b.dead_nodes():
            await trio.sleep(0.1)
        c.kill_server()
        server = await c.start_server()
        await trio.sleep(3)
        # the new server cannot know the dead node's locks: it grants nothing, and
        # cannot refuse a try-lock either (it holds it back)
        with trio.move_on_after(1.0) as scope:
            await b.lock(b"r", EX, try_lock=True)
        assert scope.cancelled_caught
        await trio.sleep(0.1)
        st = await b.status()
        assert st["frozen"] and st["recovering"][0]["unknown_locks"]
        await b.report_recovered(0)
        assert (await b.lock(b"r", EX, try_lock=True)).mode == EX
        del server


@autojump
async def test_late_reconnect_after_restart_loses_locks():
    async with mem_cluster("a", first_grace=0, lease=5.0, grace=2.0) as c:
        (a,) = c.nodes
        await a.lock(b"r", EX)
        c.kill_server()
        await trio.sleep(10)                     # server away longer than the lease
        assert not a.lease_valid()
        await c.start_server()
        await a.wait_connected()
        await trio.testing.wait_all_tasks_blocked()
        assert a.generation == 1 and a.held(b"r") is None


@autojump
async def test_node_busy_and_slot_conflict():
    async with mem_cluster("a", grace=0) as c:
        with pytest.raises(NodeBusy, match="live session"):
            await c.client("a", 5, busy_wait=1.0)
        with pytest.raises(NodeBusy, match="slot 0"):
            await c.client("z", 0, busy_wait=0)


@autojump
async def test_wrong_key_is_refused_on_both_sides(caplog):
    caplog.set_level(logging.WARNING, "lockmgr.server")
    async with mem_cluster("good", grace=0) as c:
        server = c.server
        (good,) = c.nodes
        with pytest.raises(AuthError, match="refused the key"):
            await c.client("bad", 1, key=b"another-key-0123456789abcdef012")
        assert "authentication failed" in caplog.text and "wrong key" in caplog.text
        assert (await good.lock(b"r", EX)).mode == EX
        assert [s.node for s in server.sessions.values()] == ["good"]


@autojump
async def test_impostor_server_is_refused_by_the_client():
    async def fake_server(stream):
        dec = wire.FrameDecoder(1 << 20)
        await stream.send_all(wire.frame([Op.CHALLENGE, wire.PROTOCOL_VERSION,
                                          b"n" * 32, b"boot"]))
        while not dec.feed(await stream.receive_some(4096)):
            pass
        await stream.send_all(wire.frame([Op.AUTH_OK, b"x" * 32]))
        await trio.sleep_forever()

    async with trio.open_nursery() as n:
        async def connector():
            a, b = trio.testing.memory_stream_pair()
            n.start_soon(fake_server, b)
            return a
        with pytest.raises(AuthError, match="failed to prove"):
            await LockClient.connect("fake", KEY, "a", 0, nursery=n, connector=connector)
        n.cancel_scope.cancel()


@realtime
async def test_another_protocol_version_is_refused_by_session_and_status_query():
    """One handshake for both: a server speaking protocol 2 is refused before any key
    is shown to it, by ``LockClient.connect`` and by ``query_status`` alike."""
    seen = []

    async def server_of_version_2(stream):
        async with stream:
            await stream.send_all(wire.frame([Op.CHALLENGE, 2, b"n" * 32, b"boot"]))
            seen.append(await stream.receive_some(4096))

    async with trio.open_nursery() as n:
        (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        addr = "127.0.0.1:%d" % listener.socket.getsockname()[1]
        await n.start(trio.serve_listeners, server_of_version_2, [listener])
        with pytest.raises(ProtocolError, match="speaks protocol 2, not 1"):
            await query_status(addr, KEY, timeout=5)
        with pytest.raises(ProtocolError, match="speaks protocol 2, not 1"):
            await LockClient.connect(addr, KEY, "a", 0, nursery=n)
        await trio.testing.wait_all_tasks_blocked()
        assert seen == [b"", b""]          # no AUTH sent: the connection just closed
        n.cancel_scope.cancel()


@autojump
async def test_operations_without_authentication_are_dropped(caplog):
    caplog.set_level(logging.WARNING, "lockmgr.server")
    async with mem_cluster("good", grace=0) as c:
        (good,) = c.nodes
        raw = await c.raw()
        await raw.send_all(wire.frame([Op.LOCK, 1, b"r", EX, 0, None]))
        data = b""
        while True:
            chunk = await raw.receive_some(4096)
            if not chunk:
                break
            data += chunk
        msgs = wire.FrameDecoder(1 << 20).feed(data)
        assert msgs[0][0] == Op.CHALLENGE and msgs[-1][0] == Op.ERROR
        assert "before authentication" in caplog.text
        assert (await good.lock(b"r", EX)).mode == EX


@autojump
async def test_close_releases_locks_without_recovery():
    async with mem_cluster("a", "b", grace=0) as c:
        a, b = c.nodes
        await a.lock(b"r", EX)
        async with trio.open_nursery() as w:
            w.start_soon(b.lock, b"r", EX)
            await trio.sleep(1)
            await a.close()
        assert b.held(b"r").mode == EX and not b.dead_nodes()
        with pytest.raises(LockError):
            await a.lock(b"r", EX)


@autojump
async def test_close_without_release_leaves_locks_for_recovery():
    async with mem_cluster("a", "b", grace=0, lease=5.0) as c:
        a, b = c.nodes
        await a.lock(b"r", EX)
        await a.close(release=False)
        await trio.sleep(6)
        assert b.dead_nodes() == {0: "a"}
        with pytest.raises(NotRecovered):
            await b.lock(b"r", EX, try_lock=True)
        await b.report_recovered(0)
        assert (await b.lock(b"r", EX, try_lock=True)).mode == EX
        assert b.statistics()["held"] == 1
