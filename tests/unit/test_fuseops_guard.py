"""A FUSE handler answers one request with an errno, whatever goes wrong below it:
only FUSEError may leave a handler, or pyfuse3's main loop (and the mount) ends."""

import errno

import pyfuse3
import pytest
import trio

from clusterfs.errors import CorruptBlock, FSError, Fenced
from clusterfs.fuse.ops import Operations
from journal.errors import JournalAborted


class _FS:
    root_ino = 1031


class _Front:
    def __init__(self, exc):
        self.exc = exc

    async def getattr(self, ino):
        raise self.exc

    async def unlink(self, parent, name):
        raise self.exc


@pytest.mark.parametrize("exc, want", [
    (FSError(errno.ENOENT), errno.ENOENT),
    (CorruptBlock(77, "crc32c mismatch"), errno.EIO),
    (OSError(errno.ENOSPC, "full"), errno.ENOSPC),
    (RuntimeError("a bug"), errno.EIO),
    (KeyError(5), errno.EIO),
    (JournalAborted(Fenced()), errno.EIO),
])
def test_handler_turns_any_error_into_its_errno(exc, want, caplog):
    ops = Operations(_FS(), _Front(exc))

    async def go():
        for call in (lambda: ops.getattr(5, None), lambda: ops.unlink(5, b"x", None)):
            with pytest.raises(pyfuse3.FUSEError) as info:
                await call()
            assert info.value.errno == want
    trio.run(go)
    if isinstance(exc, (RuntimeError, KeyError)):
        assert "answering EIO" in caplog.text and "Traceback" in caplog.text
    if isinstance(exc, JournalAborted):
        # the state of a node whose journal stopped, not a bug: one line a request
        assert "Traceback" not in caplog.text
        assert [r.getMessage() for r in caplog.records] == [
            f"{name}(5, {arg!r}): {exc}; answering EIO" for name, arg in
            (("getattr", None), ("unlink", b"x"))]


def test_cancellation_is_not_swallowed():
    ops = Operations(_FS(), _Front(trio.Cancelled._create()))

    async def go():
        with pytest.raises(trio.Cancelled):
            await ops.getattr(5, None)
    trio.run(go)
