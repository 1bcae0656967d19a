"""Layer 5, Namespace: the root, directory trees and entries, connectivity
(``/lost+found``), link counts, orphans, and the write-back of changed directories.

The directory passes look at a whole directory at once (``entries_plain``: built-in
functions over its record columns) and go record by record only through the
directories where that finds something to say.
"""

from __future__ import annotations

import re
import stat as S
from collections import Counter
from itertools import compress, repeat
from operator import and_, attrgetter, ne, rshift

from clusterfs.ondisk.format import (DF_DIRTREE, DINODE, DIRENT, DTYPE_MASK, DTYPE_SHIFT,
                                     FREE, HASH_SHIFT, LINK_MAX, NAME_MAX, UNLINKED,
                                     bad_name, dirent_key, dtype_of, key_cidx, key_hash,
                                     name_hash)

from . import allocator, shared
from .claims import C_DEFER, C_DINODE, C_NONE, C_UNLINKED
from .records import Rec, dir_recs, entry_columns, entry_inos
from .repairs import free_deferred, free_inode, new_dinode, rebuild_tree, recount_blocks

_UNLINKED_STATE = re.compile(re.escape(bytes([UNLINKED])))
_SLASH = ord("/")
_MODE, _NLINK = attrgetter("di.mode"), attrgetter("di.nlink")


def check_root(s) -> None:
    rep, sb = s.report, s.sb
    root = sb.root_ino
    rec = s.inodes.get(root)
    if rec is not None and S.S_ISDIR(rec.di.mode):
        if rec.di.parent != root:
            if rep.problem("root-parent", f"root directory's parent is "
                           f"{rec.di.parent}", "point it at itself", safe=True,
                           ino=root):
                rec.di.parent = root
                rec.dirty = True
        return
    why = "missing" if rec is None else "not a directory"
    if rec is not None:
        # a non-directory at the root's place: it keeps its block, we need another
        at = None
    else:
        at = root if (s.in_data(root) and s.claims[root] in (C_NONE, C_DEFER)
                      and s.state_of(root) in (FREE, DINODE, UNLINKED, 0xFF)) else None
    if not rep.problem("root", f"root directory (inode {root}) is {why}",
                       "create a new empty root directory (what it held is "
                       "reconnected under /lost+found)", safe=False, ino=root):
        s.no_root = True
        return
    if at is not None and s.claims[root] == C_DEFER:
        allocator.release(s, root)
    try:
        new = new_dinode(s, root, S.S_IFDIR | 0o755, 0, at=at)
    except OSError as e:
        rep.unfix(why=str(e))
        s.no_root = True
        return
    new.di.parent = new.di.bno
    s.bad_inodes.pop(new.di.bno, None)
    s.write_obj(new.di)
    if new.di.bno != sb.root_ino:
        sb.root_ino = new.di.bno
        s.write_primary = s.write_backup = True


def _entry_name_fix(key: int, name: bytes) -> bytes | None:
    """A name whose one damaged byte can be recovered from the entry's hash."""
    h = key_hash(key)
    for i in range(len(name)):
        for v in range(1, 256):
            if v == name[i] or v == _SLASH:
                continue
            cand = name[:i] + bytes([v]) + name[i + 1:]
            if name_hash(cand) == h:
                return cand
    return None


