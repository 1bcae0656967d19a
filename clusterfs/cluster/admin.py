"""Volume-wide administration from one mounted member: freeze and thaw.

A freeze (``VolumeAdmin.freeze``), in order:

1. Close this node's gate (``Coherence.gate``): its operations that would change the
   volume wait for the thaw; operations that only read go on (access times are not
   updated meanwhile, as on a frozen Linux file system).
2. Take the freeze lock ``F`` in EX.  Every other member holds it in PR while it
   changes anything; called back, it lets its operations in flight finish, writes
   everything home (commit and checkpoint: its journal is empty), flushes the device
   and gives ``F`` up (``glops.FreezeOps``).  Its later operations that write queue
   for ``F`` at the lock manager: they wait, they do not fail.
3. Write this node's own changes home and flush the device.

Then the volume on disk is consistent (every journal empty) and quiet: nothing
writes to it but the disk heartbeats (one block per mounted slot, once a second) and
the master's lease renewals (block 1), and the recovery of a node that dies
meanwhile (its journal replayed).  The freeze ends with ``thaw``, with its time-out
(``timeout``: it thaws by itself), or with this node: a freezer that dies holds
``F`` only until a survivor has recovered its journal, like every lock of a dead
node.  Each member re-reads the superblock when ``F`` comes back to it, so a grow or
new slots made while the volume was frozen reach every node without a remount.
"""

from __future__ import annotations

import errno
import logging
import os
import random

import trio

from lockmgr import EX, Deadlock, LeaseLost, LockError

from ..control import FREEZE_TIMEOUT, FREEZE_WAIT
from ..errors import FSError, VolumeError
from .locks import FREEZE

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


