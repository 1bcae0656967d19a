"""The serve loop of a mounted node: FUSE, the node's periodic duties, periodic
commits and the signals that unmount it.

One loop for both kinds of mount.  A node (``fs.single_node.SingleNodeMount`` or
``cluster.member.ClusterMount``) offers: ``vol``, ``interval`` (seconds between its
duties), ``readonly``, ``fenced``, ``can_fence`` and ``fence(why)`` (a single node
cannot be fenced), and ``async tick()`` (its periodic duties: the disk heartbeat,
and for a cluster member the watch of the other slots and its caches).
``terminated`` is set when a signal asked for the unmount.
"""

from __future__ import annotations

import logging
import signal

import pyfuse3
import trio

from journal.errors import JournalAborted

from .. import control
from ..errors import Fenced

log = logging.getLogger(__name__)

COMMIT_INTERVAL = 5.0      # seconds between commits of a journal that has changes
DROP_WAIT = 10.0           # longest a signal's unmount waits for drops behind readers


async def serve(node) -> None:
    """Serve FUSE requests until the file system is unmounted (or a signal asks)."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_signals, node)
        if not node.readonly:
            nursery.start_soon(_duties, node)
            nursery.start_soon(_committer, node)
        pages = getattr(getattr(node, "coh", None), "pages", None)
        if pages is not None:
            # (drops of pages behind a reader: waited for before the session closes)
            pages.nursery = nursery
        if getattr(node, "admin", None) is not None:
            # freeze, thaw and the other volume-wide commands reach the node here
            if getattr(node.admin, "nursery", False) is None:
                node.admin.nursery = nursery
            await nursery.start(control.serve, node)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _signals(node) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGUSR1) as sigs:
        async for sig in sigs:
            if sig == signal.SIGUSR1:
                # a diagnostic dump of what the node waits for (as GFS2's glock dump)
                dump = getattr(node, "debug_dump", None)
                log.warning("state dump (SIGUSR1):\n%s",
                            dump() if dump is not None else "(none for this mount)")
                continue
            log.info("signal %d: unmounting", sig)
            node.terminated = True
            pages = getattr(getattr(node, "coh", None), "pages", None)
            if pages is not None and not await pages.stop_dropping_behind(DROP_WAIT):
                log.warning("drops of pages behind readers still under way after "
                            "%.0fs: unmounting anyway", DROP_WAIT)
            pyfuse3.terminate()
            return


async def _duties(node) -> None:
    """``node.tick()`` every ``node.interval`` seconds (a tick that starts late says
    so: the event loop was held up, and lease renewals waited meanwhile)."""
    while True:
        woke = trio.current_time() + node.interval
        await trio.sleep(node.interval)
        late = trio.current_time() - woke
        if late > node.interval:
            log.warning("the event loop was held up for %.1fs (slow device flush or "
                        "CPU starvation); lease renewals wait meanwhile", late)
        await node.tick()


async def _committer(node) -> None:
    """Commit the running transaction every ``COMMIT_INTERVAL`` seconds when it holds
    changes; the device writes and flushes run on a worker thread, so requests are
    served meanwhile (they fill the next transaction)."""
    vol = node.vol
    while True:
        await trio.sleep(COMMIT_INTERVAL)
        if node.fenced:
            continue
        try:
            if vol.journal is not None and vol.op is None and vol.journal.running_blocks():
                await vol.commit_in_thread(trio.to_thread.run_sync)
        except Fenced:
            node.fence("a volume write was refused")
        except (OSError, JournalAborted) as e:
            # the journal aborts itself on a device error (later writes fail with
            # EIO); the mount stays up so it can be unmounted.  A cluster member
            # fences itself: it leaves, and a survivor recovers its journal
            log.error("periodic journal commit failed: %s", e)
            if node.can_fence:
                node.fence(f"the journal stopped: {e}")
        except Exception:
            log.exception("periodic journal commit failed")
