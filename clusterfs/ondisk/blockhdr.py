"""The 32-byte header at the start of every metadata block, and crc32c.

Every metadata block (superblock, heartbeat, resource group, bitmap, dinode, tree
node, xattr block, refcount node, and the journal's own blocks) starts with this header; see
``docs/FORMAT.md`` ("Block header").  The journal library shares it, and the block
type numbers of all users live in ``BlockType`` so that no two clash.

    offset size field
    0      4    magic   0x31534643 ("CFS1" in little-endian byte order)
    4      2    type    BlockType
    6      2    flags   type-specific
    8      4    crc32c  of the whole block, computed with this field zero
    12     4    reserved, zero
    16     8    blkno   the block's own address
    24     8    seq     write sequence (metadata) or transaction sequence (journal)
"""

from __future__ import annotations

import enum
import struct

import crcmod.predefined

from ..errors import CorruptBlock, WrongBlockType

BLOCK_SIZE = 4096
MAGIC = 0x31534643
HEADER = struct.Struct("<IHHIIQQ")
HEADER_SIZE = HEADER.size  # 32


def _crc32c_extension():
    """The ``crc32c`` package's compiled function.

    Loaded from the package's extension module without running the package's
    ``__init__``, which imports ``importlib.metadata`` (and with it ``email``,
    ``zipfile``, ``argparse``...) only to set ``__version__``: that was 60 ms, a
    third of the start-up of every ``clusterfs`` command.  Anything unexpected in the
    package's layout falls back to the plain import.
    """
    try:
        import os
        from importlib.machinery import EXTENSION_SUFFIXES, ExtensionFileLoader
        from importlib.util import find_spec, module_from_spec, spec_from_loader
        pkg = find_spec("crc32c")
        for where in (pkg.submodule_search_locations or []) if pkg else []:
            for suffix in EXTENSION_SUFFIXES:
                path = os.path.join(where, "_crc32c" + suffix)
                if os.path.exists(path):
                    loader = ExtensionFileLoader("crc32c._crc32c", path)
                    mod = module_from_spec(spec_from_loader("crc32c._crc32c", loader))
                    loader.exec_module(mod)
                    return mod.crc32c
    except Exception:
        pass
    from crc32c import crc32c
    return crc32c


def _pick_crc32c():
    """The crc32c function and its name.

    ``crcmod``'s table-driven function (about 100 MB/s) is the reference.  When the
    ``crc32c`` package is installed (the CPU's CRC32 instruction, some 50 times
    faster) and agrees with it on values and chaining, it is used instead: every
    metadata block is sealed and every journaled block summed with this function,
    so at crcmod's speed it was the largest cost of each file created.
    """
    slow = crcmod.predefined.mkCrcFun("crc-32c")
    try:
        fast = _crc32c_extension()
    except ImportError:
        return slow, "crcmod"
    try:
        for s in (b"", b"a", b"123456789", bytes(4096), bytes(range(256)) * 16):
            if fast(s) != slow(s) or fast(memoryview(s)[1:]) != slow(s[1:]) or \
                    fast(s, 0x1234567) != slow(s, 0x1234567) or \
                    fast(b"tail", fast(s)) != slow(s + b"tail"):
                return slow, "crcmod"
    except Exception:       # an odd build of the package: keep the reference
        return slow, "crcmod"
    return fast, "crc32c"


crc32c, CRC32C_IMPL = _pick_crc32c()
_ZERO4 = b"\0\0\0\0"


class BlockType(enum.IntEnum):
    """Block types; one heading each in docs/FORMAT.md."""

    SUPERBLOCK = 1
    HEARTBEAT = 2
    RGRP = 3
    BITMAP = 4
    DINODE = 5
    EXTENT_NODE = 6
    DIR_NODE = 7
    XATTR = 8
    LEASE = 9
    REFCOUNT_NODE = 10
    SLOT_TABLE = 11
    JOURNAL_HEADER = 16
    JOURNAL_DESCRIPTOR = 17
    JOURNAL_REVOKE = 18
    JOURNAL_COMMIT = 19


def block_crc(buf) -> int:
    """crc32c of a 4096-byte block with its crc field taken as zero."""
    mv = memoryview(buf)
    c = crc32c(mv[:8])
    c = crc32c(_ZERO4, c)
    return crc32c(mv[12:], c)


