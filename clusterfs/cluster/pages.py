"""The kernel's page cache of a cluster member's files, and dropping it on a demote.

A member lets the kernel cache file data (reads, write-through writes, shared
mappings) while it holds the file's inode lock in PR or better.  Before the lock
goes below PR, the kernel drops the file's pages (``drop``): clean pages go, pages
dirtied through a mapping are written back first (the kernel sends WRITE requests
for them), and mapped pages are unmapped, so that the next access faults and reads
again under the lock.

The ordering that keeps this from deadlocking: the kernel holds a page's lock from
before it sends a READ or WRITE for it until the reply, and its invalidation takes
every page's lock in turn.  So the invalidation runs on a worker thread while this
process keeps serving, and while it runs the glock lets in every local operation
that wants a mode the node holds (``GlockTable._drop_kernel``), even though a demote
is due; only after a pass during which no READ or WRITE of the file was served are
new ones kept waiting (the glock drains, converts, and they wait for the next
grant, holding page locks that no invalidation waits for).  A file open for writing
here is held EX or not at all (``Coherence.run`` asks EX for it; its demote goes to
NL), so a WRITE never waits for a conversion up while its pages are locked.

A file read or written without pause by a local program may never give a quiet
pass: from the second pass on, its new READs and WRITEs are held back at the door
(``enter``) until the pass ends, at most ``HOLD_S`` (the kernel may be waiting for
the pages of one of them, which is then served).
"""

from __future__ import annotations

import errno
import logging
import threading

import trio

log = logging.getLogger(__name__)

HOLD_S = 0.02          # longest a READ/WRITE is held back while its file's pages go
MAX_PASSES = 1000      # a drop that never finds a quiet pass gives up (logged)
BEHIND_KEEP = 32 << 20  # bytes of a sequential reader's pages kept behind it ...
BEHIND_STEP = 32 << 20  # ... and dropped this many at a time (``read_done``)
BEHIND_THREADS = 2     # worker threads drops behind readers may take at once