def check_dir_entries(s) -> None:
    """Every directory's tree and entries: names, hashes, targets, types."""
    rep = s.report
    total = 0
    dirs = dir_recs(s)
    rep.progress.start("Checking directories", len(dirs))
    step = rep.progress.step
    get, crc, root = s.inodes.get, name_hash, s.sb.root_ino
    dshift, dmask = DTYPE_SHIFT, DTYPE_MASK
    for rec in dirs:
        step()
        di = rec.di
        ino = di.bno
        if not S.S_ISDIR(di.mode):
            continue
        changed = False
        msgs = [m for code, m in rec.tree_issues if code == "tree"]
        for m in msgs:
            changed |= rep.problem("dir-tree", f"directory {ino}: {m}",
                                   "rebuild the directory tree from its readable "
                                   "entries", safe=False, ino=ino)
        if rec.tree_bad and not msgs:
            changed = s.fixing          # a salvaged root (approved with the dinode)
        names: dict[bytes, int] = {}
        items = rec.items
        total += len(items)
        entries = None          # the records kept, made once one is not as read
        all_names = None
        if entries_plain(s, ino, items):
            items = ()          # every record as the common case below wants it
        for i, (key, val) in enumerate(items):
            child, dtype, name = val
            target = get(child)
            if target is not None and key >> HASH_SHIFT == crc(name) and \
                    child != root and child != ino and \
                    dtype == (target.di.mode >> dshift) & dmask and \
                    name not in names and b"/" not in name and b"\0" not in name and \
                    len(name) <= NAME_MAX and name != b"." and name != b"..":
                # the common case, an entry with nothing to say (each check below)
                names[name] = child
                if entries is not None:
                    entries.append([key, child, dtype, name])
                continue
            if entries is None:
                entries = [[k, *v] for k, v in items[:i]]
                all_names = {v[2] for _k, v in items}
            # the name
            bad = bad_name(name)
            want = name_hash(name)
            if key_hash(key) != want or bad:
                fixed_name = _entry_name_fix(key, name)
                if fixed_name is not None and (fixed_name in all_names or
                                               b"/" in fixed_name or
                                               b"\0" in fixed_name):
                    fixed_name = None
                if fixed_name is not None:
                    if rep.problem("dir-entry-name", f"directory {ino}: entry "
                                   f"{name!r} does not match its hash", f"restore the "
                                   f"name {fixed_name!r} (one damaged byte)",
                                   safe=False, ino=ino):
                        name = fixed_name
                        changed = True
                elif bad:
                    new = name.replace(b"/", b"_").replace(b"\0", b"_")
                    if new in (b".", b".."):
                        new = new + b"_"
                    if rep.problem("dir-entry-name", f"directory {ino}: invalid name "
                                   f"{name!r}", f"rename it {new!r}", safe=False,
                                   ino=ino):
                        name = new
                        changed = True
                else:
                    if rep.problem("dir-hash", f"directory {ino}: entry {name!r} is "
                                   f"stored under hash {key_hash(key):#x}, its "
                                   f"name hashes to {want:#x}", "re-file it under the "
                                   "right hash", safe=False, ino=ino):
                        changed = True
            # the target
            target = s.inodes.get(child)
            if target is None:
                why = ("a damaged dinode" if child in s.bad_inodes else
                       "a block that is not an inode")
                if rep.problem("dangling-entry", f"directory {ino}: entry {name!r} "
                               f"points at {why} ({child})", "remove the entry",
                               safe=False, ino=ino):
                    changed = True
                    continue
                entries.append([key, child, dtype, name])
                continue
            if child == s.sb.root_ino or child == ino:
                if rep.problem("dir-entry-loop", f"directory {ino}: entry {name!r} "
                               f"points at " + ("the root" if child != ino else
                                                "the directory itself"),
                               "remove the entry", safe=False, ino=ino):
                    changed = True
                    continue
            tdt = dtype_of(target.di.mode)
            if dtype != tdt:
                if rep.problem("dir-entry-type", f"directory {ino}: entry {name!r} "
                               f"has type {dtype}, inode {child} is type {tdt}",
                               "fix the type", safe=True, ino=ino):
                    dtype = tdt
                    changed = True
            if name in names:
                k = 1
                while name + b"~%d" % k in names:
                    k += 1
                new = name + b"~%d" % k
                if rep.problem("dup-entry", f"directory {ino}: two entries named "
                               f"{name!r}", f"rename the second {new!r}",
                               safe=False, ino=ino):
                    name = new
                    changed = True
            names[name] = child
            entries.append([key, child, dtype, name])
        if entries is not None:
            rec.items = [(k, (c, d, n)) for k, c, d, n in entries]
        if changed and s.fixing:
            s.dirty_dirs.add(ino)
            di.entries = len(rec.items)     # bookkeeping of the change just made
    s.stats["entries"] = total


def entries_plain(s, ino: int, items) -> bool:
    """Whether every record of directory ``ino`` is one that the record-by-record
    check of ``check_dir_entries`` passes with nothing to say: its target is a
    known inode (not the root, not the directory itself) of the type it names, its
    key holds its name's hash, and the names are distinct, legal and not "." or
    ".."."""
    if not items:
        return True
    keys, inos, dtypes, names = entry_columns(items)
    n = len(names)
    pointed = set(inos)
    if s.sb.root_ino in pointed or ino in pointed:
        return False
    distinct = sorted(pointed)      # looked up in inode order: the order in memory
    m = len(distinct)
    targets = list(map(s.inodes.get, distinct))
    if None in targets:
        return False
    if list(map(rshift, keys, repeat(HASH_SHIFT, n))) != list(map(name_hash, names)):
        return False
    dtype_of_ino = dict(zip(distinct, map(and_, map(rshift, map(_MODE, targets),
                                                    repeat(DTYPE_SHIFT, m)),
                                          repeat(DTYPE_MASK, m))))
    if list(map(dtype_of_ino.__getitem__, inos)) != dtypes:
        return False
    unique = set(names)
    if len(unique) != n or b"." in unique or b".." in unique:
        return False
    joined = b"/".join(names)       # n - 1 slashes: no name holds one
    return joined.count(b"/") == n - 1 and b"\0" not in joined and \
        max(map(len, names)) <= NAME_MAX


