"""Dinodes read and decoded by more than one process.

Reading and decoding every dinode of the volume is the largest part of a check (more
than half of it on 100,000 files), and it needs nothing but the device.  Where the
machine has more than one CPU, forked children take the upper part of the block list:
each reads and decodes its share (``Dinode.decode_values``, the one parser, short of
building the object) and hands the values back (``marshal``), a chunk at a time:
the chunk's bytes in a memfd, its place in the memfd on a pipe.  Meanwhile this
process reads and decodes its own (smaller) share, then takes the children's chunks
as they come and rebuilds their dinodes (``Dinode.from_tuple``, a fraction of a
decode).  The results come in block order, as from one process.

What a child could not decode (damaged or unreadable blocks) comes back as its block
number alone, and is read again here for the caller's slower path.  A child that fails
(killed, garbled output) costs time only: what it did not hand back is read here.  No
child is forked while other threads run (the heartbeat of a repairing fsck): a fork
copies only the calling thread, and locks the others hold would stay held in the child.
"""

from __future__ import annotations

import marshal
import os
import signal
import struct
import threading

from clusterfs.errors import CorruptBlock

from .device import read_blocks

MIN_SHARE = 8192        # fewer dinodes than this per process: not worth a fork
MAX_WORKERS = 4
# This process's share.  Per dinode it spends about 7 us reading and decoding its own
# and 3 us unpacking and building a child's, plus some 2 to 4 us on what the caller does
# with each (the scan's records and claims); a child about 8 us (read, decode, pack).
# Side by side both run slower than alone: with one child, a fifth here ends both at
# about the same time (measured on 100,000 dinodes, 2 CPUs).
OWN_SHARE = 0.2
CHUNK = 2048            # dinodes per chunk a child hands back
DECODE_ERRORS = (CorruptBlock, TypeError)    # TypeError: an unreadable block (None)
_MSG = struct.Struct("<QQI")                 # offset, length, count of one chunk


def workers() -> int:
    """Processes to use: the CPUs this process may run on (at most MAX_WORKERS)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(n, MAX_WORKERS))


def plan(n: int, nworkers: int) -> list[int]:
    """Split points of ``n`` dinodes, [0, own end, first child's end, ..., n].  One
    share (no child) when the children's would be smaller than MIN_SHARE."""
    k = min(nworkers, 1 + int(n * (1 - OWN_SHARE)) // MIN_SHARE)
    if k < 2 or not hasattr(os, "fork") or not hasattr(os, "memfd_create"):
        return [0, n]
    own = int(n * OWN_SHARE)
    rest = n - own
    return [0, own] + [own + rest * c // (k - 1) for c in range(1, k)]


def _child(dev, bnos, decode_values, fd: int, pipe: int) -> None:
    """Read and decode ``bnos``, handing back a chunk at a time; never returns."""
    code = 1
    try:
        off = 0
        for start in range(0, len(bnos), CHUNK):
            out = []
            add = out.append
            for bno, buf in read_blocks(dev, bnos[start:start + CHUNK]):
                try:
                    add(decode_values(buf, bno))
                except DECODE_ERRORS:
                    add(bno)        # damaged or unreadable: the parent looks again
            data = marshal.dumps(out)
            mv = memoryview(data)
            while mv:
                mv = mv[os.pwrite(fd, mv, off + len(data) - len(mv)):]
            os.write(pipe, _MSG.pack(off, len(data), len(out)))
            off += len(data)
        code = 0
    finally:
        os._exit(code)


def _chunks(pid: int, fd: int, pipe: int):
    """The lists a child hands back, as they come; ends at the child's exit."""
    pending = b""
    while True:
        try:
            got = os.read(pipe, 4096)
        except InterruptedError:
            continue
        if not got:
            return
        pending += got
        while len(pending) >= _MSG.size:
            off, length, count = _MSG.unpack_from(pending)
            pending = pending[_MSG.size:]
            try:
                items = marshal.loads(os.pread(fd, length, off))
            except (EOFError, ValueError, TypeError, OSError):
                return
            if not isinstance(items, list) or len(items) != count:
                return
            yield items


def decoded_dinodes(dev, bnos: list[int], cls):
    """Yield (bno, dinode or None, the block's bytes or None) for sorted ``bnos``.

    ``cls`` is the dinode class (``decode``, ``decode_values``, ``from_tuple``).  Where the
    block did not decode the dinode is None and the bytes (None if unreadable) are
    given for the caller's salvage; else the bytes are not given.
    """
    cuts = plan(len(bnos), workers() if threading.active_count() == 1 else 1)
    decode = cls.decode

    def here(share):
        for bno, buf in read_blocks(dev, share):
            try:
                di = decode(buf, bno)
            except DECODE_ERRORS:
                di = None
            yield bno, di, (buf if di is None else None)

    children = []               # (pid, memfd, pipe, share), in block order
    try:
        for c in range(1, len(cuts) - 1):
            share = bnos[cuts[c]:cuts[c + 1]]
            fd = os.memfd_create("fsck-dinodes", os.MFD_CLOEXEC)
            r, w = os.pipe2(os.O_CLOEXEC)
            pid = os.fork()
            if pid == 0:
                os.close(r)
                _child(dev, share, cls.decode_values, fd, w)
            os.close(w)
            children.append((pid, fd, r, share))
        yield from here(bnos[:cuts[1]])
        from_tuple = cls.from_tuple
        while children:
            pid, fd, r, share = children[0]
            done = 0
            for items in _chunks(pid, fd, r):
                for t in items:
                    if type(t) is int:
                        yield t, None, next(read_blocks(dev, [t]))[1]
                    else:
                        yield t[0], from_tuple(t), None
                done += len(items)
            children.pop(0)
            _end(pid, fd, r, kill=done < len(share))
            if done < len(share):   # the child failed: the rest of its share is read here
                yield from here(share[done:])
    finally:
        for pid, fd, r, _share in children:     # left early: end what was started
            _end(pid, fd, r, kill=True)


def _end(pid: int, fd: int, pipe: int, kill: bool) -> None:
    if kill:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
    os.close(fd)
    os.close(pipe)
