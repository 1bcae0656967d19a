"""The contents of files: read, write, fallocate, copy_file_range and lseek.

Half of ``posix.Filesystem`` (mixed into it): the methods behind the FUSE requests
that read and change a file's bytes and its block map.  They use the file system's
handles (``handle``), its one-operation changes (``_change``) and its volume
(``vol``); the block-level work is ``inode.py``'s.
"""

from __future__ import annotations

import errno
import os
import stat as S
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import FSError
from ..ondisk.format import (BLOCK_SIZE, DF_INLINE, DF_PREALLOC, PREALLOC_SINCE,
                             SHARED_SINCE, Dinode)
from . import inode
from .xattrs import CAPS_XATTR, has_caps, xattr_set

if TYPE_CHECKING:
    from .posix import Ctx, Handle

RELATIME_S = 24 * 3600    # relatime: an access time older than this is updated
# Timestamp granularity of writes: a write within this long after the last change of
# mtime and ctime leaves them (as a kernel's coarse clock does), so that a stream of
# overwrites in place costs no metadata operation each.
WRITE_TIME_NS = 1_000_000
# fallocate(2) modes (linux/falloc.h)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_MODES = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE
COPY_BYTES = 1 << 20    # bytes a copy_file_range copies as data per operation


@dataclass
class CopyPlan:
    """What one copy_file_range request does (``Filesystem.copy_range_begin``), in
    phases run in order, each step by step: ``("data", src_off, dst_off, nbytes)``
    copies bytes (read and written), ``("clone", src_blk, dst_blk, nblocks)`` shares
    whole blocks (``inode.clone_step``).  ``done`` counts the bytes copied so far:
    what the request answers, also when a later step fails."""

    fh_in: int
    fh_out: int
    phases: list
    total: int
    done: int = 0


