"""The ``clusterfs`` command: one entry point, one subcommand per tool.

Each tool module offers ``register(subparsers)``, which adds its parser and sets
``func`` (called with the parsed arguments; returns the exit status).  A
``QuietError`` becomes one line on stderr and its exit code; a bad argument is one
line and exit status 2 (``fsck`` uses e2fsck's 16).
"""

import argparse
import importlib
import logging
import sys

from .errors import QuietError

# Modules that provide subcommands, in the order `clusterfs --help` lists them.
SUBCOMMAND_MODULES: list[str] = [
    "clusterfs.mkfs",
    "clusterfs.mount",
    "clusterfs.status",
    "fsck.cli",
    "lockmgr.cli",
]


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and a chosen exit status."""

    usage_exitcode = 2

    def error(self, message):
        self.exit(self.usage_exitcode, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="clusterfs",
                           description="clusterfs: a clustered shared-disk file system: "
                                       "several hosts mount one volume through FUSE.")
    parser.add_argument("--debug", action="store_true", help="verbose logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND",
                                parser_class=OneLineParser)
    sub.required = True
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def setup_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s.%(msecs)03d %(name)s %(levelname)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "debug", False))
    try:
        rc = args.func(args)
    except QuietError as e:
        print(f"clusterfs {args.command}: {e}", file=sys.stderr)
        return e.exitcode
    except KeyboardInterrupt:
        print(f"clusterfs {args.command}: interrupted", file=sys.stderr)
        return 130
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
