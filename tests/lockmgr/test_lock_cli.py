"""``clusterfs keygen``, ``lockd`` and ``lockd-status`` as a user runs them.

``clusterfs lockd VOLUME`` is a lock manager candidate that mounts nothing: the same
code every cluster mount runs as its child.  Two of them on one volume elect one master
through the volume's lease block; killing it hands the lease to the other."""

import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from clusterfs.fs.volume import read_superblock
from clusterfs.ondisk.blockdev import BlockDevice
from clusterfs.ondisk.lease import read_lease
from tests.helpers import mkfs
from tests.lockmgr.lockmgr_testutil import (REPO, Worker, free_port, python_env,
                                            start_lockd, stop)


def run(*args, timeout=30):
    return subprocess.run([sys.executable, "-m", "clusterfs.cli", *args], cwd=REPO,
                          env=python_env(), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def one_line_error(r, code=None):
    assert r.returncode != 0 if code is None else r.returncode == code, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_keygen(tmp_path):
    path = tmp_path / "key"
    r = run("keygen", str(path))
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(bytes.fromhex(path.read_text().strip())) == 32
    old = path.read_text()
    assert "exists" in one_line_error(run("keygen", str(path)), 1)
    assert path.read_text() == old
    assert run("keygen", "--force", str(path)).returncode == 0
    assert path.read_text() != old
    assert "cannot create" in one_line_error(run("keygen", str(tmp_path / "no/dir/k")))


def lease_of(volume: str):
    """The volume's lease record (the lock manager's master), as on disk."""
    dev = BlockDevice(volume)
    try:
        return read_lease(dev, read_superblock(dev))
    finally:
        dev.close()


def candidate(volume: str, key: str, node: str, port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "clusterfs.cli", "lockd", volume, "--key", key,
         "--node", node, "--listen", f"127.0.0.1:{port}"],
        cwd=REPO, env=python_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)


