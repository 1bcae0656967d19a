"""Helpers for the lock manager tests: an in-process cluster over in-memory streams
(safe under trio's autojump clock), trio runners, and subprocess helpers."""

import functools
import os
import socket
import subprocess
import sys
import time

import trio
import trio.testing

from lockmgr import LockClient, LockServer
from lockmgr.errors import ConnectError

KEY = b"test-key-0123456789abcdef-0123456"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def autojump(fn):
    """Run an async test function under trio with the autojump mock clock."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        clock = trio.testing.MockClock(autojump_threshold=0)
        return trio.run(functools.partial(fn, *args, **kwargs), clock=clock)
    return wrapper


def realtime(fn):
    """Run an async test function under trio with the real clock."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return trio.run(functools.partial(fn, *args, **kwargs))
    return wrapper


class MemCluster:
    """A lock server and clients in one trio run, connected by in-memory streams.

    ``kill_server`` / ``start_server`` simulate a server crash and restart;
    ``crash(client)`` simulates a node dying (no goodbye, no more heartbeats).
    """

    def __init__(self, nursery, key: bytes = KEY, **server_kw):
        self.nursery = nursery
        self.key = key
        self.server_kw = server_kw
        self.server: LockServer | None = None
        self._scope: trio.CancelScope | None = None
        self.refuse = False   # make connections fail (network down)

    async def start_server(self, **kw):
        opts = dict(self.server_kw)
        opts.update(kw)
        self.server = LockServer(self.key, **opts)
        await self.nursery.start(self._run_server, self.server)
        return self.server

    async def _run_server(self, server, task_status=trio.TASK_STATUS_IGNORED):
        with trio.CancelScope() as scope:
            self._scope = scope
            await server.run(task_status=task_status)

    def kill_server(self):
        self._scope.cancel()
        self.server = None

    async def connector(self):
        if self.server is None or self.refuse:
            raise ConnectError("lock server down")
        a, b = trio.testing.memory_stream_pair()
        self.server._nursery.start_soon(self.server.serve_stream, b)
        return a

    async def client(self, node: str, slot: int, *, key: bytes | None = None, **kw):
        kw.setdefault("nursery", self.nursery)
        return await LockClient.connect("memory", key or self.key, node, slot,
                                        connector=self.connector, **kw)

    async def raw(self):
        """A raw connected stream to the server (for protocol tests)."""
        return await self.connector()

    @staticmethod
    def crash(client: LockClient):
        """The node dies: its tasks stop without a goodbye."""
        client._closed = True
        client._main_scope.cancel()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def python_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def start_lockd(keyfile: str, port: int, *extra: str, unix: str | None = None,
                lease: float = 5.0, grace: float | None = None) -> subprocess.Popen:
    """Start ``clusterfs lockd`` and wait until it listens."""
    cmd = [sys.executable, "-m", "clusterfs.cli", "lockd", "--listen",
           f"127.0.0.1:{port}", "--key", keyfile, "--lease", str(lease), *extra]
    if grace is not None:
        cmd += ["--grace", str(grace)]
    if unix:
        cmd += ["--unix", unix]
    proc = subprocess.Popen(cmd, cwd=REPO, env=python_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"lockd died: {proc.stderr.read().decode()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("lockd did not start listening")


def stop(proc: subprocess.Popen, sig=None) -> None:
    """Stop a process we started, by its PID."""
    if proc.poll() is None:
        if sig is None:
            proc.terminate()
        else:
            proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
