"""Mount life cycle through FUSE (crash with kill -9, clean unmount, full volume,
stale handles) and two API-level checks (generation numbers, 100,000 entries)."""

from __future__ import annotations

import errno
import os
import stat
import subprocess

import pytest

from clusterfs.errors import FSError
from clusterfs.fs.volume import read_superblock
from clusterfs.ondisk.blockdev import BlockDevice
from clusterfs.ondisk.format import HB_FREE
from tests.fuse.conftest import check_image
from tests.helpers import Mount, mkfs

BS = 4096


def _journal_clean(vol: str) -> bool:
    from clusterfs.ondisk.slots import slot_journal
    dev = BlockDevice(vol, readonly=True)
    try:
        return slot_journal(dev, read_superblock(dev), 0).is_clean()
    finally:
        dev.close()


def _heartbeat_state(vol: str) -> int:
    from clusterfs.ondisk.slots import read_heartbeat
    dev = BlockDevice(vol, readonly=True)
    try:
        return read_heartbeat(dev, read_superblock(dev), 0).state
    finally:
        dev.close()


def _free(path: str) -> int:
    return os.statvfs(path).f_bfree


def test_kill_mid_open_unlinked_file_frees_it_at_next_mount(volume, tmp_path):
    mnt = str(tmp_path / "mnt")
    m = Mount(volume, mnt).start()
    try:
        with open(m.p("keep"), "wb") as f:
            f.write(b"fsynced before the crash")
            os.fsync(f.fileno())
        free0 = _free(mnt)
        fd = os.open(m.p("orphan"), os.O_CREAT | os.O_RDWR, 0o644)
        os.write(fd, os.urandom(6 << 20))
        os.unlink(m.p("orphan"))
        os.fsync(fd)                    # the unlink is durable: an orphan on disk
        assert _free(mnt) < free0 - (5 << 20) // BS
        m.kill()                        # kill -9 with the file still open
        try:
            os.close(fd)
        except OSError:
            pass
    finally:
        m.kill()
    assert not _journal_clean(volume)
    m = Mount(volume, mnt).start()
    try:
        assert _free(mnt) == free0
        assert open(m.p("keep"), "rb").read() == b"fsynced before the crash"
        assert os.listdir(mnt) == ["keep"]
    finally:
        m.stop()
    check_image(volume)


WRITER = r"""
import os, random, sys
top, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
i = 0
while True:
    data = rng.randbytes(rng.choice([100, 5000, 70000, 300000]))
    path = os.path.join(top, "d%d" % (i % 7), "f%d" % i)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(path + ".tmp", path)
    fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(fd)
    os.close(fd)
    print(i, len(data), flush=True)
    if i % 5 == 4:
        os.unlink(os.path.join(top, "d%d" % ((i - 3) % 7), "f%d" % (i - 3)))
        print("unlinked", i - 3, flush=True)
    i += 1
"""


