"""What a node does around the state changes of each type of lock (after GFS2's glops).

One table of operations per lock type, looked up by the glock table when it makes a
glock (``Glock.ops``); code that handles "a lock" calls its type's operations and
never switches on a lock name:

- ``granted(g, lvb)``: the lock was granted; the value block's version says whether
  what this node cached under the lock is still current (else it is dropped).
- ``before_demote(g, target)``: the lock goes down to ``target`` (another node wants
  it): write back what it covers (commit and checkpoint the journal when its blocks
  are dirty), drop what the kernel may no longer cache, and return the value block to
  write (PW/EX only).
- ``dropped(g)``: the lock is given up entirely: forget what it covered.
- ``kernel_caches(g, target)`` / ``drop_kernel(g)``: whether the kernel caches
  something under the lock that must go before it goes down to ``target``, and
  having it dropped (awaited while the glock still lets local holders in: for an
  inode, the kernel's pages of the file, ``pages.py``); ``demote_target(g, target)``
  may ask for a lower mode than the other node needs (a file open for writing here
  goes to NL).

The freeze lock ``F`` covers the volume as a whole (``FreezeOps``): going below PR
writes everything home and stops this node's changes; its next grant re-reads the
superblock.  Locks of the other types (open, write-open, slot, recovery, rename) cover
no cached object: ``LockOps``'s defaults do nothing for them.
"""

from __future__ import annotations

import random

from lockmgr import EX, NL, PR, PW, Mode, covers

from ..ondisk.format import Dinode, RgrpHeader
from ..ondisk.lvb import GROUP_LVB, INODE_LVB, VERSION_MASK, lvb_version
from .locks import FREEZE, GROUP, INODE, lock_number


class LockOps:
    """A lock type that covers no cached object."""

    def granted(self, g, lvb: bytes | None) -> None:
        """The lock was granted (or converted up) with value block ``lvb``."""

    def before_demote(self, g, target: Mode) -> bytes | None:
        """The lock is about to go down to ``target``: returns the value block."""
        return None

    def dropped(self, g) -> None:
        """The lock was given up entirely."""

    def demote_target(self, g, target: Mode) -> Mode:
        """The mode a demote to ``target`` (what the other node can live with)
        goes to: ``target`` or lower."""
        return target

    def kernel_caches(self, g, target: Mode) -> bool:
        """Whether the kernel may cache something under the lock that must go
        before it goes down to ``target`` (then ``drop_kernel`` is awaited first)."""
        return False

    async def drop_kernel(self, g) -> None:
        """Have the kernel drop what it caches under the lock."""


class _CachingOps(LockOps):
    """A lock that covers cached metadata blocks, validated by a version in its value
    block."""

    def __init__(self, coh):
        self.coh = coh
        self.vol = coh.vol

    def _check_version(self, g, lvb: bytes | None, drop) -> int | None:
        """Drop the cache (``drop()``) unless the value block's version is the one
        cached; returns that version."""
        version = lvb_version(lvb)
        if version is None or version != g.version:
            drop()
        g.version = version if version is not None else random.getrandbits(62)
        return version

    def _write_back(self, g, blocks) -> int:
        """Before a demote from PW/EX: checkpoint when the lock's blocks are dirty;
        returns the version to publish (bumped when the objects changed)."""
        vol = self.vol
        if g.dirty or any(b in vol.unclean for b in blocks):
            if vol.unclean or vol.journal.running_blocks():
                self.coh.write_back()
        if g.dirty:
            g.version = ((g.version or 0) + 1) & VERSION_MASK
        return g.version or 0


