"""One host loses its path to the shared volume (a SAN path failure) while the others
keep theirs: that node fences itself and leaves the lock manager as a crashed node
does, a survivor recovers its journal from the volume, and the other nodes carry on
with the locks it held, whether it was a plain member or the lock manager's master.
Once its path is mended, the node rejoins with a remount.

Node a reaches the volume through ``faultydisk.py`` (``cluster_util.FaultyPath``),
which answers every read, write and flush with EIO once the test breaks it.
"""

from __future__ import annotations

import errno
import itertools
import os
import shutil
import subprocess
import time

import pytest

from tests.cluster.cluster_util import (FaultyPath, fails_with_eio, running_cluster,
                                        slot_state, volume_superblock, wait_for)
from tests.cluster.test_file_locks import kill_all, ofd_probe, qemu, shared_file
from tests.helpers import Mount, fsck_clean, mkfs

BLOCK = 4096


def fsynced_file(path: str, size: int) -> bytes:
    """Write ``size`` random bytes to a new file and fsync it; returns them."""
    data = os.urandom(size)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return data


WRITER = """import os, sys
fd = os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY, 0o644)
os.write(fd, b"written by b")
os.fsync(fd)
"""


# (make test runs one case of each fix; the others run with the slow campaigns)
@pytest.mark.parametrize("master", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["member", "master"])
def test_a_node_that_loses_the_disk_leaves_and_the_others_carry_on(topdir, master):
    with running_cluster(topdir, crashes=True) as c, \
            FaultyPath(topdir, c.volume, "a") as path:
        writer = None
        try:
            if master:
                a = c.mount("a", volume=path.image)
                b = c.mount("b")
            else:
                b = c.mount("b")
                a = c.mount("a", volume=path.image)
            assert c.master_node() == ("a" if master else "b")
            # a holds the directory's lock (EX) and its files' when the disk goes
            os.mkdir(a.p("d"))
            kept = fsynced_file(a.p("d/kept"), 1 << 20)
            fd = os.open(a.p("d/open"), os.O_CREAT | os.O_WRONLY, 0o644)
            slot = c.slot_of("a")
            generation = c.master().generation

            path.lose()
            # a's applications get EIO (within the heartbeat's validity), no hang
            try:
                with pytest.raises(OSError) as e:
                    os.write(fd, b"x" * 4096)
                    os.fsync(fd)
                assert e.value.errno == errno.EIO
            finally:
                os.close(fd)
            probes = itertools.count()
            wait_for(lambda: fails_with_eio(a.p("d", f"probe-{next(probes)}")), 30,
                     "a to fence itself")

            # b creates in the directory a held and reads what a had made durable.
            # In a child: a request waiting on a's locks cannot be killed (the
            # kernel waits for the answer), so the test gives up on it, not kills it
            t0 = time.monotonic()
            writer = subprocess.Popen(["python3", "-c", WRITER, b.p("d/from-b")])
            wait_for(lambda: writer.poll() is not None, 90, "b's create in a's directory")
            assert writer.returncode == 0
            with open(b.p("d/kept"), "rb") as f:
                assert f.read() == kept
            print(f"b carried on {time.monotonic() - t0:.1f} s after a fenced itself")
            c.wait_recovered("a", slot)
            if master:
                new = c.master()
                assert new.generation > generation and c.master_node() == "b", new
            # a stays fenced, and wrote nothing since its recovery
            recovered = slot_state(c.volume, slot)
            assert fails_with_eio(a.p("d", "probe-last"))
            time.sleep(1.0)
            assert slot_state(c.volume, slot) == recovered
            with open(b.p("d/from-b"), "rb") as f:
                assert f.read() == b"written by b"
            # the path mended, a rejoins with a remount and sees it all
            path.restore()
            c.unmount("a", check_log=False)
            a = c.mount("a", volume=path.image)
            with open(a.p("d/kept"), "rb") as f:
                assert f.read() == kept
            with open(a.p("d/from-b"), "rb") as f:
                assert f.read() == b"written by b"
            os.mkdir(a.p("d/again"))
            assert os.path.isdir(b.p("d/again"))
        finally:
            # before its path to the volume goes; its log has the errors of the
            # failed disk.  (A writer still waiting is answered once a has left.)
            c.unmount("a", check_log=False)
            if writer is not None:
                writer.wait(timeout=120)


