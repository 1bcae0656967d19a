"""Layer 4, Inodes and extents: dinode checksums and fields, extent trees, extents,
doubly-claimed blocks (each claimant gets its own copy), xattr blocks, sizes, block
counts, generations.

Each pass goes over every inode once in memory order for the common case (nothing to
say) and looks at the few others in inode order.
"""

from __future__ import annotations

import bisect
import stat as S
from itertools import islice
from operator import attrgetter, lt

from clusterfs.errors import CorruptBlock
from clusterfs.ondisk.blockhdr import BLOCK_SIZE, BlockType
from clusterfs.ondisk.format import (DF_DIRTREE, DF_EXTENTS, DF_INLINE, DF_PREALLOC, EXTENT,
                                     MAX_FILE_BLOCKS, PREALLOC_SINCE, SYMLINK_MAX, USED,
                                     XattrBlock)

from . import allocator, salvage
from .claims import C_DATA, C_DEFER
from .records import Rec
from .repairs import free_deferred, free_inode, rebuild_tree, recount_blocks

_VALID_TYPES = {S.S_IFREG, S.S_IFDIR, S.S_IFLNK, S.S_IFIFO, S.S_IFSOCK, S.S_IFCHR,
                S.S_IFBLK}
_BNO, _GEN = attrgetter("di.bno"), attrgetter("di.generation")


def check_dinodes(s) -> None:
    rep = s.report
    # dinodes that hold nothing credible
    for ino in sorted(s.bad_inodes):
        why = s.bad_inodes[ino]
        if rep.problem("bad-dinode", f"inode {ino}: dinode is damaged beyond use "
                       f"({why})", "clear it (its directory entries are removed "
                       "below)", safe=False, ino=ino, block=ino):
            if s.claims[ino] == C_DEFER:
                allocator.release(s, ino)
            allocator.flush(s)
    # salvaged or damaged-in-place dinodes and their fields
    files = dirs = 0
    rep.progress.start("Checking dinodes", len(s.inodes))
    fixing = s.fixing
    look = []           # the records with more to look at than the common case
    for rec in s.inodes.values():           # in memory order (about inode order)
        di = rec.di
        mode = di.mode & 0o170000
        if rec.notes or (rec.dirty and fixing) or not di.generation or di.rdev or (
                not (mode == S.S_IFDIR and not di.size) if di.flags & DF_DIRTREE
                else mode != S.S_IFREG):
            look.append(rec)
        elif mode == S.S_IFDIR:     # the common case: nothing for _check_fields
            dirs += 1
        else:
            files += 1
    rep.progress.step(len(s.inodes))
    for rec in sorted(look, key=_BNO):
        di = rec.di
        ino = di.bno
        if rec.notes:
            detail = "; ".join(rec.notes)
            code = "dinode-checksum" if detail == "crc32c mismatch" else "dinode-damaged"
            if rep.problem(code, f"inode {ino}: dinode block damaged ({detail})",
                           "rewrite it with what could be salvaged", safe=False,
                           ino=ino, block=ino):
                rec.dirty = True
        if _check_fields(s, rec) == "clear":
            free_inode(s, rec)
            del s.inodes[ino]
            s.bad_inodes[ino] = "cleared"
            continue
        if di.mode & 0o170000 == S.S_IFDIR:
            dirs += 1
        else:
            files += 1
        if rec.dirty and s.fixing and not (di.flags & (DF_EXTENTS | DF_DIRTREE)
                                           and rec.tree_bad):
            s.write_obj(di)
            rec.dirty = False
    s.stats["files"], s.stats["dirs"] = files, dirs


