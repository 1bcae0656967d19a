"""``clusterfs fsck -n`` of a mounted volume, through real mounts (``fsck.online``).

With a member of this machine mounted, fsck checks a snapshot: under writers on two
nodes it finds nothing, run after run, and it sees what is only in a node's journal
(files created and fsynced just before: the inode count of the check grows by them;
a check of the device as it is would not see them).  Damage made on the mounted
volume is found, named by its block.  ``--frozen`` checks the live device while the
writers wait, then lets them go on.  A volume whose members are elsewhere (their
control channel out of sight) is checked as it is on disk, with the warning that
says so.
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import subprocess
import time

from clusterfs import control
from clusterfs.fs import directory
from clusterfs.fs.volume import Volume
from tests.cluster.cluster_util import PY, running_cluster, wait_for
from tests.cluster.test_freeze import control_ready, start_writers
from tests.helpers import run_cli

RUNS = 20
F_SETPIPE_SZ = 1031


def fsck(volume: str, *args: str, env: dict | None = None):
    return run_cli("fsck", "-n", volume, *args, check=False, timeout=120,
                   env=dict(os.environ, **(env or {})))


def inodes_checked(out: str) -> int:
    """The inode count of fsck's last summary ("VOLUME: N inodes, U/T blocks")."""
    found = re.findall(r": (\d+) inodes, \d+/\d+ blocks", out)
    assert found, out
    return int(found[-1])


def dinode_block(volume: str, *names: str) -> int:
    """The dinode block of the file at ``names`` under the root, through the volume
    API (read-only, as the volume is on disk)."""
    vol = Volume.open(volume, readonly=True)
    try:
        ino = vol.sb.root_ino
        for name in names:
            found = directory.lookup(vol, vol.dinode(ino), name.encode())
            assert found is not None, f"{name} not found"
            ino = found[1]
        return ino            # an inode's number is its dinode's block
    finally:
        vol.close()


def poke(volume: str, bno: int, offset: int, data: bytes) -> bytes:
    """Write ``data`` at ``offset`` of block ``bno`` of the image; returns what was
    there."""
    with open(volume, "r+b") as f:
        f.seek(bno * 4096 + offset)
        old = f.read(len(data))
        f.seek(bno * 4096 + offset)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return old


def test_online_fsck_of_a_mounted_volume(topdir):
    t0 = time.monotonic()
    with running_cluster(topdir) as c:
        a = c.mount("n1")
        b = c.mount("n2")
        # a file written earlier by a node that has left since: nobody has it open or
        # cached, so nothing writes its dinode back
        n3 = c.mount("n3")
        os.mkdir(n3.p("old"))
        with open(n3.p("old", "victim"), "wb") as f:
            f.write(b"written long ago\n" * 10)
            os.fsync(f.fileno())
        c.unmount("n3")
        control_ready(a.path)
        control_ready(b.path)

        # what only a node's journal holds is checked: files created and fsynced just
        # before the check are counted
        r = fsck(c.volume)
        assert r.returncode == 0, r.stdout + r.stderr
        before = inodes_checked(r.stdout)
        os.mkdir(a.p("fresh"))
        for i in range(20):
            with open(a.p("fresh", f"f{i}"), "wb") as f:
                f.write(b"x" * 5000)
                os.fsync(f.fileno())
        r = fsck(c.volume)
        assert r.returncode == 0, r.stdout + r.stderr
        assert inodes_checked(r.stdout) == before + 21, r.stdout

        writers = start_writers(a, b, topdir)
        try:
            t_load = time.monotonic()
            for run in range(RUNS):
                r = fsck(c.volume)
                out = r.stdout + r.stderr
                assert r.returncode == 0, f"run {run}:\n{out}"
                assert "WARNING" not in out and "error(s)" not in out, f"run {run}:\n{out}"
                assert "checked a snapshot of the mounted volume taken at" in r.stdout, out
                assert _snapshots(topdir) == []
            t_load = time.monotonic() - t_load
            counts = [w.count() for w in writers]
            assert all(n > 20 for n in counts), counts      # they wrote all along

            # damage on the mounted volume: a middle byte of the victim's dinode
            bno = dinode_block(c.volume, "old", "victim")
            old = poke(c.volume, bno, 2048, b"\xa5")
            try:
                r = fsck(c.volume)
                assert r.returncode == 4, r.stdout + r.stderr
                assert f"{bno}" in r.stdout and "checked a snapshot" in r.stdout, r.stdout
                # --frozen: the live device, the writers held meanwhile
                r = fsck(c.volume, "--frozen")
                assert r.returncode == 4, r.stdout + r.stderr
                assert f"{bno}" in r.stdout, r.stdout
                assert "checked the live volume held frozen from node" in r.stdout
                assert "WARNING" not in r.stdout, r.stdout
            finally:
                poke(c.volume, bno, 2048, old)
            after = [w.count() for w in writers]
            wait_for(lambda: all(w.count() > x + 3 for w, x in zip(writers, after)), 60,
                     "writers going on after the frozen check")
            r = fsck(c.volume, "--frozen")
            assert r.returncode == 0, r.stdout + r.stderr

            # mounted, but no member of this machine in sight: the state on disk,
            # said plainly (findings, if any, may be transient)
            hidden = os.path.join(topdir, "no-members")
            os.mkdir(hidden)
            r = fsck(c.volume, env={"CLUSTERFS_RUN_DIR": hidden})
            assert r.returncode in (0, 4), r.stdout + r.stderr
            assert "without what the live journals of 'n1', 'n2' hold" in r.stdout or \
                "without what the live journals of 'n2', 'n1' hold" in r.stdout, r.stdout
            assert "findings may be transient" in r.stdout.splitlines()[-1], r.stdout
            assert "checked a snapshot" not in r.stdout
        finally:
            for w in writers:
                w.stop()
                w.kill()
        writers[0].verify(b.p("wa"))
        writers[1].verify(a.p("wb"))
    print(f"{RUNS} checks under load: {t_load:.1f} s; whole test "
          f"{time.monotonic() - t0:.1f} s")


