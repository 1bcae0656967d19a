"""On-disk format v1: the one canonical definition of every structure.

``docs/FORMAT.md`` is the byte-level specification; each class matches one heading
there.  Every metadata block is a Python object with ``image()`` (the sealed 4096
bytes, crc32c included) and a ``decode`` classmethod that verifies the header first.
fsck, mkfs and the mounted file system all use these classes: there is no second
parser.  This module gathers the names of the modules that hold them:

    layout      every field table (``Layout``), offset, record size, state, flag
                and limit of the format
    superblock  the superblock and the volume's geometry; heartbeat blocks; the slot
                table (slots added after mkfs)
    rgrp        resource group headers (with their refcount roots) and bitmap blocks
    dinode      the dinode
    tree        tree nodes (extent, directory and refcount trees)
    xattr       extended attributes and their overflow block
    dirent      directory entries: names, hash keys, types
    meta        ``MetaObject``, the base of the cached metadata objects

Geometry (all in 4096-byte blocks)::

    0                       superblock
    1                       the lease block
    2 .. 2+fixed-1          heartbeat block of each slot made by mkfs
    journal_start ..        journal of such a slot i at journal_start + i * journal_blocks
    rgrp_start ..           resource groups, rgrp_blocks each (the last may be shorter);
                            slots added later live here (the slot table)
    total_blocks - 1        backup superblock
"""

from __future__ import annotations

from ..errors import CorruptBlock, FormatMismatch  # noqa: F401
from . import blockhdr  # noqa: F401
from .blockhdr import BLOCK_SIZE, HEADER_SIZE, BlockType  # noqa: F401
from .dinode import _DI, _HDR_DI, _MAGIC, _T_DINODE, Dinode  # noqa: F401
from .dirent import (DTYPE_MASK, DTYPE_SHIFT, DT_BLK, DT_CHR, DT_DIR, DT_FIFO,  # noqa: F401
                     DT_LNK, DT_REG, DT_SOCK, DT_UNKNOWN, HASH_SHIFT, MAX_COLLISIONS,
                     NAME_MAX, READDIR_BASE, bad_name, dirent_key, dtype_of, key_cidx,
                     key_hash, key_range, name_hash)
from .layout import (BITMAP_BYTES, BLOCKS_PER_BITMAP, DATA_OFF, DATA_SIZE,  # noqa: F401
                     DF_DIRTREE, DF_EXTENTS, DF_INLINE, DF_PREALLOC, DINODE, DINODE_LAYOUT,
                     DIRENT, DIRENT_REC, EXTENT, EXTENT_REC, EXT_FLAGS, EXT_SHARED,
                     FORMAT_REVISION, FREE, HB_CLUSTER, HB_FENCED, HB_FREE, HB_LAYOUT,
                     HB_NOLOCK, HB_STATE_NAMES, INDEX_REC, INLINE_MAX, LEASE_BLOCKS,
                     LEASE_FREE, LEASE_LAYOUT, LEASE_START, LINK_MAX, MAX_DEPTH,
                     MAX_FILE_BLOCKS, MAX_REFCOUNT, MAX_SLOTS, NODE_CAPACITY, NODE_HDR,
                     NODE_LAYOUT, OLDEST_REVISION, PREALLOC_SINCE, REFCOUNT, REFCOUNT_REC,
                     REFROOT_OFF, REFROOT_SIZE, RGRP_LAYOUT, ROOT_CAPACITY,
                     SB_FLAG_CLUSTER_INFO, SB_FLAG_GROWING, SB_LAYOUT, SHARED_SINCE,
                     SLOT_ENTRIES_OFF, SLOT_ENTRY, SLOT_TABLE_LAYOUT, SLOT_TABLE_MAX,
                     SLOT_TABLE_SINCE, STATE_NAMES, SYMLINK_MAX, UNLINKED, USED,
                     XATTR_BLOCK_LAYOUT, XATTR_BLOCK_OFF, XATTR_BLOCK_SIZE, XATTR_ENTRY,
                     XATTR_INLINE_OFF, XATTR_INLINE_SIZE, Layout)
from .lease import (FREE_LEASE, LeaseBlock, decode_lease, encode_lease,  # noqa: F401
                    read_lease)
from .meta import _COPIERS, MetaObject, _blank, _copier  # noqa: F401
from .rgrp import (_COUNT_TABLE, _EXPAND, _RG, Bitmap, RgrpHeader,  # noqa: F401
                   _count_table, decode_refroot, expand_bits)
from .superblock import (_HB, _SB, Heartbeat, SlotTable, Superblock,  # noqa: F401
                         bitmap_blocks_for, now_ns, plan_geometry, random_mount_id,
                         rgrp_count_for)
from .tree import (NODE_TYPES, _DIRREC, _EXT, _EXT_SIZE, _IDX, _IDX_SIZE,  # noqa: F401
                   _NODE, _REF, TreeNode)
from .xattr import (_XA, _XB, XattrBlock, decode_xattrs, encode_xattrs,  # noqa: F401
                    xattr_size)