def test_a_single_node_mount_that_loses_the_disk(topdir):
    """A single-node mount whose disk fails answers EIO and exits with status 1,
    its journal left for replay (no traceback); the next mount replays it, and
    what was fsynced before the failure is intact."""
    vol = os.path.join(topdir, "vol.img")
    mkfs(vol, "128M")
    with FaultyPath(topdir, vol, "s") as path:
        m = Mount(path.image, os.path.join(topdir, "m"))
        try:
            m.start()
            os.mkdir(m.p("d"))
            kept = fsynced_file(m.p("d/kept"), 300_000)
            path.lose()
            # the data's write fails; the create's commit fails at the fsync and
            # stops the journal; from then on every change is EIO at once
            fd = os.open(m.p("d/new"), os.O_CREAT | os.O_WRONLY, 0o644)
            try:
                for step in (lambda: os.write(fd, b"x" * 4096), lambda: os.fsync(fd)):
                    with pytest.raises(OSError) as e:
                        step()
                    assert e.value.errno == errno.EIO
            finally:
                os.close(fd)
            with pytest.raises(OSError) as e:
                os.mkdir(m.p("d/e"))
            assert e.value.errno == errno.EIO
        finally:
            m.stop(check_log=False)
        log = m.read_log()
        assert "Traceback" not in log, log
        assert "left on the volume for replay at the next mount" in log, log
        assert m.returncode == 1, log
        path.restore()
        m = Mount(path.image, os.path.join(topdir, "m"))
        try:
            m.start()
            with open(m.p("d/kept"), "rb") as f:
                assert f.read() == kept
        finally:
            m.stop()
    fsck_clean(vol)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                    reason="QEMU is not installed")
def test_a_vm_whose_host_lost_the_disk_starts_on_another_node(topdir):
    """QEMU's image locks (OFD locks) of a VM on a host that lost the volume go with
    that host's recovery: the VM's disk can then be opened for writing on another
    node, as an HA restart does, and not before."""
    with running_cluster(topdir, crashes=True) as c, \
            FaultyPath(topdir, c.volume, "a") as path:
        first = second = None
        try:
            b = c.mount("b")
            a = c.mount("a", volume=path.image)
            shared_file(a.p("disk.img"))
            os.truncate(a.p("disk.img"), 64 << 20)
            first = qemu(a.p("disk.img"))
            wait_for(lambda: ofd_probe(b) != "unlocked", 60, "QEMU's locks")
            slot = c.slot_of("a")
            path.lose()
            probes = itertools.count()
            wait_for(lambda: fails_with_eio(a.p(f"probe-{next(probes)}")), 30,
                     "a to fence itself")
            c.wait_recovered("a", slot)
            assert ofd_probe(b) == "unlocked"
            second = qemu(b.p("disk.img"))
            time.sleep(3)
            assert second.poll() is None, second.communicate()[0]
        finally:
            kill_all(first, second)
            c.unmount("a", check_log=False)


@pytest.mark.parametrize("pending", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["lock-wanted", "commit-due"])
def test_a_node_whose_journal_cannot_be_written_leaves(topdir, pending):
    """Bad sectors in node a's journal, the rest of its disk (its heartbeat) fine.
    Either the write-back that another node's lock request needs fails
    (``lock-wanted``: nothing left to commit), or a's periodic commit of the changes
    it holds fails (``commit-due``: untouched, a leaves by itself).  Either way a
    fences itself and leaves instead of keeping its locks for good; a survivor
    recovers its journal (the reads work) and the other node carries on."""
    with running_cluster(topdir, crashes=True) as c, \
            FaultyPath(topdir, c.volume, "a") as path:
        writer = None
        try:
            b = c.mount("b")
            a = c.mount("a", volume=path.image)
            os.mkdir(a.p("d"))
            kept = fsynced_file(a.p("d/kept"), 200_000)
            if pending:
                with open(a.p("d/pending"), "wb") as f:   # a's running transaction
                    f.write(b"p")
            slot = c.slot_of("a")
            start, length = volume_superblock(c.volume).journal_range(slot)
            path.lose(bad=[(start * BLOCK, length * BLOCK)])
            if pending:
                # no request reaches a: its commit (every 5 s) fails, and it leaves
                c.wait_recovered("a", slot, timeout=40)
            else:
                time.sleep(2.0)
                assert not fails_with_eio(a.p("d", "probe")), "a fenced unasked"
            writer = subprocess.Popen(["python3", "-c", WRITER, b.p("d/from-b")])
            wait_for(lambda: writer.poll() is not None, 90, "b's create in a's directory")
            assert writer.returncode == 0
            with open(b.p("d/kept"), "rb") as f:
                assert f.read() == kept
            c.wait_recovered("a", slot)
            assert fails_with_eio(a.p("d", "probe-last"))
        finally:
            c.unmount("a", check_log=False)
            if writer is not None:
                writer.wait(timeout=120)
