"""Cross-node visibility: a change made on node A is seen on node B by the next stat,
readdir, open or read that starts after A's syscall returned.

Three nodes (a, b, c) mount one volume for the whole module; each test works in its
own directory.  One test adds a fourth node.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import threading

import pytest

from tests.cluster.cluster_util import dir_for_test, mounted_cluster, wait_for


@pytest.fixture(scope="module")
def nodes():
    with mounted_cluster("a", "b", "c", size="512M", fast=False) as c:
        yield c


@pytest.fixture
def d(nodes, request):
    """A fresh directory (its name) made on node a; (a, b, c) paths via ``d.on``."""
    name = dir_for_test(request)
    os.mkdir(nodes.nodes["a"].p(name))
    os.chmod(nodes.nodes["a"].p(name), 0o777)

    class Dir:
        def __init__(self):
            self.name = name

        def on(self, node: str, *parts: str) -> str:
            return nodes.nodes[node].p(name, *parts)
    return Dir()


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write(path: str, data: bytes, mode: str = "wb") -> None:
    with open(path, mode) as f:
        f.write(data)


# -- contents, sizes, times ---------------------------------------------------------------

def test_contents(d):
    write(d.on("a", "f"), b"first version")
    assert read(d.on("b", "f")) == b"first version"
    # overwrite in the middle, extend, append: each seen by the next read elsewhere
    with open(d.on("a", "f"), "r+b") as f:
        f.seek(6)
        f.write(b"VERSION")
    assert read(d.on("b", "f")) == b"first VERSION"
    assert read(d.on("c", "f")) == b"first VERSION"
    write(d.on("b", "f"), b"+b", "ab")
    write(d.on("c", "f"), b"+c", "ab")
    assert read(d.on("a", "f")) == b"first VERSION+b+c"
    # a big block-mapped file changed in place in its middle
    big = bytearray(os.urandom(300_000))
    write(d.on("a", "big"), bytes(big))
    assert read(d.on("b", "big")) == big
    with open(d.on("c", "big"), "r+b") as f:
        f.seek(123_456)
        f.write(b"x" * 9000)
    big[123_456:123_456 + 9000] = b"x" * 9000
    assert read(d.on("a", "big")) == big
    assert read(d.on("b", "big")) == big


def test_reads_through_an_open_descriptor_see_other_nodes_writes(d):
    write(d.on("a", "f"), b"aaaa")
    with open(d.on("b", "f"), "rb") as fb:
        assert fb.read() == b"aaaa"
        with open(d.on("a", "f"), "r+b") as fa:
            fa.write(b"bb")
        fb.seek(0)
        assert fb.read() == b"bbaa"
        write(d.on("c", "f"), b"cc", "ab")
        fb.seek(0)
        assert fb.read() == b"bbaacc"
        assert os.fstat(fb.fileno()).st_size == 6


def test_cached_attributes_dropped_when_another_node_changes_the_inode(d):
    """fstat on an open descriptor and stat of the mount's root need no lookup: the
    kernel answers them from attributes it cached while this node held the inode's
    lock, and must have dropped them once another node changed the inode."""
    write(d.on("a", "f"), b"")
    fd = os.open(d.on("a", "f"), os.O_RDONLY)
    try:
        for _ in range(2):      # the second one is served from the kernel's cache
            st = os.fstat(fd)
            assert (st.st_size, stat.S_IMODE(st.st_mode)) == (0, 0o644)
        write(d.on("b", "f"), b"x" * 5000)
        assert os.fstat(fd).st_size == 5000
        os.chmod(d.on("c", "f"), 0o600)
        os.utime(d.on("c", "f"), ns=(3_000_000_000, 4_000_000_000))
        st = os.fstat(fd)
        assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o600, 4_000_000_000)
    finally:
        os.close(fd)
    root_a = d.on("a", "..")
    before = os.stat(root_a).st_mtime_ns
    assert os.stat(root_a).st_mtime_ns == before
    os.mkdir(d.on("b", "..", d.name + "-sibling"))
    try:
        assert os.stat(root_a).st_mtime_ns > before
    finally:
        os.rmdir(d.on("c", "..", d.name + "-sibling"))


def test_sizes(d):
    write(d.on("a", "f"), b"x" * 10_000)
    assert os.stat(d.on("b", "f")).st_size == 10_000
    os.truncate(d.on("a", "f"), 100)
    assert os.stat(d.on("b", "f")).st_size == 100
    assert read(d.on("b", "f")) == b"x" * 100
    os.truncate(d.on("b", "f"), 50_000)              # extend: a hole of zeros
    assert os.stat(d.on("c", "f")).st_size == 50_000
    assert read(d.on("a", "f")) == b"x" * 100 + bytes(49_900)
    with open(d.on("c", "f"), "r+b") as f:
        f.truncate(0)
    assert os.stat(d.on("a", "f")).st_size == 0
    assert read(d.on("b", "f")) == b""


def test_mtimes(d):
    write(d.on("a", "f"), b"1")
    os.utime(d.on("a", "f"), ns=(1_000_000_000, 2_000_000_000))
    st = os.stat(d.on("b", "f"))
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_000, 2_000_000_000)
    # a write on b sets the mtime that a and c see
    write(d.on("b", "f"), b"2", "ab")
    mb = os.stat(d.on("b", "f")).st_mtime_ns
    assert mb > 2_000_000_000
    assert os.stat(d.on("a", "f")).st_mtime_ns == mb
    assert os.stat(d.on("c", "f")).st_mtime_ns == mb
    # the directory's mtime moves with a create on another node
    before = os.stat(d.on("a")).st_mtime_ns
    write(d.on("c", "g"), b"")
    after = os.stat(d.on("a")).st_mtime_ns
    assert after > before
    assert after == os.stat(d.on("c")).st_mtime_ns


# -- names ----------------------------------------------------------------------------------

def test_creations(d):
    # b looks first (a negative answer must not stick), then a creates
    for name in ("f", "sub", "sym", "fifo"):
        with pytest.raises(FileNotFoundError):
            os.stat(d.on("b", name))
    write(d.on("a", "f"), b"data")
    os.mkdir(d.on("a", "sub"))
    os.symlink("f", d.on("a", "sym"))
    os.mkfifo(d.on("a", "fifo"))
    write(d.on("a", "sub", "inner"), b"inner")
    assert stat.S_ISREG(os.stat(d.on("b", "f")).st_mode)
    assert stat.S_ISDIR(os.stat(d.on("b", "sub")).st_mode)
    assert os.readlink(d.on("b", "sym")) == "f"
    assert read(d.on("b", "sym")) == b"data"
    assert stat.S_ISFIFO(os.lstat(d.on("b", "fifo")).st_mode)
    assert sorted(os.listdir(d.on("b"))) == ["f", "fifo", "sub", "sym"]
    assert os.listdir(d.on("c", "sub")) == ["inner"]
    assert read(d.on("c", "sub", "inner")) == b"inner"
    # the same inode number everywhere
    ino = os.stat(d.on("a", "f")).st_ino
    assert os.stat(d.on("b", "f")).st_ino == ino == os.stat(d.on("c", "f")).st_ino
    # a name made on b while a is in the directory: O_EXCL on c sees it
    write(d.on("b", "g"), b"")
    with pytest.raises(FileExistsError):
        os.open(d.on("c", "g"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    assert os.stat(d.on("b")).st_nlink == os.stat(d.on("a")).st_nlink == 3


def test_unlinks(d):
    write(d.on("a", "f"), b"data")
    os.mkdir(d.on("a", "sub"))
    assert os.stat(d.on("b", "f")).st_size == 4       # b knows them
    assert os.stat(d.on("b", "sub"))
    os.unlink(d.on("a", "f"))
    os.rmdir(d.on("a", "sub"))
    for node in ("b", "c"):
        with pytest.raises(FileNotFoundError):
            os.stat(d.on(node, "f"))
        with pytest.raises(FileNotFoundError):
            os.stat(d.on(node, "sub"))
        with pytest.raises(FileNotFoundError):
            open(d.on(node, "f"), "rb")
        assert os.listdir(d.on(node)) == []
    # a directory emptied on one node is removable on another
    os.mkdir(d.on("b", "sub2"))
    write(d.on("b", "sub2", "x"), b"")
    with pytest.raises(OSError) as e:
        os.rmdir(d.on("c", "sub2"))
    assert e.value.errno == errno.ENOTEMPTY
    os.unlink(d.on("a", "sub2", "x"))
    os.rmdir(d.on("c", "sub2"))
    assert os.listdir(d.on("b")) == []


def test_space_of_a_file_removed_on_another_node_comes_back(nodes, d):
    """The creator keeps the new file's open lock as a cache after closing it; a
    removal on another node calls it back, and the creator frees the file."""
    def free_on_a() -> int:
        return os.statvfs(d.on("a")).f_bfree

    before = free_on_a()
    for name in ("f", "g"):
        write(d.on("a", name), os.urandom(4 << 20))
    wait_for(lambda: free_on_a() <= before - 2 * 1024, 20, "the files' space in use")
    with open(d.on("a", "g"), "rb") as g:        # g stays open on a meanwhile
        os.unlink(d.on("b", "f"))
        os.unlink(d.on("c", "g"))
        wait_for(lambda: free_on_a() >= before - 1024 - 16, 20,
                 "the space of f (removed on b) freed")
        assert free_on_a() < before - 1024      # g is open: not freed yet
        assert g.read(16) and os.fstat(g.fileno()).st_nlink == 0
    wait_for(lambda: free_on_a() >= before - 16, 20,
             "the space of g freed at its last close")


def test_renames(d):
    write(d.on("a", "f"), b"file")
    os.mkdir(d.on("a", "d1"))
    os.mkdir(d.on("a", "d2"))
    write(d.on("a", "d1", "inner"), b"inner")
    assert read(d.on("b", "f")) == b"file"
    # within a directory
    os.rename(d.on("a", "f"), d.on("a", "g"))
    with pytest.raises(FileNotFoundError):
        os.stat(d.on("b", "f"))
    assert read(d.on("b", "g")) == b"file"
    # across directories, by another node
    os.rename(d.on("b", "g"), d.on("b", "d2", "g"))
    assert sorted(os.listdir(d.on("c"))) == ["d1", "d2"]
    assert read(d.on("c", "d2", "g")) == b"file"
    # a directory with its contents
    os.rename(d.on("c", "d1"), d.on("c", "d2", "d1"))
    assert read(d.on("a", "d2", "d1", "inner")) == b"inner"
    assert os.stat(d.on("a")).st_nlink == 3            # ".", "..", d2 now
    assert os.stat(d.on("a", "d2")).st_nlink == 3
    # replacing an existing name
    write(d.on("a", "d2", "h"), b"old h")
    assert read(d.on("b", "d2", "h")) == b"old h"
    os.rename(d.on("a", "d2", "g"), d.on("a", "d2", "h"))
    assert read(d.on("b", "d2", "h")) == b"file"
    assert sorted(os.listdir(d.on("b", "d2"))) == ["d1", "h"]
    # an exchange (renameat2 RENAME_EXCHANGE) across directories
    write(d.on("a", "x"), b"x")
    exchange(d.on("c", "x"), d.on("c", "d2", "h"))
    assert read(d.on("a", "x")) == b"file"
    assert read(d.on("b", "d2", "h")) == b"x"


def exchange(a: str, b: str) -> None:
    """renameat2(a, b, RENAME_EXCHANGE)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, rename_exchange = -100, 2
    if libc.renameat2(at_fdcwd, a.encode(), at_fdcwd, b.encode(), rename_exchange) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), a)


