"""``clusterfs install-units``: what a node needs to mount a volume at boot.

- The mount helper ``/sbin/mount.fuse.clusterfs`` (``commands/mounthelper.py``): a
  shell script that runs it with the Python this command runs with.  libmount looks
  for helpers in /sbin only (its search path is built in, not ``$PATH``), so that
  is where it goes.
- For ``VOLUME MOUNTPOINT``: a systemd ``.mount`` unit (named as ``systemd-escape
  --path`` names it; ``_netdev``, after ``network-online.target``), enabled for
  ``remote-fs.target`` by the symlink ``systemctl enable`` would make; or with
  ``--fstab`` the fstab line instead (printed and appended).

``--root DIR`` installs under another root (an image being built, a test);
``--dry-run`` prints what would be written and writes nothing.
"""

from __future__ import annotations

import os
import shlex
import sys

from ..errors import ClusterfsError, UsageError
from .mounthelper import FSTYPE, PROG, translate

HELPER_DIR = "/sbin"            # libmount's FS_SEARCH_PATH starts there
UNIT_DIR = "/etc/systemd/system"
WANTED_BY = "remote-fs.target"
FSTAB = "/etc/fstab"
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:_.")


def helper_script(python: str | None = None) -> str:
    """The text of ``/sbin/mount.fuse.clusterfs``: run the helper with ``python``
    (default: this one), isolated (``-I``) from the caller's environment and
    working directory."""
    python = python or sys.executable
    return ("#!/bin/sh\n"
            f"# mount(8) helper for {FSTYPE} (mount -t, fstab, systemd .mount units),\n"
            "# written by `clusterfs install-units`.\n"
            f"exec {shlex.quote(python)} -I -m clusterfs.commands.mounthelper \"$@\"\n")


def escape_path(path: str) -> str:
    """``systemd-escape --path PATH``: the unit name of a mount point, without the
    suffix."""
    parts = [p for p in path.split("/") if p]
    if not parts:
        return "-"
    out = []
    for i, ch in enumerate("/".join(parts)):
        if ch == "/":
            out.append("-")
        elif ch in _SAFE and not (i == 0 and ch == "."):
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode())
    return "".join(out)


def unit_name(mountpoint: str) -> str:
    return escape_path(mountpoint) + ".mount"


def _unit_value(text: str) -> str:
    return text.replace("%", "%%")          # systemd specifiers


def mount_unit(volume: str, mountpoint: str, options: str) -> str:
    """The text of the ``.mount`` unit."""
    what, where = _unit_value(volume), _unit_value(os.path.normpath(mountpoint))
    return "\n".join([
        "# written by `clusterfs install-units`",
        "[Unit]",
        f"Description=clusterfs volume {what} on {where}",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Mount]",
        f"What={what}",
        f"Where={where}",
        f"Type={FSTYPE}",
        f"Options={_unit_value(options)}",
        "",
        "[Install]",
        f"WantedBy={WANTED_BY}",
        "",
    ])


def _fstab_field(text: str) -> str:
    """An fstab field: blanks and backslashes as octal escapes (fstab(5))."""
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in text)


def fstab_line(volume: str, mountpoint: str, options: str) -> str:
    return " ".join([_fstab_field(volume), _fstab_field(os.path.normpath(mountpoint)),
                     FSTYPE, _fstab_field(options), "0", "0"])


def mount_options(args) -> str:
    """The options of the boot mount (``_netdev`` first), checked as the helper
    will check them."""
    opts = ["_netdev"]
    for name in ("key", "node", "listen", "slot", "lease"):
        value = getattr(args, name)
        if value is None:
            continue
        value = str(value)
        if "," in value or not value:
            raise UsageError(f"--{name} '{value}' cannot be a mount option (a comma or "
                             f"nothing)")
        opts.append(f"{name}={value}")
    for item in args.options or []:
        opts += [p.strip() for p in item.split(",") if p.strip()]
    translate(opts)
    return ",".join(opts)


