"""The names of the file system's cluster locks.

Lock names (ordered by name: the global lock order; see docs/CLUSTER.md)::

    F          freeze: PR (cached) by every member while it changes anything; EX by
               the member that freezes the volume (freeze, snapshot, grow, add-slots)
    I<ino:8>   inode: its dinode, extent/directory tree blocks and xattr block
    N          rename: cross-directory renames (no directory loops)
    O<ino:8>   open: PR by every node that has the inode open (iopen); EX by one
               node when no other has it open (its creator or remover, cached)
    R<rg:4>    resource group: its header (with its refcount tree's root), bitmap
               blocks and refcount tree nodes
    S<slot:2>  a mounted node's slot (held EX while mounted)
    J<slot:2>  recovery of a slot's journal
    W<ino:8>   cluster open mode: EX by the one node writing the file, CW by each
               writer of a multi-writer file

The first byte is the lock's type: ``glops.py`` holds what a node does around the
state changes of each type (the value blocks are in ``ondisk/lvb.py``).
"""

from __future__ import annotations

from lockmgr import Mode

from ..ondisk.format import REFCOUNT, Bitmap, Dinode, RgrpHeader, TreeNode, XattrBlock

FREEZE = b"F"
INODE = b"I"
GROUP = b"R"
OPEN = b"O"
WRITE = b"W"
SLOT = b"S"
RECOVERY = b"J"
RENAME_LOCK = b"N"

_DESCRIBE = {INODE: "inode", OPEN: "open", WRITE: "write-open", GROUP: "group",
             SLOT: "slot", RECOVERY: "recovery of slot"}


def inode_lock(ino: int) -> bytes:
    return INODE + ino.to_bytes(8, "big")


def group_lock(rg: int) -> bytes:
    return GROUP + rg.to_bytes(4, "big")


def open_lock(ino: int) -> bytes:
    return OPEN + ino.to_bytes(8, "big")


def write_lock(ino: int) -> bytes:
    return WRITE + ino.to_bytes(8, "big")


def slot_lock(slot: int) -> bytes:
    return SLOT + slot.to_bytes(2, "big")


def recovery_lock(slot: int) -> bytes:
    return RECOVERY + slot.to_bytes(2, "big")


def lock_number(name: bytes) -> int:
    """The inode, group or slot number a lock name carries."""
    return int.from_bytes(name[1:], "big")


def covering_lock(obj) -> bytes | None:
    """The name of the lock that covers a cached metadata object (None: no lock does)."""
    cls = obj.__class__
    if cls is Dinode:
        return inode_lock(obj.bno)
    if cls is TreeNode:
        # a refcount tree's nodes are its group's; the others their inode's
        return group_lock(obj.owner) if obj.kind == REFCOUNT else inode_lock(obj.owner)
    if cls is XattrBlock:
        return inode_lock(obj.owner)
    if cls is RgrpHeader:
        return group_lock(obj.index)
    if cls is Bitmap:
        return group_lock(obj.rgrp)
    return None


def describe_lock(name: bytes) -> str:
    if name == RENAME_LOCK:
        return "rename"
    if name == FREEZE:
        return "freeze"
    kind = _DESCRIBE.get(name[:1])
    return f"{kind} {lock_number(name)}" if kind is not None else repr(name)


class NeedLock(Exception):
    """An operation body needs a lock it could not take without waiting."""

    def __init__(self, name: bytes, mode: Mode, inode_hint: int | None = None):
        super().__init__(describe_lock(name), mode)
        self.name = name
        self.mode = mode
        self.inode_hint = inode_hint
