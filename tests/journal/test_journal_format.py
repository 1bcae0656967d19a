"""The journal's on-disk format: the document and the code agree; header codec and checks."""

from __future__ import annotations

import dataclasses
import pathlib
import re
import struct

import pytest

from clusterfs.ondisk.blockdev import PowerLossDevice
from clusterfs.ondisk.blockhdr import BlockType, reseal
from journal import Journal, JournalCorrupt
from journal import format as jf
from tests.journal.jtools import BS, LENGTH, START, FaultyDevice, again, flip, make

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "JOURNAL-FORMAT.md"


def _sections() -> dict[str, list[str]]:
    """Heading text -> lines under it (up to the next heading)."""
    out: dict[str, list[str]] = {}
    current = None
    for line in DOC.read_text().splitlines():
        m = re.match(r"#+ (.*)", line)
        if m:
            current = m.group(1).strip()
            out[current] = []
        elif current is not None:
            out[current].append(line)
    return out


def _table(lines: list[str]) -> list[list[str]]:
    rows = []
    for line in lines:
        if not line.startswith("|"):
            continue
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if set(cells[0]) <= set("-") or cells[0] in ("offset", "name", "block"):
            continue
        rows.append(cells)
    return rows


def _field_rows(fields, base: int) -> list[tuple[str, str, str]]:
    rows, off = [], base
    for name, code in fields:
        size = struct.calcsize("<" + code)
        rows.append((str(off), str(size), name))
        off += size
    return rows


COMMON = [("0", "32", "header")]
EXPECTED = {
    BlockType.JOURNAL_HEADER: COMMON + _field_rows(jf.HEADER_FIELDS, 32),
    BlockType.JOURNAL_DESCRIPTOR: COMMON + _field_rows(jf.LOG_PREFIX_FIELDS, 32)
    + [(str(jf.RECORDS_OFFSET), f"{jf.TAG.size} × count", "tags")],
    BlockType.JOURNAL_REVOKE: COMMON + _field_rows(jf.LOG_PREFIX_FIELDS, 32)
    + [(str(jf.RECORDS_OFFSET), f"{jf.REVOKE_RECORD.size} × count", "records")],
    BlockType.JOURNAL_COMMIT: COMMON + _field_rows(jf.COMMIT_FIELDS, 32),
}


def test_doc_has_one_heading_per_journal_block_type():
    headings = {}
    for title in _sections():
        m = re.fullmatch(r"(JOURNAL_\w+) \(type (\d+)\)", title)
        if m:
            headings[m.group(1)] = int(m.group(2))
    assert headings == {t.name: int(t) for t in jf.JOURNAL_TYPES}


@pytest.mark.parametrize("btype", sorted(EXPECTED), ids=lambda t: t.name)
def test_doc_table_matches_code(btype):
    rows = _table(_sections()[f"{btype.name} (type {int(btype)})"])
    assert [tuple(r[:3]) for r in rows] == EXPECTED[btype]


def test_doc_tag_table_matches_code():
    rows = _table(_sections()["Descriptor tag"])
    assert [tuple(r[:3]) for r in rows] == _field_rows(jf.TAG_FIELDS, 0)


def test_doc_constants_match_code():
    rows = _table(_sections()["Constants"])
    assert {r[0]: int(r[1]) for r in rows} == {
        name: getattr(jf, name) for name in
        ("FORMAT_VERSION", "MIN_LENGTH", "HEADER_AREA", "OWNER_SIZE", "RECORDS_OFFSET",
         "TAGS_PER_DESCRIPTOR", "REVOKES_PER_BLOCK")}


def test_record_capacities():
    assert jf.TAGS_PER_DESCRIPTOR == 253 and jf.REVOKES_PER_BLOCK == 506
    assert jf.transaction_blocks(253, 0) == 255
    assert jf.transaction_blocks(254, 507) == 2 + 254 + 2 + 1
    assert jf.transaction_blocks(0, 0) == 1


def test_header_roundtrip_and_first_sector():
    dev, j = make(slot=3, opened=False)
    j.open("node-a")
    hdr = j.read_header()
    assert (hdr.slot, hdr.start, hdr.length, hdr.version) == (3, START, LENGTH, 1)
    assert (hdr.clean, hdr.mount_count, hdr.owner) == (False, 1, "node-a")
    assert hdr.journal_id != 0 and hdr.open_ns > 0
    raw = dev.read(START)
    assert not any(raw[jf.HEADER_AREA:])
    assert jf.JournalHeader.unpack(raw, START) == hdr


