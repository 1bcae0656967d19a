"""A tiny pyfuse3 file system for the binding's tests: three in-memory files, ``a``
and ``b`` (direct I/O) and ``c`` (through the page cache), and every call of the
handlers clusterfs adds to pyfuse3 (locks, fallocate, lseek, copy_file_range, the
lock owners of flush and release) and of getxattr written as one JSON line to a log.
It takes FUSE_HANDLE_KILLPRIV_V2 unless told ``--no-killpriv``.

    python -m tests.fuse.binding_fs MOUNTPOINT LOG [--no-killpriv]

Scripted answers the test relies on: F_GETLK of a range starting at 10 names a write
lock of the file system's own pid on [10, 15); F_SETLK of a range starting at 200 is refused with
EAGAIN; F_SETLKW of a range starting at 100, and a blocking LOCK_EX flock, wait until
the caller is interrupted (then the log says ``interrupted``); SEEK_DATA answers
offset + 1000.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat as S
import sys

import pyfuse3
import trio

FILES = {b"a": 2, b"b": 3, b"c": 4}      # c: opened through the page cache


class RecordingFS(pyfuse3.Operations):
    pass_lock_owner = True
    enable_locks = True
    handle_killpriv_v2 = "--no-killpriv" not in sys.argv

    def __init__(self, log):
        super().__init__()
        self.log = log
        self.data = {ino: bytearray() for ino in FILES.values()}
        self.fh_ino: dict[int, int] = {}
        self.next_fh = 1

    def note(self, **kw):
        self.log.write(json.dumps(kw) + "\n")
        self.log.flush()

    def _attrs(self, ino):
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        if ino == pyfuse3.ROOT_INODE:
            e.st_mode = S.S_IFDIR | 0o755
            e.st_nlink = 2
        else:
            e.st_mode = S.S_IFREG | 0o666
            e.st_size = len(self.data[ino])
        e.attr_timeout = e.entry_timeout = 0
        return e

    async def getattr(self, inode, ctx=None):
        if inode != pyfuse3.ROOT_INODE and inode not in self.data:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE or name not in FILES:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(FILES[name])

    async def setattr(self, inode, attr, fields, fh, ctx):
        if fields.update_size:
            d = self.data[inode]
            del d[attr.st_size:]
            d.extend(bytes(attr.st_size - len(d)))
        return self._attrs(inode)

    async def open(self, inode, flags, ctx):
        fh = self.next_fh
        self.next_fh += 1
        self.fh_ino[fh] = inode
        return pyfuse3.FileInfo(fh=fh, direct_io=inode != FILES[b"c"])

    async def getxattr(self, inode, name, ctx):
        self.note(op="getxattr", ino=inode, name=name.decode())
        raise pyfuse3.FUSEError(errno.ENODATA)

    async def read(self, fh, off, size):
        return bytes(self.data[self.fh_ino[fh]][off:off + size])

    async def write(self, fh, off, buf):
        d = self.data[self.fh_ino[fh]]
        if len(d) < off:
            d.extend(bytes(off - len(d)))
        d[off:off + len(buf)] = buf
        return len(buf)

    async def flush(self, fh, lock_owner):
        self.note(op="flush", fh=fh, owner=lock_owner)

    async def release(self, fh, flock_owner):
        self.note(op="release", fh=fh, owner=flock_owner)
        del self.fh_ino[fh]

    async def getlk(self, inode, fh, owner, ltype, start, length, pid, ctx):
        self.note(op="getlk", ino=inode, fh=fh, owner=owner, type=ltype, start=start,
                  len=length, pid=pid)
        if start == 10:
            return fcntl.F_WRLCK, 10, 5, os.getpid()
        return fcntl.F_UNLCK, start, length, pid

    async def setlk(self, inode, fh, owner, ltype, start, length, pid, sleep, ctx):
        self.note(op="setlk", ino=inode, fh=fh, owner=owner, type=ltype, start=start,
                  len=length, pid=pid, sleep=sleep, ctx_pid=ctx.pid)
        if start == 200:
            raise pyfuse3.FUSEError(errno.EAGAIN)
        if start == 100 and sleep:
            await self._wait_for_interrupt("setlk")

    async def flock(self, inode, fh, owner, op, ctx):
        self.note(op="flock", ino=inode, fh=fh, owner=owner, flock_op=op)
        if op == fcntl.LOCK_EX:
            await self._wait_for_interrupt("flock")

    async def _wait_for_interrupt(self, what):
        try:
            await trio.sleep_forever()
        finally:
            self.note(op="interrupted", what=what)

    async def fallocate(self, inode, fh, mode, offset, length):
        self.note(op="fallocate", ino=inode, fh=fh, mode=mode, off=offset, len=length)
        d = self.data[inode]
        if not mode and offset + length > len(d):
            d.extend(bytes(offset + length - len(d)))

    async def lseek(self, inode, fh, offset, whence):
        self.note(op="lseek", ino=inode, fh=fh, off=offset, whence=whence)
        if whence == os.SEEK_DATA:
            return offset + 1000
        return len(self.data[inode])

    async def copy_file_range(self, inode_in, fh_in, off_in, inode_out, fh_out, off_out,
                              length, flags):
        self.note(op="copy", ino_in=inode_in, fh_in=fh_in, off_in=off_in,
                  ino_out=inode_out, fh_out=fh_out, off_out=off_out, len=length,
                  flags=flags)
        src = self.data[inode_in][off_in:off_in + length]
        d = self.data[inode_out]
        if len(d) < off_out:
            d.extend(bytes(off_out - len(d)))
        d[off_out:off_out + len(src)] = src
        return len(src)


def main() -> None:
    mountpoint, logpath = sys.argv[1:3]      # [--no-killpriv]
    with open(logpath, "w") as log:
        fs = RecordingFS(log)
        pyfuse3.init(fs, mountpoint, {"fsname=bindingtest", "default_permissions"})
        try:
            trio.run(pyfuse3.main)
        finally:
            pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
