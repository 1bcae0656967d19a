"""Slots added to a 2-slot volume (``clusterfs add-slots``) take cluster nodes: four
nodes mount at once, a node in an added slot writes and another reads, and when that
node is killed a survivor recovers its journal.  fsck after each step."""

from __future__ import annotations

import json
import os
import threading

from tests.cluster.cluster_util import running_cluster
from tests.helpers import fsck_clean, run_cli


def _status(volume: str) -> dict:
    return json.loads(run_cli("status", volume, "--json", "--watch", "0").stdout)


def test_nodes_join_added_slots_and_one_is_recovered(topdir):
    with running_cluster(topdir, size="128M", mkfs_args=("--slots", "2"),
                         crashes=True) as c:
        run_cli("add-slots", c.volume, "2")
        st = _status(c.volume)
        assert (st["nslots"], st["fixed_slots"]) == (4, 2)
        fsck_clean(c.volume)
        # four nodes mount at once: two of them can only be in the added slots
        names = ["a", "b", "c", "d"]
        errors = []

        def mount(name):
            try:
                c.mount(name)
            except BaseException as e:       # reported below
                errors.append(f"{name}: {e}")
        threads = [threading.Thread(target=mount, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, "\n".join(errors)
        slots = {n: c.slot_of(n) for n in names}
        assert sorted(slots.values()) == [0, 1, 2, 3], slots
        st = c.status()
        assert [s["node"] for s in sorted(st["slots"], key=lambda s: s["slot"])] == \
            sorted(names, key=slots.get)
        assert all(s["mounted"] and s["state"] == "cluster" for s in st["slots"])
        victim = next(n for n in names if slots[n] == 3)
        other = next(n for n in names if slots[n] == 0)
        v, o = c.nodes[victim], c.nodes[other]
        data = os.urandom(300_000)
        with open(v.p("from-added-slot"), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        with open(o.p("from-added-slot"), "rb") as f:
            assert f.read() == data
        # more metadata in the victim's journal, then it dies
        os.mkdir(v.p("dir"))
        for i in range(20):
            with open(v.p("dir", f"f{i}"), "wb") as f:
                f.write(b"%d" % i)
                f.flush()
                os.fsync(f.fileno())
        c.kill(victim)
        c.wait_recovered(victim, 3)
        assert sorted(os.listdir(o.p("dir"))) == sorted(f"f{i}" for i in range(20))
        with open(c.nodes[names[1] if names[1] != victim else names[2]]
                  .p("from-added-slot"), "rb") as f:
            assert f.read() == data
        for n in names:
            if n != victim:
                c.unmount(n)
        st = _status(c.volume)
        assert all(s["journal"] == "clean" and s["state"] == "free"
                   for s in st["slots"]), st["slots"]
    # running_cluster checked the volume (walk and fsck -fn) on the way out
