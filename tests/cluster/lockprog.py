"""A lock program run side by side on ext4 and on clusterfs (one node, two nodes).

Actors are processes, each working in its own directory (two actors given the same
directory share a machine; on two cluster nodes each has its node's mount of the same
volume).  The controller sends each actor one command at a time as a JSON line and
reads the answer; a command still unanswered after ``BLOCKED_S`` is reported as
``blocked`` and its answer read later.  Answers name lock holders by actor, not by
pid, so that the transcripts of the same scenario on different file systems compare
equal.

    python -m tests.cluster.lockprog actor DIR     # one actor (the controller starts it)
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import select
import struct
import subprocess
import sys

FLOCK = struct.Struct("hh4xqqi4x")      # struct flock on x86-64 Linux
F_OFD_GETLK, F_OFD_SETLK, F_OFD_SETLKW = 36, 37, 38
BLOCKED_S = 0.6
TYPES = {"r": fcntl.F_RDLCK, "w": fcntl.F_WRLCK, "u": fcntl.F_UNLCK}
TYPE_NAMES = {v: k for k, v in TYPES.items()}


# ---- the actor --------------------------------------------------------------------

def _actor(directory: str) -> None:
    fds: dict[str, int] = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            out = _do(directory, fds, cmd)
        except OSError as e:
            out = errno.errorcode.get(e.errno, str(e.errno))
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


def _do(directory, fds, cmd):
    op = cmd["op"]
    if op == "pid":
        return os.getpid()
    if op == "open":
        fds[cmd["fd"]] = os.open(os.path.join(directory, cmd["file"]),
                                 os.O_RDWR | os.O_CREAT, 0o666)
        return "ok"
    if op == "close":
        os.close(fds.pop(cmd["fd"]))
        return "ok"
    fd = fds[cmd["fd"]]
    if op in ("setlk", "setlkw", "getlk", "ofd_setlk", "ofd_setlkw", "ofd_getlk"):
        which = {"setlk": fcntl.F_SETLK, "setlkw": fcntl.F_SETLKW, "getlk": fcntl.F_GETLK,
                 "ofd_setlk": F_OFD_SETLK, "ofd_setlkw": F_OFD_SETLKW,
                 "ofd_getlk": F_OFD_GETLK}[op]
        arg = FLOCK.pack(TYPES[cmd["type"]], os.SEEK_SET, cmd["start"], cmd["len"], 0)
        got = fcntl.fcntl(fd, which, arg)
        if op.endswith("getlk"):
            t, _, start, length, pid = FLOCK.unpack(got)
            if t == fcntl.F_UNLCK:
                return "unlocked"
            return [TYPE_NAMES[t], start, length, pid]
        return "ok"
    if op == "flock":
        flags = {"sh": fcntl.LOCK_SH, "ex": fcntl.LOCK_EX, "un": fcntl.LOCK_UN}[cmd["how"]]
        if cmd.get("nb"):
            flags |= fcntl.LOCK_NB
        fcntl.flock(fd, flags)
        return "ok"
    raise ValueError(f"unknown op {op}")


# ---- the controller ----------------------------------------------------------------

class Actor:
    """One actor process working in ``directory``."""

    def __init__(self, name: str, directory: str):
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.cluster.lockprog", "actor", directory],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                os.path.abspath(__file__)))))
        self.waiting = False
        self.pid = self.call("pid")

    def send(self, op: str, **kw) -> None:
        assert not self.waiting, f"{self.name} still waits for an answer"
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        self.waiting = True

    def answer(self, timeout: float | None):
        """The answer of the last command, or ``"blocked"`` after ``timeout``."""
        if timeout is not None:
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            if not ready:
                return "blocked"
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"actor {self.name} died")
        self.waiting = False
        return json.loads(line)

    def call(self, op: str, timeout: float | None = 30.0, **kw):
        self.send(op, **kw)
        out = self.answer(timeout)
        if out == "blocked" and op not in ("setlkw", "ofd_setlkw", "flock"):
            raise AssertionError(f"{self.name}: {op} {kw} did not return")
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Run:
    """A scenario's actors and transcript."""

    def __init__(self, dirs: dict[str, str]):
        self.actors = {name: Actor(name, d) for name, d in dirs.items()}
        self.lines: list[str] = []

    def pids(self) -> dict[int, str]:
        return {a.pid: a.name for a in self.actors.values()}

    def _name(self, out):
        if isinstance(out, list):      # a getlk answer: its pid as the actor's name
            return out[:3] + [self.pids().get(out[3], f"pid{out[3]}")]
        return out

    def do(self, actor: str, op: str, wait: float | None = None, **kw):
        """Run ``op`` on ``actor``; a waiting lock counts as ``blocked`` after
        ``BLOCKED_S`` (or after ``wait`` seconds: a lock that must be granted, once a
        release the kernel sends after close() reached the file system)."""
        a = self.actors[actor]
        blocking = op.endswith("w") or (op == "flock" and not kw.get("nb"))
        out = self._name(a.call(op, timeout=wait or (BLOCKED_S if blocking else 30.0),
                                **kw))
        self.lines.append(f"{actor} {op} {json.dumps(kw, sort_keys=True)} -> {out}")
        return out

    def later(self, actor: str):
        """The answer of ``actor``'s blocked command (waits for it)."""
        out = self._name(self.actors[actor].answer(30.0))
        self.lines.append(f"{actor} ... -> {out}")
        return out

    def kill(self, actor: str) -> None:
        self.actors[actor].kill()
        self.lines.append(f"{actor} killed")

    def close(self) -> None:
        for a in self.actors.values():
            a.stop()


