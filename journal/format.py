"""On-disk layout of the journal: constants, field tables and block codecs.

The byte-level description is ``docs/JOURNAL-FORMAT.md``; this module holds only what
the code needs and must match that document one to one (``tests/journal`` checks the
field tables against it).  Every journal block starts with the common 32-byte header
of ``clusterfs.ondisk.blockhdr``; the tables below give the fields that follow it.

Nothing here does I/O: these are pure functions from values to 4096-byte blocks and
back, so that the log writer, the replayer and fsck share a single parser.
"""

from __future__ import annotations

import dataclasses
import struct

from clusterfs.errors import CorruptBlock
from clusterfs.ondisk.blockhdr import (BLOCK_SIZE, HEADER, HEADER_SIZE, MAGIC, BlockType,
                                       block_crc, seal, verify)

from .errors import JournalCorrupt

#: On-disk journal format revision (independent of the package version).
FORMAT_VERSION = 1
#: Smallest journal region: the header block plus 63 log blocks.
MIN_LENGTH = 64
#: Every header field lives in the first 512-byte sector and the rest of the block is
#: zero, so a header update torn at sector granularity is either wholly old or new.
HEADER_AREA = 512
#: Length of the owner string field in the journal header (UTF-8, NUL padded).
OWNER_SIZE = 64

JOURNAL_TYPES = frozenset({BlockType.JOURNAL_HEADER, BlockType.JOURNAL_DESCRIPTOR,
                           BlockType.JOURNAL_REVOKE, BlockType.JOURNAL_COMMIT})
#: Types of the blocks that live in the circular log (the header does not).
LOG_TYPES = frozenset({BlockType.JOURNAL_DESCRIPTOR, BlockType.JOURNAL_REVOKE,
                       BlockType.JOURNAL_COMMIT})

# Field tables: (name, struct code) in on-disk order, starting right after the common
# header (offset 32).  Little-endian, no padding.  docs/JOURNAL-FORMAT.md has one
# table per block type with the same names, offsets and sizes.
HEADER_FIELDS = (
    ("version", "I"),       # FORMAT_VERSION
    ("slot", "I"),          # node slot that owns this journal
    ("start", "Q"),         # absolute block number of this header
    ("length", "Q"),        # blocks in the region, header included (>= MIN_LENGTH)
    ("journal_id", "Q"),    # random non-zero id chosen by format(); in every log block
    ("tail_seq", "Q"),      # seq of the first transaction replay must consider
    ("tail_pos", "Q"),      # log index of that transaction's first block
    ("next_seq", "Q"),      # floor for the next seq; > every seq seen when clean
    ("clean", "I"),         # 1: closed or replayed, nothing to replay; 0: in use
    ("mount_count", "I"),   # number of open() calls since format
    ("open_ns", "Q"),       # wall-clock time of the last open(), ns since the epoch
    ("close_ns", "Q"),      # time of the last close() or replay(), 0 if none
    ("owner", f"{OWNER_SIZE}s"),  # who opened it last (caller's string), NUL padded
)
LOG_PREFIX_FIELDS = (
    ("journal_id", "Q"),    # must equal the header's journal_id
    ("count", "I"),         # number of tags / revoke records in this block
    ("reserved", "I"),      # zero
)
TAG_FIELDS = (
    ("target", "Q"),        # home block number of the image
    ("flags", "I"),         # zero in format version 1
    ("crc", "I"),           # crc32c of the 4096-byte image
)
REVOKE_RECORD_FIELDS = (
    ("target", "Q"),        # block number whose older images must not be replayed
)
COMMIT_FIELDS = (
    ("journal_id", "Q"),    # must equal the header's journal_id
    ("nblocks", "I"),       # descriptor + image + revoke blocks before this one
    ("txn_crc", "I"),       # crc32c over those blocks, 4096 bytes each, in log order
    ("first_pos", "Q"),     # log index of the transaction's first block
    ("time_ns", "Q"),       # wall-clock commit time, ns since the epoch
    ("nimages", "I"),       # number of tags (image blocks) in the transaction
    ("nrevokes", "I"),      # number of revoke records in the transaction
)


