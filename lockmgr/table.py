"""The lock table: a pure state machine, no I/O, no clock, no trio.

The server feeds it requests and reads the effects it produces from ``table.out``
(a list of ``Grant``, ``Fail`` and ``Bast`` records, in the order they must be sent).
Time only comes in as the ``now`` argument, so tests (and the hypothesis state machine)
drive it directly.

Rules (see docs/LOCKS.md):

* One lock per (owner, resource).  An owner is opaque (the server uses session ids).
* A new request is granted at once when nothing is queued on the resource and its mode
  is compatible with every granted lock; else it waits at the tail of the *waiting*
  queue (or fails with ``tryagain`` when it is a try-lock; with ``notify`` the
  holders in its way still get a blocking callback, as DLM's NOQUEUEBAST).
* A conversion down (to a mode the held one covers) is granted at once.  Any other
  conversion is granted at once when the *converting* queue is empty and the new mode is
  compatible with the other owners' granted locks; else it waits at the tail of the
  converting queue, keeping its granted mode meanwhile.
* When locks are released or converted the converting queue is served first, then the
  waiting queue, each strictly in order: the head blocks those behind it, so nobody
  starves.
* Every owner holding a lock incompatible with a queued request gets one blocking
  callback (``Bast``) carrying the requested mode.
* Value block (LVB): 32 bytes or ``None`` (invalid) per resource, with a version number
  that grows on every change.  Returned on every grant; written when a PW/EX holder
  converts or unlocks with a value; made invalid when a dead owner that held it PW/EX is
  released.  A resource with a valid value block is remembered after its last lock goes
  (up to ``max_idle`` such resources, least recently used forgotten first).
* ``frozen`` (the grace period after a server restart, or a recovery of unknown locks):
  nothing new is granted, only down-conversions and ``reclaim`` -- except, when
  frozen with a ``thaw_prefix``, requests and conversions of the names that start
  with it, which are served as if the table were not frozen (the recovery locks a
  member needs to recover the dead node whose unknown locks freeze the table).
* Owners in ``dead`` keep their granted locks (recovering) but get no callbacks; a
  try-lock they block fails with ``notrecovered``.
"""

from collections import OrderedDict
from typing import Hashable, NamedTuple

from .modes import COMPAT, COMPAT_MASK, LVB_WRITERS, MODES, Mode, covers

LVB_SIZE = 32


class TableError(Exception):
    """A request that breaks the table's rules (a client bug, not contention)."""


class Grant(NamedTuple):
    owner: Hashable
    name: bytes
    rid: int
    mode: Mode
    lvb: bytes | None
    lvb_ver: int


class Fail(NamedTuple):
    owner: Hashable
    name: bytes
    rid: int
    code: str  # tryagain, notrecovered, timeout, deadlock, cancelled


class Bast(NamedTuple):
    owner: Hashable
    name: bytes
    mode: Mode


class Lock:
    """One owner's lock on one resource."""

    __slots__ = ("owner", "name", "granted", "requested", "rid", "seq", "since",
                 "basted")

    def __init__(self, owner, name, rid, requested, seq, since):
        self.owner = owner
        self.name = name
        self.granted: Mode | None = None      # None: not granted yet (waiting)
        self.requested: Mode | None = requested  # None: nothing pending
        self.rid = rid                         # request id of the pending request
        self.seq = seq                         # table-wide order of the pending request
        self.since = since                     # when the pending request was queued
        self.basted = 0                        # modes already sent to this holder as Bast

    def __repr__(self):
        return (f"Lock({self.owner!r}, {self.name!r}, granted={self.granted!s}, "
                f"requested={self.requested!s})")


class Resource:
    __slots__ = ("name", "granted", "counts", "converting", "waiting", "lvb", "lvb_ver")

    def __init__(self, name):
        self.name = name
        self.granted: dict = {}          # owner -> Lock (granted is not None)
        self.counts = [0] * 6            # number of granted locks per mode
        self.converting: list[Lock] = []
        self.waiting: list[Lock] = []
        self.lvb: bytes | None = None
        self.lvb_ver = 0

    def idle(self) -> bool:
        return not self.granted and not self.waiting


