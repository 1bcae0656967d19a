"""fallocate and SEEK_DATA/SEEK_HOLE through real cluster mounts: what one node
allocates, punches or zeroes, the other node sees (size, holes, zeros); ENOSPC leaves
the volume consistent; QEMU preallocates a raw image and ``qemu-img map``, ``cp
--sparse`` see the holes."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import subprocess

import pytest

from tests.cluster.cluster_util import running_cluster

FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10
MiB = 1 << 20

libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def fallocate(fd: int, mode: int, off: int, length: int) -> None:
    if libc.fallocate(fd, mode, off, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def data_runs(path: str) -> list[tuple[int, int]]:
    """The file's data as [(start, end), ...] by SEEK_DATA / SEEK_HOLE."""
    runs = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            runs.append((start, end))
            pos = end
    finally:
        os.close(fd)
    return runs


def test_fallocate_punch_zero_seen_by_the_other_node(topdir):
    with running_cluster(topdir) as c:
        a = c.mount("n1")
        b = c.mount("n2")
        path_a, path_b = a.p("vm.img"), b.p("vm.img")
        with open(path_a, "wb") as f:
            f.write(b"x" * MiB)
        fd = os.open(path_a, os.O_RDWR)
        try:
            fallocate(fd, 0, 0, 8 * MiB)          # preallocate past the written MiB
        finally:
            os.close(fd)
        assert os.stat(path_b).st_size == 8 * MiB
        assert data_runs(path_b) == [(0, 8 * MiB)]  # preallocated blocks are data
        with open(path_b, "rb") as f:
            assert f.read(MiB) == b"x" * MiB
            assert f.read(MiB) == bytes(MiB)
        # node b punches a hole and zeroes a range inside the data
        fd = os.open(path_b, os.O_RDWR)
        try:
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096, 3 * MiB)
            os.pwrite(fd, b"y" * 8192, 6 * MiB)
            fallocate(fd, FALLOC_FL_ZERO_RANGE, 6 * MiB + 100, 1000)
        finally:
            os.close(fd)
        assert data_runs(path_a) == [(0, 4096), (4096 + 3 * MiB, 8 * MiB)]
        with open(path_a, "rb") as f:
            assert f.read(4096) == b"x" * 4096
            assert f.read(3 * MiB) == bytes(3 * MiB)
            f.seek(6 * MiB)
            assert f.read(8192) == b"y" * 100 + bytes(1000) + b"y" * (8192 - 1100)
        assert os.stat(path_a).st_size == 8 * MiB
        # a punch reaching EOF keeps the size (KEEP_SIZE) and leaves no data there
        fd = os.open(path_a, os.O_RDWR)
        try:
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4 * MiB, 4 * MiB)
        finally:
            os.close(fd)
        assert data_runs(path_b) == [(0, 4096), (4096 + 3 * MiB, 4 * MiB)]
        assert os.stat(path_b).st_size == 8 * MiB


def test_fallocate_enospc_leaves_the_volume_consistent(topdir):
    with running_cluster(topdir, size="64M") as c:
        a = c.mount("n1")
        b = c.mount("n2")
        with open(a.p("small"), "wb") as f:
            f.write(b"keep" * 1024)
        fd = os.open(a.p("small"), os.O_RDWR)
        try:
            with pytest.raises(OSError) as e:
                fallocate(fd, 0, 0, 256 * MiB)
            assert e.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
        with open(b.p("small"), "rb") as f:
            assert f.read() == b"keep" * 1024
        # the space is still usable from the other node
        with open(b.p("other"), "wb") as f:
            f.write(os.urandom(4 * MiB))
    # running_cluster checked the volume (walk and fsck) after the unmounts


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")
def test_qemu_img_preallocates_and_maps_holes(topdir):
    with running_cluster(topdir) as c:
        a = c.mount("n1")
        b = c.mount("n2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", "-o",
                        "preallocation=falloc", a.p("full.img"), "32M"], check=True)
        assert os.stat(b.p("full.img")).st_size == 32 * MiB
        assert os.stat(b.p("full.img")).st_blocks * 512 >= 32 * MiB
        # a sparse image with two written ranges, then its map from the other node
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", a.p("sparse.img"), "64M"],
                       check=True)
        with open(a.p("sparse.img"), "r+b") as f:
            f.seek(MiB)
            f.write(b"a" * MiB)
            f.seek(40 * MiB)
            f.write(b"b" * 4096)
        out = subprocess.run(["qemu-img", "map", "--output=json", "-f", "raw",
                              b.p("sparse.img")], check=True, capture_output=True,
                             text=True).stdout
        data = [(m["start"], m["start"] + m["length"]) for m in json.loads(out)
                if m["data"]]
        # (qemu-img writes the first 4 KiB of a new raw image: alignment probing)
        assert data == [(0, 4096), (MiB, 2 * MiB), (40 * MiB, 40 * MiB + 4096)]
        # cp --sparse copies the data only
        subprocess.run(["cp", "--sparse=always", b.p("sparse.img"), b.p("copy.img")],
                       check=True)
        st = os.stat(a.p("copy.img"))
        assert st.st_size == 64 * MiB and st.st_blocks * 512 <= 2 * MiB
        with open(a.p("copy.img"), "rb") as f:
            f.seek(40 * MiB)
            assert f.read(4096) == b"b" * 4096
