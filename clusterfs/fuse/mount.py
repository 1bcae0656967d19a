"""``clusterfs mount``: serve a volume through FUSE until it is unmounted.

Two modes: a cluster member (``--lockd ADDR --key KEYFILE``, or the lock manager
address recorded by ``mkfs --lockd``) or a single node without a lock manager.

Without ``--foreground`` the command returns once the file system is mounted (the
server keeps running in the background, like mount helpers do) or prints why it
could not mount.  ``fusermount3 -u MOUNTPOINT`` (or SIGTERM/SIGINT to the server)
unmounts cleanly: the journal is checkpointed and marked clean.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys

import pyfuse3
import trio

from ..cluster.coherence import OPEN_CACHE
from ..errors import QuietError
from ..fs.single_node import SingleNodeMount
from ..fs.volume import Volume
from .ops import Operations

DEFAULT_KEY_DIR = "/etc/clusterfs"

log = logging.getLogger(__name__)

COMMIT_INTERVAL = 5.0
# a cluster member lets the kernel cache an inode's attributes while it holds the
# inode's lock (invalidated when the lock goes, see clusterfs/cluster.py); the
# timeout only bounds how long a reply stays cached without a new one
CLUSTER_ATTR_TIMEOUT = 1.0
READAHEAD_KB = 1024      # kernel readahead of a single-node mount: one 1 MiB FUSE read
KNOWN_OPTIONS = {"ro", "rw", "noatime", "atime", "direct", "nodirect", "allow_other",
                 "debug", "nolock", "open_cache"}


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
                raise QuietError(f"unknown mount option '{key}' (known: "
                                 f"{', '.join(sorted(KNOWN_OPTIONS))})", 2)
            opts[key] = value or True
    if "open_cache" in opts:
        value = opts["open_cache"]
        if value is True or not str(value).isdigit():
            raise QuietError(f"mount option open_cache wants a number of locks "
                             f"(0 or more), not '{'' if value is True else value}'", 2)
        opts["open_cache"] = int(value)
    return opts


async def _serve(session, ops, interval: float) -> None:
    """Run FUSE plus the heartbeat, periodic commits and signal handling."""
    async with trio.open_nursery() as nursery:
        async def heartbeat():
            while True:
                try:
                    session.beat()
                except OSError:
                    log.exception("heartbeat write failed")
                await trio.sleep(interval)

        async def committer():
            vol = session.vol
            while True:
                await trio.sleep(COMMIT_INTERVAL)
                try:
                    if vol.journal is not None and vol.op is None and \
                            vol.journal.running_blocks():
                        # the flushes run on a worker thread: requests are served
                        # meanwhile (they fill the next transaction)
                        await vol.commit_in_thread(trio.to_thread.run_sync)
                except Exception:
                    # the journal aborts itself on a device error (later writes
                    # fail with EIO); the mount stays up so it can be unmounted
                    log.exception("periodic journal commit failed")

        async def signals():
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
                async for sig in sigs:
                    log.info("signal %d: unmounting", sig)
                    session.terminated = True
                    pyfuse3.terminate()
                    return

        if not session.readonly:
            nursery.start_soon(heartbeat)
            nursery.start_soon(committer)
        nursery.start_soon(signals)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def _fuse_options(volume: str, opts: dict) -> set:
    fuse_opts = set(pyfuse3.default_options)
    fuse_opts.add(f"fsname={os.path.abspath(volume)}")
    fuse_opts.add("subtype=clusterfs")
    if opts.get("ro"):
        fuse_opts.add("ro")
    if os.getuid() == 0 or opts.get("allow_other"):
        fuse_opts.add("allow_other")
    if opts.get("debug"):
        fuse_opts.add("debug")
    return fuse_opts


def _unescape_mountinfo(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def set_readahead(mountpoint: str, kb: int) -> None:
    """Set the kernel's readahead for the FUSE file system mounted on ``mountpoint``
    (an absolute path without symlinks).  The kernel's default of 128 KiB cuts a
    sequential read into 128 KiB FUSE requests; with 1 MiB each request carries
    8 times the data for the same per-request cost.  Best effort: it needs root,
    and nothing here touches the mount itself (the caller is its server)."""
    dev = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and _unescape_mountinfo(fields[4]) == mountpoint:
                    dev = fields[2]          # the last mount there is the top one
        if dev is None:
            log.debug("readahead: %s not found in mountinfo", mountpoint)
            return
        with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
            f.write(f"{kb}\n")
        log.debug("readahead of %s (bdi %s) set to %d KiB", mountpoint, dev, kb)
    except OSError as e:
        log.debug("readahead of %s not set: %s", mountpoint, e)


def _notify_ready(ready_fd: int) -> None:
    if ready_fd >= 0:
        os.write(ready_fd, b"ok\n")
        os.close(ready_fd)


def run_cluster_mount(volume: str, mountpoint: str, *, opts: dict, node: str | None,
                      lockd: str, key: bytes, slot: int | None, lease: float,
                      ready_fd: int = -1, heartbeat_interval: float = 1.0) -> int:
    """Join the volume's cluster and serve until unmounted (in this process)."""
    from ..cluster.member import ClusterMount
    direct = True if opts.get("direct") else False if opts.get("nodirect") else None
    session = ClusterMount(volume, lockd=lockd, key=key, node=node, slot=slot,
                           direct=direct, lease=lease, renew=max(0.2, lease / 5),
                           heartbeat_interval=heartbeat_interval,
                           noatime=bool(opts.get("noatime")),
                           open_cache=opts.get("open_cache", OPEN_CACHE))
    state = {"mounted": False, "terminated": False}

    async def main():
        async with trio.open_nursery() as nursery:
            front = await session.start(nursery)
            coh = front.coh
            ops = Operations(session.fs, front, attr_timeout=CLUSTER_ATTR_TIMEOUT,
                             entry_timeout=0, cacheable=coh.kernel_cacheable,
                             direct_io=True)
            try:
                pyfuse3.init(ops, mountpoint, _fuse_options(volume, opts))
            except RuntimeError as e:
                await session.stop()
                raise QuietError(f"cannot mount on {mountpoint}: {e}", 32) from None
            state["mounted"] = True
            coh.forget_kernel_attrs = ops.forget_attrs
            log.info("%s mounted on %s (slot %d, node %s, cluster)", volume, mountpoint,
                     session.slot, session.node)
            _notify_ready(ready_fd)

            async def signals():
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
                    async for sig in sigs:
                        log.info("signal %d: unmounting", sig)
                        state["terminated"] = True
                        pyfuse3.terminate()
                        return
            nursery.start_soon(signals)
            try:
                await pyfuse3.main()
            finally:
                with trio.CancelScope(shield=True):
                    await session.stop()
                nursery.cancel_scope.cancel()

    clean = False
    try:
        trio.run(main)
        clean = True
    except BaseExceptionGroup as group:
        # trio wraps what a nursery raised: surface a user-facing error as itself
        quiet = group.subgroup(lambda e: isinstance(e, QuietError))
        if quiet is not None:
            first = quiet
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None
        raise
    finally:
        if state["mounted"]:
            pyfuse3.close(unmount=state["terminated"] or not clean)
            log.info("%s unmounted", volume)
    return 0


