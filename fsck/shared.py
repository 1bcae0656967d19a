"""Shared blocks and refcount trees (format revision 3).

A data block mapped by k >= 2 extent records must have ``SHARED`` on every one of
them and count k in its group's refcount tree; the tree names no other block (a
record for a block mapped once, or by nothing, is stale).  Layer 3 reads every
group's refcount tree (``scan_refcount_trees``: its nodes are claimed like any tree
node, its records kept) and the metadata scan notes the data ranges claimed more
than once (``State.multi``).  Layer 4 (``check_shared_blocks``) counts the references
of those ranges from the extents that survived the earlier repairs, and

* marks ``SHARED`` on extents that map blocks others map too without it (blocks
  cross-linked by damage: sharing them, copy-on-write, keeps what each file reads
  now, as a copy would, without the space);
* compares the counts with the trees and rewrites a group's tree from the counts
  when they differ or the tree is damaged;
* raises a revision-2 volume that holds shared blocks to revision 3.

After it, ``State.refs`` holds every group's counts: freeing an inode later
(``release_data``) drops one reference to each of its blocks and frees those that
had no other; the trees of the groups it touched are rewritten by ``flush``.
"""

from __future__ import annotations

import bisect

from clusterfs.errors import CorruptBlock
from clusterfs.fs.refcount import adjust
from clusterfs.ondisk import blockhdr
from clusterfs.ondisk.blockhdr import BlockType
from clusterfs.ondisk.format import (DF_EXTENTS, EXTENT, EXT_SHARED, MAX_DEPTH, REFCOUNT,
                                     REFROOT_OFF, SHARED_SINCE, RgrpHeader)

from . import allocator, salvage
from .claims import C_DATA, C_DEFER, C_META, META_CODES, claim_meta

# -- layer 3: reading the trees ---------------------------------------------------------

def decode_rgrp(s, rg: int):
    """A decoder of group ``rg``'s header that keeps the header when only its
    refcount root is damaged (the root is then read as empty, and the tree is
    rebuilt in layer 4)."""
    def decode(buf, bno):
        try:
            return RgrpHeader.decode(buf, bno)
        except CorruptBlock as e:
            if not e.reason.startswith("refcount root"):
                raise
            copy = bytearray(buf)
            copy[REFROOT_OFF:] = bytes(len(copy) - REFROOT_OFF)
            blockhdr.reseal(copy)
            hdr = RgrpHeader.decode(copy, bno)
            s.ref_issues.setdefault(rg, []).append(
                f"refcount tree root is damaged ({e.reason[len('refcount root: '):]})")
            return hdr
    return decode


def scan_refcount_trees(s) -> None:
    """Read every group's refcount tree: claim its nodes, keep its records."""
    rep = s.report
    nrg = s.sb.rgrp_count
    s.ref_found = [[] for _ in range(nrg)]
    s.ref_nodes = [[] for _ in range(nrg)]
    s.ref_deferred = [[] for _ in range(nrg)]
    rep.progress.start("Reading refcount trees", nrg)
    for rg in range(nrg):
        rep.progress.step()
        root = s.hdrs[rg].refroot
        if not root.keys:
            continue
        records: list = []
        _walk(s, rg, root, None, None, records, 0)
        s.ref_found[rg] = _valid_records(s, rg, records)


def _issue(s, rg: int, msg: str) -> None:
    s.ref_issues.setdefault(rg, []).append(msg)


def _walk(s, rg: int, node, lo, hi, records: list, depth: int) -> None:
    keys = node.keys
    if keys and (lo is not None and keys[0] < lo or hi is not None and keys[-1] >= hi):
        _issue(s, rg, f"refcount tree node {node.bno}: keys outside its parent's range")
    if node.level == 0:
        records.extend((k, ln, c) for k, (ln, c) in zip(keys, node.vals))
        return
    if depth >= MAX_DEPTH:
        _issue(s, rg, "refcount tree too deep")
        return
    for i, (k, bno) in enumerate(zip(keys, node.vals)):
        child = _load(s, rg, bno, node.level - 1)
        if child is None:
            continue
        if child.keys[0] != k:
            _issue(s, rg, f"refcount tree index key {k} != first key {child.keys[0]} "
                          f"of node {bno}")
        _walk(s, rg, child, k if lo is None else max(k, lo),
              keys[i + 1] if i + 1 < len(keys) else hi, records, depth + 1)


