"""A member's side of the lock manager: finding the master, hosting a candidate.

``MasterLocator`` is the lock client's connector: every connection attempt reads the
volume's lease block for the master's address, so after a failover the client's next
attempt reaches the new master (and reclaims there).  ``Candidate`` runs this node's
lock manager candidate (``clusterfs lockd VOLUME``, ``cluster/lockd.py``) as a child
process, restarts it if it dies while the volume is mounted, and takes it down with
the mount (the kernel kills it if the mount process dies: ``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys

import trio

from lockmgr import ConnectError
from lockmgr.wire import open_stream

from ..ondisk.lease import read_lease

log = logging.getLogger(__name__)

RESTART_DELAY = 1.0       # seconds before a candidate that died is started again,
RESTART_MAX = 30.0        # doubled while it keeps dying within RESTART_MAX of its start


class MasterLocator:
    """An async connector for ``LockClient``: a stream to the current master.

    Args:
        dev: a block device of the volume (read from a worker thread).
        sb: its superblock.
    """

    def __init__(self, dev, sb):
        self.dev = dev
        self.sb = sb
        self.last: str | None = None      # the address of the last attempt

    async def master(self):
        """The lease record as it is now (None: unreadable)."""
        return await trio.to_thread.run_sync(read_lease, self.dev, self.sb)

    async def __call__(self):
        rec = await self.master()
        if rec is None:
            raise ConnectError("the volume's lease block is unreadable")
        if rec.owner < 0 or not rec.addr:
            raise ConnectError("no lock manager master is elected yet")
        self.last = rec.addr
        return await open_stream(rec.addr)


def _die_with_parent() -> None:
    """In the child, before exec: the kernel sends SIGKILL when the parent dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)      # PR_SET_PDEATHSIG


class Candidate:
    """This node's lock manager candidate, a supervised child process.

    Args:
        volume: the volume.
        keyfile: the cluster's key file (the child reads it itself).
        node: this node's name.
        listen: ``HOST:PORT`` where it serves when elected.
        lease: the members' lease.

    The child logs to the mount's standard error (its log file).
    """

    def __init__(self, volume: str, keyfile: str, *, node: str, listen: str, lease: float):
        self.argv = [sys.executable, "-m", "clusterfs.cli", "lockd", volume,
                     "--key", keyfile, "--node", node, "--listen", listen,
                     "--lease", repr(lease)]
        self.proc: subprocess.Popen | None = None
        self.stopping = False

    def _spawn(self) -> None:
        # from the main thread: PR_SET_PDEATHSIG fires when the *thread* that forked
        # exits, and the event loop's thread lives as long as the mount
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                     preexec_fn=_die_with_parent, close_fds=True)
        log.info("lock manager candidate started (pid %d)", self.proc.pid)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Start the candidate and keep it running until ``stop``."""
        self._spawn()
        started = trio.current_time()
        task_status.started()
        delay = RESTART_DELAY
        while not self.stopping:
            await trio.sleep(0.2)
            if self.proc.poll() is not None and not self.stopping:
                # one that cannot start (its node lost the volume) is tried less
                # and less often, not every second for as long as the mount lasts
                if trio.current_time() - started >= RESTART_MAX:
                    delay = RESTART_DELAY
                log.error("lock manager candidate exited with %s; restarting it in "
                          "%.0f s", self.proc.returncode, delay)
                await trio.sleep(delay)
                delay = min(2 * delay, RESTART_MAX)
                if not self.stopping:
                    self._spawn()
                    started = trio.current_time()

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop the candidate (SIGTERM, then SIGKILL after ``timeout``)."""
        self.stopping = True
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(timeout):
            while proc.poll() is None:
                await trio.sleep(0.05)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            await trio.to_thread.run_sync(proc.wait)
