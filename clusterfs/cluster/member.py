"""A cluster member's mount: joining, staying alive, recovering others, leaving.

Joining (``start``), in order:

1. Open the device, read the superblock; refuse if a single-node mount is live.
2. Connect to the lock manager for a slot: ``--slot`` or the first one whose session
   the lock manager does not know, whose slot lock ``S<slot>`` we get (try-lock) and
   whose disk heartbeat does not advance.
3. If the slot's journal is dirty (its last owner died and nobody recovered it),
   replay it under the slot's recovery lock ``J<slot>``.
4. Write our heartbeat (state cluster) and keep it beating; open our journal.
5. Learn every group's free count (headers, read without locks: estimates only).

While mounted: a task waits for the lease to be lost and fences the node (every
device write is refused from ``margin`` seconds before the lock manager could
declare us dead); dead-node announcements start recovery (``recover``).

Recovery of a dead node's slot (checklist, also in docs/CLUSTER.md):

1. take ``J<slot>`` EX (try: the member that gets it recovers; the others skip);
2. check that the slot's disk heartbeat has stopped (wait while it still advances);
3. replay the slot's journal; mark the slot's heartbeat FREE;
4. report recovery: the lock manager releases the dead node's locks (waiters get
   them; its open modes are gone; value blocks it held PW/EX are invalid);
5. free the inodes it left UNLINKED (open only there), under their open locks;
6. release ``J<slot>``.
"""

from __future__ import annotations

import logging
import socket

import trio

from journal import Journal, JournalCorrupt
from lockmgr import EX, PR, LockClient, LockError, LockTimeout, NodeBusy, NotRecovered
from lockmgr.errors import AuthError, ConnectError

from ..errors import CorruptBlock, Fenced, QuietError
from ..fs.posix import Filesystem
from ..fs.volume import Volume
from ..ondisk import slots as slotmod
from ..ondisk.format import (BLOCKS_PER_BITMAP, HB_CLUSTER, HB_FREE, HB_NOLOCK, UNLINKED,
                             Heartbeat, RgrpHeader)
from .coherence import (OPEN_CACHE, ClusterFrontend, Coherence, group_lock, recovery_lock,
                        slot_lock)

log = logging.getLogger(__name__)

COMMIT_INTERVAL = 5.0
FREE_REFRESH = 5.0
SLOT_WAIT = 15.0


