"""Layer 2, Cluster: the lease area, slot heartbeats, journals of dead nodes, an
interrupted grow, the clean-volume skip.

A live node refuses every repair.  ``-n`` goes on with a warning that names the state
it checks (on disk, without what the live journals hold), unless the run holds every
node frozen (its device is a ``fsck.online.FrozenDevice``), which a note says instead.
Journals of dead nodes are replayed (or, under ``-n`` or when a replay is declined,
replayed into an in-memory overlay: the check then sees what a replay would leave).
While it repairs, fsck keeps a heartbeat of its own in a free slot (``hold_slot``).
"""

from __future__ import annotations

import threading

from clusterfs.errors import CorruptBlock
from clusterfs.fs import grow
from clusterfs.ondisk import slots as slotmod
from clusterfs.ondisk.blockdev import BlockDevice
from clusterfs.ondisk.format import (FREE_LEASE, HB_FREE, HB_NOLOCK, Heartbeat, RgrpHeader,
                                     decode_lease, encode_lease)
from journal import Journal, JournalCorrupt

from .device import OverlayDevice
from .report import FsckError


def check_lease(s) -> None:
    """The lease block (the lock manager's master lease) must decode.  A held lease
    is no finding: a master of a mounted volume holds it, and with nobody mounted
    the next lock manager takes it over once it has expired.  A damaged one is
    rewritten free when repairing (only with no live node, checked before: nothing
    runs an election then)."""
    rep, sb = s.report, s.sb
    bno = sb.lease_bno
    buf = s.read(bno)
    try:
        if buf is None:
            raise CorruptBlock(bno, "unreadable")
        lease = decode_lease(buf, bno)
    except CorruptBlock as e:
        if rep.problem("bad-lease", f"lease block {bno} is damaged ({e.reason})",
                       "rewrite it free", safe=True, block=bno):
            s.write(bno, encode_lease(FREE_LEASE, bno))
            s.real.flush()
        return
    s.stats["master"] = lease.node if lease.owner != FREE_LEASE.owner else ""


def check_slot_heartbeats(s) -> None:
    rep, sb = s.report, s.sb
    hbs = []
    raw = {}
    for slot in range(sb.nslots):
        bno = sb.heartbeat_bno(slot)
        buf = s.read(bno)
        raw[slot] = bytes(buf) if buf is not None else None
        try:
            hbs.append(Heartbeat.decode(buf, bno) if buf is not None else None)
        except CorruptBlock:
            hbs.append(None)
    busy = [i for i, hb in enumerate(hbs) if hb is None or hb.state != HB_FREE]
    s.stats["live"] = 0
    s.any_mounted = bool(busy)
    if not busy:
        _refuse_if_host_busy(s)
        return
    live = dict(slotmod.live_slots(s.real, sb, watch=s.live_watch))
    for i, hb in enumerate(hbs):
        if hb is None:
            buf = s.read(sb.heartbeat_bno(i))
            now = bytes(buf) if buf is not None else None
            if now != raw[i]:
                try:
                    live[i] = Heartbeat.decode(now, sb.heartbeat_bno(i))
                except (CorruptBlock, TypeError):
                    live[i] = Heartbeat(slot=i, node="?")
    s.live = live = dict(sorted(live.items()))
    s.stats["live"] = len(live)
    if live:
        names = "; ".join(slotmod.describe(hb) for hb in live.values())
        if s.mode != "n":
            raise FsckError(f"the volume is in use: {names}; refusing to repair "
                            f"while a node is alive (only -n is allowed)")
        held = getattr(s.real, "held_freeze", None)
        if held is not None:
            rep.note(f"  the volume is in use ({names}) and held frozen from node "
                     f"'{held.node}' while it is checked: every journal is written "
                     f"home, only the heartbeats change")
        else:
            nodes = ", ".join(dict.fromkeys(f"'{hb.node}'" for hb in live.values()))
            rep.warn("volume-in-use", f"the volume is in use ({names}): checking the "
                     f"state on disk, the last written home, without what the live "
                     f"journals of {nodes} hold; findings may be transient (run "
                     f"`clusterfs fsck -n` on a node that has it mounted: it checks a "
                     f"snapshot)")
    _refuse_if_host_busy(s)
    for i, hb in enumerate(hbs):
        if i in live:
            continue
        if hb is None:
            s.bad_slots.append(i)
        elif hb.state != HB_FREE or hb.slot != i:
            s.stale_slots.append((i, hb))


