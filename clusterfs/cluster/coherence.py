"""Coherence of one cluster member: which lock covers what, and the locked frontend.

Lock names (ordered by name: the global lock order; see docs/CLUSTER.md)::

    I<ino:8>   inode: its dinode, extent/directory tree blocks and xattr block
    N          rename: cross-directory renames (no directory loops)
    O<ino:8>   open: PR by every node that has the inode open (iopen); EX by one
               node when no other has it open (its creator or remover, cached)
    R<rg:4>    resource group: its header and bitmap blocks
    S<slot:2>  a mounted node's slot (held EX while mounted)
    J<slot:2>  recovery of a slot's journal
    W<ino:8>   cluster open mode: EX by the one node writing the file, CW by each
               writer of a multi-writer file

Every metadata object is read under its lock in PR or better and changed under EX:
``Volume`` calls ``require_*`` for every access inside an operation body.  A lock this
node already holds (cached) is taken on the spot; any other raises ``NeedLock``, the
operation rolls back, and ``run`` takes the whole set again in name order and retries
(so no node ever waits for a lock while holding one that sorts after it).

Demoting a lock (another node wants it) checkpoints the journal when the lock's
blocks are dirty, then converts down writing a value block: version, and for inodes
size and mtime, for groups the free counts.  A node keeps its cached objects while
it holds the lock at least in NL and reuses them when the version it finds on the
next grant is unchanged.

The kernel caches an inode's attributes only while this node holds the inode's lock
in PR or better (``kernel_cacheable``); before the lock goes below PR they are dropped
(``forget_kernel_attrs``: attributes only, which takes no lock in the kernel that a
FUSE request could hold).  Directory entries are not cached (entry timeout 0) and
files are opened ``direct_io``: dropping an entry or cached pages from a lock
callback can deadlock against a FUSE request that waits for the same lock.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import struct
from collections import OrderedDict

import trio

from lockmgr import (CW, EX, PR, PW, Deadlock, LeaseLost, LockError, Mode, NotRecovered,
                     TryAgain, covers, supremum)

from ..errors import CorruptBlock, FSError, Fenced
from ..ondisk.format import Bitmap, Dinode, RgrpHeader, TreeNode, XattrBlock
from .glock import GlockTable, Holds

log = logging.getLogger(__name__)

RENAME_LOCK = b"N"
MULTIWRITER_XATTR = b"user.clusterfs.multiwriter"
MAX_ATTEMPTS = 2000
OPEN_RETRY_S = 1.0
OPEN_CACHE = 4096      # open locks kept in EX for inodes not open here

_ILVB = struct.Struct("<QQqQ")        # version, size, mtime_ns, generation
_RLVB = struct.Struct("<QIII12x")     # version, free, dinodes, unlinked


def inode_lock(ino: int) -> bytes:
    return b"I" + ino.to_bytes(8, "big")


def group_lock(rg: int) -> bytes:
    return b"R" + rg.to_bytes(4, "big")


def covering_lock(obj) -> bytes | None:
    """The name of the lock that covers a cached metadata object (None: no lock does)."""
    cls = obj.__class__
    if cls is Dinode:
        return inode_lock(obj.bno)
    if cls is TreeNode or cls is XattrBlock:
        return inode_lock(obj.owner)
    if cls is RgrpHeader:
        return group_lock(obj.index)
    if cls is Bitmap:
        return group_lock(obj.rgrp)
    return None


def open_lock(ino: int) -> bytes:
    return b"O" + ino.to_bytes(8, "big")


WRITE_PREFIX = b"W"


def write_lock(ino: int) -> bytes:
    return WRITE_PREFIX + ino.to_bytes(8, "big")


def slot_lock(slot: int) -> bytes:
    return b"S" + slot.to_bytes(2, "big")


def recovery_lock(slot: int) -> bytes:
    return b"J" + slot.to_bytes(2, "big")


def describe_lock(name: bytes) -> str:
    kind = name[:1]
    num = int.from_bytes(name[1:], "big") if len(name) > 1 else None
    return {b"I": f"inode {num}", b"O": f"open {num}", b"W": f"write-open {num}",
            b"R": f"group {num}", b"S": f"slot {num}", b"J": f"recovery of slot {num}",
            b"N": "rename"}.get(kind, repr(name))


class NeedLock(Exception):
    """An operation body needs a lock it could not take without waiting."""

    def __init__(self, name: bytes, mode: Mode, inode_hint: int | None = None):
        super().__init__(describe_lock(name), mode)
        self.name = name
        self.mode = mode
        self.inode_hint = inode_hint


class Coherence:
    """The cluster side of a mounted file system.

    Args:
        vol: the volume (its ``cluster`` becomes this object).
        fs: the ``Filesystem``.
        client: the lock client.
        slot: this node's slot; groups are preferred by affinity to it.
        nursery: runs background work (giving up cached open locks).
        min_hold: seconds a granted lock is kept before it is given up.
        open_cache: open locks kept in EX for inodes not open here (0: none).
    """

    def __init__(self, vol, fs, client, *, slot: int, nursery, min_hold: float = 0.01,
                 open_cache: int = OPEN_CACHE):
        self.vol = vol
        self.fs = fs
        self.client = client
        self.slot = slot
        self.glocks = GlockTable(client, self, min_hold=min_hold)
        self.holds: Holds | None = None
        self.fenced = False
        self.waits: set[trio.CancelScope] = set()   # lock manager waits of operations
        sb = vol.sb
        n = sb.nslots
        mine = [g for g in range(sb.rgrp_count) if g % n == slot % n]
        others = [g for g in range(sb.rgrp_count) if g % n != slot % n]
        self.preferred = mine + others
        self.rank = {g: i for i, g in enumerate(self.preferred)}
        self.known_free: dict[int, int] = {}
        self.ex_groups: set[int] = set()
        self.write_handles: dict[int, int] = {}     # inode -> handles open for writing
        self.serial = KeyedLocks()     # one change of an O or W lock at a time
        # inodes not open here whose open lock this node keeps in EX (oldest first)
        self.idle_open: OrderedDict[int, None] = OrderedDict()
        self.open_cache = open_cache
        self.nursery = nursery
        # fn(ino): drop the kernel's cached attributes of an inode (set once mounted)
        self.forget_kernel_attrs = None
        self.stats = {"attempts": 0, "retries": 0}
        vol.cluster = self

    # -- requirement checks (called by the volume inside operation bodies) -----------

    def _require(self, name: bytes, mode: Mode, hint: int | None = None) -> None:
        holds = self.holds
        if holds is None:
            raise RuntimeError(f"metadata access outside a locked operation "
                               f"({describe_lock(name)})")
        if holds.covers(name, mode) or self.glocks.try_hold(holds, name, mode):
            return
        raise NeedLock(name, mode, hint)

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

    def kernel_cacheable(self, ino: int) -> bool:
        """Whether the kernel may cache the attributes of ``ino`` now: this node holds
        the inode's lock in PR or better and no other node has asked for it (its
        demote invalidates them in the kernel, ``forget_kernel_attrs``)."""
        g = self.glocks.glocks.get(inode_lock(ino))
        return g is not None and g.mode is not None and covers(g.mode, PR) and \
            g.demote is None and not g.busy

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
        """Groups usable for allocation now: held EX by this node, best first."""
        holds = self.holds
        out = []
        for rg in sorted(self.ex_groups, key=self.rank.__getitem__):
            name = group_lock(rg)
            if holds.covers(name, EX) or self.glocks.try_hold(holds, name, EX):
                out.append(rg)
        return out

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

    # -- glock owner callbacks --------------------------------------------------------

    def granted(self, g, lvb: bytes | None) -> None:
        kind = g.name[:1]
        if kind == b"I":
            ino = int.from_bytes(g.name[1:], "big")
            version = _ILVB.unpack(lvb)[0] if lvb else None
            if version is None or version != g.version:
                self.vol.drop_inode(ino)
            g.version = version if version is not None else random.getrandbits(62)
        elif kind == b"R":
            rg = int.from_bytes(g.name[1:], "big")
            if lvb:
                version, free, _dinodes, _unlinked = _RLVB.unpack(lvb)
            else:
                version = free = None
            if version is None or version != g.version:
                self.vol.drop_group(rg)
            g.version = version if version is not None else random.getrandbits(62)
            if version:
                self.known_free[rg] = free
            if covers(g.mode, EX):
                self.ex_groups.add(rg)
            else:
                self.ex_groups.discard(rg)

    def before_demote(self, g, target: Mode) -> bytes | None:
        kind = g.name[:1]
        num = int.from_bytes(g.name[1:], "big")
        if kind == b"I" and not covers(target, PR) and self.forget_kernel_attrs:
            # the kernel may cache an inode's attributes only while this node can
            # read it: once another node may change the inode, they are stale
            self.forget_kernel_attrs(num)
        if kind == b"R" and not covers(target, EX):
            self.ex_groups.discard(num)
            self.vol.alloc.drop_group_reservations(num)
        if g.mode not in (PW, EX):
            return None
        if kind == b"I":
            blocks = self.vol.inode_blocks(num)
        elif kind == b"R":
            blocks = self.vol.group_blocks(num)
        else:
            return None
        if g.dirty or any(b in self.vol.unclean for b in blocks):
            if self.vol.unclean or self.vol.journal.running_blocks():
                self.vol.checkpoint()
        if g.dirty:
            g.version = ((g.version or 0) + 1) & ((1 << 63) - 1)
        version = g.version or 0
        if kind == b"I":
            di = self.vol.cached(num)
            if isinstance(di, Dinode):
                return _ILVB.pack(version, di.size, di.mtime, di.generation)
            return _ILVB.pack(version, 0, 0, 0)
        hdr = self.vol.cached(self.vol.sb.rgrp_range(num)[0])
        if isinstance(hdr, RgrpHeader):
            self.known_free[num] = hdr.free
            return _RLVB.pack(version, hdr.free, hdr.dinodes, hdr.unlinked)
        return _RLVB.pack(version, self.known_free.get(num, 0), 0, 0)

    def dropped(self, g) -> None:
        kind = g.name[:1]
        num = int.from_bytes(g.name[1:], "big")
        if kind == b"I":
            self.vol.drop_inode(num)
        elif kind == b"R":
            self.vol.drop_group(num)
            self.ex_groups.discard(num)

    # -- running operation bodies -----------------------------------------------------

    def check(self) -> None:
        if self.fenced:
            raise FSError(errno.EIO, "node is fenced (lease lost); remount to rejoin")

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
            try:
                holds = self.glocks.take_cached(want) or \
                    await self.until_fenced(self.glocks.acquire, want)
            except Deadlock:
                await trio.sleep(random.uniform(0.002, 0.05))
                continue
            except (LeaseLost, LockError) as e:
                raise FSError(errno.EIO, f"lock manager: {e}") from None
            self.holds = holds
            self.vol.inode_hint = hint
            try:
                return fn(*args, **kw)
            except NeedLock as e:
                self.stats["retries"] += 1
                want[e.name] = supremum(want[e.name], e.mode) if e.name in want else e.mode
                if e.inode_hint is not None:
                    hint = fresh = e.inode_hint
            except Fenced:
                self.fence("a volume write was refused")
                raise FSError(errno.EIO, "node is fenced") from None
            finally:
                self.vol.inode_hint = None
                self.holds = None
                self.glocks.release(holds)
            if attempts >= MAX_ATTEMPTS:
                raise FSError(errno.EDEADLK, "could not gather the locks an operation needs")

    def fence(self, why: str) -> None:
        if not self.fenced:
            log.error("self-fencing (%s): all volume I/O stops; remount to rejoin", why)
        self.fenced = True
        for scope in list(self.waits):
            scope.cancel()

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

    # -- open modes and deletion --------------------------------------------------------

    async def try_lock(self, name: bytes, mode: Mode) -> bool:
        try:
            await self.until_fenced(self.client.lock, name, mode, try_lock=True)
            return True
        except (TryAgain, NotRecovered):
            return False

    # The open lock O<ino> says who may have an inode open.  A node holds it in PR
    # while it has the inode open, or in EX: then no other node has it open.  EX is
    # taken by the node that creates the inode and by the one that frees it, and
    # kept after the last close as a cache (up to ``open_cache`` of them): the node
    # that made a file opens, closes and removes it again without asking the lock
    # manager.  Another node's request calls the holder back (``_open_wanted``).

    async def _lock_open(self, ino: int, mode: Mode, *, try_lock: bool = False) -> bool:
        """Take O<ino> in ``mode`` (a held stronger mode is kept); a try-lock that
        fails (False) calls back the nodes in its way."""
        kw = {"try_lock": True, "notify": True} if try_lock else {}
        while True:
            try:
                await self.until_fenced(self.client.lock, open_lock(ino), mode,
                                        on_blocking=self._open_wanted, **kw)
                return True
            except (TryAgain, NotRecovered):
                return False
            except Deadlock:
                # the holder, called back, may need a lock this node caches: that
                # lock goes on its own callback, so the wait ends; ask again
                await trio.sleep(random.uniform(0.002, 0.05))
            except (LeaseLost, LockError) as e:
                raise FSError(errno.EIO, f"lock manager: {e}") from None

    async def purge_if_unused(self, ino: int | None) -> bool:
        """Free an unlinked inode unless a node still has it open (then that node's
        last close frees it; a node that only caches the open lock frees it when
        called back).  Returns whether it was freed here."""
        if ino is None:
            return False
        async with self.serial.hold(open_lock(ino)):
            if self.fs.in_use(ino):
                return False
            if not await self._lock_open(ino, EX, try_lock=True):
                return False
            try:
                await self.purge(ino)
            finally:
                await self._cache_open(ino)
        return True

    async def purge(self, ino: int) -> None:
        """Free an unlinked inode step by step, letting the event loop (lease
        renewals, other requests) run between the steps of a big file."""
        want = {inode_lock(ino): EX}
        rg = self.vol.sb.rgrp_of(ino)
        if rg >= 0:
            want[group_lock(rg)] = EX
        while not await self.run(self.fs.purge_step, ino, want=want):
            await trio.sleep(0)

    async def _unlock_if_held(self, name: bytes) -> None:
        if self.client.held(name) is not None:
            await self.client.unlock(name)

    async def hold_open(self, ino: int) -> None:
        """Take the open lock for a new handle (the first one on this node)."""
        async with self.serial.hold(open_lock(ino)):
            if self.fs.in_use(ino):
                self.idle_open.pop(ino, None)
                if self.client.held(open_lock(ino)) is None:
                    await self._lock_open(ino, PR)

    async def pre_open(self, ino: int, writable: bool) -> None:
        """Take the open lock (in EX: nobody else can have a new inode open) and, for
        writing, the write-open mode of an inode a create is about to make: held
        before the new name is visible, no other node can free the file (or open it
        for writing) before the creator has it open."""
        async with self.serial.hold(open_lock(ino)):
            self.idle_open.pop(ino, None)
            await self._lock_open(ino, EX)
        if writable:
            async with self.serial.hold(write_lock(ino)):
                if not self.write_handles.get(ino):
                    await self.try_lock(write_lock(ino), EX)

    async def unpre_open(self, ino: int) -> None:
        """Give up what ``pre_open`` took for an inode that no handle uses."""
        async with self.serial.hold(write_lock(ino)):
            if not self.write_handles.get(ino):
                await self._unlock_if_held(write_lock(ino))
        await self.drop_open(ino)

    async def drop_open(self, ino: int) -> None:
        """Once no handle on this node has the inode open: keep the open lock as a
        cache when held in EX, else give it up."""
        async with self.serial.hold(open_lock(ino)):
            if not self.fs.in_use(ino):
                held = self.client.held(open_lock(ino))
                if held is not None and held.mode == EX:
                    await self._cache_open(ino)
                else:
                    await self._unlock_if_held(open_lock(ino))

    async def _cache_open(self, ino: int) -> None:
        """Keep O<ino> (EX, inode not open here) cached; give up the oldest cached
        ones beyond ``open_cache``.  Called under ``serial`` for ``ino``."""
        held = self.client.held(open_lock(ino))
        if held is None or held.mode != EX or not self.open_cache:
            await self._unlock_if_held(open_lock(ino))
            return
        idle = self.idle_open
        idle[ino] = None
        idle.move_to_end(ino)
        while len(idle) > self.open_cache:
            old = next(iter(idle))
            del idle[old]
            if old != ino:
                self.nursery.start_soon(self._uncache_open, old)

    async def _uncache_open(self, ino: int) -> None:
        try:
            async with self.serial.hold(open_lock(ino)):
                if not self.fs.in_use(ino) and ino not in self.idle_open:
                    await self._unlock_if_held(open_lock(ino))
        except LockError as e:      # the client closed meanwhile (unmount)
            log.debug("cached open lock of inode %d not given up: %s", ino, e)

    async def _open_wanted(self, name: bytes, mode: Mode) -> None:
        """Another node asked for O<ino> in ``mode``: to open the inode (PR) or to
        free it (EX, a try-lock).  While the inode is open here the lock stays, at
        most converted down to PR so that the other node can open it too (the last
        close here frees an unlinked inode).  A lock kept only as a cache goes, and
        an unlinked inode it covers is freed here first (this node holds it EX, so
        nobody has it open)."""
        ino = int.from_bytes(name[1:], "big")
        try:
            async with self.serial.hold(name):
                held = self.client.held(name)
                if held is None:
                    return
                if self.fs.in_use(ino):
                    if held.mode == EX and mode != EX:
                        await self.client.convert(name, PR)
                    return
                self.idle_open.pop(ino, None)
                try:
                    if held.mode == EX and await self._unlinked(ino):
                        await self.purge(ino)
                except (FSError, CorruptBlock) as e:
                    # given up all the same: the other node must not wait for an
                    # inode that cannot be read here
                    log.warning("inode %d (open lock called back) not freed: %s", ino, e)
                await self.client.unlock(name)
        except LockError as e:
            log.warning("open lock of inode %d not given up: %s", ino, e)

    async def _unlinked(self, ino: int) -> bool:
        """Whether ``ino`` is an inode whose last link went (read under its lock)."""
        try:
            di = await self.run(self.vol.dinode, ino, want={inode_lock(ino): PR})
        except FSError as e:
            if e.errno == errno.ESTALE:
                return False
            raise
        return di.nlink == 0

    async def take_write_mode(self, ino: int, new: bool = False) -> None:
        """Count one more handle open for writing on this node; the first takes the
        cluster open mode (``W``), EBUSY when another node has the file open for
        writing.  Taken before the open changes anything (``O_TRUNC``).  ``new``: the
        file was just created here (it has no multi-writer mark)."""
        async with self.serial.hold(write_lock(ino)):
            if self.write_handles.get(ino, 0) == 0:
                multi = not new and await self.run(self._multiwriter, ino,
                                                   want={inode_lock(ino): PR})
                mode = CW if multi else EX
                deadline = trio.current_time() + OPEN_RETRY_S
                while not await self.try_lock(write_lock(ino), mode):
                    if trio.current_time() >= deadline:
                        raise FSError(errno.EBUSY,
                                      "file is open for writing on another node")
                    await trio.sleep(0.05)
            self.write_handles[ino] = self.write_handles.get(ino, 0) + 1

    async def drop_write_mode(self, ino: int) -> None:
        """One handle open for writing fewer; the last one gives the mode up."""
        async with self.serial.hold(write_lock(ino)):
            left = self.write_handles.get(ino, 1) - 1
            if left > 0:
                self.write_handles[ino] = left
                return
            self.write_handles.pop(ino, None)
            await self._unlock_if_held(write_lock(ino))

    def _multiwriter(self, ino: int) -> bool:
        from ..fs.inode import xattr_get
        return xattr_get(self.vol, self.vol.dinode(ino), MULTIWRITER_XATTR) == b"1"

    async def close_mode(self, ino: int, generation: int, writable: bool) -> None:
        """Give up what a closed handle held; the last close of an unlinked inode on
        the whole cluster frees it."""
        if writable:
            await self.drop_write_mode(ino)
        if self.fs.in_use(ino):
            return
        await self.drop_open(ino)
        try:
            di = await self.run(self.vol.dinode, ino, want={inode_lock(ino): PR})
        except (FSError, CorruptBlock):
            return
        if di.generation == generation and di.nlink == 0:
            await self.purge_if_unused(ino)


class KeyedLocks:
    """One ``trio.Lock`` per key, made on demand and dropped when idle: serializes
    a node's changes of one open or write-open lock (take and give up)."""

    def __init__(self):
        self._locks: dict = {}

    @contextlib.asynccontextmanager
    async def hold(self, key):
        lk = self._locks.get(key)
        if lk is None:
            lk = self._locks[key] = trio.Lock()
        try:
            async with lk:
                yield
        finally:
            if not lk.locked() and not lk.statistics().tasks_waiting and \
                    self._locks.get(key) is lk:
                del self._locks[key]


