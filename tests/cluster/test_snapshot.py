"""Volume snapshots through real mounts: taken while writers run on two nodes, the
snapshot checks clean, mounts beside the original (a new UUID) and holds files the
writers wrote, each whole or as the writer left it between two steps; offline and
through a hook too; a failing hook leaves the volume thawed."""

from __future__ import annotations

import os
import subprocess

from tests.cluster.cluster_util import running_cluster, volume_superblock, wait_for
from tests.cluster.test_freeze import cli, control_ready, writers_on_two_nodes
from tests.helpers import Mount, mkfs

CONTENT = lambda i: (f"{i} " * 300).encode()      # noqa: E731  (as Writer writes)


def volume_uuid(path: str) -> bytes:
    return volume_superblock(path).uuid


def fsck_clean(path: str) -> None:
    r = cli("fsck", "-fn", path, ok=False)
    assert r.returncode == 0, r.stdout + r.stderr


def check_snapshot_files(mount: Mount, directory: str, at_least: int) -> int:
    """Every file of the writer in the snapshot is as the writer left it after one of
    its steps (created empty, or whole); the first ``at_least`` are whole."""
    names = os.listdir(mount.p(directory))
    for name in names:
        i = int(name[1:])
        with open(mount.p(directory, name), "rb") as f:
            data = f.read()
        assert data in (b"", CONTENT(i)), f"{name}: {data[:40]!r}"
        if i < at_least:
            assert data == CONTENT(i), name
    assert len(names) >= at_least
    return len(names)


def test_snapshot_while_two_nodes_write(topdir):
    snap = os.path.join(topdir, "snap.img")
    with running_cluster(topdir) as c:
        a, b, writers = writers_on_two_nodes(c, topdir)
        try:
            before = [w.count() for w in writers]
            r = cli("snapshot", c.volume, snap)
            assert "sparse copy" in r.stdout or "reflink" in r.stdout, r.stdout
            assert "frozen" in r.stdout and "new volume UUID" in r.stdout
            after = [w.count() for w in writers]
            wait_for(lambda: all(w.count() > x + 3 for w, x in zip(writers, after)), 60,
                     "writers going on after the snapshot")
        finally:
            for w in writers:
                w.stop()
                w.kill()
        assert volume_uuid(snap) != volume_uuid(c.volume)
        fsck_clean(snap)
        # the snapshot mounts beside the original, which is still mounted
        s = Mount(snap, os.path.join(topdir, "snap"), "-o", "nolock").start()
        try:
            n = [check_snapshot_files(s, "wa", before[0]),
                 check_snapshot_files(s, "wb", before[1])]
            assert n[0] <= after[0] + 1 and n[1] <= after[1] + 1
        finally:
            s.stop()
        fsck_clean(snap)


def test_snapshot_offline_and_through_a_hook(topdir):
    vol = os.path.join(topdir, "vol.img")
    mkfs(vol, "128M")
    m = Mount(vol, os.path.join(topdir, "m")).start()
    try:
        with open(m.p("f"), "wb") as f:
            f.write(b"hello" * 1000)
    finally:
        m.stop()
    snap = os.path.join(topdir, "snap.img")
    r = cli("snapshot", vol, snap)
    assert "not mounted" in r.stdout
    fsck_clean(snap)
    assert volume_uuid(snap) != volume_uuid(vol)
    r = cli("snapshot", vol, snap, ok=False)
    assert r.returncode != 0 and "exists" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    hooked = os.path.join(topdir, "hooked.img")
    cli("snapshot", vol, hooked, "-q", "--hook",
        'cp --sparse=always "$CLUSTERFS_VOLUME" "$CLUSTERFS_SNAPSHOT"')
    fsck_clean(hooked)
    assert volume_uuid(hooked) not in (volume_uuid(vol), volume_uuid(snap))
    s = Mount(hooked, os.path.join(topdir, "h")).start()
    try:
        assert open(s.p("f"), "rb").read() == b"hello" * 1000
    finally:
        s.stop()


def test_a_failing_hook_leaves_the_volume_thawed(topdir):
    with running_cluster(topdir) as c:
        a = c.mount("n1")
        b = c.mount("n2")
        control_ready(a.path)
        r = cli("snapshot", c.volume, os.path.join(topdir, "x.img"), "--hook", "exit 3",
                ok=False)
        assert r.returncode != 0 and "exit status 3" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        # not frozen: a write on the other node goes through at once
        subprocess.run(["sh", "-c", f"echo hi > {b.p('after')}"], check=True, timeout=20)
        assert open(a.p("after")).read() == "hi\n"
