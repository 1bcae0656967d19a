"""``clusterfs status VOLUME``: who has the volume mounted, and in what state.

Reads the superblock, every slot's heartbeat and journal header (no lock needed,
nothing written).  A heartbeat is "live" when its counter advances while watched
(``--watch`` seconds; 0 skips watching and shows only the heartbeat age).  Given
the lock manager (``--lockd``/``--key`` or the address recorded by mkfs) it adds
each node's lease, lock counts, the nodes awaiting recovery and the cluster open
modes (which node has which file open for writing).
"""

from __future__ import annotations

import json
import os
import time

import trio

from journal import JournalCorrupt

from ..errors import ClusterfsError, UsageError
from ..fs.volume import Volume
from ..ondisk import slots as slotmod
from ..ondisk.format import HB_FREE, HB_STATE_NAMES


def gather(path: str, *, watch: float = 1.5, lockd: str | None = None,
           key: bytes | None = None) -> dict:
    """Everything ``status`` shows, as a dict (also what ``--json`` prints)."""
    vol = Volume.open(path, readonly=True)
    try:
        sb = vol.sb
        hbs = slotmod.read_heartbeats(vol.dev, sb)
        live = {}
        if watch > 0:
            live = slotmod.live_slots(vol.dev, sb, watch=watch)
        now = time.time_ns()
        slots = []
        for i, hb in enumerate(hbs):
            try:
                hdr = slotmod.slot_journal(vol.dev, sb, i).read_header()
                jstate = "clean" if hdr.clean else "dirty"
                jowner = hdr.owner
            except JournalCorrupt as e:
                jstate, jowner = f"corrupt ({e.reason})", ""
            entry = {"slot": i, "journal": jstate, "journal_owner": jowner}
            if hb is None:
                entry.update(state="unreadable", node="", mounted=False)
            else:
                age = (now - hb.timestamp_ns) / 1e9 if hb.timestamp_ns else None
                entry.update(state=HB_STATE_NAMES.get(hb.state, str(hb.state)),
                             node=hb.node, host=hb.host, pid=hb.pid, counter=hb.counter,
                             heartbeat_age=round(age, 3) if age is not None else None,
                             live=(i in live) if watch > 0 else None,
                             mounted=hb.state != HB_FREE and (i in live or watch <= 0))
            slots.append(entry)
        out = {"volume": path, "uuid": sb.uuid.hex(), "label": sb.label,
               "blocks": sb.total_blocks, "slots": slots,
               "cluster": sb.cluster_name, "lockd": lockd or sb.lockd_addr}
    finally:
        vol.close()
    if lockd and key is not None:
        out["lock_manager"] = trio.run(_lockd_status, lockd, key)
        rec = {r["slot"] for r in out["lock_manager"].get("recovering", [])}
        for entry in out["slots"]:
            if entry["slot"] in rec:
                entry["journal"] += " (awaiting recovery)"
    return out


async def _lockd_status(addr: str, key: bytes) -> dict:
    """The lock manager's status, with the cluster open modes (the ``W`` locks) as
    ``open_modes``: node, slot, inode, mode (EX: the one writer; CW: one of the
    writers of a multi-writer file)."""
    from lockmgr import query_status

    from ..cluster.locks import WRITE, lock_number
    st = await query_status(addr, key, prefix=WRITE)
    st["open_modes"] = sorted(
        ({"node": h["node"], "slot": h["slot"], "inode": lock_number(h["name"]),
          "mode": h["mode"], "dead": h["dead"]} for h in st.pop("held", [])),
        key=lambda m: (m["inode"], m["node"]))
    return st


def render(st: dict) -> str:
    lines = [f"volume {st['volume']}  uuid {st['uuid']}  label {st['label'] or '-'}"]
    if st.get("cluster") or st.get("lockd"):
        lines.append(f"cluster {st.get('cluster') or '-'}  lock manager {st.get('lockd') or '-'}")
    lines.append(f"{'slot':>4}  {'node':<16} {'state':<12} {'heartbeat':<22} {'journal':<12}")
    for s in st["slots"]:
        if s["state"] in ("free",) and not s.get("node"):
            hb = "-"
        elif s.get("heartbeat_age") is None:
            hb = "never"
        else:
            live = {True: "live", False: "stopped", None: ""}[s.get("live")]
            hb = f"{s['heartbeat_age']:.1f}s ago {live}".strip()
        lines.append(f"{s['slot']:>4}  {s.get('node') or '-':<16} {s['state']:<12} "
                     f"{hb:<22} {s['journal']}")
    lm = st.get("lock_manager")
    if lm:
        lines.append(f"lock manager: up {lm.get('uptime', 0):.0f}s, lease {lm.get('lease')}s, "
                     f"{lm.get('locks', 0)} locks held, {lm.get('waiters', 0)} waiting"
                     + (f", grace {lm['grace_left']:.1f}s left" if lm.get("grace_left") else ""))
        for n in lm.get("nodes", []):
            lines.append(f"  node {n['node']} (slot {n['slot']}): lease renewed "
                         f"{n['lease_age']:.1f}s ago, {n['locks']} locks, {n['waiting']} waiting")
        for n in lm.get("recovering", []):
            lines.append(f"  node {n['node']} (slot {n['slot']}): DEAD, {n['locks']} locks "
                         f"held until recovered")
        for m in lm.get("open_modes", []):
            what = "open for writing" + (" (multi-writer)" if m["mode"] == "CW" else "")
            dead = " (dead: until it is recovered)" if m.get("dead") else ""
            lines.append(f"  node {m['node']} has inode {m['inode']} {what}{dead}")
    return "\n".join(lines)


def cmd_status(args) -> int:
    lockd = args.lockd
    key = None
    if args.key:
        from lockmgr import KeyFileError, load_key
        try:
            key = load_key(args.key)
        except KeyFileError as e:
            raise UsageError(str(e)) from None
    if lockd is None and key is not None:
        vol = Volume.open(args.volume, readonly=True)
        lockd = vol.sb.lockd_addr or None
        vol.close()
    if not os.path.exists(args.volume):
        raise UsageError(f"{args.volume} does not exist")
    from lockmgr import LockError
    try:
        st = gather(args.volume, watch=args.watch, lockd=lockd if key else None, key=key)
    except (OSError, LockError) as e:
        raise ClusterfsError(f"lock manager {lockd}: {e}") from None
    print(json.dumps(st, indent=2) if args.json else render(st))
    return 0


def register(sub) -> None:
    p = sub.add_parser("status", help="show the slots, heartbeats and journals of a volume",
                       description=__doc__.splitlines()[0])
    p.add_argument("volume", help="image file or block device")
    p.add_argument("--lockd", metavar="ADDR", help="lock manager to ask as well")
    p.add_argument("--key", metavar="KEYFILE", help="key file for the lock manager")
    p.add_argument("--watch", type=float, default=1.5,
                   help="seconds to watch heartbeats for liveness (0: don't)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_status)
