"""Lock value blocks: the 32 bytes the lock manager keeps with a lock.

The lock manager stores them, never reads them; they are part of the format the
nodes share, so they are defined here, beside the on-disk structures, and described
in docs/LOCKS.md ("Value blocks of the file system's locks").  A value block is
written by the node that gives up a lock it held PW or EX, and read by the next node
granted the lock: the version tells it whether what it cached under the lock is
still current.  Little-endian, like the volume.
"""

from __future__ import annotations

import struct

#: inode lock ``I<ino>``: version, size, mtime (ns, signed), generation
INODE_LVB = struct.Struct("<QQqQ")
#: resource group lock ``R<rg>``: version, free blocks, dinodes, unlinked dinodes
GROUP_LVB = struct.Struct("<QIII12x")
#: a version fits in 63 bits (the inode and group versions wrap there)
VERSION_MASK = (1 << 63) - 1

assert INODE_LVB.size == GROUP_LVB.size == 32


def lvb_version(lvb: bytes | None) -> int | None:
    """The version at the start of every value block (None: no valid value block)."""
    return int.from_bytes(lvb[:8], "little") if lvb else None
