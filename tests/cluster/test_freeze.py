"""Cluster-wide freeze and thaw through real mounts: writers on every node wait (they
do not fail) while the volume is frozen, the frozen image does not change, the thaw
lets them finish with nothing lost; a freeze times out by itself; a freezer that
dies does not leave the others frozen."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time


from clusterfs import control
from tests.cluster.cluster_util import (heartbeat_blocks, image_digest, running_cluster,
                                        wait_for)
from tests.helpers import run_cli

WRITER = r"""
import os, sys, time
top, log = sys.argv[1], sys.argv[2]
os.makedirs(top, exist_ok=True)
i = 0
with open(log, "a", buffering=1) as out:
    while not os.path.exists(log + ".stop"):
        path = os.path.join(top, f"f{i}")
        data = (f"{i} " * 300).encode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        out.write(f"{i}\n")
        i += 1
"""


class Writer:
    """A process writing and fsyncing numbered files on a mount; its log (outside
    the mount) says which files are complete."""

    def __init__(self, top: str, log: str):
        self.top, self.log = top, log
        self.proc = subprocess.Popen([sys.executable, "-c", WRITER, top, log])

    def count(self) -> int:
        try:
            with open(self.log) as f:
                return sum(1 for line in f if line.endswith("\n"))
        except FileNotFoundError:
            return 0

    def stop(self) -> int:
        with open(self.log + ".stop", "w"):
            pass
        self.proc.wait(timeout=60)
        return self.count()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def verify(self, top: str) -> None:
        """Every file the log names is complete, read through ``top``."""
        for i in range(self.count()):
            with open(os.path.join(top, f"f{i}"), "rb") as f:
                assert f.read() == (f"{i} " * 300).encode(), f"file f{i}"


def control_ready(path: str) -> dict:
    return wait_for(lambda: _find(path), 30, f"the control channel of {path}")


def _find(path):
    try:
        return control.find(path)
    except Exception:
        return None


def writers_on_two_nodes(c, topdir: str):
    """Nodes n1 and n2 mounted, and a Writer on each (``start_writers``):
    (a, b, writers)."""
    a = c.mount("n1")
    b = c.mount("n2")
    control_ready(a.path)
    return a, b, start_writers(a, b, topdir)


def start_writers(a, b, topdir: str) -> list[Writer]:
    """A Writer on mount a and one on mount b (into wa/ and wb/, both made on a),
    started and past their first files."""
    os.mkdir(a.p("wa"))
    os.mkdir(a.p("wb"))
    writers = [Writer(a.p("wa"), os.path.join(topdir, "wa.log")),
               Writer(b.p("wb"), os.path.join(topdir, "wb.log"))]
    try:
        wait_for(lambda: all(w.count() > 5 for w in writers), 60, "writers started")
    except BaseException:
        for w in writers:
            w.kill()
        raise
    return writers


def cli(*args, ok=True, **kw):
    r = run_cli(*args, check=False, **kw)
    if ok:
        assert r.returncode == 0, r.stderr + r.stdout
    return r


def test_freeze_stops_writers_on_every_node_and_thaw_loses_nothing(topdir):
    with running_cluster(topdir) as c:
        a, b, writers = writers_on_two_nodes(c, topdir)
        try:
            r = cli("freeze", a.path, "--timeout", "60")
            assert "frozen on every node" in r.stdout
            before = [w.count() for w in writers]
            skip = heartbeat_blocks(c.volume, [c.slot_of("n1"), c.slot_of("n2")])
            d1 = image_digest(c.volume, skip)
            time.sleep(1.5)
            d2 = image_digest(c.volume, skip)
            after = [w.count() for w in writers]
            # at most the write in flight at the freeze completes
            assert [x - y for x, y in zip(after, before)] <= [1, 1], (before, after)
            assert d1 == d2, "the frozen image changed"
            # reads go on meanwhile, on both nodes
            assert os.listdir(b.p("wa")) and open(b.p("wa", "f0"), "rb").read()
            st = control.call(control.find(b.path), {"op": "status"})
            assert st["frozen_by_other"] and not st["frozen_here"]
            # a second freeze from the frozen volume's freezer is refused
            r = cli("freeze", a.path, ok=False)
            assert r.returncode != 0 and "already frozen" in r.stderr
            assert len(r.stderr.strip().splitlines()) == 1
            cli("thaw", a.path)
            wait_for(lambda: all(w.count() > a_ + 5 for w, a_ in zip(writers, after)), 60,
                     "writers going on after the thaw")
        finally:
            counts = []
            for w in writers:
                counts.append(w.stop())
                w.kill()
        writers[0].verify(b.p("wa"))
        writers[1].verify(a.p("wb"))
        # thaw of a volume not frozen: one line, non-zero
        r = cli("thaw", b.path, ok=False)
        assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1


def test_freeze_times_out_by_itself(topdir):
    with running_cluster(topdir) as c:
        a = c.mount("n1")
        b = c.mount("n2")
        control_ready(a.path)
        cli("freeze", a.path, "--timeout", "1.5")
        w = Writer(b.p("w"), os.path.join(topdir, "w.log"))
        try:
            time.sleep(0.8)
            assert w.count() == 0
            wait_for(lambda: w.count() > 3, 30, "the writer after the time-out")
        finally:
            w.stop()
            w.kill()
        assert "the freeze reached its time-out" in a.read_log()


def test_a_freezer_that_dies_does_not_leave_the_others_frozen(topdir):
    with running_cluster(topdir, crashes=True) as c:
        a = c.mount("n1")
        b = c.mount("n2")
        control_ready(a.path)
        slot_a = c.slot_of("n1")
        cli("freeze", a.path, "--timeout", "300")
        w = Writer(b.p("w"), os.path.join(topdir, "w.log"))
        try:
            time.sleep(0.5)
            assert w.count() == 0
            c.kill("n1")
            c.wait_recovered("n1", slot_a)
            wait_for(lambda: w.count() > 3, 60, "the writer after the freezer's death")
        finally:
            w.stop()
            w.kill()
        w.verify(b.p("w"))


def test_a_malformed_control_request_drops_that_client_only(topdir):
    with running_cluster(topdir) as c:
        a = c.mount("n1")
        info = control_ready(a.path)
        for junk in (b"not json\n", b"[1, 2]\n", b'{"op": "explode"}\n',
                     b'{"op": "freeze", "timeout": "soon"}\n', b"x" * 70000):
            s = socket.socket(socket.AF_UNIX)
            s.connect(info["socket"])
            try:
                s.sendall(junk)
                s.shutdown(socket.SHUT_WR)
                answer = s.makefile("rb").readline()
            except ConnectionResetError:
                answer = b""      # dropped before all of it was read: also fine
            s.close()
            if answer:
                assert json.loads(answer)["ok"] is False, answer
        assert control.call(info, {"op": "status"})["frozen_here"] is False
        # still serving files and still freezable
        with open(a.p("f"), "w") as f:
            f.write("x")
        cli("freeze", a.path, "--timeout", "30")
        cli("thaw", a.path)


def test_freeze_of_something_not_mounted_is_one_line(topdir):
    r = cli("freeze", topdir, ok=False)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    r = cli("freeze", topdir, "--timeout", "-1", ok=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
