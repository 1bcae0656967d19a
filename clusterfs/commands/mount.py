"""``clusterfs mount``: mount a volume through FUSE.

Two modes: a cluster member (``--key KEYFILE``, or a volume made with ``mkfs
--cluster NAME``: the key is then /etc/clusterfs/NAME.key) or a single node without a
lock manager (``-o nolock``, or no key and no cluster name).  A member needs no lock
manager address: it finds the master on the volume, and its own lock manager
candidate becomes the master when there is none.

Without ``--foreground`` the command returns once the file system is mounted (the
server keeps running in the background, like mount helpers do) or prints why it
could not mount.  ``fusermount3 -u MOUNTPOINT`` (or SIGTERM/SIGINT to the server)
unmounts cleanly: the journal is checkpointed and marked clean.  The mount sequences
are ``fuse/mount.py``.
"""

from __future__ import annotations

import logging
import os
import sys

from ..cli import exit_status
from ..cluster.lockd import DEFAULT_LEASE
from ..errors import ClusterfsError, UsageError
from ..fs.volume import Volume
from ..fuse.mount import VFS_FLAGS, run_cluster_mount, run_mount
from .mkfs import parse_size

DEFAULT_KEY_DIR = "/etc/clusterfs"

log = logging.getLogger(__name__)

KNOWN_OPTIONS = {"ro", "rw", "noatime", "atime", "direct", "nodirect", "allow_other",
                 "debug", "nolock", "open_cache", "min_hold", "entrycache", "dropbehind",
                 *VFS_FLAGS}


def parse_options(items: list[str]) -> dict[str, str | bool]:
    """'-o a,b=c' items -> {'a': True, 'b': 'c'}; unknown options are an error."""
    opts: dict[str, str | bool] = {}
    for item in items:
        for part in item.split(","):
            part = part.strip()
            if not part:
                continue
            key, _, value = part.partition("=")
            if key not in KNOWN_OPTIONS:
                raise UsageError(f"unknown mount option '{key}' (known: "
                                 f"{', '.join(sorted(KNOWN_OPTIONS))})")
            opts[key] = value or True
    if "open_cache" in opts:
        value = opts["open_cache"]
        if value is True or not str(value).isdigit():
            raise UsageError(f"mount option open_cache wants a number of locks "
                             f"(0 or more), not '{'' if value is True else value}'")
        opts["open_cache"] = int(value)
    if "min_hold" in opts:
        value = opts["min_hold"]
        try:
            ms = float(value) if value is not True else -1.0
        except ValueError:
            ms = -1.0
        if not 0 <= ms <= 1000:
            raise UsageError(f"mount option min_hold wants milliseconds (0 to 1000), not "
                             f"'{'' if value is True else value}'")
        opts["min_hold"] = ms
    if opts.get("dropbehind", True) is not True:
        value = opts["dropbehind"]
        try:
            keep = parse_size(value)
        except ValueError:
            keep = -1
        if keep < 0:
            raise UsageError(f"mount option dropbehind wants the size kept behind a "
                             f"reader (e.g. 256M), not '{value}'")
        opts["dropbehind"] = keep
    return opts


