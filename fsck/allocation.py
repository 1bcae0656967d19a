"""Layer 3, Allocation: group headers and bitmaps, the scan of every dinode and tree,
the bitmaps and counters against the map of referenced blocks.

The scan (``scan_metadata``) repairs nothing: it builds ``State.claims`` and the
inode records, and keeps the problems it meets for layers 4 and 5.
"""

from __future__ import annotations

import re
import stat as S
from itertools import filterfalse
from operator import attrgetter

from clusterfs.errors import CorruptBlock
from clusterfs.ondisk import blockhdr
from clusterfs.ondisk.blockhdr import BLOCK_SIZE, MAGIC, BlockType
from clusterfs.ondisk.format import (BITMAP_BYTES, BLOCKS_PER_BITMAP, DF_DIRTREE,
                                     DF_EXTENTS, DINODE, EXT_FLAGS, FREE, STATE_NAMES,
                                     UNLINKED, Bitmap, Dinode, RgrpHeader, expand_bits)

from . import allocator, salvage
from .shared import decode_rgrp
from .claims import (C_DATA, C_DEFER, C_DINODE, C_GROUP, C_NONE, C_UNLINKED, EXPECT,
                     plan_extents, resolve_extents)
from .device import read_blocks
from .parallel import decoded_dinodes
from .records import Rec, dir_recs, entry_inos
from .treewalk import scan_trees

_INODE_STATES = re.compile(b"[" + bytes([UNLINKED, DINODE]) + b"]")
_NODES = attrgetter("nodes")


def check_rgrp_headers(s) -> None:
    """Read every group's header and bitmap blocks (one read per group)."""
    rep, sb = s.report, s.sb
    nbm = sb.bitmap_blocks
    rep.progress.start("Reading group bitmaps", sb.rgrp_count)
    for rg in range(sb.rgrp_count):
        start, length = s.gstart[rg], s.glen[rg]
        data = s.read(start, 1 + nbm)
        blocks = [None] * (1 + nbm)
        if data is None:
            for k in range(1 + nbm):
                blocks[k] = s.read(start + k)
        else:
            mv = memoryview(data)
            for k in range(1 + nbm):
                blocks[k] = mv[k * BLOCK_SIZE:(k + 1) * BLOCK_SIZE]
        hdr = None
        if blocks[0] is not None:
            try:
                hdr, notes = salvage.decode_simple(blocks[0], start, BlockType.RGRP,
                                                   decode_rgrp(s, rg))
                if notes:
                    s.hdr_problem[rg] = ", ".join(notes)
            except CorruptBlock as e:
                s.hdr_problem[rg] = e.reason
        else:
            s.hdr_problem[rg] = "unreadable"
        if hdr is not None and (hdr.index != rg or hdr.length != length or
                                hdr.bitmap_blocks != nbm):
            s.hdr_problem[rg] = (f"fields disagree with the superblock (index "
                                 f"{hdr.index}, length {hdr.length}, bitmap blocks "
                                 f"{hdr.bitmap_blocks})")
        if hdr is None or rg in s.hdr_problem:
            igen = hdr.igeneration if hdr is not None else 1
            hdr = RgrpHeader(start, rg, start, length, nbm, free=0,
                             igeneration=igen, seq=hdr.seq if hdr else 1)
        s.hdrs.append(hdr)
        bms = []
        ok = True
        for j in range(nbm):
            bno = start + 1 + j
            bm = None
            if blocks[1 + j] is not None:
                try:
                    bm, notes = salvage.decode_simple(
                        blocks[1 + j], bno, BlockType.BITMAP,
                        lambda b, n, j=j: Bitmap.decode(b, n, rg, j * BLOCKS_PER_BITMAP))
                    if notes:
                        s.bm_problem[(rg, j)] = ", ".join(notes)
                except CorruptBlock as e:
                    s.bm_problem[(rg, j)] = e.reason
            else:
                s.bm_problem[(rg, j)] = "unreadable"
            if bm is None:
                ok = False
                bm = Bitmap(bno, rg, j * BLOCKS_PER_BITMAP,
                            bytearray(BITMAP_BYTES))
            bms.append(bm)
        s.bms.append(bms)
        bits = b"".join(bytes(bm.bits) for bm in bms)
        st = expand_bits(bits, length)
        if not ok:
            # entries of unreadable bitmap blocks are unknown (0xff)
            for j in range(nbm):
                if (rg, j) in s.bm_problem and \
                        not s.bm_problem[(rg, j)].startswith(("crc", "bad magic",
                                                              "type", "header")):
                    lo = j * BLOCKS_PER_BITMAP
                    hi = min(length, lo + BLOCKS_PER_BITMAP)
                    st[lo:hi] = b"\xff" * (hi - lo)
        s.states.append(st)
        # the group's own header and bitmap blocks
        s.claims[start:start + 1 + nbm] = bytes([C_GROUP]) * (1 + nbm)
        rep.progress.step()
    for rg, why in sorted(s.hdr_problem.items()):
        if rep.problem("rgrp-header", f"resource group {rg} header (block "
                       f"{s.gstart[rg]}) is damaged: {why}",
                       "rebuild it from the superblock and the bitmap", safe=False,
                       block=s.gstart[rg]):
            s.dirty_hdr.add(rg)
    for (rg, j), why in sorted(s.bm_problem.items()):
        unknown = s.states[rg][min(j * BLOCKS_PER_BITMAP, s.glen[rg] - 1)] == 0xFF
        if rep.problem("bitmap-block", f"bitmap block {j} of resource group {rg} "
                       f"(block {s.gstart[rg] + 1 + j}) is damaged: {why}",
                       "rebuild it from the blocks found in use" if unknown else
                       "rewrite it (its entries are checked below)", safe=False,
                       block=s.gstart[rg] + 1 + j):
            s.dirty_bm.add((rg, j))