def _refuse_if_host_busy(s) -> None:
    if s.host_busy:
        raise FsckError("the volume is in use: mounted on this host (its lock is "
                        "held); refusing to repair (only -n is allowed)")


def check_journals(s) -> None:
    rep, sb = s.report, s.sb
    s.stats["replayed"] = 0
    for slot in range(sb.nslots):
        if slot in s.live:
            continue
        start, length = sb.journal_range(slot)
        stale = any(i == slot for i, _ in s.stale_slots) or slot in s.bad_slots
        try:
            j = slotmod.slot_journal(s.dev, sb, slot)
            hdr = j.read_header()
        except (JournalCorrupt, ValueError) as e:
            reason = getattr(e, "reason", str(e))
            if rep.problem("journal-header", f"journal of slot {slot} has a damaged "
                           f"header ({reason})" + (": its transactions are lost"
                                                   if stale else ""),
                           "write an empty journal", safe=not stale, block=start):
                Journal.format(s.dev, start, length, slot=slot)
                s.modified = True
            continue
        if hdr.clean:
            continue
        try:
            report = j.scan()
        except JournalCorrupt as e:
            _corrupt_journal(s, slot, hdr, e)
            continue
        msg = f"journal of slot {slot} needs replay: {report.summary()}"
        replayed = rep.problem("journal-replay", msg, "replay it", safe=True, block=start)
        if replayed:
            j.replay()
            s.real.flush()
            s.modified = True
            s.stats["replayed"] += 1
        else:
            _view_only(s)
            slotmod.slot_journal(s.dev, sb, slot).replay()
        if report.torn is not None:
            t = report.torn
            rep.record("journal-torn-tail", f"journal of slot {slot} ends with a torn "
                       f"transaction {t.seq} at block {t.bno} ({t.reason})",
                       "drop it (it never committed)", replayed, safe=True, block=t.bno)
    # slots left by dead nodes, now recovered
    for i, hb in s.stale_slots:
        what = (f"slot {i} heartbeat names slot {hb.slot}" if hb.slot != i else
                f"slot {i} was left mounted by node '{hb.node}' on {hb.host or '?'} "
                f"(pid {hb.pid}), whose heartbeat has stopped")
        if rep.problem("stale-slot", what, "mark the slot free", safe=True,
                       block=sb.heartbeat_bno(i)):
            s.write(sb.heartbeat_bno(i), Heartbeat(slot=i).image(sb.heartbeat_bno(i)))
    for i in s.bad_slots:
        bno = sb.heartbeat_bno(i)
        if rep.problem("bad-heartbeat", f"heartbeat block of slot {i} is damaged",
                       "rewrite it as a free slot", safe=True, block=bno):
            s.write(bno, Heartbeat(slot=i).image(bno))
    if s.fixing:
        s.real.flush()


def finish_grow(s) -> None:
    """Finish the grow that layer 1 found unfinished (the journals are replayed, no
    node is alive): on the device when the finding is repaired, else in the overlay,
    so that the layers after check the volume as it will be."""
    if s.grow_sb is None:
        return
    if not s.grow_fix:
        if s.dev is s.real:
            s.dev = OverlayDevice(s.real)
        if s.report.repairs_allowed:
            s.report.repairs_allowed = False
            s.report.note("  (no further repairs: the grow was not finished)")
    try:
        grow.finish_grow(s.dev, s.grow_sb, tolerate_damage=True)
    except OSError as e:
        raise FsckError(f"cannot finish the interrupted grow: {e}") from None
    if s.grow_fix:
        s.modified = True


