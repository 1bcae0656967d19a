"""``clusterfs fsck VOLUME [-n | -y | -p] [-f] [-q] [--scan-data] [--json FILE]
[--snapshot-dir DIR | --frozen]``.

e2fsck conventions:

* ``-n`` opens the volume read-only and changes nothing (journals of dead nodes are
  replayed in memory only, so the check sees what a replay would leave);
* ``-y`` repairs everything;
* ``-p`` ("preen") repairs what is safe without asking (journal replay, stale slots,
  leaked or unmarked blocks, counters, orphans, block counts) and stops at anything
  else with "UNEXPECTED INCONSISTENCY" (exit 4);
* none of these: on a terminal, fsck asks before each repair ([y]es, [n]o, [a]ll,
  [q]uit).  Not on a terminal it checks only, as ``-n`` does (and says so): a script
  that forgot the option never repairs by surprise.

Exit status, ORed together as e2fsck does: 0 no errors, 1 errors corrected, 4 errors
left uncorrected, 8 operational error (cannot open or parse the volume, a node is
still alive and a repair was asked for, internal error), 16 usage error, 32 cancelled
by the user.

A mounted volume (``fsck.online``): with ``-n``, when a cluster member of this
machine has it mounted, fsck checks a snapshot of it (taken through that member into
a temporary file of ``--snapshot-dir``, deleted after), or with ``--frozen`` the live
device while every node is held frozen; mounted only by nodes elsewhere, the state on
disk without their live journals, and it says so (exit status as ever: a 4 there may
come from a change in flight).  The last line names the state checked.  Interrupted
(Ctrl-C, SIGTERM, SIGHUP), such a run deletes its snapshot and lets the freeze go
(exit status 130).  ``-y``, ``-p`` and the questions are refused while any node is
alive.

A clean volume (no slot mounted, every journal clean) is skipped after the volume and
cluster layers unless ``-f``.  On a terminal (stderr) each pass draws one line of
progress (``clusterfs.progress``), erased when the pass ends; ``-q`` draws none, and
neither does a run whose stderr is not a terminal.  Each layer ends with one
summary line.  ``--json FILE`` (``-`` for stdout) writes every
finding as a machine-readable report.
"""

from __future__ import annotations

import contextlib
import sys

from . import online
from .checker import Fsck
from .report import EXIT_USAGE, Report

# The checkers of this process's run when it ends right after (``clusterfs.cli.run``).
_HELD: list = []


def cmd_fsck(args) -> int:
    mode = args.mode
    interactive = sys.stdin.isatty() and sys.stderr.isatty()
    note = None
    if mode is None:
        if interactive:
            mode = "ask"
        else:
            mode = "n"
            note = ("not a terminal and none of -n, -y, -p given: checking only "
                    "(as with -n)")
    if (args.frozen or args.snapshot_dir is not None) and mode != "n":
        what = "--frozen" if args.frozen else "--snapshot-dir"
        print(f"clusterfs fsck: {what} goes with -n (a mounted volume is checked, "
              f"never repaired)", file=sys.stderr)
        return EXIT_USAGE
    if args.snapshot_dir is not None:
        try:
            online.check_snapshot_dir(args.snapshot_dir)
        except online.OnlineError as e:
            print(f"clusterfs fsck: {e}", file=sys.stderr)
            return e.exit
    out = sys.stderr if args.json == "-" else sys.stdout
    report = Report(mode, out=out, err=sys.stderr,
                    progress=sys.stderr.isatty() and not args.quiet)
    if note:
        report.note(note)
    member = online.local_member(args.volume) if mode == "n" else None
    try:
        with online.interruptible(), _source(args, member, report) as (device, checked):
            checker = Fsck(args.volume, mode=mode, force=args.force or checked is not None,
                           scan_data=args.scan_data, report=report, device=device)
            code = checker.check()
    except online.OnlineError as e:
        print(f"clusterfs fsck: {args.volume}: {e}", file=sys.stderr)
        return e.exit
    if args.exiting:
        _HELD.append(checker)   # freed by the process's exit, not object by object
    last = online.outcome(args.volume, checked,
                          [hb.node for hb in checker.state.live.values()])
    if last is not None and report.operational_error is None:
        report.note(last)
    if args.json:
        what = checked.as_dict() if checked is not None else {
            "state": "on-disk",
            "live_nodes": [hb.node for hb in checker.state.live.values()]}
        try:
            report.write_json(args.json, args.volume,
                              {"stats": checker.stats, "checked": what})
        except OSError as e:
            print(f"clusterfs fsck: cannot write {args.json}: {e.strerror or e}",
                  file=sys.stderr)
            code |= 8
    return code


