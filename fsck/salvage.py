"""Tolerant decoding: get what can be trusted out of a damaged metadata block.

Everything here still parses through the format classes of ``clusterfs.ondisk.format``
(there is no second parser).  When a block fails to decode, the salvage functions
patch the *raw bytes* in a copy (a header field, a length, a record count) and
decode the copy again with the same class, and they say what they patched:

* ``repair_header``: one of magic / type / own block number wrong (a single damaged
  field) is set right, then the crc32c is recomputed.  Two or more wrong fields
  mean the block is something else (or garbage) and nothing is salvaged.
* dinodes: damaged inline xattrs are dropped, a bad data-area kind flag is chosen
  from the mode, an impossible inline size is clamped, a damaged tree root keeps
  its longest decodable prefix of records (or becomes an empty root).
* tree nodes: the longest decodable prefix of records is kept.

Fields are read and patched by name through the format's field tables
(``DINODE_LAYOUT``, ``NODE_LAYOUT``): no offset is written here.
"""

from __future__ import annotations

import stat as S

from clusterfs.errors import CorruptBlock
from clusterfs.ondisk import blockhdr
from clusterfs.ondisk.blockhdr import BLOCK_SIZE, HEADER, HEADER_SIZE, MAGIC, BlockType
from clusterfs.ondisk.format import (DATA_OFF, DATA_SIZE, DF_DIRTREE, DF_EXTENTS, DF_INLINE,
                                     DINODE_LAYOUT, DIRENT, EXTENT, INLINE_MAX, NODE_HDR,
                                     NODE_LAYOUT, NODE_TYPES, XATTR_INLINE_OFF,
                                     XATTR_INLINE_SIZE, Dinode, Superblock, TreeNode,
                                     decode_xattrs)


def repair_header(buf, btype: int, bno: int) -> tuple[bytearray, list[str]] | None:
    """A copy of ``buf`` with its header made right, or None if not credible.

    Credible: not all zeros, and at most one of magic / type / own address wrong.
    The crc32c is recomputed (the caller decodes the copy to see if the rest holds).
    """
    if len(buf) != BLOCK_SIZE or not any(buf):
        return None
    magic, typ, flags, crc, res, own, seq = HEADER.unpack_from(buf, 0)
    wrong = []
    if magic != MAGIC:
        wrong.append(f"bad magic {magic:#010x}")
    if typ != btype:
        if typ in BlockType._value2member_map_:
            return None         # another kind of block, not a damaged one of ours
        wrong.append(f"type {typ}")
    if own != bno:
        wrong.append(f"header says block {own}")
    if len(wrong) > 1:
        return None
    out = bytearray(buf)
    HEADER.pack_into(out, 0, MAGIC, btype, flags, 0, 0, bno, seq)
    blockhdr.reseal(out)
    if not wrong and crc == blockhdr.block_crc(out):
        return out, []
    return out, wrong or ["crc32c mismatch"]


def decode_superblock(buf, bno: int) -> tuple[Superblock, list[str]]:
    """A superblock whose header alone is damaged (raises CorruptBlock otherwise)."""
    fixed = repair_header(buf, BlockType.SUPERBLOCK, bno)
    if fixed is None:
        raise CorruptBlock(bno, "not a credible superblock")
    b, notes = fixed
    return Superblock.decode(b, bno), notes


def _root_ok(buf, kind: int, bno: int) -> bool:
    try:
        TreeNode.decode_from(buf, DATA_OFF, DATA_SIZE, kind, bno, root=True)
        return True
    except CorruptBlock:
        return False


def _salvage_records(buf: bytearray, off: int, size: int, kind: int, bno: int,
                     root: bool) -> str | None:
    """Keep the longest decodable prefix of a node's records (patching nrecs in
    place).  Returns what was done, or None when even an empty node fails."""
    nrecs = NODE_LAYOUT.get(buf, "nrecs", off)

    def ok(k: int) -> bool:
        NODE_LAYOUT.put(buf, "nrecs", k, off)
        try:
            TreeNode.decode_from(buf, off, size, kind, bno, root=root)
            return True
        except CorruptBlock:
            return False

    if not ok(0):
        return None
    lo, hi = 0, nrecs          # ok(lo) holds; find the largest
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    ok(lo)
    return f"kept {lo} of {nrecs} records"


