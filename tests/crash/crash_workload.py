"""Random file-system workloads run through ``Filesystem`` beside an in-memory model.

A ``Runner`` applies operations (create, write, truncate, rename, link, unlink,
mkdir, rmdir, symlink, fsync, and a file held open across its unlink) to a
``Filesystem`` and to a ``Model``, and keeps a snapshot of the model after every
operation.  After a simulated power cut, ``check_recovered`` compares the replayed
volume with those snapshots: its namespace must equal the model at some operation
boundary no older than the last fsync that returned, and every file's bytes must be
that snapshot's, except files overwritten in place since that fsync (ordered mode
writes file data in place before the metadata commits): each of their 512-byte
sectors must come from one of the file's versions since then.
"""

from __future__ import annotations

import errno
import os
import random
import stat as S

from clusterfs.errors import FSError
from clusterfs.fs.posix import Ctx

SECTOR = 512
CTX = Ctx(uid=0, gid=0)
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10


class Model:
    """Paths -> ('d', None) | ('f', inode id) | ('l', target); inode id -> bytes."""

    def __init__(self):
        self.paths: dict[str, tuple] = {"": ("d", None)}
        self.data: dict[int, bytes] = {}
        self.xattrs: dict[int, dict[bytes, bytes]] = {}
        self.next_iid = 1

    def snapshot(self) -> dict[str, tuple]:
        nlink: dict[int, int] = {}
        for kind, v in self.paths.values():
            if kind == "f":
                nlink[v] = nlink.get(v, 0) + 1
        out = {}
        for p, (kind, v) in self.paths.items():
            if kind == "f":
                out[p] = ("f", self.data[v], nlink[v], v,
                          tuple(sorted(self.xattrs.get(v, {}).items())))
            elif kind == "l":
                out[p] = ("l", v, 1, None, ())
            else:
                out[p] = ("d", None, None, None, ())
        return out

    def files(self):
        return [p for p, (k, _) in self.paths.items() if k == "f"]

    def dirs(self):
        return [p for p, (k, _) in self.paths.items() if k == "d"]

    def children(self, d: str):
        pre = d + "/" if d else ""
        return [p for p in self.paths if p and p.startswith(pre) and "/" not in p[len(pre):]]


def split(path: str) -> tuple[str, bytes]:
    parent, _, name = path.rpartition("/")
    return parent, name.encode()


def resolve(fs, path: str) -> int:
    ino = fs.root_ino
    if path:
        for part in path.split("/"):
            ino = fs.lookup(ino, part.encode()).bno
    return ino