def _load(s, rg: int, bno: int, level: int):
    if not s.in_data(bno):
        _issue(s, rg, f"refcount tree points outside the data area (block {bno})")
        return None
    if s.claims[bno] in META_CODES or s.claims[bno] == C_DATA:
        _issue(s, rg, f"refcount tree points at block {bno}, which holds something else")
        return None
    buf = s.read(bno)
    try:
        if buf is None:
            raise CorruptBlock(bno, "unreadable")
        node, notes = salvage.decode_node(buf, bno, REFCOUNT)
    except CorruptBlock as e:
        _issue(s, rg, f"refcount tree node {bno} is unreadable ({e.reason})")
        _defer(s, rg, bno, buf)
        return None
    if node.owner != rg or node.level != level or not node.keys:
        why = (f"belongs to group {node.owner}" if node.owner != rg else
               f"has level {node.level}, expected {level}" if node.level != level else
               "is empty")
        _issue(s, rg, f"refcount tree node {bno} {why}")
        _defer(s, rg, bno, buf)
        return None
    if notes:
        _issue(s, rg, f"refcount tree node {bno} is damaged ({', '.join(notes)})")
    claim_meta(s, bno)
    s.ref_nodes[rg].append(bno)
    return node


def _defer(s, rg: int, bno: int, buf) -> None:
    """A damaged node's block: held (not reported as leaked) until the tree is
    rewritten without it, then freed, when it looks like one of ours."""
    if buf is not None and blockhdr.header(buf)[1] == BlockType.REFCOUNT_NODE and \
            not s.claims[bno]:
        s.claims[bno] = C_DEFER
        s.ref_deferred[rg].append(bno)


def _valid_records(s, rg: int, records: list) -> list:
    out = []
    prev_end = 0
    for pblk, ln, c in sorted(records):
        if ln < 1 or c < 2 or not s.in_data(pblk, ln) or s.sb.rgrp_of(pblk) != rg:
            _issue(s, rg, f"refcount record ({pblk}, {ln}, count {c}) is impossible")
            continue
        if pblk < prev_end:
            _issue(s, rg, f"refcount record ({pblk}, {ln}) overlaps the previous one")
            continue
        out.append((pblk, ln, c))
        prev_end = pblk + ln
    return _merged(out)


def _merged(runs) -> list:
    """Runs (start, n, count) with adjacent equal counts joined."""
    out: list = []
    for a, n, c in runs:
        if out and out[-1][2] == c and out[-1][0] + out[-1][1] == a:
            out[-1] = (out[-1][0], out[-1][1] + n, c)
        else:
            out.append((a, n, c))
    return out


# -- layer 4: the counts against the extents --------------------------------------------

def _ranges(pairs) -> list[tuple[int, int]]:
    """(start, n) pairs as sorted disjoint [start, end) ranges."""
    out: list[list[int]] = []
    for a, n in sorted(pairs):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], a + n)
        else:
            out.append([a, a + n])
    return [(a, b) for a, b in out]


def _clip(ranges, starts, a: int, b: int):
    """The parts of [a, b) inside ``ranges`` (sorted [start, end), ``starts`` their
    starts)."""
    i = max(0, bisect.bisect_right(starts, a) - 1)
    while i < len(ranges) and ranges[i][0] < b:
        lo, hi = max(a, ranges[i][0]), min(b, ranges[i][1])
        if lo < hi:
            yield lo, hi
        i += 1


def check_shared_blocks(s) -> None:
    rep = s.report
    nrg = s.sb.rgrp_count
    multi = _ranges(s.multi)
    starts = [a for a, _b in multi]
    # references of the blocks claimed more than once, from the surviving extents
    events: list[tuple[int, int]] = []
    touching: list = []         # (ino, extent index, lo, hi) inside those ranges
    if multi:
        for ino, rec in s.inodes.items():
            if not rec.ext or not rec.di.flags & DF_EXTENTS:
                continue
            for i, (_lb, pb, n, _f) in enumerate(rec.ext):
                for lo, hi in _clip(multi, starts, pb, pb + n):
                    events.append((lo, 1))
                    events.append((hi, -1))
                    touching.append((ino, i, lo, hi))
    shared, zero = _sweep(events, multi)
    expected: list[list] = [[] for _ in range(nrg)]
    for a, n, k in shared:
        expected[s.sb.rgrp_of(a)].append((a, n, k))
    # extents that map shared blocks without the flag: cross-linked blocks
    _check_flags(s, shared, touching)
    # blocks claimed twice that no extent maps any more (an earlier repair freed
    # an inode that shared them, or dropped an extent): free now
    if s.fixing:
        for a, n in zero:
            for b in range(a, a + n):
                if s.claims[b] == C_DATA:
                    allocator.release(s, b)
        allocator.flush(s)
    # the trees against the counts
    for rg in range(nrg):
        exp = _merged(expected[rg])
        found = s.ref_found[rg]
        rebuild = False
        for msg in s.ref_issues.get(rg, ()):
            rebuild |= rep.problem("refcount-tree", f"resource group {rg}: {msg}",
                                   "rebuild the group's refcount tree from the extents",
                                   safe=False, block=s.gstart[rg])
        if exp != found:
            rebuild |= _report_diff(s, rg, exp, found)
        if rebuild:
            rebuild_refcounts(s, rg, exp)
    s.refs = [list(_merged(e)) for e in expected]
    s.stats["shared_blocks"] = sum(n for a, n, _k in shared)
    if shared and s.sb.format_rev < SHARED_SINCE:
        if rep.problem("revision", f"the volume has shared blocks but format revision "
                       f"{s.sb.format_rev}", f"raise it to {SHARED_SINCE}", safe=True,
                       block=0):
            s.sb.format_rev = SHARED_SINCE
            s.write_primary = s.write_backup = True


