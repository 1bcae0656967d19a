"""The corruption catalogue: one test per kind of damage, on a populated volume.

Each test damages exactly one thing, then checks that

1. ``fsck -n`` reports it in the right layer (and exits 4: errors left),
2. ``fsck -y`` repairs it (exit 1: errors corrected, none left),
3. a second ``fsck -n`` finds nothing (exit 0),
4. the volume mounts through real FUSE and every file that was reachable reads back
   its data (at its path, or under /lost+found when the damage cut it off).
"""

from __future__ import annotations

import hashlib
import os
import stat as S

import pytest

from clusterfs.fs import directory
from clusterfs.fs.single_node import SingleNodeMount
from clusterfs.ondisk.blockhdr import BLOCK_SIZE, BlockType
from clusterfs.ondisk.format import (DIRENT, DT_REG, EXT_SHARED, EXTENT, FREE, REFCOUNT,
                                     REFROOT_OFF, USED, Heartbeat, TreeNode)
from tests.fsck.fsckutil import (CTX, Api, bitmap_state, crash_session, dinode,
                                 dir_node_blocks, findings, flip, fsck, lookup, put_dinode,
                                 put_rgrp_header, read_block, refcount_records, reseal,
                                 rgrp_header, set_bitmap_state, superblock, verify_tree,
                                 write_block)
from tests.helpers import Mount

# -- the common check ------------------------------------------------------------------------

def check_case(img, man, tmp_path, layer: int, codes, *, lost=(), grown=(), skip=(),
               expect_n: int = 4):
    code, rep, _ = fsck(img, "n")
    found = findings(rep, layer)
    assert code == expect_n, rep.text
    assert any(f.code in codes for f in found), \
        f"layer {layer} did not report {codes}:\n{rep.text}"
    code, rep, _ = fsck(img, "y")
    assert code == 1, rep.text
    assert all(f.fixed for f in findings(rep)), rep.text
    code, rep2, _ = fsck(img, "n")
    assert code == 0, f"second run not clean:\n{rep2.text}\n--- first -y run:\n{rep.text}"
    mount_and_verify(img, man, tmp_path, lost=set(lost), grown=set(grown), skip=set(skip))
    return rep


def mount_and_verify(img, man, tmp_path, **kw):
    m = Mount(img, str(tmp_path / "mnt")).start()
    try:
        verify_tree(m.path, man, **kw)
    finally:
        m.stop()


# -- damage helpers ------------------------------------------------------------------------

# -- layer 1: volume --------------------------------------------------------------------------

def test_bad_superblock_checksum(vol, tmp_path):
    img, man = vol
    flip(img, 0, 100)          # inside the label: only the crc catches it
    check_case(img, man, tmp_path, 1, {"primary-superblock"})
    assert superblock(img).total_blocks > 0


def test_lost_primary_superblock(vol, tmp_path):
    img, man = vol
    write_block(img, 0, bytes(BLOCK_SIZE))
    check_case(img, man, tmp_path, 1, {"primary-superblock"})


def test_bad_backup_superblock(vol, tmp_path):
    img, man = vol
    sb = superblock(img)
    flip(img, sb.backup_bno, 60)
    check_case(img, man, tmp_path, 1, {"backup-superblock"})


# -- layer 2: cluster ---------------------------------------------------------------------------

def _add_files(fs, names):
    for n in names:
        fh, _ = fs.create(fs.root_ino, n.encode(), 0o644, os.O_RDWR, CTX)
        fs.write(fh, 0, n.encode() * 300)
        fs.release(fh)


def test_dirty_journal_of_dead_node(vol, tmp_path):
    img, man = vol

    def work(fs):
        _add_files(fs, ["crash-a", "crash-b"])
        fs.vol.commit()
    crash_session(img, work)
    rep = check_case(img, man, tmp_path, 2, {"journal-replay", "stale-slot"})
    assert {"journal-replay", "stale-slot"} <= {f.code for f in findings(rep, 2)}
    with Api(img) as fs:
        fh = fs.open(lookup(fs, "/crash-b"), os.O_RDONLY)
        assert fs.read(fh, 0, 10000) == b"crash-b" * 300
        fs.release(fh)


def test_torn_journal_tail(vol, tmp_path):
    img, man = vol

    def work(fs):
        _add_files(fs, ["kept"])
        fs.vol.commit()
        _add_files(fs, ["torn"])
    crash_session(img, work, torn=True)
    check_case(img, man, tmp_path, 2, {"journal-torn-tail"})
    with Api(img) as fs:
        lookup(fs, "/kept")
        with pytest.raises(OSError):
            lookup(fs, "/torn")