class ClusterFrontend:
    """The file-system operations of a cluster member, each under its locks.

    The same methods as ``fs.Filesystem`` (async), which the FUSE layer calls.
    """

    def __init__(self, coh: Coherence):
        self.coh = coh
        self.fs = coh.fs
        self.vol = coh.vol
        self.run = coh.run

    def _home(self) -> dict:
        return {group_lock(self.coh.home_group()): EX}

    async def lookup(self, parent, name):
        return await self.run(self.fs.lookup, parent, name, want={inode_lock(parent): PR})

    async def getattr(self, ino):
        return await self.run(self.fs.getattr, ino, want={inode_lock(ino): PR})

    async def setattr(self, ino, **kw):
        if kw.get("size") is not None:
            # a long truncation goes step by step, yielding in between
            while not await self.run(self.fs.truncate_step, ino, kw["size"],
                                     want={inode_lock(ino): EX}):
                await trio.sleep(0)
        return await self.run(self.fs.setattr, ino, want={inode_lock(ino): EX}, **kw)

    async def mknod(self, parent, name, mode, rdev, ctx):
        return await self.run(self.fs.mknod, parent, name, mode, rdev, ctx,
                              want={inode_lock(parent): EX, **self._home()})

    async def mkdir(self, parent, name, mode, ctx):
        return await self.run(self.fs.mkdir, parent, name, mode, ctx,
                              want={inode_lock(parent): EX, **self._home()})

    async def symlink(self, parent, name, target, ctx):
        return await self.run(self.fs.symlink, parent, name, target, ctx,
                              want={inode_lock(parent): EX, **self._home()})

    async def readlink(self, ino):
        return await self.run(self.fs.readlink, ino, want={inode_lock(ino): PR})

    async def link(self, ino, new_parent, new_name):
        return await self.run(self.fs.link, ino, new_parent, new_name,
                              want={inode_lock(ino): EX, inode_lock(new_parent): EX})

    async def unlink(self, parent, name):
        victim = await self.run(self.fs.remove, parent, name, False,
                                want={inode_lock(parent): EX})
        await self.coh.purge_if_unused(victim)

    async def rmdir(self, parent, name):
        victim = await self.run(self.fs.remove, parent, name, True,
                                want={inode_lock(parent): EX})
        await self.coh.purge_if_unused(victim)

    async def rename(self, old_parent, old_name, new_parent, new_name, flags=0):
        want = {inode_lock(old_parent): EX, inode_lock(new_parent): EX}
        if old_parent != new_parent:
            want[RENAME_LOCK] = EX
        victim = await self.run(self.fs.rename_entry, old_parent, old_name, new_parent,
                                new_name, flags, want=want)
        await self.coh.purge_if_unused(victim)

    async def open(self, ino, flags):
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        mode = EX if flags & os.O_TRUNC and writable else PR
        if writable:
            await self.coh.take_write_mode(ino)
        try:
            fh = await self.run(self.fs.open, ino, flags, want={inode_lock(ino): mode})
            await self._opened(fh, ino)
        except BaseException:
            if writable:
                with trio.CancelScope(shield=True):
                    await self.coh.drop_write_mode(ino)
            raise
        return fh

    async def _opened(self, fh, ino):
        try:
            await self.coh.hold_open(ino)
        except BaseException:
            self.fs.close_handle(fh)
            with trio.CancelScope(shield=True):
                await self.coh.drop_open(ino)
            raise
        return fh

    async def create(self, parent, name, mode, flags, ctx):
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        taken: list[int] = []

        async def pre_open(ino):
            # the new file's open lock (and write-open mode) before its name shows
            if ino != parent and ino not in taken:
                taken.append(ino)
                await self.coh.pre_open(ino, writable)
        try:
            fh, di = await self.run(self.fs.create, parent, name, mode, flags, ctx,
                                    want={inode_lock(parent): EX, **self._home()},
                                    new_inode=pre_open)
        except BaseException:
            with trio.CancelScope(shield=True):
                for ino in taken:
                    await self.coh.unpre_open(ino)
            raise
        for ino in taken:
            if ino != di.bno:
                await self.coh.unpre_open(ino)
        await self._opened(fh, di.bno)
        if writable:
            try:
                await self.coh.take_write_mode(di.bno, new=True)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self.release(fh, writable=False)
                raise
        return fh, di

    async def read(self, fh, off, size):
        h = self.fs.handles.get(fh)
        want = {inode_lock(h.ino): PR} if h is not None else {}
        return await self.run(self.fs.read, fh, off, size, want=want)

    async def write(self, fh, off, data):
        h = self.fs.handles.get(fh)
        want = {inode_lock(h.ino): EX, **self._home()} if h is not None else {}
        return await self.run(self.fs.write, fh, off, data, want=want)

    async def flush(self, fh):
        self.coh.check()
        if fh not in self.fs.handles:
            raise FSError(errno.EBADF, "bad file handle")

    async def fsync(self, fh, datasync):
        self.coh.check()
        try:
            self.fs.fsync(fh, datasync)
        except Fenced:
            self.coh.fence("fsync refused")
            raise FSError(errno.EIO, "node is fenced") from None

    async def release(self, fh, writable: bool | None = None):
        h = self.fs.close_handle(fh)
        if h is None or self.coh.fenced:
            return
        if writable is None:
            writable = h.flags & os.O_ACCMODE != os.O_RDONLY and not h.is_dir
        await self.coh.close_mode(h.ino, h.generation, writable)

    async def opendir(self, ino):
        fh = await self.run(self.fs.opendir, ino, want={inode_lock(ino): PR})
        return await self._opened(fh, ino)

    async def readdir(self, fh, start, limit=64):
        h = self.fs.handles.get(fh)
        want = {inode_lock(h.ino): PR} if h is not None else {}
        entries = await self.run(self.fs.readdir_entries, fh, start, limit, want=want)
        out = []
        for name, ino, nxt in entries:
            try:
                di = await self.run(self.vol.dinode, ino, want={inode_lock(ino): PR})
            except (FSError, CorruptBlock) as e:
                if getattr(e, "errno", None) not in (errno.ESTALE, errno.ENOENT):
                    log.error("directory entry %r -> inode %d unreadable: %s", name, ino, e)
                continue
            out.append((name, di, nxt))
        return out

    async def releasedir(self, fh):
        await self.release(fh)

    async def fsyncdir(self, fh, datasync):
        await self.fsync(fh, datasync)

    async def getxattr(self, ino, name):
        return await self.run(self.fs.getxattr, ino, name, want={inode_lock(ino): PR})

    async def listxattr(self, ino):
        return await self.run(self.fs.listxattr, ino, want={inode_lock(ino): PR})

    async def setxattr(self, ino, name, value):
        await self.run(self.fs.setxattr, ino, name, value,
                       want={inode_lock(ino): EX, **self._home()})

    async def removexattr(self, ino, name):
        await self.run(self.fs.removexattr, ino, name, want={inode_lock(ino): EX})

    async def statfs(self):
        self.coh.check()
        st = self.fs.statfs_layout()
        known = self.coh.known_free
        free = sum(known.get(rg, 0) for rg in range(self.vol.sb.rgrp_count))
        st.update(bfree=free, bavail=free, ffree=free)
        return st

    async def access(self, ino, mode, ctx):
        return await self.run(self.fs.access, ino, mode, ctx, want={inode_lock(ino): PR})
