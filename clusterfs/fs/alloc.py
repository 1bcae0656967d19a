"""Block allocation from resource-group bitmaps.

The allocator works on the volume's cached ``RgrpHeader`` and ``Bitmap`` objects
(through ``vol.touch`` so that a failed operation rolls back).  Rules:

* A data allocation never reuses a block freed in the journal's running (not yet
  committed) transaction: after a crash the old owner could still own it, and data
  is written to the device before its transaction commits (ordered mode).  Such
  blocks wait in ``pending_free`` until the next commit (a commit sealed and written
  in the background releases only the runs it freed).  Metadata blocks are
  journaled, so they may reuse those blocks at once.
* Files grow contiguously: allocation starts at a goal block (just after the file's
  previous extent) and a per-inode in-memory reservation keeps the run after a
  growing file's end free for it, so two files written at the same time don't
  interleave.  (GFS2 calls these reservations too.)
* Only groups in ``vol.alloc_groups()`` are used: all groups on a single node, the
  groups whose lock this node holds in a cluster.
"""

from __future__ import annotations

import errno
import re

from ..errors import FSError
from ..ondisk.format import BLOCKS_PER_BITMAP, DINODE, FREE, UNLINKED, USED

_ANY_FREE = bytes(0 if all((b >> (2 * k)) & 3 for k in range(4)) else 1 for b in range(256))
# a bitmap byte holding at least one FREE entry (searched without copying the bitmap)
_ANY_FREE_RE = re.compile(b"[" + b"".join(re.escape(bytes([b])) for b in range(256)
                                          if _ANY_FREE[b]) + b"]")
RESERVE_MIN = 64          # blocks (256 KiB)
RESERVE_MAX = 32768       # blocks (128 MiB)
AHEAD_SPARE = 8           # alloc_ahead: free blocks a group keeps per block mapped ahead


class NeedCommit(Exception):
    """Space freed by the running transaction is needed: commit, then retry the
    operation (raised before the operation changed anything it cannot roll back)."""


