"""The handlers clusterfs adds to pyfuse3 (binding/), through a real FUSE mount of a
small recording file system (tests/fuse/binding_fs.py): the kernel's requests reach
them with the right arguments, their answers reach the caller, and a waiting lock
request ends when its caller is interrupted or killed."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import signal
import struct
import subprocess
import sys
import time

import pytest

from tests.helpers import in_mount_table

FLOCK = struct.Struct("hh4xqqi4x")      # struct flock on x86-64 Linux
F_OFD_GETLK, F_OFD_SETLK = 36, 37
FALLOC_FL_KEEP_SIZE = 1

libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def fallocate(fd: int, mode: int, off: int, length: int) -> None:
    if libc.fallocate(fd, mode, off, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def lock_arg(ltype, start, length, pid=0) -> bytes:
    return FLOCK.pack(ltype, os.SEEK_SET, start, length, pid)


@pytest.fixture(scope="module")
def fs(tmp_path_factory):
    """The recording file system mounted; yields (mount point, read_log())."""
    with _mounted(tmp_path_factory.mktemp("binding")) as got:
        yield got


@contextlib.contextmanager
def _mounted(d, *args):
    import pyfuse3
    if not hasattr(pyfuse3.Operations, "setlk"):
        pytest.fail("pyfuse3 lacks clusterfs's handlers: run `make deps` (binding/)")
    mnt, logpath = str(d / "mnt"), str(d / "calls.jsonl")
    os.mkdir(mnt)
    proc = subprocess.Popen([sys.executable, "-m", "tests.fuse.binding_fs", mnt, logpath,
                             *args], stderr=open(str(d / "stderr"), "wb"))
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt):
            assert proc.poll() is None, open(str(d / "stderr")).read()
            assert time.monotonic() < deadline, "mount did not appear"
            time.sleep(0.05)

        def calls():
            with open(logpath) as f:
                return [json.loads(line) for line in f]
        calls.pid = proc.pid
        yield mnt, calls
    finally:
        if in_mount_table(mnt):
            subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    err = open(str(d / "stderr")).read()
    assert "Traceback" not in err, err


def _since(calls, n):
    return calls()[n:]


def test_posix_locks_reach_the_handlers(fs):
    mnt, calls = fs
    n = len(calls())
    fd = os.open(os.path.join(mnt, "a"), os.O_RDWR)
    try:
        fcntl.fcntl(fd, fcntl.F_SETLK, lock_arg(fcntl.F_WRLCK, 0, 10))
        got = FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_GETLK, lock_arg(fcntl.F_RDLCK, 10, 5)))
        # the file system's answer (its own pid: the kernel maps pids it knows)
        assert got[0] == fcntl.F_WRLCK and got[2:] == (10, 5, calls.pid)
        with pytest.raises(BlockingIOError):
            fcntl.fcntl(fd, fcntl.F_SETLK, lock_arg(fcntl.F_RDLCK, 200, 0))
        free = FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_GETLK, lock_arg(fcntl.F_RDLCK, 50, 0)))
        assert free[0] == fcntl.F_UNLCK
    finally:
        os.close(fd)
    _wait_for_call(calls, n, "release")
    log = _since(calls, n)
    sets = [c for c in log if c["op"] == "setlk"]
    assert sets[0]["type"] == fcntl.F_WRLCK and (sets[0]["start"], sets[0]["len"]) == (0, 10)
    assert sets[0]["sleep"] is False and sets[0]["pid"] == os.getpid()
    assert (sets[1]["start"], sets[1]["len"]) == (200, 0)     # 0: to the end of the file
    getlk = [c for c in log if c["op"] == "getlk"][0]
    assert (getlk["type"], getlk["start"], getlk["len"]) == (fcntl.F_RDLCK, 10, 5)
    # close: flush carries the lock owner of the process (its POSIX locks go)
    flush = [c for c in log if c["op"] == "flush"]
    assert flush and flush[-1]["owner"] == sets[0]["owner"] != 0
    release = [c for c in log if c["op"] == "release"]
    assert release and release[-1]["owner"] is None          # no flock was taken


def test_ofd_lock_owner_is_the_open_file(fs):
    mnt, calls = fs
    n = len(calls())
    fd1 = os.open(os.path.join(mnt, "a"), os.O_RDWR)
    fd2 = os.open(os.path.join(mnt, "a"), os.O_RDWR)
    try:
        fcntl.fcntl(fd1, F_OFD_SETLK, lock_arg(fcntl.F_RDLCK, 0, 1))
        fcntl.fcntl(fd2, F_OFD_SETLK, lock_arg(fcntl.F_RDLCK, 0, 1))
        fcntl.fcntl(fd1, fcntl.F_SETLK, lock_arg(fcntl.F_RDLCK, 5, 1))
    finally:
        os.close(fd1)
        os.close(fd2)
    _wait_for_call(calls, n, "release", count=2)
    sets = [c for c in _since(calls, n) if c["op"] == "setlk"]
    ofd1, ofd2, posix = (c["owner"] for c in sets)
    assert len({ofd1, ofd2, posix}) == 3      # one owner per open file, one per process
    assert {sets[0]["fh"], sets[1]["fh"]} == {c["fh"] for c in _since(calls, n)
                                              if c["op"] == "release"}


def test_flock_owner_comes_back_at_release(fs):
    mnt, calls = fs
    n = len(calls())
    fd = os.open(os.path.join(mnt, "a"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    _wait_for_call(calls, n, "release")
    log = _since(calls, n)
    flocks = [c for c in log if c["op"] == "flock"]
    assert [c["flock_op"] for c in flocks] == [fcntl.LOCK_SH | fcntl.LOCK_NB, fcntl.LOCK_UN]
    release = [c for c in log if c["op"] == "release"][-1]
    assert release["owner"] == flocks[0]["owner"] != 0


WAITER = """
import fcntl, os, signal, struct, sys
class Interrupted(Exception): pass
def on_signal(*a): raise Interrupted()
signal.signal(signal.SIGUSR1, on_signal)
fd = os.open(sys.argv[1], os.O_RDWR)
print("waiting", flush=True)
try:
    if sys.argv[2] == "setlkw":
        fcntl.fcntl(fd, fcntl.F_SETLKW, struct.pack("hh4xqqi4x", fcntl.F_WRLCK, 0, 100, 1, 0))
    else:
        fcntl.flock(fd, fcntl.LOCK_EX)
