"""docs/FORMAT.md and the code agree: one heading per block type, field tables that
match the format's field tables (``clusterfs.ondisk.layout``), codecs that put every
field where its table says, and the journal section identical to
docs/JOURNAL-FORMAT.md."""

from __future__ import annotations

import pathlib
import re
import stat as S

import pytest

from clusterfs.ondisk import blockhdr
from clusterfs.ondisk import format as fmt
from clusterfs.ondisk.blockhdr import HEADER_SIZE, BlockType
from clusterfs.ondisk.format import (DINODE_LAYOUT, DIRENT, DIRENT_REC, EXTENT, EXTENT_REC,
                                     HB_LAYOUT, INDEX_REC, LEASE_LAYOUT, NODE_HDR,
                                     NODE_LAYOUT, REFCOUNT, REFCOUNT_REC, RGRP_LAYOUT,
                                     SB_LAYOUT, SLOT_ENTRY, SLOT_TABLE_LAYOUT,
                                     XATTR_BLOCK_LAYOUT, XATTR_ENTRY)
from lockmgr import LeaseRecord

DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs"
DOC = DOCS / "FORMAT.md"


def sections() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    cur = None
    for line in DOC.read_text().splitlines():
        m = re.match(r"#+ (.*)", line)
        if m:
            cur = m.group(1).strip()
            out[cur] = []
        elif cur is not None:
            out[cur].append(line)
    return out


def tables(lines: list[str]) -> list[list[tuple[str, str, str]]]:
    """The (offset, size, field) rows of each table of a section, table by table."""
    out: list[list[tuple[str, str, str]]] = []
    rows = None
    for line in lines:
        if not line.startswith("|"):
            rows = None
            continue
        if rows is None:
            rows = []
            out.append(rows)
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if set(cells[0]) <= set("-") or cells[0] == "offset":
            continue
        rows.append(tuple(cells[:3]))
    return out


def table(lines: list[str]) -> list[tuple[str, str, str]]:
    return [row for rows in tables(lines) for row in rows]


def layout_rows(layout, base: int = 0) -> list[tuple[str, str, str]]:
    return [(str(base + off), str(size), name) for off, size, name in layout.rows()]


def test_one_heading_per_block_type():
    found = {}
    for title in sections():
        m = re.fullmatch(r"(\w+) \(type (\d+)\)", title)
        if m:
            found[m.group(1)] = int(m.group(2))
    assert found == {t.name: int(t) for t in BlockType}


BLOCK_TABLES = {
    "SUPERBLOCK (type 1)": SB_LAYOUT,
    "HEARTBEAT (type 2)": HB_LAYOUT,
    "RGRP (type 3)": RGRP_LAYOUT,
    "DINODE (type 5)": DINODE_LAYOUT,
    "XATTR (type 8)": XATTR_BLOCK_LAYOUT,
    "LEASE (type 9)": LEASE_LAYOUT,
    "SLOT_TABLE (type 11)": SLOT_TABLE_LAYOUT,
}


@pytest.mark.parametrize("title", sorted(BLOCK_TABLES))
def test_field_table_matches_layout(title):
    layout = BLOCK_TABLES[title]
    rows = table(sections()[title])
    assert rows[0] == ("0", str(HEADER_SIZE), "header")
    assert layout.base == HEADER_SIZE
    want = layout_rows(layout)
    assert rows[1:1 + len(want)] == want


def test_tree_tables_match_layouts():
    node, ext, dirent = tables(sections()["Trees"])
    assert node[:4] == layout_rows(NODE_LAYOUT)
    assert node[4][::2] == (str(NODE_HDR), "records")
    assert ext == layout_rows(EXTENT_REC)
    assert dirent[:4] == layout_rows(DIRENT_REC)
    assert dirent[4] == (str(DIRENT_REC.size), "namelen", "name")
    index = ", ".join(f"`{name}` u{8 * size}" for _off, size, name in INDEX_REC.rows())
    assert f"Index records (level > 0), {INDEX_REC.size} bytes: {index}" in \
        "\n".join(sections()["Trees"])
    for title in ("EXTENT_NODE (type 6)", "DIR_NODE (type 7)", "REFCOUNT_NODE (type 10)"):
        rows = table(sections()[title])
        assert rows[1:5] == layout_rows(NODE_LAYOUT, HEADER_SIZE)
        assert rows[5][0] == str(HEADER_SIZE + NODE_HDR)
    ref, = tables(sections()["Shared blocks and refcount trees"])
    assert ref == layout_rows(REFCOUNT_REC)
    assert REFCOUNT_REC.size == INDEX_REC.size == 16
    rgrp = table(sections()["RGRP (type 3)"])
    assert rgrp[-2][:2] == (str(RGRP_LAYOUT.end), str(fmt.REFROOT_OFF - RGRP_LAYOUT.end))
    assert rgrp[-1] == (str(fmt.REFROOT_OFF), str(fmt.REFROOT_SIZE), "refroot")


