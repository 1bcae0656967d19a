"""Boot-time mounts (#16 item 1): ``mount -t fuse.clusterfs``, fstab lines and
``mount -a``, systemd ``.mount`` units, plain ``umount``.

libmount finds a file system's helper only in /sbin (its search path is built in,
not ``$PATH``), so the tests that go through mount(8) install the helper there
(``helper_in_sbin``: the text ``clusterfs install-units`` writes, running this
checkout's Python) and on the way out put back what was there, or remove it.  The
real /etc/fstab is never read or written: ``mount -a -T FILE`` takes a test fstab.

systemd is not PID 1 in the test container, so a unit is tested by running what
systemd runs for it (``mount WHAT WHERE -t TYPE -o OPTIONS``, then ``umount
WHERE``) and, where ``systemd-analyze`` exists, by ``systemd-analyze verify``.

Every test unmounts what it mounted, even when it fails, and ends only the mount
servers it started (found by the test's own directory on their command lines).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from clusterfs.commands import units
from clusterfs.ondisk.format import HB_FREE
from tests.cluster.cluster_util import slot_state
from tests.helpers import fsck_clean, in_mount_table, mkfs, run_cli

PY = sys.executable
SBIN_HELPER = "/sbin/mount.fuse.clusterfs"
FAST = "heartbeat=0.3"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mount(8) of FUSE needs root")


@pytest.fixture(scope="module")
def helper_in_sbin():
    """``/sbin/mount.fuse.clusterfs`` as install-units writes it, for this test
    module; what was there before comes back after."""
    old = None
    if os.path.lexists(SBIN_HELPER):
        with open(SBIN_HELPER, "rb") as f:
            old = f.read()
        mode = os.stat(SBIN_HELPER).st_mode
    with open(SBIN_HELPER + ".cfs-test", "w") as f:
        f.write(units.helper_script(PY))
    os.chmod(SBIN_HELPER + ".cfs-test", 0o755)
    os.replace(SBIN_HELPER + ".cfs-test", SBIN_HELPER)
    try:
        yield SBIN_HELPER
    finally:
        if old is None:
            os.unlink(SBIN_HELPER)
        else:
            with open(SBIN_HELPER, "wb") as f:
                f.write(old)
            os.chmod(SBIN_HELPER, mode)


class Site:
    """A test directory: a volume, a key, mount points; tracks what it mounted."""

    def __init__(self, top: str):
        self.top = top
        self.volume = os.path.join(top, "vol.img")
        self.key = os.path.join(top, "cluster.key")
        self.mountpoints: list[str] = []

    def mp(self, name: str) -> str:
        path = os.path.join(self.top, name)
        os.makedirs(path, exist_ok=True)
        self.mountpoints.append(path)
        return path

    def servers(self) -> list[int]:
        """PIDs of the mount servers of this site: the helper's forked server (its
        command line is the helper's) or ``clusterfs mount``, with our directory on
        the command line (their lock manager children, ``lockd``, end with them)."""
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            ours = any(a.startswith(self.top.encode()) for a in argv)
            server = b"clusterfs.commands.mounthelper" in argv or \
                (b"clusterfs.cli" in argv and b"mount" in argv)
            if ours and server:
                pids.append(int(entry))
        return pids

    def wait_servers_gone(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.servers():
            assert time.monotonic() < deadline, f"mount servers still running: {self.servers()}"
            time.sleep(0.05)

    def cleanup(self) -> None:
        for path in self.mountpoints:
            if in_mount_table(path):
                if subprocess.run(["umount", path], capture_output=True).returncode:
                    subprocess.run(["umount", "-l", path], capture_output=True)
        deadline = time.monotonic() + 20
        for sig in (signal.SIGTERM, signal.SIGKILL):
            while self.servers() and time.monotonic() < deadline:
                time.sleep(0.05)
            for pid in self.servers():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5


@pytest.fixture
def site():
    top = tempfile.mkdtemp(prefix="cfs-admin-")
    os.chmod(top, 0o755)
    s = Site(top)
    mkfs(s.volume, "128M")
    run_cli("keygen", s.key)
    try:
        yield s
    finally:
        s.cleanup()
        shutil.rmtree(top, ignore_errors=True)


def node_options(s: Site, node: str) -> str:
    return (f"key={s.key},node={node},listen=127.0.0.1:0,{FAST},"
            f"log={os.path.join(s.top, node + '.log')}")


def unit_fields(text: str) -> dict[str, str]:
    return dict(re.findall(r"^(\w+)=(.*)$", text, re.M))


def assert_slots_free(volume: str) -> None:
    for slot in range(4):
        st = slot_state(volume, slot)
        assert st.heartbeat.state == HB_FREE and st.journal_clean, (slot, st)


def assert_logs_clean(s: Site, *nodes: str) -> None:
    for node in nodes:
        with open(os.path.join(s.top, node + ".log")) as f:
            log = f.read()
        assert "Traceback" not in log and " ERROR" not in log, log
        assert "unmounted" in log, log


def mount_flags(path: str) -> set[str]:
    """The kernel's flags of the mount on ``path`` (/proc/self/mountinfo)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == path:
                return set(fields[5].split(","))
    raise AssertionError(f"{path} is not mounted")


