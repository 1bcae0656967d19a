"""``clusterfs keygen``, ``clusterfs lockd`` and ``clusterfs lockd-status``."""

import json
import logging
import signal
import sys

import trio

from lockmgr.client import query_status
from lockmgr.errors import AuthError, ConnectError, LockError
from lockmgr.keyfile import KeyFileError, keygen, load_key
from lockmgr.server import LockServer
from lockmgr.wire import parse_addr

from ..errors import AuthRefused, ClusterfsError, UsageError

log = logging.getLogger(__name__)


def register(sub) -> None:
    """Add the lock manager's subcommands to the ``clusterfs`` parser."""
    p = sub.add_parser("keygen", help="create a shared-secret key file (mode 0600)")
    p.add_argument("keyfile", metavar="KEYFILE")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("lockd", help="run the lock manager server in the foreground")
    p.add_argument("--listen", metavar="HOST:PORT", required=True,
                   help="TCP address to listen on (port 0: any free port)")
    p.add_argument("--unix", metavar="PATH", help="also listen on this Unix socket")
    p.add_argument("--key", metavar="KEYFILE", required=True, help="shared-secret key file")
    p.add_argument("--lease", metavar="S", type=_positive, default=5.0,
                   help="seconds without heartbeat before a node is declared dead "
                        "(default 5)")
    p.add_argument("--grace", metavar="S", type=_nonneg, default=None,
                   help="reclaim period after start, in seconds (default: the lease)")
    p.add_argument("--deadlock-wait", metavar="S", type=_positive, default=1.0,
                   help="seconds a request waits before deadlock detection (default 1)")
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


def _nonneg(text: str) -> float:
    import argparse
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
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
    key = _key(args.key)
    try:
        if parse_addr(args.listen)[0] != "tcp":
            raise ValueError("--listen wants HOST:PORT (use --unix for a socket)")
    except ValueError as e:
        raise UsageError(str(e)) from None
    server = LockServer(key, lease=args.lease, grace=args.grace,
                        deadlock_wait=args.deadlock_wait)

    async def main():
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                addrs = await nursery.start(server.run, args.listen, args.unix)
                print("lockd listening on " + " ".join(addrs), file=sys.stderr,
                      flush=True)
                async for signum in signals:
                    log.info("%s: shutting down", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(main)
    except OSError as e:
        raise ClusterfsError(f"cannot listen: {e.strerror or e}") from None
    except BaseExceptionGroup as eg:  # noqa: F821 (3.11 builtin)
        oserr = eg.subgroup(OSError)
        if oserr is not None:
            e = oserr.exceptions[0]
            while isinstance(e, BaseExceptionGroup):  # noqa: F821
                e = e.exceptions[0]
            raise ClusterfsError(f"cannot listen: {e.strerror or e}") from None
        raise
    return 0


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