def test_xattr_tables_match_layouts():
    rows = table(sections()["Extended attributes"])
    assert rows[:2] == layout_rows(XATTR_ENTRY)
    assert rows[2] == (str(XATTR_ENTRY.size), "namelen", "name")
    block = table(sections()["XATTR (type 8)"])
    assert block[-1] == (str(fmt.XATTR_BLOCK_OFF), "used", "entries")


def test_layout_constants():
    s = sections()
    dinode = table(s["DINODE (type 5)"])
    assert (str(fmt.XATTR_INLINE_OFF), str(fmt.XATTR_INLINE_SIZE), "xattrs") in dinode
    assert (str(fmt.DATA_OFF), str(fmt.DATA_SIZE), "data") in dinode
    assert (fmt.XATTR_INLINE_OFF, fmt.XATTR_INLINE_SIZE, fmt.DATA_OFF, fmt.DATA_SIZE) == \
        (256, 384, 640, 3456)
    assert NODE_HDR == 16 and EXTENT_REC.size == 24 and INDEX_REC.size == 16
    assert DIRENT_REC.size == 18 and XATTR_ENTRY.size == 3
    assert fmt.ROOT_CAPACITY == 3440 and fmt.NODE_CAPACITY == 4048
    assert fmt.XATTR_BLOCK_OFF == 48 and fmt.BLOCKS_PER_BITMAP == 16256
    assert (fmt.FREE, fmt.USED, fmt.UNLINKED, fmt.DINODE) == (0, 1, 2, 3)
    assert (fmt.DF_INLINE, fmt.DF_EXTENTS, fmt.DF_DIRTREE, fmt.DF_PREALLOC) == (1, 2, 4, 8)
    assert "8 `DF_PREALLOC`" in "\n".join(s["DINODE (type 5)"])
    assert fmt.HASH_SHIFT == 16 and fmt.READDIR_BASE == 3
    assert fmt.FORMAT_REVISION == 5 and fmt.OLDEST_REVISION == 2
    assert fmt.SLOT_TABLE_SINCE == 4 and fmt.MAX_SLOTS == 256
    assert fmt.PREALLOC_SINCE == 5
    assert "format revision 5." in DOC.read_text().splitlines()[2]
    slot_table, entry = tables(s["SLOT_TABLE (type 11)"])
    assert slot_table[-1] == (str(fmt.SLOT_ENTRIES_OFF), f"{SLOT_ENTRY.size} × count",
                              "entries")
    assert entry == layout_rows(SLOT_ENTRY)
    assert fmt.SLOT_TABLE_MAX == 253 and f"1 .. {fmt.SLOT_TABLE_MAX}" in \
        "\n".join(s["SLOT_TABLE (type 11)"])
    assert blockhdr.MAGIC == 0x31534643
    assert (fmt.EXTENT, fmt.DIRENT, fmt.REFCOUNT) == (1, 2, 3) and fmt.EXT_SHARED == 1
    assert (fmt.REFROOT_OFF, fmt.REFROOT_SIZE) == (fmt.DATA_OFF, fmt.DATA_SIZE)
    assert "`SHARED` (`EXT_SHARED`)" in "\n".join(s["Trees"])
    assert (fmt.LEASE_START, fmt.LEASE_BLOCKS, fmt.LEASE_FREE) == (1, 1, -1)
    assert fmt.MAX_DEPTH == 8 and fmt.SYMLINK_MAX == 4095
    assert f"at most {fmt.MAX_DEPTH - 1} (depth {fmt.MAX_DEPTH})" in "\n".join(s["Trees"])
    assert f"1..{fmt.SYMLINK_MAX}" in "\n".join(s["DINODE (type 5)"])
    hdr = table(s["Block header"])
    assert [r[:3] for r in hdr[:7]] == [
        ("0", "4", "magic"), ("4", "2", "type"), ("6", "2", "flags"), ("8", "4", "crc32c"),
        ("12", "4", "reserved"), ("16", "8", "blkno"), ("24", "8", "seq")]
    assert blockhdr.HEADER.format in ("<IHHIIQQ", b"<IHHIIQQ")


# -- the codecs put each field where its table says --------------------------------------

def _fields(layout, buf, at=0) -> dict:
    return {name: layout.get(buf, name, at) for name in layout.names()}


