"""The lock server: sessions, leases, recovery, grace, and the wire around ``LockTable``.

One trio task reads each connection and runs its messages straight through the lock
table (which is synchronous, so every operation is atomic); one writer task per
connection sends what the table produced.  One housekeeping task ticks for lease
expiry, request timeouts, deadlock detection, repeated blocking callbacks and the end of
the grace period.  Protocol: docs/LOCKS.md.
"""

import hmac
import logging
import os
import socket
from collections import deque
from typing import Callable

import trio

from . import wire
from .errors import ProtocolError
from .messages import (F_NOTIFY, F_TRY, Held, Op, Reclaim, Recovering, Resume,
                       dispatch_table, handles)
from .modes import Mode
from .plockserver import PlockService
from .table import Bast, Fail, Grant, LockTable, TableError

log = logging.getLogger("lockmgr.server")

LIVE, DEAD = "live", "dead"

#: what a handler of a client's message gets before the message's fields
CONTEXT = ("self", "conn", "s", "now")


class Conn:
    """One client connection: its channel, and the session it carries (if any)."""

    __slots__ = ("chan", "peer", "session", "authed", "cancel_scope")

    def __init__(self, stream, peer: str):
        self.chan = wire.Channel(stream)
        self.peer = peer
        self.session: "Session | None" = None
        self.authed = False
        self.cancel_scope: trio.CancelScope | None = None

    @property
    def closed(self) -> bool:
        return self.chan.closed

    def send(self, data: bytes) -> None:
        self.chan.send(data)

    def close(self) -> None:
        """Drop the connection (after what is queued has had a chance to go)."""
        self.chan.close()

    async def writer(self) -> None:
        try:
            await self.chan.writer()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        self.chan.closed = True
        if self.cancel_scope is not None:
            self.cancel_scope.cancel()


class Session:
    """A node's membership: lease, locks (in the table, owner = ``id``), and the
    numbered stream of messages sent to it (kept until acknowledged, for resumption)."""

    def __init__(self, sid: int, node: str, slot: int, lease: float, now: float):
        self.id = sid
        self.node = node
        self.slot = slot
        self.lease = lease
        self.last_heard = now
        self.state = LIVE
        self.conn: Conn | None = None
        self.sent = 0            # messages in the numbered stream so far
        self.buf: deque = deque()  # the unacknowledged tail of that stream
        self.buf_base = 0        # number of the first message in buf
        self.last_rid = 0        # the last client request id processed
        self.placeholder = False  # a dead node announced by a reclaiming client
        self.opened = "new"      # how it began: new, reclaimed, expired

    def emit(self, data: bytes) -> None:
        self.sent += 1
        self.buf.append(data)
        if self.conn is not None:
            self.conn.send(data)

    def ack(self, received: int) -> None:
        buf = self.buf
        drop = min(received - self.buf_base, len(buf))
        for _ in range(drop):
            buf.popleft()
        if drop > 0:
            self.buf_base += drop


