"""The lock client a node uses: one session, its lease, its locks, its callbacks.

Everything runs in the caller's trio event loop and never blocks it.  One reader task
handles the server's messages strictly in order (so a lock's grant and its blocking
callbacks cannot be misordered), one writer task sends, one task renews the lease and
one watches it.  Blocking callbacks run the holder's handler as a separate task.

The client reconnects on its own.  On the same server it resumes its session (the
server replays what the client missed, the client resends what the server did not
process); after a server restart it reclaims its locks during the grace period, when
its lease is still valid by its own clock.  See docs/LOCKS.md.
"""

import logging
import time
from collections import deque

import trio

from . import wire
from .errors import (AuthError, LockCancelled, ConnectError, LeaseLost, LockError,
                     LockTimeout, NodeBusy, ProtocolError, from_code)
from .modes import COMPAT, LVB_WRITERS, Mode, covers, supremum, wire_mode
from .table import LVB_SIZE
from .wire import frame

log = logging.getLogger("lockmgr.client")

CLIENT_MAX_FRAME = 64 << 20


class Grant:
    """A lock as the client holds it: ``name``, granted ``mode``, value block ``lvb``
    (32 bytes, or None when invalid)."""

    __slots__ = ("name", "mode", "lvb")

    def __init__(self, name: bytes, mode: Mode, lvb: bytes | None):
        self.name = name
        self.mode = mode
        self.lvb = lvb

    def __repr__(self):
        return f"Grant({self.name!r}, {self.mode.name}, lvb={self.lvb!r})"


class _Rec:
    """The client's record of one resource."""

    __slots__ = ("name", "mode", "lvb", "ver", "grant", "handler", "busy", "queue",
                 "bast_running", "bast_pending")

    def __init__(self, name: bytes):
        self.name = name
        self.mode: Mode | None = None
        self.lvb: bytes | None = None
        self.ver = 0
        self.grant: Grant | None = None
        self.handler = None
        self.busy = False          # an operation on this lock is in progress
        self.queue: deque = deque()  # events of tasks waiting for busy to clear
        self.bast_running = False
        self.bast_pending: Mode | None = None


class _Op:
    """A request that waits for the server's answer."""

    __slots__ = ("rid", "kind", "rec", "mode", "data", "event", "result", "error",
                 "abandoned", "flags")

    def __init__(self, rid, kind, rec, mode, data):
        self.rid = rid
        self.kind = kind
        self.rec = rec
        self.mode = mode
        self.data = data
        self.event = trio.Event()
        self.result = None
        self.error: LockError | None = None
        self.abandoned = False