def test_format_writes_only_the_header():
    dev = PowerLossDevice(256)
    junk = b"\xA5" * BS
    for b in range(START + 1, START + LENGTH):
        dev.write(b, junk)
    dev.flush()
    before = dev.stats["writes"]
    Journal.format(dev, START, LENGTH)
    assert dev.stats["writes"] == before + 1
    assert all(dev.read(b) == junk for b in range(START + 1, START + LENGTH))
    j = again(dev)
    assert j.is_clean() and j.scan().clean


def test_format_picks_a_new_journal_id_each_time():
    dev = PowerLossDevice(256)
    ids = set()
    for _ in range(5):
        Journal.format(dev, START, LENGTH)
        ids.add(again(dev).read_header().journal_id)
    assert len(ids) == 5


@pytest.mark.parametrize("start,length", [(0, 63), (200, 64), (-1, 64)])
def test_region_is_checked(start, length):
    dev = PowerLossDevice(256)
    with pytest.raises(ValueError):
        Journal.format(dev, start, length)
    with pytest.raises(ValueError):
        Journal(dev, start, length)


def test_owner_too_long_is_refused_before_any_write():
    dev, j = make(opened=False)
    writes = dev.stats["writes"]
    with pytest.raises(ValueError):
        j.open("x" * 65)
    assert dev.stats["writes"] == writes and j.is_clean()


@pytest.mark.parametrize("sectors", range(1, 8))
def test_torn_header_write_is_wholly_old_or_new(sectors):
    dev, j = make(opened=False)
    old = dev.read(START)
    j.open("node-b")
    new = dev.read(START)
    base = PowerLossDevice(256, {START: old})
    base.write(START, new)                 # the same header update, not yet flushed
    assert base.crash(tear={0: sectors}).read(START) == new
    assert base.crash().read(START) == old


# -- bad headers: one test per way a header can be wrong -----------------------------

def _all_refuse(j: Journal) -> JournalCorrupt:
    for call in (j.read_header, j.is_clean, j.scan, j.replay, j.open):
        with pytest.raises(JournalCorrupt) as exc:
            call()
        assert exc.value.bno == START
    return exc.value


def test_bad_header_crc():
    dev, _ = make(opened=False)
    flip(dev, START, offset=40)
    assert "crc32c mismatch" in str(_all_refuse(again(dev)))


def test_bad_header_never_written():
    dev = PowerLossDevice(256)
    assert "all zeros" in str(_all_refuse(again(dev)))


def test_bad_header_wrong_block_type():
    dev, _ = make(opened=False)
    buf = bytearray(dev.read(START))
    struct.pack_into("<H", buf, 4, BlockType.JOURNAL_COMMIT)
    reseal(buf)
    dev.write(START, bytes(buf))
    assert "expected JOURNAL_HEADER" in str(_all_refuse(again(dev)))


def test_bad_header_other_slot():
    dev, _ = make(slot=1, opened=False)
    assert "belongs to slot 1, expected slot 2" in str(_all_refuse(again(dev, slot=2)))


def test_bad_header_other_region():
    dev = PowerLossDevice(256)
    Journal.format(dev, START, LENGTH + 8)
    assert "describes region" in str(_all_refuse(again(dev)))


def test_bad_header_unsupported_version():
    dev, j = make(opened=False)
    hdr = dataclasses.replace(j.read_header(), version=2)
    dev.write(START, hdr.pack())
    assert "format version 2" in str(_all_refuse(again(dev)))


def test_bad_header_tail_outside_log():
    dev, j = make(opened=False)
    hdr = dataclasses.replace(j.read_header(), tail_pos=LENGTH - 1)
    dev.write(START, hdr.pack())
    assert "tail_pos" in str(_all_refuse(again(dev)))


def test_bad_header_clean_flag_neither_0_nor_1():
    dev, _ = make(opened=False)
    buf = bytearray(dev.read(START))
    struct.pack_into("<I", buf, 88, 7)
    reseal(buf)
    dev.write(START, bytes(buf))
    assert "clean flag is 7" in str(_all_refuse(again(dev)))


def test_bad_header_unreadable():
    dev, _ = make(opened=False)
    assert "unreadable" in str(_all_refuse(again(FaultyDevice(dev, bad_reads={START}))))
