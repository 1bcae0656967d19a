"""Issue 6 across two clusterfs nodes: real QEMU guests whose disks live on one volume.

One 2-node cluster (``ClusterfsStorage``: two ``clusterfs mount`` processes of one
volume, which elect the lock manager's master among them; unmounted and fsck-checked
at the end) serves every test of this module; each test works in its own directory,
seen as DIR_A through node A's mount and DIR_B through node B's. QEMU "on node A" only touches paths under DIR_A,
QEMU "on node B" only paths under DIR_B.

- the save-on-A / restore-on-B scenario, with node B having read the fresh image first;
- node B reads a raw image before, while and after A's guest writes it: never stale;
- files deleted and recreated through A, then opened through B: the new content only;
- a second QEMU on B while A's QEMU runs the disk: ``EBUSY`` (cluster open mode),
  until A's QEMU has quit;
- a disk marked multi-writer opens on both nodes at once;
- live migration A -> B over TCP, which needs no multi-writer mark;
- host A dies while its VM runs (its own cluster): B gets the disk once A is recovered;
- a rolling restart of two of three nodes, the master first, under a running guest.

Small guests (128 MiB, software emulation): each test boots one, about 10-15 s on a
loaded two-core machine; the module takes about 2.5 minutes (host death: ~45 s).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from clusterfs.ondisk.format import HB_FREE
from tests.cluster.cluster_util import slot_state
from tests.clusterutil import free_port, local_cluster

from .guest import GuestUnavailable, build_guest, ensure_host_tools
from .machine import Machine
from .qmp import QMPError, Record, parse_records
from .scenario import (MAX_BANDWIDTH, RECORD_SIZE, _wait_marker, _wait_migration,
                       run_scenario)
from .storage import ClusterfsStorage

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]

MULTIWRITER = "user.clusterfs.multiwriter"
EBUSY_TEXT = "Device or resource busy"


@pytest.fixture(scope="module")
def guest():
    try:
        ensure_host_tools()
        return build_guest()
    except GuestUnavailable as e:
        pytest.skip(f"cannot run a VM guest here: {e}")


@pytest.fixture(scope="module")
def cluster(guest):
    """(DIR_A, DIR_B): one directory of a 2-node cluster, through node A and node B."""
    with ClusterfsStorage(size_mib=2048).views() as views:
        yield views


@pytest.fixture
def dirs(cluster, request):
    """A fresh directory for this test: (through A, through B); emptied afterwards."""
    a, b = cluster
    name = request.node.name.replace("[", "-").replace("]", "")[:60]
    (a / name).mkdir()
    yield a / name, b / name
    shutil.rmtree(a / name)


@pytest.fixture
def rundir():
    """QMP/control sockets and console logs: local disk, short path (kept on failure)."""
    d = Path(tempfile.mkdtemp(prefix="cfsvm-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- helpers


def qemu_img(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"qemu-img {' '.join(args)}: {r.stderr.strip()}"
    return r


def pread_all(fd: int) -> bytes:
    """Everything an open descriptor reads now, from offset 0 to its current size."""
    return os.pread(fd, os.fstat(fd).st_size, 0)


def md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def slots(data: bytes, count: int) -> list[Record | None]:
    """The record at each of the first COUNT 512-byte slots of raw disk bytes (or None)."""
    out = []
    for i in range(count):
        recs = parse_records(data[i * RECORD_SIZE:(i + 1) * RECORD_SIZE])
        out.append(recs[0] if len(recs) == 1 else None)
    return out


def qcow2_slots(disk: Path, count: int, workdir: Path) -> list[Record | None]:
    """`slots` of the guest-visible content of a qcow2 image (read by ``qemu-img dd``)."""
    raw = workdir / "head.raw"
    qemu_img("dd", "-f", "qcow2", "-O", "raw", f"bs={RECORD_SIZE}", f"count={count}",
             f"if={disk}", f"of={raw}")
    data = raw.read_bytes()
    raw.unlink()
    return slots(data, count)


def boot(m: Machine, records: int = 3) -> str:
    """Start M, wait for its guest to answer and count RECORDS times; its boot id."""
    m.start(timeout=60)
    boot_id = m.ctl.wait_ready(timeout=240)["boot"]
    m.console.wait_records(records, timeout=120, alive=m.alive)
    return boot_id


def try_start(m: Machine) -> str | None:
    """Start M; None if it runs, else QEMU's error output (M is closed then).

    QEMU is always ended by PID on failure, even when it hangs instead of exiting.
    """
    try:
        m.start(timeout=60)
        return None
    except RuntimeError:
        with contextlib.suppress(subprocess.TimeoutExpired):
            m.wait_exit(timeout=30)
        err = m.stderr_tail(2000)
        m.close()
        return err


def start_refused(m: Machine) -> str:
    """Start M expecting QEMU to exit at once; its error output."""
    try:
        err = try_start(m)
        assert err is not None, "QEMU started"
        assert m.proc.returncode not in (None, 0), f"QEMU did not fail: {err}"
        return err
    finally:
        m.close()


def save_state(m: Machine, state: Path, rundir: Path) -> None:
    """``stop`` + ``migrate exec:cat > STATE`` on M; waits until cat has finished."""
    marker = rundir / f"{m.name}.saved"
    m.qmp.execute("stop")
    m.qmp.execute("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH})
    m.qmp.execute("migrate", {"uri": f"exec:cat > {shlex.quote(str(state))}; "
                                     f"echo $? > {shlex.quote(str(marker))}"})
    _wait_migration(m, 300, f"save on {m.name}")
    assert _wait_marker(marker, timeout=300) == "0"


def fd_modes(m: Machine) -> set[str]:
    """How M's QEMU process has its disk file open right now: {"r", "w", "rw"}."""
    modes = set()
    fd_dir = Path(f"/proc/{m.pid}/fd")
    for fd in os.listdir(fd_dir):
        try:
            if os.readlink(fd_dir / fd) != str(m.disk):
                continue
            info = (Path(f"/proc/{m.pid}/fdinfo") / fd).read_text()
            flags = int(info.split("flags:")[1].split()[0], 8)
        except (OSError, IndexError, ValueError):
            continue  # closed meanwhile
        modes.add({os.O_RDONLY: "r", os.O_WRONLY: "w", os.O_RDWR: "rw"}[flags & os.O_ACCMODE])
    return modes


