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
import random

import trio

from lockmgr import EX, Deadlock, LeaseLost, LockError

from ..errors import FSError
from .locks import FREEZE

log = logging.getLogger(__name__)

FREEZE_TIMEOUT = 120.0    # seconds a freeze lasts at most unless the request says
FREEZE_WAIT = 60.0        # seconds to wait for the other members to freeze


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
            if self._holds is not None:
                raise FSError(errno.EBUSY, "the volume is already frozen from this node")
            coh = self.coh
            coh.check()
            t0 = trio.current_time()
            coh.gate = trio.Event()
            try:
                holds = await self._take_freeze_lock(wait)
                # on the event loop, as a demote's write-back: nothing else may use
                # the journal meanwhile
                self._write_home(self.member.vol)
            except BaseException:
                if "holds" in locals():
                    coh.glocks.release(holds)
                self._open_gate()
                raise
            self._holds = holds
            self.frozen_at = trio.current_time()
            self.deadline = self.frozen_at + timeout
            took = self.frozen_at - t0
            log.info("volume frozen in %.3fs (thaws by itself in %gs)", took, timeout)
            self.member.nursery.start_soon(self._thaw_after, timeout)
            return took

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
