#!/usr/bin/env python3
"""Clone benchmark: ``clusterfs clone`` of a VM image beside ``cp`` of it on ext4.

One run mounts two targets at once, as ``bench_io.py`` does (its target set-up is
reused): a single-node ``clusterfs mount`` of a fresh volume, and ext4 on a loop
device over an image file (both image files in the work directory, /var/tmp by
default).  On each it writes one image fully (2 GiB; 256 MiB with ``--quick``) in
1 MiB requests and fsyncs it.  Then, each time after ``sync`` and a page-cache drop
(so that neither side works from cached data), it measures, ``--repeat`` times
(default 3), keeping the best:

* ``clusterfs clone IMAGE CLONE_k`` on clusterfs: the whole command, Python's
  start-up and the final fsync included (what a user waits for);
* the same clone made by this process's own ``os.copy_file_range`` loop and fsync
  (the file system's share of that time);
* ``cp IMAGE COPY_k`` then ``sync`` on ext4 (ext4 shares no blocks: the data is
  copied; coreutils uses copy_file_range there, an in-kernel copy).

It checks that each clone reads back the image's first and last MiB and that df's
used blocks on clusterfs grew by a few blocks per clone at most, prints a table
with the ratio (cp on ext4 over clusterfs clone), and as the LAST line one JSON
object: ``clone_2gib_s`` (``clone_256mib_s`` with ``--quick``), ``clone_api_..._s``,
``cp_ext4_..._s``, ``cp_over_clone``, ``df_growth_blocks``.  Target: a 2 GiB clone
under 0.5 s.  Needs root (drop_caches, losetup, mount); everything mounted is
unmounted and the loop device detached, also on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from bench_io import drop_caches, target_clusterfs, target_ext4  # noqa: E402

PY = sys.executable
MiB = 1 << 20


def note(msg: str) -> None:
    print(f"bench_clone: {msg}", file=sys.stderr, flush=True)


def write_image(path: str, size: int, buf: bytes) -> float:
    """Write ``size`` bytes in 1 MiB requests, fsync; returns seconds."""
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(size // len(buf)):
            # every MiB differs (no two blocks of the image alike)
            os.write(fd, i.to_bytes(8, "little") + buf[8:])
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def cold() -> None:
    os.sync()
    drop_caches()


def df_used(path: str) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize // 4096


def clone_cli(src: str, dst: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([PY, "-m", "clusterfs.cli", "clone", src, dst], check=True, cwd=REPO)
    return time.perf_counter() - t0


def clone_api(src: str, dst: str) -> float:
    t0 = time.perf_counter()
    fi = os.open(src, os.O_RDONLY)
    fo = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        size = os.fstat(fi).st_size
        done = 0
        while done < size:
            n = os.copy_file_range(fi, fo, size - done, done, done)
            if n <= 0:
                raise OSError("copy_file_range stopped short")
            done += n
        os.fsync(fo)
    finally:
        os.close(fi)
        os.close(fo)
    return time.perf_counter() - t0


def cp_ext4(src: str, dst: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(["cp", src, dst], check=True)
    os.sync()
    return time.perf_counter() - t0


def same_ends(a: str, b: str, size: int) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        if fa.read(MiB) != fb.read(MiB):
            return False
        fa.seek(size - MiB)
        fb.seek(size - MiB)
        return fa.read(MiB) == fb.read(MiB) and os.fstat(fb.fileno()).st_size == size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 256 MiB image (under a minute)")
    ap.add_argument("--repeat", type=int, default=3, help="measurements of each (best kept)")
    ap.add_argument("--dir", help="work directory (default: a new one in /var/tmp)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_clone: needs root (drop_caches, losetup, mount)", file=sys.stderr)
        return 2
    size = (256 if args.quick else 2048) * MiB
    label = "256mib" if args.quick else "2gib"
    # (what bench_io's target set-ups read from their arguments)
    args.volume_size = size * 2 + 1024 * MiB
    args.cfs_opts = ""
    args.profile = None
    work = tempfile.mkdtemp(prefix="bench_clone-", dir=args.dir or "/var/tmp")
    os.chmod(work, 0o755)
    buf = os.urandom(MiB)
    res: dict[str, list[float]] = {"clone": [], "api": [], "cp": []}
    t_start = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            mounted = {}
            for t, setup in (("clusterfs", target_clusterfs), ("ext4", target_ext4)):
                tdir = os.path.join(work, t)
                os.mkdir(tdir)
                mounted[t] = stack.enter_context(setup(tdir, args))[0]
            cfs, ext4 = mounted["clusterfs"], mounted["ext4"]
            img_c, img_e = os.path.join(cfs, "vm.img"), os.path.join(ext4, "vm.img")
            note(f"writing the {size // MiB} MiB image on both")
            w_c = write_image(img_c, size, buf)
            w_e = write_image(img_e, size, buf)
            note(f"written in {w_c:.1f} s (clusterfs), {w_e:.1f} s (ext4)")
            growth = 0
            for k in range(args.repeat):
                cold()
                before = df_used(cfs)
                res["clone"].append(clone_cli(img_c, os.path.join(cfs, f"clone{k}.img")))
                growth = max(growth, df_used(cfs) - before)
                cold()
                res["api"].append(clone_api(img_c, os.path.join(cfs, f"api{k}.img")))
                cold()
                res["cp"].append(cp_ext4(img_e, os.path.join(ext4, f"copy{k}.img")))
                os.unlink(os.path.join(ext4, f"copy{k}.img"))      # room for the next
                note(f"round {k + 1}: clone {res['clone'][-1]:.3f} s, copy_file_range "
                     f"{res['api'][-1]:.3f} s, cp on ext4 {res['cp'][-1]:.3f} s")
            for k in range(args.repeat):
                for name in (f"clone{k}.img", f"api{k}.img"):
                    if not same_ends(img_c, os.path.join(cfs, name), size):
                        raise RuntimeError(f"{name} differs from the image")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best = {k: min(v) for k, v in res.items()}
    ratio = best["cp"] / best["clone"]
    print(f"bench_clone: {size // MiB} MiB image, best of {args.repeat}, caches dropped "
          f"before each")
    print(f"{'clusterfs clone (command)':<34}{best['clone']:>9.3f} s")
    print(f"{'clusterfs copy_file_range + fsync':<34}{best['api']:>9.3f} s")
    print(f"{'cp + sync on ext4 (loop device)':<34}{best['cp']:>9.3f} s")
    print(f"{'cp on ext4 / clusterfs clone':<34}{ratio:>9.1f} x")
    print(f"{'df growth per clone':<34}{growth:>9d} blocks")
    print(f"bench_clone: {time.monotonic() - t_start:.0f} s")
    out = {f"clone_{label}_s": round(best["clone"], 4),
           f"clone_api_{label}_s": round(best["api"], 4),
           f"cp_ext4_{label}_s": round(best["cp"], 4),
           "cp_over_clone": round(ratio, 1), "df_growth_blocks": growth,
           "image_mib": size // MiB}
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