def _struct(fields) -> struct.Struct:
    return struct.Struct("<" + "".join(code for _name, code in fields))


HEADER_STRUCT = _struct(HEADER_FIELDS)
LOG_PREFIX = _struct(LOG_PREFIX_FIELDS)
TAG = _struct(TAG_FIELDS)
REVOKE_RECORD = _struct(REVOKE_RECORD_FIELDS)
COMMIT_STRUCT = _struct(COMMIT_FIELDS)

#: Offset of the first tag in a descriptor and of the first record in a revoke block.
RECORDS_OFFSET = HEADER_SIZE + LOG_PREFIX.size  # 48
TAGS_PER_DESCRIPTOR = (BLOCK_SIZE - RECORDS_OFFSET) // TAG.size          # 253
REVOKES_PER_BLOCK = (BLOCK_SIZE - RECORDS_OFFSET) // REVOKE_RECORD.size  # 506

assert HEADER_SIZE + HEADER_STRUCT.size <= HEADER_AREA


@dataclasses.dataclass
class JournalHeader:
    """The decoded journal header block (see docs/JOURNAL-FORMAT.md, JOURNAL_HEADER)."""

    version: int
    slot: int
    start: int
    length: int
    journal_id: int
    tail_seq: int
    tail_pos: int
    next_seq: int
    clean: bool
    mount_count: int
    open_ns: int
    close_ns: int
    owner: str

    def pack(self) -> bytearray:
        """Encode as a sealed 4096-byte block (common header seq = ``tail_seq``)."""
        owner = self.owner.encode()
        if len(owner) > OWNER_SIZE:
            raise ValueError(f"owner string longer than {OWNER_SIZE} bytes: {self.owner!r}")
        buf = bytearray(BLOCK_SIZE)
        HEADER_STRUCT.pack_into(
            buf, HEADER_SIZE, self.version, self.slot, self.start, self.length,
            self.journal_id, self.tail_seq, self.tail_pos, self.next_seq,
            int(self.clean), self.mount_count, self.open_ns, self.close_ns, owner)
        return seal(buf, BlockType.JOURNAL_HEADER, self.start, self.tail_seq)

    @classmethod
    def unpack(cls, buf, bno: int) -> "JournalHeader":
        """Decode and validate a header block read from ``bno``.

        Raises:
            JournalCorrupt: the block is not a valid journal header.
        """
        try:
            seq = verify(buf, BlockType.JOURNAL_HEADER, bno)
        except CorruptBlock as exc:
            raise JournalCorrupt(bno, f"journal header: {exc.reason}") from None
        vals = list(HEADER_STRUCT.unpack_from(buf, HEADER_SIZE))
        if vals[8] not in (0, 1):
            raise JournalCorrupt(bno, f"journal header: clean flag is {vals[8]}, not 0 or 1")
        vals[8] = bool(vals[8])
        try:
            vals[12] = vals[12].rstrip(b"\0").decode()
        except UnicodeDecodeError:
            raise JournalCorrupt(bno, "journal header: owner is not UTF-8") from None
        hdr = cls(*vals)
        if hdr.version != FORMAT_VERSION:
            raise JournalCorrupt(bno, f"journal header: format version {hdr.version}, "
                                      f"this code reads version {FORMAT_VERSION}")
        if seq != hdr.tail_seq:
            raise JournalCorrupt(bno, f"journal header: block seq {seq} != tail_seq "
                                      f"{hdr.tail_seq}")
        return hdr


# -- log blocks -------------------------------------------------------------------

def pack_descriptor(buf, offset: int, bno: int, seq: int, journal_id: int,
                    tags: list[tuple[int, int]]) -> None:
    """Build a sealed descriptor block in ``buf[offset:offset+4096]``.

    Args:
        buf: a writable buffer (the transaction's log image).
        offset: byte offset of the block inside ``buf``.
        bno: absolute block number the descriptor will be written to.
        seq: transaction sequence number.
        journal_id: the journal's id.
        tags: (target block, image crc32c) pairs, at most ``TAGS_PER_DESCRIPTOR``.
    """
    blk = memoryview(buf)[offset:offset + BLOCK_SIZE]
    LOG_PREFIX.pack_into(blk, HEADER_SIZE, journal_id, len(tags), 0)
    flat = []
    for target, crc in tags:
        flat += (target, 0, crc)
    struct.pack_into("<" + "QII" * len(tags), blk, RECORDS_OFFSET, *flat)
    _seal_view(blk, BlockType.JOURNAL_DESCRIPTOR, bno, seq)


