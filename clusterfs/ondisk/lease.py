"""The lease area: the lock manager's master lease, one block after the superblock.

The block holds one lease record (fields: ``layout.LEASE_LAYOUT``, the same as
``lockmgr.LeaseRecord``'s;
docs/FORMAT.md, "LEASE"): who is the lock manager's master, where it serves, its
election generation and its renewal counter.  The candidates elect the master by
reading and writing it with the delta-lease algorithm (``lockmgr.election``); every
member reads it to find the master.  A candidate's id is random, new with every
candidate process (the node name says which node it runs on).
"""

from __future__ import annotations

import secrets
from typing import NamedTuple

from ..errors import CorruptBlock
from . import blockhdr
from .blockhdr import BlockType
from .layout import LEASE_FREE, LEASE_LAYOUT
from .meta import _blank


def candidate_id() -> int:
    """A new candidate id (random, positive, 62 bits)."""
    return secrets.randbits(62)


class LeaseBlock(NamedTuple):
    """A lease block's record (``lockmgr.LeaseRecord`` has the same fields: this
    module does not import the lock manager, so that fsck stays light)."""

    owner: int
    generation: int
    counter: int
    node: str
    addr: str
    acquired_ns: int
    renewed_ns: int
    expire_ms: int


FREE_LEASE = LeaseBlock(LEASE_FREE, 0, 0, "", "", 0, 0, 0)


def encode_lease(rec, bno: int) -> bytes:
    """The block image of a lease record (a ``LeaseBlock`` or a ``lockmgr.LeaseRecord``;
    the header's seq is its counter)."""
    buf = _blank()
    LEASE_LAYOUT.struct.pack_into(
        buf, LEASE_LAYOUT.base, rec.owner, rec.generation, rec.counter, rec.acquired_ns,
        rec.renewed_ns, rec.expire_ms, 0, rec.node.encode()[:64], rec.addr.encode()[:128])
    return bytes(blockhdr.seal(buf, BlockType.LEASE, bno, rec.counter))


def decode_lease(buf, bno: int) -> LeaseBlock:
    """The lease record in a block.

    Raises:
        CorruptBlock: not a lease block, or a bad crc (``WrongBlockType`` included).
    """
    blockhdr.verify(buf, BlockType.LEASE, bno)
    (owner, generation, counter, acquired, renewed, expire_ms, _reserved, node,
     addr) = LEASE_LAYOUT.struct.unpack_from(buf, LEASE_LAYOUT.base)
    if owner < LEASE_FREE:
        raise CorruptBlock(bno, f"lease owner {owner}")
    return LeaseBlock(owner, generation, counter,
                       node.rstrip(b"\0").decode(errors="replace"),
                       addr.rstrip(b"\0").decode(errors="replace"),
                       acquired, renewed, expire_ms)


def read_lease(dev, sb) -> LeaseBlock | None:
    """The master lease as it is on the volume now (None: unreadable or damaged)."""
    try:
        return decode_lease(dev.read(sb.lease_bno), sb.lease_bno)
    except (CorruptBlock, OSError):
        return None
