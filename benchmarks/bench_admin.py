#!/usr/bin/env python3
"""Administration benchmark (issue 16): ``clusterfs freeze`` and ``clusterfs snapshot``
of a mounted cluster, beside ``fsfreeze`` of ext4 and ``cp --sparse=always``.

One run makes a 10 GiB volume (a sparse image file in a directory of ``/var/tmp``),
mounts it as two nodes on this machine (each with its lock manager candidate, default
leases, the cluster key of the run; a private ``CLUSTERFS_RUN_DIR`` for the control
sockets) and starts a writer on each node: a process writing and fsyncing numbered
files in a loop (as ``tests/cluster/test_freeze.py``'s ``Writer``).  Then:

* ``freeze_s``: wall seconds from the start of ``clusterfs freeze MOUNTPOINT`` until
  it returns (the volume consistent and quiet on every node), the median of several
  rounds, taken in turn from each node's mount point.  Each is followed by a check
  that neither writer completes more than the file in flight while frozen, ``clusterfs
  thaw`` (``thaw_s``) and a pause until both writers have completed files again.  The
  freeze's own figure (``freeze_took_s``, measured in the mount process: the gate, the
  freeze lock taken EX after the other node wrote everything home, this node's own
  write-home) is reported too, and ``cli_startup_s`` (``clusterfs freeze --help``, once
  a round: the interpreter and the command's imports), the part of ``freeze_s`` that
  is neither.
  Each round also sends the freeze request from the benchmark's own process (then
  thaws and waits for the writers again): ``freeze_rpc_s``, the request's round trip
  without the command's start-up;
* ``snapshot_s``: ``clusterfs snapshot VOLUME DEST`` end to end (freeze, copy, thaw, a
  new UUID for the copy), the median of a few rounds, with how long the volume stayed
  frozen in it (``snapshot_frozen_s``, which the command prints) and how much data it
  copied; the last snapshot is checked by ``clusterfs fsck -fn`` (untimed);
* the anchors, in the same rounds, turn about with the figures above:
  ``fsfreeze_s``, ``fsfreeze --freeze`` of an ext4 file system on a loop device
  (``losetup``) with the same writer running in it, and ``cp_s``, ``cp
  --sparse=always`` of the same clusterfs image (the raw copy cost of a snapshot; the
  writers are running, so the copy is not consistent: only its time counts).  The
  ratios are ``freeze_ratio`` (freeze_s / fsfreeze_s) and ``snapshot_ratio``
  (snapshot_s / cp_s).

The targets of the issue, printed beside the figures (not asserted): freeze_s under
1 s, snapshot_s under 5 s.  ``--fill MiB`` writes that much file data into the volume
first (default none: the volume holds its metadata and the writers' small files, so
the copy is small; the copy's cost grows with the data, as ``cp``'s).  ``--heavy
KiB`` makes the writers write files of that size, fsyncing only one in 16, so that
a freeze finds more to write home (the default writer's work is fsynced at once).

``--quick`` runs in under a minute: the same 10 GiB volume, 5 freezes and 3
snapshots instead of 15 and 7.  Everything mounted is unmounted (the two nodes, the
ext4 file system, then its loop device is detached), every process started is
stopped by its PID, and a freeze is thawed, also on failure; the freezes also carry
``--timeout 60`` so that a killed benchmark cannot leave the volume frozen.

The LAST line is one JSON object with ``freeze_s``, ``snapshot_s``,
``snapshot_frozen_s``, ``fsfreeze_s``, ``cp_s``, ``freeze_ratio``,
``snapshot_ratio``, the targets, and every round's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tests.cluster.cluster_util import Cluster, make_key, wait_for  # noqa: E402
from tests.helpers import mkfs  # noqa: E402

PY = sys.executable
MiB = 1 << 20
FREEZE_TARGET_S = 1.0
SNAPSHOT_TARGET_S = 5.0

# A writer (tests/cluster/test_freeze.py's): numbered files, each written, fsynced and
# closed, its number then logged (outside the mount), until LOG.stop exists.
# HEAVY > 0 (``--heavy``): files of HEAVY KiB instead (64 names, rewritten), fsynced
# one in 16 only, so that much more is dirty when a freeze comes.
WRITER = r"""
import os, sys
top, log, heavy = sys.argv[1], sys.argv[2], int(sys.argv[3])
os.makedirs(top, exist_ok=True)
blob = os.urandom(heavy * 1024)
i = 0
with open(log, "a", buffering=1) as out:
    while not os.path.exists(log + ".stop"):
        path = os.path.join(top, f"f{i % (64 if heavy else 2000)}")
        data = blob if heavy else (f"{i} " * 300).encode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, data)
        if not heavy or i % 16 == 15:
            os.fsync(fd)
        os.close(fd)
        out.write(f"{i}\n")
        i += 1
