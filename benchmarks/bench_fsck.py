#!/usr/bin/env python3
"""fsck benchmark: ``clusterfs fsck -fn`` against ``e2fsck -fn``, side by side.

Builds the same tree on both file systems: 100,000 files in nested directories
(10 x 10 directories of 1,000 files each) holding 4 GiB of data, sizes drawn from a
log-normal distribution and scaled to the total (``--quick``: 10,000 files and
256 MiB).  clusterfs is populated through its file-system API (no FUSE: the same
on-disk result, much faster); ext4 lives on a loop device (``losetup``) and is
populated through a real mount.  Then the two checkers take turns on their volumes,
``--repeat`` rounds (page cache warm for both; the best run of each counts): timed
in the same minutes, both see the same drift in the speed of a shared machine.
fsck runs as an installed program would: byte-compiled (one untimed run first), with
the hardware crc32c of the ``crc32c`` package (a dependency of clusterfs).

The loop device and the ext4 mount are cleaned up by name whatever happens, and the
work directory is removed unless ``--keep``.  The LAST line printed is one JSON
object with the keys ``fsck_s``, ``e2fsck_s`` and ``ratio`` (fsck_s / e2fsck_s;
target <= 10), plus the sizes used.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

BLOCK = 4096


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def plan(files: int, total: int, seed: int = 7) -> list[tuple[str, str, int]]:
    """(directory, name, size) of every file: 10 top directories of 10 subdirectories
    each, files spread evenly; sizes log-normal, scaled so they sum to ``total``."""
    rng = random.Random(seed)
    raw = [rng.lognormvariate(0, 1.2) for _ in range(files)]
    scale = total / sum(raw)
    sizes = [max(1, int(r * scale)) for r in raw]
    sizes[0] += total - sum(sizes)
    out = []
    per = math.ceil(files / 100)
    for i, size in enumerate(sizes):
        leaf = i // per
        out.append((f"d{leaf // 10:02d}/s{leaf % 10:02d}", f"f{i:06d}", size))
    return out


def payload() -> bytes:
    return random.Random(11).randbytes(1 << 20) * 2


def populate_clusterfs(img: str, tree, vol_bytes: int) -> None:
    from clusterfs.commands.mkfs import make_volume
    from clusterfs.fs.posix import Ctx
    from clusterfs.fs.single_node import SingleNodeMount
    make_volume(img, vol_bytes, slots=2)
    m = SingleNodeMount(img)
    fs = m.start()
    ctx = Ctx(0, 0)
    data = payload()
    dirs: dict[str, int] = {"": fs.root_ino}
    t0 = time.monotonic()
    try:
        for i, (d, name, size) in enumerate(tree):
            if d not in dirs:
                parent = ""
                for part in d.split("/"):
                    path = f"{parent}/{part}" if parent else part
                    if path not in dirs:
                        dirs[path] = fs.mkdir(dirs[parent], part.encode(), 0o755, ctx).bno
                    parent = path
            fh, _di = fs.create(dirs[d], name.encode(), 0o644, os.O_WRONLY, ctx)
            off = 0
            while off < size:
                n = min(size - off, 1 << 20)
                s = (i * 4099 + off) % (1 << 20)
                fs.write(fh, off, data[s:s + n])
                off += n
            fs.release(fh)
            if i and i % 10000 == 0:
                log(f"  clusterfs: {i} files ({time.monotonic() - t0:.0f} s)")
    finally:
        m.stop()


def populate_ext4(mnt: str, tree) -> None:
    data = payload()
    made = set()
    for i, (d, name, size) in enumerate(tree):
        full = os.path.join(mnt, d)
        if d not in made:
            os.makedirs(full, exist_ok=True)
            made.add(d)
        with open(os.path.join(full, name), "wb") as f:
            off = 0
            while off < size:
                n = min(size - off, 1 << 20)
                s = (i * 4099 + off) % (1 << 20)
                f.write(data[s:s + n])
                off += n


def timed(cmd: list[str], ok=(0,), env=None) -> tuple[float, subprocess.CompletedProcess]:
    t = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    dt = time.monotonic() - t
    if proc.returncode not in ok:
        raise SystemExit(f"bench_fsck: {' '.join(cmd)} exited {proc.returncode}:\n"
                         f"{proc.stdout}\n{proc.stderr}")
    return dt, proc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10,000 files and 256 MiB")
    ap.add_argument("--files", type=int, help="number of files (overrides the default)")
    ap.add_argument("--data", type=int, help="total bytes of file data")
    ap.add_argument("--repeat", type=int, default=3,
                    help="rounds, each timing both checkers in turn (the best counts)")
    ap.add_argument("--dir", help="work directory (default: a new one in /var/tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--skip-ext4", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    files = args.files or (10_000 if args.quick else 100_000)
    total = args.data or ((256 << 20) if args.quick else (4 << 30))
    # room for the data, one 4 KiB dinode per file, trees, journals and slack
    vol_bytes = int((total + files * 2 * BLOCK) * 1.25) + (128 << 20)
    vol_bytes -= vol_bytes % (1 << 20)
    work = args.dir or tempfile.mkdtemp(prefix="bench-fsck-", dir="/var/tmp")
    os.makedirs(work, exist_ok=True)
    tree = plan(files, total)
    img = os.path.join(work, "clusterfs.img")
    ext_img = os.path.join(work, "ext4.img")
    mnt = os.path.join(work, "ext4-mnt")
    loop = None
    mounted = False
    py = sys.executable
    try:
        log(f"bench_fsck: {files} files, {total >> 20} MiB of data, volumes of "
            f"{vol_bytes >> 20} MiB in {work}")
        t = time.monotonic()
        populate_clusterfs(img, tree, vol_bytes)
        log(f"  clusterfs populated in {time.monotonic() - t:.1f} s")
        if not args.skip_ext4:
            with open(ext_img, "wb") as f:
                f.truncate(vol_bytes)
            subprocess.run(["mkfs.ext4", "-q", "-F", ext_img], check=True)
            loop = subprocess.run(["losetup", "--find", "--show", ext_img], check=True,
                                  capture_output=True, text=True).stdout.strip()
            os.makedirs(mnt, exist_ok=True)
            subprocess.run(["mount", loop, mnt], check=True)
            mounted = True
            t = time.monotonic()
            populate_ext4(mnt, tree)
            subprocess.run(["umount", mnt], check=True)
            mounted = False
            log(f"  ext4 populated in {time.monotonic() - t:.1f} s")
        # like an installed program: byte-compiled once (a first, untimed run)
        env = dict(os.environ)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        fsck_cmd = [py, "-m", "clusterfs.cli", "fsck", "-fn", img]
        timed(fsck_cmd, env=env)
        # the two checkers take turns, so that both are timed in the same minutes (the
        # speed of a shared machine drifts from one minute to the next)
        fsck_runs, e2_runs = [], []
        for _ in range(args.repeat):
            dt, proc = timed(fsck_cmd, env=env)
            fsck_runs.append(dt)
            if loop:
                e2_runs.append(timed(["e2fsck", "-fn", loop])[0])
        log("  " + proc.stdout.strip().replace("\n", "\n  "))
        log(f"  clusterfs fsck -fn: {', '.join(f'{x:.2f}' for x in fsck_runs)} s")
        if e2_runs:
            log(f"  e2fsck -fn:         {', '.join(f'{x:.2f}' for x in e2_runs)} s")
            log(f"  ratio, run by run:  "
                f"{', '.join(f'{a / b:.1f}' for a, b in zip(fsck_runs, e2_runs))}")
        else:
            e2_runs = [float("nan")]
        fsck_s, e2_s = min(fsck_runs), min(e2_runs)
        result = {"fsck_s": round(fsck_s, 3), "e2fsck_s": round(e2_s, 3),
                  "ratio": round(fsck_s / e2_s, 2) if e2_s == e2_s else None,
                  "files": files, "data_bytes": total, "quick": bool(args.quick)}
    finally:
        if mounted:
            subprocess.run(["umount", mnt], capture_output=True)
        if loop:
            subprocess.run(["losetup", "-d", loop], capture_output=True)
        if not args.keep and not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