def test_corrupt_journal_middle(vol, tmp_path):
    img, man = vol

    def work(fs):
        _add_files(fs, ["first"])
        fs.vol.commit()
        _add_files(fs, ["second"])
        fs.vol.commit()
    crash_session(img, work)
    # damage an image of the first transaction in the log (at the header's tail)
    from clusterfs.ondisk.blockdev import BlockDevice
    from clusterfs.ondisk.slots import slot_journal
    with BlockDevice(img, readonly=True) as dev:
        j = slot_journal(dev, superblock(img), 0)
        hdr = j.read_header()
    first = j.start + 1 + hdr.tail_pos
    assert int.from_bytes(read_block(img, first)[4:6], "little") == \
        BlockType.JOURNAL_DESCRIPTOR
    flip(img, first + 1, 2000)
    check_case(img, man, tmp_path, 2, {"journal-corrupt"})


def test_stale_heartbeat_slot(vol, tmp_path):
    img, man = vol
    sb = superblock(img)
    bno = sb.heartbeat_bno(1)
    write_block(img, bno, Heartbeat(slot=1, state=1, counter=7, node="ghost",
                                    interval_ms=100).image(bno))
    check_case(img, man, tmp_path, 2, {"stale-slot"})


def test_damaged_lease_block(vol, tmp_path):
    img, man = vol
    sb = superblock(img)
    flip(img, sb.lease_bno, 100)
    check_case(img, man, tmp_path, 2, {"bad-lease"})
    from clusterfs.ondisk.format import FREE_LEASE, decode_lease
    assert decode_lease(read_block(img, sb.lease_bno), sb.lease_bno) == FREE_LEASE


def test_held_lease_is_no_finding(vol, tmp_path):
    """A lease left held by a lock manager that went is taken over by the next one:
    nothing to repair."""
    img, man = vol
    sb = superblock(img)
    from clusterfs.ondisk.format import LeaseBlock, encode_lease
    write_block(img, sb.lease_bno, encode_lease(
        LeaseBlock(2, 7, 99, "gone", "10.0.0.2:7789", 1, 2, 1600), sb.lease_bno))
    code, rep, _ = fsck(img, "n")
    assert code == 0, rep.text


def test_live_node_refuses_repair(vol, tmp_path):
    img, man = vol
    m = Mount(img, str(tmp_path / "mnt")).start()
    try:
        code, rep, _ = fsck(img, "y")
        assert code == 8 and "in use" in rep.operational_error, rep.text
        code, rep, _ = fsck(img, "n")
        assert code in (0, 4)
        assert any(f.code == "volume-in-use" for f in rep.findings), rep.text
    finally:
        m.stop()


# -- layer 3: allocation --------------------------------------------------------------------------

def test_leaked_block(vol, tmp_path):
    img, man = vol
    sb = superblock(img)
    start, length = sb.rgrp_range(sb.rgrp_count - 1)
    victim = start + length - 5
    assert bitmap_state(img, victim) == FREE
    set_bitmap_state(img, victim, USED)
    check_case(img, man, tmp_path, 3, {"leaked-blocks"})
    assert bitmap_state(img, victim) == FREE


def test_referenced_free_block(vol, tmp_path):
    img, man = vol
    di = dinode(img, man["/data/med7.bin"]["ino"])
    pblk = di.root.vals[0][0] + 2
    set_bitmap_state(img, pblk, FREE)
    check_case(img, man, tmp_path, 3, {"referenced-free-blocks"})
    assert bitmap_state(img, pblk) == USED


def test_wrong_free_count(vol, tmp_path):
    img, man = vol
    sb = superblock(img)
    from clusterfs.ondisk.format import RgrpHeader
    start, _ = sb.rgrp_range(2)
    hdr = RgrpHeader.decode(read_block(img, start), start)
    hdr.free += 17
    hdr.seq -= 1
    write_block(img, start, hdr.image())
    check_case(img, man, tmp_path, 3, {"rgrp-counts"})


def test_damaged_bitmap_block(vol, tmp_path):
    img, man = vol
    sb = superblock(img)
    start, _ = sb.rgrp_range(0)
    write_block(img, start + 1, os.urandom(BLOCK_SIZE))
    check_case(img, man, tmp_path, 3, {"bitmap-block"})


