"""A hardware crc32c for the fsck process, when one is installed.

fsck verifies the crc32c of every metadata block it reads: on a volume of 100,000
files that is some 400 MB of dinodes, and the table-driven ``crcmod`` function of
``clusterfs.blockhdr`` (about 100 MB/s) would be most of fsck's time.  The ``crc32c``
package computes the same function with the CPU's CRC32 instruction (SSE4.2, ARMv8),
some 50 times faster.  ``accelerate()`` checks that it agrees with ``crcmod`` (values
and chaining) and then makes ``clusterfs.blockhdr`` use it in this process; without
the package nothing changes.  The function is the same, so every result is the same.
"""

from __future__ import annotations

from clusterfs import blockhdr

_SLOW = blockhdr.crc32c
_done: str | None = None


def accelerate() -> str:
    """Use a hardware crc32c in this process if one is installed; returns its name."""
    global _done
    if _done is not None:
        return _done
    if getattr(blockhdr, "CRC32C_IMPL", None) == "crc32c":
        _done = "crc32c"            # blockhdr picked the fast one itself
        return _done
    _done = "crcmod"
    try:
        from crc32c import crc32c as fast
    except ImportError:
        return _done
    samples = [b"", b"a", bytes(4096), bytes(range(256)) * 16, b"123456789"]
    try:
        for s in samples:
            if fast(s) != _SLOW(s) or fast(memoryview(s)) != _SLOW(s):
                return _done
            if fast(s, 0x1234567) != _SLOW(s, 0x1234567):
                return _done
            if fast(b"tail", fast(s)) != _SLOW(s + b"tail"):
                return _done
    except Exception:
        return _done
    blockhdr.crc32c = fast
    _done = "crc32c"
    return _done
