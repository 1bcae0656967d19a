"""Node death, lock manager crash and network partition, with real processes.

* kill -9 of a node (the lock manager's master or not) in the middle of a
  metadata-heavy workload, at random points: a survivor recovers it; every file the
  dead node fsync'ed has its data; its open modes are released; the survivors'
  applications see no error; the volume is consistent (walk + fsck) once every node
  is unmounted.  Three runs by default, twenty under ``-m slow``; three (thirty) more
  that kill the master's node; a two-node cluster losing either node.
* SIGSTOP of the master's node (mount and candidate) for longer than every lease:
  the others elect a new master and go on; when it wakes it writes nothing (not the
  lease block, not its slot) and its mount fences itself.
* SIGKILL of the master's lock manager process (its node's mount lives on) while
  three nodes work (default leases): another candidate is elected, every node
  reclaims its locks there, no application sees an error, nothing is lost.
* A network partition (each node in its own network namespace): the master cut off
  from the other nodes resigns, the others elect a new master; the node cut off
  fences itself (EIO, not one more byte on the volume), the others recover its
  journal and carry on, and it rejoins after a remount.

Every check reads state: the lock manager's own view (``Cluster.view``), the lease
and the slots on the volume, what the mounts answer; none reads a log line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import os
import random
import shutil
import signal
import time

import pytest

from clusterfs.ondisk.format import HB_FREE
from tests.cluster.cluster_util import (Netns, Workload, fails_with_eio, heartbeat_blocks,
                                        image_digest, make_key, running_cluster, sha256_of,
                                        slot_state, wait_for)


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


def locks_reclaimed(c, generation: int) -> dict[str, set]:
    """Wait for the lock manager elected after ``generation`` to end its grace period
    (it grants nothing new before: only reclaims); then every member's session there
    must have been opened by a reclaim.  Returns the locks (name, mode) each node
    holds then."""
    def over():
        if c.master().generation <= generation:
            return None
        try:
            st = c.view()
        except Exception:           # elected, not listening yet
            return None
        return st if st["grace_left"] == 0 else None

    st = wait_for(over, 60, "the end of the grace period", interval=0.02)
    opened = {n["node"]: n["opened"] for n in st["nodes"]}
    assert set(opened.values()) == {"reclaimed"}, opened
    held: dict[str, set] = {}
    for h in st["held"]:
        held.setdefault(h["node"], set()).add((h["name"], h["mode"]))
    return held


def kill_during_workload(topdir: str, seed: int, *, nodes: int | None = None,
                         victim: str = "random") -> None:
    """Every node runs a workload; one node is killed with SIGKILL (its lock manager
    candidate dies with it).  ``nodes``: 2 or 3 (default: by the seed); ``victim``:
    "master" (the lock manager's), "member" (not the master) or "random"."""
    rng = random.Random(seed)
    three = seed % 2 == 1 if nodes is None else nodes == 3
    with running_cluster(topdir, crashes=True) as c:
        names = ["a", "b", "c"] if three else ["a", "b"]
        mounts = {n: c.mount(n) for n in names}
        os.mkdir(mounts["a"].p("w"))
        master = c.master_node()
        if victim == "master":
            victim = master
        elif victim == "member":
            victim = rng.choice([n for n in names if n != master])
        else:
            victim = rng.choice(names)
        before = c.master()
        slot = c.slot_of(victim)
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
            if victim == master:
                # a survivor's candidate takes the lease once it expired
                new = wait_for(lambda: (m := c.master()).generation > before.generation
                               and m, 30, "a new lock manager master")
                assert new.node in survivors, new
            # a survivor recovers it; the others' applications wait, never fail
            c.wait_recovered(victim, slot)
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


@pytest.mark.parametrize("seed", range(3))
def test_kill_of_the_master_node_during_workload(topdir, seed):
    """The node whose candidate is the lock manager's master dies (SIGKILL of its
    mount and, with it, its candidate) while all three nodes write."""
    kill_during_workload(topdir, seed, nodes=3, victim="master")


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(200, 230))
def test_kill_of_the_master_node_campaign(topdir, seed):
    kill_during_workload(topdir, seed, nodes=3, victim="master")


@pytest.mark.parametrize("victim", ["master", "member"])
def test_two_node_cluster_survives_the_death_of_either(topdir, victim):
    """Two nodes, no network majority possible: the survivor goes on whichever dies
    (it takes the master's lease itself when the master died)."""
    kill_during_workload(topdir, 7, nodes=2, victim=victim)


