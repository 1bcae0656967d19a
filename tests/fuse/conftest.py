"""Fixtures of the FUSE tests: one mount shared by a whole module (each test works
in its own directory), checked for consistency after its clean unmount."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from tests.helpers import Mount, check_consistency, fsck_clean, mkfs


def check_image(path: str, tail_zero: bool = True) -> None:
    """The unmounted volume is consistent (walk + fsck once it exists).  After a
    crash, bytes past EOF in a file's last block are allowed (``tail_zero``)."""
    from clusterfs.ondisk.blockdev import BlockDevice
    dev = BlockDevice(path, readonly=True)
    try:
        problems = check_consistency(dev, tail_zero=tail_zero)
    finally:
        dev.close()
    assert problems == [], "\n".join(problems[:30])
    fsck_clean(path)


@pytest.fixture(scope="module")
def shared_mount(tmp_path_factory):
    """One real FUSE mount of a fresh 1 GiB volume for the whole module.

    The mount point lies in a world-traversable directory so that tests can act as
    other users (pytest's own temporary directories are private to root)."""
    d = tmp_path_factory.mktemp("shared")
    vol = str(d / "vol.img")
    mkfs(vol, "1G")
    top = tempfile.mkdtemp(prefix="cfs-test-")
    os.chmod(top, 0o755)
    m = Mount(vol, os.path.join(top, "mnt")).start()
    try:
        yield m
    finally:
        m.stop()
        shutil.rmtree(top, ignore_errors=True)
    check_image(vol)


@pytest.fixture
def wd(shared_mount, request):
    """A fresh directory on the shared mount for one test."""
    path = shared_mount.p(request.node.name.replace("/", "_").replace("[", "_")
                          .replace("]", "_"))
    os.mkdir(path)
    os.chmod(path, 0o777)
    return path
