"""``fsck -n`` of a mounted volume: which state is checked, and how.

A mounted volume's own state is on disk *and* in the journals of the live nodes (what
they committed but have not written home yet); the blocks on disk change while they
are read.  So, by where the volume is mounted:

1. A cluster member of this machine has it mounted (``clusterfs.control.find``):

   - by default fsck takes a snapshot (``clusterfs.snapshot.take``: every node writes
     its journal home, the image is copied while the cluster is frozen, then thawed)
     into a temporary file of ``--snapshot-dir`` (default: the image file's directory,
     or /var/tmp for a block device), after checking there is room for it; checks the
     snapshot (its block numbers are the volume's), and deletes it whatever happens
     (a failure, Ctrl-C, SIGTERM or SIGHUP);
   - with ``--frozen`` it keeps the cluster frozen (a held control freeze: it also
     ends when this process dies) while it reads the live device: for a block device
     without room for a copy.  The nodes' writes wait meanwhile.

2. Only nodes elsewhere have it mounted (live heartbeats, no member here): fsck checks
   the device as it is, the state last written home, without the live journals
   (``fsck.cluster`` says so in a warning that names the nodes, and so does the last
   line): findings may be transient.  The exit status is as for any check (4 when
   anything was found): fsck cannot tell a change in flight from damage.

3. Not mounted: the ordinary check.

The findings of a snapshot's check are the volume's at the moment of the snapshot
(same block numbers): exit status 4 there means damage, not a change in flight.  A
``--frozen`` freeze thaws by itself after ``FROZEN_TIMEOUT`` at the latest; a check
that outlasts it says so (its findings may then be transient).

Cases 1 and 2 end with one line saying which state was checked (``outcome``); the
JSON report keeps it as ``checked`` (``state``: "snapshot", "frozen" or "on-disk").
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import stat
import tempfile
import time
from dataclasses import dataclass

from clusterfs import control
from clusterfs.errors import ClusterfsError, UsageError
from clusterfs.ondisk.blockdev import BLOCK_SIZE, BlockDevice

DEFAULT_DEVICE_DIR = "/var/tmp"
RESERVE = 64 << 20        # left free beside a snapshot on the host file system
FROZEN_TIMEOUT = 3600.0   # a --frozen check's freeze thaws by itself after this


class OnlineError(Exception):
    """The mounted volume cannot be checked as asked (one line; ``exit`` is fsck's
    exit status: 16 a bad argument, 8 anything else)."""

    def __init__(self, message: str, exit: int = 8):
        super().__init__(message)
        self.exit = exit


@dataclass
class Checked:
    """Which state of the volume a run checks (the JSON report's ``checked``)."""

    state: str               # "snapshot", "frozen", "on-disk"
    node: str | None = None  # the member of this machine that froze it
    taken_at: float = 0.0    # wall-clock time the volume was frozen
    frozen_s: float = 0.0    # how long it was frozen (snapshot: for the copy)
    method: str = ""         # how the snapshot was copied
    note: str = ""           # what went wrong meanwhile (the freeze ended early)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v not in (None, "", 0.0)}


def local_member(volume: str) -> dict | None:
    """The control channel of a cluster member of this machine that has ``volume``
    mounted, or None."""
    try:
        return control.find(volume)
    except UsageError:
        return None


def clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))


# -- the snapshot's place --------------------------------------------------------------

def check_snapshot_dir(given: str) -> None:
    """``--snapshot-dir`` must name a directory this process can write to (checked
    whether or not the volume turns out to be mounted)."""
    if not os.path.isdir(given):
        raise OnlineError(f"--snapshot-dir {given}: not a directory", exit=16)
    if not os.access(given, os.W_OK | os.X_OK):
        raise OnlineError(f"--snapshot-dir {given}: not writable", exit=16)


def snapshot_dir(volume: str, given: str | None) -> str:
    """Where the snapshot goes: ``given``, else the image file's directory, else
    /var/tmp (a block device)."""
    if given is not None:
        check_snapshot_dir(given)
        return given
    if stat.S_ISREG(os.stat(volume).st_mode):
        return os.path.dirname(os.path.abspath(volume))
    return DEFAULT_DEVICE_DIR


