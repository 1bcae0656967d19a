"""``clusterfs grow VOLUME [--size SIZE] [-q]``: grow a volume into the space added to
its device.

The image file or block device is made bigger first (or ``--size`` extends an image
file, never shrinks one); the file system then takes the new space as resource
groups (``clusterfs.fs.grow``).

When a cluster member of this machine has the volume mounted, the grow goes through
it (``clusterfs.control``: every node is frozen while the groups are written, then
takes the grown superblock without a remount; ``_grow_online``).  A volume mounted
only on other machines is refused (run the grow on one of them).  Otherwise, offline,
the checklist:

1. Check the request against the volume (bigger, a whole number of blocks, enough to
   add space), nothing written yet.
2. Take the host-local lock of the volume and check that no slot is live.
3. Extend the image file when ``--size`` asks for more than it has.
4. Keep a heartbeat in a free slot (node ``grow``) so that no node mounts meanwhile;
   replay the journals a dead node left (as a mount would).
5. Finish an interrupted grow, if the superblock records one; grow.

A failure before the grow is recorded in the superblock leaves the volume as it was
(an image file extended by step 3 is cut back to its size).
"""

from __future__ import annotations

import fcntl
import os
import socket
import stat

from ..errors import ClusterfsError, CorruptBlock, FormatMismatch, UsageError, VolumeBusy
from ..fs import grow
from ..fs.volume import Volume, read_superblock
from ..ondisk import slots as slotmod
from ..ondisk.blockdev import BLOCK_SIZE
from ..ondisk.format import HB_FREE, HB_NOLOCK, Superblock
from ..progress import Progress
from .mkfs import _fmt_size, parse_size


def grow_volume(path: str, size: int | None = None, *, quiet: bool = True,
                say=print) -> tuple[Superblock, Superblock]:
    """Grow the volume on ``path`` to ``size`` bytes (default: the device's size).

    Args:
        path: image file or block device.
        size: the new size in bytes (a whole number of blocks); an image file smaller
            than that is extended.
        quiet: draw no progress.
        say: where the lines about an interrupted grow go.

    Returns:
        (the superblock before, the superblock after).

    Raises:
        UsageError: a bad size (smaller, the same, not whole blocks, too small to add
            space, larger than the block device).
        VolumeBusy: a node has the volume mounted.
        VolumeError: the volume cannot be opened or its last group is damaged.
        ClusterfsError: the image file cannot be extended or written (ENOSPC ...).
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise ClusterfsError(f"cannot open {path}: {e.strerror}") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise UsageError(f"{path} is neither an image file nor a block device")
    is_file = stat.S_ISREG(st.st_mode)
    if size is not None and size % BLOCK_SIZE:
        raise UsageError(f"--size {size} bytes is not a whole number of {BLOCK_SIZE}-byte "
                         f"blocks")
    info = _local_member(path)
    if info is not None:
        return _grow_online(path, info, size, is_file, st.st_size)
    vol = Volume.open(path)
    lockfd = -1
    heart = None
    try:
        sb = vol.sb
        before = sb.resized(sb.grow_from) if sb.growing else sb
        lockfd = _lock_host(path, vol)
        dev_blocks = vol.dev.nblocks
        if size is None:
            new_total = dev_blocks
            if new_total <= sb.total_blocks and not sb.growing:
                raise UsageError(f"{path} is no bigger than the volume "
                                 f"({sb.total_blocks * BLOCK_SIZE} bytes): enlarge it "
                                 f"first, or give --size")
        else:
            new_total = size // BLOCK_SIZE
            if not is_file and new_total > dev_blocks:
                raise UsageError(f"--size is larger than the device "
                                 f"({dev_blocks * BLOCK_SIZE} bytes)")
        # (an interrupted grow is finished first: more is asked of its new size)
        more = not (sb.growing and new_total == sb.total_blocks)
        if more:
            grow.plan_grow(sb.resized(sb.total_blocks), new_total)
        extended_from = None
        if is_file and new_total > dev_blocks:
            try:
                os.truncate(path, new_total * BLOCK_SIZE)
            except OSError as e:
                raise ClusterfsError(f"cannot extend {path} to {new_total * BLOCK_SIZE} "
                                     f"bytes: {e.strerror}; the volume is unchanged") from None
            extended_from = st.st_size
            vol.dev.refresh_size()
        try:
            heart = _hold_slot(vol)
            for slot in range(sb.nslots):
                slotmod.replay_slot(vol.dev, sb, slot)
            if sb.growing:
                say(f"{path}: finishing an interrupted grow (from "
                    f"{_fmt_size(sb.grow_from * BLOCK_SIZE)} to "
                    f"{_fmt_size(sb.total_blocks * BLOCK_SIZE)})")
                sb = grow.finish_grow(vol.dev, sb)
            if more:
                with Progress("writing resource groups", quiet=quiet) as progress:
                    sb = grow.grow_on_disk(vol.dev, sb, new_total, progress=progress)
        except OSError as e:
            where = _unchanged(vol, before)
            if where and extended_from is not None:
                _cut_back(path, extended_from)
            raise ClusterfsError(
                f"cannot grow {path}: {e.strerror or e}; " +
                ("the volume is unchanged" if where else
                 f"the grow is recorded: run 'clusterfs grow {path}' again (or mount "
                 f"the volume) to finish it")) from None
        except BaseException:
            if extended_from is not None and _unchanged(vol, before):
                _cut_back(path, extended_from)
            raise
        return before, sb
    finally:
        if heart is not None:
            heart.stop()
            heart.set_state(HB_FREE)
        if lockfd >= 0:
            os.close(lockfd)
        vol.close()


def _local_member(path: str) -> dict | None:
    """The control channel of a cluster member of this machine that has ``path``
    mounted (None: there is none)."""
    from .. import control
    try:
        return control.find(path)
    except UsageError:
        return None


def _grow_online(path: str, info: dict, size: int | None, is_file: bool,
                 file_size: int) -> tuple[Superblock, Superblock]:
    """Grow a mounted volume through the member of this machine (module doc)."""
    from .. import control
    vol = Volume.open(path, readonly=True)
    try:
        before, dev_blocks = vol.sb, vol.dev.nblocks
    finally:
        vol.close()
    new_total = size // BLOCK_SIZE if size is not None else dev_blocks
    if size is None and new_total <= before.total_blocks:
        raise UsageError(f"{path} is no bigger than the volume "
                         f"({before.total_blocks * BLOCK_SIZE} bytes): enlarge it first, "
                         f"or give --size")
    if not is_file and new_total > dev_blocks:
        raise UsageError(f"--size is larger than the device ({dev_blocks * BLOCK_SIZE} "
                         f"bytes)")
    grow.plan_grow(before, new_total)
    extended = is_file and new_total > dev_blocks
    if extended:
        try:
            os.truncate(path, new_total * BLOCK_SIZE)
        except OSError as e:
            raise ClusterfsError(f"cannot extend {path} to {new_total * BLOCK_SIZE} "
                                 f"bytes: {e.strerror}; the volume is unchanged") from None
    try:
        control.call(info, {"op": "grow", "total_blocks": new_total})
    except control.ControlError as e:
        after = _read_sb(path)
        same = after is not None and after.total_blocks == before.total_blocks
        if extended and same:
            _cut_back(path, file_size)
        raise ClusterfsError(f"cannot grow {path} (through node {info['node']}): {e}" +
                             ("; the volume is unchanged" if same else "")) from None
    return before, _read_sb(path) or before


def _read_sb(path: str) -> Superblock | None:
    try:
        vol = Volume.open(path, readonly=True)
    except (ClusterfsError, OSError):
        return None
    try:
        return vol.sb
    finally:
        vol.close()


def _lock_host(path: str, vol: Volume) -> int:
    """The host-local lock (as a mount takes), and no live slot; or VolumeBusy."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        busy = False
    except BlockingIOError:
        busy = True
    live = slotmod.live_slots(vol.dev, vol.sb)
    if busy or live:
        os.close(fd)
        node = next(iter(live.values())).node if live else socket.gethostname()
        raise VolumeBusy(f"{path} is mounted (node {node}) and no cluster member of this "
                         f"machine has it: grow it where one has, or unmount it")
    return fd


