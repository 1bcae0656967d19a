"""``cluster.pages.KernelPages``: drops behind readers (``-o dropbehind``) against the
drops a lock's demote needs, and their end before the serving stops.

The kernel is stood in for by functions that block the way its invalidations do: a
drop of pages waits for the page locks of READs in flight, which only the serving
answers.  The bookkeeping, the worker threads and their limits are the real ones.
"""

from __future__ import annotations

import os
import signal
import threading
from types import SimpleNamespace

import trio

from clusterfs.cluster import pages as pagesmod
from clusterfs.cluster.pages import BEHIND_KEEP, BEHIND_STEP, KernelPages

MiB = 1 << 20


class Kernel:
    """Invalidations that record what they dropped; those behind readers block
    until ``release`` (a page lock held by a READ nobody answers yet)."""

    def __init__(self):
        self.gate = threading.Event()
        self.behind: list[tuple[int, int, int]] = []
        self.whole: list[int] = []
        self.waiting = 0
        self.lock = threading.Lock()

    def drop_range(self, ino, off, length):
        with self.lock:
            self.waiting += 1
        self.gate.wait(30)
        with self.lock:
            self.waiting -= 1
            self.behind.append((ino, off, length))

    def invalidate(self, ino):
        self.whole.append(ino)

    def pages(self) -> KernelPages:
        """A ``KernelPages`` whose drops go to this stand-in (as a mount sets it)."""
        pages = KernelPages()
        pages.invalidate, pages.drop_range = self.invalidate, self.drop_range
        return pages


def _read_in_order(pages: KernelPages, fh: int, ino: int, upto: int) -> None:
    """READs of 1 MiB from the start of ``ino`` through ``fh`` to ``upto``."""
    for off in range(0, upto, MiB):
        pages._entered(ino, False)
        pages.leave(ino)
        pages.read_done(fh, ino, off, MiB)


async def _until(pred, what: str) -> None:
    with trio.move_on_after(10):
        while not pred():
            await trio.sleep(0.005)
        return
    raise AssertionError(f"never saw {what}")


def test_drops_behind_readers_leave_the_demotes_threads_free():
    """Many files read in order, each drop behind its reader stuck in the kernel:
    a demote's drop of another file's pages still runs at once, and the stuck
    drops take no more than their own threads."""
    kernel = Kernel()

    async def main():
        pages = kernel.pages()
        async with trio.open_nursery() as nursery:
            pages.nursery = nursery
            files = pages.limiter.total_tokens + 2
            for i in range(files):
                _read_in_order(pages, 100 + i, 1000 + i, BEHIND_KEEP + BEHIND_STEP)
            assert pages.dropping == {1000 + i for i in range(files)}
            await _until(lambda: kernel.waiting == pagesmod.BEHIND_THREADS,
                         "the drops behind the readers to block")
            # a lock's demote drops file 7's pages: not behind the stuck drops
            pages._entered(7, False)
            pages.leave(7)
            with trio.fail_after(5):
                await pages.drop(7)
            assert kernel.whole == [7] and 7 not in pages.cached
            assert kernel.waiting == pagesmod.BEHIND_THREADS
            kernel.gate.set()
        assert sorted(kernel.behind) == [(1000 + i, 0, BEHIND_STEP) for i in range(files)]
        assert not pages.dropping
        assert pages.stats["dropped_behind"] == files * BEHIND_STEP

    trio.run(main)


def test_an_unmount_waits_for_the_drops_behind_readers():
    """``stop_dropping_behind`` (a signal's unmount, before the serving stops):
    it returns once the drops under way are done, and reads after it start none."""
    kernel = Kernel()

    async def main():
        pages = kernel.pages()
        async with trio.open_nursery() as nursery:
            pages.nursery = nursery
            _read_in_order(pages, 1, 10, BEHIND_KEEP + BEHIND_STEP)
            await _until(lambda: kernel.waiting == 1, "the drop to block")
            # still stuck after the time allowed: says so
            assert not await pages.stop_dropping_behind(0.05)
            assert pages.dropping == {10}
            # the READs it waits for are answered while it waits
            threading.Timer(0.2, kernel.gate.set).start()
            assert await pages.stop_dropping_behind(5)
            assert kernel.behind == [(10, 0, BEHIND_STEP)] and not pages.dropping
            # no new drop behind a reader from now on
            _read_in_order(pages, 2, 11, 2 * (BEHIND_KEEP + BEHIND_STEP))
            await trio.sleep(0.05)
            assert not pages.dropping and kernel.behind == [(10, 0, BEHIND_STEP)]

    trio.run(main)


def test_a_signal_unmounts_only_after_the_drops_behind_readers(monkeypatch):
    """SIGTERM to a mount whose drop behind a reader waits in the kernel: the serving
    goes on (``pyfuse3.terminate`` not called yet) until the drop is done."""
    from clusterfs.fuse import serve

    kernel = Kernel()
    terminated = []
    monkeypatch.setattr(serve.pyfuse3, "terminate", lambda: terminated.append(True))

    async def main():
        pages = kernel.pages()
        node = SimpleNamespace(coh=SimpleNamespace(pages=pages), terminated=False)
        async with trio.open_nursery() as nursery:
            pages.nursery = nursery
            _read_in_order(pages, 1, 10, BEHIND_KEEP + BEHIND_STEP)
            await _until(lambda: kernel.waiting == 1, "the drop to block")
            nursery.start_soon(serve._signals, node)
            await trio.sleep(0.05)
            os.kill(os.getpid(), signal.SIGTERM)
            await _until(lambda: node.terminated, "the signal")
            await trio.sleep(0.3)
            assert not terminated           # the drop still waits: serving goes on
            kernel.gate.set()
            await _until(lambda: terminated, "the end of the serving")
            assert kernel.behind == [(10, 0, BEHIND_STEP)]

    trio.run(main)
