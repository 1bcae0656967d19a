"""Helpers for the fsck tests: a populated volume, damage tools, read-back checks.

``populate`` fills a volume through the file-system API (no FUSE) with every kind of
object fsck must understand: inline, extent and fragmented files (extent-tree node
blocks), sparse files, a directory large enough to have directory-tree node blocks,
nested directories, symbolic links (inline and extent), hard links, inline and
overflow xattrs, special files, and files sharing blocks (reflink clones, partly
copied on write, with counts that alternate block by block: a refcount tree with
node blocks).  It returns a manifest: path -> what must read back.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import stat as S
import subprocess

from clusterfs.commands.mkfs import make_volume
from clusterfs.fs.posix import Ctx
from clusterfs.fs.single_node import SingleNodeMount
from clusterfs.ondisk import blockhdr
from clusterfs.ondisk.blockhdr import BLOCK_SIZE, BlockType
from clusterfs.ondisk.format import BLOCKS_PER_BITMAP, Bitmap, Dinode, Superblock
from fsck.checker import Fsck
from fsck.report import Report

CTX = Ctx(0, 0)


def _data(seed: int, n: int) -> bytes:
    r = random.Random(seed)
    return r.randbytes(n)


def populate(path: str, size: int = 64 << 20, seed: int = 1) -> dict:
    """Make a volume at ``path`` and fill it; returns the manifest."""
    if os.path.exists(path):
        os.unlink(path)
    make_volume(path, size, slots=2)
    m = SingleNodeMount(path, heartbeat_interval=0.2)
    fs = m.start()
    man: dict[str, dict] = {}
    try:
        root = fs.root_ino

        def mkdir(parent, name):
            return fs.mkdir(parent, name.encode(), 0o755, CTX).bno

        def put(parent, pname, name, data, *, sparse_at=None, frag=False):
            fh, di = fs.create(parent, name.encode(), 0o644, os.O_RDWR, CTX)
            if frag:
                # every other block: one extent per block -> an extent tree with nodes
                for i in range(0, len(data) // BLOCK_SIZE, 2):
                    fs.write(fh, i * BLOCK_SIZE, data[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE])
                content = bytearray(len(data))
                for i in range(0, len(data) // BLOCK_SIZE, 2):
                    content[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE] = \
                        data[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]
                fs.setattr(di.bno, size=len(data))
                data = bytes(content)
            elif data:
                fs.write(fh, 0, data)
            if sparse_at:
                fs.write(fh, sparse_at, b"tail")
                data = data + bytes(sparse_at - len(data)) + b"tail"
            fs.release(fh)
            p = f"{pname}/{name}"
            man[p] = {"kind": "file", "ino": di.bno, "sha": hashlib.sha256(data).hexdigest(),
                      "size": len(data)}
            return di.bno

        docs = mkdir(root, "docs")
        for i in range(12):
            put(docs, "/docs", f"note{i}.txt", (f"note {i}\n" * (i * 40 + 1)).encode())
        put(docs, "/docs", "empty", b"")
        data = mkdir(root, "data")
        put(data, "/data", "big.bin", _data(seed, 3 * 1024 * 1024 + 123))
        for i in range(8):
            put(data, "/data", f"med{i}.bin", _data(seed + 10 + i, 20000 + i * 23457))
        put(data, "/data", "frag.bin", _data(seed + 3, 400 * BLOCK_SIZE), frag=True)
        put(data, "/data", "sparse.bin", _data(seed + 4, 10000), sparse_at=6 << 20)
        # a file in two extents that follow each other logically (not physically)
        part1, part2 = _data(seed + 5, 40 * BLOCK_SIZE), _data(seed + 6, 30 * BLOCK_SIZE)
        fh, two = fs.create(data, b"two-extents.bin", 0o644, os.O_RDWR, CTX)
        fs.write(fh, 0, part1)
        fs.release(fh)
        put(data, "/data", "in-between.bin", _data(seed + 7, 50 * BLOCK_SIZE))
        fh = fs.open(two.bno, os.O_RDWR)
        fs.write(fh, len(part1), part2)
        fs.release(fh)
        man["/data/two-extents.bin"] = {"kind": "file", "ino": two.bno, "size": len(part1) + len(part2),
                                        "sha": hashlib.sha256(part1 + part2).hexdigest()}
        big = mkdir(root, "bigdir")
        for i in range(400):
            put(big, "/bigdir", f"entry-with-a-longish-name-{i:05d}", _data(i, 100 + i % 50))
        d = root
        pname = ""
        for name in ("deep", "a", "b", "c", "d"):
            d = mkdir(d, name)
            pname += "/" + name
            put(d, pname, f"file-in-{name}", _data(seed + ord(name[0]), 5000))
        # symbolic links (inline, and one past the inline size)
        for name, target in (("link-short", b"data/big.bin"),
                             ("link-long", b"x/" * 1900 + b"end")):
            di = fs.symlink(root, name.encode(), target, CTX)
            man["/" + name] = {"kind": "symlink", "ino": di.bno, "target": target.decode()}
        # a hard link
        src = man["/data/med1.bin"]
        fs.link(src["ino"], docs, b"hardlink-med1")
        man["/docs/hardlink-med1"] = dict(src)
        # xattrs
        xi = man["/data/med2.bin"]["ino"]
        fs.setxattr(xi, b"user.small", b"v" * 40)
        fs.setxattr(xi, b"user.big", b"B" * 1000)
        man["/data/med2.bin"]["xattrs"] = {"user.small": "v" * 40, "user.big": "B" * 1000}
        # shared blocks: a clone, partly rewritten (copy-on-write); every other block
        # cloned once more (counts 3 and 2 alternate: many refcount records); a
        # clone at an offset inside a block (head and tail copied, middle shared)
        shared = mkdir(root, "shared")
        base = _data(seed + 20, 600 * BLOCK_SIZE)
        copies = {"base.img": base}
        fb, _ = fs.create(shared, b"base.img", 0o644, os.O_RDWR, CTX)
        fs.write(fb, 0, base)
        fc, _ = fs.create(shared, b"clone.img", 0o644, os.O_RDWR, CTX)
        assert fs.copy_file_range(fb, 0, fc, 0, len(base)) == len(base)
        patch = _data(seed + 21, 3 * BLOCK_SIZE + 10)
        fs.write(fc, 100 * BLOCK_SIZE - 5, patch)
        clone = bytearray(base)
        clone[100 * BLOCK_SIZE - 5:100 * BLOCK_SIZE - 5 + len(patch)] = patch
        copies["clone.img"] = bytes(clone)
        fs_, _ = fs.create(shared, b"stripes.img", 0o644, os.O_RDWR, CTX)
        stripes = bytearray(len(base))
        for i in range(0, 600, 2):
            at = i * BLOCK_SIZE
            fs.copy_file_range(fb, at, fs_, at, BLOCK_SIZE)
            stripes[at:at + BLOCK_SIZE] = base[at:at + BLOCK_SIZE]
        copies["stripes.img"] = bytes(stripes[:599 * BLOCK_SIZE])     # ends with block 598
        fp, _ = fs.create(shared, b"partial.img", 0o644, os.O_RDWR, CTX)
        fs.copy_file_range(fb, 1000, fp, 1000, 100000)
        copies["partial.img"] = bytes(1000) + base[1000:101000]
        for h in (fb, fc, fs_, fp):
            fs.release(h)
        for name, content in copies.items():
            man["/shared/" + name] = {
                "kind": "file", "ino": fs.lookup(shared, name.encode()).bno,
                "size": len(content), "sha": hashlib.sha256(content).hexdigest()}
        man["/shared"] = {"kind": "dir", "ino": shared}
        # special files
        di = fs.mknod(root, b"fifo", S.S_IFIFO | 0o644, 0, CTX)
        man["/fifo"] = {"kind": "fifo", "ino": di.bno}
        di = fs.mknod(root, b"chardev", S.S_IFCHR | 0o600, os.makedev(1, 3), CTX)
        man["/chardev"] = {"kind": "chr", "ino": di.bno}
        for p, ino in (("/docs", docs), ("/data", data), ("/bigdir", big)):
            man[p] = {"kind": "dir", "ino": ino}
    finally:
        m.stop()
    return man


# -- running fsck in-process ---------------------------------------------------------------

def fsck(path: str, mode: str = "n", *, force: bool = True, scan_data: bool = False,
         device=None, live_watch: float | None = None):
    """Run the checker in-process; returns (exit status, report, checker)."""
    out = io.StringIO()
    rep = Report(mode, out=out, err=out)
    ck = Fsck(path, mode=mode, force=force, scan_data=scan_data, report=rep,
              device=device, live_watch=live_watch)
    code = ck.check()
    rep.text = out.getvalue()
    assert ck.internal_error is None, ck.internal_error + "\n" + rep.text
    return code, rep, ck


def findings(rep, layer: int | None = None) -> list:
    return [f for f in rep.findings if f.severity == "error"
            and (layer is None or f.layer == layer)]


def copy_image(src: str, dst: str) -> None:
    subprocess.run(["cp", "--sparse=always", src, dst], check=True)


# -- raw block access ------------------------------------------------------------------------

def read_block(path: str, bno: int) -> bytearray:
    with open(path, "rb") as f:
        f.seek(bno * BLOCK_SIZE)
        return bytearray(f.read(BLOCK_SIZE))


def write_block(path: str, bno: int, data) -> None:
    assert len(data) == BLOCK_SIZE
    with open(path, "r+b") as f:
        f.seek(bno * BLOCK_SIZE)
        f.write(bytes(data))


def reseal(buf: bytearray) -> bytearray:
    blockhdr.reseal(buf)
    return buf


def superblock(path: str) -> Superblock:
    return Superblock.decode(read_block(path, 0), 0)


def dinode(path: str, ino: int) -> Dinode:
    return Dinode.decode(read_block(path, ino), ino)


def put_dinode(path: str, di: Dinode) -> None:
    di.seq -= 1
    write_block(path, di.bno, di.image())


def rgrp_header(img: str, rg: int):
    from clusterfs.ondisk.format import RgrpHeader
    start, _ = superblock(img).rgrp_range(rg)
    return RgrpHeader.decode(read_block(img, start), start)


def put_rgrp_header(img: str, hdr) -> None:
    hdr.seq -= 1
    write_block(img, hdr.bno, hdr.image())


def refcount_records(img: str, bno: int) -> list[tuple[int, int, int]]:
    """The records (pblk, len, count) of the refcount tree of ``bno``'s group."""
    from clusterfs.ondisk.format import REFCOUNT, TreeNode
    rg = superblock(img).rgrp_of(bno)
    out = []
    stack = [rgrp_header(img, rg).refroot]
    while stack:
        node = stack.pop()
        if node.level == 0:
            out.extend((k, ln, c) for k, (ln, c) in zip(node.keys, node.vals))
        else:
            stack.extend(TreeNode.decode(read_block(img, b), b, REFCOUNT)
                         for b in node.vals)
    return sorted(out)


