"""docs/FORMAT.md and the code agree: one heading per block type, field tables that
match the struct formats of clusterfs.ondisk.format, and the journal section identical to
docs/JOURNAL-FORMAT.md."""

from __future__ import annotations

import pathlib
import re
import struct

import pytest

from clusterfs.ondisk import blockhdr
from clusterfs.ondisk import format as fmt
from clusterfs.ondisk.blockhdr import BlockType
from fsck.salvage import DINODE_FIELDS, field_offsets

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


def table(lines: list[str]) -> list[tuple[str, str, str]]:
    rows = []
    for line in lines:
        if not line.startswith("|"):
            continue
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if set(cells[0]) <= set("-") or cells[0] == "offset":
            continue
        rows.append(tuple(cells[:3]))
    return rows


def struct_rows(st: struct.Struct, names: list[str]) -> list[tuple[str, str, str]]:
    offs = field_offsets(st, names, blockhdr.HEADER_SIZE)
    ends = sorted(offs.values())[1:] + [blockhdr.HEADER_SIZE + st.size]
    order = sorted(names, key=lambda n: offs[n])
    return [(str(offs[n]), str(e - offs[n]), n) for n, e in zip(order, ends)]


def test_one_heading_per_block_type():
    found = {}
    for title in sections():
        m = re.fullmatch(r"(\w+) \(type (\d+)\)", title)
        if m:
            found[m.group(1)] = int(m.group(2))
    assert found == {t.name: int(t) for t in BlockType}


TABLES = {
    "SUPERBLOCK (type 1)": (fmt._SB, [
        "format_rev", "block_size", "total_blocks", "uuid", "label", "created_ns", "nslots",
        "journal_blocks", "slot_start", "journal_start", "rgrp_start", "rgrp_blocks",
        "rgrp_count", "bitmap_blocks", "flags", "root_ino", "features", "backup_bno",
        "cluster_name", "lockd_addr", "mkfs_seq"]),
    "HEARTBEAT (type 2)": (fmt._HB, ["slot", "state", "counter", "timestamp_ns", "mount_id",
                                     "node", "interval_ms", "flags", "pid", "host"]),
    "RGRP (type 3)": (fmt._RG, ["index", "flags", "start", "length", "bitmap_blocks",
                                "free", "dinodes", "unlinked", "pad", "igeneration"]),
    "DINODE (type 5)": (fmt._DI, DINODE_FIELDS),
}


@pytest.mark.parametrize("title", sorted(TABLES))
def test_field_table_matches_struct(title):
    st, names = TABLES[title]
    rows = table(sections()[title])
    assert rows[0] == ("0", "32", "header")
    want = struct_rows(st, names)
    assert rows[1:1 + len(want)] == want


def test_layout_constants():
    s = sections()
    dinode = table(s["DINODE (type 5)"])
    assert ("256", "384", "xattrs") in dinode and ("640", "3456", "data") in dinode
    assert (fmt.XATTR_INLINE_OFF, fmt.XATTR_INLINE_SIZE, fmt.DATA_OFF, fmt.DATA_SIZE) == \
        (256, 384, 640, 3456)
    assert fmt.NODE_HDR == 16 and fmt._EXT.size == 24 and fmt._IDX.size == 16
    assert fmt._DIRREC.size == 18 and fmt._XA.size == 3
    assert fmt.ROOT_CAPACITY == 3440 and fmt.NODE_CAPACITY == 4048
    assert fmt.XATTR_BLOCK_OFF == 48 and fmt.BLOCKS_PER_BITMAP == 16256
    assert (fmt.FREE, fmt.USED, fmt.UNLINKED, fmt.DINODE) == (0, 1, 2, 3)
    assert (fmt.DF_INLINE, fmt.DF_EXTENTS, fmt.DF_DIRTREE) == (1, 2, 4)
    assert fmt.HASH_SHIFT == 16 and fmt.READDIR_BASE == 3
    assert fmt.FORMAT_REVISION == 1 and blockhdr.MAGIC == 0x31534643
    hdr = table(s["Block header"])
    assert [r[:3] for r in hdr[:7]] == [
        ("0", "4", "magic"), ("4", "2", "type"), ("6", "2", "flags"), ("8", "4", "crc32c"),
        ("12", "4", "reserved"), ("16", "8", "blkno"), ("24", "8", "seq")]
    assert blockhdr.HEADER.format in ("<IHHIIQQ", b"<IHHIIQQ")


def test_journal_section_is_the_journal_document():
    text = DOC.read_text()
    start = text.index("\n## Journal\n") + 1
    mine = text[start:]
    theirs = (DOCS / "JOURNAL-FORMAT.md").read_text()
    demoted = "\n".join("#" + ln if ln.startswith("#") else ln
                        for ln in theirs.splitlines()) + "\n"
    assert mine == demoted, "docs/FORMAT.md's Journal section differs from " \
                            "docs/JOURNAL-FORMAT.md: copy it over (headings one level down)"
