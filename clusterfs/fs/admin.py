"""Volume-wide administration of a mounted node, for ``clusterfs.control``: a freeze
with a time-out and its thaw, and the changes made while frozen (grow, added slots).

``MountAdmin`` is what every kind of mount shares: the time-out, the bookkeeping,
the grow and add-slots steps.  How a freeze is taken and given back is the kind's:
``SingleNodeAdmin`` here (the frontend's gate), ``cluster.admin.VolumeAdmin`` for a
cluster member (the freeze lock).
"""

from __future__ import annotations

import errno
import logging
import os
from abc import ABC, abstractmethod

import trio

from ..control import FREEZE_TIMEOUT, FREEZE_WAIT
from ..errors import FSError
from ..ondisk.format import Superblock

log = logging.getLogger(__name__)

CRASH_ENV = "CLUSTERFS_TEST_CRASH_AT"


def crash_point(what: str):
    """For the tests of a node that dies in the middle of ``what`` ("grow"): when the
    environment says ``CLUSTERFS_TEST_CRASH_AT=what:STEP``, the process ends at once
    (as a power cut would end it) once STEP is durable; otherwise None."""
    spec = os.environ.get(CRASH_ENV, "")
    kind, _, step = spec.partition(":")
    if kind != what or not step:
        return None

    def crash(name: str) -> None:
        if name == step:
            log.error("test crash point %s:%s reached: the process ends now", what, name)
            os._exit(137)
    return crash


