"""Block device access: whole 4096-byte blocks at 64-bit block addresses.

Two implementations share one interface (``read``, ``write``, ``flush``, ``nblocks``):

* ``BlockDevice`` opens an image file or a block device.  Block devices are opened
  with ``O_DIRECT`` by default: several hosts share them and one host's page cache is
  not coherent with another's.  Image files use the page cache unless ``direct=True``.
* ``PowerLossDevice`` keeps the volume in memory and remembers every write since the
  last flush, so a test can cut the power at any point and keep, drop or tear any
  subset of the unflushed writes.

Neither knows anything of the file-system format; the journal library uses them too.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import random
import stat
import struct
import threading
from typing import Callable, Iterable

BLOCK_SIZE = 4096
SECTOR_SIZE = 512
_BLKGETSIZE64 = 0x80081272

WriteGuard = Callable[[], None]


class PowerCut(Exception):
    """Raised by ``PowerLossDevice`` when the simulated power fails mid-operation."""


class BlockDevice:
    """An image file or block device read and written in whole blocks.

    Args:
        path: image file or block device.
        direct: use O_DIRECT (default: True for block devices, False for files).
        readonly: open read-only.

    A ``write_guard`` callable, when set, runs before every write and flush; it raises
    (``Fenced``) to stop a node that lost its lease from touching the volume.
    """

    block_size = BLOCK_SIZE

    def __init__(self, path: str, *, direct: bool | None = None, readonly: bool = False):
        st = os.stat(path)
        self.path = path
        self.is_blockdev = stat.S_ISBLK(st.st_mode)
        if not (self.is_blockdev or stat.S_ISREG(st.st_mode)):
            raise OSError(f"{path}: not an image file or block device")
        self.direct = self.is_blockdev if direct is None else direct
        self.readonly = readonly
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        if self.direct:
            flags |= os.O_DIRECT
        self.fd = os.open(path, flags)
        if self.is_blockdev:
            buf = fcntl.ioctl(self.fd, _BLKGETSIZE64, b"\0" * 8)
            size = struct.unpack("Q", buf)[0]
        else:
            size = st.st_size
        self.size_bytes = size
        self.nblocks = size // BLOCK_SIZE
        self.write_guard: WriteGuard | None = None
        self._local = threading.local()      # aligned buffers, per thread
        self._all_bufs: list[mmap.mmap] = []
        self.stats = {"reads": 0, "writes": 0, "flushes": 0,
                      "read_bytes": 0, "written_bytes": 0}

    def refresh_size(self) -> int:
        """Read the size again (the image file or device was enlarged); returns
        ``nblocks``."""
        if self.is_blockdev:
            buf = fcntl.ioctl(self.fd, _BLKGETSIZE64, b"\0" * 8)
            size = struct.unpack("Q", buf)[0]
        else:
            size = os.fstat(self.fd).st_size
        self.size_bytes = size
        self.nblocks = size // BLOCK_SIZE
        return self.nblocks

    # -- aligned buffers (O_DIRECT needs page-aligned memory) ---------------------

    def _buffer(self, nbytes: int) -> mmap.mmap:
        size = 1 << max(12, (nbytes - 1).bit_length())
        bufs = getattr(self._local, "bufs", None)
        if bufs is None:
            bufs = self._local.bufs = {}
        buf = bufs.get(size)
        if buf is None:
            buf = mmap.mmap(-1, size)
            if size <= (8 << 20):
                bufs[size] = buf
                self._all_bufs.append(buf)
        return buf

    def _check(self, bno: int, count: int) -> None:
        if bno < 0 or count < 0 or bno + count > self.nblocks:
            raise OSError(22, f"block range {bno}+{count} outside the device "
                              f"({self.nblocks} blocks)")

    # -- I/O ---------------------------------------------------------------------

    def read(self, bno: int, count: int = 1) -> bytes:
        """Read ``count`` blocks starting at block ``bno``."""
        self._check(bno, count)
        nbytes = count * BLOCK_SIZE
        self.stats["reads"] += 1
        self.stats["read_bytes"] += nbytes
        if not self.direct:
            data = os.pread(self.fd, nbytes, bno * BLOCK_SIZE)
            if len(data) != nbytes:
                raise OSError(5, f"short read at block {bno}")
            return data
        buf = self._buffer(nbytes)
        got = os.preadv(self.fd, [memoryview(buf)[:nbytes]], bno * BLOCK_SIZE)
        if got != nbytes:
            raise OSError(5, f"short read at block {bno}")
        return buf[:nbytes]

    def write(self, bno: int, data) -> None:
        """Write whole blocks starting at block ``bno``."""
        nbytes = len(data)
        if nbytes % BLOCK_SIZE:
            raise ValueError("writes must be whole blocks")
        self._check(bno, nbytes // BLOCK_SIZE)
        if self.write_guard is not None:
            self.write_guard()
        self.stats["writes"] += 1
        self.stats["written_bytes"] += nbytes
        if self.direct:
            buf = self._buffer(nbytes)
            buf[:nbytes] = data
            data = memoryview(buf)[:nbytes]
        done = os.pwrite(self.fd, data, bno * BLOCK_SIZE)
        if done != nbytes:
            raise OSError(28, f"short write at block {bno}")

    def flush(self) -> None:
        """A barrier: everything written before is durable when this returns."""
        if self.write_guard is not None:
            self.write_guard()
        self.stats["flushes"] += 1
        os.fdatasync(self.fd)

    def discard(self, bno: int, count: int) -> None:
        """Hint that blocks are free (punches a hole in image files)."""
        if self.is_blockdev or self.readonly:
            return
        if self.write_guard is not None:
            self.write_guard()
        try:
            _punch_hole(self.fd, bno * BLOCK_SIZE, count * BLOCK_SIZE)
        except OSError:
            # Not every file system punches holes; discard is only a hint.
            return

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for buf in self._all_bufs:
            buf.close()
        self._all_bufs.clear()
        self._local = threading.local()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_libc = None


def _punch_hole(fd: int, offset: int, length: int) -> None:
    global _libc
    import ctypes
    import ctypes.util
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2
    if _libc.fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, offset, length):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def device_size(path: str) -> int:
    """Size in bytes of an image file or block device."""
    st = os.stat(path)
    if stat.S_ISBLK(st.st_mode):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            buf = fcntl.ioctl(fd, _BLKGETSIZE64, b"\0" * 8)
            return struct.unpack("Q", buf)[0]
        finally:
            os.close(fd)
    return st.st_size


class PowerLossDevice:
    """An in-memory volume that can lose power.

    Reads see every write.  Writes since the last ``flush`` are volatile: ``crash``
    builds the device that a power cut would leave, keeping, dropping or tearing (at
    512-byte sector granularity) any chosen subset of them.  ``cut_after`` makes the
    N-th later write (or flush) raise ``PowerCut``, to stop an operation midway.

    Args:
        nblocks: size of the volume in blocks.
        durable: initial durable contents (block number -> 4096 bytes); missing
            blocks read as zeros.
    """

    block_size = BLOCK_SIZE
    direct = False
    is_blockdev = False
    readonly = False

    def __init__(self, nblocks: int, durable: dict[int, bytes] | None = None):
        self.nblocks = nblocks
        self.size_bytes = nblocks * BLOCK_SIZE
        self.durable: dict[int, bytes] = dict(durable or {})
        self.volatile: dict[int, bytes] = {}
        self.pending: list[tuple[int, bytes]] = []   # unflushed writes, in order
        self.write_guard: WriteGuard | None = None
        self.cut_at: int | None = None
        self.events = 0          # writes + flushes so far
        self.stats = {"reads": 0, "writes": 0, "flushes": 0,
                      "read_bytes": 0, "written_bytes": 0}

    def _check(self, bno: int, count: int) -> None:
        if bno < 0 or count < 0 or bno + count > self.nblocks:
            raise OSError(22, f"block range {bno}+{count} outside the device "
                              f"({self.nblocks} blocks)")

    def _tick(self) -> None:
        self.events += 1
        if self.cut_at is not None and self.events >= self.cut_at:
            self.cut_at = None
            raise PowerCut(f"power cut at event {self.events}")

    def cut_after(self, n: int) -> None:
        """Make the ``n``-th write or flush from now raise ``PowerCut`` (n >= 1)."""
        self.cut_at = self.events + n

    def read(self, bno: int, count: int = 1) -> bytes:
        self._check(bno, count)
        self.stats["reads"] += 1
        out = bytearray()
        zero = bytes(BLOCK_SIZE)
        for b in range(bno, bno + count):
            data = self.volatile.get(b)
            if data is None:
                data = self.durable.get(b, zero)
            out += data
        return bytes(out)

    def write(self, bno: int, data) -> None:
        data = bytes(data)
        if len(data) % BLOCK_SIZE:
            raise ValueError("writes must be whole blocks")
        count = len(data) // BLOCK_SIZE
        self._check(bno, count)
        if self.write_guard is not None:
            self.write_guard()
        self._tick()
        self.stats["writes"] += 1
        self.stats["written_bytes"] += len(data)
        for i in range(count):
            blk = data[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]
            self.volatile[bno + i] = blk
            self.pending.append((bno + i, blk))

    def flush(self) -> None:
        if self.write_guard is not None:
            self.write_guard()
        self._tick()
        self.stats["flushes"] += 1
        for bno, blk in self.pending:
            self.durable[bno] = blk
        self.pending.clear()
        self.volatile.clear()

    def discard(self, bno: int, count: int) -> None:
        """Discard is only a hint; the simulated device ignores it."""

    def close(self) -> None:
        """Nothing to release; the contents stay for ``crash`` and reopening."""

    # -- power loss -------------------------------------------------------------

    def crash(self, keep: Iterable[int] | None = None, *, tear: dict[int, int] | None = None,
              rng: random.Random | None = None) -> "PowerLossDevice":
        """The device a power cut would leave now.

        Args:
            keep: indexes into ``pending`` of the writes that reached the medium
                (default: none).  Later writes to the same block win, in order.
            tear: index -> number of leading 512-byte sectors of that write that
                reached the medium (the rest keep their previous contents).
            rng: when given (and ``keep`` is None), each pending write is kept,
                dropped or torn at random.

        Returns:
            A new device whose durable contents are the survivors.
        """
        durable = dict(self.durable)
        tear = dict(tear or {})
        if keep is None and rng is not None:
            keep = []
            for i in range(len(self.pending)):
                r = rng.random()
                if r < 0.4:
                    keep.append(i)
                elif r < 0.55:
                    tear[i] = rng.randrange(1, BLOCK_SIZE // SECTOR_SIZE)
        keep = set(keep or ()) | set(tear)
        for i, (bno, blk) in enumerate(self.pending):
            if i not in keep:
                continue
            if i in tear:
                n = tear[i] * SECTOR_SIZE
                old = durable.get(bno, bytes(BLOCK_SIZE))
                blk = blk[:n] + old[n:]
            durable[bno] = blk
        return PowerLossDevice(self.nblocks, durable)

    def snapshot(self) -> "PowerLossDevice":
        """A copy with everything written so far durable (a clean stop)."""
        durable = dict(self.durable)
        for bno, blk in self.pending:
            durable[bno] = blk
        return PowerLossDevice(self.nblocks, durable)

    def save(self, path: str) -> None:
        """Write the durable contents to a sparse image file."""
        with open(path, "wb") as f:
            f.truncate(self.size_bytes)
            for bno in sorted(self.durable):
                f.seek(bno * BLOCK_SIZE)
                f.write(self.durable[bno])
