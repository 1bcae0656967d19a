"""Online grow and add-slots through real cluster mounts: the volume grows while a
writer on another node fills it past its old size, and every node sees the new size
without a remount; slots added while two nodes are mounted let a third node join."""

from __future__ import annotations

import os

import pytest

from tests.cluster.cluster_util import running_cluster, wait_for
from tests.cluster.test_freeze import cli, control_ready

MiB = 1 << 20
CHUNK = 4 * MiB


def fill(path: str, i: int) -> None:
    data = bytes([i % 251]) * CHUNK
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def total_mib(path: str) -> float:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize / MiB


def test_online_grow_while_another_node_fills_the_volume(topdir):
    import subprocess
    import sys
    with running_cluster(topdir, size="128M") as c:
        a = c.mount("n1")
        b = c.mount("n2")
        idle = c.mount("n3")        # writes nothing: learns the size at the thaw
        control_ready(a.path)
        old_total = total_mib(b.path)
        assert old_total < 128
        os.mkdir(b.p("fill"))
        # a writer on node B that writes 40 files of 4 MiB (160 MiB: more than the
        # old volume holds), one after the other
        log = os.path.join(topdir, "fill.log")
        writer = subprocess.Popen([sys.executable, "-c", f"""
import os, sys
for i in range(40):
    data = bytes([i % 251]) * {CHUNK}
    with open(os.path.join({b.p('fill')!r}, f"f{{i}}"), "wb") as f:
        f.write(data); f.flush(); os.fsync(f.fileno())
    with open({log!r}, "a") as out:
        out.write(f"{{i}}\\n")
"""])
        try:
            wait_for(lambda: os.path.exists(log) and len(open(log).read().split()) >= 3,
                     60, "the writer started")
            os.truncate(c.volume, 320 * MiB)
            r = cli("grow", c.volume)
            assert "grown from" in r.stdout, r.stdout
            assert writer.wait(timeout=180) == 0, "the writer failed (ENOSPC?)"
        finally:
            if writer.poll() is None:
                writer.kill()
                writer.wait()
        # every node sees the new size without a remount
        for m in (a, b, idle):
            wait_for(lambda: total_mib(m.path) > 300, 30, f"df on {m.path}")
        for i in range(40):
            with open(a.p("fill", f"f{i}"), "rb") as f:
                assert f.read() == bytes([i % 251]) * CHUNK, f"f{i}"
        # node A allocates from the new groups too
        for i in range(10):
            fill(a.p(f"a{i}"), i)
        assert total_mib(a.path) > 300 and total_mib(b.path) > 300
        # bad sizes through the mount: one line, non-zero, nothing changed
        r = cli("grow", c.volume, "--size", "64M", ok=False)
        assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
        assert total_mib(a.path) > 300


def test_add_slots_online_then_a_third_node_joins(topdir):
    with running_cluster(topdir, mkfs_args=("--slots", "2")) as c:
        a = c.mount("n1")
        c.mount("n2")
        control_ready(a.path)
        # no slot for a third node
        try:
            c.mount("n3", "--slot", "2")
            raise AssertionError("a third node mounted a 2-slot volume")
        except AssertionError as e:
            assert "slot 2 does not exist" in str(e), str(e)
        c.nodes.pop("n3")
        with open(a.p("before"), "w") as f:
            f.write("written before the slots were added")
        r = cli("add-slots", c.volume, "2", "--journal-size", "4M")
        assert "now 4" in r.stdout, r.stdout
        from clusterfs.fs.volume import read_superblock
        from clusterfs.ondisk.blockdev import BlockDevice
        dev = BlockDevice(c.volume, readonly=True)
        try:
            sb = read_superblock(dev)
            assert [sb.journal_range(s)[1] for s in (2, 3)] == [1024, 1024]
        finally:
            dev.close()
        n3 = c.mount("n3")
        assert c.slot_of("n3") >= 2
        assert open(n3.p("before")).read() == "written before the slots were added"
        with open(n3.p("from-n3"), "w") as f:
            f.write("hello from an added slot")
        assert open(a.p("from-n3")).read() == "hello from an added slot"
        r = cli("status", c.volume)
        assert r.returncode == 0


@pytest.mark.parametrize("step", ["new-groups", "last-group"])
def test_a_node_that_dies_growing_is_finished_by_its_recovery(topdir, step):
    """Node A dies (a power cut of its process) once a step of its online grow is
    durable: before the grow is recorded ("new-groups": the volume keeps its size and
    a later grow works) or after ("last-group": B's recovery of A finishes it, and B
    takes the grown size without a remount)."""
    with running_cluster(topdir, size="128M", crashes=True) as c:
        own = os.path.join(topdir, "run-a")        # only A's control channel is here
        env_a = dict(os.environ, CLUSTERFS_TEST_CRASH_AT=f"grow:{step}",
                     CLUSTERFS_RUN_DIR=own)
        a = c.mount("n1", env=env_a)
        b = c.mount("n2")
        control_ready(b.path)
        slot_a = c.slot_of("n1")
        os.truncate(c.volume, 256 * MiB)
        r = cli("grow", c.volume, env=dict(os.environ, CLUSTERFS_RUN_DIR=own), ok=False)
        assert r.returncode != 0, r.stdout
        wait_for(lambda: a.proc.poll() is not None, 30, "node A's death")
        log_a = a.read_log()
        a.kill()                    # (gone already: clean its mount point up)
        c.wait_recovered("n1", slot_a)
        if step == "new-groups":
            assert total_mib(b.path) < 128
            r = cli("grow", c.volume)
            assert "grown from" in r.stdout
        wait_for(lambda: total_mib(b.path) > 200, 30, "the grown size on node B")
        for i in range(40):            # 160 MiB: more than the old volume held
            fill(b.p(f"f{i}"), i)
        assert "test crash point grow:" + step in log_a
