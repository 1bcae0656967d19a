"""POSIX behaviour through a real FUSE mount: every operation of issue 2 section 6
and its error cases.  One mount serves the module (``shared_mount``); each test
works in its own directory (``wd``) and the volume is checked after unmount."""

from __future__ import annotations

import errno
import os
import random
import socket
import stat
import time

import pytest

from tests.fuse.posix_util import (RENAME_EXCHANGE, RENAME_NOREPLACE, UTIME_NOW, UTIME_OMIT,
                                   as_user, getdents, on_local_fs, privilege_transcript,
                                   renameat2, utimensat)

INLINE_MAX = 3456
BS = 4096


def _err(fn, *args, **kw) -> int:
    """The errno ``fn`` fails with (AssertionError if it succeeds)."""
    try:
        fn(*args, **kw)
    except OSError as e:
        return e.errno
    raise AssertionError(f"{fn.__name__}{args} succeeded")


def _write(path, data: bytes, mode="wb"):
    with open(path, mode) as f:
        f.write(data)


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# -- attributes ----------------------------------------------------------------------

def test_chmod_chown(wd):
    p = os.path.join(wd, "f")
    _write(p, b"x")
    os.chmod(p, 0o4751)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o4751
    os.chmod(p, 0o600)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert stat.S_ISREG(os.stat(p).st_mode)
    os.chown(p, 1234, 5678)
    st = os.stat(p)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.chown(p, -1, 42)
    st = os.stat(p)
    assert (st.st_uid, st.st_gid) == (1234, 42)
    # lchown of a symlink changes the link, not its target
    os.symlink("f", os.path.join(wd, "l"))
    os.lchown(os.path.join(wd, "l"), 77, 88)
    assert os.lstat(os.path.join(wd, "l")).st_uid == 77
    assert os.stat(p).st_uid == 1234
    # ctime moves on a chmod
    c0 = os.stat(p).st_ctime_ns
    time.sleep(0.01)
    os.chmod(p, 0o644)
    assert os.stat(p).st_ctime_ns > c0
    # directories keep their type bits
    d = os.path.join(wd, "d")
    os.mkdir(d)
    os.chmod(d, 0o1777)
    assert os.stat(d).st_mode == stat.S_IFDIR | 0o1777


@pytest.mark.parametrize("start", [0, 100, INLINE_MAX, INLINE_MAX + 1, 3 * BS + 17,
                                   200_000])
def test_truncate_up_and_down(wd, start):
    p = os.path.join(wd, "f")
    rng = random.Random(start)
    data = rng.randbytes(start)
    _write(p, data)
    model = bytearray(data)
    sizes = [start + 1, start + 5000, INLINE_MAX, INLINE_MAX + 1, BS - 1, BS, BS + 1,
             2 * BS + 100, 10, 0, 3 * BS + 17, 1 << 20, 12345, 1]
    with open(p, "r+b") as f:
        for size in sizes:
            if rng.random() < 0.5:
                os.truncate(p, size)
            else:
                f.truncate(size)
            if size < len(model):
                del model[size:]
            else:
                model += bytes(size - len(model))
            assert os.stat(p).st_size == size
            f.seek(0)
            assert f.read() == bytes(model), f"after truncate to {size}"
            # write into the middle after each truncate, and past EOF
            off = rng.randrange(0, size + 100)
            chunk = rng.randbytes(rng.choice([1, 100, 5000]))
            f.seek(off)
            f.write(chunk)
            f.flush()
            if off > len(model):
                model += bytes(off - len(model))
            model[off:off + len(chunk)] = chunk
            f.seek(0)
            assert f.read() == bytes(model)
    assert _read(p) == bytes(model)
    # truncate on a directory or through a read-only fd fails
    assert _err(os.truncate, wd, 0) == errno.EISDIR
    with open(p, "rb") as f:
        assert _err(os.ftruncate, f.fileno(), 0) in (errno.EINVAL, errno.EBADF)


def test_truncate_frees_blocks_and_reports_st_blocks(wd):
    p = os.path.join(wd, "f")
    _write(p, os.urandom(1 << 20))
    st = os.stat(p)
    assert st.st_blocks >= (1 << 20) // 512
    os.truncate(p, BS + 1)
    assert os.stat(p).st_blocks <= 2 * BS // 512 + 8
    os.truncate(p, 1 << 30)         # sparse: no blocks
    assert os.stat(p).st_blocks <= 2 * BS // 512 + 8
    with open(p, "rb") as f:
        f.seek((1 << 30) - 10)
        assert f.read() == bytes(10)


