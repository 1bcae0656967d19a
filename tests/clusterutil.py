"""A lock manager and cluster mounts for tests and benchmarks.

``LockManager`` runs ``clusterfs lockd`` on a free loopback port with a fresh key;
``local_cluster`` makes a volume, starts a lock manager and mounts the volume as
several nodes, and always unmounts and stops everything on exit.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from typing import Iterator

from tests.helpers import PY, Mount, fsck_clean, mkfs, run_cli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LockManager:
    """A ``clusterfs lockd`` process on 127.0.0.1 (started by ``start``, stopped by PID)."""

    def __init__(self, workdir: str, *, lease: float | None = None,
                 grace: float | None = 1.0, port: int | None = None):
        self.workdir = workdir
        self.key = os.path.join(workdir, "cluster.key")
        self.port = port or free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.lease = lease
        self.grace = grace
        self.proc: subprocess.Popen | None = None
        self.log = os.path.join(workdir, "lockd.log")

    def start(self) -> "LockManager":
        if not os.path.exists(self.key):
            run_cli("keygen", self.key)
        argv = [PY, "-m", "clusterfs.cli", "lockd", "--listen", self.addr, "--key", self.key]
        if self.lease is not None:
            argv += ["--lease", str(self.lease)]
        if self.grace is not None:
            argv += ["--grace", str(self.grace)]
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("lockd did not start:\n" + open(self.log).read())
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def mount_args(self, node: str) -> tuple[str, ...]:
        return ("--lockd", self.addr, "--key", self.key, "--node", node)


@contextlib.contextmanager
def local_cluster(workdir: str, nodes: int = 2, *, size: str = "1G", lease: float | None = None,
                  mount_args: tuple[str, ...] = (), check: bool = True
                  ) -> Iterator[tuple[str, LockManager, list[Mount]]]:
    """(volume, lock manager, mounts) of a fresh volume mounted as ``nodes`` nodes.

    On exit every node is unmounted, the lock manager stopped, and (``check``) the
    volume must pass ``clusterfs fsck -fn``.
    """
    os.makedirs(workdir, exist_ok=True)
    volume = os.path.join(workdir, "volume.img")
    mkfs(volume, size, "--slots", str(max(4, nodes)))
    lockd = LockManager(workdir, lease=lease).start()
    mounts: list[Mount] = []
    try:
        for i in range(nodes):
            name = f"node{i + 1}"
            m = Mount(volume, os.path.join(workdir, name), *lockd.mount_args(name),
                      *mount_args)
            mounts.append(m)
            m.start()
        yield volume, lockd, mounts
    finally:
        errors = []
        for m in mounts:
            try:
                m.stop()
            except AssertionError as e:
                errors.append(str(e))
        lockd.stop()
    if errors:
        raise AssertionError("\n".join(errors))
    if check:
        fsck_clean(volume)
