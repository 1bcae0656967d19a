#!/usr/bin/env python3
"""Run every benchmark (``benchmarks/bench_*.py``), then summarise their results.

The benchmarks: ``bench_admin`` (``clusterfs freeze`` and ``snapshot`` of a mounted
two-node 10 GiB volume beside ``fsfreeze`` of ext4 and ``cp --sparse``), ``bench_clone``
(a 2 GiB ``clusterfs clone`` beside ``cp`` on ext4), ``bench_cluster``, ``bench_fsck``,
``bench_io``, ``bench_locks``, ``bench_vm_migration`` (each says what it measures in
its own documentation); a new ``bench_*.py`` joins them by its name.

This is what ``make bench`` runs (``make bench-quick`` adds ``--quick``).  Each
benchmark runs as a subprocess of its own with the same Python, in full mode by
default or with ``--quick``; its output is shown as it comes.  By convention the
LAST line a benchmark prints is one JSON object with its figures: those objects are
collected and printed together at the end, one line per benchmark, followed by one
JSON object holding them all (keyed by benchmark name) as the last line.

A benchmark that fails (non-zero exit, or no JSON last line) is reported in the
summary and makes the exit status 1; the others still run.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def discover(only: list[str] | None = None) -> list[str]:
    """The benchmark scripts, by name (``bench_io``, ...), sorted."""
    names = sorted(os.path.splitext(os.path.basename(p))[0]
                   for p in glob.glob(os.path.join(HERE, "bench_*.py")))
    if only:
        names = [n for n in names if n in only or n.removeprefix("bench_") in only]
    return names


def run_one(name: str, quick: bool, extra: list[str]) -> tuple[int, dict | None, float]:
    """Run one benchmark, echoing its output; returns (exit status, last-line JSON
    or None, seconds)."""
    cmd = [sys.executable, os.path.join(HERE, name + ".py")]
    if quick:
        cmd.append("--quick")
    cmd += extra
    print(f"==== {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.monotonic()
    last = ""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            cwd=os.path.dirname(HERE), text=True, bufsize=1)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if line.strip():
                last = line.strip()
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        raise
    elapsed = time.monotonic() - t0
    try:
        result = json.loads(last)
        if not isinstance(result, dict):
            result = None
    except ValueError:
        result = None
    return rc, result, elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="run each benchmark in its quick mode (default: full)")
    ap.add_argument("--only", action="append", metavar="NAME",
                    help="run only this benchmark (bench_io or io; repeatable)")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = ap.parse_args()
    names = discover(args.only)
    if args.list:
        print("\n".join(names))
        return 0
    if not names:
        print("run_all: no benchmark matches", file=sys.stderr)
        return 2
    summary: dict[str, dict | None] = {}
    failed = []
    times = {}
    for name in names:
        rc, result, elapsed = run_one(name, args.quick, [])
        times[name] = elapsed
        summary[name] = result
        if rc != 0 or result is None:
            failed.append(f"{name} (exit {rc}{', no JSON result' if result is None else ''})")
    print(f"==== summary ({'quick' if args.quick else 'full'} mode)")
    for name in names:
        res = summary[name]
        text = json.dumps(res) if res is not None else "FAILED"
        print(f"{name:<22}{times[name]:6.0f} s  {text}")
    if failed:
        print("failed: " + ", ".join(failed))
    print(json.dumps(summary), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
