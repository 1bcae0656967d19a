"""Long soak (make test-slow): a counter workload on 4 client processes while the lock
server is killed and restarted several times; no update may be lost."""

import random
import signal
import time

import pytest

from tests.lockmgr.lockmgr_testutil import Worker, free_port, start_lockd, stop


@pytest.mark.slow
def test_soak_server_restarts(tmp_path):
    from lockmgr import keygen
    keyfile = str(tmp_path / "key")
    keygen(keyfile)
    port = free_port()
    rnd = random.Random(7)
    proc = start_lockd(keyfile, port, lease=10.0, grace=3.0)
    counters = [tmp_path / f"c{i}" for i in range(3)]
    for c in counters:
        c.write_text("0")
    ws = [Worker(f"127.0.0.1:{port}", keyfile, f"n{i}", i, lease=10.0) for i in range(4)]
    try:
        jobs = [(w, w.send("incr", name=f"c{j}", path=str(counters[j]), count=150))
                for w in ws for j in range(3)]
        for _ in range(4):
            time.sleep(rnd.uniform(0.5, 2.0))
            stop(proc, signal.SIGKILL)
            time.sleep(rnd.uniform(0.05, 1.0))
            proc = start_lockd(keyfile, port, lease=10.0, grace=3.0)
        for w, cid in jobs:
            r = w.result(cid, timeout=300)
            assert r.get("ok") == 150, (r, w.stderr())
        assert [int(c.read_text()) for c in counters] == [600, 600, 600]
        assert not [e for w in ws for e in w.events if e["event"] == "lease_lost"]
    finally:
        for w in ws:
            w.close()
        stop(proc)
