#!/usr/bin/env python3
"""A plain pyfuse3 passthrough of a local directory: the Python FUSE floor.

``bench_io.py`` mounts it next to clusterfs to show what any pyfuse3 + trio file
system costs before it does any work of its own: every request is answered by the
matching system call on the source directory (``os.pread``/``os.pwrite`` on a file
descriptor per open file, ``os.lstat``, ``os.unlink`` ...).  It is meant as a fair
yardstick, so it uses the FUSE settings of a single-node clusterfs mount where they
change the numbers: ``default_permissions`` (the kernel checks permissions),
``allow_other`` when run as root, no writeback cache, ``keep_cache`` on open, the
same attribute and entry timeouts (300 s) and the same kernel readahead (1 MiB).

Inode numbers are the source's ``st_ino`` (the root is FUSE's root inode); each
known inode remembers one path and a lookup count, dropped at ``forget``.  Files
renamed or removed behind the mount's back confuse it (it is a benchmark tool).

Usage: ``passthrough.py SOURCE MOUNTPOINT`` (stays in the foreground until it is
unmounted with ``fusermount3 -u``, or gets SIGINT/SIGTERM).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import stat as S

import pyfuse3
import trio

log = logging.getLogger("passthrough")

TIMEOUT = 300.0          # as clusterfs.fuse.ops.Operations (single node)


def _err(e: OSError) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(e.errno or errno.EIO)


class Passthrough(pyfuse3.Operations):
    """pyfuse3 operations mirroring the directory ``source``."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, source: str, mountpoint: str = "", readahead_kb: int = 0):
        super().__init__()
        self.mountpoint = os.path.realpath(mountpoint) if mountpoint else ""
        self.readahead_kb = readahead_kb
        self.source = os.path.abspath(source)
        self.root_ino = os.lstat(self.source).st_ino
        self.paths: dict[int, str] = {pyfuse3.ROOT_INODE: self.source}
        self.lookups: dict[int, int] = {}
        self.fds: dict[int, int] = {}           # fh -> fd (fh is the fd)

    def init(self):
        """FUSE INIT is being answered; right after the reply, set the kernel's
        readahead for this mount as a single-node clusterfs mount does."""
        if self.readahead_kb and self.mountpoint:
            trio.lowlevel.current_trio_token().run_sync_soon(self._set_readahead)

    def _set_readahead(self) -> None:
        dev = None
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and fields[4] == self.mountpoint:
                    dev = fields[2]
        if dev is None:
            return
        try:
            with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
                f.write(f"{self.readahead_kb}\n")
        except OSError as e:
            log.warning("readahead not set: %s", e)

    # -- inodes and paths -------------------------------------------------------------

    def _out(self, ino: int) -> int:
        return pyfuse3.ROOT_INODE if ino == self.root_ino else ino

    def _path(self, ino: int) -> str:
        try:
            return self.paths[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def _child(self, parent: int, name: bytes) -> str:
        return os.path.join(self._path(parent), os.fsdecode(name))

    def _attrs(self, st: os.stat_result) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = self._out(st.st_ino)
        e.generation = 0
        e.st_mode = st.st_mode
        e.st_nlink = st.st_nlink
        e.st_uid = st.st_uid
        e.st_gid = st.st_gid
        e.st_rdev = st.st_rdev
        e.st_size = st.st_size
        e.st_blksize = st.st_blksize
        e.st_blocks = st.st_blocks
        e.st_atime_ns = st.st_atime_ns
        e.st_mtime_ns = st.st_mtime_ns
        e.st_ctime_ns = st.st_ctime_ns
        e.attr_timeout = TIMEOUT
        e.entry_timeout = TIMEOUT
        return e

    def _remember(self, st: os.stat_result, path: str) -> pyfuse3.EntryAttributes:
        """Attributes for a reply that gives the kernel a reference (lookup count)."""
        ino = self._out(st.st_ino)
        self.paths[ino] = path
        self.lookups[ino] = self.lookups.get(ino, 0) + 1
        return self._attrs(st)

    def _stat(self, path: str) -> os.stat_result:
        try:
            return os.lstat(path)
        except OSError as e:
            raise _err(e) from None

    # -- handlers -----------------------------------------------------------------------

    async def lookup(self, parent_inode, name, ctx=None):
        path = self._child(parent_inode, name)
        st = self._stat(path)
        if name in (b".", b".."):
            return self._attrs(st)
        return self._remember(st, path)

    async def forget(self, inode_list):
        for ino, n in inode_list:
            left = self.lookups.get(ino, 0) - n
            if left > 0:
                self.lookups[ino] = left
            else:
                self.lookups.pop(ino, None)
                if ino != pyfuse3.ROOT_INODE:
                    self.paths.pop(ino, None)

    async def getattr(self, inode, ctx=None):
        return self._attrs(self._stat(self._path(inode)))

    async def setattr(self, inode, attr, fields, fh, ctx):
        path = self._path(inode)
        try:
            if fields.update_size:
                if fh is not None and fh in self.fds:
                    os.ftruncate(self.fds[fh], attr.st_size)
                else:
                    os.truncate(path, attr.st_size)
            if fields.update_mode:
                os.chmod(path, S.S_IMODE(attr.st_mode))
            if fields.update_uid or fields.update_gid:
                os.chown(path, attr.st_uid if fields.update_uid else -1,
                         attr.st_gid if fields.update_gid else -1, follow_symlinks=False)
            if fields.update_atime or fields.update_mtime:
                old = os.lstat(path)
                os.utime(path, ns=(attr.st_atime_ns if fields.update_atime else old.st_atime_ns,
                                   attr.st_mtime_ns if fields.update_mtime else old.st_mtime_ns),
                         follow_symlinks=False)
        except OSError as e:
            raise _err(e) from None
        return self._attrs(self._stat(path))

    async def readlink(self, inode, ctx):
        try:
            return os.fsencode(os.readlink(self._path(inode)))
        except OSError as e:
            raise _err(e) from None

    def _made(self, path: str, ctx) -> pyfuse3.EntryAttributes:
        try:
            os.chown(path, ctx.uid, ctx.gid, follow_symlinks=False)
        except OSError as e:
            raise _err(e) from None
        return self._remember(self._stat(path), path)

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        path = self._child(parent_inode, name)
        try:
            os.mknod(path, mode & ~ctx.umask, rdev)
        except OSError as e:
            raise _err(e) from None
        return self._made(path, ctx)

    async def mkdir(self, parent_inode, name, mode, ctx):
        path = self._child(parent_inode, name)
        try:
            os.mkdir(path, mode & ~ctx.umask)
        except OSError as e:
            raise _err(e) from None
        return self._made(path, ctx)

    async def symlink(self, parent_inode, name, target, ctx):
        path = self._child(parent_inode, name)
        try:
            os.symlink(os.fsdecode(target), path)
        except OSError as e:
            raise _err(e) from None
        return self._made(path, ctx)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        path = self._child(new_parent_inode, new_name)
        try:
            os.link(self._path(inode), path, follow_symlinks=False)
        except OSError as e:
            raise _err(e) from None
        return self._remember(self._stat(path), path)

    async def unlink(self, parent_inode, name, ctx):
        try:
            os.unlink(self._child(parent_inode, name))
        except OSError as e:
            raise _err(e) from None

    async def rmdir(self, parent_inode, name, ctx):
        try:
            os.rmdir(self._child(parent_inode, name))
        except OSError as e:
            raise _err(e) from None

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        old = self._child(parent_inode_old, name_old)
        new = self._child(parent_inode_new, name_new)
        try:
            os.rename(old, new)
            ino = self._out(os.lstat(new).st_ino)
        except OSError as e:
            raise _err(e) from None
        if ino in self.paths:
            self.paths[ino] = new

    async def open(self, inode, flags, ctx):
        try:
            fd = os.open(self._path(inode), flags & ~os.O_CREAT)
        except OSError as e:
            raise _err(e) from None
        self.fds[fd] = fd
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    async def create(self, parent_inode, name, mode, flags, ctx):
        path = self._child(parent_inode, name)
        try:
            fd = os.open(path, flags | os.O_CREAT, mode & ~ctx.umask)
            os.fchown(fd, ctx.uid, ctx.gid)
            st = os.fstat(fd)
        except OSError as e:
            raise _err(e) from None
        self.fds[fd] = fd
        return pyfuse3.FileInfo(fh=fd, keep_cache=True), self._remember(st, path)

    async def read(self, fh, off, size):
        try:
            return os.pread(fh, size, off)
        except OSError as e:
            raise _err(e) from None

    async def write(self, fh, off, buf):
        try:
            return os.pwrite(fh, buf, off)
        except OSError as e:
            raise _err(e) from None

    async def flush(self, fh):
        pass

    async def fsync(self, fh, datasync):
        try:
            (os.fdatasync if datasync else os.fsync)(fh)
        except OSError as e:
            raise _err(e) from None

    async def release(self, fh):
        self.fds.pop(fh, None)
        try:
            os.close(fh)
        except OSError as e:
            raise _err(e) from None

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        # offsets: index + 1 into the (name-sorted) listing
        path = self._path(fh)
        try:
            names = sorted(os.listdir(path))
        except OSError as e:
            raise _err(e) from None
        for i in range(start_id, len(names)):
            child = os.path.join(path, names[i])
            try:
                st = os.lstat(child)
            except OSError:
                continue
            if not pyfuse3.readdir_reply(token, os.fsencode(names[i]), self._attrs(st),
                                         i + 1):
                return
            self._remember(st, child)

    async def releasedir(self, fh):
        pass

    async def fsyncdir(self, fh, datasync):
        try:
            fd = os.open(self._path(fh), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise _err(e) from None

    async def statfs(self, ctx):
        try:
            v = os.statvfs(self.source)
        except OSError as e:
            raise _err(e) from None
        s = pyfuse3.StatvfsData()
        s.f_bsize, s.f_frsize = v.f_bsize, v.f_frsize
        s.f_blocks, s.f_bfree, s.f_bavail = v.f_blocks, v.f_bfree, v.f_bavail
        s.f_files, s.f_ffree, s.f_favail = v.f_files, v.f_ffree, v.f_favail
        s.f_namemax = v.f_namemax
        return s

    async def getxattr(self, inode, name, ctx):
        try:
            return os.getxattr(self._path(inode), name, follow_symlinks=False)
        except OSError as e:
            raise _err(e) from None

    async def setxattr(self, inode, name, value, ctx):
        try:
            os.setxattr(self._path(inode), name, value, follow_symlinks=False)
        except OSError as e:
            raise _err(e) from None

    async def listxattr(self, inode, ctx):
        try:
            return [os.fsencode(n) for n in
                    os.listxattr(self._path(inode), follow_symlinks=False)]
        except OSError as e:
            raise _err(e) from None

    async def removexattr(self, inode, name, ctx):
        try:
            os.removexattr(self._path(inode), name, follow_symlinks=False)
        except OSError as e:
            raise _err(e) from None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", help="directory to mirror")
    ap.add_argument("mountpoint", help="where to mount it")
    ap.add_argument("--readahead-kb", type=int, default=1024,
                    help="kernel readahead for the mount (default 1024, as clusterfs; "
                         "0 leaves the kernel's default)")
    ap.add_argument("--debug", action="store_true", help="log every FUSE request")
    args = ap.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ops = Passthrough(args.source, args.mountpoint, args.readahead_kb)
    opts = set(pyfuse3.default_options)          # default_permissions
    opts.add(f"fsname={ops.source}")
    opts.add("subtype=passthrough")
    if os.getuid() == 0:
        opts.add("allow_other")
    if args.debug:
        opts.add("debug")
    pyfuse3.init(ops, args.mountpoint, opts)

    state = {"terminated": False}

    async def serve():
        async with trio.open_nursery() as nursery:
            async def signals():
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
                    async for _sig in sigs:
                        state["terminated"] = True
                        pyfuse3.terminate()
                        return
            nursery.start_soon(signals)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    clean = False
    try:
        trio.run(serve)
        clean = True
    finally:
        pyfuse3.close(unmount=state["terminated"] or not clean)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
