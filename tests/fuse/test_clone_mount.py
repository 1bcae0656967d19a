"""Reflink clones through a real single-node mount: ``cp --reflink=auto`` (coreutils
falls back from FICLONE to copy_file_range), os.copy_file_range with unaligned
offsets, ``clusterfs clone`` and its refusals, qemu-img's copy offloading, and df:
a clone takes no space until either file changes, and the space comes back with the
last sharer.  The module's volume is checked (walk and fsck) after its unmount."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.helpers import run_cli, sha256_file, write_hashed

MiB = 1 << 20
BS = 4096


def _free_blocks(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bfree * st.f_frsize // BS


def _write_random(path: str, size: int, seed: int = 0) -> str:
    return write_hashed(path, size, os.urandom(MiB) if seed == 0 else bytes([seed]) * MiB)


_sha = sha256_file


def test_cp_reflink_auto_shares_the_blocks(wd):
    src, dst = os.path.join(wd, "src"), os.path.join(wd, "dst")
    digest = _write_random(src, 64 * MiB + 1000)
    free = _free_blocks(wd)
    subprocess.run(["cp", "--reflink=auto", src, dst], check=True)
    assert free - _free_blocks(wd) <= 3            # a dinode and the copied tail
    assert _sha(dst) == digest
    assert os.stat(dst).st_blocks * 512 >= 64 * MiB     # each file counts its blocks
    # copy-on-write: writes to the copy leave the source alone, and cost their blocks
    with open(dst, "r+b") as f:
        f.seek(10 * MiB + 100)
        f.write(b"x" * (2 * MiB))
    assert _sha(src) == digest and _sha(dst) != digest
    assert 512 <= free - _free_blocks(wd) <= 520
    with open(dst, "rb") as f:
        f.seek(10 * MiB + 99)
        assert f.read(2 * MiB + 2)[1:-1] == b"x" * (2 * MiB)


def test_copy_file_range_unaligned(wd):
    src, dst = os.path.join(wd, "src"), os.path.join(wd, "dst")
    data = os.urandom(3 * MiB + 777)
    with open(src, "wb") as f:
        f.write(data)
    with open(dst, "wb") as f:
        f.write(b"d" * 5000)
    want = bytearray(b"d" * 5000)
    fi = os.open(src, os.O_RDONLY)
    fo = os.open(dst, os.O_RDWR)
    try:
        free = _free_blocks(wd)
        # (offset in, offset out, length): the same offset within a block (head and
        # tail copied, middle shared), different ones (copied), past the end
        for off_in, off_out, n in ((100, 8192 + 100, MiB), (1, 2 * MiB + 3, 300000),
                                   (3 * MiB, 4 * MiB, 10 * MiB), (0, 5 * MiB, 4096)):
            got = os.copy_file_range(fi, fo, n, off_in, off_out)
            n = max(0, min(n, len(data) - off_in))
            assert got == n
            if off_out > len(want):
                want += bytes(off_out - len(want))
            want[off_out:off_out + n] = data[off_in:off_in + n]
        assert os.pread(fo, len(want) + 10, 0) == want
        # the first copy shared 255 blocks: the copies took ~1.3 MiB, not ~2.3
        used = free - _free_blocks(wd)
        assert used <= (300000 + 777 + 4096 + 3 * 4096) // BS + 4
    finally:
        os.close(fi)
        os.close(fo)
    # within one file, not overlapping; overlapping is EINVAL
    fd = os.open(src, os.O_RDWR)
    try:
        assert os.copy_file_range(fd, fd, MiB, 0, 2 * MiB, ) == MiB
        assert os.pread(fd, MiB, 2 * MiB) == data[:MiB]
        with pytest.raises(OSError):
            os.copy_file_range(fd, fd, MiB, 0, MiB // 2)
    finally:
        os.close(fd)


def test_clusterfs_clone_of_256mib_takes_no_space(wd):
    src, dst = os.path.join(wd, "vm.img"), os.path.join(wd, "vm-clone.img")
    digest = _write_random(src, 256 * MiB)
    free = _free_blocks(wd)
    used = _df_used(wd)
    proc = run_cli("clone", src, dst)
    assert proc.stdout == "" and proc.stderr == ""
    assert free - _free_blocks(wd) <= 2          # the new dinode (and its tree)
    assert _df_used(wd) - used <= 2
    assert _sha(dst) == digest
    assert os.stat(dst).st_mode == os.stat(src).st_mode
    # the space comes back with the last sharer only
    os.unlink(src)
    assert _free_blocks(wd) - free <= 2
    with open(dst, "r+b") as f:                  # the clone still writes in place
        f.write(b"y" * MiB)
    assert _free_blocks(wd) - free <= 2
    os.unlink(dst)
    assert _free_blocks(wd) - free >= 256 * MiB // BS


def _df_used(path: str) -> int:
    """df's used 4 KiB blocks of the mount holding ``path``."""
    out = subprocess.run(["df", "-B4096", "--output=used", path], check=True,
                         capture_output=True, text=True).stdout.split()
    return int(out[-1])


def test_clusterfs_clone_refusals(wd, tmp_path):
    src = os.path.join(wd, "src")
    with open(src, "wb") as f:
        f.write(os.urandom(3 * BS))
    other = tmp_path / "elsewhere"
    (tmp_path / "plain").write_bytes(b"x")
    for args, msg in (((src, str(other)), "not on the same clusterfs mount"),
                      ((str(tmp_path / "plain"), os.path.join(wd, "x")),
                       "is not on a clusterfs mount"),
                      ((os.path.join(wd, "missing"), os.path.join(wd, "x")),
                       "No such file"),
                      ((wd, os.path.join(wd, "x")), "not a regular file")):
        proc = run_cli("clone", *args, check=False)
        assert proc.returncode == 2 and msg in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "Traceback" not in proc.stderr
    assert not other.exists() and not os.path.exists(os.path.join(wd, "x"))
    # an existing destination: refused, replaced with --force; a directory: inside
    dst = os.path.join(wd, "dst")
    with open(dst, "wb") as f:
        f.write(b"old")
    proc = run_cli("clone", src, dst, check=False)
    assert proc.returncode == 2 and "exists" in proc.stderr
    with open(dst, "rb") as f:
        assert f.read() == b"old"
    run_cli("clone", "--force", src, dst)
    os.mkdir(os.path.join(wd, "d"))
    run_cli("clone", src, os.path.join(wd, "d"))
    for p in (dst, os.path.join(wd, "d", "src")):
        assert _sha(p) == _sha(src)


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")
def test_qemu_img_convert_copy_offloading(wd):
    """``qemu-img convert -C`` (copy offloading: copy_file_range in 2 MiB pieces).
    The single-node mount answers ENOSYS to file locks (the kernel then does not
    take them for FUSE), so qemu's image locking is turned off here; the cluster
    test runs it with locks."""
    src, dst = os.path.join(wd, "disk.raw"), os.path.join(wd, "copy.raw")
    digest = _write_random(src, 32 * MiB)
    free = _free_blocks(wd)
    with open(dst, "wb") as f:
        f.truncate(32 * MiB)
    subprocess.run(["qemu-img", "convert", "-C", "-n",
                    "--image-opts", f"driver=raw,file.driver=file,file.filename={src},"
                                    f"file.locking=off",
                    "--target-image-opts", f"driver=raw,file.driver=file,"
                                           f"file.filename={dst},file.locking=off"],
                   check=True)
    assert _sha(dst) == digest
    assert free - _free_blocks(wd) <= 4
