"""The FUSE operations: a thin translation of the file system for pyfuse3.

Every handler converts inode numbers (FUSE's root is 1, ours is a block number),
awaits the frontend (``DirectFrontend`` on a single node: ``fs.Filesystem`` as is;
``cluster.ClusterFrontend`` in a cluster: the same operations under cluster locks),
and turns ``FSError`` into ``FUSEError``.  A corrupt block is EIO (the volume logged
the block's number).  Nothing else lives here.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import stat as S

import pyfuse3
import trio

from journal.errors import JournalAborted
from lockmgr.plocks import OFFSET_MAX

from ..fs.posix import Ctx
from ..ondisk.format import BLOCK_SIZE, DF_INLINE

PREFERRED_IO = 1 << 20      # st_blksize of regular files

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
READDIR_BATCH = 64


def _fuse_error(e: OSError) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(e.errno or errno.EIO)


def _guard(fn):
    """Turn what a handler raises into the reply for that one request: FSError (and
    OSError) into its errno; a stopped journal into EIO, logged in one line;
    anything unexpected is logged with its traceback and answered with EIO.  Only
    FUSEError may leave a handler: anything else would end pyfuse3's main loop and
    take the whole mount down."""

    @functools.wraps(fn)
    async def handler(self, *args):
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            raise _fuse_error(e) from None
        except JournalAborted as e:
            # an earlier device error (or the node's fence) stopped the journal: every
            # request that writes fails so until the remount, which is no bug to trace
            log.error("%s%r: %s; answering EIO", fn.__name__, args[:2], e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("%s%r failed; answering EIO", fn.__name__, args[:2])
            raise pyfuse3.FUSEError(errno.EIO) from None
    return handler


def _ctx(ctx) -> Ctx:
    return Ctx(uid=ctx.uid, gid=ctx.gid, pid=ctx.pid, umask=ctx.umask)


def _lock_end(start: int, length: int) -> int:
    """The inclusive end of a ``struct flock`` range (length 0: to the end of file)."""
    if length <= 0 or start + length - 1 >= OFFSET_MAX:
        return OFFSET_MAX
    return start + length - 1


class DirectFrontend:
    """The single-node frontend: ``Filesystem``'s methods, awaitable.

    While the volume is frozen (``gate`` set: ``fs.admin.SingleNodeAdmin``)
    the requests that may change it wait for the thaw; those that only read
    (``READING``, and an open for reading) go on."""

    READING = frozenset({"access", "flush", "fsync", "fsyncdir", "getattr", "getxattr",
                         "listxattr", "lookup", "lseek", "opendir", "read", "readdir",
                         "readlink", "statfs"})

    def __init__(self, fs):
        self.fs = fs
        self.gate = None         # a trio.Event while frozen

    def __getattr__(self, name):
        method = getattr(self.fs, name)
        if name in self.READING:
            async def call(*args, **kw):
                return method(*args, **kw)
        else:
            async def call(*args, **kw):
                if name != "open" or _writes(args[1]):
                    while self.gate is not None:
                        await self.gate.wait()
                return method(*args, **kw)
        call.__name__ = name
        setattr(self, name, call)
        return call


def _writes(flags: int) -> bool:
    """Whether an open with ``flags`` may change the file (write access, truncation)."""
    return flags & os.O_ACCMODE != os.O_RDONLY or bool(flags & os.O_TRUNC)


class Operations(pyfuse3.Operations):
    """pyfuse3 operations over a file system frontend.

    Args:
        fs: the ``Filesystem`` (lookup counts and generations are kept there).
        front: the frontend to call (default: ``DirectFrontend(fs)``).
        attr_timeout: seconds the kernel may cache attributes.
        entry_timeout: seconds the kernel may cache directory entries (default:
            ``attr_timeout``).
        cacheable: ``fn(ino) -> bool``: whether the kernel may cache the attributes of
            this inode now (a cluster: while this node holds the inode's lock); a reply
            for which it is false carries an attribute timeout of 0.
        entries_cacheable: ``fn(parent) -> bool``: whether the kernel may cache an
            entry of this directory that a lookup or create answers now, and a
            negative lookup (a cluster: ``Coherence.entries_cacheable``).  With it,
            every other reply carries an entry timeout of 0: the kernel stamps the
            entries of a READDIRPLUS reply with its epoch when the reply arrives,
            which may be after the directory's lock went away.  None (a single
            node): every entry is cached for ``entry_timeout``, names not found are
            not.
        direct_writeonly: bypass the kernel's page cache for files opened write-only
            (which cannot be mapped): the kernel's write-through page cache asks the
            file system for ``security.capability`` before every write (to clear
            file capabilities: FUSE keeps no "no security xattr" mark), one more
            request per write, which a VM save (``cat > state``) pays 5,000 times.
            The kernel drops the written range from the page cache of the other
            opens.  Every other open is cached (``keep_cache``).
        locks: the cluster's fcntl/OFD/flock locks (``cluster.filelocks.FileLocks``);
            None on a single node: the kernel is not asked to send lock requests
            (``enable_locks``) and keeps the locks itself, which is exact on one
            node.
    """

    supports_dot_lookup = True
    enable_writeback_cache = False
    # POSIX ACLs (FUSE_CAP_POSIX_ACL): the kernel enforces them and caches them with
    # the attributes; the file system stores them and keeps the mode in step
    # (fs/acl.py)
    enable_acl = True
    pass_lock_owner = True      # flush(fh, lock_owner), release(fh, flock_owner)
    write_ctx = True            # write(fh, off, buf, ctx)
    # the file system clears set-ID bits and security.capability on write, truncate
    # and chown (FileData.write, Filesystem.setattr), so the kernel stops asking for
    # security.capability before every write through its page cache
    handle_killpriv_v2 = True

    def __init__(self, fs, front=None, *, attr_timeout: float = 300.0,
                 entry_timeout: float | None = None, cacheable=None,
                 entries_cacheable=None, direct_writeonly: bool = False, locks=None):
        super().__init__()
        self.fs = fs
        self.front = front if front is not None else DirectFrontend(fs)
        self.root = fs.root_ino
        self.timeout = attr_timeout
        self.entry_timeout = attr_timeout if entry_timeout is None else entry_timeout
        self.cacheable = cacheable
        self.entries_cacheable = entries_cacheable
        # the entry timeout of replies that no directory's lock covers
        self.plain_entry_timeout = self.entry_timeout if entries_cacheable is None else 0
        self.direct_writeonly = direct_writeonly
        self.locks = locks
        # the kernel sends lock requests only when this node keeps the locks (binding/)
        self.enable_locks = locks is not None
        self.after_init: list = []      # callables run once FUSE INIT is answered

    def init(self):
        """FUSE INIT is being answered: run the ``after_init`` callbacks right after
        the reply (the kernel sets the connection's parameters when it reads it)."""
        token = trio.lowlevel.current_trio_token()
        for fn in (self._log_killpriv, *self.after_init):
            token.run_sync_soon(fn)

    @staticmethod
    def _log_killpriv() -> None:
        if pyfuse3.killpriv_v2_granted():
            log.debug("the kernel leaves dropping privileges to us (FUSE_HANDLE_KILLPRIV_V2)")
        else:
            log.info("the kernel did not take FUSE_HANDLE_KILLPRIV_V2: it asks for "
                     "security.capability before each write through its page cache")

    # -- translation -------------------------------------------------------------------

    def _in(self, ino: int) -> int:
        return self.root if ino == ROOT else ino

    def _out(self, ino: int) -> int:
        return ROOT if ino == self.root else ino

    def attrs(self, di) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = self._out(di.bno)
        e.generation = di.generation
        e.st_mode = di.mode
        e.st_nlink = di.nlink
        e.st_uid = di.uid
        e.st_gid = di.gid
        e.st_rdev = di.rdev
        if S.S_ISDIR(di.mode):
            e.st_size = BLOCK_SIZE * (di.blocks + 1)
        else:
            e.st_size = di.size
        # the preferred I/O size: programs that size their buffers by it (cat, cp,
        # stdio) then make one FUSE request per MiB instead of per 128 KiB
        e.st_blksize = PREFERRED_IO if S.S_ISREG(di.mode) else BLOCK_SIZE
        e.st_blocks = di.blocks * (BLOCK_SIZE // 512) if not di.flags & DF_INLINE else \
            -(-di.size // 512)
        e.st_atime_ns = di.atime
        e.st_mtime_ns = di.mtime
        e.st_ctime_ns = di.ctime
        e.st_birthtime_ns = di.btime
        cacheable = self.cacheable
        e.attr_timeout = self.timeout if cacheable is None or cacheable(di.bno) else 0
        e.entry_timeout = self.plain_entry_timeout
        return e

    def entry(self, di, parent: int) -> pyfuse3.EntryAttributes:
        """Attributes for a reply that gives the kernel a reference (lookup count) and
        a directory entry in ``parent`` (our inode number)."""
        self.fs.remember(di)
        e = self.attrs(di)
        if self.entries_cacheable is not None and self.entries_cacheable(parent):
            e.entry_timeout = self.entry_timeout
        return e

    def forget_entries(self) -> None:
        """Have the kernel look up again every directory entry it caches, and those
        that requests in flight bring (its epoch; no lock is taken in the kernel)."""
        try:
            pyfuse3.notify_inc_epoch()
        except OSError as e:
            log.error("the kernel's directory entries could not be dropped: %s", e)

    def probe_entry_epochs(self) -> bool:
        """Whether the kernel takes epoch raises (Linux 6.16 and later)."""
        try:
            pyfuse3.notify_inc_epoch()
        except OSError as e:
            log.info("the kernel keeps no entry epochs (%s): directory entries are "
                     "not cached", e)
            return False
        return True

    def _info(self, fh: int, flags: int) -> pyfuse3.FileInfo:
        if self.direct_writeonly and flags & os.O_ACCMODE == os.O_WRONLY:
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    def drop_pages(self, ino: int) -> None:
        """Drop the kernel's cached pages and attributes of ``ino`` (blocking: the
        kernel waits for the page locks of READs and WRITEs in flight, and writes
        back pages dirtied through a mapping; so call it on a worker thread while
        requests are served: ``clusterfs.cluster.pages``).  Raises OSError (ENOENT:
        the kernel does not know the inode)."""
        pyfuse3.invalidate_inode(self._out(ino), attr_only=False)

    def drop_page_range(self, ino: int, off: int, length: int) -> None:
        """Drop the kernel's cached pages of ``ino`` in [off, off + length) (and its
        attributes); blocking as ``drop_pages``."""
        pyfuse3.invalidate_range(self._out(ino), off, length)

    def forget_attrs(self, ino: int) -> None:
        """Drop the kernel's cached attributes of ``ino`` (not its page cache: taking
        page locks here could wait for a request that waits for us).  Only spinlocks
        are taken in the kernel, so this never blocks on a pending request; it also
        makes the kernel ignore replies to requests sent before it (attribute
        versions)."""
        try:
            pyfuse3.invalidate_inode(self._out(ino), attr_only=True)
        except OSError as e:
            if e.errno != errno.ENOENT:       # ENOENT: the kernel does not know it
                log.warning("attributes of inode %d not invalidated: %s", ino, e)

    def _forget_dropped(self) -> None:
        """The file system cleared set-ID bits or capabilities (a write, a
        truncation, a change of owner) that the kernel has cached: drop its cached
        attributes of those inodes, so that its next permission check (an exec)
        asks again.  A write's and an open's replies carry no attributes."""
        dropped = self.fs.privileges_dropped
        while dropped:
            self.forget_attrs(dropped.pop())

    # -- handlers ------------------------------------------------------------------------

    async def lookup(self, parent_inode, name, ctx=None):
        parent = self._in(parent_inode)
        try:
            di = await self.front.lookup(parent, name)
        except OSError as e:
            if e.errno == errno.ENOENT and self.entries_cacheable is not None and \
                    self.entries_cacheable(parent):
                # a negative entry, cached as long as a positive one would be
                neg = pyfuse3.EntryAttributes()
                neg.st_ino = 0
                neg.entry_timeout = self.entry_timeout
                return neg
            raise
        return self.entry(di, parent)

    async def forget(self, inode_list):
        for ino, n in inode_list:
            self.fs.forget(self._in(ino), n)

    async def getattr(self, inode, ctx=None):
        return self.attrs(await self.front.getattr(self._in(inode)))

    async def setattr(self, inode, attr, fields, fh, ctx):
        di = await self.front.setattr(
            self._in(inode),
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime=attr.st_atime_ns if fields.update_atime else None,
            mtime=attr.st_mtime_ns if fields.update_mtime else None,
            fh=fh, ctx=_ctx(ctx))
        self._forget_dropped()
        return self.attrs(di)

    async def readlink(self, inode, ctx):
        return await self.front.readlink(self._in(inode))

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        parent = self._in(parent_inode)
        return self.entry(await self.front.mknod(parent, name, mode, rdev, _ctx(ctx)),
                          parent)

    async def mkdir(self, parent_inode, name, mode, ctx):
        parent = self._in(parent_inode)
        return self.entry(await self.front.mkdir(parent, name, mode, _ctx(ctx)), parent)

    async def symlink(self, parent_inode, name, target, ctx):
        parent = self._in(parent_inode)
        return self.entry(await self.front.symlink(parent, name, target, _ctx(ctx)),
                          parent)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        parent = self._in(new_parent_inode)
        di = await self.front.link(self._in(inode), parent, new_name)
        return self.entry(di, parent)

    async def unlink(self, parent_inode, name, ctx):
        await self.front.unlink(self._in(parent_inode), name)

    async def rmdir(self, parent_inode, name, ctx):
        await self.front.rmdir(self._in(parent_inode), name)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        await self.front.rename(self._in(parent_inode_old), name_old,
                                self._in(parent_inode_new), name_new, flags)

    async def open(self, inode, flags, ctx):
        fh = await self.front.open(self._in(inode), flags, _ctx(ctx))
        self._forget_dropped()
        return self._info(fh, flags)

    async def create(self, parent_inode, name, mode, flags, ctx):
        parent = self._in(parent_inode)
        fh, di = await self.front.create(parent, name, mode, flags, _ctx(ctx))
        return self._info(fh, flags), self.entry(di, parent)

    async def read(self, fh, off, size):
        return await self.front.read(fh, off, size)

    async def write(self, fh, off, buf, ctx=None):
        # the writer: the kernel leaves clearing the set-user-ID bits of a written
        # file to the file system (handle_killpriv_v2)
        n = await self.front.write(fh, off, buf, _ctx(ctx) if ctx is not None else None)
        if self.fs.privileges_dropped:
            self._forget_dropped()
        return n

    async def flush(self, fh, lock_owner=None):
        if self.locks is None:
            # a single node's kernel keeps the file locks, and a close has nothing
            # else to do here (writes are answered when they are done): ENOSYS tells
            # the kernel to stop sending FLUSH, one request less per close
            raise pyfuse3.FUSEError(errno.ENOSYS)
        if lock_owner is not None:
            h = self.fs.handles.get(fh)
            if h is not None:
                await self.locks.close_owner(h.ino, lock_owner)
        await self.front.flush(fh)

    async def fsync(self, fh, datasync):
        await self.front.fsync(fh, datasync)

    async def release(self, fh, flock_owner=None):
        try:
            if self.locks is not None:
                await self.locks.release(fh)
        finally:
            # the handle goes even when its locks could not be given back (a node
            # that lost the lock manager: they go with its session)
            await self.front.release(fh)

    # -- fcntl, OFD and flock locks (a cluster's; a single node's kernel keeps its own) --

    async def getlk(self, inode, fh, owner, ltype, start, length, pid, ctx):
        if self.locks is None:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        got = await self.locks.getlk(self._in(inode), owner, ltype, start,
                                     _lock_end(start, length))
        if got is None:
            return fcntl.F_UNLCK, start, length, pid
        t, s, e, p = got
        return t, s, 0 if e == OFFSET_MAX else e - s + 1, p

    async def setlk(self, inode, fh, owner, ltype, start, length, pid, sleep, ctx):
        if self.locks is None:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        await self.locks.setlk(self._in(inode), fh, owner, ltype, start,
                               _lock_end(start, length), pid, sleep)

    async def flock(self, inode, fh, owner, op, ctx):
        if self.locks is None:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        await self.locks.flock(self._in(inode), fh, owner, op)

    # -- space and holes -----------------------------------------------------------------

    async def fallocate(self, inode, fh, mode, offset, length):
        await self.front.fallocate(fh, mode, offset, length)

    async def lseek(self, inode, fh, offset, whence):
        return await self.front.lseek(fh, offset, whence)

    async def copy_file_range(self, inode_in, fh_in, off_in, inode_out, fh_out, off_out,
                              length, flags):
        # reflink clones: whole blocks shared, copy-on-write (``Filesystem``)
        return await self.front.copy_file_range(fh_in, off_in, fh_out, off_out, length,
                                                flags)

    async def opendir(self, inode, ctx):
        return await self.front.opendir(self._in(inode))

    async def readdir(self, fh, start_id, token):
        start = start_id
        while True:
            batch = await self.front.readdir(fh, start, READDIR_BATCH)
            if not batch:
                return
            for name, di, next_id in batch:
                if not pyfuse3.readdir_reply(token, name, self.attrs(di), next_id):
                    return
                if name not in (b".", b".."):
                    # the kernel took a reference (none for "." and "..")
                    self.fs.remember(di)
                start = next_id

    async def releasedir(self, fh):
        await self.front.releasedir(fh)

    async def fsyncdir(self, fh, datasync):
        await self.front.fsyncdir(fh, datasync)

    async def statfs(self, ctx):
        st = await self.front.statfs()
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = st["bsize"]
        s.f_blocks = st["blocks"]
        s.f_bfree = st["bfree"]
        s.f_bavail = st["bavail"]
        s.f_files = st["files"]
        s.f_ffree = st["ffree"]
        s.f_favail = st["ffree"]
        s.f_namemax = st["namemax"]
        return s

    async def getxattr(self, inode, name, ctx):
        return await self.front.getxattr(self._in(inode), name)

    async def setxattr(self, inode, name, value, ctx):
        await self.front.setxattr(self._in(inode), name, value)

    async def listxattr(self, inode, ctx):
        return await self.front.listxattr(self._in(inode))

    async def removexattr(self, inode, name, ctx):
        await self.front.removexattr(self._in(inode), name)

    async def access(self, inode, mode, ctx):
        return await self.front.access(self._in(inode), mode, _ctx(ctx))


for _name in ("lookup", "forget", "getattr", "setattr", "readlink", "mknod", "mkdir",
              "symlink", "link", "unlink", "rmdir", "rename", "open", "create", "read",
              "write", "flush", "fsync", "release", "opendir", "readdir", "releasedir",
              "fsyncdir", "statfs", "getxattr", "setxattr", "listxattr", "removexattr",
              "access", "getlk", "setlk", "flock", "fallocate", "lseek",
              "copy_file_range"):
    setattr(Operations, _name, _guard(getattr(Operations, _name)))
del _name
