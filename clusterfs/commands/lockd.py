"""``clusterfs keygen``, ``clusterfs lockd`` and ``clusterfs lockd-status``.

``clusterfs lockd VOLUME`` runs a lock manager candidate in the foreground
(``cluster/lockd.py``): what every cluster mount runs as its child, here on its own,
for a node that serves the lock manager without mounting the volume.
"""

import json
import logging
import os
import sys

import trio

from lockmgr.client import query_status
from lockmgr.errors import AuthError, ConnectError, LockError
from lockmgr.keyfile import KeyFileError, keygen, load_key
from lockmgr.wire import parse_addr

from ..errors import AuthRefused, ClusterfsError, UsageError

log = logging.getLogger(__name__)


def register(sub) -> None:
    """Add the lock manager's subcommands to the ``clusterfs`` parser."""
    p = sub.add_parser("keygen", help="create a shared-secret key file (mode 0600)")
    p.add_argument("keyfile", metavar="KEYFILE")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("lockd", help="run a lock manager candidate in the foreground",
                       description="Stand as a lock manager candidate of the volume's "
                                   "cluster (what every cluster mount runs), without "
                                   "mounting it: when elected through the volume's lease "
                                   "block it serves the members.")
    p.add_argument("volume", help="image file or block device")
    p.add_argument("--key", metavar="KEYFILE", required=True, help="shared-secret key file")
    p.add_argument("--listen", metavar="HOST:PORT",
                   help="where to serve when elected (port 0: any free port; default: "
                        "the first non-loopback address, port 7789)")
    p.add_argument("--node", help="node name written in the lease block (default: host "
                                  "name)")
    p.add_argument("--lease", metavar="S", type=_positive, default=None,
                   help="the members' lease in seconds (default 8; every node must use "
                        "the same)")
    p.set_defaults(func=cmd_lockd)

    p = sub.add_parser("lockd-status", help="show the lock manager's nodes and locks")
    p.add_argument("addr", metavar="ADDR", help="HOST:PORT or unix:PATH")
    p.add_argument("--key", metavar="KEYFILE", required=True, help="shared-secret key file")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_status)


def _positive(text: str) -> float:
    import argparse
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return v


def _key(path: str) -> bytes:
    try:
        return load_key(path)
    except KeyFileError as e:
        raise UsageError(str(e)) from None


def cmd_keygen(args) -> int:
    try:
        keygen(args.keyfile, force=args.force)
    except KeyFileError as e:
        raise ClusterfsError(str(e)) from None
    print(f"wrote key file {args.keyfile}", file=sys.stderr)
    return 0


def cmd_lockd(args) -> int:
    import socket

    from ..cluster.lockd import DEFAULT_LEASE, default_listen, run_lockd
    key = _key(args.key)
    listen = args.listen or default_listen()
    try:
        if parse_addr(listen)[0] != "tcp":
            raise ValueError(f"--listen wants HOST:PORT, not {listen}")
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not os.path.exists(args.volume):
        raise UsageError(f"{args.volume} does not exist")
    return run_lockd(args.volume, key, listen=listen, node=args.node or socket.gethostname(),
                     lease=args.lease or DEFAULT_LEASE)


def cmd_status(args) -> int:
    key = _key(args.key)
    try:
        parse_addr(args.addr)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        st = trio.run(query_status, args.addr, key)
    except AuthError as e:
        raise AuthRefused(str(e)) from None
    except (ConnectError, LockError) as e:
        raise ClusterfsError(str(e)) from None
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
        return 0
    print(format_status(st))
    return 0


def format_status(st: dict) -> str:
    """The human-readable form of a status dict."""
    lines = [f"lock server {st['boot_id']}: up {st['uptime']:.1f}s, lease {st['lease']}s"
             + (f", grace {st['grace_left']:.1f}s left" if st["grace_left"] else "")
             + (", FROZEN (nothing new granted)" if st["frozen"] else ""),
             f"{st['resources']} resources, {st['locks']} locks granted, "
             f"{st['waiters']} waiting, {st['connections']} connections"]
    lines.append(f"{'NODE':<16} {'SLOT':>4} {'SESSION':>7} {'CONN':>4} "
                 f"{'LEASE AGE':>9} {'LOCKS':>6} {'WAITING':>7}")
    for n in sorted(st["nodes"], key=lambda n: n["slot"]):
        lines.append(f"{n['node']:<16} {n['slot']:>4} {n['session']:>7} "
                     f"{'yes' if n['connected'] else 'no':>4} {n['lease_age']:>8.2f}s "
                     f"{n['locks']:>6} {n['waiting']:>7}")
    if not st["nodes"]:
        lines.append("(no nodes)")
    for r in st["recovering"]:
        lines.append(f"RECOVERING: node {r['node']} slot {r['slot']} "
                     f"(session {r['session']}): {r['locks']} locks held until "
                     f"recovery" + (" (locks unknown: server restarted)"
                                    if r["unknown_locks"] else ""))
    return "\n".join(lines)