def run_mount(volume: str, mountpoint: str, *, opts: dict, node: str | None,
              ready_fd: int = -1, heartbeat_interval: float = 1.0) -> int:
    """Mount in single-node mode and serve until unmounted (in this process)."""
    if not os.path.isdir(mountpoint):
        raise QuietError(f"mount point {mountpoint} is not a directory", 2)
    direct = True if opts.get("direct") else False if opts.get("nodirect") else None
    session = SingleNodeMount(volume, node=node, direct=direct, readonly=bool(opts.get("ro")),
                              heartbeat_interval=heartbeat_interval,
                              noatime=bool(opts.get("noatime")))
    session.terminated = False
    fs = session.start()
    ops = Operations(fs)
    where = os.path.realpath(mountpoint)
    ops.after_init.append(lambda: set_readahead(where, READAHEAD_KB))
    try:
        pyfuse3.init(ops, mountpoint, _fuse_options(volume, opts))
    except RuntimeError as e:
        session.stop()
        raise QuietError(f"cannot mount on {mountpoint}: {e}", 32) from None
    log.info("%s mounted on %s (slot %d, single-node)", volume, mountpoint, session.slot)
    _notify_ready(ready_fd)
    clean = False
    try:
        trio.run(_serve, session, ops, heartbeat_interval)
        clean = True
    finally:
        pyfuse3.close(unmount=getattr(session, "terminated", False) or not clean)
        session.stop()
        log.info("%s unmounted cleanly", volume)
    return 0


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
    except QuietError as e:
        try:
            os.write(wfd, f"clusterfs mount: {e}\n".encode())
        except OSError:
            pass
        rc = e.exitcode
    except BaseException as e:   # report anything to the waiting parent, then exit
        log.exception("mount server failed")
        try:
            os.write(wfd, f"clusterfs mount: {type(e).__name__}: {e}\n".encode())
        except OSError:
            pass
        rc = 1
    os._exit(rc)