def test_damaged_rgrp_header(vol, tmp_path):
    img, man = vol
    sb = superblock(img)
    start, _ = sb.rgrp_range(1)
    write_block(img, start, bytes(BLOCK_SIZE))
    check_case(img, man, tmp_path, 3, {"rgrp-header"})


# -- layer 4: inodes and extents ------------------------------------------------------------------

def test_bad_dinode_checksum(vol, tmp_path):
    img, man = vol
    ino = man["/data/med0.bin"]["ino"]
    flip(img, ino, 72)             # inside atime
    check_case(img, man, tmp_path, 4, {"dinode-checksum"})


def test_destroyed_dinode(vol, tmp_path):
    img, man = vol
    ino = man["/data/med0.bin"]["ino"]
    write_block(img, ino, os.urandom(BLOCK_SIZE))
    rep = check_case(img, man, tmp_path, 4, {"bad-dinode"}, skip={ino})
    assert any(f.code == "dangling-entry" for f in findings(rep, 5))


def test_bad_extent_range(vol, tmp_path):
    img, man = vol
    di = dinode(img, man["/data/med3.bin"]["ino"])
    (pblk, n, fl), = di.root.vals
    di.root.vals[0] = (pblk, n + (1 << 22), fl)
    put_dinode(img, di)
    check_case(img, man, tmp_path, 4, {"bad-extent"})


def _find_adjacent_extents(img, man):
    for p, e in sorted(man.items()):
        if e["kind"] != "file":
            continue
        di = dinode(img, e["ino"])
        if not di.flags & 2 or di.root.level != 0:
            continue
        recs = list(zip(di.root.keys, di.root.vals))
        for i in range(1, len(recs)):
            (la, (pa, na, _)), (lb, (pb, nb, _)) = recs[i - 1], recs[i]
            if la + na == lb and na >= 2 and nb >= 2 and pa + na != pb:
                return di, i
    raise AssertionError("no file with two adjacent extents")


def test_overlapping_extents(vol, tmp_path):
    img, man = vol
    di, i = _find_adjacent_extents(img, man)
    di.root.keys[i] -= 1           # now overlaps the previous extent by one block
    put_dinode(img, di)
    check_case(img, man, tmp_path, 4, {"bad-extent"})


def test_wrong_size(vol, tmp_path):
    img, man = vol
    ino = man["/data/med4.bin"]["ino"]
    di = dinode(img, ino)
    di.size = 50000
    put_dinode(img, di)
    check_case(img, man, tmp_path, 4, {"bad-size"}, grown={ino})


def test_wrong_block_count(vol, tmp_path):
    img, man = vol
    di = dinode(img, man["/data/big.bin"]["ino"])
    di.blocks += 9
    put_dinode(img, di)
    check_case(img, man, tmp_path, 4, {"block-count"})


def test_generation_counter_behind_its_inodes(vol, tmp_path):
    """A group whose next inode generation is one its inodes already have: a new
    inode there would reuse a live generation, so a stale file handle could name it."""
    img, man = vol
    sb = superblock(img)
    from clusterfs.ondisk.format import RgrpHeader
    rg = sb.rgrp_of(sb.root_ino)
    start, _ = sb.rgrp_range(rg)
    hdr = RgrpHeader.decode(read_block(img, start), start)
    assert hdr.igeneration > 1
    hdr.igeneration = 1
    hdr.seq -= 1
    write_block(img, start, hdr.image())
    check_case(img, man, tmp_path, 4, {"igeneration"})
    assert RgrpHeader.decode(read_block(img, start), start).igeneration > 1


