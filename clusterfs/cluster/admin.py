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
from ..fs.admin import MountAdmin
from .locks import FREEZE

log = logging.getLogger(__name__)


class VolumeAdmin(MountAdmin):
    """The volume-wide operations a mounted member runs for ``clusterfs`` commands
    (through ``clusterfs.control``): a freeze by the freeze lock (the module's
    checklist); the time-out, grow and add-slots are ``MountAdmin``'s."""

    def __init__(self, member):
        super().__init__(member, member.nursery)
        self._holds = None

    @property
    def coh(self):
        return self.node.coh

    @property
    def frozen(self) -> bool:
        return self._holds is not None

    def frozen_by_other(self) -> bool:
        return bool(self.coh.frozen_here)

    def status(self) -> dict:
        # with the counts of the kernel's page cache (READs and WRITEs that reached
        # this mount, drops of a file's pages and their passes: ``pages.py``)
        # and of the kernel's directory entries (lookups that reached this mount,
        # epochs raised: ``coherence.py``), and of the operation bodies run, their
        # retries for a lock and the writes served at hand (``frontend.py``)
        coh = self.coh
        return {**super().status(), "pages": dict(coh.pages.stats),
                "entries": {"cached": coh.entry_epochs, **coh.entry_stats},
                "operations": dict(coh.stats)}

    async def _freeze(self, wait: float) -> None:
        """The freeze lock in EX (module doc); EBUSY when another node froze the
        volume, ETIMEDOUT when the other members did not freeze within ``wait``
        seconds (nothing stays frozen), EIO when fenced."""
        coh = self.coh
        coh.check()
        if coh.frozen_here:
            raise FSError(errno.EBUSY, "the volume is frozen by another node")
        coh.gate = trio.Event()
        holds = None
        try:
            holds = await self._take_freeze_lock(wait)
            # on the event loop, as a demote's write-back: nothing else may use the
            # journal meanwhile
            vol = self.node.vol
            vol.checkpoint()
            vol.dev.flush()
        except BaseException:
            if holds is not None:
                coh.glocks.release(holds)
            self._open_gate()
            raise
        self._holds = holds

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

    def _unfreeze(self) -> bool:
        """Its operations go on, and the other members get the freeze lock back as
        they ask for it."""
        holds = self._holds
        if holds is None:
            return False
        self._holds = None
        self.coh.glocks.release(holds)
        self._open_gate()
        return True

    def _adopt(self, sb) -> None:
        self.node.adopt_superblock(sb)

    def _live_slots(self) -> set[int]:
        """Our slot and those of the members alive now (heartbeat in state cluster,
        not dead at the lock manager): the freeze emptied their journals."""
        from ..ondisk import slots as slotmod
        from ..ondisk.format import HB_CLUSTER
        m = self.node
        dead = set(m.client.dead_nodes())
        hbs = slotmod.read_heartbeats(m.vol.dev, m.vol.sb)
        live = {i for i, hb in enumerate(hbs)
                if hb is not None and hb.state == HB_CLUSTER and i not in dead}
        live.add(m.slot)
        return live