def pack_revoke(buf, offset: int, bno: int, seq: int, journal_id: int,
                targets: list[int]) -> None:
    """Build a sealed revoke block listing ``targets`` (at most ``REVOKES_PER_BLOCK``)."""
    blk = memoryview(buf)[offset:offset + BLOCK_SIZE]
    LOG_PREFIX.pack_into(blk, HEADER_SIZE, journal_id, len(targets), 0)
    struct.pack_into(f"<{len(targets)}Q", blk, RECORDS_OFFSET, *targets)
    _seal_view(blk, BlockType.JOURNAL_REVOKE, bno, seq)


def pack_commit(bno: int, seq: int, journal_id: int, *, nblocks: int, txn_crc: int,
                first_pos: int, time_ns: int, nimages: int, nrevokes: int) -> bytearray:
    """Build a sealed commit block."""
    buf = bytearray(BLOCK_SIZE)
    COMMIT_STRUCT.pack_into(buf, HEADER_SIZE, journal_id, nblocks, txn_crc, first_pos,
                            time_ns, nimages, nrevokes)
    return seal(buf, BlockType.JOURNAL_COMMIT, bno, seq)


def _seal_view(blk: memoryview, btype: int, bno: int, seq: int) -> None:
    """``blockhdr.seal`` for a 4096-byte window of a larger buffer."""
    HEADER.pack_into(blk, 0, MAGIC, btype, 0, 0, 0, bno, seq)
    struct.pack_into("<I", blk, 8, block_crc(blk))


def unpack_tags(buf) -> list[tuple[int, int, int]]:
    """(target, flags, crc) of every tag in a verified descriptor block."""
    _jid, count, _res = LOG_PREFIX.unpack_from(buf, HEADER_SIZE)
    if count > TAGS_PER_DESCRIPTOR:
        raise ValueError(f"descriptor holds {count} tags (at most {TAGS_PER_DESCRIPTOR})")
    vals = struct.unpack_from("<" + "QII" * count, buf, RECORDS_OFFSET)
    return [vals[i:i + 3] for i in range(0, 3 * count, 3)]


def unpack_revokes(buf) -> list[int]:
    """Block numbers listed in a verified revoke block."""
    _jid, count, _res = LOG_PREFIX.unpack_from(buf, HEADER_SIZE)
    if count > REVOKES_PER_BLOCK:
        raise ValueError(f"revoke block holds {count} records (at most {REVOKES_PER_BLOCK})")
    return list(struct.unpack_from(f"<{count}Q", buf, RECORDS_OFFSET))


@dataclasses.dataclass(frozen=True)
class CommitRecord:
    """The fields of a commit block."""

    journal_id: int
    nblocks: int
    txn_crc: int
    first_pos: int
    time_ns: int
    nimages: int
    nrevokes: int


def unpack_commit(buf) -> CommitRecord:
    """Fields of a verified commit block."""
    return CommitRecord(*COMMIT_STRUCT.unpack_from(buf, HEADER_SIZE))


def log_block_journal_id(buf) -> int:
    """The journal id stored in a descriptor, revoke or commit block."""
    return struct.unpack_from("<Q", buf, HEADER_SIZE)[0]


def descriptor_blocks(nimages: int) -> int:
    """Descriptor blocks needed for ``nimages`` images."""
    return -(-nimages // TAGS_PER_DESCRIPTOR)


def revoke_blocks(nrevokes: int) -> int:
    """Revoke blocks needed for ``nrevokes`` records."""
    return -(-nrevokes // REVOKES_PER_BLOCK)


def transaction_blocks(nimages: int, nrevokes: int) -> int:
    """Log blocks a transaction takes: descriptors, images, revokes and the commit."""
    return descriptor_blocks(nimages) + nimages + revoke_blocks(nrevokes) + 1