def wait_master(volume: str, node: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = lease_of(volume)
        if rec is not None and rec.node == node:
            return rec
        time.sleep(0.05)
    raise AssertionError(f"{node} never became master: {lease_of(volume)}")


def serving(port: int, key: str, timeout: float = 10.0) -> dict:
    """The status of the master at ``port``, once it answers (it writes its claim
    to the volume before it serves)."""
    deadline = time.monotonic() + timeout
    while True:
        r = run("lockd-status", f"127.0.0.1:{port}", "--key", key, "--json")
        if r.returncode == 0:
            return json.loads(r.stdout)
        if time.monotonic() > deadline:
            raise AssertionError(f"no lock manager at port {port}: {r.stderr}")
        time.sleep(0.1)


@pytest.fixture
def volume(tmp_path):
    path = str(tmp_path / "vol.img")
    mkfs(path, "64M", "--slots", "4")
    key = str(tmp_path / "k")
    run("keygen", key)
    return path, key


def test_lockd_user_errors(tmp_path, volume):
    vol, key = volume
    line = one_line_error(run("lockd", vol, "--listen", "127.0.0.1:0", "--key",
                              str(tmp_path / "missing")), 2)
    assert "not found" in line and "keygen" in line
    (tmp_path / "short").write_text("abcd\n")
    os.chmod(tmp_path / "short", 0o600)
    assert "fewer than 16 bytes" in one_line_error(
        run("lockd", vol, "--listen", "127.0.0.1:0", "--key", str(tmp_path / "short")), 2)
    assert "HOST:PORT" in one_line_error(
        run("lockd", vol, "--listen", "nonsense", "--key", key), 2)
    assert one_line_error(run("lockd", vol, "--listen", "127.0.0.1:1", "--lease", "-3",
                              "--key", key), 2)
    assert "--lease" in one_line_error(run("lockd", vol, "--listen", "127.0.0.1:0",
                                           "--lease", "2", "--key", key), 2)
    assert "does not exist" in one_line_error(
        run("lockd", str(tmp_path / "nothing.img"), "--key", key), 2)
    (tmp_path / "junk.img").write_bytes(b"\0" * 65536)
    assert one_line_error(run("lockd", str(tmp_path / "junk.img"), "--key", key,
                              "--listen", "127.0.0.1:0"))


def test_lockd_status_of_a_lock_server(tmp_path):
    key = str(tmp_path / "k")
    run("keygen", key)
    port = free_port()
    sock = str(tmp_path / "lockd.sock")
    proc = start_lockd(key, port, unix=sock)
    w = None
    try:
        w = Worker(f"unix:{sock}", key, "node-a", 3)
        w.call("lock", name="r", mode="EX")
        w.call("lock", name="r2", mode="EX")
        r = run("lockd-status", f"127.0.0.1:{port}", "--key", key)
        assert r.returncode == 0, r.stderr
        assert "node-a" in r.stdout and "2 locks granted" in r.stdout
        r = run("lockd-status", f"unix:{sock}", "--key", key, "--json")
        st = json.loads(r.stdout)
        (node,) = st["nodes"]
        assert (node["node"], node["slot"], node["locks"]) == ("node-a", 3, 2)
        assert node["lease_age"] < 5 and st["recovering"] == [] and st["waiters"] == 0
        run("keygen", str(tmp_path / "other"))
        line = one_line_error(run("lockd-status", f"127.0.0.1:{port}", "--key",
                                  str(tmp_path / "other")), 3)
        assert "refused the key" in line
    finally:
        if w is not None:
            w.close()
        stop(proc, signal.SIGTERM)


def test_two_candidates_elect_one_master_and_fail_over(volume):
    vol, key = volume
    assert lease_of(vol).owner < 0                   # mkfs: nobody holds it
    pa, pb = free_port(), free_port()
    a = candidate(vol, key, "cand-a", pa)
    b = None
    try:
        rec = wait_master(vol, "cand-a")
        assert rec.addr == f"127.0.0.1:{pa}"
        b = candidate(vol, key, "cand-b", pb)
        time.sleep(3.0)                              # b waits: a keeps renewing
        now = lease_of(vol)
        assert now.node == "cand-a" and now.generation == rec.generation
        assert now.counter > rec.counter
        st = serving(pa, key)
        assert st["master"] == "cand-a" and st["generation"] == rec.generation
        # b is no master: it answers no lock protocol
        assert run("lockd-status", f"127.0.0.1:{pb}", "--key", key).returncode != 0
        stop(a, signal.SIGKILL)
        t0 = time.monotonic()
        rec_b = wait_master(vol, "cand-b")
        took = time.monotonic() - t0
        assert rec_b.generation == rec.generation + 1 and took < 10, took
        assert serving(pb, key)["master"] == "cand-b"
        stop(b, signal.SIGINT)
        assert b.returncode == 0
        err = b.stderr.read().decode()
        assert "Traceback" not in err and "elected lock manager master" in err
    finally:
        stop(a, signal.SIGKILL)
        if b is not None:
            stop(b, signal.SIGKILL)


def test_lockd_status_unreachable(tmp_path):
    key = str(tmp_path / "k")
    run("keygen", key)
    line = one_line_error(run("lockd-status", f"127.0.0.1:{free_port()}", "--key", key), 1)
    assert "cannot reach" in line
    assert "bad address" in one_line_error(run("lockd-status", "nowhere", "--key", key), 2)
    assert "not found" in one_line_error(
        run("lockd-status", "127.0.0.1:1", "--key", str(tmp_path / "nokey")), 2)


def test_lockd_port_in_use(volume):
    vol, key = volume
    port = free_port()
    proc = candidate(vol, key, "cand-a", port)
    try:
        wait_master(vol, "cand-a")
        assert "cannot listen" in one_line_error(
            run("lockd", vol, "--listen", f"127.0.0.1:{port}", "--key", key), 1)
    finally:
        stop(proc)
