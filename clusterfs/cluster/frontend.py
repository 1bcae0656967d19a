"""The file-system operations of a cluster member, each with its lock plan.

Each operation names the locks it starts with (``want``): the inode it reads (PR) or
changes (EX), the parent directory of a name it adds or removes, the resource group
it will allocate from first, the rename lock for a move between directories.  The
body runs through ``Coherence.run``, which adds any other lock the body turns out to
need and retries.  Opens and closes go through the open modes (``openmodes.py``).
"""

from __future__ import annotations

import errno
import logging
import os

import trio

from journal.errors import JournalAborted
from lockmgr import EX, PR

from ..errors import FSError, Fenced
from ..fs.filedata import FALLOC_FL_PUNCH_HOLE
from .coherence import NOT_AT_HAND, Coherence
from .locks import FREEZE, RENAME_LOCK, group_lock, inode_lock
from .openmodes import OpenModes

log = logging.getLogger(__name__)


class ClusterFrontend:
    """The file-system operations of a cluster member, each under its locks.

    The same methods as ``fs.Filesystem`` (async), which the FUSE layer calls.
    """

    def __init__(self, coh: Coherence, modes: OpenModes):
        self.coh = coh
        self.modes = modes
        self.fs = coh.fs
        self.vol = coh.vol
        self.run = coh.run

    def _home(self) -> dict:
        return {group_lock(self.coh.home_group()): EX}

    async def lookup(self, parent, name):
        self.coh.entry_stats["lookups"] += 1
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
        await self.modes.purge_if_unused(victim)

    async def rmdir(self, parent, name):
        victim = await self.run(self.fs.remove, parent, name, True,
                                want={inode_lock(parent): EX})
        await self.modes.purge_if_unused(victim)

    async def rename(self, old_parent, old_name, new_parent, new_name, flags=0):
        want = {inode_lock(old_parent): EX, inode_lock(new_parent): EX}
        if old_parent != new_parent:
            want[RENAME_LOCK] = EX
        victim = await self.run(self.fs.rename_entry, old_parent, old_name, new_parent,
                                new_name, flags, want=want)
        await self.modes.purge_if_unused(victim)

    async def open(self, ino, flags, ctx=None):
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        mode = EX if flags & os.O_TRUNC and writable else PR
        if writable:
            await self.modes.take_write_mode(ino)
        try:
            fh = await self.run(self.fs.open, ino, flags, ctx, want={inode_lock(ino): mode})
            await self._opened(fh, ino)
        except BaseException:
            if writable:
                with trio.CancelScope(shield=True):
                    await self.modes.drop_write_mode(ino)
            raise
        return fh

    async def _opened(self, fh, ino):
        try:
            await self.modes.hold_open(ino)
        except BaseException:
            self.fs.close_handle(fh)
            with trio.CancelScope(shield=True):
                await self.modes.drop_open(ino)
            raise
        return fh

    async def create(self, parent, name, mode, flags, ctx):
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        taken: list[int] = []

        async def pre_open(ino):
            # the new file's open lock (and write-open mode) before its name shows
            if ino != parent and ino not in taken:
                taken.append(ino)
                await self.modes.pre_open(ino, writable)
        try:
            fh, di = await self.run(self.fs.create, parent, name, mode, flags, ctx,
                                    want={inode_lock(parent): EX, **self._home()},
                                    new_inode=pre_open)
        except BaseException:
            with trio.CancelScope(shield=True):
                for ino in taken:
                    await self.modes.unpre_open(ino)
            raise
        for ino in taken:
            if ino != di.bno:
                await self.modes.unpre_open(ino)
        await self._opened(fh, di.bno)
        if writable:
            try:
                await self.modes.take_write_mode(di.bno, new=True)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self.release(fh, writable=False)
                raise
        return fh, di

    async def read(self, fh, off, size):
        h = self.fs.handles.get(fh)
        if h is None:
            return await self.run(self.fs.read, fh, off, size)
        # (READs and WRITEs are counted: the kernel's pages of the file go only
        # after a pass with none of them in flight, ``pages.py``)
        async with self.coh.pages.request(h.ino):
            data = await self.run(self.fs.read, fh, off, size,
                                  want={inode_lock(h.ino): PR})
        self.coh.pages.read_done(fh, h.ino, off, len(data))
        return data

    async def write(self, fh, off, data, ctx=None):
        """A write under the inode's lock (EX) and the home group's.  One that
        carries on a stream into blocks already mapped ahead of EOF needs no
        group: when the inode's lock and the freeze lock are at hand it is served
        without ``run``'s rounds (``FileData.append``), as most of a stream's
        writes are; the others, and any the short way cannot serve, go the long
        way."""
        h = self.fs.handles.get(fh)
        if h is None:
            return await self.run(self.fs.write, fh, off, data, ctx)
        ino = h.ino
        pages = self.coh.pages
        if not pages.enter_now(ino, write=True):
            await pages.enter(ino, write=True)
        try:
            name = inode_lock(ino)
            if off == h.stream_end or h.flags & os.O_APPEND:
                n = self.coh.run_at_hand(self.fs.append, fh, off, data, ctx,
                                         want={name: EX, FREEZE: PR})
                if n is not None and n is not NOT_AT_HAND:
                    self.coh.stats["writes_at_hand"] += 1
                    return n
            return await self.run(self.fs.write, fh, off, data, ctx,
                                  want={name: EX, **self._home()})
        finally:
            pages.leave(ino)

    async def fallocate(self, fh, mode, off, length):
        """``Filesystem.fallocate`` step by step, each step an operation under the
        inode's lock (EX) and, to allocate, a group's (the home group first, others
        as the allocator asks for them), yielding in between as a long truncation
        does.  Other nodes see each step's result as they see a write's: they take
        the inode's lock, which makes this node checkpoint the journal (sizes, maps,
        the groups' bitmaps with the freed blocks) and publish a new version; the
        data blocks, zeroed or preallocated, were written to the device before."""
        h = self.fs.handles.get(fh)
        want = {inode_lock(h.ino): EX} if h is not None else {}
        if not mode & FALLOC_FL_PUNCH_HOLE:
            want.update(self._home())
        size, _need = await self.run(self.fs.fallocate_begin, fh, mode, off, length,
                                     want=want)
        # no check of the free space first: this node knows the free counts of the
        # groups it does not hold only from their value blocks (estimates)
        pos = 0
        try:
            while True:
                pos = await self.run(self.fs.fallocate_step, fh, mode, off, length, pos,
                                     want=want)
                if pos is None:
                    return
                await trio.sleep(0)
        except FSError as e:
            if e.errno == errno.ENOSPC:
                # the size goes back to what it was (as Filesystem.fallocate)
                while not await self.run(self.fs.fallocate_undo_step, fh, size,
                                         want={inode_lock(h.ino): EX}):
                    await trio.sleep(0)
            raise

    async def copy_file_range(self, fh_in, off_in, fh_out, off_out, length, flags):
        """``Filesystem.copy_file_range`` step by step, each step an operation,
        yielding in between as fallocate does.  The destination's inode lock in EX;
        the source's in PR to plan, in EX for the steps of a clone (it marks the
        source's extents SHARED, so that no node writes those blocks in place
        again: another node's cached map of the source goes with the lock); the
        groups whose counts change and those it allocates from in EX, gathered by
        the retries (``NeedLock``) as an allocation's are.  Two inode locks are
        taken in name order like a rename's."""
        h_in, h_out = self.fs.handles.get(fh_in), self.fs.handles.get(fh_out)
        if h_in is None or h_out is None:
            raise FSError(errno.EBADF, "bad file handle")
        want = {inode_lock(h_in.ino): PR}
        want[inode_lock(h_out.ino)] = EX
        plan = await self.run(self.fs.copy_range_begin, fh_in, off_in, fh_out, off_out,
                              length, flags, want=want)
        clone = any(kind == "clone" for kind, *_r in plan.phases)
        want = {inode_lock(h_in.ino): EX if clone else PR}
        want.update({inode_lock(h_out.ino): EX, **self._home()})
        where = (0, 0) if plan.phases else None
        try:
            while where is not None:
                where = await self.run(self.fs.copy_range_step, plan, where, want=want)
                await trio.sleep(0)
        except FSError:
            if not plan.done:
                raise
        return plan.done

    async def lseek(self, fh, off, whence):
        h = self.fs.handles.get(fh)
        want = {inode_lock(h.ino): PR} if h is not None else {}
        return await self.run(self.fs.lseek, fh, off, whence, want=want)

    async def flush(self, fh):
        self.coh.check()
        if fh not in self.fs.handles:
            raise FSError(errno.EBADF, "bad file handle")

    async def fsync(self, fh, datasync):
        self.coh.check()
        if fh not in self.fs.handles:
            raise FSError(errno.EBADF, "bad file handle")
        try:
            # the flushes on a worker thread: lease renewals and other requests go on
            await self.vol.commit_in_thread(trio.to_thread.run_sync)
        except (Fenced, JournalAborted) as e:
            # a refused flush, or a journal an earlier failure stopped (the node
            # fenced itself meanwhile): EIO, as for any other request
            self.coh.failed(e)
        except OSError:
            self.coh.check()        # the device failed: the journal stopped, fence
            raise

    async def release(self, fh, writable: bool | None = None):
        self.coh.pages.closed(fh)
        h = self.fs.close_handle(fh)
        if h is None or self.coh.fenced:
            return
        if h.ino in self.fs.mapped_ahead and not self.fs.open_count.get(h.ino) and \
                self.coh.gate is None and not self.coh.frozen_here:
            # the blocks this node's writes mapped ahead of EOF go, under the
            # inode's lock (another node may be writing the file meanwhile).  Not
            # while the volume is frozen (by this node or another): a close must
            # not wait for the thaw; they stay mapped, flagged, as a crashed
            # writer's do
            try:
                await self.run(self.fs.trim_ahead, h.ino, h.generation,
                               want={inode_lock(h.ino): EX})
            except FSError as e:
                # they stay mapped, flagged: whoever grows or truncates the file
                # next frees them first
                log.warning("inode %d: blocks mapped past EOF not freed: %s", h.ino, e)
        if writable is None:
            writable = h.flags & os.O_ACCMODE != os.O_RDONLY and not h.is_dir
        await self.modes.close_mode(h.ino, h.generation, writable)

    async def opendir(self, ino):
        fh = await self.run(self.fs.opendir, ino, want={inode_lock(ino): PR})
        return await self._opened(fh, ino)

    async def readdir(self, fh, start, limit=64):
        h = self.fs.handles.get(fh)
        want = {inode_lock(h.ino): PR} if h is not None else {}
        entries = await self.run(self.fs.readdir_entries, fh, start, limit, want=want)
        out = []
        for name, ino, nxt in entries:
            # each entry's inode under its own lock
            di = await self.run(self.fs.entry_inode, name, ino, want={inode_lock(ino): PR})
            if di is not None:
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