except Interrupted:
    sys.exit(7)
sys.exit(0)
"""


def _start_waiter(path, what):
    p = subprocess.Popen([sys.executable, "-c", WAITER, path, what], stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "waiting"
    return p


def _wait_for_call(calls, n, op, timeout=10.0, count=1):
    """Wait until ``count`` requests ``op`` were logged since call ``n`` (a release
    reaches the file system after close() returned)."""
    deadline = time.monotonic() + timeout
    while sum(c["op"] == op for c in _since(calls, n)) < count:
        assert time.monotonic() < deadline, f"no {op} request reached the file system"
        time.sleep(0.02)


@pytest.mark.parametrize("what", ["setlkw", "flock"])
def test_a_waiting_lock_ends_with_a_signal(fs, what):
    mnt, calls = fs
    n = len(calls())
    p = _start_waiter(os.path.join(mnt, "a"), what)
    try:
        _wait_for_call(calls, n, "setlk" if what == "setlkw" else "flock")
        time.sleep(0.2)
        assert p.poll() is None                  # still waiting for the lock
        p.send_signal(signal.SIGUSR1)
        assert p.wait(timeout=10) == 7           # the handler ran: EINTR came back
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert {"op": "interrupted", "what": {"setlkw": "setlk", "flock": "flock"}[what]} in \
        _since(calls, n)


def test_a_waiting_lock_ends_when_its_process_is_killed(fs):
    mnt, calls = fs
    n = len(calls())
    p = _start_waiter(os.path.join(mnt, "a"), "setlkw")
    try:
        _wait_for_call(calls, n, "setlk")
        p.kill()
        p.wait(timeout=10)       # without the interrupt the process stays in D state
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert {"op": "interrupted", "what": "setlk"} in _since(calls, n)


def test_fallocate_lseek_copy_file_range(fs):
    mnt, calls = fs
    n = len(calls())
    fa = os.open(os.path.join(mnt, "a"), os.O_RDWR)
    fb = os.open(os.path.join(mnt, "b"), os.O_RDWR)
    try:
        os.ftruncate(fa, 0)
        fallocate(fa, 0, 0, 8192)
        assert os.fstat(fa).st_size == 8192
        fallocate(fa, FALLOC_FL_KEEP_SIZE, 8192, 4096)
        os.pwrite(fa, b"0123456789", 100)
        assert os.lseek(fa, 5, os.SEEK_DATA) == 1005
        assert os.lseek(fa, 5, os.SEEK_HOLE) == 8192
        copied = os.copy_file_range(fa, fb, 10, 100, 50)
        assert copied == 10
        assert os.pread(fb, 10, 50) == b"0123456789"
    finally:
        os.close(fa)
        os.close(fb)
    log = _since(calls, n)
    falloc = [(c["mode"], c["off"], c["len"]) for c in log if c["op"] == "fallocate"]
    assert falloc == [(0, 0, 8192), (FALLOC_FL_KEEP_SIZE, 8192, 4096)]
    seeks = [(c["off"], c["whence"]) for c in log if c["op"] == "lseek"]
    assert seeks == [(5, os.SEEK_DATA), (5, os.SEEK_HOLE)]
    copy = [c for c in log if c["op"] == "copy"][0]
    assert (copy["off_in"], copy["off_out"], copy["len"], copy["flags"]) == (100, 50, 10, 0)
    assert copy["ino_in"] != copy["ino_out"]


@pytest.mark.parametrize("killpriv", [True, False])
def test_killpriv_v2_spares_a_request_per_write(tmp_path, killpriv):
    """With handle_killpriv_v2 the INIT reply grants FUSE_HANDLE_KILLPRIV_V2 (which
    libfuse 3.14 does not know): the kernel asks for security.capability before the
    first write through the page cache only, not before each one."""
    with _mounted(tmp_path, *([] if killpriv else ["--no-killpriv"])) as (mnt, calls):
        fd = os.open(os.path.join(mnt, "c"), os.O_RDWR)
        try:
            for i in range(5):
                os.pwrite(fd, b"x" * 4096, i * 4096)
        finally:
            os.close(fd)
        asked = [c for c in calls() if c["op"] == "getxattr"]
    assert all(c["name"] == "security.capability" for c in asked), asked
    assert len(asked) == (1 if killpriv else 5), asked
