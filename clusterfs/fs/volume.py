"""An open volume: superblock, metadata object cache, operations, journal hooks.

Every change to metadata happens inside ``with vol.operation():``.  Code calls
``vol.touch(obj)`` before changing a cached object, ``vol.created(obj)`` for a new
block and ``vol.freed(obj)`` for a freed one.  When the operation ends normally its
objects join the journal's running transaction (freed metadata blocks are revoked);
when it raises, every touched object is restored from its snapshot, so a failed
operation (ENOSPC, EIO on a corrupt block, ...) leaves nothing half done.

The journal commits between operations only, never in the middle of one.
"""

from __future__ import annotations

import errno
import logging

from ..errors import CorruptBlock, FSError, FormatMismatch, VolumeError, WrongBlockType
from ..ondisk.blockdev import BlockDevice
from ..ondisk.format import (BLOCKS_PER_BITMAP, DINODE, REFCOUNT, SHARED_SINCE, UNLINKED,
                             Bitmap, Dinode, MetaObject, RgrpHeader, Superblock, TreeNode,
                             XattrBlock)
from .alloc import Allocator

log = logging.getLogger(__name__)

CACHE_LIMIT = 60000


class _Operation:
    """``Volume.operation``'s context: a class, not a generator, because it wraps
    every metadata change (a generator's context cost about 7 % of a streaming
    write's time in the mount)."""

    __slots__ = ("vol", "op")

    def __init__(self, vol: Volume):
        self.vol = vol
        self.op = Op()

    def __enter__(self) -> Op:
        vol = self.vol
        if vol.op is not None:
            raise RuntimeError("nested metadata operation")
        if vol.readonly:
            raise FSError(errno.EROFS, "volume is read-only")
        vol.op = self.op
        return self.op

    def __exit__(self, exc_type, exc, tb) -> bool:
        vol = self.vol
        vol.op = None
        if exc_type is not None:
            vol._rollback(self.op)
        else:
            vol._finish(self.op)
        return False


class Op:
    """Book-keeping of one metadata operation (for commit or rollback)."""

    __slots__ = ("snaps", "created", "freed", "pending", "free_delta")

    def __init__(self):
        self.snaps: dict[int, tuple[MetaObject, MetaObject]] = {}
        self.created: dict[int, MetaObject] = {}
        self.freed: dict[int, MetaObject] = {}
        self.pending: list[tuple[int, int, int]] = []
        self.free_delta = 0


def read_superblock(dev) -> Superblock:
    """The primary superblock with its slot table loaded, or a clear error
    (CorruptBlock naming the superblock or the slot table / FormatMismatch)."""
    sb = Superblock.decode(dev.read(0), 0)
    sb.load_slot_table(dev)
    return sb


