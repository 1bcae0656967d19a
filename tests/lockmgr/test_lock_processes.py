"""The real thing: a lock server and clients in separate processes on loopback.

Contention, blocking callbacks, try-locks, timeouts, deadlock detection, a client
killed with SIGKILL, and a server killed and restarted in the middle of a workload.
What the lock manager holds is read from its own status query (``Lockd.view``), not
inferred from how long something took.
"""

import signal

import pytest

from lockmgr import keygen
from tests.lockmgr.lockmgr_testutil import Lockd, WorkerError, holders, waiting


@pytest.fixture
def keyfile(tmp_path):
    path = str(tmp_path / "key")
    keygen(path)
    return path


@pytest.fixture
def lockd(keyfile):
    """A running lockd (lease 2 s, no grace); call it for workers."""
    server = Lockd(keyfile, "--deadlock-wait", "0.5", lease=2.0)
    try:
        yield server
    finally:
        server.close()


def test_contention_counter_is_exact(lockd, tmp_path):
    counter = tmp_path / "counter"
    counter.write_text("0")
    ws = [lockd(f"n{i}", i) for i in range(3)]
    ids = [w.send("incr", name="counter", path=str(counter), count=40) for w in ws]
    for w, cid in zip(ws, ids):
        assert w.result(cid, timeout=60)["ok"] == 40
    assert counter.read_text() == "120"


def test_blocking_callback_in_another_process(lockd):
    a, b = lockd("a", 0), lockd("b", 1)
    assert a.call("lock", name="r", mode="EX", on_blocking="downgrade")["mode"] == "EX"
    assert b.call("lock", name="r", mode="PR")["mode"] == "PR"
    ev = a.wait_event("bast", name="r")
    assert ev["mode"] == "PR"
    assert b.call("convert", name="r", mode="EX")["mode"] == "EX"
    assert a.wait_event("bast", name="r")["mode"] == "EX"


def test_try_lock_across_processes(lockd):
    a, b = lockd("a", 0), lockd("b", 1)
    a.call("lock", name="r", mode="EX")
    with pytest.raises(WorkerError) as e:
        b.call("lock", name="r", mode="CR", **{"try": True})
    assert e.value.name == "TryAgain"
    v = lockd.view()
    assert holders(v) == {("r", "a", "EX", False)}
    assert v["waiters"] == 0                   # a failed try leaves nothing queued
    a.call("unlock", name="r")
    lockd.wait_for("r free", lambda v: not holders(v))
    assert b.call("lock", name="r", mode="PR", **{"try": True})["mode"] == "PR"
    assert holders(lockd.view()) == {("r", "b", "PR", False)}


def test_timeout_is_kept_by_the_server(keyfile):
    """The lock manager times a request out by itself: with the client frozen (it can
    neither give up nor cancel), the request leaves the queue while the client's
    session stays live, and the thawed client reports LockTimeout."""
    lockd = Lockd(keyfile, lease=10.0)
    try:
        a, b = lockd("a", 0), lockd("b", 1)
        a.call("lock", name="r", mode="EX")
        cid = b.send("lock", name="r", mode="PR", timeout=3.0)
        lockd.wait_for("b's request queued", lambda v: waiting(v).get("b") == 1)
        b.proc.send_signal(signal.SIGSTOP)
        try:
            v = lockd.wait_for("b's request gone", lambda v: v["waiters"] == 0,
                               timeout=8.0)
        finally:
            b.proc.send_signal(signal.SIGCONT)
        assert waiting(v) == {"a": 0, "b": 0} and not v["recovering"]
        assert holders(v) == {("r", "a", "EX", False)}
        assert b.result(cid)["error"] == "LockTimeout"
        assert b.call("status")["locks"] == 1      # b holds nothing: a's EX only
    finally:
        lockd.close()


def test_deadlock_detected_across_processes(lockd):
    a, b = lockd("a", 0), lockd("b", 1)
    a.call("lock", name="x", mode="EX")
    b.call("lock", name="y", mode="EX")
    ia = a.send("lock", name="y", mode="EX")
    lockd.wait_for("a queued for y", lambda v: waiting(v).get("a") == 1)
    ib = b.send("lock", name="x", mode="EX")
    assert b.result(ib, timeout=10).get("error") == "Deadlock"   # the younger request
    v = lockd.view()
    assert waiting(v) == {"a": 1, "b": 0}                       # a still waits for y
    assert holders(v) == {("x", "a", "EX", False), ("y", "b", "EX", False)}
    b.call("unlock", name="y")
    assert a.result(ia, timeout=10)["ok"]["mode"] == "EX"
    assert holders(lockd.view()) == {("x", "a", "EX", False), ("y", "a", "EX", False)}


def test_killed_client_locks_wait_for_recovery(lockd):
    a, b, c = lockd("a", 4), lockd("b", 1), lockd("c", 2)
    a.call("lock", name="r", mode="EX")
    a.call("convert", name="r", mode="EX", lvb="ab" * 32)
    c.call("lock", name="q", mode="EX")
    a.send("lock", name="q", mode="PR")          # a dies while it waits for q
    ib = b.send("lock", name="r", mode="PR")
    lockd.wait_for("a and b queued", lambda v: waiting(v) == {"a": 1, "b": 1, "c": 0})
    a.kill()
    ev = b.wait_event("node_down", timeout=10)
    assert (ev["node"], ev["slot"]) == ("a", 4)
    # recovering: the dead node's lock is held (however long it takes), its request
    # is gone, and b still waits
    v = lockd.view()
    assert [(r["node"], r["slot"], r["locks"]) for r in v["recovering"]] == [("a", 4, 1)]
    assert holders(v) == {("r", "a", "EX", True), ("q", "c", "EX", False)}
    assert v["waiters"] == 1 and waiting(v) == {"b": 1, "c": 0}
    assert not b.done(ib)
    assert b.call("recovered", slot=4) == 1
    g = b.result(ib, timeout=10)["ok"]
    assert g["mode"] == "PR" and g["lvb"] is None      # its writer died: invalid
    v = lockd.view()
    assert holders(v) == {("r", "b", "PR", False), ("q", "c", "EX", False)}
    assert not v["recovering"] and v["waiters"] == 0


def test_server_restart_mid_workload(keyfile, tmp_path):
    lockd = Lockd(keyfile, lease=10.0, grace=3.0)
    counters = [tmp_path / f"c{i}" for i in range(2)]
    for c in counters:
        c.write_text("0")
    try:
        ws = [lockd(f"n{i}", i) for i in range(3)]
        ws[0].call("lock", name="held", mode="PR")
        ids = [(w, w.send("incr", name=f"c{j}", path=str(counters[j]), count=60))
               for w in ws for j in range(2)]
        lockd.wait_for("the workload under way", lambda v: sum(
            n["locks"] + n["waiting"] for n in v["nodes"]) > 1)
        lockd.restart()                  # the server dies mid-workload
        for w, cid in ids:
            r = w.result(cid, timeout=90)
            assert r.get("ok") == 60, (w.node, r, w.stderr()[-3000:])
        # nothing was granted twice: no update lost
        assert [int(c.read_text()) for c in counters] == [180, 180]
        # the reclaimed PR lock is still held: an EX must wait for it
        assert holders(lockd.view(b"held")) == {("held", "n0", "PR", False)}
        with pytest.raises(WorkerError) as e:
            ws[1].call("lock", name="held", mode="EX", **{"try": True})
        assert e.value.name == "TryAgain"
        assert not [e for w in ws for e in w.events if e["event"] == "lease_lost"]
    finally:
        lockd.close()
