"""Cluster test helpers: cluster node mounts, the lock manager they elect, the volume check.

``Cluster`` hands out node mounts of one volume (``tests.helpers.Mount`` with
``--key``, ``--node``, ``--listen``): every node runs a lock manager candidate as its
child and one of them is the master, found in the volume's lease block
(``Cluster.master``).  ``running_cluster`` unmounts every node that is still mounted
on the way out (even when the test failed), then checks the volume.

State to assert on, rather than log lines: ``Cluster.view()`` is the lock manager's
own view (the master's status query with every granted lock), ``slot_state`` a node
slot as the volume holds it (heartbeat, journal clean, digest of the journal's log
blocks), and ``Cluster.wait_recovered`` checks both once a dead node is recovered.

Short leases keep the failure tests fast: mounts ``--lease 7 --heartbeat 0.3``
(``fast=False`` uses the defaults).  Not shorter: a member's lease must outlast a
lock manager failover (``clusterfs.cluster.lockd.check_member_lease``).

``CFS_CLUSTER_OPTIONS=OPTS`` in the environment adds ``-o OPTS`` to every node's
mount: the whole cluster suite can run with, say, ``entrycache``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from clusterfs.ondisk.format import HB_FREE, Heartbeat
from tests.helpers import Mount, check_consistency, fsck_clean, mkfs, run_cli

PY = sys.executable
FAST_LEASE = "7"
FAST_HEARTBEAT = "0.3"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def make_key(path: str) -> str:
    run_cli("keygen", path)
    return path


# prints lock_view(ADDR, KEYFILE) as JSON (lock names in hex)
_VIEW = """import json, sys
from tests.cluster.cluster_util import lock_view
st = lock_view(*sys.argv[1:])
for h in st["held"]:
    h["name"] = h["name"].hex()
