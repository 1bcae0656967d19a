"""Issue 16: a volume snapshot taken while a QEMU guest writes its disk on the volume.

A 2-node cluster (``local_cluster``: node A and node B mount one volume) holds a raw
disk image; a guest runs on it under QEMU through node A's mount and writes its
counter records (record N in the 512-byte sector N, O_DIRECT in the guest; it prints
a record on its console only once the disk write has completed).  While it writes,
``clusterfs snapshot VOLUME DEST`` runs on the host (freeze every node through this
machine's member, copy, thaw, new UUID).  Then:

- ``clusterfs fsck -fn DEST`` is clean, before and after DEST was mounted;
- DEST mounts (``-o nolock``, single node) beside the original, still mounted, and the
  disk image in it holds a state the guest wrote: records 0..n-1, each whole and equal
  to the one the console showed (same boot id, same uptime), and nothing after them
  (not one non-zero byte: the record in flight during the freeze is whole or absent);
  every record the console showed before the snapshot began is there, and none the
  guest wrote after the one in flight when it ended;
- a file written (not flushed) through each node, each in a directory of its own, just
  before the snapshot is in it, whole;
- the guest kept running: it counts on after the snapshot, and every record, those
  after the snapshot too, is in the original image (read through node B).

Two QEMU disk cache modes: ``writethrough`` (QEMU flushes the image file, an fdatasync
on clusterfs, after every guest write, before the guest sees it complete: each record
is flushed) and ``writeback`` (no flush at all: the freeze itself must write home what
the member holds, its journal not committed yet).  The guest counts past the image's
first 4 KiB (allocated by ``qemu-img create``) before the snapshot, so some of the
records it must hold lie in blocks allocated since the last commit.

Without the freeze (the copy taken while the nodes run on), the ``writeback`` case
misses the records in the newest blocks and both cases miss the unflushed files; the
flushed records of the ``writethrough`` case alone survive such a copy (committed,
their journals replayed in the copy), so that case checks the freeze through the files.

Each case boots one small guest (128 MiB, software emulation), 10-20 s on a loaded
two-core machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from clusterfs import control
from clusterfs.errors import UsageError
from tests.clusterutil import local_cluster
from tests.helpers import Mount, run_cli

from .guest import GuestUnavailable, build_guest, ensure_host_tools
from .machine import Machine
from .qmp import Record, parse_records
from .scenario import RECORD_SIZE

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]

DISK_SIZE = 16 << 20
RECORDS_BEFORE = 12      # records before the snapshot (8 fill the first 4 KiB)


def node_name(m: Mount) -> str:
    return os.path.basename(m.path)


def marker(sub: str, m: Mount) -> bytes:
    return f"written through {node_name(m)} before the snapshot of {sub}\n".encode() * 100


@pytest.fixture(scope="module")
def guest():
    try:
        ensure_host_tools()
        return build_guest()
    except GuestUnavailable as e:
        pytest.skip(f"cannot run a VM guest here: {e}")


@pytest.fixture(scope="module")
def cluster(guest):
    """(volume, node A's mount, node B's mount, work directory) of a 2-node cluster;
    unmounted and fsck-checked at the end of the module."""
    work = Path(tempfile.mkdtemp(prefix="cfsvm-snap-", dir="/var/tmp"))
    try:
        with local_cluster(str(work / "c"), nodes=2, size="1024M") as (volume, _key, mounts):
            node_a, node_b = mounts
            deadline = time.monotonic() + 30
            while True:          # the snapshot reaches the cluster through a member
                with contextlib.suppress(UsageError):
                    control.find(volume)
                    break
                assert time.monotonic() < deadline, "no control channel for the volume"
                time.sleep(0.1)
            yield volume, node_a, node_b, work
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def rundir():
    """QMP/control sockets and console logs: local disk, short path."""
    d = Path(tempfile.mkdtemp(prefix="cfsvm-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def snapshot_prefix(data: bytes, console: list[Record]) -> int:
    """How many records (0..n-1) the disk image DATA holds, checking that they are a
    state the guest wrote: each slot up to n whole and equal to the console's record,
    everything after them zero (the record in flight whole or absent, none later)."""
    n = 0
    while (n + 1) * RECORD_SIZE <= len(data):
        slot = data[n * RECORD_SIZE:(n + 1) * RECORD_SIZE]
        if slot == bytes(RECORD_SIZE):
            break
        recs = parse_records(slot)
        assert b"\0" not in slot and slot.endswith(b"\n") and len(recs) == 1, \
            f"slot {n} of the snapshot's disk is torn: {slot[:80]!r}...{slot[-8:]!r}"
        assert n < len(console) and recs[0] == console[n], \
            f"slot {n} of the snapshot's disk holds {recs[0]}, the guest wrote " \
            f"{console[n] if n < len(console) else 'nothing there'}"
        n += 1
    rest = data[n * RECORD_SIZE:]
    if rest.count(0) != len(rest):
        first = n * RECORD_SIZE + next(i for i, b in enumerate(rest) if b)
        raise AssertionError(f"the snapshot's disk holds records 0..{n - 1} and then data "
                             f"at byte {first} (sector {first // RECORD_SIZE}): "
                             f"{data[first:first + 60]!r}")
    return n


@pytest.mark.parametrize("cache", ["writethrough", "writeback"])
def test_snapshot_during_guest_writes(guest, cluster, rundir, cache):
    """A snapshot taken during a QEMU guest's writes mounts and checks clean, and the
    guest's disk in it is a state the guest wrote (see the module docstring)."""
    volume, node_a, node_b, work = cluster
    sub = f"vm-{cache}"
    os.mkdir(node_a.p(sub))
    os.mkdir(node_b.p(f"{sub}-b"))     # B's own directory: its writes need no lock of A's
    markers = {node_a: (sub, "marker"), node_b: (f"{sub}-b", "marker")}
    disk = Path(node_a.p(sub, "disk.raw"))
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(disk), str(DISK_SIZE)],
                   check=True, capture_output=True, timeout=60)
    snap = work / f"snap-{cache}.img"
    s = None
    try:
        with Machine(guest, disk, rundir, name=cache, disk_format="raw", cache=cache,
                     interval_s=0.1, drive_opts=("werror=report", "rerror=report")) as m:
            m.start(timeout=60)
            boot_id = m.ctl.wait_ready(timeout=240)["boot"]
            # past the image's first 4 KiB (which qemu-img create allocates): the
            # records the snapshot must hold include some in newly allocated blocks
            m.console.wait_records(RECORDS_BEFORE, timeout=120, alive=m.alive)
            # and a file written (not flushed) through each node just before
            for node, where in markers.items():
                with open(node.p(*where), "wb") as f:
                    f.write(marker(sub, node))
            before = m.console.records()       # completed before the snapshot began
            t0 = time.monotonic()
            r = run_cli("snapshot", volume, str(snap), check=False)
            took = time.monotonic() - t0
            ended = m.console.records()        # shown by the time it ended
            assert r.returncode == 0, r.stdout + r.stderr
            assert "frozen" in r.stdout and "new volume UUID" in r.stdout, r.stdout
            # the guest keeps running and writing after the snapshot
            m.console.wait_records(5, after=ended[-1].seq, timeout=120, alive=m.alive)
            assert m.qmp.execute("query-status")["status"] == "running"
            assert m.ctl.request("ping", timeout=30)["boot"] == boot_id
            last = int(m.ctl.request("quiesce", timeout=60)["last"])
            m.quit(timeout=60)
            console = parse_records(m.console.read())
            errors = m.console.errors()
        assert not errors, errors
        assert [c.seq for c in console] == list(range(last + 1))
        assert {c.boot for c in console} == {boot_id}
        print(f"[{cache}] snapshot took {took:.2f}s: {r.stdout.strip()}; records shown "
              f"before it: 0..{before[-1].seq}, by its end: 0..{ended[-1].seq}, in all "
              f"0..{last}")

        # the original, read through node B, holds every record, later ones too
        orig = Path(node_b.p(sub, "disk.raw")).read_bytes()
        assert len(orig) == DISK_SIZE
        assert snapshot_prefix(orig, console) == last + 1

        # the snapshot checks clean, mounts beside the original, holds a guest state
        fsck = run_cli("fsck", "-fn", str(snap), check=False)
        assert fsck.returncode == 0, f"fsck -fn of the snapshot:\n{fsck.stdout}{fsck.stderr}"
        s = Mount(str(snap), str(work / f"snap-{cache}"), "-o", "nolock").start()
        img = Path(s.p(sub, "disk.raw"))
        assert img.exists(), f"the guest's disk is not in the snapshot: {sub} " + \
            (f"holds {os.listdir(s.p(sub))}" if os.path.isdir(s.p(sub)) else "is missing")
        data = img.read_bytes()
        assert len(data) == DISK_SIZE
        n = snapshot_prefix(data, console)
        print(f"[{cache}] the snapshot's disk holds records 0..{n - 1}")
        assert n >= before[-1].seq + 1, \
            f"records {n}..{before[-1].seq} completed before the snapshot began are missing"
        assert n <= ended[-1].seq + 2, \
            f"record {n - 1} in the snapshot was written after it ended (0..{ended[-1].seq} shown)"
        assert n < last + 1, "the guest wrote nothing after the snapshot"
        for node, where in markers.items():
            path = s.p(*where)
            assert os.path.exists(path), \
                f"a file written through {node_name(node)} before the snapshot is missing"
            with open(path, "rb") as f:
                assert f.read() == marker(sub, node)
        s.stop()
        s = None
        fsck = run_cli("fsck", "-fn", str(snap), check=False)
        assert fsck.returncode == 0, f"fsck -fn after the mount:\n{fsck.stdout}{fsck.stderr}"
    finally:
        if s is not None:
            s.stop(check_log=False)
        snap.unlink(missing_ok=True)
        shutil.rmtree(node_a.p(sub), ignore_errors=True)
        shutil.rmtree(node_b.p(f"{sub}-b"), ignore_errors=True)