class LockTable:
    """The lock table.  See the module docstring for the rules.

    Args:
        max_idle: how many unlocked resources with a valid value block to remember.
    """

    def __init__(self, max_idle: int = 65536):
        self.out: list = []
        self.frozen = False
        self.thaw_prefix: bytes | None = None   # names served while frozen
        self.dead: set = set()
        self.max_idle = max_idle
        self._res: dict[bytes, Resource] = {}
        self._idle: OrderedDict[bytes, None] = OrderedDict()
        self._owners: dict = {}          # owner -> {name: Lock}
        self._contended: set[bytes] = set()
        self._seq = 0

    # ---- queries ---------------------------------------------------------------

    def resource(self, name: bytes) -> Resource | None:
        return self._res.get(name)

    def lock_of(self, owner, name: bytes) -> Lock | None:
        return self._owners.get(owner, {}).get(name)

    def locks_of(self, owner) -> dict[bytes, Lock]:
        """The owner's locks by name (granted or pending); do not modify."""
        return self._owners.get(owner, {})

    def names(self):
        return self._res.keys()

    def contended(self) -> set[bytes]:
        return self._contended

    def drain(self) -> list:
        """Return and clear the effects produced so far."""
        out, self.out = self.out, []
        return out

    # ---- operations ------------------------------------------------------------

    def request(self, owner, name: bytes, mode: Mode, rid: int, *, try_lock=False,
                notify=False, now: float = 0.0) -> None:
        """A new lock request (``notify``: a try-lock that fails still sends the
        holders in its way a blocking callback, so that one holding the lock only as
        a cache gives it up for the next try).

        Raises:
            TableError: the owner already has a lock (or request) on ``name``.
        """
        mode = MODES[mode]
        locks = self._owners.get(owner)
        if locks is None:
            locks = self._owners[owner] = {}
        elif name in locks:
            raise TableError("lock already held or requested; use convert")
        res = self._get(name)
        self._seq += 1
        lk = Lock(owner, name, rid, mode, self._seq, now)
        if ((not self.frozen or self._thawed(name)) and not res.converting
                and not res.waiting and self._compatible(res, mode, None)):
            locks[name] = lk
            self._grant(res, lk)
            return
        if try_lock:
            self.out.append(Fail(owner, name, rid, self._try_code(res, lk)))
            if notify:
                self._notify_holders(res, owner, mode)
            if not locks:
                del self._owners[owner]
            self._maybe_forget(res)
            return
        locks[name] = lk
        res.waiting.append(lk)
        self._contended.add(name)
        self._send_basts(res)

    def convert(self, owner, name: bytes, mode: Mode, rid: int, *, lvb=None,
                try_lock=False, notify=False, now: float = 0.0) -> None:
        """Convert a granted lock to ``mode`` (up, down or sideways).

        ``lvb`` is stored first when the held mode is PW or EX.

        Raises:
            TableError: the lock is not granted, or a conversion is already pending.
        """
        mode = MODES[mode]
        lk = self._owners.get(owner, {}).get(name)
        if lk is None or lk.granted is None:
            raise TableError("convert of a lock that is not granted")
        if lk.requested is not None:
            raise TableError("a conversion is already pending")
        res = self._res[name]
        if lvb is not None and lk.granted in LVB_WRITERS:
            self._write_lvb(res, lvb)
        self._seq += 1
        lk.rid, lk.seq, lk.since, lk.requested = rid, self._seq, now, mode
        if covers(lk.granted, mode):
            self._grant(res, lk)
            self._grant_pending(res)
            return
        if ((not self.frozen or self._thawed(name)) and not res.converting
                and self._compatible(res, mode, lk)):
            self._grant(res, lk)
            return
        if try_lock:
            code = self._try_code(res, lk)
            lk.requested = None
            self.out.append(Fail(owner, name, rid, code))
            if notify:
                self._notify_holders(res, owner, mode)
            return
        res.converting.append(lk)
        self._contended.add(name)
        self._send_basts(res)

    def unlock(self, owner, name: bytes, *, lvb=None) -> None:
        """Give up a lock; a pending request or conversion of it fails ``cancelled``.

        Raises:
            TableError: the owner has no lock on ``name``.
        """
        locks = self._owners.get(owner)
        lk = locks.get(name) if locks else None
        if lk is None:
            raise TableError("unlock of a lock that is not held")
        res = self._res[name]
        if lk.requested is not None:
            self._dequeue(res, lk, "cancelled")
        if lk.granted is not None:
            if lvb is not None and lk.granted in LVB_WRITERS:
                self._write_lvb(res, lvb)
            self._ungrant(res, lk)
        del locks[name]
        if not locks:
            del self._owners[owner]
        self._grant_pending(res)
        self._maybe_forget(res)

    def cancel(self, owner, name: bytes, code: str = "cancelled", rid=None) -> bool:
        """Fail the owner's pending request or conversion on ``name`` with ``code``.

        A cancelled conversion leaves the lock granted in its old mode.  With ``rid``,
        only that request is cancelled.  Returns whether something was cancelled.
        """
        lk = self._owners.get(owner, {}).get(name)
        if lk is None or lk.requested is None or (rid is not None and lk.rid != rid):
            return False
        res = self._res[name]
        self._dequeue(res, lk, code)
        if lk.granted is None:
            locks = self._owners[owner]
            del locks[name]
            if not locks:
                del self._owners[owner]
        self._grant_pending(res)
        self._maybe_forget(res)
        return True

    def cancel_pending(self, owner, code: str = "cancelled") -> int:
        """Cancel every pending request of ``owner``; returns how many."""
        names = [n for n, lk in self._owners.get(owner, {}).items()
                 if lk.requested is not None]
        for n in names:
            self.cancel(owner, n, code)
        return len(names)

    def release_owner(self, owner, *, invalidate=True) -> int:
        """Drop every lock of ``owner`` (a dead node, once recovered).

        Value blocks it held in PW or EX become invalid when ``invalidate``.
        Returns the number of granted locks released.
        """
        self.cancel_pending(owner)
        locks = self._owners.pop(owner, {})
        self.dead.discard(owner)
        n = 0
        for name, lk in locks.items():
            res = self._res[name]
            if lk.granted is not None:
                n += 1
                if invalidate and lk.granted in LVB_WRITERS:
                    res.lvb = None
                    res.lvb_ver += 1
                self._ungrant(res, lk)
            self._grant_pending(res)
            self._maybe_forget(res)
        return n

    def invalidate_values(self) -> int:
        """Mark every value block invalid (a dead node whose locks were unknown is
        released: it may have held any resource in PW or EX and changed what the
        value describes).  Returns how many were valid."""
        n = 0
        for res in self._res.values():
            if res.lvb is not None:
                n += 1
                res.lvb = None
            res.lvb_ver += 1
        return n

    def reclaim(self, owner, name: bytes, mode: Mode, lvb: bytes | None,
                lvb_ver: int) -> bool:
        """Re-enter a lock an owner held before a server restart.

        Accepted only when compatible with every lock granted so far (the owner must
        not have one on ``name`` yet).  The value block with the highest version among
        the reclaims wins.  Returns whether it was accepted.
        """
        mode = MODES[mode]
        locks = self._owners.setdefault(owner, {})
        res = self._get(name)
        if name in locks or not self._compatible(res, mode, None):
            if not locks:
                del self._owners[owner]
            self._maybe_forget(res)
            return False
        if lvb_ver > res.lvb_ver:
            res.lvb, res.lvb_ver = (bytes(lvb) if lvb is not None else None), lvb_ver
        lk = Lock(owner, name, 0, None, 0, 0.0)
        lk.granted = mode
        res.granted[owner] = lk
        res.counts[mode] += 1
        locks[name] = lk
        return True

    def set_frozen(self, frozen: bool, thaw_prefix: bytes | None = None,
                   now: float = 0.0) -> None:
        """Enter or leave the state where nothing new is granted.

        Args:
            frozen: grant nothing new (only down-conversions and ``reclaim``).
            thaw_prefix: while frozen, serve the requests and conversions of the names
                that start with it as usual (ignored when not frozen).
            now: the time; a request still queued on a name served again from now
                counts its wait for deadlock detection from now.
        """
        held_back = [name for name in self._contended if not self._thawed(name)]
        self.frozen = frozen
        self.thaw_prefix = thaw_prefix if frozen else None
        for name in held_back:
            if not self._thawed(name):
                continue
            res = self._res.get(name)
            if res is None:
                continue
            self._grant_pending(res)
            for lk in res.converting + res.waiting:
                lk.since = max(lk.since, now)
            self._maybe_forget(res)

    def mark_dead(self, owner) -> None:
        """The owner's node is dead: its pending requests go, its locks stay held."""
        self.cancel_pending(owner)
        self.dead.add(owner)

    def repeat_basts(self) -> None:
        """Send the blocking callbacks of every queued request again."""
        for name in self._contended:
            res = self._res[name]
            for g in res.granted.values():
                g.basted = 0
            self._send_basts(res)

    def expire(self, now: float, deadlines: dict) -> None:
        """Fail with ``timeout`` the pending requests whose deadline has passed.

        Args:
            deadlines: ``{(owner, name, rid): deadline}``; passed entries are removed.
        """
        for key in [k for k, d in deadlines.items() if d <= now]:
            del deadlines[key]
            owner, name, rid = key
            self.cancel(owner, name, "timeout", rid=rid)

    # ---- deadlock detection ----------------------------------------------------

    def wait_for_edges(self, now: float = 0.0, min_wait: float = 0.0) -> dict:
        """The wait-for graph between owners: ``{owner: [(blocker, Lock), ...]}``.

        A queued request waits for the owners of incompatible granted locks and of the
        requests queued ahead of it.  Only requests queued at least ``min_wait`` before
        ``now`` give edges (a cached lock's owner usually gives it up on the blocking
        callback within that time; a cycle that lasts longer is a deadlock).  A name
        held back by the freeze gives none: its queue does not move, whoever holds
        what, until it is served again, and its requests' wait counts from then
        (``set_frozen``).
        """
        edges: dict = {}
        for name in self._contended:
            if not self._thawed(name):
                continue
            res = self._res[name]
            order = res.converting + res.waiting
            for i, lk in enumerate(order):
                if lk.since + min_wait > now:
                    continue
                targets = set()
                mask = COMPAT_MASK[lk.requested]
                for g in res.granted.values():
                    if g.owner != lk.owner and not (mask >> g.granted) & 1:
                        targets.add(g.owner)
                for ahead in order[:i]:
                    if ahead.owner != lk.owner:
                        targets.add(ahead.owner)
                if targets:
                    lst = edges.setdefault(lk.owner, [])
                    lst.extend((t, lk) for t in targets)
        return edges

    def find_cycle(self, edges: dict) -> list[Lock] | None:
        """One cycle of the wait-for graph, as the requests that form it, or None."""
        state: dict = {}  # owner -> 1 on the stack, 2 done
        for start in edges:
            if start in state:
                continue
            stack = [(start, iter(edges.get(start, ())))]
            path: list = []  # requests along the stack
            state[start] = 1
            while stack:
                owner, it = stack[-1]
                for target, lk in it:
                    st = state.get(target)
                    if st == 1:
                        # cycle: from target's position on the stack to here
                        owners = [o for o, _ in stack]
                        idx = owners.index(target)
                        return path[idx:] + [lk]
                    if st is None:
                        state[target] = 1
                        stack.append((target, iter(edges.get(target, ()))))
                        path.append(lk)
                        break
                else:
                    state[owner] = 2
                    stack.pop()
                    if path:
                        path.pop()
        return None

    def break_deadlocks(self, now: float = 0.0, min_wait: float = 0.0) -> list[Lock]:
        """Fail one request (the youngest) of every wait-for cycle with ``deadlock``.

        Returns the requests chosen.
        """
        victims = []
        while True:
            cycle = self.find_cycle(self.wait_for_edges(now, min_wait))
            if cycle is None:
                return victims
            victim = max(cycle, key=lambda lk: lk.seq)
            victims.append(victim)
            self.cancel(victim.owner, victim.name, "deadlock")

    # ---- checks ----------------------------------------------------------------

    def check(self) -> None:
        """Assert the table's invariants (for tests)."""
        for name, res in self._res.items():
            counts = [0] * 6
            gl = list(res.granted.values())
            for lk in gl:
                assert lk.granted is not None
                counts[lk.granted] += 1
                assert self._owners[lk.owner][name] is lk
            assert counts == res.counts, (counts, res.counts)
            for i, a in enumerate(gl):
                for b in gl[i + 1:]:
                    assert COMPAT[a.granted][b.granted], (name, a, b)
            for lk in res.converting:
                assert lk.granted is not None and lk.requested is not None
            for lk in res.waiting:
                assert lk.granted is None and lk.requested is not None
                assert self._owners[lk.owner][name] is lk
            assert bool(res.converting or res.waiting) == (name in self._contended)
            if res.lvb is not None:
                assert len(res.lvb) == LVB_SIZE
            if res.idle():
                assert res.lvb is not None and name in self._idle
        for owner, locks in self._owners.items():
            assert locks
            for name, lk in locks.items():
                res = self._res[name]
                if lk.granted is not None:
                    assert res.granted[owner] is lk
                if lk.requested is not None:
                    assert (lk in res.converting) if lk.granted is not None \
                        else (lk in res.waiting)

    # ---- internals -------------------------------------------------------------

    def _get(self, name: bytes) -> Resource:
        res = self._res.get(name)
        if res is None:
            res = self._res[name] = Resource(name)
        elif name in self._idle:
            del self._idle[name]
        return res

    def _maybe_forget(self, res: Resource) -> None:
        if not res.idle():
            return
        name = res.name
        if res.lvb is None:
            del self._res[name]
            self._idle.pop(name, None)
            return
        self._idle[name] = None
        self._idle.move_to_end(name)
        while len(self._idle) > self.max_idle:
            old, _ = self._idle.popitem(last=False)
            del self._res[old]

    def _compatible(self, res: Resource, mode: int, own: Lock | None) -> bool:
        counts = res.counts
        mask = COMPAT_MASK[mode]
        for m in range(6):
            n = counts[m]
            if n and not (mask >> m) & 1:
                if own is None or own.granted != m or n > 1:
                    return False
        return True

    def _try_code(self, res: Resource, lk: Lock) -> str:
        if self.dead:
            mask = COMPAT_MASK[lk.requested]
            for g in res.granted.values():
                if g.owner in self.dead and not (mask >> g.granted) & 1:
                    return "notrecovered"
        return "tryagain"

    def _write_lvb(self, res: Resource, lvb) -> None:
        lvb = bytes(lvb)
        if len(lvb) != LVB_SIZE:
            raise TableError(f"value block must be {LVB_SIZE} bytes")
        res.lvb = lvb
        res.lvb_ver += 1

    def _grant(self, res: Resource, lk: Lock) -> None:
        mode = lk.requested
        if lk.granted is not None:
            res.counts[lk.granted] -= 1
        else:
            res.granted[lk.owner] = lk
        lk.granted = mode
        lk.requested = None
        lk.basted = 0
        res.counts[mode] += 1
        self.out.append(Grant(lk.owner, res.name, lk.rid, mode, res.lvb, res.lvb_ver))

    def _ungrant(self, res: Resource, lk: Lock) -> None:
        res.counts[lk.granted] -= 1
        del res.granted[lk.owner]
        lk.granted = None

    def _dequeue(self, res: Resource, lk: Lock, code: str) -> None:
        if lk.granted is not None:
            res.converting.remove(lk)
        else:
            res.waiting.remove(lk)
        if not res.converting and not res.waiting:
            self._contended.discard(res.name)
        self.out.append(Fail(lk.owner, res.name, lk.rid, code))
        lk.requested = None

    def serves(self, name: bytes) -> bool:
        """Whether a request for ``name`` is decided now (not frozen, or thawed)."""
        return self._thawed(name)

    def _thawed(self, name: bytes) -> bool:
        """Whether ``name`` is served now (the table is not frozen, or the name starts
        with the thaw prefix)."""
        if not self.frozen:
            return True
        thaw = self.thaw_prefix
        return thaw is not None and name.startswith(thaw)

    def _grant_pending(self, res: Resource) -> None:
        if not (res.converting or res.waiting):
            return
        if not self.frozen or self._thawed(res.name):
            conv = res.converting
            while conv:
                lk = conv[0]
                if not self._compatible(res, lk.requested, lk):
                    break
                conv.pop(0)
                self._grant(res, lk)
            if not conv:
                wait = res.waiting
                while wait:
                    lk = wait[0]
                    if not self._compatible(res, lk.requested, None):
                        break
                    wait.pop(0)
                    self._grant(res, lk)
        if res.converting or res.waiting:
            self._send_basts(res)
        else:
            self._contended.discard(res.name)

    def _notify_holders(self, res: Resource, owner, mode: Mode) -> None:
        """Blocking callbacks for a request of ``owner`` in ``mode`` (queued, or a
        failed try-lock with notify): to every other live owner whose granted mode
        conflicts, once per (grant, mode)."""
        bit = 1 << mode
        dead = self.dead
        for g in res.granted.values():
            if (g.owner != owner and not COMPAT[g.granted][mode]
                    and not g.basted & bit and g.owner not in dead):
                g.basted |= bit
                self.out.append(Bast(g.owner, res.name, mode))

    def _send_basts(self, res: Resource) -> None:
        for lk in res.converting + res.waiting:
            self._notify_holders(res, lk.owner, lk.requested)