def _check_fields(s, rec: Rec) -> str | None:
    """A dinode's type, size, device number and generation (check_dinodes passes
    the common case over before calling this)."""
    di = rec.di
    rep = s.report
    ino = di.bno
    typ = S.S_IFMT(di.mode)
    kind = di.flags & (DF_INLINE | DF_EXTENTS | DF_DIRTREE)
    want = typ
    if kind == DF_DIRTREE:
        want = S.S_IFDIR
    elif typ == S.S_IFDIR or typ not in _VALID_TYPES:
        want = S.S_IFREG
    if want != typ:
        if rep.problem("bad-mode", f"inode {ino}: file type {typ >> 12:o} does not "
                       f"fit its data ({'directory' if kind == DF_DIRTREE else 'file data'})",
                       f"make it a {'directory' if want == S.S_IFDIR else 'regular file'}",
                       ino=ino):
            di.mode = want | (di.mode & 0o7777)
            rec.dirty = True
    if S.S_ISDIR(di.mode) and di.size:
        if rep.problem("dir-size", f"inode {ino}: directory has size {di.size}",
                       "set it to 0", safe=True, ino=ino):
            di.size = 0
            rec.dirty = True
    if S.S_ISLNK(di.mode) and not 0 < di.size <= SYMLINK_MAX:
        if rep.problem("symlink-size", f"inode {ino}: symbolic link of length "
                       f"{di.size}", "clear it (its directory entries are removed "
                       "below)", ino=ino):
            return "clear"
    if not S.S_ISCHR(di.mode) and not S.S_ISBLK(di.mode) and di.rdev:
        if rep.problem("rdev", f"inode {ino}: device number {di.rdev:#x} on a "
                       f"non-device", "clear it", safe=True, ino=ino):
            di.rdev = 0
            rec.dirty = True
    if di.generation == 0:
        if rep.problem("generation", f"inode {ino}: generation 0", "set it to 1",
                       safe=True, ino=ino):
            di.generation = 1
            rec.dirty = True
    return None


def check_extents(s) -> None:
    """Extent trees: structure, records, rebuilt where damaged."""
    rep = s.report
    n_ext = 0
    look = []
    for rec in s.inodes.values():           # in memory order (about inode order)
        if not rec.di.flags & DF_EXTENTS:
            continue
        if not (rec.tree_issues or rec.ext_issues or rec.tree_bad):
            n_ext += len(rec.ext)           # the common case: nothing to say
        else:
            look.append(rec)
    for rec in sorted(look, key=_BNO):
        ino = rec.di.bno
        tree_msgs = [m for c, m in rec.tree_issues if c == "tree"]
        fix = False
        for m in tree_msgs:
            fix |= rep.problem("extent-tree", f"inode {ino}: {m}",
                               "rebuild the extent tree", safe=False, ino=ino)
        for m in rec.ext_issues:
            fix |= rep.problem("bad-extent", f"inode {ino}: {m}", "rebuild the extent "
                               "tree without it", safe=False, ino=ino)
        n_ext += len(rec.ext)
        if rec.tree_bad and not tree_msgs and not rec.ext_issues:
            fix = s.fixing              # a salvaged root (approved with the dinode)
        if fix:
            rebuild_tree(s, rec, EXTENT, [(l, (p, n, f)) for l, p, n, f in rec.ext])
            free_deferred(s, rec)
    s.stats["extents"] = n_ext


# -- doubly-claimed blocks (e2fsck pass 1b) -------------------------------------------