class Runner:
    """Drive one workload on ``fs``; ``history[k]`` is the model after op k-1."""

    def __init__(self, fs, seed: int, *, max_file: int = 96 * 1024, ops=None):
        self.fs = fs
        self.ops = ops or self.OPS
        self.rng = random.Random(seed)
        self.model = Model()
        self.history = [self.model.snapshot()]
        self.synced = 0                 # index into history covered by an fsync
        self.overwritten: list[set[int]] = [set()]   # per op: inode ids changed in place
        self.versions: list[dict[int, bytes]] = [{}]  # per op: contents of unlinked files
        self.held = None                # (fh, iid) of a file kept open
        self.max_file = max_file
        self.log: list[str] = []

    # -- the operations (each returns after updating the model) -------------------------

    def _new_name(self, kind: str) -> str:
        dirs = self.model.dirs()
        d = self.rng.choice(dirs)
        while True:
            name = f"{kind}{self.rng.randrange(1000)}"
            path = f"{d}/{name}" if d else name
            if path not in self.model.paths:
                return path

    def op_create(self):
        path = self._new_name("f")
        parent, name = split(path)
        n = self.rng.choice([0, 10, 3000, 5000, 20000, 70000])
        data = self.rng.randbytes(n)
        self.log.append(f"create {path} {n}")
        fh, _di = self.fs.create(resolve(self.fs, parent), name, 0o644, os.O_RDWR, CTX)
        iid = self.model.next_iid
        self.model.next_iid += 1
        self.model.paths[path] = ("f", iid)
        self.model.data[iid] = b""
        self._mark()
        if data:
            self.fs.write(fh, 0, data)
            self.model.data[iid] = data
            self._mark()
        self.fs.release(fh)

    def op_write(self):
        files = self.model.files()
        if not files:
            return self.op_create()
        path = self.rng.choice(files)
        iid = self.model.paths[path][1]
        old = self.model.data[iid]
        mode = self.rng.random()
        if mode < 0.4:
            off = len(old)                                   # append
        elif mode < 0.7:
            off = self.rng.randrange(len(old) + 1)           # overwrite / extend
        else:
            off = len(old) + self.rng.randrange(1, 50000)    # past EOF: a hole
        n = self.rng.choice([1, 100, 4096, 5000, 30000])
        if off + n > self.max_file * 2:
            off = self.rng.randrange(len(old) + 1)
        data = self.rng.randbytes(n)
        self.log.append(f"write {path} @{off} +{n}")
        fh = self.fs.open(resolve(self.fs, path), os.O_RDWR)
        self.fs.write(fh, off, data)
        buf = bytearray(old)
        if off > len(buf):
            buf += bytes(off - len(buf))
        buf[off:off + n] = data
        self.model.data[iid] = bytes(buf)
        self._mark(inplace={iid} if off < len(old) else set())
        self.fs.release(fh)

    def op_truncate(self):
        files = self.model.files()
        if not files:
            return self.op_create()
        path = self.rng.choice(files)
        iid = self.model.paths[path][1]
        old = self.model.data[iid]
        size = self.rng.choice([0, len(old) // 2, len(old) + 7000, 3456, 3457, 4096, 12289])
        self.log.append(f"truncate {path} {size}")
        self.fs.setattr(resolve(self.fs, path), size=size)
        self.model.data[iid] = old[:size] + bytes(max(0, size - len(old)))
        self._mark(inplace={iid})

    def op_fallocate(self):
        """fallocate in one of the modes a VM host uses: preallocate (growing the
        file), preallocate within it, punch a hole, zero a range."""
        files = self.model.files()
        if not files:
            return self.op_create()
        path = self.rng.choice(files)
        iid = self.model.paths[path][1]
        old = self.model.data[iid]
        mode = self.rng.choice([0, FALLOC_FL_KEEP_SIZE,
                                FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                FALLOC_FL_ZERO_RANGE])
        off = self.rng.randrange(len(old) + 8192)
        length = self.rng.choice([1, 100, 4096, 5000, 30000])
        if off + length > self.max_file * 2:
            off = self.rng.randrange(len(old) + 1)
        self.log.append(f"fallocate {path} mode {mode} @{off} +{length}")
        fh = self.fs.open(resolve(self.fs, path), os.O_RDWR)
        self.fs.fallocate(fh, mode, off, length)
        buf = bytearray(old)
        end = off + length
        if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            stop = min(end, len(buf)) if mode & FALLOC_FL_KEEP_SIZE else end
            if stop > len(buf):
                buf += bytes(stop - len(buf))
            if stop > off:
                buf[off:stop] = bytes(stop - off)
        elif not mode & FALLOC_FL_KEEP_SIZE and end > len(buf):
            buf += bytes(end - len(buf))
        self.model.data[iid] = bytes(buf)
        self._mark(inplace={iid})
        self.fs.release(fh)

    def op_mkdir(self):
        path = self._new_name("d")
        parent, name = split(path)
        self.log.append(f"mkdir {path}")
        self.fs.mkdir(resolve(self.fs, parent), name, 0o755, CTX)
        self.model.paths[path] = ("d", None)
        self._mark()

    def op_symlink(self):
        path = self._new_name("l")
        parent, name = split(path)
        target = "t" * self.rng.choice([5, 300, 3456, 4000])
        self.log.append(f"symlink {path} -> {len(target)}")
        self.fs.symlink(resolve(self.fs, parent), name, target.encode(), CTX)
        self.model.paths[path] = ("l", target.encode())
        self._mark()

    def op_link(self):
        files = self.model.files()
        if not files:
            return self.op_create()
        src = self.rng.choice(files)
        dst = self._new_name("h")
        parent, name = split(dst)
        self.log.append(f"link {src} {dst}")
        self.fs.link(resolve(self.fs, src), resolve(self.fs, parent), name)
        self.model.paths[dst] = self.model.paths[src]
        self._mark()

    def op_unlink(self):
        cands = [p for p, (k, _) in self.model.paths.items() if k in "fl"]
        if not cands:
            return self.op_create()
        path = self.rng.choice(cands)
        parent, name = split(path)
        self.log.append(f"unlink {path}")
        self.fs.unlink(resolve(self.fs, parent), name)
        del self.model.paths[path]
        self._mark()

    def op_rmdir(self):
        cands = [d for d in self.model.dirs() if d and not self.model.children(d)]
        if not cands:
            return self.op_mkdir()
        path = self.rng.choice(cands)
        parent, name = split(path)
        self.log.append(f"rmdir {path}")
        self.fs.rmdir(resolve(self.fs, parent), name)
        del self.model.paths[path]
        self._mark()

    def op_rename(self):
        cands = [p for p in self.model.paths if p]
        if not cands:
            return self.op_create()
        src = self.rng.choice(cands)
        kind = self.model.paths[src][0]
        # over an existing target of the same kind, or to a new name
        same = [p for p, (k, _) in self.model.paths.items()
                if p and p != src and (k == kind or (k in "fl" and kind in "fl"))
                and not p.startswith(src + "/") and not src.startswith(p + "/")
                and (k != "d" or not self.model.children(p))]
        if same and self.rng.random() < 0.4:
            dst = self.rng.choice(same)
        else:
            dst = self._new_name(src.rpartition("/")[2][0])
            if kind == "d" and (dst.startswith(src + "/")):
                return self.op_create()
        sp, sn = split(src)
        dp, dn = split(dst)
        self.log.append(f"rename {src} {dst}")
        self.fs.rename(resolve(self.fs, sp), sn, resolve(self.fs, dp), dn)
        m = self.model.paths
        if m.get(dst) == m[src] and kind == "f":
            self._mark()        # two links to one inode: nothing happens
            return
        if kind == "d":
            moved = {p: v for p, v in m.items() if p == src or p.startswith(src + "/")}
            for p in moved:
                del m[p]
            m.pop(dst, None)
            for p, v in moved.items():
                m[dst + p[len(src):]] = v
        else:
            m[dst] = m.pop(src)
        self._mark()

    def op_fsync(self):
        files = self.model.files()
        if not files:
            return self.op_create()
        path = self.rng.choice(files)
        self.log.append(f"fsync {path}")
        fh = self.fs.open(resolve(self.fs, path), os.O_RDONLY)
        self.fs.fsync(fh, False)
        self.fs.release(fh)
        self._mark()
        self.synced = len(self.history) - 1

    def op_hold(self):
        """Open a file, unlink it, write through the handle; released later."""
        if self.held is not None:
            fh, _ = self.held
            self.log.append("release held")
            self.held = None
            self.fs.release(fh)
            self._mark()
            return
        files = self.model.files()
        if not files:
            return self.op_create()
        path = self.rng.choice(files)
        self.log.append(f"hold+unlink {path}")
        fh = self.fs.open(resolve(self.fs, path), os.O_RDWR)
        self.held = (fh, self.model.paths[path][1])
        parent, name = split(path)
        self.fs.unlink(resolve(self.fs, parent), name)
        del self.model.paths[path]
        self._mark()
        iid = self.held[1]
        data = self.rng.randbytes(9000)
        self.fs.write(fh, 0, data)
        # in place over the (no longer visible) file's blocks, before the unlink commits
        old = self.model.data[iid]
        self.model.data[iid] = data + old[len(data):]
        self._mark(inplace={iid}, versions={iid: self.model.data[iid]})

    def op_stream(self):
        """Appends through one handle, each where the last ended: a file written as a
        stream, which maps blocks ahead of EOF (``DF_PREALLOC``) until the release."""
        files = self.model.files()
        if not files:
            return self.op_create()
        path = self.rng.choice(files)
        iid = self.model.paths[path][1]
        fh = self.fs.open(resolve(self.fs, path), os.O_RDWR)
        count = self.rng.choice([2, 4, 8])
        self.log.append(f"stream {path} x{count}")
        try:
            for _ in range(count):
                old = self.model.data[iid]
                n = self.rng.choice([4096, 5000, 16384, 30000])
                if len(old) + n > self.max_file * 2:
                    break
                data = self.rng.randbytes(n)
                self.fs.write(fh, len(old), data)
                self.model.data[iid] = old + data
                self._mark()
        finally:
            self.fs.release(fh)
            self._mark()

    def op_scatter(self):
        """One-block writes at every other block: a file of many extents (an extent
        tree with index nodes), which truncate and unlink free over several steps."""
        files = self.model.files()
        if not files:
            return self.op_create()
        path = self.rng.choice(files)
        iid = self.model.paths[path][1]
        ino = resolve(self.fs, path)
        fh = self.fs.open(ino, os.O_RDWR)
        base = self.rng.randrange(4) * 4096
        count = self.rng.choice([40, 90, 200])
        self.log.append(f"scatter {path} @{base} x{count}")
        try:
            for i in range(count):
                off = base + 2 * i * 4096
                data = self.rng.randbytes(4096)
                old = self.model.data[iid]
                self.fs.write(fh, off, data)
                buf = bytearray(old)
                if off > len(buf):
                    buf += bytes(off - len(buf))
                buf[off:off + 4096] = data
                self.model.data[iid] = bytes(buf)
                self._mark(inplace={iid} if off < len(old) else set())
        finally:
            self.fs.release(fh)

    def op_xattr(self):
        files = self.model.files()
        if not files:
            return self.op_create()
        path = self.rng.choice(files)
        iid = self.model.paths[path][1]
        name = self.rng.choice([b"user.a", b"user.b", b"user.c", b"user.d"])
        attrs = self.model.xattrs.setdefault(iid, {})
        ino = resolve(self.fs, path)
        if self.rng.random() < 0.3:
            self.log.append(f"removexattr {path} {name.decode()}")
            try:
                self.fs.removexattr(ino, name)
            except FSError as e:
                assert e.errno == errno.ENODATA and name not in attrs, e
                return
            del attrs[name]
        else:
            value = self.rng.randbytes(self.rng.choice([0, 10, 300, 1500, 3000]))
            self.log.append(f"setxattr {path} {name.decode()} {len(value)}")
            try:
                self.fs.setxattr(ino, name, value)
            except FSError as e:
                assert e.errno == errno.ENOSPC, e      # past inline + one block
                return
            attrs[name] = value
        self._mark()

    OPS = [("create", 5), ("write", 6), ("truncate", 2), ("fallocate", 2), ("mkdir", 2),
           ("symlink", 1), ("link", 1), ("unlink", 2), ("rmdir", 1), ("rename", 3),
           ("fsync", 3), ("hold", 1), ("xattr", 2)]

    # metadata-heavy with frequent fsyncs: the journal wraps and checkpoints
    SYNC_HEAVY = [("create", 4), ("write", 2), ("truncate", 1), ("mkdir", 2), ("symlink", 2),
                  ("link", 1), ("unlink", 3), ("rmdir", 1), ("rename", 3), ("fsync", 5),
                  ("hold", 1), ("xattr", 2)]

    # files of hundreds of extents, truncated and unlinked
    FRAGMENTED = [("create", 3), ("scatter", 2), ("truncate", 3), ("unlink", 2),
                  ("fsync", 3), ("write", 2), ("hold", 1), ("rename", 1)]

    # files written as streams (blocks mapped ahead of EOF), truncated, extended,
    # written past their end and fsynced in between
    STREAMED = [("create", 3), ("stream", 5), ("truncate", 2), ("write", 2),
                ("fallocate", 1), ("unlink", 1), ("fsync", 3), ("hold", 1)]

    def _mark(self, inplace: set[int] = frozenset(), versions=None) -> None:
        self.history.append(self.model.snapshot())
        self.overwritten.append(set(inplace))
        self.versions.append(dict(versions or {}))

    def step(self) -> None:
        names = [n for n, _ in self.ops]
        weights = [w for _, w in self.ops]
        getattr(self, "op_" + self.rng.choices(names, weights)[0])()

    def run(self, nops: int) -> None:
        for _ in range(nops):
            self.step()


def read_tree(fs) -> dict[str, tuple]:
    """The mounted tree as {path: (kind, data or target, nlink, None)}."""
    out = {"": ("d", None, None, None, ())}
    stack = [("", fs.root_ino)]
    while stack:
        path, ino = stack.pop()
        fh = fs.opendir(ino)
        try:
            entries = [(n, di) for n, di, _off in fs.readdir(fh, 0) if n not in (b".", b"..")]
        finally:
            fs.releasedir(fh)
        for name, di in entries:
            p = f"{path}/{name.decode()}" if path else name.decode()
            if S.S_ISDIR(di.mode):
                out[p] = ("d", None, None, None, ())
                stack.append((p, di.bno))
            elif S.S_ISLNK(di.mode):
                out[p] = ("l", fs.readlink(di.bno), 1, None, ())
            else:
                fh2 = fs.open(di.bno, os.O_RDONLY)
                try:
                    data = fs.read(fh2, 0, di.size + 1)
                finally:
                    fs.release(fh2)
                assert len(data) == di.size, f"{p}: read {len(data)} of {di.size} bytes"
                xattrs = tuple(sorted((k, fs.getxattr(di.bno, k))
                                      for k in fs.listxattr(di.bno)))
                out[p] = ("f", data, di.nlink, None, xattrs)
    return out


def _sectors_ok(got: bytes, versions: list[bytes]) -> bool:
    for s in range(0, len(got), SECTOR):
        piece = got[s:s + SECTOR]
        if not any(v[s:s + len(piece)].ljust(len(piece), b"\0") == piece for v in versions):
            return False
    return True


def check_recovered(runner: Runner, tree: dict[str, tuple], done: int,
                    synced: int) -> str | None:
    """None if ``tree`` is a state the workload may legally leave, else why not.

    Args:
        runner: the workload (its history and last fsync).
        tree: ``read_tree`` of the recovered volume.
        done: history index reached before the power cut (the operation in flight
            may or may not have committed, so ``done + 1`` is a candidate too).
        synced: history index covered by the last fsync that returned before the cut.
    """
    lo = synced
    hi = min(done + 1, len(runner.history) - 1)
    inplace = set().union(*runner.overwritten[lo + 1:hi + 1]) if hi > lo else set()
    reasons = []
    for k in range(hi, lo - 1, -1):
        snap = runner.history[k]
        if set(snap) != set(tree):
            reasons.append(f"state {k}: paths differ: missing {sorted(set(snap) - set(tree))[:5]}"
                           f" extra {sorted(set(tree) - set(snap))[:5]}")
            continue
        bad = None
        for p, (kind, data, nlink, iid, xattrs) in snap.items():
            gk, gdata, gnlink, _, gxattrs = tree[p]
            if gk != kind:
                bad = f"{p}: kind {gk} != {kind}"
            elif kind == "l" and gdata != data:
                bad = f"{p}: symlink target differs"
            elif kind == "f":
                if gxattrs != xattrs:
                    bad = f"{p}: xattrs {[(k, len(v)) for k, v in gxattrs]} != " \
                          f"{[(k, len(v)) for k, v in xattrs]}"
                elif gnlink != nlink:
                    bad = f"{p}: nlink {gnlink} != {nlink}"
                elif len(gdata) != len(data):
                    bad = f"{p}: size {len(gdata)} != {len(data)}"
                elif gdata != data:
                    if iid in inplace:
                        versions = [runner.history[j][q][1] for j in range(lo, hi + 1)
                                    for q, v in runner.history[j].items()
                                    if v[0] == "f" and v[3] == iid]
                        versions += [vs[iid] for vs in runner.versions[lo:hi + 1] if iid in vs]
                        if not _sectors_ok(gdata, versions):
                            bad = f"{p}: sectors from no version of the file"
                    else:
                        bad = f"{p}: contents differ"
            if bad:
                break
        if bad is None:
            return None
        reasons.append(f"state {k}: {bad}")
    return (f"recovered tree matches no state in [{lo}, {hi}] (last fsync at {lo}):\n  "
            + "\n  ".join(reasons))


__all__ = ["Runner", "Model", "read_tree", "check_recovered", "resolve", "FSError"]
