"""Layer 6, Data surface scan (``--scan-data``): every allocated data extent is read.

Unreadable blocks are reported by file (with its path where one is known) and left
alone: fsck does not repair file data.
"""

from __future__ import annotations

from .records import dir_recs


def check_data_extents(s) -> None:
    rep = s.report
    total = sum(e[2] for r in s.inodes.values() if r.ext for e in r.ext)
    rep.progress.start("Reading data", total)
    scanned = bad_total = 0
    CH = 256
    for ino in sorted(s.inodes):
        rec = s.inodes[ino]
        if not rec.ext:
            continue
        bad = []
        for lb, pb, n, _f in rec.ext:
            for i in range(0, n, CH):
                c = min(CH, n - i)
                try:
                    s.dev.read(pb + i, c)
                except OSError:
                    for t in range(c):
                        try:
                            s.dev.read(pb + i + t, 1)
                        except OSError:
                            bad.append((lb + i + t, pb + i + t))
                scanned += c
                rep.progress.step(c)
        if bad:
            bad_total += len(bad)
            runs = []
            for lb, pb in bad:
                if runs and runs[-1][1] + runs[-1][2] == pb:
                    runs[-1][2] += 1
                else:
                    runs.append([lb, pb, 1])
            desc = ", ".join(f"blocks {p}-{p + n - 1} (file blocks {l}-{l + n - 1})"
                             for l, p, n in runs)
            path = path_of(s, ino)
            rep.problem("unreadable-data", f"inode {ino}"
                        + (f" ({path})" if path else "") + f": unreadable {desc}",
                        "", ino=ino, block=runs[0][1], count=len(bad), path=path)
    s.stats["scanned_blocks"] = scanned
    s.stats["bad_blocks"] = bad_total


def path_of(s, ino: int) -> str | None:
    """The path of a reached inode (through the entry it was reached by), or None."""
    parts = []
    seen = set()
    root = s.sb.root_ino
    while ino != root:
        rec = s.inodes.get(ino)
        where = None if rec is None or not rec.reached else \
            rec.where or _entry_of(s, ino)
        if where is None or ino in seen:
            return None
        seen.add(ino)
        parent, name = where
        parts.append(name.decode(errors="replace"))
        ino = parent
    return "/" + "/".join(reversed(parts))


def _entry_of(s, ino: int):
    """(directory, name) of one entry in a reached directory pointing at ``ino``
    (None if there is none).  The map is made at the first question, after the
    namespace layer, for the few paths reports name."""
    if s.where is None:
        where: dict[int, tuple[int, bytes]] = {}
        for drec in dir_recs(s):
            if drec.reached:
                for _k, (c, _dt, name) in drec.items:
                    where.setdefault(c, (drec.di.bno, name))
        s.where = where
    return s.where.get(ino)


def summary(s) -> str:
    st = s.stats
    return (f"{st.get('scanned_blocks', 0)} data blocks read, "
            f"{st.get('bad_blocks', 0)} unreadable")