class FileData:
    """File contents (``posix.Filesystem`` inherits these methods)."""

    def read(self, fh: int, off: int, size: int) -> bytes:
        h, di = self.handle(fh)
        data = inode.read(self.vol, di, off, size)
        if not self.noatime:
            self._relatime(di)
        return data

    def _relatime(self, di: Dinode) -> None:
        now = time.time_ns()
        if (di.atime <= di.mtime or di.atime <= di.ctime or
                now - di.atime > RELATIME_S * 1_000_000_000) and self.vol.may_write_now(di.bno):
            def change():
                self.vol.touch(di)
                di.atime = now
            self._change(change)

    @staticmethod
    def privileges_to_drop(di: Dinode, ctx: Ctx | None) -> int:
        """The set-user-ID and set-group-ID bits a write by ``ctx`` clears, as the
        kernel's ``file_remove_privs`` does: set-user-ID always, set-group-ID when the
        file is group-executable or the writer is not in its group; never for root
        (CAP_FSETID) or when nobody says who writes (``ctx`` None).  The writer's
        supplementary groups are not known here: only its primary group counts."""
        if ctx is None or ctx.uid == 0 or not S.S_ISREG(di.mode):
            return 0
        kill = di.mode & S.S_ISUID
        if di.mode & S.S_ISGID and (di.mode & S.S_IXGRP or ctx.gid != di.gid):
            kill |= S.S_ISGID
        return kill

    @staticmethod
    def chown_privileges(di: Dinode, ctx: Ctx | None) -> int:
        """The set-ID bits a change of owner or group clears, as the kernel's chown
        does: set-user-ID always (for root too), set-group-ID when the file is
        group-executable or the caller is neither root nor in the file's group."""
        kill = di.mode & S.S_ISUID
        if di.mode & S.S_ISGID and (di.mode & S.S_IXGRP or (
                ctx is not None and ctx.uid != 0 and ctx.gid != di.gid)):
            kill |= S.S_ISGID
        return kill

    def drop_privileges(self, di: Dinode, kill: int) -> None:
        """Inside an operation that writes, truncates or gives another owner to
        ``di``: clear the set-ID bits ``kill`` and remove the file's capabilities
        (``security.capability``, whoever the caller).  The kernel leaves this to
        the file system (FUSE_HANDLE_KILLPRIV_V2, ``fuse/ops.py``); when a reply
        without attributes follows (a write, an open), the kernel's cached mode is
        dropped after it (``privileges_dropped``)."""
        caps = has_caps(self.vol, di)
        kill &= di.mode
        if kill:
            self.vol.touch(di)
            di.mode &= ~kill
        if caps:
            xattr_set(self.vol, di, CAPS_XATTR, None)
        if kill or caps:
            self.privileges_dropped.add(di.bno)

    def write(self, fh: int, off: int, data, ctx: Ctx | None = None) -> int:
        """Write ``data`` at ``off`` (the end of file with O_APPEND).  ``ctx``: the
        writer, whose privileges the write drops (``drop_privileges``).

        A write that carries on where the handle's last one ended, at EOF, streams
        onto the end of the file: blocks it allocates there come with more mapped
        ahead (``inode.write``'s ``ahead``: as many as the file has, up to
        ``inode.PREALLOC_MAX``), so that the next writes do not allocate.  They go
        when the file's last handle on this node closes (``trim_ahead``)."""
        h, di = self.handle(fh)
        if h.flags & os.O_APPEND:
            off = di.size        # the cluster's size, not the kernel's idea of it
        kill = self.privileges_to_drop(di, ctx)
        caps = has_caps(self.vol, di)
        if not kill and not caps:
            n = self._append(h, di, off, data)
            if n is not None:
                return n
        now = time.time_ns()
        if not kill and not caps and 0 <= now - di.mtime < WRITE_TIME_NS and \
                0 <= now - di.ctime < WRITE_TIME_NS and not self.vol.readonly and \
                inode.overwrite(self.vol, di, off, data):
            # the times were set less than WRITE_TIME_NS ago: they stand for this
            # write too, and an overwrite in place changes nothing else
            h.written = True
            h.stream_end = off + len(data) if off + len(data) == di.size else -1
            return len(data)
        ahead = 0
        if off == h.stream_end == di.size and not di.flags & DF_INLINE and \
                not self.vol.readonly:
            ahead = min(inode.PREALLOC_MAX, max(-(-len(data) // BLOCK_SIZE), di.blocks))
            self.vol.raise_revision(PREALLOC_SINCE)     # (once, before the first)
        elif di.flags & DF_PREALLOC and off // BLOCK_SIZE > -(-di.size // BLOCK_SIZE):
            # the write skips the blocks mapped ahead: they go first, in an
            # operation of their own, so that the write may reuse them once the
            # journal commits (``_change``: freed blocks wait for the commit)
            self._change(inode.trim_prealloc, self.vol, di)

        def change():
            n = inode.write(self.vol, di, off, data, ahead)
            now = time.time_ns()
            self.vol.touch(di)
            di.mtime = di.ctime = now
            if kill or caps:
                self.drop_privileges(di, kill)
            return n
        try:
            n = self._change(change)
        except FSError as e:
            if e.errno != errno.ENOSPC or not self.reclaim_ahead():
                raise
            n = self._change(change)
        h.written = True
        h.stream_end = off + n if off + n >= di.size else -1
        if ahead and di.flags & DF_PREALLOC:
            self.mapped_ahead.add(di.bno)
        return n

    def append(self, fh: int, off: int, data, ctx: Ctx | None = None) -> int | None:
        """``write``'s short way for a write that carries on the handle's stream at
        EOF into blocks mapped there already (``inode.mapped_at_eof``): the data and
        the new size and times, one operation, no allocation, so no group lock (a
        cluster member serves it with the locks at hand, ``ClusterFrontend.write``).
        None, having done nothing, when that does not fit (set-ID bits or
        capabilities to drop, blocks to allocate, an extent flagged shared, whose
        blocks' counts ``write`` reads): then ``write``."""
        h, di = self.handle(fh)
        if h.flags & os.O_APPEND:
            off = di.size
        if self.privileges_to_drop(di, ctx) or has_caps(self.vol, di):
            return None
        return self._append(h, di, off, data)

    def _append(self, h: Handle, di: Dinode, off: int, data) -> int | None:
        """``append`` once the writer is known to drop no privileges."""
        if off != h.stream_end or self.vol.readonly:
            return None
        pblk = inode.mapped_at_eof(self.vol, di, off, len(data))
        if pblk is None:
            return None
        with self.vol.operation():
            inode.append_at(self.vol, di, off, data, pblk)
            di.mtime = di.ctime = time.time_ns()
        h.written = True
        h.stream_end = di.size
        if di.flags & DF_PREALLOC:
            self.mapped_ahead.add(di.bno)
        return len(data)

    def reclaim_ahead(self) -> bool:
        """Out of space: free the blocks mapped ahead of EOF of every file this node
        streamed into (their writers map more when space allows), as XFS frees its
        speculative preallocations before it answers ENOSPC, and commit so that the
        space can be taken again.  Returns whether any block was freed.  Only the
        files whose inode lock is at hand without waiting: a write must not wait
        for another file's lock, it may hold the kernel's pages of its own
        (``pages.py``).  (A cluster member may have to gather the lock of a group
        the blocks are in: ``NeedLock`` makes the operation run again.)"""
        freed = False
        for ino in sorted(self.mapped_ahead):
            if self.vol.readonly or not self.vol.may_write_now(ino):
                continue
            di = self._ahead_dinode(ino)
            if di is not None and di.flags & DF_PREALLOC:
                freed |= bool(self._change(inode.trim_prealloc, self.vol, di))
        if freed:
            self.vol.commit()
        return freed

    def _ahead_dinode(self, ino: int) -> Dinode | None:
        """The dinode of ``ino`` in ``mapped_ahead``; None (and forgotten there)
        once it is gone."""
        try:
            return self.vol.dinode(ino)
        except FSError:
            self.mapped_ahead.discard(ino)
            return None

    def trim_ahead(self, ino: int, generation: int) -> None:
        """After the last close on this node of a file whose writes here mapped
        blocks ahead of EOF: free those blocks (one operation; the caller holds the
        inode's lock in a cluster)."""
        if ino not in self.mapped_ahead or self.open_count.get(ino, 0):
            return
        di = self._ahead_dinode(ino)
        if di is None:
            return
        if di.generation == generation and di.flags & DF_PREALLOC and \
                not self.vol.readonly:
            # (a cluster member may have to gather a group's lock first: the
            # operation runs again, the file still listed)
            self._change(inode.trim_prealloc, self.vol, di)
        self.mapped_ahead.discard(ino)

    def fallocate(self, fh: int, mode: int, off: int, length: int) -> None:
        """fallocate(2) on an open file, ``mode`` 0 (preallocate, growing the size),
        FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE or
        FALLOC_FL_ZERO_RANGE (optionally | FALLOC_FL_KEEP_SIZE).

        A big range takes several operations (``fallocate_step``), each a consistent
        file, as a long truncation does.  ENOSPC leaves the size as it was (blocks
        preallocated inside the old size may stay, as on ext4).  A cluster member
        runs the same steps under its locks (``ClusterFrontend.fallocate``).
        """
        size, need = self.fallocate_begin(fh, mode, off, length)
        if need > self.vol.alloc.free_blocks():
            # refused before anything changes (a cluster member learns of the
            # space in other groups only by asking for their locks: it relies on
            # the undo below)
            raise FSError(errno.ENOSPC, "not enough free space to preallocate")
        pos = 0
        try:
            while pos is not None:
                pos = self.fallocate_step(fh, mode, off, length, pos)
        except FSError as e:
            if e.errno == errno.ENOSPC:
                while not self.fallocate_undo_step(fh, size):
                    pass
            raise

    def fallocate_begin(self, fh: int, mode: int, off: int,
                        length: int) -> tuple[int, int]:
        """Check a fallocate request, with fallocate(2)'s errors in the kernel's
        order (vfs_fallocate): the range (EINVAL), the mode (EOPNOTSUPP), the handle
        (EBADF unless open for writing), the file type (EISDIR, ESPIPE, ENODEV), the
        largest file (EFBIG).  Returns the size now (what a failed extension goes
        back to, ``fallocate_undo_step``) and the blocks the request would allocate
        (0 for a punch)."""
        if off < 0 or length <= 0:
            raise FSError(errno.EINVAL, "bad fallocate range")
        if mode & ~FALLOC_MODES:
            raise FSError(errno.EOPNOTSUPP, f"fallocate mode {mode:#x} not supported")
        if mode & FALLOC_FL_PUNCH_HOLE and \
                (mode & FALLOC_FL_ZERO_RANGE or not mode & FALLOC_FL_KEEP_SIZE):
            # as Linux: a punch keeps the size, and is no zeroing
            raise FSError(errno.EOPNOTSUPP, "punch hole needs FALLOC_FL_KEEP_SIZE alone")
        h, di = self.handle(fh)
        if h.flags & os.O_ACCMODE == os.O_RDONLY:
            raise FSError(errno.EBADF, "file not open for writing")
        if S.S_ISDIR(di.mode):
            raise FSError(errno.EISDIR, "is a directory")
        if S.S_ISFIFO(di.mode):
            raise FSError(errno.ESPIPE, "is a FIFO")
        if not S.S_ISREG(di.mode):
            raise FSError(errno.ENODEV, "not a regular file")
        end = off + length
        if end > inode.MAX_FILE_BLOCKS * BLOCK_SIZE:
            raise FSError(errno.EFBIG, "file too large")
        if mode & FALLOC_FL_PUNCH_HOLE:
            return di.size, 0
        if di.flags & DF_PREALLOC and not self.vol.readonly:
            # blocks mapped ahead of EOF go first, in an operation of their own:
            # the steps may need them (``write``)
            self._change(inode.trim_prealloc, self.vol, di)
        return di.size, inode.fill_need(self.vol, di, off, end,
                                        bool(mode & FALLOC_FL_KEEP_SIZE))

    def fallocate_step(self, fh: int, mode: int, off: int, length: int,
                       pos: int) -> int | None:
        """One bounded operation of ``fallocate`` (checked by ``fallocate_begin``),
        from logical block ``pos`` (0 for the first step); returns the ``pos`` of
        the next step, or None once done.  The last step sets the final size.
        The times change as on ext4: ctime always, mtime too when the bytes or the
        size change (a punch or a zeroing; a preallocation that grows the file),
        in the last step and in every step that grows the size; a punch wholly
        past EOF changes nothing."""
        _h, di = self.handle(fh)
        end = off + length
        keep = bool(mode & FALLOC_FL_KEEP_SIZE)

        def change():
            size = di.size
            if mode & FALLOC_FL_PUNCH_HOLE:
                nxt = inode.punch_step(self.vol, di, off, end, pos)
                if nxt is None:
                    if off >= di.size:
                        return None
                    inode.punch_edges(self.vol, di, off, end)
                modified = True
            else:
                zero = bool(mode & FALLOC_FL_ZERO_RANGE)
                nxt = inode.fill_step(self.vol, di, off, end, pos, zero=zero,
                                      keep_size=keep)
                if nxt is None and not keep and end > di.size:
                    # (the steps grew the size over the blocks they mapped: this is
                    # an inline file, or a range ending in a block mapped before)
                    inode.truncate_step(self.vol, di, end)
                modified = zero or di.size != size
            if nxt is None or di.size != size:
                now = time.time_ns()
                self.vol.touch(di)
                di.ctime = now
                if modified:
                    di.mtime = now
            return nxt
        return self._change(change)

    def fallocate_undo_step(self, fh: int, size: int) -> bool:
        """One bounded operation of taking a failed ``fallocate``'s growth back to
        ``size``; True once the file is no bigger than that."""
        _h, di = self.handle(fh)
        if di.size <= size:
            return True
        return self._change(inode.truncate_step, self.vol, di, size)

    # -- copy_file_range: reflink clones ----------------------------------------------

    def copy_file_range(self, fh_in: int, off_in: int, fh_out: int, off_out: int,
                        length: int, flags: int = 0) -> int:
        """copy_file_range(2) between two open files of the volume; returns the bytes
        copied.  Whole blocks at the same offset within a block in both files are
        shared (a reflink clone, copy-on-write: ``inode.clone_step``), the unaligned
        head and tail (or everything, when the two offsets differ within a block)
        are copied as data.  A big range takes several operations (steps); a
        failure after some of them answers the bytes copied so far (a short copy).
        A cluster member runs the same steps under its locks
        (``ClusterFrontend.copy_file_range``)."""
        plan = self.copy_range_begin(fh_in, off_in, fh_out, off_out, length, flags)
        where = (0, 0) if plan.phases else None
        try:
            while where is not None:
                where = self.copy_range_step(plan, where)
        except FSError:
            if not plan.done:
                raise
        return plan.done

    def copy_range_begin(self, fh_in: int, off_in: int, fh_out: int, off_out: int,
                         length: int, flags: int = 0) -> CopyPlan:
        """Check a copy_file_range request (errors as copy_file_range(2) gives them)
        and plan it (``CopyPlan``).  The copy ends at the source's end of file.
        Before the first clone of a volume of an older revision, the superblock is
        raised to the revision that has shared blocks (``Volume.raise_revision``)."""
        if flags:
            raise FSError(errno.EINVAL, "copy_file_range flags must be 0")
        if off_in < 0 or off_out < 0 or length < 0:
            raise FSError(errno.EINVAL, "bad copy_file_range range")
        h_in, di_in = self.handle(fh_in)
        h_out, di_out = self.handle(fh_out)
        if h_in.flags & os.O_ACCMODE == os.O_WRONLY or \
                h_out.flags & os.O_ACCMODE == os.O_RDONLY or h_out.flags & os.O_APPEND:
            raise FSError(errno.EBADF, "file not open for reading / writing")
        for di in (di_in, di_out):
            if S.S_ISDIR(di.mode):
                raise FSError(errno.EISDIR, "is a directory")
            if not S.S_ISREG(di.mode):
                raise FSError(errno.EINVAL, "not a regular file")
        n = max(0, min(length, di_in.size - off_in))
        if off_out + n > inode.MAX_FILE_BLOCKS * BLOCK_SIZE:
            raise FSError(errno.EFBIG, "file too large")
        if di_in.bno == di_out.bno and n and off_in < off_out + n and off_out < off_in + n:
            raise FSError(errno.EINVAL, "overlapping ranges in one file")
        phases: list = []
        a = -(-off_in // BLOCK_SIZE) * BLOCK_SIZE          # the whole blocks inside
        b = (off_in + n) // BLOCK_SIZE * BLOCK_SIZE
        if n and not di_in.flags & DF_INLINE and (off_out - off_in) % BLOCK_SIZE == 0 \
                and b > a:
            if a > off_in:
                phases.append(("data", off_in, off_out, a - off_in))
            phases.append(("clone", a // BLOCK_SIZE, (off_out + a - off_in) // BLOCK_SIZE,
                           (b - a) // BLOCK_SIZE))
            if off_in + n > b:
                phases.append(("data", b, off_out + b - off_in, off_in + n - b))
            if self.vol.sb.format_rev < SHARED_SINCE:
                self.vol.raise_revision()
        elif n:
            phases.append(("data", off_in, off_out, n))
        return CopyPlan(fh_in, fh_out, phases, n)

    def copy_range_step(self, plan: CopyPlan, where: tuple[int, int]):
        """One bounded operation of a copy (phase ``where[0]`` from ``where[1]``);
        returns where the next step starts, or None once the copy is done."""
        i, pos = where
        kind, src, dst, count = plan.phases[i]
        _h, di_in = self.handle(plan.fh_in)
        _h, di_out = self.handle(plan.fh_out)
        if kind == "clone":
            def change():
                nxt = inode.clone_step(self.vol, di_in, di_out, src, dst, count, pos)
                self._modified(di_out)
                return nxt
            nxt = self._change(change)
            plan.done += ((count if nxt is None else nxt) - pos) * BLOCK_SIZE
        else:
            want = min(COPY_BYTES, count - pos)
            data = inode.read(self.vol, di_in, src + pos, want)

            def change():
                inode.write(self.vol, di_out, dst + pos, data)
                self._modified(di_out)
            if data:
                self._change(change)
            plan.done += len(data)
            if len(data) < want:
                return None         # the source shrank meanwhile: a short copy
            nxt = pos + len(data) if pos + len(data) < count else None
        if nxt is not None:
            return i, nxt
        return (i + 1, 0) if i + 1 < len(plan.phases) else None

    def _modified(self, di: Dinode) -> None:
        now = time.time_ns()
        self.vol.touch(di)
        di.mtime = di.ctime = now

    def lseek(self, fh: int, off: int, whence: int) -> int:
        """lseek(2) with SEEK_DATA or SEEK_HOLE (others are the kernel's job): from
        the extent map, at block granularity; EOF counts as a hole.  ENXIO when
        ``off`` is not inside the file, or (SEEK_DATA) no data follows it."""
        h, di = self.handle(fh)
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE) or h.is_dir or \
                not S.S_ISREG(di.mode):
            raise FSError(errno.EINVAL, "only SEEK_DATA and SEEK_HOLE on a file")
        if off < 0 or off >= di.size:
            raise FSError(errno.ENXIO, "offset outside the file")
        if whence == os.SEEK_HOLE:
            return inode.seek_hole(self.vol, di, off)
        found = inode.seek_data(self.vol, di, off)
        if found is None:
            raise FSError(errno.ENXIO, "no data after the offset")
        return found