def check_dup_blocks(s) -> None:
    rep = s.report
    if not s.dups:
        return
    dups = s.dups
    # who claims them?  metadata (the block's claim code) keeps its block
    claimants: dict[int, list[tuple[int, int]]] = {}   # block -> [(ino, ext index)]
    for ino in sorted(s.inodes):
        rec = s.inodes[ino]
        if not rec.ext:
            continue
        for i, (lb, pb, n, _f) in enumerate(rec.ext):
            if n > 64 and not any(pb <= d < pb + n for d in dups):
                continue
            for b in range(pb, pb + n):
                if b in dups:
                    claimants.setdefault(b, []).append((ino, i))
    clone: dict[int, set[int]] = {}     # ino -> its dup blocks to copy
    for b in sorted(dups):
        cl = claimants.get(b, [])
        keep_first = s.claims[b] == C_DATA
        for k, (ino, _i) in enumerate(cl):
            if k == 0 and keep_first:
                continue
            clone.setdefault(ino, set()).add(b)
    for ino in sorted(clone):
        rec = s.inodes[ino]
        blocks = sorted(clone[ino])
        others = sorted({o for b in blocks for o, _ in claimants.get(b, []) if o != ino}
                        | {-1 for b in blocks if s.claims[b] != C_DATA})
        who = ", ".join("metadata" if o < 0 else f"inode {o}" for o in others) or \
            "itself"
        msg = (f"inode {ino}: {len(blocks)} block(s) also claimed by {who} "
               f"(first {blocks[0]})")
        if rep.problem("dup-blocks", msg, "give this file its own copy", safe=False,
                       ino=ino, block=blocks[0], count=len(blocks)):
            if not s.alloc_ok or not _clone_blocks(s, rec, set(blocks)):
                rep.unfix(why="no space for the copy" if s.alloc_ok else
                          "allocation map not trusted")


def _clone_blocks(s, rec: Rec, blocks: set[int]) -> bool:
    ino = rec.di.bno
    new_ext = []
    copies = []
    try:
        for lb, pb, n, f in rec.ext:
            k = 0
            while k < n:
                dup = (pb + k) in blocks
                j = k
                while j < n and ((pb + j) in blocks) == dup:
                    j += 1
                if not dup:
                    new_ext.append([lb + k, pb + k, j - k, f])
                else:
                    off = 0
                    for nb, nn in allocator.alloc(s, ino, j - k, USED, C_DATA):
                        copies.append((pb + k + off, nb, nn))
                        new_ext.append([lb + k + off, nb, nn, 0])
                        off += nn
                k = j
    except OSError:
        for _src, nb, nn in copies:
            allocator.release(s, nb, nn)
        return False
    allocator.flush(s)
    for src, dst, n in copies:
        for i in range(0, n, 256):
            c = min(256, n - i)
            data = s.read(src + i, c)
            if data is None:
                data = b"".join(s.read(src + i + t) or bytes(BLOCK_SIZE)
                                for t in range(c))
            s.write(dst + i, data)
    s.real.flush()
    rec.ext = new_ext
    ok = rebuild_tree(s, rec, EXTENT, [(l, (p, n, f)) for l, p, n, f in new_ext])
    for b in blocks:
        s.dups.discard(b)
    return ok


def check_xattr_blocks(s) -> None:
    rep = s.report
    for rec in sorted((r for r in s.inodes.values() if r.tree_issues), key=_BNO):
        ino = rec.di.bno
        for code, m in rec.tree_issues:
            if code != "xattr-block":
                continue
            if rec.xattr_ok:
                if rep.problem("xattr-block", f"inode {ino}: {m}", "rewrite it",
                               safe=False, ino=ino):
                    _rewrite_xattr_block(s, rec)
                continue
            if rep.problem("xattr-block", f"inode {ino}: {m}",
                           "drop the extended attributes stored there", safe=False,
                           ino=ino):
                rec.di.xattr_block = 0
                recount_blocks(rec)
                s.write_obj(rec.di)
                free_deferred(s, rec)


def _rewrite_xattr_block(s, rec: Rec) -> None:
    bno = rec.di.xattr_block
    buf = s.read(bno)
    try:
        xb, _ = salvage.decode_simple(buf, bno, BlockType.XATTR, XattrBlock.decode)
    except CorruptBlock:
        return
    s.write_obj(xb)