def test_superblock_and_heartbeat_fields():
    sb = fmt.plan_geometry(1 << 16, 3)
    sb.root_ino, sb.label, sb.flags, sb.features = 4321, "vol", 1, 0
    sb.cluster_name = "c1"
    got = _fields(SB_LAYOUT, sb.image(0))
    want = {k: getattr(sb, k) for k in got if hasattr(sb, k)}
    want.update(label=b"vol".ljust(64, b"\0"), cluster_name=b"c1".ljust(32, b"\0"),
                reserved=bytes(100), mkfs_seq=0, grow_from=0, slot_table=0)
    assert got == want and (sb.lease_start, sb.lease_blocks, sb.slot_start) == (1, 1, 2)
    rec = LeaseRecord(owner=3, generation=5, counter=9, node="n3", addr="10.0.0.3:7789",
                      acquired_ns=-7, renewed_ns=11, expire_ms=1600)
    buf = fmt.encode_lease(rec, 1)
    got = _fields(LEASE_LAYOUT, buf)
    assert got == dict(vars(rec), node=b"n3".ljust(64, b"\0"),
                       addr=b"10.0.0.3:7789".ljust(128, b"\0"), reserved=0)
    assert LeaseRecord(*fmt.decode_lease(buf, 1)) == rec
    assert LeaseRecord(*fmt.decode_lease(fmt.encode_lease(LeaseRecord.free(), 1), 1)).is_free
    assert fmt.decode_lease(fmt.encode_lease(fmt.FREE_LEASE, 1), 1) == fmt.FREE_LEASE
    hb = fmt.Heartbeat(slot=2, state=fmt.HB_CLUSTER, counter=77, timestamp_ns=-5,
                       mount_id=99, node="n2", interval_ms=1500, flags=0, pid=1234,
                       host="h")
    got = _fields(HB_LAYOUT, hb.image(3))
    want = dict(vars(hb), node=b"n2".ljust(64, b"\0"), host=b"h".ljust(64, b"\0"))
    assert got == want


def test_rgrp_dinode_and_xattr_block_fields():
    hdr = fmt.RgrpHeader(500, 3, 500, 4000, 1, free=11, dinodes=22, unlinked=33,
                         igeneration=44, flags=0)
    hdr.refroot.keys, hdr.refroot.vals = [700, 900], [(5, 2), (1, 7)]
    hdr.refroot.recount()
    buf = hdr.image()
    got = _fields(RGRP_LAYOUT, buf)
    assert got == {**{k: getattr(hdr, k) for k in got if k != "pad"}, "pad": 0}
    assert not any(buf[RGRP_LAYOUT.end:fmt.REFROOT_OFF])
    assert _fields(NODE_LAYOUT, buf, fmt.REFROOT_OFF) == \
        {"level": 0, "nrecs": 2, "kind": REFCOUNT, "owner": 3}
    at = fmt.REFROOT_OFF + NODE_HDR + REFCOUNT_REC.size
    assert _fields(REFCOUNT_REC, buf, at) == {"pblk": 900, "len": 1, "count": 7}
    back = fmt.RgrpHeader.decode(buf, 500)
    assert (back.refroot.keys, back.refroot.vals) == ([700, 900], [(5, 2), (1, 7)])
    # a revision-2 header (zeros where the root is) holds an empty tree
    old = bytearray(buf)
    old[fmt.REFROOT_OFF:] = bytes(len(old) - fmt.REFROOT_OFF)
    blockhdr.reseal(old)
    empty = fmt.RgrpHeader.decode(old, 500).refroot
    assert (empty.kind, empty.owner, empty.keys) == (REFCOUNT, 3, [])
    node = fmt.TreeNode(88, REFCOUNT, 0, 3, [1000], [(4, 2)])
    nbuf = node.image()
    assert blockhdr.header(nbuf)[1] == BlockType.REFCOUNT_NODE
    assert _fields(REFCOUNT_REC, nbuf, HEADER_SIZE + NODE_HDR) == \
        {"pblk": 1000, "len": 4, "count": 2}
    root = fmt.TreeNode(900, EXTENT, 0, 900, [0, 5], [(1000, 5, 0), (2000, 1, 0)],
                        is_root=True)
    di = fmt.Dinode(900, generation=7, mode=S.S_IFREG | 0o640, uid=1, gid=2, nlink=3,
                    size=6 * 4096, blocks=6, atime=-1, mtime=2, ctime=3, btime=4,
                    rdev=0, flags=fmt.DF_EXTENTS, xattr_block=901, parent=17,
                    entries=0, root=root, xattrs=[(b"user.a", b"b")])
    buf = di.image()
    got = _fields(DINODE_LAYOUT, buf)
    assert got == {**{k: getattr(di, k) for k in got if hasattr(di, k)},
                   "xattr_len": fmt.xattr_size(b"user.a", b"b"), "reserved": 0}
    assert _fields(NODE_LAYOUT, buf, fmt.DATA_OFF) == \
        {"level": 0, "nrecs": 2, "kind": EXTENT, "owner": 900}
    at = fmt.DATA_OFF + NODE_HDR + EXTENT_REC.size
    assert _fields(EXTENT_REC, buf, at) == {"lblk": 5, "pblk": 2000, "len": 1, "flags": 0}
    assert _fields(XATTR_ENTRY, buf, fmt.XATTR_INLINE_OFF) == {"namelen": 6, "valuelen": 1}
    xb = fmt.XattrBlock(901, 900, [(b"user.big", b"v" * 10)])
    assert _fields(XATTR_BLOCK_LAYOUT, xb.image()) == \
        {"owner": 900, "used": fmt.xattr_size(b"user.big", b"v" * 10)}


