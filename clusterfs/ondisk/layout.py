"""The numbers of the on-disk format: every field, offset, record size and limit, once.

Each structure is a ``Layout``: its fields in order, each a name and a ``struct``
code.  The ``struct`` that encodes the structure and the offset of every field both
come from that one table, so a field moves in one place.  ``docs/FORMAT.md`` holds the
same tables (``tests/fsck/test_format_doc.py`` checks them against these); the classes
that encode and decode the structures (``superblock``, ``rgrp``, ``dinode``, ``tree``,
``xattr``) and the checker (``fsck``, its salvage of damaged blocks included) take
their offsets, sizes and limits from here.
"""

from __future__ import annotations

import struct

from .blockhdr import BLOCK_SIZE, HEADER_SIZE

FORMAT_REVISION = 5        # what mkfs writes, and the newest revision read
OLDEST_REVISION = 2        # the oldest revision read: a revision-2 volume is a
#                            revision-3 one without shared blocks (raised to 3 by
#                            the first clone), a revision-3 one a revision-4 one
#                            without a slot table (raised to 4 by add-slots), a
#                            revision-4 one a revision-5 one without blocks mapped
#                            past EOF (raised to 5 by the first such preallocation);
#                            docs/FORMAT.md, "Format revision rule"
SHARED_SINCE = 3           # the revision that added shared blocks: the first clone
#                            raises an older volume to it
SLOT_TABLE_SINCE = 4       # the revision that added the slot table: add-slots
#                            raises an older volume to it
PREALLOC_SINCE = 5         # the revision that added DF_PREALLOC (blocks mapped past
#                            EOF ahead of a growing file): the first such write
#                            raises an older volume to it


class Layout:
    """The fields of one structure, in order, packed little-endian without padding.

    Args:
        base: offset of the first field in what holds the structure (a block: after
            the block header; a record or a tree node: 0).
        *fields: (name, ``struct`` code) of each field.
    """

    __slots__ = ("base", "fields", "struct", "size", "end", "offset", "_one")

    def __init__(self, base: int, *fields: tuple[str, str]):
        self.base = base
        self.fields = fields
        self.struct = struct.Struct("<" + "".join(code for _name, code in fields))
        self.size = self.struct.size        # bytes of all the fields
        self.end = base + self.size         # offset just past the last field
        self.offset: dict[str, int] = {}    # field name -> offset (base included)
        self._one: dict[str, struct.Struct] = {}
        at = base
        for name, code in fields:
            one = struct.Struct("<" + code)
            self.offset[name] = at
            self._one[name] = one
            at += one.size

    def names(self) -> list[str]:
        """The field names, in order."""
        return [name for name, _code in self.fields]

    def rows(self) -> list[tuple[int, int, str]]:
        """(offset, size, name) of each field, in order: the table of the document."""
        return [(self.offset[name], self._one[name].size, name) for name, _c in self.fields]

    def get(self, buf, name: str, at: int = 0):
        """The value of field ``name`` of the structure at ``buf[at + base:]``."""
        return self._one[name].unpack_from(buf, at + self.offset[name])[0]

    def put(self, buf, name: str, value, at: int = 0) -> None:
        """Set field ``name`` of the structure at ``buf[at + base:]``."""
        self._one[name].pack_into(buf, at + self.offset[name], value)


# =============================================================================
# Superblock (block 0 and total_blocks - 1)
# =============================================================================

SB_LAYOUT = Layout(
    HEADER_SIZE,
    ("format_rev", "I"), ("block_size", "I"), ("total_blocks", "Q"), ("uuid", "16s"),
    ("label", "64s"), ("created_ns", "q"), ("nslots", "I"), ("journal_blocks", "I"),
    ("slot_start", "Q"), ("journal_start", "Q"), ("rgrp_start", "Q"),
    ("rgrp_blocks", "I"), ("rgrp_count", "I"), ("bitmap_blocks", "I"), ("flags", "I"),
    ("root_ino", "Q"), ("features", "Q"), ("backup_bno", "Q"), ("cluster_name", "32s"),
    ("lease_start", "Q"), ("lease_blocks", "I"), ("grow_from", "Q"), ("slot_table", "Q"),
    ("reserved", "100s"), ("mkfs_seq", "Q"))