def check_sizes(s) -> None:
    rep = s.report
    fixing = s.fixing
    look = []
    prealloc = False        # a file has DF_PREALLOC
    for rec in s.inodes.values():           # in memory order (about inode order)
        di = rec.di
        ext = rec.ext
        if di.flags & DF_PREALLOC:
            prealloc = True
        if len(ext or ()) == 1 and di.flags & DF_EXTENTS and not rec.nodes and \
                not di.xattr_block and not (rec.dirty and fixing):
            # the common case, one extent: the checks below in short
            lblk, _pblk, n, _f = ext[0]
            if di.blocks == n and lblk + n <= di.map_end() and \
                    di.size <= MAX_FILE_BLOCKS * BLOCK_SIZE:
                continue
        look.append(rec)
    for rec in sorted(look, key=_BNO):
        di = rec.di
        ino = di.bno
        changed = False
        if di.flags & DF_EXTENTS and rec.ext is not None:
            end = max((e[0] + e[2] for e in rec.ext), default=0)
            if di.size > MAX_FILE_BLOCKS * BLOCK_SIZE:
                if rep.problem("bad-size", f"inode {ino}: size {di.size} is impossible",
                               f"set it to {end * BLOCK_SIZE}", ino=ino):
                    di.size = end * BLOCK_SIZE
                    changed = True
            elif di.map_end() < end:
                if rep.problem("bad-size", f"inode {ino}: size {di.size} ends before "
                               f"its last mapped block ({end - 1})",
                               f"set it to {end * BLOCK_SIZE}", ino=ino):
                    di.size = end * BLOCK_SIZE
                    changed = True
        want = len(rec.nodes) + (1 if di.xattr_block else 0)
        if di.flags & DF_EXTENTS and rec.ext is not None:
            want += sum(e[2] for e in rec.ext)
        if di.blocks != want:
            if rep.problem("block-count", f"inode {ino}: block count {di.blocks}, "
                           f"owns {want}", "fix it", safe=True, ino=ino):
                di.blocks = want
                changed = True
        if (changed or rec.dirty) and s.fixing and not (rec.tree_bad and
                                                       di.flags & DF_DIRTREE):
            s.write_obj(di)
            rec.dirty = False
    # (the revision is raised before the first block is mapped past EOF)
    if prealloc and s.sb.format_rev < PREALLOC_SINCE and \
            rep.problem("revision", f"files have blocks mapped past EOF (DF_PREALLOC) "
                        f"but the volume has format revision {s.sb.format_rev}",
                        f"raise it to {PREALLOC_SINCE}", safe=True, block=0):
        s.sb.format_rev = PREALLOC_SINCE
        s.write_primary = s.write_backup = True


def check_generations(s) -> None:
    rep = s.report
    top: dict[int, int] = {}
    inos = list(s.inodes)                   # in memory order: inode order but for
    gens = list(map(_GEN, s.inodes.values()))   # inodes found or made later
    if not all(map(lt, inos, islice(inos, 1, None))):
        inos, gens = map(list, zip(*sorted(zip(inos, gens))))
    # each group's inodes are a slice of the sorted list: its largest generation
    for rg in range(s.sb.rgrp_count):
        lo = bisect.bisect_left(inos, s.gstart[rg])
        hi = bisect.bisect_left(inos, s.gstart[rg] + s.glen[rg], lo)
        if hi > lo:
            top[rg] = max(gens[lo:hi])
    for rg, g in sorted(top.items()):
        hdr = s.hdrs[rg]
        if hdr.igeneration <= g:
            if rep.problem("igeneration", f"resource group {rg} would give generation "
                           f"{hdr.igeneration} to its next inode, but inode "
                           f"generation {g} is in use", f"set it to {g + 1}",
                           safe=True, block=s.gstart[rg]):
                hdr.igeneration = g + 1
                s.dirty_hdr.add(rg)
    if s.fixing:
        allocator.flush(s)


def summary(s) -> str:
    st = s.stats
    return (f"{st.get('files', 0)} files, {st.get('dirs', 0)} directories, "
            f"{st.get('extents', 0)} extents")
