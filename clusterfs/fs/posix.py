"""POSIX semantics over a ``Volume``: the operations behind every FUSE request.

No pyfuse3 here: the FUSE layer (``fuseops``) is a thin translation of these
methods, and tests (including the crash tests) call them directly.  Errors are
``FSError(errno)``.  Each method that changes metadata runs as one volume operation
(``_change``), which rolls back completely when it fails.

Inode numbers are block numbers.  File handles remember the generation of the inode
they opened; a handle whose inode was freed and its block reused gets ESTALE, never
another file's bytes.
"""

from __future__ import annotations

import errno
import logging
import os
import stat as S
import time
from dataclasses import dataclass

from ..errors import CorruptBlock, FSError
from ..ondisk.format import (BLOCK_SIZE, DF_DIRTREE, DF_EXTENTS, DF_INLINE, DINODE, DIRENT,
                             LINK_MAX, NAME_MAX, READDIR_BASE, SHARED_SINCE, SYMLINK_MAX,
                             UNLINKED, Dinode, TreeNode, dtype_of)
from . import acl, directory, inode
from .alloc import NeedCommit

log = logging.getLogger(__name__)

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RELATIME_S = 24 * 3600
# Timestamp granularity of writes: a write within this long after the last change of
# mtime and ctime leaves them (as a kernel's coarse clock does), so that a stream of
# overwrites in place costs no metadata operation each.
WRITE_TIME_NS = 1_000_000
NOW = object()          # setattr: use the current time
# fallocate(2) modes (linux/falloc.h)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_MODES = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE
COPY_BYTES = 1 << 20    # bytes a copy_file_range copies as data per operation


@dataclass
class Handle:
    """An open file or directory."""

    ino: int
    generation: int
    flags: int
    is_dir: bool = False
    written: bool = False


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


@dataclass
class Ctx:
    """Who asks: uid, gid (and pid) of the calling process, and its umask.

    The umask is applied here to a new node's mode (unless its directory has a
    default ACL, ``acl.inherit``): with POSIX ACLs the kernel may leave it to the
    file system.  When the kernel applied it already (it does unless the connection
    has FUSE_CAP_DONT_MASK), applying it again changes nothing."""

    uid: int = 0
    gid: int = 0
    pid: int = 0
    umask: int = 0o022


ROOT_CTX = Ctx()