class LockClient:
    """A node's session with the lock server.  Create it with ``LockClient.connect``."""

    def __init__(self, addr: str, key: bytes, node: str, slot: int, *, lease: float,
                 renew: float, margin: float | None, connector=None,
                 busy_wait: float | None = None, handshake_timeout: float = 10.0):
        self.addr = addr
        self.key = key
        self.node = node
        self.slot = slot
        self.requested_lease = lease
        self.lease = lease
        self.renew = renew
        self._margin_arg = margin
        self.margin = margin if margin is not None else lease / 5
        self.busy_wait = lease * 2 if busy_wait is None else busy_wait
        self.handshake_timeout = handshake_timeout
        self._connector = connector or (lambda: wire.open_stream(addr))
        self.session_id: int | None = None
        self.boot_id: bytes | None = None
        #: how many times the session was lost and replaced by a new one
        self.generation = 0
        self._recs: dict[bytes, _Rec] = {}
        self._pending: dict[int, _Op] = {}
        self._unacked: deque = deque()   # (rid, frame) not yet known processed
        self._rid = 0
        self._received = 0
        self._hb_id = 0
        self._hb_sent: dict[int, float] = {}
        self._lease_deadline = 0.0
        self._lease_deadline_mono = 0.0    # the same, on time.monotonic (for threads)
        self._lost = trio.Event()
        self._renewed = trio.Event()
        self._session_ok = False
        self._node_down_handlers = []
        self._dead_nodes: dict[int, str] = {}   # slot -> node, announced, not recovered
        self._chan: wire.Channel | None = None
        self._resend: list[bytes] = []
        self._connected = False
        self._closed = False
        self._conn_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._main_scope: trio.CancelScope | None = None
        self._connected_event = trio.Event()

    # ---- construction --------------------------------------------------------------

    @classmethod
    async def connect(cls, addr: str, key: bytes, node: str, slot: int, *, nursery,
                      lease: float = 5.0, renew: float = 1.0, margin: float | None = None,
                      connector=None, busy_wait: float | None = None) -> "LockClient":
        """Authenticate, open a session and start the client's tasks in ``nursery``.

        Args:
            addr: "host:port" or "unix:/path".
            key: the shared secret.
            node: this node's name; slot: its volume slot.
            lease: the lease wanted (the server may shorten it to its own).
            renew: seconds between heartbeats.
            margin: safety margin of ``lease_valid`` (default: a fifth of the lease).
            connector: async callable returning a connected stream (tests).
            busy_wait: how long to retry while the server says the node still has a
                live session (default: two leases).

        Raises:
            ConnectError: the server cannot be reached.
            AuthError: the key was refused, or the server could not prove it.
            NodeBusy: the node or slot kept a live session for ``busy_wait``.
        """
        self = cls(addr, key, node, slot, lease=lease, renew=renew, margin=margin,
                   connector=connector, busy_wait=busy_wait)
        deadline = trio.current_time() + self.busy_wait
        while True:
            try:
                stream, dec, leftover = await self._establish()
                break
            except NodeBusy as e:
                if trio.current_time() >= deadline:
                    raise
                log.info("%s; retrying", e)
                await trio.sleep(min(0.5, self.lease / 4))
        await nursery.start(self._main, stream, dec, leftover)
        return self

    # ---- the API -------------------------------------------------------------------

    async def lock(self, name: bytes, mode: Mode, *, try_lock: bool = False,
                   notify: bool = False, timeout: float | None = None,
                   on_blocking=None) -> Grant:
        """Get ``name`` in at least ``mode``.

        When the lock is already held in a mode that covers ``mode`` this returns at
        once without asking the server (a cached lock); when it is held in a weaker
        mode it is converted up (to the weakest mode covering both).

        Args:
            try_lock: fail with TryAgain (NotRecovered when a dead node's lock is in the
                way) instead of queueing.
            notify: with ``try_lock``, a failed try still sends the holders in the way
                a blocking callback (one that holds the lock only as a cache can give
                it up for the next try).
            timeout: fail with LockTimeout after this many seconds of waiting.
            on_blocking: ``async fn(name, requested_mode)`` run as a task when another
                node asks for a conflicting mode; it should flush and then ``convert``
                down or ``unlock``.  Kept until replaced.

        Raises:
            TryAgain, NotRecovered, LockTimeout, Deadlock, LeaseLost, LockError.
        """
        rec = self._recs.get(name)
        if (rec is not None and not rec.busy and rec.mode is not None
                and covers(rec.mode, mode)):
            if on_blocking is not None:
                rec.handler = on_blocking
            await trio.lowlevel.checkpoint_if_cancelled()
            return rec.grant
        if type(name) is not bytes:
            raise TypeError("lock names are bytes")
        mode = Mode(mode)
        flags = (wire.F_TRY | (wire.F_NOTIFY if notify else 0)) if try_lock else 0
        rec = await self._acquire(name)
        try:
            if on_blocking is not None:
                rec.handler = on_blocking
            if rec.mode is not None:
                if covers(rec.mode, mode):
                    self._release(rec)
                    return rec.grant
                target = supremum(rec.mode, mode)
                op = self._start(wire.CONVERT, rec, target, flags, timeout, None)
            else:
                op = self._start(wire.LOCK, rec, mode, flags, timeout, None)
        except BaseException:
            if rec.busy:
                self._release(rec)
            raise
        return await self._wait(op, timeout)

    async def convert(self, name: bytes, mode: Mode, *, lvb: bytes | None = None,
                      try_lock: bool = False, timeout: float | None = None) -> Grant:
        """Convert a held lock up or down.

        A conversion down (to a mode the held one covers) never waits for the server.
        ``lvb`` (32 bytes) is written when the held mode is PW or EX.

        Raises:
            LockError: the lock is not held; and as ``lock``.
        """
        mode = Mode(mode)
        self._check_lvb(lvb)
        rec = await self._acquire(name)
        try:
            if rec.mode is None:
                raise LockError(f"convert of {name!r}: lock not held")
            if covers(rec.mode, mode):
                if mode != rec.mode or (lvb is not None and rec.mode in LVB_WRITERS):
                    self._post(wire.CONVERT, rec, mode, lvb)
                    if lvb is not None and rec.mode in LVB_WRITERS:
                        rec.lvb = lvb
                        rec.ver += 1
                    rec.mode = mode
                    rec.grant = Grant(name, mode, rec.lvb)
                self._release(rec)
                await trio.lowlevel.checkpoint_if_cancelled()
                return rec.grant
            if lvb is not None and rec.mode in LVB_WRITERS:
                rec.lvb = lvb
                rec.ver += 1
            op = self._start(wire.CONVERT, rec, mode, wire.F_TRY if try_lock else 0,
                             timeout, lvb)
        except BaseException:
            if rec.busy:
                self._release(rec)
            raise
        return await self._wait(op, timeout)

    async def unlock(self, name: bytes, *, lvb: bytes | None = None) -> None:
        """Give up a lock (``lvb`` is written when it is held PW or EX).

        Does not wait for the server: requests on one session are processed in order,
        so a later request of this client sees the lock released.

        Raises:
            LockError: the lock is not held.
        """
        self._check_lvb(lvb)
        rec = await self._acquire(name)
        try:
            if rec.mode is None:
                raise LockError(f"unlock of {name!r}: lock not held")
            self._post(wire.UNLOCK, rec, None, lvb)
            rec.mode = None
            rec.grant = None
            rec.lvb = None
        finally:
            self._release(rec)
        await trio.lowlevel.checkpoint_if_cancelled()

    def held(self, name: bytes) -> Grant | None:
        """The lock on ``name`` as held now, or None."""
        rec = self._recs.get(name)
        return rec.grant if rec is not None else None

    def held_locks(self) -> dict[bytes, Grant]:
        return {n: r.grant for n, r in self._recs.items() if r.grant is not None}

    def lease_valid(self) -> bool:
        """Whether this node's lease is valid by its own clock, with the safety margin.

        False from ``margin`` seconds before the server could declare the node dead:
        stop writing to the volume then.
        """
        return self._session_ok and trio.current_time() < self._lease_deadline

    def lease_valid_threadsafe(self) -> bool:
        """``lease_valid`` for a worker thread, where trio's clock cannot be read:
        the deadline as mapped onto ``time.monotonic`` at the last renewal."""
        return self._session_ok and time.monotonic() < self._lease_deadline_mono

    def lease_remaining(self) -> float:
        return max(0.0, self._lease_deadline - trio.current_time()) if self._session_ok \
            else 0.0

    async def wait_lease_lost(self) -> None:
        """Return when the lease is no longer valid (at once if it is not now)."""
        if not self.lease_valid():
            await trio.lowlevel.checkpoint()
            return
        await self._lost.wait()

    def on_node_down(self, handler) -> None:
        """Register ``async fn(node_name, slot)``, run (as a task) when the server
        declares a member dead.  Its locks stay held until ``report_recovered(slot)``."""
        self._node_down_handlers.append(handler)

    def dead_nodes(self) -> dict[int, str]:
        """Slots announced dead and not yet recovered: ``{slot: node}``."""
        return dict(self._dead_nodes)

    async def report_recovered(self, slot: int) -> int:
        """Tell the server this member has recovered ``slot`` (replayed its journal).

        The dead node's locks are released, its PW/EX value blocks marked invalid.
        Returns how many dead sessions were released.
        """
        op = self._start(wire.RECOVERED, None, slot, 0, None, None)
        n = await self._wait(op, None)
        self._dead_nodes.pop(slot, None)
        return n

    async def status(self) -> dict:
        """The server's view: nodes, slots, lease ages, lock counts, waiters,
        recovering nodes."""
        op = self._start(wire.STATUS, None, None, 0, None, None)
        return await self._wait(op, None)

    async def wait_connected(self) -> None:
        """Return once the client is connected to the server."""
        while not self._connected:
            await self._connected_event.wait()

    @property
    def connected(self) -> bool:
        return self._connected

    def statistics(self) -> dict:
        """Counters for diagnostics: locks held, requests waiting, and the session."""
        return {"connected": self._connected, "session": self.session_id,
                "generation": self.generation, "lease_valid": self.lease_valid(),
                "lease_remaining": round(self.lease_remaining(), 3),
                "held": sum(1 for r in self._recs.values() if r.mode is not None),
                "pending": len(self._pending), "unacked": len(self._unacked),
                "dead_nodes": len(self._dead_nodes)}

    async def close(self, *, release: bool = True) -> None:
        """Leave the cluster and stop the client's tasks.

        Args:
            release: leave cleanly: the server releases this node's locks at once, no
                recovery needed (after the file system has checkpointed).  With False
                the node leaves as if it had crashed: the server declares it dead when
                its lease ends, and its locks wait for recovery (use this when fenced,
                or when the journal may hold what others have not seen).
        """
        if self._closed:
            return
        self._closed = True
        if self._connected and release:
            self._chan.send(frame([wire.BYE]))
            with trio.move_on_after(1):
                while self._chan.pending() and self._connected:
                    await trio.sleep(0.001)
        for op in list(self._pending.values()):
            self._finish(op, error=LockError("client closed"))
        for rec in self._recs.values():
            rec.mode = None
            rec.grant = None
        self._recs.clear()
        self._session_ok = False
        if not self._lost.is_set():
            self._lost.set()
        if self._main_scope is not None:
            self._main_scope.cancel()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    # ---- operations in flight ------------------------------------------------------

    async def _acquire(self, name: bytes) -> _Rec:
        if self._closed:
            raise LockError("client closed")
        rec = self._recs.get(name)
        if rec is None:
            rec = self._recs[name] = _Rec(name)
        if rec.busy:
            ev = trio.Event()
            rec.queue.append(ev)
            try:
                await ev.wait()
            except BaseException:
                if ev in rec.queue:
                    rec.queue.remove(ev)
                else:
                    self._release(rec)  # we were handed the lock: pass it on
                raise
            if self._closed:
                self._release(rec)
                raise LockError("client closed")
        rec.busy = True
        return rec

    def _release(self, rec: _Rec) -> None:
        """End the operation on ``rec``; hand it to the next waiting task."""
        if rec.queue:
            rec.queue.popleft().set()   # stays busy for the next task
            return
        rec.busy = False
        if (rec.mode is None and not rec.bast_running
                and self._recs.get(rec.name) is rec):
            del self._recs[rec.name]

    @staticmethod
    def _check_lvb(lvb) -> None:
        if lvb is not None and (type(lvb) is not bytes or len(lvb) != LVB_SIZE):
            raise ValueError(f"a value block is {LVB_SIZE} bytes")

    def _next_rid(self) -> int:
        self._rid += 1
        return self._rid

    def _post(self, kind, rec: _Rec, mode, lvb) -> None:
        """Send an operation that needs no answer (unlock, convert down)."""
        rid = self._next_rid()
        if kind == wire.UNLOCK:
            data = frame([wire.UNLOCK, rid, rec.name, lvb])
        else:
            data = frame([wire.CONVERT, rid, rec.name, mode, 0, None, lvb])
        self._unacked.append((rid, data))
        if self._connected:
            self._chan.send_later(data)

    def _start(self, kind, rec, mode, flags, timeout, lvb) -> _Op:
        if self._closed:
            raise LockError("client closed")
        rid = self._next_rid()
        if kind == wire.LOCK:
            data = frame([wire.LOCK, rid, rec.name, mode, flags, timeout])
        elif kind == wire.CONVERT:
            data = frame([wire.CONVERT, rid, rec.name, mode, flags, timeout, lvb])
        elif kind == wire.RECOVERED:
            data = frame([wire.RECOVERED, rid, mode])
        else:
            data = frame([wire.STATUS, rid])
        op = _Op(rid, kind, rec, mode, data)
        self._pending[rid] = op
        self._unacked.append((rid, data))
        if self._connected:
            self._chan.send(data)
        return op

    async def _wait(self, op: _Op, timeout: float | None):
        try:
            if timeout is None:
                await op.event.wait()
            else:
                # the server times the request out; this only guards a lost server
                with trio.move_on_after(timeout + 2 * self.renew + 1.0):
                    await op.event.wait()
                if not op.event.is_set():
                    self._abandon(op)
                    raise LockTimeout(f"{op.rec.name!r}: no answer within {timeout}s")
        except trio.Cancelled:
            self._abandon(op)
            raise
        if op.error is not None:
            raise op.error
        return op.result

    def _abandon(self, op: _Op) -> None:
        """The caller stopped waiting: cancel the request at the server."""
        if op.event.is_set() or op.abandoned:
            return
        op.abandoned = True
        if op.kind in (wire.LOCK, wire.CONVERT) and self._connected:
            self._chan.send(frame([wire.CANCEL, op.rid, op.rec.name]))

    def _finish(self, op: _Op, result=None, error=None) -> None:
        if self._pending.pop(op.rid, None) is None:
            return
        op.result = result
        op.error = error
        op.event.set()
        if op.rec is not None:
            self._release(op.rec)

    # ---- the connection --------------------------------------------------------------

    async def _establish(self, resume=None, reclaim=None, recovering=None):
        """Connect, authenticate, open a session.  Returns (stream, decoder, leftover
        messages)."""
        stream = await self._connector()
        ok = False
        try:
            with trio.fail_after(self.handshake_timeout):
                dec = wire.FrameDecoder(CLIENT_MAX_FRAME)
                queue: deque = deque()

                async def recv():
                    while not queue:
                        try:
                            data = await stream.receive_some(65536)
                        except (trio.BrokenResourceError, OSError) as e:
                            raise ConnectError(f"lock server at {self.addr} closed the "
                                               f"connection: {e}") from None
                        if not data:
                            raise ConnectError(f"lock server at {self.addr} closed "
                                               "the connection")
                        queue.extend(dec.feed(data))
                    return queue.popleft()

                msg = await recv()
                if msg[0] != wire.CHALLENGE or len(msg) < 4:
                    raise ProtocolError(f"{self.addr} is not a lock server")
                if msg[1] != wire.PROTOCOL_VERSION:
                    raise ProtocolError(f"lock server speaks protocol {msg[1]}, "
                                        f"not {wire.PROTOCOL_VERSION}")
                nonce_s = msg[2]
                nonce_c = wire.new_nonce()
                await stream.send_all(frame([wire.AUTH, nonce_c,
                                             wire.client_mac(self.key, nonce_s, nonce_c)]))
                msg = await recv()
                if msg[0] == wire.AUTH_FAIL:
                    raise AuthError(f"lock server at {self.addr} refused the key "
                                    f"({msg[1]})")
                if msg[0] != wire.AUTH_OK or not wire.hmac.compare_digest(
                        msg[1], wire.server_mac(self.key, nonce_s, nonce_c)):
                    raise AuthError(f"lock server at {self.addr} failed to prove the "
                                    "shared key")
                t_open = trio.current_time()
                await stream.send_all(frame([wire.OPEN, self.node, self.slot,
                                             self.requested_lease, resume, reclaim,
                                             recovering]))
                msg = await recv()
                if msg[0] == wire.REFUSED:
                    raise NodeBusy(f"lock server refused the session: {msg[2]}")
                if msg[0] != wire.OPENED:
                    raise ProtocolError(f"unexpected answer {msg[0]} to OPEN")
                self._opened(msg, t_open)
                ok = True
                return stream, dec, list(queue)
        except trio.TooSlowError:
            raise ConnectError(f"lock server at {self.addr} did not answer") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            raise ConnectError(f"lock server at {self.addr}: {e}") from None
        finally:
            if not ok:
                with trio.CancelScope(shield=True):
                    await stream.aclose()

    def _opened(self, msg, t_open: float) -> None:
        _, state, sid, boot, lease, last_rid, refused, grace_left = msg
        first = self.session_id is None
        self.session_id = sid
        self.boot_id = boot
        self.lease = lease
        if self._margin_arg is None:
            self.margin = lease / 5
        self.renew = min(self.renew, lease / 3)
        self._hb_sent.clear()
        if state == "resumed":
            while self._unacked and self._unacked[0][0] <= last_rid:
                self._unacked.popleft()
            resend = [d for _, d in self._unacked]
        else:
            self._received = 0
            resend = []
            if state == "expired":
                self._lose_session("the server declared this node dead; its locks "
                                   "are gone")
            elif state == "reclaimed" and refused:
                for name in refused:
                    rec = self._recs.get(name)
                    if rec is not None:
                        rec.mode = None
                        rec.grant = None
                log.error("%d locks could not be reclaimed after the lock server "
                          "restarted", len(refused))
                self._lose_session(None)
            # what the server never saw: the requests still waiting for an answer
            self._unacked.clear()
            for rid in sorted(self._pending):
                op = self._pending[rid]
                if op.abandoned:
                    self._finish(op, error=LockCancelled("cancelled"))
                    continue
                self._unacked.append((rid, op.data))
                resend.append(op.data)
            if state == "reclaimed":
                log.info("lock server restarted: %d locks reclaimed",
                         len(self.held_locks()))
        self._resend = resend
        self._session_ok = True
        self._renew_lease(t_open + lease - self.margin)
        if not first:
            log.info("reconnected to lock server at %s (%s)", self.addr, state)

    def _lose_session(self, why: str | None) -> None:
        if why is not None:
            log.error("node %s: %s", self.node, why)
            for rec in list(self._recs.values()):
                rec.mode = None
                rec.grant = None
                rec.lvb = None
            for op in list(self._pending.values()):
                self._finish(op, error=LeaseLost(why))
            for rec in list(self._recs.values()):
                if not rec.busy and not rec.bast_running:
                    del self._recs[rec.name]
        self.generation += 1
        self._session_ok = False
        self._lost.set()

    def _renew_lease(self, deadline: float) -> None:
        if deadline > self._lease_deadline or not self._session_ok:
            self._lease_deadline = deadline
            self._lease_deadline_mono = time.monotonic() + deadline - trio.current_time()
        if self._lost.is_set() and self._session_ok:
            self._lost = trio.Event()
            self._renewed.set()
            self._renewed = trio.Event()

    async def _main(self, stream, dec, leftover, task_status=trio.TASK_STATUS_IGNORED):
        with trio.CancelScope() as scope:
            self._main_scope = scope
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._lease_watch)
                nursery.start_soon(self._heartbeat)
                task_status.started()
                delay = 0.05
                while not self._closed:
                    await self._serve(stream, dec, leftover)
                    if self._closed:
                        break
                    while True:
                        try:
                            stream, dec, leftover = await self._reconnect()
                            delay = 0.05
                            break
                        except (ConnectError, AuthError, NodeBusy, ProtocolError,
                                OSError, ValueError, TypeError, IndexError) as e:
                            log.warning("reconnecting to %s: %s", self.addr, e)
                            await trio.sleep(delay)
                            # well inside the grace period of a restarted server
                            delay = min(delay * 2, self.lease / 10)
                nursery.cancel_scope.cancel()

    async def _reconnect(self):
        resume = [self.boot_id, self.session_id, self._received]
        reclaim = None
        if self.lease_valid():
            reclaim = [[r.name, r.mode, r.lvb, r.ver] for r in self._recs.values()
                       if r.mode is not None]
        recovering = [[node, slot] for slot, node in self._dead_nodes.items()]
        return await self._establish(resume, reclaim, recovering)

    async def _serve(self, stream, dec, leftover) -> None:
        chan = self._chan = wire.Channel(stream)
        for data in self._resend:
            chan.send(data)
        self._resend = []
        self._connected = True
        self._connected_event.set()
        self._connected_event = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                self._conn_scope = nursery.cancel_scope
                nursery.start_soon(self._writer, chan)
                try:
                    self._dispatch(leftover)
                    while True:
                        data = await chan.receive_some()
                        if not data:
                            if not self._closed:
                                log.warning("lock server closed the connection")
                            break
                        self._dispatch(dec.feed(data))
                except (ValueError, TypeError, KeyError, IndexError) as e:
                    log.warning("dropping connection to lock server: bad message: %r", e)
                except ProtocolError as e:
                    log.warning("dropping connection to lock server: %s", e)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                    log.warning("lost connection to lock server: %s", e)
                nursery.cancel_scope.cancel()
        finally:
            chan.closed = True
            self._connected = False
            with trio.CancelScope(shield=True):
                try:
                    await stream.aclose()
                except Exception:
                    pass

    async def _writer(self, chan) -> None:
        try:
            await chan.writer()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            log.warning("lost connection to lock server: %s", e)
            if self._conn_scope is not None:
                self._conn_scope.cancel()

    async def _heartbeat(self) -> None:
        while True:
            if self._connected:
                self._hb_id += 1
                self._hb_sent[self._hb_id] = trio.current_time()
                self._chan.send(frame([wire.HB, self._hb_id, self._received]))
            await trio.sleep(self.renew)

    async def _lease_watch(self) -> None:
        while True:
            if self.lease_valid():
                await trio.sleep_until(self._lease_deadline)
                continue
            if not self._lost.is_set():
                log.error("node %s: lease lost (no renewal for %.1fs): stop writing",
                          self.node, self.lease - self.margin)
                self._lost.set()
            await self._renewed.wait()

    # ---- messages from the server ----------------------------------------------------

    def _dispatch(self, msgs) -> None:
        for msg in msgs:
            op = msg[0]
            if op == wire.GRANT:
                self._received += 1
                self._on_grant(msg)
            elif op == wire.FAIL:
                self._received += 1
                self._on_fail(msg)
            elif op == wire.BAST:
                self._received += 1
                self._on_bast(msg[1], wire_mode(msg[2]))
            elif op == wire.HB_ACK:
                self._on_hb_ack(msg)
            elif op == wire.REPLY:
                self._received += 1
                op_ = self._pending.get(msg[1])
                if op_ is not None:
                    self._finish(op_, result=msg[2])
            elif op == wire.NODE_DOWN:
                self._received += 1
                node, slot = msg[1], msg[2]
                if self._dead_nodes.get(slot) != node:
                    self._dead_nodes[slot] = node
                    log.warning("node %s (slot %d) declared dead; its locks wait for "
                                "recovery", node, slot)
                    for h in self._node_down_handlers:
                        self._nursery.start_soon(self._run_handler, h, node, slot)
            elif op == wire.NODE_RECOVERED:
                self._received += 1
                self._dead_nodes.pop(msg[1], None)
            elif op == wire.ERROR:
                log.warning("lock server: %s", msg[1])
            else:
                raise ProtocolError(f"unexpected message {op!r} from the server")

    def _on_grant(self, msg) -> None:
        _, rid, mode, lvb, ver = msg
        op = self._pending.get(rid)
        if op is None:
            return   # answer to an unlock or down-conversion we did not wait for
        rec = op.rec
        mode = wire_mode(mode)
        rec.mode = mode
        rec.lvb = lvb
        rec.ver = ver
        rec.grant = g = Grant(rec.name, mode, lvb)
        if op.abandoned and op.kind == wire.LOCK:
            # the caller gave up before the grant came: give the lock back
            self._post(wire.UNLOCK, rec, None, None)
            rec.mode = None
            rec.grant = None
            self._finish(op, error=LockCancelled("cancelled"))
            return
        self._finish(op, result=g)

    def _on_fail(self, msg) -> None:
        _, rid, code, text = msg
        op = self._pending.get(rid)
        if op is None:
            log.warning("lock server refused request %d: %s %s", rid, code, text)
            return
        name = op.rec.name if op.rec is not None else b""
        self._finish(op, error=from_code(code, f"{name!r}: {text or code}"))

    def _on_bast(self, name: bytes, mode: Mode) -> None:
        rec = self._recs.get(name)
        if rec is None or rec.mode is None or COMPAT[rec.mode][mode] or rec.handler is None:
            return
        if rec.bast_running:
            rec.bast_pending = mode if rec.bast_pending is None \
                else supremum(rec.bast_pending, mode)
            return
        rec.bast_running = True
        self._nursery.start_soon(self._run_bast, rec, mode)

    async def _run_bast(self, rec: _Rec, mode: Mode) -> None:
        try:
            while True:
                handler = rec.handler
                if handler is None:
                    break
                try:
                    await handler(rec.name, mode)
                except Exception:
                    log.exception("blocking callback handler for %r failed", rec.name)
                mode = rec.bast_pending
                rec.bast_pending = None
                if mode is None or rec.mode is None or COMPAT[rec.mode][mode]:
                    break
        finally:
            rec.bast_running = False
            if rec.mode is None and not rec.busy and self._recs.get(rec.name) is rec:
                del self._recs[rec.name]

    async def _run_handler(self, handler, *args) -> None:
        try:
            await handler(*args)
        except Exception:
            log.exception("node-down handler failed")

    def _on_hb_ack(self, msg) -> None:
        _, hb_id, last_rid = msg
        sent = self._hb_sent.pop(hb_id, None)
        for k in [k for k in self._hb_sent if k < hb_id]:
            del self._hb_sent[k]
        unacked = self._unacked
        while unacked and unacked[0][0] <= last_rid:
            unacked.popleft()
        if sent is not None and self._session_ok:
            self._renew_lease(sent + self.lease - self.margin)