def scenario(r: Run) -> None:
    """Conflicts, upgrades, splits and merges, F_GETLK naming the holder, blocking
    waits, EDEADLK, release at close and at process death, OFD and flock locks.
    Actors ``a`` and ``b`` (and ``c``, which only dies)."""
    for actor in ("a", "b", "c"):
        r.do(actor, "open", fd="f", file="data")
    # conflicts and compatibility
    r.do("a", "setlk", fd="f", type="r", start=0, len=100)
    r.do("b", "setlk", fd="f", type="r", start=50, len=100)
    r.do("b", "setlk", fd="f", type="w", start=50, len=10)          # EAGAIN
    r.do("b", "getlk", fd="f", type="w", start=0, len=0)             # a's read lock
    # upgrade of a's own lock, then a split of it by a partial unlock
    r.do("b", "setlk", fd="f", type="u", start=0, len=0)
    r.do("a", "setlk", fd="f", type="w", start=20, len=10)            # upgrade inside
    r.do("b", "getlk", fd="f", type="r", start=0, len=0)              # the write lock
    r.do("b", "getlk", fd="f", type="w", start=0, len=20)             # the read head
    r.do("a", "setlk", fd="f", type="u", start=40, len=20)            # a hole
    r.do("b", "setlk", fd="f", type="w", start=40, len=20)            # fits the hole
    r.do("b", "getlk", fd="f", type="w", start=60, len=0)             # a's tail [60,99]
    r.do("b", "setlk", fd="f", type="u", start=40, len=20)
    # merge: adjacent read locks of a become one (b's write over the seam conflicts)
    r.do("a", "setlk", fd="f", type="r", start=20, len=20)            # write -> read
    r.do("b", "getlk", fd="f", type="w", start=35, len=10)
    # a blocking wait across nodes, woken by the unlock
    r.do("b", "setlkw", fd="f", type="w", start=0, len=10)            # blocked
    r.do("a", "setlk", fd="f", type="u", start=0, len=0)
    r.later("b")
    r.do("a", "getlk", fd="f", type="r", start=0, len=0)              # b's write lock
    # EDEADLK: b holds [0,9], a holds [200,209]; a waits for b, then b asks for a's
    r.do("a", "setlk", fd="f", type="w", start=200, len=10)
    r.do("a", "setlkw", fd="f", type="w", start=5, len=1)             # blocked
    r.do("b", "setlkw", fd="f", type="w", start=200, len=10)          # EDEADLK
    r.do("b", "setlk", fd="f", type="u", start=0, len=0)
    r.later("a")
    # release at close: another descriptor of the same file closed by a
    r.do("a", "open", fd="g", file="data")
    r.do("a", "close", fd="g")
    r.do("b", "getlk", fd="f", type="w", start=0, len=0)              # nothing left
    # release at process death: c locks and dies while b waits for it
    r.do("c", "setlk", fd="f", type="w", start=1000, len=1)
    r.do("b", "setlkw", fd="f", type="w", start=1000, len=1)          # blocked
    r.kill("c")
    r.later("b")
    r.do("b", "setlk", fd="f", type="u", start=0, len=0)
    # OFD locks: owned by the open file, conflict with the process's own fcntl lock
    r.do("a", "open", fd="o1", file="data")
    r.do("a", "open", fd="o2", file="data")
    r.do("a", "ofd_setlk", fd="o1", type="w", start=0, len=10)
    r.do("a", "ofd_setlk", fd="o2", type="w", start=5, len=10)        # EAGAIN
    r.do("a", "setlk", fd="f", type="r", start=0, len=1)              # EAGAIN
    r.do("b", "ofd_setlk", fd="f", type="r", start=0, len=1)          # EAGAIN
    r.do("a", "close", fd="o1")                                       # OFD lock goes
    # (a FUSE file system hears of the last close of an open file after close()
    # returned: the next lock waits for that release rather than racing it)
    r.do("b", "ofd_setlkw", fd="f", type="r", start=0, len=1, wait=30.0)
    r.do("b", "ofd_setlk", fd="f", type="u", start=0, len=1)
    r.do("a", "close", fd="o2")
    # flock: independent of fcntl locks; shared, exclusive, conversion, wait
    r.do("a", "setlk", fd="f", type="w", start=0, len=0)
    r.do("b", "flock", fd="f", how="ex", nb=True)                     # not in fcntl's way
    r.do("a", "flock", fd="f", how="sh", nb=True)                     # EWOULDBLOCK
    r.do("b", "flock", fd="f", how="sh", nb=True)                     # convert down
    r.do("a", "flock", fd="f", how="sh", nb=True)
    r.do("b", "flock", fd="f", how="ex")                              # blocked by a
    r.do("a", "flock", fd="f", how="un")
    r.later("b")
    r.do("a", "setlk", fd="f", type="u", start=0, len=0)
    r.do("b", "close", fd="f")                                        # flock goes
    r.do("a", "flock", fd="f", how="ex", wait=30.0)
    r.do("a", "close", fd="f")


def run_scenario(dirs: dict[str, str]) -> list[str]:
    r = Run(dirs)
    try:
        scenario(r)
    except Exception as e:
        raise AssertionError("lock program failed after:\n" + "\n".join(r.lines)) from e
    finally:
        r.close()
    return r.lines


if __name__ == "__main__":
    if sys.argv[1] == "actor":
        _actor(sys.argv[2])
    else:
        raise SystemExit("usage: python -m tests.cluster.lockprog actor DIR")
