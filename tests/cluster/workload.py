"""A metadata-heavy workload for the cluster failure tests, run as its own process.

    python -m tests.cluster.workload TOP NODE LOG [--seed N] [--strict] [--stop FILE]
                                                  [--hold NAME]

Works in ``TOP/NODE`` (private) and ``TOP/shared`` (names prefixed ``NODE-``, so
nodes contend for the shared directory's lock): creates, appends, renames, links,
unlinks, truncates, fallocate (punch, zero range, preallocate), xattrs, mkdir/rmdir,
readdir.  Every few steps it writes a file
``sync-N``, fsyncs it and then appends ``{"fsynced": path, "sha256": ..}`` to LOG
(itself fsync'ed), so the test knows which files must survive a crash.  ``--hold``
opens ``TOP/NODE/NAME`` for writing first and keeps it open (a cluster open mode).

It runs until ``--stop FILE`` exists, then checks its own tree against what it did
(nothing lost) and exits 0.  An error ends it: with ``--strict`` it exits 1 and
says why (a survivor's applications must see none); otherwise (the node that is
killed) it exits 0 quietly.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import random
import sys


FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def fallocate(path: str, mode: int, off: int, length: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        if _libc.fallocate(fd, mode, off, length) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), path)
    finally:
        os.close(fd)


class Workload:
    def __init__(self, top: str, node: str, log: str, seed: int):
        self.top = top
        self.node = node
        self.mine = os.path.join(top, node)
        self.shared = os.path.join(top, "shared")
        self.rng = random.Random(seed)
        self.logf = open(log, "a")
        self.files: dict[str, int] = {}       # path -> inode (ours: hard links share)
        self.contents: dict[int, bytes] = {}  # inode -> contents (what we expect)
        self.dirs: set[str] = {self.mine}
        self.n = 0
        self.ops = 0
        self.hold = None

    def note(self, **kw) -> None:
        self.logf.write(json.dumps(kw) + "\n")
        self.logf.flush()
        os.fsync(self.logf.fileno())

    def name(self, prefix: str = "f") -> str:
        self.n += 1
        if self.rng.random() < 0.3:
            return os.path.join(self.shared, f"{self.node}-{prefix}{self.n}")
        d = self.rng.choice(sorted(self.dirs))
        return os.path.join(d, f"{prefix}{self.n}")

    def data(self) -> bytes:
        size = self.rng.choice([0, 1, 100, 3000, 5000, 20000])
        return self.rng.randbytes(size)

    def step(self) -> None:
        self.ops += 1
        r = self.rng.random()
        files = sorted(self.files)
        if r < 0.2 or not files:
            path, data = self.name(), self.data()
            with open(path, "wb") as f:
                f.write(data)
            self.files[path] = self.new_inode(data)
        elif r < 0.3:
            path = self.rng.choice(files)
            extra = self.data()[:500]
            with open(path, "ab") as f:
                f.write(extra)
            self.contents[self.files[path]] += extra
        elif r < 0.42:
            path = self.rng.choice(files)
            new = self.name("r")
            os.rename(path, new)
            self.files[new] = self.files.pop(path)
        elif r < 0.52:
            path = self.rng.choice(files)
            os.unlink(path)
            del self.files[path]
        elif r < 0.58:
            path = self.rng.choice(files)
            new = self.name("l")
            os.link(path, new)
            self.files[new] = self.files[path]
        elif r < 0.61:
            path = self.rng.choice(files)
            size = self.rng.choice([0, 10, 5000])
            os.truncate(path, size)
            iid = self.files[path]
            old = self.contents[iid]
            self.contents[iid] = old[:size] + bytes(max(0, size - len(old)))
        elif r < 0.64:
            self.fallocate(self.rng.choice(files))
        elif r < 0.7:
            path = self.rng.choice(files)
            os.setxattr(path, "user.wl", str(self.ops).encode())
        elif r < 0.76:
            self.n += 1
            d = os.path.join(self.mine, f"d{self.n}")
            os.mkdir(d)
            self.dirs.add(d)
        elif r < 0.8:
            empty = [d for d in self.dirs if d != self.mine and
                     not any(os.path.dirname(p) == d for p in self.files)]
            if empty:
                d = self.rng.choice(sorted(empty))
                os.rmdir(d)
                self.dirs.discard(d)
        elif r < 0.88:
            self.check_listing()
        else:
            self.sync_file()

    def fallocate(self, path: str) -> None:
        iid = self.files[path]
        buf = bytearray(self.contents[iid])
        mode = self.rng.choice([0, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                FALLOC_FL_ZERO_RANGE])
        off = self.rng.randrange(len(buf) + 4096)
        length = self.rng.choice([1, 4096, 10000])
        fallocate(path, mode, off, length)
        end = off + length
        if mode & FALLOC_FL_KEEP_SIZE:
            end = min(end, len(buf))
        if end > len(buf):
            buf += bytes(end - len(buf))
        if mode and end > off:
            buf[off:end] = bytes(end - off)
        self.contents[iid] = bytes(buf)

    def new_inode(self, data: bytes) -> int:
        self.n += 1
        self.contents[self.n] = data
        return self.n

    def sync_file(self) -> None:
        self.n += 1
        path = os.path.join(self.mine, f"sync-{self.n}")
        data = self.rng.randbytes(self.rng.choice([10, 4096, 30000]))
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.note(fsynced=os.path.relpath(path, self.top),
                  sha256=hashlib.sha256(data).hexdigest())

    def check_listing(self) -> None:
        for d in (self.mine, self.shared):
            names = set(os.listdir(d))
            want = {os.path.basename(p) for p in self.files if os.path.dirname(p) == d}
            want |= {os.path.basename(x) for x in self.dirs if os.path.dirname(x) == d}
            if d == self.shared:
                names = {n for n in names if n.startswith(self.node + "-")}
            else:
                names = {n for n in names if not n.startswith("sync-")
                         and n != self.hold}
            if names != want:
                raise AssertionError(f"{d}: listed {sorted(names)[:10]}, expected "
                                     f"{sorted(want)[:10]} (diff {sorted(names ^ want)[:10]})")

    def verify(self) -> None:
        """Everything this workload made is there with its contents."""
        self.check_listing()
        for path, iid in self.files.items():
            data = self.contents[iid]
            with open(path, "rb") as f:
                got = f.read()
            if got != data:
                raise AssertionError(f"{path}: {len(got)} bytes, expected {len(data)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("top")
    p.add_argument("node")
    p.add_argument("log")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strict", action="store_true")
    p.add_argument("--stop")
    p.add_argument("--hold")
    args = p.parse_args(argv)
    wl = Workload(args.top, args.node, args.log, args.seed)
    held = None
    try:
        os.makedirs(wl.mine, exist_ok=True)
        os.makedirs(wl.shared, exist_ok=True)
        wl.hold = args.hold
        if args.hold:
            held = os.open(os.path.join(wl.mine, args.hold), os.O_CREAT | os.O_RDWR, 0o644)
            os.write(held, b"held")
            os.fsync(held)
            wl.note(holding=os.path.relpath(os.path.join(wl.mine, args.hold), args.top))
        wl.note(started=True)
        while not (args.stop and os.path.exists(args.stop)):
            wl.step()
        wl.verify()
        wl.note(finished=wl.ops)
        return 0
    except (OSError, AssertionError) as e:
        if args.strict:
            print(f"workload {args.node} failed after {wl.ops} operations: "
                  f"{type(e).__name__}: {e}", file=sys.stderr)
            try:
                wl.note(error=str(e), ops=wl.ops)
            except OSError:
                pass
            return 1
        return 0
    finally:
        if held is not None:
            try:
                os.close(held)
            except OSError:
                pass


if __name__ == "__main__":
    sys.exit(main())