class Allocator:
    def __init__(self, vol):
        self.vol = vol
        self.sb = vol.sb
        self.pending_free: dict[int, list[tuple[int, int]]] = {}   # rgrp -> [(entry, n)]
        self.reservations: dict[int, tuple[int, int, int]] = {}    # ino -> (rgrp, entry, n)
        self.reserved_by_rg: dict[int, dict[int, tuple[int, int]]] = {}  # rgrp -> ino -> (entry, n)
        self.rotor = 0

    # -- bitmap access ----------------------------------------------------------

    def _locate(self, bno: int) -> tuple[int, int]:
        rg = self.sb.rgrp_of(bno)
        if rg < 0:
            raise FSError(errno.EIO, f"block {bno} lies outside every resource group")
        start, _length = self.sb.rgrp_range(rg)
        return rg, bno - start

    def state(self, bno: int) -> int:
        rg, entry = self._locate(bno)
        bm = self.vol.bitmap(rg, entry // BLOCKS_PER_BITMAP)
        return bm.get(entry % BLOCKS_PER_BITMAP)

    def _set_run(self, rg: int, entry: int, n: int, state: int) -> None:
        while n > 0:
            j, off = divmod(entry, BLOCKS_PER_BITMAP)
            take = min(n, BLOCKS_PER_BITMAP - off)
            bm = self.vol.bitmap(rg, j)
            self.vol.touch(bm)
            bm.set_run(off, take, state)
            entry += take
            n -= take

    def _rg_bits(self, rg: int) -> tuple[bytes, int]:
        """The group's bitmap as one bytes object, and its entry count."""
        start, length = self.sb.rgrp_range(rg)
        parts = []
        for j in range(self.sb.bitmap_blocks):
            parts.append(self.vol.bitmap(rg, j).bits)
        return b"".join(parts), length

    # -- searching ----------------------------------------------------------------

    def _excluded(self, rg: int, entry: int, n: int, ino: int, data: bool) -> int:
        """Length of the allowed prefix of [entry, entry+n) (0 if entry itself is out)."""
        limit = n
        if data:
            for s, ln in self.pending_free.get(rg, ()):
                if s < entry + limit and entry < s + ln:
                    if s <= entry:
                        return 0
                    limit = s - entry
        for owner, (s, ln) in self.reserved_by_rg.get(rg, {}).items():
            if owner == ino:
                continue
            if s < entry + limit and entry < s + ln:
                if s <= entry:
                    return 0
                limit = s - entry
        return limit

    def _free_run_at(self, bits: bytes, length: int, entry: int, want: int) -> int:
        """Number of consecutive free entries starting at ``entry`` (at most want)."""
        n = 0
        while n < want and entry + n < length:
            e = entry + n
            if not (e & 3) and want - n >= 4 and e + 4 <= length and bits[e >> 2] == 0:
                n += 4
                continue
            if (bits[e >> 2] >> ((e & 3) * 2)) & 3 != FREE:
                break
            n += 1
        return min(n, want)

    def _find(self, rg: int, start_entry: int, want: int, ino: int, data: bool,
              min_len: int = 1) -> tuple[int, int] | None:
        """First run of >= min_len allowed free entries at/after start_entry (wrapping),
        as (entry, length <= want)."""
        bits, length = self._rg_bits(rg)
        for lo, hi in ((start_entry, length), (0, start_entry)):
            pos = lo
            while pos < hi:
                if min_len >= 8:
                    k = bits.find(b"\0" * (min_len // 4), pos >> 2, -(-hi // 4))
                    if k < 0:
                        break
                    e = k * 4
                    # back up to the true start of the free run
                    while e > pos and (bits[(e - 1) >> 2] >> (((e - 1) & 3) * 2)) & 3 == FREE:
                        e -= 1
                    e = max(e, pos)
                else:
                    m = _ANY_FREE_RE.search(bits, pos >> 2, -(-hi // 4))
                    if m is None:
                        break
                    k = m.start()
                    e = max(k * 4, pos)
                    while e < min(hi, k * 4 + 4) and (bits[e >> 2] >> ((e & 3) * 2)) & 3 != FREE:
                        e += 1
                    if e >= min(hi, k * 4 + 4):
                        pos = k * 4 + 4
                        continue
                run = self._free_run_at(bits, min(length, hi), e, want)
                allowed = self._excluded(rg, e, run, ino, data)
                if allowed >= min(min_len, want) and allowed > 0:
                    return e, allowed
                pos = e + max(run, 1)
                if not allowed:
                    # skip the whole excluded stretch at once, not entry by entry
                    pos = max(pos, self._excluded_until(rg, e, ino, data))
        return None

    def _excluded_until(self, rg: int, entry: int, ino: int, data: bool) -> int:
        """The first entry at or after ``entry`` outside every range that
        ``_excluded`` keeps ``ino`` out of (pending frees, others' reservations)."""
        moved = True
        while moved:
            moved = False
            if data:
                for s, ln in self.pending_free.get(rg, ()):
                    if s <= entry < s + ln:
                        entry, moved = s + ln, True
            for owner, (s, ln) in self.reserved_by_rg.get(rg, {}).items():
                if owner != ino and s <= entry < s + ln:
                    entry, moved = s + ln, True
        return entry

    # -- allocation -----------------------------------------------------------------

    def groups_by_preference(self, goal: int | None) -> list[int]:
        groups = self.vol.alloc_groups()
        if not groups:
            return []
        if goal is not None:
            rg = self.sb.rgrp_of(goal)
            if rg in groups:
                i = groups.index(rg)
                return groups[i:] + groups[:i]
        i = self.rotor % len(groups)
        return groups[i:] + groups[:i]

    def alloc_meta(self, goal: int | None, state: int = USED) -> int:
        """One metadata block (or dinode with state=DINODE), near ``goal``."""
        for rg in self.groups_by_preference(goal):
            hdr = self.vol.rgrp(rg)
            if hdr.free == 0:
                continue
            start, _ = self.sb.rgrp_range(rg)
            entry0 = goal - start if goal is not None and self.sb.rgrp_of(goal) == rg else 0
            found = self._find(rg, entry0, 1, -1, data=False)
            if found is None:
                continue
            entry, _n = found
            self._claim(rg, entry, 1, state)
            return start + entry
        self.vol.out_of_space(1)
        raise FSError(errno.ENOSPC, "no free block for metadata")

    def alloc_data(self, ino: int, goal: int | None, want: int,
                   file_blocks: int = 0) -> list[tuple[int, int]]:
        """Up to ``want`` data blocks as (first block, count) runs, contiguous when
        possible.  Raises ENOSPC (allocating nothing) when fewer than ``want`` are free."""
        if not self._room_in_goal_group(goal, want) and \
                self.free_blocks() - self.pending_blocks() < want:
            if self.pending_blocks() and self.free_blocks() >= want:
                # blocks freed by the running transaction become usable once it
                # commits: the operation is rolled back, the journal commits, and
                # the operation runs again
                raise NeedCommit()
            self.vol.out_of_space(want)
            raise FSError(errno.ENOSPC, "volume full")
        runs: list[tuple[int, int]] = []
        remaining = want
        # 1. continue exactly at the goal (appending to the previous extent)
        if goal is not None:
            got = self._take_at(ino, goal, remaining)
            if got:
                runs.append((goal, got))
                remaining -= got
        # 2. the inode's reservation
        if remaining:
            res = self.reservations.get(ino)
            if res is not None:
                rg, entry, n = res
                start, _ = self.sb.rgrp_range(rg)
                if self.vol.may_alloc_in(rg):
                    got = self._take_at(ino, start + entry, min(remaining, n))
                    if got:
                        runs.append((start + entry, got))
                        remaining -= got
        # 3. a fresh run, reserving what follows for this inode's growth
        while remaining:
            want_run = remaining
            reserve = max(RESERVE_MIN, min(RESERVE_MAX, file_blocks // 4, 4 * remaining))
            found = None
            for rg in self.groups_by_preference(goal):
                if self.vol.rgrp(rg).free == 0:
                    continue
                start, _ = self.sb.rgrp_range(rg)
                entry0 = goal - start if goal is not None and self.sb.rgrp_of(goal) == rg else 0
                # prefer a run that holds the whole request plus some room
                found = self._find(rg, entry0, want_run + reserve, ino, data=True,
                                   min_len=min(want_run, 1024))
                if found is None:
                    found = self._find(rg, entry0, want_run, ino, data=True, min_len=1)
                if found is not None:
                    break
            if found is None:
                if self.pending_blocks():
                    raise NeedCommit()
                self.vol.out_of_space(remaining)
                raise FSError(errno.ENOSPC, "volume full")
            entry, n = found
            take = min(n, want_run)
            self._claim(rg, entry, take, USED)
            start, _ = self.sb.rgrp_range(rg)
            runs.append((start + entry, take))
            remaining -= take
            goal = start + entry + take
            self._set_reservation(ino, rg, entry + take, n - take)
        return _merge_runs(runs)

    def alloc_ahead(self, ino: int, bno: int, want: int) -> int:
        """Claim up to ``want`` free blocks starting exactly at ``bno`` for a growing
        file to write into next (``inode._map_ahead``); returns the count.  At most
        1/AHEAD_SPARE of what ``bno``'s group has free besides its blocks still
        pending: blocks mapped ahead stay a small part of the space others could
        use, and none are taken once space runs low."""
        rg = self.sb.rgrp_of(bno)
        if rg < 0 or not self.vol.may_alloc_in(rg):
            return 0
        pending = sum(n for _e, n in self.pending_free.get(rg, ()))
        want = min(want, (self.vol.rgrp(rg).free - pending) // AHEAD_SPARE)
        return self._take_at(ino, bno, want) if want > 0 else 0

    def _room_in_goal_group(self, goal: int | None, want: int) -> bool:
        """The cheap case of ``alloc_data``'s check for room: the goal's group alone
        has ``want`` free blocks besides every block still pending (adding up all
        the groups at hand costs a cluster member more)."""
        if goal is None:
            return False
        rg = self.sb.rgrp_of(goal)
        return rg >= 0 and self.vol.may_alloc_in(rg) and \
            self.vol.rgrp(rg).free - self.pending_blocks() >= want

    def _take_at(self, ino: int, bno: int, want: int) -> int:
        """Claim up to ``want`` free blocks starting exactly at ``bno``; return count."""
        rg = self.sb.rgrp_of(bno)
        if rg < 0 or not self.vol.may_alloc_in(rg):
            return 0
        start, length = self.sb.rgrp_range(rg)
        entry = bno - start
        if entry >= length:
            return 0
        limit = min(want, length - entry)
        n = 0
        while n < limit:
            j, off = divmod(entry + n, BLOCKS_PER_BITMAP)
            span = min(limit - n, BLOCKS_PER_BITMAP - off)
            got = _free_prefix(self.vol.bitmap(rg, j).bits, off, span)
            n += got
            if got < span:
                break
        n = self._excluded(rg, entry, n, ino, data=True)
        if n:
            self._claim(rg, entry, n, USED)
            res = self.reservations.get(ino)
            if res and res[0] == rg and res[1] <= entry + n < res[1] + res[2] + 1:
                self._set_reservation(ino, rg, entry + n, res[1] + res[2] - (entry + n))
        return n

    def _set_reservation(self, ino: int, rg: int, entry: int, n: int) -> None:
        self.drop_reservation(ino)
        if n > 0:
            self.reservations[ino] = (rg, entry, n)
            self.reserved_by_rg.setdefault(rg, {})[ino] = (entry, n)

    def drop_reservation(self, ino: int) -> None:
        old = self.reservations.pop(ino, None)
        if old is not None:
            self.reserved_by_rg.get(old[0], {}).pop(ino, None)

    def drop_group_reservations(self, rg: int) -> None:
        for ino in list(self.reserved_by_rg.get(rg, {})):
            self.drop_reservation(ino)

    def _claim(self, rg: int, entry: int, n: int, state: int) -> None:
        hdr = self.vol.rgrp(rg)
        self.vol.touch(hdr)
        self._set_run(rg, entry, n, state)
        hdr.free -= n
        if state == DINODE:
            hdr.dinodes += n
        self.vol.note_alloc(rg, n)

    # -- freeing ------------------------------------------------------------------

    def free(self, bno: int, n: int, *, data: bool) -> None:
        """Mark blocks free.  They wait for the next commit before reuse as data."""
        while n > 0:
            rg, entry = self._locate(bno)
            start, length = self.sb.rgrp_range(rg)
            take = min(n, length - entry)
            hdr = self.vol.rgrp(rg)
            self.vol.touch(hdr)
            # keep the dinode/unlinked counters right
            if take == 1:
                old = self.state(bno)
                if old == DINODE:
                    hdr.dinodes -= 1
                elif old == UNLINKED:
                    hdr.unlinked -= 1
                elif old == FREE:
                    raise FSError(errno.EIO, f"block {bno} freed twice")
            self._set_run(rg, entry, take, FREE)
            hdr.free += take
            # Not file data until the commit, metadata too: its last committed image
            # comes back after a crash, or is checkpointed home before the commit.
            self.pending_free.setdefault(rg, []).append((entry, take))
            if data:
                self.vol.note_pending_free(rg, entry, take)
            elif self.vol.op is not None:
                self.vol.op.pending.append((rg, entry, take))
            bno += take
            n -= take

    def set_state(self, bno: int, state: int) -> None:
        """Switch a dinode between DINODE and UNLINKED."""
        rg, entry = self._locate(bno)
        old = self.state(bno)
        hdr = self.vol.rgrp(rg)
        self.vol.touch(hdr)
        for s, d in ((old, -1), (state, +1)):
            if s == DINODE:
                hdr.dinodes += d
            elif s == UNLINKED:
                hdr.unlinked += d
        self._set_run(rg, entry, 1, state)

    def committed(self) -> None:
        """The running transaction committed: its freed blocks may be reused."""
        self.pending_free.clear()

    def sealed(self) -> list[tuple[int, int, int]]:
        """The runs freed so far, as (rgrp, entry, n): the journal sealed their
        transaction.  They stay out of data allocations until ``released``."""
        return [(rg, e, n) for rg, runs in self.pending_free.items() for e, n in runs]

    def released(self, runs: list[tuple[int, int, int]]) -> None:
        """The sealed transaction that freed ``runs`` is on the device: reusable."""
        for rg, e, n in runs:
            left = self.pending_free.get(rg)
            if left and (e, n) in left:
                left.remove((e, n))
                if not left:
                    del self.pending_free[rg]

    def pending_blocks(self) -> int:
        return sum(n for runs in self.pending_free.values() for _e, n in runs)

    def free_blocks(self) -> int:
        """Free blocks in the groups this node may allocate from (pending ones included)."""
        return self.vol.alloc_free_blocks()


def _free_prefix(bits, i: int, n: int) -> int:
    """How many of the ``n`` bitmap entries from entry ``i`` on are FREE, counted up
    to the first one that is not (whole zero bytes are skipped at C speed)."""
    c = 0
    while c < n and (i + c) & 3:
        e = i + c
        if (bits[e >> 2] >> ((e & 3) * 2)) & 3 != FREE:
            return c
        c += 1
    whole = (n - c) >> 2
    if whole:
        b = (i + c) >> 2
        seg = bits[b:b + whole]
        zeros = len(seg) - len(seg.lstrip(b"\0"))
        c += zeros * 4
        if zeros < whole:
            n = min(n, c + 4)       # the next byte holds a used entry
    while c < n:
        e = i + c
        if (e >> 2) >= len(bits) or (bits[e >> 2] >> ((e & 3) * 2)) & 3 != FREE:
            break
        c += 1
    return c


def _merge_runs(runs):
    out: list[tuple[int, int]] = []
    for s, n in runs:
        if out and out[-1][0] + out[-1][1] == s:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((s, n))
    return out
