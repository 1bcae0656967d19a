"""Hashed directories.

A directory's entries live in a B+tree keyed by ``crc32c(name) << 16 | collision
index``; the collision index is the smallest one free among names with the same
hash when the entry is made, and never changes while the entry exists.  So the key
is a stable readdir offset (entries made or removed meanwhile never shift it), and
a lookup or insert costs one descent whatever the directory's size.  ``.`` and
``..`` are not stored: ``..`` is the dinode's ``parent`` field.
"""

from __future__ import annotations

import errno

from ..errors import FSError
from ..ondisk.format import MAX_COLLISIONS, NAME_MAX, Dinode, key_range
from .btree import BTree
from .inode import InodeStore


def tree(vol, di: Dinode) -> BTree:
    return BTree(InodeStore(vol, di), di.root)


def lookup(vol, di: Dinode, name: bytes):
    """(key, ino, dtype) of ``name`` in directory ``di``, or None."""
    lo, hi = key_range(name)
    for key, (ino, dtype, nm) in tree(vol, di).items_from(lo):
        if key > hi:
            break
        if nm == name:
            return key, ino, dtype
    return None


def add(vol, di: Dinode, name: bytes, ino: int, dtype: int) -> int:
    """Add an entry (EEXIST if the name exists); returns its key."""
    if len(name) > NAME_MAX:
        raise FSError(errno.ENAMETOOLONG, "name too long")
    lo, hi = key_range(name)
    t = tree(vol, di)
    used = set()
    for key, (_ino, _dt, nm) in t.items_from(lo):
        if key > hi:
            break
        if nm == name:
            raise FSError(errno.EEXIST, "entry exists")
        used.add(key - lo)
    cidx = 0
    while cidx in used:
        cidx += 1
    if cidx >= MAX_COLLISIONS:
        raise FSError(errno.ENOSPC, "too many names with one hash")
    key = lo + cidx
    t.insert(key, (ino, dtype, name))
    vol.touch(di)
    di.entries += 1
    return key


def remove(vol, di: Dinode, name: bytes):
    """Remove an entry; returns (ino, dtype).  ENOENT if absent."""
    found = lookup(vol, di, name)
    if found is None:
        raise FSError(errno.ENOENT, "no such entry")
    key, ino, dtype = found
    tree(vol, di).delete(key)
    vol.touch(di)
    di.entries -= 1
    return ino, dtype


def retarget(vol, di: Dinode, name: bytes, ino: int, dtype: int) -> int:
    """Point an existing entry at another inode (rename over a target)."""
    found = lookup(vol, di, name)
    if found is None:
        raise FSError(errno.ENOENT, "no such entry")
    key = found[0]
    tree(vol, di).replace(key, key, (ino, dtype, name))
    return found[1]


def entries_from(vol, di: Dinode, key: int = 0):
    """(key, ino, dtype, name) for entries with key >= ``key``, in key order."""
    for k, (ino, dtype, name) in tree(vol, di).items_from(key):
        yield k, ino, dtype, name