def test_doubly_claimed_block(vol, tmp_path):
    img, man = vol
    a, b = man["/data/med5.bin"], man["/data/med6.bin"]
    da, db = dinode(img, a["ino"]), dinode(img, b["ino"])
    (pa, na, _), = da.root.vals
    (pb, nb, _), = db.root.vals
    # file A gets a second extent that maps two of file B's blocks
    da.root.keys.append(na)
    da.root.vals.append((pb, 2, 0))
    da.root.recount()
    with open(img, "rb") as f:
        f.seek(pa * BLOCK_SIZE)
        a_data = f.read(na * BLOCK_SIZE)
        f.seek(pb * BLOCK_SIZE)
        b_data = f.read(2 * BLOCK_SIZE)
    da.size = (na + 2) * BLOCK_SIZE
    da.blocks += 2
    put_dinode(img, da)
    want = a_data + b_data
    a.update(size=len(want), sha=hashlib.sha256(want).hexdigest())
    check_case(img, man, tmp_path, 4, {"dup-blocks"})
    # the two blocks are shared now (revision 3): both extents SHARED, count 2
    da, db = dinode(img, a["ino"]), dinode(img, b["ino"])
    assert da.root.vals[-1] == (pb, 2, EXT_SHARED) and db.root.vals == [(pb, nb, EXT_SHARED)]
    assert refcount_records(img, pb) == [(pb, 2, 2)]
    # copy-on-write: a write to B leaves A's bytes
    m = Mount(img, str(tmp_path / "mnt")).start()
    try:
        with open(m.p("data/med6.bin"), "r+b") as f:
            f.write(b"\xee" * (2 * BLOCK_SIZE))
        with open(m.p("data/med5.bin"), "rb") as f:
            assert f.read() == want
    finally:
        m.stop()
    code, rep, _ = fsck(img, "n")
    assert code == 0, rep.text
    assert refcount_records(img, pb) == []


def test_damaged_extent_tree_node(vol, tmp_path):
    img, man = vol
    ino = man["/data/frag.bin"]["ino"]
    node = dinode(img, ino).root.vals[0]
    flip(img, node, 1000)          # crc only: the records are still readable
    check_case(img, man, tmp_path, 4, {"extent-tree"})


def test_damaged_xattr_block(vol, tmp_path):
    img, man = vol
    e = man["/data/med2.bin"]
    xb = dinode(img, e["ino"]).xattr_block
    write_block(img, xb, bytes(BLOCK_SIZE))
    del e["xattrs"]["user.big"]       # lost with its block
    check_case(img, man, tmp_path, 4, {"xattr-block"})


# -- layer 4: shared blocks and refcount trees ------------------------------------------------

def _refcount_leaf(img, pblk):
    """(node, where) of the refcount tree leaf of ``pblk``'s group that holds (or
    would hold) the record of ``pblk``: where is "root" (the group header) or the
    node's block."""
    sb = superblock(img)
    rg = sb.rgrp_of(pblk)
    node, where = rgrp_header(img, rg).refroot, "root"
    while node.level:
        i = max(0, node.find(pblk))
        where = node.vals[i]
        node = TreeNode.decode(read_block(img, where), where, REFCOUNT)
    return node, where


def _put_refcount_leaf(img, pblk, node, where):
    if where == "root":
        hdr = rgrp_header(img, superblock(img).rgrp_of(pblk))
        hdr.refroot = node
        node.is_root = True
        put_rgrp_header(img, hdr)
    else:
        node.recount()
        node.seq -= 1
        write_block(img, where, node.image())


def _shared_block(img, man, name="/shared/base.img", at=0):
    """The physical block of logical block ``at`` of a shared file."""
    di = dinode(img, man[name]["ino"])
    from clusterfs.fs.btree import BTree
    # (a root-only or one-level tree: read its records straight)
    recs = list(zip(di.root.keys, di.root.vals))
    if di.root.level:
        recs = []
        for b in di.root.vals:
            n = TreeNode.decode(read_block(img, b), b, EXTENT)
            recs.extend(zip(n.keys, n.vals))
    del BTree
    for lb, (pb, n, f) in recs:
        if lb <= at < lb + n:
            return pb + at - lb, f
    raise AssertionError(f"{name}: block {at} not mapped")


def test_refcount_too_high(vol, tmp_path):
    img, man = vol
    pblk, _f = _shared_block(img, man, at=10)
    node, where = _refcount_leaf(img, pblk)
    i = node.find(pblk)
    assert node.keys[i] == pblk and node.vals[i][1] >= 2
    node.vals[i] = (node.vals[i][0], node.vals[i][1] + 5)
    _put_refcount_leaf(img, pblk, node, where)
    check_case(img, man, tmp_path, 4, {"refcount-wrong"})
    assert [r for r in refcount_records(img, pblk) if r[0] == pblk][0][2] < 6


def test_refcount_record_lost(vol, tmp_path):
    """A shared block whose count is gone: a write to one sharer would go in place
    and change the others' bytes."""
    img, man = vol
    pblk, _f = _shared_block(img, man, at=11)
    node, where = _refcount_leaf(img, pblk)
    i = node.find(pblk)
    assert node.keys[i] == pblk and i > 0
    want = node.vals[i]
    node.delete_at(i)
    _put_refcount_leaf(img, pblk, node, where)
    check_case(img, man, tmp_path, 4, {"refcount-missing"})
    assert (pblk, *want) in refcount_records(img, pblk)


