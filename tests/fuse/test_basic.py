"""Basic life cycle through a real FUSE mount: write, unmount, remount, read back."""

import errno
import hashlib
import os

import pytest

from tests.helpers import Mount, fsck_clean, mkfs, run_cli


def test_write_remount_read(volume, tmp_path):
    m = Mount(volume, str(tmp_path / "mnt")).start()
    try:
        os.mkdir(m.p("dir"))
        data = os.urandom(5 * 1024 * 1024 + 17)
        with open(m.p("dir", "big"), "wb") as f:
            f.write(data)
        with open(m.p("small"), "w") as f:
            f.write("hello\n")
        os.symlink("dir/big", m.p("link"))
    finally:
        m.stop()
    m = Mount(volume, str(tmp_path / "mnt")).start()
    try:
        with open(m.p("link"), "rb") as f:
            assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()
        assert open(m.p("small")).read() == "hello\n"
        assert sorted(os.listdir(m.path)) == ["dir", "link", "small"]
    finally:
        m.stop()
    fsck_clean(volume)


def test_preferred_io_size_is_one_mib_for_files(mounted):
    """st_blksize: 1 MiB for regular files (programs size their buffers by it, and
    every FUSE request costs), a block for the rest."""
    with open(mounted.p("f"), "wb") as f:
        f.write(b"x")
    os.mkdir(mounted.p("d"))
    assert os.stat(mounted.p("f")).st_blksize == 1 << 20
    assert os.stat(mounted.p("d")).st_blksize == 4096


def test_second_single_node_mount_refused(mounted, tmp_path):
    other = Mount(mounted.volume, str(tmp_path / "mnt2"))
    with pytest.raises(AssertionError, match="already mounted|in use"):
        other.start()


def test_full_volume_gives_enospc_and_stays_consistent(tmp_path):
    vol = str(tmp_path / "small.img")
    mkfs(vol, "32M")
    m = Mount(vol, str(tmp_path / "mnt")).start()
    try:
        chunk = os.urandom(1 << 20)
        with pytest.raises(OSError) as exc:
            with open(m.p("fill"), "wb") as f:
                for _ in range(64):
                    f.write(chunk)
                    f.flush()
        assert exc.value.errno == errno.ENOSPC
        # the volume keeps working: delete, write again
        os.unlink(m.p("fill"))
        with open(m.p("after"), "wb") as f:
            f.write(chunk)
        assert open(m.p("after"), "rb").read() == chunk
    finally:
        m.stop()
    fsck_clean(vol)


def test_mkfs_refuses_existing_filesystem(volume):
    proc = run_cli("mkfs", volume, "--size", "256M", check=False)
    assert proc.returncode != 0
    assert "already holds a clusterfs" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    run_cli("mkfs", volume, "--size", "256M", "--force", "-q")


def test_bad_cli_argument_is_one_line(tmp_path):
    proc = run_cli("mkfs", str(tmp_path / "x.img"), "--size", "lots", check=False)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    # a journal below the smallest the journal takes (a traceback before)
    proc = run_cli("mkfs", str(tmp_path / "x.img"), "--size", "64M", "--journal-size",
                   "100K", check=False)
    assert proc.returncode == 2 and "below the smallest journal" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli("mount", str(tmp_path / "missing.img"), str(tmp_path), "-f", check=False)
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
