"""The lock client a node uses: one session, its lease, its locks, its callbacks.

Everything runs in the caller's trio event loop and never blocks it.  One reader task
handles the server's messages strictly in order (so a lock's grant and its blocking
callbacks cannot be misordered), one writer task sends, one task renews the lease and
one watches it.  Blocking callbacks run the holder's handler as a separate task.

The client reconnects on its own.  On the same server it resumes its session (the
server replays what the client missed, the client resends what the server did not
process); after a server restart it reclaims its locks during the grace period, when
its lease is still valid by its own clock.  See docs/LOCKS.md.

The session half (connecting, reconnecting, the reader, writer, heartbeat and lease
tasks, the server's messages about the session) is ``link.py``'s ``ServerLink``,
which ``LockClient`` inherits; the requests, grants and callbacks are here.
"""

import errno
import logging
import time
from collections import deque

import trio

from . import wire
from .errors import ConnectError, LockCancelled, LockError, LockTimeout, NodeBusy, from_code
from .handshake import query_status  # noqa: F401  (lockmgr.client.query_status)
from .link import RETRY_FAST, ServerLink
from .messages import F_FLOCK, F_NOTIFY, F_TRY, Op, dispatch_table, handles
from .modes import COMPAT, LVB_WRITERS, Mode, covers, supremum
from .plocks import Conflict as PlockConflict
from .plocks import Deadlock as PlockDeadlock
from .plocks import PlockError, PlockTable
from .table import LVB_SIZE

log = logging.getLogger("lockmgr.client")

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

    __slots__ = ("rid", "kind", "rec", "data", "event", "result", "error", "abandoned",
                 "plock")

    def __init__(self, rid: int, kind: Op, rec: _Rec | None, data: bytes):
        self.rid = rid
        self.kind = kind
        self.rec = rec
        self.data = data
        self.event = trio.Event()
        self.result = None
        self.error: LockError | None = None
        self.abandoned = False
        self.plock: tuple | None = None     # PLOCK: (name, owner, ltype, start, end, pid)