# --------------------------------------------------------------------------- tests


def test_save_on_node_a_restore_on_node_b(guest, dirs):
    """The whole scenario of issue 6, node B having read the fresh image first.

    Node B opens the new qcow2 read-only, reads all of it and lets ``qemu-img info``
    parse it before QEMU A starts, and keeps that descriptor open throughout; so B
    has cached the image when A's guest writes it. Afterwards B's old descriptor, a
    new open on B and a read through A must agree byte for byte.
    """
    dir_a, dir_b = dirs
    held: dict = {}

    def b_reads_first(disk_a: Path, disk_b: Path) -> None:
        info = json.loads(qemu_img("info", "--output=json", str(disk_b)).stdout)
        assert info["format"] == "qcow2" and info["virtual-size"] == 256 << 20
        held["fd"] = os.open(disk_b, os.O_RDONLY)
        held["before"] = pread_all(held["fd"])

    try:
        res = run_scenario(dir_a, dir_b, guest=guest, mem_mib=128, fill_mib=32,
                           records_before=5, records_after=5, cleanup=False,
                           after_create=b_reads_first)
        assert res.records_on_a >= 5 and res.records_on_b >= 5
        assert res.last_seq + 1 == res.records_on_a + res.records_on_b
        assert res.state_bytes >= 32 << 20
        via_a = (dir_a / "vm.qcow2").read_bytes()
        assert via_a != held["before"], "the guest's writes changed the image"
        assert pread_all(held["fd"]) == via_a, "B's descriptor opened before A wrote is stale"
        assert (dir_b / "vm.qcow2").read_bytes() == via_a, "a new open on B is stale"
        assert md5(dir_b / "vm.state") == md5(dir_a / "vm.state")
    finally:
        if "fd" in held:
            os.close(held["fd"])


