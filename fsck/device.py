"""Device wrappers for fsck: an in-memory overlay, and tolerant batched reads.

``OverlayDevice`` keeps every write in memory and shows it to later reads; the
device under it is never written.  ``fsck -n`` checks a volume whose dead nodes'
journals still need replay by replaying them into an overlay: the check then sees
the volume as a replay would leave it, and nothing reaches the disk.  The same
overlay can hide blocks (they read as zeros): that is how the committed prefix of a
journal that is corrupt in the middle is replayed without the part after the damage.
"""

from __future__ import annotations

import bisect
import os

from clusterfs.ondisk.blockhdr import BLOCK_SIZE

_ZERO = bytes(BLOCK_SIZE)


class OverlayDevice:
    """Reads see the overlay's writes; nothing is written to ``dev``.

    Args:
        dev: the device underneath (only ``read`` and ``nblocks`` are used).
        hidden: blocks that read as zeros (unless written in the overlay).
    """

    readonly = False
    is_blockdev = False

    def __init__(self, dev, hidden=()):
        self.dev = dev
        self.nblocks = dev.nblocks
        self.block_size = BLOCK_SIZE
        self.blocks: dict[int, bytes] = {}
        for bno in hidden:
            self.blocks[bno] = _ZERO
        self._keys: list[int] | None = None

    def read(self, bno: int, count: int = 1) -> bytes:
        if not self.blocks:
            return self.dev.read(bno, count)
        if self._keys is None:
            self._keys = sorted(self.blocks)
        i = bisect.bisect_left(self._keys, bno)
        if i >= len(self._keys) or self._keys[i] >= bno + count:
            return self.dev.read(bno, count)
        if count == 1:
            return self.blocks[bno]
        out = bytearray()
        b = bno
        while b < bno + count:
            if b in self.blocks:
                out += self.blocks[b]
                b += 1
                continue
            # a run of blocks the overlay does not hold
            j = bisect.bisect_left(self._keys, b)
            end = min(bno + count, self._keys[j] if j < len(self._keys) else bno + count)
            out += self.dev.read(b, end - b)
            b = end
        return bytes(out)

    def write(self, bno: int, data) -> None:
        data = bytes(data)
        if len(data) % BLOCK_SIZE:
            raise ValueError("writes must be whole blocks")
        if bno < 0 or bno + len(data) // BLOCK_SIZE > self.nblocks:
            raise OSError(22, f"block range {bno}+{len(data) // BLOCK_SIZE} outside the device")
        for i in range(len(data) // BLOCK_SIZE):
            self.blocks[bno + i] = data[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]
        self._keys = None

    def flush(self) -> None:
        """Nothing is durable in an overlay."""

    def discard(self, bno: int, count: int) -> None:
        """Discard is a hint; ignored."""

    def close(self) -> None:
        """The device underneath belongs to the caller."""

    def written(self, exclude=()) -> dict[int, bytes]:
        """Blocks written through the overlay (not the hidden ones)."""
        ex = set(exclude)
        return {b: d for b, d in self.blocks.items() if b not in ex}


PREFETCH_MIN = 32      # blocks announced after a page-cache miss (posix_fadvise WILLNEED)
PREFETCH_MAX = 1024    # ... growing to this while the misses go on


def read_blocks(dev, bnos, *, max_gap: int = 0, max_run: int = 256):
    """Yield (bno, 4096 bytes or None if unreadable) for sorted block numbers.

    Neighbouring blocks (at most ``max_gap`` apart) are read with one request of at
    most ``max_run`` blocks; a request that fails is retried block by block so that
    one bad sector costs only its own block.

    On a buffered image file each request first asks the page cache only
    (``RWF_NOWAIT``).  Where a block is missing, the blocks ahead are announced
    (``posix_fadvise(WILLNEED)``) so that the kernel reads them with many requests in
    flight instead of one at a time: ``PREFETCH_MIN`` of them, twice as many each
    time a miss follows soon after the last announced block (a cold cache), back to
    ``PREFETCH_MIN`` after a stretch of hits (a few blocks evicted from a warm one:
    one syscall per block announced is not free).
    """
    if isinstance(dev, OverlayDevice) and not dev.blocks:
        dev = dev.dev
    n = len(bnos)
    fd = getattr(dev, "fd", -1)
    direct = isinstance(dev, OverlayDevice) or getattr(dev, "direct", True) or \
        not isinstance(fd, int) or fd < 0
    nowait = None if direct else getattr(os, "RWF_NOWAIT", None)
    advise = getattr(os, "posix_fadvise", None)
    announced = 0           # bnos[:announced] were announced or need not be
    window = PREFETCH_MIN

    def cached(i: int, first: int, nbytes: int):
        """The bytes if the page cache has them all; else announce what is ahead."""
        nonlocal announced, window
        buf = bytearray(nbytes)
        try:
            if os.preadv(fd, [buf], first * BLOCK_SIZE, nowait) == nbytes:
                return buf
        except OSError:         # BlockingIOError: not all cached; others: pread says
            pass
        if advise is not None:
            window = min(window * 2, PREFETCH_MAX) if announced and \
                i < announced + window else PREFETCH_MIN
            stop = min(n, i + window)
            try:
                for k in range(i, stop):
                    advise(fd, bnos[k] * BLOCK_SIZE, BLOCK_SIZE, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
            announced = stop
        return None

    def read(first: int, count: int):
        if direct:
            return dev.read(first, count)
        # a buffered image file: plain pread (BlockDevice.read checks and counts)
        data = os.pread(fd, count * BLOCK_SIZE, first * BLOCK_SIZE)
        if len(data) != count * BLOCK_SIZE:
            raise OSError(5, f"short read at block {first}")
        return data

    i = 0
    while i < n:
        first = bnos[i]
        j = i + 1
        while j < n and bnos[j] - bnos[j - 1] <= max_gap + 1 and bnos[j] - first < max_run:
            j += 1
        last = bnos[j - 1]
        count = last - first + 1
        try:
            data = cached(i, first, count * BLOCK_SIZE) \
                if nowait is not None and i >= announced else None
            if data is None:
                data = read(first, count)
        except OSError:
            for k in range(i, j):
                try:
                    one = read(bnos[k], 1)
                except OSError:
                    one = None
                yield bnos[k], one
        else:
            if j - i == 1:
                yield first, data
            else:
                mv = memoryview(data)
                for k in range(i, j):
                    off = (bnos[k] - first) * BLOCK_SIZE
                    yield bnos[k], mv[off:off + BLOCK_SIZE]
        i = j
