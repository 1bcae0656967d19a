"""``clusterfs keygen``, ``lockd`` and ``lockd-status`` as a user runs them."""

import json
import os
import signal
import stat
import subprocess
import sys

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


def test_lockd_user_errors(tmp_path):
    line = one_line_error(run("lockd", "--listen", "127.0.0.1:0", "--key",
                              str(tmp_path / "missing")), 2)
    assert "not found" in line and "keygen" in line
    (tmp_path / "short").write_text("abcd\n")
    os.chmod(tmp_path / "short", 0o600)
    assert "fewer than 16 bytes" in one_line_error(
        run("lockd", "--listen", "127.0.0.1:0", "--key", str(tmp_path / "short")), 2)
    run("keygen", str(tmp_path / "k"))
    assert "HOST:PORT" in one_line_error(
        run("lockd", "--listen", "nonsense", "--key", str(tmp_path / "k")), 2)
    assert one_line_error(run("lockd", "--listen", "127.0.0.1:1", "--lease", "-3",
                              "--key", str(tmp_path / "k")), 2)


def test_lockd_status_and_clean_exit(tmp_path):
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
    assert proc.returncode == 0
    assert "Traceback" not in proc.stderr.read().decode()
    assert not os.path.exists(sock)


def test_lockd_exits_cleanly_on_sigint(tmp_path):
    key = str(tmp_path / "k")
    run("keygen", key)
    proc = start_lockd(key, free_port())
    stop(proc, signal.SIGINT)
    assert proc.returncode == 0
    err = proc.stderr.read().decode()
    assert "SIGINT: shutting down" in err and "Traceback" not in err


def test_lockd_status_unreachable(tmp_path):
    key = str(tmp_path / "k")
    run("keygen", key)
    line = one_line_error(run("lockd-status", f"127.0.0.1:{free_port()}", "--key", key), 1)
    assert "cannot reach" in line
    assert "bad address" in one_line_error(run("lockd-status", "nowhere", "--key", key), 2)
    assert "not found" in one_line_error(
        run("lockd-status", "127.0.0.1:1", "--key", str(tmp_path / "nokey")), 2)


def test_lockd_port_in_use(tmp_path):
    key = str(tmp_path / "k")
    run("keygen", key)
    port = free_port()
    proc = start_lockd(key, port)
    try:
        assert "cannot listen" in one_line_error(
            run("lockd", "--listen", f"127.0.0.1:{port}", "--key", key), 1)
    finally:
        stop(proc)
