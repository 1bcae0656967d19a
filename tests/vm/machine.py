"""One QEMU process running the test guest, started and ended by PID.

The QMP socket, the control socket and the console log live in a private directory on
local disk (`rundir`); only the disk image (and the migration state file) may be on the
storage under test.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from .guest import Guest
from .qmp import ConsoleLog, GuestChannel, QMPClient

QEMU = "qemu-system-x86_64"


class Machine:
    """A QEMU process for GUEST with DISK; `start()` it, `close()` always.

    Args:
        guest: the kernel + initramfs to boot.
        disk: the qcow2 image (on the storage under test).
        rundir: local directory for sockets and the console log (short path: Unix socket
            paths are limited to 107 bytes).
        name: distinguishes the files of several machines in one rundir.
        mem_mib: guest RAM.
        interval_s: seconds between the guest's counter records.
        incoming: start with ``-S -incoming defer`` (a migration target).
        cache: QEMU's ``cache=`` for the disk (``writeback``, ``none`` for O_DIRECT...).
        disk_format: ``qcow2`` or ``raw``.
        drive_opts: more ``-drive`` options, e.g. ``("file.locking=off",)``.
        device_opts: more ``-device virtio-blk-pci`` options, e.g. ``("share-rw=on",)``.
        extra_args: appended to QEMU's command line.
    """

    def __init__(self, guest: Guest, disk: Path, rundir: Path, *, name: str = "vm",
                 mem_mib: int = 128, interval_s: float = 0.2, incoming: bool = False,
                 cache: str = "writeback", disk_format: str = "qcow2",
                 drive_opts: tuple[str, ...] = (), device_opts: tuple[str, ...] = (),
                 extra_args: tuple[str, ...] = ()):
        self.guest = guest
        self.disk = Path(disk)
        self.rundir = Path(rundir)
        self.name = name
        self.mem_mib = mem_mib
        self.interval_s = interval_s
        self.incoming = incoming
        self.cache = cache
        self.disk_format = disk_format
        self.drive_opts = tuple(drive_opts)
        self.device_opts = tuple(device_opts)
        self.extra_args = tuple(extra_args)
        self.qmp_path = self.rundir / f"{name}.qmp"
        self.ctl_path = self.rundir / f"{name}.ctl"
        self.console = ConsoleLog(self.rundir / f"{name}.console")
        self.stderr_path = self.rundir / f"{name}.stderr"
        self.proc: subprocess.Popen | None = None
        self.qmp = QMPClient(self.qmp_path, alive=self.alive)
        self.ctl = GuestChannel(self.ctl_path, alive=self.alive)

    def argv(self) -> list[str]:
        """QEMU's command line (identical on both sides of a migration but for -incoming)."""
        drive = ",".join(("if=none,id=disk0", f"file={self.disk}", f"format={self.disk_format}",
                          f"cache={self.cache}", *self.drive_opts))
        device = ",".join(("virtio-blk-pci,drive=disk0", *self.device_opts))
        args = [
            QEMU, "-nodefaults", "-no-user-config", "-nographic",
            "-machine", "pc,accel=tcg", "-smp", "1", "-m", str(self.mem_mib),
            "-kernel", str(self.guest.kernel), "-initrd", str(self.guest.initrd),
            "-append", self.guest.cmdline(interval_s=self.interval_s),
            "-chardev", f"file,id=con0,path={self.console.path}", "-serial", "chardev:con0",
            "-chardev", f"socket,id=ctl0,path={self.ctl_path},server=on,wait=off",
            "-serial", "chardev:ctl0",
            "-drive", drive,
            "-device", device,
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-no-reboot",
        ]
        if self.incoming:
            args += ["-S", "-incoming", "defer"]
        return args + list(self.extra_args)

    def start(self, *, timeout: float = 30.0) -> None:
        """Start QEMU and connect QMP and the guest's control port."""
        self.rundir.mkdir(parents=True, exist_ok=True)
        for p in (self.qmp_path, self.ctl_path, self.console.path):
            p.unlink(missing_ok=True)
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL,
                                         stdout=err, stderr=err)
        try:
            self.qmp.connect(timeout=timeout)
            self.ctl.connect(timeout=timeout)
        except Exception as e:
            raise RuntimeError(f"{self}: {e}; QEMU said: {self.stderr_tail()}") from e

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stderr_tail(self, n: int = 600) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-n:].strip()
        except OSError:
            return ""

    def wait_exit(self, timeout: float = 30.0) -> int:
        """Wait for the QEMU process to end; returns its exit status."""
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def quit(self, *, timeout: float = 30.0) -> None:
        """Ask QEMU to quit over QMP and wait for the process to end."""
        if not self.alive():
            return
        try:
            self.qmp.execute("quit", timeout=10)
        except (ConnectionError, OSError):
            pass  # QEMU may close the socket before answering
        self.wait_exit(timeout)

    def kill(self) -> None:
        """End our QEMU process by its PID (SIGTERM, then SIGKILL)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def close(self) -> None:
        """Disconnect, kill QEMU if it still runs, remove the sockets (keep the logs)."""
        self.qmp.close()
        self.ctl.close()
        self.kill()
        for p in (self.qmp_path, self.ctl_path):
            p.unlink(missing_ok=True)

    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None and self.proc is not None and not self.alive():
            # (pytest shows it with the failure: why QEMU ended, before the run
            # directory goes)
            print(f"{self}: QEMU exited with {self.proc.returncode}; it said: "
                  f"{self.stderr_tail() or '(nothing)'}")
        self.close()

    def __repr__(self) -> str:
        return f"<Machine {self.name} pid={self.pid} disk={self.disk}>"

