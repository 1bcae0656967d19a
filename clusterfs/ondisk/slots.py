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
import threading
import time

from journal import Journal, JournalCorrupt

from ..errors import CorruptBlock, Fenced, VolumeError
from .format import HB_FREE, HB_STATE_NAMES, Heartbeat, Superblock, random_mount_id

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 1.0
# the heartbeat as a delta lease on the slot (HeartbeatWriter; docs/CLUSTER.md)
HB_VALID_BEATS = 2.0      # a node writes until this many intervals after its last beat
HB_QUIET_BEATS = 2.5      # a slot is stopped once unchanged this many intervals
HB_MIN_VALID = 1.2        # seconds, at least (short test intervals)
HB_MIN_QUIET = 1.5        # seconds, at least
HB_MARGIN = 0.3           # quiet_period exceeds valid_period by this much at least


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


def valid_period(interval: float) -> float:
    """How long after issuing a heartbeat write (that returned in time) a node may go
    on writing to the volume: ``HB_VALID_BEATS`` intervals, at least ``HB_MIN_VALID``."""
    return max(HB_VALID_BEATS * interval, HB_MIN_VALID)


def quiet_period(interval: float) -> float:
    """How long a slot's heartbeat must be seen unchanged before its node counts as
    stopped (its journal may then be replayed): ``HB_QUIET_BEATS`` intervals, at least
    ``HB_MIN_QUIET``; always ``HB_MARGIN`` or more beyond ``valid_period``."""
    return max(HB_QUIET_BEATS * interval, HB_MIN_QUIET,
               valid_period(interval) + HB_MARGIN)


class HeartbeatWriter:
    """Writes one slot's heartbeat block: ``beat()`` once per interval, from the
    caller or from a thread of its own (``start``).

    With ``lease`` (cluster members) the heartbeat is a delta lease on the slot (as
    sanlock's host ids): a node may
    write to the volume only while ``valid()``, that is until ``valid_period`` after
    it issued its last heartbeat write, counting only a write that returned before
    the previous such deadline.  Another node replays the slot's journal only after
    seeing the heartbeat unchanged for ``quiet_period`` (longer): a node that stops
    beating (dead, paused, its disk stalled) has stopped writing by then.  Once
    validity lapses the writer stops for good (``stopped``): a paused node that wakes
    writes no heartbeat over a slot that was recovered meanwhile.

    Args:
        dev: the volume's block device.
        sb: its superblock.
        slot: our slot.
        node: our node name.
        state: HB_NOLOCK or HB_CLUSTER.
        interval: seconds between beats.
        lease: the heartbeat is the node's right to write (above); without it the
            heartbeat only tells others the slot is in use, and never lapses.
    """

    def __init__(self, dev, sb: Superblock, slot: int, node: str, state: int,
                 interval: float = DEFAULT_INTERVAL, *, lease: bool = False):
        self.dev = dev
        self.bno = sb.heartbeat_bno(slot)
        self.hb = Heartbeat(slot=slot, state=state, counter=0, mount_id=random_mount_id(),
                            node=node, interval_ms=int(interval * 1000), pid=os.getpid(),
                            host=socket.gethostname())
        old = read_heartbeat(dev, sb, slot)
        if old is not None:
            self.hb.counter = old.counter
        self.interval = interval
        self.lease = lease
        self.stopped = False
        self.valid_until: float | None = None     # time.monotonic deadline (lease)
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    def valid(self) -> bool:
        """Whether this node's heartbeat lease is valid now (see the class doc)."""
        until = self.valid_until
        return not self.stopped and until is not None and time.monotonic() < until

    def _write(self) -> None:
        """Write the block as it is now and extend validity (under ``_lock``)."""
        issued = time.monotonic()
        until = self.valid_until if self.lease else None
        if until is not None and issued >= until:
            self._lapse(issued - until)
            return
        self.hb.counter += 1
        self.hb.timestamp_ns = time.time_ns()
        self.dev.write(self.bno, self.hb.image(self.bno))
        returned = time.monotonic()
        if until is not None and returned >= until:
            # it may have landed after another node saw the slot quiet: not counted
            self._lapse(returned - until)
            return
        self.valid_until = issued + valid_period(self.interval)

    def _lapse(self, late: float) -> None:
        self.stopped = True
        log.error("slot %d: disk heartbeat not renewed in time (%.1fs late): this node "
                  "stops writing to the volume", self.hb.slot, late)

    def beat(self) -> None:
        """Advance the counter and write the block (skipped once stopped)."""
        with self._lock:
            if self.stopped:
                return
            try:
                self._write()
            except Fenced:
                self.stopped = True

    def start(self) -> None:
        """Beat every ``interval`` from a thread of its own (until ``stop``), so that
        the heartbeat never waits behind the caller's event loop or device flushes."""
        self._halt.clear()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"heartbeat-slot-{self.hb.slot}")
        self._thread.start()

    def _run(self) -> None:
        while not self._halt.wait(self.interval) and not self.stopped:
            try:
                self.beat()
            except OSError as e:
                # tried again at the next beat, until the lease lapses (the disk
                # is gone: the node fences itself)
                log.error("slot %d: heartbeat write failed: %s", self.hb.slot, e)

    def stop(self) -> None:
        """Stop the thread (the block is left as it is)."""
        self._halt.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def set_state(self, state: int, *, flush: bool = True) -> None:
        """Write the heartbeat with a new state (and flush it)."""
        with self._lock:
            self.hb.state = state
            self._write()
        if flush:
            self.dev.flush()
