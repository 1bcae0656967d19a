"""Hypothesis stateful test: the cluster behaves as ONE POSIX file system.

Every operation runs on a randomly chosen node (three mounts of one volume) and, side
by side, in a plain local directory: the one model.  Outcomes (result or errno) must
agree, and after every step the tree seen from one of the nodes (in turn) must equal
the model's.  The model knows one thing a local directory does not: cluster open
modes.  An open for writing of a file that another node has open for writing fails
with EBUSY on the cluster.

It runs twice: with default mount options, and with ``-o entrycache`` on every node
(the kernels keep directory entries, positive and negative, while their node holds
the directory's lock: docs/CLUSTER.md, "Coherence").

CFS_STATEFUL_EXAMPLES sets the number of examples (default 50).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile

import pytest
from hypothesis import HealthCheck, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, rule,
                                 run_state_machine_as_test)

from tests.cluster.cluster_util import running_cluster
from tests.fuse.posix_util import outcome, snapshot

NODES = ["a", "b", "c"]
NAMES = ["a", "b", "c"]
PATHS = NAMES + [f"{x}/{y}" for x in NAMES[:2] for y in NAMES] + ["a/a/b"]
paths = st.sampled_from(PATHS)
nodes = st.sampled_from(NODES)
sizes = st.sampled_from([0, 1, 100, 3457, 4096, 5000, 70000])


class ClusterMachine(RuleBasedStateMachine):
    tops: dict = {}        # node -> the test's directory on that node's mount
    ref: str = ""          # the model: a plain local directory

    def __init__(self):
        super().__init__()
        # open descriptors: (node, fd on the cluster, fd on the model, writable, model ino)
        self.fds: list[tuple[str, int, int, bool, int]] = []
        self.turn = 0

    def on(self, node: str, rel: str) -> str:
        return os.path.join(self.tops[node], rel)

    def write_busy(self, node: str, rel: str) -> bool:
        """Whether an open for writing of ``rel`` on ``node`` must fail with EBUSY:
        another node has that file open for writing."""
        try:
            ino = os.stat(os.path.join(self.ref, rel)).st_ino
        except OSError:
            return False
        return any(n != node and w and i == ino for n, _, _, w, i in self.fds)

    def both(self, node, fn, *rels, raw=(), opens_for_write: str | None = None):
        """Run ``fn`` on ``node`` and on the model; the outcomes must agree."""
        got = outcome(fn, *[self.on(node, r) for r in rels], *raw)
        if opens_for_write is not None and self.write_busy(node, opens_for_write):
            want = ("errno", "EBUSY")
        else:
            want = outcome(fn, *[os.path.join(self.ref, r) for r in rels], *raw)
        note(f"[{node}] {fn.__name__}{rels}{raw!r:.60} -> {got[0]}:"
             f"{got[1] if got[0] == 'errno' else ''}")
        assert got == want, f"[{node}] {fn.__name__}{rels}: cluster {got!r:.200} " \
                            f"!= model {want!r:.200}"
        return got

    @initialize()
    def clean(self):
        top = self.tops[NODES[0]]
        for t in (top, self.ref):
            for name in os.listdir(t):
                p = os.path.join(t, name)
                if os.path.isdir(p) and not os.path.islink(p):
                    shutil.rmtree(p)
                else:
                    os.unlink(p)

    def teardown(self):
        for _, a, b, _, _ in self.fds:
            os.close(a)
            os.close(b)
        self.fds.clear()

    # -- names ---------------------------------------------------------------------------

    @rule(node=nodes, p=paths, data=st.binary(max_size=32), size=sizes, excl=st.booleans())
    def create(self, node, p, data, size, excl):
        def create(path, data, size, excl):
            flags = os.O_CREAT | os.O_WRONLY | (os.O_EXCL if excl else os.O_TRUNC)
            fd = os.open(path, flags, 0o644)
            try:
                os.write(fd, (data * (size // max(1, len(data)) + 1))[:size] if data
                         else bytes(size))
            finally:
                os.close(fd)
        self.both(node, create, p, raw=(data, size, excl),
                  opens_for_write=None if excl else p)

    @rule(node=nodes, p=paths, mode=st.sampled_from([0o755, 0o700]))
    def mkdir(self, node, p, mode):
        self.both(node, os.mkdir, p, raw=(mode,))

    @rule(node=nodes, p=paths)
    def rmdir(self, node, p):
        self.both(node, os.rmdir, p)

    @rule(node=nodes, p=paths)
    def unlink(self, node, p):
        self.both(node, os.unlink, p)

    @rule(node=nodes, src=paths, dst=paths)
    def rename(self, node, src, dst):
        self.both(node, os.rename, src, dst)

    @rule(node=nodes, src=paths, dst=paths)
    def link(self, node, src, dst):
        self.both(node, os.link, src, dst)

    @rule(node=nodes, p=paths, tgt=st.sampled_from(["a", "../b", "x" * 300]))
    def symlink(self, node, p, tgt):
        def symlink(path, tgt):
            os.symlink(tgt, path)
        self.both(node, symlink, p, raw=(tgt,))

    # -- contents and attributes -------------------------------------------------------------

    @rule(node=nodes, p=paths, off=st.sampled_from([0, 1, 3456, 4096, 8191, 70000]),
          data=st.binary(min_size=1, max_size=16), n=st.sampled_from([1, 100, 5000]))
    def write_at(self, node, p, off, data, n):
        def write_at(path, off, payload):
            fd = os.open(path, os.O_WRONLY)
            try:
                return os.pwrite(fd, payload, off)
            finally:
                os.close(fd)
        self.both(node, write_at, p, raw=(off, (data * n)[:n]), opens_for_write=p)

    @rule(node=nodes, p=paths, off=st.sampled_from([0, 100, 4096, 69999]))
    def read_at(self, node, p, off):
        def read_at(path, off):
            with open(path, "rb") as f:
                f.seek(off)
                return f.read(9000)
        self.both(node, read_at, p, raw=(off,))

    @rule(node=nodes, p=paths, size=sizes)
    def truncate(self, node, p, size):
        self.both(node, os.truncate, p, raw=(size,))

    @rule(node=nodes, p=paths, mode=st.sampled_from([0o600, 0o644, 0o755, 0o1777]))
    def chmod(self, node, p, mode):
        self.both(node, os.chmod, p, raw=(mode,))

    @rule(node=nodes, p=paths)
    def lstat(self, node, p):
        def stat_(path):
            s = os.lstat(path)
            return [stat.S_IFMT(s.st_mode), stat.S_IMODE(s.st_mode), s.st_nlink,
                    s.st_size if not stat.S_ISDIR(s.st_mode) else 0]
        self.both(node, stat_, p)

    @rule(node=nodes, p=st.sampled_from(["."] + NAMES[:2] + ["a/a"]))
    def listdir(self, node, p):
        def listdir(path):
            return sorted(os.listdir(path))
        self.both(node, listdir, p)

    @rule(node=nodes, p=paths, name=st.sampled_from(["user.a", "user.b"]),
          value=st.sampled_from([b"", b"v", b"w" * 500, b"z" * 2000]),
          flags=st.sampled_from([0, os.XATTR_CREATE, os.XATTR_REPLACE]))
    def setxattr(self, node, p, name, value, flags):
        def setxattr(path, name, value, flags):
            if os.path.islink(path):
                raise OSError(errno.EPERM, "no user xattrs on links")
            os.setxattr(path, name, value, flags)
        self.both(node, setxattr, p, raw=(name, value, flags))

    @rule(node=nodes, p=paths, name=st.sampled_from(["user.a", "user.b"]))
    def removexattr(self, node, p, name):
        def removexattr(path, name):
            if os.path.islink(path):
                raise OSError(errno.EPERM, "no user xattrs on links")
            os.removexattr(path, name)
        self.both(node, removexattr, p, raw=(name,))

    # -- open descriptors --------------------------------------------------------------------

    @rule(node=nodes, p=paths, writable=st.booleans(), append=st.booleans())
    def open_fd(self, node, p, writable, append):
        if len(self.fds) >= 3:
            return
        flags = (os.O_RDWR | (os.O_APPEND if append else 0)) if writable else os.O_RDONLY
        ref = os.path.join(self.ref, p)
        got = outcome(os.open, self.on(node, p), flags)
        if writable and self.write_busy(node, p):
            want = ("errno", "EBUSY")
        else:
            want = outcome(os.open, ref, flags)
        note(f"[{node}] open {p} writable={writable} append={append} -> {got[0]}")
        if got[0] == "ok" and want[0] == "ok":
            ino = os.fstat(want[1]).st_ino
            self.fds.append((node, got[1], want[1], writable, ino))
            return
        for r in (got, want):
            if r[0] == "ok":
                os.close(r[1])
        assert got == want if got[0] == "errno" else False, f"open {p}: {got} != {want}"

    @rule(i=st.integers(0, 2), off=st.sampled_from([0, 10, 4096, 7000]),
          data=st.binary(min_size=1, max_size=3000))
    def fd_write(self, i, off, data):
        if i >= len(self.fds) or not self.fds[i][3]:
            return
        node, a, b, _, _ = self.fds[i]
        note(f"[{node}] fd_write #{i} @{off} +{len(data)}")
        assert outcome(os.pwrite, a, data, off) == outcome(os.pwrite, b, data, off)

    @rule(i=st.integers(0, 2), off=st.sampled_from([0, 100, 4000, 9000]))
    def fd_read(self, i, off):
        if i >= len(self.fds):
            return
        node, a, b, _, _ = self.fds[i]
        note(f"[{node}] fd_read #{i} @{off}")
        assert outcome(os.pread, a, 20000, off) == outcome(os.pread, b, 20000, off)
        sa, sb = os.fstat(a), os.fstat(b)
        if stat.S_ISREG(sb.st_mode):
            assert (sa.st_size, sa.st_nlink) == (sb.st_size, sb.st_nlink)
        else:
            assert stat.S_IFMT(sa.st_mode) == stat.S_IFMT(sb.st_mode)

    @rule(i=st.integers(0, 2))
    def close_fd(self, i):
        if i >= len(self.fds):
            return
        node, a, b, _, _ = self.fds.pop(i)
        note(f"[{node}] close #{i}")
        os.close(a)
        os.close(b)

    # -- the one file system ------------------------------------------------------------------

    @invariant()
    def trees_agree(self):
        if not self.ref:
            return
        node = NODES[self.turn % len(NODES)]
        self.turn += 1
        got = snapshot(self.tops[node])
        want = snapshot(self.ref)
        assert sorted(got) == sorted(want), \
            f"names on {node}: {sorted(got)} model {sorted(want)}"
        for k in got:
            assert got[k] == want[k], f"{k} on {node}: {got[k]!r:.300} != {want[k]!r:.300}"


@pytest.mark.parametrize("options", [(), ("-o", "entrycache")],
                         ids=["default", "entrycache"])
def test_cluster_is_one_posix_file_system(topdir, options):
    # the model sits one level down in a directory of its own, as the cluster's
    # test directory does on the mount: a symlink to "../b" then stays inside both
    sandbox = tempfile.mkdtemp(prefix="cfs-model-", dir="/var/tmp")
    ref = os.path.join(sandbox, "t")
    os.mkdir(ref)
    try:
        probe = os.path.join(ref, "probe")
        open(probe, "w").close()
        try:
            os.setxattr(probe, "user.p", b"1")
        except OSError:
            pytest.skip("the model's file system has no user xattrs")
        os.unlink(probe)
        with running_cluster(topdir, fast=False) as c:
            for n in NODES:
                c.mount(n, *options)
            os.mkdir(c.nodes["a"].p("t"))
            ClusterMachine.tops = {n: c.nodes[n].p("t") for n in NODES}
            ClusterMachine.ref = ref
            run_state_machine_as_test(ClusterMachine, settings=settings(
                max_examples=int(os.environ.get("CFS_STATEFUL_EXAMPLES", "50")),
                stateful_step_count=30, deadline=None,
                suppress_health_check=list(HealthCheck)))
            # every node sees the last example's tree
            final = snapshot(ref)
            for n in NODES:
                assert snapshot(c.nodes[n].p("t")) == final, f"node {n}"
    finally:
        shutil.rmtree(sandbox, ignore_errors=True)
        ClusterMachine.tops, ClusterMachine.ref = {}, ""
