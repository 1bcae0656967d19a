"""Coherence of one cluster member: every metadata access under the lock that covers it.

Every metadata object is read under its lock in PR or better and changed under EX
(lock names: ``locks.py``): ``Volume`` calls ``require_*`` for every access inside
an operation body.  A lock this node already holds (cached) is taken on the spot;
any other raises ``NeedLock``, the operation rolls back, and ``run`` takes the whole
set again in name order and retries (so no node ever waits for a lock while holding
one that sorts after it).  Which locks each operation starts with is the frontend's
plan (``frontend.py``); open modes and deletion are ``openmodes.py``.

Demoting a lock (another node wants it) is its type's job (``glops.py``): it
checkpoints the journal when the lock's blocks are dirty, then converts down writing
a value block: version, and for inodes size and mtime, for groups the free counts.
A node keeps its cached objects while it holds the lock at least in NL and reuses
them when the version it finds on the next grant is unchanged.

The kernel caches an inode's attributes only while this node holds the inode's lock
in PR or better (``kernel_cacheable``); before the lock goes below PR they are dropped
(``forget_kernel_attrs``: attributes only, which takes no lock in the kernel that a
FUSE request could hold).  With ``-o entrycache`` the kernel caches the directory
entries that a lookup or a create hands it, only while this node holds the
directory's lock in PR or better (``entries_cacheable``); before any directory's
lock goes below PR the kernel's entry epoch is raised (``forget_entries``), after
which it looks every cached entry up again, also those that requests in flight
bring.  Dropping one entry (FUSE_NOTIFY_INVAL_ENTRY) would lock the parent directory
in the kernel, where a create or unlink may wait for the very lock being given up;
the epoch takes no lock.  A kernel without epochs (before Linux 6.16) caches no
entries.  An epoch raise detaches any mount made on an entry below the mount point
(the kernel drops the entry without asking), hence an option.  File data is cached
by the kernel under the inode lock and dropped before it goes below PR, in an order
that avoids that deadlock (``pages.py``).
"""

from __future__ import annotations

import errno
import logging
import random
import stat
from typing import NoReturn

import trio

from journal.errors import JournalAborted
from lockmgr import (CW, EX, PR, PW, Deadlock, LeaseLost, LockError, Mode, NotRecovered,
                     TryAgain, covers, supremum)

from ..errors import FSError, Fenced
from ..ondisk.format import Dinode
from .glock import GlockTable, Holds
from .glops import lock_types
from .locks import (FREEZE, INODE, NeedLock, covering_lock, describe_lock, group_lock,
                    inode_lock, lock_number)
from .pages import KernelPages

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 2000
EPOCH_LIMIT = (1 << 31) - (1 << 24)     # epoch raises after which entries go uncached
WRITE_MODES = (CW, PW, EX)
NOT_AT_HAND = object()      # ``run_at_hand``: the locks were not all at hand


def writes(want: dict) -> bool:
    """Whether an operation that starts with the locks ``want`` may change the volume."""
    return any(m in WRITE_MODES for m in want.values())


