"""A device whose every flush takes 200 ms: the node that hosts the lock manager's
master writes 1 GiB with an fsync every 64 MiB and keeps its lease and its master
role, while another node goes on working.

The slow device is the real image file with ``fsync``/``fdatasync`` delayed by a
small ``LD_PRELOAD`` library compiled here (the node's mount and its lock manager
candidate run with it).  The checks read state: the lease block's generation and
owner, the master's own view of the members, what each mount answers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.cluster.cluster_util import running_cluster

SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <time.h>

static void slow_down(void)
{
    const char *s = getenv("CFS_FLUSH_DELAY_MS");
    long ms = s ? atol(s) : 200;
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    nanosleep(&ts, NULL);
}

int fdatasync(int fd)
{
    static int (*real)(int);
    if (!real)
        real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    slow_down();
    return real(fd);
}

int fsync(int fd)
{
    static int (*real)(int);
    if (!real)
        real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    slow_down();
    return real(fd);
}
"""

DELAY_MS = 200
CHUNK = 1 << 20
TOTAL = 1 << 30
FSYNC_EVERY = 64 << 20


@pytest.fixture
def slow_flush(tmp_path):
    """The environment of a process whose flushes each take ``DELAY_MS``."""
    if not shutil.which("gcc"):
        pytest.skip("needs gcc to build the flush-delay library")
    src = tmp_path / "slowflush.c"
    src.write_text(SHIM)
    lib = tmp_path / "slowflush.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(lib), str(src), "-ldl"],
                   check=True, capture_output=True)
    env = dict(os.environ, LD_PRELOAD=str(lib), CFS_FLUSH_DELAY_MS=str(DELAY_MS))
    # the library works: a flush of this interpreter under it takes the delay
    probe = subprocess.run(
        [sys.executable, "-c",
         "import os, sys, time\n"
         "fd = os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY, 0o600)\n"
         "os.write(fd, b'x')\n"
         "t = time.monotonic()\n"
         "os.fdatasync(fd)\n"
         "print(time.monotonic() - t)", str(tmp_path / "probe")],
        env=env, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    assert float(probe.stdout) >= DELAY_MS / 1000 * 0.9, probe.stdout
    return env


def test_master_keeps_its_lease_and_role_behind_slow_flushes(topdir, slow_flush):
    with running_cluster(topdir, size="2G") as c:
        a = c.mount("a", env=slow_flush)
        assert c.master_node() == "a"
        before = c.master()
        b = c.mount("b")
        os.mkdir(b.p("b-files"))
        data = os.urandom(CHUNK)
        fd = os.open(a.p("big"), os.O_CREAT | os.O_WRONLY, 0o644)
        made = 0
        try:
            written = 0
            while written < TOTAL:
                os.write(fd, data)
                written += CHUNK
                if written % FSYNC_EVERY == 0:
                    t = time.monotonic()
                    os.fsync(fd)
                    assert time.monotonic() - t >= DELAY_MS / 1000   # it is slow
                    # meanwhile the other node works through the same master
                    with open(b.p("b-files", f"f{made}"), "wb") as f:
                        f.write(b"x" * 4096)
                    made += 1
        finally:
            os.close(fd)
        # a kept its lease (its writes never failed) and its master role (the lease
        # was never taken over), and nobody was declared dead
        now = c.master()
        assert (now.owner, now.generation, now.node) == \
            (before.owner, before.generation, "a"), now
        assert now.counter > before.counter
        st = c.view()
        assert sorted(n["node"] for n in st["nodes"]) == ["a", "b"], st
        assert st["recovering"] == [] and not st["frozen"], st
        assert os.stat(b.p("big")).st_size == TOTAL
        assert len(os.listdir(a.p("b-files"))) == made == TOTAL // FSYNC_EVERY
        with open(b.p("big"), "rb") as f:
            f.seek(TOTAL - CHUNK)
            assert f.read() == data
