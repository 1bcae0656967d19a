"""Recovery of a dead node's slot by a surviving member.

The lock manager declares a node dead when its lease expires and announces it; the
dead node's locks stay held (its journal may hold changes others must not read past)
until a member reports the slot recovered.  Every member that hears the announcement
tries; one does it.  The checklist (also in docs/CLUSTER.md):

1. take ``J<slot>`` EX (every member queues; the first recovers, the others find the
   slot recovered when their turn comes);
2. check that the slot's disk heartbeat has stopped (wait while it still advances);
3. replay the slot's journal; mark the slot's heartbeat FREE;
4. report recovery: the lock manager releases the dead node's locks (waiters get
   them; its open modes are gone; value blocks it held PW/EX are invalid);
5. release ``J<slot>``;
6. free the inodes it left UNLINKED (open only there), under their open locks.
"""

from __future__ import annotations

import logging

import trio

from lockmgr import EX, PR, Deadlock, LockError

from ..errors import CorruptBlock
from ..fs.orphans import unlinked_inodes
from ..ondisk import slots as slotmod
from ..ondisk.format import HB_FREE, Heartbeat, RgrpHeader
from .locks import group_lock, recovery_lock

log = logging.getLogger(__name__)


class Recovery:
    """A member's recovery of other nodes' slots.

    Args:
        member: the ``ClusterMount`` (its volume, lock client, coherence and open
            modes; its own slot is never recovered here).
    """

    def __init__(self, member):
        self.member = member
        self.recovering: set[int] = set()
        # slot -> (heartbeat counter, trio time it was first seen at that value)
        self.seen: dict[int, tuple[int, float]] = {}

    def watch_heartbeats(self) -> None:
        """Note when each other slot's heartbeat last advanced."""
        vol = self.member.vol
        now = trio.current_time()
        for slot in range(vol.sb.nslots):
            if slot == self.member.slot:
                continue
            hb = slotmod.read_heartbeat(vol.dev, vol.sb, slot)
            counter = hb.counter if hb is not None else -1
            old = self.seen.get(slot)
            if old is None or old[0] != counter:
                self.seen[slot] = (counter, now)

    async def _wait_heartbeat_stopped(self, slot: int, node: str) -> None:
        """Return once ``slot``'s disk heartbeat has not advanced for its
        ``quiet_period`` (at once when it was already quiet that long): its node has
        stopped writing by then (``slots.HeartbeatWriter``)."""
        vol = self.member.vol
        started = trio.current_time()
        warned = False
        while True:
            self.watch_heartbeats()
            _counter, since = self.seen[slot]
            hb = slotmod.read_heartbeat(vol.dev, vol.sb, slot)
            if hb is None or hb.state == HB_FREE:
                return
            quiet = slotmod.quiet_period(max(hb.interval_ms, 1) / 1000.0)
            now = trio.current_time()
            if now - since >= quiet:
                return
            if not warned and now - started > 2 * quiet:
                warned = True
                log.warning("node %s (slot %d) was declared dead but its disk heartbeat "
                            "still advances; waiting for it to stop", node, slot)
            await trio.sleep(min(0.2, quiet / 10))

    async def node_down(self, node: str, slot: int) -> None:
        """The lock manager declared ``node`` (in ``slot``) dead: recover it unless
        another member does."""
        m = self.member
        if slot == m.slot or slot in self.recovering or m.coh.fenced:
            return
        self.recovering.add(slot)
        try:
            await self.recover(slot, node)
        except Exception as e:
            if isinstance(e, LockError) and m.client.closed:
                # this node is leaving: another member (or the next mount) recovers it
                log.info("recovery of slot %d (%s) left to another member: %s",
                         slot, node, e)
            else:
                log.exception("recovery of slot %d (%s) failed", slot, node)
        finally:
            self.recovering.discard(slot)

    async def recover(self, slot: int, node: str) -> bool:
        """Recover a dead node's slot unless another member did (the module's
        checklist); returns whether this member did.

        Every member that hears of the death queues for ``J<slot>``: the first one
        recovers, the others find the slot recovered when their turn comes (the lock
        manager announces the recovery before it grants the lock again).  A queue, not
        a try-lock: a try fails while a new lock manager is in its grace period, and
        the slot must still be recovered after it.
        """
        m = self.member
        while True:
            try:
                await m.coh.until_fenced(m.client.lock, recovery_lock(slot), EX)
                break
            except Deadlock:
                # our wait closed a cycle with a lock a recovering member needs (its
                # callback frees it): ask again
                await trio.sleep(0.01)
        try:
            if slot not in m.client.dead_nodes():
                log.info("node %s (slot %d) was recovered by another member", node, slot)
                return False
            log.info("recovering node %s (slot %d)", node, slot)
            vol = m.vol
            await self._wait_heartbeat_stopped(slot, node)
            slotmod.replay_slot(vol.dev, vol.sb, slot)
            self._finish_grow()
            hb = slotmod.read_heartbeat(vol.dev, vol.sb, slot) or Heartbeat(slot=slot)
            hb.state = HB_FREE
            hb.counter += 1
            bno = vol.sb.heartbeat_bno(slot)
            vol.dev.write(bno, hb.image(bno))
            vol.dev.flush()
            released = await m.client.report_recovered(slot)
            log.info("node %s (slot %d) recovered; %d session(s) released", node, slot,
                     released)
        finally:
            await m.client.unlock(recovery_lock(slot))
        await self.free_orphans()
        return True

    def _finish_grow(self) -> None:
        """A node that died growing the volume (``admin.VolumeAdmin.grow``) held the
        freeze lock in EX, and holds it until its recovery is reported: nobody uses
        the groups meanwhile, so its recovery finishes the grow on its behalf, as it
        replays its journal.  The members take the grown superblock when the freeze
        lock comes back to them."""
        from ..fs.grow import finish_grow
        from ..fs.volume import read_superblock
        dev = self.member.vol.dev
        sb = read_superblock(dev)
        if sb.growing:
            log.warning("finishing the grow the dead node left unfinished (from %d to %d "
                        "blocks)", sb.grow_from, sb.total_blocks)
            refresh = getattr(dev, "refresh_size", None)
            if refresh is not None:
                refresh()        # the device grew since this node opened it
            finish_grow(dev, sb)

    async def free_orphans(self) -> int:
        """Free UNLINKED inodes that no node has open any more."""
        m = self.member
        vol, coh = m.vol, m.coh
        m.refresh_free()
        freed = 0
        for rg in range(vol.sb.rgrp_count):
            start, _length = vol.sb.rgrp_range(rg)
            try:
                hdr = RgrpHeader.decode(vol.dev.read(start), start)
            except (CorruptBlock, OSError):
                continue
            if not hdr.unlinked and rg not in coh.ex_groups:
                continue
            inos = await coh.run(unlinked_inodes, vol, rg, want={group_lock(rg): PR})
            for ino in inos:
                if await m.modes.purge_if_unused(ino):
                    freed += 1
        if freed:
            log.info("freed %d inode(s) left unlinked by dead nodes", freed)
        return freed
