"""``mount.fuse.clusterfs``: the program mount(8) runs to mount a ``fuse.clusterfs``.

For ``mount -t fuse.clusterfs VOLUME MOUNTPOINT -o OPTS`` (or an fstab line of that
type, ``mount -a``, a systemd ``.mount`` unit), libmount looks for
``/sbin/mount.fuse.clusterfs`` and only when it is missing falls back to
``/sbin/mount.fuse`` (fuse3's), which would run ``clusterfs VOLUME MOUNTPOINT -o
OPTS``: not a command line ``clusterfs`` takes.  So a node installs this helper
(``clusterfs install-units``, ``commands/units.py``).

What libmount passes (util-linux 2.38.1, measured with a helper that logged its
arguments): ``VOLUME MOUNTPOINT [-s] [-f] [-n] [-v] -o OPTS``; it keeps ``_netdev``,
``nofail``, ``user``, ``users`` and the VFS flags in OPTS, puts ``rw`` or ``ro`` first,
and drops ``defaults``, ``auto``/``noauto``, ``comment=`` and ``x-*``.  The helper
accepts all of these anyway (an administrator may run it by hand):

- options for mount(8), systemd or fstab alone are ignored (``IGNORED``);
- ``key=``, ``node=``, ``listen=``, ``slot=``, ``lease=``, ``heartbeat=``, ``log=`` become
  ``clusterfs mount``'s ``--key`` ... ``--log``;
- the rest are ``clusterfs mount -o`` options (``ro``, ``noatime``, ``nosuid``, ...);
- anything else is one line on stderr and exit status 2 (with ``-s``, sloppy, it is
  ignored instead).

Flags: ``-f`` (fake) checks the options and mounts nothing, ``-n`` (no mtab) changes
nothing (there is no mtab to write), ``-v`` says what was mounted, ``-t TYPE`` must
name clusterfs.  The mount runs as ``clusterfs mount`` without ``--foreground``: the
helper returns once the file system is mounted, its server running in the
background.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from ..errors import UsageError

PROG = "mount.fuse.clusterfs"
FSTYPE = "fuse.clusterfs"

# options that mean something only to mount(8), systemd or the fstab
IGNORED = frozenset({"defaults", "auto", "noauto", "nofail", "_netdev", "user", "users",
                     "nouser", "owner", "group"})
IGNORED_PREFIXES = ("x-", "X-", "comment=")

# option -> (the `clusterfs mount` flag it becomes, the type its value must have)
FLAG_OPTIONS: dict[str, tuple[str, type]] = {
    "key": ("--key", str),
    "node": ("--node", str),
    "listen": ("--listen", str),
    "slot": ("--slot", int),
    "lease": ("--lease", float),
    "heartbeat": ("--heartbeat", float),
    "log": ("--log", str),
}

USAGE = (f"usage: {PROG} VOLUME MOUNTPOINT [-s] [-f] [-n] [-v] [-o OPTIONS] [-t {FSTYPE}]")


@dataclass
class HelperArgs:
    """The command line mount(8) gave the helper."""
    volume: str = ""
    mountpoint: str = ""
    options: list[str] = field(default_factory=list)
    fake: bool = False
    sloppy: bool = False
    verbose: bool = False


def parse_argv(argv: list[str]) -> HelperArgs:
    """``VOLUME MOUNTPOINT [-sfnv] [-o OPTS] [-t TYPE]`` (flags and positionals in
    any order, ``-oOPTS`` and ``-sv`` as getopt allows)."""
    args = HelperArgs()
    positional: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            positional += argv[i:]
            break
        if not arg.startswith("-") or arg == "-":
            positional.append(arg)
            continue
        letters = arg[1:]
        while letters:
            c, letters = letters[0], letters[1:]
            if c in "ot":
                if not letters:
                    if i >= len(argv):
                        raise UsageError(f"option -{c} wants a value")
                    letters, i = argv[i], i + 1
                if c == "o":
                    args.options.append(letters)
                elif letters not in (FSTYPE, "clusterfs"):
                    raise UsageError(f"this helper mounts {FSTYPE}, not '{letters}'")
                letters = ""
            elif c == "f":
                args.fake = True
            elif c == "s":
                args.sloppy = True
            elif c == "v":
                args.verbose = True
            elif c == "n":
                pass                   # no mtab to leave unwritten
            elif c == "N":
                raise UsageError("-N (mount in another namespace) is not supported")
            else:
                raise UsageError(f"unknown flag -{c} ({USAGE})")
    if len(positional) != 2:
        raise UsageError(f"wants a VOLUME and a MOUNTPOINT ({USAGE})")
    args.volume, args.mountpoint = positional
    return args


def translate(options: list[str], *, sloppy: bool = False) -> tuple[list[str], list[str]]:
    """mount(8) options -> (the `clusterfs mount` arguments after VOLUME MOUNTPOINT,
    the options ignored).

    Raises:
        UsageError: an unknown option (unless ``sloppy``), a bad or missing value.
    """
    from .mount import KNOWN_OPTIONS, parse_options
    flags: dict[str, str] = {}
    plain: list[str] = []
    ignored: list[str] = []
    for item in options:
        for part in item.split(","):
            part = part.strip()
            if not part:
                continue
            key, eq, value = part.partition("=")
            if part in IGNORED or part.startswith(IGNORED_PREFIXES):
                ignored.append(part)
            elif key in FLAG_OPTIONS:
                flag, kind = FLAG_OPTIONS[key]
                if not eq or not value:
                    raise UsageError(f"mount option {key}= wants a value")
                try:
                    ok = kind(value) >= 0 if kind is not str else True
                except ValueError:
                    ok = False
                if not ok:
                    what = "a whole number" if kind is int else "a number of seconds"
                    raise UsageError(f"mount option {key}= wants {what}, not '{value}'")
                flags[flag] = value
            elif key in KNOWN_OPTIONS:
                plain.append(part)
            elif sloppy:
                ignored.append(part)
            else:
                raise UsageError(f"unknown mount option '{part}'")
    parse_options(plain)             # the values of clusterfs mount's own options
    out: list[str] = []
    if plain:
        out += ["-o", ",".join(plain)]
    for flag, value in flags.items():
        out += [flag, value]
    return out, ignored


def main(argv: list[str] | None = None) -> int:
    """Run the helper; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    try:
        args = parse_argv(argv)
        extra, _ignored = translate(args.options, sloppy=args.sloppy)
    except UsageError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    if args.fake:
        return 0
    from .. import cli
    rc = cli.main(["mount", args.volume, args.mountpoint, *extra])
    if rc == 0 and args.verbose:
        print(f"{PROG}: {args.volume} mounted on {args.mountpoint}")
    return rc


def run() -> None:
    """The program's entry point (``python -m clusterfs.commands.mounthelper``)."""
    sys.exit(main())


if __name__ == "__main__":
    run()
