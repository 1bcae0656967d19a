"""Mounting a volume through FUSE and serving it until it is unmounted.

Two sequences, one per kind of node, around one serve loop (``serve.py``):

- ``run_mount``: a single node without a lock manager (``fs/single_node.py``);
- ``run_cluster_mount``: a cluster member (``cluster/member.py``).

Each opens the node, mounts FUSE (``MountFailed`` when the kernel refuses), tells
the waiting parent it is mounted (``ready_fd``), serves, and on the way out (an
unmount, a signal, an error) leaves the volume clean: journal checkpointed and
marked clean, heartbeat FREE.  The command line is ``commands/mount.py``.
"""

from __future__ import annotations

import logging
import os
import re

import pyfuse3
import trio

from ..errors import MountFailed, UsageError, run_surfacing
from ..fs.single_node import SingleNodeMount
from .ops import Operations
from .serve import serve

log = logging.getLogger(__name__)

# a cluster member lets the kernel cache an inode's attributes while it holds the
# inode's lock (invalidated when the lock goes, see clusterfs/cluster/glops.py); the
# timeout only bounds how long a reply stays cached without a new one
CLUSTER_ATTR_TIMEOUT = 1.0
READAHEAD_KB = 1024      # kernel readahead of a single-node mount: one 1 MiB FUSE read


def _fuse_options(volume: str, opts: dict) -> set:
    if not hasattr(pyfuse3.Operations, "setlk"):
        raise MountFailed("this pyfuse3 lacks clusterfs's handlers (locks, fallocate, "
                          "lseek, copy_file_range): run `make deps` (binding/install)")
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
                      key: bytes, keyfile: str, listen: str | None, slot: int | None,
                      lease: float, ready_fd: int = -1,
                      heartbeat_interval: float = 1.0) -> int:
    """Join the volume's cluster and serve until unmounted (in this process)."""
    from ..cluster.filelocks import FileLocks
    from ..cluster.member import ClusterMount
    from ..cluster.openmodes import OPEN_CACHE
    direct = True if opts.get("direct") else False if opts.get("nodirect") else None
    member = ClusterMount(volume, key=key, keyfile=keyfile, listen=listen, node=node,
                          slot=slot, direct=direct, lease=lease, renew=min(1.0, lease / 5),
                          heartbeat_interval=heartbeat_interval,
                          noatime=bool(opts.get("noatime")),
                          open_cache=opts.get("open_cache", OPEN_CACHE))
    member.terminated = False
    member.mountpoint = os.path.realpath(mountpoint)   # for the control channel
    mounted = False

    async def main():
        nonlocal mounted
        async with trio.open_nursery() as nursery:
            front = await member.start(nursery)
            coh = front.coh
            ops = Operations(member.fs, front, attr_timeout=CLUSTER_ATTR_TIMEOUT,
                             entry_timeout=0, cacheable=coh.kernel_cacheable,
                             direct_io=True, locks=FileLocks(coh))
            try:
                pyfuse3.init(ops, mountpoint, _fuse_options(volume, opts))
            except RuntimeError as e:
                await member.stop()
                raise MountFailed(f"cannot mount on {mountpoint}: {e}") from None
            mounted = True
            coh.forget_kernel_attrs = ops.forget_attrs
            log.info("%s mounted on %s (slot %d, node %s, cluster)", volume, mountpoint,
                     member.slot, member.node)
            _notify_ready(ready_fd)
            try:
                await serve(member)
            finally:
                with trio.CancelScope(shield=True):
                    await member.stop()
                nursery.cancel_scope.cancel()

    clean = False
    try:
        run_surfacing(main)
        clean = True
    finally:
        if mounted:
            pyfuse3.close(unmount=member.terminated or not clean)
            log.info("%s unmounted", volume)
    return 0


def run_mount(volume: str, mountpoint: str, *, opts: dict, node: str | None,
              ready_fd: int = -1, heartbeat_interval: float = 1.0) -> int:
    """Mount in single-node mode and serve until unmounted (in this process)."""
    if not os.path.isdir(mountpoint):
        raise UsageError(f"mount point {mountpoint} is not a directory")
    direct = True if opts.get("direct") else False if opts.get("nodirect") else None
    single = SingleNodeMount(volume, node=node, direct=direct, readonly=bool(opts.get("ro")),
                             heartbeat_interval=heartbeat_interval,
                             noatime=bool(opts.get("noatime")))
    single.terminated = False
    fs = single.start()
    ops = Operations(fs)
    where = os.path.realpath(mountpoint)
    ops.after_init.append(lambda: set_readahead(where, READAHEAD_KB))
    try:
        pyfuse3.init(ops, mountpoint, _fuse_options(volume, opts))
    except RuntimeError as e:
        single.stop()
        raise MountFailed(f"cannot mount on {mountpoint}: {e}") from None
    log.info("%s mounted on %s (slot %d, single-node)", volume, mountpoint, single.slot)
    _notify_ready(ready_fd)
    clean = False
    try:
        trio.run(serve, single)
        clean = True
    finally:
        pyfuse3.close(unmount=single.terminated or not clean)
        single.stop()
        log.info("%s unmounted cleanly", volume)
    return 0