# -- the metadata scan ------------------------------------------------------------------

def scan_metadata(s) -> None:
    """Read every dinode and tree; build the map of referenced blocks.

    Nothing is repaired here: the problems found are kept for layers 4 and 5.
    """
    rep, sb = s.report, s.sb
    todo = []
    for rg in range(sb.rgrp_count):
        base = s.gstart[rg]
        st = s.states[rg]
        todo.extend(base + m.start() for m in _INODE_STATES.finditer(st))
    s.stats["dinodes"] = len(todo)
    rep.progress.start("Reading dinodes", len(todo))
    claims = s.claims
    step = rep.progress.step
    inodes, dups, dir_inos = s.inodes, s.dups, s.dir_inos
    suspicious = s.suspicious
    plan, in_data = plan_extents, s.in_data
    is_dir = S.S_IFDIR
    slow = []           # dinodes whose trees have nodes, damaged ones, xattr blocks
    for i, (bno, di, buf) in enumerate(decoded_dinodes(s.dev, todo, Dinode)):
        if not i & 1023:
            step(1024)
        if di is None:                  # damaged or unreadable: salvage
            rec = _load_inode(s, bno, buf)
            if rec is not None:
                slow.append(rec)
            continue
        rec = inodes[bno] = Rec(di, ())
        if claims[bno] == C_DATA:
            dups.add(bno)
        claims[bno] = C_DINODE if di.nlink else C_UNLINKED
        flags = di.flags
        if flags & DF_DIRTREE or di.mode & 0o170000 == is_dir:
            dir_inos.add(bno)
        if flags & (DF_EXTENTS | DF_DIRTREE):
            root = di.root
            if root.level or di.xattr_block:
                slow.append(rec)
                continue
            keys, vals = root.keys, root.vals
            if flags & DF_EXTENTS and len(keys) == 1:
                # one extent, the common file: plan_extents's first case, inline
                lblk = keys[0]
                pblk, n, eflags = vals[0]
                if n and not eflags & ~EXT_FLAGS and \
                        lblk + n <= di.map_end() and \
                        in_data(pblk, n) and claims.count(0, pblk, pblk + n) == n:
                    claims[pblk:pblk + n] = b"\x01" * n
                    rec.ext = [[lblk, pblk, n, eflags]]
                    continue
            rec.items = list(zip(keys, vals))   # decode checked the order
            if flags & DF_EXTENTS:
                plan(s, rec, suspicious)
        elif di.xattr_block:
            slow.append(rec)
    # where a bitmap block is lost, every block is looked at for dinodes (freed
    # dinodes have link count 0 and are not taken)
    unknown = []
    for rg in range(sb.rgrp_count):
        base = s.gstart[rg]
        for m in re.finditer(rb"\xff+", s.states[rg]):
            unknown.extend(b for b in range(base + m.start(), base + m.end())
                           if s.in_data(b) and not claims[b])
    if unknown:
        rep.progress.start("Searching for dinodes", len(unknown))
        for bno, buf in read_blocks(s.dev, unknown):
            rep.progress.step()
            if buf is not None and blockhdr.header(buf)[:2] == (MAGIC, BlockType.DINODE):
                rec = _load_inode(s, bno, buf, discovered=True)
                if rec is not None:
                    slow.append(rec)
    root = sb.root_ino
    if root not in s.inodes and root not in s.bad_inodes and \
            s.in_data(root) and not claims[root]:
        buf = s.read(root)
        if buf is not None:
            rec = _load_inode(s, root, buf, discovered=True)
            if rec is not None:
                slow.append(rec)
    # the other trees, now that every dinode the bitmap marks holds its block
    rep.progress.start("Reading trees", len(slow))
    for rec in sorted(slow, key=lambda r: r.di.bno):
        step()
        scan_trees(s, rec)
        if rec.di.flags & DF_EXTENTS:
            plan(s, rec, suspicious)
    # dinodes reached by directory entries that the bitmap does not mark
    _discover(s)
    # extents held back: settled once every plausible extent holds its blocks
    for rec in suspicious:
        resolve_extents(s, rec)
    # garbage dinodes whose block turns out to hold something else
    for ino in list(s.bad_inodes):
        if claims[ino] != C_DEFER:
            del s.bad_inodes[ino]
    s.stats["tree_nodes"] = sum(map(len, map(_NODES, s.inodes.values())))
    s.stats["used_blocks"] = len(claims) - claims.count(0)


