"""Node death, lock manager restart and network partition, with real processes.

* kill -9 of a node in the middle of a metadata-heavy workload, at random points: a
  survivor recovers it; every file the dead node fsync'ed has its data; its open
  modes are released; the survivors' applications see no error; the volume is
  consistent (walk + fsck) once every node is unmounted.  Three runs by default,
  twenty under ``-m slow``.
* SIGKILL of the lock manager and a restart on the same address while three nodes
  work (default leases): no application sees an error, nothing is lost.
* A network partition (each node in its own network namespace): the node cut off
  fences itself (EIO, not one more byte on the volume), the others recover its
  journal and carry on, and it rejoins after a remount.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import time

import pytest

from tests.cluster.cluster_util import (Lockd, Netns, Workload, free_port, heartbeat_blocks,
                                        image_digest, make_key, running_cluster, sha256_of,
                                        wait_for)


def check_fsynced(wl: Workload, mount, top: str = "w") -> int:
    """Every file ``wl`` fsync'ed reads back with its data on ``mount``."""
    files = wl.fsynced()
    for rel, sha in files:
        assert sha256_of(mount.p(top, rel)) == sha, f"{rel} lost its fsync'ed data"
    return len(files)


def can_open_for_writing(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as e:
        if e.errno == errno.EBUSY:
            return False
        raise
    os.close(fd)
    return True


def wait_still(vol: str, skip: set, timeout: float = 30.0) -> str:
    """The image's digest once two reads half a second apart agree."""
    deadline = time.monotonic() + timeout
    prev = image_digest(vol, skip)
    while True:
        time.sleep(0.5)
        cur = image_digest(vol, skip)
        if cur == prev:
            return cur
        assert time.monotonic() < deadline, "the volume does not hold still"
        prev = cur


def recovered(mount, node: str) -> bool:
    return f"node {node} (slot" in mount.read_log() and " recovered;" in mount.read_log()


def kill_during_workload(topdir: str, seed: int) -> None:
    rng = random.Random(seed)
    three = seed % 2 == 1
    with running_cluster(topdir, crashes=True) as c:
        names = ["a", "b", "c"] if three else ["a", "b"]
        mounts = {n: c.mount(n) for n in names}
        os.mkdir(mounts["a"].p("w"))
        victim = rng.choice(names)
        survivors = [n for n in names if n != victim]
        loads = {n: Workload(mounts[n], n, mounts[n].p("w"), topdir, seed=seed * 10 + i,
                             strict=n != victim, hold="held" if n == victim else None)
                 for i, n in enumerate(names)}
        try:
            for wl in loads.values():
                wl.wait_started()
            time.sleep(rng.uniform(0.0, 2.0))
            c.kill(victim)
            loads[victim].kill()
            # a survivor recovers it; the others' applications wait, never fail
            wait_for(lambda: any(recovered(mounts[n], victim) for n in survivors), 60,
                     f"recovery of {victim}")
            # and they carry on for a while after the recovery
            done = {n: len(loads[n].events()) for n in survivors}
            wait_for(lambda: all(len(loads[n].events()) > done[n] + 2 for n in survivors),
                     60, "the survivors to carry on")
            for n in survivors:
                assert loads[n].stop() == 0, loads[n].errors()
        finally:
            for wl in loads.values():
                wl.kill()
        s = mounts[survivors[0]]
        assert check_fsynced(loads[victim], s) > 0
        for n in survivors:
            check_fsynced(loads[n], s)
        # its open mode went with it
        held = s.p("w", victim, "held")
        assert os.path.exists(held)
        assert can_open_for_writing(held)
        # it rejoins and sees what the survivors did
        back = c.mount(victim)
        check_fsynced(loads[survivors[-1]], back)
        assert can_open_for_writing(back.p("w", victim, "held"))


@pytest.mark.parametrize("seed", range(3))
def test_kill_during_metadata_workload(topdir, seed):
    kill_during_workload(topdir, seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 120))
def test_kill_during_metadata_workload_campaign(topdir, seed):
    kill_during_workload(topdir, seed)


def test_lock_manager_restart_during_workload(topdir):
    """Default leases and heartbeats: SIGKILL the lock manager mid-workload on three
    nodes and start it again on the same address."""
    with running_cluster(topdir, fast=False) as c:
        mounts = {n: c.mount(n) for n in ("a", "b", "c")}
        os.mkdir(mounts["a"].p("w"))
        loads = {n: Workload(m, n, m.p("w"), topdir, seed=i) for i, (n, m)
                 in enumerate(mounts.items())}
        try:
            for wl in loads.values():
                wl.wait_started()
            for _ in range(2):
                time.sleep(1.0)
                c.lockd.restart()
                wait_for(lambda: "grace period over" in c.lockd.read_log().split(
                    "listening on")[-1], 60, "the end of the grace period")
                done = {n: len(wl.events()) for n, wl in loads.items()}
                wait_for(lambda: all(len(wl.events()) > done[n] + 2
                                     for n, wl in loads.items()), 60,
                         "the workloads to go on")
            for n, wl in loads.items():
                assert wl.stop() == 0, f"workload on {n}: {wl.errors()}"
        finally:
            for wl in loads.values():
                wl.kill()
        assert "reclaimed" in c.lockd.read_log()
        for n, wl in loads.items():
            other = mounts[{"a": "b", "b": "c", "c": "a"}[n]]
            assert check_fsynced(wl, other) > 0
        for m in mounts.values():
            assert "self-fencing" not in m.read_log()


