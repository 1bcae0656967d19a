"""A cluster member's mount: joining, staying alive, recovering others, leaving.

Joining (``start``), in order:

1. Open the device, read the superblock; refuse if a single-node mount is live.
2. Start this node's lock manager candidate (``master.Candidate``): when no master
   is elected it becomes one.  Connect to the master, found in the volume's lease
   block (``master.MasterLocator``), for a slot: ``--slot`` or the first one whose
   session the lock manager does not know, whose slot lock ``S<slot>`` we get
   (try-lock) and whose disk heartbeat does not advance.
3. If the slot's journal is dirty (its last owner died and nobody recovered it),
   replay it under the slot's recovery lock ``J<slot>``.
4. Write our heartbeat (state cluster) and keep it beating; open our journal.
5. Learn every group's free count (headers, read without locks: estimates only).

While mounted: a task waits for the lease to be lost and fences the node (every
device write is refused from ``margin`` seconds before the lock manager could
declare us dead); dead-node announcements start recovery (``recovery.py``).  When
the master changes (it died, paused, or was cut off) the lock client finds the new
one through the lease block and reclaims its locks there; the member goes on.
The periodic duties (``tick``) and the journal's periodic commits run in the serve
loop (``fuse/serve.py``).
"""

from __future__ import annotations

import logging
import socket

import trio

from journal import Journal
from lockmgr import EX, LockClient, LockError, LockTimeout, NodeBusy, NotRecovered
from lockmgr.errors import AuthError, ConnectError

from ..errors import ClusterUnreachable, CorruptBlock, Fenced, UsageError, VolumeBusy
from ..fs.grow import finish_interrupted_grow
from ..fs.posix import Filesystem
from ..fs.volume import Volume, read_superblock
from ..ondisk import slots as slotmod
from ..ondisk.format import HB_CLUSTER, HB_FREE, HB_NOLOCK, RgrpHeader
from .admin import VolumeAdmin
from .coherence import Coherence
from .frontend import ClusterFrontend
from .lockd import DEFAULT_LEASE, default_listen
from .locks import FREEZE, recovery_lock, slot_lock
from .master import Candidate, MasterLocator
from .openmodes import OPEN_CACHE, OpenModes
from .recovery import Recovery

log = logging.getLogger(__name__)

FREE_REFRESH = 5.0
SLOT_WAIT = 15.0
JOIN_WAIT = 30.0          # seconds to wait for a lock manager master at join
SILENCE_RENEWALS = 2.5    # renew intervals without a word from the master: reconnect
HANDSHAKE_TIMEOUT = 1.0   # a connection to a paused process is given up after this


