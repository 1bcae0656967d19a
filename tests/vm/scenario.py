"""Issue 6: save a running VM on host A, restore it on host B, over one shared storage.

`run_scenario(dir_a, dir_b)` takes two directories that are two views of ONE storage: for
the local anchor both are the same local directory; for clusterfs they are the same
directory seen through node A's mount and node B's mount. QEMU "on A" only ever touches
paths under DIR_A, QEMU "on B" only paths under DIR_B; sockets and console logs stay in
a private directory on local disk.

Steps (each wait has a timeout; QEMU processes are ended by PID only):
1. ``qemu-img create -f qcow2 DIR_A/NAME.qcow2``; boot the guest from it (QEMU A).
2. Let it count; fill FILL_MIB of its RAM with random data; note the data's md5.
3. Save: ``stop``, ``migrate-set-parameters max-bandwidth`` (QEMU 7.2 caps at 128 MiB/s
   by default), ``migrate exec:cat > DIR_A/NAME.state``, wait for completion and for
   `cat` to finish, ``quit``, fsync the state file. `save_s` is stop .. fsync done.
4. Restore: QEMU B with ``-S -incoming defer`` on ``DIR_B/NAME.qcow2``,
   ``migrate-incoming exec:cat DIR_B/NAME.state``, wait for completion, ``cont``.
   `restore_s` is QEMU B's start .. ``cont`` returned.
5. Let it count on B; check the RAM md5; stop the counter (the guest syncs); quit.
6. Assert: one boot id throughout (no reboot); the console shows every sequence number
   from 0 to the last exactly once, in order; uptime never goes back and its step
   across the migration is small; the disk holds every record, each at its own offset
   and equal to the console's; RAM md5 unchanged; ``qemu-img check`` clean; the state
   file holds at least the filled RAM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

from .guest import Guest, build_guest, ensure_host_tools
from .machine import Machine
from .qmp import Record, parse_records

MAX_BANDWIDTH = 1 << 40  # bytes/s: "unlimited" for QEMU 7.2's migrate-set-parameters
RECORD_SIZE = 512

# How the state file is written on A and read on B: QEMU 7.2 saves to a command's
# stdin (a 64 KiB pipe) and restores from its stdout. `cat` writes whatever one pipe
# read returns (64 KiB at most); `dd` gathers 1 MiB blocks first, as libvirt's
# iohelper does, which matters on a FUSE mount that sees every write() as a request.
WRITERS = {
    "cat": ("cat > {file}", "cat {file}"),
    "dd": ("dd of={file} bs=1M iflag=fullblock status=none", "dd if={file} bs=1M status=none"),
}


class ScenarioFailed(AssertionError):
    """One of the scenario's assertions did not hold (the message says which)."""


@dataclasses.dataclass
class ScenarioResult:
    """What one run measured. Times in seconds, sizes in bytes."""

    save_s: float
    restore_s: float
    state_bytes: int
    mem_mib: int
    fill_mib: int
    boot_id: str
    ram_md5: str
    last_seq: int
    records_on_a: int
    records_on_b: int
    uptime_step_s: float
    boot_s: float
    fill_s: float
    migrate_total_ms: int | None
    checks: list[str] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check(ok: bool, what: str, checks: list[str]) -> None:
    if not ok:
        raise ScenarioFailed(what)
    checks.append(what)


def _qemu_img(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=timeout)


def _wait_migration(m: Machine, timeout: float, what: str) -> dict:
    """Poll query-migrate until completed; raise on failed/cancelled."""
    def probe():
        info = m.qmp.execute("query-migrate", timeout=30)
        status = info.get("status")
        if status in ("failed", "cancelled"):
            raise ScenarioFailed(f"{what}: migration {status}: {info.get('error-desc', '')} "
                                 f"QEMU said: {m.stderr_tail()}")
        return info if status == "completed" else None
    return m.qmp.wait_until(probe, timeout=timeout, what=what)