class InodeOps(_CachingOps):
    """``I<ino>``: the dinode, its tree blocks and xattr block; the kernel's cached
    attributes of the inode."""

    def granted(self, g, lvb):
        ino = lock_number(g.name)
        self._check_version(g, lvb, lambda: self.vol.drop_inode(ino))

    def before_demote(self, g, target):
        ino = lock_number(g.name)
        forget = self.coh.forget_kernel_attrs
        if not covers(target, PR):
            # the kernel may cache an inode's attributes, and a directory's entries,
            # only while this node can read it: once another node may change the
            # inode, they are stale
            if forget:
                forget(ino)
            if g.mode is not None and covers(g.mode, PR):
                # (from NL, as when an idle lock is given up, there is nothing)
                self.coh.forget_entries(ino)
        if g.mode not in (PW, EX):
            return None
        version = self._write_back(g, self.vol.inode_blocks(ino))
        di = self.vol.cached(ino)
        if isinstance(di, Dinode):
            return INODE_LVB.pack(version, di.size, di.mtime, di.generation)
        return INODE_LVB.pack(version, 0, 0, 0)

    def dropped(self, g):
        self.vol.drop_inode(lock_number(g.name))

    def demote_target(self, g, target):
        # a file open for writing here is held EX or not at all (``Coherence.run``)
        if target == PR and lock_number(g.name) in self.coh.writable:
            return NL
        return target

    def kernel_caches(self, g, target):
        # the kernel's pages of a file are current while this node can read it
        return not covers(target, PR) and g.mode not in (None, NL) and \
            lock_number(g.name) in self.coh.pages.cached

    async def drop_kernel(self, g):
        await self.coh.pages.drop(lock_number(g.name))


class GroupOps(_CachingOps):
    """``R<rg>``: a resource group's header and bitmaps; this node allocates only
    from groups it holds EX (``coh.ex_groups``) and learns free counts from the value
    blocks."""

    def granted(self, g, lvb):
        rg = lock_number(g.name)
        version = self._check_version(g, lvb, lambda: self.vol.drop_group(rg))
        if version:
            self.coh.known_free[rg] = GROUP_LVB.unpack(lvb)[1]
        if covers(g.mode, EX):
            self.coh.ex_groups.add(rg)
        else:
            self.coh.ex_groups.discard(rg)

    def before_demote(self, g, target):
        rg = lock_number(g.name)
        coh = self.coh
        if not covers(target, EX):
            coh.ex_groups.discard(rg)
            self.vol.alloc.drop_group_reservations(rg)
        if g.mode not in (PW, EX):
            return None
        version = self._write_back(g, self.vol.group_blocks(rg))
        hdr = self.vol.cached(self.vol.sb.rgrp_range(rg)[0])
        if isinstance(hdr, RgrpHeader):
            coh.known_free[rg] = hdr.free
            return GROUP_LVB.pack(version, hdr.free, hdr.dinodes, hdr.unlinked)
        return GROUP_LVB.pack(version, coh.known_free.get(rg, 0), 0, 0)

    def dropped(self, g):
        rg = lock_number(g.name)
        self.vol.drop_group(rg)
        self.coh.ex_groups.discard(rg)


class FreezeOps(LockOps):
    """``F``: the freeze lock.  A member changes nothing (no operation body that
    writes runs) unless it holds ``F`` in PR or better; a member that freezes the
    volume takes it EX (``admin.VolumeAdmin``).

    Going below PR (another node freezes): everything this node changed is written
    home (commit and checkpoint: its journal is empty) and the device is flushed,
    so that once the freezer holds EX the volume on disk is consistent and nothing
    changes it.  The next grant (the volume thawed) re-reads the superblock: a grow
    or new slots may have changed the geometry meanwhile."""

    def __init__(self, coh):
        self.coh = coh

    def granted(self, g, lvb):
        coh = self.coh
        if coh.frozen_here and covers(g.mode, PR):
            coh.frozen_here = False
            coh.reread_superblock()

    def before_demote(self, g, target):
        if covers(target, PR):
            return None
        coh = self.coh
        coh.write_back(flush=True)
        coh.frozen_here = True
        coh.stats["frozen"] = coh.stats.get("frozen", 0) + 1
        if coh.after_freeze is not None:
            coh.after_freeze()       # ask for F again at once: back at the thaw
        return None


NO_OPS = LockOps()


def lock_types(coh) -> dict[bytes, LockOps]:
    """The operations of each lock type that covers cached objects, for ``coh``."""
    return {INODE: InodeOps(coh), GROUP: GroupOps(coh), FREEZE: FreezeOps(coh)}
