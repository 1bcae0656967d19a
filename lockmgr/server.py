"""The lock server: sessions, leases, recovery, grace, and the wire around ``LockTable``.

One trio task reads each connection and runs its messages straight through the lock
table (which is synchronous, so every operation is atomic); one writer task per
connection sends what the table produced.  One housekeeping task ticks for lease
expiry, request timeouts, deadlock detection, repeated blocking callbacks and the end of
the grace period.  Protocol: docs/LOCKS.md.
"""

import logging
import os
import socket
from collections import deque

import trio

from . import wire
from .errors import ProtocolError
from .modes import wire_mode
from .table import LVB_SIZE, Bast, Fail, Grant, LockTable, TableError
from .wire import frame

log = logging.getLogger("lockmgr.server")

MAX_NAME = 1024
LIVE, DEAD = "live", "dead"


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
    """

    def __init__(self, key: bytes, *, lease: float = 5.0, grace: float | None = None,
                 deadlock_wait: float = 1.0, bast_repeat: float = 2.0,
                 tick: float = 0.05, max_frame: int = 65536, auth_timeout: float = 10.0):
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

    # ---- running -----------------------------------------------------------------

    async def run(self, listen: str | None = None, unix: str | None = None, *,
                  task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Listen on ``listen`` ("HOST:PORT", port 0 picks one) and/or a Unix socket
        ``unix``, and serve until cancelled.  ``task_status.started`` gets the list of
        addresses ("host:port", "unix:/path")."""
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
                    addresses.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
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
        self.table.set_frozen(self._frozen())

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
                    conn.send(frame([wire.ERROR, f"protocol error: {e}"]))
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
                self._nursery.start_soon(self.serve_stream, stream, peer)

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

    # ---- reading -------------------------------------------------------------------

    async def _read_loop(self, conn: Conn) -> None:
        nonce = wire.new_nonce()
        conn.send(frame([wire.CHALLENGE, wire.PROTOCOL_VERSION, nonce, self.boot_id]))
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
                self._authenticate(conn, msgs[0], nonce)
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

    def _authenticate(self, conn: Conn, msg: list, nonce: bytes) -> None:
        if msg[0] != wire.AUTH:
            raise ProtocolError(f"operation {msg[0]} before authentication")
        if (len(msg) != 3 or type(msg[1]) is not bytes or len(msg[1]) != wire.NONCE_SIZE
                or type(msg[2]) is not bytes):
            raise ProtocolError("malformed AUTH")
        if not wire.hmac.compare_digest(msg[2], wire.client_mac(self.key, nonce, msg[1])):
            log.warning("authentication failed from %s: wrong key", conn.peer)
            conn.send(frame([wire.AUTH_FAIL, "authentication failed: wrong key"]))
            conn.close()
            return
        conn.authed = True
        conn.send(frame([wire.AUTH_OK, wire.server_mac(self.key, nonce, msg[1])]))

    def _dispatch(self, conn: Conn, msgs: list) -> None:
        now = trio.current_time()
        s = conn.session
        for msg in msgs:
            if conn.closed:
                return
            op = msg[0]
            if s is not None:
                if s.conn is not conn or s.state != LIVE:
                    raise ProtocolError("session no longer attached to this connection")
                s.last_heard = now
            try:
                if op == wire.LOCK or op == wire.CONVERT or op == wire.UNLOCK:
                    self._op_lock(s, msg, now)
                elif op == wire.HB:
                    self._op_hb(s, msg)
                elif op == wire.CANCEL:
                    self._op_cancel(s, msg)
                elif op == wire.OPEN:
                    s = self._op_open(conn, msg, now)
                elif op == wire.RECOVERED:
                    self._op_recovered(s, msg)
                elif op == wire.STATUS:
                    self._op_status(conn, s, msg)
                elif op == wire.BYE:
                    self._op_bye(conn, s)
                    return
                else:
                    raise ProtocolError(f"unknown operation {op!r}")
            except (TypeError, ValueError, IndexError, AttributeError) as e:
                raise ProtocolError(f"malformed operation {op!r}: {e}") from None
            self._flush()

    # ---- operations ----------------------------------------------------------------

    def _need_session(self, s):
        if s is None:
            raise ProtocolError("operation needs an open session")
        return s

    def _op_lock(self, s: Session, msg: list, now: float) -> None:
        s = self._need_session(s)
        op, rid, name = msg[0], msg[1], msg[2]
        if type(rid) is not int or type(name) is not bytes or len(name) > MAX_NAME:
            raise ProtocolError("bad request id or resource name")
        if rid <= s.last_rid:
            raise ProtocolError("request ids must increase")
        s.last_rid = rid
        table = self.table
        try:
            if op == wire.LOCK:
                _, _, _, mode, flags, timeout = msg
                table.request(s.id, name, wire_mode(mode), rid, try_lock=flags & wire.F_TRY,
                              notify=flags & wire.F_NOTIFY, now=now)
            elif op == wire.CONVERT:
                _, _, _, mode, flags, timeout, lvb = msg
                self._check_lvb(lvb)
                table.convert(s.id, name, wire_mode(mode), rid, lvb=lvb,
                              try_lock=flags & wire.F_TRY, notify=flags & wire.F_NOTIFY,
                              now=now)
            else:
                _, _, _, lvb = msg
                self._check_lvb(lvb)
                timeout = None
                table.unlock(s.id, name, lvb=lvb)
        except TableError as e:
            s.emit(frame([wire.FAIL, rid, "error", str(e)]))
            return
        if timeout is not None:
            if not isinstance(timeout, (int, float)):
                raise ProtocolError("bad timeout")
            lk = table.lock_of(s.id, name)
            if lk is not None and lk.requested is not None and lk.rid == rid:
                self.deadlines[(s.id, name, rid)] = now + timeout

    @staticmethod
    def _check_lvb(lvb) -> None:
        if lvb is not None and (type(lvb) is not bytes or len(lvb) != LVB_SIZE):
            raise ProtocolError(f"a value block is {LVB_SIZE} bytes")

    def _op_hb(self, s: Session, msg: list) -> None:
        s = self._need_session(s)
        _, hb_id, received = msg
        if type(received) is not int or received > s.sent:
            raise ProtocolError("bad heartbeat")
        s.ack(received)
        s.conn.send(frame([wire.HB_ACK, hb_id, s.last_rid]))

    def _op_cancel(self, s: Session, msg: list) -> None:
        s = self._need_session(s)
        _, rid, name = msg
        if type(name) is not bytes:
            raise ProtocolError("bad CANCEL")
        self.table.cancel(s.id, name, "cancelled", rid=rid)

    def _op_recovered(self, s: Session, msg: list) -> None:
        s = self._need_session(s)
        _, rid, slot = msg
        if type(slot) is not int:
            raise ProtocolError("bad RECOVERED")
        n = self.recovered(slot, by=s.node)
        s.emit(frame([wire.REPLY, rid, n]))

    def _op_status(self, conn: Conn, s: Session | None, msg: list) -> None:
        _, rid, *rest = msg
        prefix = rest[0] if rest else None
        if len(rest) > 1 or (prefix is not None and type(prefix) is not bytes):
            raise ProtocolError("bad STATUS")
        data = frame([wire.REPLY, rid, self.status(prefix)])
        if s is not None:
            s.emit(data)
        else:
            conn.send(data)

    def _op_bye(self, conn: Conn, s: Session | None) -> None:
        if s is not None:
            log.info("node %s (slot %d) left; releasing %d locks", s.node, s.slot,
                     len(self.table.locks_of(s.id)))
            self.table.release_owner(s.id, invalidate=False)
            del self.sessions[s.id]
            s.conn = None
            self._flush()
        conn.close()

    def _op_open(self, conn: Conn, msg: list, now: float) -> Session:
        if conn.session is not None:
            raise ProtocolError("session already open on this connection")
        _, node, slot, lease, resume, reclaim, recovering = msg
        if type(node) is not str or not node or type(slot) is not int or slot < 0:
            raise ProtocolError("bad node name or slot")
        lease = float(lease) if lease else self.lease
        lease = min(lease, self.lease)
        # resumption of a live session on this server
        if resume is not None:
            boot, sid, received = resume
            s = self.sessions.get(sid)
            if (boot == self.boot_id and s is not None and s.state == LIVE
                    and s.node == node and s.buf_base <= received <= s.sent):
                old = s.conn
                if old is not None:
                    old.session = None
                    old.close()
                s.conn = conn
                conn.session = s
                s.last_heard = now
                s.ack(received)
                conn.send(frame([wire.OPENED, "resumed", s.id, self.boot_id, s.lease,
                                 s.last_rid, [], self._grace_left(now)]))
                for data in s.buf:
                    conn.send(data)
                log.info("node %s (slot %d) reconnected from %s", node, slot, conn.peer)
                return s
        for other in self.sessions.values():
            if other.state == LIVE and (other.node == node or other.slot == slot):
                left = other.lease - (now - other.last_heard)
                what = (f"node {node} already has a live session" if other.node == node
                        else f"slot {slot} is in use by node {other.node}")
                conn.send(frame([wire.REFUSED, "busy",
                                 f"{what} (its lease ends in {max(left, 0):.1f}s)"]))
                log.info("refused session for node %s slot %d: %s", node, slot, what)
                return None
        sid = self._next_sid
        self._next_sid += 1
        s = Session(sid, node, slot, lease, now)
        s.conn = conn
        conn.session = s
        self.sessions[sid] = s
        refused = []
        if resume is None:
            state = "new"
        elif resume[0] != self.boot_id and self._in_grace and reclaim is not None:
            state = "reclaimed"
            for item in reclaim:
                name, mode, lvb, ver = item
                if type(name) is not bytes or type(ver) is not int:
                    raise ProtocolError("bad reclaim entry")
                self._check_lvb(lvb)
                if not self.table.reclaim(sid, name, wire_mode(mode), lvb, ver):
                    refused.append(name)
            if refused:
                log.error("node %s: %d reclaimed locks conflict and were refused",
                          node, len(refused))
        else:
            state = "expired"
        conn.send(frame([wire.OPENED, state, sid, self.boot_id, lease, 0, refused,
                         self._grace_left(now)]))
        log.info("node %s (slot %d) joined from %s: session %d, %s%s", node, slot,
                 conn.peer, sid, state,
                 f", {len(reclaim) - len(refused)} locks reclaimed"
                 if state == "reclaimed" else "")
        for d in self.sessions.values():
            if d.state == DEAD:
                s.emit(frame([wire.NODE_DOWN, d.node, d.slot]))
        if resume is not None and resume[0] != self.boot_id:
            # dead nodes announced by the previous server, maybe not yet recovered: their
            # locks are unknown here, so nothing new is granted until they are
            for item in recovering or ():
                self._placeholder(str(item[0]), int(item[1]), now)
        return s

    def _placeholder(self, node: str, slot: int, now: float) -> None:
        for d in self.sessions.values():
            if d.slot == slot and d.state == DEAD:
                return
        sid = self._next_sid
        self._next_sid += 1
        d = Session(sid, node, slot, 0.0, now)
        d.state = DEAD
        d.placeholder = True
        self.sessions[sid] = d
        log.warning("node %s (slot %d) was dead before the restart and is not "
                    "recovered: nothing new is granted until it is", node, slot)
        self._announce(wire.NODE_DOWN, node, slot)
        self.table.set_frozen(True)

    # ---- membership ------------------------------------------------------------------

    def declare_dead(self, s: Session) -> None:
        """The node's lease expired: keep its locks recovering, tell every member."""
        s.state = DEAD
        self.table.mark_dead(s.id)
        for key in [k for k in self.deadlines if k[0] == s.id]:
            del self.deadlines[key]
        n = len(self.table.locks_of(s.id))
        log.warning("node %s (slot %d) declared dead: lease expired; %d locks held "
                    "until its slot is recovered", s.node, s.slot, n)
        if s.conn is not None:
            s.conn.send(frame([wire.ERROR, "session expired"]))
            s.conn.session = None
            s.conn.close()
            s.conn = None
        s.buf.clear()
        self._announce(wire.NODE_DOWN, s.node, s.slot)

    def recovered(self, slot: int, by: str = "?") -> int:
        """A member reports the slot recovered: release its dead nodes' locks.

        Returns the number of dead sessions released.
        """
        dead = [d for d in self.sessions.values() if d.state == DEAD and d.slot == slot]
        for d in dead:
            n = self.table.release_owner(d.id, invalidate=True)
            del self.sessions[d.id]
            log.info("slot %d (node %s) recovered by %s: %d locks released",
                     slot, d.node, by, n)
        if dead:
            self._announce(wire.NODE_RECOVERED, slot)
            self.table.set_frozen(self._frozen())
        return len(dead)

    def _announce(self, op: int, *args) -> None:
        data = frame([op, *args])
        for s in self.sessions.values():
            if s.state == LIVE:
                s.emit(data)

    def _frozen(self) -> bool:
        return self._in_grace or any(d.placeholder for d in self.sessions.values())

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
                s.emit(frame([wire.GRANT, e.rid, e.mode, e.lvb, e.lvb_ver]))
            elif t is Fail:
                if deadlines:
                    deadlines.pop((e.owner, e.name, e.rid), None)
                s.emit(frame([wire.FAIL, e.rid, e.code, ""]))
            elif t is Bast:
                s.emit(frame([wire.BAST, e.name, e.mode]))

    async def _housekeeping(self) -> None:
        last_deadlock = last_bast = trio.current_time()
        while True:
            await trio.sleep(self.tick)
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
        if self._in_grace and now >= self._grace_until:
            self._in_grace = False
            log.info("grace period over: normal service")
            self.table.set_frozen(self._frozen())
        for s in list(self.sessions.values()):
            if s.state == LIVE and now - s.last_heard > s.lease:
                self.declare_dead(s)
        if self.deadlines:
            self.table.expire(now, self.deadlines)
        self._flush()

    # ---- status -----------------------------------------------------------------------

    def statistics(self) -> dict:
        """The same as ``status()``."""
        return self.status()

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
                nodes.append({"node": s.node, "slot": s.slot, "session": s.id,
                              "connected": s.conn is not None,
                              "lease_age": round(now - s.last_heard, 3),
                              "lease": s.lease, "locks": held, "waiting": pend})
            else:
                recovering.append({"node": s.node, "slot": s.slot, "session": s.id,
                                   "locks": held, "unknown_locks": s.placeholder})
        out = {"boot_id": self.boot_id.hex(), "uptime": round(now - self._start, 3),
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
