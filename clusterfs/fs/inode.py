"""File contents of one dinode (its extended attributes are ``xattrs.py``'s).

A file's bytes are inline in the dinode while they fit (``INLINE_MAX``); beyond that
the data area holds the root of an extent tree mapping logical blocks to runs of
physical blocks.  Unmapped blocks are holes and read as zeros.  Data blocks are
written straight to the device (ordered mode: before the metadata that maps them
commits); blocks past EOF inside the last block are kept zero on disk so a later
extension never exposes old bytes.  The format has no unwritten extents: a block
that fallocate preallocates is an ordinary mapped block, zeroed on the device before
the operation that maps it commits, and so is data to SEEK_DATA.

Blocks past EOF: a write that streams onto the end of a file may map more blocks than
it needs, ahead of EOF (``write``'s ``ahead``; XFS's speculative preallocation), so
that the next appends only write data and move the size instead of allocating.  The
dinode then has ``DF_PREALLOC``: its blocks wholly past EOF hold whatever the device
held, are no bytes of the file, and go (``trim_prealloc``) before anything else could
make them part of it: a truncation, a preallocation, a clone onto the file or a write
that skips over them; and when the writer closes the file.  A node that crashes keeps
them mapped, flagged, until one of those.

Shared blocks (reflink clones, ``clone_step``): an extent with ``EXT_SHARED`` may map
blocks that other extents map too; their counts are in the groups' refcount trees
(``refcount``).  Nothing writes into a block whose count is 2 or more: every writer
in place (``write``, the zeroing of tails and ranges) first gives the file its own
copy (``_unshare``, copy-on-write), and every unmapping drops one reference
(``refcount.release``), freeing a block with its last one.
"""

from __future__ import annotations

import bisect
import errno

from ..errors import CorruptBlock, FSError
from ..ondisk.format import (BLOCK_SIZE, DF_EXTENTS, DF_INLINE, DF_PREALLOC, EXTENT,
                             EXT_SHARED, INLINE_MAX, MAX_FILE_BLOCKS, Dinode, TreeNode)
from . import refcount
from .btree import BTree

MAX_EXTENT = 1 << 31           # blocks in one extent record
PREALLOC_MAX = 2048            # blocks (8 MiB) a streaming write maps past EOF at most
TRUNCATE_STEP = 64             # extent records freed per operation
FALLOC_STEP = 1024             # blocks preallocated or zeroed per operation (4 MiB)
CLONE_STEP = 16                # extent records shared (or unmapped) per operation: the
#                                journal transaction of a step stays well under a
#                                quarter of the smallest journal (256 blocks)
COPY_CHUNK = 256               # blocks read and written at once by a copy


class InodeStore:
    """``btree.TreeStore`` for the trees of one dinode, with journaling and rollback."""

    __slots__ = ("vol", "di")

    def __init__(self, vol, di: Dinode):
        self.vol = vol
        self.di = di

    def load(self, bno: int, kind: int) -> TreeNode:
        node = self.vol.tree_node(bno, kind)
        if node.owner != self.di.bno:
            raise CorruptBlock(bno, f"tree node of inode {node.owner} found in inode "
                                    f"{self.di.bno}")
        return node

    def modify(self, node: TreeNode) -> None:
        self.vol.touch(self.di if node.is_root else node)

    def alloc_node(self, kind: int, level: int, owner: int) -> TreeNode:
        bno = self.vol.alloc.alloc_meta(self.di.bno)
        node = TreeNode(bno, kind, level, owner)
        self.vol.created(node)
        self.vol.touch(self.di)
        self.di.blocks += 1
        return node

    def free_node(self, node: TreeNode) -> None:
        self.vol.free_meta(node)
        self.vol.touch(self.di)
        self.di.blocks -= 1


def tree(vol, di: Dinode) -> BTree:
    return BTree(InodeStore(vol, di), di.root)


# -- mapping ------------------------------------------------------------------------

def map_range(vol, di: Dinode, first: int, count: int) -> list[tuple[int, int, int]]:
    """Cover logical blocks [first, first+count) with (lblk, pblk or 0 for a hole, n)."""
    return [(lb, pb, n) for lb, pb, n, _f in segments(vol, di, first, count)]


def segments(vol, di: Dinode, first: int, count: int) -> list[tuple[int, int, int, int]]:
    """``map_range`` with each run's extent flags: (lblk, pblk or 0, n, flags)."""
    end = first + count
    out: list[tuple[int, int, int, int]] = []
    pos = first
    t = tree(vol, di)
    fl = t.floor(first)
    if fl is not None and fl[0] < first:
        lb, (pb, n, f) = fl
        if lb + n > first:
            take = min(lb + n, end) - first
            out.append((first, pb + first - lb, take, f))
            pos = first + take
    if pos < end:
        for lb, (pb, n, f) in t.items_from(pos):
            if lb >= end:
                break
            if lb + n <= pos:
                continue
            if lb > pos:
                out.append((pos, 0, lb - pos, 0))
                pos = lb
            take = min(lb + n, end) - pos
            out.append((pos, pb + (pos - lb), take, f))
            pos += take
            if pos >= end:
                break
    if pos < end:
        out.append((pos, 0, end - pos, 0))
    return out