def test_node_b_reads_raw_image_before_during_after_a_writes(guest, dirs, rundir):
    """B reads a raw disk before A's guest writes it, while it writes, and after.

    A raw image puts guest sector N at file offset N*512, so B sees the guest's
    records directly. B holds one descriptor from before the first write to the end.
    """
    dir_a, dir_b = dirs
    disk_a, disk_b = dir_a / "disk.raw", dir_b / "disk.raw"
    size = 16 << 20
    qemu_img("create", "-q", "-f", "raw", str(disk_a), str(size))
    fd = os.open(disk_b, os.O_RDONLY)
    try:
        assert pread_all(fd) == bytes(size), "B reads the new image as zeros"
        with Machine(guest, disk_a, rundir, name="a", disk_format="raw") as a:
            boot(a, records=3)
            # While A's guest writes: every record the console showed before B reads
            # (the guest prints a record only once its disk write completed) is there.
            for _ in range(3):
                shown = a.console.records()
                n = shown[-1].seq + 1
                got = slots(os.pread(fd, n * RECORD_SIZE, 0), n)
                assert got == shown[:n], f"B read stale sectors while A writes: {got}"
                a.console.wait_records(1, after=shown[-1].seq, timeout=60, alive=a.alive)
            last = int(a.ctl.request("quiesce", timeout=60)["last"])
            a.quit(timeout=60)
            console = parse_records(a.console.read())
        assert [r.seq for r in console] == list(range(last + 1))
        via_a = disk_a.read_bytes()
        assert slots(via_a, last + 1) == console
        assert via_a[(last + 1) * RECORD_SIZE:] == bytes(size - (last + 1) * RECORD_SIZE)
        assert pread_all(fd) == via_a, "B's descriptor opened before A wrote is stale"
        assert disk_b.read_bytes() == via_a, "a new open on B is stale"
        assert os.stat(disk_b).st_size == size
    finally:
        os.close(fd)


