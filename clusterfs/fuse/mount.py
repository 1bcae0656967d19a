"""Mounting a volume through FUSE and serving it until it is unmounted.

Two sequences, one per kind of node, around one serve loop (``serve.py``):

- ``run_mount``: a single node without a lock manager (``fs/single_node.py``);
- ``run_cluster_mount``: a cluster member (``cluster/member.py``).

Each opens the node, mounts FUSE (``MountFailed`` when the kernel refuses), tells
the waiting parent it is mounted (``ready_fd``), serves, and on the way out (an
unmount, a signal, an error) leaves the volume clean: journal checkpointed and
marked clean, heartbeat FREE.  The command line is ``commands/mount.py``.

A plain ``umount MOUNTPOINT`` (mount(8), systemd stopping a ``.mount`` unit) ends the
serve loop as ``fusermount3 -u`` does, but returns before the server has left the
volume; systemd may then send SIGTERM to what is left in the unit.  So once the node
is leaving, SIGTERM and SIGINT are logged and ignored (``_SignalGuard``): killed there,
the server would leave its journal dirty and its slot taken until another node
recovers it.
"""

from __future__ import annotations

import logging
import os
import re
import signal

import pyfuse3
import trio

from ..errors import MountFailed, UsageError, run_surfacing
from ..fs.admin import SingleNodeAdmin
from ..fs.single_node import SingleNodeMount
from .ops import DirectFrontend, Operations
from .serve import serve

log = logging.getLogger(__name__)

# a cluster member lets the kernel cache an inode's attributes while it holds the
# inode's lock (invalidated when the lock goes, see clusterfs/cluster/glops.py); the
# timeout only bounds how long a reply stays cached without a new one
CLUSTER_ATTR_TIMEOUT = 1.0
# ... and, with -o entrycache, a directory's entries while it holds the directory's
# lock, where the kernel keeps entry epochs (dropped when the lock goes:
# clusterfs/cluster/coherence.py); bounded as the attributes are, well inside the
# lease, for a node paused with entries cached
CLUSTER_ENTRY_TIMEOUT = CLUSTER_ATTR_TIMEOUT
READAHEAD_KB = 1024      # kernel readahead of a single-node mount: one 1 MiB FUSE read

# the kernel's mount flags that a mount passes on to FUSE as they are (FUSE's own
# default is nosuid,nodev; an fstab line may say noexec, or suid,dev on purpose)
VFS_FLAGS = ("nosuid", "suid", "nodev", "dev", "noexec", "exec")


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
    for flag in VFS_FLAGS:
        if opts.get(flag):
            fuse_opts.add(flag)
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