def _extent_at(vol, di: Dinode, lblk: int):
    """The extent record (lblk, (pblk, n, flags)) at or before ``lblk``, or None
    (``BTree.floor``, without building a tree when the root in the dinode is all)."""
    root = di.root
    if root.level == 0:
        i = bisect.bisect_right(root.keys, lblk) - 1
        return (root.keys[i], root.vals[i]) if i >= 0 else None
    return tree(vol, di).floor(lblk)


def extents(vol, di: Dinode, flags: bool = False):
    """All (lblk, pblk, n) records of an extent file, in order (with ``flags``:
    (lblk, pblk, n, flags))."""
    if not di.flags & DF_EXTENTS:
        return []
    if flags:
        return [(lb, pb, n, f) for lb, (pb, n, f) in tree(vol, di).items_from(0)]
    return [(lb, pb, n) for lb, (pb, n, _f) in tree(vol, di).items_from(0)]


def _map_new(t: BTree, lblk: int, pblk: int, n: int, flags: int = 0) -> None:
    """Map a run (a hole before), merging with contiguous neighbours of the same
    flags."""
    prev = t.floor(lblk - 1) if lblk > 0 else None
    nxt = t.get(lblk + n)
    if nxt is not None and (nxt[0] != pblk + n or nxt[2] != flags):
        nxt = None
    if prev is not None:
        plb, (ppb, pn, pf) = prev
        if plb + pn == lblk and ppb + pn == pblk and pf == flags and pn + n < MAX_EXTENT:
            if nxt is not None and pn + n + nxt[1] < MAX_EXTENT:
                t.delete(lblk + n)
                t.replace(plb, plb, (ppb, pn + n + nxt[1], pf))
            else:
                t.replace(plb, plb, (ppb, pn + n, pf))
            return
    if nxt is not None and n + nxt[1] < MAX_EXTENT:
        t.replace(lblk + n, lblk, (pblk, n + nxt[1], flags))
        return
    t.insert(lblk, (pblk, n, flags))


def _unmap(t: BTree, first: int, stop: int,
           limit: int | None = None) -> tuple[list[tuple[int, int, int, int]], int]:
    """Remove the mapping of logical blocks [first, stop) from the tree (an extent
    cut in the middle becomes two records), freeing nothing.

    Returns:
        (pieces, pos): the runs unmapped as (lblk, pblk, n, flags), at most ``limit``
        of them, and the block where it stopped (``stop`` once the range is done).
    """
    pos = first
    pieces: list[tuple[int, int, int, int]] = []
    while pos < stop:
        if limit is not None and len(pieces) >= limit:
            return pieces, pos
        rec = t.floor(pos)
        if rec is None or rec[0] + rec[1][1] <= pos:
            rec = next(t.items_from(pos), None)
            if rec is None or rec[0] >= stop:
                return pieces, stop
        lb, (pb, n, f) = rec
        a, b = max(lb, pos), min(lb + n, stop)
        if a == lb and b == lb + n:
            t.delete(lb)
        elif a == lb:
            t.replace(lb, b, (pb + b - lb, lb + n - b, f))
        else:
            t.replace(lb, lb, (pb, a - lb, f))
            if b < lb + n:
                t.insert(b, (pb + b - lb, lb + n - b, f))
        pieces.append((a, pb + a - lb, b - a, f))
        pos = b
    return pieces, stop


def _release(vol, di: Dinode, pieces) -> None:
    """Drop the file's reference to unmapped runs (``_unmap``'s pieces): blocks are
    freed unless other extents still share them."""
    if not pieces:
        return
    vol.touch(di)
    for _lb, pb, n, f in pieces:
        refcount.release(vol, pb, n, f)
        di.blocks -= n


def _copy_blocks(vol, src: int, dst: int, n: int) -> None:
    """Copy data blocks [src, src+n) to [dst, dst+n) on the device."""
    for i in range(0, n, COPY_CHUNK):
        c = min(COPY_CHUNK, n - i)
        vol.write_data(dst + i, vol.read_data(src + i, c))