def test_hard_links(d):
    write(d.on("a", "f"), b"linked")
    os.link(d.on("a", "f"), d.on("a", "g"))
    sf, sg = os.stat(d.on("b", "f")), os.stat(d.on("b", "g"))
    assert sf.st_ino == sg.st_ino and sf.st_nlink == sg.st_nlink == 2
    write(d.on("b", "g"), b"changed via g")
    assert read(d.on("c", "f")) == b"changed via g"
    os.mkdir(d.on("c", "sub"))
    os.link(d.on("c", "f"), d.on("c", "sub", "h"))
    assert os.stat(d.on("a", "g")).st_nlink == 3
    os.unlink(d.on("b", "f"))
    assert os.stat(d.on("a", "g")).st_nlink == 2
    assert read(d.on("a", "sub", "h")) == b"changed via g"
    os.unlink(d.on("a", "g"))
    assert os.stat(d.on("c", "sub", "h")).st_nlink == 1


def test_xattrs(d):
    write(d.on("a", "f"), b"")
    os.setxattr(d.on("a", "f"), "user.color", b"blue")
    assert os.getxattr(d.on("b", "f"), "user.color") == b"blue"
    os.setxattr(d.on("b", "f"), "user.color", b"red")
    os.setxattr(d.on("b", "f"), "user.big", b"v" * 3000)
    assert os.getxattr(d.on("c", "f"), "user.color") == b"red"
    assert sorted(os.listxattr(d.on("a", "f"))) == ["user.big", "user.color"]
    assert os.getxattr(d.on("a", "f"), "user.big") == b"v" * 3000
    os.removexattr(d.on("c", "f"), "user.color")
    with pytest.raises(OSError) as e:
        os.getxattr(d.on("a", "f"), "user.color")
    assert e.value.errno == errno.ENODATA
    assert os.listxattr(d.on("b", "f")) == ["user.big"]
    # on a directory too
    os.setxattr(d.on("a"), "user.dir", b"1")
    assert os.getxattr(d.on("b"), "user.dir") == b"1"