def set_bitmap_state(img: str, bno: int, state: int) -> None:
    sb = superblock(img)
    rg = sb.rgrp_of(bno)
    start, _ = sb.rgrp_range(rg)
    j, off = divmod(bno - start, BLOCKS_PER_BITMAP)
    bbno = start + 1 + j
    bm = Bitmap.decode(read_block(img, bbno), bbno, rg, j * BLOCKS_PER_BITMAP)
    bm.set(off, state)
    bm.seq -= 1
    write_block(img, bbno, bm.image())


def bitmap_state(img: str, bno: int) -> int:
    sb = superblock(img)
    rg = sb.rgrp_of(bno)
    start, _ = sb.rgrp_range(rg)
    j, off = divmod(bno - start, BLOCKS_PER_BITMAP)
    bbno = start + 1 + j
    return Bitmap.decode(read_block(img, bbno), bbno, rg, j * BLOCKS_PER_BITMAP).get(off)


def flip(img: str, bno: int, offset: int) -> None:
    buf = read_block(img, bno)
    buf[offset] ^= 0x5A
    write_block(img, bno, buf)


def crash_session(img: str, work, *, torn: bool = False):
    """Run ``work(fs)`` in a single-node session that then dies without unmounting:
    its last transaction(s) stay committed in the journal (not written home), the
    heartbeat stays non-free.  With ``torn``, the commit block of the last
    transaction never reaches the disk."""
    m = SingleNodeMount(img, heartbeat_interval=0.2)
    fs = m.start()
    work(fs)
    dev = fs.vol.dev
    if torn:
        real_write = dev.write

        def write(bno, data):
            if len(data) == BLOCK_SIZE and int.from_bytes(data[4:6], "little") == \
                    BlockType.JOURNAL_COMMIT:
                return          # the power failed before the commit block
            real_write(bno, data)
        dev.write = write
        fs.vol.commit()
    m._release_lock()
    fs.vol.close()


