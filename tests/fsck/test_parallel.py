"""Dinodes decoded by forked children (``fsck.parallel``): the same results as one
process, in block order, damaged blocks included, whatever happens to a child."""

from __future__ import annotations

import os

import pytest

from clusterfs.ondisk.blockdev import BlockDevice
from clusterfs.ondisk.format import DINODE, UNLINKED, Dinode
from fsck import parallel
from tests.fsck.fsckutil import bitmap_state, findings, flip, fsck, superblock


def dinode_blocks(img: str) -> list[int]:
    sb = superblock(img)
    out = []
    for rg in range(sb.rgrp_count):
        start, length = sb.rgrp_range(rg)
        out.extend(b for b in range(start, start + length)
                   if bitmap_state(img, b) in (DINODE, UNLINKED))
    return out


@pytest.fixture
def small_shares(monkeypatch):
    """Shares and chunks small enough for the test volume (about 100 dinodes)."""
    monkeypatch.setattr(parallel, "MIN_SHARE", 8)
    monkeypatch.setattr(parallel, "CHUNK", 5)
    monkeypatch.setattr(parallel, "workers", lambda: 3)


@pytest.fixture
def forks(monkeypatch):
    """The PIDs of the children ``fsck.parallel`` forks (a list filled as it goes)."""
    pids = []
    real_fork = os.fork

    def fork():
        pid = real_fork()
        if pid:
            pids.append(pid)
        return pid

    monkeypatch.setattr(parallel.os, "fork", fork)
    return pids


def results(img, bnos):
    dev = BlockDevice(img, direct=False, readonly=True)
    try:
        return [(b, di.as_tuple() if di is not None else None,
                 bytes(buf) if buf is not None else None)
                for b, di, buf in parallel.decoded_dinodes(dev, bnos, Dinode)]
    finally:
        dev.close()


def test_plan_covers_every_dinode_once():
    assert parallel.plan(1000, 4) == [0, 1000]            # too few for a child
    for n, k in ((100_000, 2), (100_000, 4), (30_000, 4), (8192 * 3, 2)):
        cuts = parallel.plan(n, k)
        assert cuts[0] == 0 and cuts[-1] == n and cuts == sorted(cuts)
        assert 2 <= len(cuts) - 1 <= k
        assert cuts[1] == int(n * parallel.OWN_SHARE)
        assert all(b - a >= parallel.MIN_SHARE for a, b in zip(cuts[1:], cuts[2:]))


def test_children_give_what_one_process_gives(vol, small_shares, forks, monkeypatch):
    img, _man = vol
    bnos = dinode_blocks(img)
    assert len(bnos) > 40
    damaged = bnos[len(bnos) * 3 // 4]          # in a child's share
    flip(img, damaged, 100)
    got = results(img, bnos)
    assert len(forks) == 2
    monkeypatch.setattr(parallel, "workers", lambda: 1)
    want = results(img, bnos)
    assert got == want
    assert [b for b, _di, _buf in got] == bnos
    bad = [(b, buf) for b, di, buf in got if di is None]
    assert bad == [(damaged, bytes(open(img, "rb").read()[damaged * 4096:
                                                        (damaged + 1) * 4096]))]
    for pid in forks:                           # every child reaped
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def test_failed_child_costs_time_only(vol, small_shares, forks, monkeypatch):
    img, _man = vol
    bnos = dinode_blocks(img)
    real_child = parallel._child

    def dies_after_one_chunk(dev, share, decode, fd, pipe):
        # hands back the first chunk of its share and ends (as a killed child would:
        # the rest never comes)
        real_child(dev, share[:parallel.CHUNK], decode, fd, pipe)

    monkeypatch.setattr(parallel, "_child", dies_after_one_chunk)
    got = results(img, bnos)
    assert len(forks) == 2
    monkeypatch.setattr(parallel, "workers", lambda: 1)
    assert got == results(img, bnos)


def test_left_early_ends_the_children(vol, small_shares, forks):
    img, _man = vol
    bnos = dinode_blocks(img)
    dev = BlockDevice(img, direct=False, readonly=True)
    try:
        gen = parallel.decoded_dinodes(dev, bnos, Dinode)
        first = [next(gen) for _ in range(3)]
        gen.close()
    finally:
        dev.close()
    assert [b for b, _di, _buf in first] == bnos[:3]
    assert len(forks) == 2
    for pid in forks:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def test_fsck_with_children_finds_the_same(vol, small_shares, monkeypatch):
    """A whole check with children: clean, then one damaged dinode found as with one
    process."""
    img, _man = vol
    assert fsck(img)[0] == 0
    bnos = dinode_blocks(img)
    flip(img, bnos[-3], 200)
    code, rep, _ck = fsck(img)
    assert code == 4
    with_children = sorted((f.code, f.ino, f.block) for f in findings(rep))
    assert any(bnos[-3] in (ino, block) for _c, ino, block in with_children)
    monkeypatch.setattr(parallel, "workers", lambda: 1)
    code1, rep1, _ck = fsck(img)
    assert code1 == 4
    assert sorted((f.code, f.ino, f.block) for f in findings(rep1)) == with_children
