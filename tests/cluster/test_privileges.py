"""Writes, truncations and changes of owner drop set-user-ID and set-group-ID bits and
file capabilities on a cluster mount as on ext4: the kernel leaves that to the file
system (FUSE_HANDLE_KILLPRIV_V2, and with direct I/O in any case)."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys

import pytest

from tests.cluster.cluster_util import running_cluster
from tests.fuse.posix_util import (CAPS_VALUE, CAPS_XATTR, as_user, on_local_fs,
                                   privilege_transcript)

NOBODY = 65534
WRITE_AS = "import os, sys; os.setgid(int(sys.argv[2])); os.setuid(int(sys.argv[1]));" \
           " fd = os.open(sys.argv[3], os.O_WRONLY); os.write(fd, b'x'); os.close(fd)"


def write_as(uid: int, gid: int, path: str) -> None:
    subprocess.run([sys.executable, "-c", WRITE_AS, str(uid), str(gid), path], check=True)


def modes_after_writes(directory: str) -> list[str]:
    """Files with set-ID bits written by nobody and by root: their modes after."""
    out = []
    for name, mode, uid in (("suid", 0o6777, NOBODY), ("sgid-noexec", 0o2666, NOBODY),
                            ("root", 0o6777, 0)):
        path = os.path.join(directory, name)
        with open(path, "wb"):
            pass
        os.chmod(path, mode)
        write_as(uid, NOBODY if uid else 0, path)
        out.append(f"{name} {stat.S_IMODE(os.stat(path).st_mode):o}")
    return out


def _shared_dir(c):
    """Mount nodes n1 and n2; a world-writable directory ``d`` made through n1,
    whose mount is returned."""
    a = c.mount("n1")
    c.mount("n2")
    os.mkdir(a.p("d"))
    os.chmod(a.p("d"), 0o777)
    return a


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to write as another user")
def test_setid_bits_cleared_by_another_users_write(topdir):
    expected = on_local_fs(modes_after_writes)
    assert expected == ["suid 777", "sgid-noexec 666", "root 6777"]
    with running_cluster(topdir) as c:
        a = _shared_dir(c)
        assert modes_after_writes(a.p("d")) == expected
        # and the other node sees the cleared bits
        assert stat.S_IMODE(os.stat(c.nodes["n2"].p("d", "suid")).st_mode) == 0o777


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to write as another user")
def test_privileges_set_on_another_node_go_with_a_write(topdir):
    """The kernel leaves removing set-ID bits and file capabilities to the file
    system (FUSE_HANDLE_KILLPRIV_V2), and a node's kernel that has seen a file
    without them stops checking until it refreshes the file's attributes (S_NOSEC).
    Bits and capabilities another node sets afterwards go with this node's next
    write."""
    with running_cluster(topdir) as c:
        a = _shared_dir(c)
        b = c.nodes["n2"]
        path_a, path_b = a.p("d", "f"), b.p("d", "f")
        with open(path_a, "wb") as f:
            f.write(b"0123456789")
        os.chmod(path_a, 0o777)

        def rw_write(path):
            fd = os.open(path, os.O_RDWR)
            try:
                os.pwrite(fd, b"x", 1)
            finally:
                os.close(fd)
        rw_write(path_a)                # n1's kernel: no privileges on this file
        os.chmod(path_b, 0o6777)
        os.setxattr(path_b, CAPS_XATTR, CAPS_VALUE)
        assert as_user(NOBODY, NOBODY, rw_write, path_a) is None
        for path in (path_a, path_b):
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o777, path
            with pytest.raises(OSError) as e:
                os.getxattr(path, CAPS_XATTR)
            assert e.value.errno == errno.ENODATA
        # root's write keeps the set-ID bits (CAP_FSETID) but not the capabilities
        os.chmod(path_b, 0o6777)
        os.setxattr(path_b, CAPS_XATTR, CAPS_VALUE)
        rw_write(path_a)
        assert stat.S_IMODE(os.stat(path_b).st_mode) == 0o6777
        assert CAPS_XATTR not in os.listxattr(path_b)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_privileges_go_as_on_ext4(topdir):
    expected = on_local_fs(privilege_transcript)
    with running_cluster(topdir) as c:
        assert privilege_transcript(_shared_dir(c).p("d")) == expected