class Filesystem:
    """The file system of one mounted volume (single node, or one cluster member).

    Args:
        vol: the open volume (journal open, groups loaded).
        noatime: never update access times.
    """

    def __init__(self, vol, *, noatime: bool = False):
        self.vol = vol
        self.root_ino = vol.sb.root_ino
        self.noatime = noatime
        self.handles: dict[int, Handle] = {}
        self.next_fh = 1
        self.open_count: dict[int, int] = {}
        self.known_gen: dict[int, int] = {}   # inode -> generation the kernel knows
        self.lookups: dict[int, int] = {}

    # -- helpers --------------------------------------------------------------------

    def _change(self, fn, *args):
        """Run ``fn(*args)`` as one metadata operation (retried once after a commit
        when it needs space that the running transaction freed)."""
        for _ in range(3):
            try:
                with self.vol.operation():
                    return fn(*args)
            except NeedCommit:
                self.vol.commit()
        raise FSError(errno.ENOSPC, "volume full")

    def inode(self, ino: int) -> Dinode:
        """A live inode the kernel may ask about (ESTALE if it was replaced)."""
        di = self.vol.dinode(ino)
        gen = self.known_gen.get(ino)
        if gen is not None and gen != di.generation:
            raise FSError(errno.ESTALE, f"inode {ino} was replaced")
        return di

    def _dir(self, ino: int) -> Dinode:
        di = self.inode(ino)
        if not S.S_ISDIR(di.mode):
            raise FSError(errno.ENOTDIR, "not a directory")
        if di.nlink == 0:
            raise FSError(errno.ENOENT, "directory was removed")
        return di

    def remember(self, di: Dinode) -> Dinode:
        """Note that the kernel got a reference to ``di`` (one lookup count)."""
        self.known_gen[di.bno] = di.generation
        self.lookups[di.bno] = self.lookups.get(di.bno, 0) + 1
        return di

    def forget(self, ino: int, n: int) -> None:
        left = self.lookups.get(ino, 0) - n
        if left > 0:
            self.lookups[ino] = left
        else:
            self.lookups.pop(ino, None)
            self.known_gen.pop(ino, None)

    @staticmethod
    def _check_name(name: bytes) -> None:
        if len(name) > NAME_MAX:
            raise FSError(errno.ENAMETOOLONG, "name too long")
        if not name or b"/" in name or name in (b".", b".."):
            raise FSError(errno.EINVAL, "bad name")

    # -- lookup and attributes ---------------------------------------------------------

    def lookup(self, parent: int, name: bytes) -> Dinode:
        pdi = self._dir(parent)
        if name == b".":
            return pdi
        if name == b"..":
            return self.vol.dinode(pdi.parent)
        if len(name) > NAME_MAX:
            raise FSError(errno.ENAMETOOLONG, "name too long")
        found = directory.lookup(self.vol, pdi, name)
        if found is None:
            raise FSError(errno.ENOENT, "no such entry")
        return self.vol.dinode(found[1])

    def getattr(self, ino: int) -> Dinode:
        return self.inode(ino)

    def setattr(self, ino: int, *, mode=None, uid=None, gid=None, size=None,
                atime=None, mtime=None, fh: int | None = None) -> Dinode:
        di = self.inode(ino)
        if size is not None:
            if S.S_ISDIR(di.mode):
                raise FSError(errno.EISDIR, "is a directory")
            if not S.S_ISREG(di.mode):
                raise FSError(errno.EINVAL, "not a regular file")
            if size > inode.MAX_FILE_BLOCKS * BLOCK_SIZE:
                raise FSError(errno.EFBIG, "file too large")
            self._truncate(di, size)

        def change():
            now = time.time_ns()
            self.vol.touch(di)
            if mode is not None:
                di.mode = S.S_IFMT(di.mode) | (mode & 0o7777)
                self._chmod_acl(di)
            if uid is not None:
                di.uid = uid
            if gid is not None:
                di.gid = gid
            if atime is not None:
                di.atime = now if atime is NOW else atime
            if mtime is not None:
                di.mtime = now if mtime is NOW else mtime
            if size is not None and mtime is None:
                di.mtime = now
            di.ctime = now
        self._change(change)
        return di

    def _truncate(self, di: Dinode, size: int) -> None:
        while True:
            if self._change(inode.truncate_step, self.vol, di, size):
                return

    def truncate_step(self, ino: int, size: int) -> bool:
        """One bounded step of truncating a regular file toward ``size`` (one
        operation); True once the size is reached.  A cluster member runs the steps
        one by one, yielding to its event loop (lease renewals) in between."""
        di = self.inode(ino)
        if not S.S_ISREG(di.mode):
            return True
        return self._change(inode.truncate_step, self.vol, di, size)

    # -- creating ---------------------------------------------------------------------

    def _new_inode(self, pdi: Dinode, mode: int, ctx: Ctx, rdev: int = 0) -> Dinode:
        """Allocate and initialise a node for ``_link_new`` (inside its operation).
        ``mode``: the type and the mode asked for; the umask or the parent's default
        ACL limits it (``acl.inherit``), and the new node gets the ACLs it
        inherits."""
        mode, access, default = acl.inherit(self._acl(pdi, acl.DEFAULT), mode, ctx.umask)
        hint, self.vol.inode_hint = getattr(self.vol, "inode_hint", None), None
        ino = self.vol.alloc.alloc_meta(hint if hint is not None else pdi.bno,
                                        state=DINODE)
        rg = self.vol.rgrp(self.vol.sb.rgrp_of(ino))
        self.vol.touch(rg)
        gen = rg.igeneration
        rg.igeneration += 1
        now = time.time_ns()
        gid = ctx.gid
        if pdi.mode & S.S_ISGID:
            gid = pdi.gid
            if S.S_ISDIR(mode):
                mode |= S.S_ISGID
        if S.S_ISDIR(mode):
            flags, root = DF_DIRTREE, TreeNode(ino, DIRENT, 0, ino, is_root=True)
        else:
            flags, root = DF_INLINE, b""
        di = Dinode(ino, generation=gen, mode=mode, uid=ctx.uid, gid=gid,
                    nlink=2 if S.S_ISDIR(mode) else 1, atime=now, mtime=now, ctime=now,
                    btime=now, rdev=rdev, flags=flags, parent=pdi.bno, root=root)
        self.vol.created(di)
        if access is not None:
            inode.xattr_set(self.vol, di, acl.ACCESS, acl.build(access))
        if default is not None:
            inode.xattr_set(self.vol, di, acl.DEFAULT, acl.build(default))
        return di

    def _link_new(self, parent: int, name: bytes, mode: int, ctx: Ctx, rdev: int = 0,
                  target: bytes | None = None) -> Dinode:
        self._check_name(name)
        pdi = self._dir(parent)

        def change():
            if directory.lookup(self.vol, pdi, name) is not None:
                raise FSError(errno.EEXIST, "entry exists")
            di = self._new_inode(pdi, mode, ctx, rdev)
            if target is not None:
                inode.write(self.vol, di, 0, target)
            directory.add(self.vol, pdi, name, di.bno, dtype_of(mode))
            self.vol.touch(pdi)
            if S.S_ISDIR(mode):
                pdi.nlink += 1
            pdi.mtime = pdi.ctime = di.ctime
            return di
        return self._change(change)

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, ctx: Ctx) -> Dinode:
        fmt = S.S_IFMT(mode) or S.S_IFREG
        if fmt not in (S.S_IFREG, S.S_IFIFO, S.S_IFSOCK, S.S_IFCHR, S.S_IFBLK):
            raise FSError(errno.EINVAL, "bad file type")
        return self._link_new(parent, name, fmt | (mode & 0o7777), ctx,
                              rdev if fmt in (S.S_IFCHR, S.S_IFBLK) else 0)

    def mkdir(self, parent: int, name: bytes, mode: int, ctx: Ctx) -> Dinode:
        return self._link_new(parent, name, S.S_IFDIR | (mode & 0o7777), ctx)

    def symlink(self, parent: int, name: bytes, target: bytes, ctx: Ctx) -> Dinode:
        if not target or len(target) > SYMLINK_MAX:
            raise FSError(errno.ENAMETOOLONG if target else errno.ENOENT, "bad target")
        return self._link_new(parent, name, S.S_IFLNK | 0o777, ctx, target=target)

    def readlink(self, ino: int) -> bytes:
        di = self.inode(ino)
        if not S.S_ISLNK(di.mode):
            raise FSError(errno.EINVAL, "not a symbolic link")
        return inode.read(self.vol, di, 0, di.size)

    def link(self, ino: int, new_parent: int, new_name: bytes) -> Dinode:
        self._check_name(new_name)
        di = self.inode(ino)
        if S.S_ISDIR(di.mode):
            raise FSError(errno.EPERM, "hard link to a directory")
        if di.nlink == 0:
            raise FSError(errno.ENOENT, "inode was removed")
        if di.nlink >= LINK_MAX:
            raise FSError(errno.EMLINK, "too many links")
        pdi = self._dir(new_parent)

        def change():
            if directory.lookup(self.vol, pdi, new_name) is not None:
                raise FSError(errno.EEXIST, "entry exists")
            directory.add(self.vol, pdi, new_name, di.bno, dtype_of(di.mode))
            now = time.time_ns()
            self.vol.touch(pdi)
            pdi.mtime = pdi.ctime = now
            self.vol.touch(di)
            di.nlink += 1
            di.ctime = now
        self._change(change)
        return di

    # -- removing --------------------------------------------------------------------------

    def unlink(self, parent: int, name: bytes) -> None:
        self.maybe_purge(self.remove(parent, name, False))

    def rmdir(self, parent: int, name: bytes) -> None:
        self.maybe_purge(self.remove(parent, name, True))

    def remove(self, parent: int, name: bytes, want_dir: bool) -> int | None:
        """Remove a directory entry (one operation).  Returns the inode number when
        its last link went (it is then UNLINKED and waits for ``purge``)."""
        if want_dir and name == b".":
            raise FSError(errno.EINVAL, "cannot remove '.'")
        if want_dir and name == b"..":
            raise FSError(errno.ENOTEMPTY, "cannot remove '..'")
        pdi = self._dir(parent)
        found = directory.lookup(self.vol, pdi, name)
        if found is None:
            raise FSError(errno.ENOENT, "no such entry")
        di = self.vol.dinode(found[1])
        is_dir = S.S_ISDIR(di.mode)
        if want_dir and not is_dir:
            raise FSError(errno.ENOTDIR, "not a directory")
        if not want_dir and is_dir:
            raise FSError(errno.EISDIR, "is a directory")
        if is_dir and di.entries:
            raise FSError(errno.ENOTEMPTY, "directory not empty")

        def change():
            directory.remove(self.vol, pdi, name)
            now = time.time_ns()
            self.vol.touch(pdi)
            pdi.mtime = pdi.ctime = now
            self.vol.touch(di)
            di.ctime = now
            if is_dir:
                pdi.nlink -= 1
                di.nlink = 0
            else:
                di.nlink -= 1
            if di.nlink == 0:
                self.vol.alloc.set_state(di.bno, UNLINKED)
        self._change(change)
        return di.bno if di.nlink == 0 else None

    def in_use(self, ino: int) -> bool:
        """Whether a handle on this node still has the inode open."""
        return self.open_count.get(ino, 0) > 0

    def maybe_purge(self, ino: int | None) -> None:
        """Free an inode whose last link went, unless this node still has it open
        (then its last close frees it).  A cluster decides with open locks instead."""
        if ino is not None and not self.in_use(ino):
            self.purge(ino)

    def purge(self, ino: int) -> None:
        """Free an unlinked inode and everything it owns (several transactions for a
        big file; a crash in between leaves it UNLINKED, finished at next mount).
        Safe to run again after it was interrupted."""
        while not self.purge_step(ino):
            pass

    def purge_step(self, ino: int) -> bool:
        """One bounded step of ``purge`` (one operation); True when the inode is gone
        (or was not to be freed)."""
        if self.vol.sb.rgrp_of(ino) < 0 or self.vol.alloc.state(ino) != UNLINKED:
            # freed already (the block, free or reused, may still hold the old
            # dinode's image), or linked again: nothing to free here
            return True
        try:
            di = self.vol.dinode(ino)
        except FSError as e:
            if e.errno == errno.ESTALE:
                return True     # freed already
            raise
        if di.nlink != 0:
            return True
        if not S.S_ISDIR(di.mode) and di.flags & DF_EXTENTS and di.size:
            if not self._change(inode.truncate_step, self.vol, di, 0):
                return False

        def change():
            if di.flags & (DF_EXTENTS | DF_DIRTREE):
                t = inode.tree(self.vol, di)
                for node in t.clear():
                    self.vol.free_meta(node)
                    di.blocks -= 1
            inode.free_xattr_block(self.vol, di)
            self.vol.free_meta(di)
        self._change(change)
        # known_gen stays until the kernel's forget: a reused block is then ESTALE
        return True

    # -- rename ------------------------------------------------------------------------

    def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
               flags: int = 0) -> None:
        self.maybe_purge(self.rename_entry(old_parent, old_name, new_parent, new_name, flags))

    def rename_entry(self, old_parent: int, old_name: bytes, new_parent: int,
                     new_name: bytes, flags: int = 0) -> int | None:
        """Rename (one operation).  Returns the replaced inode when its last link
        went (it waits for ``purge``)."""
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or \
                flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
            raise FSError(errno.EINVAL, "bad rename flags")
        self._check_name(new_name)
        if old_name in (b".", b".."):
            raise FSError(errno.EBUSY, "cannot rename '.' or '..'")
        opdi = self._dir(old_parent)
        npdi = self._dir(new_parent)
        src = directory.lookup(self.vol, opdi, old_name)
        if src is None:
            raise FSError(errno.ENOENT, "no such entry")
        sdi = self.vol.dinode(src[1])
        dst = directory.lookup(self.vol, npdi, new_name)
        ddi = self.vol.dinode(dst[1]) if dst is not None else None
        s_dir = S.S_ISDIR(sdi.mode)
        if flags & RENAME_EXCHANGE:
            if ddi is None:
                raise FSError(errno.ENOENT, "no entry to exchange with")
        elif ddi is not None and flags & RENAME_NOREPLACE:
            raise FSError(errno.EEXIST, "target exists")
        if ddi is not None and ddi.bno == sdi.bno:
            return None     # two links to one inode: POSIX says do nothing
        if ddi is not None and not flags & RENAME_EXCHANGE:
            d_dir = S.S_ISDIR(ddi.mode)
            if s_dir and not d_dir:
                raise FSError(errno.ENOTDIR, "target is not a directory")
            if not s_dir and d_dir:
                raise FSError(errno.EISDIR, "target is a directory")
            if d_dir and ddi.entries:
                raise FSError(errno.ENOTEMPTY, "target directory not empty")
        # a directory may not move into its own subtree
        if opdi.bno != npdi.bno:
            if s_dir:
                self._check_not_ancestor(sdi.bno, npdi)
            if flags & RENAME_EXCHANGE and S.S_ISDIR(ddi.mode):
                self._check_not_ancestor(ddi.bno, opdi)

        def change():
            now = time.time_ns()
            for d in (opdi, npdi):
                self.vol.touch(d)
                d.mtime = d.ctime = now
            self.vol.touch(sdi)
            sdi.ctime = now
            if flags & RENAME_EXCHANGE:
                d_is_dir = S.S_ISDIR(ddi.mode)
                directory.retarget(self.vol, opdi, old_name, ddi.bno, dtype_of(ddi.mode))
                directory.retarget(self.vol, npdi, new_name, sdi.bno, dtype_of(sdi.mode))
                self.vol.touch(ddi)
                ddi.ctime = now
                if opdi.bno != npdi.bno:
                    if s_dir:
                        sdi.parent = npdi.bno
                    if d_is_dir:
                        ddi.parent = opdi.bno
                    opdi.nlink += int(d_is_dir) - int(s_dir)
                    npdi.nlink += int(s_dir) - int(d_is_dir)
                return None
            directory.remove(self.vol, opdi, old_name)
            if ddi is not None:
                directory.retarget(self.vol, npdi, new_name, sdi.bno, dtype_of(sdi.mode))
                self.vol.touch(ddi)
                ddi.ctime = now
                if S.S_ISDIR(ddi.mode):
                    ddi.nlink = 0
                    npdi.nlink -= 1
                else:
                    ddi.nlink -= 1
                if ddi.nlink == 0:
                    self.vol.alloc.set_state(ddi.bno, UNLINKED)
            else:
                directory.add(self.vol, npdi, new_name, sdi.bno, dtype_of(sdi.mode))
            if s_dir:
                sdi.parent = npdi.bno
                if opdi.bno != npdi.bno:
                    opdi.nlink -= 1
                    npdi.nlink += 1
            if ddi is not None and ddi.nlink == 0:
                return ddi.bno
            return None
        return self._change(change)

    def _check_not_ancestor(self, moving: int, dest: Dinode) -> None:
        """EINVAL if directory ``moving`` is ``dest`` or one of its ancestors."""
        seen = 0
        d = dest
        while True:
            if d.bno == moving:
                raise FSError(errno.EINVAL, "cannot move a directory into itself")
            if d.bno == self.root_ino:
                return
            seen += 1
            if seen > 100000:
                raise FSError(errno.ELOOP, "directory parent chain loops")
            d = self.vol.dinode(d.parent)

    # -- files -----------------------------------------------------------------------------

    def _new_handle(self, di: Dinode, flags: int, is_dir: bool = False) -> int:
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = Handle(di.bno, di.generation, flags, is_dir)
        self.open_count[di.bno] = self.open_count.get(di.bno, 0) + 1
        return fh

    def handle(self, fh: int) -> tuple[Handle, Dinode]:
        h = self.handles.get(fh)
        if h is None:
            raise FSError(errno.EBADF, "bad file handle")
        di = self.vol.dinode(h.ino)
        if di.generation != h.generation:
            raise FSError(errno.ESTALE, "file was replaced")
        return h, di

    def open(self, ino: int, flags: int) -> int:
        di = self.inode(ino)
        if S.S_ISDIR(di.mode):
            raise FSError(errno.EISDIR, "is a directory")
        if flags & os.O_TRUNC and flags & os.O_ACCMODE != os.O_RDONLY and di.size:
            self.setattr(ino, size=0)
        return self._new_handle(di, flags)

    def create(self, parent: int, name: bytes, mode: int, flags: int, ctx: Ctx):
        di = self._link_new(parent, name, S.S_IFREG | (mode & 0o7777), ctx)
        return self._new_handle(di, flags), di

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

    def write(self, fh: int, off: int, data, ctx: Ctx | None = None) -> int:
        """Write ``data`` at ``off`` (the end of file with O_APPEND).  ``ctx``: the
        writer, when the kernel left clearing set-user-ID bits to us (direct I/O)."""
        h, di = self.handle(fh)
        if h.flags & os.O_APPEND:
            off = di.size        # the cluster's size, not the kernel's idea of it
        kill = self.privileges_to_drop(di, ctx)
        now = time.time_ns()
        if not kill and 0 <= now - di.mtime < WRITE_TIME_NS and \
                0 <= now - di.ctime < WRITE_TIME_NS and not self.vol.readonly and \
                inode.overwrite(self.vol, di, off, data):
            # the times were set less than WRITE_TIME_NS ago: they stand for this
            # write too, and an overwrite in place changes nothing else
            h.written = True
            return len(data)

        def change():
            n = inode.write(self.vol, di, off, data)
            now = time.time_ns()
            self.vol.touch(di)
            di.mtime = di.ctime = now
            di.mode &= ~kill
            return n
        n = self._change(change)
        h.written = True
        return n

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

    def flush(self, fh: int) -> None:
        self.handle(fh)

    def fsync(self, fh: int, datasync: bool) -> None:
        if fh not in self.handles:
            raise FSError(errno.EBADF, "bad file handle")
        self.vol.commit()

    def release(self, fh: int) -> None:
        h = self.close_handle(fh)
        if h is not None and self.open_count.get(h.ino, 0) == 0:
            try:
                di = self.vol.dinode(h.ino)
            except FSError:
                return
            if di.generation == h.generation and di.nlink == 0:
                self.purge(h.ino)

    def close_handle(self, fh: int) -> Handle | None:
        """Forget a handle (no metadata change); returns it, or None if unknown."""
        h = self.handles.pop(fh, None)
        if h is None:
            return None
        left = self.open_count.get(h.ino, 1) - 1
        if left > 0:
            self.open_count[h.ino] = left
        else:
            self.open_count.pop(h.ino, None)
            self.vol.alloc.drop_reservation(h.ino)
        return h

    # -- directories ---------------------------------------------------------------------

    def opendir(self, ino: int) -> int:
        di = self._dir(ino)
        return self._new_handle(di, os.O_RDONLY, is_dir=True)

    def readdir_entries(self, fh: int, start: int, limit: int):
        """Up to ``limit`` (name, inode number, next offset) from offset ``start``.

        Offsets: 1 after ".", 2 after "..", key + READDIR_BASE after an entry; a key
        never changes while its entry exists, so offsets stay valid while the
        directory changes."""
        h, di = self.handle(fh)
        out = []
        if start < 1:
            out.append((b".", di.bno, 1))
        if start < 2:
            out.append((b"..", di.parent, 2))
        key = start - READDIR_BASE + 1 if start >= READDIR_BASE else 0
        for k, ino, _dtype, name in directory.entries_from(self.vol, di, key):
            if len(out) >= limit:
                break
            out.append((name, ino, k + READDIR_BASE))
        return out

    def entry_inode(self, name: bytes, ino: int) -> Dinode | None:
        """The dinode a directory entry names, for readdir; None for an entry to
        leave out: its inode went meanwhile (a cluster: removed on another node), or
        it cannot be read (logged)."""
        try:
            return self.vol.dinode(ino)
        except (FSError, CorruptBlock) as e:
            if e.errno not in (errno.ESTALE, errno.ENOENT):
                log.error("directory entry %r -> inode %d unreadable: %s", name, ino, e)
            return None

    def readdir(self, fh: int, start: int, limit: int = 1 << 62):
        """(name, dinode, next offset) from offset ``start``, without the entries
        ``entry_inode`` leaves out."""
        out = []
        for name, ino, nxt in self.readdir_entries(fh, start, limit):
            child = self.entry_inode(name, ino)
            if child is not None:
                out.append((name, child, nxt))
        return out

    def releasedir(self, fh: int) -> None:
        self.release(fh)

    def fsyncdir(self, fh: int, datasync: bool) -> None:
        self.vol.commit()

    # -- extended attributes ---------------------------------------------------------------

    def getxattr(self, ino: int, name: bytes) -> bytes:
        di = self.inode(ino)
        value = inode.xattr_get(self.vol, di, name)
        if value is None:
            raise FSError(errno.ENODATA, "no such attribute")
        return value

    def listxattr(self, ino: int) -> list[bytes]:
        di = self.inode(ino)
        return [k for k, _ in inode.xattr_items(self.vol, di)]

    def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        """Set an attribute; the POSIX ACLs (``acl.NAMES``) are checked first and
        kept in step with the mode (``_set_acl``)."""
        di = self.inode(ino)
        if name in acl.NAMES:
            entries = acl.parse(value)
            if acl.is_removal(entries):
                self.removexattr(ino, name)
                return
            self._check_acl_target(di, name)

        def change():
            if name in acl.NAMES:
                self._set_acl(di, name, entries)
            else:
                inode.xattr_set(self.vol, di, name, value)
            self.vol.touch(di)
            di.ctime = time.time_ns()
        self._change(change)

    def removexattr(self, ino: int, name: bytes) -> None:
        """Remove an attribute (ENODATA when there is none).  Removing a POSIX ACL
        leaves the mode as it is, and removing one that is not there succeeds and
        changes nothing (as on ext4, where this is setting "no ACL")."""
        di = self.inode(ino)
        if name in acl.NAMES:
            self._check_acl_target(di, name, removing=True)

        def change():
            if not inode.xattr_set(self.vol, di, name, None):
                if name in acl.NAMES:
                    return
                raise FSError(errno.ENODATA, "no such attribute")
            self.vol.touch(di)
            di.ctime = time.time_ns()
        self._change(change)

    # -- POSIX ACLs (the logic is acl.py's) ------------------------------------------------

    def _acl(self, di: Dinode, name: bytes) -> list[acl.Entry] | None:
        """The stored ACL ``name`` of ``di`` (None: none)."""
        value = inode.xattr_get(self.vol, di, name)
        if value is None:
            return None
        try:
            entries = acl.parse(value)
        except FSError:
            log.error("inode %d: invalid %s stored", di.bno, name.decode())
            raise FSError(errno.EIO, f"inode {di.bno}: invalid {name.decode()}") from None
        return entries or None

    @staticmethod
    def _check_acl_target(di: Dinode, name: bytes, removing: bool = False) -> None:
        """Whether ``di`` can have the ACL ``name``: not a symbolic link (EOPNOTSUPP);
        a default ACL only on a directory (EACCES, as Linux's ``set_posix_acl``,
        where removing one from a non-directory is no error)."""
        if S.S_ISLNK(di.mode):
            raise FSError(errno.EOPNOTSUPP, "no ACLs on symbolic links")
        if name == acl.DEFAULT and not S.S_ISDIR(di.mode) and not removing:
            raise FSError(errno.EACCES, "a default ACL only on a directory")

    def _set_acl(self, di: Dinode, name: bytes, entries: list[acl.Entry]) -> None:
        """Store a checked ACL (inside an operation).  An access ACL sets the mode's
        permission bits, and is not stored when the mode says it all
        (``acl.equivalent``)."""
        if name == acl.ACCESS:
            self.vol.touch(di)
            di.mode = acl.mode_of(entries, di.mode)
            if acl.equivalent(entries):
                inode.xattr_set(self.vol, di, name, None)
                return
        inode.xattr_set(self.vol, di, name, acl.build(entries))

    def _chmod_acl(self, di: Dinode) -> None:
        """After a mode change (inside its operation): the stored access ACL, if
        any, takes the new owner, group-class and other bits."""
        entries = self._acl(di, acl.ACCESS)
        if entries is not None:
            inode.xattr_set(self.vol, di, acl.ACCESS,
                            acl.build(acl.chmod(entries, di.mode)))

    # -- volume ------------------------------------------------------------------------------

    def statfs_layout(self) -> dict:
        """statfs fields that do not change: block size, blocks, names."""
        sb = self.vol.sb
        total = sum(sb.rgrp_range(i)[1] for i in range(sb.rgrp_count))
        return {"bsize": BLOCK_SIZE, "blocks": total, "files": total, "namemax": NAME_MAX}

    def statfs(self) -> dict:
        st = self.statfs_layout()
        free = self.vol.alloc_free_blocks()
        st.update(bfree=free, bavail=free, ffree=free)
        return st

    def access(self, ino: int, mode: int, ctx: Ctx) -> bool:
        """access(2) by the mode and the access ACL (the kernel checks permissions
        itself on our mounts, default_permissions: this is for other callers).  Only
        the caller's primary group is known here."""
        di = self.inode(ino)
        if ctx.uid == 0:
            return not (mode & os.X_OK) or bool(di.mode & 0o111) or S.S_ISDIR(di.mode)
        entries = None if S.S_ISLNK(di.mode) else self._acl(di, acl.ACCESS)
        return acl.permits(entries, di.mode, di.uid, di.gid, ctx.uid, (ctx.gid,),
                           mode & 7)

