"""Random corruption of metadata blocks: fsck never crashes or hangs, and after
``fsck -y`` a second run is clean and the volume mounts with everything readable.

Each case copies the populated volume, picks 1-3 metadata blocks (superblocks,
heartbeats, journal headers, group headers and bitmaps, dinodes, tree nodes, refcount
tree nodes, xattr blocks) and damages them: flipped bytes (crc left wrong, or recomputed so that only
the contents are wrong), a zeroed block, or random garbage.  A second campaign starts
from a volume whose node died with committed transactions in its journal, and also
damages the journal's log blocks.  The default run does a quick subset (24 + 6
cases); ``-m slow`` runs the whole campaign (600 + 150 cases).
"""

from __future__ import annotations

import os
import random

import pytest

from clusterfs.ondisk import blockhdr
from clusterfs.ondisk.blockhdr import BLOCK_SIZE
from tests.fsck.fsckutil import (CTX, Api, copy_image, crash_session, fsck, read_block,
                                 superblock, walk_all, write_block)
from tests.helpers import Mount

QUICK = 24
FULL = 600


@pytest.fixture(scope="module")
def meta_blocks(populated_master):
    """Every metadata block of the populated volume, by kind."""
    img, _man = populated_master
    code, rep, ck = fsck(img, "n")
    assert code == 0, rep.text
    st = ck.state
    sb = st.sb
    kinds = {
        "superblock": [0, sb.backup_bno],
        "heartbeat": [sb.heartbeat_bno(i) for i in range(sb.nslots)],
        "journal": [sb.journal_range(i)[0] for i in range(sb.nslots)],
        "rgrp": list(st.gstart),
        "bitmap": [g + 1 + j for g in st.gstart for j in range(sb.bitmap_blocks)],
        "dinode": sorted(st.inodes),
        "node": sorted(b for r in st.inodes.values() for b in r.nodes),
        "xattr": sorted(r.di.xattr_block for r in st.inodes.values() if r.di.xattr_block),
        "refcount": sorted(b for nodes in st.ref_nodes for b in nodes),
    }
    assert kinds["refcount"], "the populated volume should have refcount node blocks"
    return kinds


# how often each kind is picked (dinodes and tree nodes matter most)
WEIGHTS = {"superblock": 2, "heartbeat": 1, "journal": 1, "rgrp": 3, "bitmap": 3,
           "dinode": 12, "node": 6, "xattr": 1, "refcount": 2}


def damage(img: str, kinds: dict, rng: random.Random) -> list[str]:
    names = list(WEIGHTS)
    picked: list[int] = []
    what = []
    for _ in range(rng.choice([1, 1, 1, 2, 2, 3])):
        kind = rng.choices(names, [WEIGHTS[k] for k in names])[0]
        if not kinds[kind]:
            continue
        bno = rng.choice(kinds[kind])
        if kind == "superblock" and any(b in kinds["superblock"] for b in picked):
            continue            # both superblocks gone: nothing left to check with
        picked.append(bno)
        buf = read_block(img, bno)
        r = rng.random()
        if r < 0.55:
            for _ in range(rng.randint(1, 4)):
                buf[rng.randrange(BLOCK_SIZE)] ^= rng.randint(1, 255)
            how = "flip"
        elif r < 0.75:
            hi = 700 if rng.random() < 0.5 else BLOCK_SIZE
            for _ in range(rng.randint(1, 3)):
                buf[rng.randrange(32, hi)] ^= rng.randint(1, 255)
            blockhdr.reseal(buf)
            how = "flip+reseal"
        elif r < 0.87:
            buf = bytearray(BLOCK_SIZE)
            how = "zero"
        else:
            buf = bytearray(rng.randbytes(BLOCK_SIZE))
            how = "garbage"
        write_block(img, bno, buf)
        what.append(f"{kind} {bno} {how}")
    return what


