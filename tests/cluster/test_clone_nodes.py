"""Reflink clones across two cluster nodes: a clone made on node A stays intact while
node B writes the source (copy-on-write under the groups' locks), each node sees
the other's bytes, and the space the clone shares comes back only when its last
sharer goes, whichever node deletes it.  ``cp --reflink=auto`` and ``qemu-img convert
-C`` (with QEMU's image locks, cluster-wide here) clone through copy_file_range too.
The free space is read from the unmounted volume's group headers (a cluster node
knows other nodes' groups only by estimates)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess

import pytest

from tests.cluster.cluster_util import running_cluster, sha256_of
from tests.helpers import run_cli

MiB = 1 << 20
BS = 4096


def _volume_free(volume: str) -> int:
    """Free blocks of an unmounted volume, from its group headers."""
    from clusterfs.fs.volume import Volume
    vol = Volume.open(volume, readonly=True)
    try:
        return sum(vol.rgrp(i).free for i in range(vol.sb.rgrp_count))
    finally:
        vol.close()


def _pattern(seed: int, size: int) -> bytes:
    return hashlib.sha256(b"%d" % seed).digest() * (size // 32)


def test_clone_survives_writes_from_another_node_and_space_returns(topdir):
    with running_cluster(topdir) as c:
        free0 = _volume_free(c.volume)
        a = c.mount("a")
        b = c.mount("b")
        data = os.urandom(MiB) * 64
        with open(a.p("src.img"), "wb") as f:
            f.write(data)
        run_cli("clone", a.p("src.img"), a.p("clone.img"))
        want = hashlib.sha256(data).hexdigest()
        assert sha256_of(b.p("clone.img")) == want
        # node b writes the source (whole and partial blocks): its own copies
        patch = _pattern(1, 2 * MiB)
        fd = os.open(b.p("src.img"), os.O_RDWR)
        try:
            os.pwrite(fd, patch, 10 * MiB + 100)
            os.pwrite(fd, patch[:BS], 40 * MiB)
            os.fsync(fd)
        finally:
            os.close(fd)
        changed = bytearray(data)
        changed[10 * MiB + 100:12 * MiB + 100] = patch
        changed[40 * MiB:40 * MiB + BS] = patch[:BS]
        for node in (a, b):
            assert sha256_of(node.p("clone.img")) == want
            assert sha256_of(node.p("src.img")) == hashlib.sha256(changed).hexdigest()
        # node a writes the clone, node b reads both
        with open(a.p("clone.img"), "r+b") as f:
            f.seek(30 * MiB)
            f.write(b"c" * MiB)
        clone = bytearray(data)
        clone[30 * MiB:31 * MiB] = b"c" * MiB
        assert sha256_of(b.p("clone.img")) == hashlib.sha256(clone).hexdigest()
        assert sha256_of(b.p("src.img")) == hashlib.sha256(changed).hexdigest()
        # the source goes (from node b): the clone keeps the blocks it shared
        os.unlink(b.p("src.img"))
        c.unmount("a")
        c.unmount("b")
        used = free0 - _volume_free(c.volume)
        assert 64 * MiB // BS <= used <= 64 * MiB // BS + 8, used
        # the clone goes (from node a): everything comes back
        a = c.mount("a")
        assert sha256_of(a.p("clone.img")) == hashlib.sha256(clone).hexdigest()
        os.unlink(a.p("clone.img"))
        c.unmount("a")
        assert _volume_free(c.volume) == free0
    # running_cluster checked the volume (walk and fsck) after the unmounts


def test_cp_and_qemu_img_clone_on_a_cluster(topdir):
    """cp of a file node a made, on node b; qemu-img's copy offloading of a sparse
    image (coreutils 9.1 copies a sparse file with read and write: ``clusterfs
    clone`` and qemu-img keep its holes and share its data)."""
    with running_cluster(topdir) as c:
        a = c.mount("a")
        with open(a.p("disk.raw"), "wb") as f:
            f.write(os.urandom(MiB) * 16)
        with open(a.p("sparse.raw"), "wb") as f:
            f.write(os.urandom(MiB) * 16)
            f.truncate(48 * MiB)                  # a hole at the end
        want = sha256_of(a.p("disk.raw"))
        want_sparse = sha256_of(a.p("sparse.raw"))
        c.unmount("a")
        free0 = _volume_free(c.volume)
        a = c.mount("a")
        b = c.mount("b")
        # coreutils: FICLONE (refused), then copy_file_range
        subprocess.run(["cp", "--reflink=auto", b.p("disk.raw"), b.p("cp.raw")],
                       check=True)
        assert sha256_of(a.p("cp.raw")) == want
        if shutil.which("qemu-img"):
            # copy offloading, QEMU's image locks taken cluster-wide
            subprocess.run(["qemu-img", "convert", "-C", "-f", "raw", "-O", "raw",
                            a.p("sparse.raw"), a.p("qemu.raw")], check=True)
            assert sha256_of(b.p("qemu.raw")) == want_sparse
        run_cli("clone", b.p("sparse.raw"), b.p("clone.raw"))
        assert sha256_of(a.p("clone.raw")) == want_sparse
        c.unmount("a")
        c.unmount("b")
        # nothing but three dinodes more
        assert free0 - _volume_free(c.volume) <= 3


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for the mounts")
def test_clone_refuses_a_path_on_another_node_s_mount(topdir):
    """Two mount points of one volume are two mounts: the command refuses (the
    kernel would copy the bytes instead of sharing them)."""
    with running_cluster(topdir) as c:
        a = c.mount("a")
        b = c.mount("b")
        with open(a.p("f"), "wb") as f:
            f.write(b"x" * BS)
        proc = run_cli("clone", a.p("f"), b.p("g"), check=False)
        assert proc.returncode == 2 and "not on the same clusterfs mount" in proc.stderr
        assert not os.path.exists(b.p("g"))