"""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Writer:
    """A writer process; ``count()`` is the number of files it completed."""

    def __init__(self, top: str, logfile: str, heavy: int = 0):
        self.log = logfile
        self.proc = subprocess.Popen([PY, "-c", WRITER, top, logfile, str(heavy)],
                                     stdin=subprocess.DEVNULL)

    def count(self) -> int:
        try:
            with open(self.log, "rb") as f:
                return f.read().count(b"\n")
        except FileNotFoundError:
            return 0

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        """Ask it to stop (it must not be frozen), kill it after ``timeout``."""
        if self.proc.poll() is not None:
            return
        open(self.log + ".stop", "w").close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def cli(*args: str, timeout: float = 180) -> tuple[float, str]:
    """Run ``clusterfs ARGS``; (wall seconds, stdout).  RuntimeError if it fails."""
    t0 = time.perf_counter()
    r = subprocess.run([PY, "-m", "clusterfs.cli", *args], capture_output=True,
                       text=True, timeout=timeout, cwd=REPO)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"clusterfs {' '.join(args)} failed ({r.returncode}):\n"
                           f"{r.stdout}{r.stderr}")
    return dt, r.stdout


def run(cmd: list[str], timeout: float = 120) -> float:
    """Run a command that must succeed; its wall seconds."""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return dt


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


class Ext4:
    """A small ext4 file system on a loop device, mounted, with a writer in it."""

    def __init__(self, workdir: str, size_mib: int = 256, heavy: int = 0):
        self.img = os.path.join(workdir, "ext4.img")
        self.mnt = os.path.join(workdir, "ext4")
        self.size_mib = size_mib
        self.loop: str | None = None
        self.mounted = False
        self.frozen = False
        self.writer: Writer | None = None
        self.workdir = workdir
        self.heavy = heavy

    def start(self) -> None:
        with open(self.img, "wb") as f:
            f.truncate(self.size_mib * MiB)
        run(["mkfs.ext4", "-q", "-F", self.img])
        r = subprocess.run(["losetup", "-f", "--show", self.img], capture_output=True,
                           text=True, check=True)
        self.loop = r.stdout.strip()
        os.makedirs(self.mnt, exist_ok=True)
        run(["mount", "-t", "ext4", self.loop, self.mnt])
        self.mounted = True
        self.writer = Writer(os.path.join(self.mnt, "w"),
                             os.path.join(self.workdir, "ext4-writer.log"), self.heavy)

    def freeze(self) -> float:
        self.frozen = True
        return run(["fsfreeze", "--freeze", self.mnt])

    def thaw(self) -> float:
        dt = run(["fsfreeze", "--unfreeze", self.mnt])
        self.frozen = False
        return dt

    def stop(self) -> None:
        """Thaw, stop the writer, unmount, detach the loop device (each step tried
        whatever the previous did)."""
        if self.frozen:
            subprocess.run(["fsfreeze", "--unfreeze", self.mnt], capture_output=True)
            self.frozen = False
        if self.writer is not None:
            self.writer.stop()
        if self.mounted:
            r = subprocess.run(["umount", self.mnt], capture_output=True)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", self.mnt], capture_output=True)
            self.mounted = False
        if self.loop is not None:
            subprocess.run(["losetup", "-d", self.loop], capture_output=True)
            self.loop = None


def wait_progress(writers: list[Writer], since: list[int], files: int = 3,
                  timeout: float = 60.0) -> None:
    """Until every writer has completed ``files`` more files than ``since``."""
    def done():
        for w in writers:
            if not w.alive():
                raise RuntimeError(f"a writer died (exit {w.proc.returncode})")
        return all(w.count() >= s + files for w, s in zip(writers, since))
    wait_for(done, timeout, "the writers to go on", interval=0.01)


class Bench:
    def __init__(self, workdir: str, quick: bool, fill_mib: int, heavy: int = 0):
        self.workdir = workdir
        self.heavy = heavy
        self.quick = quick
        self.fill_mib = fill_mib
        self.cluster: Cluster | None = None
        self.vol = os.path.join(workdir, "vol.img")
        self.writers: list[Writer] = []
        self.frozen_from: str | None = None     # a mount point frozen by us
        self.ext4 = Ext4(workdir, size_mib=1024 if heavy else 256, heavy=heavy)
        self.figures: dict = {}

    # -- set up and tear down -------------------------------------------------------

    def start(self) -> None:
        key = make_key(os.path.join(self.workdir, "cluster.key"))
        t0 = time.perf_counter()
        mkfs(self.vol, "10G")
        self.figures["mkfs_s"] = time.perf_counter() - t0
        self.cluster = Cluster(self.workdir, self.vol, key, fast=False)
        t0 = time.perf_counter()
        self.cluster.mount("n1")
        self.cluster.mount("n2")
        self.wait_ready()
        self.figures["mount_2n_s"] = time.perf_counter() - t0
        if self.fill_mib:
            self.fill(self.fill_mib)
        for name in ("n1", "n2"):
            top = self.cluster.nodes[name].p(f"w-{name}")
            self.writers.append(Writer(top, os.path.join(self.workdir, f"{name}-writer.log"),
                                       self.heavy))
        self.ext4.start()
        wait_progress(self.writers + [self.ext4.writer], [0, 0, 0], files=5)

    def wait_ready(self) -> None:
        """Until a master serves both nodes out of its grace period and both mounts
        answer on their control channel."""
        from clusterfs import control

        def serving():
            try:
                st = self.cluster.view()
            except Exception:
                return False
            return st["grace_left"] == 0 and not st["frozen"] and len(st["nodes"]) == 2

        def channels():
            try:
                return all(control.find(m.path) for m in self.cluster.nodes.values())
            except Exception:
                return False
        wait_for(serving, 60, "the lock manager to serve both nodes")
        wait_for(channels, 30, "the control channels of both mounts")

    def fill(self, mib: int) -> None:
        t0 = time.perf_counter()
        buf = os.urandom(MiB)
        d = self.cluster.nodes["n1"].p("fill")
        os.mkdir(d)
        for i in range((mib + 255) // 256):
            with open(os.path.join(d, f"data{i}"), "wb") as f:
                for _ in range(min(256, mib - 256 * i)):
                    f.write(buf)
                os.fsync(f.fileno())
        log(f"filled {mib} MiB in {time.perf_counter() - t0:.1f} s")

    def stop(self) -> list[str]:
        """Thaw, stop the writers, unmount everything; the mount logs' tracebacks."""
        problems = []
        if self.frozen_from is not None:
            subprocess.run([PY, "-m", "clusterfs.cli", "thaw", "-q", self.frozen_from],
                           capture_output=True, cwd=REPO, timeout=60)
            self.frozen_from = None
        for w in self.writers:
            w.stop()
        self.ext4.stop()
        if self.cluster is not None:
            self.cluster.unmount_all(check_log=False)
            for name, m in self.cluster.nodes.items():
                if "Traceback" in m.read_log():
                    problems.append(f"the mount log of {name} holds a traceback:\n"
                                    + m.read_log()[-3000:])
        return problems

    def counts(self) -> list[int]:
        return [w.count() for w in self.writers]

    # -- the rounds -----------------------------------------------------------------------

    def freeze_round(self, node: str) -> dict:
        mnt = self.cluster.nodes[node].path
        since = self.counts()
        self.frozen_from = mnt
        dt, out = cli("freeze", mnt, "--timeout", "60")
        m = re.search(r"frozen on every node in ([0-9.]+)s", out)
        took = float(m.group(1)) if m else float("nan")
        # quiet: at most the file in flight at the freeze completes on each node
        c0 = self.counts()
        time.sleep(0.3)
        c1 = self.counts()
        quiet = all(b - a <= 1 for a, b in zip(c0, c1))
        thaw, _ = cli("thaw", mnt)
        self.frozen_from = None
        t0 = time.perf_counter()
        wait_progress(self.writers, c1)
        back = time.perf_counter() - t0
        return {"node": node, "freeze_s": dt, "took_s": took, "thaw_s": thaw,
                "quiet": quiet, "writer_files_between": min(
                    a - s for a, s in zip(c0, since)), "writers_back_s": back}

    def freeze_rpc_round(self, node: str) -> dict:
        """The freeze request sent from this (running) process, as the command sends
        it, without the command's start-up: (seconds to find the mount, seconds
        from the request until its answer, the mount process's own figure)."""
        from clusterfs import control
        mnt = self.cluster.nodes[node].path
        t0 = time.perf_counter()
        info = control.find(mnt)
        t1 = time.perf_counter()
        self.frozen_from = mnt
        answer = control.call(info, {"op": "freeze", "timeout": 60.0, "wait": 60.0},
                              timeout=90)
        t2 = time.perf_counter()
        c1 = self.counts()
        control.call(info, {"op": "thaw"}, timeout=30)
        self.frozen_from = None
        wait_progress(self.writers, c1)
        return {"find_s": t1 - t0, "rpc_s": t2 - t1, "took_s": answer["took_s"]}

    def fsfreeze_round(self) -> dict:
        w = self.ext4.writer
        dt = self.ext4.freeze()
        c0 = w.count()
        time.sleep(0.3)
        c1 = w.count()
        thaw = self.ext4.thaw()
        wait_progress([w], [c1])
        return {"fsfreeze_s": dt, "fsfreeze_unfreeze_s": thaw, "quiet": c1 - c0 <= 1}

    def snapshot_round(self, i: int) -> dict:
        dest = os.path.join(self.workdir, f"snap{i}.img")
        dt, out = cli("snapshot", self.vol, dest, timeout=600)
        m = re.search(r"\((\S[^,)]*)(?:, ([0-9.]+) MiB of data)?\); frozen ([0-9.]+)s "
                      r"from node (\S+) \(the freeze took ([0-9.]+)s\)", out)
        if m is None:
            raise RuntimeError(f"cannot read the snapshot's output: {out!r}")
        res = {"snapshot_s": dt, "method": m.group(1),
               "copied_mib": float(m.group(2) or 0), "frozen_s": float(m.group(3)),
               "node": m.group(4), "freeze_took_s": float(m.group(5)),
               "allocated_mib": allocated(dest) / MiB}
        self.last_snapshot = dest
        return res

    def cp_round(self, i: int) -> dict:
        dest = os.path.join(self.workdir, f"cp{i}.img")
        dt = run(["cp", "--sparse=always", self.vol, dest], timeout=600)
        res = {"cp_s": dt, "allocated_mib": allocated(dest) / MiB}
        os.unlink(dest)
        return res