def test_lock_manager_crash_during_workload(topdir):
    """Default leases and heartbeats: SIGKILL the master's lock manager process (its
    node lives on and starts a new candidate) mid-workload on three nodes, twice."""
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
                before = c.master()
                os.kill(c.candidate_pid(before.node), signal.SIGKILL)
                # every node reclaims its locks before the new master's grace period
                # ends, in the modes it held them (each holds its slot lock in EX)
                held = locks_reclaimed(c, before.generation)
                assert sorted(held) == ["a", "b", "c"], held
                for n, locks in held.items():
                    assert "EX" in {mode for _name, mode in locks}, (n, locks)
                done = {n: len(wl.events()) for n, wl in loads.items()}
                wait_for(lambda: all(len(wl.events()) > done[n] + 2
                                     for n, wl in loads.items()), 60,
                         "the workloads to go on")
            for n, wl in loads.items():
                assert wl.stop() == 0, f"workload on {n}: {wl.errors()}"
        finally:
            for wl in loads.values():
                wl.kill()
        other = {"a": mounts["b"], "b": mounts["c"], "c": mounts["a"]}
        for n, wl in loads.items():
            assert check_fsynced(wl, other[n]) > 0
        # no node fenced itself: each is still a live member and still writes
        st = c.view()
        assert sorted(n["node"] for n in st["nodes"]) == ["a", "b", "c"], st
        assert st["recovering"] == [], st
        for n, m in mounts.items():
            with open(m.p("w", f"after-{n}"), "wb") as f:
                f.write(n.encode())
        for n in mounts:
            with open(other[n].p("w", f"after-{n}"), "rb") as f:
                assert f.read() == n.encode()


def test_paused_master_node_wakes_up_to_find_itself_replaced(topdir):
    with running_cluster(topdir, crashes=True) as c:
        mounts = {n: c.mount(n) for n in ("a", "b", "c")}
        assert c.master_node() == "a"
        old = c.master()
        a = mounts["a"]
        os.mkdir(a.p("w"))
        loads = {n: Workload(m, n, m.p("w"), topdir, seed=40 + i, strict=n != "a",
                             hold="held" if n == "a" else None)
                 for i, (n, m) in enumerate(mounts.items())}
        slot = c.slot_of("a")
        paused = [a.proc.pid, c.candidate_pid("a")]
        try:
            for wl in loads.values():
                wl.wait_started()
            for pid in paused:
                os.kill(pid, signal.SIGSTOP)
            # b or c takes the lease; a's slot (its heartbeat quiet) is recovered
            new = wait_for(lambda: (m := c.master()).generation > old.generation and m,
                           30, "a new lock manager master")
            assert new.node in ("b", "c"), new
            c.wait_recovered("a", slot)
            recovered = slot_state(c.volume, slot)
            done = {n: len(loads[n].events()) for n in ("b", "c")}
            try:
                wait_for(lambda: all(len(loads[n].events()) > done[n] + 2
                                     for n in ("b", "c")), 60, "b and c to carry on")
            except AssertionError:
                for n in ("b", "c"):          # (shown with the failure)
                    print(f"workload {n}: exit {loads[n].proc.poll()}: "
                          f"{loads[n].errors()[-3000:]}")
                raise
            # well past every lease of a's: wake it up
            for pid in paused:
                os.kill(pid, signal.SIGCONT)
            paused = []
            probes = itertools.count()
            wait_for(lambda: fails_with_eio(a.p("w", f"probe-{next(probes)}")), 30,
                     "a to fence itself")
            time.sleep(3.0)               # a's candidate and mount had time to act
            # the old master wrote nothing: the lease is the new master's, and a's
            # slot is as its recovery left it
            now = c.master()
            assert (now.owner, now.generation) == (new.owner, new.generation), now
            assert slot_state(c.volume, slot) == recovered, "a wrote its slot after waking"
            # the new master serves b and c; a (its lease gone) got at most a new,
            # empty session, and holds nothing
            st = c.view()
            nodes = {n["node"]: n for n in st["nodes"]}
            assert {"b", "c"} <= set(nodes) <= {"a", "b", "c"}, st
            assert "a" not in nodes or nodes["a"]["locks"] == 0, st
            assert st["recovering"] == [], st
            for n in ("b", "c"):
                assert loads[n].stop() == 0, loads[n].errors()
        finally:
            for pid in paused:
                os.kill(pid, signal.SIGCONT)
            for wl in loads.values():
                wl.kill()
        b = mounts["b"]
        assert check_fsynced(loads["a"], b) > 0
        check_fsynced(loads["c"], b)
        assert can_open_for_writing(b.p("w", "a", "held"))
        # it rejoins by remount
        c.unmount("a", check_log=False)
        back = c.mount("a")
        check_fsynced(loads["b"], back)