def test_utimens(wd):
    p = os.path.join(wd, "f")
    _write(p, b"abc")
    os.utime(p, ns=(1_000_000_123, 2_000_000_456))
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
    # UTIME_OMIT leaves one alone
    utimensat(p, (5, 0), (0, UTIME_OMIT))
    st = os.stat(p)
    assert st.st_atime_ns == 5_000_000_000 and st.st_mtime_ns == 2_000_000_456
    utimensat(p, (0, UTIME_OMIT), (7, 9))
    st = os.stat(p)
    assert st.st_atime_ns == 5_000_000_000 and st.st_mtime_ns == 7_000_000_009
    # UTIME_NOW sets the current time
    before = time.time_ns() - 2_000_000_000
    utimensat(p, (0, UTIME_NOW), (0, UTIME_OMIT))
    st = os.stat(p)
    assert st.st_atime_ns >= before and st.st_mtime_ns == 7_000_000_009
    utimensat(p, (0, UTIME_OMIT), (0, UTIME_NOW))
    st = os.stat(p)
    assert st.st_mtime_ns >= before
    os.utime(p)                     # both now
    st = os.stat(p)
    assert st.st_atime_ns >= before and st.st_mtime_ns >= before
    # negative and pre-1970 times, and a symlink's own times
    os.utime(p, ns=(-1_500_000_000, 0))
    assert os.stat(p).st_atime_ns == -1_500_000_000
    os.symlink("f", os.path.join(wd, "l"))
    utimensat(os.path.join(wd, "l"), (11, 0), (12, 0), follow=False)
    assert os.lstat(os.path.join(wd, "l")).st_mtime_ns == 12_000_000_000
    assert os.stat(p).st_mtime_ns != 12_000_000_000
    # writing moves mtime and ctime
    os.utime(p, ns=(0, 0))
    _write(p, b"more", "ab")
    assert os.stat(p).st_mtime_ns > 0


# -- creating nodes --------------------------------------------------------------------

