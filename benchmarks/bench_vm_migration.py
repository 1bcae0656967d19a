#!/usr/bin/env python3
"""Issue 6 benchmark: save a VM on host A, restore it on host B; local directory vs clusterfs.

Runs `tests.vm.scenario.run_scenario` once on a plain local directory (the anchor: both
"hosts" see the same directory) and once across two clusterfs mounts of one volume, in
the same run, and prints save / restore seconds and the state file size of each.

    full     2 GiB guest, 1.5 GiB of its RAM filled with random data
    --quick  512 MiB guest, 256 MiB filled
    --writer cat (default, as issue 6 says: ``exec:cat > FILE``) or dd (1 MiB blocks,
             as libvirt's iohelper writes them): how the state file is written and read
    --options OPTS  mount options of both clusterfs nodes (``-o OPTS``; default none)

The LAST line printed is one JSON object:
    save_s, restore_s          clusterfs (null while clusterfs is not available)
    local_save_s, local_restore_s
    ratio                      (save_s + restore_s) / (local_save_s + local_restore_s)
    pass                       every assertion of the scenario held on every storage run
plus context keys (mem_mib, fill_mib, writer, state sizes, errors).

Exit status: 0 pass, 1 a scenario failed, 2 clusterfs storage not available (the local
anchor still runs and is reported; --local-only skips clusterfs and exits 0 on pass).
Target of issue 6: ratio <= 1.5 and pass true.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.vm.guest import GuestUnavailable, build_guest, ensure_host_tools  # noqa: E402
from tests.vm.scenario import WRITERS, ScenarioFailed, run_scenario  # noqa: E402
from tests.vm.storage import ClusterfsStorage, LocalStorage, Storage, StorageUnavailable  # noqa: E402

QUICK = (512, 256)
FULL = (2048, 1536)


def _run(storage: Storage, guest, mem_mib: int, fill_mib: int, timeout_scale: float,
         writer: str = "cat") -> dict:
    """One scenario run on STORAGE: {'result': ScenarioResult | None, 'error': str | None}."""
    t = time.monotonic()
    try:
        with storage.views() as (dir_a, dir_b):
            print(f"[{storage.name}] A={dir_a} B={dir_b}", flush=True)
            res = run_scenario(dir_a, dir_b, guest=guest, mem_mib=mem_mib, fill_mib=fill_mib,
                               timeout_scale=timeout_scale, writer=writer,
                               log=lambda m: print(f"[{storage.name}] {m}", flush=True))
    except StorageUnavailable as e:
        return {"result": None, "error": f"unavailable: {e}", "unavailable": True}
    except (ScenarioFailed, TimeoutError, RuntimeError, OSError) as e:
        print(f"[{storage.name}] FAILED after {time.monotonic() - t:.0f}s: {type(e).__name__}: {e}",
              flush=True)
        return {"result": None, "error": f"{type(e).__name__}: {e}"}
    print(f"[{storage.name}] passed {len(res.checks)} checks in {time.monotonic() - t:.0f}s", flush=True)
    return {"result": res, "error": None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="512 MiB guest, 256 MiB filled")
    ap.add_argument("--local-only", action="store_true", help="run only the local-directory anchor")
    ap.add_argument("--local-dir", type=Path, default=None,
                    help="parent of the anchor's directory (default /var/tmp)")
    ap.add_argument("--timeout-scale", type=float, default=1.0)
    ap.add_argument("--writer", choices=sorted(WRITERS), default="cat",
                    help="command that writes/reads the state file (default: cat)")
    ap.add_argument("--options", default="",
                    help="mount options of the clusterfs nodes (-o OPTS), e.g. dropbehind")
    args = ap.parse_args(argv)
    mem_mib, fill_mib = QUICK if args.quick else FULL

    summary: dict = {"save_s": None, "restore_s": None, "local_save_s": None, "local_restore_s": None,
                     "ratio": None, "pass": False, "mem_mib": mem_mib, "fill_mib": fill_mib,
                     "writer": args.writer, "mount_options": args.options}
    try:
        ensure_host_tools()
        guest = build_guest(log=lambda m: print(f"[guest] {m}", flush=True))
    except GuestUnavailable as e:
        print(f"error: cannot run a VM guest here: {e}", file=sys.stderr)
        summary["error"] = str(e)
        print(json.dumps(summary))
        return 1
    print(f"guest: {guest.kernel_package} {guest.kernel_version}, busybox {guest.busybox_version}; "
          f"{mem_mib} MiB RAM, {fill_mib} MiB filled, state written with {args.writer}", flush=True)

    local = _run(LocalStorage(args.local_dir), guest, mem_mib, fill_mib, args.timeout_scale,
                 args.writer)
    cluster = None
    if not args.local_only:
        cluster = _run(ClusterfsStorage(options=args.options), guest, mem_mib, fill_mib, args.timeout_scale,
                       args.writer)

    print()
    print(f"{'storage':<10} {'save_s':>8} {'restore_s':>10} {'state_MiB':>10}  status")
    for name, run in (("local", local), ("clusterfs", cluster)):
        if run is None:
            continue
        r = run["result"]
        if r is None:
            print(f"{name:<10} {'-':>8} {'-':>10} {'-':>10}  {run['error']}")
        else:
            print(f"{name:<10} {r.save_s:>8.2f} {r.restore_s:>10.2f} {r.state_bytes / 2**20:>10.0f}  pass")

    lr = local["result"]
    if lr is not None:
        summary.update(local_save_s=lr.save_s, local_restore_s=lr.restore_s,
                       local_state_bytes=lr.state_bytes)
    else:
        summary["local_error"] = local["error"]
    status = 0 if lr is not None else 1
    if cluster is None:
        summary["pass"] = lr is not None
    else:
        cr = cluster["result"]
        if cr is not None:
            summary.update(save_s=cr.save_s, restore_s=cr.restore_s, state_bytes=cr.state_bytes)
            if lr is not None:
                summary["ratio"] = round((cr.save_s + cr.restore_s) / (lr.save_s + lr.restore_s), 3)
        else:
            summary["clusterfs_error"] = cluster["error"]
            if cluster.get("unavailable"):
                print(f"\nclusterfs: {cluster['error']} (no clusterfs numbers; ratio null)", file=sys.stderr)
                status = max(status, 2)
            else:
                status = 1
        summary["pass"] = lr is not None and cr is not None
    print(json.dumps(summary))
    return status


if __name__ == "__main__":
    sys.exit(main())