def as_nobody(fn, *args) -> int:
    """Run ``fn(*args)`` in a child process as uid/gid 65534: 0, or the errno."""
    pid = os.fork()
    if pid == 0:     # pragma: no cover (the child)
        code = 255
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            fn(*args)
            code = 0
        except OSError as e:
            code = e.errno or 255
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_permission_changes(d):
    write(d.on("a", "f"), b"secret")
    os.chmod(d.on("a", "f"), 0o644)
    assert stat.S_IMODE(os.stat(d.on("b", "f")).st_mode) == 0o644
    assert as_nobody(read, d.on("b", "f")) == 0
    os.chmod(d.on("a", "f"), 0o600)
    assert stat.S_IMODE(os.stat(d.on("b", "f")).st_mode) == 0o600
    assert as_nobody(read, d.on("b", "f")) == errno.EACCES
    os.chown(d.on("c", "f"), 65534, 65534)
    st = os.stat(d.on("b", "f"))
    assert (st.st_uid, st.st_gid) == (65534, 65534)
    assert as_nobody(read, d.on("b", "f")) == 0
    # a directory closed to others on one node refuses them on another
    os.mkdir(d.on("a", "sub"))
    write(d.on("a", "sub", "x"), b"x")
    os.chmod(d.on("a", "sub"), 0o700)
    assert as_nobody(os.listdir, d.on("c", "sub")) == errno.EACCES
    os.chmod(d.on("b", "sub"), 0o755)
    assert as_nobody(os.listdir, d.on("c", "sub")) == 0
    assert as_nobody(write, d.on("c", "sub", "y"), b"") == errno.EACCES
    os.chmod(d.on("a", "sub"), 0o777)
    assert as_nobody(write, d.on("c", "sub", "y"), b"") == 0
    assert os.stat(d.on("a", "sub", "y")).st_uid == 65534