def _rekey(items) -> list:
    """Sorted (key, value) records with keys that match the names' hashes."""
    out = []
    used: dict[int, set[int]] = {}
    pending = []
    for key, val in items:
        h = name_hash(val[2])
        cidx = key_cidx(key)
        if key_hash(key) == h and cidx not in used.setdefault(h, set()):
            used[h].add(cidx)
            out.append((key, val))
        else:
            pending.append((h, val))
    for h, val in pending:
        taken = used.setdefault(h, set())
        c = 0
        while c in taken:
            c += 1
        taken.add(c)
        out.append((dirent_key(h, c), val))
    out.sort(key=lambda kv: kv[0])
    return out


def check_connectivity(s) -> None:
    """Walk from the root; reconnect what cannot be reached under /lost+found."""
    rep = s.report
    inodes = s.inodes
    root = s.sb.root_ino
    if s.no_root or root not in inodes:
        return
    for rec in inodes.values():
        if rec.reached or rec.where is not None:
            rec.reached = False
            rec.where = None
    s.where = None
    s.n_reached = 0
    _bfs(s, root)
    if s.n_reached == len(inodes):
        s.stats["reachable"] = len(inodes)      # all of them: nothing to look for
        return
    # directories not reached: reconnect the topmost of each unreachable subtree
    dirs = [r for r in inodes.values() if not r.reached and
            r.di.mode & 0o170000 == S.S_IFDIR and r.di.flags & DF_DIRTREE]
    if dirs:
        holder: dict[int, int] = {}      # dir -> a directory holding an entry to it
        for r in inodes.values():
            if S.S_ISDIR(r.di.mode) and r.di.flags & DF_DIRTREE and not r.reached:
                for _k, (c, _d, _n) in r.items:
                    if c in inodes and S.S_ISDIR(inodes[c].di.mode) and \
                            inodes[c].di.flags & DF_DIRTREE:
                        holder.setdefault(c, r.di.bno)
        for r in sorted(dirs, key=lambda r: r.di.bno):
            if r.reached:
                continue
            top = r.di.bno
            seen = {top}
            while holder.get(top) is not None and holder[top] not in seen and \
                    not inodes[holder[top]].reached:
                top = holder[top]
                seen.add(top)
            trec = inodes[top]
            if not trec.items and trec.di.nlink == 0:
                continue        # an empty removed directory: an orphan
            if rep.problem("unreachable-dir", f"directory {top} cannot be reached "
                           f"from the root", f"reconnect it as /lost+found/#{top}",
                           safe=False, ino=top):
                if _reconnect(s, trec):
                    _bfs(s, top)
    # other inodes with no entry in a reachable directory
    for ino in sorted(i for i, r in inodes.items() if not r.reached):
        r = inodes[ino]
        if S.S_ISDIR(r.di.mode) and r.di.flags & DF_DIRTREE:
            continue
        if r.di.nlink == 0:
            continue            # an orphan: freed below
        if rep.problem("unreachable-inode", f"inode {ino} ({kind_of(r)}) is "
                       f"linked from no directory", f"reconnect it as "
                       f"/lost+found/#{ino}", safe=False, ino=ino):
            if _reconnect(s, r):
                r.reached = True
    s.stats["reachable"] = sum(1 for r in inodes.values() if r.reached)


def kind_of(rec: Rec) -> str:
    """What an inode is, in a few words (for messages)."""
    m = rec.di.mode
    if S.S_ISREG(m):
        return f"regular file of {rec.di.size} bytes"
    if S.S_ISDIR(m):
        return "directory"
    if S.S_ISLNK(m):
        return "symbolic link"
    return "special file"