class LockServer:
    """The lock manager server.

    Args:
        key: the shared secret (from the key file).
        lease: seconds without a message after which a node is declared dead.
        grace: seconds after start during which only reclaims are granted
            (default: the lease).
        deadlock_wait: seconds a request waits before it takes part in deadlock detection.
        bast_repeat: seconds between repeats of unanswered blocking callbacks.
        tick: housekeeping period in seconds.
        max_frame: the largest frame accepted from a client.
        auth_timeout: seconds a new connection has to authenticate.
        may_act: asked before the server changes its state or sends anything (each
            batch of a client's messages, each housekeeping tick, each call of the
            public methods that announce); once it says False the server stops for
            good: it sends nothing more, drops every connection, and ``run`` returns
            (``stopped`` is then True).  A master passes its lease's ``valid``.
        thaw_prefix: while the table is frozen only by dead nodes whose locks are
            unknown (not by the grace period), names starting with it are granted
            as usual: the locks that members take to recover those nodes.

    ``info`` (a dict the caller may fill: the master's node, address, generation) is
    part of ``status()``.
    """

    def __init__(self, key: bytes, *, lease: float = 5.0, grace: float | None = None,
                 deadlock_wait: float = 1.0, bast_repeat: float = 2.0,
                 tick: float = 0.05, max_frame: int = 65536, auth_timeout: float = 10.0,
                 may_act: Callable[[], bool] | None = None,
                 thaw_prefix: bytes | None = None):
        if len(key) < wire.KEY_MIN:
            raise ValueError("key too short")
        self.key = key
        self.lease = lease
        self.grace = lease if grace is None else grace
        self.deadlock_wait = deadlock_wait
        self.bast_repeat = bast_repeat
        self.tick = tick
        self.max_frame = max_frame
        self.auth_timeout = auth_timeout
        self.boot_id = os.urandom(8)
        self.table = LockTable()
        self.sessions: dict[int, Session] = {}
        self.deadlines: dict = {}
        self.addresses: list[str] = []
        self._next_sid = 1
        self._start = 0.0
        self._grace_until = 0.0
        self._in_grace = False
        self._conns: set[Conn] = set()
        self._nursery: trio.Nursery | None = None
        self._unix_path: str | None = None
        self.may_act = may_act
        self.thaw_prefix = thaw_prefix
        self.info: dict = {}
        self.stopped = False
        self._stop_event = trio.Event()
        self._expected: set[int] | None = None
        #: slot -> trio time its dead sessions were last released (``recovered``)
        self.last_recovered: dict[int, float] = {}
        #: slots whose locks from before this server (unknown here) were recovered
        self._unknown_recovered: set[int] = set()
        #: try-locks held back while the table is frozen: (session, rid, name, call)
        self._parked: list = []
        #: fcntl, OFD and flock locks of the volume's files (lockmgr/plockserver.py)
        self.plocks = PlockService(self.sessions)

    # ---- running -----------------------------------------------------------------

    async def run(self, listen: str | None = None, unix: str | None = None, *,
                  task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Listen on ``listen`` ("HOST:PORT", port 0 picks one) and/or a Unix socket
        ``unix``, and serve until cancelled or until ``may_act`` says no.
        ``task_status.started`` gets the list of addresses ("host:port",
        "unix:/path")."""
        listeners = []
        addresses = []
        if listen is not None:
            kind = wire.parse_addr(listen)
            if kind[0] == "unix":
                unix, listen = kind[1], None
            else:
                for lst in await trio.open_tcp_listeners(kind[2], host=kind[1]):
                    listeners.append(lst)
                    host, port = lst.socket.getsockname()[:2]
                    addresses.append(f"[{host}]:{port}" if ":" in host
                                     else f"{host}:{port}")
        if unix is not None:
            listeners.append(await self._unix_listener(unix))
            addresses.append(f"unix:{unix}")
        self.addresses = addresses
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.start_service()
                nursery.start_soon(self._housekeeping)
                for lst in listeners:
                    nursery.start_soon(self._accept_loop, lst)
                log.info("lock server listening on %s (lease %.1fs, grace %.1fs)",
                         ", ".join(addresses) or "(no listener)", self.lease, self.grace)
                task_status.started(addresses)
                await self._stop_event.wait()
                nursery.cancel_scope.cancel()
        finally:
            if self._unix_path is not None:
                try:
                    os.unlink(self._unix_path)
                except OSError:
                    pass

    def start_service(self) -> None:
        """Start the clock of the grace period (``run`` calls it)."""
        self._start = trio.current_time()
        self._grace_until = self._start + self.grace
        self._in_grace = self.grace > 0
        self._set_frozen()

    async def serve_stream(self, stream, peer: str = "memory") -> None:
        """Serve one already-connected stream (tests use in-memory streams)."""
        conn = Conn(stream, peer)
        self._conns.add(conn)
        try:
            async with trio.open_nursery() as nursery:
                conn.cancel_scope = nursery.cancel_scope
                nursery.start_soon(conn.writer)
                try:
                    await self._read_loop(conn)
                except ProtocolError as e:
                    log.warning("dropping connection from %s: protocol error: %s",
                                conn.peer, e)
                    conn.send(Op.ERROR.encode(text=f"protocol error: {e}"))
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
                except Exception:
                    log.exception("internal error on the connection from %s; dropping it",
                                  conn.peer)
                # let the writer send what is queued (it cancels the nursery when done)
                conn.close()
                with trio.move_on_after(1):
                    await trio.sleep_forever()
                nursery.cancel_scope.cancel()
        finally:
            conn.chan.closed = True
            self._conns.discard(conn)
            s = conn.session
            if s is not None and s.conn is conn:
                s.conn = None
                log.info("node %s (slot %d) disconnected", s.node, s.slot)
            with trio.CancelScope(shield=True):
                with trio.move_on_after(1):
                    try:
                        await stream.aclose()
                    except Exception:
                        pass

    async def _accept_loop(self, listener) -> None:
        await accept_streams(listener, lambda stream, peer: self._nursery.start_soon(
            self.serve_stream, stream, peer))

    async def _unix_listener(self, path: str):
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)   # a stale socket of a dead server
            else:
                raise OSError(f"{path}: another server is listening there")
            finally:
                probe.close()
        await sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(128)
        self._unix_path = path
        return trio.SocketListener(sock)

    # ---- acting only while allowed ---------------------------------------------------

    def acting(self) -> bool:
        """Whether the server may change state and send now (``may_act``); the first
        False stops it for good.  Callers check it with no wait between the check and
        what it guards."""
        if self.stopped:
            return False
        if self.may_act is None or self.may_act():
            return True
        self.stop("it may no longer act (its master lease is not valid)")
        return False

    def stop(self, why: str = "stopped") -> None:
        """Stop for good: nothing more is sent, every connection is dropped, ``run``
        returns."""
        if self.stopped:
            return
        self.stopped = True
        log.warning("lock server stops: %s", why)
        for conn in list(self._conns):
            conn.chan.closed = True          # Channel.send is a no-op from now on
            del conn.chan.buf[:]
            if conn.cancel_scope is not None:
                conn.cancel_scope.cancel()
        self._stop_event.set()

    # ---- reading -------------------------------------------------------------------

    async def _read_loop(self, conn: Conn) -> None:
        if not self.acting():
            return
        nonce = wire.new_nonce()
        conn.send(Op.CHALLENGE.encode(version=wire.PROTOCOL_VERSION, nonce_s=nonce,
                                      boot_id=self.boot_id))
        dec = wire.FrameDecoder(self.max_frame)
        chan = conn.chan
        with trio.move_on_after(self.auth_timeout) as auth_scope:
            while not conn.authed:
                data = await chan.receive_some()
                if not data:
                    return
                msgs = dec.feed(data)
                if not msgs:
                    continue
                if not self.acting():
                    return
                if msgs[0][0] != Op.AUTH:
                    raise ProtocolError(f"operation {msgs[0][0]} before authentication")
                self._authenticate(conn, nonce, *Op.AUTH.decode(msgs[0]))
                if not conn.authed:
                    return
                self._dispatch(conn, msgs[1:])
        if auth_scope.cancelled_caught:
            log.warning("dropping connection from %s: no authentication within %.0fs",
                        conn.peer, self.auth_timeout)
            return
        while not conn.closed:
            data = await chan.receive_some()
            if not data:
                return
            self._dispatch(conn, dec.feed(data))

    @handles(Op.AUTH, "self", "conn", "nonce")
    def _authenticate(self, conn: Conn, nonce: bytes, nonce_c: bytes, mac: bytes) -> None:
        if not hmac.compare_digest(mac, wire.client_mac(self.key, nonce, nonce_c)):
            log.warning("authentication failed from %s: wrong key", conn.peer)
            conn.send(Op.AUTH_FAIL.encode(text="authentication failed: wrong key"))
            conn.close()
            return
        conn.authed = True
        conn.send(Op.AUTH_OK.encode(mac=wire.server_mac(self.key, nonce, nonce_c)))

    def _dispatch(self, conn: Conn, msgs: list) -> None:
        """Run a connection's messages, in order, each by its ``_op_*`` handler."""
        if not msgs or not self.acting():
            return
        now = trio.current_time()
        for msg in msgs:
            if conn.closed:
                return
            s = conn.session
            if s is not None:
                if s.conn is not conn or s.state != LIVE:
                    raise ProtocolError("session no longer attached to this connection")
                s.last_heard = now
            handler = _HANDLERS.get(msg[0])
            if handler is None:
                raise ProtocolError(f"unknown operation {msg[0]!r}")
            decode, fn, _ = handler
            try:
                fn(self, conn, s, now, *decode(msg))
            except (TypeError, ValueError, IndexError, AttributeError) as e:
                raise ProtocolError(f"malformed operation {msg[0]!r}: {e}") from None
            self._flush()

    # ---- operations ----------------------------------------------------------------

    def _need_session(self, s):
        if s is None:
            raise ProtocolError("operation needs an open session")
        return s

    def _next_request(self, s: Session | None, rid: int) -> Session:
        """The session of a lock request numbered ``rid`` (ids increase)."""
        s = self._need_session(s)
        if rid <= s.last_rid:
            raise ProtocolError("request ids must increase")
        s.last_rid = rid
        return s

    @handles(Op.LOCK, *CONTEXT)
    def _op_lock(self, conn: Conn, s: Session | None, now: float, rid: int, name: bytes,
                 mode: Mode, flags: int, timeout: float | None) -> None:
        s = self._next_request(s, rid)
        if self._decide(s, rid, name, flags, lambda: self.table.request(
                s.id, name, mode, rid, try_lock=flags & F_TRY,
                notify=flags & F_NOTIFY, now=now)) and timeout is not None:
            self._time_limit(s, name, rid, now + timeout)

    @handles(Op.CONVERT, *CONTEXT)
    def _op_convert(self, conn: Conn, s: Session | None, now: float, rid: int,
                    name: bytes, mode: Mode, flags: int, timeout: float | None,
                    lvb: bytes | None) -> None:
        s = self._next_request(s, rid)
        if self._decide(s, rid, name, flags, lambda: self.table.convert(
                s.id, name, mode, rid, lvb=lvb, try_lock=flags & F_TRY,
                notify=flags & F_NOTIFY, now=now)) and timeout is not None:
            self._time_limit(s, name, rid, now + timeout)

    def _decide(self, s: Session, rid: int, name: bytes, flags: int, call) -> bool:
        """Run a lock request or conversion (``call``) in the table; a try-lock of a
        frozen name is held back instead (``_set_frozen`` decides it later).  True
        when the table took the request."""
        if flags & F_TRY and not self.table.serves(name):
            self._parked.append((s.id, rid, name, call))
            return False
        try:
            call()
        except TableError as e:
            self._refuse(s, rid, e)
            return False
        return True

    @handles(Op.UNLOCK, *CONTEXT)
    def _op_unlock(self, conn: Conn, s: Session | None, now: float, rid: int,
                   name: bytes, lvb: bytes | None) -> None:
        s = self._next_request(s, rid)
        try:
            self.table.unlock(s.id, name, lvb=lvb)
        except TableError as e:
            self._refuse(s, rid, e)

    @staticmethod
    def _refuse(s: Session, rid: int, e: TableError) -> None:
        s.emit(Op.FAIL.encode(rid=rid, code="error", text=str(e)))

    def _time_limit(self, s: Session, name: bytes, rid: int, deadline: float) -> None:
        """Fail request ``rid`` with ``timeout`` at ``deadline``, if it waits."""
        lk = self.table.lock_of(s.id, name)
        if lk is not None and lk.requested is not None and lk.rid == rid:
            self.deadlines[(s.id, name, rid)] = deadline

    @handles(Op.PLOCK, *CONTEXT)
    def _op_plock(self, conn: Conn, s: Session | None, now: float, rid: int, name: bytes,
                  owner: int, ltype: int, start: int, end: int, pid: int,
                  flags: int) -> None:
        s = self._next_request(s, rid)
        self.plocks.lock(s, rid, name, owner, ltype, start, end, pid, flags)

    @handles(Op.PGET, *CONTEXT)
    def _op_pget(self, conn: Conn, s: Session | None, now: float, rid: int, name: bytes,
                 owner: int, ltype: int, start: int, end: int) -> None:
        s = self._next_request(s, rid)
        self.plocks.get(s, rid, name, owner, ltype, start, end)

    @handles(Op.PUNLOCK, *CONTEXT)
    def _op_punlock(self, conn: Conn, s: Session | None, now: float, rid: int,
                    name: bytes, owner: int, start: int, end: int) -> None:
        s = self._next_request(s, rid)
        self.plocks.unlock(s, rid, name, owner, start, end)

    @handles(Op.HB, *CONTEXT)
    def _op_hb(self, conn: Conn, s: Session | None, now: float, hb_id: int,
               received: int) -> None:
        s = self._need_session(s)
        if received > s.sent:
            raise ProtocolError("bad heartbeat")
        s.ack(received)
        s.conn.send(Op.HB_ACK.encode(hb_id=hb_id, last_rid=s.last_rid))

    @handles(Op.CANCEL, *CONTEXT)
    def _op_cancel(self, conn: Conn, s: Session | None, now: float, rid: int,
                   name: bytes) -> None:
        s = self._need_session(s)
        if self.plocks.cancel(s, rid):
            return
        for item in self._parked:
            if item[0] == s.id and item[1] == rid:
                self._parked.remove(item)
                s.emit(Op.FAIL.encode(rid=rid, code="cancelled", text=""))
                return
        self.table.cancel(s.id, name, "cancelled", rid=rid)

    @handles(Op.RECOVERED, *CONTEXT)
    def _op_recovered(self, conn: Conn, s: Session | None, now: float, rid: int,
                      slot: int) -> None:
        s = self._need_session(s)
        n = self.recovered(slot, by=s.node)
        s.emit(Op.REPLY.encode(rid=rid, value=n))

    @handles(Op.STATUS, *CONTEXT)
    def _op_status(self, conn: Conn, s: Session | None, now: float, rid: int,
                   prefix: bytes | None) -> None:
        data = Op.REPLY.encode(rid=rid, value=self.status(prefix))
        if s is not None:
            s.emit(data)
        else:
            conn.send(data)

    @handles(Op.BYE, *CONTEXT)
    def _op_bye(self, conn: Conn, s: Session | None, now: float) -> None:
        if s is not None:
            log.info("node %s (slot %d) left; releasing %d locks", s.node, s.slot,
                     len(self.table.locks_of(s.id)))
            self.table.release_owner(s.id, invalidate=False)
            self.plocks.release_session(s.id)
            del self.sessions[s.id]
            s.conn = None
            self._flush()
        conn.close()

    @handles(Op.OPEN, *CONTEXT)
    def _op_open(self, conn: Conn, s: Session | None, now: float, node: str, slot: int,
                 lease: float, resume: Resume | None, reclaim: list[Reclaim] | None,
                 recovering: list[Recovering] | None, plocks: list[Held] | None) -> None:
        if s is not None:
            raise ProtocolError("session already open on this connection")
        if not node or slot < 0:
            raise ProtocolError("bad node name or slot")
        lease = float(lease) if lease else self.lease
        lease = min(lease, self.lease)
        # resumption of a live session on this server
        if resume is not None:
            s = self.sessions.get(resume.session)
            if (resume.boot_id == self.boot_id and s is not None and s.state == LIVE
                    and s.node == node and s.buf_base <= resume.received <= s.sent):
                old = s.conn
                if old is not None:
                    old.session = None
                    old.close()
                s.conn = conn
                conn.session = s
                s.last_heard = now
                s.ack(resume.received)
                conn.send(Op.OPENED.encode(state="resumed", session=s.id,
                                           boot_id=self.boot_id, lease=s.lease,
                                           last_rid=s.last_rid, refused=[],
                                           grace_left=self._grace_left(now)))
                for data in s.buf:
                    conn.send(data)
                log.info("node %s (slot %d) reconnected from %s", node, slot, conn.peer)
                return
        for other in self.sessions.values():
            if other.state == LIVE and (other.node == node or other.slot == slot):
                left = other.lease - (now - other.last_heard)
                what = (f"node {node} already has a live session" if other.node == node
                        else f"slot {slot} is in use by node {other.node}")
                conn.send(Op.REFUSED.encode(
                    code="busy", text=f"{what} (its lease ends in {max(left, 0):.1f}s)"))
                log.info("refused session for node %s slot %d: %s", node, slot, what)
                return
        sid = self._next_sid
        self._next_sid += 1
        s = Session(sid, node, slot, lease, now)
        s.conn = conn
        conn.session = s
        self.sessions[sid] = s
        refused = []
        if resume is None:
            state = "new"
        elif resume.boot_id != self.boot_id and self._in_grace and reclaim is not None:
            state = "reclaimed"
            for item in reclaim:
                if not self.table.reclaim(sid, item.name, item.mode, item.lvb,
                                          item.lvb_ver):
                    refused.append(item.name)
            if refused:
                log.error("node %s: %d reclaimed locks conflict and were refused",
                          node, len(refused))
            if plocks:
                self.plocks.reclaim(s, plocks)
        else:
            state = "expired"
        s.opened = state
        conn.send(Op.OPENED.encode(state=state, session=sid, boot_id=self.boot_id,
                                   lease=lease, last_rid=0, refused=refused,
                                   grace_left=self._grace_left(now)))
        log.info("node %s (slot %d) joined from %s: session %d, %s%s", node, slot,
                 conn.peer, sid, state,
                 f", {len(reclaim) - len(refused)} locks reclaimed"
                 if state == "reclaimed" else "")
        for d in self.sessions.values():
            if d.state == DEAD:
                s.emit(Op.NODE_DOWN.encode(node=d.node, slot=d.slot))
        if resume is not None and resume.boot_id != self.boot_id:
            # dead nodes announced by the previous server, maybe not yet recovered: their
            # locks are unknown here, so nothing new is granted until they are
            for item in recovering or ():
                self._placeholder(item.node, item.slot, now,
                                  "was dead before the lock server restarted")
            if state == "expired" and slot not in self._unknown_recovered:
                # its lease ran out while no server could renew it: it held locks of
                # the previous server's that nobody here knows, and stops writing
                # with its journal unrecovered; so: dead, its locks unknown (unless
                # its slot was declared dead and recovered here already)
                self._placeholder(node, slot, now, "lost its lease while the lock "
                                  "server changed")

    def _placeholder(self, node: str, slot: int, now: float, why: str) -> None:
        for d in self.sessions.values():
            if d.slot == slot and d.state == DEAD:
                return
        sid = self._next_sid
        self._next_sid += 1
        d = Session(sid, node, slot, 0.0, now)
        d.state = DEAD
        d.placeholder = True
        self.sessions[sid] = d
        log.warning("node %s (slot %d) %s and is not recovered: its locks are unknown, "
                    "so nothing new is granted until it is", node, slot, why)
        self._announce(Op.NODE_DOWN.encode(node=node, slot=slot))
        self._set_frozen()

    def declare_slot_dead(self, node: str, slot: int) -> None:
        """Declare dead a member that has no session here (the master saw the slot's
        disk heartbeat stop): its locks are unknown, so the table stays frozen (but
        for ``thaw_prefix``) until the slot is reported recovered; every member,
        and every member that joins later, is told ``NODE_DOWN``.

        A no-op when the slot already has a dead session, or when the server may not
        act.

        Raises:
            ValueError: the slot has a live session.
        """
        for d in self.sessions.values():
            if d.slot == slot and d.state == LIVE:
                raise ValueError(f"slot {slot} has a live session (node {d.node})")
        if not self.acting():
            return
        self._placeholder(node, slot, trio.current_time(),
                          "was declared dead (its disk heartbeat stopped)")
        self._flush()

    def expect_slots(self, slots) -> None:
        """The members expected back after a restart: the grace period ends (at the
        next tick) as soon as each of these slots has a live or a dead session.
        ``grace`` stays the upper bound."""
        self._expected = set(slots)

    @property
    def in_grace(self) -> bool:
        """Whether the grace period (only reclaims are granted) is still on."""
        return self._in_grace

    # ---- membership ------------------------------------------------------------------

    def declare_dead(self, s: Session) -> None:
        """The node's lease expired: keep its locks recovering, tell every member."""
        s.state = DEAD
        self.table.mark_dead(s.id)
        self.plocks.session_dead(s)
        for key in [k for k in self.deadlines if k[0] == s.id]:
            del self.deadlines[key]
        n = len(self.table.locks_of(s.id))
        log.warning("node %s (slot %d) declared dead: lease expired; %d locks held "
                    "until its slot is recovered", s.node, s.slot, n)
        if s.conn is not None:
            s.conn.send(Op.ERROR.encode(text="session expired"))
            s.conn.session = None
            s.conn.close()
            s.conn = None
        s.buf.clear()
        self._announce(Op.NODE_DOWN.encode(node=s.node, slot=s.slot))

    def recovered(self, slot: int, by: str = "?") -> int:
        """A member reports the slot recovered: release its dead nodes' locks.

        Returns the number of dead sessions released.
        """
        dead = [d for d in self.sessions.values() if d.state == DEAD and d.slot == slot]
        for d in dead:
            n = self.table.release_owner(d.id, invalidate=True)
            n += self.plocks.release_session(d.id)
            del self.sessions[d.id]
            log.info("slot %d (node %s) recovered by %s: %d locks released",
                     slot, d.node, by, n)
            if d.placeholder:
                self._unknown_recovered.add(slot)
                # its locks were unknown here, so were the value blocks it may have
                # changed under PW/EX: a value reclaimed by another node may be older
                v = self.table.invalidate_values()
                log.info("slot %d's locks were unknown: %d value blocks marked invalid",
                         slot, v)
        if dead:
            self.last_recovered[slot] = trio.current_time()
            self._announce(Op.NODE_RECOVERED.encode(slot=slot))
            self._set_frozen()
        return len(dead)

    def _announce(self, data: bytes) -> None:
        """Send the frame ``data`` in the numbered stream of every live session."""
        for s in self.sessions.values():
            if s.state == LIVE:
                s.emit(data)

    def _set_frozen(self) -> None:
        """Freeze the table during the grace period (nothing new granted) and while a
        dead node's locks are unknown (then the thaw prefix's names are served).

        A try-lock cannot be answered while its name is frozen (a conflicting lock
        may not be known yet): it is held back and decided once the name is served.
        """
        now = trio.current_time()
        if self._in_grace:
            self.table.set_frozen(True, now=now)
        elif any(d.placeholder for d in self.sessions.values()):
            self.table.set_frozen(True, self.thaw_prefix, now=now)
        else:
            self.table.set_frozen(False, now=now)
        # plocks: held back while anything is frozen (reclaims may be missing, a dead
        # node's plocks are unknown until it is recovered)
        self.plocks.set_frozen(bool(self.table.frozen))
        if self._parked:
            parked, self._parked = self._parked, []
            for sid, rid, name, call in parked:
                s = self.sessions.get(sid)
                if s is not None and s.state == LIVE:
                    self._decide(s, rid, name, F_TRY, call)     # (parked again if frozen)

    def _all_expected_back(self) -> bool:
        if self._expected is None:
            return False
        have = {s.slot for s in self.sessions.values()}
        return self._expected <= have

    def _grace_left(self, now: float) -> float:
        return max(0.0, self._grace_until - now) if self._in_grace else 0.0

    # ---- effects and housekeeping -------------------------------------------------------

    def _flush(self) -> None:
        out = self.table.out
        if not out:
            return
        self.table.out = []
        sessions = self.sessions
        deadlines = self.deadlines
        for e in out:
            s = sessions.get(e.owner)
            if s is None or s.state != LIVE:
                continue
            t = type(e)
            if t is Grant:
                if deadlines:
                    deadlines.pop((e.owner, e.name, e.rid), None)
                s.emit(Op.GRANT.encode(rid=e.rid, mode=e.mode, lvb=e.lvb,
                                       lvb_ver=e.lvb_ver))
            elif t is Fail:
                if deadlines:
                    deadlines.pop((e.owner, e.name, e.rid), None)
                s.emit(Op.FAIL.encode(rid=e.rid, code=e.code, text=""))
            elif t is Bast:
                s.emit(Op.BAST.encode(name=e.name, mode=e.mode))

    async def _housekeeping(self) -> None:
        last_deadlock = last_bast = trio.current_time()
        while True:
            await trio.sleep(self.tick)
            if not self.acting():
                return
            now = trio.current_time()
            self.housekeep(now)
            if self.table.contended():
                if now - last_deadlock >= self.deadlock_wait / 4:
                    last_deadlock = now
                    for v in self.table.break_deadlocks(now, self.deadlock_wait):
                        s = self.sessions.get(v.owner)
                        log.info("deadlock: failing the request of node %s for %r",
                                 s.node if s else v.owner, v.name)
                if now - last_bast >= self.bast_repeat:
                    last_bast = now
                    self.table.repeat_basts()
            else:
                last_bast = now
            self._flush()

    def housekeep(self, now: float) -> None:
        """Expire leases and timeouts, end the grace period (the tick's work)."""
        if self._in_grace and (now >= self._grace_until or self._all_expected_back()):
            self._in_grace = False
            log.info("grace period over%s: normal service",
                     "" if now >= self._grace_until else
                     f" after {now - self._start:.2f}s (every expected member is back "
                     "or known dead)")
            self._set_frozen()
        for s in list(self.sessions.values()):
            if s.state == LIVE and now - s.last_heard > s.lease:
                self.declare_dead(s)
        if self.deadlines:
            self.table.expire(now, self.deadlines)
        self._flush()

    # ---- status -----------------------------------------------------------------------

    def status(self, prefix: bytes | None = None) -> dict:
        """Nodes, leases, lock counts.  With ``prefix``, also ``held``: every granted
        lock whose name starts with it, with its holder (name, node, slot, mode,
        dead)."""
        now = trio.current_time()
        nodes, recovering = [], []
        waiters = locks = 0
        for s in self.sessions.values():
            mine = self.table.locks_of(s.id)
            held = sum(1 for lk in mine.values() if lk.granted is not None)
            pend = sum(1 for lk in mine.values() if lk.requested is not None)
            locks += held
            waiters += pend
            if s.state == LIVE:
                pheld, pwait = self.plocks.counts(s.id)
                nodes.append({"node": s.node, "slot": s.slot, "session": s.id,
                              "connected": s.conn is not None,
                              "lease_age": round(now - s.last_heard, 3),
                              "lease": s.lease, "locks": held, "waiting": pend,
                              "plocks": pheld, "plocks_waiting": pwait,
                              "opened": s.opened})
            else:
                recovering.append({"node": s.node, "slot": s.slot, "session": s.id,
                                   "locks": held, "unknown_locks": s.placeholder})
        out = {**self.info,
               "boot_id": self.boot_id.hex(), "uptime": round(now - self._start, 3),
               "lease": self.lease, "grace_left": round(self._grace_left(now), 3),
               "frozen": self.table.frozen, "nodes": nodes, "recovering": recovering,
               "resources": len(self.table.names()), "locks": locks,
               "waiters": waiters, "connections": len(self._conns)}
        if prefix is not None:
            held = []
            for name in self.table.names():
                if not name.startswith(prefix):
                    continue
                for owner, lk in self.table.resource(name).granted.items():
                    s = self.sessions.get(owner)
                    held.append({"name": name, "node": s.node if s else "?",
                                 "slot": s.slot if s else -1, "mode": lk.granted.name,
                                 "dead": s is None or s.state != LIVE})
            out["held"] = held
        return out


async def accept_streams(listener, on_stream) -> None:
    """Accept connections on ``listener`` until cancelled; each goes to
    ``on_stream(stream, peer)`` (synchronous: it starts a task for it), ``peer``
    naming the other end ("host:port", "unix" or "?")."""
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as e:
                log.error("accept failed: %s", e)
                await trio.sleep(0.1)
                continue
            try:
                peer = stream.socket.getpeername()
                peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
            except Exception:
                peer = "?"
            on_stream(stream, peer)


#: the server's handlers of a client's messages (after authentication), by code
_HANDLERS = dispatch_table(LockServer, *CONTEXT)
