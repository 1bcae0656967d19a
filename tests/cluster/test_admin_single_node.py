"""Freeze, thaw, snapshot and add-slots of a single-node mount through its control
channel: a writer waits while frozen (reads go on), the frozen image does not
change, the thaw loses nothing; a snapshot of the mounted volume checks clean and
mounts; slots added while mounted are usable after."""

from __future__ import annotations

import os
import time

from tests.cluster.cluster_util import heartbeat_blocks, image_digest, wait_for
from tests.cluster.test_freeze import Writer, cli, control_ready
from tests.helpers import Mount, mkfs


def test_freeze_snapshot_and_add_slots_of_a_single_node_mount(topdir):
    vol = os.path.join(topdir, "vol.img")
    mkfs(vol, "128M", "--slots", "2")
    m = Mount(vol, os.path.join(topdir, "m"), "--node", "solo").start()
    try:
        control_ready(m.path)
        w = Writer(m.p("w"), os.path.join(topdir, "w.log"))
        try:
            wait_for(lambda: w.count() > 5, 60, "the writer started")
            r = cli("freeze", m.path, "--timeout", "60")
            assert "frozen" in r.stdout
            before = w.count()
            skip = heartbeat_blocks(vol, [0])
            d1 = image_digest(vol, skip)
            time.sleep(1.2)
            assert image_digest(vol, skip) == d1, "the frozen image changed"
            assert w.count() - before <= 1
            with open(m.p("w", "f0"), "rb") as f:        # reads go on
                assert f.read() == (f"{0} " * 300).encode()
            cli("thaw", m.path)
            wait_for(lambda: w.count() > before + 5, 60, "the writer after the thaw")
        finally:
            w.stop()
            w.kill()
        w.verify(m.p("w"))
        snap = os.path.join(topdir, "snap.img")
        r = cli("snapshot", vol, snap)
        assert "frozen" in r.stdout and "new volume UUID" in r.stdout, r.stdout
        assert cli("fsck", "-fn", snap, ok=False).returncode == 0
        s = Mount(snap, os.path.join(topdir, "s")).start()
        try:
            w.verify(s.p("w"))
        finally:
            s.stop()
        r = cli("add-slots", vol, "1")
        assert "now 3" in r.stdout, r.stdout
        with open(m.p("after-slots"), "w") as f:
            f.write("still writable")
    finally:
        m.stop()
    assert cli("fsck", "-fn", vol, ok=False).returncode == 0
    # a node mounts in the added slot
    m = Mount(vol, os.path.join(topdir, "m"), "--node", "third", "-o", "nolock").start()
    m.stop()
    m = Mount(vol, os.path.join(topdir, "m")).start()
    try:
        assert open(m.p("after-slots")).read() == "still writable"
    finally:
        m.stop()


def test_a_mount_without_a_control_channel_still_serves(topdir):
    """A mount that cannot make its control socket (here its run directory is under
    a regular file) says so in one warning and serves files; freeze then finds no
    mount, in one line."""
    vol = os.path.join(topdir, "vol.img")
    mkfs(vol, "64M")
    bad = os.path.join(topdir, "a-file", "run")
    open(os.path.join(topdir, "a-file"), "w").close()
    m = Mount(vol, os.path.join(topdir, "m"),
              env=dict(os.environ, CLUSTERFS_RUN_DIR=bad)).start()
    try:
        with open(m.p("f"), "w") as f:
            f.write("served")
        assert open(m.p("f")).read() == "served"
        r = cli("freeze", m.path, env=dict(os.environ, CLUSTERFS_RUN_DIR=bad), ok=False)
        assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    finally:
        m.stop()
    assert "no control channel" in m.read_log()