def _load_inode(s, bno: int, buf, discovered: bool = False) -> Rec | None:
    if buf is None:
        s.bad_inodes[bno] = "unreadable"
        if not s.claims[bno]:
            s.claims[bno] = C_DEFER
        return None
    try:
        di, notes = Dinode.decode(buf, bno), []
    except CorruptBlock:
        try:
            di, notes = salvage.decode_dinode(buf, bno)
        except CorruptBlock as e:
            if discovered:
                return None
            s.bad_inodes[bno] = e.reason
            if not s.claims[bno]:
                s.claims[bno] = C_DEFER
            return None
    if discovered and (notes or di.nlink == 0):
        return None
    rec = Rec(di, notes)
    s.inodes[bno] = rec
    if di.flags & DF_DIRTREE or di.mode & 0o170000 == S.S_IFDIR:
        s.dir_inos.add(bno)
    if s.claims[bno] == C_DATA:
        s.dups.add(bno)
    s.claims[bno] = C_DINODE if di.nlink else C_UNLINKED
    return rec


def _discover(s) -> None:
    """Follow directory entries to dinodes the bitmap does not mark as in use."""
    queue = dir_recs(s)
    while queue:
        rec = queue.pop()
        for ino in filterfalse(s.inodes.__contains__,
                               sorted(set(entry_inos(rec.items)))):
            if ino in s.bad_inodes or not s.in_data(ino):
                continue
            if s.claims[ino] != C_NONE:
                continue
            rg = s.sb.rgrp_of(ino)
            if s.states[rg][ino - s.gstart[rg]] in (UNLINKED, DINODE):
                continue
            buf = s.read(ino)
            new = _load_inode(s, ino, buf, discovered=True) if buf is not None else None
            if new is None:
                continue
            scan_trees(s, new)
            if new.di.flags & DF_EXTENTS:
                plan_extents(s, new, s.suspicious)
            if new.di.flags & DF_DIRTREE:
                queue.append(new)


# -- bitmaps against the map ----------------------------------------------------------

def check_bitmaps(s) -> None:
    rep, sb = s.report, s.sb
    claims = s.claims
    rep.progress.start("Comparing bitmaps", sb.rgrp_count)
    for rg in range(sb.rgrp_count):
        base, length = s.gstart[rg], s.glen[rg]
        exp = claims[base:base + length].translate(EXPECT)
        act = s.states[rg]
        if exp != act:
            _diff_group(s, rg, exp, act)
        _check_bitmap_tail(s, rg)
        rep.progress.step()


