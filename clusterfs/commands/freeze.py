"""``clusterfs freeze`` and ``clusterfs thaw``: stop every change to a volume on every
node, and let them go on.

``freeze TARGET`` (a mount point, or a volume mounted on this machine) asks that
mount process to freeze the volume cluster-wide (``cluster.admin``: every node writes
its changes home and holds new ones back; they wait, they do not fail).  It returns
once the volume on disk is consistent and quiet.  The freeze ends with ``thaw
TARGET`` on the same machine, or by itself after ``--timeout`` seconds.
"""

from __future__ import annotations

from .. import control
from ..control import FREEZE_TIMEOUT, FREEZE_WAIT
from ..errors import ClusterfsError


class FreezeFailed(ClusterfsError):
    """The volume could not be frozen (or thawed)."""


def _positive(text: str) -> float:
    import argparse
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"needs a number of seconds above 0: {text!r}")
    return value


def run_freeze(args) -> int:
    info = control.find(args.target)
    try:
        answer = control.call(info, {"op": "freeze", "timeout": args.timeout,
                                     "wait": args.wait}, timeout=args.wait + 30)
    except control.ControlError as e:
        raise FreezeFailed(f"{args.target}: {e}") from None
    if not args.quiet:
        print(f"{args.target}: frozen on every node in {answer['took_s']:.3f}s "
              f"(from node {answer['node']}; thaws by itself in {args.timeout:g}s)")
    return 0


def run_thaw(args) -> int:
    info = control.find(args.target)
    try:
        answer = control.call(info, {"op": "thaw"}, timeout=30)
    except control.ControlError as e:
        raise FreezeFailed(f"{args.target}: {e}") from None
    if not answer["thawed"]:
        raise FreezeFailed(f"{args.target}: not frozen from this node "
                           f"({info['mountpoint']})")
    if not args.quiet:
        print(f"{args.target}: thawed")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "freeze", help="freeze a mounted volume on every node (for a snapshot)",
        description="Freeze the volume mounted at TARGET (a mount point, or a volume "
                    "mounted on this machine) on every node: each node writes its "
                    "changes home and holds new ones back until the thaw.  Returns once "
                    "the volume on disk is consistent and quiet.")
    p.add_argument("target", metavar="TARGET", help="mount point or volume")
    p.add_argument("--timeout", type=_positive, default=FREEZE_TIMEOUT, metavar="S",
                   help=f"thaw by itself after S seconds (default {FREEZE_TIMEOUT:g})")
    p.add_argument("--wait", type=_positive, default=FREEZE_WAIT, metavar="S",
                   help="give up when the nodes have not frozen within S seconds "
                        f"(default {FREEZE_WAIT:g})")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing")
    p.set_defaults(func=run_freeze)
    p = sub.add_parser("thaw", help="thaw a volume frozen by `clusterfs freeze`",
                       description="End the freeze made from this machine's mount of "
                                   "TARGET: every node's changes go on.")
    p.add_argument("target", metavar="TARGET", help="mount point or volume")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing")
    p.set_defaults(func=run_thaw)