def test_tree_node_fields():
    leaf = fmt.TreeNode(77, DIRENT, 0, 5, [(12 << 16) | 1], [(88, fmt.DT_REG, b"name")])
    buf = leaf.image()
    assert _fields(NODE_LAYOUT, buf, HEADER_SIZE) == \
        {"level": 0, "nrecs": 1, "kind": DIRENT, "owner": 5}
    at = HEADER_SIZE + NODE_HDR
    assert _fields(DIRENT_REC, buf, at) == \
        {"key": (12 << 16) | 1, "ino": 88, "dtype": fmt.DT_REG, "namelen": 4}
    assert bytes(buf[at + DIRENT_REC.size:at + DIRENT_REC.size + 4]) == b"name"
    index = fmt.TreeNode(78, EXTENT, 1, 5, [0, 40], [300, 301])
    buf = index.image()
    assert _fields(INDEX_REC, buf, at + INDEX_REC.size) == {"key": 40, "child": 301}


def test_directory_key_rule():
    name = b"some-name"
    lo, hi = fmt.key_range(name)
    cidx = fmt.MAX_COLLISIONS - 2
    key = fmt.dirent_key(fmt.name_hash(name), cidx)
    assert lo <= key <= hi and hi - lo == fmt.MAX_COLLISIONS - 1
    assert key == (fmt.name_hash(name) << 16) | cidx     # FORMAT.md's rule
    assert fmt.key_hash(key) == fmt.name_hash(name) and fmt.key_cidx(key) == cidx
    assert [fmt.bad_name(n) for n in (b".", b"..", b"a/b", b"a\0", b"n" * 256)] == \
        [True] * 5
    assert not fmt.bad_name(b"n" * 255) and not fmt.bad_name(b"...")


def test_journal_section_is_the_journal_document():
    text = DOC.read_text()
    start = text.index("\n## Journal\n") + 1
    mine = text[start:]
    theirs = (DOCS / "JOURNAL-FORMAT.md").read_text()
    demoted = "\n".join("#" + ln if ln.startswith("#") else ln
                        for ln in theirs.splitlines()) + "\n"
    assert mine == demoted, "docs/FORMAT.md's Journal section differs from " \
                            "docs/JOURNAL-FORMAT.md: copy it over (headings one level down)"


def test_slot_table_fields():
    sb = fmt.plan_geometry(1 << 16, 2)
    g = sb.rgrp_range(3)[0] + 1 + sb.bitmap_blocks
    entries = [(g, g + 1), (g + 1 + sb.journal_blocks, g + 2 + sb.journal_blocks)]
    tb = g + 2 * (1 + sb.journal_blocks)
    table = fmt.SlotTable(tb, 2, sb.journal_blocks, entries, seq=3)
    buf = table.image()
    assert blockhdr.header(buf)[1] == BlockType.SLOT_TABLE
    assert _fields(SLOT_TABLE_LAYOUT, buf) == {"count": 2, "first_slot": 2,
                                               "journal_blocks": sb.journal_blocks,
                                               "reserved": 0}
    at = fmt.SLOT_ENTRIES_OFF + SLOT_ENTRY.size
    assert _fields(SLOT_ENTRY, buf, at) == {"heartbeat": entries[1][0],
                                            "journal": entries[1][1]}
    sb.nslots, sb.slot_table = 4, tb
    back = fmt.SlotTable.decode(buf, tb, sb)
    assert (back.entries, back.seq) == (entries, 3)
