"""Talking to a running QEMU and its guest, with the standard library only.

- `QMPClient`: the QEMU Machine Protocol over a Unix socket (greeting,
  `qmp_capabilities`, commands, asynchronous events). Keep the socket on local disk,
  never on a FUSE mount.
- `GuestChannel`: the guest's control port (its second serial port on a Unix socket):
  one request line, one ``CFSCTL ID key=value ...`` reply line (see `guest.py`).
- `parse_records` / `ConsoleLog`: the counter records the guest prints on its console
  (a chardev file).

Every wait has a timeout and raises `TimeoutError` when it runs out; a wait can also be
given `alive`, a callable that returns False once the QEMU process has died, so a dead
QEMU is reported at once instead of after the timeout.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any, Callable


class QMPError(RuntimeError):
    """QEMU answered a command with an error."""

    def __init__(self, command: str, error: dict):
        self.command = command
        self.error_class = error.get("class", "")
        self.desc = error.get("desc", "")
        super().__init__(f"{command}: {self.error_class}: {self.desc}")


class QemuDied(RuntimeError):
    """The QEMU process ended while we were waiting on it."""


def _connect_unix(path: Path, timeout: float, alive: Callable[[], bool] | None) -> socket.socket:
    """Connect to a Unix socket that the server may not have created yet."""
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(os.fspath(path))
            return s
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
        if alive is not None and not alive():
            raise QemuDied(f"QEMU exited before {path} accepted a connection")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no server on {path} after {timeout:.0f}s")
        time.sleep(0.05)


class _LineSocket:
    """A socket read line by line, every read bounded by a deadline."""

    def __init__(self, sock: socket.socket, alive: Callable[[], bool] | None):
        self.sock = sock
        self.alive = alive
        self._buf = b""

    def readline(self, deadline: float, what: str) -> bytes:
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out waiting for {what}")
            self.sock.settimeout(min(left, 0.5))
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                if self.alive is not None and not self.alive():
                    raise QemuDied(f"QEMU exited while waiting for {what}") from None
                continue
            if not chunk:
                raise ConnectionError(f"connection closed while waiting for {what}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def send(self, data: bytes) -> None:
        self.sock.settimeout(10)
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


class QMPClient:
    """A QMP connection: `connect()`, `execute()`, `wait_event()`.

    Args:
        path: the QMP Unix socket (QEMU started with ``-qmp unix:PATH,server=on,wait=off``).
        alive: returns False once QEMU has exited (optional).
    """

    def __init__(self, path: Path | str, *, alive: Callable[[], bool] | None = None):
        self.path = Path(path)
        self.alive = alive
        self.events: list[dict] = []
        self.greeting: dict | None = None
        self._conn: _LineSocket | None = None
        self._ids = itertools.count(1)

    def connect(self, timeout: float = 30.0) -> dict:
        """Connect, read the greeting and leave capabilities negotiation mode.

        Returns:
            The greeting's ``QMP`` object (QEMU version, capabilities).
        """
        deadline = time.monotonic() + timeout
        self._conn = _LineSocket(_connect_unix(self.path, timeout, self.alive), self.alive)
        greeting = json.loads(self._conn.readline(deadline, "the QMP greeting"))
        if "QMP" not in greeting:
            raise ConnectionError(f"not a QMP greeting: {greeting}")
        self.greeting = greeting["QMP"]
        self.execute("qmp_capabilities", timeout=max(1.0, deadline - time.monotonic()))
        return self.greeting

    def _read(self, deadline: float, what: str) -> dict:
        assert self._conn is not None, "connect() first"
        return json.loads(self._conn.readline(deadline, what))

    def execute(self, command: str, arguments: dict | None = None, *, timeout: float = 60.0) -> Any:
        """Run one command and return its ``return`` value; events met meanwhile are kept.

        Raises:
            QMPError: QEMU answered with an error.
            TimeoutError: no answer within TIMEOUT seconds.
        """
        assert self._conn is not None, "connect() first"
        req_id = f"cfs-{next(self._ids)}"
        msg: dict[str, Any] = {"execute": command, "id": req_id}
        if arguments:
            msg["arguments"] = arguments
        self._conn.send(json.dumps(msg).encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            resp = self._read(deadline, f"the answer to {command}")
            if "event" in resp:
                self.events.append(resp)
                continue
            if resp.get("id") != req_id:
                continue
            if "error" in resp:
                raise QMPError(command, resp["error"])
            return resp.get("return")

    def wait_event(self, name: str, *, timeout: float = 60.0,
                   match: Callable[[dict], bool] | None = None) -> dict:
        """Return (and consume) the first event NAME (for which MATCH holds), waiting for it."""
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev.get("event") == name and (match is None or match(ev)):
                    return self.events.pop(i)
            self.events.append(self._read(deadline, f"event {name}"))

    def wait_until(self, probe: Callable[[], Any], *, timeout: float, interval: float = 0.05,
                   what: str = "a condition") -> Any:
        """Poll PROBE (e.g. a query command) until it returns something truthy."""
        deadline = time.monotonic() + timeout
        while True:
            got = probe()
            if got:
                return got
            if self.alive is not None and not self.alive():
                raise QemuDied(f"QEMU exited while waiting for {what}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(interval)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "QMPClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_KV = re.compile(r"(\w+)=(\S*)")


class GuestChannel:
    """The guest's control port: QEMU ``-chardev socket,path=PATH,server=on,wait=off``.

    Requests are ``ID CMD [ARG]``; the guest answers ``CFSCTL ID WORD key=value ...``.
    """

    def __init__(self, path: Path | str, *, alive: Callable[[], bool] | None = None):
        self.path = Path(path)
        self.alive = alive
        self._conn: _LineSocket | None = None
        self._ids = itertools.count(1)

    def connect(self, timeout: float = 30.0) -> None:
        self._conn = _LineSocket(_connect_unix(self.path, timeout, self.alive), self.alive)

    def request(self, command: str, arg: Any = None, *, timeout: float = 60.0) -> dict[str, str]:
        """Send one request and return the reply's fields (plus ``word``: its first word).

        Raises:
            TimeoutError: the guest did not answer in time (not booted, or hung).
        """
        assert self._conn is not None, "connect() first"
        req_id = f"r{next(self._ids)}x{os.getpid()}"
        line = f"{req_id} {command}" + (f" {arg}" if arg is not None else "")
        self._conn.send(line.encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._conn.readline(deadline, f"the guest's answer to {command!r}")
            text = reply.decode(errors="replace").strip()
            parts = text.split()
            if len(parts) >= 3 and parts[0] == "CFSCTL" and parts[1] == req_id:
                fields = dict(_KV.findall(text))
                fields["word"] = parts[2]
                if parts[2] == "error":
                    raise RuntimeError(f"guest refused {command!r}: {text}")
                return fields

    def wait_ready(self, *, timeout: float = 120.0) -> dict[str, str]:
        """Ping until the guest answers (it reads the port only once booted)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"guest did not answer on {self.path} within {timeout:.0f}s")
            try:
                return self.request("ping", timeout=min(left, 2.0))
            except TimeoutError:
                continue

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "GuestChannel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclasses.dataclass(frozen=True)
class Record:
    """One counter record of the guest: sequence number, boot id, guest uptime (s)."""

    seq: int
    boot: str
    up: float