async def query_status(addr: str, key: bytes, *, timeout: float = 10.0,
                       prefix: bytes | None = None) -> dict:
    """Authenticate and ask the server for its status without opening a session;
    with ``prefix`` the answer lists the granted locks whose names start with it
    (``held``: name, node, slot, mode, dead).

    Raises:
        ConnectError, AuthError, ProtocolError.
    """
    stream = await wire.open_stream(addr)
    try:
        with trio.fail_after(timeout):
            dec = wire.FrameDecoder(CLIENT_MAX_FRAME)
            queue: deque = deque()

            async def recv():
                while not queue:
                    data = await stream.receive_some(65536)
                    if not data:
                        raise ConnectError(f"lock server at {addr} closed the connection")
                    queue.extend(dec.feed(data))
                return queue.popleft()

            msg = await recv()
            if msg[0] != wire.CHALLENGE:
                raise ProtocolError(f"{addr} is not a lock server")
            nonce_c = wire.new_nonce()
            await stream.send_all(frame([wire.AUTH, nonce_c,
                                         wire.client_mac(key, msg[2], nonce_c)]))
            reply = await recv()
            if reply[0] == wire.AUTH_FAIL:
                raise AuthError(f"lock server at {addr} refused the key ({reply[1]})")
            if reply[0] != wire.AUTH_OK or not wire.hmac.compare_digest(
                    reply[1], wire.server_mac(key, msg[2], nonce_c)):
                raise AuthError(f"lock server at {addr} failed to prove the shared key")
            msg = [wire.STATUS, 1] if prefix is None else [wire.STATUS, 1, prefix]
            await stream.send_all(frame(msg))
            reply = await recv()
            if reply[0] != wire.REPLY:
                raise ProtocolError(f"unexpected answer {reply[0]} to STATUS")
            await stream.send_all(frame([wire.BYE]))
            return reply[2]
    except trio.TooSlowError:
        raise ConnectError(f"lock server at {addr} did not answer") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
        raise ConnectError(f"lock server at {addr}: {e}") from None
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()
