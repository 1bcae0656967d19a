"""Node slots and their disk heartbeats.

Each slot owns a heartbeat block and a journal.  A mounted node rewrites its
heartbeat block every interval (counter + 1).  A slot whose heartbeat is not FREE is
*live* if its counter advances while we watch it for a few intervals, *stale* if it
does not (its node died without unmounting: its journal needs replay).
"""

from __future__ import annotations

import logging
import os
import socket
import time

from journal import Journal, JournalCorrupt

from ..errors import CorruptBlock, Fenced, VolumeError
from .format import HB_FREE, HB_STATE_NAMES, Heartbeat, Superblock, random_mount_id

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 1.0


def slot_journal(dev, sb: Superblock, slot: int) -> Journal:
    """The journal of ``slot`` (not opened: read, replay or open it)."""
    start, length = sb.journal_range(slot)
    return Journal(dev, start, length, slot=slot)


def replay_slot(dev, sb: Superblock, slot: int, *, replay: bool = True) -> bool:
    """Replay the journal of ``slot`` if it is dirty (its last owner died); returns
    whether it was.  With ``replay=False`` a dirty journal is refused instead (a
    read-only mount writes nothing).

    Raises:
        VolumeError: the journal is corrupt (naming the slot and the block), or it is
            dirty and ``replay`` is False.
    """
    j = slot_journal(dev, sb, slot)
    try:
        if j.is_clean():
            return False
        if not replay:
            raise VolumeError(f"journal of slot {slot} needs replay; mount read-write "
                              f"once or run 'clusterfs fsck'")
        report = j.replay()
    except JournalCorrupt as e:
        raise VolumeError(f"journal of slot {slot} is corrupt at block {e.bno}: "
                          f"{e.reason}; run 'clusterfs fsck'") from None
    log.info("slot %d journal replayed: %s", slot, report.summary())
    return True


def read_heartbeat(dev, sb: Superblock, slot: int) -> Heartbeat | None:
    """The slot's heartbeat, or None if its block is unreadable or damaged."""
    bno = sb.heartbeat_bno(slot)
    try:
        return Heartbeat.decode(dev.read(bno), bno)
    except (CorruptBlock, OSError):
        return None


def read_heartbeats(dev, sb: Superblock) -> list[Heartbeat | None]:
    return [read_heartbeat(dev, sb, i) for i in range(sb.nslots)]


def live_slots(dev, sb: Superblock, *, slots=None, watch: float | None = None,
               exclude: int | None = None) -> dict[int, Heartbeat]:
    """Slots whose heartbeat advances while watched.

    Only slots not FREE are watched; when none is, this returns at once.  The watch
    lasts 2.5 heartbeat intervals (of the slowest watched slot) unless given.
    """
    first = {}
    for i, hb in enumerate(read_heartbeats(dev, sb)):
        if slots is not None and i not in slots:
            continue
        if i == exclude or hb is None or hb.state == HB_FREE:
            continue
        first[i] = hb
    if not first:
        return {}
    if watch is None:
        watch = 2.5 * max(hb.interval_ms for hb in first.values()) / 1000.0
    deadline = time.monotonic() + watch
    live: dict[int, Heartbeat] = {}
    while True:
        for i, hb in first.items():
            if i in live:
                continue
            now = read_heartbeat(dev, sb, i)
            if now is not None and (now.counter != hb.counter or now.mount_id != hb.mount_id):
                live[i] = now
        if len(live) == len(first) or time.monotonic() >= deadline:
            return live
        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


def describe(hb: Heartbeat) -> str:
    return (f"slot {hb.slot} ({HB_STATE_NAMES.get(hb.state, hb.state)} mount by node "
            f"'{hb.node}' on {hb.host or '?'}, pid {hb.pid})")


class HeartbeatWriter:
    """Writes one slot's heartbeat block; ``beat()`` once per interval.

    Args:
        dev: the volume's block device.
        sb: its superblock.
        slot: our slot.
        node: our node name.
        state: HB_NOLOCK or HB_CLUSTER.
        interval: seconds between beats.
    """

    def __init__(self, dev, sb: Superblock, slot: int, node: str, state: int,
                 interval: float = DEFAULT_INTERVAL):
        self.dev = dev
        self.bno = sb.heartbeat_bno(slot)
        self.hb = Heartbeat(slot=slot, state=state, counter=0, mount_id=random_mount_id(),
                            node=node, interval_ms=int(interval * 1000), pid=os.getpid(),
                            host=socket.gethostname())
        old = read_heartbeat(dev, sb, slot)
        if old is not None:
            self.hb.counter = old.counter
        self.interval = interval
        self.stopped = False

    def beat(self) -> None:
        """Advance the counter and write the block (skipped once fenced)."""
        if self.stopped:
            return
        self.hb.counter += 1
        self.hb.timestamp_ns = time.time_ns()
        try:
            self.dev.write(self.bno, self.hb.image(self.bno))
        except Fenced:
            self.stopped = True

    def set_state(self, state: int, *, flush: bool = True) -> None:
        self.hb.state = state
        self.hb.counter += 1
        self.hb.timestamp_ns = time.time_ns()
        self.dev.write(self.bno, self.hb.image(self.bno))
        if flush:
            self.dev.flush()
