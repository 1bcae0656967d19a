"""Mounting a volume (before FUSE starts) and unmounting it (after FUSE stops).

Single-node mode is like GFS2's lock_nolock: no lock manager.  The checklist:

1. Open the device, read and check the superblock (format revision included).
2. Take a host-local advisory lock on the volume (catches two mounts on one host at
   once), then watch every non-FREE slot's disk heartbeat: any that still advances
   is a live mount elsewhere, and the mount is refused naming it.
3. Claim slot 0: write our heartbeat (state single-node) and keep it beating.
4. Replay every dirty journal (the nodes that wrote them are dead: step 2).
5. Finish a grow of the volume that a crash interrupted (``grow.finish_grow``).
6. Open our own journal (clean flag off).
7. Finish what a crash interrupted: free inodes left UNLINKED (nobody has them open).

Unmount: commit and checkpoint the journal, mark it clean, set the heartbeat FREE.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket

from journal import Journal

from ..errors import CorruptBlock, UsageError, VolumeBusy, VolumeError
from ..ondisk import slots as slotmod
from ..ondisk.format import HB_FREE, HB_NOLOCK
from .grow import finish_interrupted_grow
from .orphans import free_unlinked
from .posix import Filesystem
from .volume import Volume

log = logging.getLogger(__name__)


class SingleNodeMount:
    """A volume mounted without a lock manager.

    Args:
        path: the volume.
        node: node name written into the heartbeat.
        direct: O_DIRECT device access (default: yes for block devices).
        readonly: mount read-only (nothing is written, not even a heartbeat).
        slot: the slot to use (0).
        heartbeat_interval: seconds between heartbeats.
    """

    def __init__(self, path: str, *, node: str | None = None, direct: bool | None = None,
                 readonly: bool = False, slot: int = 0, heartbeat_interval: float = 1.0,
                 noatime: bool = False):
        self.path = path
        self.node = node or socket.gethostname()
        self.direct = direct
        self.readonly = readonly
        self.slot = slot
        self.interval = heartbeat_interval
        self.noatime = noatime or readonly
        self.vol: Volume | None = None
        self.fs: Filesystem | None = None
        self.heart: slotmod.HeartbeatWriter | None = None
        self.journal: Journal | None = None
        self._lockfd = -1

    def start(self) -> Filesystem:
        vol = Volume.open(self.path, direct=self.direct, readonly=self.readonly,
                          slot=self.slot)
        self.vol = vol
        try:
            self._start(vol)
        except BaseException:
            self._release_lock()
            vol.close()
            raise
        return self.fs

    def _start(self, vol: Volume) -> None:
        sb = vol.sb
        if self.slot >= sb.nslots:
            raise UsageError(f"slot {self.slot} does not exist (volume has {sb.nslots})")
        self._lockfd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(self._lockfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise VolumeBusy(f"{self.path} is already mounted on this host") from None
        live = slotmod.live_slots(vol.dev, sb)
        if live:
            hb = next(iter(live.values()))
            raise VolumeBusy(f"{self.path} is in use: {slotmod.describe(hb)} has a "
                             f"live heartbeat; single-node mount refused")
        if self.readonly:
            if sb.growing:
                raise VolumeError(f"{self.path}: a grow of the volume was interrupted; "
                                  f"mount it read-write once or run 'clusterfs fsck -y' "
                                  f"to finish it")
            for slot in range(sb.nslots):
                slotmod.replay_slot(vol.dev, sb, slot, replay=False)
            self.fs = Filesystem(vol, noatime=True)
            return
        self.heart = slotmod.HeartbeatWriter(vol.dev, sb, self.slot, self.node, HB_NOLOCK,
                                             self.interval)
        self.heart.set_state(HB_NOLOCK)
        for slot in range(sb.nslots):
            slotmod.replay_slot(vol.dev, sb, slot)
        finish_interrupted_grow(vol)
        self.journal = slotmod.slot_journal(vol.dev, sb, self.slot)
        self.journal.open(owner=f"{self.node} (single-node)")
        vol.journal = self.journal
        self.fs = Filesystem(vol, noatime=self.noatime)
        try:
            free_unlinked(vol, self.fs)
        except CorruptBlock as e:
            log.error("could not finish freeing unlinked inodes: %s", e)
        vol.commit()

    # the node's side of the serve loop (``fuse/serve.py``): a single node is never
    # fenced (it has no lease) and its only periodic duty is its disk heartbeat

    fenced = False
    can_fence = False

    def fence(self, why: str) -> None:
        raise AssertionError(f"a single-node mount cannot be fenced ({why})")

    async def tick(self) -> None:
        """The periodic duty: the disk heartbeat."""
        try:
            self.heart.beat()
        except OSError as e:
            log.error("heartbeat write failed: %s", e)

    def stop(self) -> bool:
        """Unmount: checkpoint, clean flag, heartbeat FREE, close.  False when a
        device error had stopped the journal: it is left as it is on the volume,
        for replay at the next mount (the slot too, as after a crash)."""
        vol = self.vol
        if vol is None:
            return True
        try:
            if self.journal is not None and self.journal.aborted is not None:
                log.error("the journal stopped after a device error (%s): left on the "
                          "volume for replay at the next mount", self.journal.aborted)
                return False
            if self.journal is not None and self.journal.is_open:
                # open files of a lazily unmounted fs: free what is unlinked
                if self.fs is not None:
                    for fh in list(self.fs.handles):
                        self.fs.release(fh)
                self.journal.close()
            if self.heart is not None:
                self.heart.set_state(HB_FREE)
            return True
        finally:
            self._release_lock()
            vol.close()
            self.vol = None

    def _release_lock(self) -> None:
        if self._lockfd >= 0:
            os.close(self._lockfd)
            self._lockfd = -1
