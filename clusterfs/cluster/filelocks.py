"""Cluster-wide fcntl, OFD and flock locks of a member's files.

The kernel sends a FUSE mount's lock requests to the file system when it offers the
handlers (binding/); a cluster member answers them through the lock manager's plock
table (lockmgr/plockserver.py), so that a lock taken on one node is seen by every node
(QEMU's image locks, SQLite, virtlockd and CTDB depend on it).  A single-node mount
has no ``FileLocks``: it does not ask the kernel for lock requests, and the kernel
keeps the locks itself, which is exact on one node.

Owners come from the kernel: for fcntl locks a process (its file table), for OFD and
flock locks an open file.  Locks end as they do on a local file system:

- ``close_owner`` at every close (FUSE FLUSH carries the closing process's owner): a
  process's fcntl locks on the file go, whichever descriptor took them;
- ``release`` when the last descriptor of an open file goes: the OFD and flock locks
  taken through it go (every owner that locked through it; the process owners among
  them hold nothing by then, their close came first);
- a process that dies closes its files, so both happen; a node that dies keeps its
  locks until its slot is recovered (the lock manager releases them then).

A waiting lock is cancelled when the waiting process is interrupted (FUSE_INTERRUPT
cancels the handler; the request is withdrawn at the server).  Lock state lives in
the lock manager and in the member's lock client (which reclaims it from a new
master), nothing on the volume.
"""

from __future__ import annotations

import errno
import fcntl

from lockmgr import LeaseLost, LockError
from lockmgr.plocks import OFFSET_MAX, PlockError

from ..errors import FSError

F_RDLCK, F_WRLCK, F_UNLCK = fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK


def posix_name(ino: int) -> bytes:
    """The plock resource of an inode's fcntl and OFD locks."""
    return b"P" + ino.to_bytes(8, "big")


def flock_name(ino: int) -> bytes:
    """The plock resource of an inode's flock locks (independent of fcntl locks, as on
    Linux)."""
    return b"F" + ino.to_bytes(8, "big")


class FileLocks:
    """The lock handlers of a cluster member.

    Args:
        coh: the member's ``Coherence`` (its lock client, and its fencing: a fenced
            node answers EIO, and a wait ends when it fences).
    """

    def __init__(self, coh):
        self.coh = coh
        #: fh -> {(name, owner)} the owners that took locks through that open file
        self._through: dict[int, set] = {}

    @property
    def client(self):
        return self.coh.client

    async def getlk(self, ino: int, owner: int, ltype: int, start: int,
                    end: int) -> tuple | None:
        """A lock of another owner (any node) conflicting with the one described:
        ``(ltype, start, end, pid)``, or None."""
        return await self._call(self.client.pgetlk, posix_name(ino), owner, ltype,
                                start, end)

    async def setlk(self, ino: int, fh: int, owner: int, ltype: int, start: int,
                    end: int, pid: int, sleep: bool) -> None:
        name = posix_name(ino)
        if ltype == F_UNLCK:
            await self._call(self.client.punlock, name, owner, start, end)
            return
        if ltype not in (F_RDLCK, F_WRLCK):
            raise FSError(errno.EINVAL, "bad lock type")
        self._through.setdefault(fh, set()).add((name, owner))
        await self._call(self.client.plock, name, owner, ltype, start, end, pid,
                         wait=sleep)

    async def flock(self, ino: int, fh: int, owner: int, op: int) -> None:
        name = flock_name(ino)
        kind = op & (fcntl.LOCK_SH | fcntl.LOCK_EX | fcntl.LOCK_UN)
        if kind == fcntl.LOCK_UN:
            await self._call(self.client.punlock, name, owner, 0, OFFSET_MAX)
            return
        ltype = {fcntl.LOCK_SH: F_RDLCK, fcntl.LOCK_EX: F_WRLCK}.get(kind)
        if ltype is None:
            raise FSError(errno.EINVAL, "bad flock operation")
        # a conversion is an unlock then a new lock, as on Linux (two holders of a
        # shared lock that both ask for it exclusive must not wait for each other)
        if any(lk.owner == owner and lk.ltype != ltype
               for _, lk in self.client.plocks_held(name)):
            await self._call(self.client.punlock, name, owner, 0, OFFSET_MAX)
        self._through.setdefault(fh, set()).add((name, owner))
        await self._call(self.client.plock, name, owner, ltype, 0, OFFSET_MAX, 0,
                         wait=not op & fcntl.LOCK_NB, flock=True)

    async def close_owner(self, ino: int, owner: int) -> None:
        """A descriptor of ``ino`` was closed by the process ``owner``: its fcntl locks
        on the file go (POSIX), for every node before close() returns."""
        name = posix_name(ino)
        # the process holds no fcntl lock on the file any more: the open files it
        # locked through must not release anything of it at their last close (one
        # may be shared with a child, and the process may lock again through another)
        for through in self._through.values():
            through.discard((name, owner))
        # every close asks: answer at once when this node holds no lock of the owner
        if not self.coh.fenced and any(lk.owner == owner
                                       for _, lk in self.client.plocks_held(name)):
            await self._call(self.client.punlock, name, owner, 0, OFFSET_MAX)

    async def release(self, fh: int) -> None:
        """The open file ``fh`` is gone: the OFD and flock locks taken through it go.
        (The kernel sends this after close() returned: another node may see such a
        lock for a moment after the close.)"""
        through = self._through.pop(fh, ())
        if self.coh.fenced:
            return
        for name, owner in through:
            await self._call(self.client.punlock, name, owner, 0, OFFSET_MAX)

    async def _call(self, fn, *args, **kw):
        try:
            return await self.coh.until_fenced(fn, *args, **kw)
        except PlockError as e:
            raise FSError(e.errno, "lock conflict" if e.errno == errno.EAGAIN
                          else "deadlock") from None
        except (LeaseLost, LockError) as e:
            raise FSError(errno.EIO, f"lock manager: {e}") from None
