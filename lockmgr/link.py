"""The lock client's session with the server: half of ``client.LockClient`` (mixed
into it).

Connecting (the handshake, a new session, a resumed one or locks reclaimed from a
restarted server), reconnecting on its own, the reader and writer tasks, the lease
(renewed by heartbeats, watched for silence and expiry), and the server's messages
in order: those about the session are handled here, those about locks by
``LockClient`` (``_handlers``, both tables).  See docs/LOCKS.md.
"""

import logging
import time

import trio

from . import wire
from .errors import (AuthError, ConnectError, LeaseLost, LockCancelled, NodeBusy,
                     ProtocolError)
from .handshake import connection_errors, exchange
from .messages import Held, Op, Reclaim, Recovering, Resume, handles
from .plocks import PlockTable

log = logging.getLogger("lockmgr.client")     # one client, one logger name for its lines

#: the longest wait between connection attempts when the server could not be reached
#: (a stale address of a master that died: a new one is elected within seconds)
RETRY_FAST = 0.25


class ServerLink:
    """The session with the server (``LockClient`` inherits these methods; its
    ``_handlers`` maps each message code to its handler)."""

    _handlers: dict = {}

    # ---- the connection --------------------------------------------------------------

    async def _establish(self, resume: Resume | None = None,
                         reclaim: list[Reclaim] | None = None,
                         recovering: list[Recovering] | None = None,
                         plocks: list[Held] | None = None):
        """Connect, authenticate, open a session.  Returns (stream, decoder, leftover
        messages)."""
        with trio.move_on_after(self.handshake_timeout) as scope:
            stream = await self._connector()
        if scope.cancelled_caught:
            raise ConnectError(f"lock server at {self._peer()}: no connection within "
                               f"{self.handshake_timeout:g}s")
        self.addr = self._peer()
        ok = False
        try:
            with connection_errors(self.addr, self.handshake_timeout):
                answer = await exchange(stream, self.key, self.addr, Op.OPEN.encode(
                    node=self.node, slot=self.slot, lease=self.requested_lease,
                    resume=resume, reclaim=reclaim, recovering=recovering,
                    plocks=plocks))
            msg = answer.msg
            if msg[0] == Op.REFUSED:
                raise NodeBusy(f"lock server refused the session: "
                               f"{Op.REFUSED.parse(msg).text}")
            if msg[0] != Op.OPENED:
                raise ProtocolError(f"unexpected answer {msg[0]} to OPEN")
            self._opened(answer.sent_at, *Op.OPENED.decode(msg))
            ok = True
            return stream, answer.decoder, answer.leftover
        finally:
            if not ok:
                with trio.CancelScope(shield=True):
                    await stream.aclose()

    def _peer(self) -> str:
        """The address of the last connection attempt (as the connector names it)."""
        return getattr(self._connector, "last", None) or self.addr

    @handles(Op.OPENED, "self", "t_open")
    def _opened(self, t_open: float, state: str, session: int, boot_id: bytes,
                lease: float, last_rid: int, refused: list, grace_left: float) -> None:
        first = self.session_id is None
        self.session_id = session
        self.boot_id = boot_id
        self.lease = lease
        if self._margin_arg is None:
            self.margin = lease / 5
        self.renew = min(self.renew, lease / 3)
        self._hb_sent.clear()
        if state == "resumed":
            self._processed(last_rid)
            resend = [d for _, d in self._unacked]
            # requests withdrawn while the connection was down: the CANCEL goes now
            for rid in sorted(self._pending):
                op = self._pending[rid]
                if op.abandoned and op.kind in (Op.LOCK, Op.CONVERT, Op.PLOCK):
                    name = op.plock[0] if op.kind == Op.PLOCK else op.rec.name
                    resend.append(Op.CANCEL.encode(rid=rid, name=name))
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
            # what the server never saw: the requests still waiting for an answer, and
            # (reclaimed) the unlocks and down-conversions posted after the reclaim
            # list was made (it lists those locks as they were before)
            later = {rid: data for rid, data in self._unacked
                     if state == "reclaimed" and rid > self._reclaim_rid}
            self._unacked.clear()
            for rid in sorted(self._pending):
                op = self._pending[rid]
                if op.abandoned:
                    self._finish(op, error=LockCancelled("cancelled"))
                    later.pop(rid, None)
                    continue
                later[rid] = op.data
            for rid in sorted(later):
                self._unacked.append((rid, later[rid]))
                resend.append(later[rid])
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
            self._plocks = PlockTable()
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
                if self.silence is not None:
                    nursery.start_soon(self._silence_watch)
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
                            # unreachable: the address may be stale until a new
                            # master is elected; try again promptly
                            await trio.sleep(min(delay, RETRY_FAST)
                                             if isinstance(e, ConnectError) else delay)
                            # well inside the grace period of a restarted server
                            delay = min(delay * 2, self.lease / 10)
                nursery.cancel_scope.cancel()

    async def _reconnect(self):
        resume = Resume(boot_id=self.boot_id, session=self.session_id,
                        received=self._received)
        reclaim = plocks = None
        if self.lease_valid():
            reclaim = [Reclaim(name=r.name, mode=r.mode, lvb=r.lvb, lvb_ver=r.ver)
                       for r in self._recs.values() if r.mode is not None]
            plocks = [Held(name=name, owner=lk.owner, ltype=lk.ltype, start=lk.start,
                           end=lk.end, pid=lk.pid)
                      for name, lk in self._plocks.locks()] or None
            # what is posted from now on (while connecting) is sent after the reclaim
            self._reclaim_rid = self._rid
        recovering = [Recovering(node=node, slot=slot)
                      for slot, node in self._dead_nodes.items()]
        return await self._establish(resume, reclaim, recovering, plocks)

    async def _serve(self, stream, dec, leftover) -> None:
        chan = self._chan = wire.Channel(stream)
        for data in self._resend:
            chan.send(data)
        self._resend = []
        self._connected = True
        self._last_heard = trio.current_time()
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
                        self._last_heard = trio.current_time()
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
                self._chan.send(Op.HB.encode(hb_id=self._hb_id, received=self._received))
            await trio.sleep(self.renew)

    async def _silence_watch(self) -> None:
        """Drop a connection on which the server has said nothing for ``silence``
        seconds (its heartbeat acknowledgements come every ``renew``); the
        reconnection goes through the connector, maybe to a new master."""
        while True:
            await trio.sleep(min(self.silence / 4, self.renew))
            if (self._connected and self._conn_scope is not None
                    and trio.current_time() - self._last_heard > self.silence):
                log.warning("lock server at %s silent for %.1fs: reconnecting",
                            self.addr, trio.current_time() - self._last_heard)
                self._conn_scope.cancel()

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

    # ---- messages about the session ------------------------------------------------

    def _dispatch(self, msgs) -> None:
        """Handle the server's messages in order (each by its ``_on_*`` handler)."""
        for msg in msgs:
            handler = self._handlers.get(msg[0])
            if handler is None:
                raise ProtocolError(f"unexpected message {msg[0]!r} from the server")
            decode, fn, numbered = handler
            if numbered:
                self._received += 1
            fn(self, *decode(msg))

    @handles(Op.NODE_DOWN, "self")
    def _on_node_down(self, node: str, slot: int) -> None:
        if self._dead_nodes.get(slot) != node:
            self._dead_nodes[slot] = node
            log.warning("node %s (slot %d) declared dead; its locks wait for recovery",
                        node, slot)
            for h in self._node_down_handlers:
                self._nursery.start_soon(self._run_handler, h, node, slot)

    @handles(Op.NODE_RECOVERED, "self")
    def _on_node_recovered(self, slot: int) -> None:
        self._dead_nodes.pop(slot, None)

    @handles(Op.ERROR, "self")
    def _on_error(self, text: str) -> None:
        log.warning("lock server: %s", text)

    @handles(Op.HB_ACK, "self")
    def _on_hb_ack(self, hb_id: int, last_rid: int) -> None:
        sent = self._hb_sent.pop(hb_id, None)
        for k in [k for k in self._hb_sent if k < hb_id]:
            del self._hb_sent[k]
        self._processed(last_rid)
        if sent is not None and self._session_ok:
            self._renew_lease(sent + self.lease - self.margin)