# -- delete and re-create ----------------------------------------------------------------------

def test_recreated_file_never_served_old(d):
    """A file deleted and re-created on a is never served with its old contents on b
    (same name, same size, perhaps the same inode block)."""
    for i in range(25):
        old, new = b"old-%04d" % i, b"new-%04d" % i
        write(d.on("a", "f"), old)
        assert read(d.on("b", "f")) == old
        st_old = os.stat(d.on("b", "f"))
        os.unlink(d.on("a", "f"))
        write(d.on("a", "f"), new)
        assert read(d.on("b", "f")) == new
        st_new = os.stat(d.on("b", "f"))
        assert st_new.st_size == len(new)
        if st_new.st_ino == st_old.st_ino:
            pass    # the block was reused: the generation told the kernel apart
        os.unlink(d.on("b", "f"))


def test_recreated_file_while_old_is_open(d):
    """b holds an fd of the old file: reads through it return the old file's data
    (POSIX); a new open on b sees the new file."""
    write(d.on("a", "f"), b"old contents")
    fb = open(d.on("b", "f"), "rb")
    try:
        assert fb.read() == b"old contents"
        old_ino = os.fstat(fb.fileno()).st_ino
        os.unlink(d.on("a", "f"))
        write(d.on("a", "f"), b"NEW CONTENTS!")
        assert read(d.on("b", "f")) == b"NEW CONTENTS!"
        new_ino = os.stat(d.on("b", "f")).st_ino
        assert new_ino != old_ino        # the old inode is still open: not reused
        fb.seek(0)
        assert fb.read() == b"old contents"
        assert os.fstat(fb.fileno()).st_nlink == 0
        # many more re-creations while the old one stays open
        for i in range(5):
            os.unlink(d.on("c", "f"))
            write(d.on("c", "f"), b"gen %d" % i)
            assert read(d.on("b", "f")) == b"gen %d" % i
            fb.seek(0)
            assert fb.read() == b"old contents"
    finally:
        fb.close()
    assert read(d.on("a", "f")) == b"gen 4"


