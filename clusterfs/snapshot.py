"""Volume snapshots: freeze, copy the volume, thaw; then make the copy a volume of
its own.

``take(volume, dest)``, in order:

1. Freeze the volume on every node through a mount of this machine (``control``,
   a freeze that also ends if this process dies), or, when no node has it mounted,
   check that no heartbeat beats.
2. Copy it: by the hook command when one is given (an LVM or SAN snapshot: it gets
   ``CLUSTERFS_VOLUME`` and ``CLUSTERFS_SNAPSHOT`` in its environment and must leave
   the copy at ``dest``), else as a reflink clone of the image file when the host
   file system shares blocks (``FICLONE``), else a sparse copy: only the image's
   data ranges (``SEEK_DATA``/``SEEK_HOLE``, copied by the kernel with
   ``copy_file_range``), or for a block device every non-zero MiB.
3. Thaw.  The freeze lasts only as long as step 2.
4. Make the copy its own volume: a new UUID (both superblocks), every slot's heartbeat
   free, the master lease free, every journal replayed and marked clean (they are
   empty: the freeze wrote everything home).  It then mounts beside the original and
   ``fsck -fn`` finds it clean.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shlex
import stat
import subprocess
import time
import uuid as uuidlib
from dataclasses import dataclass

from . import control
from .errors import ClusterfsError, UsageError, VolumeBusy
from .progress import Progress

FICLONE = 0x40049409          # ioctl: make this file share the blocks of that one
CHUNK = 1 << 20
SNAPSHOT_FREEZE_TIMEOUT = 600.0   # the freeze thaws by itself after this at the latest


class SnapshotFailed(ClusterfsError):
    """A snapshot could not be taken (the volume is thawed and unchanged)."""


@dataclass
class Snapshot:
    dest: str
    method: str              # "reflink", "sparse copy", "hook", "copy"
    copied: int              # bytes copied (0 for a reflink or a hook)
    frozen_s: float          # how long the volume was frozen (0: not mounted)
    freeze_took_s: float     # how long the freeze took to get
    node: str | None         # the node that froze it
    uuid: str                # the snapshot's new volume UUID
    taken_at: float = 0.0    # wall-clock time of the state copied (the freeze)


def take(volume: str, dest: str, *, hook: str | None = None, quiet: bool = False,
         force: bool = False, max_freeze: float = SNAPSHOT_FREEZE_TIMEOUT) -> Snapshot:
    """Take a snapshot of ``volume`` at ``dest`` (the module's checklist).

    Raises:
        UsageError: bad arguments (``dest`` exists without ``force``, ...).
        VolumeBusy: the volume is mounted elsewhere and not on this machine.
        SnapshotFailed: the copy failed (``dest`` is removed; the volume thawed).
    """
    if os.path.exists(dest) and not force and hook is None:
        raise UsageError(f"{dest} exists (--force replaces it)")
    if not os.path.exists(volume):
        raise UsageError(f"{volume}: no such file or device")
    info = _local_mount(volume)
    conn = None
    took = frozen_at = 0.0
    node = None
    if info is None:
        _refuse_if_live(volume)
        taken_at = time.time()
    else:
        conn = control.Connection(info, timeout=max_freeze + 60)
        conn.send({"op": "freeze", "timeout": max_freeze, "hold": True})
        try:
            answer = conn.receive()
        except control.ControlError as e:
            conn.close()
            raise SnapshotFailed(f"cannot freeze {volume}: {e}") from None
        took, node = answer["took_s"], answer["node"]
        frozen_at = time.monotonic()
        taken_at = time.time()
    try:
        try:
            method, copied = _copy(volume, dest, hook, quiet)
        except BaseException:
            if hook is None:
                try:
                    os.unlink(dest)
                except OSError:
                    pass
            raise
    finally:
        frozen_s = time.monotonic() - frozen_at if conn is not None else 0.0
        if conn is not None:
            try:
                conn.send({"op": "thaw"})
                conn.receive()
            except (OSError, control.ControlError):
                pass        # the connection's end thaws it as well
            conn.close()
    new_uuid = make_independent(dest)
    return Snapshot(dest, method, copied, frozen_s, took, node, new_uuid, taken_at)


def _local_mount(volume: str) -> dict | None:
    try:
        return control.find(volume)
    except UsageError:
        return None


def _refuse_if_live(volume: str) -> None:
    from .fs.volume import read_superblock
    from .ondisk import slots as slotmod
    from .ondisk.blockdev import BlockDevice
    dev = BlockDevice(volume, readonly=True)
    try:
        sb = read_superblock(dev)
        live = slotmod.live_slots(dev, sb)
    finally:
        dev.close()
    if live:
        names = "; ".join(slotmod.describe(hb) for hb in live.values())
        raise VolumeBusy(f"{volume} is mounted ({names}) but not on this machine: take "
                         f"the snapshot on a node that has it mounted")


def _copy(volume: str, dest: str, hook: str | None, quiet: bool) -> tuple[str, int]:
    if hook is not None:
        env = dict(os.environ, CLUSTERFS_VOLUME=os.path.abspath(volume),
                   CLUSTERFS_SNAPSHOT=os.path.abspath(dest))
        r = subprocess.run(hook, shell=True, env=env)
        if r.returncode != 0:
            raise SnapshotFailed(f"the snapshot hook {shlex.quote(hook)} failed "
                                 f"(exit status {r.returncode})")
        if not os.path.exists(dest):
            raise SnapshotFailed(f"the snapshot hook left nothing at {dest}")
        return "hook", 0
    st = os.stat(volume)
    src = os.open(volume, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = st.st_size if stat.S_ISREG(st.st_mode) else os.lseek(src, 0, os.SEEK_END)
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            if stat.S_ISREG(st.st_mode):
                try:
                    fcntl.ioctl(out, FICLONE, src)
                    return "reflink", 0
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV,
                                       errno.EINVAL, errno.ENOSYS):
                        raise SnapshotFailed(f"clone of {volume}: {e.strerror}") from None
                copied = _sparse_copy(src, out, size, quiet)
                method = "sparse copy"
            else:
                copied = _device_copy(src, out, size, quiet)
                method = "copy"
            os.ftruncate(out, size)
            # (made durable after the thaw: make_independent flushes the copy)
            return method, copied
        except OSError as e:
            raise SnapshotFailed(f"copy of {volume} to {dest}: {e.strerror}") from None
        finally:
            os.close(out)
    finally:
        os.close(src)


def _sparse_copy(src: int, out: int, size: int, quiet: bool) -> int:
    """Copy the data ranges of an image file (holes stay holes); returns bytes copied."""
    copied = 0
    with Progress("copying the volume", size, quiet=quiet, unit="bytes") as prog:
        pos = 0
        while pos < size:
            try:
                start = os.lseek(src, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break           # only a hole is left
                raise
            end = os.lseek(src, start, os.SEEK_HOLE)
            off = start
            while off < end:
                n = os.copy_file_range(src, out, min(end - off, 64 * CHUNK), off, off)
                if n == 0:
                    break
                off += n
                copied += n
                prog.update(off)
            pos = end
        prog.update(size)
    return copied


def _device_copy(src: int, out: int, size: int, quiet: bool) -> int:
    """Copy a block device, leaving holes where it reads zeros; returns bytes written."""
    copied = 0
    zero = bytes(CHUNK)
    with Progress("copying the volume", size, quiet=quiet, unit="bytes") as prog:
        off = 0
        while off < size:
            buf = os.pread(src, min(CHUNK, size - off), off)
            if not buf:
                break
            if buf != zero[:len(buf)]:
                os.pwrite(out, buf, off)
                copied += len(buf)
            off += len(buf)
            prog.update(off)
    return copied


def make_independent(path: str) -> str:
    """Make the copy at ``path`` a volume of its own (step 4); returns its new UUID."""
    from .fs.volume import read_superblock
    from .ondisk import slots as slotmod
    from .ondisk.blockdev import BlockDevice
    from .ondisk.format import HB_FREE
    from .ondisk.layout import LEASE_FREE
    from .ondisk.lease import LeaseBlock, encode_lease, read_lease
    from .ondisk.superblock import Heartbeat
    dev = BlockDevice(path)
    try:
        sb = read_superblock(dev)
        for slot in range(sb.nslots):
            slotmod.replay_slot(dev, sb, slot)
            hb = slotmod.read_heartbeat(dev, sb, slot) or Heartbeat(slot=slot)
            hb.state = HB_FREE
            hb.counter += 1
            bno = sb.heartbeat_bno(slot)
            dev.write(bno, hb.image(bno))
        old = read_lease(dev, sb)
        free = LeaseBlock(LEASE_FREE, old.generation if old else 0,
                          (old.counter + 1) if old else 1, "", "", 0, 0, 0)
        dev.write(sb.lease_bno, encode_lease(free, sb.lease_bno))
        sb.uuid = uuidlib.uuid4().bytes
        dev.write(sb.backup_bno, sb.image(sb.backup_bno))
        dev.write(0, sb.image(0))
        dev.flush()
        return str(uuidlib.UUID(bytes=sb.uuid))
    finally:
        dev.close()