def test_deleted_and_recreated_through_a_then_opened_through_b(dirs, tmp_path):
    """A deletes and recreates files that B has read; B sees each new file, never the old.

    Sizes cross the inline, single-extent and multi-block cases; inode numbers may be
    reused (the generation tells them apart). B keeps the first incarnation open:
    POSIX says it still reads its own data, and B's last close frees it (the volume's
    fsck at the end of the module must be clean).
    """
    dir_a, dir_b = dirs
    f_a, f_b = dir_a / "vm.state", dir_b / "vm.state"
    sizes = [100, 5000, 300_000, (2 << 20) + 7, 3000, 0, 70_000, 1 << 20]
    first = None
    old_fd = None
    try:
        for i, size in enumerate(sizes):
            content = hashlib.sha256(b"%d" % i).digest() * (size // 32 + 1)
            content = content[:size]
            f_a.unlink(missing_ok=True)
            with open(f_a, "xb") as f:
                f.write(content)
            st_a = os.stat(f_a)
            st_b = os.stat(f_b)
            assert (st_b.st_ino, st_b.st_size) == (st_a.st_ino, size), f"round {i}: stale stat"
            assert f_b.read_bytes() == content, f"round {i}: B read the old content"
            if i == 0:
                first, old_fd = content, os.open(f_b, os.O_RDONLY)
        assert os.pread(old_fd, 4096, 0) == first, "the unlinked first file lost its data"

        # Replace by rename (how tools write a file atomically).
        tmp_a = dir_a / "vm.state.tmp"
        tmp_a.write_bytes(b"renamed over")
        os.rename(tmp_a, f_a)
        assert f_b.read_bytes() == b"renamed over"
        assert sorted(os.listdir(dir_b)) == ["vm.state"]

        # A qcow2 image recreated with another size: qemu-img on B sees the new one.
        disk_a, disk_b = dir_a / "disk.qcow2", dir_b / "disk.qcow2"
        for mib in (64, 128, 32):
            disk_a.unlink(missing_ok=True)
            qemu_img("create", "-q", "-f", "qcow2", str(disk_a), f"{mib}M")
            info = json.loads(qemu_img("info", "--output=json", str(disk_b)).stdout)
            assert info["virtual-size"] == mib << 20, f"B sees a stale image: {info}"

        # A directory removed and made again.
        (dir_a / "d").mkdir()
        (dir_a / "d" / "x").write_bytes(b"1")
        assert os.listdir(dir_b / "d") == ["x"]
        (dir_a / "d" / "x").unlink()
        (dir_a / "d").rmdir()
        (dir_a / "d").mkdir()
        (dir_a / "d" / "y").write_bytes(b"2")
        assert os.listdir(dir_b / "d") == ["y"]
        assert (dir_b / "d" / "y").read_bytes() == b"2"
        assert not (dir_b / "d" / "x").exists()
    finally:
        if old_fd is not None:
            os.close(old_fd)


def test_second_qemu_on_b_gets_ebusy_until_a_quits(guest, dirs, rundir):
    """Cluster open modes keep one VM from running on two nodes at once.

    1. While A's QEMU runs the disk, a QEMU started on B with it exits at once:
       ``Could not open '...': Device or resource busy``.
    2. A saves its state and goes on running (a checkpoint). B restores that state
       (``-incoming defer``): QEMU loads the RAM with the disk still inactive, which it
       holds read-only, then ``cont`` reopens the disk for writing and fails with EBUSY.
       B's guest does not run.
    3. Once A's QEMU has quit, the same ``cont`` on B succeeds and the guest goes on.
    """
    dir_a, dir_b = dirs
    disk_a, disk_b = dir_a / "vm.qcow2", dir_b / "vm.qcow2"
    state_a, state_b = dir_a / "vm.state", dir_b / "vm.state"
    qemu_img("create", "-q", "-f", "qcow2", str(disk_a), "64M")
    with Machine(guest, disk_a, rundir, name="a") as a, \
            Machine(guest, disk_b, rundir, name="b", incoming=True) as b:
        boot_id = boot(a, records=3)

        err = start_refused(Machine(guest, disk_b, rundir, name="b0"))
        assert f"Could not open '{disk_b}': {EBUSY_TEXT}" in err, err

        save_state(a, state_a, rundir)
        saved_seq = a.console.records()[-1].seq
        a.qmp.execute("cont")
        a.console.wait_records(2, after=saved_seq, timeout=60, alive=a.alive)

        b.start(timeout=60)
        assert fd_modes(b) == {"r"}, "an incoming QEMU holds its inactive disk read-only"
        b.qmp.execute("migrate-incoming", {"uri": f"exec:cat {shlex.quote(str(state_b))}"})
        _wait_migration(b, 300, "restore on B")
        with pytest.raises(QMPError, match=EBUSY_TEXT):
            b.qmp.execute("cont")
        assert b.qmp.execute("query-status")["running"] is False
        assert not b.console.records(), "B's guest ran while A's QEMU had the disk"

        a.quit(timeout=60)
        b.qmp.execute("cont")  # the open retries for a second while A's release lands
        assert b.qmp.execute("query-status")["running"] is True
        assert "rw" in fd_modes(b)
        b.console.wait_records(3, timeout=60, alive=b.alive)
        assert b.ctl.request("ping", timeout=30)["boot"] == boot_id, "the guest rebooted"
        last = int(b.ctl.request("quiesce", timeout=60)["last"])
        b.quit(timeout=60)
        on_a = [r for r in parse_records(a.console.read()) if r.seq <= saved_seq]
        on_b = parse_records(b.console.read())
    # B's guest resumed from the checkpoint: it counts on from SAVED_SEQ + 1.
    assert [r.seq for r in on_a + on_b] == list(range(last + 1))
    assert qcow2_slots(disk_b, last + 1, rundir) == on_a + on_b
    qemu_img("check", "-f", "qcow2", str(disk_b))


def test_multiwriter_disk_opens_on_both_nodes(guest, dirs, rundir):
    """A disk marked multi-writer is opened for writing by QEMUs on A and B at once.

    The second QEMU is started with ``-S``: it opens the disk for writing but its guest
    never runs (two guests writing one qcow2 would corrupt it; a real shared disk needs
    a cluster-aware guest and a raw image).

    The mark lifts the cluster open mode (a second node's open for writing).  QEMU's
    own image locks are OFD locks, which clusterfs keeps cluster-wide: a QEMU on B is
    refused ("Failed to get "write" lock") exactly as a second QEMU on A is, even with
    ``share-rw=on`` (qcow2 never shares writes to its file); ``file.locking=off``
    lets it open the image, on either node.
    """
    dir_a, dir_b = dirs
    disk_a, disk_b = dir_a / "vm.qcow2", dir_b / "vm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(disk_a), "64M")
    os.setxattr(disk_a, MULTIWRITER, b"1")  # before any QEMU opens it for writing
    assert os.getxattr(disk_b, MULTIWRITER) == b"1"
    with Machine(guest, disk_a, rundir, name="a") as a:
        boot(a, records=2)
        err = start_refused(Machine(guest, disk_b, rundir, name="b0", extra_args=("-S",)))
        assert 'Failed to get "write" lock' in err, err
        with Machine(guest, disk_b, rundir, name="b", extra_args=("-S",),
                     drive_opts=("file.locking=off",)) as b:
            b.start(timeout=60)
            assert "rw" in fd_modes(b), "B's QEMU has the multi-writer disk open for writing"
            assert b.qmp.execute("query-status")["status"] == "prelaunch"

            err = start_refused(Machine(guest, disk_a, rundir, name="a2", extra_args=("-S",),
                                        device_opts=("share-rw=on",)))
            assert 'Failed to get "write" lock' in err, err
            with Machine(guest, disk_a, rundir, name="a3", extra_args=("-S",),
                         drive_opts=("file.locking=off",)) as a3:
                a3.start(timeout=60)
                assert "rw" in fd_modes(a3)
                a3.quit(timeout=30)
            # A's guest keeps writing its disk meanwhile.
            seen = a.console.records()[-1].seq
            a.console.wait_records(2, after=seen, timeout=60, alive=a.alive)
            b.quit(timeout=30)
        last = int(a.ctl.request("quiesce", timeout=60)["last"])
        a.quit(timeout=60)
        console = parse_records(a.console.read())
    assert [r.seq for r in console] == list(range(last + 1))
    assert qcow2_slots(disk_b, last + 1, rundir) == console
    qemu_img("check", "-f", "qcow2", str(disk_b))


def test_guest_discard_punches_holes_seen_from_the_other_node(guest, dirs, rundir):
    """A guest's discard on a raw disk (QEMU with discard=unmap punches a hole with
    fallocate) frees the blocks: ``qemu-img map`` on node B shows the hole where the
    data was, and the data around it stays."""
    dir_a, dir_b = dirs
    disk_a, disk_b = dir_a / "vm.raw", dir_b / "vm.raw"
    qemu_img("create", "-q", "-f", "raw", str(disk_a), "64M")
    MiB = 1 << 20
    with open(disk_a, "r+b") as f:
        f.seek(16 * MiB)
        f.write(os.urandom(8 * MiB))

    def data_ranges() -> list[tuple[int, int]]:
        out = qemu_img("map", "--output=json", "-f", "raw", str(disk_b)).stdout
        return [(m["start"], m["start"] + m["length"]) for m in json.loads(out)
                if m["data"]]

    assert any(s <= 16 * MiB and 24 * MiB <= e for s, e in data_ranges())
    with Machine(guest, disk_a, rundir, name="a", disk_format="raw",
                 drive_opts=("discard=unmap",), device_opts=("discard=on",)) as a:
        boot(a, records=2)
        reply = a.ctl.request("discard", f"{16 * MiB} {4 * MiB}", timeout=120)
        assert reply["word"] == "discarded", reply
        a.ctl.request("quiesce", timeout=60)
        a.quit(timeout=60)
    ranges = data_ranges()
    assert not any(s < 20 * MiB and 16 * MiB < e for s, e in ranges), ranges
    assert any(s <= 20 * MiB and 24 * MiB <= e for s, e in ranges), ranges
    with open(disk_b, "rb") as f:
        f.seek(16 * MiB)
        assert f.read(4 * MiB) == bytes(4 * MiB)


def test_live_migration_from_a_to_b(guest, dirs, rundir):
    """Live migration over TCP between the nodes works without the multi-writer mark.

    QEMU hands the disk over itself: at the end of the migration the source
    inactivates its disk (reopens it read-only, which ends its cluster write-open)
    before the destination activates it (reopens it for writing). Afterwards the
    source cannot take the disk back while B runs: its ``cont`` gets EBUSY.
    """
    dir_a, dir_b = dirs
    disk_a, disk_b = dir_a / "vm.qcow2", dir_b / "vm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(disk_a), "64M")
    port = free_port()
    with Machine(guest, disk_a, rundir, name="a") as a, \
            Machine(guest, disk_b, rundir, name="b", incoming=True) as b:
        boot_id = boot(a, records=3)
        b.start(timeout=60)
        b.qmp.execute("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"})
        a.qmp.execute("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH})
        a.qmp.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        _wait_migration(a, 300, "live migration out of A")
        _wait_migration(b, 300, "live migration into B")
        assert a.qmp.execute("query-status")["status"] == "postmigrate"
        assert fd_modes(a) == {"r"}, "the source gave its write-open up"
        b.qmp.execute("cont")
        assert b.qmp.execute("query-status")["running"] is True
        assert "rw" in fd_modes(b)
        last_a = max(r.seq for r in parse_records(a.console.read()))
        b.console.wait_records(3, after=last_a, timeout=60, alive=b.alive)
        with pytest.raises(QMPError, match=EBUSY_TEXT):
            a.qmp.execute("cont")
        a.quit(timeout=60)
        assert b.ctl.request("ping", timeout=30)["boot"] == boot_id
        last = int(b.ctl.request("quiesce", timeout=60)["last"])
        b.quit(timeout=60)
        console = parse_records(a.console.read() + b.console.read())
    assert [r.seq for r in console] == list(range(last + 1))
    ups = [r.up for r in console]
    assert ups == sorted(ups), "guest uptime went back"
    assert qcow2_slots(disk_b, last + 1, rundir) == console
    qemu_img("check", "-f", "qcow2", str(disk_b))


def test_host_a_dies_while_its_vm_runs(guest, tmp_path, rundir):
    """Host A dies (its mount process and its QEMU are SIGKILLed) while the VM runs.

    A's QEMU runs with ``werror=stop,rerror=stop``: once its mount is gone, the VM
    pauses on the first failed disk write. Node B's QEMU cannot open the disk while
    A's locks stay held for recovery (its open waits for the inode lock, or gets
    EBUSY); once A's lease has expired and B has replayed A's journal, B opens the
    disk and cold boots the guest from it (the RAM of the dead VM is gone: restoring an older
    saved state over a disk that kept changing afterwards would corrupt the guest's
    file systems). ``qemu-img check`` finds no corruption (leaked clusters are
    allowed: QEMU ran in writeback mode and the guest never flushed), and the
    volume's fsck at the end is clean. Its own cluster (default 8 s lease).
    """
    with local_cluster(str(tmp_path / "c"), nodes=2, size="1024M") as (
            _vol, _key, (node_a, node_b)):
        a_slot_no = _slot_of(_vol, "node1")
        disk_a = Path(node_a.path) / "vm.qcow2"
        disk_b = Path(node_b.path) / "vm.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", str(disk_a), "64M")
        attempts = iter(range(1000))

        def start_on_b() -> Machine | None:
            """A running QEMU on B with the disk, or None if refused with EBUSY."""
            m = Machine(guest, disk_b, rundir, name=f"b{next(attempts)}")
            err = try_start(m)
            if err is None:
                return m
            assert EBUSY_TEXT in err, err
            return None

        with Machine(guest, disk_a, rundir, name="a",
                     drive_opts=("werror=stop", "rerror=stop")) as a:
            boot_a = boot(a, records=3)
            t_dead = time.monotonic()
            node_a.kill()  # SIGKILL, then a lazy unmount of the dead mount point
            # A's QEMU: its disk I/O fails now; with werror=stop the VM pauses
            # instead of handing the errors to the guest (as on a fenced node).
            a.qmp.wait_until(lambda: a.qmp.execute("query-status")["status"] == "io-error",
                             timeout=60, what="A's VM paused on the I/O error")
            os.kill(a.pid, signal.SIGKILL)
            a.wait_exit(timeout=30)
        # Until node A is recovered its locks stay held: B's open either waits for
        # the inode lock or gets EBUSY from the write-open (then QEMU exits: retry).
        # Recovery needs A's lease (8 s, renewed every second) to run out first.
        b = None
        try:
            while (b := start_on_b()) is None:
                assert time.monotonic() - t_dead < 90, "node A was never recovered"
            took = time.monotonic() - t_dead
            # B had the disk only once A was recovered: A's slot is FREE, its journal
            # replayed (when A was the lock manager's master, that is as soon as its
            # disk heartbeat went quiet; otherwise once its lease ran out)
            a_slot = slot_state(_vol, a_slot_no)
            assert a_slot.heartbeat.state == HB_FREE and a_slot.journal_clean, a_slot
            boot_b = b.ctl.wait_ready(timeout=240)["boot"]
            assert boot_b != boot_a
            b.console.wait_records(3, timeout=120, alive=b.alive)
            b.ctl.request("quiesce", timeout=60)
            b.quit(timeout=60)
        finally:
            if b is not None:
                b.close()
        r = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(disk_b)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode in (0, 3), f"qemu-img check: {r.returncode} {r.stdout} {r.stderr}"
        print(f"B opened the disk {took:.1f}s after A died")


