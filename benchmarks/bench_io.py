#!/usr/bin/env python3
"""I/O benchmark: clusterfs side by side with the raw file, a pyfuse3 passthrough and ext4.

One run measures the same workloads on four targets, all mounted at once:

* ``raw``: the host file system that holds the volume file, used directly (the
  physical limit: data goes to a plain file next to the volume image);
* ``passthru``: ``benchmarks/passthrough.py``, a plain pyfuse3 passthrough of a local
  directory that this script mounts (the Python FUSE floor);
* ``ext4``: ext4 on a loop device over an image file (losetup, mkfs.ext4, mount);
* ``clusterfs``: a single-node ``clusterfs mount`` of a fresh volume (default mkfs
  and mount options);
* ``cluster``: a one-node cluster mount of another fresh volume (``--key``, its own
  lock manager on loopback), for the sequential phases only: its page cache works
  under the inode locks, against the single-node mount's.

Workloads (the page cache is dropped before each phase, so reads come from the file
system, and every write phase ends with fsync, counted in its time):

* sequential write of one file (2 GiB; 256 MiB with ``--quick``) in 1 MiB requests,
  then fsync; sequential read of it in 1 MiB requests; a re-read (read once more
  untimed, then timed, no cache drop: what the target's page cache gives);
* 4 KiB random writes (overwrites inside that file) for a fixed time, then fsync;
  4 KiB random reads for a fixed time (``POSIX_FADV_RANDOM``, so the kernel reads
  only what is asked, and ``POSIX_FADV_DONTNEED`` before each turn, so that blocks
  read earlier do not come from the page cache).  Offsets come from one list of a
  million random blocks.  These two go round the targets in quarter-second turns
  until each has had its time, so that all see the same background;
* metadata: create 10,000 empty files in one directory (2,000 with ``--quick``),
  fsync the directory; stat them all (after a cache drop, so the kernel asks the
  file system); unlink them all, fsync the directory.  The rate is files per
  second through all three steps.  Each step goes round the targets 250 files at
  a time.

For the two FUSE targets it also reports the CPU time their server process spent
per operation: a figure that other work on the host disturbs far less than the
rates (which compete for two things the host shares: CPU and disk).  To the same
end the benchmark and the servers it starts run at nice -10 (``--nice``), each
sequential pass runs twice (in rotating order, the better counts), and
``--repeat N`` runs every workload N times more and keeps each figure's best.

It prints a table, then as the LAST line one JSON object with ``seq_write_ratio``,
``seq_read_ratio``, ``rand_write_ratio``, ``rand_read_ratio`` and ``meta_ratio``
(each clusterfs / passthrough; targets: data ratios >= 0.8, meta_ratio >= 1.5 since
issue 17), ``meta_ratio_ext4`` (clusterfs / ext4 on a loop device; the table has a
column of such ratios beside the passthrough's),
``cluster_seq_write_vs_single``, ``cluster_seq_read_vs_single`` and
``cluster_seq_reread_vs_single`` (cluster mount / single-node mount; target for the
re-read >= 0.8) plus every target's figures.  Needs root (drop_caches, losetup, mount).  Everything
mounted is unmounted and every loop device attached is detached, also on failure;
only processes this script started are stopped, by PID.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
MiB = 1 << 20
BLOCK = 4096

TARGETS = ("raw", "passthru", "ext4", "clusterfs", "cluster")
LABELS = {"raw": "raw file", "passthru": "passthru", "ext4": "ext4/loop",
          "clusterfs": "clusterfs", "cluster": "cfs-cluster"}
SEQ_ONLY = ("cluster",)   # targets that run the sequential phases only


def note(msg: str) -> None:
    print(f"bench_io: {msg}", file=sys.stderr, flush=True)


# ---- cache control ------------------------------------------------------------------

def drop_caches() -> None:
    """Write back, then drop page cache, dentries and inodes."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- workloads ------------------------------------------------------------------------

