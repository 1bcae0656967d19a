"""Directory entries: their names, hash keys, types and readdir offsets.

An entry is a record of its directory's tree (``DIRENT_REC`` in ``layout``), keyed by
``crc32c(name) << HASH_SHIFT | c``: ``c`` is the smallest collision index free among
the names of that hash when the entry is made, and never changes while it exists.
``docs/FORMAT.md`` ("Directory hashing and readdir offsets") describes the rule; the
file system (``clusterfs.fs.directory``) and fsck both take it from here.
"""

from __future__ import annotations

from . import blockhdr

NAME_MAX = 255
HASH_SHIFT = 16                 # key = crc32c(name) << 16 | collision index
MAX_COLLISIONS = 1 << HASH_SHIFT
READDIR_BASE = 3                # readdir offsets: 1 = ".", 2 = "..", key + 3 = entry

DT_UNKNOWN, DT_FIFO, DT_CHR, DT_DIR, DT_BLK, DT_REG, DT_LNK, DT_SOCK = 0, 1, 2, 4, 6, 8, 10, 12
DTYPE_SHIFT, DTYPE_MASK = 12, 0xF   # an entry's type: the mode's file-type bits


# A directory entry's hash: crc32c of its name (the function itself, not a wrapper:
# fsck hashes every name of the volume).
name_hash = blockhdr.crc32c


def dtype_of(mode: int) -> int:
    return (mode >> DTYPE_SHIFT) & DTYPE_MASK


def dirent_key(hash_: int, cidx: int) -> int:
    """The key of an entry whose name hashes to ``hash_``, with collision index
    ``cidx``."""
    return (hash_ << HASH_SHIFT) | cidx


def key_hash(key: int) -> int:
    """The name hash a key holds."""
    return key >> HASH_SHIFT


def key_cidx(key: int) -> int:
    """The collision index a key holds."""
    return key & (MAX_COLLISIONS - 1)


def key_range(name: bytes) -> tuple[int, int]:
    """(first, last) key an entry named ``name`` can have."""
    lo = name_hash(name) << HASH_SHIFT          # dirent_key(hash, 0)
    return lo, lo + MAX_COLLISIONS - 1


def bad_name(name: bytes) -> bool:
    """Whether ``name`` cannot be a stored entry's: ``.``, ``..``, longer than
    NAME_MAX, or holding a ``/`` or a NUL byte."""
    return b"/" in name or b"\0" in name or name in (b".", b"..") or len(name) > NAME_MAX