class VolumeAdmin:
    """The volume-wide operations a mounted member runs for ``clusterfs`` commands
    (through ``clusterfs.control``)."""

    def __init__(self, member):
        self.member = member
        self._holds = None
        self._lock = trio.Lock()
        self._timer: trio.CancelScope | None = None
        self.frozen_at: float | None = None
        self.deadline: float | None = None

    @property
    def coh(self):
        return self.member.coh

    @property
    def frozen(self) -> bool:
        """Whether this node holds the volume frozen."""
        return self._holds is not None

    def status(self) -> dict:
        now = trio.current_time()
        return {"node": self.member.node, "slot": self.member.slot,
                "frozen_here": self.frozen,
                "frozen_by_other": bool(self.coh.frozen_here),
                "frozen_for_s": now - self.frozen_at if self.frozen else None,
                "thaws_in_s": self.deadline - now if self.frozen else None}

    async def freeze(self, timeout: float = FREEZE_TIMEOUT, *,
                     wait: float = FREEZE_WAIT) -> float:
        """Freeze the volume on every node for at most ``timeout`` seconds (the
        module's checklist); returns the seconds it took.

        Raises:
            FSError: EBUSY (frozen already), ETIMEDOUT (the other members did not
                freeze within ``wait`` seconds; nothing stays frozen), EIO (fenced).
        """
        if not timeout > 0:
            raise FSError(errno.EINVAL, "a freeze needs a time-out above 0 s")
        async with self._lock:
            took = await self._freeze(wait)
            self.deadline = self.frozen_at + timeout
            log.info("volume frozen in %.3fs (thaws by itself in %gs)", took, timeout)
            self.member.nursery.start_soon(self._thaw_after, timeout)
            return took

    async def _freeze(self, wait: float) -> float:
        if self._holds is not None:
            raise FSError(errno.EBUSY, "the volume is already frozen from this node")
        coh = self.coh
        coh.check()
        if coh.frozen_here:
            raise FSError(errno.EBUSY, "the volume is frozen by another node")
        t0 = trio.current_time()
        coh.gate = trio.Event()
        holds = None
        try:
            holds = await self._take_freeze_lock(wait)
            # on the event loop, as a demote's write-back: nothing else may use the
            # journal meanwhile
            self._write_home(self.member.vol)
        except BaseException:
            if holds is not None:
                coh.glocks.release(holds)
            self._open_gate()
            raise
        self._holds = holds
        self.frozen_at = trio.current_time()
        self.deadline = None
        return self.frozen_at - t0

    async def grow(self, new_total: int, *, wait: float = FREEZE_WAIT) -> dict:
        """Grow the volume into ``new_total`` blocks of its device (made bigger
        before) while every node is frozen: the new groups are written
        (``fs.grow``, crash-safe step by step), this node takes the new superblock,
        and the others take it when the freeze lock comes back to them.  A node
        that dies in the middle leaves the grow recorded in the superblock: the
        recovery of its journal finishes it before its locks are released."""
        from ..fs import grow
        vol = self.member.vol

        def work():
            vol.dev.refresh_size()
            grow.plan_grow(vol.sb, new_total)
            if vol.dev.nblocks < new_total:
                raise VolumeError(f"the device has {vol.dev.nblocks} blocks, fewer than "
                                  f"the {new_total} asked for")
            return grow.grow_on_disk(vol.dev, vol.sb, new_total, crash=crash_point("grow"))
        return await self._frozen_change(work, wait)

    async def add_slots(self, n: int, *, journal_blocks: int | None = None,
                        wait: float = FREEZE_WAIT) -> dict:
        """Add ``n`` node slots (``fs.addslots``: a heartbeat block and a journal
        each, from free space) while every node is frozen; every node takes the new
        superblock as after a grow.  The journals of the live members are empty then
        (the freeze checkpointed them); a dead node's that is not recovered refuses
        it."""
        from ..fs import addslots
        from ..ondisk import slots as slotmod
        from ..ondisk.format import HB_CLUSTER
        m = self.member
        vol = m.vol
        dead = set(m.client.dead_nodes())
        hbs = slotmod.read_heartbeats(vol.dev, vol.sb)
        live = {i for i, hb in enumerate(hbs)
                if hb is not None and hb.state == HB_CLUSTER and i not in dead}
        live.add(m.slot)
        return await self._frozen_change(
            lambda: addslots.add_slots_on_disk(vol.dev, vol.sb, n, live=live,
                                               journal_blocks=journal_blocks), wait)

    async def _frozen_change(self, work, wait: float) -> dict:
        """Freeze, run ``work()`` (returns the new superblock) on a thread, take its
        superblock here, thaw; returns what changed."""
        async with self._lock:
            # (no time-out here: a thaw in the middle of a grow would let the
            # others use a group being rewritten; the work ends, or fails and thaws)
            took = await self._freeze(wait)
            old = self.member.vol.sb
            before = (old.total_blocks, old.rgrp_count, old.nslots)
            try:
                new = await trio.to_thread.run_sync(work)
                self.member.adopt_superblock(new)
            finally:
                frozen = trio.current_time() - self.frozen_at
                self.thaw()
            sb = self.member.vol.sb
            return {"took_s": took, "frozen_s": frozen,
                    "before": {"total_blocks": before[0], "rgrp_count": before[1],
                               "nslots": before[2]},
                    "after": {"total_blocks": sb.total_blocks,
                              "rgrp_count": sb.rgrp_count, "nslots": sb.nslots}}

    @staticmethod
    def _write_home(vol) -> None:
        vol.checkpoint()
        vol.dev.flush()

    async def _take_freeze_lock(self, wait: float):
        coh = self.coh
        with trio.move_on_after(wait):
            while True:
                try:
                    return await coh.until_fenced(coh.glocks.acquire, {FREEZE: EX})
                except Deadlock:
                    # a member's operation waited for a lock of ours while we waited
                    # for its freeze lock: it backs off, and so do we
                    await trio.sleep(random.uniform(0.005, 0.05))
                except (LeaseLost, LockError) as e:
                    raise FSError(errno.EIO, f"lock manager: {e}") from None
        raise FSError(errno.ETIMEDOUT, f"the other members did not freeze within {wait:g}s")

    def _open_gate(self) -> None:
        gate = self.coh.gate
        self.coh.gate = None
        if gate is not None:
            gate.set()

    async def _thaw_after(self, timeout: float) -> None:
        with trio.CancelScope() as scope:
            self._timer = scope
            await trio.sleep(timeout)
            self._timer = None
            log.warning("the freeze reached its time-out (%gs): thawing", timeout)
            self.thaw()

    def thaw(self) -> bool:
        """End this node's freeze (False: it had none): its operations go on, and
        the other members get the freeze lock back as they ask for it."""
        holds = self._holds
        if holds is None:
            return False
        self._holds = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.coh.glocks.release(holds)
        self._open_gate()
        log.info("volume thawed after %.3fs", trio.current_time() - self.frozen_at)
        self.frozen_at = self.deadline = None
        return True
