"""POSIX byte-range locks and flock locks: a pure table, no I/O, no clock, no trio.

This is what GFS2's dlm_controld keeps as "plocks": fcntl(2) record locks cannot be
mapped onto the DLM-style table in ``table.py`` (one mode per owner and resource), since
one owner holds many ranges of one file, of two types, which split and merge.  The lock
server keeps one ``PlockTable`` for the whole cluster; each member keeps one for its own
granted locks, to reclaim them from a new server after a failover.

The rules are Linux's, so that a test program gives the same answers as on ext4:

* Two locks conflict when their owners differ, their ranges overlap and at least one
  is ``F_WRLCK``.  An owner is opaque to the table (compared with ``==``, hashed).
* A request is granted iff it conflicts with no *held* lock.  Waiting requests do not
  block new ones (no fairness: Linux has none either).
* Granting applies POSIX semantics to the owner's own locks on that resource: the new
  lock replaces them over its range (upgrade, downgrade), splitting those that stick
  out, and merges with the owner's overlapping or adjacent locks of the same type.  So
  an owner's locks on a resource are always disjoint and maximally merged.
* Ends are inclusive, like the kernel's; ``OFFSET_MAX`` means "to the end of the file".
* Whenever locks lose ground (unlock, drop, downgrade, a dead node's locks go) the
  waiting requests of that resource are examined in arrival order and every one that
  no longer conflicts is granted, until nothing more can be granted (a grant that
  downgrades its owner's locks may free an earlier waiter).  The tokens of granted
  waiters are appended to ``woken`` for the caller to answer.
* A waiting request is refused with ``Deadlock`` when an owner in its way is, directly
  or through a chain of waiting owners on any resources, waiting for the requester.
* flock(2) locks need no code of their own: the caller keeps them as whole-file ranges
  under a resource key of their own, without deadlock detection (as Linux).
* Resources with neither locks nor waiters are forgotten.
"""

import errno
from dataclasses import dataclass, replace
from typing import Callable, Hashable

F_RDLCK, F_WRLCK, F_UNLCK = 0, 1, 2
OFFSET_MAX = 2**63 - 1


class PlockError(Exception):
    """A lock request that cannot be granted; ``errno`` is what fcntl(2) returns."""

    errno = errno.EIO


class Conflict(PlockError):
    """A non-waiting request met a conflicting lock."""

    errno = errno.EAGAIN


class Deadlock(PlockError):
    """A waiting request would close a cycle of owners waiting for each other."""

    errno = errno.EDEADLK


@dataclass(frozen=True, slots=True)
class Plock:
    """One held lock.  Frozen: the table hands these out and must not see them change."""

    owner: Hashable
    ltype: int
    start: int
    end: int  # inclusive
    pid: int


@dataclass(slots=True)
class _Waiter:
    token: Hashable
    res: Hashable
    owner: Hashable
    ltype: int
    start: int
    end: int
    pid: int


def _check_range(start, end) -> None:
    for x in (start, end):
        if not isinstance(x, int) or isinstance(x, bool):
            raise ValueError(f"offset {x!r} is not an int")
    if not 0 <= start <= end <= OFFSET_MAX:
        raise ValueError(f"bad range [{start}, {end}]")


def _check_type(ltype) -> None:
    if ltype not in (F_RDLCK, F_WRLCK) or isinstance(ltype, bool):
        raise ValueError(f"bad lock type {ltype!r}")


def _conflicts(lk: Plock, owner, ltype: int, start: int, end: int) -> bool:
    return (lk.owner != owner and lk.start <= end and start <= lk.end
            and F_WRLCK in (lk.ltype, ltype))