def _field_tables() -> tuple[list[int], ...]:
    """Four 256-entry tables: how each byte of the crc field moves a block's crc.

    crc32c is linear over messages of one length: the crc of a 4096-byte block as
    stored is its crc with the field taken as zero (the sealed value ``c``), xor a
    term that depends only on the field's bytes, which hold ``c``.  So a block is
    sealed right when ``crc32c(block) == c ^ term(c)``, and ``c ^ term(c)`` is one
    lookup per byte of ``c`` here: one crc32c call per check instead of three (with
    two slices), which is what every metadata read and fsck's scan pay per block.
    The term is linear too: each table is built from the 8 single-bit terms of its
    byte (33 crcs of a block in all, cheap at start-up even with crcmod).
    """
    blk = bytearray(BLOCK_SIZE)
    zero = crc32c(blk)
    tables = []
    for i in range(4):
        bits = []
        for b in range(8):
            blk[8 + i] = 1 << b
            bits.append(crc32c(blk) ^ zero ^ (1 << (8 * i + b)))
        blk[8 + i] = 0
        t = [0] * 256
        for v in range(1, 256):
            low = v & -v                # v's lowest bit, and the rest of v
            t[v] = t[v ^ low] ^ bits[low.bit_length() - 1]
        tables.append(t)
    return tuple(tables)


_T0, _T1, _T2, _T3 = _field_tables()


def crc_ok(buf, crc: int) -> bool:
    """Whether ``crc``, the value the header's field holds in ``buf``, is the crc32c
    of block ``buf`` with the field taken as zero: ``block_crc(buf) == crc``, in one
    call for a 4096-byte block (the tables hold for that length only; other lengths
    take block_crc).  Only for the field's own value: against any other value,
    compare with ``block_crc``."""
    if len(buf) != BLOCK_SIZE:
        return block_crc(buf) == crc
    return crc32c(buf) == (_T0[crc & 255] ^ _T1[(crc >> 8) & 255] ^
                           _T2[(crc >> 16) & 255] ^ _T3[crc >> 24])


def seal(buf: bytearray, btype: int, blkno: int, seq: int, flags: int = 0) -> bytearray:
    """Write the header into ``buf`` (4096 bytes) and set its crc32c."""
    HEADER.pack_into(buf, 0, MAGIC, btype, flags, 0, 0, blkno, seq)
    struct.pack_into("<I", buf, 8, block_crc(buf))
    return buf


def reseal(buf: bytearray) -> None:
    """Recompute the crc of a block whose header is already in place."""
    struct.pack_into("<I", buf, 8, block_crc(buf))


def header(buf) -> tuple[int, int, int, int, int, int, int]:
    """(magic, type, flags, crc, reserved, blkno, seq) of a block."""
    return HEADER.unpack_from(buf, 0)


def verify(buf, btype: int | None, blkno: int) -> int:
    """Check a block's magic, type, own address and crc32c.

    Args:
        buf: the 4096 bytes read from ``blkno``.
        btype: the expected type, or None for any type.
        blkno: the address the block was read from.

    Returns:
        The header's ``seq``.

    Raises:
        WrongBlockType: not a metadata block of type ``btype`` (zeros, no magic, or
            another type).
        CorruptBlock: naming the block and what is wrong with it.
    """
    if len(buf) != BLOCK_SIZE:
        raise CorruptBlock(blkno, f"short block ({len(buf)} bytes)")
    magic, typ, _flags, crc, _res, own, seq = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        if not any(buf):
            raise WrongBlockType(blkno, "block is all zeros (never written)")
        raise WrongBlockType(blkno, f"bad magic {magic:#010x}")
    if btype is not None and typ != btype:
        try:
            name = BlockType(typ).name
        except ValueError:
            name = str(typ)
        raise WrongBlockType(blkno, f"type {name}, expected {BlockType(btype).name}")
    if own != blkno:
        raise CorruptBlock(blkno, f"header says block {own}")
    if not crc_ok(buf, crc):
        raise CorruptBlock(blkno, "crc32c mismatch")
    return seq


def is_valid(buf, btype: int | None, blkno: int) -> bool:
    """``verify`` as a predicate."""
    try:
        verify(buf, btype, blkno)
    except CorruptBlock:
        return False
    return True