def mount_count(path: str) -> int:
    with open("/proc/self/mountinfo") as f:
        return sum(1 for line in f if line.split()[4] == path)


def one_line_failure(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


# -- install-units (no mount) ---------------------------------------------------------

def test_install_units_files(tmp_path):
    """The helper, the unit (name as systemd-escape names it, content, enabled), the
    fstab line (escaped), refusals, --dry-run."""
    root = str(tmp_path)
    mp = "/srv/vm-store/a b"
    args = ("install-units", "--root", root, "/dev/disk/by-id/san-lun1", mp,
            "--key", "/etc/clusterfs/c.key", "--node", "host-1", "-o", "nofail")
    out = run_cli(*args).stdout
    helper = os.path.join(root, "sbin/mount.fuse.clusterfs")
    assert os.stat(helper).st_mode & 0o777 == 0o755
    with open(helper) as f:
        text = f.read()
    assert text.startswith("#!/bin/sh\n")
    assert f"exec {PY} -I -m clusterfs.commands.mounthelper \"$@\"" in text

    name = r"srv-vm\x2dstore-a\x20b.mount"
    assert units.unit_name(mp) == name
    if shutil.which("systemd-escape"):
        for path in (mp, "/", "/mnt/.hidden/x", "/mnt//é-1/"):
            esc = subprocess.run(["systemd-escape", "--path", "--suffix=mount", path],
                                 capture_output=True, text=True, check=True).stdout.strip()
            assert units.unit_name(path) == esc, path
    unit = os.path.join(root, "etc/systemd/system", name)
    assert f"wrote {unit}" in out
    with open(unit) as f:
        fields = unit_fields(f.read())
    assert fields == {
        "Description": f"clusterfs volume /dev/disk/by-id/san-lun1 on {mp}",
        "After": "network-online.target", "Wants": "network-online.target",
        "What": "/dev/disk/by-id/san-lun1", "Where": mp, "Type": "fuse.clusterfs",
        "Options": "_netdev,key=/etc/clusterfs/c.key,node=host-1,nofail",
        "WantedBy": "remote-fs.target"}
    link = os.path.join(root, "etc/systemd/system/remote-fs.target.wants", name)
    assert os.readlink(link) == "../" + name
    if shutil.which("systemd-analyze"):
        r = subprocess.run(["systemd-analyze", "verify", unit], capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr
    # fstab: blanks escaped as fstab(5) wants; a second line for the same mount point
    # is refused before anything is written
    out = run_cli("install-units", "--root", root, "/vol/a.img", mp, "--fstab",
                  "--node", "host-1", "-o", "noatime").stdout
    line = r"/vol/a.img /srv/vm-store/a\040b fuse.clusterfs _netdev,node=host-1,noatime 0 0"
    assert line in out
    with open(os.path.join(root, "etc/fstab")) as f:
        assert f.read() == line + "\n"
    assert os.path.isdir(os.path.join(root, mp.lstrip("/")))
    os.unlink(helper)
    r = run_cli("install-units", "--root", root, "/vol/b.img", mp + "/", "--fstab",
                check=False)
    assert "already has a line for" in one_line_failure(r)
    assert not os.path.exists(helper)
    # --dry-run prints and writes nothing
    dry = str(tmp_path / "dry")
    os.mkdir(dry)
    out = run_cli("install-units", "--root", dry, "--dry-run", "/vol/a.img", "/mnt/x",
                  "--node", "n").stdout
    assert "Options=_netdev,node=n" in out and "would write" in out
    assert os.listdir(dry) == []


@pytest.mark.parametrize("argv,says", [
    (["/vol/a.img", "/mnt/x", "-o", "bogus"], "unknown mount option 'bogus'"),
    (["/vol/a.img", "/mnt/x", "--slot", "-1"], "slot= wants a whole number"),
    (["vol.img", "/mnt/x"], "must be an absolute path"),
    (["/vol/a.img"], "give both VOLUME and MOUNTPOINT"),
    (["--node", "n"], "mount options want a VOLUME"),
    (["/vol/a.img", "/mnt/x", "--key", "/k,x"], "cannot be a mount option"),
])
def test_install_units_refuses(tmp_path, argv, says):
    r = run_cli("install-units", "--root", str(tmp_path), *argv, check=False)
    assert says in one_line_failure(r)
    assert os.listdir(tmp_path) == []


# -- the helper's command line ----------------------------------------------------------

@pytest.mark.parametrize("opts,says", [
    ("bogus", "unknown mount option 'bogus'"),
    ("key", "key= wants a value"),
    ("slot=x", "slot= wants a whole number, not 'x'"),
    ("lease=soon", "lease= wants a number of seconds"),
    ("open_cache=-3", "open_cache wants a number"),
    ("min_hold=soon", "min_hold wants milliseconds"),
    ("min_hold=5000", "min_hold wants milliseconds"),
    ("min_hold", "min_hold wants milliseconds"),
    ("dropbehind=lots", "dropbehind wants the size kept behind a reader"),
    ("dropbehind=-1M", "dropbehind wants the size kept behind a reader"),
])
def test_helper_bad_option(opts, says):
    r = subprocess.run([PY, "-m", "clusterfs.commands.mounthelper", "/vol.img", "/mnt",
                        "-o", "rw,_netdev," + opts], capture_output=True, text=True)
    assert says in one_line_failure(r)


def test_helper_accepts_what_mount_passes():
    """-f (fake) checks the options and mounts nothing: every option mount(8),
    systemd and fstab may pass is accepted; -s drops unknown ones; -t must be ours."""
    opts = ("defaults,rw,ro,dev,nodev,suid,nosuid,exec,noexec,auto,noauto,nofail,_netdev,"
            "user,users,x-systemd.automount,x-systemd.requires=a.service,comment=x,"
            "key=/k,node=n,listen=1.2.3.4:5,slot=1,lease=9,noatime,open_cache=8,log=/l,"
            "min_hold=2.5,dropbehind=256M")
    base = [PY, "-m", "clusterfs.commands.mounthelper"]
    r = subprocess.run(base + ["/vol.img", "/nowhere", "-f", "-n", "-v", "-o", opts,
                               "-t", "fuse.clusterfs"], capture_output=True, text=True)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    r = subprocess.run(base + ["/vol.img", "/nowhere", "-sf", "-o", "weird,key=/k"],
                       capture_output=True, text=True)
    assert (r.returncode, r.stderr) == (0, "")
    r = subprocess.run(base + ["/vol.img", "/nowhere", "-f", "-t", "ext4"],
                       capture_output=True, text=True)
    assert "not 'ext4'" in one_line_failure(r)
    r = subprocess.run(base + ["/vol.img"], capture_output=True, text=True)
    assert "wants a VOLUME and a MOUNTPOINT" in one_line_failure(r)


# -- through mount(8) ---------------------------------------------------------------

def test_mount_t_bad_option(helper_in_sbin, site):
    """mount(8) reports the helper's one line and its failure."""
    mp = site.mp("a")
    r = subprocess.run(["mount", "-t", "fuse.clusterfs", site.volume, mp, "-o",
                        f"key={site.key},node=a,frobnicate"], capture_output=True,
                       text=True, timeout=60)
    assert "unknown mount option 'frobnicate'" in one_line_failure(r)
    assert not in_mount_table(mp)


def test_units_on_two_nodes(helper_in_sbin, site):
    """Two nodes mount the volume through their .mount units' command lines; data
    written on one is read on the other; umount of each leaves its slot free; a
    later mount works."""
    root = os.path.join(site.top, "root")
    os.mkdir(root)
    cmds = {}
    for node in ("a", "b"):
        mp = site.mp(node)
        opts = node_options(site, node)
        run_cli("install-units", "--root", root, site.volume, mp, "-o", opts)
        with open(os.path.join(root, "etc/systemd/system", units.unit_name(mp))) as f:
            u = unit_fields(f.read())
        assert u["Options"] == "_netdev," + opts
        # what systemd runs to start and to stop a .mount unit
        cmds[node] = (["mount", u["What"], u["Where"], "-t", u["Type"], "-o",
                       u["Options"]], ["umount", u["Where"]])
    for node in ("a", "b"):
        r = subprocess.run(cmds[node][0], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert in_mount_table(os.path.join(site.top, node))
    with open(os.path.join(site.top, "a", "from-a"), "w") as f:
        f.write("written on a\n")
    with open(os.path.join(site.top, "b", "from-a")) as f:
        assert f.read() == "written on a\n"
    for node in ("a", "b"):
        subprocess.run(cmds[node][1], check=True, timeout=60)
    site.wait_servers_gone()
    assert_slots_free(site.volume)
    assert_logs_clean(site, "a", "b")
    status = run_cli("status", site.volume).stdout
    assert len(re.findall(r"^\s+\d+\s+\S+\s+free\s", status, re.M)) == 4, status
    # a later mount works (and sees the data)
    subprocess.run(cmds["b"][0], check=True, timeout=60)
    with open(os.path.join(site.top, "b", "from-a")) as f:
        assert f.read() == "written on a\n"
    subprocess.run(cmds["b"][1], check=True, timeout=60)
    site.wait_servers_gone()
    assert_slots_free(site.volume)
    fsck_clean(site.volume)


def test_mount_a_fstab(helper_in_sbin, site):
    """``mount -a -T FSTAB`` with two lines (two nodes), as install-units --fstab
    writes them; ``umount`` of each."""
    root = os.path.join(site.top, "root")
    os.mkdir(root)
    # node b names the volume through a symlink, as /dev/disk/by-id/... names a LUN
    link = os.path.join(site.top, "by-id-lun")
    os.symlink(site.volume, link)
    for node, volume, extra in (("a", site.volume, ""), ("b", link, ",noexec")):
        run_cli("install-units", "--root", root, "--fstab", volume,
                site.mp(node), "-o", node_options(site, node) + extra)
    fstab = os.path.join(root, "etc/fstab")
    with open(fstab) as f:
        assert len(f.read().splitlines()) == 2
    r = subprocess.run(["mount", "-a", "-T", fstab], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    a, b = (os.path.join(site.top, n) for n in ("a", "b"))
    assert in_mount_table(a) and in_mount_table(b)
    assert mount_flags(a) >= {"nosuid", "nodev"} and "noexec" not in mount_flags(a)
    assert mount_flags(b) >= {"nosuid", "nodev", "noexec"}     # passed on to FUSE
    # mount -a again: mount(8) sees both mounted (source, target and type match the
    # fstab; it compares the fstab's source resolved, so the mount names its volume
    # by its real path), so nothing is mounted twice
    r = subprocess.run(["mount", "-a", "-T", fstab], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert [mount_count(a), mount_count(b)] == [1, 1]
    with open(os.path.join(b, "from-b"), "w") as f:
        f.write("b\n")
    assert os.listdir(a) == ["from-b"]
    for mp in (a, b):
        subprocess.run(["umount", mp], check=True, timeout=60)
    site.wait_servers_gone()
    assert_slots_free(site.volume)
    assert_logs_clean(site, "a", "b")
    fsck_clean(site.volume)


@pytest.mark.parametrize("mode", ["cluster", "single"])
def test_sigterm_after_umount(helper_in_sbin, site, mode):
    """systemd may SIGTERM what is left of a .mount unit once umount returns: the
    server, still leaving the volume, finishes (slot free, journal clean)."""
    mp = site.mp("a")
    opts = node_options(site, "a") if mode == "cluster" else \
        f"nolock,{FAST},log={os.path.join(site.top, 'a.log')}"
    subprocess.run(["mount", "-t", "fuse.clusterfs", site.volume, mp, "-o", opts],
                   check=True, timeout=60)
    with open(os.path.join(mp, "f"), "w") as f:
        f.write("x" * 10000)
    [pid] = site.servers()
    subprocess.run(["umount", mp], check=True, timeout=60)
    os.kill(pid, signal.SIGTERM)
    site.wait_servers_gone()
    assert_slots_free(site.volume)
    assert_logs_clean(site, "a")
    fsck_clean(site.volume)
