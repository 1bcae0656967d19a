"""``clusterfs status VOLUME``: who has the volume mounted, and in what state.

Reads the superblock, the lease block (the lock manager's master: node, slot,
address, since when, election generation), every slot's heartbeat and journal header
(no lock needed, nothing written).  A heartbeat is "live" when its counter advances
while watched (``--watch`` seconds; 0 skips watching and shows only the heartbeat
age).  With the cluster's key (``--key``) it asks the master too: each member's
connection to it and lease, lock counts, the nodes awaiting recovery and the cluster
open modes (which node has which file open for writing).
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
from ..ondisk.lease import read_lease


def master_of(lease, hbs) -> dict | None:
    """The master as the lease block names it (None: no master was ever elected)."""
    if lease is None:
        return {"state": "unreadable"}
    if lease.owner < 0:
        return None
    slot = next((i for i, hb in enumerate(hbs) if hb is not None and hb.state != HB_FREE
                 and hb.node == lease.node), None)
    now = time.time_ns()
    return {"node": lease.node, "slot": slot, "address": lease.addr,
            "generation": lease.generation, "renewals": lease.counter,
            "since": time.strftime("%Y-%m-%d %H:%M:%S",
                                   time.localtime(lease.acquired_ns / 1e9)),
            "since_s": round((now - lease.acquired_ns) / 1e9, 3),
            "renewed_age": round((now - lease.renewed_ns) / 1e9, 3)}


def gather(path: str, *, watch: float = 1.5, key: bytes | None = None) -> dict:
    """Everything ``status`` shows, as a dict (also what ``--json`` prints)."""
    vol = Volume.open(path, readonly=True)
    try:
        sb = vol.sb
        hbs = slotmod.read_heartbeats(vol.dev, sb)
        master = master_of(read_lease(vol.dev, sb), hbs)
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
            jstart, _length = sb.journal_range(i)
            entry = {"slot": i, "journal": jstate, "journal_owner": jowner,
                     "added": i >= sb.fixed_slots, "heartbeat_block": sb.heartbeat_bno(i),
                     "journal_block": jstart}
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
               "blocks": sb.total_blocks, "nslots": sb.nslots,
               "fixed_slots": sb.fixed_slots, "slots": slots,
               "cluster": sb.cluster_name, "master": master}
    finally:
        vol.close()
    if key is not None and master and master.get("address"):
        out["lock_manager"] = trio.run(_lockd_status, master["address"], key)
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
    if st.get("cluster"):
        lines.append(f"cluster {st['cluster']}")
    m = st.get("master")
    if m is None:
        lines.append("lock manager: no master elected (no cluster mount yet)")
    elif "node" not in m:
        lines.append("lock manager: the lease block is unreadable")
    else:
        slot = f"slot {m['slot']}" if m["slot"] is not None else "no slot"
        lines.append(f"lock manager master: node {m['node']} ({slot}) at {m['address']}, "
                     f"since {m['since']}, generation {m['generation']}, lease renewed "
                     f"{m['renewed_age']:.1f}s ago")
    added = st["nslots"] - st["fixed_slots"]
    lines.append(f"{st['nslots']} slots" + (f" ({st['fixed_slots']} made by mkfs, {added} "
                                            f"added: marked +)" if added else ""))
    lines.append(f"{'slot':>4}  {'node':<16} {'state':<12} {'heartbeat':<22} {'journal':<12}")
    for s in st["slots"]:
        if s["state"] in ("free",) and not s.get("node"):
            hb = "-"
        elif s.get("heartbeat_age") is None:
            hb = "never"
        else:
            live = {True: "live", False: "stopped", None: ""}[s.get("live")]
            hb = f"{s['heartbeat_age']:.1f}s ago {live}".strip()
        slot = f"+{s['slot']}" if s.get("added") else str(s["slot"])
        lines.append(f"{slot:>4}  {s.get('node') or '-':<16} {s['state']:<12} "
                     f"{hb:<22} {s['journal']}")
    lm = st.get("lock_manager")
    if lm:
        lines.append(f"lock manager: up {lm.get('uptime', 0):.0f}s, lease {lm.get('lease')}s, "
                     f"{lm.get('locks', 0)} locks held, {lm.get('waiters', 0)} waiting"
                     + (f", grace {lm['grace_left']:.1f}s left" if lm.get("grace_left") else ""))
        for n in lm.get("nodes", []):
            conn = "connected" if n.get("connected") else "NOT CONNECTED"
            how = f" ({n['opened']} session)" if n.get("opened") else ""
            lines.append(f"  node {n['node']} (slot {n['slot']}): {conn}{how}, lease "
                         f"renewed {n['lease_age']:.1f}s ago, {n['locks']} locks, "
                         f"{n['waiting']} waiting")
        for n in lm.get("recovering", []):
            lines.append(f"  node {n['node']} (slot {n['slot']}): DEAD, {n['locks']} locks "
                         f"held until recovered")
        for m in lm.get("open_modes", []):
            what = "open for writing" + (" (multi-writer)" if m["mode"] == "CW" else "")
            dead = " (dead: until it is recovered)" if m.get("dead") else ""
            lines.append(f"  node {m['node']} has inode {m['inode']} {what}{dead}")
    return "\n".join(lines)


def cmd_status(args) -> int:
    key = None
    if args.key:
        from lockmgr import KeyFileError, load_key
        try:
            key = load_key(args.key)
        except KeyFileError as e:
            raise UsageError(str(e)) from None
    if not os.path.exists(args.volume):
        raise UsageError(f"{args.volume} does not exist")
    from lockmgr import LockError
    try:
        st = gather(args.volume, watch=args.watch, key=key)
    except (OSError, LockError) as e:
        raise ClusterfsError(f"lock manager: {e}") from None
    print(json.dumps(st, indent=2) if args.json else render(st))
    return 0


def register(sub) -> None:
    p = sub.add_parser("status", help="show the slots, heartbeats and journals of a volume",
                       description=__doc__.splitlines()[0])
    p.add_argument("volume", help="image file or block device")
    p.add_argument("--key", metavar="KEYFILE",
                   help="the cluster's key file: ask the lock manager's master as well")
    p.add_argument("--watch", type=float, default=1.5,
                   help="seconds to watch heartbeats for liveness (0: don't)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_status)
