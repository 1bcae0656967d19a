"""The map of referenced blocks: one claim code per block of the volume.

The metadata scan (layer 3) fills ``State.claims``: who holds each block, as far as
the dinodes and trees say.  The bitmaps are then compared against it.  A data block
mapped by two or more extents is shared (revision 3): such ranges go to
``State.multi``, and layer 4 (``shared``) checks their flags and reference counts.  A
block claimed both as metadata and by an extent goes to ``State.dups`` (layer 4 gives
each extent its own copy).

A file's extents claim their blocks here too: the plausible ones at once
(``plan_extents``), the others once every plausible extent of every file holds its
blocks (``resolve_extents``), so that a damaged extent never takes blocks that
belong to an intact one.
"""

from __future__ import annotations

from clusterfs.ondisk.format import DINODE, EXT_FLAGS, FREE, MAX_FILE_BLOCKS, UNLINKED, USED

from .records import Rec

# claim codes (one byte per block of the volume)
C_NONE = 0          # referenced by nothing
C_DATA = 1          # file data
C_UNLINKED = 2      # a dinode with nlink 0
C_DINODE = 3        # a dinode
C_DEFER = 4         # held only by damaged metadata that layer 4 drops (and frees)
C_META = 5          # tree node or xattr block
C_GROUP = 6         # resource group header or bitmap block
C_SLOT = 7          # the slot table, an added slot's heartbeat block or journal
META_CODES = (C_UNLINKED, C_DINODE, C_META, C_GROUP, C_SLOT)

# claim code -> expected bitmap state (0xff: leave the bitmap alone)
EXPECT = bytes([FREE, USED, UNLINKED, DINODE, 0xFF, USED, USED, USED] + [0xFF] * 248)


def claim_data(s, pblk: int, n: int) -> None:
    """Blocks [pblk, pblk+n) hold file data: those already held as data are shared
    (``State.multi``), those held as metadata doubly claimed (``State.dups``)."""
    claims = s.claims
    seg = claims[pblk:pblk + n]
    if seg.count(0) == n:
        claims[pblk:pblk + n] = b"\x01" * n
        return
    if seg.count(C_DATA) == n:
        _add_multi(s, pblk, n)
        return
    for b in range(pblk, pblk + n):
        c = claims[b]
        if c in (C_NONE, C_DEFER):
            claims[b] = C_DATA
        elif c == C_DATA:
            _add_multi(s, b, 1)
        else:
            s.dups.add(b)


def _add_multi(s, pblk: int, n: int) -> None:
    multi = s.multi
    if multi and multi[-1][0] + multi[-1][1] == pblk:
        multi[-1] = (multi[-1][0], multi[-1][1] + n)
    else:
        multi.append((pblk, n))


def claim_meta(s, bno: int) -> None:
    """Block ``bno`` is a tree node or an xattr block."""
    c = s.claims[bno]
    if c == C_DATA:
        s.dups.add(bno)
    s.claims[bno] = C_META


def plan_extents(s, rec: Rec, suspicious: list) -> None:
    """Validate one file's extent records; claim the plausible ones now.

    An extent is plausible when it lies in one group's data area, overlaps neither
    neighbour logically and ends before EOF.  The others wait until every plausible
    extent of every file has claimed its blocks (``resolve_extents``).
    """
    di = rec.di
    items = rec.items
    if len(items) == 1:
        lblk, (pblk, n, flags) = items[0]
        if n and not flags & ~EXT_FLAGS and lblk + n <= di.map_end() and \
                s.in_data(pblk, n):
            claims = s.claims
            if claims.count(0, pblk, pblk + n) == n:
                claims[pblk:pblk + n] = b"\x01" * n
            else:
                claim_data(s, pblk, n)
            rec.ext = [[lblk, pblk, n, flags]]
            return
    issues = rec.own_lists().ext_issues
    ext = []
    for lblk, (pblk, n, flags) in items:
        if n == 0:
            issues.append(f"extent at logical block {lblk} has length 0: dropped")
            continue
        if flags & ~EXT_FLAGS:
            issues.append(f"extent at logical block {lblk} has unknown flags "
                          f"{flags & ~EXT_FLAGS:#x}: cleared")
        if lblk >= MAX_FILE_BLOCKS:
            issues.append(f"extent at logical block {lblk} lies beyond the largest "
                          f"file: dropped")
            continue
        ext.append([lblk, pblk, n, flags & EXT_FLAGS, True])
    rec.ext = ext
    eof = di.map_end()
    deferred = False
    for i, e in enumerate(ext):
        lblk, pblk, n, _f, _ = e
        ok = s.in_data(pblk, n) and lblk + n <= eof
        if ok and i + 1 < len(ext) and lblk + n > ext[i + 1][0]:
            ok = False
        if ok and i > 0 and ext[i - 1][0] + ext[i - 1][2] > lblk:
            ok = False
        if ok:
            claim_data(s, pblk, n)
        else:
            e[4] = False
            deferred = True
    if deferred:
        suspicious.append(rec)
    else:
        rec.ext = [e[:4] for e in ext]