_RECORD = re.compile(rb"CFSREC seq=(\d+) boot=([0-9a-f-]+) up=(\d+(?:\.\d+)?)(?=\s)")


def parse_records(data: bytes) -> list[Record]:
    """Every complete ``CFSREC`` record in DATA (console text or raw disk bytes), in order."""
    return [Record(int(m.group(1)), m.group(2).decode(), float(m.group(3)))
            for m in _RECORD.finditer(data)]


class ConsoleLog:
    """The guest console captured by ``-chardev file,path=PATH``."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def read(self) -> bytes:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return b""

    def records(self) -> list[Record]:
        return parse_records(self.read())

    def errors(self) -> list[str]:
        return [line.decode(errors="replace") for line in self.read().splitlines() if b"CFSERR" in line]

    def wait_records(self, n: int, *, after: int = -1, timeout: float = 60.0,
                     alive: Callable[[], bool] | None = None) -> list[Record]:
        """Wait until N records with a sequence number above AFTER have been printed."""
        deadline = time.monotonic() + timeout
        while True:
            recs = [r for r in self.records() if r.seq > after]
            if len(recs) >= n:
                return recs
            if alive is not None and not alive():
                raise QemuDied(f"QEMU exited while waiting for {n} records in {self.path}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(recs)} of {n} records after seq {after} in "
                                   f"{self.path} within {timeout:.0f}s")
            time.sleep(0.1)
