#!/usr/bin/env python3
"""One host's path to the shared volume, which the test can break: a pyfuse3 file
system with a single file, ``vol.img``, whose every read, write and flush goes to the
real volume image, until SIGUSR1; from then on each of them fails with EIO (the
host lost its path to the SAN) until SIGUSR2 mends it.  A node mounted on
``MOUNTPOINT/vol.img`` loses the disk alone, as the kernel would show it to it,
while the other nodes keep theirs.  When the file ``MOUNTPOINT.bad`` exists at the
SIGUSR1, it lists byte ranges (``START LENGTH`` a line): then only the writes that
touch them fail (bad sectors), and the rest of the disk works.  Each signal, once
handled, is acknowledged in ``MOUNTPOINT.state`` ("broken" or "mended").

Opens are direct I/O (no page cache in between: the other nodes write the image
behind this one's back).

Usage: ``faultydisk.py IMAGE MOUNTPOINT`` (in the foreground until unmounted or
SIGTERM).
"""

from __future__ import annotations

import errno
import os
import signal
import stat as S
import sys

import pyfuse3
import trio

NAME = b"vol.img"
FILE_INO = pyfuse3.ROOT_INODE + 1


class FaultyDisk(pyfuse3.Operations):
    def __init__(self, image: str):
        super().__init__()
        self.image = os.path.abspath(image)
        self.broken = False
        self.bad: list[tuple[int, int]] | None = None     # only these byte ranges
        self.fds: dict[int, int] = {}

    def _check(self, off: int = 0, size: int = 0, write: bool = False) -> None:
        if not self.broken:
            return
        if self.bad is None or (write and any(off < s + n and s < off + size
                                              for s, n in self.bad)):
            raise pyfuse3.FUSEError(errno.EIO)

    async def getattr(self, inode, ctx=None):
        a = pyfuse3.EntryAttributes()
        if inode == pyfuse3.ROOT_INODE:
            st = os.lstat(os.path.dirname(self.image))
            a.st_mode = S.S_IFDIR | 0o755
            a.st_nlink = 2
        elif inode == FILE_INO:
            st = os.lstat(self.image)
            a.st_mode = st.st_mode
            a.st_nlink = 1
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        a.st_ino = inode
        a.st_size = st.st_size
        a.st_blksize = 4096
        a.st_blocks = st.st_blocks
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, \
            st.st_ctime_ns
        a.st_uid, a.st_gid = st.st_uid, st.st_gid
        a.attr_timeout = a.entry_timeout = 0
        return a

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE or name != NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return await self.getattr(FILE_INO)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, NAME, await self.getattr(FILE_INO), 1)

    async def open(self, inode, flags, ctx):
        if inode != FILE_INO:
            raise pyfuse3.FUSEError(errno.EISDIR)
        fd = os.open(self.image, flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC |
                                           os.O_DIRECT) | os.O_CLOEXEC)
        self.fds[fd] = fd
        return pyfuse3.FileInfo(fh=fd, direct_io=True)

    async def read(self, fh, off, size):
        self._check(off, size)
        return os.pread(fh, size, off)

    async def write(self, fh, off, buf):
        self._check(off, len(buf), write=True)
        return os.pwrite(fh, buf, off)

    async def fsync(self, fh, datasync):
        self._check()
        os.fdatasync(fh)

    async def flush(self, fh):
        pass

    async def release(self, fh):
        os.close(self.fds.pop(fh))


def main() -> None:
    image, mountpoint = sys.argv[1:3]
    fs = FaultyDisk(image)
    opts = set(pyfuse3.default_options)
    opts.discard("default_permissions")
    opts |= {"fsname=faultydisk", "allow_other"}
    pyfuse3.init(fs, mountpoint, opts)

    base = mountpoint.rstrip("/")

    def state(what: str) -> None:
        # the test waits for this before it goes on (signals arrive asynchronously)
        with open(base + ".state", "w") as f:
            f.write(what)

    def broken(*_):
        try:
            with open(base + ".bad") as f:
                fs.bad = [tuple(int(x) for x in line.split()) for line in f if line.strip()]
        except FileNotFoundError:
            fs.bad = None
        fs.broken = True
        state("broken")

    def mended(*_):
        fs.broken = False
        state("mended")

    signal.signal(signal.SIGUSR1, broken)
    signal.signal(signal.SIGUSR2, mended)

    async def serve():
        async with trio.open_nursery() as n:
            n.start_soon(pyfuse3.main)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                async for _ in sigs:
                    pyfuse3.terminate()
                    break
    try:
        trio.run(serve)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