def _phys_prefix(s, pblk: int, n: int) -> int:
    """How many blocks from ``pblk`` are marked used, held by nobody and inside
    one group's data area (at most n)."""
    rg = s.sb.rgrp_of(pblk)
    if rg < 0 or pblk < s.data_start(rg):
        return 0
    base = s.gstart[rg]
    limit = min(n, base + s.glen[rg] - pblk)
    st = s.states[rg]
    claims = s.claims
    m = 0
    while m < limit and st[pblk + m - base] == USED and claims[pblk + m] in (
            C_NONE, C_DEFER):
        m += 1
    return m


def resolve_extents(s, rec: Rec) -> None:
    """Settle the extents ``plan_extents`` held back, in logical order.

    The blocks themselves decide the length: damage to a length field leaves the
    extent running into blocks that are free or held by others, and it is cut
    where they start.  A logical overlap (damage to a logical block field) is
    settled by moving one extent into the gap it fits, else by trimming the later
    one.  An extent whose blocks are all its own but that runs past EOF is kept:
    then the size is wrong (fixed with the sizes).
    """
    ext = rec.ext
    issues = rec.own_lists().ext_issues
    eof = rec.di.map_end()
    prev_end = 0
    out = []
    for i, e in enumerate(ext):
        lblk, pblk, n, flags, ok = e
        if ok:
            out.append([lblk, pblk, n, flags])
            prev_end = lblk + n
            continue
        desc = f"extent ({lblk}, {pblk}, {n})"
        m = _phys_prefix(s, pblk, n)
        if m == 0:
            issues.append(f"{desc} points outside the file's allocated blocks: dropped")
            continue
        if m < n:
            issues.append(f"{desc} runs past the blocks allocated to it: trimmed to "
                          f"{m} block(s)")
            n = m
        nxt = ext[i + 1] if i + 1 < len(ext) else None
        if lblk < prev_end:
            limit = nxt[0] if nxt is not None else max(eof, prev_end + n)
            if prev_end + n <= limit:
                issues.append(f"{desc} overlaps the previous extent: moved to logical "
                              f"block {prev_end}")
                lblk = prev_end
            else:
                cut = prev_end - lblk
                if cut >= n:
                    issues.append(f"{desc} lies inside the previous extent: dropped")
                    continue
                issues.append(f"{desc} overlaps the previous extent: its first {cut} "
                              f"block(s) dropped")
                lblk, pblk, n = lblk + cut, pblk + cut, n - cut
        elif nxt is not None and lblk + n > nxt[0]:
            limit = ext[i + 2][0] if i + 2 < len(ext) else max(eof, lblk + n + nxt[2])
            if lblk + n + nxt[2] > limit and nxt[0] - n >= prev_end:
                issues.append(f"{desc} overlaps the next extent: moved to logical "
                              f"block {nxt[0] - n}")
                lblk = nxt[0] - n
        claim_data(s, pblk, n)
        out.append([lblk, pblk, n, flags])
        prev_end = lblk + n
    out.sort(key=lambda x: x[0])
    rec.ext = out