class _SignalGuard:
    """SIGTERM (and SIGINT) through a mount's life, around the serve loop's handler.

    Three phases: while the node starts, SIGTERM ends the process as it always did;
    while it serves, the serve loop's own handler unmounts (this one stands in for it
    in the moments before the loop installs its handler and after it gives this one
    back, with any signal it had not read yet: it unmounts too, unless the file
    system is gone from the mount table already); once the node leaves the volume,
    SIGTERM and SIGINT are logged and ignored, so that the journal is checkpointed
    and the slot freed whatever sends them.  ``restore()`` puts the old handlers
    back.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, node, where: str):
        self.node = node
        self.mountpoint = where       # realpath, taken before mounting (see run_mount)
        self.phase = "starting"
        self.token = None
        self.saved = {sig: signal.getsignal(sig) for sig in self.SIGNALS}
        signal.signal(signal.SIGTERM, self._handler)

    def serving(self) -> None:
        """Called in the trio run that serves, before the serve loop starts."""
        self.token = trio.lowlevel.current_trio_token()
        self.phase = "serving"

    def leave(self) -> None:
        self.phase = "leaving"
        for sig in self.SIGNALS:
            signal.signal(sig, self._handler)

    def restore(self) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)

    def _handler(self, signum, _frame) -> None:
        if self.phase == "starting":
            signal.signal(signum, signal.SIG_DFL)       # as before: the signal kills
            os.kill(os.getpid(), signum)
        elif self.phase == "serving":
            try:
                self.token.run_sync_soon(self._unmount, signum)
            except trio.RunFinishedError:   # the serve loop ended: leaving already
                self._ignored(signum)
        else:
            self._ignored(signum)

    @staticmethod
    def _ignored(signum: int) -> None:
        log.info("signal %d while leaving the volume: ignored (the journal is "
                 "being checkpointed and the slot freed)", signum)

    def _unmount(self, signum: int) -> None:
        if self.phase != "serving" or self.node.terminated or not self._mounted():
            return
        log.info("signal %d: unmounting", signum)
        self.node.terminated = True
        pyfuse3.terminate()

    def _mounted(self) -> bool:
        """Whether the mount table still lists our mount point (read from
        /proc, never through the mount point: this process serves it)."""
        try:
            with open("/proc/self/mountinfo") as f:
                return any(len(fields) > 4 and _unescape_mountinfo(fields[4]) ==
                           self.mountpoint for fields in map(str.split, f))
        except OSError:
            return False


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
    from ..cluster.glock import MIN_HOLD
    from ..cluster.member import ClusterMount
    from ..cluster.openmodes import OPEN_CACHE
    direct = True if opts.get("direct") else False if opts.get("nodirect") else None
    member = ClusterMount(volume, key=key, keyfile=keyfile, listen=listen, node=node,
                          slot=slot, direct=direct, lease=lease, renew=min(1.0, lease / 5),
                          heartbeat_interval=heartbeat_interval,
                          noatime=bool(opts.get("noatime")),
                          open_cache=opts.get("open_cache", OPEN_CACHE),
                          min_hold=opts.get("min_hold", MIN_HOLD * 1000) / 1000)
    member.terminated = False
    guard = _SignalGuard(member, os.path.realpath(mountpoint))
    member.mountpoint = os.path.realpath(mountpoint)   # for the control channel
    mounted = False

    async def main():
        nonlocal mounted
        async with trio.open_nursery() as nursery:
            front = await member.start(nursery)
            coh = front.coh
            ops = Operations(member.fs, front, attr_timeout=CLUSTER_ATTR_TIMEOUT,
                             entry_timeout=CLUSTER_ENTRY_TIMEOUT,
                             cacheable=coh.kernel_cacheable,
                             entries_cacheable=coh.entries_cacheable,
                             direct_writeonly=True, locks=FileLocks(coh))
            ops.after_init.append(lambda: set_readahead(member.mountpoint, READAHEAD_KB))
            coh.forget_kernel_entries = ops.forget_entries

            def epochs():
                coh.entry_epochs = bool(opts.get("entrycache")) and \
                    ops.probe_entry_epochs()
                if coh.entry_epochs:
                    log.info("the kernel caches directory entries (-o entrycache): a "
                             "mount made inside %s is detached when a directory's lock "
                             "leaves this node", member.mountpoint)
            ops.after_init.append(epochs)
            try:
                pyfuse3.init(ops, mountpoint, _fuse_options(volume, opts))
            except RuntimeError as e:
                await member.stop()
                raise MountFailed(f"cannot mount on {mountpoint}: {e}") from None
            mounted = True
            coh.forget_kernel_attrs = ops.forget_attrs
            coh.pages.invalidate = ops.drop_pages
            keep = opts.get("dropbehind")        # True, or the bytes to keep (0 too)
            if keep is not None:
                coh.pages.drop_range = ops.drop_page_range
                if keep is not True:
                    coh.pages.behind_keep = keep
            log.info("%s mounted on %s (slot %d, node %s, cluster)", volume, mountpoint,
                     member.slot, member.node)
            _notify_ready(ready_fd)
            guard.serving()
            try:
                await serve(member)
            finally:
                guard.leave()
                # the kernel let the mount go: nothing of it is cached any more
                coh.pages.invalidate = coh.pages.drop_range = None
                coh.entry_epochs = False
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
        guard.restore()     # last: a signal from here on kills, and nothing is left
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
    front = DirectFrontend(fs)
    where = os.path.realpath(mountpoint)
    if not single.readonly:
        # freeze, thaw, grow and add-slots through the control channel
        single.admin = SingleNodeAdmin(single, front)
        single.mountpoint = where
    ops = Operations(fs, front)
    ops.after_init.append(lambda: set_readahead(where, READAHEAD_KB))
    try:
        pyfuse3.init(ops, mountpoint, _fuse_options(volume, opts))
    except RuntimeError as e:
        single.stop()
        raise MountFailed(f"cannot mount on {mountpoint}: {e}") from None
    log.info("%s mounted on %s (slot %d, single-node)", volume, mountpoint, single.slot)
    _notify_ready(ready_fd)
    clean = False
    # (not os.path.realpath here: its lstat of the mount point would wait for this
    # process to serve it)
    guard = _SignalGuard(single, where)

    async def main():
        guard.serving()
        try:
            await serve(single)
        finally:
            guard.leave()

    try:
        trio.run(main)
        clean = True
    finally:
        guard.leave()       # (again, when trio.run failed before main ran)
        pyfuse3.close(unmount=single.terminated or not clean)
        if single.stop():
            log.info("%s unmounted cleanly", volume)
            stopped = 0
        else:
            log.error("%s unmounted; the volume needs its journal replayed (the next "
                      "mount or fsck -y does it)", volume)
            stopped = 1
        guard.restore()     # last: a signal from here on kills, and nothing is left
    return stopped