def test_online_fsck_refusals_are_one_line(topdir):
    with running_cluster(topdir, size="128M") as c:
        a = c.mount("n1")
        control_ready(a.path)
        for args in (("-y",), ("-p",)):
            r = run_cli("fsck", *args, c.volume, check=False)
            assert r.returncode == 8 and "in use" in r.stdout, r.stdout + r.stderr
        r = run_cli("fsck", "-y", "--frozen", c.volume, check=False)
        assert r.returncode == 16 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        r = fsck(c.volume, "--snapshot-dir", os.path.join(topdir, "nowhere"))
        assert r.returncode == 16 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        r = fsck(c.volume, "--frozen", "--snapshot-dir", topdir)
        assert r.returncode == 16 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        # no room: a small file system for the snapshot
        small = os.path.join(topdir, "small")
        os.mkdir(small)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", small],
                       check=True)
        try:
            r = fsck(c.volume, "--snapshot-dir", small)
            assert r.returncode == 8, r.stdout + r.stderr
            assert len(r.stderr.strip().splitlines()) == 1, r.stderr
            assert "no room for a snapshot" in r.stderr and "--frozen" in r.stderr
            assert os.listdir(small) == []
        finally:
            subprocess.run(["umount", small], check=True)
        # a check interrupted (SIGTERM) once its snapshot is taken: it leaves no
        # snapshot behind and the volume thawed.  Its output goes to a pipe nobody
        # reads yet, nearly full, so that it waits in its first line (said once the
        # snapshot is taken, before the check).  A signal that wakes that write
        # before the pipe has room loses the line (a short write is atomic), so the
        # line is let through with fsck stopped, and the signal comes while fsck is
        # held again, stopped in its check in front of a full pipe.
        r_end, w_end = os.pipe()
        fcntl.fcntl(w_end, F_SETPIPE_SZ, 4096)
        os.write(w_end, b"." * 4000)
        p = subprocess.Popen([PY, "-m", "clusterfs.cli", "fsck", "-n", c.volume],
                             stdout=w_end, stderr=subprocess.PIPE)
        try:
            wait_for(lambda: "pipe_write" in _wchan(p.pid), 30, "fsck's first line")
            assert len(_snapshots(topdir)) == 1
            _stop(p.pid)
            out = os.read(r_end, 4000)            # the dots: room for the line
            os.kill(p.pid, signal.SIGCONT)
            while b"\n" not in out.lstrip(b"."):
                out += os.read(r_end, 65536)
            _stop(p.pid)
            os.set_blocking(w_end, False)
            try:
                while True:
                    os.write(w_end, b"." * 4096)
            except BlockingIOError:
                pass
            os.close(w_end)
            w_end = None
            p.send_signal(signal.SIGTERM)
            os.kill(p.pid, signal.SIGCONT)
            while chunk := os.read(r_end, 65536):
                out += chunk
            err = p.stderr.read().decode()
            assert p.wait(60) == 130, out.lstrip(b".").decode() + err
            assert b"checking a snapshot" in out and "interrupted" in err, err
        finally:
            os.close(r_end)
            if w_end is not None:
                os.close(w_end)
            if p.poll() is None:
                p.kill()
                p.wait()
        assert _snapshots(topdir) == []
        assert not control.call(control.find(a.path), {"op": "status"})["frozen_here"]
        with open(a.p("after"), "w") as f:
            f.write("x")


def _stop(pid: int) -> None:
    """SIGSTOP ``pid`` and wait until it is stopped."""
    os.kill(pid, signal.SIGSTOP)
    wait_for(lambda: _state(pid) == "T", 30, f"process {pid} stopped")


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _wchan(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return f.read()
    except OSError:
        return ""


def _snapshots(top: str) -> list[str]:
    return [n for n in os.listdir(top) if n.startswith(".clusterfs-fsck-")]