print(json.dumps(st))
"""


def lock_view(addr: str, keyfile: str) -> dict:
    """The status of the lock manager at ``addr`` (``lockmgr.query_status``) with
    ``held``, every granted lock: name (bytes), node, slot, mode, dead (its owner is
    not a live session: a dead node not yet recovered, or none at all)."""
    import trio

    from lockmgr import load_key, query_status
    key = load_key(keyfile)
    return trio.run(lambda: query_status(addr, key, prefix=b""))


class Cluster:
    """One volume and the nodes mounted on it (each with its lock manager candidate).

    Args:
        top: a directory for mount points and logs (world-traversable).
        volume: the volume image.
        keyfile: the cluster's key file.
        fast: short leases and heartbeats (else the defaults).
    """

    def __init__(self, top: str, volume: str, keyfile: str, *, fast: bool = True):
        self.top = top
        self.volume = volume
        self.keyfile = keyfile
        self.fast = fast
        self.nodes: dict[str, Mount] = {}

    def node_args(self, name: str, *extra: str, listen: str = "127.0.0.1:0") -> list:
        args = ["--key", self.keyfile, "--node", name, "--listen", listen]
        if self.fast:
            args += ["--lease", FAST_LEASE, "--heartbeat", FAST_HEARTBEAT]
        if os.environ.get("CFS_CLUSTER_OPTIONS"):
            args += ["-o", os.environ["CFS_CLUSTER_OPTIONS"]]
        return args + list(extra)

    def mount(self, name: str, *extra: str, wrap: tuple = (),
              listen: str = "127.0.0.1:0", env: dict | None = None,
              volume: str | None = None) -> Mount:
        """Mount the volume as node ``name`` (at TOP/NAME) and wait for it (``env``:
        the mount's environment, which its lock manager candidate inherits;
        ``volume``: the node's own path to the volume, ``FaultyPath.image``)."""
        path = os.path.join(self.top, name)
        m = Mount(volume or self.volume, path,
                  *self.node_args(name, *extra, listen=listen), wrap=wrap, env=env)
        self.nodes[name] = m
        return m.start()

    def unmount(self, name: str, check_log: bool = True) -> None:
        self.nodes[name].stop(check_log=check_log)

    def kill(self, name: str) -> None:
        """SIGKILL of node ``name``'s mount (its lock manager candidate dies with it)."""
        self.nodes[name].kill()

    def unmount_all(self, check_log: bool = True) -> None:
        errors = []
        for m in self.nodes.values():
            try:
                m.stop(check_log=check_log)
            except AssertionError as e:
                errors.append(str(e))
        if errors:
            raise AssertionError("\n".join(errors))

    def master(self):
        """The lease block: ``LeaseBlock`` (owner < 0: no master yet)."""
        from clusterfs.fs.volume import read_superblock
        from clusterfs.ondisk.blockdev import BlockDevice
        from clusterfs.ondisk.lease import read_lease
        dev = BlockDevice(self.volume, readonly=True)
        try:
            return read_lease(dev, read_superblock(dev))
        finally:
            dev.close()

    def master_node(self, timeout: float = 30.0) -> str:
        """The name of the node whose candidate is the master (waits for one)."""
        rec = wait_for(lambda: (m := self.master()) is not None and m.owner >= 0 and m,
                       timeout, "a lock manager master")
        return rec.node

    def candidate_pid(self, name: str) -> int:
        """The pid of node ``name``'s lock manager candidate (a child of its mount)."""
        pid = self.nodes[name].proc.pid
        kids = []
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(k) for k in f.read().split()]
        for kid in kids:
            with open(f"/proc/{kid}/cmdline", "rb") as f:
                if b"lockd" in f.read().split(b"\0"):
                    return kid
        raise AssertionError(f"node {name} runs no lock manager candidate")

    def view(self, wrap: tuple = ()) -> dict:
        """The lock manager's own view (``lock_view`` of the master), asked from inside
        a network namespace when ``wrap`` enters one."""
        addr = self.master().addr
        if not wrap:
            return lock_view(addr, self.keyfile)
        r = subprocess.run([*wrap, PY, "-c", _VIEW, addr, self.keyfile], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"lock manager status from a namespace:\n{r.stderr}"
        st = json.loads(r.stdout)
        for h in st["held"]:
            h["name"] = bytes.fromhex(h["name"])
        return st

    def status(self, *extra: str) -> dict:
        proc = run_cli("status", self.volume, "--key", self.keyfile, "--json", *extra)
        return json.loads(proc.stdout)

    def dump_logs(self, lines: int = 60) -> None:
        """Print the tail of every log (pytest shows it with a failure)."""
        for name, m in self.nodes.items():
            print(f"----- {name} log (last {lines} lines) -----")
            print("\n".join(m.read_log().splitlines()[-lines:]))

    def run_status(self, *extra: str) -> str:
        """``clusterfs status`` (text) with the lock manager."""
        return run_cli("status", self.volume, "--key", self.keyfile, *extra).stdout

    def check(self, *, crashed: bool = False) -> None:
        """The volume (every node unmounted) is consistent: the walk, then fsck."""
        check_volume(self.volume, crashed=crashed)

    def slot_of(self, name: str) -> int:
        """The slot node ``name`` has mounted, by the heartbeats on the volume."""
        from clusterfs.fs.volume import read_superblock
        from clusterfs.ondisk.blockdev import BlockDevice
        from clusterfs.ondisk.slots import read_heartbeats
        dev = BlockDevice(self.volume, readonly=True)
        try:
            hbs = read_heartbeats(dev, read_superblock(dev))
        finally:
            dev.close()
        slots = [hb.slot for hb in hbs
                 if hb is not None and hb.node == name and hb.state != HB_FREE]
        assert len(slots) == 1, f"node {name} holds slots {slots}"
        return slots[0]

    def wait_recovered(self, name: str, slot: int, timeout: float = 60.0,
                       wrap: tuple = ()) -> None:
        """Wait until the lock manager has let the dead node ``name`` go (its session
        leaves only when a member reports its slot recovered), then check what the
        recovery leaves: no lock of the node held any more, and on the volume its
        slot's heartbeat FREE and its journal clean."""
        def gone():
            try:
                st = self.view(wrap)
            except Exception:        # no master reachable now (a failover under way)
                return None
            listed = [n for n in st["nodes"] + st["recovering"] if n["node"] == name]
            return None if listed or st["frozen"] else st
        st = wait_for(gone, timeout, f"the recovery of node {name}")
        left = [h for h in st["held"] if h["slot"] == slot or h["dead"]]
        assert left == [], f"locks of the recovered node {name} are still held: {left}"
        after = slot_state(self.volume, slot)
        assert after.heartbeat is not None and after.heartbeat.state == HB_FREE, \
            f"slot {slot} of the recovered node {name}: heartbeat {after.heartbeat}"
        assert after.journal_clean, \
            f"slot {slot} of the recovered node {name}: its journal was not replayed"


def fails_with_eio(path: str) -> bool:
    """Whether a lookup of ``path`` (a name that does not exist) fails with EIO, as
    every request to a fenced node does; False when it answers ENOENT."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.EIO:
            return True
        if e.errno == errno.ENOENT:
            return False
        raise
    raise AssertionError(f"{path} exists")


class FaultyPath:
    """One node's path to the volume, which breaks on demand: ``faultydisk.py``
    mounted at TOP/NAME-disk, the volume seen there as ``image``.  ``lose()``: from
    then on every read, write and flush through it fails with EIO (or only the
    writes to some byte ranges); ``restore()`` mends it.  Each returns once the path
    is so.  A context manager; unmounts on the way out."""

    def __init__(self, top: str, volume: str, name: str):
        self.mountpoint = os.path.join(top, f"{name}-disk")
        self.image = os.path.join(self.mountpoint, "vol.img")
        os.mkdir(self.mountpoint)
        self.log = open(os.path.join(top, f"{name}-disk.log"), "w+")
        self.proc = subprocess.Popen(
            [PY, os.path.join(REPO, "tests", "cluster", "faultydisk.py"), volume,
             self.mountpoint], stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: os.path.exists(self.image) or self.proc.poll() is not None,
                     30, "the faulty path to the volume")
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"faultydisk.py failed: {self.log.read()}")
        except BaseException:
            self.close()
            raise

    def lose(self, bad: list[tuple[int, int]] | None = None) -> None:
        """Every I/O fails from now on; with ``bad`` (byte ranges: start, length)
        only the writes that touch those ranges."""
        control = self.mountpoint + ".bad"
        if bad is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(control)
        else:
            with open(control, "w") as f:
                f.writelines(f"{start} {length}\n" for start, length in bad)
        self._signal(signal.SIGUSR1, "broken")

    def restore(self) -> None:
        self._signal(signal.SIGUSR2, "mended")

    def _signal(self, sig: int, state: str) -> None:
        path = self.mountpoint + ".state"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self.proc.send_signal(sig)

        def acknowledged():
            try:
                with open(path) as f:
                    return f.read() == state
            except FileNotFoundError:
                return False
        wait_for(acknowledged, 10, f"the faulty path {state}")

    def close(self) -> None:
        if self.proc.poll() is None:
            subprocess.run(["fusermount3", "-u", "-z", self.mountpoint],
                           capture_output=True)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def __enter__(self) -> "FaultyPath":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def volume_superblock(path: str):
    """The superblock of the volume image at ``path`` (read-only, as on disk)."""
    from clusterfs.fs.volume import read_superblock
    from clusterfs.ondisk.blockdev import BlockDevice
    dev = BlockDevice(path, readonly=True)
    try:
        return read_superblock(dev)
    finally:
        dev.close()


def check_volume(path: str, *, crashed: bool = False) -> None:
    """The walk of ``tests.helpers.check_consistency``, then fsck.  ``crashed``: a
    node died, so a file's last block may hold bytes past EOF (written before its
    size was committed; a later extension zeroes them)."""
    from clusterfs.ondisk.blockdev import BlockDevice
    dev = BlockDevice(path, readonly=True)
    try:
        problems = check_consistency(dev, tail_zero=not crashed)
    finally:
        dev.close()
    assert problems == [], "\n".join(problems[:30])
    fsck_clean(path)


@contextlib.contextmanager
def make_topdir():
    """A world-traversable directory for mount points (pytest's tmp is private);
    kept for a post-mortem when CFS_KEEP_TEST_DIRS is set."""
    top = tempfile.mkdtemp(prefix="cfs-cluster-")
    os.chmod(top, 0o755)
    try:
        yield top
    finally:
        if os.environ.get("CFS_KEEP_TEST_DIRS"):
            print(f"kept {top}")
        else:
            shutil.rmtree(top, ignore_errors=True)


@contextlib.contextmanager
def running_cluster(top: str, *, size: str = "256M", fast: bool = True,
                    mkfs_args: tuple = (), crashes: bool = False):
    """A fresh volume and a key in ``top``; on the way out every node is unmounted
    (always) and (after success) the volume checked (``crashes``: the test kills
    nodes)."""
    key = make_key(os.path.join(top, "cluster.key"))
    vol = os.path.join(top, "vol.img")
    mkfs(vol, size, *mkfs_args)
    c = Cluster(top, vol, key, fast=fast)
    ok = False
    try:
        yield c
        ok = True
    except BaseException:
        c.dump_logs()
        raise
    finally:
        c.unmount_all(check_log=ok)
    c.check(crashed=crashes)


@contextlib.contextmanager
def mounted_cluster(*names: str, **kw):
    """``running_cluster`` (``kw``) in a new top directory, with the nodes ``names``
    mounted: a module's shared cluster."""
    with make_topdir() as top, running_cluster(top, **kw) as c:
        for name in names:
            c.mount(name)
        yield c


def dir_for_test(request) -> str:
    """A file name for the running test (its parameters in it): each test of a
    module's shared cluster works under its own name."""
    return request.node.name.replace("[", "_").replace("]", "_")


def wait_for(cond, timeout: float = 60.0, what: str = "condition", interval=0.05):
    """Poll ``cond()`` until it is true; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


class Workload:
    """A ``tests/cluster/workload.py`` process on one node's mount.

    Args:
        mount: the node's Mount.
        node: the node name (its private directory under ``TOP``).
        top: the workload's top directory on that mount.
        logdir: a local directory for its log and stop file.
        seed: its random seed.
        strict: any error fails it (a survivor must see none).
        hold: a file it keeps open for writing (a cluster open mode).
    """

    def __init__(self, mount: Mount, node: str, top: str, logdir: str, *, seed: int = 0,
                 strict: bool = True, hold: str | None = None):
        self.node = node
        self.top = top
        self.log = os.path.join(logdir, f"workload-{node}.log")
        self.stopfile = os.path.join(logdir, f"workload-{node}.stop")
        self.errfile = os.path.join(logdir, f"workload-{node}.err")
        for path in (self.log, self.stopfile):
            if os.path.exists(path):
                os.unlink(path)
        cmd = [PY, "-m", "tests.cluster.workload", top, node, self.log, "--seed",
               str(seed), "--stop", self.stopfile]
        if strict:
            cmd.append("--strict")
        if hold:
            cmd += ["--hold", hold]
        with open(self.errfile, "ab") as err:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL,
                                         stdout=err, stderr=subprocess.STDOUT)

    def events(self) -> list[dict]:
        try:
            with open(self.log) as f:
                lines = f.read().splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass          # a torn last line (the process was killed)
        return out

    def fsynced(self) -> list[tuple[str, str]]:
        return [(e["fsynced"], e["sha256"]) for e in self.events() if "fsynced" in e]

    def wait_started(self, syncs: int = 1, timeout: float = 60.0) -> None:
        wait_for(lambda: len(self.fsynced()) >= syncs or self.proc.poll() is not None,
                 timeout, f"workload {self.node} to start")
        assert self.proc.poll() is None, f"workload {self.node} ended early: " \
                                         + self.errors()

    def errors(self) -> str:
        try:
            with open(self.errfile, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def stop(self, timeout: float = 120.0) -> int:
        """Ask it to stop (it checks its tree first); its exit status."""
        open(self.stopfile, "w").close()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"workload {self.node} did not stop")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                return h.hexdigest()
            h.update(chunk)


def image_digest(path: str, skip: set[int] = frozenset()) -> str:
    """A hash of a volume image's blocks, leaving out the block numbers in ``skip``."""
    h = hashlib.sha256()
    bs = 4096
    with open(path, "rb") as f:
        bno = 0
        while True:
            chunk = f.read(bs * 256)
            if not chunk:
                return h.hexdigest()
            for i in range(0, len(chunk), bs):
                if bno not in skip:
                    h.update(chunk[i:i + bs])
                else:
                    h.update(b"skipped")
                bno += 1


@dataclasses.dataclass
class SlotState:
    """A node slot as the volume holds it."""

    heartbeat: Heartbeat | None     #: None: unreadable
    journal_clean: bool             #: its journal's header says clean
    log_digest: str                 #: sha256 of its journal's log blocks (not the header)


def slot_state(volume: str, slot: int) -> SlotState:
    """Read ``slot``'s heartbeat and journal from the volume (no lock: a snapshot)."""
    from clusterfs.fs.volume import read_superblock
    from clusterfs.ondisk.blockdev import BlockDevice
    from clusterfs.ondisk.slots import read_heartbeat, slot_journal
    dev = BlockDevice(volume, readonly=True)
    try:
        sb = read_superblock(dev)
        j = slot_journal(dev, sb, slot)
        log = hashlib.sha256(dev.read(j.start + 1, j.length - 1)).hexdigest()
        return SlotState(read_heartbeat(dev, sb, slot), j.is_clean(), log)
    finally:
        dev.close()


def heartbeat_blocks(volume: str, slots) -> set[int]:
    """The blocks live nodes keep rewriting: the slots' heartbeats, and the lease
    block the lock manager's master renews."""
    from clusterfs.fs.volume import Volume
    vol = Volume.open(volume, readonly=True)
    try:
        return {vol.sb.heartbeat_bno(s) for s in slots} | {vol.sb.lease_bno}
    finally:
        vol.close()


class Netns:
    """Network namespaces made (and deleted) by a test: one per node, each joined by
    its own veth link to a hub namespace that routes between them (10.200.I.2 on
    node I's side, 10.200.I.1 on the hub's; no bridge, so no kernel module).  Cutting
    a node's link cuts it off from every other node; the volume stays reachable."""

    def __init__(self, nodes: list[str]):
        tag = f"{os.getpid() % 100000}"
        self.tag = tag
        self.hub = f"cfs{tag}-hub"
        self.ns = {n: f"cfs{tag}-{n}" for n in nodes}
        self.index = {n: i for i, n in enumerate(nodes)}
        self.made: list[str] = []

    @staticmethod
    def ip(*args: str) -> None:
        r = subprocess.run(["ip", *args], capture_output=True, text=True)
        if r.returncode != 0:
            raise AssertionError(f"ip {' '.join(args)}: {r.stderr.strip()}")

    def hub_side(self, node: str) -> str:
        return f"cv{self.tag}h{self.index[node]}"[:15]

    def node_side(self, node: str) -> str:
        return f"cv{self.tag}n{self.index[node]}"[:15]

    def setup(self) -> "Netns":
        for ns in [self.hub, *self.ns.values()]:
            self.ip("netns", "add", ns)
            self.made.append(ns)
            self.ip("-n", ns, "link", "set", "lo", "up")
        r = subprocess.run(["ip", "netns", "exec", self.hub, "sysctl", "-qw",
                            "net.ipv4.ip_forward=1"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        for node, ns in self.ns.items():
            i = self.index[node]
            hside, nside = self.hub_side(node), self.node_side(node)
            self.ip("link", "add", hside, "netns", self.hub, "type", "veth", "peer",
                    "name", nside, "netns", ns)
            self.ip("-n", self.hub, "addr", "add", f"10.200.{i}.1/24", "dev", hside)
            self.ip("-n", ns, "addr", "add", f"10.200.{i}.2/24", "dev", nside)
            self.ip("-n", self.hub, "link", "set", hside, "up")
            self.ip("-n", ns, "link", "set", nside, "up")
            self.ip("-n", ns, "route", "add", "default", "via", f"10.200.{i}.1")
        return self

    def wrap(self, node: str) -> tuple:
        return ("nsenter", f"--net=/var/run/netns/{self.ns[node]}")

    def addr(self, node: str) -> str:
        """Node ``node``'s address in its namespace."""
        return f"10.200.{self.index[node]}.2"

    def cut(self, node: str) -> None:
        self.ip("-n", self.hub, "link", "set", self.hub_side(node), "down")

    def restore(self, node: str) -> None:
        self.ip("-n", self.hub, "link", "set", self.hub_side(node), "up")
        self.ip("-n", self.ns[node], "link", "set", self.node_side(node), "up")
        self.ip("-n", self.ns[node], "route", "replace", "default", "via",
                f"10.200.{self.index[node]}.1")

    def reachable(self, node: str, addr: str) -> bool:
        """Whether a TCP connection from ``node``'s namespace to ``addr`` (HOST:PORT)
        succeeds."""
        host, port = addr.rsplit(":", 1)
        r = subprocess.run([*self.wrap(node), PY, "-c",
                            f"import socket; socket.create_connection(({host!r}, {port}), 1)"],
                           capture_output=True)
        return r.returncode == 0

    def teardown(self) -> None:
        """Delete the namespaces (their veth links go with them)."""
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.made.clear()