class Volume:
    """Cached access to the metadata of one volume, for mount, mkfs and fsck.

    Args:
        dev: a ``BlockDevice`` or ``PowerLossDevice``.
        sb: its superblock.
        slot: the node slot whose journal this volume writes.
    """

    def __init__(self, dev, sb: Superblock, *, slot: int = 0, readonly: bool = False):
        self.dev = dev
        self.sb = sb
        self.slot = slot
        self.readonly = readonly
        self.objects: dict[int, MetaObject] = {}
        self.op: Op | None = None
        self.journal = None
        self.alloc = Allocator(self)
        self.unclean: set[int] = set()
        self._groups = list(range(sb.rgrp_count))
        self._free_total: int | None = None
        self.corrupt_logged: set[int] = set()
        self.stats = {"ops": 0, "rollbacks": 0, "commits": 0, "checkpoints": 0}
        # cluster mode: the coherence layer (``cluster.Coherence``), which checks that
        # every object is read under a lock held at least PR and changed under EX
        self.cluster = None
        # single-node: the volume is frozen (``admin.SingleNodeAdmin``); a
        # cluster member asks its ``Coherence``
        self.frozen = False
        self.by_owner: dict[int, set[int]] = {}   # inode -> cached tree/xattr blocks
        self.by_group: dict[int, set[int]] = {}   # group -> cached refcount nodes
        self.inode_hint: int | None = None         # block the next new inode should take

    @classmethod
    def open(cls, path: str, *, direct: bool | None = None, readonly: bool = False,
             slot: int = 0) -> "Volume":
        """Open a volume file or device.

        Raises:
            VolumeError: the device cannot be opened, or its superblock is damaged or
                does not fit the device (``FormatMismatch``: not a clusterfs volume of
                this revision); the message names the volume.
        """
        try:
            dev = BlockDevice(path, direct=direct, readonly=readonly)
        except OSError as e:
            raise VolumeError(f"cannot open {path}: {e.strerror or e}") from None
        try:
            if dev.nblocks < 2:
                raise FormatMismatch("too small to hold a clusterfs volume")
            sb = read_superblock(dev)
        except CorruptBlock as e:
            dev.close()
            what = "superblock" if e.bno == 0 else f"slot table (block {e.bno})"
            raise VolumeError(f"{path}: {what} is damaged ({e.reason}); "
                              f"run 'clusterfs fsck {path}'") from None
        except FormatMismatch as e:
            dev.close()
            raise FormatMismatch(f"{path}: {e}") from None
        if sb.total_blocks > dev.nblocks:
            dev.close()
            raise VolumeError(f"{path}: the superblock describes {sb.total_blocks} blocks "
                              f"but the device has only {dev.nblocks}")
        return cls(dev, sb, slot=slot, readonly=readonly)

    def close(self) -> None:
        self.dev.close()

    # -- reading ------------------------------------------------------------------

    def _load(self, bno: int, decode) -> MetaObject:
        try:
            buf = self.dev.read(bno)
        except OSError as e:
            self._log_corrupt(bno, f"read error: {e}")
            raise FSError(errno.EIO, f"cannot read block {bno}: {e}") from None
        try:
            obj = decode(buf, bno)
        except CorruptBlock as e:
            self._log_corrupt(bno, e.reason)
            raise
        self.objects[bno] = obj
        self._track(obj)
        return obj

    def _track(self, obj: MetaObject) -> None:
        cls = obj.__class__
        if cls is TreeNode and obj.kind == REFCOUNT:
            self.by_group.setdefault(obj.owner, set()).add(obj.bno)
        elif cls is TreeNode or cls is XattrBlock:
            self.by_owner.setdefault(obj.owner, set()).add(obj.bno)

    def _log_corrupt(self, bno: int, reason: str) -> None:
        if bno not in self.corrupt_logged:
            self.corrupt_logged.add(bno)
            log.error("corrupt metadata block %d: %s", bno, reason)

    def may_write_now(self, ino: int | None = None) -> bool:
        """Whether an operation body may make a change it can also leave out (an
        access time, of inode ``ino``) now: not while the volume is frozen, nor in a
        cluster when it would wait for a lock."""
        if self.cluster is None:
            return not self.frozen
        return self.cluster.may_write_now(ino)

    def dinode(self, ino: int) -> Dinode:
        """The dinode of inode ``ino``; ESTALE if the block is not an inode now."""
        cluster = self.cluster
        if cluster is not None:
            cluster.require_inode(ino, False)
        obj = self._cached(ino)
        if obj is not None:
            if obj.__class__ is Dinode:
                return obj
            raise FSError(errno.ESTALE, f"block {ino} is not an inode")
        rg = self.sb.rgrp_of(ino)
        if rg < 0:
            raise FSError(errno.ESTALE, f"block {ino} is not an inode")
        if cluster is None:
            # (in a cluster the bitmap is another lock's; generations and the open
            # locks keep stale inode numbers out instead)
            if self.alloc.state(ino) not in (DINODE, UNLINKED):
                raise FSError(errno.ESTALE, f"inode {ino} is not allocated")
            return self._load(ino, Dinode.decode)
        try:
            return self._load(ino, Dinode.decode)
        except WrongBlockType:
            raise FSError(errno.ESTALE, f"block {ino} is not an inode") from None

    def _cached(self, bno: int) -> MetaObject | None:
        """The cached object at ``bno``.  In a cluster a cached object whose covering
        lock this node no longer holds (PR or better) may be stale: another node may
        have freed the block and reused it for something else.  It is forgotten."""
        obj = self.objects.get(bno)
        if obj is not None and self.cluster is not None and \
                not self.cluster.cache_valid(obj):
            del self.objects[bno]
            return None
        return obj

    def tree_node(self, bno: int, kind: int) -> TreeNode:
        obj = self._cached(bno)
        if obj is not None:
            if obj.__class__ is TreeNode and obj.kind == kind and not obj.is_root:
                return obj
            raise CorruptBlock(bno, "tree pointer leads to another kind of block")
        if self.sb.rgrp_of(bno) < 0:
            self._log_corrupt(bno, "tree pointer outside the resource groups")
            raise CorruptBlock(bno, "tree pointer outside the resource groups")
        return self._load(bno, lambda buf, b: TreeNode.decode(buf, b, kind))

    def xattr_block(self, bno: int) -> XattrBlock:
        obj = self._cached(bno)
        if obj is not None:
            if obj.__class__ is XattrBlock:
                return obj
            raise CorruptBlock(bno, "xattr pointer leads to another kind of block")
        if self.sb.rgrp_of(bno) < 0:
            raise CorruptBlock(bno, "xattr pointer outside the resource groups")
        return self._load(bno, XattrBlock.decode)

    def rgrp(self, index: int) -> RgrpHeader:
        if self.cluster is not None:
            self.cluster.require_group(index, False)
        start, length = self.sb.rgrp_range(index)
        obj = self.objects.get(start)
        if obj is not None:
            return obj
        hdr = self._load(start, RgrpHeader.decode)
        if hdr.index != index or hdr.length != length or \
                hdr.bitmap_blocks != self.sb.bitmap_blocks:
            self.objects.pop(start, None)
            self._log_corrupt(start, "resource group header disagrees with the superblock")
            raise CorruptBlock(start, "resource group header disagrees with the superblock")
        return hdr

    def bitmap(self, rg: int, j: int) -> Bitmap:
        if self.cluster is not None:
            self.cluster.require_group(rg, False)
        start, _ = self.sb.rgrp_range(rg)
        bno = start + 1 + j
        obj = self.objects.get(bno)
        if obj is not None:
            return obj
        return self._load(bno, lambda buf, b: Bitmap.decode(buf, b, rg, j * BLOCKS_PER_BITMAP))

    def cached(self, bno: int) -> MetaObject | None:
        return self.objects.get(bno)

    # -- operations -----------------------------------------------------------------

    def operation(self) -> _Operation:
        """Run a metadata change atomically (``with``, giving the ``Op``): all of it
        joins the journal or, when the body raises, none (rolled back)."""
        return _Operation(self)

    def touch(self, obj: MetaObject) -> None:
        """Call before changing ``obj``: snapshot it for rollback, mark it dirty."""
        op = self.op
        if op is None:
            raise RuntimeError("metadata change outside an operation")
        bno = obj.bno
        if bno in op.snaps or bno in op.created:
            return
        if self.cluster is not None:
            self.cluster.require_object(obj)
        op.snaps[bno] = (obj, obj.clone())

    def created(self, obj: MetaObject) -> None:
        """Register a metadata object for a newly allocated block."""
        if self.cluster is not None:
            self.cluster.require_object(obj)
        self.op.created[obj.bno] = obj
        self.objects[obj.bno] = obj
        self._track(obj)

    def freed(self, obj: MetaObject) -> None:
        """Drop a metadata object whose block was freed (its journal images are revoked)."""
        if self.cluster is not None:
            self.cluster.require_object(obj)
        self.objects.pop(obj.bno, None)
        self.op.freed[obj.bno] = obj

    def _finish(self, op: Op) -> None:
        self.stats["ops"] += 1
        j = self.journal
        if j is None:
            # mkfs / offline repair without a journal: write through
            for bno in list(op.snaps) + list(op.created):
                obj = self.objects.get(bno)
                if obj is not None:
                    self.dev.write(bno, obj.image())
            self.alloc.committed()
            return
        for bno in op.freed:
            if bno not in self.objects:
                j.revoke(bno)
                self.unclean.discard(bno)
        for bno in op.snaps:
            obj = self.objects.get(bno)
            if obj is not None:
                j.add(bno, obj)
                self.unclean.add(bno)
        for bno, obj in op.created.items():
            if self.objects.get(bno) is obj:
                j.add(bno, obj)
                self.unclean.add(bno)
        if j.should_commit():
            self.commit()
        if len(self.objects) > CACHE_LIMIT:
            self.shrink_cache()

    def _rollback(self, op: Op) -> None:
        self.stats["rollbacks"] += 1
        for bno, obj in op.created.items():
            if self.objects.get(bno) is obj:
                del self.objects[bno]
        for bno, obj in op.freed.items():
            self.objects[bno] = obj
        for bno, (obj, snap) in op.snaps.items():
            obj.restore(snap)
            self.objects[bno] = obj
        for rg, entry, n in op.pending:
            runs = self.alloc.pending_free.get(rg)
            if runs and (entry, n) in runs:
                runs.remove((entry, n))
        if self._free_total is not None:
            self._free_total -= op.free_delta

    # -- allocation book-keeping ------------------------------------------------------

    def alloc_groups(self) -> list[int]:
        """Resource groups this node may allocate from (all, on a single node; the
        ones whose lock it can hold now, in a cluster)."""
        if self.cluster is not None:
            return self.cluster.alloc_groups()
        return self._groups

    def may_alloc_in(self, rg: int) -> bool:
        """``rg in alloc_groups()``, without working the whole list out."""
        if self.cluster is not None:
            return self.cluster.may_alloc_in(rg)
        return 0 <= rg < len(self._groups)

    def out_of_space(self, want: int) -> None:
        """The groups at hand lack ``want`` blocks: a cluster asks for another group
        (raising NeedLock); a single node has no other, and the caller says ENOSPC."""
        if self.cluster is not None:
            self.cluster.out_of_space(want)

    def alloc_free_blocks(self) -> int:
        if self.cluster is not None:
            return sum(self.rgrp(i).free for i in self.cluster.alloc_groups())
        if self._free_total is None:
            self._free_total = sum(self.rgrp(i).free for i in self._groups)
        return self._free_total

    def note_alloc(self, rg: int, n: int) -> None:
        if self._free_total is not None:
            self._free_total -= n
        if self.op is not None:
            self.op.free_delta -= n

    def note_pending_free(self, rg: int, entry: int, n: int) -> None:
        if self._free_total is not None:
            self._free_total += n
        if self.op is not None:
            self.op.free_delta += n
            self.op.pending.append((rg, entry, n))

    def free_meta(self, obj: MetaObject) -> None:
        self.alloc.free(obj.bno, 1, data=False)
        if self._free_total is not None:
            self._free_total += 1
            self.op.free_delta += 1
        self.freed(obj)

    # -- journal ------------------------------------------------------------------------

    def commit(self) -> None:
        """Commit the running transaction (data first: ordered mode)."""
        if self.op is not None:
            raise RuntimeError("commit inside an operation")
        if self.journal is None:
            self.dev.flush()
            return
        seq = self.journal.commit()
        if seq is None:
            self.dev.flush()
        self.alloc.committed()
        self.stats["commits"] += 1

    async def commit_in_thread(self, run_sync) -> None:
        """``commit`` with the device writes and flushes on a worker thread, so that
        requests are served (filling the next transaction) and deadlines are kept
        (lease renewals) while the device flushes.  ``run_sync``: awaits a function
        on a thread (``trio.to_thread.run_sync``)."""
        if self.journal is not None:
            # a commit sealed before and still being written: finish it there too
            await run_sync(self.journal.wait_sealed)
        token = self.commit_begin()
        if token is None:
            await run_sync(self.dev.flush)
            return
        await run_sync(token[0].write)
        self.commit_end(token)

    def commit_begin(self):
        """Seal the running transaction for a commit whose writes run elsewhere
        (then ``commit_end``).  None when there is nothing to commit (or no
        journal)."""
        if self.op is not None:
            raise RuntimeError("commit inside an operation")
        if self.journal is None:
            return None
        sealed = self.journal.seal()
        if sealed is None:
            return None
        return sealed, self.alloc.sealed()

    def commit_end(self, token) -> None:
        """Finish a sealed commit (its writes are done here unless a thread did
        them); the blocks it freed are reusable after.  Raises ``JournalAborted``
        when its writes failed."""
        sealed, freed = token
        sealed.write()
        self.alloc.released(freed)
        self.stats["commits"] += 1

    def checkpoint(self) -> None:
        """Commit, then write every journaled block home; the log is empty after."""
        self.commit()
        if self.journal is not None:
            self.journal.checkpoint()
        self.unclean.clear()
        self.stats["checkpoints"] += 1

    def shrink_cache(self, keep: int = CACHE_LIMIT // 2) -> None:
        """Drop clean cached objects (after a checkpoint everything is clean)."""
        if self.op is not None:
            return
        if self.unclean:
            self.checkpoint()
        drop = len(self.objects) - keep
        if drop <= 0:
            return
        for bno in list(self.objects):
            if drop <= 0:
                break
            if isinstance(self.objects[bno], (RgrpHeader, Bitmap)):
                continue
            del self.objects[bno]
            drop -= 1

    def inode_blocks(self, ino: int) -> list[int]:
        """Cached blocks covered by inode ``ino``'s lock: dinode, tree, xattr block."""
        out = [ino] if self.objects.get(ino).__class__ is Dinode else []
        for bno in self.by_owner.get(ino, ()):
            obj = self.objects.get(bno)
            if obj is not None and getattr(obj, "owner", None) == ino and \
                    getattr(obj, "kind", None) != REFCOUNT:
                out.append(bno)
        return out

    def group_blocks(self, rg: int) -> list[int]:
        """Cached blocks covered by resource group ``rg``'s lock: header, bitmaps,
        refcount tree nodes."""
        start, _ = self.sb.rgrp_range(rg)
        out = [b for b in range(start, start + 1 + self.sb.bitmap_blocks)
               if b in self.objects]
        for bno in self.by_group.get(rg, ()):
            obj = self.objects.get(bno)
            if obj.__class__ is TreeNode and obj.kind == REFCOUNT and obj.owner == rg:
                out.append(bno)
        return out

    def drop_inode(self, ino: int) -> None:
        """Forget everything cached for an inode (another node may have changed it)."""
        for bno in self.inode_blocks(ino):
            del self.objects[bno]
        self.by_owner.pop(ino, None)

    def drop_group(self, rg: int) -> None:
        for bno in self.group_blocks(rg):
            del self.objects[bno]
        self.by_group.pop(rg, None)
        self.alloc.drop_group_reservations(rg)

    # -- geometry -----------------------------------------------------------------------

    def adopt_geometry(self, new_sb: Superblock) -> None:
        """Use the superblock of the grown volume (``clusterfs.fs.grow``) or of one
        with added slots (``clusterfs.fs.addslots``) without a remount: its new
        groups become allocatable, ``statfs`` shows its size, and the cached header
        and bitmaps of every group whose extent changed (of every group, when slots
        were added: their blocks came from the groups) are dropped (read again from
        the device).  The superblock object is updated in
        place, so every holder of ``vol.sb`` sees the new one.  Call it between
        operations, with nothing of those groups in the running transaction (the
        grow checkpoints the journal first).

        Raises:
            ValueError: ``new_sb`` is not a grown copy of this volume's superblock.
            VolumeError: the device is smaller than ``new_sb`` says.
        """
        if self.op is not None:
            raise RuntimeError("adopt_geometry inside a metadata operation")
        old = self.sb
        if new_sb is old:
            return
        same = ("uuid", "journal_blocks", "slot_start", "journal_start", "rgrp_start",
                "rgrp_blocks", "bitmap_blocks", "root_ino", "lease_start")
        slots_added = new_sb.nslots != old.nslots
        changed = [f for f in same if getattr(new_sb, f) != getattr(old, f)]
        if new_sb.total_blocks < old.total_blocks or new_sb.rgrp_count < old.rgrp_count:
            changed.append("total_blocks/rgrp_count (smaller)")
        if new_sb.nslots < old.nslots or new_sb.added is None or \
                list(new_sb.added[:len(old.added or [])]) != list(old.added or []):
            changed.append("slots")
        if changed:
            raise ValueError(f"not a grown copy of the mounted volume's superblock "
                             f"({', '.join(changed)}): only a grow and added slots are "
                             f"taken without a remount")
        refresh = getattr(self.dev, "refresh_size", None)
        if new_sb.total_blocks > self.dev.nblocks and refresh is not None:
            refresh()        # the device grew since it was opened (another node's grow)
        if new_sb.total_blocks > self.dev.nblocks:
            raise VolumeError(f"the superblock describes {new_sb.total_blocks} blocks "
                              f"but the device has only {self.dev.nblocks}")
        # the groups as this volume knew them (a superblock of an unfinished grow:
        # as they were before it)
        before = old.resized(old.grow_from) if old.growing else old
        count = max(before.rgrp_count, new_sb.rgrp_count)
        # (added slots took their blocks from groups: every group may have changed)
        changed = [rg for rg in range(count)
                   if slots_added or rg >= before.rgrp_count or rg >= new_sb.rgrp_count
                   or before.rgrp_range(rg) != new_sb.rgrp_range(rg)]
        drop = [bno for rg in changed
                for bno in range(old.rgrp_start + rg * old.rgrp_blocks,
                                 old.rgrp_start + rg * old.rgrp_blocks + 1 + old.bitmap_blocks)
                if isinstance(self.objects.get(bno), (RgrpHeader, Bitmap))]
        if any(bno in self.unclean for bno in drop):
            # the journal would write their old images home over the grown group
            raise RuntimeError("adopt_geometry with a changed group's blocks in the "
                               "journal: commit and checkpoint first")
        for name, value in new_sb.__dict__.items():
            setattr(old, name, value)
        for bno in drop:
            del self.objects[bno]
        for rg in changed:
            # blocks this node had set aside there may be taken now (added slots)
            self.alloc.drop_group_reservations(rg)
        self._groups = list(range(old.rgrp_count))
        self._free_total = None
        log.info("volume geometry: %d blocks, %d resource groups", old.total_blocks,
                 old.rgrp_count)

    # -- format revision ----------------------------------------------------------------

    def raise_revision(self, rev: int = SHARED_SINCE) -> None:
        """Before a feature of revision ``rev`` first reaches the disk (the first
        shared block: ``SHARED_SINCE``; the first block mapped past EOF:
        ``PREALLOC_SINCE``): a volume of an older revision becomes ``rev``, both
        copies of the superblock durable (backup first), so that older software
        refuses it from then on.  Never lowers the revision.  Idempotent (several
        nodes may do it at once: they write the same bytes)."""
        if self.sb.format_rev >= rev:
            return
        if self.op is not None:
            raise RuntimeError("raise_revision inside an operation")
        old = self.sb.format_rev
        self.sb.format_rev = rev
        try:
            self.dev.write(self.sb.backup_bno, self.sb.image(self.sb.backup_bno))
            self.dev.flush()
            self.dev.write(0, self.sb.image(0))
            self.dev.flush()
        except BaseException:
            self.sb.format_rev = old
            raise
        log.info("volume raised to format revision %d", rev)

    # -- data ---------------------------------------------------------------------------

    def read_data(self, pblk: int, count: int) -> bytes:
        return self.dev.read(pblk, count)

    def write_data(self, pblk: int, data) -> None:
        self.dev.write(pblk, data)