class MountAdmin(ABC):
    """Freeze, thaw, grow and add-slots of a mounted ``node`` (its ``vol``, ``node``
    name and ``slot``).  A subclass says how the freeze is taken (``_freeze``) and
    given back (``_unfreeze``), how a new superblock is taken (``_adopt``) and whose
    journals are empty while frozen (``_live_slots``)."""

    def __init__(self, node, nursery=None):
        self.node = node
        self.nursery = nursery       # for the freeze's time-out (else the serve loop's)
        self.frozen_at: float | None = None
        self.deadline: float | None = None
        self._timer: trio.CancelScope | None = None
        self._lock = trio.Lock()

    # -- what each kind of mount does ---------------------------------------------------

    @property
    @abstractmethod
    def frozen(self) -> bool:
        """Whether this node holds the volume frozen."""

    def frozen_by_other(self) -> bool:
        """Whether another node holds the volume frozen."""
        return False

    @abstractmethod
    async def _freeze(self, wait: float) -> None:
        """Freeze: every change waits, everything written home and flushed."""

    @abstractmethod
    def _unfreeze(self) -> bool:
        """Let the changes go on (False: not frozen here)."""

    @abstractmethod
    def _adopt(self, sb) -> None:
        """Take a superblock with a new geometry."""

    @abstractmethod
    def _live_slots(self) -> set[int]:
        """The slots whose open journals are empty while frozen."""

    # -- shared ------------------------------------------------------------------------

    def status(self) -> dict:
        now = trio.current_time()
        return {"node": self.node.node, "slot": self.node.slot,
                "frozen_here": self.frozen, "frozen_by_other": self.frozen_by_other(),
                "frozen_for_s": now - self.frozen_at if self.frozen else None,
                "thaws_in_s": self.deadline - now if self.frozen and self.deadline
                else None}

    async def _freeze_timed(self, wait: float) -> float:
        """``_freeze``, timed (seconds); ``frozen_at`` set."""
        if self.frozen:
            raise FSError(errno.EBUSY, "the volume is already frozen from this node")
        t0 = trio.current_time()
        await self._freeze(wait)
        self.frozen_at = trio.current_time()
        self.deadline = None
        return self.frozen_at - t0

    async def freeze(self, timeout: float = FREEZE_TIMEOUT, *,
                     wait: float = FREEZE_WAIT) -> float:
        """Freeze the volume for at most ``timeout`` seconds; returns the seconds it
        took.

        Raises:
            FSError: EINVAL (a time-out not above 0), EBUSY (frozen already), and
                what the kind's freeze raises.
        """
        if not timeout > 0:
            raise FSError(errno.EINVAL, "a freeze needs a time-out above 0 s")
        async with self._lock:
            took = await self._freeze_timed(wait)
            self.deadline = self.frozen_at + timeout
            log.info("volume frozen in %.3fs (thaws by itself in %gs)", took, timeout)
            self.nursery.start_soon(self._thaw_after, timeout)
            return took

    async def _thaw_after(self, timeout: float) -> None:
        with trio.CancelScope() as scope:
            self._timer = scope
            await trio.sleep(timeout)
            self._timer = None
            log.warning("the freeze reached its time-out (%gs): thawing", timeout)
            self.thaw()

    def thaw(self) -> bool:
        """End this node's freeze (False: it had none)."""
        if not self._unfreeze():
            return False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        log.info("volume thawed after %.3fs", trio.current_time() - self.frozen_at)
        self.frozen_at = self.deadline = None
        return True

    async def grow(self, new_total: int, *, wait: float = FREEZE_WAIT) -> dict:
        """Grow the volume into ``new_total`` blocks of its device (made bigger
        before) while frozen: the new groups are written (``fs.grow``, crash-safe
        step by step) and the new superblock taken here; the other nodes of a
        cluster take it when the freeze lock comes back to them.  A cluster node
        that dies in the middle leaves the grow recorded in the superblock: the
        recovery of its journal finishes it before its locks are released."""
        from . import grow
        vol = self.node.vol

        def work():
            grow.check_device(vol.dev, vol.sb, new_total)
            return grow.grow_on_disk(vol.dev, vol.sb, new_total, crash=crash_point("grow"))
        return await self._frozen_change(work, wait)

    async def add_slots(self, n: int, *, journal_blocks: int | None = None,
                        wait: float = FREEZE_WAIT) -> dict:
        """Add ``n`` node slots (``fs.addslots``: a heartbeat block and a journal
        each, from free space) while frozen, then take the new superblock as after a
        grow.  The live nodes' journals are empty then (the freeze checkpointed
        them); a dead node's that is not recovered refuses it."""
        from . import addslots
        vol = self.node.vol
        live = self._live_slots()
        return await self._frozen_change(
            lambda: addslots.add_slots_on_disk(vol.dev, vol.sb, n, live=live,
                                               journal_blocks=journal_blocks), wait)

    async def _frozen_change(self, work, wait: float) -> dict:
        """Freeze, run ``work()`` (returns the new superblock) on a thread, take its
        superblock here, thaw; returns what changed."""
        async with self._lock:
            # (no time-out here: a thaw in the middle of a grow would let the
            # others use a group being rewritten; the work ends, or fails and thaws)
            took = await self._freeze_timed(wait)
            vol = self.node.vol
            old = vol.sb
            before = (old.total_blocks, old.rgrp_count, old.nslots)
            try:
                # another node may have raised the format revision since this one
                # read the superblock (``Volume.raise_revision``): what ``work``
                # writes keeps it
                vol.sb.format_rev = max(vol.sb.format_rev,
                                        Superblock.decode(vol.dev.read(0), 0).format_rev)
                self._adopt(await trio.to_thread.run_sync(work))
            finally:
                frozen = trio.current_time() - self.frozen_at
                self.thaw()
            sb = self.node.vol.sb
            return {"took_s": took, "frozen_s": frozen,
                    "before": {"total_blocks": before[0], "rgrp_count": before[1],
                               "nslots": before[2]},
                    "after": {"total_blocks": sb.total_blocks,
                              "rgrp_count": sb.rgrp_count, "nslots": sb.nslots}}


class SingleNodeAdmin(MountAdmin):
    """Freeze of a single-node mount: the requests that may change the volume wait
    at the frontend's gate (``fuse.ops.DirectFrontend``), the journal is
    checkpointed and the device flushed; reads go on without access times."""

    def __init__(self, mount, front):
        super().__init__(mount)
        self.front = front

    @property
    def frozen(self) -> bool:
        return self.front.gate is not None

    async def _freeze(self, wait: float) -> None:
        self.front.gate = trio.Event()
        vol = self.node.vol
        vol.frozen = True
        try:
            # (no request is half-way: each runs synchronously between two awaits)
            vol.checkpoint()
            vol.dev.flush()
        except BaseException:
            self._unfreeze()
            raise

    def _unfreeze(self) -> bool:
        gate = self.front.gate
        if gate is None:
            return False
        self.front.gate = None
        self.node.vol.frozen = False
        gate.set()
        return True

    def _adopt(self, sb) -> None:
        self.node.vol.adopt_geometry(sb)

    def _live_slots(self) -> set[int]:
        return {self.node.slot}