class KernelPages:
    """Which files the kernel may cache pages of on this node, the READs and WRITEs
    in flight for each, and dropping their pages.

    ``invalidate(ino)`` (set once mounted; blocking: run on a worker thread) drops
    the kernel's pages and attributes of ``ino``."""

    def __init__(self):
        self.invalidate = None
        self.cached: set[int] = set()          # files the kernel may hold pages of
        self.active: dict[int, int] = {}       # READs/WRITEs being served, per file
        self.last: dict[int, int] = {}         # serial of each file's latest one
        self.serial = 0
        self.held: dict[int, trio.Event] = {}  # files whose new READs/WRITEs wait
        self.limiter = trio.CapacityLimiter(8)
        # drop-behind (``read_done``, mount option ``dropbehind``): set once
        # mounted, ``drop_range(ino, offset, length)``, blocking like ``invalidate``;
        # the drops run in the serving nursery (``fuse.serve``), which waits for
        # them before the session closes
        self.drop_range = None
        self.behind_keep = BEHIND_KEEP            # (``-o dropbehind=SIZE``)
        # threads of their own: a drop behind a reader that waits for a page lock
        # must not hold up the drops a lock's demote needs (``limiter``)
        self.behind_limiter = trio.CapacityLimiter(BEHIND_THREADS)
        self.nursery: trio.Nursery | None = None
        self.streams: dict[int, list[int]] = {}   # handle -> [next offset, kept from]
        self.dropping: set[int] = set()           # files with a drop-behind running
        self.stats = {"reads": 0, "writes": 0, "drops": 0, "passes": 0, "held": 0,
                      "gave_up": 0, "dropped_behind": 0}

    def request(self, ino: int, write: bool = False) -> "_Request":
        """Around the serving of a READ (or WRITE) of ``ino`` (``async with``):
        ``enter`` before, ``leave`` after (no checkpoint between ``leave`` and the
        reply: the caller returns the answer straight to pyfuse3, which writes it)."""
        return _Request(self, ino, write)

    async def enter(self, ino: int, write: bool = False) -> None:
        """A READ (or WRITE) of ``ino`` begins (its pages are locked in the kernel)."""
        ev = self.held.get(ino)
        if ev is not None:
            self.stats["held"] += 1
            with trio.move_on_after(HOLD_S):
                await ev.wait()
        self._entered(ino, write)

    def enter_now(self, ino: int, write: bool = False) -> bool:
        """``enter`` when the file's new requests are not being held back (False,
        nothing recorded, when they are: then ``enter`` waits)."""
        if ino in self.held:
            return False
        self._entered(ino, write)
        return True

    def _entered(self, ino: int, write: bool) -> None:
        self.stats["writes" if write else "reads"] += 1
        self.serial += 1
        self.last[ino] = self.serial
        self.active[ino] = self.active.get(ino, 0) + 1
        self.cached.add(ino)

    def leave(self, ino: int) -> None:
        """The READ or WRITE of ``ino`` is answered (called before the reply is
        written, with no checkpoint in between: the reply is on its way)."""
        n = self.active.get(ino, 1) - 1
        if n:
            self.active[ino] = n
        else:
            self.active.pop(ino, None)

    async def drop(self, ino: int) -> None:
        """Have the kernel drop the pages of ``ino``: passes on a worker thread until
        one ran with no READ or WRITE of the file served during it."""
        if ino not in self.cached:
            return
        if self.invalidate is None:         # not mounted (any more): nothing cached
            self.cached.discard(ino)
            return
        self.stats["drops"] += 1
        passes = 0
        try:
            while True:
                serial = self.serial
                busy = self.active.get(ino, 0)
                if passes and ino not in self.held:
                    self.held[ino] = trio.Event()
                await trio.to_thread.run_sync(self._pass, ino, limiter=self.limiter)
                passes += 1
                self.stats["passes"] += 1
                if not busy and self.last.get(ino, 0) <= serial:
                    break
                if passes >= MAX_PASSES:
                    self.stats["gave_up"] += 1
                    log.warning("the kernel's pages of inode %d were dropped %d times "
                                "with requests in flight each time: given up",
                                ino, passes)
                    break
        finally:
            ev = self.held.pop(ino, None)
            if ev is not None:
                ev.set()
        self.cached.discard(ino)
        if not self.active.get(ino):
            self.last.pop(ino, None)

    def _pass(self, ino: int) -> None:
        fn = self.invalidate
        if fn is None:
            return
        try:
            fn(ino)
        except OSError as e:
            if e.errno != errno.ENOENT:     # ENOENT: the kernel does not know it
                log.warning("pages of inode %d not dropped: %s", ino, e)

    def read_done(self, fh: int, ino: int, off: int, n: int) -> None:
        """A READ of ``n`` bytes at ``off`` through handle ``fh`` was served.

        With ``-o dropbehind``, the kernel's pages of a file are dropped behind a
        reader that goes through it in order (a VM's restore, a copy), keeping the
        last ``behind_keep`` bytes (``BEHIND_KEEP`` unless the option gives a size),
        so that a file read once does not fill the
        node's memory (what libvirt's bypass-cache does for a VM's saved state).
        On an image file the data stays in the image's pages, which the mount
        reads from.  The drop runs on a worker thread (it waits for page locks)
        while requests are served, one at a time per file."""
        if self.drop_range is None or self.nursery is None:
            return
        s = self.streams.get(fh)
        if s is None or s[0] != off:
            self.streams[fh] = [off + n, off]       # (another stream, or a seek)
            return
        s[0] = off + n
        if s[0] - s[1] < self.behind_keep + BEHIND_STEP or ino in self.dropping:
            return
        upto = s[0] - self.behind_keep
        self.dropping.add(ino)
        self.nursery.start_soon(self._drop_behind, ino, s[1], upto - s[1])
        s[1] = upto

    def closed(self, fh: int) -> None:
        """Handle ``fh`` was released: forget its stream."""
        self.streams.pop(fh, None)

    async def _drop_behind(self, ino: int, off: int, length: int) -> None:
        try:
            fn = self.drop_range
            if fn is not None:
                await trio.to_thread.run_sync(fn, ino, off, length,
                                              limiter=self.behind_limiter)
                self.stats["dropped_behind"] += length
        except OSError as e:
            if e.errno != errno.ENOENT:
                log.warning("pages of inode %d behind its reader not dropped: %s", ino, e)
        except Exception:
            # (it runs in the serving nursery: a failure here must not end the mount)
            log.exception("pages of inode %d behind its reader not dropped", ino)
        finally:
            self.dropping.discard(ino)

    async def stop_dropping_behind(self, timeout: float) -> bool:
        """Start no more drops behind readers and wait (at most ``timeout`` seconds)
        for those under way; True when none is left.  Called before the serving
        stops: a drop waits in the kernel for the page locks of READs in flight,
        which only the serving answers."""
        self.drop_range = None
        with trio.move_on_after(timeout):
            while self.dropping:
                await trio.sleep(0.01)
        return not self.dropping

    def drop_all_soon(self) -> None:
        """Drop the pages of every file, on a thread of its own, without waiting (the
        node fenced itself: its reads fail from now on, and nothing it cached may be
        read from the kernel any more)."""
        fn, inos = self.invalidate, list(self.cached)
        self.cached.clear()
        if fn is None or not inos:
            return

        def run():
            for ino in inos:
                try:
                    fn(ino)
                except OSError as e:
                    log.debug("pages of inode %d not dropped: %s", ino, e)
        threading.Thread(target=run, name="drop-pages", daemon=True).start()


class _Request:
    """``KernelPages.request``'s context: a class, not an async generator, because
    it wraps every READ and WRITE (an async generator cost 13 % of a 64 KiB WRITE's
    handler time under trio's generator hooks)."""

    __slots__ = ("pages", "ino", "write")

    def __init__(self, pages: KernelPages, ino: int, write: bool):
        self.pages = pages
        self.ino = ino
        self.write = write

    async def __aenter__(self) -> None:
        await self.pages.enter(self.ino, self.write)

    async def __aexit__(self, *exc) -> bool:
        self.pages.leave(self.ino)
        return False
