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
                             LINK_MAX, NAME_MAX, READDIR_BASE, SYMLINK_MAX, UNLINKED,
                             Dinode, TreeNode, dtype_of)
from . import acl, directory, inode, xattrs
from .alloc import NeedCommit
from .filedata import FileData
from .xattrs import Xattrs, has_caps

log = logging.getLogger(__name__)

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
NOW = object()          # setattr: use the current time


@dataclass
class Handle:
    """An open file or directory."""

    ino: int
    generation: int
    flags: int
    is_dir: bool = False
    written: bool = False
    # where this handle's last write ended when it ended at EOF (-1 otherwise): a
    # write from there streams onto the end of the file (``FileData.write``)
    stream_end: int = -1


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


class Filesystem(FileData, Xattrs):
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
        # inodes whose set-ID bits or capabilities the file system dropped (a write,
        # a truncation, a change of owner): the kernel's cached attributes of them
        # are out of date (``Operations._forget_dropped``)
        self.privileges_dropped: set[int] = set()
        # files whose writes on this node mapped blocks ahead of EOF: they go after
        # the last close here (``FileData.trim_ahead``)
        self.mapped_ahead: set[int] = set()

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
                atime=None, mtime=None, fh: int | None = None,
                ctx: Ctx | None = None) -> Dinode:
        """Change attributes.  A truncation by ``ctx`` (the caller) and a change of
        owner or group also drop privileges as the kernel's would
        (``drop_privileges``): the kernel leaves that to us (FUSE_HANDLE_KILLPRIV_V2)."""
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
            # privileges go with a truncation and a change of owner (decided on the
            # mode and group from before the change)
            chown = (uid is not None or gid is not None) and not S.S_ISDIR(di.mode)
            kill = self.chown_privileges(di, ctx) if chown else 0
            if size is not None:
                kill |= self.privileges_to_drop(di, ctx)
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
            if chown or size is not None:
                self.drop_privileges(di, kill)
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
            xattrs.xattr_set(self.vol, di, acl.ACCESS, acl.build(access))
        if default is not None:
            xattrs.xattr_set(self.vol, di, acl.DEFAULT, acl.build(default))
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
            xattrs.free_xattr_block(self.vol, di)
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

    def open(self, ino: int, flags: int, ctx: Ctx | None = None) -> int:
        """Open an inode; ``O_TRUNC`` truncates (as ``ctx``: dropping its privileges)."""
        di = self.inode(ino)
        if S.S_ISDIR(di.mode):
            raise FSError(errno.EISDIR, "is a directory")
        if flags & os.O_TRUNC and flags & os.O_ACCMODE != os.O_RDONLY and \
                (di.size or self.privileges_to_drop(di, ctx) or has_caps(self.vol, di)):
            self.setattr(ino, size=0, ctx=ctx)
        return self._new_handle(di, flags)

    def create(self, parent: int, name: bytes, mode: int, flags: int, ctx: Ctx):
        di = self._link_new(parent, name, S.S_IFREG | (mode & 0o7777), ctx)
        return self._new_handle(di, flags), di

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
                self.mapped_ahead.discard(h.ino)
                self.purge(h.ino)
            else:
                self.trim_ahead(h.ino, h.generation)

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

