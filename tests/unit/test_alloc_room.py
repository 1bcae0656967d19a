"""``Allocator.alloc_data``'s check for room: blocks freed by the running
transaction are not reusable before it commits, so a write that needs them makes the
journal commit first and then succeeds, whether or not its goal's group has room."""

from __future__ import annotations

import os

from clusterfs.fs.posix import Ctx
from clusterfs.ondisk.format import BLOCK_SIZE
from tests.helpers import DeviceMount, fsck_device, power_loss_volume

ROOT = Ctx(uid=0, gid=0)


def test_a_write_that_needs_the_blocks_just_freed_waits_for_the_commit():
    dev = power_loss_volume()
    m = DeviceMount(dev)
    fs = m.start()
    try:
        alloc = fs.vol.alloc
        fh, a = fs.create(fs.root_ino, b"a", 0o100644, os.O_RDWR, ROOT)
        fill = alloc.free_blocks() - 64        # room for the metadata below
        chunk = bytes(range(256)) * (BLOCK_SIZE // 256) * 64
        off = 0
        while off // BLOCK_SIZE + 64 <= fill:
            fs.write(fh, off, chunk, ROOT)
            off += len(chunk)
        fs.vol.commit()
        fs.setattr(a.bno, size=0, ctx=ROOT)    # its blocks: pending until a commit
        pending = alloc.pending_blocks()
        free_now = alloc.free_blocks() - pending
        assert pending > free_now + 16
        fh2, b = fs.create(fs.root_ino, b"b", 0o100644, os.O_RDWR, ROOT)
        want = free_now + 16                   # more than is free outside the pending
        data = b"\x5a" * (want * BLOCK_SIZE)
        commits = fs.vol.stats["commits"]
        assert fs.write(fh2, 0, data, ROOT) == len(data)
        assert fs.vol.stats["commits"] > commits
        assert fs.read(fh2, 0, len(data)) == data
        fs.release(fh)
        fs.release(fh2)
    finally:
        m.stop()
    code, text = fsck_device(dev)
    assert code == 0, text
