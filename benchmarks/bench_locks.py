#!/usr/bin/env python3
"""Lock manager benchmark, side by side with Redis (``SET key NX`` + ``DEL``).

The lock manager runs as a cluster runs it: ``clusterfs lockd VOLUME`` (a candidate
that mounts nothing) on a small volume made for the run, elected master through the
volume's lease block.  Measures, with every client in a process of its own and the
servers on loopback:

* uncontended lock+unlock round trip (p50, p99), and Redis SET NX + DEL;
* re-acquiring a cached lock (held already: no message to the server);
* EX ping-pong between two client processes (hand-offs per second, through blocking
  callbacks);
* total lock operations per second with 4 client processes (lock + unlock on random
  names out of 1000), and Redis with 4 processes doing SET NX + DEL;
* fcntl hand-offs: two processes taking turns on the bytes of one file with fcntl
  locks (a ring of three one-byte locks: each takes the next byte, waiting with
  F_SETLKW while the other holds it, then releases its current one, so every byte
  goes from one process to the other), once on two clusterfs nodes (two mounts of
  a volume made for the run, each process on its own node: every hand-off goes
  through the lock manager's plock table) and once on ext4 (the machine's /var/tmp)
  on one node, in the same run.

``redis-server`` (Debian) is installed with apt-get when missing, and redis-py with pip;
both servers are started on loopback and stopped by PID.  The LAST line printed is one
JSON object with the keys ``lock_unlock_us``, ``redis_us``, ``ratio`` (ours / Redis, p50),
``cached_speedup`` (round trip / cached re-acquire), ``pingpong_per_s``,
``fcntl_handoffs_per_s`` (two nodes) and ``fcntl_handoffs_ext4_per_s`` (plus more).
Targets: ratio <= 1.0, cached_speedup >= 50, fcntl_handoffs_per_s >= 1000.  ``--quick``
finishes in under a minute.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


# ---- helpers --------------------------------------------------------------------------

# Takes turns with the other process on bytes 0-2 of FILE (role 0 starts on byte 0,
# role 1 on byte 1) from when GO exists for SECONDS; prints how many locks it took.
FCNTL_RING = r'''
import fcntl, os, struct, sys, time
path, role, go, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
def arg(t, b):
    return struct.pack("hh4xqqi4x", t, 0, b, 1, 0)
fd = os.open(path, os.O_RDWR)
cur = role
fcntl.fcntl(fd, fcntl.F_SETLKW, arg(fcntl.F_WRLCK, cur))
open(go + ".ready%d" % role, "w").close()
while not os.path.exists(go):
    time.sleep(0.001)
n = 0
end = time.perf_counter() + seconds
while time.perf_counter() < end:
    nxt = (cur + 1) % 3
    fcntl.fcntl(fd, fcntl.F_SETLKW, arg(fcntl.F_WRLCK, nxt))
    fcntl.fcntl(fd, fcntl.F_SETLK, arg(fcntl.F_UNLCK, cur))
    cur = nxt
    n += 1
os.close(fd)
print(n, flush=True)
'''


def fcntl_ring(path_a: str, path_b: str, seconds: float) -> float:
    """Locks taken per second by two FCNTL_RING processes, on PATH_A and PATH_B (the
    same file, seen from two nodes or from one)."""
    go = path_a + ".go"
    procs = [subprocess.Popen([sys.executable, "-c", FCNTL_RING, path, str(role), go,
                               str(seconds)], stdout=subprocess.PIPE, text=True)
             for role, path in enumerate((path_a, path_b))]
    try:
        deadline = time.time() + 60
        while not all(os.path.exists(f"{go}.ready{r}") for r in (0, 1)):
            if time.time() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError("fcntl ring workers did not start")
            time.sleep(0.01)
        open(go, "w").close()
        counts = [int(p.communicate(timeout=seconds + 120)[0]) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for name in (go, go + ".ready0", go + ".ready1"):
            if os.path.exists(name):
                os.unlink(name)
    return sum(counts) / seconds


def fcntl_handoffs(seconds: float) -> tuple[float, float]:
    """(hand-offs per second across two clusterfs nodes, the same on ext4)."""
    from tests.cluster.cluster_util import Cluster, make_key
    from tests.helpers import mkfs
    top = tempfile.mkdtemp(prefix="bench-fcntl-", dir="/var/tmp")
    os.chmod(top, 0o755)
    cluster = None
    try:
        local = os.path.join(top, "ext4-ring")
        with open(local, "wb"):
            pass
        ext4 = fcntl_ring(local, local, seconds)
        vol = os.path.join(top, "vol.img")
        mkfs(vol, "256M")
        cluster = Cluster(top, vol, make_key(os.path.join(top, "cluster.key")), fast=False)
        a = cluster.mount("n1")
        b = cluster.mount("n2")
        ring = a.p("ring")
        with open(ring, "wb"):
            pass
        os.setxattr(ring, "user.clusterfs.multiwriter", b"1")
        ours = fcntl_ring(ring, b.p("ring"), seconds)
    finally:
        if cluster is not None:
            cluster.unmount_all(check_log=False)
        shutil.rmtree(top, ignore_errors=True)
    return ours, ext4

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bench_locks: {what} exited at start "
                             f"(status {proc.returncode})")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"bench_locks: {what} did not start listening")


def wait_master(addr: str, key: bytes, proc: subprocess.Popen) -> None:
    """Wait until the candidate at ``addr`` is elected and answers."""
    import trio

    from lockmgr import LockError, query_status
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bench_locks: clusterfs lockd exited at start "
                             f"(status {proc.returncode})")
        try:
            trio.run(query_status, addr, key)
            return
        except (LockError, OSError):
            time.sleep(0.1)
    raise SystemExit("bench_locks: the lock manager was never elected master")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def percentile(values, p: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


def ensure_redis_server() -> str:
    path = shutil.which("redis-server")
    if path:
        return path
    print("redis-server missing: installing the Debian package", file=sys.stderr)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=False,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-qq", "redis-server"], env=env,
                   check=True, stdout=subprocess.DEVNULL)
    path = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.path.exists(path):
        raise SystemExit("bench_locks: redis-server could not be installed")
    return path


def ensure_redis_py() -> None:
    import importlib.util
    if importlib.util.find_spec("redis") is None:
        print("redis-py missing: pip install redis", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "redis>=4"],
                       check=True)


def run_workers(args_list, timeout: float) -> list[dict]:
    """Run worker processes at once; return their JSON results."""
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker",
                               json.dumps(a)], stdout=subprocess.PIPE, cwd=REPO)
             for a in args_list]
    out = []
    for p in procs:
        try:
            data, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            raise SystemExit("bench_locks: a worker process hung")
        if p.returncode != 0:
            raise SystemExit(f"bench_locks: a worker failed (status {p.returncode})")
        out.append(json.loads(data.decode().strip().splitlines()[-1]))
    return out


# ---- workers (each in its own process) ------------------------------------------------

def worker(spec: dict) -> dict:
    kind = spec["kind"]
    if kind.startswith("redis"):
        return redis_worker(spec)
    import trio
    return trio.run(lock_worker, spec)


async def lock_worker(spec: dict) -> dict:
    import random

    import trio

    from lockmgr import EX, LockClient

    key = bytes.fromhex(spec["key"])
    kind = spec["kind"]
    async with trio.open_nursery() as nursery:
        c = await LockClient.connect(spec["addr"], key, spec["node"], spec["slot"],
                                     nursery=nursery)
        res: dict = {}
        if kind == "roundtrip":
            name = b"bench/uncontended/" + spec["node"].encode()
            for _ in range(200):                        # warm up
                await c.lock(name, EX)
                await c.unlock(name)
            lat = []
            clock = time.perf_counter_ns
            for _ in range(spec["n"]):
                t0 = clock()
                await c.lock(name, EX)
                await c.unlock(name)
                lat.append(clock() - t0)
            res["lat_ns"] = lat
            # cached re-acquire: the lock is held, lock() answers locally
            await c.lock(name, EX)
            batches = []
            for _ in range(50):
                t0 = clock()
                for _ in range(200):
                    await c.lock(name, EX)
                batches.append((clock() - t0) / 200)
            res["cached_ns"] = statistics.median(batches)
            await c.unlock(name)
        elif kind == "pingpong":
            name = b"bench/pingpong"
            released = trio.Event()
            count = 0

            async def give_up(n, mode):
                await c.unlock(n)
                released.set()

            start = spec["start"]
            await trio.sleep(max(0.0, start - time.time()))
            end = time.time() + spec["seconds"]
            while time.time() < end:
                released = trio.Event()
                await c.lock(name, EX, on_blocking=give_up)
                count += 1
                with trio.move_on_after(max(0.0, end - time.time())):
                    await released.wait()
            res["handoffs"] = count
            res["seconds"] = spec["seconds"]
        elif kind == "throughput":
            names = [b"bench/tp/%d" % i for i in range(1000)]
            rnd = random.Random(spec["slot"])
            start = spec["start"]
            await trio.sleep(max(0.0, start - time.time()))
            end = time.time() + spec["seconds"]
            ops = 0
            while time.time() < end:
                for _ in range(50):
                    name = names[rnd.randrange(1000)]
                    await c.lock(name, EX)
                    await c.unlock(name)
                ops += 50
            res["ops"] = ops
            res["seconds"] = spec["seconds"]
        await c.close()
        nursery.cancel_scope.cancel()
    return res


def redis_worker(spec: dict) -> dict:
    import random

    import redis

    r = redis.Redis(host="127.0.0.1", port=spec["port"])
    r.ping()
    me = spec["node"].encode()
    res: dict = {}
    if spec["kind"] == "redis-roundtrip":
        name = "bench/uncontended/" + spec["node"]
        for _ in range(200):
            r.set(name, me, nx=True)
            r.delete(name)
        lat = []
        clock = time.perf_counter_ns
        for _ in range(spec["n"]):
            t0 = clock()
            ok = r.set(name, me, nx=True)
            r.delete(name)
            lat.append(clock() - t0)
            assert ok
        res["lat_ns"] = lat
    else:
        names = ["bench/tp/%d" % i for i in range(1000)]
        rnd = random.Random(spec["slot"])
        time.sleep(max(0.0, spec["start"] - time.time()))
        end = time.time() + spec["seconds"]
        ops = 0
        while time.time() < end:
            for _ in range(50):
                name = names[rnd.randrange(1000)]
                while not r.set(name, me, nx=True):
                    pass
                r.delete(name)
            ops += 50
        res["ops"] = ops
        res["seconds"] = spec["seconds"]
    return res


# ---- main ------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="finish in under a minute")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    n = 2000 if args.quick else 10000
    rounds = 3
    seconds = 3.0 if args.quick else 8.0
    redis_path = ensure_redis_server()
    ensure_redis_py()

    tmp = tempfile.mkdtemp(prefix="bench-locks-")
    keyfile = os.path.join(tmp, "key")
    key = os.urandom(32)
    with open(keyfile, "w") as f:
        f.write(key.hex() + "\n")
    os.chmod(keyfile, 0o600)
    lport, rport = free_port(), free_port()
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    volume = os.path.join(tmp, "volume.img")
    subprocess.run([sys.executable, "-m", "clusterfs.cli", "mkfs", volume, "--size", "64M",
                    "-q"], cwd=REPO, env=env, check=True)
    lockd = subprocess.Popen([sys.executable, "-m", "clusterfs.cli", "lockd", volume,
                              "--listen", f"127.0.0.1:{lport}", "--key", keyfile,
                              "--node", "bench"],
                             cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    redis_srv = subprocess.Popen([redis_path, "--port", str(rport), "--bind", "127.0.0.1",
                                  "--save", "", "--appendonly", "no", "--daemonize", "no",
                                  "--dir", tmp],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
    try:
        addr = f"127.0.0.1:{lport}"
        wait_master(addr, key, lockd)
        wait_port(rport, redis_srv, "redis-server")
        base = {"addr": addr, "key": key.hex()}

        def spec(kind, i, **kw):
            d = dict(base, kind=kind, node=f"bench{i}", slot=i, port=rport)
            d.update(kw)
            return d

        # 1. uncontended round trip + cached re-acquire; rounds alternate between
        # the two servers so that a change in the machine's load hits both alike
        lat, rlat, cached = [], [], []
        for _ in range(rounds):
            (ours,) = run_workers([spec("roundtrip", 0, n=n)], 120)
            (red,) = run_workers([spec("redis-roundtrip", 0, n=n)], 120)
            lat += [x / 1000 for x in ours["lat_ns"]]
            rlat += [x / 1000 for x in red["lat_ns"]]
            cached.append(ours["cached_ns"] / 1000)
        p50, p99 = percentile(lat, 50), percentile(lat, 99)
        rp50, rp99 = percentile(rlat, 50), percentile(rlat, 99)
        cached_us = statistics.median(cached)
        print(f"uncontended lock+unlock round trip: p50 {p50:8.1f} us   p99 {p99:8.1f} us"
              f"   (n={len(lat)})")
        print(f"redis SET NX + DEL round trip:      p50 {rp50:8.1f} us   p99 {rp99:8.1f} us"
              f"   ratio ours/redis {p50 / rp50:.2f}")
        print(f"cached re-acquire:                  {cached_us:8.2f} us"
              f"   speedup over round trip {p50 / cached_us:.0f}x")

        # 2. EX ping-pong between two processes
        start = time.time() + 1.5
        pp = run_workers([spec("pingpong", i, start=start, seconds=seconds)
                          for i in range(2)], seconds + 60)
        pingpong = sum(r["handoffs"] for r in pp) / seconds
        print(f"EX ping-pong, 2 processes:          {pingpong:8.0f} hand-offs/s")

        # 3. throughput with 4 processes
        start = time.time() + 2.0
        tp = run_workers([spec("throughput", i, start=start, seconds=seconds)
                          for i in range(4)], seconds + 60)
        ops = sum(r["ops"] for r in tp) / seconds
        start = time.time() + 1.0
        rtp = run_workers([spec("redis-throughput", i, start=start, seconds=seconds)
                           for i in range(4)], seconds + 60)
        rops = sum(r["ops"] for r in rtp) / seconds
        print(f"4 processes, lock+unlock:           {ops:8.0f} ops/s   "
              f"redis SET NX + DEL: {rops:8.0f} ops/s   ratio {ops / rops:.2f}")
    finally:
        stop(lockd)
        stop(redis_srv)
        shutil.rmtree(tmp, ignore_errors=True)

    # 4. fcntl locks handed between two nodes, and on ext4
    handoffs, handoffs_ext4 = fcntl_handoffs(seconds)
    print(f"fcntl hand-offs, 2 nodes:           {handoffs:8.0f} /s   "
          f"ext4 (1 node): {handoffs_ext4:8.0f} /s   ratio {handoffs / handoffs_ext4:.3f}")

    result = {
        "lock_unlock_us": round(p50, 1),
        "redis_us": round(rp50, 1),
        "ratio": round(p50 / rp50, 3),
        "cached_speedup": round(p50 / cached_us, 1),
        "pingpong_per_s": round(pingpong, 1),
        "lock_unlock_p99_us": round(p99, 1),
        "redis_p99_us": round(rp99, 1),
        "cached_us": round(cached_us, 3),
        "ops_per_s_4proc": round(ops, 1),
        "redis_ops_per_s_4proc": round(rops, 1),
        "fcntl_handoffs_per_s": round(handoffs, 1),
        "fcntl_handoffs_ext4_per_s": round(handoffs_ext4, 1),
        "fcntl_handoffs_ratio": round(handoffs / handoffs_ext4, 4),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
