"""The ``clusterfs`` command: one entry point, one subcommand per tool.

Each tool module offers ``register(subparsers)``, which adds its parser and sets
``func`` (called with the parsed arguments; returns the exit status).  A
``ClusterfsError`` becomes one line on stderr and the exit status of its class
(``exit_status``: the one place that maps errors to exit codes); a bad argument is
one line and exit status 2 (``fsck`` uses e2fsck's 16).
"""

import argparse
import importlib
import logging
import os
import sys

from .errors import (AuthRefused, ClusterUnreachable, ClusterfsError, MountFailed,
                     UsageError, VolumeBusy, VolumeError)

# (command, module that registers it, one line of help), in `clusterfs --help` order.
# Only the module of the command being run is imported: the others add a stub
# parser for the listing, so `clusterfs fsck` does not pay for pyfuse3 or trio.
COMMANDS: list[tuple[str, str, str]] = [
    ("mkfs", "clusterfs.commands.mkfs", "make a new clusterfs volume"),
    ("mount", "clusterfs.commands.mount", "mount a volume through FUSE"),
    ("status", "clusterfs.commands.status", "show the slots, heartbeats and journals of a volume"),
    ("add-slots", "clusterfs.commands.addslots", "add node slots (heartbeat and journal each) from free space"),
    ("install-units", "clusterfs.commands.units", "install the mount helper and a boot mount"),
    ("fsck", "fsck.cli", "check and repair a volume layer by layer"),
    ("grow", "clusterfs.commands.grow", "grow a volume into the space added to its device"),
    ("clone", "clusterfs.commands.clone",
     "clone a file on a mounted volume (shared blocks, copy-on-write)"),
    ("freeze", "clusterfs.commands.freeze",
     "freeze a mounted volume on every node (for a snapshot)"),
    ("thaw", "clusterfs.commands.freeze", "thaw a volume frozen by `clusterfs freeze`"),
    ("snapshot", "clusterfs.commands.snapshot",
     "copy a volume consistently (freeze, copy, thaw)"),
    ("keygen", "clusterfs.commands.lockd", "create a shared-secret key file (mode 0600)"),
    ("lockd", "clusterfs.commands.lockd", "run the lock manager server in the foreground"),
    ("lockd-status", "clusterfs.commands.lockd", "show the lock manager's nodes and locks"),
]

# Exit status of each kind of user-facing error (the first class in this order that
# the error is an instance of; any other ``ClusterfsError``: 1).
EXIT_STATUS: list[tuple[type, int]] = [
    (UsageError, 2),
    (AuthRefused, 3),
    (VolumeError, 8),            # FormatMismatch included
    (ClusterUnreachable, 8),
    (VolumeBusy, 16),
    (MountFailed, 32),
]


def exit_status(e: ClusterfsError) -> int:
    """The exit status of a command that failed with ``e``."""
    for cls, status in EXIT_STATUS:
        if isinstance(e, cls):
            return status
    return 1


# Set by ``main`` from the command's ``fast_exit`` default; read by ``run``.
_fast_exit = False

# Modules that provide subcommands (each has ``register(subparsers)``).
SUBCOMMAND_MODULES: list[str] = list(dict.fromkeys(m for _c, m, _h in COMMANDS))


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and a chosen exit status."""

    usage_exitcode = 2

    def error(self, message):
        self.exit(self.usage_exitcode, f"{self.prog}: error: {message}\n")


def chosen_command(argv) -> str | None:
    """The subcommand named on the command line (the first non-option word)."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg
    return None


def build_parser(argv=None) -> argparse.ArgumentParser:
    """The parser; only the module of the command in ``argv`` is imported (all of
    them when ``argv`` is None)."""
    parser = OneLineParser(prog="clusterfs",
                           description="clusterfs: a clustered shared-disk file system: "
                                       "several hosts mount one volume through FUSE.")
    parser.add_argument("--debug", action="store_true", help="verbose logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND",
                                parser_class=OneLineParser)
    sub.required = True
    chosen = chosen_command(argv) if argv is not None else None
    load = {m for c, m, _h in COMMANDS if argv is None or c == chosen}
    registered = set()
    for command, module, help_text in COMMANDS:
        if module in load:
            if module not in registered:
                importlib.import_module(module).register(sub)
                registered.add(module)
        else:
            sub.add_parser(command, help=help_text, add_help=False)
    return parser


def setup_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s.%(msecs)03d %(name)s %(levelname)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def main(argv=None, *, exiting: bool = False) -> int:
    """Run one command; returns its exit status.  ``exiting``: the process ends right
    after (``run``), so a command may leave its heap for the exit to drop."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "debug", False))
    global _fast_exit
    _fast_exit = exiting and getattr(args, "fast_exit", False)
    args.exiting = exiting
    try:
        rc = args.func(args)
    except ClusterfsError as e:
        print(f"clusterfs {args.command}: {e}", file=sys.stderr)
        return exit_status(e)
    except KeyboardInterrupt:
        print(f"clusterfs {args.command}: interrupted", file=sys.stderr)
        return 130
    return rc or 0


def run() -> None:
    """The program's entry point (``clusterfs`` and ``python -m clusterfs.cli``).

    A command that leaves a large heap behind (``fsck`` keeps a record per inode) sets
    ``fast_exit``: once its output is flushed, the process ends without freeing
    that heap object by object (0.4 s for a volume of 100,000 files).
    """
    rc = main(sys.argv[1:], exiting=True)
    if _fast_exit:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":
    run()