def used_bytes(volume: str) -> int:
    """Bytes of the volume in use: everything before the groups, the blocks in use in
    each group (a group whose header does not read now counts whole), the backup
    superblock."""
    from clusterfs.errors import CorruptBlock
    from clusterfs.fs.volume import read_superblock
    from clusterfs.ondisk.format import RgrpHeader
    dev = BlockDevice(volume, readonly=True)
    try:
        sb = read_superblock(dev)
        used = sb.rgrp_start + 1
        for rg in range(sb.rgrp_count):
            start, length = sb.rgrp_range(rg)
            try:
                used += length - RgrpHeader.decode(dev.read(start), start).free
            except (CorruptBlock, OSError):
                used += length
        return used * BLOCK_SIZE
    finally:
        dev.close()


def _reflinks(volume: str, directory: str) -> bool:
    """Whether a copy of image file ``volume`` in ``directory`` would share its blocks
    (a reflink: same file system, one that clones; tried on two small files)."""
    from clusterfs.snapshot import FICLONE
    if os.stat(volume).st_dev != os.stat(directory).st_dev:
        return False
    with tempfile.TemporaryFile(dir=directory) as a, \
            tempfile.TemporaryFile(dir=directory) as b:
        a.write(bytes(BLOCK_SIZE))
        a.flush()
        try:
            fcntl.ioctl(b.fileno(), FICLONE, a.fileno())
            return True
        except OSError:
            return False


def check_room(volume: str, directory: str) -> int:
    """Refuse (``OnlineError``) unless ``directory`` has room for a snapshot of
    ``volume`` and ``RESERVE`` more; returns the bytes the copy needs.  A sparse copy
    writes what the image file holds (its allocated blocks) and a device copy every
    block in use; a reflink needs next to nothing."""
    st = os.stat(volume)
    try:
        need = used_bytes(volume)
    except (OSError, ClusterfsError) as e:
        raise OnlineError(f"cannot read how much of the volume is in use: "
                          f"{getattr(e, 'strerror', None) or e}") from None
    if stat.S_ISREG(st.st_mode):
        if _reflinks(volume, directory):
            need = 0
        else:
            need = max(need, st.st_blocks * 512)
    vfs = os.statvfs(directory)
    free = vfs.f_bavail * vfs.f_frsize
    if free < need + RESERVE:
        raise OnlineError(
            f"no room for a snapshot of the mounted volume in {directory}: it needs "
            f"{_mib(need)} (and {_mib(RESERVE)} left free), {_mib(free)} are free; "
            f"give --snapshot-dir DIR with room, or --frozen to check the live volume "
            f"held frozen")
    return need


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


# -- signals -----------------------------------------------------------------------------

@contextlib.contextmanager
def interruptible():
    """SIGTERM and SIGHUP end the run as Ctrl-C does (``KeyboardInterrupt``), so
    that what it holds (a snapshot file, a freeze) is let go on the way out."""
    def stop(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)
    old = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            old[sig] = signal.signal(sig, stop)
        except ValueError:          # not the main thread: nothing to catch here
            pass
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


# -- the two ways of checking a volume mounted here --------------------------------------

@contextlib.contextmanager
def snapshot(volume: str, info: dict, directory: str, *, quiet: bool):
    """Take a snapshot of ``volume`` (mounted by the member ``info``) into a temporary
    file of ``directory``; yields ``(its path, Checked)`` and deletes it on the way
    out, whatever happens."""
    from clusterfs.snapshot import take
    check_room(volume, directory)
    fd, path = tempfile.mkstemp(prefix=".clusterfs-fsck-", suffix=".img", dir=directory)
    os.close(fd)
    try:
        try:
            with _quiet_replays():
                snap = take(volume, path, quiet=quiet, force=True)
        except ClusterfsError as e:
            raise OnlineError(f"cannot take a snapshot of the mounted volume: "
                              f"{_strip(str(e), volume)}") from None
        except OSError as e:
            raise OnlineError(f"cannot take a snapshot of the mounted volume in "
                              f"{directory}: {e.strerror or e}") from None
        yield path, Checked("snapshot", node=snap.node or info.get("node"),
                            taken_at=snap.taken_at, frozen_s=snap.frozen_s,
                            method=snap.method)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@contextlib.contextmanager