def _diff_group(s, rg: int, exp: bytes, act: bytearray) -> None:
    rep = s.report
    base, length = s.gstart[rg], s.glen[rg]
    runs = []       # (kind, first entry, count, want)
    CH = 1024
    for lo in range(0, length, CH):
        if exp[lo:lo + CH] == act[lo:lo + CH]:
            continue
        for e in range(lo, min(length, lo + CH)):
            want, have = exp[e], act[e]
            if want == have:
                continue
            if want == 0xFF:
                if have == 0xFF:
                    act_fix = FREE       # unknown entry of a lost bitmap block
                    kind = "unknown"
                else:
                    continue             # held by damaged metadata: layer 4 frees it
            elif want in (UNLINKED, DINODE) and have in (UNLINKED, DINODE):
                continue                 # settled with the link counts (layer 5)
            else:
                act_fix = want
                if have == 0xFF:
                    kind = "unknown"
                elif want == FREE:
                    kind = "leaked"
                elif have == FREE:
                    kind = "in-use-free"
                else:
                    kind = "wrong-state"
            if runs and runs[-1][0] == kind and runs[-1][1] + runs[-1][2] == e and \
                    runs[-1][3] == act_fix and runs[-1][4] == have:
                runs[-1][2] += 1
            else:
                runs.append([kind, e, 1, act_fix, have])
    for kind, e, n, want, have in runs:
        first = base + e
        rng = f"block {first}" if n == 1 else f"blocks {first}-{first + n - 1}"
        if kind == "unknown":
            if s.fixing:
                allocator.set_states(s, rg, e, n, want)
            continue
        if kind == "leaked":
            msg = (f"{rng} marked {STATE_NAMES[have]} but referenced by nothing "
                   f"(leaked)")
            fix, code = "mark free", "leaked-blocks"
        elif kind == "in-use-free":
            msg = f"{rng} in use ({STATE_NAMES[want]}) but marked free"
            fix, code = f"mark {STATE_NAMES[want]}", "referenced-free-blocks"
        else:
            msg = f"{rng} marked {STATE_NAMES[have]}, in use as {STATE_NAMES[want]}"
            fix, code = f"mark {STATE_NAMES[want]}", "wrong-block-state"
        if rep.problem(code, msg, fix, safe=True, block=first, count=n):
            allocator.set_states(s, rg, e, n, want)
        elif want != FREE:
            s.alloc_ok = False     # the allocator could hand these out again


def _check_bitmap_tail(s, rg: int) -> None:
    """Entries past the end of the group must be zero."""
    length = s.glen[rg]
    bad = False
    for j, bm in enumerate(s.bms[rg]):
        first = max(0, length - j * BLOCKS_PER_BITMAP)
        if first >= BLOCKS_PER_BITMAP:
            continue
        if not bm.free_from(first):
            bad = True
    if not bad:
        return
    if s.report.problem("bitmap-tail", f"bitmap of resource group {rg} marks blocks "
                        f"past the end of the group", "clear them", safe=True,
                        block=s.gstart[rg] + 1):
        for j, bm in enumerate(s.bms[rg]):
            first = max(0, length - j * BLOCKS_PER_BITMAP)
            if first < BLOCKS_PER_BITMAP:
                bm.set_run(first, BLOCKS_PER_BITMAP - first, FREE)
                s.dirty_bm.add((rg, j))


def check_rgrp_counts(s) -> None:
    rep = s.report
    for rg in range(s.sb.rgrp_count):
        st = s.states[rg]
        hdr = s.hdrs[rg]
        free, dinodes, unlinked = st.count(FREE), st.count(DINODE), st.count(UNLINKED)
        if rg in s.hdr_problem:
            hdr.free, hdr.dinodes, hdr.unlinked = free, dinodes, unlinked
            continue
        if (hdr.free, hdr.dinodes, hdr.unlinked) != (free, dinodes, unlinked):
            if st.count(0xFF):
                hdr.free, hdr.dinodes, hdr.unlinked = free, dinodes, unlinked
                continue
            msg = (f"resource group {rg} counts free {hdr.free}, dinodes "
                   f"{hdr.dinodes}, unlinked {hdr.unlinked}; its bitmap has "
                   f"{free}, {dinodes}, {unlinked}")
            if rep.problem("rgrp-counts", msg, "fix the counts", safe=True,
                           block=s.gstart[rg]):
                s.dirty_hdr.add(rg)
            hdr.free, hdr.dinodes, hdr.unlinked = free, dinodes, unlinked
    if s.fixing:
        allocator.flush(s)


def summary(s) -> str:
    st = s.stats
    return (f"{st.get('dinodes', 0)} dinodes, {st.get('tree_nodes', 0)} tree nodes, "
            f"{st.get('used_blocks', 0)} blocks referenced")