class Coherence:
    """The cluster side of a mounted file system.

    Args:
        vol: the volume (its ``cluster`` becomes this object).
        fs: the ``Filesystem``.
        client: the lock client.
        slot: this node's slot; groups are preferred by affinity to it.
        min_hold: seconds a granted lock is kept before it is given up.
    """

    def __init__(self, vol, fs, client, *, slot: int, min_hold: float = 0.01):
        self.vol = vol
        self.fs = fs
        self.client = client
        self.slot = slot
        self.glocks = GlockTable(client, lock_types(self), min_hold=min_hold)
        self.holds: Holds | None = None
        self._usable: tuple[Holds, list[int]] | None = None   # (holds, alloc_groups())
        self.fenced = False
        self._fenced_event = trio.Event()
        self.waits: set[trio.CancelScope] = set()   # lock manager waits of operations
        self.prefer_groups(vol.sb)
        self.known_free: dict[int, int] = {}
        self.ex_groups: set[int] = set()
        # fn(ino): drop the kernel's cached attributes of an inode (set once mounted)
        self.forget_kernel_attrs = None
        # directory entries in the kernel (module doc): entry_epochs once the kernel
        # took an epoch raise (set once mounted), forget_kernel_entries() raises it;
        # lookups that reached this node and epochs raised, for ``status``
        self.entry_epochs = False
        self.forget_kernel_entries = None
        self.entry_stats = {"lookups": 0, "epochs": 0}
        # operation bodies run, retried for a lock, and writes served at hand
        # (``frontend.ClusterFrontend.write``)
        self.stats = {"attempts": 0, "retries": 0, "writes_at_hand": 0}
        # freezing: set while this node freezes the volume (``admin.VolumeAdmin``):
        # its own operations that write wait for it; frozen_here: this node gave the
        # freeze lock up (another froze the volume) and has not had it back since
        self.gate: trio.Event | None = None
        self.frozen_here = False
        # fn(sb): take a superblock with a new geometry (grow, new slots; set by the
        # member); called when the freeze lock comes back
        self.adopt_superblock = None
        # fn(): called when this node gives the freeze lock up (set by the member:
        # it asks for the lock again at once, so that the thaw reaches this node,
        # and with it a new superblock, even when it writes nothing)
        self.after_freeze = None
        self.thaw_waits: set[trio.CancelScope] = set()   # wait_thawed's (unmount ends them)
        # the kernel's page cache of files (pages.py), and the files open for writing
        # here (OpenModes.write_handles): their inode locks are taken EX only
        self.pages = KernelPages()
        self.writable: dict[int, int] = {}
        vol.cluster = self

    def prefer_groups(self, sb) -> None:
        """Order the groups by affinity to our slot: ``g % nslots == slot % nslots``
        first (again when the slot count changes: ``ClusterMount.adopt_superblock``)."""
        n, slot = sb.nslots, self.slot
        mine = [g for g in range(sb.rgrp_count) if g % n == slot % n]
        others = [g for g in range(sb.rgrp_count) if g % n != slot % n]
        self.preferred = mine + others
        self.rank = {g: i for i, g in enumerate(self.preferred)}

    # -- requirement checks (called by the volume inside operation bodies) -----------

    def _require(self, name: bytes, mode: Mode, hint: int | None = None) -> None:
        holds = self.holds
        if holds is None:
            raise RuntimeError(f"metadata access outside a locked operation "
                               f"({describe_lock(name)})")
        if mode in WRITE_MODES and not self._may_write(holds):
            raise NeedLock(FREEZE, PR)
        take = self._promote(name, mode)
        if holds.covers(name, take) or self.glocks.try_hold(holds, name, take):
            return
        raise NeedLock(name, mode, hint)     # (``run`` promotes it again)

    def _promote(self, name: bytes, mode: Mode) -> Mode:
        """The mode to take ``name`` in: EX for the inode lock of a file open for
        writing here (with the kernel's pages: see ``pages.py``), else ``mode``."""
        if self.writable and name[:1] == INODE and mode != EX and \
                lock_number(name) in self.writable:
            return EX
        return mode

    def _may_write(self, holds: Holds) -> bool:
        """Whether the running body may change the volume: it holds the freeze lock
        (or takes it now without waiting) and this node is not freezing it."""
        return self.gate is None and \
            (holds.covers(FREEZE, PR) or self.glocks.try_hold(holds, FREEZE, PR))

    def may_write_now(self, ino: int | None = None) -> bool:
        """Whether the running body may make a change it can also leave out (an
        access time of inode ``ino``): not while the volume is frozen, as the kernel
        skips atime updates on a frozen file system, and only with the inode's lock
        at hand in EX.  A read never waits to convert its lock up for an access
        time: it may hold the kernel's page locks, and the conversion could have to
        drop the very pages it is reading (``pages.py``)."""
        holds = self.holds
        if holds is None or not self._may_write(holds):
            return False
        if ino is None:
            return True
        name = inode_lock(ino)
        return holds.covers(name, EX) or self.glocks.try_hold(holds, name, EX)

    def require_inode(self, ino: int, write: bool) -> None:
        self._require(inode_lock(ino), EX if write else PR, ino if write else None)

    def require_group(self, rg: int, write: bool) -> None:
        self._require(group_lock(rg), EX if write else PR)

    def require_object(self, obj) -> None:
        name = covering_lock(obj)
        if name is None:
            raise TypeError(f"no lock covers {obj.__class__.__name__}")
        self._require(name, EX, obj.bno if obj.__class__ is Dinode else None)
        self.glocks.glocks[name].dirty = True

    def reread_superblock(self) -> None:
        """The freeze lock came back after a freeze: read the superblock again and,
        when a grow or new slots changed it meanwhile, take its geometry
        (``adopt_superblock``)."""
        from ..fs.volume import read_superblock
        try:
            sb = read_superblock(self.vol.dev)
        except Exception as e:
            log.error("superblock not read again after a freeze: %s", e)
            return
        if sb.growing:
            # (the recovery of a node that died growing finishes the grow before
            # its freeze lock is released: not seen here)
            log.error("the superblock records an unfinished grow: the grown geometry "
                      "is not taken")
            return
        old = self.vol.sb
        if (sb.total_blocks, sb.rgrp_count, sb.nslots) == \
                (old.total_blocks, old.rgrp_count, old.nslots) and \
                sb.image() == old.image():
            return
        log.info("the superblock changed while frozen: %d blocks, %d groups, %d slots",
                 sb.total_blocks, sb.rgrp_count, sb.nslots)
        if self.adopt_superblock is not None:
            try:
                self.adopt_superblock(sb)
            except Exception:
                # the mount goes on with the geometry it has (a remount takes the new)
                log.exception("the new superblock was not taken")

    async def wait_thawed(self) -> None:
        """Take the freeze lock back in PR (waiting for the thaw) and keep it cached."""
        with trio.CancelScope() as scope:
            self.thaw_waits.add(scope)
            try:
                while not self.fenced:
                    try:
                        holds = await self.until_fenced(self.glocks.acquire, {FREEZE: PR})
                    except Deadlock:
                        await trio.sleep(random.uniform(0.002, 0.05))
                        continue
                    except (LeaseLost, LockError, FSError):
                        return          # the node is fencing itself
                    self.glocks.release(holds)
                    return
            finally:
                self.thaw_waits.discard(scope)

    def kernel_cacheable(self, ino: int) -> bool:
        """Whether the kernel may cache the attributes of ``ino`` now: this node holds
        the inode's lock in PR or better and no other node has asked for it (its
        demote invalidates them in the kernel, ``forget_kernel_attrs``)."""
        g = self.glocks.glocks.get(inode_lock(ino))
        return g is not None and g.mode is not None and covers(g.mode, PR) and \
            g.demote is None and not g.busy

    def entries_cacheable(self, parent: int) -> bool:
        """Whether the kernel may cache an entry of directory ``parent`` that a lookup
        or a create answers now: the kernel raises epochs, and it may cache the
        directory's attributes (its lock held in PR or better, not going away).  An
        answer worked out under an earlier grant of the lock is safe too: the lock
        went below PR in between, which raised the epoch after the kernel read it
        for the request."""
        return self.entry_epochs and self.kernel_cacheable(parent)

    def forget_entries(self, ino: int | None = None) -> None:
        """The lock of inode ``ino`` goes below PR (None: every lock goes): if it is
        a directory, or not known to be none, have the kernel look up again every
        entry it caches.  Another node may change the directory from now on."""
        if not self.entry_epochs or self.forget_kernel_entries is None:
            return
        if ino is not None:
            di = self.vol.cached(ino)
            if isinstance(di, Dinode) and not stat.S_ISDIR(di.mode):
                return
        self.entry_stats["epochs"] += 1
        self.forget_kernel_entries()
        if self.entry_stats["epochs"] >= EPOCH_LIMIT:
            # the kernel's epoch is an int: before it wraps (and old stamps would
            # look current again), stop handing out cacheable entries for good
            log.warning("%d entry epochs raised: the kernel caches no more directory "
                        "entries on this mount", self.entry_stats["epochs"])
            self.entry_epochs = False

    def cache_valid(self, obj) -> bool:
        """Whether this node holds the lock covering a cached object (PR or better).

        Only then is the object known to be current: a lock held in NL keeps its
        objects for validation at the next grant, but meanwhile another node may have
        freed their blocks and reused them under other locks."""
        name = covering_lock(obj)
        if name is None:
            return False
        g = self.glocks.glocks.get(name)
        return g is not None and g.mode is not None and covers(g.mode, PR)

    def alloc_groups(self) -> list[int]:
        """Groups usable for allocation now: held EX by this node, best first.  No
        lock changes state while an operation's body runs (it does not yield), so
        the answer is worked out once per body (per ``holds``); an allocation asks
        several times."""
        holds = self.holds
        usable = self._usable
        if usable is not None and usable[0] is holds:
            return usable[1]
        out = [rg for rg in sorted(self.ex_groups, key=self.rank.__getitem__)
               if self._hold_group(holds, rg)]
        if holds is not None:
            self._usable = (holds, out)
        return out

    def may_alloc_in(self, rg: int) -> bool:
        """Whether group ``rg`` is among ``alloc_groups()`` (taking its hold as that
        does), without sorting and holding every group this node has in EX."""
        usable = self._usable
        if usable is not None and usable[0] is self.holds:
            return rg in usable[1]
        return rg in self.ex_groups and self._hold_group(self.holds, rg)

    def _hold_group(self, holds: Holds, rg: int) -> bool:
        """Hold group ``rg``'s lock in EX for ``holds`` if that needs no waiting."""
        name = group_lock(rg)
        return holds.covers(name, EX) or self.glocks.try_hold(holds, name, EX)

    def out_of_space(self, want: int) -> None:
        """Ask for the next group that may have room (raises NeedLock) or return."""
        usable = set(self.alloc_groups())
        best = None
        for rg in self.preferred:
            if rg in usable:
                continue
            free = self.known_free.get(rg)
            if free is None or free > 0:
                best = rg
                if free is None or free >= want:
                    break
        if best is not None:
            raise NeedLock(group_lock(best), EX)

    def home_group(self) -> int:
        """The group to offer a new allocation first."""
        for rg in self.preferred:
            if self.known_free.get(rg, 1) > 64:
                return rg
        return self.preferred[0]

    # -- running operation bodies -----------------------------------------------------

    def check(self) -> None:
        """EIO once the node is fenced; a journal that a device error stopped
        fences it (the journal's next commit cannot be written, and the other
        members must recover what it holds)."""
        if self.fenced:
            raise FSError(errno.EIO, "node is fenced; remount to rejoin")
        journal = self.vol.journal
        if journal is not None and journal.aborted is not None:
            self.failed(JournalAborted(journal.aborted))

    async def run(self, fn, *args, want: dict | None = None, new_inode=None, **kw):
        """Run ``fn(*args, **kw)`` (a synchronous body) holding the locks it needs.

        When the body needs the lock of an inode it allocates, the retry hints the
        allocator to take the same block again (``vol.inode_hint``, set only while
        the body runs, so that no other operation takes the hint meanwhile).
        ``new_inode``: ``async fn(ino)``, awaited (holding no lock) before such a
        retry."""
        want = dict(want or {})
        attempts = 0
        hint = fresh = None
        while True:
            if new_inode is not None and fresh is not None:
                await new_inode(fresh)
            fresh = None
            self.check()
            attempts += 1
            self.stats["attempts"] += 1
            if FREEZE not in want and writes(want):
                want[FREEZE] = PR
            if FREEZE in want and self.gate is not None:
                await self.until_fenced(self.gate.wait)
                continue
            # (after the freeze lock: a read of a file open for writing here takes
            # its inode lock in EX but changes nothing, and goes on while frozen)
            take = {name: self._promote(name, m) for name, m in want.items()} \
                if self.writable else want
            holds = await self._take(take)
            if holds is None:
                continue
            if FREEZE in want and self.gate is not None:
                # this node began to freeze the volume while the locks were awaited
                self.glocks.release(holds)
                continue
            self.holds = holds
            self.vol.inode_hint = hint
            try:
                return fn(*args, **kw)
            except NeedLock as e:
                self.stats["retries"] += 1
                want[e.name] = supremum(want[e.name], e.mode) if e.name in want else e.mode
                if e.inode_hint is not None:
                    hint = fresh = e.inode_hint
            except (Fenced, JournalAborted) as e:
                self.failed(e)
            finally:
                self.vol.inode_hint = None
                self.holds = None
                self._usable = None
                self.glocks.release(holds)
            if attempts >= MAX_ATTEMPTS:
                raise FSError(errno.EDEADLK, "could not gather the locks an operation needs")

    def run_at_hand(self, fn, *args, want: dict):
        """Run ``fn(*args)`` as ``run`` does, but only if this node holds every lock
        of ``want`` (the freeze lock included when it writes) and they are at hand
        without waiting: for the common case of a request whose locks are cached
        (a stream of writes), without ``run``'s rounds.  Returns NOT_AT_HAND, having
        changed nothing, when a lock is not at hand or the body needs another one
        (its operation rolled back): the caller then goes through ``run``."""
        self.check()
        if self.gate is not None:
            return NOT_AT_HAND
        holds = self.glocks.take_cached(want)
        if holds is None:
            return NOT_AT_HAND
        self.stats["attempts"] += 1
        self.holds = holds
        try:
            return fn(*args)
        except NeedLock:
            self.stats["retries"] += 1
            return NOT_AT_HAND
        except (Fenced, JournalAborted) as e:
            self.failed(e)
        finally:
            self.holds = None
            self._usable = None
            self.glocks.release(holds)

    def failed(self, e: Exception) -> NoReturn:
        """A body (or a commit) stopped on a refused device write or a stopped
        journal: fence (a survivor recovers the journal) and raise EIO."""
        if isinstance(e, Fenced):
            self.fence("a volume write was refused")
            raise FSError(errno.EIO, "node is fenced") from None
        # the journal stopped at an earlier device error (the node fenced itself
        # meanwhile, or the device failed): nothing more can be written here
        self.fence(f"the journal stopped: {e}")
        raise FSError(errno.EIO, f"journal aborted: {e}") from None

    async def _take(self, want: dict[bytes, Mode]) -> Holds | None:
        """Hold the locks ``want`` (at once when all are at hand); None when the
        wait closed a deadlock cycle (after a short random pause: ask again).  A
        lock manager out of reach is EIO."""
        try:
            return self.glocks.take_cached(want) or \
                await self.until_fenced(self.glocks.acquire, want)
        except Deadlock:
            await trio.sleep(random.uniform(0.002, 0.05))
            return None
        except (LeaseLost, LockError) as e:
            raise FSError(errno.EIO, f"lock manager: {e}") from None

    async def cache_lock(self, name: bytes, mode: Mode) -> None:
        """Have this node hold ``name`` in ``mode`` (cached: no operation holds it
        after the call), without the freeze lock: nothing is changed."""
        while True:
            self.check()
            holds = await self._take({name: mode})
            if holds is not None:
                self.glocks.release(holds)
                return

    def write_back(self, *, flush: bool = False) -> None:
        """Checkpoint the journal before a lock goes to another node (and flush
        the device).  A node that cannot (a device error, a stopped journal)
        fences itself: it leaves the lock manager, and a survivor recovers its
        journal and its locks, instead of the lock staying here for good."""
        try:
            self.vol.checkpoint()
            if flush:
                self.vol.dev.flush()
        except Exception as e:
            self.fence(f"the write-back for another node failed: {e}")
            raise

    def fence(self, why: str) -> None:
        if not self.fenced:
            log.error("self-fencing (%s): all volume I/O stops; remount to rejoin", why)
        self.fenced = True
        self._fenced_event.set()
        self.pages.drop_all_soon()
        self.forget_entries()       # path walks reach the file system (and its EIO)
        for scope in list(self.waits):
            scope.cancel()

    async def wait_fenced(self) -> None:
        """Return once the node has fenced itself (``fence``)."""
        await self._fenced_event.wait()

    async def until_fenced(self, fn, *args, **kw):
        """``await fn(*args, **kw)`` (a wait for the lock manager), given up with EIO
        when the node fences itself meanwhile: a lock manager that is out of reach
        must not hang the applications."""
        self.check()
        with trio.CancelScope() as scope:
            self.waits.add(scope)
            try:
                return await fn(*args, **kw)
            finally:
                self.waits.discard(scope)
        raise FSError(errno.EIO, "node is fenced (lease lost); remount to rejoin")

    async def try_lock(self, name: bytes, mode: Mode) -> bool:
        """Take ``name`` in ``mode`` if no other node is in the way (False: one is)."""
        try:
            await self.until_fenced(self.client.lock, name, mode, try_lock=True)
            return True
        except (TryAgain, NotRecovered):
            return False
        except (LeaseLost, LockError) as e:
            # the session was lost meanwhile (the node is fencing itself): EIO
            raise FSError(errno.EIO, f"lock manager: {e}") from None

