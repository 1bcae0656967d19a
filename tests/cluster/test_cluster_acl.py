"""POSIX ACLs in a cluster: an ACL changed on one node is enforced on the other at
once (its kernel does not keep the ACL it cached), a default ACL set on one node is
inherited by what the other creates, and the umask applies on every node."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from tests.cluster.cluster_util import running_cluster
from tests.fuse.test_acl import BIG_ACL, created_modes, probes, run_script

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="acts as another user: needs root"),
    pytest.mark.skipif(shutil.which("setfacl") is None,
                       reason="setfacl/getfacl missing (Debian package acl)"),
]

# A process of nobody (uid and gid 65534) that holds an O_PATH descriptor of a file
# and, for each line it reads, tries to open the file for reading: "fd" through
# /proc/self/fd (no path walk, so no lookup that would refresh the kernel's view: only
# the attributes and the ACL the kernel has cached decide), "path" by its path.
# Answers "ok" or the errno's name.
PROBER = r"""
import errno, os, sys
os.setgroups([]); os.setgid(65534); os.setuid(65534)
fd = os.open(sys.argv[1], os.O_PATH)
print("ready", flush=True)
for line in sys.stdin:
    how = line.strip()
    try:
        os.close(os.open(f"/proc/self/fd/{fd}" if how == "fd" else sys.argv[1],
                         os.O_RDONLY))
        print("ok", flush=True)
    except OSError as e:
        print(errno.errorcode[e.errno], flush=True)
"""


class Prober:
    """``PROBER`` on ``path``; ``ask("fd" | "path")`` returns its answer."""

    def __init__(self, path: str):
        self.proc = subprocess.Popen([sys.executable, "-c", PROBER, path], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout.readline().strip() == "ready"

    def ask(self, how: str) -> str:
        self.proc.stdin.write(how + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def sh(mount, *cmd: str) -> str:
    """Run a command as root in the mount's top directory; its output."""
    r = subprocess.run(cmd, cwd=mount.path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"{cmd} on {mount.path}: {r.stdout}{r.stderr}"
    return r.stdout


def test_acl_changed_on_one_node_enforced_on_the_other(topdir):
    with running_cluster(topdir) as c:
        a = c.mount("n1")
        b = c.mount("n2")
        os.mkdir(a.p("d"))
        os.chmod(a.p("d"), 0o755)
        with open(a.p("d", "f"), "w") as f:
            f.write("secret\n")
        os.chmod(a.p("d", "f"), 0o600)
        prober = Prober(b.p("d", "f"))
        try:
            assert prober.ask("fd") == "EACCES"
            for _ in range(3):
                sh(a, "setfacl", "-m", "u:65534:r", "d/f")
                assert prober.ask("fd") == "ok"          # granted on n1
                assert prober.ask("fd") == "ok"          # (now cached by n2's kernel)
                sh(a, "setfacl", "-x", "u:65534", "d/f")
                # revoked on n1: the ACL n2's kernel cached must be gone
                assert prober.ask("fd") == "EACCES"
                assert prober.ask("path") == "EACCES"
            # the mask and chmod on n1 limit the named user on n2
            sh(a, "setfacl", "-m", "u:65534:r", "d/f")
            assert prober.ask("fd") == "ok"
            sh(a, "setfacl", "-m", "m::-", "d/f")
            assert prober.ask("fd") == "EACCES"
            sh(a, "chmod", "640", "d/f")
            assert prober.ask("fd") == "ok"
            sh(a, "chmod", "600", "d/f")
            assert prober.ask("fd") == "EACCES"
            # changed on n2 this time, enforced on n2 and seen alike on both
            sh(b, "setfacl", "-m", "m::r", "d/f")
            assert prober.ask("fd") == "ok"
            got = sh(a, "getfacl", "-cn", "d/f")
            assert got == sh(b, "getfacl", "-cn", "d/f")
            assert got == "user::rw-\nuser:65534:r--\ngroup::---\nmask::r--\nother::---\n\n"
            assert sh(a, "stat", "-c", "%a", "d/f") == sh(b, "stat", "-c", "%a", "d/f") \
                == "640\n"
        finally:
            prober.close()


# made on n1, then on n2 (big: ACLs in an xattr block, which n2 allocates)
SET_DEFAULT = f"""
mkdir d
setfacl -d -m u:65534:rx,g::rx,o::- d
facl d
mkdir big
setfacl -d -m {BIG_ACL} big
"""
CREATE_ON_OTHER = """
touch d/f
mkdir d/sub
touch d/sub/g
facl d/f d/sub d/sub/g
mode d/f d/sub d/sub/g
xattrs d/f d/sub d/sub/g
probe r d/f
probe w d/f
probe ls d/sub
mkdir big/sub
touch big/sub/f
facl big/sub big/sub/f
"""
LOOK = """
facl d/f d/sub d/sub/g
mode d/f d/sub d/sub/g
facl big/sub big/sub/f
"""


def test_default_acl_set_on_one_node_inherited_on_the_other(topdir):
    """A default ACL set on n1 is inherited by files and directories n2 creates, as
    on ext4 (umask 022, with a default ACL that the umask does not narrow: see
    tests/fuse/test_acl.py test_default_acl_ignores_umask); and without a default ACL
    the umask applies on both nodes."""
    ref = tempfile.mkdtemp(prefix="cfs-acl-ref-")
    os.chmod(ref, 0o777)
    try:
        expected = [run_script(ref, s) for s in (SET_DEFAULT, CREATE_ON_OTHER, LOOK)]
        with running_cluster(topdir) as c:
            a = c.mount("n1")
            b = c.mount("n2")
            got = [run_script(a.path, SET_DEFAULT), run_script(b.path, CREATE_ON_OTHER),
                   run_script(a.path, LOOK)]
            assert got == expected
            assert probes(got[1]) == ["r d/f: ok", "w d/f: EACCES", "ls d/sub: ok"]
            assert "user:65534:r-x\t#effective:r--\n" in got[1]
            assert "d/sub ['system.posix_acl_access', 'system.posix_acl_default']" \
                in got[1]
            for mount, umask, modes in (
                    (a, 0o022, ["f 644", "d 755", "p 644", "n 644", "g 640"]),
                    (b, 0o022, ["f 644", "d 755", "p 644", "n 644", "g 640"]),
                    (b, 0o077, ["f 600", "d 700", "p 600", "n 600", "g 600"])):
                where = mount.p(f"plain-{umask:o}-{os.path.basename(mount.path)}")
                os.mkdir(where)
                assert created_modes(where, umask) == modes
    finally:
        shutil.rmtree(ref, ignore_errors=True)