@pytest.fixture
def netns():
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nsenter"):
        pytest.skip("needs root, ip (iproute2) and nsenter (util-linux)")
    ns = Netns(["a", "b", "c"])
    try:
        yield ns.setup()
    finally:
        ns.teardown()


def test_network_partition_of_the_master(topdir, netns):
    """a, the lock manager's master, is cut off from b and c (it still reaches the
    volume): it resigns, b or c becomes master, a fences itself; a's old term ends
    before the new one begins."""
    from tests.cluster.cluster_util import Cluster, check_volume
    from tests.helpers import mkfs
    key = make_key(os.path.join(topdir, "cluster.key"))
    vol = os.path.join(topdir, "vol.img")
    mkfs(vol, "256M")
    c = Cluster(topdir, vol, key)
    ok = False

    def mount(n):
        return c.mount(n, wrap=netns.wrap(n), listen=f"{netns.addr(n)}:0")
    try:
        mounts = {"a": mount("a")}       # the first node's candidate takes the free lease
        assert c.master_node() == "a"
        old = c.master()
        mounts.update((n, mount(n)) for n in ("b", "c"))
        a = mounts["a"]
        os.mkdir(a.p("w"))
        loads = {n: Workload(m, n, m.p("w"), topdir, seed=i, strict=n != "a",
                             hold="held" if n == "a" else None)
                 for i, (n, m) in enumerate(mounts.items())}
        slot = {n: c.slot_of(n) for n in mounts}
        app = os.open(a.p("w", "app-file"), os.O_CREAT | os.O_RDWR, 0o644)
        try:
            os.write(app, b"before the cut")
            os.fsync(app)
            for wl in loads.values():
                wl.wait_started()
            netns.cut("a")
            # a fences itself: every request gets EIO (each probe looks a new name
            # up, so the kernel has no answer of its own)
            probes = itertools.count()
            wait_for(lambda: fails_with_eio(a.p("w", f"probe-{next(probes)}")), 30,
                     "a to fence itself")
            fenced = slot_state(vol, slot["a"])
            with pytest.raises(OSError) as e:
                os.pwrite(app, b"after", 0)
            assert e.value.errno == errno.EIO
            # b or c is the new master; the old one had stopped renewing its lease
            # (resigned) at least the lease's expiry before (the lease block shows
            # a new generation only after the expiry passed unrenewed)
            new = wait_for(lambda: (m := c.master()).generation > old.generation and m,
                           30, "a new lock manager master")
            assert new.node in ("b", "c"), new
            # the others recover its journal and carry on
            c.wait_recovered("a", slot["a"], wrap=netns.wrap("b"))
            # a has not written to its slot since it fenced: its heartbeat is as it
            # left it but for the recovery's mark (FREE, counter + 1), its log blocks
            # are unchanged
            recovered = slot_state(vol, slot["a"])
            assert recovered.heartbeat == dataclasses.replace(
                fenced.heartbeat, state=HB_FREE, counter=fenced.heartbeat.counter + 1)
            assert recovered.log_digest == fenced.log_digest
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
            skip = heartbeat_blocks(vol, {slot["b"], slot["c"]})
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
            with contextlib.suppress(OSError):
                os.close(app)       # (EIO: its last flush is refused too)
            app = None
            # once its process has ended, a has made or been refused every write it
            # would ever try: the image must be as it was before the attempts, and
            # a's slot as the recovery left it
            c.unmount("a", check_log=False)
            assert image_digest(vol, skip) == before, "a fenced node wrote to the volume"
            assert slot_state(vol, slot["a"]) == recovered, "a fenced node wrote its slot"
        finally:
            if app is not None:
                with contextlib.suppress(OSError):
                    os.close(app)
            for wl in loads.values():
                wl.kill()
        # back on the network, a remount rejoins
        netns.restore("a")
        wait_for(lambda: netns.reachable("a", c.master().addr), 30, "the link to come back")
        a = mount("a")
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
        c.unmount_all(check_log=ok)
    check_volume(vol, crashed=True)
