"""The control channel of a mount process: how ``clusterfs freeze``, ``thaw``,
``snapshot`` and the online check reach a mounted member.

Each mount process that offers volume administration listens on a Unix socket
``RUN_DIR/<pid>.sock`` (mode 0600) and describes itself in ``RUN_DIR/<pid>.json``
(volume, mount point, node, slot); both go when it unmounts.  ``RUN_DIR`` is
``/run/clusterfs`` unless ``CLUSTERFS_RUN_DIR`` names another directory.

A command finds the mount by its mount point or its volume (``find``), sends one
request, a JSON object on one line, and reads one answer line: ``{"ok": true, ...}``
or ``{"ok": false, "errno": N, "error": "..."}``.  Requests:

- ``{"op": "status"}``: the node, its slot, whether the volume is frozen (and, on a
  cluster member, ``pages``: the counts of its page cache).
- ``{"op": "freeze", "timeout": S, "wait": S, "hold": BOOL}``: freeze the volume
  cluster-wide (``cluster.admin``); it thaws after ``timeout`` seconds at the
  latest.  With ``hold`` the freeze also ends when the connection closes (or a
  ``{"op": "thaw"}`` line arrives on it): a snapshot that dies does not leave the
  volume frozen.
- ``{"op": "thaw"}``: end this node's freeze.
- ``{"op": "grow", "total_blocks": N}``: grow the volume into its device (made
  bigger first) while every node is frozen (``cluster.admin``).
- ``{"op": "add_slots", "count": N, "journal_blocks": J}``: add N node slots (their
  journals J blocks long; null: the default), likewise.

A malformed request gets an error answer and the connection is closed; the mount
goes on.
"""

from __future__ import annotations

import errno as errnos
import json
import logging
import os
import socket

from .errors import ClusterfsError, UsageError

log = logging.getLogger(__name__)

MAX_LINE = 64 * 1024
FREEZE_TIMEOUT = 120.0    # seconds a freeze lasts at most unless the request says
FREEZE_WAIT = 60.0        # seconds to wait for the other members to freeze


def run_directory() -> str:
    return os.environ.get("CLUSTERFS_RUN_DIR", "/run/clusterfs")


class ControlError(ClusterfsError):
    """A request the mount process refused (its errno and message)."""

    def __init__(self, err: int, message: str):
        super().__init__(message)
        self.errno = err


# -- the server side (in the mount process, under trio) ---------------------------------

async def serve(node, *, task_status=None) -> None:
    """Serve control requests for ``node`` (a mounted member with ``admin``) until
    cancelled; ``task_status.started(socket path)`` once listening."""
    import trio
    run_dir = run_directory()
    try:
        os.makedirs(run_dir, mode=0o700, exist_ok=True)
    except OSError as e:
        # (a mount by a user who may not write there): the mount goes on without
        # freeze, snapshot and online grow
        log.warning("no control channel (cannot make %s: %s): freeze, snapshot and "
                    "online grow are not available through this mount", run_dir,
                    e.strerror)
        if task_status is not None:
            task_status.started(None)
        return
    pid = os.getpid()
    path = os.path.join(run_dir, f"{pid}.sock")
    info_path = os.path.join(run_dir, f"{pid}.json")
    for stale in (path, info_path):
        try:
            os.unlink(stale)
        except FileNotFoundError:
            pass
    mounts()          # (removes what killed mount processes left behind)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(16)
        info = {"pid": pid, "socket": path, "volume": os.path.realpath(node.path),
                "mountpoint": getattr(node, "mountpoint", None), "node": node.node,
                "slot": node.slot}
        tmp = info_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(info, f)
        os.replace(tmp, info_path)
        if task_status is not None:
            task_status.started(path)
        listener = trio.SocketListener(sock)

        async def handler(stream):
            async with stream:
                await _handle(node, stream)
        await trio.serve_listeners(handler, [listener])
    finally:
        for name in (path, info_path):
            try:
                os.unlink(name)
            except OSError:
                pass
        sock.close()


async def _read_line(stream, buf: bytearray) -> bytes | None:
    """One line from ``stream`` (None: closed first; a line past ``MAX_LINE``:
    ValueError)."""
    while b"\n" not in buf:
        if len(buf) > MAX_LINE:
            raise ValueError(f"a request line longer than {MAX_LINE} bytes")
        chunk = await stream.receive_some(4096)
        if not chunk:
            return None
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line


async def _answer(stream, answer: dict) -> None:
    await stream.send_all(json.dumps(answer).encode() + b"\n")