def decode_dinode(buf, bno: int) -> tuple[Dinode, list[str]]:
    """Decode a dinode, salvaging what a damaged one still holds.

    Returns:
        (dinode, notes): notes is empty for an intact block, else it lists what was
        wrong and what the salvage changed.

    Raises:
        CorruptBlock: nothing credible is left (the block is not a dinode).
    """
    try:
        return Dinode.decode(buf, bno), []
    except CorruptBlock as e:
        first = e.reason
    fixed = repair_header(buf, BlockType.DINODE, bno)
    if fixed is None:
        raise CorruptBlock(bno, first)
    b, notes = fixed
    fields = DINODE_LAYOUT
    # inline xattrs
    xlen = fields.get(b, "xattr_len")
    bad_x = xlen > XATTR_INLINE_SIZE
    if not bad_x:
        try:
            decode_xattrs(bytes(b[XATTR_INLINE_OFF:XATTR_INLINE_OFF + xlen]))
        except ValueError:
            bad_x = True
    if bad_x:
        fields.put(b, "xattr_len", 0)
        notes.append("inline xattrs damaged: dropped")
    mode = fields.get(b, "mode")
    flags = fields.get(b, "flags")
    kind = flags & (DF_INLINE | DF_EXTENTS | DF_DIRTREE)
    if kind not in (DF_INLINE, DF_EXTENTS, DF_DIRTREE):
        if S.S_ISDIR(mode):
            kind = DF_DIRTREE
        elif _root_ok(b, EXTENT, bno):
            kind = DF_EXTENTS
        else:
            kind = DF_INLINE
        notes.append(f"bad data-area flags {flags:#x}: set to {kind:#x}")
        flags = (flags & ~(DF_INLINE | DF_EXTENTS | DF_DIRTREE)) | kind
        fields.put(b, "flags", flags)
    if kind == DF_INLINE:
        size = fields.get(b, "size")
        if size > INLINE_MAX:
            area = bytes(b[DATA_OFF:DATA_OFF + DATA_SIZE]).rstrip(b"\0")
            fields.put(b, "size", len(area))
            notes.append(f"inline size {size} impossible: set to {len(area)}")
    else:
        tkind = EXTENT if kind == DF_EXTENTS else DIRENT
        if not _root_ok(b, tkind, bno):
            done = _salvage_records(b, DATA_OFF, DATA_SIZE, tkind, bno, True)
            if done is None:
                NODE_LAYOUT.struct.pack_into(b, DATA_OFF, 0, 0, tkind, bno)
                b[DATA_OFF + NODE_HDR:] = bytes(DATA_SIZE - NODE_HDR)
                done = "emptied"
            notes.append(f"tree root damaged: {done}")
    blockhdr.reseal(b)
    try:
        return Dinode.decode(b, bno), notes
    except CorruptBlock:
        raise CorruptBlock(bno, first) from None


def decode_node(buf, bno: int, kind: int) -> tuple[TreeNode, list[str]]:
    """Decode a tree node block, keeping the longest decodable prefix of records."""
    try:
        return TreeNode.decode(buf, bno, kind), []
    except CorruptBlock as e:
        first = e.reason
    fixed = repair_header(buf, NODE_TYPES[kind], bno)
    if fixed is None:
        raise CorruptBlock(bno, first)
    b, notes = fixed
    try:
        return TreeNode.decode(b, bno, kind), notes
    except CorruptBlock as e:
        second = e.reason
    done = _salvage_records(b, HEADER_SIZE, BLOCK_SIZE - HEADER_SIZE, kind, bno, False)
    if done is None:
        raise CorruptBlock(bno, second)
    blockhdr.reseal(b)
    try:
        node = TreeNode.decode(b, bno, kind)
    except CorruptBlock:
        raise CorruptBlock(bno, second) from None
    notes.append(f"{second}: {done}")
    return node, notes


def decode_simple(buf, bno: int, btype: int, decoder):
    """Strict decode, else header repair and decode again: (obj, notes)."""
    try:
        return decoder(buf, bno), []
    except CorruptBlock as e:
        first = e.reason
    fixed = repair_header(buf, btype, bno)
    if fixed is None:
        raise CorruptBlock(bno, first)
    b, notes = fixed
    try:
        return decoder(b, bno), notes
    except CorruptBlock:
        raise CorruptBlock(bno, first) from None