def _slot_of(volume: str, node: str) -> int:
    """The slot node ``node`` holds, by the heartbeats on the volume."""
    from clusterfs.fs.volume import read_superblock
    from clusterfs.ondisk.blockdev import BlockDevice
    from clusterfs.ondisk.slots import read_heartbeats
    dev = BlockDevice(volume, readonly=True)
    try:
        hbs = read_heartbeats(dev, read_superblock(dev))
    finally:
        dev.close()
    (slot,) = [hb.slot for hb in hbs if hb is not None and hb.node == node
               and hb.state != HB_FREE]
    return slot


def _master(volume: str):
    """The volume's lease record: the lock manager's master."""
    from clusterfs.fs.volume import read_superblock
    from clusterfs.ondisk.blockdev import BlockDevice
    from clusterfs.ondisk.lease import read_lease
    dev = BlockDevice(volume, readonly=True)
    try:
        return read_lease(dev, read_superblock(dev))
    finally:
        dev.close()


def test_rolling_restart_under_a_running_guest(guest, tmp_path, rundir):
    """Three nodes; a guest on node 3 writes its disk (``werror=report``: an I/O error
    would reach the guest) while nodes 1 (the lock manager's master) and 2 are
    unmounted and mounted again in turn.  The master moves; the guest sees no error:
    every record it counted is on its disk, in order, and QEMU never stopped."""
    with local_cluster(str(tmp_path / "c"), nodes=3, size="1024M") as (
            volume, _key, mounts):
        first = _master(volume)
        assert first.node == "node1"
        disk = Path(mounts[2].path) / "disk.raw"
        size = 16 << 20
        qemu_img("create", "-q", "-f", "raw", str(disk), str(size))
        with Machine(guest, disk, rundir, name="roll", disk_format="raw",
                     drive_opts=("werror=report", "rerror=report")) as m:
            boot(m, records=3)
            masters = {first.node}
            for i, node in enumerate(mounts[:2]):
                name = f"node{i + 1}"
                node.stop()
                deadline = time.monotonic() + 30
                while _master(volume).node == name:      # its lease must pass on
                    assert time.monotonic() < deadline, f"{name}'s lease never passed on"
                    time.sleep(0.1)
                masters.add(_master(volume).node)
                seen = m.console.records()[-1].seq
                m.console.wait_records(2, after=seen, timeout=120, alive=m.alive)
                node.start()
                seen = m.console.records()[-1].seq
                m.console.wait_records(2, after=seen, timeout=120, alive=m.alive)
                assert m.qmp.execute("query-status")["status"] == "running"
            last = int(m.ctl.request("quiesce", timeout=60)["last"])
            m.quit(timeout=60)
            console = parse_records(m.console.read())
        assert len(masters) > 1 and _master(volume).generation > first.generation
        assert [r.seq for r in console] == list(range(last + 1))
        assert slots(disk.read_bytes(), last + 1) == console