def _view_only(s) -> None:
    """A journal replay was declined: check what a replay would leave, in memory,
    and repair nothing more (repairs on top of an unreplayed journal would be
    overwritten by its replay)."""
    if s.dev is s.real:
        s.dev = OverlayDevice(s.real)
    if s.report.repairs_allowed:
        s.report.repairs_allowed = False
        s.report.note("  (no further repairs: the journal was not replayed)")


def _corrupt_journal(s, slot: int, hdr, err: JournalCorrupt) -> None:
    """Replay the transactions committed before the damage, discard the rest."""
    rep, sb = s.report, s.sb
    start, length = sb.journal_range(slot)
    log0, L = start + 1, length - 1
    hidden = []
    if log0 <= err.bno < start + length:
        pos = err.bno - log0
        while True:
            hidden.append(log0 + pos)
            pos = (pos + 1) % L
            if pos == hdr.tail_pos:
                break
    ov = OverlayDevice(s.dev, hidden=hidden)
    try:
        report = slotmod.slot_journal(ov, sb, slot).replay()
        writes = ov.written(exclude=set(hidden) | {start})
        what = (f"replay the {report.transactions} transaction(s) committed before "
                f"the damage, discard the rest and reset the journal")
    except (JournalCorrupt, ValueError):
        writes = {}
        what = "discard the journal (nothing before the damage can be replayed)"
    msg = f"journal of slot {slot} is corrupt in the middle (block {err.bno}: {err.reason})"
    fix = rep.problem("journal-corrupt", msg, what, safe=False, block=err.bno)
    if not fix:
        _view_only(s)
    for bno in sorted(writes):
        s.dev.write(bno, writes[bno])
    s.dev.flush()
    if fix:
        Journal.format(s.dev, start, length, slot=slot)
        s.modified = True
        s.stats["replayed"] = s.stats.get("replayed", 0) + 1


def check_clean(s) -> None:
    """A clean volume (no slot mounted, every journal clean) is skipped unless -f."""
    if s.force or s.report.errors() or s.any_mounted:
        hold_slot(s)
        return
    s.clean_skip = True
    s.report.end_layer(summary(s))
    hdrs = []
    for rg in range(s.sb.rgrp_count):
        buf = s.read(s.gstart[rg])
        try:
            hdrs.append(RgrpHeader.decode(buf, s.gstart[rg]))
        except (CorruptBlock, TypeError):
            hdrs.append(None)
    total = sum(s.glen)
    free = sum(h.free for h in hdrs if h)
    files = sum(h.dinodes for h in hdrs if h)
    s.report.say(f"{s.path}: clean, {files} inodes, {total - free}/{total} blocks "
                 f"(use -f to check anyway)")


def summary(s) -> str:
    return (f"{s.sb.nslots} slots, {s.stats.get('live', 0)} live, "
            f"{s.stats.get('replayed', 0)} journal(s) replayed")


# -- the slot fsck holds while it repairs -------------------------------------------

def hold_slot(s) -> None:
    """Keep a heartbeat in a free slot, so that no node mounts while fsck repairs."""
    if not s.hold_slot or s.mode == "n" or s.given_dev is not None:
        return
    for slot in range(s.sb.nslots):
        hb = slotmod.read_heartbeat(s.real, s.sb, slot)
        if hb is not None and hb.state == HB_FREE:
            break
    else:
        return
    try:
        dev = BlockDevice(s.path)
    except OSError:
        return
    w = slotmod.HeartbeatWriter(dev, s.sb, slot, "fsck", HB_NOLOCK, 1.0)
    w.set_state(HB_NOLOCK)
    stop = threading.Event()

    def beat():
        while not stop.wait(1.0):
            try:
                w.beat()
            except OSError:
                return
    t = threading.Thread(target=beat, name="fsck-heartbeat", daemon=True)
    t.start()
    s.heart = (w, dev, stop, t)


def release_slot(s) -> None:
    """Free the slot ``hold_slot`` took (if any)."""
    if s.heart is None:
        return
    w, dev, stop, t = s.heart
    s.heart = None
    stop.set()
    t.join()
    try:
        w.set_state(HB_FREE)
    finally:
        dev.close()