def test_replaced_by_rename_while_open(d):
    write(d.on("a", "f"), b"original")
    with open(d.on("b", "f"), "rb") as fb:
        write(d.on("a", "tmp"), b"replacement")
        os.rename(d.on("a", "tmp"), d.on("a", "f"))
        assert read(d.on("b", "f")) == b"replacement"
        assert read(d.on("c", "f")) == b"replacement"
        assert fb.read() == b"original"


# -- readdir while another node changes the directory --------------------------------------------

def test_readdir_while_other_node_creates_and_deletes(d):
    stable = {f"keep{i:03d}" for i in range(40)}
    for name in stable:
        write(d.on("a", name), b"")
    churn = [f"churn{i:03d}" for i in range(60)]
    stop = threading.Event()
    errors = []

    def churner():
        try:
            for _round in range(3):
                for name in churn:
                    write(d.on("a", name), b"x")
                for name in churn:
                    os.unlink(d.on("a", name))
            for name in churn[:10]:
                write(d.on("a", name), b"final")
        except BaseException as e:     # pragma: no cover (reported below)
            errors.append(e)
        finally:
            stop.set()

    t = threading.Thread(target=churner)
    t.start()
    listings = 0
    try:
        while not stop.is_set():
            names = os.listdir(d.on("b"))
            listings += 1
            assert len(names) == len(set(names)), "a name listed twice"
            seen = set(names)
            assert stable <= seen, f"stable names missing: {sorted(stable - seen)[:5]}"
            assert seen <= stable | set(churn)
    finally:
        t.join()
    assert not errors, errors
    assert listings > 0
    final = stable | set(churn[:10])
    assert set(os.listdir(d.on("b"))) == final
    assert set(os.listdir(d.on("c"))) == final
    assert read(d.on("c", churn[0])) == b"final"


# -- a large file ---------------------------------------------------------------------------------

def test_large_file_checksummed_on_other_nodes(d):
    h = hashlib.sha256()
    chunk_count, chunk = 48, 1 << 20
    with open(d.on("a", "image"), "wb") as f:
        for i in range(chunk_count):
            block = os.urandom(chunk)
            h.update(block)
            f.write(block)
    want = h.hexdigest()
    for node in ("b", "c"):
        hb = hashlib.sha256()
        with open(d.on(node, "image"), "rb") as f:
            while True:
                block = f.read(1 << 20)
                if not block:
                    break
                hb.update(block)
        assert hb.hexdigest() == want, f"node {node} reads other bytes"
    assert os.stat(d.on("c", "image")).st_size == chunk_count * chunk


# -- four nodes --------------------------------------------------------------------------------------

def test_four_nodes_see_each_other(nodes, d):
    nodes.mount("d4")
    try:
        names = ["a", "b", "c", "d4"]
        for n in names:
            write(d.on(n, f"from-{n}"), n.encode() * 100)
        for n in names:
            assert sorted(os.listdir(d.on(n))) == sorted(f"from-{x}" for x in names)
            for x in names:
                assert read(d.on(n, f"from-{x}")) == x.encode() * 100
        # a rename ring: each node renames the file of the next
        for i, n in enumerate(names):
            nxt = names[(i + 1) % 4]
            os.rename(d.on(n, f"from-{nxt}"), d.on(n, f"moved-{nxt}"))
        for n in names:
            assert sorted(os.listdir(d.on(n))) == sorted(f"moved-{x}" for x in names)
    finally:
        nodes.unmount("d4")
