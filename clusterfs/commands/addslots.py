"""``clusterfs add-slots VOLUME N``: add N node slots to a volume that nobody mounts.

Each new slot gets a heartbeat block and a journal, taken from free space in the
resource groups (``clusterfs.fs.addslots``: the steps and what a power cut leaves).
The journals are as large as mkfs's when one fits in a group, else the largest power
of two of blocks that does (``--journal-size`` chooses; once slots were added, every
later one has their length).  When a mount of this machine has the volume, the slots
are added through it (every node frozen meanwhile); a volume mounted only elsewhere
is refused; so is one whose journals are not all clean.
While it works the command holds a free slot itself (state single-node, node
``add-slots``), so that no node mounts meanwhile.  Through a mounted member (the
online path, ``cluster.admin``) the length asked for is passed on.
"""

from __future__ import annotations

import argparse
import fcntl
import os

from ..errors import ClusterfsError, UsageError, VolumeBusy
from ..fs.addslots import (add_slots_on_disk, added_journal_length, check_quiet,
                           plan_add_slots, size_text)
from ..fs.volume import Volume
from ..ondisk import slots as slotmod
from ..ondisk.blockhdr import BLOCK_SIZE
from ..ondisk.format import HB_FREE, HB_NOLOCK
from .mkfs import parse_size

NODE = "add-slots"


class _HeldSlot:
    """A heartbeat in a free slot, beating from a thread until ``release``."""

    def __init__(self, dev, sb):
        self.writer = None
        for slot, hb in enumerate(slotmod.read_heartbeats(dev, sb)):
            if hb is not None and hb.state == HB_FREE:
                self.writer = slotmod.HeartbeatWriter(dev, sb, slot, NODE, HB_NOLOCK)
                self.writer.set_state(HB_NOLOCK)
                self.writer.start()
                break

    def release(self) -> None:
        if self.writer is not None:
            self.writer.stop()
            self.writer.set_state(HB_FREE)
            self.writer = None


def journal_blocks_of(text: str) -> int:
    """``--journal-size`` (a size as mkfs takes it: 64M, 16384K, ...) in blocks.

    Raises:
        UsageError: not a size, or not a whole number of blocks.
    """
    try:
        size = parse_size(text)
    except ValueError as e:
        raise UsageError(f"--journal-size: {e}") from None
    if size <= 0 or size % BLOCK_SIZE:
        raise UsageError(f"--journal-size {text} is not a whole number of "
                         f"{BLOCK_SIZE}-byte blocks")
    return size // BLOCK_SIZE


def add_slots(path: str, n: int, journal_blocks: int | None = None) -> tuple:
    """Add ``n`` slots to the volume at ``path``, their journals ``journal_blocks``
    long (None: the default, ``fs.addslots.added_journal_length``); returns (old,
    new) superblocks.

    Raises:
        UsageError: a bad ``n`` or ``journal_blocks``; VolumeBusy: the volume is
            mounted; NoSpace: not enough contiguous free space; VolumeError: the
            volume cannot be opened, or a journal is not clean.  Nothing is written
            in those cases.
    """
    if n < 1:
        raise UsageError(f"the number of slots to add must be at least 1, not {n}")
    from .. import control
    try:
        info = control.find(path)
    except UsageError:
        info = None
    if info is not None:
        vol = Volume.open(path, readonly=True)
        try:
            old = vol.sb
        finally:
            vol.close()
        if journal_blocks is not None:
            added_journal_length(old, journal_blocks)    # refused here if it cannot be
        try:
            control.call(info, {"op": "add_slots", "count": n,
                                "journal_blocks": journal_blocks})
        except control.ControlError as e:
            raise ClusterfsError(f"cannot add slots to {path} (through node "
                                 f"{info['node']}): {e}") from None
        vol = Volume.open(path, readonly=True)
        try:
            return old, vol.sb
        finally:
            vol.close()
    vol = Volume.open(path)
    lockfd = -1
    held = None
    try:
        sb = vol.sb
        live = slotmod.live_slots(vol.dev, sb)
        if live:
            hb = live[min(live)]
            raise VolumeBusy(f"{path} is mounted (node {hb.node}) and no cluster member "
                             f"of this machine has it: add the slots where one has, or "
                             f"unmount it")
        lockfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(lockfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise VolumeBusy(f"{path} is mounted (on this host) and no cluster member of "
                             f"this machine has it: unmount it") from None
        # every refusal before anything is written (our own heartbeat included)
        check_quiet(vol.dev, sb)
        plan_add_slots(vol.dev, sb, n, journal_blocks)
        held = _HeldSlot(vol.dev, sb)
        new = add_slots_on_disk(vol.dev, sb, n, journal_blocks=journal_blocks)
        return sb, new
    finally:
        try:
            if held is not None:
                held.release()
        finally:
            if lockfd >= 0:
                os.close(lockfd)
            vol.close()


def cmd_add_slots(args) -> int:
    jblocks = journal_blocks_of(args.journal_size) if args.journal_size else None
    old, new = add_slots(args.volume, args.count, jblocks)
    if not args.quiet:
        length = new.added_journal_blocks
        print(f"{args.volume}: added {new.nslots - old.nslots} slot(s), now {new.nslots} "
              f"(journal {size_text(length)} each"
              + (f"; the {new.fixed_slots} of mkfs have "
                 f"{size_text(new.journal_blocks)})" if length != new.journal_blocks
                 else ")"))
        for slot in range(old.nslots, new.nslots):
            jstart, length = new.journal_range(slot)
            print(f"  slot {slot}: heartbeat block {new.heartbeat_bno(slot)}, journal "
                  f"blocks {jstart}-{jstart + length - 1}")
    return 0


def _count(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"N must be a number of slots, not {text!r}") \
            from None


def register(sub) -> None:
    p = sub.add_parser("add-slots", help="add node slots (heartbeat and journal each) "
                                         "from free space",
                       description=__doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("volume", help="image file or block device")
    p.add_argument("count", metavar="N", type=_count, help="slots to add")
    p.add_argument("--journal-size", metavar="SIZE",
                   help="journal size of each new slot, e.g. 64M (default: mkfs's when "
                        "it fits in a resource group, else the largest power of two "
                        "that does; once slots were added, theirs)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing")
    p.set_defaults(func=cmd_add_slots)

