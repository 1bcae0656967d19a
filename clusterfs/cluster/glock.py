"""Cluster locks as this node holds them ("glocks", after GFS2).

A glock caches one DLM lock: once granted it stays held after the operation that
wanted it (so the next operation needs no round trip) until another node asks for
a conflicting mode.  Then the blocking callback demotes it:

1. wait for the minimum hold time (or, once the lock has served an operation since
   its grant, until it has been idle here for a couple of milliseconds); have the
   kernel drop what it caches under the lock when the new mode requires it (its
   type's ``drop_kernel``: a file's pages; local holders of a held mode are still let
   in meanwhile, ``_drop_kernel``); then wait for local holders to finish (new local
   holders queue behind a due demote, so a busy node cannot starve the others);
2. its type's ``before_demote`` (``glops.py``): the file system commits and
   checkpoints the journal if the lock's blocks are dirty, and computes the value
   block;
3. convert down to the mode the other node can live with (NL keeps the value block
   alive on the server so cached metadata can be validated later);
4. wake local waiters.

On every grant its type's ``granted`` checks the value block's version against what
the node cached, dropping the cache when someone else changed the object meanwhile.

Operations take glocks through ``take_cached`` (all of them at hand: nothing to wait
for, the common case), else ``acquire`` (sorted by name: a global order, so two
nodes never wait on each other in a cycle) or, inside a synchronous operation body,
through ``try_hold`` (never waits; the body is retried with the lock in its set when
it cannot be had at once).

Name order alone does not rule out a cycle on *one* lock: two nodes that both hold
it in PR and both convert up to EX wait for each other (each keeps the PR the other
waits for, and its callback cannot demote it while its own conversion is pending),
a conversion deadlock.  So, as GFS2 does (``do_xmote``: ``LM_FLAG_TRY_1CB``, then
"conversion fails, unlock and try again"), a conversion up from a mode other nodes
can be waiting for is only *tried* (the holders in the way are called back); when
it fails the glock goes down to NL first and then queues for the mode it wants.  A
queued request of a node therefore never holds a mode that another node waits for.

A callback that arrives while this node's own request for the lock is in flight is
kept and honoured after the grant, once the minimum hold time counted from that
grant is over (GFS2's pending demote, held until ``gl_tchange + gl_hold_time``): the
node gets one batch of work out of each grant, and a waiting node waits for at
most one such batch.
"""

from __future__ import annotations

import logging
from typing import Iterable

import trio

from lockmgr import Deadlock, LockError, Mode, TryAgain, covers, downgrade_for

from .glops import NO_OPS, LockOps

log = logging.getLogger(__name__)

NL, PR, PW, EX = Mode.NL, Mode.PR, Mode.PW, Mode.EX
MIN_HOLD = 0.01          # seconds a granted lock is kept before a demote is honoured
WRITER_HOLD = 2          # ... times this when the node asking wants to write (CW, PW, EX)
IDLE_DEMOTE = 0.002      # ... unless it served an operation and has been idle this long
KEEP_LOCKS = 20000       # NL glocks kept (with their caches) before the oldest are dropped


class Glock:
    """One lock as this node holds it; ``ops``: its type's operations (``glops``)."""

    __slots__ = ("name", "ops", "mode", "holders", "busy", "demote", "demote_since",
                 "granted_at", "_changed", "version", "dirty", "used", "idle_since",
                 "draining", "passing")

    def __init__(self, name: bytes, ops: LockOps):
        self.name = name
        self.ops = ops
        self.mode: Mode | None = None     # mode granted by the lock manager
        self.holders = 0                  # local operations holding it now
        self.busy = False                 # a request / conversion / demote in progress
        self.demote: Mode | None = None   # mode another node asked for
        self.demote_since = 0.0
        self.granted_at = 0.0
        self._changed: trio.Event | None = None   # made when someone waits (``changed``)
        self.version: int | None = None   # version of the cached objects it covers
        self.dirty = False                # covered objects changed under EX since grant
        self.used = False                 # an operation held it since the grant
        self.idle_since = 0.0             # when its last local holder let go
        self.draining = False             # a demote is under way: new holders wait
        self.passing = False              # the kernel drops what it caches under it:
                                          # holders of a held mode are let in (below)

    @property
    def changed(self) -> trio.Event:
        """The event set at the next change of the glock's state (``notify``)."""
        ev = self._changed
        if ev is None:
            ev = self._changed = trio.Event()
        return ev

    def notify(self) -> None:
        # (every release of an operation's locks notifies: an event only when a
        # task waits, as most releases have nobody to wake)
        ev = self._changed
        if ev is not None:
            self._changed = None
            ev.set()

    def __repr__(self):
        m = self.mode.name if self.mode is not None else "-"
        return f"<Glock {self.name!r} {m} holders={self.holders} demote={self.demote}>"