def _quiet_replays():
    """No line per journal of the snapshot made independent (they are empty)."""
    slots_log = logging.getLogger("clusterfs.ondisk.slots")
    level = slots_log.level
    slots_log.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        slots_log.setLevel(level)


def _strip(message: str, volume: str) -> str:
    return message[len(volume) + 2:] if message.startswith(volume + ": ") else message


@contextlib.contextmanager
def frozen(volume: str, info: dict):
    """Hold the cluster frozen through the member ``info`` (the freeze ends when the
    connection closes: on the way out, or when this process dies); yields
    ``Checked``, whose ``frozen_s`` is set on the way out."""
    try:
        conn = control.Connection(info, timeout=control.FREEZE_WAIT + 30)
    except ClusterfsError as e:
        raise OnlineError(f"cannot freeze the mounted volume: {e}") from None
    try:
        try:
            conn.send({"op": "freeze", "timeout": FROZEN_TIMEOUT,
                       "wait": control.FREEZE_WAIT, "hold": True})
            answer = conn.receive()
        except (OSError, control.ControlError) as e:
            raise OnlineError(f"cannot freeze the mounted volume: "
                              f"{getattr(e, 'strerror', None) or e}") from None
        t0 = time.monotonic()
        checked = Checked("frozen", node=answer.get("node") or info.get("node"),
                          taken_at=time.time())
        try:
            yield checked
        finally:
            checked.frozen_s = time.monotonic() - t0
            # still frozen from here?  (it thaws by itself after FROZEN_TIMEOUT)
            try:
                still = control.call(info, {"op": "status"}, timeout=30).get("frozen_here")
            except (OSError, ClusterfsError):
                still = None
            if not still:
                checked.note = "the freeze ended before the check did (its time-out)"
            with contextlib.suppress(OSError, control.ControlError):
                conn.send({"op": "thaw"})
                conn.receive()
    finally:
        conn.close()


class FrozenDevice(BlockDevice):
    """The live volume, read-only, while this run holds every node frozen
    (``fsck.cluster`` then reports the live nodes as frozen, not as a warning)."""

    def __init__(self, path: str, checked: Checked):
        super().__init__(path, readonly=True)
        self.held_freeze = checked


def open_snapshot(path: str) -> BlockDevice:
    try:
        return BlockDevice(path, readonly=True)
    except OSError as e:
        raise OnlineError(f"cannot open the snapshot {path}: {e.strerror or e}") from None


def open_frozen(volume: str, checked: Checked) -> FrozenDevice:
    try:
        return FrozenDevice(volume, checked)
    except OSError as e:
        raise OnlineError(f"cannot open {volume}: {e.strerror or e}") from None


def outcome(volume: str, checked: Checked | None, live_nodes: list[str]) -> str | None:
    """The run's last line: which state it checked (None: an unmounted volume)."""
    if checked is not None and checked.state == "snapshot":
        return (f"{volume}: checked a snapshot of the mounted volume taken at "
                f"{clock(checked.taken_at)} (volume frozen {checked.frozen_s:.3f} s "
                f"from node '{checked.node}'; the snapshot is deleted)")
    if checked is not None and checked.state == "frozen":
        line = (f"{volume}: checked the live volume held frozen from node "
                f"'{checked.node}' since {clock(checked.taken_at)} (frozen "
                f"{checked.frozen_s:.3f} s)")
        if checked.note:
            line += f"; {checked.note}: findings may be transient"
        return line
    if live_nodes:
        names = ", ".join(f"'{n}'" for n in live_nodes)
        return (f"{volume}: checked the state on disk of a volume mounted by {names} "
                f"(the last written home, without their live journals): findings may "
                f"be transient; run `clusterfs fsck -n` on a node that has it mounted "
                f"to check a snapshot")
    return None