async def _handle(node, stream) -> None:
    import trio
    from .errors import FSError
    buf = bytearray()
    try:
        try:
            line = await _read_line(stream, buf)
            if line is None:
                return
            req = json.loads(line)
            if not isinstance(req, dict) or not isinstance(req.get("op"), str):
                raise ValueError("not a request object")
        except ValueError as e:
            await _answer(stream, {"ok": False, "errno": errnos.EINVAL,
                                   "error": f"malformed request: {e}"})
            return
        admin = node.admin
        op = req["op"]
        try:
            if op == "status":
                await _answer(stream, {"ok": True, **admin.status()})
            elif op == "freeze":
                timeout = float(req.get("timeout", 0) or 0) or None
                wait = float(req.get("wait", 0) or 0) or None
                kw = {}
                if wait is not None:
                    kw["wait"] = wait
                took = await (admin.freeze(timeout, **kw) if timeout is not None
                              else admin.freeze(**kw))
                await _answer(stream, {"ok": True, "took_s": took, **admin.status()})
                if req.get("hold"):
                    try:
                        await _read_line(stream, buf)     # a thaw line, or the close
                    except ValueError:
                        pass
                    finally:
                        if admin.thaw():
                            log.info("the freeze's holder let go: thawed")
                    await _answer(stream, {"ok": True, "thawed": True})
            elif op == "thaw":
                await _answer(stream, {"ok": True, "thawed": admin.thaw()})
            elif op == "grow":
                total = req.get("total_blocks")
                if not isinstance(total, int) or isinstance(total, bool):
                    raise ValueError("total_blocks must be a number of blocks")
                await _answer(stream, {"ok": True, **await admin.grow(total)})
            elif op == "add_slots":
                n = req.get("count")
                jb = req.get("journal_blocks")
                if not isinstance(n, int) or isinstance(n, bool):
                    raise ValueError("count must be a number of slots")
                if jb is not None and (not isinstance(jb, int) or isinstance(jb, bool)):
                    raise ValueError("journal_blocks must be a number of blocks")
                await _answer(stream, {"ok": True,
                                       **await admin.add_slots(n, journal_blocks=jb)})
            else:
                await _answer(stream, {"ok": False, "errno": errnos.EINVAL,
                                       "error": f"unknown request {op!r}"})
        except (FSError, OSError) as e:
            await _answer(stream, {"ok": False, "errno": e.errno or errnos.EIO,
                                   "error": e.strerror or str(e)})
        except ClusterfsError as e:
            # a refused grow or add-slots (a bad size, no space, a damaged group):
            # nothing was changed
            await _answer(stream, {"ok": False, "errno": errnos.EINVAL,
                                   "error": str(e), "kind": type(e).__name__})
        except (TypeError, ValueError) as e:
            await _answer(stream, {"ok": False, "errno": errnos.EINVAL,
                                   "error": f"bad request: {e}"})
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


# -- the client side (in a command) ----------------------------------------------------

def mounts() -> list[dict]:
    """The mount processes of this machine that offer a control channel."""
    out = []
    run_dir = run_directory()
    try:
        names = sorted(os.listdir(run_dir))
    except OSError:
        return out          # no directory (nothing mounted yet), or not one we can read
    for name in names:
        if not name.endswith(".json"):
            continue
        path = os.path.join(run_dir, name)
        try:
            with open(path) as f:
                info = json.load(f)
            pid = int(info["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            # a mount process that was killed: its description and socket stay
            # behind (removed here when we may)
            for stale in (path, path[:-len(".json")] + ".sock"):
                try:
                    os.unlink(stale)
                except OSError:
                    pass
            continue
        except OSError:
            pass          # alive, another user's
        if os.path.exists(info.get("socket", "")):
            out.append(info)
    return out


def find(target: str) -> dict:
    """The mount process for ``target``: its mount point, or its volume (any member
    of this machine that has it mounted).

    Raises:
        UsageError: nothing of this machine has ``target`` mounted.
    """
    real = os.path.realpath(target)
    found = mounts()
    for info in found:
        if info.get("mountpoint") == real:
            return info
    for info in found:
        vol = info.get("volume")
        if vol == real:
            return info
        try:
            if vol and os.path.samefile(vol, real):
                return info
        except OSError:
            continue
    raise UsageError(f"{target} is neither a clusterfs mount point nor a volume mounted "
                     f"on this machine (as a cluster member)")


class Connection:
    """One request's connection to a mount process (a context manager)."""

    def __init__(self, info: dict, timeout: float | None = None):
        self.info = info
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(info["socket"])
        except OSError as e:
            self.sock.close()
            raise UsageError(f"cannot reach the mount process {info['pid']}: "
                             f"{e.strerror or e}") from None
        self.rfile = self.sock.makefile("rb")

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, request: dict) -> None:
        self.sock.sendall(json.dumps(request).encode() + b"\n")

    def receive(self) -> dict:
        """The next answer; raises ``ControlError`` for a refusal."""
        try:
            line = self.rfile.readline(MAX_LINE)
        except socket.timeout:
            raise ControlError(errnos.ETIMEDOUT, "the mount process did not answer in "
                                                 "time") from None
        if not line:
            raise ControlError(errnos.EPIPE, "the mount process closed the connection "
                                             "(unmounted?)")
        answer = json.loads(line)
        if not answer.get("ok"):
            raise ControlError(answer.get("errno", errnos.EIO), answer.get("error", "?"))
        return answer

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()


def call(info: dict, request: dict, timeout: float | None = None) -> dict:
    """Send one request, return its answer (``ControlError`` for a refusal)."""
    with Connection(info, timeout) as conn:
        conn.send(request)
        return conn.receive()