@contextlib.contextmanager
def _source(args, member: dict | None, report: Report):
    """What the run reads: ``(device, Checked)``: ``(None, None)`` for the volume as
    it is; a snapshot of it, or the live device held frozen, when a cluster member of
    this machine has it mounted (``fsck.online``)."""
    volume = args.volume
    if member is None:
        if args.frozen:
            report.note(f"{volume}: no cluster member of this machine has it mounted: "
                        f"nothing to freeze (--frozen)")
        yield None, None
        return
    if args.frozen:
        with online.frozen(volume, member) as checked:
            report.note(f"{volume}: mounted here by node '{member.get('node')}': "
                        f"checking the live volume held frozen on every node (their "
                        f"writes wait until the check ends)")
            dev = online.open_frozen(volume, checked)
            try:
                yield dev, checked
            finally:
                dev.close()
        return
    directory = online.snapshot_dir(volume, args.snapshot_dir)
    with online.snapshot(volume, member, directory,
                         quiet=not report.progress.enabled) as (path, checked):
        report.note(f"{volume}: mounted here by node '{member.get('node')}': checking "
                    f"a snapshot of it ({checked.method} in {directory}, deleted after "
                    f"the check)")
        dev = online.open_snapshot(path)
        try:
            yield dev, checked
        finally:
            dev.close()


def register(sub) -> None:
    p = sub.add_parser(
        "fsck", help="check and repair a volume (layer by layer)",
        description="Check a clusterfs volume layer by layer (volume, cluster, "
                    "allocation, inodes and extents, namespace, data) and repair it. "
                    "Exit status: 0 clean, 1 corrected, 4 uncorrected, 8 operational "
                    "error, 16 usage error, 32 cancelled.")
    p.usage_exitcode = 16

    def strict(args=None, namespace=None):
        # unknown arguments are this parser's usage error (exit 16), not the main
        # parser's (which would exit 2)
        ns, extras = type(p).parse_known_args(p, args, namespace)
        if extras:
            p.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns, []
    p.parse_known_args = strict
    p.add_argument("volume", help="image file or block device")
    how = p.add_mutually_exclusive_group()
    how.add_argument("-n", dest="mode", action="store_const", const="n",
                     help="check only: open read-only, change nothing")
    how.add_argument("-y", dest="mode", action="store_const", const="y",
                     help="repair everything without asking")
    how.add_argument("-p", "-a", dest="mode", action="store_const", const="p",
                     help="repair what is safe without asking; stop at anything else")
    p.add_argument("-f", "--force", action="store_true",
                   help="check even if the volume is clean")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="draw no progress (findings and summaries are printed as ever)")
    p.add_argument("--scan-data", action="store_true",
                   help="also read every allocated data extent (layer 6)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--snapshot-dir", metavar="DIR",
                       help="a mounted volume (-n): put the snapshot checked in DIR "
                            "(default: the image file's directory, or /var/tmp)")
    where.add_argument("--frozen", action="store_true",
                       help="a mounted volume (-n): check the live device while every "
                            "node is held frozen, instead of a snapshot")
    p.add_argument("--json", metavar="FILE",
                   help="write a machine-readable report of every finding ('-': stdout)")
    p.set_defaults(func=cmd_fsck, mode=None, fast_exit=True)