@pytest.fixture
def netns():
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nsenter"):
        pytest.skip("needs root, ip (iproute2) and nsenter (util-linux)")
    ns = Netns(["a", "b", "c"])
    try:
        yield ns.setup()
    finally:
        ns.teardown()


def test_network_partition_fences_the_node_cut_off(topdir, netns):
    from tests.cluster.cluster_util import Cluster, check_volume
    from tests.helpers import mkfs
    key = make_key(os.path.join(topdir, "cluster.key"))
    port = free_port()
    lockd = Lockd(key, host="10.200.0.1", listen_host="0.0.0.0", port=port,
                  wrap=netns.wrap(), log=os.path.join(topdir, "lockd.log")).start()
    vol = os.path.join(topdir, "vol.img")
    mkfs(vol, "256M")
    c = Cluster(topdir, vol, lockd)
    ok = False
    try:
        mounts = {n: c.mount(n, wrap=netns.wrap(n), lockd_addr=netns.lockd_addr(n, port))
                  for n in ("a", "b", "c")}
        a = mounts["a"]
        os.mkdir(a.p("w"))
        loads = {n: Workload(m, n, m.p("w"), topdir, seed=i, strict=n != "a",
                             hold="held" if n == "a" else None)
                 for i, (n, m) in enumerate(mounts.items())}
        app = os.open(a.p("w", "app-file"), os.O_CREAT | os.O_RDWR, 0o644)
        try:
            os.write(app, b"before the cut")
            os.fsync(app)
            for wl in loads.values():
                wl.wait_started()
            netns.cut("a")
            # a fences itself: its applications get EIO
            wait_for(lambda: "self-fencing" in a.read_log(), 30, "a to fence itself")
            with pytest.raises(OSError) as e:
                os.pwrite(app, b"after", 0)
            assert e.value.errno == errno.EIO
            # the others recover its journal and carry on
            wait_for(lambda: recovered(mounts["b"], "a") or recovered(mounts["c"], "a"),
                     60, "recovery of a")
            done = {n: len(loads[n].events()) for n in ("b", "c")}
            wait_for(lambda: all(len(loads[n].events()) > done[n] + 2 for n in ("b", "c")),
                     60, "b and c to carry on")
            assert loads["a"].proc.wait(60) == 0
            for n in ("b", "c"):
                assert loads[n].stop() == 0, loads[n].errors()
            b = mounts["b"]
            assert check_fsynced(loads["a"], b) > 0
            with open(b.p("w", "app-file"), "rb") as f:
                assert f.read() == b"before the cut"
            assert can_open_for_writing(b.p("w", "a", "held"))
            # b and c idle (their journals committed): the image holds still but for
            # their heartbeats
            for n in ("b", "c"):
                fd = os.open(mounts[n].p("w", n), os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
            from clusterfs.commands.status import gather
            slots = {s["slot"] for s in gather(vol, watch=0)["slots"]
                     if s.get("node") in ("b", "c") and s["state"] != "free"}
            assert len(slots) == 2
            skip = heartbeat_blocks(vol, slots)
            before = wait_still(vol, skip)
            # the fenced node's applications try hard to write: EIO, nothing reaches
            # the volume
            for attempt in (lambda: os.pwrite(app, b"x" * 5000, 0),
                            lambda: os.fsync(app),
                            lambda: os.ftruncate(app, 0),
                            lambda: os.mkdir(a.p("w", "new-dir")),
                            lambda: open(a.p("w", "new-file"), "wb").close(),
                            lambda: os.unlink(a.p("w", "app-file")),
                            lambda: os.setxattr(a.p("w", "app-file"), "user.x", b"1")):
                with pytest.raises(OSError) as e:
                    attempt()
                assert e.value.errno == errno.EIO
            time.sleep(1.0)
            assert image_digest(vol, skip) == before, "a fenced node wrote to the volume"
        finally:
            with contextlib.suppress(OSError):
                os.close(app)       # (EIO: its last flush is refused too)
            for wl in loads.values():
                wl.kill()
        # back on the network, a remount rejoins
        netns.restore("a")
        wait_for(lambda: netns.reachable("a", port), 30, "the link to come back")
        c.unmount("a", check_log=False)
        a = c.mount("a", wrap=netns.wrap("a"), lockd_addr=netns.lockd_addr("a", port))
        check_fsynced(loads["b"], a)
        with open(a.p("w", "a", "held"), "r+b") as f:
            assert f.read() == b"held"
        with open(a.p("w", "after-rejoin"), "wb") as f:
            f.write(b"a is back")
        with open(mounts["c"].p("w", "after-rejoin"), "rb") as f:
            assert f.read() == b"a is back"
        ok = True
    finally:
        if not ok:
            c.dump_logs()
        try:
            c.unmount_all(check_log=ok)
        finally:
            lockd.stop()
    check_volume(vol, crashed=True)