def _hold_slot(vol: Volume):
    """A heartbeat (node ``grow``) in a free slot, beating from a thread, so that no
    node mounts while the volume grows (None when no slot is free: the stale ones are
    left to their journal's replay)."""
    for slot in range(vol.sb.nslots):
        hb = slotmod.read_heartbeat(vol.dev, vol.sb, slot)
        if hb is not None and hb.state == HB_FREE:
            break
    else:
        return None
    heart = slotmod.HeartbeatWriter(vol.dev, vol.sb, slot, "grow", HB_NOLOCK, 1.0)
    heart.set_state(HB_NOLOCK)
    heart.start()
    return heart


def _unchanged(vol: Volume, before: Superblock) -> bool:
    """Whether the primary superblock is still the one before the grow."""
    try:
        sb = read_superblock(vol.dev)
    except (CorruptBlock, FormatMismatch, OSError):
        return False
    return not sb.growing and sb.total_blocks == before.total_blocks


def _cut_back(path: str, size: int) -> None:
    try:
        os.truncate(path, size)
    except OSError:
        pass


def cmd_grow(args) -> int:
    try:
        size = parse_size(args.size) if args.size else None
    except ValueError as e:
        raise UsageError(str(e)) from None
    before, after = grow_volume(args.volume, size, quiet=args.quiet,
                                say=(lambda line: None) if args.quiet else print)
    if not args.quiet:
        added = after.rgrp_count - before.rgrp_count
        print(f"{args.volume}: grown from {_fmt_size(before.total_blocks * BLOCK_SIZE)} "
              f"to {_fmt_size(after.total_blocks * BLOCK_SIZE)} ({after.total_blocks} "
              f"blocks); {added} resource group(s) added, data space "
              f"{_fmt_size(before.data_blocks() * BLOCK_SIZE)} -> "
              f"{_fmt_size(after.data_blocks() * BLOCK_SIZE)}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("grow", help="grow a volume into the space added to its device",
                       description="Grow a clusterfs volume into the space added at the "
                                   "end of its image file or block device; while it is "
                                   "mounted, through this machine's cluster member (every "
                                   "node takes the new size without a remount).")
    p.add_argument("volume", help="image file or block device")
    p.add_argument("--size", help="new size, e.g. 20G (an image file is extended to it; "
                                  "default: the size of the device)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing")
    p.set_defaults(func=cmd_grow)
