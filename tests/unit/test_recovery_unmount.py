"""A member that unmounts while it waits to recover a dead node's slot leaves the
recovery to the others: that is no error (the unmount of a rolling restart must log
none), while a failed recovery of a member that stays still is one."""

import logging
from types import SimpleNamespace

import trio

from clusterfs.cluster.locks import recovery_lock
from clusterfs.cluster.recovery import Recovery
from lockmgr import EX
from tests.lockmgr.lockmgr_testutil import autojump, mem_cluster


class _Coherence:
    fenced = False

    async def until_fenced(self, fn, *args, **kw):
        return await fn(*args, **kw)


def _member(client) -> SimpleNamespace:
    return SimpleNamespace(slot=0, client=client, coh=_Coherence())


async def _queue_then(c, then) -> list[logging.LogRecord]:
    """Member ``a`` queues for the recovery lock of slot 2 (``b`` holds it); ``then``
    runs once it waits; returns what the recovery logged."""
    a, b = c.nodes
    await b.lock(recovery_lock(2), EX)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("clusterfs.cluster.recovery")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        async with trio.open_nursery() as n:
            rec = Recovery(_member(a))
            n.start_soon(rec.node_down, "c", 2)
            while not a.statistics()["pending"]:
                await trio.sleep(0.01)
            await then(a)
            with trio.fail_after(5):
                while 2 in rec.recovering:
                    await trio.sleep(0.01)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return records


@autojump
async def test_unmount_while_queued_for_a_recovery_is_no_error():
    async with mem_cluster("a", "b", grace=0) as c:
        records = await _queue_then(c, lambda a: a.close())
        assert [r for r in records if r.levelno >= logging.ERROR] == []
        assert any("left to another member" in r.getMessage() for r in records)


@autojump
async def test_a_failed_recovery_of_a_member_that_stays_is_an_error():
    async def fail_the_wait(a):
        # the request in flight fails while the client stays open
        for op in list(a._pending.values()):
            a._finish(op, error=RuntimeError("lost"))

    async with mem_cluster("a", "b", grace=0) as c:
        records = await _queue_then(c, fail_the_wait)
        assert any(r.levelno == logging.ERROR and "failed" in r.getMessage()
                   for r in records)