def _unshare(vol, di: Dinode, t: BTree, first: int, count: int, copy=()) -> None:
    """Make the mapped blocks of logical [first, first+count) the file's own before
    a write in place: each block of a ``SHARED`` extent whose count is 2 or more is
    replaced by a new block (copy-on-write) and loses this file's reference.  Only
    the blocks whose logical number is in ``copy`` get the old bytes (the others are
    about to be overwritten whole; ``write`` reads the old bytes of its partial
    blocks itself).  A ``SHARED`` record of the range whose blocks all have count 1
    loses the flag (later writes then go straight in place).

    Metadata and new blocks only: no byte of a block the file mapped before changes
    here, so an operation that fails after it leaves the file as it was.
    """
    cows = []
    for lb, pb, n, f in segments(vol, di, first, count):
        if pb and f & EXT_SHARED:
            for s, ln, c in refcount.counts(vol, pb, n):
                if c >= 2:
                    cows.append((lb + s - pb, s, ln))
    for lb, old, n in cows:
        _unmap(t, lb, lb + n)
        pos = lb
        while pos < lb + n:
            runs = vol.alloc.alloc_data(di.bno, _goal_for(t, di, pos), lb + n - pos,
                                        di.blocks)
            for rpb, rn in runs:
                k = 0
                while k < rn:       # the old bytes of the blocks to keep, in runs
                    if pos + k not in copy:
                        k += 1
                        continue
                    j = k
                    while j < rn and pos + j in copy:
                        j += 1
                    _copy_blocks(vol, old + pos - lb + k, rpb + k, j - k)
                    k = j
                _map_new(t, pos, rpb, rn, 0)
                pos += rn
        for s, ln in refcount.change(vol, old, n, -1):
            vol.alloc.free(s, ln, data=True)        # (not with a count of 2 or more)
    # records left shared whose blocks nobody else maps any more: the flag goes
    seen = set()
    for lb, pb, n, f in segments(vol, di, first, count):
        if not pb or not f & EXT_SHARED:
            continue
        rec = t.floor(lb)
        if rec is None or rec[0] in seen:
            continue
        seen.add(rec[0])
        rlb, (rpb, rn, rf) = rec
        if not refcount.any_shared(vol, rpb, rn):
            t.replace(rlb, rlb, (rpb, rn, rf & ~EXT_SHARED))


# -- reading and writing ---------------------------------------------------------------

def read(vol, di: Dinode, off: int, size: int) -> bytes:
    if off >= di.size or size <= 0:
        return b""
    size = min(size, di.size - off)
    if di.flags & DF_INLINE:
        data = di.root[off:off + size]
        return data + bytes(size - len(data))
    first = off // BLOCK_SIZE
    last = (off + size - 1) // BLOCK_SIZE
    rec = _extent_at(vol, di, first)
    if rec is not None and rec[0] + rec[1][1] > last:
        # one extent holds the whole range (the usual case): one device read
        buf = vol.read_data(rec[1][0] + first - rec[0], last - first + 1)
    else:
        parts = []
        for _lb, pb, n in map_range(vol, di, first, last - first + 1):
            parts.append(vol.read_data(pb, n) if pb else bytes(n * BLOCK_SIZE))
        buf = parts[0] if len(parts) == 1 else b"".join(parts)
    s = off - first * BLOCK_SIZE
    if s == 0 and len(buf) == size:
        return buf
    return buf[s:s + size]


def _goal_for(t: BTree, di: Dinode, lblk: int) -> int:
    prev = t.floor(lblk)
    if prev is not None:
        plb, (ppb, pn, _f) = prev
        return ppb + (lblk - plb)
    return di.bno + 1


def convert_inline(vol, di: Dinode) -> None:
    """Turn an inline file into an extent file (its bytes go to a data block)."""
    data = di.root
    vol.touch(di)
    di.flags = (di.flags & ~DF_INLINE) | DF_EXTENTS
    di.root = TreeNode(di.bno, EXTENT, 0, di.bno, is_root=True)
    if data and any(data):
        t = tree(vol, di)
        runs = vol.alloc.alloc_data(di.bno, di.bno + 1, 1)
        pb = runs[0][0]
        vol.write_data(pb, data + bytes(BLOCK_SIZE - len(data)))
        _map_new(t, 0, pb, 1)
        di.blocks += 1


def _allocate(vol, di: Dinode, t: BTree, lblk: int,
              count: int) -> list[tuple[int, int, int]]:
    """Allocate and map blocks for the hole [lblk, lblk+count); returns the runs as
    (lblk, pblk, n).  Their contents are whatever the device holds: the caller
    writes them before the operation ends."""
    out = []
    pos = lblk
    remaining = count
    while remaining:
        goal = _goal_for(t, di, pos)
        runs = vol.alloc.alloc_data(di.bno, goal, remaining, di.blocks)
        for rpb, rn in runs:
            _map_new(t, pos, rpb, rn)
            out.append((pos, rpb, rn))
            pos += rn
            remaining -= rn
            vol.touch(di)
            di.blocks += rn
    return out