def test_stale_refcount(vol, tmp_path):
    """A count on blocks one file maps alone (a stale count)."""
    img, man = vol
    di = dinode(img, man["/data/med0.bin"]["ino"])
    (pblk, n, _f), = di.root.vals
    node, where = _refcount_leaf(img, pblk)
    assert where == "root" and not node.keys, "med0's group should share nothing"
    node.insert_at(0, pblk, (n, 2))
    _put_refcount_leaf(img, pblk, node, where)
    check_case(img, man, tmp_path, 4, {"refcount-stale"})
    assert refcount_records(img, pblk) == []


def test_refcount_on_free_blocks(vol, tmp_path):
    """A count on blocks nothing maps (their last sharer went, the count stayed)."""
    img, man = vol
    sb = superblock(img)
    start, length = sb.rgrp_range(sb.rgrp_count - 1)
    victim = start + length - 20
    assert bitmap_state(img, victim) == FREE
    node, where = _refcount_leaf(img, victim)
    assert where == "root" and not node.keys
    node.insert_at(0, victim, (4, 3))
    _put_refcount_leaf(img, victim, node, where)
    check_case(img, man, tmp_path, 4, {"refcount-stale"})
    assert refcount_records(img, victim) == []


def test_shared_blocks_without_the_flag(vol, tmp_path):
    """A clone whose extent lost SHARED: the blocks are cross-linked (fixed by
    setting the flag again, the count being right)."""
    img, man = vol
    di = dinode(img, man["/shared/clone.img"]["ino"])
    assert di.root.level == 0
    pb, n, f = di.root.vals[0]
    assert f & EXT_SHARED
    di.root.vals[0] = (pb, n, 0)
    put_dinode(img, di)
    check_case(img, man, tmp_path, 4, {"dup-blocks"})
    assert dinode(img, man["/shared/clone.img"]["ino"]).root.vals[0] == (pb, n, f)


def test_damaged_refcount_node(vol, tmp_path):
    img, man = vol
    pblk, _f = _shared_block(img, man, at=2)
    _node, where = _refcount_leaf(img, pblk)
    assert where != "root", "the base image's group should have refcount node blocks"
    before = refcount_records(img, pblk)
    flip(img, where, 40)           # the node's owner field: the node is not credible
    check_case(img, man, tmp_path, 4, {"refcount-tree"})
    assert refcount_records(img, pblk) == before


def test_damaged_refcount_root(vol, tmp_path):
    img, man = vol
    pblk, _f = _shared_block(img, man, at=2)
    sb = superblock(img)
    start, _ = sb.rgrp_range(sb.rgrp_of(pblk))
    before = refcount_records(img, pblk)
    buf = read_block(img, start)
    buf[REFROOT_OFF + 4] = 7        # the root's kind
    write_block(img, start, reseal(buf))
    rep = check_case(img, man, tmp_path, 4, {"refcount-tree"})
    # the header itself is kept (the nodes under the lost root are leaked blocks)
    assert {f.code for f in findings(rep, 3)} <= {"leaked-blocks"}, rep.text
    assert refcount_records(img, pblk) == before


# -- layer 5: namespace ---------------------------------------------------------------------------

def test_wrong_link_count(vol, tmp_path):
    img, man = vol
    di = dinode(img, man["/data/med1.bin"]["ino"])
    assert di.nlink == 2
    di.nlink = 5
    put_dinode(img, di)
    check_case(img, man, tmp_path, 5, {"link-count"})
    assert dinode(img, man["/data/med1.bin"]["ino"]).nlink == 2


def test_dangling_directory_entry(vol, tmp_path):
    img, man = vol
    big = dinode(img, man["/data/big.bin"]["ino"]).root.vals[0][0]
    with Api(img) as fs:
        with fs.vol.operation():
            pdi = fs.vol.dinode(man["/docs"]["ino"])
            directory.add(fs.vol, pdi, b"ghost", big + 3, DT_REG)
    check_case(img, man, tmp_path, 5, {"dangling-entry"})