class ClusterMount:
    """One node's membership of a volume's cluster.

    Args:
        path: the volume.
        key: the shared secret.
        keyfile: the key file (this node's lock manager candidate reads it); None:
            run no candidate (the node only joins a master that exists).
        listen: where this node's candidate serves when elected (``HOST:PORT``).
        node: this node's name (unique in the cluster).
        slot: the slot to take (default: the first free one).
        lease, renew: lock manager lease and heartbeat period (seconds).
        heartbeat_interval: disk heartbeat period (seconds).
        min_hold: minimum seconds a lock is kept once granted.
        open_cache: open locks kept cached for inodes not open here.
    """

    def __init__(self, path: str, *, key: bytes, keyfile: str | None = None,
                 listen: str | None = None, node: str | None = None,
                 slot: int | None = None, direct: bool | None = None,
                 lease: float = DEFAULT_LEASE, renew: float = 1.0,
                 heartbeat_interval: float = 1.0, min_hold: float = 0.01,
                 noatime: bool = False, open_cache: int = OPEN_CACHE):
        self.path = path
        self.key = key
        self.keyfile = keyfile
        self.listen = listen
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
        self.modes: OpenModes | None = None
        self.front: ClusterFrontend | None = None
        self.recovery: Recovery | None = None
        self.client: LockClient | None = None
        self.heart: slotmod.HeartbeatWriter | None = None
        self.journal: Journal | None = None
        self.nursery: trio.Nursery | None = None
        self.locator: MasterLocator | None = None
        self.candidate: Candidate | None = None
        self.leaving = False
        self._last_free = 0.0
        self.admin: VolumeAdmin | None = None
        self.mountpoint: str | None = None

    # -- joining -----------------------------------------------------------------------

    async def start(self, nursery: trio.Nursery) -> ClusterFrontend:
        self.nursery = nursery
        vol = Volume.open(self.path, direct=self.direct)
        self.vol = vol
        try:
            self.locator = MasterLocator(vol.dev, vol.sb)
            if self.keyfile is not None:
                self.candidate = Candidate(self.path, self.keyfile, node=self.node,
                                           listen=self.listen or default_listen(),
                                           lease=self.lease)
                await nursery.start(self.candidate.run)
            await self._join(vol, nursery)
        except BaseException:
            with trio.CancelScope(shield=True):
                if self.client is not None:
                    await self.client.close()
                if self.candidate is not None:
                    await self.candidate.stop()
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
                raise VolumeBusy(f"{self.path} is mounted in single-node mode by "
                                 f"{slotmod.describe(hb)}; cluster mount refused")
        if self.want_slot is not None:
            if not 0 <= self.want_slot < sb.nslots:
                raise UsageError(f"slot {self.want_slot} does not exist (volume has "
                                 f"{sb.nslots})")
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
            raise VolumeBusy("no slot available: " + "; ".join(reasons))
        log.info("joined the cluster (lock manager at %s) as node %s in slot %d",
                 self.locator.last, self.node, self.slot)
        if vol.sb.growing:
            await self._finish_grow(vol)
        # our slot's journal: replay it if its last owner died unrecovered
        await self.client.lock(recovery_lock(self.slot), EX)
        try:
            slotmod.replay_slot(vol.dev, sb, self.slot)
        finally:
            await self.client.unlock(recovery_lock(self.slot))
        self.journal = slotmod.slot_journal(vol.dev, sb, self.slot)
        self.heart = slotmod.HeartbeatWriter(vol.dev, sb, self.slot, self.node, HB_CLUSTER,
                                             self.interval, lease=True)
        self.heart.set_state(HB_CLUSTER)
        self.heart.start()
        self.journal.open(owner=f"{self.node} (cluster)")
        vol.journal = self.journal
        self.fs = Filesystem(vol, noatime=self.noatime)
        self.coh = Coherence(vol, self.fs, self.client, slot=self.slot,
                             min_hold=self.min_hold)
        self.modes = OpenModes(self.coh, nursery=nursery, open_cache=self.open_cache)
        self.front = ClusterFrontend(self.coh, self.modes)
        self.recovery = Recovery(self)
        self.admin = VolumeAdmin(self)
        self.coh.adopt_superblock = self.adopt_superblock
        self.coh.after_freeze = lambda: nursery.start_soon(self.coh.wait_thawed)
        # the freeze lock in PR from the start (a join waits while the volume is
        # frozen): every member is called back by a freeze, and so takes a new
        # superblock at the thaw even when it writes nothing
        await self.coh.wait_thawed()
        vol.dev.write_guard = self._guard
        self.refresh_free()
        self._last_free = trio.current_time()
        self.client.on_node_down(self.recovery.node_down)
        for slot, node in self.client.dead_nodes().items():
            nursery.start_soon(self.recovery.node_down, node, slot)
        nursery.start_soon(self._fence_watch)
        nursery.start_soon(self._leave_when_fenced)

    async def _finish_grow(self, vol: Volume) -> None:
        """The superblock records a grow that a crash interrupted (the whole cluster
        went down during it): finish it holding the freeze lock in EX, so that no
        member uses the groups meanwhile (a member that died growing is finished by
        its recovery instead: we find the grow done once we have the lock)."""
        await self.client.lock(FREEZE, EX)
        try:
            vol.adopt_geometry(read_superblock(vol.dev))
            finish_interrupted_grow(vol)
        finally:
            await self.client.unlock(FREEZE)

    async def _try_slot(self, vol: Volume, slot: int, nursery) -> str | None:
        """Take ``slot`` or say why not."""
        try:
            client = await LockClient.connect(
                "the volume's master", self.key, self.node, slot, nursery=nursery,
                lease=self.lease, renew=self.renew, busy_wait=0,
                connector=self.locator, join_wait=JOIN_WAIT,
                silence=SILENCE_RENEWALS * self.renew,
                handshake_timeout=HANDSHAKE_TIMEOUT)
        except NodeBusy as e:
            return f"in use ({e})"
        except AuthError as e:
            raise ClusterUnreachable(f"the lock manager at {self.locator.last} refused "
                                     f"us: {e}") from None
        except (ConnectError, OSError) as e:
            raise ClusterUnreachable(f"no lock manager reachable within {JOIN_WAIT:g}s "
                                     f"(last tried: {self.locator.last or 'none'}): {e}") \
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
        """Runs before every device write: no write once either lease may be gone
        (the lock manager's, or the disk heartbeat's: ``slots.HeartbeatWriter``)."""
        if self.coh is not None and self.coh.fenced:
            raise Fenced()
        heart = self.heart
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            # a worker thread (a commit's flushes, the heartbeat): trio's clock and
            # the fence's cancel scopes belong to the event loop; the committer
            # fences on Fenced
            if not self.client.lease_valid_threadsafe() or \
                    (heart is not None and heart.valid_until is not None
                     and not heart.valid()):
                raise Fenced() from None
            return
        if not self.client.lease_valid():
            why = "lease not renewed"
        elif heart is not None and heart.valid_until is not None and not heart.valid():
            why = "disk heartbeat not renewed in time"
        else:
            return
        if self.coh is not None:
            self.coh.fence(why)
        raise Fenced()

    def adopt_superblock(self, sb) -> None:
        """Take a superblock whose geometry changed while the volume was frozen (a
        grow, added slots: ``admin``), without a remount.  ``Volume.adopt_geometry``
        updates the superblock object in place, so every holder of it follows: the
        heartbeat scan of ``tick`` and recovery (``Recovery.watch_heartbeats`` and
        ``recover`` go through ``heartbeat_bno`` / ``journal_range`` at each use, so
        they cover new slots from now on), the master locator (only the lease
        block, which does not move), the allocator and statfs (new groups).  The
        group preference (``g % nslots == slot % nslots``) is made again.

        Left as they are, because neither change moves anything that exists: our
        heartbeat writer's block, our journal, ``Recovery.seen`` (new slots join it
        at the next scan).  The lock manager candidate is another process: its
        ``lockd.SlotWatch`` notices a new slot count by itself.

        Raises:
            ValueError: ``sb`` is not a grown copy of this volume's superblock (the
                mount goes on with the superblock it has).
        """
        old_slots, old_blocks = self.vol.sb.nslots, self.vol.sb.total_blocks
        self.vol.adopt_geometry(sb)
        if self.coh is not None:
            self.coh.prefer_groups(self.vol.sb)
        log.info("volume geometry adopted: %d slots (was %d), %d blocks (was %d)",
                 self.vol.sb.nslots, old_slots, self.vol.sb.total_blocks, old_blocks)

    def refresh_free(self) -> None:
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

    async def _leave_when_fenced(self) -> None:
        """A node that fenced itself leaves the lock manager at once, as a crashed
        node does: its session lapses, a survivor recovers its journal from the
        disk and its locks go.  This matters when the lease is still good (the
        node lost the disk: its heartbeat or journal cannot be written): staying
        connected would keep every lock it holds, and the other members waiting
        for them, until the node is unmounted.  A node that holds no lock leaves
        cleanly."""
        await self.coh.wait_fenced()
        if self.leaving or self.client is None:
            return
        if self.heart is not None:
            self.heart.stopped = True
        held = await self._close_session()
        if held:
            log.error("fenced: left the lock manager as a crashed node does; the "
                      "other members recover this node's journal and its %d locks "
                      "go then", held)

    async def _close_session(self) -> int:
        """Leave the lock manager.  A fenced node must not leave cleanly while it
        holds locks: that would release them with its journal unrecovered.  It
        leaves as if it had crashed (close(release=False)): its locks wait until a
        survivor has recovered its journal.  A session that holds nothing (say the
        lock manager expired the old one and the client reconnected) is closed
        normally, so that the node can rejoin at once.  Returns how many locks
        were left for the recovery."""
        kept = len(self.client.held_locks()) if self.coh.fenced else 0
        with trio.CancelScope(shield=True):
            try:
                await self.client.close(release=not kept)
            except LockError:
                pass
        return kept

    # the node's side of the serve loop (``fuse/serve.py``)

    @property
    def fenced(self) -> bool:
        return self.coh.fenced

    can_fence = True

    def fence(self, why: str) -> None:
        self.coh.fence(why)

    def debug_dump(self) -> str:
        """What this member waits for (``clusterfs.fuse.serve``'s SIGUSR1 dump): the
        lock client's requests in flight, and every glock that is busy, being
        demoted or held by operations."""
        lines = self.client.dump() if self.client is not None else ["no lock client"]
        if self.coh is not None:
            for g in self.coh.glocks.glocks.values():
                if g.busy or g.demote is not None or g.holders or g.draining:
                    lines.append(f"  glock {g.name!r} "
                                 f"{g.mode.name if g.mode is not None else '-'} "
                                 f"holders={g.holders} busy={g.busy} demote={g.demote} "
                                 f"draining={g.draining}")
        return "\n".join(lines)

    async def tick(self) -> None:
        """The periodic duties (the disk heartbeat has a thread of its own): the watch
        of the other slots' heartbeats (for recovery), the groups' free counts, the
        glock cache's size; the fence when the disk heartbeat lapsed."""
        if self.coh.fenced:
            return
        if self.heart.stopped:
            self.coh.fence("disk heartbeat not renewed in time")
            return
        try:
            self.recovery.watch_heartbeats()
            now = trio.current_time()
            if now - self._last_free >= FREE_REFRESH:
                self._last_free = now
                self.refresh_free()
            await self.coh.glocks.trim()
        except Fenced:
            self.coh.fence("a volume write was refused")
        except Exception:
            # a failure here must not end the mount: log it and keep the node's
            # other duties up
            log.exception("background duties failed")

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
                # written), then the journal is marked clean; a wait for the thaw
                # of a volume frozen by another node ends (the freeze lock goes too)
                for scope in list(self.coh.thaw_waits):
                    scope.cancel()
                vol.checkpoint()
                await self.coh.glocks.unlock_all()
                self.journal.close()
                self.heart.stop()
                self.heart.set_state(HB_FREE)
            elif self.coh is not None:
                log.error("node was fenced: leaving the journal for recovery by another "
                          "member")
        except Fenced:
            log.error("fenced while unmounting: the journal is left for recovery")
        finally:
            if self.client is not None and self.coh is not None:
                await self._close_session()
            if self.candidate is not None:
                with trio.CancelScope(shield=True):
                    await self.candidate.stop()
            if self.heart is not None:
                self.heart.stopped = True
                self.heart.stop()
            vol.close()
            self.vol = None