def _sweep(events, multi):
    """From +1/-1 events at block numbers: the runs (start, n, k) with k >= 2
    references, and the runs of ``multi`` with none."""
    events.sort()
    shared: list = []
    count = 0
    pos = None
    covered: list = []           # runs with k >= 1
    for at, d in events:
        if pos is not None and at > pos and count:
            if count >= 2:
                if shared and shared[-1][2] == count and shared[-1][0] + shared[-1][1] == pos:
                    shared[-1] = (shared[-1][0], shared[-1][1] + at - pos, count)
                else:
                    shared.append((pos, at - pos, count))
            if covered and covered[-1][1] == pos:
                covered[-1][1] = at
            else:
                covered.append([pos, at])
        count += d
        pos = at
    # ranges of ``multi`` that no extent covers
    zero = []
    j = 0
    for a, b in multi:
        pos = a
        while j < len(covered) and covered[j][1] <= a:
            j += 1
        k = j
        while k < len(covered) and covered[k][0] < b:
            if covered[k][0] > pos:
                zero.append((pos, covered[k][0] - pos))
            pos = max(pos, covered[k][1])
            k += 1
        if pos < b:
            zero.append((pos, b - pos))
    return shared, zero


def _check_flags(s, shared, touching) -> None:
    """Extents mapping shared blocks must carry SHARED: report (and set) it."""
    if not shared:
        return
    rep = s.report
    sstarts = [a for a, _n, _k in shared]
    owners: dict[int, set] = {}         # shared run index -> inodes mapping it
    hits = []
    for ino, i, lo, hi in touching:
        j = max(0, bisect.bisect_right(sstarts, lo) - 1)
        runs = []
        while j < len(shared) and shared[j][0] < hi:
            if shared[j][0] + shared[j][1] > lo:
                runs.append(j)
                owners.setdefault(j, set()).add(ino)
            j += 1
        if runs:
            hits.append((ino, i, runs))
    bad: dict[int, list] = {}
    for ino, i, runs in hits:
        if not s.inodes[ino].ext[i][3] & EXT_SHARED:
            bad.setdefault(ino, []).append((i, runs))
    for ino in sorted(bad):
        rec = s.inodes[ino]
        idx = sorted({i for i, _r in bad[ino]})
        others = sorted({o for _i, runs in bad[ino] for j in runs for o in owners[j]}
                        - {ino})
        nblocks = sum(rec.ext[i][2] for i in idx)
        who = ", ".join(f"inode {o}" for o in others) or "itself"
        first = rec.ext[idx[0]][1]
        if rep.problem("dup-blocks", f"inode {ino}: {len(idx)} extent(s) ({nblocks} "
                       f"blocks, first {first}) map blocks also mapped by {who} "
                       f"without the shared flag",
                       "mark them shared (copy-on-write)", safe=False, ino=ino,
                       block=first, count=nblocks):
            for i in idx:
                rec.ext[i][3] |= EXT_SHARED
            from .repairs import rebuild_tree
            rebuild_tree(s, rec, EXTENT, [(lb, (pb, n, f)) for lb, pb, n, f in rec.ext])