def run_case(master: str, kinds: dict, seed: int, tmp_path, *, fuse: bool = False) -> None:
    rng = random.Random(seed)
    img = str(tmp_path / f"fuzz{seed}.img")
    copy_image(master, img)
    what = damage(img, kinds, rng)
    ctx = f"seed {seed}: {what}"
    code, rep, _ = fsck(img, "y")         # asserts no internal error
    assert code in (0, 1), f"{ctx}: fsck -y exit {code}\n{rep.text}"
    code, rep2, _ = fsck(img, "n")
    assert code == 0, f"{ctx}: second run not clean\n{rep2.text}\n--- -y run:\n{rep.text}"
    if fuse:
        m = Mount(img, str(tmp_path / f"mnt{seed}")).start()
        try:
            for dirpath, dirnames, filenames in os.walk(m.path):
                for f in filenames:
                    p = os.path.join(dirpath, f)
                    if os.path.isfile(p) and not os.path.islink(p):
                        with open(p, "rb") as fh:     # head and tail (maybe sparse)
                            fh.read(4 << 20)
                            fh.seek(max(0, os.fstat(fh.fileno()).st_size - (1 << 20)))
                            fh.read()
        finally:
            m.stop()
    else:
        with Api(img) as fs:
            walk_all(fs)
    code, rep3, _ = fsck(img, "n")
    assert code == 0, f"{ctx}: not clean after mounting\n{rep3.text}\n--- -y run:\n{rep.text}"
    os.unlink(img)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", range(QUICK))
def test_fuzz_quick(populated_master, meta_blocks, seed, tmp_path):
    run_case(populated_master[0], meta_blocks, 1000 + seed, tmp_path, fuse=seed % 15 == 0)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", range(FULL))
def test_fuzz_full(populated_master, meta_blocks, seed, tmp_path):
    run_case(populated_master[0], meta_blocks, seed, tmp_path, fuse=seed % 50 == 0)


# -- a crashed volume: journal log blocks too ------------------------------------------------

@pytest.fixture(scope="module")
def crashed(populated_master, meta_blocks, tmp_path_factory):
    """The populated volume after a node died with committed transactions in its
    journal (not written home), and the blocks of that journal's log."""
    master, man = populated_master
    img = str(tmp_path_factory.mktemp("crashed") / "crashed.img")
    copy_image(master, img)

    def work(fs):
        root = fs.root_ino
        for i in range(20):
            fh, _ = fs.create(root, b"new-%d" % i, 0o644, os.O_RDWR, CTX)
            fs.write(fh, 0, os.urandom(3000 + i * 5000))
            fs.release(fh)
        fs.vol.commit()
        docs = man["/docs"]["ino"]
        for i in range(0, 12, 3):
            fs.unlink(docs, b"note%d.txt" % i)
        fs.rename(docs, b"note1.txt", root, b"moved-note")
        fh = fs.open(man["/data/big.bin"]["ino"], os.O_RDWR)
        fs.write(fh, 100000, os.urandom(50000))
        fs.release(fh)
        fs.vol.commit()
    crash_session(img, work)
    sb = superblock(img)
    start, length = sb.journal_range(0)
    log = [b for b in range(start + 1, start + length) if any(read_block(img, b))]
    kinds = dict(meta_blocks)
    kinds["log"] = log
    return img, kinds


def run_crashed_case(crashed, seed: int, tmp_path) -> None:
    img0, kinds = crashed
    rng = random.Random(seed)
    img = str(tmp_path / f"crash{seed}.img")
    copy_image(img0, img)
    what = []
    for _ in range(rng.choice([1, 1, 2])):
        kind = "log" if rng.random() < 0.6 else rng.choice(["dinode", "node", "bitmap",
                                                             "rgrp", "journal"])
        bno = rng.choice(kinds[kind])
        buf = read_block(img, bno)
        for _ in range(rng.randint(1, 3)):
            buf[rng.randrange(BLOCK_SIZE)] ^= rng.randint(1, 255)
        write_block(img, bno, buf)
        what.append(f"{kind} {bno}")
    ctx = f"seed {seed}: {what}"
    code, rep, _ = fsck(img, "y", live_watch=0.05)
    assert code in (0, 1), f"{ctx}: fsck -y exit {code}\n{rep.text}"
    code, rep2, _ = fsck(img, "n")
    assert code == 0, f"{ctx}: second run not clean\n{rep2.text}\n--- -y run:\n{rep.text}"
    with Api(img) as fs:
        walk_all(fs)
    os.unlink(img)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", range(6))
def test_fuzz_crashed_quick(crashed, seed, tmp_path):
    run_crashed_case(crashed, 5000 + seed, tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", range(150))
def test_fuzz_crashed_full(crashed, seed, tmp_path):
    run_crashed_case(crashed, seed, tmp_path)