# nslots counts every slot: the fixed ones of mkfs (their number is journal_start -
# slot_start) and those add-slots made, listed by the slot table (slot_table: its
# block; 0: none)

SB_FLAG_CLUSTER_INFO = 1   # cluster_name is set
SB_FLAG_GROWING = 2        # a grow from grow_from blocks is not finished yet: the
#                            geometry is the new one, the groups and the backup copy
#                            may still be the old ones (clusterfs.fs.grow finishes it)
MAX_SLOTS = 256            # node slots of a volume, fixed and added together

# =============================================================================
# The slot table (a block in a resource group): slots added after mkfs
# =============================================================================

SLOT_TABLE_LAYOUT = Layout(
    HEADER_SIZE,
    ("count", "I"), ("first_slot", "I"), ("journal_blocks", "I"), ("reserved", "I"))
# journal_blocks: the length of every journal the table lists, which may differ from
# the superblock's (the fixed slots'): each must fit in one group's data area
SLOT_ENTRY = Layout(0, ("heartbeat", "Q"), ("journal", "Q"))    # one per added slot
SLOT_ENTRIES_OFF = SLOT_TABLE_LAYOUT.end                        # 48
SLOT_TABLE_MAX = (BLOCK_SIZE - SLOT_ENTRIES_OFF) // SLOT_ENTRY.size   # 253 entries

# =============================================================================
# The lock manager's lease area (block 1): the master's delta lease
# =============================================================================

LEASE_START = 1             # the lease area: right after the superblock
LEASE_BLOCKS = 1            # one block: the master lease
LEASE_LAYOUT = Layout(
    HEADER_SIZE,
    ("owner", "q"), ("generation", "Q"), ("counter", "Q"), ("acquired_ns", "q"),
    ("renewed_ns", "q"), ("expire_ms", "I"), ("reserved", "I"), ("node", "64s"),
    ("addr", "128s"))
LEASE_FREE = -1             # owner of a lease nobody holds (as mkfs writes it)

# =============================================================================
# Heartbeat (one block per node slot)
# =============================================================================

HB_LAYOUT = Layout(
    HEADER_SIZE,
    ("slot", "I"), ("state", "I"), ("counter", "Q"), ("timestamp_ns", "q"),
    ("mount_id", "Q"), ("node", "64s"), ("interval_ms", "I"), ("flags", "I"),
    ("pid", "Q"), ("host", "64s"))

HB_FREE = 0             # slot unused (never mounted, or cleanly unmounted)
HB_NOLOCK = 1           # mounted in single-node mode
HB_CLUSTER = 2          # mounted as a cluster member
HB_FENCED = 3           # the node fenced itself: writes stopped
HB_STATE_NAMES = {HB_FREE: "free", HB_NOLOCK: "single-node", HB_CLUSTER: "cluster",
                  HB_FENCED: "fenced"}

# =============================================================================
# Resource groups: header + bitmap blocks
# =============================================================================

RGRP_LAYOUT = Layout(
    HEADER_SIZE,
    ("index", "I"), ("flags", "I"), ("start", "Q"), ("length", "I"),
    ("bitmap_blocks", "I"), ("free", "I"), ("dinodes", "I"), ("unlinked", "I"),
    ("pad", "I"), ("igeneration", "Q"))
# (bytes 80..639 of the group header are zero; 640..4095 hold the root node of the
# group's refcount tree, as a dinode's data area holds its tree's root: REFROOT_OFF)

# bitmap states (2 bits per block)
FREE = 0        # not in use
USED = 1        # file data, tree node, xattr block, or rgrp header/bitmap block
UNLINKED = 2    # a dinode with nlink 0 still open somewhere: freed at last close/recovery
DINODE = 3      # an in-use dinode

STATE_NAMES = {FREE: "free", USED: "used", UNLINKED: "unlinked", DINODE: "dinode"}
BITMAP_BYTES = BLOCK_SIZE - HEADER_SIZE             # 4064 after a bitmap block's header
BLOCKS_PER_BITMAP = BITMAP_BYTES * 4                # 16256 entries, 4 a byte

# =============================================================================
# Dinode (one block per inode)
# =============================================================================

