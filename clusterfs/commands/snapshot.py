"""``clusterfs snapshot VOLUME DEST``: a consistent copy of a volume, mounted or not
(``clusterfs.snapshot``: freeze, copy, thaw, then a new UUID for the copy)."""

from __future__ import annotations

import sys

from ..snapshot import take


def run(args) -> int:
    snap = take(args.volume, args.dest, hook=args.hook, quiet=args.quiet, force=args.force)
    if not args.quiet:
        how = snap.method + (f", {snap.copied / (1 << 20):.1f} MiB of data"
                             if snap.method in ("sparse copy", "copy") else "")
        frozen = (f"frozen {snap.frozen_s:.3f}s from node {snap.node} "
                  f"(the freeze took {snap.freeze_took_s:.3f}s)" if snap.node
                  else "not mounted: no freeze needed")
        print(f"snapshot of {args.volume} in {snap.dest} ({how}); {frozen}; "
              f"new volume UUID {snap.uuid}", file=sys.stdout)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "snapshot", help="copy a volume consistently (freeze, copy, thaw)",
        description="Copy VOLUME to DEST while every node holds its changes back: a "
                    "reflink clone of the image file where the host file system allows "
                    "it, a sparse copy otherwise, or what --hook does (an LVM or SAN "
                    "snapshot).  The copy gets a new volume UUID, so it mounts beside "
                    "the original.")
    p.add_argument("volume", metavar="VOLUME", help="the volume (image file or device)")
    p.add_argument("dest", metavar="DEST", help="the snapshot to make")
    p.add_argument("--hook", metavar="CMD",
                   help="run CMD (a shell command) to copy instead; it finds "
                        "$CLUSTERFS_VOLUME and $CLUSTERFS_SNAPSHOT in its environment")
    p.add_argument("-f", "--force", action="store_true", help="replace DEST if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing, no progress")
    p.set_defaults(func=run)
