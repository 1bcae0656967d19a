"""The bitmaps as repairs change them: set states, allocate, free, write back.

Changes are made in memory (``State.states``, the bitmap blocks and the group
counters) and written by ``flush``: bitmap blocks first, then their group headers.
Blocks for a repair are allocated (and flushed) before anything points at them, and
freed only after the pointers to them are gone, so that a crash of fsck itself
leaves at worst leaked blocks.
"""

from __future__ import annotations

import errno

from clusterfs.ondisk.format import BLOCKS_PER_BITMAP, DINODE, FREE, UNLINKED, USED

from .claims import C_DATA, C_NONE


def set_states(s, rg: int, e: int, n: int, state: int) -> None:
    """Set bitmap entries [e, e+n) of a group (memory; written by ``flush``)."""
    st = s.states[rg]
    hdr = s.hdrs[rg]
    for k in range(e, e + n):
        old = st[k]
        if old == FREE:
            hdr.free -= 1
        elif old == DINODE:
            hdr.dinodes -= 1
        elif old == UNLINKED:
            hdr.unlinked -= 1
        if state == FREE:
            hdr.free += 1
        elif state == DINODE:
            hdr.dinodes += 1
        elif state == UNLINKED:
            hdr.unlinked += 1
    st[e:e + n] = bytes([state]) * n
    while n > 0:
        j, off = divmod(e, BLOCKS_PER_BITMAP)
        take = min(n, BLOCKS_PER_BITMAP - off)
        s.bms[rg][j].set_run(off, take, state)
        s.dirty_bm.add((rg, j))
        e += take
        n -= take
    s.dirty_hdr.add(rg)


def set_state(s, bno: int, state: int) -> None:
    rg = s.sb.rgrp_of(bno)
    set_states(s, rg, bno - s.gstart[rg], 1, state)


def flush(s) -> None:
    """Write changed bitmap blocks, then their group headers."""
    if not s.dirty_bm and not s.dirty_hdr:
        return
    if not s.fixing and s.dev is not s.real:
        s.dirty_bm.clear()
        s.dirty_hdr.clear()
        return
    for rg, j in sorted(s.dirty_bm):
        s.write_obj(s.bms[rg][j])
    for rg in sorted(s.dirty_hdr):
        s.write_obj(s.hdrs[rg])
    s.dirty_bm.clear()
    s.dirty_hdr.clear()


def _find_free(s, goal: int | None, want: int, min_len: int = 1):
    """First run of free, unreferenced blocks near ``goal``: (bno, n <= want)."""
    sb = s.sb
    rg0 = sb.rgrp_of(goal) if goal is not None else 0
    rg0 = max(rg0, 0)
    for k in range(sb.rgrp_count):
        rg = (rg0 + k) % sb.rgrp_count
        if s.hdrs[rg].free <= 0:
            continue
        st = s.states[rg]
        base = s.gstart[rg]
        pos = s.data_start(rg) - base
        if goal is not None and k == 0 and goal - base > pos:
            pos = goal - base
        for start in (pos, s.data_start(rg) - base):
            e = st.find(b"\0" * min(min_len, want), start)
            while e >= 0:
                n = 0
                while n < want and e + n < len(st) and st[e + n] == FREE and \
                        s.claims[base + e + n] == C_NONE:
                    n += 1
                if n >= min(min_len, want):
                    return base + e, n
                e = st.find(b"\0" * min(min_len, want), e + max(n, 1))
    return None


def alloc(s, goal: int | None, want: int, state: int = USED,
          code: int = C_DATA) -> list[tuple[int, int]]:
    """Allocate ``want`` blocks (several runs if needed); ENOSPC raises OSError."""
    runs = []
    left = want
    while left:
        found = _find_free(s, goal, left)
        if found is None:
            for b, n in runs:
                release(s, b, n)
            raise OSError(errno.ENOSPC, "no free blocks for the repair")
        b, n = found
        set_state(s, b, state) if n == 1 else set_states(
            s, s.sb.rgrp_of(b), b - s.gstart[s.sb.rgrp_of(b)], n, state)
        s.claims[b:b + n] = bytes([code]) * n
        runs.append((b, n))
        goal = b + n
        left -= n
    return runs


def release(s, bno: int, n: int = 1) -> None:
    """Mark blocks free in the bitmap and the map (memory; flushed later)."""
    while n > 0:
        rg = s.sb.rgrp_of(bno)
        e = bno - s.gstart[rg]
        take = min(n, s.glen[rg] - e)
        st = s.states[rg]
        # only blocks not already free (counts stay right)
        k = 0
        while k < take:
            if st[e + k] != FREE:
                j = k
                while j < take and st[e + j] != FREE:
                    j += 1
                set_states(s, rg, e + k, j - k, FREE)
                k = j
            else:
                k += 1
        s.claims[bno:bno + take] = bytes(take)
        bno += take
        n -= take