def test_kill_during_fsync_loop_keeps_every_fsynced_file(volume, tmp_path):
    """kill -9 the server under a writer that fsyncs file after file: the next mount
    replays the journal, every file reported durable is there with its bytes, and
    the volume is consistent."""
    import random
    import sys
    mnt = str(tmp_path / "mnt")
    m = Mount(volume, mnt).start()
    writer = subprocess.Popen([sys.executable, "-c", WRITER, mnt, "7"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines = []
        while len(lines) < 40:
            line = writer.stdout.readline()
            if not line:
                break
            lines.append(line.split())
        m.kill()
    finally:
        writer.kill()
        writer.wait()
        m.kill()
    assert len(lines) >= 40, "the writer stopped early"
    rng = random.Random(7)
    durable = {}
    for parts in lines:
        if parts[0] == "unlinked":
            continue
        i, n = int(parts[0]), int(parts[1])
        durable[i] = rng.randbytes(rng.choice([100, 5000, 70000, 300000]))
        assert len(durable[i]) == n
    m = Mount(volume, mnt).start()
    try:
        for i, data in durable.items():
            p = m.p("d%d" % (i % 7), "f%d" % i)
            if i % 5 == 1:
                # unlinked later without an fsync: gone or intact, nothing else
                if not os.path.exists(p):
                    continue
            with open(p, "rb") as f:
                assert f.read() == data, f"file {i} lost its fsynced bytes"
    finally:
        m.stop()
    check_image(volume, tail_zero=False)


def test_fusermount_unmount_is_clean(volume, tmp_path):
    mnt = str(tmp_path / "mnt")
    m = Mount(volume, mnt).start()
    assert not _journal_clean(volume)
    os.mkdir(m.p("d"))
    with open(m.p("d", "f"), "wb") as f:
        f.write(os.urandom(300000))
    r = subprocess.run(["fusermount3", "-u", mnt], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m.stop()                            # waits for the server; its log must be clean
    assert not os.path.ismount(mnt)
    assert _journal_clean(volume)
    assert _heartbeat_state(volume) == HB_FREE
    check_image(volume)
    # SIGTERM to the server unmounts cleanly too
    m = Mount(volume, mnt).start()
    m.proc.terminate()
    m.proc.wait(timeout=60)
    assert m.proc.returncode == 0
    m.proc = None
    assert not os.path.ismount(mnt)
    assert _journal_clean(volume)
    check_image(volume)


def test_full_volume_enospc_for_data_and_metadata(tmp_path):
    vol = str(tmp_path / "small.img")
    mkfs(vol, "24M")
    mnt = str(tmp_path / "mnt")
    m = Mount(vol, mnt).start()
    try:
        os.mkdir(m.p("d"))
        # metadata: inodes until ENOSPC
        n = 0
        with pytest.raises(OSError) as exc:
            while True:
                with open(m.p("d", f"f{n:05d}"), "wb") as f:
                    f.write(b"x" * 5000)         # one data block each
                n += 1
        assert exc.value.errno == errno.ENOSPC
        assert n > 100
        # the blocks left, too few for a file with data, take empty files (an inode
        # block each) until not one more fits
        k = 0
        with pytest.raises(OSError) as exc:
            while True:
                open(m.p(f"e{k:02d}"), "wb").close()
                k += 1
        assert exc.value.errno == errno.ENOSPC and k < 16
        full = os.statvfs(mnt).f_bfree
        assert full == 0
        # a new directory or symlink needs an inode block: ENOSPC, and nothing is made
        for op in (lambda: os.mkdir(m.p("d", "newdir")),
                   lambda: os.symlink("t" * 4000, m.p("d", "newlink"))):
            with pytest.raises(OSError) as exc:
                op()
            assert exc.value.errno == errno.ENOSPC
        assert not os.path.lexists(m.p("d", "newdir"))
        assert not os.path.lexists(m.p("d", "newlink"))
        # an append fills at most the file's last block (a short write), then ENOSPC;
        # the bytes written read back after the old ones
        f0 = m.p("d", "f00000")
        room = os.stat(f0).st_blocks * 512 - 5000     # in the blocks it has
        data = os.urandom(1 << 20)
        fd = os.open(f0, os.O_WRONLY | os.O_APPEND)
        written = 0
        try:
            with pytest.raises(OSError) as exc:
                for _ in range(3):
                    written += os.write(fd, data[written:])
        finally:
            os.close(fd)
        assert exc.value.errno == errno.ENOSPC
        assert 0 <= room < BS and written <= room
        with open(f0, "rb") as f:
            assert f.read() == b"x" * 5000 + data[:written]
        assert os.statvfs(mnt).f_bfree == full
        # the volume stays usable: delete some, write again
        for i in range(0, n, 2):
            os.unlink(m.p("d", f"f{i:05d}"))
        os.sync()
        with open(m.p("after"), "wb") as f:
            f.write(os.urandom(BS * 20))
        # (the create that hit ENOSPC may have made its file before its data failed)
        left = set(os.listdir(m.p("d"))) - {f"f{n:05d}"}
        assert left == {f"f{i:05d}" for i in range(1, n, 2)}
    finally:
        m.stop()
    check_image(vol)
    m = Mount(vol, mnt).start()
    try:
        assert os.path.getsize(m.p("after")) == BS * 20
    finally:
        m.stop()


def test_stale_directory_handle_after_reuse_through_fuse(volume, tmp_path):
    """A process sits in a directory that is removed and its inode block reused by
    new directories: its requests fail, and never show another directory's entries."""
    mnt = str(tmp_path / "mnt")
    m = Mount(volume, mnt).start()
    try:
        os.mkdir(m.p("gone"))
        r, w = os.pipe()
        r2, w2 = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(w)
                os.close(r2)
                os.chdir(m.p("gone"))
                os.write(w2, b"in")
                os.read(r, 1)                          # wait until replaced
                out = []
                for fn in (lambda: os.listdir("."),
                           lambda: os.close(os.open("new", os.O_CREAT | os.O_WRONLY)),
                           lambda: os.mkdir("sub")):
                    try:
                        res = fn()
                        out.append(repr(res))
                    except OSError as e:
                        out.append(f"errno {e.errno}")
                os.write(w2, ";".join(out).encode())
            finally:
                os._exit(0)
        os.close(r)
        os.close(w2)
        assert os.read(r2, 2) == b"in"
        old_ino = os.stat(m.p("gone")).st_ino
        os.rmdir(m.p("gone"))
        reused = None
        for i in range(200):
            os.mkdir(m.p(f"new{i}"))
            with open(m.p(f"new{i}", "marker"), "w") as f:
                f.write(str(i))
            if os.stat(m.p(f"new{i}")).st_ino == old_ino:
                reused = i
                break
        os.write(w, b"g")
        out = os.read(r2, 4096).decode()
        os.waitpid(pid, 0)
        assert "marker" not in out, f"stale handle served another directory: {out}"
        for part in out.split(";"):
            assert part.startswith("errno "), out
            # ENOENT/ESTALE from us, or EIO once the kernel saw the block's new
            # generation and marked its old inode bad
            assert int(part.split()[1]) in (errno.ENOENT, errno.ESTALE, errno.EIO), out
        assert reused is not None, "the directory's block was never reused"
        assert os.listdir(m.p(f"new{reused}")) == ["marker"]
    finally:
        m.stop()
    check_image(volume)


# -- API level ---------------------------------------------------------------------------

def test_generation_numbers_refuse_stale_handles():
    from tests.crash.crash_workload import CTX
    from tests.helpers import DeviceMount, power_loss_volume
    dev = power_loss_volume()
    mount = DeviceMount(dev)
    fs = mount.start()
    root = fs.root_ino
    di = fs.remember(fs.mknod(root, b"old", stat.S_IFREG | 0o644, 0, CTX))
    old_ino, old_gen = di.bno, di.generation
    fh, _ = fs.create(root, b"holder", 0o644, os.O_RDWR, CTX)
    fs.release(fh)
    stale_fh = fs.open(old_ino, os.O_RDONLY)
    fs.unlink(root, b"old")
    fs.release(stale_fh)                       # last close: freed now
    # create until the block comes back as a new inode
    for i in range(100):
        new = fs.mknod(root, b"n%d" % i, stat.S_IFREG | 0o644, 0, CTX)
        if new.bno == old_ino:
            break
    else:
        pytest.fail("inode block was never reused")
    assert new.generation != old_gen
    # the kernel still knows the old (ino, generation): every request is refused
    for call in (lambda: fs.getattr(old_ino), lambda: fs.open(old_ino, os.O_RDONLY),
                 lambda: fs.setattr(old_ino, mode=0o600),
                 lambda: fs.getxattr(old_ino, b"user.x")):
        with pytest.raises(FSError) as exc:
            call()
        assert exc.value.errno == errno.ESTALE
    fs.forget(old_ino, 1)                      # the kernel forgot; it looks the new one up
    fs.remember(new)
    fh = fs.open(new.bno, os.O_RDWR)
    fs.write(fh, 0, b"new file's data")
    assert fs.getattr(new.bno).generation == new.generation
    # a handle opened on the old generation is refused, never the new bytes
    fs.handles[999] = type(fs.handles[fh])(old_ino, old_gen, os.O_RDONLY)
    with pytest.raises(FSError) as exc:
        fs.read(999, 0, 100)
    assert exc.value.errno == errno.ESTALE
    del fs.handles[999]
    assert fs.read(fh, 0, 100) == b"new file's data"
    fs.release(fh)
    mount.stop()


@pytest.mark.parametrize("n", [pytest.param(30_000),
                               pytest.param(100_000, marks=pytest.mark.slow)])
def test_directory_with_many_entries(tmp_path, n):
    """Lookups and creates stay one short descent: the hashed tree of a 100,000-entry
    directory is at most 3 levels (timing is left to the benchmarks; the default run
    uses 30,000 entries, the slow run 100,000)."""
    from clusterfs.commands.mkfs import make_volume
    from clusterfs.fs import directory
    from clusterfs.fs.single_node import SingleNodeMount
    from tests.crash.crash_workload import CTX
    vol = str(tmp_path / "big.img")
    make_volume(vol, 1 << 30, slots=1)
    m = SingleNodeMount(vol)
    fs = m.start()
    try:
        d = fs.mkdir(fs.root_ino, b"big", 0o755, CTX)
        small = fs.mkdir(fs.root_ino, b"small", 0o755, CTX)
        for i in range(10):
            fs.mknod(small.bno, b"e%d" % i, stat.S_IFREG | 0o644, 0, CTX)
        for i in range(n):
            fs.mknod(d.bno, b"entry-%06d" % i, stat.S_IFREG | 0o644, 0, CTX)
        t = directory.tree(fs.vol, fs.vol.dinode(d.bno))
        assert t.depth() <= 3
        assert fs.vol.dinode(d.bno).entries == n
        # a lookup touches depth nodes, whatever the size
        loads = []
        real_load = fs.vol.tree_node
        fs.vol.tree_node = lambda bno, kind: loads.append(bno) or real_load(bno, kind)
        try:
            for i in range(0, n, 997):
                loads.clear()
                assert fs.lookup(d.bno, b"entry-%06d" % i).nlink == 1
                assert len(loads) <= t.depth()
        finally:
            fs.vol.tree_node = real_load
        with pytest.raises(FSError) as exc:
            fs.lookup(d.bno, b"entry-x")
        assert exc.value.errno == errno.ENOENT
        fh = fs.opendir(d.bno)
        names = [nm for nm, _di, _off in fs.readdir(fh, 0)]
        fs.releasedir(fh)
        assert len(names) == n + 2 and len(set(names)) == n + 2
        for i in range(0, n, 2):
            fs.unlink(d.bno, b"entry-%06d" % i)
        assert fs.vol.dinode(d.bno).entries == n // 2
        assert directory.tree(fs.vol, fs.vol.dinode(d.bno)).depth() <= 3
    finally:
        m.stop()
    check_image(vol)