def cluster_settings(args, opts) -> tuple[str, bytes] | None:
    """(lock manager address, key) for a cluster mount, or None for single-node."""
    if opts.get("nolock"):
        if args.lockd:
            raise QuietError("-o nolock and --lockd contradict each other", 2)
        return None
    lockd = args.lockd
    cluster = ""
    if lockd is None:
        vol = Volume.open(args.volume, readonly=True)
        try:
            lockd = vol.sb.lockd_addr or None
            cluster = vol.sb.cluster_name
        finally:
            vol.close()
        if lockd is None:
            if args.key:
                raise QuietError("--key needs --lockd (or a lock manager recorded by "
                                 "mkfs --lockd)", 2)
            return None
    from lockmgr import KeyFileError, load_key
    keyfile = args.key or os.path.join(DEFAULT_KEY_DIR, f"{cluster or 'cluster'}.key")
    try:
        return lockd, load_key(keyfile)
    except KeyFileError as e:
        raise QuietError(str(e), 2) from None


def cmd_mount(args) -> int:
    opts = parse_options(args.options or [])
    if not os.path.isdir(args.mountpoint):
        raise QuietError(f"mount point {args.mountpoint} is not a directory", 2)
    cluster = cluster_settings(args, opts)
    if cluster is None and args.slot is not None:
        raise QuietError("--slot is for cluster mounts (with --lockd)", 2)

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
                                     node=args.node, lockd=cluster[0], key=cluster[1],
                                     slot=args.slot, lease=args.lease, ready_fd=ready_fd,
                                     heartbeat_interval=args.heartbeat)
        return run_mount(args.volume, args.mountpoint, opts=opts, node=args.node,
                         ready_fd=ready_fd, heartbeat_interval=args.heartbeat)

    if args.foreground:
        return go(-1)
    return _daemonize(go)


def register(sub) -> None:
    p = sub.add_parser("mount", help="mount a volume through FUSE",
                       description="Mount a clusterfs volume.  Without --lockd it is a "
                                   "single-node mount (no lock manager; refused while any "
                                   "other node has the volume mounted).")
    p.add_argument("volume", help="image file or block device")
    p.add_argument("mountpoint", help="directory to mount on")
    p.add_argument("-f", "--foreground", action="store_true",
                   help="stay in the foreground (log to stderr)")
    p.add_argument("-o", dest="options", action="append", metavar="OPTS",
                   help="comma-separated options: ro, noatime, direct (O_DIRECT), "
                        "nodirect, allow_other, debug, nolock, open_cache=N (open "
                        "locks a cluster member keeps cached, default 4096)")
    p.add_argument("--lockd", metavar="ADDR",
                   help="lock manager (HOST:PORT or unix:PATH): mount as a cluster member")
    p.add_argument("--key", metavar="KEYFILE",
                   help="the cluster's key file (default /etc/clusterfs/CLUSTER.key)")
    p.add_argument("--node", help="node name, unique in the cluster (default: host name)")
    p.add_argument("--slot", type=int, help="node slot to take (default: the first free)")
    p.add_argument("--lease", type=float, default=5.0,
                   help="lock manager lease in seconds (default 5)")
    p.add_argument("--heartbeat", type=float, default=1.0,
                   help="disk heartbeat interval in seconds (default 1)")
    p.add_argument("--log", help="log file when running in the background")
    p.set_defaults(func=cmd_mount)

