"""An fsync on a cluster member whose journal stopped meanwhile (the node fenced
itself, or the device failed, while the commit was on its way) is EIO, and the node
fences itself, as for every other request (``Coherence.failed``); it must not reach
the FUSE layer as an unexpected error."""

from __future__ import annotations

import errno
from types import SimpleNamespace

import pytest
import trio

from clusterfs.cluster.coherence import Coherence
from clusterfs.cluster.frontend import ClusterFrontend
from clusterfs.errors import FSError, Fenced
from journal.errors import JournalAborted


class _Coherence:
    """What ``ClusterFrontend.fsync`` uses of a member's coherence; ``failed`` is the
    real one."""

    failed = Coherence.failed

    def __init__(self, vol):
        self.fs = SimpleNamespace(handles={7: object()})
        self.vol = vol
        self.run = None
        self.fences: list[str] = []

    def check(self) -> None:
        if self.fences:
            raise FSError(errno.EIO, "node is fenced")

    def fence(self, why: str) -> None:
        self.fences.append(why)


class _Volume:
    def __init__(self, exc: Exception):
        self.exc = exc

    async def commit_in_thread(self, run_sync) -> None:
        raise self.exc


@pytest.mark.parametrize("exc", [JournalAborted(Fenced()), Fenced()])
def test_fsync_on_a_stopped_journal_is_eio_and_fences(exc):
    coh = _Coherence(_Volume(exc))
    front = ClusterFrontend(coh, SimpleNamespace())

    async def go():
        with pytest.raises(FSError) as info:
            await front.fsync(7, False)
        assert info.value.errno == errno.EIO
    trio.run(go)
    assert len(coh.fences) == 1, coh.fences