class ClusterMount:
    """One node's membership of a volume's cluster.

    Args:
        path: the volume.
        lockd: lock manager address ("host:port" or "unix:/path").
        key: the shared secret.
        node: this node's name (unique in the cluster).
        slot: the slot to take (default: the first free one).
        lease, renew: lock manager lease and heartbeat period (seconds).
        heartbeat_interval: disk heartbeat period (seconds).
        min_hold: minimum seconds a lock is kept once granted.
        open_cache: open locks kept cached for inodes not open here.
    """

    def __init__(self, path: str, *, lockd: str, key: bytes, node: str | None = None,
                 slot: int | None = None, direct: bool | None = None, lease: float = 5.0,
                 renew: float = 1.0, heartbeat_interval: float = 1.0,
                 min_hold: float = 0.01, noatime: bool = False,
                 open_cache: int = OPEN_CACHE):
        self.path = path
        self.lockd = lockd
        self.key = key
        self.node = node or socket.gethostname()
        self.want_slot = slot
        self.direct = direct
        self.lease = lease
        self.renew = renew
        self.interval = heartbeat_interval
        self.min_hold = min_hold
        self.noatime = noatime
        self.open_cache = open_cache
        self.readonly = False
        self.slot: int | None = None
        self.vol: Volume | None = None
        self.fs: Filesystem | None = None
        self.coh: Coherence | None = None
        self.front: ClusterFrontend | None = None
        self.client: LockClient | None = None
        self.heart: slotmod.HeartbeatWriter | None = None
        self.journal: Journal | None = None
        self.nursery: trio.Nursery | None = None
        self.recovering: set[int] = set()
        self.leaving = False
        # slot -> (heartbeat counter, trio time it was first seen at that value)
        self.seen: dict[int, tuple[int, float]] = {}

    # -- joining -----------------------------------------------------------------------

    async def start(self, nursery: trio.Nursery) -> ClusterFrontend:
        self.nursery = nursery
        vol = Volume.open(self.path, direct=self.direct)
        self.vol = vol
        try:
            await self._join(vol, nursery)
        except BaseException:
            if self.client is not None:
                with trio.CancelScope(shield=True):
                    await self.client.close()
            vol.close()
            raise
        return self.front

    async def _join(self, vol: Volume, nursery: trio.Nursery) -> None:
        sb = vol.sb
        hbs = slotmod.read_heartbeats(vol.dev, sb)
        nolock = {i for i, hb in enumerate(hbs) if hb is not None and hb.state == HB_NOLOCK}
        if nolock:
            live = await trio.to_thread.run_sync(
                lambda: slotmod.live_slots(vol.dev, sb, slots=nolock))
            if live:
                hb = next(iter(live.values()))
                raise QuietError(f"{self.path} is mounted in single-node mode by "
                                 f"{slotmod.describe(hb)}; cluster mount refused", 16)
        if self.want_slot is not None:
            if not 0 <= self.want_slot < sb.nslots:
                raise QuietError(f"slot {self.want_slot} does not exist (volume has "
                                 f"{sb.nslots})", 2)
            candidates = [self.want_slot]
        else:
            candidates = list(range(sb.nslots))
        reasons = []
        for slot in candidates:
            why = await self._try_slot(vol, slot, nursery)
            if why is None:
                break
            reasons.append(f"slot {slot}: {why}")
        else:
            raise QuietError("no slot available: " + "; ".join(reasons), 16)
        log.info("joined the cluster at %s as node %s in slot %d", self.lockd, self.node,
                 self.slot)
        # our slot's journal: replay it if its last owner died unrecovered
        self.journal = slotmod.slot_journal(vol.dev, sb, self.slot)
        await self.client.lock(recovery_lock(self.slot), EX)
        try:
            if not self.journal.is_clean():
                report = self.journal.replay()
                log.info("slot %d journal replayed at join: %s", self.slot, report.summary())
        except JournalCorrupt as e:
            raise QuietError(f"journal of slot {self.slot} is corrupt at block {e.bno}: "
                             f"{e.reason}; run 'clusterfs fsck'", 8) from None
        finally:
            await self.client.unlock(recovery_lock(self.slot))
        self.heart = slotmod.HeartbeatWriter(vol.dev, sb, self.slot, self.node, HB_CLUSTER,
                                             self.interval)
        self.heart.set_state(HB_CLUSTER)
        self.journal.open(owner=f"{self.node} (cluster)")
        vol.journal = self.journal
        self.fs = Filesystem(vol, noatime=self.noatime)
        self.coh = Coherence(vol, self.fs, self.client, slot=self.slot,
                             nursery=self.nursery, min_hold=self.min_hold,
                             open_cache=self.open_cache)
        self.front = ClusterFrontend(self.coh)
        vol.dev.write_guard = self._guard
        self._refresh_free()
        self.client.on_node_down(self._node_down)
        for slot, node in self.client.dead_nodes().items():
            nursery.start_soon(self._node_down, node, slot)
        nursery.start_soon(self._fence_watch)
        nursery.start_soon(self._background)

    async def _try_slot(self, vol: Volume, slot: int, nursery) -> str | None:
        """Take ``slot`` or say why not."""
        try:
            client = await LockClient.connect(self.lockd, self.key, self.node, slot,
                                              nursery=nursery, lease=self.lease,
                                              renew=self.renew, busy_wait=0)
        except NodeBusy as e:
            return f"in use ({e})"
        except AuthError as e:
            raise QuietError(f"lock manager {self.lockd} refused us: {e}", 8) from None
        except (ConnectError, OSError) as e:
            raise QuietError(f"cannot reach the lock manager at {self.lockd}: {e}", 8) \
                from None
        try:
            # no live session has this slot (connect said so): a held slot lock is a
            # dead node's, released once a member recovered it (or a fresh lock
            # manager's grace period is still on): wait a while for it
            await client.lock(slot_lock(slot), EX, timeout=SLOT_WAIT)
        except (LockTimeout, NotRecovered):
            await client.close()
            return "its slot lock is held (a node that died and is not yet recovered)"
        live = await trio.to_thread.run_sync(
            lambda: slotmod.live_slots(vol.dev, vol.sb, slots={slot}))
        if live:
            await client.close()
            return f"its disk heartbeat advances ({slotmod.describe(live[slot])})"
        self.client = client
        self.slot = slot
        return None

    def _guard(self) -> None:
        """Runs before every device write: no write once the lease may be gone."""
        if self.coh is not None and self.coh.fenced:
            raise Fenced()
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            # a worker thread (a commit's flushes): trio's clock and the fence's
            # cancel scopes belong to the event loop; the committer fences on Fenced
            if not self.client.lease_valid_threadsafe():
                raise Fenced() from None
            return
        if not self.client.lease_valid():
            if self.coh is not None:
                self.coh.fence("lease not renewed")
            raise Fenced()

    def _refresh_free(self) -> None:
        """Estimate every group's free blocks from its header (read without a lock)."""
        vol, coh = self.vol, self.coh
        for rg in range(vol.sb.rgrp_count):
            if rg in coh.ex_groups:
                hdr = vol.cached(vol.sb.rgrp_range(rg)[0])
                if isinstance(hdr, RgrpHeader):
                    coh.known_free[rg] = hdr.free
                continue
            start, _ = vol.sb.rgrp_range(rg)
            try:
                hdr = RgrpHeader.decode(vol.dev.read(start), start)
            except (CorruptBlock, OSError):
                continue
            coh.known_free[rg] = hdr.free

    # -- staying alive ----------------------------------------------------------------

    async def _fence_watch(self) -> None:
        await self.client.wait_lease_lost()
        if self.leaving:
            return
        self.coh.fence("lease lost")
        if self.heart is not None:
            self.heart.stopped = True

    async def _background(self) -> None:
        last_commit = trio.current_time()
        last_free = trio.current_time()
        while True:
            woke = trio.current_time() + self.interval
            await trio.sleep(self.interval)
            late = trio.current_time() - woke
            if late > self.lease / 5:
                log.warning("the event loop was held up for %.1fs (slow device flush or "
                            "CPU starvation); lease renewals wait meanwhile", late)
            if self.coh.fenced:
                continue
            try:
                self.heart.beat()
                self._watch_heartbeats()
                now = trio.current_time()
                if now - last_commit >= COMMIT_INTERVAL:
                    last_commit = now
                    if self.vol.op is None and self.journal.running_blocks():
                        # flushed on a worker thread while requests go on
                        await self.vol.commit_in_thread(trio.to_thread.run_sync)
                if now - last_free >= FREE_REFRESH:
                    last_free = now
                    self._refresh_free()
                await self.coh.glocks.trim()
            except Fenced:
                self.coh.fence("a volume write was refused")
            except Exception:
                # a failed commit or heartbeat must not end the mount: the journal
                # aborts itself on device errors (every later write then fails, and
                # applications see EIO); log it and keep the node's other duties up
                log.exception("background duties failed")

    def _watch_heartbeats(self) -> None:
        """Note when each other slot's heartbeat last advanced (for recovery)."""
        now = trio.current_time()
        for slot in range(self.vol.sb.nslots):
            if slot == self.slot:
                continue
            hb = slotmod.read_heartbeat(self.vol.dev, self.vol.sb, slot)
            counter = hb.counter if hb is not None else -1
            old = self.seen.get(slot)
            if old is None or old[0] != counter:
                self.seen[slot] = (counter, now)

    async def _wait_heartbeat_stopped(self, slot: int, node: str) -> None:
        """Return once ``slot``'s disk heartbeat has not advanced for 2.5 of its
        intervals (at once when it was already quiet that long)."""
        started = trio.current_time()
        warned = False
        while True:
            self._watch_heartbeats()
            _counter, since = self.seen[slot]
            hb = slotmod.read_heartbeat(self.vol.dev, self.vol.sb, slot)
            if hb is None or hb.state == HB_FREE:
                return
            quiet = 2.5 * max(hb.interval_ms, 1) / 1000.0
            now = trio.current_time()
            if now - since >= quiet:
                return
            if not warned and now - started > 2 * quiet:
                warned = True
                log.warning("node %s (slot %d) was declared dead but its disk heartbeat "
                            "still advances; waiting for it to stop", node, slot)
            await trio.sleep(min(0.2, quiet / 10))

    # -- recovering dead nodes ----------------------------------------------------------

    async def _node_down(self, node: str, slot: int) -> None:
        if slot == self.slot or slot in self.recovering or self.coh.fenced:
            return
        self.recovering.add(slot)
        try:
            await self.recover(slot, node)
        except Exception:
            log.exception("recovery of slot %d (%s) failed", slot, node)
        finally:
            self.recovering.discard(slot)

    async def recover(self, slot: int, node: str) -> bool:
        """Recover a dead node's slot if no other member does (see the module doc)."""
        if not await self.coh.try_lock(recovery_lock(slot), EX):
            log.info("node %s (slot %d) is being recovered by another member", node, slot)
            return False
        try:
            log.info("recovering node %s (slot %d)", node, slot)
            vol = self.vol
            await self._wait_heartbeat_stopped(slot, node)
            j = slotmod.slot_journal(vol.dev, vol.sb, slot)
            report = j.replay()
            log.info("slot %d journal replayed: %s", slot, report.summary())
            hb = slotmod.read_heartbeat(vol.dev, vol.sb, slot) or Heartbeat(slot=slot)
            hb.state = HB_FREE
            hb.counter += 1
            bno = vol.sb.heartbeat_bno(slot)
            vol.dev.write(bno, hb.image(bno))
            vol.dev.flush()
            released = await self.client.report_recovered(slot)
            log.info("node %s (slot %d) recovered; %d session(s) released", node, slot,
                     released)
            await self.free_orphans()
            return True
        finally:
            await self.client.unlock(recovery_lock(slot))

    async def free_orphans(self) -> int:
        """Free UNLINKED inodes that no node has open any more."""
        vol, coh = self.vol, self.coh
        self._refresh_free()
        freed = 0
        for rg in range(vol.sb.rgrp_count):
            start, length = vol.sb.rgrp_range(rg)
            try:
                hdr = RgrpHeader.decode(vol.dev.read(start), start)
            except (CorruptBlock, OSError):
                continue
            if not hdr.unlinked and rg not in coh.ex_groups:
                continue
            inos = await coh.run(self._unlinked_in, rg, want={group_lock(rg): PR})
            for ino in inos:
                if await coh.purge_if_unused(ino):
                    freed += 1
        if freed:
            log.info("freed %d inode(s) left unlinked by dead nodes", freed)
        return freed

    def _unlinked_in(self, rg: int) -> list[int]:
        vol = self.vol
        start, length = vol.sb.rgrp_range(rg)
        out = []
        for j in range(vol.sb.bitmap_blocks):
            bm = vol.bitmap(rg, j)
            base = j * BLOCKS_PER_BITMAP
            n = min(BLOCKS_PER_BITMAP, length - base)
            for i in range(max(0, n)):
                if bm.get(i) == UNLINKED:
                    out.append(start + base + i)
        return out

    # -- leaving -----------------------------------------------------------------------

    async def stop(self) -> None:
        """Leave cleanly: checkpoint, journal clean, locks released, heartbeat FREE."""
        vol = self.vol
        if vol is None:
            return
        self.leaving = True
        try:
            if self.coh is not None and not self.coh.fenced:
                for fh in list(self.fs.handles):
                    try:
                        await self.front.release(fh)
                    except Exception:
                        log.exception("closing handle %d at unmount", fh)
                # everything home first, then the locks go (their value blocks
                # written), then the journal is marked clean
                vol.checkpoint()
                await self.coh.glocks.unlock_all()
                self.journal.close()
                self.heart.set_state(HB_FREE)
            elif self.coh is not None:
                log.error("node was fenced: leaving the journal for recovery by another "
                          "member")
                if self.heart is not None:
                    self.heart.stopped = True
        except Fenced:
            log.error("fenced while unmounting: the journal is left for recovery")
        finally:
            # A fenced node must not leave cleanly while it holds locks: that would
            # release them with its journal unrecovered.  It leaves as if it had
            # crashed (close(release=False)): its locks wait until a survivor has
            # recovered its journal.  A session that holds nothing (the lock manager
            # expired the old one and the client reconnected) is closed normally, so
            # that the node can rejoin at once.
            if self.client is not None and self.coh is not None:
                release = not self.coh.fenced or not self.client.held_locks()
                with trio.CancelScope(shield=True):
                    try:
                        await self.client.close(release=release)
                    except LockError:
                        pass
            vol.close()
            self.vol = None

