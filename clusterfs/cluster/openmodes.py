"""Cluster open modes and the deletion of unlinked inodes.

Two locks per inode, besides its inode lock:

- ``O<ino>`` (open) says who may have an inode open.  A node holds it in PR while it
  has the inode open, or in EX: then no other node has it open.  EX is taken by the
  node that creates the inode and by the one that frees it, and kept after the last
  close as a cache (up to ``open_cache`` of them): the node that made a file opens,
  closes and removes it again without asking the lock manager.  Another node's
  request calls the holder back (``_open_wanted``).  The last close of an unlinked
  inode on the whole cluster frees it (``purge_if_unused``).
- ``W<ino>`` (write-open) is the cluster open mode, as VMFS has for VM disks: EX by
  the one node that has the file open for writing, CW by each writer of a file
  marked multi-writer (``user.clusterfs.multiwriter``); a second node's open for
  writing fails with EBUSY.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import random
from collections import OrderedDict

import trio

from lockmgr import CW, EX, PR, Deadlock, LeaseLost, LockError, Mode, NotRecovered, TryAgain

from ..errors import CorruptBlock, FSError
from ..fs.xattrs import xattr_get
from .locks import group_lock, inode_lock, lock_number, open_lock, write_lock

log = logging.getLogger(__name__)

MULTIWRITER_XATTR = b"user.clusterfs.multiwriter"
OPEN_RETRY_S = 1.0
OPEN_CACHE = 4096      # open locks kept in EX for inodes not open here


class OpenModes:
    """A node's open and write-open locks, and the deletion of unlinked inodes.

    Args:
        coh: the node's ``Coherence`` (locked operation bodies run through it).
        nursery: runs background work (giving up cached open locks).
        open_cache: open locks kept in EX for inodes not open here (0: none).
    """

    def __init__(self, coh, *, nursery, open_cache: int = OPEN_CACHE):
        self.coh = coh
        self.vol = coh.vol
        self.fs = coh.fs
        self.client = coh.client
        self.nursery = nursery
        self.open_cache = open_cache
        self.write_handles: dict[int, int] = {}     # inode -> handles open for writing
        coh.writable = self.write_handles          # (their inode locks: EX only)
        self.serial = KeyedLocks()     # one change of an O or W lock at a time
        # inodes not open here whose open lock this node keeps in EX (oldest first)
        self.idle_open: OrderedDict[int, None] = OrderedDict()

    async def _lock_open(self, ino: int, mode: Mode, *, try_lock: bool = False) -> bool:
        """Take O<ino> in ``mode`` (a held stronger mode is kept); a try-lock that
        fails (False) calls back the nodes in its way."""
        kw = {"try_lock": True, "notify": True} if try_lock else {}
        while True:
            try:
                await self.coh.until_fenced(self.client.lock, open_lock(ino), mode,
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
        while not await self.coh.run(self.fs.purge_step, ino, want=want):
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
                    await self.coh.try_lock(write_lock(ino), EX)

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
        ino = lock_number(name)
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
            di = await self.coh.run(self.vol.dinode, ino, want={inode_lock(ino): PR})
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
                multi = not new and await self.coh.run(self._multiwriter, ino,
                                                       want={inode_lock(ino): PR})
                mode = CW if multi else EX
                deadline = trio.current_time() + OPEN_RETRY_S
                while not await self.coh.try_lock(write_lock(ino), mode):
                    if trio.current_time() >= deadline:
                        raise FSError(errno.EBUSY,
                                      "file is open for writing on another node")
                    await trio.sleep(0.05)
                # from the first handle open for writing on, the inode lock is
                # taken in EX only (``Coherence._promote``): EX first, while reads
                # of the file here (PR) are still let in as its pages go
                # (``pages.py``), then the count (no checkpoint in between)
                try:
                    await self.coh.cache_lock(inode_lock(ino), EX)
                except BaseException:
                    with trio.CancelScope(shield=True):
                        await self._unlock_if_held(write_lock(ino))
                    raise
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
            di = await self.coh.run(self.vol.dinode, ino, want={inode_lock(ino): PR})
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