def _wait_marker(path: Path, timeout: float) -> str:
    """Wait for PATH to exist and hold a line; return it."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(FileNotFoundError):
            text = path.read_text()
            if text.endswith("\n"):
                return text.strip()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} not written within {timeout:.0f}s")
        time.sleep(0.01)


def _read_disk_records(disk: Path, last_seq: int, workdir: Path) -> list[tuple[int, Record | None]]:
    """Read slots 0..LAST_SEQ of DISK; (slot, record parsed from that slot or None)."""
    raw = workdir / "disk-head.raw"
    count = last_seq + 1
    r = _qemu_img("dd", "-f", "qcow2", "-O", "raw", f"bs={RECORD_SIZE}", f"count={count}",
                  f"if={disk}", f"of={raw}")
    if r.returncode != 0:
        raise ScenarioFailed(f"qemu-img dd {disk}: {r.stderr.strip()}")
    data = raw.read_bytes()
    raw.unlink()
    out = []
    for slot in range(count):
        recs = parse_records(data[slot * RECORD_SIZE:(slot + 1) * RECORD_SIZE])
        out.append((slot, recs[0] if len(recs) == 1 else None))
    return out


def run_scenario(dir_a: Path | str, dir_b: Path | str, *, guest: Guest | None = None,
                 mem_mib: int = 128, fill_mib: int = 32, disk_mib: int = 256,
                 interval_s: float = 0.2, records_before: int = 5, records_after: int = 5,
                 name: str = "vm", cache: str = "writeback", fsync_state: bool = True,
                 timeout_scale: float = 1.0, cleanup: bool = True,
                 after_create: Callable[[Path, Path], None] | None = None,
                 writer: str = "cat",
                 log: Callable[[str], None] = lambda msg: None) -> ScenarioResult:
    """Run the save-on-A / restore-on-B scenario once and check everything.

    Args:
        dir_a: the storage as host A sees it (disk and state file are created here).
        dir_b: the same storage as host B sees it (may be the same path as DIR_A).
        guest: a built guest (default: `build_guest()`, cached).
        mem_mib: guest RAM.
        fill_mib: how much of it to fill with random data before the save.
        disk_mib: virtual size of the qcow2 disk.
        interval_s: seconds between the guest's counter records.
        records_before: counter records to see on A before the save (after the fill too).
        records_after: counter records to see on B after the restore.
        name: file name stem: NAME.qcow2 and NAME.state in the directories.
        cache: QEMU ``cache=`` mode of the disk on both hosts.
        fsync_state: fsync the state file before the save counts as done.
        timeout_scale: multiply every timeout (slow storage, loaded machine).
        cleanup: remove NAME.qcow2 and NAME.state when done (even on failure).
        after_create: called with (disk through A, disk through B) once the disk is
            created, before QEMU A starts (e.g. to have host B read it first).
        writer: the commands that write and read the state file (`WRITERS`).
        log: called with one line per step.

    Returns:
        The timings and what was checked.

    Raises:
        ScenarioFailed: an assertion did not hold.
        GuestUnavailable: QEMU or the guest cannot be had on this machine.
        TimeoutError, RuntimeError: QEMU or the guest did not do its part in time.
    """
    dir_a, dir_b = Path(dir_a), Path(dir_b)
    ensure_host_tools()
    guest = guest or build_guest(log=log)
    ts = timeout_scale
    checks: list[str] = []
    disk_a, state_a = dir_a / f"{name}.qcow2", dir_a / f"{name}.state"
    disk_b, state_b = dir_b / f"{name}.qcow2", dir_b / f"{name}.state"
    rundir = Path(tempfile.mkdtemp(prefix="cfsvm-", dir="/tmp"))  # local disk, short path
    migrate_timeout = ts * (120 + mem_mib * 0.5)
    a = b = None
    ok = False
    try:
        state_a.unlink(missing_ok=True)
        disk_a.unlink(missing_ok=True)
        r = _qemu_img("create", "-q", "-f", "qcow2", str(disk_a), f"{disk_mib}M")
        if r.returncode != 0:
            raise ScenarioFailed(f"qemu-img create {disk_a}: {r.stderr.strip()}")
        if after_create is not None:
            after_create(disk_a, disk_b)

        # ---- host A: boot, count, fill RAM
        a = Machine(guest, disk_a, rundir, name="a", mem_mib=mem_mib, interval_s=interval_s, cache=cache)
        t = time.monotonic()
        a.start(timeout=30 * ts)
        hello = a.ctl.wait_ready(timeout=180 * ts)
        boot_id = hello["boot"]
        boot_s = time.monotonic() - t
        log(f"A: booted in {boot_s:.1f}s, boot id {boot_id}, pid {a.pid}")
        a.console.wait_records(records_before, timeout=60 * ts, alive=a.alive)
        t = time.monotonic()
        filled = a.ctl.request("fill", fill_mib, timeout=ts * (60 + fill_mib * 1.0))
        fill_s = time.monotonic() - t
        ram_md5 = filled["md5"]
        log(f"A: filled {fill_mib} MiB in {fill_s:.1f}s, md5 {ram_md5}")
        seen = a.console.records()
        a.console.wait_records(records_before, after=seen[-1].seq, timeout=60 * ts, alive=a.alive)

        # ---- save on A
        marker = rundir / "save.rc"
        save_cmd, restore_cmd = WRITERS[writer]
        uri = (f"exec:{save_cmd.format(file=shlex.quote(str(state_a)))}; "
               f"echo $? > {shlex.quote(str(marker))}")
        t0 = time.monotonic()
        a.qmp.execute("stop")
        a.qmp.execute("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH})
        a.qmp.execute("migrate", {"uri": uri})
        info = _wait_migration(a, migrate_timeout, "save on A")
        rc = _wait_marker(marker, timeout=migrate_timeout)  # the shell writes it once cat ended
        a.quit(timeout=60 * ts)
        if fsync_state:
            fd = os.open(state_a, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        save_s = time.monotonic() - t0
        _check(rc == "0", f"{save_cmd.split()[0]} > state exited {rc}", checks)
        log(f"A: saved in {save_s:.2f}s (QEMU: {info.get('total-time')} ms), "
            f"{state_a.stat().st_size / 2**20:.0f} MiB")
        recs_a_bytes = a.console.read()
        a.close()

        # ---- restore on B
        _check(state_b.exists(), f"state file visible through B: {state_b}", checks)
        _check(disk_b.exists(), f"disk visible through B: {disk_b}", checks)
        state_bytes = state_b.stat().st_size
        b = Machine(guest, disk_b, rundir, name="b", mem_mib=mem_mib, interval_s=interval_s,
                    cache=cache, incoming=True)
        t1 = time.monotonic()
        b.start(timeout=30 * ts)
        b.qmp.execute("migrate-incoming",
                      {"uri": f"exec:{restore_cmd.format(file=shlex.quote(str(state_b)))}"})
        _wait_migration(b, migrate_timeout, "restore on B")
        b.qmp.execute("cont")
        restore_s = time.monotonic() - t1
        status = b.qmp.execute("query-status")
        _check(status.get("status") == "running", f"B runs after cont ({status})", checks)
        log(f"B: restored in {restore_s:.2f}s, pid {b.pid}")

        last_a = max((r.seq for r in parse_records(recs_a_bytes)), default=-1)
        b.console.wait_records(records_after, after=last_a, timeout=60 * ts, alive=b.alive)
        pong = b.ctl.request("ping", timeout=30 * ts)
        summed = b.ctl.request("sum", timeout=ts * (60 + fill_mib * 1.0))
        quiesced = b.ctl.request("quiesce", timeout=60 * ts)
        last_seq = int(quiesced["last"])
        b.quit(timeout=60 * ts)
        recs_b_bytes = b.console.read()
        b.close()

        # ---- checks
        _check(pong["boot"] == boot_id, f"same boot id on B ({pong['boot']} vs {boot_id})", checks)
        _check(summed["md5"] == ram_md5, f"RAM content survived (md5 {summed['md5']} vs {ram_md5})", checks)
        _check(int(summed["bytes"]) == fill_mib << 20, f"filled RAM size {summed['bytes']}", checks)
        errors = [ln for ln in (recs_a_bytes + recs_b_bytes).splitlines() if b"CFSERR" in ln]
        _check(not errors, f"guest reported no errors {errors[:3]}", checks)

        console = parse_records(recs_a_bytes + recs_b_bytes)
        seqs = [r.seq for r in console]
        _check(seqs == list(range(last_seq + 1)),
               f"console shows records 0..{last_seq} once each, in order"
               + ("" if seqs == list(range(last_seq + 1)) else f" (got {_summary(seqs)})"), checks)
        _check({r.boot for r in console} == {boot_id}, "one boot id in every record", checks)
        ups = [r.up for r in console]
        _check(all(x <= y for x, y in zip(ups, ups[1:])), "guest uptime never goes back", checks)
        n_a = sum(1 for r in console if r.seq <= last_a)
        n_b = len(console) - n_a
        _check(n_a >= records_before and n_b >= records_after,
               f"counted on A ({n_a}) and on B ({n_b})", checks)
        step = console[last_a + 1].up - console[last_a].up
        _check(step < interval_s + 5.0,
               f"uptime continuous across the migration (step {step:.2f}s)", checks)

        disk = _read_disk_records(disk_b, last_seq, rundir)
        bad = [slot for slot, rec in disk if rec is None or rec != console[slot]]
        _check(not bad, f"disk holds records 0..{last_seq}, each at its offset, equal to the console"
               + ("" if not bad else f" (bad slots {_summary(bad)})"), checks)
        r = _qemu_img("check", "-f", "qcow2", str(disk_b))
        _check(r.returncode == 0, f"qemu-img check clean: {r.stdout.strip().splitlines()[-1:]}"
               + ("" if r.returncode == 0 else r.stderr.strip()), checks)
        _check(state_bytes >= fill_mib << 20, f"state file {state_bytes} B holds the filled RAM", checks)
        ok = True
        return ScenarioResult(
            save_s=round(save_s, 3), restore_s=round(restore_s, 3), state_bytes=state_bytes,
            mem_mib=mem_mib, fill_mib=fill_mib, boot_id=boot_id, ram_md5=ram_md5,
            last_seq=last_seq, records_on_a=n_a, records_on_b=n_b, uptime_step_s=round(step, 3),
            boot_s=round(boot_s, 2), fill_s=round(fill_s, 2),
            migrate_total_ms=info.get("total-time"), checks=checks)
    finally:
        for m in (a, b):
            if m is not None:
                m.close()
        if cleanup:
            for p in (state_a, disk_a):
                p.unlink(missing_ok=True)
        if ok:
            shutil.rmtree(rundir, ignore_errors=True)
        else:
            log(f"scenario failed; QEMU logs kept in {rundir}")


def _summary(xs: list[int]) -> str:
    return str(xs) if len(xs) <= 12 else f"{xs[:6]} ... {xs[-6:]} ({len(xs)} items)"


def main() -> int:
    """Run the scenario on a local directory: ``python -m tests.vm.scenario [DIR]``."""
    import argparse
    ap = argparse.ArgumentParser(prog="python -m tests.vm.scenario")
    ap.add_argument("dir_a", nargs="?", type=Path)
    ap.add_argument("dir_b", nargs="?", type=Path)
    ap.add_argument("--mem", type=int, default=128)
    ap.add_argument("--fill", type=int, default=32)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cfsvm-local-", dir="/var/tmp") as tmp:
        dir_a = args.dir_a or Path(tmp)
        res = run_scenario(dir_a, args.dir_b or dir_a, mem_mib=args.mem, fill_mib=args.fill, log=print)
    print(json.dumps(res.as_dict(), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
