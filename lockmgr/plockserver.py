"""The lock server's POSIX and flock locks: PLOCK, PGET and PUNLOCK on a ``PlockTable``.

These are the locks of fcntl(2), OFD locks and flock(2) that programs take on files of
the volume (QEMU's image locks, SQLite, virtlockd), kept here for the whole cluster as
GFS2 keeps them in dlm_controld.  They are separate from the DLM-style locks of
``LockTable`` (the file system's own caches): no modes, no value blocks, byte ranges.

An owner is ``(session, kernel lock owner)``: the kernel's owner (a process's file
table for fcntl locks, the open file for OFD and flock locks) is unique on its node,
the session names the node.  Answers are ``REPLY``s whose value is an errno (0: the
lock is granted) for PLOCK, the conflicting lock or nil for PGET, 0 for PUNLOCK (a close
returns once its locks are free for every node).

While the DLM table is frozen (the grace period after a failover, a dead node whose
locks are unknown) every plock request is held back in arrival order and run when it
thaws: a lock granted before every member has reclaimed its plocks could conflict with
one not yet reclaimed, and a dead node's plocks are unknown until it is recovered (then
they are released, as its DLM locks are).  A dead node's plocks stay held until its
slot is recovered; its waiting requests go at once.
"""

from __future__ import annotations

import errno
import logging

from .errors import ProtocolError
from .messages import F_FLOCK, F_TRY, Held, Op
from .plocks import PlockError, PlockTable

log = logging.getLogger("lockmgr.server")


def _check_range(start: int, end: int) -> None:
    if start > end:
        raise ProtocolError("plock range ends before it starts")


class PlockService:
    """The plocks of one lock server.

    Args:
        sessions: the server's ``{session id: Session}`` (answers are emitted on them).
    """

    def __init__(self, sessions: dict):
        self.sessions = sessions
        self.table = PlockTable()
        self.frozen = False
        #: requests held back while frozen: (session id, rid, fn, args), in order
        self._held: list = []

    # ---- requests ---------------------------------------------------------------

    def lock(self, s, rid: int, name: bytes, owner: int, ltype: int, start: int,
             end: int, pid: int, flags: int) -> None:
        _check_range(start, end)
        self._run(s, rid, self._lock, (name, owner, ltype, start, end, pid, flags))

    def get(self, s, rid: int, name: bytes, owner: int, ltype: int, start: int,
            end: int) -> None:
        _check_range(start, end)
        self._run(s, rid, self._get, (name, owner, ltype, start, end))

    def unlock(self, s, rid: int, name: bytes, owner: int, start: int, end: int) -> None:
        _check_range(start, end)
        self._run(s, rid, self._unlock, (name, owner, start, end))

    def cancel(self, s, rid: int) -> bool:
        """CANCEL of a waiting (or held back) PLOCK: answered EINTR.  False when
        ``rid`` is no plock request of this session (a DLM request, or answered)."""
        for item in self._held:
            if item[0] == s.id and item[1] == rid and item[2] == self._lock:
                self._held.remove(item)
                s.emit(Op.REPLY.encode(rid=rid, value=errno.EINTR))
                return True
        if self.table.cancel((s.id, rid)):
            s.emit(Op.REPLY.encode(rid=rid, value=errno.EINTR))
            self._wake()
            return True
        return False

    def _run(self, s, rid, fn, args) -> None:
        if self.frozen:
            self._held.append((s.id, rid, fn, args))
        else:
            fn(s, rid, *args)

    def _lock(self, s, rid, name, owner, ltype, start, end, pid, flags) -> None:
        try:
            granted = self.table.lock(name, (s.id, owner), ltype, start, end, pid,
                                      wait=not flags & F_TRY, token=(s.id, rid),
                                      detect_deadlock=not flags & F_FLOCK)
        except PlockError as e:
            s.emit(Op.REPLY.encode(rid=rid, value=e.errno))
        else:
            if granted:
                s.emit(Op.REPLY.encode(rid=rid, value=0))
        self._wake()

    def _get(self, s, rid, name, owner, ltype, start, end) -> None:
        lk = self.table.test(name, (s.id, owner), ltype, start, end)
        value = None if lk is None else [lk.ltype, lk.start, lk.end, lk.pid]
        s.emit(Op.REPLY.encode(rid=rid, value=value))

    def _unlock(self, s, rid, name, owner, start, end) -> None:
        self.table.unlock(name, (s.id, owner), start, end)
        s.emit(Op.REPLY.encode(rid=rid, value=0))
        self._wake()

    def _wake(self) -> None:
        """Answer the waiting requests the table granted."""
        woken, self.table.woken = self.table.woken, []
        for sid, rid in woken:
            s = self.sessions.get(sid)
            if s is not None:
                s.emit(Op.REPLY.encode(rid=rid, value=0))

    # ---- membership ---------------------------------------------------------------

    def set_frozen(self, frozen: bool) -> None:
        """Hold requests back (``frozen``) or run those held back, in order."""
        self.frozen = frozen
        if frozen or not self._held:
            return
        held, self._held = self._held, []
        for sid, rid, fn, args in held:
            s = self.sessions.get(sid)
            if s is not None and s.state == "live":
                try:
                    fn(s, rid, *args)
                except ValueError as e:     # checked when it came: a bug, that request's
                    log.error("held-back plock request %d of node %s: %s", rid, s.node, e)
                    s.emit(Op.REPLY.encode(rid=rid, value=errno.EIO))

    def reclaim(self, s, items: list[Held]) -> int:
        """The plocks a member held under the previous server.  Returns how many were
        refused (a conflict: only if two members disagree about what they hold)."""
        refused = 0
        for h in items:
            if h.start > h.end:
                refused += 1
                continue
            try:
                self.table.lock(h.name, (s.id, h.owner), h.ltype, h.start, h.end, h.pid,
                                wait=False, detect_deadlock=False)
            except PlockError:
                refused += 1
        if refused:
            log.error("node %s: %d reclaimed plocks conflict and were refused", s.node,
                      refused)
        return refused

    def session_dead(self, s) -> None:
        """A node was declared dead: its waiting requests go (nobody waits for the
        answers); its locks stay until its slot is recovered."""
        self._held = [h for h in self._held if h[0] != s.id]
        for token, *_ in self.table.waiting():
            if token[0] == s.id:
                self.table.cancel(token)
        self._wake()

    def release_session(self, sid: int) -> int:
        """A session's plocks go (it left, or its slot was recovered).  Returns how many."""
        self._held = [h for h in self._held if h[0] != sid]
        n = self.table.drop_owners(lambda owner: owner[0] == sid)
        self._wake()
        return n

    def counts(self, sid: int) -> tuple[int, int]:
        """(held, waiting) plocks of a session."""
        held = sum(1 for _, lk in self.table.locks() if lk.owner[0] == sid)
        waiting = sum(1 for w in self.table.waiting() if w[0][0] == sid)
        return held, waiting + sum(1 for h in self._held if h[0] == sid)