def write(vol, di: Dinode, off: int, data, ahead: int = 0) -> int:
    """Write ``data`` at ``off`` (allocating as needed); returns the byte count.

    ``ahead``: when the write allocates its last block past EOF, map up to that
    many more free blocks after it (physically contiguous, from a group with room
    to spare, ``Allocator.alloc_ahead``), flagging the file ``DF_PREALLOC``; the
    caller asks for this when the writes stream onto the end of the file."""
    n = len(data)
    if n == 0:
        return 0
    end = off + n
    if end > MAX_FILE_BLOCKS * BLOCK_SIZE:
        raise FSError(errno.EFBIG, "file too large")
    if di.flags & DF_INLINE:
        if end <= INLINE_MAX:
            vol.touch(di)
            buf = bytearray(di.root)
            if off > len(buf):
                buf += bytes(off - len(buf))
            buf[off:end] = data
            di.root = bytes(buf)
            if end > di.size:
                di.size = end
            return n
        convert_inline(vol, di)
    t = tree(vol, di)
    first = off // BLOCK_SIZE
    last = (end - 1) // BLOCK_SIZE
    if overwrite(vol, di, off, data):
        return n
    if di.flags & DF_PREALLOC and first > -(-di.size // BLOCK_SIZE):
        # the blocks mapped ahead of EOF that this write skips would become
        # readable with what they hold
        trim_prealloc(vol, di)
    if off > di.size and di.size // BLOCK_SIZE < first:
        # a write that never committed (power cut) may have left bytes past EOF
        _zero_tail(vol, di, t, di.size)
    count = last - first + 1
    segs = segments(vol, di, first, count)
    fresh: list[tuple[int, int]] = []       # runs allocated by this write
    mapped = []
    shared = False
    for lb, pb, cnt, f in segs:
        if pb:
            mapped.append((lb, pb, cnt))
            shared |= bool(f & EXT_SHARED)
            continue
        for rlb, rpb, rn in _allocate(vol, di, t, lb, cnt):
            mapped.append((rlb, rpb, rn))
            fresh.append((rlb, rn))
    if ahead and fresh and mapped[-1][0] + mapped[-1][2] == last + 1 and \
            fresh[-1][0] + fresh[-1][1] == last + 1 and last >= di.size // BLOCK_SIZE:
        # the write ends in blocks it allocated at the end of the file: map more
        _map_ahead(vol, di, t, last + 1, mapped[-1][1] + mapped[-1][2], ahead)
    old = [(lb, pb, cnt) for lb, pb, cnt, _f in segs if pb]    # the bytes there now
    if shared:
        # copy-on-write: blocks others share get new ones (the partial ones' old
        # bytes are read below from where they are now, ``old``)
        _unshare(vol, di, t, first, count)
        mapped = map_range(vol, di, first, count)
    mapped.sort()
    head = off - first * BLOCK_SIZE
    tail = end - last * BLOCK_SIZE       # bytes used of the last block
    if head == 0 and tail == BLOCK_SIZE:
        buf = data
    else:
        buf = bytearray(count * BLOCK_SIZE)
        # read-modify-write the partial head and tail blocks that held data before
        for lb, pb, cnt in old:
            if head and lb <= first < lb + cnt:
                buf[0:BLOCK_SIZE] = vol.read_data(pb + first - lb, 1)
            if tail != BLOCK_SIZE and lb <= last < lb + cnt and \
                    (last != first or not head):
                buf[-BLOCK_SIZE:] = vol.read_data(pb + last - lb, 1)
        if end >= di.size:
            # bytes past the old EOF (a hole now, or past the new EOF) read as zeros,
            # whatever an uncommitted write left on the disk
            gap = max(0, di.size - first * BLOCK_SIZE)
            if gap < head:
                buf[gap:head] = bytes(head - gap)
            buf[head + n:] = bytes(len(buf) - head - n)
        buf[head:head + n] = data
    mv = memoryview(buf)
    for lb, pb, cnt in _coalesce(mapped):
        s = (lb - first) * BLOCK_SIZE
        vol.write_data(pb, mv[s:s + cnt * BLOCK_SIZE])
    if end > di.size:
        vol.touch(di)
        di.size = end
    return n


def _map_ahead(vol, di: Dinode, t: BTree, lblk: int, pblk: int, want: int) -> None:
    """Map up to ``want`` free blocks from ``pblk`` at logical block ``lblk`` (past
    EOF, a hole), flagging the file ``DF_PREALLOC``; nothing if none is free."""
    if next(t.items_from(lblk), None) is not None:
        return      # something is mapped there already
    got = vol.alloc.alloc_ahead(di.bno, pblk, want)
    if got:
        _map_new(t, lblk, pblk, got)
        vol.touch(di)
        di.blocks += got
        di.flags |= DF_PREALLOC


def trim_prealloc(vol, di: Dinode) -> bool:
    """Free the blocks mapped wholly past EOF of a ``DF_PREALLOC`` file and clear the
    flag (in the caller's operation); returns whether there was anything to do.
    Bounded: a file has only the runs its last streaming writes mapped ahead."""
    if not di.flags & DF_PREALLOC:
        return False
    vol.touch(di)
    di.flags &= ~DF_PREALLOC
    pieces, _ = _unmap(tree(vol, di), -(-di.size // BLOCK_SIZE), MAX_FILE_BLOCKS)
    _release(vol, di, pieces)
    return True


def overwrite(vol, di: Dinode, off: int, data) -> bool:
    """Write ``data`` in place if it is whole blocks inside the file that one extent
    holds and shares with nobody (what ``write`` does then too, minus its
    book-keeping); such a write changes no metadata.  Returns False, having written
    nothing, otherwise."""
    n = len(data)
    if not n or (off | n) % BLOCK_SIZE or off + n > di.size or not di.flags & DF_EXTENTS:
        return False
    first = off // BLOCK_SIZE
    rec = _extent_at(vol, di, first)
    if rec is None or rec[0] + rec[1][1] <= (off + n - 1) // BLOCK_SIZE or \
            rec[1][2] & EXT_SHARED:
        return False
    vol.write_data(rec[1][0] + first - rec[0], data)
    return True


def mapped_at_eof(vol, di: Dinode, off: int, n: int) -> int | None:
    """Where ``n`` bytes written at EOF (``off`` is the size) go when the blocks
    there are mapped already (ahead of EOF: ``_map_ahead``), all in one extent that
    nobody shares: the physical block of the first; None otherwise."""
    end = off + n
    if not n or off != di.size or not di.flags & DF_EXTENTS or \
            end > MAX_FILE_BLOCKS * BLOCK_SIZE:
        return None
    first = off // BLOCK_SIZE
    rec = _extent_at(vol, di, first)
    if rec is None or rec[0] + rec[1][1] <= (end - 1) // BLOCK_SIZE or \
            rec[1][2] & EXT_SHARED:
        return None
    return rec[1][0] + first - rec[0]


def append_at(vol, di: Dinode, off: int, data, pblk: int) -> None:
    """Write ``data`` at EOF into the blocks ``mapped_at_eof`` found from ``pblk``
    and move the size (in the caller's operation): what ``write`` does there, minus
    its look-ups.  The bytes of the last block past the new EOF are zeros."""
    n = len(data)
    head = off % BLOCK_SIZE
    if head == 0 and n % BLOCK_SIZE == 0:
        buf = data
    else:
        buf = bytearray(-(-(head + n) // BLOCK_SIZE) * BLOCK_SIZE)
        if head:
            buf[:head] = vol.read_data(pblk, 1)[:head]
        buf[head:head + n] = data
    vol.write_data(pblk, buf)
    vol.touch(di)
    di.size = off + n


def _coalesce(mapped):
    out = []
    for lb, pb, cnt in mapped:
        if out and out[-1][0] + out[-1][2] == lb and out[-1][1] + out[-1][2] == pb:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + cnt)
        else:
            out.append((lb, pb, cnt))
    return out


# -- truncation ------------------------------------------------------------------------

def truncate_step(vol, di: Dinode, new_size: int) -> bool:
    """Move the file toward ``new_size`` by at most TRUNCATE_STEP extents.

    Returns True when the size is reached.  Every step leaves a consistent file
    (its size shrinks with the freed blocks), so a long truncation can span several
    transactions and survive a crash between them.
    """
    vol.touch(di)
    trim_prealloc(vol, di)
    if di.flags & DF_INLINE:
        if new_size <= INLINE_MAX:
            # inline bytes past len(root) up to size are zeros
            di.root = di.root[:new_size]
            di.size = new_size
            return True
        convert_inline(vol, di)
    if new_size >= di.size:
        if new_size > di.size:
            _zero_tail(vol, di, tree(vol, di), di.size)   # see write()
        di.size = new_size
        return True
    keep_blocks = -(-new_size // BLOCK_SIZE)
    t = tree(vol, di)
    freed = 0
    while True:
        last = t.last()
        if last is None or last[0] + last[1][1] <= keep_blocks:
            break
        lb, (pb, n, f) = last
        if freed >= TRUNCATE_STEP:
            # stop here; the file ends where its remaining blocks end
            di.size = min(di.size, max(new_size, (lb + n) * BLOCK_SIZE))
            return False
        if lb >= keep_blocks:
            t.delete(lb)
            refcount.release(vol, pb, n, f)
            di.blocks -= n
        else:
            keep = keep_blocks - lb
            t.replace(lb, lb, (pb, keep, f))
            refcount.release(vol, pb + keep, n - keep, f)
            di.blocks -= n - keep
        freed += 1
    _zero_tail(vol, di, t, new_size)
    di.size = new_size
    return True


def _zero_tail(vol, di: Dinode, t: BTree, new_size: int) -> None:
    """Zero the bytes after ``new_size`` in its last block, on disk (a shared block
    is copied first)."""
    off = new_size % BLOCK_SIZE
    if not off:
        return
    _zero_partial(vol, di, t, new_size // BLOCK_SIZE, off, BLOCK_SIZE)


def _zero_partial(vol, di: Dinode, t: BTree, lblk: int, s: int, e: int) -> None:
    """Zero bytes [s, e) of logical block ``lblk`` on disk, if it is mapped and any
    of them is not zero (then a shared block is first copied: copy-on-write)."""
    rec = t.floor(lblk)
    if rec is None:
        return
    lb, (pb, n, f) = rec
    if lb + n <= lblk:
        return
    blk = bytearray(vol.read_data(pb + lblk - lb, 1))
    if not any(blk[s:e]):
        return
    if f & EXT_SHARED:
        _unshare(vol, di, t, lblk, 1, copy=range(lblk, lblk + 1))
        lb, (pb, n, f) = t.floor(lblk)
    blk[s:e] = bytes(e - s)
    vol.write_data(pb + lblk - lb, blk)


# -- preallocation, hole punching and zeroing (fallocate) ---------------------------------

def fill_range(di: Dinode, off: int, end: int, keep_size: bool) -> tuple[int, int]:
    """The logical blocks [first, stop) that preallocating bytes [off, end) maps.

    With ``keep_size`` they stop at EOF: the format maps no block at or past
    ⌈size / BLOCK_SIZE⌉ (fsck holds extents past EOF for damage) and has no
    unwritten extents, so a preallocation past EOF has nowhere to live."""
    first = off // BLOCK_SIZE
    stop = -(-end // BLOCK_SIZE)
    if keep_size:
        stop = min(stop, -(-di.size // BLOCK_SIZE))
    return first, max(first, stop)


def stays_inline(di: Dinode, end: int, keep_size: bool) -> bool:
    """Whether an inline file preallocated or zeroed up to ``end`` still fits the
    dinode (then it needs no block: its bytes up to the size read as zero)."""
    size = di.size if keep_size else max(di.size, end)
    return bool(di.flags & DF_INLINE) and size <= INLINE_MAX


def fill_need(vol, di: Dinode, off: int, end: int, keep_size: bool) -> int:
    """Data blocks ``fill_step`` would allocate for [off, end): the holes there."""
    if stays_inline(di, end, keep_size):
        return 0
    first, stop = fill_range(di, off, end, keep_size)
    if stop <= first:
        return 0
    if di.flags & DF_INLINE:
        # after the conversion block 0 is mapped when it holds a nonzero byte
        return stop - first - int(first == 0 and any(di.root))
    return sum(n for _lb, pb, n in map_range(vol, di, first, stop - first) if not pb)


def fill_step(vol, di: Dinode, off: int, end: int, pos: int, *, zero: bool,
              keep_size: bool) -> int | None:
    """One bounded step of preallocating bytes [off, end) (fallocate mode 0; with
    ``zero``, FALLOC_FL_ZERO_RANGE): at most FALLOC_STEP logical blocks of the range,
    from block ``pos`` on.

    Holes get new blocks, zeroed on the device: there are no unwritten extents, a
    mapped block reads as what it holds, and a block freed by another file still
    holds that file's bytes.  With ``zero`` the range's bytes in blocks mapped
    before are zeroed in place.  Unless ``keep_size``, the size grows over the new
    blocks (never to more than ``end``), so that every step leaves a consistent file
    (no extent past EOF) and a long preallocation can span many transactions.
    All metadata changes come before the first data write: a step that fails
    (ENOSPC, a lock to gather) has then changed no byte of the file.

    Returns the block the next step starts at, or None when the range is done (the
    caller then sets the final size and the times in the same operation).
    """
    if di.flags & DF_INLINE:
        if stays_inline(di, end, keep_size):
            if zero and off < len(di.root):
                vol.touch(di)
                buf = bytearray(di.root)
                stop_b = min(end, len(buf))
                buf[off:stop_b] = bytes(stop_b - off)
                di.root = bytes(buf)
            return None
        convert_inline(vol, di)
    trim_prealloc(vol, di)      # (a growing size would take them in as they are)
    first, stop = fill_range(di, off, end, keep_size)
    pos = max(pos, first)
    if pos >= stop:
        return None
    wend = min(stop, pos + FALLOC_STEP)
    t = tree(vol, di)
    segs = map_range(vol, di, pos, wend - pos)
    fresh = []
    for lb, pb, n in segs:
        if not pb:
            fresh.extend(_allocate(vol, di, t, lb, n))
    if not keep_size:
        grown = min(end, wend * BLOCK_SIZE)
        if grown > di.size:
            _zero_tail(vol, di, t, di.size)     # see write()
            vol.touch(di)
            di.size = grown
    if zero and any(pb and f & EXT_SHARED for _lb, pb, _n, f in
                    segments(vol, di, pos, wend - pos)):
        # the range's shared blocks get their own copies (the partial edges keep
        # their other bytes) before anything is zeroed in place
        _unshare(vol, di, t, pos, wend - pos,
                 copy={off // BLOCK_SIZE, (end - 1) // BLOCK_SIZE})
        segs = map_range(vol, di, pos, wend - pos)
    # data: the new blocks, then (ZERO_RANGE) the old ones' bytes in the range
    fresh.sort()
    for _lb, pb, n in _coalesce(fresh):
        vol.write_data(pb, bytes(n * BLOCK_SIZE))
    if zero:
        for lb, pb, n in segs:
            if pb:
                _zero_bytes(vol, lb, pb, n, off, end)
    return wend if wend < stop else None


def _zero_bytes(vol, lb: int, pb: int, n: int, off: int, end: int) -> None:
    """Zero the bytes of [off, end) that the mapped run (lb, pb, n) holds, on disk
    (whole blocks written, partial ones read, changed and written back).  The run
    must not be shared (``_unshare`` first)."""
    a = max(off, lb * BLOCK_SIZE)
    b = min(end, (lb + n) * BLOCK_SIZE)
    if a >= b:
        return
    fa, la = a // BLOCK_SIZE, (b - 1) // BLOCK_SIZE      # first and last block touched
    whole_a = fa if a % BLOCK_SIZE == 0 else fa + 1
    whole_b = la + 1 if b % BLOCK_SIZE == 0 else la
    for blk in {fa, la}:
        if whole_a <= blk < whole_b:
            continue
        p = pb + blk - lb
        buf = bytearray(vol.read_data(p, 1))
        s = max(a, blk * BLOCK_SIZE) - blk * BLOCK_SIZE
        e = min(b, (blk + 1) * BLOCK_SIZE) - blk * BLOCK_SIZE
        if any(buf[s:e]):
            buf[s:e] = bytes(e - s)
            vol.write_data(p, buf)
    blk = whole_a
    while blk < whole_b:
        cnt = min(whole_b - blk, FALLOC_STEP)
        vol.write_data(pb + blk - lb, bytes(cnt * BLOCK_SIZE))
        blk += cnt


def punch_range(di: Dinode, off: int, end: int) -> tuple[int, int]:
    """The logical blocks [first, stop) that punching bytes [off, end) frees: the
    blocks wholly inside the range, the last block of the file too when the range
    runs to EOF (its bytes past EOF are not the file's)."""
    first = -(-off // BLOCK_SIZE)
    stop = end // BLOCK_SIZE if end < di.size else -(-di.size // BLOCK_SIZE)
    return first, max(first, stop)


def punch_step(vol, di: Dinode, off: int, end: int, pos: int) -> int | None:
    """One bounded step of punching a hole over bytes [off, end): frees the blocks
    of at most TRUNCATE_STEP extents inside ``punch_range``, from block ``pos`` on.

    Returns the block the next step starts at, or None when nothing is left to free
    (the caller then zeroes the partial edges, ``punch_edges``).  An extent cut in
    the middle becomes two records, which may need a tree block (ENOSPC then)."""
    if not di.flags & DF_EXTENTS:
        return None
    first, stop = punch_range(di, off, end)
    pos = max(pos, first)
    t = tree(vol, di)
    pieces, pos = _unmap(t, pos, stop, limit=TRUNCATE_STEP)
    if not pieces:
        return None
    for _lblk, pblk, n, flags in pieces:
        refcount.release(vol, pblk, n, flags)
        vol.touch(di)
        di.blocks -= n
    return None if pos >= stop else pos


def punch_edges(vol, di: Dinode, off: int, end: int) -> None:
    """Zero the bytes of [off, end) before EOF that the blocks a punch kept hold:
    the partial blocks at the edges of the range (inline: the bytes in the dinode)."""
    end = min(end, di.size)
    if off >= end:
        return
    if di.flags & DF_INLINE:
        if off < len(di.root):
            vol.touch(di)
            buf = bytearray(di.root)
            e = min(end, len(buf))
            buf[off:e] = bytes(e - off)
            di.root = bytes(buf)
        return
    t = tree(vol, di)
    edges = sorted({off // BLOCK_SIZE, (end - 1) // BLOCK_SIZE})
    for blk in edges:
        s = max(off, blk * BLOCK_SIZE) - blk * BLOCK_SIZE
        e = min(end, (blk + 1) * BLOCK_SIZE) - blk * BLOCK_SIZE
        _zero_partial(vol, di, t, blk, s, e)


# -- reflink clones (copy_file_range) ----------------------------------------------------

def clone_step(vol, src: Dinode, dst: Dinode, s_first: int, d_first: int, count: int,
               pos: int) -> int | None:
    """One bounded step of sharing logical blocks [s_first, s_first+count) of ``src``
    with ``dst`` at [d_first, d_first+count) (a reflink clone; ``src`` may be ``dst``
    when the two ranges do not overlap): from block ``pos`` of the range on, at most
    ``CLONE_STEP`` extent records of each file.

    What ``dst`` mapped there loses its reference (blocks freed with their last one);
    the source's extent records there get ``SHARED`` (whole records); ``dst`` maps
    the same blocks, ``SHARED``, and their counts go up by one.  Holes stay holes.
    ``dst``'s size grows over the range step by step (never an extent past EOF), so a
    crash between steps leaves a shorter, consistent copy.  Both files are extent
    files (the caller copies an inline source as data).

    Returns the ``pos`` of the next step, or None once the range is done.
    """
    if dst.flags & DF_INLINE:
        convert_inline(vol, dst)
    trim_prealloc(vol, dst)     # (the growing size would take them in as they are)
    s_lo, s_end = s_first + pos, s_first + count
    delta = d_first - s_first
    ts, td = tree(vol, src), tree(vol, dst)
    # the window of this step: up to CLONE_STEP records of the source ...
    stop, n = s_end, 0
    fl = ts.floor(s_lo)
    if fl is not None and fl[0] < s_lo and fl[0] + fl[1][1] > s_lo:
        n += 1
    for lb, _v in ts.items_from(s_lo):
        if lb >= s_end:
            break
        if n == CLONE_STEP:
            stop = lb
            break
        n += 1
    # ... and of the destination's records it replaces
    d_lo, d_stop, n = s_lo + delta, stop + delta, 0
    fl = td.floor(d_lo)
    if fl is not None and fl[0] < d_lo and fl[0] + fl[1][1] > d_lo:
        n += 1
    for lb, _v in td.items_from(d_lo):
        if lb >= d_stop:
            break
        if n == CLONE_STEP:
            d_stop = lb
            stop = lb - delta
            break
        n += 1
    vol.touch(dst)
    if d_stop * BLOCK_SIZE > dst.size:
        if dst.size // BLOCK_SIZE < d_lo:
            _zero_tail(vol, dst, td, dst.size)      # see write(); else replaced below
        dst.size = d_stop * BLOCK_SIZE
    pieces, _ = _unmap(td, d_lo, d_stop)
    _release(vol, dst, pieces)
    s_eof = -(-src.size // BLOCK_SIZE)
    for lb, pb, ln, f in segments(vol, src, s_lo, stop - s_lo):
        # (the source may have shrunk since the copy was planned, and grown blocks
        # mapped ahead of its EOF: those are no bytes of it, they stay holes here)
        ln = min(ln, s_eof - lb)
        if not pb or ln <= 0:
            continue
        if not f & EXT_SHARED:
            rlb, (rpb, rn, rf) = ts.floor(lb)
            ts.replace(rlb, rlb, (rpb, rn, rf | EXT_SHARED))
        refcount.share(vol, pb, ln)
        _map_new(td, lb + delta, pb, ln, EXT_SHARED)
        dst.blocks += ln
    return stop - s_first if stop < s_end else None


# -- SEEK_DATA and SEEK_HOLE ---------------------------------------------------------------

def seek_data(vol, di: Dinode, off: int) -> int | None:
    """The first offset at or after ``off`` (< size) inside a mapped block, or None
    when no data follows before EOF.  An inline file is all data."""
    if off >= di.size:
        return None
    if not di.flags & DF_EXTENTS:
        return off
    blk = off // BLOCK_SIZE
    rec = _extent_at(vol, di, blk)
    if rec is not None and rec[0] + rec[1][1] > blk:
        return off
    nxt = next(tree(vol, di).items_from(blk + 1), None)
    if nxt is None or nxt[0] * BLOCK_SIZE >= di.size:
        return None
    return nxt[0] * BLOCK_SIZE


def seek_hole(vol, di: Dinode, off: int) -> int:
    """The first offset at or after ``off`` (< size) in a hole, EOF counting as one:
    the size when the file is data from ``off`` to its end.  Granularity: blocks."""
    if not di.flags & DF_EXTENTS:
        return di.size
    blk = off // BLOCK_SIZE
    rec = _extent_at(vol, di, blk)
    if rec is None or rec[0] + rec[1][1] <= blk:
        return off
    stop = rec[0] + rec[1][1]
    # logically adjacent extents (physically apart) are one stretch of data
    for lb, (_pb, n, _f) in tree(vol, di).items_from(stop):
        if lb != stop:
            break
        stop += n
    return min(stop * BLOCK_SIZE, di.size)