def seq_write(path: str, size: int, buf: bytes) -> float:
    """Write ``size`` bytes in 1 MiB requests, fsync; returns MiB/s."""
    drop_caches()
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(size // len(buf)):
            if os.write(fd, buf) != len(buf):
                raise OSError("short write")
        os.fsync(fd)
    finally:
        os.close(fd)
    return size / MiB / (time.perf_counter() - t0)


def seq_read(path: str, size: int, buf: bytes, *, cold: bool = True) -> float:
    """Read the file back in 1 MiB requests; returns MiB/s (checks size and content).
    ``cold``: drop the caches first (else the file is read once untimed, so that
    the timed pass is a re-read of what the target caches)."""
    if cold:
        drop_caches()
    else:
        seq_read(path, size, buf, cold=True)
    into = bytearray(len(buf))
    total = 0
    first = last = b""
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            n = os.readv(fd, [into])
            if n == 0:
                break
            if total == 0:
                first = bytes(into[:n])
            total += n
        last = bytes(into[:len(buf)])
    finally:
        os.close(fd)
    rate = total / MiB / (time.perf_counter() - t0)
    if total != size or first != buf or last != buf:
        raise RuntimeError(f"{path}: read back {total} bytes (expected {size}) or "
                           f"different content")
    return rate


@functools.lru_cache(maxsize=4)
def _offsets(size: int, seed: int, n: int = 1 << 20) -> list[int]:
    rng = random.Random(seed)
    nblocks = size // BLOCK
    return [rng.randrange(nblocks) * BLOCK for _ in range(n)]


SLICE = 0.25      # seconds a random I/O phase stays on one target before the next


def rand_io(kind: str, mounted: dict, args) -> dict:
    """4 KiB random writes (overwrites, then fsync) or reads of the file ``big`` on
    every target, for ``args.seconds`` each, in SLICE-long turns round the targets,
    so that all of them see the same mix of whatever else the host is doing.

    Returns, per target, the IOPS (the fsync counted in the time) and the CPU
    microseconds its server spent per operation (``cpu_<kind>``).
    """
    write = kind == "rand_write"
    drop_caches()
    offs = _offsets(args.size, 1 if write else 2)
    data = os.urandom(BLOCK)
    fds, ops, spent, cpu = {}, {}, {}, {}
    try:
        for t, (top, _pid) in mounted.items():
            fds[t] = os.open(os.path.join(top, "big"), os.O_WRONLY if write else os.O_RDONLY)
            if not write:
                os.posix_fadvise(fds[t], 0, 0, os.POSIX_FADV_RANDOM)
            ops[t], spent[t], cpu[t] = 0, 0.0, 0.0
        while any(spent[t] < args.seconds for t in mounted):
            for t, (top, pid) in mounted.items():
                if spent[t] >= args.seconds:
                    continue
                fd, n = fds[t], ops[t]
                if not write:
                    # what earlier turns read stays out of the client's page cache
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                c0 = cpu_seconds(pid)
                t0 = time.perf_counter()
                deadline = t0 + min(SLICE, args.seconds - spent[t])
                while time.perf_counter() < deadline:
                    for off in offs[n & 0xFFFFF:(n & 0xFFFFF) + 64]:
                        if write:
                            os.pwrite(fd, data, off)
                        elif len(os.pread(fd, BLOCK, off)) != BLOCK:
                            raise RuntimeError(f"{t}: short read at {off}")
                    n += 64
                spent[t] += time.perf_counter() - t0
                cpu[t] += cpu_seconds(pid) - c0
                ops[t] = n
        if write:
            for t, (top, pid) in mounted.items():
                c0 = cpu_seconds(pid)
                t0 = time.perf_counter()
                os.fsync(fds[t])
                spent[t] += time.perf_counter() - t0
                cpu[t] += cpu_seconds(pid) - c0
    finally:
        for fd in fds.values():
            os.close(fd)
    out = {}
    for t, (top, pid) in mounted.items():
        out[t] = {kind: ops[t] / spent[t]}
        if pid is not None:
            out[t]["cpu_" + kind] = cpu[t] * 1e6 / ops[t]
    return out


META_CHUNK = 250   # files a metadata step does on one target before the next


def meta_io(mounted: dict, args) -> dict:
    """Create ``args.files`` empty files in one new directory per target, fsync it;
    stat them all (after a cache drop, so the kernel asks the file system); unlink
    them all, fsync the directory.  Each step goes round the targets META_CHUNK
    files at a time.

    Returns, per target, files per second through all three steps (``meta``) and
    per step, and the CPU microseconds its server spent per file (``cpu_meta``).
    """
    dirs = {t: os.path.join(top, "meta") for t, (top, _pid) in mounted.items()}
    names = [f"f{i:06d}" for i in range(args.files)]
    spent = {t: {"create": 0.0, "stat": 0.0, "unlink": 0.0} for t in mounted}
    cpu = dict.fromkeys(mounted, 0.0)

    def step(name, fn, finish=None):
        for k in range(0, len(names), META_CHUNK):
            for t, (_top, pid) in mounted.items():
                c0 = cpu_seconds(pid)
                t0 = time.perf_counter()
                d = dirs[t]
                for n in names[k:k + META_CHUNK]:
                    fn(os.path.join(d, n))
                if finish is not None and k + META_CHUNK >= len(names):
                    finish(d)
                spent[t][name] += time.perf_counter() - t0
                cpu[t] += cpu_seconds(pid) - c0

    for d in dirs.values():
        os.mkdir(d)
    drop_caches()
    step("create", lambda p: os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                                              0o644)), fsync_dir)
    drop_caches()
    step("stat", os.stat)
    step("unlink", os.unlink, fsync_dir)
    out = {}
    for t, (_top, pid) in mounted.items():
        os.rmdir(dirs[t])
        sp = spent[t]
        out[t] = {"meta": args.files / sum(sp.values()),
                  "meta_create": args.files / sp["create"],
                  "meta_stat": args.files / sp["stat"],
                  "meta_unlink": args.files / sp["unlink"]}
        if pid is not None:
            out[t]["cpu_meta"] = cpu[t] * 1e6 / args.files
    return out


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of process ``pid`` so far (0 without a process)."""
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


PHASES = ("seq_write", "seq_read", "seq_reread", "rand_write", "rand_read", "meta")
SEQUENTIAL = ("seq_write", "seq_read", "seq_reread")
SEQ_PASSES = 2           # sequential passes per repetition (the best counts)


def seq_io(phase: str, top: str, args, pid: int | None, buf: bytes) -> dict:
    """The sequential write or read of the file ``big`` in ``top``; returns MiB/s and
    the CPU microseconds the server ``pid`` spent per 1 MiB request."""
    path = os.path.join(top, "big")
    c0 = cpu_seconds(pid)
    if phase == "seq_write":
        rate = seq_write(path, args.size, buf)
    else:
        rate = seq_read(path, args.size, buf, cold=phase == "seq_read")
    res = {phase: rate}
    if pid is not None:
        res["cpu_" + phase] = (cpu_seconds(pid) - c0) * 1e6 / (args.size / MiB)
    return res


def best_of(runs: list[dict]) -> dict:
    """Per figure, the best of the runs that measured it (highest rate, lowest CPU
    time)."""
    out = {}
    for key in dict.fromkeys(k for r in runs for k in r):
        vals = [r[key] for r in runs if key in r]
        out[key] = min(vals) if key.startswith("cpu_") else max(vals)
    return out


# ---- targets ------------------------------------------------------------------------------

def run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def wait_mounted(path: str, proc: subprocess.Popen, what: str, log: str,
                 timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.ismount(path):
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{read(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not mount in time:\n{read(log)}")
        time.sleep(0.05)


def read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-4000:]
    except OSError:
        return ""


def fuse_unmount(path: str, proc: subprocess.Popen | None) -> None:
    """Unmount a FUSE mount and wait for its server (our child, stopped by PID)."""
    if os.path.ismount(path):
        if subprocess.run(["fusermount3", "-u", path], capture_output=True).returncode:
            subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True)
    if proc is None:
        return
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def target_raw(work: str, args):
    d = os.path.join(work, "raw")
    os.mkdir(d)
    try:
        yield d, None
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def target_passthru(work: str, args):
    src = os.path.join(work, "pt-src")
    mnt = os.path.join(work, "pt-mnt")
    log = os.path.join(work, "passthrough.log")
    os.mkdir(src)
    os.mkdir(mnt)
    proc = None
    try:
        with open(log, "ab") as logf:
            proc = subprocess.Popen([PY, os.path.join(REPO, "benchmarks", "passthrough.py"),
                                     src, mnt], stdout=logf, stderr=subprocess.STDOUT)
        wait_mounted(mnt, proc, "passthrough", log)
        yield mnt, proc.pid
    finally:
        fuse_unmount(mnt, proc)
        shutil.rmtree(src, ignore_errors=True)


def _loop_devices(image: str) -> list[str]:
    r = subprocess.run(["losetup", "-n", "-O", "NAME", "-j", image],
                       capture_output=True, text=True)
    return [line.strip() for line in r.stdout.splitlines() if line.strip()]


@contextlib.contextmanager
def target_ext4(work: str, args):
    image = os.path.join(work, "ext4.img")
    mnt = os.path.join(work, "ext4-mnt")
    os.mkdir(mnt)
    with open(image, "wb") as f:
        f.truncate(args.volume_size)
    try:
        dev = run(["losetup", "--find", "--show", image]).stdout.strip()
        run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev])
        run(["mount", "-t", "ext4", dev, mnt])
        yield mnt, None
    finally:
        if os.path.ismount(mnt):
            if subprocess.run(["umount", mnt], capture_output=True).returncode:
                subprocess.run(["umount", "-l", mnt], capture_output=True)
        for dev in _loop_devices(image):
            subprocess.run(["losetup", "-d", dev], capture_output=True)
        left = _loop_devices(image)
        if left:
            note(f"could not detach {', '.join(left)} (backing {image})")
        os.unlink(image)


@contextlib.contextmanager
def target_clusterfs(work: str, args, *, cluster: bool = False):
    """A single-node mount of a fresh volume, or (``cluster``) a one-node cluster
    mount with its own lock manager on loopback: the page cache under the inode
    locks, against the single-node mount's (``--cfs-opts`` and the profile apply to
    the single-node mount)."""
    vol = os.path.join(work, "vol.img")
    mnt = os.path.join(work, "cfs-mnt")
    log = os.path.join(work, "cluster.log" if cluster else "clusterfs.log")
    what = "clusterfs cluster mount" if cluster else "clusterfs mount"
    os.mkdir(mnt)
    proc = None
    profile = args.profile and not cluster
    try:
        run([PY, "-m", "clusterfs.cli", "mkfs", vol, "--size", str(args.volume_size), "-q"],
            cwd=REPO)
        cmd = [PY, "-m", "clusterfs.cli", "mount", "--foreground", vol, mnt]
        if cluster:
            key = os.path.join(work, "cluster.key")
            run([PY, "-m", "clusterfs.cli", "keygen", key], cwd=REPO)
            cmd += ["--key", key, "--node", "bench", "--listen", "127.0.0.1:0"]
        elif args.cfs_opts:
            cmd += ["-o", args.cfs_opts]
        if profile:
            cmd = ["py-spy", "record", "-r", "250", "-o", args.profile, "-f",
                   "speedscope" if args.profile.endswith(".json") else "flamegraph",
                   "--", *cmd]
        with open(log, "ab") as logf:
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=REPO)
        wait_mounted(mnt, proc, what, log)
        yield mnt, None if profile else proc.pid
    finally:
        fuse_unmount(mnt, proc)
        if proc is not None and proc.returncode:
            note(f"{what} exited with {proc.returncode}:\n{read(log)}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(vol)


SETUP = {"raw": target_raw, "passthru": target_passthru, "ext4": target_ext4,
         "clusterfs": target_clusterfs,
         "cluster": functools.partial(target_clusterfs, cluster=True)}


# ---- report -------------------------------------------------------------------------------

ROWS = [("seq_write", "seq write 1M", "MiB/s"), ("seq_read", "seq read 1M", "MiB/s"),
        ("seq_reread", "seq re-read 1M", "MiB/s"),
        ("rand_write", "rand write 4K", "IOPS"), ("rand_read", "rand read 4K", "IOPS"),
        ("meta", "create+stat+unlink", "files/s"), ("meta_create", "  create", "files/s"),
        ("meta_stat", "  stat", "files/s"), ("meta_unlink", "  unlink", "files/s")]


def table(results: dict, args) -> str:
    names = [t for t in TARGETS if t in results]
    head = f"{'workload':<20}{'unit':>8}" + "".join(f"{LABELS[t]:>12}" for t in names)
    both = "clusterfs" in results and "passthru" in results
    if both:
        head += f"{'cfs/pt':>9}"
    ext4 = "clusterfs" in results and "ext4" in results
    if ext4:
        head += f"{'cfs/ext4':>9}"
    lines = [f"bench_io: file {args.size // MiB} MiB, random I/O {args.seconds:g} s each, "
             f"{args.files} files; best of {SEQ_PASSES * args.repeat} sequential passes "
             f"and {args.repeat} random/metadata run(s)", head, "-" * len(head)]
    for key, label, unit in ROWS:
        line = f"{label:<20}{unit:>8}"
        for t in names:
            v = results[t].get(key)
            line += f"{v:>12,.0f}" if v is not None else f"{'-':>12}"
        if both:
            line += f"{results['clusterfs'][key] / results['passthru'][key]:>9.2f}"
        if ext4:
            line += f"{results['clusterfs'][key] / results['ext4'][key]:>9.2f}"
        lines.append(line)
    if "cluster" in results and "clusterfs" in results:
        c, s = results["cluster"], results["clusterfs"]
        lines.append("cluster mount / single-node mount: " + ", ".join(
            f"{key} {c[key] / s[key]:.2f}" for key in SEQUENTIAL))
    fuse = [t for t in names if "cpu_seq_write" in results[t]]
    if fuse:
        lines.append("")
        lines.append("file system server CPU time per operation (µs): per 1 MiB request, "
                     "per 4 KiB request, per file")
        head = f"{'workload':<28}" + "".join(f"{LABELS[t]:>12}" for t in fuse)
        lines += [head, "-" * len(head)]
        for key, label, _unit in ROWS[:6]:
            cells = (results[t].get("cpu_" + key) for t in fuse)
            lines.append(f"{label:<28}" + "".join(f"{v:>12,.0f}" if v is not None
                                                  else f"{'-':>12}" for v in cells))
    return "\n".join(lines)


def summary(results: dict) -> dict:
    out = {}
    if "clusterfs" in results and "passthru" in results:
        c, p = results["clusterfs"], results["passthru"]
        for key in ("seq_write", "seq_read", "rand_write", "rand_read", "meta"):
            out[f"{key}_ratio"] = round(c[key] / p[key], 3)
    if "clusterfs" in results and "ext4" in results:
        out["meta_ratio_ext4"] = round(results["clusterfs"]["meta"] /
                                       results["ext4"]["meta"], 3)
    if "cluster" in results and "clusterfs" in results:
        c, s = results["cluster"], results["clusterfs"]
        for key in SEQUENTIAL:
            out[f"cluster_{key}_vs_single"] = round(c[key] / s[key], 3)
    for t, r in results.items():
        for key in ("seq_write", "seq_read", "seq_reread", "rand_write", "rand_read",
                    "meta"):
            if key in r:
                out[f"{t}_{key}"] = round(r[key], 1)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="256 MiB file, 2,000 files, 1.5 s of random I/O (under a minute)")
    ap.add_argument("--targets", default=",".join(TARGETS),
                    help=f"comma-separated subset of {','.join(TARGETS)}")
    ap.add_argument("--seconds", type=float, help="seconds of each random I/O test")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each workload N times (sequential ones 2N times) on each "
                         "target, keep the best")
    ap.add_argument("--nice", type=int, default=-10,
                    help="scheduling priority change for the benchmark and the servers "
                         "it starts (default -10: less disturbed by other work on the host)")
    ap.add_argument("--dir", help="work directory (default: a new one in /var/tmp)")
    ap.add_argument("--cfs-opts", default="", help="extra clusterfs mount -o options")
    ap.add_argument("--profile", help=argparse.SUPPRESS)   # py-spy output of the mount
    args = ap.parse_args()
    args.size = (256 if args.quick else 2048) * MiB
    args.files = 2000 if args.quick else 10000
    if args.seconds is None:
        args.seconds = 1.5 if args.quick else 10.0
    args.volume_size = (1024 if args.quick else 4096) * MiB
    wanted = [t for t in args.targets.split(",") if t]
    bad = [t for t in wanted if t not in TARGETS]
    if bad:
        print(f"bench_io: unknown target(s) {', '.join(bad)}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("bench_io: needs root (drop_caches, losetup, mount)", file=sys.stderr)
        return 2
    work = tempfile.mkdtemp(prefix="bench_io-", dir=args.dir or "/var/tmp")
    os.chmod(work, 0o755)
    if args.nice:
        os.nice(args.nice)      # inherited by the file system servers started below
    names = [t for t in TARGETS if t in wanted]
    runs: dict[str, list[dict]] = {t: [] for t in names}
    buf = os.urandom(MiB)
    t0 = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            mounted = {}
            for t in names:
                tdir = os.path.join(work, t)
                os.mkdir(tdir)
                mounted[t] = stack.enter_context(SETUP[t](tdir, args))
            # Every target is mounted at once and each phase goes round them, so
            # that a burst of other activity on the host does not hit one only.
            for phase in PHASES:
                if phase == "meta":
                    for t in names:
                        os.unlink(os.path.join(mounted[t][0], "big"))
                sequential = phase in SEQUENTIAL
                some = {t: m for t, m in mounted.items() if t not in SEQ_ONLY}
                # a sequential pass, one target at a time, is at the mercy of the
                # host's disk and its cache of the moment: those run twice as often,
                # in a rotating order
                for rep in range(args.repeat * (SEQ_PASSES if sequential else 1)):
                    if sequential:
                        res = {}
                        for k in range(len(names)):
                            t = names[(k + rep) % len(names)]
                            top, pid = mounted[t]
                            res[t] = seq_io(phase, top, args, pid, buf)
                    elif phase == "meta":
                        res = meta_io(some, args)
                    else:
                        res = rand_io(phase, some, args)
                    for t, r in res.items():
                        runs[t].append(r)
                        note(f"{phase} {t}: " + ", ".join(f"{key} {v:,.0f}"
                                                           for key, v in r.items()))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = {t: best_of(rs) for t, rs in runs.items()}
    print(table(results, args))
    print(f"bench_io: {time.monotonic() - t0:.0f} s")
    print(json.dumps(summary(results)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