class PlockTable:
    """The byte-range locks of every resource, and the requests waiting for them."""

    def __init__(self):
        self._locks: dict = {}    # res -> [Plock], sorted by start
        # res -> {owner: n}: when each owner took its first lock there (the order in
        # which Linux lists an inode's locks, so F_GETLK picks the same one)
        self._order: dict = {}
        self._seq = 0
        self._queues: dict = {}   # res -> {token: _Waiter}, in arrival order
        self._waiters: dict = {}  # token -> _Waiter, in arrival order (all resources)
        self.woken: list = []     # tokens granted since the caller last drained it

    # ---- requests ------------------------------------------------------------------

    def test(self, res, owner, ltype: int, start: int, end: int) -> Plock | None:
        """F_GETLK: the lock that would block a request.

        Returns:
            The lock of another owner on ``res`` that conflicts with the given one, or
            None.  Of several, the one Linux names: the owner that has held locks
            there the longest, its lock with the lowest start.
        """
        _check_type(ltype)
        _check_range(start, end)
        order = self._order.get(res, {})
        return min(self._blockers(res, owner, ltype, start, end),
                   key=lambda lk: (order.get(lk.owner, 0), lk.start), default=None)

    def lock(self, res, owner, ltype: int, start: int, end: int, pid: int, *,
             wait: bool, token=None, detect_deadlock: bool = True) -> bool:
        """F_SETLK / F_SETLKW.

        Args:
            res: the resource (a file; any hashable).
            owner: who holds the lock (any hashable).
            ltype: F_RDLCK or F_WRLCK.
            start, end: the inclusive range; end OFFSET_MAX is "to the end of the file".
            pid: reported by test() and locks().
            wait: queue the request when it conflicts, instead of raising Conflict.
            token: names a queued request (hashable, unique among the waiting ones);
                it appears in ``woken`` when granted.
            detect_deadlock: refuse with Deadlock a wait that closes a cycle.

        Returns:
            True if granted now, False if queued under ``token``.

        Raises:
            Conflict: ``wait`` is false and a lock of another owner conflicts.
            Deadlock: waiting would close a cycle of owners waiting for each other.
            ValueError: a bad type or range, or a queued request without a fresh token.
        """
        _check_type(ltype)
        _check_range(start, end)
        blockers = {lk.owner for lk in self._blockers(res, owner, ltype, start, end)}
        if not blockers:
            self._grant(res, owner, ltype, start, end, pid)
            return True
        if not wait:
            raise Conflict(f"{res!r} [{start}, {end}] is locked by another owner")
        if detect_deadlock and self._waits_for(blockers, owner):
            raise Deadlock(f"{res!r} [{start}, {end}]: owners would wait in a cycle")
        if token is None or token in self._waiters:
            raise ValueError(f"a waiting request needs a unique token, not {token!r}")
        w = _Waiter(token, res, owner, ltype, start, end, pid)
        self._waiters[token] = w
        self._queues.setdefault(res, {})[token] = w
        return False

    def unlock(self, res, owner, start: int, end: int) -> None:
        """F_UNLCK: remove the owner's locks over [start, end], splitting those that
        stick out, then grant the waiters that can now be."""
        _check_range(start, end)
        if self._set(res, owner, None, start, end, 0):
            self._wake(res)

    def drop(self, res, owner) -> None:
        """Close of a file: all of ``owner``'s locks on ``res`` go and its waiting
        requests there are cancelled (not woken); others are woken."""
        for token, w in list(self._queues.get(res, {}).items()):
            if w.owner == owner:
                self._unqueue(token)
        if self._set(res, owner, None, 0, OFFSET_MAX, 0):
            self._wake(res)

    def drop_owners(self, pred: Callable[[Hashable], bool]) -> int:
        """A dead node's locks: every lock and waiting request, on every resource, whose
        owner satisfies ``pred`` goes; others are woken.

        Returns:
            The number of locks dropped.
        """
        for token, w in list(self._waiters.items()):
            if pred(w.owner):
                self._unqueue(token)
        dropped = 0
        for res, locks in list(self._locks.items()):
            keep = [lk for lk in locks if not pred(lk.owner)]
            if len(keep) < len(locks):
                dropped += len(locks) - len(keep)
                self._store(res, keep)
                self._wake(res)
        return dropped

    def cancel(self, token) -> bool:
        """Remove a waiting request (its caller was interrupted).

        Waiting requests block nobody, so nobody else can be granted because of this.

        Returns:
            True if it was waiting.
        """
        if token not in self._waiters:
            return False
        self._unqueue(token)
        return True

    # ---- views ---------------------------------------------------------------------

    def locks(self, res=None) -> list[tuple]:
        """The held locks as [(res, Plock)], of ``res`` or of all resources, ordered by
        resource then start (for dumps, status and a member's reclaim list)."""
        if res is not None:
            return [(res, lk) for lk in self._locks.get(res, ())]
        try:
            names = sorted(self._locks)
        except TypeError:  # keys of mixed types: any stable order will do
            names = sorted(self._locks, key=repr)
        return [(r, lk) for r in names for lk in self._locks[r]]

    def waiting(self) -> list[tuple]:
        """[(token, res, owner, ltype, start, end, pid)] in arrival order (for dumps)."""
        return [(w.token, w.res, w.owner, w.ltype, w.start, w.end, w.pid)
                for w in self._waiters.values()]

    def check(self) -> None:
        """Assert the table's invariants (for tests)."""
        for res, locks in self._locks.items():
            assert locks, f"empty resource {res!r} remembered"
            assert [lk.start for lk in locks] == sorted(lk.start for lk in locks)
            for i, a in enumerate(locks):
                for b in locks[i + 1:]:
                    if b.start > a.end + 1:
                        break
                    if a.owner == b.owner:
                        assert b.start > a.end and a.ltype != b.ltype, (res, a, b)
                    else:
                        assert not _conflicts(a, b.owner, b.ltype, b.start, b.end)
        for res, queue in self._queues.items():
            assert queue, f"empty queue of {res!r} remembered"
            for token, w in queue.items():
                assert self._waiters[token] is w and w.res == res
        assert sum(map(len, self._queues.values())) == len(self._waiters)

    # ---- internals -----------------------------------------------------------------

    def _blockers(self, res, owner, ltype, start, end):
        """The held locks in the way of a request, by increasing start."""
        for lk in self._locks.get(res, ()):
            if lk.start > end:
                break
            if _conflicts(lk, owner, ltype, start, end):
                yield lk

    def _waits_for(self, blockers: set, owner) -> bool:
        """True if one of ``blockers`` waits, through any chain of waiting owners, for
        ``owner``: a depth-first search of the wait-for graph, built once per call."""
        waits = {}
        for w in self._waiters.values():
            waits.setdefault(w.owner, []).append(w)
        seen = set()
        stack = list(blockers)
        while stack:
            o = stack.pop()
            if o == owner:
                return True
            if o in seen:
                continue
            seen.add(o)
            for w in waits.get(o, ()):
                stack.extend(lk.owner for lk in
                             self._blockers(w.res, w.owner, w.ltype, w.start, w.end))
        return False

    def _grant(self, res, owner, ltype, start, end, pid) -> None:
        if self._set(res, owner, ltype, start, end, pid):
            self._wake(res)

    def _set(self, res, owner, ltype, start, end, pid) -> bool:
        """Make ``owner``'s locks on ``res`` over [start, end] be of ``ltype`` (None: no
        lock), keeping them disjoint and merged.

        Returns:
            True if a lock lost ground there (was removed or downgraded), so that
            waiters may now be granted.
        """
        released = False
        others, mine = [], []
        for lk in self._locks.get(res, ()):
            if lk.owner != owner or lk.end < start or lk.start > end:
                (others if lk.owner != owner else mine).append(lk)
                continue
            released |= ltype is None or (lk.ltype == F_WRLCK and ltype == F_RDLCK)
            if lk.start < start:
                mine.append(replace(lk, end=start - 1))
            if lk.end > end:
                mine.append(replace(lk, start=end + 1))
        if ltype is not None:
            mine.append(Plock(owner, ltype, start, end, pid))
        mine.sort(key=lambda lk: lk.start)
        merged = []
        for lk in mine:
            prev = merged[-1] if merged else None
            if prev is not None and prev.ltype == lk.ltype and lk.start <= prev.end + 1:
                # only ever the new lock and its neighbours: the request's pid wins
                merged[-1] = Plock(owner, lk.ltype, prev.start, max(prev.end, lk.end), pid)
            else:
                merged.append(lk)
        self._store(res, sorted(others + merged, key=lambda lk: lk.start))
        return released

    def _store(self, res, locks: list) -> None:
        if locks:
            self._locks[res] = locks
            old = self._order.get(res, {})
            order = {}
            for lk in locks:
                if lk.owner not in order:
                    n = old.get(lk.owner)
                    if n is None:
                        self._seq += 1
                        n = self._seq
                    order[lk.owner] = n
            self._order[res] = order
        else:
            self._locks.pop(res, None)
            self._order.pop(res, None)

    def _unqueue(self, token) -> _Waiter:
        w = self._waiters.pop(token)
        queue = self._queues[w.res]
        del queue[token]
        if not queue:
            del self._queues[w.res]
        return w

    def _wake(self, res) -> None:
        """Grant, in arrival order, the waiters of ``res`` nothing holds back any more;
        again from the head while a grant downgraded its owner's locks."""
        again = True
        while again and res in self._queues:
            again = False
            for token, w in list(self._queues[res].items()):
                if next(self._blockers(res, w.owner, w.ltype, w.start, w.end), None):
                    continue
                self._unqueue(token)
                again |= self._set(res, w.owner, w.ltype, w.start, w.end, w.pid)
                self.woken.append(token)
                if res not in self._queues:
                    break
