"""Hypothesis stateful test: random operation sequences run through the FUSE mount
and, side by side, in a plain local directory; after every step the two trees
(names, types, modes, sizes, link counts, contents, symlink targets, xattrs) and
the outcome of every operation (result or errno) must agree.

One mount serves every example; the tree is emptied between examples.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, rule,
                                 run_state_machine_as_test)

from tests.fuse.posix_util import outcome, snapshot

NAMES = ["a", "b", "c"]
PATHS = NAMES + [f"{x}/{y}" for x in NAMES[:2] for y in NAMES] + ["a/a/b"]
paths = st.sampled_from(PATHS)
sizes = st.sampled_from([0, 1, 100, 3455, 3456, 3457, 4096, 5000, 9000, 70000])


def _xattrs_supported(path: str) -> bool:
    probe = os.path.join(path, ".xattr-probe")
    open(probe, "w").close()
    try:
        os.setxattr(probe, "user.p", b"1")
        return True
    except OSError:
        return False
    finally:
        os.unlink(probe)


class FsMachine(RuleBasedStateMachine):
    mnt: str = ""           # set by the test: a directory on the mount
    ref: str = ""           # a plain local directory
    xattrs: bool = True

    def __init__(self):
        super().__init__()
        self.fds: list[tuple[int, int]] = []     # (fd on mount, fd on reference)

    def both(self, fn, *rel_args, raw=()):
        """Run ``fn`` on both trees; the outcomes must match."""
        a = outcome(fn, *[os.path.join(self.mnt, r) for r in rel_args], *raw)
        b = outcome(fn, *[os.path.join(self.ref, r) for r in rel_args], *raw)
        note(f"{fn.__name__}{rel_args}{raw} -> mount {a[0]}:{a[1] if a[0] == 'errno' else ''}"
             f", ref {b[0]}:{b[1] if b[0] == 'errno' else ''}")
        assert a == b, f"{fn.__name__}{rel_args}: mount {a!r} != local {b!r}"
        return a

    @initialize()
    def clean(self):
        for top in (self.mnt, self.ref):
            for name in os.listdir(top):
                p = os.path.join(top, name)
                if os.path.isdir(p) and not os.path.islink(p):
                    shutil.rmtree(p)
                else:
                    os.unlink(p)

    def teardown(self):
        for a, b in self.fds:
            os.close(a)
            os.close(b)
        self.fds.clear()

    # -- rules ----------------------------------------------------------------------------

    @rule(p=paths, data=st.binary(max_size=64), size=sizes, excl=st.booleans())
    def create(self, p, data, size, excl):
        def create(path, data, size, excl):
            flags = os.O_CREAT | os.O_WRONLY | (os.O_EXCL if excl else os.O_TRUNC)
            fd = os.open(path, flags, 0o644)
            try:
                os.write(fd, (data * (size // max(1, len(data)) + 1))[:size] if data else
                         bytes(size))
            finally:
                os.close(fd)
        self.both(create, p, raw=(data, size, excl))

    @rule(p=paths, off=st.sampled_from([0, 1, 3000, 3456, 4095, 4096, 8191, 20000, 100000]),
          data=st.binary(min_size=1, max_size=64), n=st.sampled_from([1, 100, 4096, 5000]))
    def write_at(self, p, off, data, n):
        def write_at(path, off, payload):
            fd = os.open(path, os.O_WRONLY)
            try:
                return os.pwrite(fd, payload, off)
            finally:
                os.close(fd)
        self.both(write_at, p, raw=(off, (data * n)[:n]))

    @rule(p=paths, size=sizes)
    def truncate(self, p, size):
        self.both(os.truncate, p, raw=(size,))

    @rule(p=paths, mode=st.sampled_from([0o755, 0o700, 0o2755]))
    def mkdir(self, p, mode):
        self.both(os.mkdir, p, raw=(mode,))

    @rule(p=paths)
    def rmdir(self, p):
        self.both(os.rmdir, p)

    @rule(p=paths)
    def unlink(self, p):
        self.both(os.unlink, p)

    @rule(src=paths, dst=paths)
    def rename(self, src, dst):
        self.both(os.rename, src, dst)

    @rule(src=paths, dst=paths)
    def link(self, src, dst):
        self.both(os.link, src, dst)

    # targets stay inside the tree (both trees must resolve them alike)
    @rule(p=paths, tgt=st.sampled_from(["a", "b/c", "x" * 300, "y" * 4000]))
    def symlink(self, p, tgt):
        def symlink(path, tgt):
            os.symlink(tgt, path)
        self.both(symlink, p, raw=(tgt,))

    @rule(p=paths, mode=st.sampled_from([0o600, 0o644, 0o755, 0o4711, 0o1777]))
    def chmod(self, p, mode):
        self.both(os.chmod, p, raw=(mode,))

    @rule(p=paths, name=st.sampled_from(["user.a", "user.b"]),
          value=st.sampled_from([b"", b"v", b"w" * 500, b"z" * 2000]),
          flags=st.sampled_from([0, os.XATTR_CREATE, os.XATTR_REPLACE]))
    def setxattr(self, p, name, value, flags):
        if not self.xattrs:
            return

        def setxattr(path, name, value, flags):
            if os.path.islink(path):
                raise OSError(errno.EPERM, "no user xattrs on links")
            os.setxattr(path, name, value, flags)
        self.both(setxattr, p, raw=(name, value, flags))

    @rule(p=paths, name=st.sampled_from(["user.a", "user.b"]))
    def removexattr(self, p, name):
        if not self.xattrs:
            return

        def removexattr(path, name):
            if os.path.islink(path):
                raise OSError(errno.EPERM, "no user xattrs on links")
            os.removexattr(path, name)
        self.both(removexattr, p, raw=(name,))

    @rule(p=paths, append=st.booleans())
    def open_fd(self, p, append):
        if len(self.fds) >= 4:
            return
        flags = os.O_RDWR | (os.O_APPEND if append else 0)
        a = outcome(os.open, os.path.join(self.mnt, p), flags)
        b = outcome(os.open, os.path.join(self.ref, p), flags)
        note(f"open {p} append={append} -> {a[0]} / {b[0]}")
        if a[0] == "ok" and b[0] == "ok":
            self.fds.append((a[1], b[1]))
            return
        for r in (a, b):
            if r[0] == "ok":
                os.close(r[1])
        assert a == b if a[0] == "errno" else False, f"open {p}: {a} != {b}"

    @rule(i=st.integers(0, 3), off=st.sampled_from([0, 10, 4096, 7000]),
          data=st.binary(min_size=1, max_size=3000))
    def fd_write(self, i, off, data):
        if i >= len(self.fds):
            return
        a, b = self.fds[i]
        note(f"fd_write #{i} @{off} +{len(data)}")
        assert os.pwrite(a, data, off) == os.pwrite(b, data, off)

    @rule(i=st.integers(0, 3), off=st.sampled_from([0, 100, 4000, 9000]))
    def fd_read(self, i, off):
        if i >= len(self.fds):
            return
        a, b = self.fds[i]
        note(f"fd_read #{i} @{off}")
        assert os.pread(a, 20000, off) == os.pread(b, 20000, off)
        assert os.fstat(a).st_size == os.fstat(b).st_size
        assert os.fstat(a).st_nlink == os.fstat(b).st_nlink

    @rule(i=st.integers(0, 3))
    def close_fd(self, i):
        if i >= len(self.fds):
            return
        a, b = self.fds.pop(i)
        note(f"close #{i}")
        os.close(a)
        os.close(b)

    @invariant()
    def trees_agree(self):
        if not self.mnt:
            return
        ma = snapshot(self.mnt, self.xattrs)
        mb = snapshot(self.ref, self.xattrs)
        assert sorted(ma) == sorted(mb), f"names: mount {sorted(ma)} local {sorted(mb)}"
        for k in ma:
            assert ma[k] == mb[k], f"{k}: mount {ma[k]!r:.300} != local {mb[k]!r:.300}"


def _run_machine(wd, examples: int, steps: int) -> None:
    ref = tempfile.mkdtemp(prefix="cfs-ref-", dir="/var/tmp")
    try:
        FsMachine.mnt = wd
        FsMachine.ref = ref
        FsMachine.xattrs = _xattrs_supported(ref)
        run_state_machine_as_test(FsMachine, settings=settings(
            max_examples=examples, stateful_step_count=steps, deadline=None,
            suppress_health_check=list(HealthCheck)))
    finally:
        shutil.rmtree(ref, ignore_errors=True)
        FsMachine.mnt = FsMachine.ref = ""


def test_random_operations_match_a_local_directory(shared_mount, wd):
    _run_machine(wd, int(os.environ.get("CFS_STATEFUL_EXAMPLES", "60")), 40)


@pytest.mark.slow
def test_random_operations_match_a_local_directory_long(shared_mount, wd):
    _run_machine(wd, 1500, 80)