def _under(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/"))


class Installer:
    """Writes (or, ``dry_run``, prints) the files under ``root``."""

    def __init__(self, root: str, dry_run: bool):
        self.root = root
        self.dry_run = dry_run

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        target = _under(self.root, path)
        if self.dry_run:
            print(f"would write {target}:")
            print("".join(f"    {line}\n" for line in text.splitlines()), end="")
            return
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = target + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
        print(f"wrote {target}")

    def symlink(self, link: str, to: str) -> None:
        target = _under(self.root, link)
        if self.dry_run:
            print(f"would link {target} -> {to}")
            return
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.islink(target) or os.path.exists(target):
            os.unlink(target)
        os.symlink(to, target)
        print(f"linked {target} -> {to}")

    def mkdir(self, path: str) -> None:
        target = _under(self.root, path)
        if os.path.isdir(target):
            return
        if self.dry_run:
            print(f"would create the directory {target}")
            return
        os.makedirs(target)
        print(f"created the directory {target}")

    def check_fstab(self, mountpoint: str) -> None:
        """Refuse a mount point the fstab already has a line for."""
        target = _under(self.root, FSTAB)
        try:
            with open(target) as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return
        where = _fstab_field(os.path.normpath(mountpoint))
        for old in lines:
            fields = old.split()
            if len(fields) > 1 and not old.lstrip().startswith("#") and fields[1] == where:
                raise ClusterfsError(f"{target} already has a line for {mountpoint}: "
                                     f"remove it first")

    def append_fstab(self, line: str) -> None:
        target = _under(self.root, FSTAB)
        if self.dry_run:
            print(f"would append to {target}:")
            print(f"    {line}")
            return
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "a") as f:
            f.write(line + "\n")
        print(f"appended to {target}:")
        print(f"    {line}")


def _systemd_running(root: str) -> bool:
    return os.path.realpath(root) == "/" and os.path.isdir("/run/systemd/system")


def cmd_install_units(args) -> int:
    if (args.volume is None) != (args.mountpoint is None):
        raise UsageError("give both VOLUME and MOUNTPOINT, or neither (helper only)")
    root = args.root or "/"
    if not os.path.isdir(root):
        raise UsageError(f"--root {root} is not a directory")
    if args.fstab and args.volume is None:
        raise UsageError("--fstab wants a VOLUME and a MOUNTPOINT")
    if args.volume is not None:
        for what, path in (("VOLUME", args.volume), ("MOUNTPOINT", args.mountpoint),
                           ("--key", args.key)):
            if path is not None and not os.path.isabs(path):
                raise UsageError(f"{what} must be an absolute path (a boot mount starts "
                                 f"in /): {path}")
            if path is not None and "\n" in path:
                raise UsageError(f"{what} holds a newline")
        options = mount_options(args)
    elif any(getattr(args, n) is not None for n in ("key", "node", "listen", "slot",
                                                     "lease", "options")):
        raise UsageError("mount options want a VOLUME and a MOUNTPOINT")
    inst = Installer(root, args.dry_run)
    if args.fstab:
        inst.check_fstab(args.mountpoint)
    inst.write(os.path.join(HELPER_DIR, PROG), helper_script(), 0o755)
    if args.volume is None:
        return 0
    if args.fstab:
        inst.mkdir(args.mountpoint)
        inst.append_fstab(fstab_line(args.volume, args.mountpoint, options))
        return 0
    name = unit_name(args.mountpoint)
    inst.write(os.path.join(UNIT_DIR, name), mount_unit(args.volume, args.mountpoint,
                                                        options))
    inst.symlink(os.path.join(UNIT_DIR, f"{WANTED_BY}.wants", name), f"../{name}")
    if args.key and not os.path.exists(_under(root, args.key)):
        print(f"note: the key file {_under(root, args.key)} does not exist yet",
              file=sys.stderr)
    if not args.dry_run and _systemd_running(root):
        print(f"now: systemctl daemon-reload && systemctl start {shlex.quote(name)}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "install-units", help="install the mount helper and a boot mount (systemd or fstab)",
        description=f"Install {HELPER_DIR}/{PROG}, the helper mount(8) runs for "
                    f"-t {FSTYPE} (fstab lines, mount -a, systemd .mount units); with "
                    f"VOLUME MOUNTPOINT also a systemd .mount unit enabled for "
                    f"{WANTED_BY}, or with --fstab an fstab line.")
    p.add_argument("volume", nargs="?", help="image file or block device (absolute)")
    p.add_argument("mountpoint", nargs="?", help="where to mount it (absolute)")
    p.add_argument("--key", metavar="KEYFILE", help="the cluster's key file (key=)")
    p.add_argument("--node", help="node name (node=; default at mount: the host name)")
    p.add_argument("--listen", metavar="HOST:PORT", help="lock manager address (listen=)")
    p.add_argument("--slot", type=int, help="node slot (slot=)")
    p.add_argument("--lease", type=float, help="lease in seconds (lease=)")
    p.add_argument("-o", dest="options", action="append", metavar="OPTS",
                   help="more mount options (nofail, noatime, log=FILE, ...)")
    p.add_argument("--fstab", action="store_true",
                   help="append an fstab line (and print it) instead of a systemd unit")
    p.add_argument("--root", metavar="DIR", help="install under DIR instead of /")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would be written; write nothing")
    p.set_defaults(func=cmd_install_units)