def _bfs(s, start: int) -> None:
    """Mark what ``start`` reaches; a directory reached twice loses the extra entry.

    Directories are walked whole: the records that point at directories (with
    trees) one by one, in order; the other targets as a set.  A directory's
    ``where`` is the entry it was reached by; other inodes find theirs when a
    report needs a path (``datascan.path_of``).
    """
    rep = s.report
    inodes = s.inodes
    get = inodes.get
    walked = {r.di.bno for r in dir_recs(s) if r.di.mode & 0o170000 == S.S_IFDIR}
    reached = 0 if inodes[start].reached else 1     # records newly marked
    inodes[start].reached = True
    queue = [start]
    while queue:
        d = queue.pop()
        drec = inodes[d]
        items = drec.items
        targets = set(entry_inos(items))
        subdirs = targets & walked
        if subdirs:
            targets -= subdirs
            drop = []           # indexes of entries removed
            for i, (_key, (c, _dt, name)) in enumerate(items):
                if c not in subdirs:
                    continue
                crec = inodes[c]
                if crec.reached:
                    if rep.problem("dir-hard-link", f"directory {d}: entry {name!r} "
                                   f"is a second link to directory {c}",
                                   "remove the entry", safe=False, ino=d):
                        drop.append(i)
                    continue
                crec.reached = True
                reached += 1
                crec.where = (d, name)
                queue.append(c)
            if drop:
                gone = set(drop)
                drec.items = [r for i, r in enumerate(items) if i not in gone]
                drec.di.entries = len(drec.items)
                s.dirty_dirs.add(d)
        for crec in map(get, sorted(targets)):     # in inode order: memory order
            if crec is not None and not crec.reached:
                crec.reached = True
                reached += 1
    s.n_reached += reached


def _get_lost_found(s) -> Rec | None:
    if s.lost_found is not None:
        return s.lost_found
    root = s.inodes[s.sb.root_ino]
    name = b"lost+found"
    taken = {n for _k, (_c, _d, n) in root.items}
    for _k, (c, _d, n) in root.items:
        if n == name and c in s.inodes and S.S_ISDIR(s.inodes[c].di.mode):
            s.lost_found = s.inodes[c]
            return s.lost_found
    k = 0
    while name in taken:
        k += 1
        name = b"lost+found~%d" % k
    if not s.alloc_ok:
        return None
    try:
        lf = new_dinode(s, root.di.bno, S.S_IFDIR | 0o700, root.di.bno)
    except OSError:
        return None
    lf.reached = True
    lf.where = (root.di.bno, name)
    s.write_obj(lf.di)
    _add_entry(s, root, lf, name)
    s.lost_found = lf
    s.report.note(f"  created /{name.decode()} (inode {lf.di.bno})")
    return lf


def _add_entry(s, drec: Rec, crec: Rec, name: bytes) -> None:
    h = name_hash(name)
    used = {key_cidx(k) for k, _ in drec.items if key_hash(k) == h}
    c = 0
    while c in used:
        c += 1
    items = list(drec.items)
    items.append((dirent_key(h, c), (crec.di.bno, dtype_of(crec.di.mode), name)))
    items.sort(key=lambda kv: kv[0])
    drec.items = items
    s.dirty_dirs.add(drec.di.bno)
    drec.di.entries = len(drec.items)
    if S.S_ISDIR(crec.di.mode):
        drec.di.nlink += 1          # the new subdirectory's '..'
    drec.dirty = True


def _reconnect(s, rec: Rec) -> bool:
    lf = _get_lost_found(s)
    if lf is None:
        s.report.unfix(why="cannot create /lost+found")
        return False
    name = b"#%d" % rec.di.bno
    _add_entry(s, lf, rec, name)
    if S.S_ISDIR(rec.di.mode):
        rec.di.parent = lf.di.bno
        rec.dirty = True
    rec.where = (lf.di.bno, name)
    return True