def test_mknod_all_types(wd):
    j = lambda n: os.path.join(wd, n)        # noqa: E731
    os.mknod(j("reg"), stat.S_IFREG | 0o640)
    os.mkfifo(j("fifo"), 0o600)
    os.mknod(j("chr"), stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.mknod(j("blk"), stat.S_IFBLK | 0o600, os.makedev(7, 200))
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(j("sock"))
    finally:
        s.close()
    st = os.lstat(j("reg"))
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640 and st.st_size == 0
    assert stat.S_ISFIFO(os.lstat(j("fifo")).st_mode)
    st = os.lstat(j("chr"))
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    st = os.lstat(j("blk"))
    assert stat.S_ISBLK(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (7, 200)
    assert stat.S_ISSOCK(os.lstat(j("sock")).st_mode)
    assert _err(os.mknod, j("reg"), stat.S_IFREG | 0o600) == errno.EEXIST
    # a FIFO on the mount works as a FIFO (the kernel serves it)
    pid = os.fork()
    if pid == 0:
        try:
            with open(j("fifo"), "wb") as f:
                f.write(b"through the fifo")
        finally:
            os._exit(0)
    with open(j("fifo"), "rb") as f:
        assert f.read() == b"through the fifo"
    os.waitpid(pid, 0)
    # readdir reports the types
    types = {e.name: e for e in os.scandir(wd)}
    assert types["fifo"].is_fifo() if hasattr(types["fifo"], "is_fifo") else True
    assert not types["chr"].is_file() and not types["chr"].is_dir()
    for n in ("reg", "fifo", "chr", "blk", "sock"):
        os.unlink(j(n))
    assert os.listdir(wd) == []


def test_mkdir_rmdir(wd):
    j = lambda *n: os.path.join(wd, *n)      # noqa: E731
    os.mkdir(j("a"), 0o750)
    st = os.stat(j("a"))
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o750
    assert st.st_nlink == 2
    n0 = os.stat(wd).st_nlink
    os.mkdir(j("a", "b"))
    os.mkdir(j("a", "c"))
    assert os.stat(j("a")).st_nlink == 4
    assert os.stat(wd).st_nlink == n0
    assert _err(os.mkdir, j("a")) == errno.EEXIST
    assert _err(os.mkdir, j("missing", "x")) == errno.ENOENT
    _write(j("a", "b", "file"), b"1")
    assert _err(os.rmdir, j("a", "b")) == errno.ENOTEMPTY
    assert _err(os.rmdir, j("a", "b", "file")) == errno.ENOTDIR
    assert _err(os.mkdir, j("a", "b", "file", "x")) == errno.ENOTDIR
    assert _err(os.rmdir, j("nothere")) == errno.ENOENT
    os.unlink(j("a", "b", "file"))
    os.rmdir(j("a", "b"))
    assert os.stat(j("a")).st_nlink == 3
    assert os.listdir(j("a")) == ["c"]
    assert os.stat(j("a", "c", "..")).st_ino == os.stat(j("a")).st_ino
    os.rmdir(j("a", "c"))
    os.rmdir(j("a"))
    assert os.listdir(wd) == []
    assert _err(os.mkdir, j("n" * 256)) == errno.ENAMETOOLONG
    os.mkdir(j("n" * 255))
    os.rmdir(j("n" * 255))


def test_unlink(wd):
    j = lambda *n: os.path.join(wd, *n)      # noqa: E731
    _write(j("f"), b"data")
    os.mkdir(j("d"))
    assert _err(os.unlink, j("d")) == errno.EISDIR
    assert _err(os.unlink, j("none")) == errno.ENOENT
    assert _err(os.unlink, j("f", "x")) == errno.ENOTDIR
    os.unlink(j("f"))
    assert _err(os.stat, j("f")) == errno.ENOENT
    assert os.listdir(wd) == ["d"]


@pytest.mark.parametrize("length", [1, 60, INLINE_MAX - 1, INLINE_MAX, INLINE_MAX + 1,
                                    4000, 4095])
def test_symlink_readlink(wd, length):
    target = ("t/" * length)[:length].rstrip("/") or "t"
    target = target + "x" * (length - len(target))
    p = os.path.join(wd, "l")
    os.symlink(target, p)
    assert os.readlink(p) == target
    st = os.lstat(p)
    assert stat.S_ISLNK(st.st_mode) and st.st_size == length
    assert _err(os.symlink, "other", p) == errno.EEXIST
    assert _err(os.readlink, wd) == errno.EINVAL
    os.unlink(p)


def test_symlink_is_followed(wd):
    os.mkdir(os.path.join(wd, "real"))
    _write(os.path.join(wd, "real", "f"), b"via link")
    os.symlink("real", os.path.join(wd, "l"))
    os.symlink(os.path.join(wd, "real", "f"), os.path.join(wd, "abs"))
    assert _read(os.path.join(wd, "l", "f")) == b"via link"
    assert _read(os.path.join(wd, "abs")) == b"via link"
    os.symlink("loop2", os.path.join(wd, "loop1"))
    os.symlink("loop1", os.path.join(wd, "loop2"))
    assert _err(os.stat, os.path.join(wd, "loop1")) == errno.ELOOP


def test_link(wd):
    j = lambda *n: os.path.join(wd, *n)      # noqa: E731
    _write(j("f"), b"shared")
    os.mkdir(j("sub"))
    os.link(j("f"), j("g"))
    os.link(j("f"), j("sub", "h"))
    assert os.stat(j("f")).st_nlink == 3
    assert os.stat(j("f")).st_ino == os.stat(j("sub", "h")).st_ino
    _write(j("g"), b"changed")
    assert _read(j("sub", "h")) == b"changed"
    assert _err(os.link, j("sub"), j("dirlink")) == errno.EPERM
    assert _err(os.link, j("f"), j("g")) == errno.EEXIST
    assert _err(os.link, j("none"), j("x")) == errno.ENOENT
    os.unlink(j("f"))
    assert os.stat(j("g")).st_nlink == 2
    os.unlink(j("g"))
    assert os.stat(j("sub", "h")).st_nlink == 1
    assert _read(j("sub", "h")) == b"changed"
    # links to symlinks and special files
    os.symlink("target", j("sl"))
    os.link(j("sl"), j("sl2"), follow_symlinks=False)
    assert os.readlink(j("sl2")) == "target"
    assert os.lstat(j("sl")).st_nlink == 2


# -- rename ------------------------------------------------------------------------------

def test_rename_files(wd):
    j = lambda *n: os.path.join(wd, *n)      # noqa: E731
    os.mkdir(j("a"))
    os.mkdir(j("b"))
    _write(j("a", "f"), b"F")
    _write(j("a", "g"), b"G")
    ino_f = os.stat(j("a", "f")).st_ino
    os.rename(j("a", "f"), j("a", "f2"))                 # same directory
    assert os.stat(j("a", "f2")).st_ino == ino_f
    os.rename(j("a", "f2"), j("b", "f3"))                # across directories
    assert sorted(os.listdir(j("a"))) == ["g"] and os.listdir(j("b")) == ["f3"]
    os.link(j("a", "g"), j("a", "g_link"))
    os.rename(j("b", "f3"), j("a", "g"))                 # over an existing file
    assert _read(j("a", "g")) == b"F"
    assert os.stat(j("a", "g_link")).st_nlink == 1
    assert _read(j("a", "g_link")) == b"G"
    os.rename(j("a", "g"), j("a", "g"))                  # onto itself: nothing
    assert _read(j("a", "g")) == b"F"
    os.link(j("a", "g"), j("a", "g2"))
    os.rename(j("a", "g"), j("a", "g2"))                 # two links of one inode
    assert os.path.exists(j("a", "g")) and os.path.exists(j("a", "g2"))
    os.mkdir(j("d"))
    assert _err(os.rename, j("a", "g"), j("d")) == errno.EISDIR
    assert _err(os.rename, j("d"), j("a", "g")) == errno.ENOTDIR
    assert _err(os.rename, j("none"), j("x")) == errno.ENOENT
    assert _err(os.rename, j("a", "g"), j("none", "x")) == errno.ENOENT


def test_rename_directories(wd):
    j = lambda *n: os.path.join(wd, *n)      # noqa: E731
    for d in ("p", "p/q", "p/q/r", "s", "empty", "full", "full/x"):
        os.mkdir(j(d))
    _write(j("p", "q", "file"), b"deep")
    nlink_p, nlink_s = os.stat(j("p")).st_nlink, os.stat(j("s")).st_nlink
    os.rename(j("p", "q"), j("s", "q"))                  # dir across directories
    assert os.stat(j("p")).st_nlink == nlink_p - 1
    assert os.stat(j("s")).st_nlink == nlink_s + 1
    assert os.stat(j("s", "q", "..")).st_ino == os.stat(j("s")).st_ino
    assert _read(j("s", "q", "file")) == b"deep"
    os.rename(j("s", "q"), j("empty"))                   # onto an empty directory
    assert _read(j("empty", "file")) == b"deep"
    assert not os.path.exists(j("s", "q"))
    assert _err(os.rename, j("empty"), j("full")) == errno.ENOTEMPTY
    assert _err(os.rename, j("empty"), j("empty", "r", "inside")) == errno.EINVAL
    assert _err(os.rename, j("empty"), j("empty", "r")) in (errno.EINVAL, errno.ENOTEMPTY)
    assert _err(os.rename, j("full"), j("full", "x", "y")) == errno.EINVAL
    os.rename(j("empty", "r"), j("r"))                   # out of its parent
    assert sorted(os.listdir(wd)) == ["empty", "full", "p", "r", "s"]
    assert os.stat(j("empty")).st_nlink == 2


def test_rename_noreplace_and_exchange(wd):
    j = lambda *n: os.path.join(wd, *n)      # noqa: E731
    _write(j("a"), b"A")
    _write(j("b"), b"B")
    assert _err(renameat2, j("a"), j("b"), RENAME_NOREPLACE) == errno.EEXIST
    assert _read(j("b")) == b"B"
    renameat2(j("a"), j("c"), RENAME_NOREPLACE)
    assert not os.path.exists(j("a")) and _read(j("c")) == b"A"
    renameat2(j("b"), j("c"), RENAME_EXCHANGE)
    assert _read(j("b")) == b"A" and _read(j("c")) == b"B"
    assert _err(renameat2, j("b"), j("nothing"), RENAME_EXCHANGE) == errno.ENOENT
    assert _err(renameat2, j("b"), j("c"), RENAME_EXCHANGE | RENAME_NOREPLACE) == errno.EINVAL
    # exchange a directory with a file across directories: '..' and link counts follow
    os.mkdir(j("d1"))
    os.mkdir(j("d2"))
    os.mkdir(j("d1", "sub"))
    _write(j("d2", "file"), b"F")
    n1, n2 = os.stat(j("d1")).st_nlink, os.stat(j("d2")).st_nlink
    renameat2(j("d1", "sub"), j("d2", "file"), RENAME_EXCHANGE)
    assert os.path.isdir(j("d2", "file")) and _read(j("d1", "sub")) == b"F"
    assert os.stat(j("d1")).st_nlink == n1 - 1 and os.stat(j("d2")).st_nlink == n2 + 1
    assert os.stat(j("d2", "file", "..")).st_ino == os.stat(j("d2")).st_ino
    # exchanging a directory with its own descendant is refused
    os.mkdir(j("d2", "file", "inner"))
    assert _err(renameat2, j("d2"), j("d2", "file", "inner"), RENAME_EXCHANGE) == errno.EINVAL


# -- open, read, write -----------------------------------------------------------------------

def test_open_flags(wd):
    p = os.path.join(wd, "f")
    fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
    os.write(fd, b"hello world")
    os.close(fd)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o640
    assert _err(os.open, p, os.O_CREAT | os.O_EXCL | os.O_WRONLY) == errno.EEXIST
    assert _err(os.open, os.path.join(wd, "none"), os.O_RDONLY) == errno.ENOENT
    assert _err(os.open, wd, os.O_WRONLY) == errno.EISDIR
    fd = os.open(p, os.O_RDWR | os.O_TRUNC)
    assert os.fstat(fd).st_size == 0
    os.close(fd)
    assert _read(p) == b""
    # O_APPEND: every write lands at the end, even from two descriptors
    fd1 = os.open(p, os.O_WRONLY | os.O_APPEND)
    fd2 = os.open(p, os.O_WRONLY | os.O_APPEND)
    os.write(fd1, b"one ")
    os.write(fd2, b"two ")
    os.lseek(fd1, 0, os.SEEK_SET)
    os.write(fd1, b"three")
    os.close(fd1)
    os.close(fd2)
    assert _read(p) == b"one two three"
    # O_APPEND across the inline limit
    with open(p, "ab") as f:
        for i in range(300):
            f.write(b"%05d:" % i + b"x" * 20)
    data = _read(p)
    assert data.startswith(b"one two three00000:") and len(data) == 13 + 300 * 26
    # O_CREAT on an existing file keeps it; umask applies on create
    old = os.umask(0o077)
    try:
        fd = os.open(os.path.join(wd, "masked"), os.O_CREAT | os.O_WRONLY, 0o666)
        os.close(fd)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(os.path.join(wd, "masked")).st_mode) == 0o600


def test_read_write_offsets_against_model(wd):
    p = os.path.join(wd, "f")
    rng = random.Random(42)
    model = bytearray()
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for i in range(300):
            r = rng.random()
            if r < 0.6:
                off = rng.choice([0, len(model), rng.randrange(len(model) + 1),
                                  len(model) + rng.randrange(1, 3 * BS),
                                  rng.randrange(0, 1 << 21)])
                n = rng.choice([1, 7, 511, 4095, 4096, 4097, 8192, 12289, 70000])
                chunk = rng.randbytes(n)
                assert os.pwrite(fd, chunk, off) == n
                if off > len(model):
                    model += bytes(off - len(model))
                model[off:off + n] = chunk
            elif r < 0.9:
                off = rng.randrange(len(model) + 10)
                n = rng.choice([1, 100, 4096, 5000, 100000])
                assert os.pread(fd, n, off) == bytes(model[off:off + n]), (i, off, n)
            else:
                size = rng.randrange(len(model) + 5000)
                os.ftruncate(fd, size)
                if size < len(model):
                    del model[size:]
                else:
                    model += bytes(size - len(model))
            assert os.fstat(fd).st_size == len(model)
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    assert _read(p) == bytes(model)


def test_holes_and_huge_sparse_offset(wd):
    p = os.path.join(wd, "sparse")
    tib16 = 16 << 40
    with open(p, "wb") as f:
        f.write(b"start")
        f.seek(10 << 20)
        f.write(b"middle")
        f.seek(tib16 - 4096)
        f.write(b"e" * 4096)
    st = os.stat(p)
    assert st.st_size == tib16
    assert st.st_blocks * 512 < 1 << 20
    with open(p, "rb") as f:
        assert f.read(5) == b"start"
        assert f.read(100) == bytes(100)
        f.seek((10 << 20) - 3)
        assert f.read(10) == b"\0\0\0middle\0"
        f.seek(tib16 // 2)
        assert f.read(1 << 16) == bytes(1 << 16)
        f.seek(tib16 - 4097)
        assert f.read() == b"\0" + b"e" * 4096
        f.seek(tib16 + 100)
        assert f.read(10) == b""
    os.unlink(p)


def test_fsync_and_flush(wd):
    p = os.path.join(wd, "f")
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, os.urandom(100000))
    os.fsync(fd)
    os.fdatasync(fd)
    fd2 = os.dup(fd)
    os.close(fd2)                               # flush without release
    os.write(fd, b"x")
    os.close(fd)
    dfd = os.open(wd, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dfd)
    os.close(dfd)
    assert os.stat(p).st_size == 100001


# -- directories -------------------------------------------------------------------------

def test_readdir_stable_offsets_while_directory_changes(wd):
    """getdents64 in small batches while entries come and go: the entries present
    throughout are returned exactly once."""
    d = os.path.join(wd, "big")
    os.mkdir(d)
    stable = {f"stable{i:04d}" for i in range(1500)}
    for n in stable:
        os.close(os.open(os.path.join(d, n), os.O_CREAT | os.O_WRONLY, 0o644))
    rng = random.Random(7)
    for round_ in range(3):
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        seen: list[bytes] = []
        offsets = []
        k = 0
        try:
            while True:
                batch = getdents(fd, 1024)
                if not batch:
                    break
                seen += [name for _i, _o, _t, name in batch]
                offsets += [off for _i, off, _t, _n in batch]
                for _ in range(5):          # churn between batches
                    k += 1
                    name = f"tmp{round_}_{k}"
                    os.close(os.open(os.path.join(d, name), os.O_CREAT | os.O_WRONLY))
                    if rng.random() < 0.6:
                        os.unlink(os.path.join(d, name))
        finally:
            os.close(fd)
        names = [n.decode() for n in seen]
        assert names.count(".") == 1 and names.count("..") == 1
        got_stable = [n for n in names if n.startswith("stable")]
        assert len(got_stable) == len(set(got_stable)), "an entry was returned twice"
        assert set(got_stable) == stable, f"skipped: {sorted(stable - set(got_stable))[:5]}"
        assert len(names) == len(set(names))
        assert len(offsets) == len(set(offsets))
    # os.listdir agrees with the names created, and seekdir/telldir positions hold
    listed = set(os.listdir(d))
    assert stable <= listed
    for n in listed - stable:
        os.unlink(os.path.join(d, n))
    assert set(os.listdir(d)) == stable


def test_readdir_types_and_inodes(wd):
    os.mkdir(os.path.join(wd, "d"))
    _write(os.path.join(wd, "f"), b"")
    os.symlink("f", os.path.join(wd, "l"))
    ents = {e.name: e for e in os.scandir(wd)}
    assert ents["d"].is_dir() and ents["f"].is_file() and ents["l"].is_symlink()
    for name, e in ents.items():
        assert e.inode() == os.lstat(os.path.join(wd, name)).st_ino


# -- statfs -------------------------------------------------------------------------------

def test_statfs_counts_real_free_blocks(shared_mount, wd):
    def free():
        os.sync()
        return os.statvfs(wd).f_bfree
    st = os.statvfs(wd)
    assert st.f_bsize == BS and st.f_blocks > 0 and st.f_namemax == 255
    assert st.f_files > 0 and st.f_ffree > 0
    f0 = free()
    p = os.path.join(wd, "f")
    _write(p, os.urandom(8 << 20))
    f1 = free()
    assert f0 - f1 >= (8 << 20) // BS
    assert f0 - f1 <= (8 << 20) // BS + 64
    os.unlink(p)
    for _ in range(50):
        if free() >= f0 - 2:
            break
        time.sleep(0.1)
    assert free() >= f0 - 2


# -- extended attributes ---------------------------------------------------------------------

def test_xattrs(wd):
    p = os.path.join(wd, "f")
    _write(p, b"x")
    assert os.listxattr(p) == []
    assert _err(os.getxattr, p, "user.none") == errno.ENODATA
    os.setxattr(p, "user.a", b"1")
    assert os.getxattr(p, "user.a") == b"1"
    assert _err(os.setxattr, p, "user.a", b"2", os.XATTR_CREATE) == errno.EEXIST
    assert _err(os.setxattr, p, "user.b", b"2", os.XATTR_REPLACE) == errno.ENODATA
    os.setxattr(p, "user.a", b"22", os.XATTR_REPLACE)
    os.setxattr(p, "user.b", b"", os.XATTR_CREATE)
    assert os.getxattr(p, "user.a") == b"22" and os.getxattr(p, "user.b") == b""
    # inline, then overflow into the xattr block, then back
    big = {f"user.big{i}": os.urandom(700) for i in range(4)}
    for k, v in big.items():
        os.setxattr(p, k, v)
    for k, v in big.items():
        assert os.getxattr(p, k) == v
    assert sorted(os.listxattr(p)) == sorted(["user.a", "user.b", *big])
    os.setxattr(p, "user.a", b"z" * 1000)
    assert os.getxattr(p, "user.a") == b"z" * 1000
    # past the inline area + one overflow block: ENOSPC, nothing changed
    assert _err(os.setxattr, p, "user.a", b"y" * 2000) == errno.ENOSPC
    assert os.getxattr(p, "user.a") == b"z" * 1000
    for k, v in big.items():
        assert os.getxattr(p, k) == v
    for k in big:
        os.removexattr(p, k)
    assert _err(os.removexattr, p, "user.big0") == errno.ENODATA
    assert sorted(os.listxattr(p)) == ["user.a", "user.b"]
    os.removexattr(p, "user.a")
    assert os.listxattr(p) == ["user.b"]
    # a value too large for the volume is refused cleanly
    e = _err(os.setxattr, p, "user.huge", b"h" * 60000)
    assert e in (errno.ENOSPC, errno.E2BIG, errno.ERANGE)
    # xattrs on directories and symlinks (trusted namespace for the link)
    os.setxattr(wd, "user.dir", b"d")
    assert os.getxattr(wd, "user.dir") == b"d"
    os.symlink("f", os.path.join(wd, "l"))
    os.setxattr(os.path.join(wd, "l"), "trusted.t", b"t", follow_symlinks=False)
    assert os.getxattr(os.path.join(wd, "l"), "trusted.t", follow_symlinks=False) == b"t"
    assert os.listxattr(os.path.join(wd, "l"), follow_symlinks=False) == ["trusted.t"]
    # survives with many attributes on many files
    for i in range(30):
        q = os.path.join(wd, f"x{i}")
        _write(q, b"")
        os.setxattr(q, "user.k", str(i).encode() * 100)
    for i in range(30):
        assert os.getxattr(os.path.join(wd, f"x{i}"), "user.k") == str(i).encode() * 100


# -- permissions (checked by the kernel: default_permissions) --------------------------------

def test_permissions_enforced_for_other_users(wd):
    p = os.path.join(wd, "secret")
    _write(p, b"root only")
    os.chmod(p, 0o600)
    mine = os.path.join(wd, "mine")
    _write(mine, b"u1000")
    os.chown(mine, 1000, 1000)
    os.chmod(mine, 0o600)

    def read(path):
        with open(path, "rb") as f:
            return f.read()

    assert as_user(1000, 1000, read, p) == ("errno", errno.EACCES)
    assert as_user(1000, 1000, read, mine) == b"u1000"
    assert as_user(1001, 1001, read, mine) == ("errno", errno.EACCES)
    # group permission
    os.chmod(mine, 0o640)
    assert as_user(1002, 1000, read, mine) == b"u1000"
    # writing needs w; creating in a dir needs w+x on the dir
    os.chmod(mine, 0o644)
    assert as_user(1001, 1001, lambda: open(mine, "ab").close()) == ("errno", errno.EACCES)
    d = os.path.join(wd, "closed")
    os.mkdir(d, 0o755)
    assert as_user(1000, 1000, os.mkdir, os.path.join(d, "x")) == ("errno", errno.EACCES)
    os.chmod(d, 0o700)
    assert as_user(1000, 1000, os.listdir, d) == ("errno", errno.EACCES)
    # only the owner (or root) may chmod/chown
    assert as_user(1001, 1001, os.chmod, mine, 0o777) == ("errno", errno.EPERM)
    assert as_user(1000, 1000, os.chmod, mine, 0o600) is None
    assert as_user(1000, 1000, os.chown, mine, 0, 0) == ("errno", errno.EPERM)
    # access(2)
    assert as_user(1000, 1000, os.access, p, os.R_OK) is False
    assert as_user(1000, 1000, os.access, mine, os.R_OK | os.W_OK) is True


def test_sticky_directory(wd):
    t = os.path.join(wd, "tmp")
    os.mkdir(t)
    os.chmod(t, 0o1777)

    def make(name):
        with open(os.path.join(t, name), "wb") as f:
            f.write(b"x")

    as_user(1000, 1000, make, "a")
    as_user(1001, 1001, make, "b")
    assert os.stat(os.path.join(t, "a")).st_uid == 1000
    assert as_user(1001, 1001, os.unlink, os.path.join(t, "a")) == ("errno", errno.EPERM)
    assert as_user(1001, 1001, os.rename, os.path.join(t, "a"),
                   os.path.join(t, "c")) == ("errno", errno.EPERM)
    assert as_user(1000, 1000, os.unlink, os.path.join(t, "a")) is None
    os.chmod(t, 0o777)                      # without the sticky bit anyone may delete
    assert as_user(1000, 1000, os.unlink, os.path.join(t, "b")) is None


def test_setgid_directory_passes_group(wd):
    d = os.path.join(wd, "proj")
    os.mkdir(d)
    os.chown(d, 0, 4242)
    os.chmod(d, 0o2777)
    _write(os.path.join(d, "f"), b"")
    assert os.stat(os.path.join(d, "f")).st_gid == 4242
    os.mkdir(os.path.join(d, "sub"))
    st = os.stat(os.path.join(d, "sub"))
    assert st.st_gid == 4242 and st.st_mode & stat.S_ISGID
    as_user(1000, 1000, _write, os.path.join(d, "byuser"), b"")
    assert os.stat(os.path.join(d, "byuser")).st_gid == 4242
    os.mkdir(os.path.join(d, "sub", "deeper"))
    assert os.stat(os.path.join(d, "sub", "deeper")).st_gid == 4242
    # outside a setgid dir a new file takes the creator's group
    as_user(1000, 1001, _write, os.path.join(wd, "plain"), b"")
    assert os.stat(os.path.join(wd, "plain")).st_gid == 1001


# -- open-unlinked files ---------------------------------------------------------------------

def test_unlinked_open_file_lives_until_last_close(wd):
    p = os.path.join(wd, "victim")
    data = os.urandom(4 << 20)
    _write(p, data)
    os.sync()
    before = os.statvfs(wd).f_bfree
    fd1 = os.open(p, os.O_RDWR)
    fd2 = os.open(p, os.O_RDONLY)
    os.unlink(p)
    assert not os.path.exists(p)
    assert os.fstat(fd1).st_nlink == 0
    os.pwrite(fd1, b"after unlink", 100)
    assert os.pread(fd2, 12, 100) == b"after unlink"
    assert os.pread(fd2, 1000, 3 << 20) == data[3 << 20:(3 << 20) + 1000]
    os.ftruncate(fd1, 8 << 20)
    os.close(fd1)
    assert os.pread(fd2, 12, 100) == b"after unlink"
    assert os.statvfs(wd).f_bfree <= before
    os.close(fd2)
    for _ in range(50):
        if os.statvfs(wd).f_bfree >= before + (4 << 20) // BS - 4:
            break
        time.sleep(0.1)
    assert os.statvfs(wd).f_bfree >= before + (4 << 20) // BS - 4
    # renaming over an open file keeps the old inode alive the same way
    _write(p, b"old")
    _write(p + ".new", b"new")
    with open(p, "rb") as f:
        os.rename(p + ".new", p)
        assert f.read() == b"old"
    assert _read(p) == b"new"


# -- odds and ends ---------------------------------------------------------------------------

def test_mmap_shared_write_and_read(wd):
    import mmap
    p = os.path.join(wd, "mapped")
    _write(p, bytes(3 * BS + 100))
    with open(p, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0)
        mm[10:20] = b"0123456789"
        mm[3 * BS:3 * BS + 5] = b"tail!"
        mm.flush()
        mm.close()
    data = _read(p)
    assert data[10:20] == b"0123456789" and data[3 * BS:3 * BS + 5] == b"tail!"
    assert len(data) == 3 * BS + 100
    with open(p, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        assert mm[10:20] == b"0123456789"
        mm.close()


def test_open_directory_after_rmdir(wd):
    d = os.path.join(wd, "d")
    os.mkdir(d)
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rmdir(d)
        assert os.listdir(fd) == []
        assert os.fstat(fd).st_nlink in (0, 1, 2)
    finally:
        os.close(fd)
    assert not os.path.exists(d)
    # the name is free again at once
    os.mkdir(d)
    assert os.listdir(d) == []


def test_setuid_bit_cleared_by_other_writer_and_chown(wd):
    p = os.path.join(wd, "suid")
    _write(p, b"program")
    os.chmod(p, 0o6777)

    def append(path):
        with open(path, "ab") as f:
            f.write(b"!")

    assert as_user(1000, 1000, append, p) is None
    mode = os.stat(p).st_mode
    assert not mode & stat.S_ISUID, oct(mode)
    assert _read(p) == b"program!"
    os.chmod(p, 0o4755)
    os.chown(p, 1000, 1000)
    assert not os.stat(p).st_mode & stat.S_ISUID


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_privileges_go_as_on_ext4(wd):
    """Set-ID bits and file capabilities after writes (through the page cache),
    truncations, O_TRUNC opens and changes of owner are what ext4 leaves: the kernel
    leaves removing them to the file system (FUSE_HANDLE_KILLPRIV_V2)."""
    expected = on_local_fs(privilege_transcript)
    # the reference is what the kernel does on a local file system
    assert "write-user 777 size=10 caps=False" in expected, expected
    assert "write-root 6777 size=10 caps=False" in expected, expected
    assert "chmod 750 size=10 caps=True" in expected, expected
    os.chmod(wd, 0o777)
    assert privilege_transcript(wd) == expected