class LockClient(ServerLink):
    """A node's session with the lock server.  Create it with ``LockClient.connect``."""

    def __init__(self, addr: str, key: bytes, node: str, slot: int, *, lease: float,
                 renew: float, margin: float | None, connector=None,
                 busy_wait: float | None = None, handshake_timeout: float = 10.0,
                 silence: float | None = None):
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
        self.silence = silence
        self._connector = connector or (lambda: wire.open_stream(addr))
        self._last_heard = 0.0        # trio time of the last bytes from the server
        self.session_id: int | None = None
        self.boot_id: bytes | None = None
        #: how many times the session was lost and replaced by a new one
        self.generation = 0
        self._recs: dict[bytes, _Rec] = {}
        #: this node's granted fcntl/OFD/flock locks (owner = the kernel's lock owner),
        #: as the server granted them: reclaimed from a new master after a failover
        self._plocks = PlockTable()
        self._pending: dict[int, _Op] = {}
        self._unacked: deque = deque()   # (rid, frame) not yet known processed
        self._reclaim_rid = 0            # the last request reflected in a reclaim list
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
                      connector=None, busy_wait: float | None = None,
                      join_wait: float = 0.0, silence: float | None = None,
                      handshake_timeout: float = 10.0) -> "LockClient":
        """Authenticate, open a session and start the client's tasks in ``nursery``.

        Args:
            addr: "host:port" or "unix:/path".
            key: the shared secret.
            node: this node's name; slot: its volume slot.
            lease: the lease wanted (the server may shorten it to its own).
            renew: seconds between heartbeats.
            margin: safety margin of ``lease_valid`` (default: a fifth of the lease).
            connector: async callable returning a connected stream, called for every
                connection and reconnection; it may reach a different server each
                time (the current master).  If it has an attribute ``last``, that
                names the address it connected to (used in messages).
            busy_wait: how long to retry while the server says the node still has a
                live session (default: two leases).
            join_wait: how long to keep trying while the server cannot be reached
                (ConnectError), e.g. while no master is elected yet (default: no
                retry).
            silence: drop the connection and reconnect (through ``connector``) when
                nothing at all came from the server for this many seconds: a server
                that is paused or cut off keeps its TCP connection up.  None: wait
                for the lease to run out instead.
            handshake_timeout: a connection attempt (connect, authentication, the
                session's opening) that takes longer fails and is retried.

        Raises:
            ConnectError: the server cannot be reached.
            AuthError: the key was refused, or the server could not prove it.
            NodeBusy: the node or slot kept a live session for ``busy_wait``.
        """
        self = cls(addr, key, node, slot, lease=lease, renew=renew, margin=margin,
                   connector=connector, busy_wait=busy_wait,
                   handshake_timeout=handshake_timeout, silence=silence)
        start = trio.current_time()
        while True:
            try:
                stream, dec, leftover = await self._establish()
                break
            except NodeBusy as e:
                if trio.current_time() >= start + self.busy_wait:
                    raise
                log.info("%s; retrying", e)
                await trio.sleep(min(0.5, self.lease / 4))
            except ConnectError as e:
                if trio.current_time() >= start + join_wait:
                    raise
                log.info("%s; retrying", e)
                await trio.sleep(RETRY_FAST)
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
        flags = (F_TRY | (F_NOTIFY if notify else 0)) if try_lock else 0
        rec = await self._acquire(name)
        try:
            if on_blocking is not None:
                rec.handler = on_blocking
            if rec.mode is not None:
                if covers(rec.mode, mode):
                    self._release(rec)
                    return rec.grant
                rid = self._next_rid()
                op = self._start(Op.CONVERT, rec, rid, Op.CONVERT.encode(
                    rid=rid, name=rec.name, mode=supremum(rec.mode, mode), flags=flags,
                    timeout=timeout, lvb=None))
            else:
                rid = self._next_rid()
                op = self._start(Op.LOCK, rec, rid, Op.LOCK.encode(
                    rid=rid, name=rec.name, mode=mode, flags=flags, timeout=timeout))
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
                    rid = self._next_rid()
                    self._post(rid, Op.CONVERT.encode(rid=rid, name=rec.name, mode=mode,
                                                      flags=0, timeout=None, lvb=lvb))
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
            rid = self._next_rid()
            op = self._start(Op.CONVERT, rec, rid, Op.CONVERT.encode(
                rid=rid, name=rec.name, mode=mode, flags=F_TRY if try_lock else 0,
                timeout=timeout, lvb=lvb))
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
            rid = self._next_rid()
            self._post(rid, Op.UNLOCK.encode(rid=rid, name=rec.name, lvb=lvb))
            rec.mode = None
            rec.grant = None
            rec.lvb = None
        finally:
            self._release(rec)
        await trio.lowlevel.checkpoint_if_cancelled()

    # ---- fcntl, OFD and flock locks (plocks) ------------------------------------------

    async def plock(self, name: bytes, owner: int, ltype: int, start: int, end: int,
                    pid: int, *, wait: bool, flock: bool = False) -> None:
        """Take a POSIX (or, with ``flock``, a flock) lock for the kernel's lock
        ``owner`` on [start, end] (inclusive; ``plocks.OFFSET_MAX``: to the end),
        cluster-wide.

        With ``wait`` the request waits for conflicting locks to go.  A cancelled wait
        is withdrawn at the server, and the answer is still awaited (shielded): a
        grant that crossed the withdrawal stands, and this returns normally (the
        caller holds the lock, as when the grant came just before the signal);
        otherwise the cancellation goes on.  Giving such a grant back instead could
        not restore what the owner held before (an upgraded lock).

        Raises:
            PlockError: ``errno`` EAGAIN (a conflict and not ``wait``), EDEADLK (the
                wait would close a cycle of owners, fcntl locks only).
            LeaseLost, LockError.
        """
        rid = self._next_rid()
        flags = (0 if wait else F_TRY) | (F_FLOCK if flock else 0)
        op = self._start(Op.PLOCK, None, rid, Op.PLOCK.encode(
            rid=rid, name=name, owner=owner, ltype=ltype, start=start, end=end, pid=pid,
            flags=flags))
        op.plock = (name, owner, ltype, start, end, pid)
        try:
            err = await self._wait(op, None)
        except trio.Cancelled:
            # withdrawn (_abandon sent CANCEL): its answer comes, or the session's
            # loss finishes the request
            with trio.CancelScope(shield=True):
                await op.event.wait()
            if op.error is not None or op.result != 0:
                raise
            return
        if err:
            cls = {errno.EAGAIN: PlockConflict, errno.EDEADLK: PlockDeadlock}.get(err)
            if cls is not None:
                raise cls(f"{name!r}: {errno.errorcode.get(err, err)}")
            e = PlockError(f"{name!r}: lock server answered errno {err}")
            e.errno = err
            raise e

    async def pgetlk(self, name: bytes, owner: int, ltype: int, start: int,
                     end: int) -> tuple | None:
        """F_GETLK cluster-wide: ``(ltype, start, end, pid)`` of a lock of another
        owner (on any node) that conflicts with the one described, or None."""
        rid = self._next_rid()
        op = self._start(Op.PGET, None, rid, Op.PGET.encode(
            rid=rid, name=name, owner=owner, ltype=ltype, start=start, end=end))
        value = await self._wait(op, None)
        return None if value is None else tuple(value)

    async def punlock(self, name: bytes, owner: int, start: int, end: int) -> bool:
        """Release ``owner``'s locks on [start, end] of ``name`` and wait until the
        server has (a lock released by a close is free for every node when close()
        returns).  Nothing is sent when this node holds none there (every close of a
        file asks).  Returns whether a request went."""
        op = self._punlock_start(name, owner, start, end)
        if op is None:
            await trio.lowlevel.checkpoint()
            return False
        await self._wait(op, None)
        return True

    def _punlock_start(self, name: bytes, owner: int, start: int, end: int):
        if not any(lk.owner == owner and lk.start <= end and start <= lk.end
                   for _, lk in self._plocks.locks(name)):
            return None
        self._plocks.unlock(name, owner, start, end)
        rid = self._next_rid()
        return self._start(Op.PUNLOCK, None, rid, Op.PUNLOCK.encode(
            rid=rid, name=name, owner=owner, start=start, end=end))

    def plocks_held(self, name: bytes | None = None) -> list:
        """``[(name, Plock), ...]`` this node holds (of ``name``, or all)."""
        return self._plocks.locks(name)

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
        rid = self._next_rid()
        op = self._start(Op.RECOVERED, None, rid, Op.RECOVERED.encode(rid=rid, slot=slot))
        n = await self._wait(op, None)
        self._dead_nodes.pop(slot, None)
        return n

    async def status(self) -> dict:
        """The server's view: nodes, slots, lease ages, lock counts, waiters,
        recovering nodes."""
        rid = self._next_rid()
        op = self._start(Op.STATUS, None, rid, Op.STATUS.encode(rid=rid))
        return await self._wait(op, None)

    async def wait_connected(self) -> None:
        """Return once the client is connected to the server."""
        while not self._connected:
            await self._connected_event.wait()

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def closed(self) -> bool:
        """Whether ``close`` was called (the node is leaving the cluster)."""
        return self._closed

    def statistics(self) -> dict:
        """Counters for diagnostics: locks held, requests waiting, and the session."""
        return {"connected": self._connected, "session": self.session_id,
                "generation": self.generation, "lease_valid": self.lease_valid(),
                "lease_remaining": round(self.lease_remaining(), 3),
                "held": sum(1 for r in self._recs.values() if r.mode is not None),
                "plocks": len(self._plocks.locks()),
                "pending": len(self._pending), "unacked": len(self._unacked),
                "dead_nodes": len(self._dead_nodes)}

    def dump(self) -> list[str]:
        """Lines for a diagnostic dump: the requests waiting for an answer, and the
        locks with an operation in progress or a blocking callback running."""
        lines = [f"lock client: {self.statistics()}"]
        for rid, op in sorted(self._pending.items()):
            name = op.rec.name if op.rec is not None else b""
            lines.append(f"  pending rid {rid} {op.kind.name} {name!r}"
                         f"{' abandoned' if op.abandoned else ''}")
        for rec in self._recs.values():
            if rec.busy or rec.bast_running or rec.queue:
                lines.append(f"  lock {rec.name!r} {rec.mode.name if rec.mode else '-'}"
                             f" busy={rec.busy} queued={len(rec.queue)}"
                             f" bast_running={rec.bast_running}")
        return lines

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
            self._chan.send(Op.BYE.encode())
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

    def _post(self, rid: int, data: bytes, *, later: bool = True) -> None:
        """Send request ``rid`` (its frame ``data``), kept to be sent again until the
        server has processed it.

        ``later``: leave in the same write as what follows in this scheduling pass
        (for requests that need no answer: unlock, convert down).
        """
        self._unacked.append((rid, data))
        if self._connected:
            if later:
                self._chan.send_later(data)
            else:
                self._chan.send(data)

    def _processed(self, last_rid: int) -> None:
        """The server has processed the requests up to ``last_rid``: no resending."""
        unacked = self._unacked
        while unacked and unacked[0][0] <= last_rid:
            unacked.popleft()

    def _start(self, kind: Op, rec: _Rec | None, rid: int, data: bytes) -> _Op:
        """Send request ``rid`` (its frame ``data``), which is answered; returns its
        record, to wait on."""
        if self._closed:
            raise LockError("client closed")
        op = self._pending[rid] = _Op(rid, kind, rec, data)
        self._post(rid, data, later=False)
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
        if op.kind in (Op.LOCK, Op.CONVERT) and self._connected:
            self._chan.send(Op.CANCEL.encode(rid=op.rid, name=op.rec.name))
        elif op.kind == Op.PLOCK and self._connected:
            self._chan.send(Op.CANCEL.encode(rid=op.rid, name=op.plock[0]))

    def _finish(self, op: _Op, result=None, error=None) -> None:
        if self._pending.pop(op.rid, None) is None:
            return
        op.result = result
        op.error = error
        op.event.set()
        if op.rec is not None:
            self._release(op.rec)

    # ---- messages about locks -------------------------------------------------------

    @handles(Op.GRANT, "self")
    def _on_grant(self, rid: int, mode: Mode, lvb: bytes | None, lvb_ver: int) -> None:
        op = self._pending.get(rid)
        if op is None:
            return   # answer to an unlock or down-conversion we did not wait for
        rec = op.rec
        rec.mode = mode
        rec.lvb = lvb
        rec.ver = lvb_ver
        rec.grant = g = Grant(rec.name, mode, lvb)
        if op.abandoned and op.kind == Op.LOCK:
            # the caller gave up before the grant came: give the lock back
            rid = self._next_rid()
            self._post(rid, Op.UNLOCK.encode(rid=rid, name=rec.name, lvb=None))
            rec.mode = None
            rec.grant = None
            self._finish(op, error=LockCancelled("cancelled"))
            return
        self._finish(op, result=g)

    @handles(Op.FAIL, "self")
    def _on_fail(self, rid: int, code: str, text: str) -> None:
        op = self._pending.get(rid)
        if op is None:
            log.warning("lock server refused request %d: %s %s", rid, code, text)
            return
        name = op.rec.name if op.rec is not None else b""
        self._finish(op, error=from_code(code, f"{name!r}: {text or code}"))

    @handles(Op.REPLY, "self")
    def _on_reply(self, rid: int, value) -> None:
        op = self._pending.get(rid)
        if op is None:
            return
        if op.kind == Op.PLOCK and value == 0:
            # granted (also when the caller withdrew it meanwhile: plock() returns it)
            name, owner, ltype, start, end, pid = op.plock
            try:
                self._plocks.lock(name, owner, ltype, start, end, pid, wait=False,
                                  detect_deadlock=False)
            except PlockError as e:     # the server's view and ours differ: a bug
                log.error("plock %r granted by the server conflicts here: %s", name, e)
        self._finish(op, result=value)

    @handles(Op.BAST, "self")
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


def _handler_table() -> dict[int, tuple]:
    """The client's handlers of the server's messages, by code: those about locks
    (``LockClient``) and those about the session (``link.ServerLink``)."""
    locks = dispatch_table(LockClient, "self")
    session = dispatch_table(ServerLink, "self")
    both = locks.keys() & session.keys()
    if both:
        raise TypeError(f"two handlers for the messages {sorted(both)}")
    return {**locks, **session}


LockClient._handlers = _handler_table()