def test_directory_with_bad_hash_block(vol, tmp_path):
    img, man = vol
    d = man["/bigdir"]["ino"]
    nodes = dir_node_blocks(img, d)
    assert nodes, "bigdir should have tree node blocks"
    leaf = None
    for b in nodes:
        node = TreeNode.decode(read_block(img, b), b, DIRENT)
        if node.level == 0:
            leaf = node
            break
    lost = {ino for ino, _dt, _name in leaf.vals}
    write_block(img, leaf.bno, os.urandom(BLOCK_SIZE))
    check_case(img, man, tmp_path, 5, {"dir-tree"}, lost=lost)


def test_entry_under_wrong_hash(vol, tmp_path):
    img, man = vol
    di = dinode(img, man["/docs"]["ino"])
    assert di.root.level == 0
    keys = di.root.keys
    i = next(k for k in range(1, len(keys)) if keys[k] - keys[k - 1] > 1)
    keys[i] = keys[i - 1] + 1      # same hash as the previous name: not this one's
    put_dinode(img, di)
    check_case(img, man, tmp_path, 5, {"dir-hash"})


def test_unreachable_inode(vol, tmp_path):
    img, man = vol
    ino = man["/docs/note3.txt"]["ino"]
    with Api(img) as fs:
        with fs.vol.operation():
            directory.remove(fs.vol, fs.vol.dinode(man["/docs"]["ino"]), b"note3.txt")
    check_case(img, man, tmp_path, 5, {"unreachable-inode"}, lost={ino})
    with Api(img) as fs:
        assert fs.lookup(lookup(fs, "/lost+found"), b"#%d" % ino).bno == ino
        assert S.S_IMODE(fs.getattr(lookup(fs, "/lost+found")).mode) == 0o700


def test_unreachable_directory(vol, tmp_path):
    img, man = vol
    with Api(img) as fs:
        deep = lookup(fs, "/deep")
        a = lookup(fs, "/deep/a")
        with fs.vol.operation():
            directory.remove(fs.vol, fs.vol.dinode(deep), b"a")
    moved = {p: e for p, e in man.items() if p.startswith("/deep/a/")}
    for p in moved:
        del man[p]
    check_case(img, man, tmp_path, 5, {"unreachable-dir"})
    with Api(img) as fs:
        assert fs.lookup(lookup(fs, "/lost+found"), b"#%d" % a).bno == a
        for p, e in moved.items():
            q = "/lost+found/#%d/" % a + p[len("/deep/a/"):]
            assert lookup(fs, q) == e["ino"]


def test_orphan_not_freed(vol, tmp_path):
    img, man = vol
    m = SingleNodeMount(img, heartbeat_interval=0.2)
    fs = m.start()
    fh, di = fs.create(fs.root_ino, b"orphan", 0o644, os.O_RDWR, CTX)
    fs.write(fh, 0, os.urandom(100000))
    fs.unlink(fs.root_ino, b"orphan")          # still open: stays UNLINKED
    fs.handles.clear()
    fs.open_count.clear()                      # ... and its last close is lost
    m.stop()
    assert bitmap_state(img, di.bno) == 2
    check_case(img, man, tmp_path, 5, {"orphan"})
    assert bitmap_state(img, di.bno) == FREE


# -- layer 6: data surface scan ---------------------------------------------------------------------

class FaultyReads:
    """A device whose reads of some blocks fail with EIO."""

    def __init__(self, inner, bad):
        self.inner, self.bad, self.nblocks = inner, set(bad), inner.nblocks

    def read(self, bno, count=1):
        if any(b in self.bad for b in range(bno, bno + count)):
            raise OSError(5, "I/O error")
        return self.inner.read(bno, count)

    def write(self, bno, data):
        self.inner.write(bno, data)

    def flush(self):
        self.inner.flush()

    def close(self):
        self.inner.close()


def test_unreadable_data_is_reported(vol):
    img, man = vol
    from clusterfs.ondisk.blockdev import BlockDevice
    e = man["/data/big.bin"]
    pblk = dinode(img, e["ino"]).root.vals[0][0]
    dev = FaultyReads(BlockDevice(img, readonly=True), {pblk + 100, pblk + 101})
    try:
        code, rep, _ = fsck(img, "n", scan_data=True, device=dev)
    finally:
        dev.close()
    bad = findings(rep, 6)
    assert code == 4 and len(bad) == 1, rep.text
    assert bad[0].ino == e["ino"] and bad[0].count == 2 and bad[0].path == "/data/big.bin"
    code, rep, _ = fsck(img, "n", scan_data=True)
    assert code == 0, rep.text