def median(rounds: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rounds)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a run of under a minute")
    p.add_argument("--freezes", type=int, default=None,
                   help="freeze rounds (default 5 quick, 15 full)")
    p.add_argument("--snapshots", type=int, default=None,
                   help="snapshot rounds (default 3 quick, 7 full)")
    p.add_argument("--fill", type=int, default=0, metavar="MiB",
                   help="write MiB of file data into the volume first (default 0)")
    p.add_argument("--heavy", type=int, default=0, metavar="KiB",
                   help="the writers write files of KiB each, fsyncing one in 16 "
                        "(default: the test's writer, ~1 KiB files each fsynced)")
    p.add_argument("--workdir", default=None, help="where the volume goes (default /var/tmp)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    freezes = args.freezes or (5 if args.quick else 15)
    snapshots = args.snapshots or (3 if args.quick else 7)

    def terminated(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, terminated)

    workdir = tempfile.mkdtemp(prefix="cfs-bench-admin-", dir=args.workdir or "/var/tmp")
    os.chmod(workdir, 0o755)
    run_dir = os.path.join(workdir, "run")
    os.mkdir(run_dir, 0o700)
    os.environ["CLUSTERFS_RUN_DIR"] = run_dir    # the mounts' and commands' sockets
    bench = Bench(workdir, args.quick, args.fill, args.heavy)
    t_start = time.perf_counter()
    fr: list[dict] = []
    ef: list[dict] = []
    rpc: list[dict] = []
    sn: list[dict] = []
    cp: list[dict] = []
    problems: list[str] = []
    fsck_ok = None
    try:
        bench.start()
        startup = []
        for i in range(freezes):
            startup.append(cli("freeze", "--help")[0])
            fr.append(bench.freeze_round("n1" if i % 2 == 0 else "n2"))
            ef.append(bench.fsfreeze_round())
            rpc.append(bench.freeze_rpc_round("n1" if i % 2 == 0 else "n2"))
            log(f"freeze {i + 1}/{freezes}: clusterfs {fr[-1]['freeze_s']:.3f} s "
                f"(took {fr[-1]['took_s']:.3f} s, from {fr[-1]['node']}), "
                f"fsfreeze {ef[-1]['fsfreeze_s']:.4f} s")
        for i in range(snapshots):
            sn.append(bench.snapshot_round(i))
            cp.append(bench.cp_round(i))
            if i < snapshots - 1:
                os.unlink(bench.last_snapshot)
            log(f"snapshot {i + 1}/{snapshots}: {sn[-1]['snapshot_s']:.3f} s (frozen "
                f"{sn[-1]['frozen_s']:.3f} s, {sn[-1]['copied_mib']:.1f} MiB copied), "
                f"cp {cp[-1]['cp_s']:.3f} s")
            wait_progress(bench.writers, bench.counts())
        r = subprocess.run([PY, "-m", "clusterfs.cli", "fsck", "-fn", bench.last_snapshot],
                           capture_output=True, text=True, cwd=REPO, timeout=600)
        fsck_ok = r.returncode == 0
        if not fsck_ok:
            problems.append(f"fsck -fn of the snapshot: {r.stdout}{r.stderr}")
        os.unlink(bench.last_snapshot)
        volume_allocated = allocated(bench.vol) / MiB
    finally:
        try:
            problems += bench.stop()
        finally:
            if args.keep:
                log(f"kept {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)
    res = {
        "freeze_s": median(fr, "freeze_s"),
        "freeze_took_s": median(fr, "took_s"),
        "thaw_s": median(fr, "thaw_s"),
        "cli_startup_s": statistics.median(startup),
        "freeze_rpc_s": median(rpc, "rpc_s"),
        "freeze_rpc_took_s": median(rpc, "took_s"),
        "freeze_find_s": median(rpc, "find_s"),
        "fsfreeze_s": median(ef, "fsfreeze_s"),
        "fsfreeze_unfreeze_s": median(ef, "fsfreeze_unfreeze_s"),
        "snapshot_s": median(sn, "snapshot_s"),
        "snapshot_frozen_s": median(sn, "frozen_s"),
        "snapshot_freeze_took_s": median(sn, "freeze_took_s"),
        "snapshot_copied_mib": median(sn, "copied_mib"),
        "snapshot_method": sn[0]["method"],
        "cp_s": median(cp, "cp_s"),
    }
    res["freeze_ratio"] = res["freeze_s"] / res["fsfreeze_s"]
    res["snapshot_ratio"] = res["snapshot_s"] / res["cp_s"]
    res["freeze_target_s"] = FREEZE_TARGET_S
    res["snapshot_target_s"] = SNAPSHOT_TARGET_S
    res["writers_quiet_when_frozen"] = all(r["quiet"] for r in fr)
    res["snapshot_fsck_clean"] = fsck_ok
    res["volume_gib"] = 10
    res["volume_allocated_mib"] = volume_allocated
    res["fill_mib"] = args.fill
    res["heavy_kib"] = args.heavy
    res.update({k: bench.figures[k] for k in ("mkfs_s", "mount_2n_s")})
    res["freeze_all_s"] = [r["freeze_s"] for r in fr]
    res["freeze_took_all_s"] = [r["took_s"] for r in fr]
    res["freeze_rpc_all_s"] = [r["rpc_s"] for r in rpc]
    res["cli_startup_all_s"] = startup
    res["fsfreeze_all_s"] = [r["fsfreeze_s"] for r in ef]
    res["snapshot_all_s"] = [r["snapshot_s"] for r in sn]
    res["snapshot_frozen_all_s"] = [r["frozen_s"] for r in sn]
    res["cp_all_s"] = [r["cp_s"] for r in cp]
    res["quick"] = args.quick
    res["elapsed_s"] = time.perf_counter() - t_start

    def verdict(value, target):
        return "meets" if value < target else "MISSES"
    print(f"{'freeze (2 nodes)':<24}{res['freeze_s']:8.3f} s   median of {len(fr)}  "
          f"(target < {FREEZE_TARGET_S:g} s: {verdict(res['freeze_s'], FREEZE_TARGET_S)}); "
          f"in the mount process {res['freeze_took_s']:.3f} s, command start-up "
          f"{res['cli_startup_s']:.3f} s; thaw {res['thaw_s']:.3f} s")
    print(f"{'  request alone':<24}{res['freeze_rpc_s']:8.3f} s   (the freeze request "
          f"from a running process: answer in {res['freeze_rpc_s']:.3f} s, of which "
          f"{res['freeze_rpc_took_s']:.3f} s in the mount process; finding the mount "
          f"{res['freeze_find_s']:.4f} s)")
    print(f"{'  fsfreeze ext4 (anchor)':<24}{res['fsfreeze_s']:8.4f} s   median of {len(ef)}"
          f"   ratio x{res['freeze_ratio']:.0f}")
    print(f"{'snapshot (10 GiB)':<24}{res['snapshot_s']:8.3f} s   median of {len(sn)}  "
          f"(target < {SNAPSHOT_TARGET_S:g} s: "
          f"{verdict(res['snapshot_s'], SNAPSHOT_TARGET_S)}); frozen "
          f"{res['snapshot_frozen_s']:.3f} s, {res['snapshot_method']} of "
          f"{res['snapshot_copied_mib']:.1f} MiB; fsck of the snapshot "
          f"{'clean' if fsck_ok else 'NOT CLEAN'}")
    print(f"{'  cp --sparse (anchor)':<24}{res['cp_s']:8.4f} s   median of {len(cp)}"
          f"   ratio x{res['snapshot_ratio']:.1f}")
    print(f"{'writers quiet when frozen':<24}{res['writers_quiet_when_frozen']}")
    for msg in problems:
        print("PROBLEM: " + msg)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else
                          [round(x, 4) for x in v] if isinstance(v, list) else v)
                      for k, v in res.items()}))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