class Holds:
    """The glocks one operation holds: ``modes[name]``; release with ``table.release``."""

    __slots__ = ("modes",)

    def __init__(self):
        self.modes: dict[bytes, Mode] = {}

    def covers(self, name: bytes, mode: Mode) -> bool:
        m = self.modes.get(name)
        return m is not None and covers(m, mode)


class GlockTable:
    """This node's glocks over one ``lockmgr.LockClient``.

    Args:
        client: the lock client.
        types: the operations of each lock type (first byte of the name) that covers
            cached objects; other types get ``glops.NO_OPS``.
        min_hold: minimum seconds a grant is kept before a demote is honoured.
    """

    def __init__(self, client, types: dict[bytes, LockOps], *, min_hold: float = MIN_HOLD,
                 idle: float = IDLE_DEMOTE, keep_locks: int = KEEP_LOCKS):
        self.client = client
        self.types = types
        self.min_hold = min_hold
        self.idle = min(idle, min_hold)
        self.keep_locks = keep_locks
        self.glocks: dict[bytes, Glock] = {}
        self.stats = {"requests": 0, "cached": 0, "demotes": 0, "deadlocks": 0,
                      "conversions_dropped": 0}

    def get(self, name: bytes) -> Glock:
        g = self.glocks.get(name)
        if g is None:
            g = self.glocks[name] = Glock(name, self.types.get(name[:1], NO_OPS))
        return g

    # -- taking --------------------------------------------------------------------

    def hold_time(self, g: Glock) -> float:
        """How long a grant of ``g`` is kept before its demote is honoured.

        A node that asks to read waits one minimum hold (its wait is what a reader
        of a file another node writes sees).  A node that asks to write waits twice
        that: a hand-off between writers is dirty both ways (a checkpoint each), and
        longer batches pay for it (docs/CLUSTER.md, "Where the time goes": with 8
        nodes creating in one directory, 0.46-0.57 of one node's rate at 10 ms
        against 0.62-0.65 at 20 ms)."""
        if g.demote is not None and g.demote not in (Mode.CR, PR):
            return self.min_hold * WRITER_HOLD
        return self.min_hold

    def _demote_due(self, g: Glock) -> bool:
        return g.demote is not None and \
            (g.draining or trio.current_time() >= g.granted_at + self.hold_time(g))

    def _blocked(self, g: Glock, covered: bool) -> bool:
        """Whether a local operation must wait for ``g`` now (``covered``: the mode
        it wants is one ``g`` holds).  While the kernel drops its pages a held mode
        is let in (the request may hold page locks the kernel waits for) and a
        stronger one waits until the demote is over; otherwise everyone waits while
        a request or conversion is in flight or a demote is due."""
        if g.passing:
            return not covered
        return g.busy or self._demote_due(g)

    @staticmethod
    def _hold(holds: Holds, name: bytes, g: Glock) -> None:
        """Count ``holds`` as a holder of ``g`` (in the mode it holds)."""
        if name not in holds.modes:
            g.holders += 1
            g.used = True
        holds.modes[name] = g.mode

    def try_hold(self, holds: Holds, name: bytes, mode: Mode) -> bool:
        """Take ``name`` in ``mode`` for ``holds`` if that needs no waiting."""
        if holds.covers(name, mode):
            return True
        g = self.glocks.get(name)
        if g is None or g.mode is None or not covers(g.mode, mode) or \
                self._blocked(g, True):
            return False
        self._hold(holds, name, g)
        self.stats["cached"] += 1
        return True

    def take_cached(self, want: dict[bytes, Mode]) -> Holds | None:
        """Hold every lock in ``want`` if all are at hand (no waiting, so no order to
        keep); None (holding nothing) otherwise."""
        holds = Holds()
        for name, mode in want.items():
            if not self.try_hold(holds, name, mode):
                self.release(holds)
                return None
        return holds

    async def acquire(self, want: dict[bytes, Mode], holds: Holds | None = None) -> Holds:
        """Hold every lock in ``want`` (name -> mode), taken in name order."""
        holds = holds or Holds()
        try:
            for name in sorted(want):
                await self._acquire_one(holds, name, want[name])
        except BaseException:
            self.release(holds)
            raise
        return holds

    async def _acquire_one(self, holds: Holds, name: bytes, mode: Mode) -> None:
        if holds.covers(name, mode):
            return
        g = self.get(name)
        while True:
            covered = g.mode is not None and covers(g.mode, mode)
            if self._blocked(g, covered):
                await g.changed.wait()
                continue
            if covered:
                self._hold(holds, name, g)
                return
            g.busy = True
            try:
                self.stats["requests"] += 1
                if g.mode is not None and g.mode != NL:
                    grant = await self._convert_up(g, mode, int(name in holds.modes))
                else:
                    grant = await self.client.lock(name, mode,
                                                   on_blocking=self._on_blocking)
                g.mode = grant.mode
                g.granted_at = trio.current_time()
                g.dirty = False
                g.used = False
                g.ops.granted(g, grant.lvb)
            except Deadlock:
                self.stats["deadlocks"] += 1
                raise
            finally:
                g.busy = False
                g.notify()

    async def _convert_up(self, g: Glock, mode: Mode, mine: int):
        """Convert ``g`` (held in a mode above NL, ``g.busy`` set) up to cover
        ``mode`` without ever queueing while holding that mode: a try first (it calls
        the holders in the way back); if it fails, down to NL (once this node's
        other holders, all but ``mine``, are done with the lock), then queue.
        Returns the grant."""
        name = g.name
        try:
            return await self.client.lock(name, mode, try_lock=True, notify=True,
                                          on_blocking=self._on_blocking)
        except TryAgain:
            pass
        self.stats["conversions_dropped"] += 1
        # queued while holding PR, this node would keep what the other node waits
        # for (its callback cannot demote a lock whose conversion is pending): a
        # conversion deadlock.  Holding NL, it is in nobody's way.
        while g.holders > mine:
            await g.changed.wait()
        if g.ops.kernel_caches(g, NL):
            await self._drop_kernel(g)
            while g.holders > mine:
                await g.changed.wait()
        try:
            lvb = g.ops.before_demote(g, NL)
        except Exception as e:
            # it could not write back what the lock covers (the node fenced itself):
            # the lock stays as it is, the operation fails (EIO)
            raise LockError(f"conversion of {name!r} abandoned: {e}") from e
        await self.client.convert(name, NL, lvb=lvb)
        g.mode = NL
        g.dirty = False
        g.demote = None      # any callback is answered: NL conflicts with no mode
        return await self.client.lock(name, mode, on_blocking=self._on_blocking)

    def release(self, holds: Holds) -> None:
        for name in holds.modes:
            g = self.glocks.get(name)
            if g is None:
                continue
            g.holders -= 1
            if g.holders == 0:
                g.idle_since = trio.current_time()
                g.notify()
        holds.modes.clear()

    # -- demotion -----------------------------------------------------------------

    async def _on_blocking(self, name: bytes, requested: Mode) -> None:
        g = self.glocks.get(name)
        # a callback for a first grant can come before its requester has recorded
        # the grant here (g.mode None, g.busy): keep it, the demote waits for it
        if g is None or (g.mode is None and not g.busy):
            return
        if g.demote is None or covers(requested, g.demote):
            if g.demote is None:
                g.demote_since = trio.current_time()
            g.demote = requested
        await self._demote(g)

    async def _demote(self, g: Glock) -> None:
        # A request of this node for the lock is in flight: the callback is for the
        # grant it brings (or one it replaces), and the hold time counts from there.
        while g.busy and not g.draining:
            await g.changed.wait()
        if g.demote is None:
            return       # answered meanwhile: the request went down to NL first
        # Keep the lock for the minimum hold time, so that a busy node gets work done
        # with each grant.  A lock that has served an operation since its grant and
        # has then stayed idle for ``idle`` seconds goes at once: nobody here wants it.
        while not g.draining:
            now = trio.current_time()
            hold_left = g.granted_at + self.hold_time(g) - now
            if hold_left <= 0:
                break
            wait = hold_left
            if g.used and not g.holders and not g.busy:
                idle_left = g.idle_since + self.idle - now
                if idle_left <= 0:
                    break
                wait = min(wait, idle_left)
            with trio.move_on_after(wait):
                await g.changed.wait()
        # What the kernel caches under the lock goes first, while local requests
        # are still let in under it (``_drop_kernel``); then new ones wait.
        while g.demote is not None and g.mode is not None and \
                g.ops.kernel_caches(g, self._target(g)):
            await self._drop_kernel(g)
            while g.busy:
                await g.changed.wait()
        g.draining = True
        try:
            g.notify()     # local waiters re-check: the demote is now due
            while g.holders or g.busy:
                await g.changed.wait()
            if g.demote is None or g.mode is None:
                return
            target = self._target(g)
            if target == g.mode:
                g.demote = None
                return
            g.busy = True
            try:
                try:
                    lvb = g.ops.before_demote(g, target)
                except Exception as e:
                    # it could not write back what the lock covers (the node fenced
                    # itself): the lock stays until the node is recovered
                    log.warning("demote of %r abandoned: %s", g.name, e)
                    return
                await self.client.convert(g.name, target, lvb=lvb)
                g.mode = target
                g.dirty = False
                self.stats["demotes"] += 1
            except LockError as e:
                log.warning("demote of %r failed: %s", g.name, e)
            finally:
                g.busy = False
                g.demote = None
        finally:
            g.draining = False
            g.notify()

    def _target(self, g: Glock) -> Mode:
        """The mode a demote of ``g`` goes down to (its type may ask for less)."""
        return g.ops.demote_target(g, downgrade_for(g.mode, g.demote))

    async def _drop_kernel(self, g: Glock) -> None:
        """Have the kernel drop what it caches under ``g`` (its type's
        ``drop_kernel``).  Meanwhile local operations that want a mode ``g`` holds
        are let in even though a demote is due: the kernel's invalidation waits for
        the pages of requests in flight, and such a request may be waiting for
        ``g``.  The type's step repeats until a pass ran with no request served."""
        g.passing = True
        g.notify()
        try:
            await g.ops.drop_kernel(g)
        finally:
            g.passing = False
            g.notify()

    async def unlock(self, name: bytes) -> None:
        """Give a glock up entirely (its cached objects are dropped)."""
        g = self.glocks.get(name)
        if g is None:
            return
        while g.holders or g.busy:
            await g.changed.wait()
        if g.mode is not None and g.ops.kernel_caches(g, NL):
            await self._drop_kernel(g)
            while g.holders or g.busy:
                await g.changed.wait()
        if g.mode is not None:
            g.busy = True
            try:
                lvb = g.ops.before_demote(g, NL)
                await self.client.unlock(name, lvb=lvb)
            except LockError as e:
                log.warning("unlock of %r failed: %s", name, e)
            finally:
                g.busy = False
        g.mode = None
        g.ops.dropped(g)
        self.glocks.pop(name, None)
        g.notify()

    async def trim(self) -> None:
        """Give up the oldest idle NL glocks beyond ``keep_locks``."""
        if len(self.glocks) <= self.keep_locks:
            return
        idle = [g for g in self.glocks.values()
                if not g.holders and not g.busy and g.mode in (None, NL)]
        idle.sort(key=lambda g: g.granted_at)
        for g in idle[:len(self.glocks) - self.keep_locks]:
            await self.unlock(g.name)

    async def unlock_all(self, names: Iterable[bytes] | None = None) -> None:
        for name in list(names if names is not None else self.glocks):
            await self.unlock(name)