def check_link_counts(s) -> None:
    rep = s.report
    if s.no_root:
        return
    inodes = s.inodes
    # entries in reached directories, counted by target; subdirectories by parent
    links: Counter = Counter()
    subdirs: dict[int, int] = {}
    parent_of: dict[int, int] = {}
    is_dir = {d for d in s.dir_inos
              if d in inodes and inodes[d].di.mode & 0o170000 == S.S_IFDIR}.__contains__
    for drec in dir_recs(s):
        if not drec.reached:
            continue
        d = drec.di.bno
        targets = entry_inos(drec.items)
        links.update(targets)
        if any(map(is_dir, targets)):
            for c in filter(is_dir, targets):
                subdirs[d] = subdirs.get(d, 0) + 1
                parent_of[c] = d
    root = s.sb.root_ino
    # the blocks the bitmaps mark "unlinked" (few): the last check below
    marked_unlinked = set()
    for rg, st in enumerate(s.states):
        if st is not None:
            base = s.gstart[rg]
            marked_unlinked.update(base + m.start() for m in _UNLINKED_STATE.finditer(st))
    # the inodes with something to look at below: directories, those the bitmaps
    # mark unlinked, and those whose link count is not the count of their entries
    # (the rest, nearly all, are passed over whole, in memory order)
    look = set(compress(inodes, map(ne, map(_NLINK, inodes.values()),
                                    map(links.get, inodes, repeat(0)))))
    look.update(d for d in s.dir_inos if d in inodes)
    look.update(i for i in marked_unlinked if i in inodes)
    for ino in sorted(look):
        r = inodes[ino]
        di = r.di
        if not r.reached:
            continue
        if di.mode & 0o170000 == S.S_IFDIR:
            want = 2 + subdirs.get(ino, 0)
            par = root if ino == root else parent_of.get(ino)
            if par is not None and di.parent != par:
                if rep.problem("dir-parent", f"directory {ino}: '..' is {di.parent}, "
                               f"its entry is in directory {par}", f"set '..' to {par}",
                               safe=True, ino=ino):
                    di.parent = par
                    r.dirty = True
            nent = len(r.items)
            if di.entries != nent:
                if rep.problem("dir-entries", f"directory {ino}: entry count "
                               f"{di.entries}, holds {nent}", "fix it", safe=True,
                               ino=ino):
                    di.entries = nent
                    r.dirty = True
        else:
            want = links[ino]
        if di.nlink != want and want > 0:
            if rep.problem("link-count", f"inode {ino}: link count {di.nlink}, "
                           f"should be {want}", f"set it to {want}", safe=False,
                           ino=ino):
                di.nlink = min(want, LINK_MAX) if not S.S_ISDIR(di.mode) else want
                r.dirty = True
        if di.nlink and ino in marked_unlinked and s.state_of(ino) == UNLINKED:
            if rep.problem("unlinked-state", f"inode {ino} is marked unlinked but has "
                           f"{di.nlink} link(s)", "mark it in use", safe=True, ino=ino):
                allocator.set_state(s, ino, DINODE)
                s.claims[ino] = C_DINODE


def check_orphans(s) -> None:
    """Inodes nothing links to and whose link count is 0 are freed."""
    rep = s.report
    if s.no_root:
        return
    if all(r.reached for r in s.inodes.values()):
        return                  # an orphan is an inode nothing reaches
    for ino in sorted(s.inodes):
        r = s.inodes[ino]
        if r.reached or r.di.nlink != 0:
            continue
        state = s.state_of(ino)
        what = "unlinked inode" if state == UNLINKED else "inode with no links"
        if rep.problem("orphan", f"inode {ino}: {what} ({kind_of(r)}) not freed",
                       "free it", safe=True, ino=ino):
            free_inode(s, r)
    shared.flush(s)         # the counts of blocks those inodes shared
    for ino in [i for i, r in s.inodes.items() if r.di.nlink == 0 and not r.reached
                and s.claims[i] == C_NONE]:
        del s.inodes[ino]


def check_dir_writeback(s) -> None:
    """Write the directories and dinodes changed by this layer."""
    if not s.fixing:
        return
    for ino in sorted(s.dirty_dirs):
        rec = s.inodes.get(ino)
        if rec is None:
            continue
        items = _rekey(rec.items)
        rec.items = items
        rec.di.entries = len(items)
        if not rebuild_tree(s, rec, DIRENT, items):
            continue
        free_deferred(s, rec)
    for ino in sorted(s.inodes):
        rec = s.inodes[ino]
        if rec.dirty and s.claims[ino] in (C_DINODE, C_UNLINKED):
            if rec.di.flags & DF_DIRTREE and rec.tree_bad:
                items = _rekey(rec.items)
                rec.items = items
                rec.di.entries = len(items)
                rebuild_tree(s, rec, DIRENT, items)
                continue
            if rec.di.flags & DF_DIRTREE:
                recount_blocks(rec)
            s.write_obj(rec.di)
            rec.dirty = False
    allocator.flush(s)
    s.real.flush()


def summary(s) -> str:
    st = s.stats
    return (f"{st.get('entries', 0)} entries, {st.get('reachable', 0)} reachable "
            f"inodes")
