"""The real thing: ``clusterfs lockd`` and clients in separate processes on loopback.

Contention, blocking callbacks, try-locks, timeouts, deadlock detection, a client
killed with SIGKILL, and a server killed and restarted in the middle of a workload.
"""

import signal
import time

import pytest

from lockmgr_testutil import Worker, WorkerError, free_port, start_lockd, stop


@pytest.fixture
def keyfile(tmp_path):
    from lockmgr import keygen
    path = str(tmp_path / "key")
    keygen(path)
    return path


@pytest.fixture
def lockd(keyfile, tmp_path):
    """A running lockd (lease 2 s, no grace) and a factory of workers."""
    port = free_port()
    proc = start_lockd(keyfile, port, "--deadlock-wait", "0.5", lease=2.0, grace=0)
    workers = []

    def worker(node, slot, **kw):
        w = Worker(f"127.0.0.1:{port}", keyfile, node, slot, lease=kw.get("lease", 2.0))
        workers.append(w)
        return w

    worker.port = port
    worker.proc = proc
    yield worker
    for w in workers:
        w.close()
    stop(proc)


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


def test_try_lock_and_timeout_across_processes(lockd):
    a, b = lockd("a", 0), lockd("b", 1)
    a.call("lock", name="r", mode="EX")
    with pytest.raises(WorkerError) as e:
        b.call("lock", name="r", mode="CR", **{"try": True})
    assert e.value.name == "TryAgain"
    t0 = time.monotonic()
    with pytest.raises(WorkerError) as e:
        b.call("lock", name="r", mode="PR", timeout=0.5)
    assert e.value.name == "LockTimeout"
    assert 0.45 <= time.monotonic() - t0 < 3
    a.call("unlock", name="r")
    assert b.call("lock", name="r", mode="PR", **{"try": True})["mode"] == "PR"


def test_deadlock_detected_across_processes(lockd):
    a, b = lockd("a", 0), lockd("b", 1)
    a.call("lock", name="x", mode="EX")
    b.call("lock", name="y", mode="EX")
    ia = a.send("lock", name="y", mode="EX")
    time.sleep(0.2)
    ib = b.send("lock", name="x", mode="EX")
    rb = b.result(ib, timeout=10)
    assert rb.get("error") == "Deadlock"          # the younger request
    assert not a.done(ia)
    b.call("unlock", name="y")
    assert a.result(ia, timeout=10)["ok"]["mode"] == "EX"


def test_killed_client_locks_wait_for_recovery(lockd):
    a, b = lockd("a", 4), lockd("b", 1)
    a.call("lock", name="r", mode="EX")
    a.call("convert", name="r", mode="EX", lvb="ab" * 32)
    ib = b.send("lock", name="r", mode="PR")
    time.sleep(0.3)
    a.kill()
    ev = b.wait_event("node_down", timeout=10)
    assert (ev["node"], ev["slot"]) == ("a", 4)
    time.sleep(1.5)                      # recovering: held however long it takes
    assert not b.done(ib)
    st = b.call("status")
    assert [(r["node"], r["locks"]) for r in st["recovering"]] == [("a", 1)]
    assert b.call("recovered", slot=4) == 1
    g = b.result(ib, timeout=10)["ok"]
    assert g["mode"] == "PR" and g["lvb"] is None      # its writer died: invalid


def test_server_restart_mid_workload(keyfile, tmp_path):
    port = free_port()
    proc = start_lockd(keyfile, port, lease=10.0, grace=3.0)
    counters = [tmp_path / f"c{i}" for i in range(2)]
    for c in counters:
        c.write_text("0")
    ws = [Worker(f"127.0.0.1:{port}", keyfile, f"n{i}", i, lease=10.0) for i in range(3)]
    try:
        holder = ws[0]
        holder.call("lock", name="held", mode="PR")
        ids = [(w, w.send("incr", name=f"c{j}", path=str(counters[j]), count=60))
               for w in ws for j in range(2)]
        time.sleep(0.4)
        stop(proc, signal.SIGKILL)       # the server dies mid-workload
        time.sleep(0.3)
        proc = start_lockd(keyfile, port, lease=10.0, grace=3.0)
        for w, cid in ids:
            assert w.result(cid, timeout=90)["ok"] == 60
        # nothing was granted twice: no update lost
        assert [int(c.read_text()) for c in counters] == [180, 180]
        # the reclaimed PR lock is still held: an EX must wait for it
        with pytest.raises(WorkerError) as e:
            ws[1].call("lock", name="held", mode="EX", **{"try": True})
        assert e.value.name == "TryAgain"
        assert not [e for w in ws for e in w.events if e["event"] == "lease_lost"]
    finally:
        for w in ws:
            w.close()
        stop(proc)
