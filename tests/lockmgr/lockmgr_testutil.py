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


class Worker:
    """A ``lock_worker.py`` process: send commands, read answers and events."""

    def __init__(self, addr: str, keyfile: str, node: str, slot: int, lease: float = 5.0):
        import queue
        import threading
        self.node = node
        import tempfile
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(os.path.dirname(__file__), "lock_worker.py"),
             addr, keyfile, node, str(slot), str(lease)],
            cwd=REPO, env=python_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.log)
        self.lines: "queue.Queue" = queue.Queue()
        self.results: dict = {}
        self.events: list = []
        self._id = 0
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        self.wait_event("ready", timeout=30)

    def _read(self):
        import json
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def _pump(self, timeout: float) -> bool:
        import queue
        try:
            msg = self.lines.get(timeout=timeout)
        except queue.Empty:
            return False
        if msg is None:
            raise RuntimeError(f"worker {self.node} exited: {self.stderr()[-2000:]}")
        if "event" in msg:
            self.events.append(msg)
        else:
            self.results[msg["id"]] = msg
        return True

    def stderr(self) -> str:
        """What the worker logged so far."""
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def send(self, op: str, **kw) -> int:
        import json
        self._id += 1
        kw.update(id=self._id, op=op)
        self.proc.stdin.write((json.dumps(kw) + "\n").encode())
        self.proc.stdin.flush()
        return self._id

    def result(self, cid: int, timeout: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout
        while cid not in self.results:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"worker {self.node}: no answer to command {cid}")
            self._pump(left)
        return self.results.pop(cid)

    def done(self, cid: int) -> bool:
        while self._pump(0):
            pass
        return cid in self.results

    def call(self, op: str, wait: float = 20.0, **kw):
        r = self.result(self.send(op, **kw), wait)
        if "error" in r:
            raise WorkerError(r["error"], r.get("msg"))
        return r["ok"]

    def wait_event(self, kind: str, timeout: float = 20.0, **match) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for e in self.events:
                if e["event"] == kind and all(e.get(k) == v for k, v in match.items()):
                    self.events.remove(e)
                    return e
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"worker {self.node}: no {kind} event")
            self._pump(left)

    def kill(self):
        import signal
        stop(self.proc, signal.SIGKILL)

    def close(self):
        if self.proc.poll() is None:
            try:
                self.send("exit")
                self.proc.wait(10)
            except Exception:
                pass
        stop(self.proc)


class WorkerError(Exception):
    def __init__(self, name, msg):
        super().__init__(f"{name}: {msg}")
        self.name = name
