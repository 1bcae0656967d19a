"""Helpers for the lock manager tests: an in-process cluster over in-memory streams
(safe under trio's autojump clock), trio runners, and a lock server process
(``lock_server``) with client processes (``lock_worker``) and its view of the locks."""

import functools
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import asynccontextmanager

import trio
import trio.testing

from lockmgr import LockClient, LockServer, load_key, query_status
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
        self.nodes: list[LockClient] = []   # the clients mem_cluster made

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


@asynccontextmanager
async def mem_cluster(*nodes: str, slots=None, first_grace: float | None = None,
                      **server_kw):
    """A running ``MemCluster`` with one client per name in ``nodes`` (``c.nodes``).

    Args:
        slots: the clients' slots (default 0, 1, ...).
        first_grace: the grace period of the first server (the later ones, after
            ``kill_server``, get ``server_kw``'s).
        server_kw: ``LockServer`` arguments.

    Yields the cluster (``c.server``: the server); everything stops at the end.
    """
    async with trio.open_nursery() as n:
        c = MemCluster(n, **server_kw)
        if first_grace is None:
            await c.start_server()
        else:
            await c.start_server(grace=first_grace)
        c.nodes = [await c.client(node, slot)
                   for node, slot in zip(nodes, slots or range(len(nodes)))]
        yield c
        n.cancel_scope.cancel()


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
    """Start a plain lock server process (``lock_server.py``) and wait until it
    listens."""
    cmd = [sys.executable, "-m", "tests.lockmgr.lock_server", keyfile,
           f"127.0.0.1:{port}", "--lease", str(lease), *extra]
    if grace is not None:
        cmd += ["--grace", str(grace)]
    if unix:
        cmd += ["--unix", unix]
    proc = subprocess.Popen(cmd, cwd=REPO, env=python_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"lock server died: {proc.stderr.read().decode()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("lock server did not start listening")


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
        self.node = node
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.lockmgr.lock_worker", addr, keyfile, node,
             str(slot), str(lease)],
            cwd=REPO, env=python_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.log)
        self.lines: queue.Queue = queue.Queue()
        self.results: dict = {}
        self.events: list = []
        self._id = 0
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        self.wait_event("ready", timeout=30)

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def _pump(self, timeout: float) -> bool:
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


class Lockd:
    """A lock server process, its workers, and the lock manager's view.

    Args:
        keyfile: the key file.
        extra: more ``lockd`` arguments.
        lease, grace: the server's lease and grace period; workers get the same lease.
    """

    def __init__(self, keyfile: str, *extra: str, lease: float = 2.0, grace: float = 0):
        self.keyfile = keyfile
        self.key = load_key(keyfile)
        self.extra = extra
        self.lease = lease
        self.grace = grace
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.workers: list[Worker] = []
        self.proc = self._start()

    def _start(self) -> subprocess.Popen:
        return start_lockd(self.keyfile, self.port, *self.extra, lease=self.lease,
                           grace=self.grace)

    def __call__(self, node: str, slot: int) -> Worker:
        """A new worker process with a session of its own."""
        w = Worker(self.addr, self.keyfile, node, slot, lease=self.lease)
        self.workers.append(w)
        return w

    def restart(self, pause: float = 0.3) -> None:
        """Kill the server (SIGKILL: no state survives) and start a new one."""
        stop(self.proc, signal.SIGKILL)
        time.sleep(pause)
        self.proc = self._start()

    def view(self, prefix: bytes = b"") -> dict:
        """The lock manager's status, with the granted locks whose names start with
        ``prefix`` (``held``)."""
        return trio.run(functools.partial(query_status, self.addr, self.key,
                                          prefix=prefix))

    def wait_for(self, what: str, pred, timeout: float = 20.0) -> dict:
        """Poll ``view()`` until ``pred(view)`` holds; returns that view.

        Raises:
            AssertionError: not within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            v = self.view()
            if pred(v):
                return v
            if time.monotonic() > deadline:
                raise AssertionError(f"the lock manager never showed {what}: {v}")
            time.sleep(0.02)

    def close(self) -> None:
        for w in self.workers:
            w.close()
        stop(self.proc)


def holders(view: dict) -> set[tuple]:
    """Who holds what in a ``Lockd.view``: {(name, node, mode, holder dead)}."""
    return {(h["name"].decode(), h["node"], h["mode"], h["dead"]) for h in view["held"]}


def waiting(view: dict) -> dict[str, int]:
    """The requests each live node has waiting, in a ``Lockd.view``."""
    return {n["node"]: n["waiting"] for n in view["nodes"]}
