"""``clusterfs mkfs``: make a new volume.

Writes only headers (superblock and backup, heartbeat blocks, journal headers,
resource-group headers and bitmaps, the root directory), never the data area, so a
1 TiB sparse image is made in seconds.  Refuses to overwrite a recognisable file
system unless forced.  On a terminal, one line of progress (``clusterfs.progress``)
while the slots and resource groups are written; nothing with ``-q`` or when stderr
is not a terminal.
"""

from __future__ import annotations

import os
import re
import stat
import struct

from journal import MIN_LENGTH, Journal

from ..errors import ClusterfsError, UsageError
from ..fs.volume import Volume
from ..ondisk import blockhdr
from ..ondisk.blockdev import BLOCK_SIZE, BlockDevice, device_size
from ..ondisk.format import (DF_DIRTREE, DINODE, DIRENT, FORMAT_REVISION,
                             SB_FLAG_CLUSTER_INFO, Dinode, Heartbeat, Superblock, TreeNode,
                             now_ns, plan_geometry)
from ..ondisk.lease import FREE_LEASE, encode_lease
from ..ondisk.rgrp import new_group_image
from ..progress import Progress

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtpe]?)(i?b?)\s*$", re.I)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50,
          "e": 1 << 60}


def parse_size(text: str) -> int:
    """'64M', '1TiB', '4096' -> bytes (binary units)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"bad size {text!r} (examples: 64M, 10G, 1TiB)")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    return int(value)


def existing_filesystem(path: str) -> str | None:
    """Name of a file system recognised on ``path`` (clusterfs, ext2/3/4, XFS,
    btrfs), or None."""
    try:
        size = device_size(path)
        with open(path, "rb") as f:
            head = f.read(128 * 1024)
            tail = b""
            if size >= BLOCK_SIZE:
                f.seek((size // BLOCK_SIZE - 1) * BLOCK_SIZE)
                tail = f.read(BLOCK_SIZE)
    except OSError:
        return None
    for buf in (head[:BLOCK_SIZE], tail):
        if len(buf) >= 8 and struct.unpack_from("<I", buf, 0)[0] == blockhdr.MAGIC \
                and struct.unpack_from("<H", buf, 4)[0] == blockhdr.BlockType.SUPERBLOCK:
            return "clusterfs"
    if len(head) >= 1082 and head[1080:1082] == b"\x53\xef":
        return "ext2/ext3/ext4"
    if head[:4] == b"XFSB":
        return "XFS"
    if len(head) >= 0x10048 and head[0x10040:0x10048] == b"_BHRfS_M":
        return "btrfs"
    return None


def make_volume(path: str, size: int | None = None, *, slots: int = 4, label: str = "",
                force: bool = False, journal_blocks: int | None = None,
                rgrp_blocks: int | None = None, cluster_name: str = "",
                progress: Progress | None = None) -> Superblock:
    """Create a clusterfs volume on ``path`` (an image file is created if missing).

    Args:
        path: image file or block device.
        size: bytes (required for a new image file; at most the device size).
        slots: node slots (how many nodes may mount at once).
        label: volume label.
        force: overwrite an existing file system.
        journal_blocks: journal size per slot in blocks (default: chosen by size).
        rgrp_blocks: resource group size in blocks (default: chosen by size).
        cluster_name: recorded so that a plain mount joins the cluster (with the key
            file /etc/clusterfs/NAME.key).
        progress: told how many slots and resource groups are written (its total is
            set here, once the geometry is known).

    Returns:
        The new superblock.

    Raises:
        UsageError: a bad argument; ClusterfsError: the image cannot be created, or
            the target holds a file system and ``force`` is not given.
    """
    if not 1 <= slots <= 256:
        raise UsageError("--slots must be between 1 and 256")
    if len(label.encode()) > 64:
        raise UsageError("--label is longer than 64 bytes")
    created = False
    if not os.path.exists(path):
        if size is None:
            raise UsageError(f"{path} does not exist; give --size to create an image")
        try:
            with open(path, "wb") as f:
                f.truncate(size)
        except OSError as e:
            raise ClusterfsError(f"cannot create {path}: {e.strerror}") from None
        created = True
    else:
        st = os.stat(path)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise UsageError(f"{path} is neither an image file nor a block device")
        found = existing_filesystem(path)
        if found and not force:
            raise ClusterfsError(f"{path} already holds a {found} file system; "
                             f"use --force to overwrite it")
        devsize = device_size(path)
        if size is None:
            size = devsize
        elif stat.S_ISBLK(st.st_mode):
            if size > devsize:
                raise UsageError(f"--size is larger than the device ({devsize} bytes)")
        elif size != devsize:
            with open(path, "r+b") as f:
                f.truncate(size)
    total = size // BLOCK_SIZE
    try:
        sb = plan_geometry(total, slots, journal_blocks, rgrp_blocks)
    except ValueError as e:
        if created:
            os.unlink(path)
        raise UsageError(f"{e} (size {size} bytes, {slots} slots)") from None
    sb.label = label
    sb.cluster_name = cluster_name
    if cluster_name:
        sb.flags |= SB_FLAG_CLUSTER_INFO
    dev = BlockDevice(path)
    try:
        _write_layout(dev, sb, progress)
    finally:
        dev.close()
    return sb


def _write_layout(dev, sb: Superblock, progress: Progress | None = None) -> None:
    # wipe any old superblocks first, so a half-made volume is never mistaken for one
    dev.write(0, bytes(BLOCK_SIZE))
    dev.write(sb.backup_bno, bytes(BLOCK_SIZE))
    dev.write(sb.lease_bno, encode_lease(FREE_LEASE, sb.lease_bno))
    if progress is not None:
        progress.total = sb.nslots + sb.rgrp_count
    for slot in range(sb.nslots):
        if progress is not None:
            progress.update(slot, "writing node slots and journals")
        bno = sb.heartbeat_bno(slot)
        dev.write(bno, Heartbeat(slot=slot).image(bno))
        start, length = sb.journal_range(slot)
        Journal.format(dev, start, length, slot=slot)
    for rg in range(sb.rgrp_count):
        if progress is not None:
            progress.update(sb.nslots + rg, "writing resource groups")
        start, length = sb.rgrp_range(rg)
        dev.write(start, new_group_image(rg, start, length, sb.bitmap_blocks))
    # the root directory, through a journal-less volume (writes through)
    if progress is not None:
        progress.update(progress.total)
    vol = Volume(dev, sb)
    with vol.operation():
        first = sb.rgrp_range(0)[0] + 1 + sb.bitmap_blocks
        ino = vol.alloc.alloc_meta(first, state=DINODE)
        t = now_ns()
        root = Dinode(ino, generation=1, mode=stat.S_IFDIR | 0o755, nlink=2, atime=t,
                      mtime=t, ctime=t, btime=t, flags=DF_DIRTREE, parent=ino,
                      root=TreeNode(ino, DIRENT, 0, ino, is_root=True))
        vol.created(root)
        hdr = vol.rgrp(0)
        vol.touch(hdr)
        hdr.igeneration += 1
    sb.root_ino = ino
    dev.flush()
    dev.write(sb.backup_bno, sb.image(sb.backup_bno))
    dev.write(0, sb.image(0))
    dev.flush()


def _fmt_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def summary(path: str, sb: Superblock) -> str:
    data = sum(sb.rgrp_range(i)[1] for i in range(sb.rgrp_count))
    return "\n".join([
        f"clusterfs volume on {path}",
        f"  format revision   {FORMAT_REVISION}",
        f"  uuid              {sb.uuid.hex()}",
        f"  label             {sb.label or '(none)'}",
        f"  size              {_fmt_size(sb.total_blocks * BLOCK_SIZE)} "
        f"({sb.total_blocks} blocks of {BLOCK_SIZE} bytes)",
        f"  node slots        {sb.nslots} (journal {_fmt_size(sb.journal_blocks * BLOCK_SIZE)} each)",
        f"  resource groups   {sb.rgrp_count} of {_fmt_size(sb.rgrp_blocks * BLOCK_SIZE)}",
        f"  data space        {_fmt_size(data * BLOCK_SIZE)}",
        f"  root inode        {sb.root_ino}",
        f"  backup superblock block {sb.backup_bno}",
    ] + ([f"  cluster           {sb.cluster_name}"] if sb.cluster_name else []))


def cmd_mkfs(args) -> int:
    try:
        size = parse_size(args.size) if args.size else None
        jblocks = parse_size(args.journal_size) // BLOCK_SIZE if args.journal_size else None
    except ValueError as e:
        raise UsageError(str(e)) from None
    if jblocks is not None and jblocks < MIN_LENGTH:
        raise UsageError(f"--journal-size {args.journal_size} is below the smallest "
                         f"journal, {MIN_LENGTH * BLOCK_SIZE // 1024}K")
    # on a terminal (stderr), one line of progress while the headers are written
    progress = Progress("mkfs", quiet=args.quiet)
    try:
        sb = make_volume(args.volume, size, slots=args.slots, label=args.label or "",
                         force=args.force, journal_blocks=jblocks,
                         cluster_name=args.cluster or "", progress=progress)
    except BaseException:
        progress.close(erase=True)
        raise
    progress.close()
    if not args.quiet:
        print(summary(args.volume, sb))
    return 0


def register(sub) -> None:
    p = sub.add_parser("mkfs", help="make a new clusterfs volume",
                       description="Make a clusterfs volume on an image file (created "
                                   "sparse if missing) or a block device.")
    p.add_argument("volume", help="image file or block device")
    p.add_argument("--size", help="volume size, e.g. 64M, 10G, 1T (default: the device size)")
    p.add_argument("--slots", type=int, default=4, help="node slots (default 4)")
    p.add_argument("--label", help="volume label (up to 64 bytes)")
    p.add_argument("--journal-size", help="journal size per slot (default: by volume size)")
    p.add_argument("--cluster", help="cluster name to record in the superblock (a plain "
                                     "mount then joins the cluster with "
                                     "/etc/clusterfs/NAME.key)")
    p.add_argument("-f", "--force", action="store_true",
                   help="overwrite an existing file system")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="print nothing (no progress either)")
    p.set_defaults(func=cmd_mkfs)
