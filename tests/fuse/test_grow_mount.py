"""``clusterfs grow`` and real single-node FUSE mounts: a mounted volume grows through
its mount (frozen meanwhile: the control channel), an unmounted one directly; df
shows the new size at once and a file larger than the old volume's free space fits
and reads back; the files written before are intact; fsck clean after each
unmount."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile

import pytest

from tests.cluster.test_freeze import control_ready
from tests.fuse.conftest import check_image
from tests.helpers import Mount, mkfs, run_cli, sha256_file, write_hashed

MiB = 1 << 20


def _write(path: str, size: int, seed: int) -> str:
    return write_hashed(path, size, hashlib.sha256(str(seed).encode()).digest() * (MiB // 32))


_sha = sha256_file


@pytest.fixture
def place():
    top = tempfile.mkdtemp(prefix="cfs-grow-")
    os.chmod(top, 0o755)
    yield top
    shutil.rmtree(top, ignore_errors=True)


def test_grow_then_mount(place):
    vol = os.path.join(place, "vol.img")
    mnt = os.path.join(place, "mnt")
    mkfs(vol, "64M", "--slots", "2")
    m = Mount(vol, mnt, "--node", "alpha").start()
    try:
        before = _write(m.p("before"), 20 * MiB, 1)
        st = os.statvfs(mnt)
        old_blocks, old_free = st.f_blocks, st.f_bfree
        control_ready(mnt)
        proc = run_cli("grow", vol, "--size", "160M")
        assert "grown from 64.0 MiB to 160.0 MiB" in proc.stdout
        # the mounted volume takes it without a remount
        st = os.statvfs(mnt)
        assert st.f_blocks > old_blocks + (90 * MiB) // st.f_frsize
        assert st.f_bfree > old_free + (90 * MiB) // st.f_frsize
        assert _sha(m.p("before")) == before
        # more than the old volume had free: the new groups hold the rest
        size = old_free * st.f_frsize + 30 * MiB
        after = _write(m.p("after"), size, 2)
        assert os.statvfs(mnt).f_bfree < st.f_bfree - size // st.f_frsize + 1
        assert _sha(m.p("after")) == after
    finally:
        m.stop()
    check_image(vol)
    # the device made bigger first (no --size), then grown again
    os.truncate(vol, 200 * MiB)
    run_cli("grow", vol, "-q")
    m = Mount(vol, mnt).start()
    try:
        assert _sha(m.p("before")) == before and _sha(m.p("after")) == after
        assert os.statvfs(mnt).f_blocks * os.statvfs(mnt).f_frsize > 190 * MiB
    finally:
        m.stop()
    check_image(vol)