DINODE_LAYOUT = Layout(
    HEADER_SIZE,
    ("generation", "Q"), ("mode", "I"), ("uid", "I"), ("gid", "I"), ("nlink", "I"),
    ("size", "Q"), ("blocks", "Q"), ("atime", "q"), ("mtime", "q"), ("ctime", "q"),
    ("btime", "q"), ("rdev", "Q"), ("flags", "I"), ("xattr_len", "H"),
    ("reserved", "H"), ("xattr_block", "Q"), ("parent", "Q"), ("entries", "Q"))

XATTR_INLINE_OFF = 256                              # inline xattrs: offset and room
XATTR_INLINE_SIZE = 384
DATA_OFF = XATTR_INLINE_OFF + XATTR_INLINE_SIZE     # 640: the data area
DATA_SIZE = BLOCK_SIZE - DATA_OFF                   # 3456
INLINE_MAX = DATA_SIZE                              # largest inline file
assert DINODE_LAYOUT.end <= XATTR_INLINE_OFF

DF_INLINE = 1      # the data area holds the file's bytes (size <= INLINE_MAX)
DF_EXTENTS = 2     # the data area holds the root node of the extent tree
DF_DIRTREE = 4     # the data area holds the root node of the directory tree
DF_PREALLOC = 8    # with DF_EXTENTS: blocks may be mapped past EOF, preallocated ahead of
#                    a growing file; they are not the file's bytes (docs/FORMAT.md)

MAX_FILE_BLOCKS = 1 << 40   # logical blocks of a file: 4 PiB, far past the 16 TiB promised
LINK_MAX = 65000            # links to one non-directory
SYMLINK_MAX = 4095          # bytes of a symbolic link's target (its size)

# =============================================================================
# Tree nodes (extent trees and directory trees share one node format)
# =============================================================================

EXTENT = 1                  # node kinds
DIRENT = 2
REFCOUNT = 3                # a resource group's refcount tree (owner: the group)
MAX_DEPTH = 8               # levels of a tree: a node's level is at most MAX_DEPTH - 1

NODE_LAYOUT = Layout(0, ("level", "H"), ("nrecs", "H"), ("kind", "I"), ("owner", "Q"))
INDEX_REC = Layout(0, ("key", "Q"), ("child", "Q"))                     # level > 0
EXTENT_REC = Layout(0, ("lblk", "Q"), ("pblk", "Q"), ("len", "I"), ("flags", "I"))
REFCOUNT_REC = Layout(0, ("pblk", "Q"), ("len", "I"), ("count", "I"))   # kind 3, level 0
DIRENT_REC = Layout(0, ("key", "Q"), ("ino", "Q"), ("dtype", "B"), ("namelen", "B"))
# (a directory record's name, namelen bytes, follows its fixed part)

NODE_HDR = NODE_LAYOUT.size                           # 16
NODE_CAPACITY = BLOCK_SIZE - HEADER_SIZE - NODE_HDR   # 4048 payload bytes in a block
ROOT_CAPACITY = DATA_SIZE - NODE_HDR                  # 3440 in the dinode

# extent record flags
EXT_SHARED = 1              # the extent's blocks may be shared with other extents:
#                             their reference count is in their group's refcount tree
#                             (no record there: 1); a write copies a block first
#                             when its count is 2 or more (copy-on-write)
EXT_FLAGS = EXT_SHARED      # every flag bit a reader knows

# refcount trees: one per resource group, its root in the group header
REFROOT_OFF = DATA_OFF      # 640: the root node in the group header (as a dinode's)
REFROOT_SIZE = DATA_SIZE    # 3456: node header and ROOT_CAPACITY bytes of records
MAX_REFCOUNT = (1 << 32) - 1    # a count the record's field holds

# =============================================================================
# Extended attributes (inline in the dinode, and the overflow block)
# =============================================================================

XATTR_ENTRY = Layout(0, ("namelen", "B"), ("valuelen", "H"))   # then name, value
XATTR_BLOCK_LAYOUT = Layout(HEADER_SIZE, ("owner", "Q"), ("used", "H"))
XATTR_BLOCK_OFF = HEADER_SIZE + 16                  # entries (after 6 zero bytes)
XATTR_BLOCK_SIZE = BLOCK_SIZE - XATTR_BLOCK_OFF     # 4048