class Api:
    """A single-node API mount for inspecting a volume (``with Api(path) as fs``)."""

    def __init__(self, path: str):
        self.m = SingleNodeMount(path, heartbeat_interval=0.2)

    def __enter__(self):
        self.fs = self.m.start()
        return self.fs

    def __exit__(self, *exc):
        self.m.stop()


def lookup(fs, path: str) -> int:
    ino = fs.root_ino
    for part in path.strip("/").split("/"):
        if part:
            ino = fs.lookup(ino, part.encode()).bno
    return ino


def dir_node_blocks(path: str, ino: int) -> list[int]:
    """Tree node blocks of a directory or extent file (through the API)."""
    from clusterfs.fs import inode as inode_mod
    with Api(path) as fs:
        di = fs.vol.dinode(ino)
        return [n.bno for n in inode_mod.tree(fs.vol, di).nodes()]


# -- read-back checks -----------------------------------------------------------------------

def _sha_file(p: str) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with open(p, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                break
            h.update(b)
            n += len(b)
    return h.hexdigest(), n


def verify_tree(root: str, man: dict, *, lost: set[int] = frozenset(),
                grown: set[int] = frozenset(), skip: set[int] = frozenset()) -> None:
    """Every manifest entry reads back under ``root`` (a mount point).

    Args:
        lost: inodes that may instead be found as ``/lost+found/#ino``.
        grown: inodes whose size may have grown to a block boundary (zeros after).
        skip: inodes not checked (their data was legitimately lost).
    """
    for p, want in sorted(man.items()):
        ino = want["ino"]
        if ino in skip:
            continue
        full = root + p
        if not os.path.lexists(full) and ino in lost:
            full = os.path.join(root, "lost+found", f"#{ino}")
        assert os.path.lexists(full), f"{p} (inode {ino}) is missing"
        st = os.lstat(full)
        kind = want["kind"]
        if kind == "file":
            assert S.S_ISREG(st.st_mode), p
            if ino in grown:
                with open(full, "rb") as f:
                    got = f.read()
                assert not any(got[want["size"]:]), p
                assert hashlib.sha256(got[:want["size"]]).hexdigest() == want["sha"], p
            else:
                sha, n = _sha_file(full)
                assert n == want["size"], f"{p}: size {n}, expected {want['size']}"
                assert sha == want["sha"], f"{p}: content differs"
            for k, v in want.get("xattrs", {}).items():
                assert os.getxattr(full, k) == v.encode(), f"{p}: xattr {k}"
        elif kind == "symlink":
            assert os.readlink(full) == want["target"], p
        elif kind == "dir":
            assert S.S_ISDIR(st.st_mode), p
        elif kind == "fifo":
            assert S.S_ISFIFO(st.st_mode), p
        elif kind == "chr":
            assert S.S_ISCHR(st.st_mode), p


def walk_all(fs) -> int:
    """Read everything reachable through the API (raises on any EIO); returns count."""
    n = 0
    stack = [fs.root_ino]
    seen = set()
    while stack:
        d = stack.pop()
        if d in seen:
            continue
        seen.add(d)
        dh = fs.opendir(d)
        try:
            for name, di, _off in fs.readdir(dh, 0):
                if name in (b".", b".."):
                    continue
                n += 1
                fs.listxattr(di.bno)
                if S.S_ISDIR(di.mode):
                    stack.append(di.bno)
                elif S.S_ISREG(di.mode):
                    # the mapped ranges and the last block (a damaged size may
                    # make a legal but huge sparse file: holes are not read)
                    from clusterfs.fs import inode as inode_mod
                    fh = fs.open(di.bno, os.O_RDONLY)
                    try:
                        ranges = [(lb * BLOCK_SIZE, n * BLOCK_SIZE)
                                  for lb, _pb, n in inode_mod.extents(fs.vol, di)]
                        ranges.append((max(0, di.size - BLOCK_SIZE), BLOCK_SIZE))
                        if not ranges[:-1]:
                            ranges.append((0, min(di.size, 1 << 22)))
                        for off, n in ranges:
                            end = off + n
                            while off < end:
                                chunk = fs.read(fh, off, min(1 << 20, end - off))
                                if not chunk:
                                    break
                                off += len(chunk)
                    finally:
                        fs.release(fh)
                elif S.S_ISLNK(di.mode):
                    fs.readlink(di.bno)
                assert fs.lookup(d, name).bno == di.bno
        finally:
            fs.releasedir(dh)
    return n


def cleanup(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
