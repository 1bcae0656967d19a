"""Test helpers: run the CLI, make volumes, mount them for real."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time

PY = sys.executable


def write_hashed(path: str, size: int, chunk: bytes) -> str:
    """Write ``size`` bytes to ``path``, ``chunk`` repeated; returns their sha256."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            piece = chunk[:left]
            f.write(piece)
            h.update(piece)
            left -= len(piece)
    return h.hexdigest()


def sha256_file(path: str) -> str:
    """The sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()


def run_cli(*args, check=True, timeout=300, **kw) -> subprocess.CompletedProcess:
    """Run ``clusterfs ARGS`` and return the completed process."""
    proc = subprocess.run([PY, "-m", "clusterfs.cli", *args], capture_output=True,
                          text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"clusterfs {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def mkfs(path: str, size: str = "256M", *extra: str) -> None:
    run_cli("mkfs", path, "--size", size, "-q", *extra)


def fsck_clean(path: str) -> None:
    """The oracle: ``clusterfs fsck -fn`` must find nothing (when fsck exists)."""
    from clusterfs import cli
    if "fsck.cli" not in cli.SUBCOMMAND_MODULES:
        return
    proc = run_cli("fsck", "-fn", path, check=False)
    assert proc.returncode == 0, f"fsck -fn found problems:\n{proc.stdout}\n{proc.stderr}"


def in_mount_table(path: str) -> bool:
    """Whether ``path`` is a mount point by the kernel's table (``os.path.ismount``
    says no when the file system answers stat with an error, e.g. a fenced node)."""
    want = os.path.abspath(path)
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 1 and fields[1].encode().decode("unicode_escape") == want:
                return True
    return False


class Mount:
    """A ``clusterfs mount --foreground`` process and its mount point."""

    def __init__(self, volume: str, mountpoint: str, *args: str, env=None, wrap=()):
        self.volume = volume
        self.path = mountpoint
        self.args = args
        self.env = env
        self.wrap = tuple(wrap)   # command prefix, e.g. ("nsenter", "--net=...")
        self.proc: subprocess.Popen | None = None
        self.log = mountpoint.rstrip("/") + ".log"

    def start(self, timeout: float = 30.0) -> "Mount":
        os.makedirs(self.path, exist_ok=True)
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [*self.wrap, PY, "-m", "clusterfs.cli", "mount", "--foreground", self.volume,
             self.path, *self.args], stdout=logf, stderr=subprocess.STDOUT, env=self.env)
        logf.close()
        deadline = time.monotonic() + timeout
        while not os.path.ismount(self.path):
            if self.proc.poll() is not None:
                raise AssertionError(f"mount process exited with {self.proc.returncode}:\n"
                                     + self.read_log())
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError("mount did not appear in time:\n" + self.read_log())
            time.sleep(0.05)
        return self

    def read_log(self) -> str:
        try:
            with open(self.log, "r", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def p(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    def stop(self, check_log: bool = True) -> None:
        """Unmount (even after a failure), wait for the server, check its log."""
        if self.proc is None:
            return
        if os.path.ismount(self.path) or in_mount_table(self.path):
            r = subprocess.run(["fusermount3", "-u", self.path], capture_output=True)
            if r.returncode != 0:
                subprocess.run(["fusermount3", "-u", "-z", self.path], capture_output=True)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        proc, self.proc = self.proc, None
        self.returncode = proc.returncode
        log = self.read_log()
        if check_log:
            assert "Traceback" not in log, f"mount process logged a traceback:\n{log}"
            assert proc.returncode == 0, f"mount exited with {proc.returncode}:\n{log}"

    def kill(self) -> None:
        """SIGKILL the server (a crash), then clean the dead mount point up."""
        if self.proc is None:
            return
        self.proc.kill()
        self.proc.wait()
        self.proc = None
        subprocess.run(["fusermount3", "-u", "-z", self.path], capture_output=True)


# -- API-level mounts on a simulated device (crash tests) -------------------------------

_BASE_IMAGES: dict[tuple, dict[int, bytes]] = {}


def power_loss_volume(size: int = 16 << 20, slots: int = 1):
    """A fresh volume on a ``PowerLossDevice`` (everything durable), made by mkfs.

    mkfs runs once per geometry on a temporary image file; later calls copy its
    blocks.
    """
    import tempfile

    from clusterfs.commands.mkfs import make_volume
    from clusterfs.ondisk.blockdev import BLOCK_SIZE, PowerLossDevice
    key = (size, slots)
    if key not in _BASE_IMAGES:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "base.img")
            make_volume(path, size, slots=slots)
            blocks = {}
            zero = bytes(BLOCK_SIZE)
            with open(path, "rb") as f:
                for bno in range(size // BLOCK_SIZE):
                    buf = f.read(BLOCK_SIZE)
                    if buf != zero:
                        blocks[bno] = buf
        _BASE_IMAGES[key] = blocks
    return PowerLossDevice(size // BLOCK_SIZE, _BASE_IMAGES[key])


class DeviceMount:
    """``SingleNodeMount`` without FUSE, path or heartbeat, on any device object.

    ``start()`` runs the mount checklist (replay every journal, finish an interrupted
    grow, open ours, free inodes left unlinked) and returns the ``Filesystem``; ``stop()`` releases open
    handles and closes the journal cleanly.
    """

    def __init__(self, dev, slot: int = 0, noatime: bool = True):
        self.dev = dev
        self.slot = slot
        self.noatime = noatime
        self.vol = None
        self.fs = None
        self.journal = None

    def start(self):
        from clusterfs.fs.grow import finish_interrupted_grow
        from clusterfs.fs.orphans import free_unlinked
        from clusterfs.fs.posix import Filesystem
        from clusterfs.fs.volume import Volume, read_superblock
        from clusterfs.ondisk.slots import replay_slot, slot_journal
        sb = read_superblock(self.dev)
        vol = Volume(self.dev, sb, slot=self.slot)
        for slot in range(sb.nslots):
            replay_slot(self.dev, sb, slot)
        finish_interrupted_grow(vol)
        self.journal = slot_journal(self.dev, sb, self.slot)
        self.journal.open(owner="test")
        vol.journal = self.journal
        self.vol = vol
        self.fs = Filesystem(vol, noatime=self.noatime)
        free_unlinked(vol, self.fs)
        vol.commit()
        return self.fs

    def stop(self) -> None:
        for fh in list(self.fs.handles):
            self.fs.release(fh)
        self.journal.close()


# -- consistency walk (stands in for fsck until fsck/ lands) ----------------------------

def check_consistency(dev, *, allow_unlinked: bool = False,
                      tail_zero: bool = False) -> list[str]:
    """Walk a volume (journal already replayed) and return every problem found.

    Checks: every block referenced once (dinodes, tree nodes, refcount tree nodes,
    xattr blocks, data extents, resource-group headers and bitmaps), but data blocks
    of ``SHARED`` extents, whose references must equal their count in the refcount
    trees (no record: 1); bitmaps and resource-group counters agree with the walk; tree shape (levels, key order, separators, owners);
    directory entries (hash keys, types, entry counts, '..' pointers); link counts;
    ``blocks`` counts; no extent past EOF (but with DF_PREALLOC); with ``tail_zero``
    (for volumes written without a crash) zero bytes past EOF in the last block on
    disk: a power cut may leave bytes there, which a later extension zeroes, so it
    is off by default.
    """
    import stat as S
    from collections import Counter

    from clusterfs.errors import FSError
    from clusterfs.fs.btree import BTree
    from clusterfs.fs.inode import InodeStore
    from clusterfs.fs.volume import Volume, read_superblock
    from clusterfs.fs.refcount import RefcountStore
    from clusterfs.ondisk.format import (BLOCKS_PER_BITMAP, BLOCK_SIZE, DF_DIRTREE,
                                         DF_EXTENTS, DF_INLINE, DINODE, DIRENT, EXT_SHARED,
                                         EXTENT, FREE, HASH_SHIFT, UNLINKED, USED,
                                         dtype_of, name_hash)

    problems: list[str] = []
    sb = read_superblock(dev)
    vol = Volume(dev, sb, readonly=True)
    owner: dict[int, str] = {}
    expect_state: dict[int, int] = {}
    refs: Counter = Counter()         # block of a SHARED extent -> its references

    def claim(bno: int, what: str, state: int = USED) -> bool:
        if sb.rgrp_of(bno) < 0:
            problems.append(f"{what}: block {bno} outside the resource groups")
            return False
        if bno in owner:
            problems.append(f"block {bno} referenced twice: {owner[bno]} and {what}")
            return False
        owner[bno] = what
        expect_state[bno] = state
        return True

    for rg in range(sb.rgrp_count):
        start, _length = sb.rgrp_range(rg)
        for b in range(start, start + 1 + sb.bitmap_blocks):
            claim(b, f"rgrp {rg} header/bitmap")
    for what, start, n in sb.added_extents():     # slots added after mkfs
        for b in range(start, start + n):
            claim(b, what)

    links: Counter = Counter()        # ino -> directory entries naming it
    subdirs: Counter = Counter()      # dir ino -> subdirectories
    dirs_seen: set[int] = set()
    files: dict[int, object] = {}

    def walk_tree(di, kind) -> tuple[int, list]:
        """(node blocks, leaf records) of a dinode's tree, checking its shape."""
        store = InodeStore(vol, di)
        t = BTree(store, di.root)
        nblocks = 0
        records = []

        def visit(node, lo, hi, depth):
            nonlocal nblocks
            if depth > 8:
                problems.append(f"inode {di.bno}: tree too deep")
                return
            if not node.is_root:
                nblocks += 1
                if node.owner != di.bno:
                    problems.append(f"tree node {node.bno} owner {node.owner} in inode {di.bno}")
                if not node.keys:
                    problems.append(f"inode {di.bno}: empty tree node {node.bno}")
            if node.nbytes > node.capacity:
                problems.append(f"inode {di.bno}: node {node.bno} overfull")
            for k in node.keys:
                if k < lo or (hi is not None and k >= hi):
                    problems.append(f"inode {di.bno}: key {k} of node {node.bno} outside "
                                    f"[{lo}, {hi})")
            if node.level == 0:
                records.extend(zip(node.keys, node.vals))
                return
            for i, child_bno in enumerate(node.vals):
                if not claim(child_bno, f"tree node of inode {di.bno}"):
                    continue
                try:
                    child = store.load(child_bno, kind)
                except FSError as e:
                    problems.append(f"inode {di.bno}: tree node {child_bno}: {e}")
                    continue
                if child.level != node.level - 1:
                    problems.append(f"inode {di.bno}: node {child_bno} level {child.level} "
                                    f"under level {node.level}")
                    continue
                if child.keys and i > 0 and child.keys[0] != node.keys[i]:
                    problems.append(f"inode {di.bno}: separator {node.keys[i]} != first key "
                                    f"{child.keys[0]} of node {child_bno}")
                nhi = node.keys[i + 1] if i + 1 < len(node.keys) else hi
                visit(child, node.keys[i] if i > 0 else lo, nhi, depth + 1)

        visit(t.root, 0, None, 0)
        return nblocks, records

    def check_inode(ino: int, where: str):
        if not claim(ino, f"dinode {ino} ({where})", DINODE):
            return None
        try:
            di = vol.dinode(ino)
        except FSError as e:
            problems.append(f"{where}: inode {ino} unreadable: {e}")
            return None
        blocks = 0
        if di.xattr_block:
            blocks += 1
            if claim(di.xattr_block, f"xattr block of inode {ino}"):
                try:
                    xb = vol.xattr_block(di.xattr_block)
                    if xb.owner != ino:
                        problems.append(f"xattr block {xb.bno} owner {xb.owner} != {ino}")
                except FSError as e:
                    problems.append(f"inode {ino}: xattr block: {e}")
        kind = di.flags & (DF_INLINE | DF_EXTENTS | DF_DIRTREE)
        if S.S_ISDIR(di.mode) != (kind == DF_DIRTREE):
            problems.append(f"inode {ino}: mode {di.mode:o} with flags {di.flags:#x}")
        if kind == DF_INLINE:
            if any(di.root[di.size:]):
                problems.append(f"inode {ino}: inline bytes past EOF")
        elif kind == DF_EXTENTS:
            nodes, recs = walk_tree(di, EXTENT)
            blocks += nodes
            end_blk = di.map_end()      # (past EOF too with DF_PREALLOC)
            prev_end = 0
            for lb, (pb, n, _f) in recs:
                if n <= 0 or lb < prev_end:
                    problems.append(f"inode {ino}: bad/overlapping extent {lb}+{n}")
                prev_end = lb + n
                if lb + n > end_blk:
                    problems.append(f"inode {ino}: extent {lb}+{n} past EOF (size {di.size})")
                for b in range(pb, pb + n):
                    if _f & EXT_SHARED:
                        if refs[b] == 0 and claim(b, "shared data"):
                            refs[b] = 1
                        elif owner.get(b) == "shared data":
                            refs[b] += 1
                        else:
                            claim(b, f"shared data of inode {ino} lblk {lb + b - pb}")
                    else:
                        claim(b, f"data of inode {ino} lblk {lb + b - pb}")
                blocks += n
                if tail_zero and di.size % BLOCK_SIZE and lb <= di.size // BLOCK_SIZE < lb + n:
                    tail = dev.read(pb + di.size // BLOCK_SIZE - lb)
                    if any(tail[di.size % BLOCK_SIZE:]):
                        problems.append(f"inode {ino}: nonzero bytes past EOF on disk")
        elif kind == DF_DIRTREE:
            nodes, recs = walk_tree(di, DIRENT)
            blocks += nodes
            if len(recs) != di.entries:
                problems.append(f"dir {ino}: entries {di.entries}, found {len(recs)}")
        if blocks != di.blocks:
            problems.append(f"inode {ino}: blocks {di.blocks}, found {blocks}")
        return di

    if allow_unlinked:
        # inodes left UNLINKED (open at a crash): legal until the next mount frees them
        for rg in range(sb.rgrp_count):
            start, length = sb.rgrp_range(rg)
            for j in range(sb.bitmap_blocks):
                bm = vol.bitmap(rg, j)
                base = j * BLOCKS_PER_BITMAP
                for i in range(min(BLOCKS_PER_BITMAP, length - base)):
                    if bm.get(i) == UNLINKED:
                        di = check_inode(start + base + i, "unlinked")
                        if di is not None:
                            expect_state[di.bno] = UNLINKED
                            if di.nlink:
                                problems.append(f"unlinked inode {di.bno} has nlink {di.nlink}")
    root = check_inode(sb.root_ino, "root")
    stack = [root] if root is not None else []
    if root is not None:
        dirs_seen.add(root.bno)
        if root.parent != root.bno:
            problems.append("root's parent is not itself")
    while stack:
        d = stack.pop()
        t = BTree(InodeStore(vol, d), d.root)
        for key, (ino, dtype, name) in t.items_from(0):
            if key >> HASH_SHIFT != name_hash(name):
                problems.append(f"dir {d.bno}: entry {name!r} under wrong hash key")
            links[ino] += 1
            if ino in files or ino in dirs_seen:
                di = files.get(ino)
                if di is None or S.S_ISDIR(di.mode):
                    problems.append(f"directory {ino} linked twice ({name!r})")
                continue
            di = check_inode(ino, f"entry {name!r} of dir {d.bno}")
            if di is None:
                continue
            if dtype != dtype_of(di.mode):
                problems.append(f"dir {d.bno}: entry {name!r} type {dtype} != inode's")
            if S.S_ISDIR(di.mode):
                subdirs[d.bno] += 1
                dirs_seen.add(ino)
                if di.parent != d.bno:
                    problems.append(f"dir {ino} ({name!r}): parent {di.parent} != {d.bno}")
                stack.append(di)
            else:
                files[ino] = di
    for ino, di in files.items():
        if di.nlink != links[ino]:
            problems.append(f"inode {ino}: nlink {di.nlink}, {links[ino]} entries")
    for ino in dirs_seen:
        di = vol.dinode(ino)
        if di.nlink != 2 + subdirs[ino]:
            problems.append(f"dir {ino}: nlink {di.nlink}, expected {2 + subdirs[ino]}")

    # the refcount trees against the references of shared blocks
    counted: dict[int, int] = {}
    for rg in range(sb.rgrp_count):
        hdr = vol.rgrp(rg)
        t = BTree(RefcountStore(vol, hdr), hdr.refroot)
        for node in t.nodes():
            claim(node.bno, f"refcount node of group {rg}")
        prev_end = 0
        for pblk, (ln, cnt) in t.items_from(0):
            if ln < 1 or cnt < 2 or pblk < prev_end or sb.rgrp_of(pblk) != rg or \
                    sb.rgrp_of(pblk + ln - 1) != rg:
                problems.append(f"group {rg}: bad refcount record {pblk}+{ln} ({cnt})")
            prev_end = pblk + ln
            for b in range(pblk, pblk + ln):
                counted[b] = cnt
    for b in set(counted) | {b for b, k in refs.items() if k >= 2}:
        if counted.get(b, 1) != refs.get(b, 0) and not (b not in counted and
                                                         refs.get(b, 0) <= 1):
            problems.append(f"block {b}: refcount {counted.get(b, 1)}, "
                            f"{refs.get(b, 0)} shared references")
    for rg in range(sb.rgrp_count):
        hdr = vol.rgrp(rg)
        start, length = sb.rgrp_range(rg)
        counts = Counter()
        for j in range(sb.bitmap_blocks):
            bm = vol.bitmap(rg, j)
            base = j * BLOCKS_PER_BITMAP
            for i in range(min(BLOCKS_PER_BITMAP, length - base)):
                bno = start + base + i
                st = bm.get(i)
                counts[st] += 1
                want = expect_state.get(bno, FREE)
                if st != want:
                    problems.append(f"block {bno}: bitmap says {st}, walk says {want} "
                                    f"({owner.get(bno, 'unreferenced')})")
        if hdr.free != counts[FREE] or hdr.dinodes != counts[DINODE] or \
                hdr.unlinked != counts[UNLINKED]:
            problems.append(f"rgrp {rg}: counters free/dinodes/unlinked {hdr.free}/"
                            f"{hdr.dinodes}/{hdr.unlinked}, bitmap {counts[FREE]}/"
                            f"{counts[DINODE]}/{counts[UNLINKED]}")
    return problems


def fsck_device(dev) -> tuple[int, str]:
    """Run the fsck checker in-process, check-only and forced, on a device object
    (e.g. a ``PowerLossDevice``); returns (exit status, what it printed)."""
    import io

    from fsck.checker import Fsck
    from fsck.report import Report
    out = io.StringIO()
    rep = Report("n", out=out, err=out, quiet=False)
    fk = Fsck("<device>", mode="n", force=True, report=rep, device=dev, live_watch=0,
              hold_slot=False)
    code = fk.check()
    text = out.getvalue()
    if fk.internal_error:
        text += "\n" + fk.internal_error
    return code, text