def _daemonize(fn) -> int:
    """Fork; the child runs ``fn(ready_fd)``; the parent waits for 'mounted' or an error."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(wfd)
        msg = b""
        while True:
            chunk = os.read(rfd, 4096)
            if not chunk:
                break
            msg += chunk
        os.close(rfd)
        if msg.startswith(b"ok"):
            return 0
        _, status = os.waitpid(pid, 0)
        text = msg.decode(errors="replace").strip()
        if text:
            print(text, file=sys.stderr)
        return os.waitstatus_to_exitcode(status) or 1
    # child
    os.close(rfd)
    os.setsid()
    rc = 1
    try:
        rc = fn(wfd)
    except ClusterfsError as e:
        try:
            os.write(wfd, f"clusterfs mount: {e}\n".encode())
        except OSError:
            pass
        rc = exit_status(e)
    except BaseException as e:   # report anything to the waiting parent, then exit
        log.exception("mount server failed")
        try:
            os.write(wfd, f"clusterfs mount: {type(e).__name__}: {e}\n".encode())
        except OSError:
            pass
        rc = 1
    os._exit(rc)


def cluster_settings(args, opts) -> tuple[str, bytes] | None:
    """(key file, key) for a cluster mount, or None for a single-node mount."""
    if opts.get("nolock"):
        if args.key or args.listen:
            raise UsageError("-o nolock is a single-node mount: no --key or --listen")
        return None
    cluster = ""
    if args.key is None:
        vol = Volume.open(args.volume, readonly=True)
        try:
            cluster = vol.sb.cluster_name
        finally:
            vol.close()
        if not cluster:
            if args.listen:
                raise UsageError("--listen is for cluster mounts (with --key)")
            return None
    from lockmgr import KeyFileError, load_key
    keyfile = args.key or os.path.join(DEFAULT_KEY_DIR, f"{cluster}.key")
    try:
        return keyfile, load_key(keyfile)
    except KeyFileError as e:
        raise UsageError(str(e)) from None


def cmd_mount(args) -> int:
    opts = parse_options(args.options or [])
    if not os.path.isdir(args.mountpoint):
        raise UsageError(f"mount point {args.mountpoint} is not a directory")
    cluster = cluster_settings(args, opts)
    if cluster is None and args.slot is not None:
        raise UsageError("--slot is for cluster mounts (with --key)")
    if cluster is not None:
        from ..cluster.lockd import check_member_lease
        check_member_lease(args.lease)

    def go(ready_fd: int) -> int:
        if not args.foreground:
            # detach stdio; logging goes to --log (or nowhere)
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)
            if args.log:
                logfd = os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(logfd, 1)
                os.dup2(logfd, 2)
                os.close(logfd)
            else:
                os.dup2(devnull, 1)
                os.dup2(devnull, 2)
            os.close(devnull)
        if cluster is not None:
            return run_cluster_mount(args.volume, args.mountpoint, opts=opts,
                                     node=args.node, keyfile=os.path.abspath(cluster[0]),
                                     key=cluster[1], listen=args.listen, slot=args.slot,
                                     lease=args.lease, ready_fd=ready_fd,
                                     heartbeat_interval=args.heartbeat)
        return run_mount(args.volume, args.mountpoint, opts=opts, node=args.node,
                         ready_fd=ready_fd, heartbeat_interval=args.heartbeat)

    if args.foreground:
        return go(-1)
    return _daemonize(go)


def register(sub) -> None:
    p = sub.add_parser("mount", help="mount a volume through FUSE",
                       description="Mount a clusterfs volume.  With --key (or on a volume "
                                   "made with mkfs --cluster) the node joins the volume's "
                                   "cluster; otherwise it is a single-node mount (no lock "
                                   "manager; refused while any other node has the volume "
                                   "mounted).")
    p.add_argument("volume", help="image file or block device")
    p.add_argument("mountpoint", help="directory to mount on")
    p.add_argument("-f", "--foreground", action="store_true",
                   help="stay in the foreground (log to stderr)")
    p.add_argument("-o", dest="options", action="append", metavar="OPTS",
                   help="comma-separated options: ro, noatime, direct (O_DIRECT), "
                        "nodirect, allow_other, debug, nolock, open_cache=N (open "
                        "locks a cluster member keeps cached, default 4096), "
                        "min_hold=MS (ms a cluster member keeps a lock once granted "
                        "before another node's request is honoured, default 10), "
                        "entrycache (a cluster member lets the kernel cache "
                        "directory entries; detaches mounts made on directories "
                        "inside this one: see docs/CLUSTER.md), dropbehind or "
                        "dropbehind=SIZE (a cluster member drops the kernel's pages "
                        "of a file behind a reader that goes through it in order, "
                        "keeping the last 32 MiB or SIZE), and the "
                        "kernel's nosuid, nodev, noexec (the default for FUSE is "
                        "nosuid,nodev), suid, dev, exec")
    p.add_argument("--key", metavar="KEYFILE",
                   help="the cluster's key file: mount as a cluster member (default "
                        "/etc/clusterfs/CLUSTER.key on a volume made with --cluster)")
    p.add_argument("--listen", metavar="HOST:PORT",
                   help="where this node serves as the lock manager when elected "
                        "(default: the first non-loopback address, port 7789)")
    p.add_argument("--node", help="node name, unique in the cluster (default: host name)")
    p.add_argument("--slot", type=int, help="node slot to take (default: the first free)")
    p.add_argument("--lease", type=float, default=DEFAULT_LEASE,
                   help=f"lease with the lock manager in seconds (default "
                        f"{DEFAULT_LEASE:g}; it must outlast a lock manager failover)")
    p.add_argument("--heartbeat", type=float, default=1.0,
                   help="disk heartbeat interval in seconds (default 1)")
    p.add_argument("--log", help="log file when running in the background")
    p.set_defaults(func=cmd_mount)