def _report_diff(s, rg: int, exp: list, found: list) -> bool:
    """Report how group ``rg``'s tree (``found``) differs from the counts (``exp``);
    returns whether to rewrite it."""
    rep = s.report
    kinds: dict[str, list] = {}
    for a, n, f, e in _pairs(exp, found):
        if f == e or (f <= 1 and e <= 1):
            continue
        kind = ("refcount-missing" if f <= 1 else
                "refcount-stale" if e <= 1 else "refcount-wrong")
        kinds.setdefault(kind, []).append((a, n, f, e))
    do = False
    for kind, runs in sorted(kinds.items()):
        total = sum(n for _a, n, _f, _e in runs)
        a, n, f, e = runs[0]
        if e == 1 and s.claims[a] != C_DATA:
            e = 0
        rng = f"block {a}" if n == 1 else f"blocks {a}-{a + n - 1}"
        refs = f"mapped {e} time{'s' if e != 1 else ''}" if e else "mapped by nothing"
        cnt = f"count {f}" if f >= 2 else "no count"
        more = f" (and {len(runs) - 1} more run(s), {total} blocks in all)" \
            if len(runs) > 1 else ""
        msg = f"resource group {rg}: {rng} {refs}, refcount tree says {cnt}{more}"
        do |= rep.problem(kind, msg, "set the counts to the references found",
                          safe=True, block=a, count=total)
    return do


def _pairs(exp: list, found: list):
    """The runs over which (found count, expected count) is constant, as
    (start, n, found, expected); blocks neither names: (1, 1) are left out."""
    bounds = sorted({x for a, n, _c in exp + found for x in (a, a + n)})
    def at(runs):
        starts = [a for a, _n, _c in runs]

        def get(b):
            i = bisect.bisect_right(starts, b) - 1
            if i >= 0 and runs[i][0] + runs[i][1] > b:
                return runs[i][2]
            return 1
        return get
    fe, ff = at(exp), at(found)
    for lo, hi in zip(bounds, bounds[1:]):
        f, e = ff(lo), fe(lo)
        if (f, e) != (1, 1):
            yield lo, hi - lo, f, e


def rebuild_refcounts(s, rg: int, runs: list) -> bool:
    """Write group ``rg``'s refcount tree anew from ``runs`` (start, n, count):
    new nodes first, then the group header pointing at them, then the old nodes
    freed."""
    from .repairs import write_new_tree
    start = s.gstart[rg]
    items = [(a, (n, c)) for a, n, c in runs]
    built = write_new_tree(s, REFCOUNT, rg, items, start, start)
    if built is None:
        return False
    root, new_nodes = built
    s.hdrs[rg].refroot = root
    s.dirty_hdr.add(rg)
    allocator.flush(s)
    for b in s.ref_nodes[rg]:
        if s.claims[b] == C_META:
            allocator.release(s, b)
    for b in s.ref_deferred[rg]:
        if s.claims[b] == C_DEFER:
            allocator.release(s, b)
    s.ref_nodes[rg] = [n.bno for n in new_nodes]
    s.ref_deferred[rg] = []
    s.ref_found[rg] = list(runs)
    s.ref_issues.pop(rg, None)
    allocator.flush(s)
    return True


# -- freeing data blocks after layer 4 ------------------------------------------------

def release_data(s, pblk: int, n: int) -> None:
    """An extent that mapped data blocks [pblk, pblk+n) goes (fsck frees its
    inode): drop its reference.  Before layer 4 counted them, the blocks claimed
    more than once stay (layer 4 frees those nobody maps any more); after, the
    counts go down and a block is freed with its last reference."""
    if s.refs is None:
        multi = _ranges(s.multi)
        starts = [a for a, _b in multi]
        pos = pblk
        for lo, hi in _clip(multi, starts, pblk, pblk + n):
            if lo > pos:
                allocator.release(s, pos, lo - pos)
            pos = hi
        if pos < pblk + n:
            allocator.release(s, pos, pblk + n - pos)
        return
    rg = s.sb.rgrp_of(pblk)
    runs = s.refs[rg]
    starts = [a for a, _n, _c in runs]
    lo = max(0, bisect.bisect_left(starts, pblk) - 1)
    hi = bisect.bisect_right(starts, pblk + n)
    while lo < hi and runs[lo][0] + runs[lo][1] < pblk:
        lo += 1
    new, zeroed = adjust(runs[lo:hi], pblk, n, -1)
    if runs[lo:hi] != new:
        runs[lo:hi] = new
        s.ref_dirty.add(rg)
    for a, ln in zeroed:
        allocator.release(s, a, ln)


def flush(s) -> None:
    """Rewrite the refcount trees of the groups whose counts ``release_data``
    changed."""
    if not s.ref_dirty or not s.fixing:
        s.ref_dirty.clear()
        return
    for rg in sorted(s.ref_dirty):
        rebuild_refcounts(s, rg, s.refs[rg])
    s.ref_dirty.clear()

