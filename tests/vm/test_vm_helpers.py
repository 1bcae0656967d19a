"""The VM harness's pure parts: cpio writer, record parser, module ELF reader (no QEMU)."""

import shutil
import subprocess

import pytest

from .guest import CpioWriter, GuestUnavailable, module_load_order
from .qmp import Record, parse_records


def _read_newc(data: bytes) -> list[tuple[str, int, bytes]]:
    """(name, mode, content) of each entry of a cpio "newc" archive."""
    out, off = [], 0
    while True:
        assert data[off:off + 6] == b"070701", f"bad magic at {off}"
        f = [int(data[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = f[1], f[6], f[11]
        name = data[off + 110: off + 110 + namesize - 1].decode()
        off += 110 + namesize
        off += -off % 4
        body = data[off: off + size]
        off += size + (-size % 4)
        if name == "TRAILER!!!":
            return out
        out.append((name, mode, body))


def test_cpio_newc_roundtrip():
    w = CpioWriter()
    w.dir("bin")
    w.file("bin/x", b"abc", 0o755)
    w.symlink("bin/sh", "x")
    w.chardev("dev-console", 5, 1)
    w.file("init", b"#!/bin/sh\n" * 3)
    data = w.finish()
    assert len(data) % 512 == 0
    got = _read_newc(data)
    assert [(n, m) for n, m, _ in got] == [
        ("bin", 0o040755), ("bin/x", 0o100755), ("bin/sh", 0o120777),
        ("dev-console", 0o020600), ("init", 0o100644)]
    assert got[1][2] == b"abc" and got[2][2] == b"x"


@pytest.mark.skipif(not shutil.which("cpio"), reason="no cpio tool to cross-check with")
def test_cpio_readable_by_gnu_cpio():
    w = CpioWriter()
    w.dir("d")
    w.file("d/f", b"hello")
    out = subprocess.run(["cpio", "-it"], input=w.finish(), capture_output=True, check=True)
    assert out.stdout.decode().split() == ["d", "d/f"]


def test_parse_records_skips_noise_and_partial_lines():
    text = (b"[  1.0] kernel says hi\n"
            b"CFSREC seq=0 boot=ab-12 up=2.50\n"
            b"CFSREC seq=1 boot=ab-12 up=2.75" + b" " * 480 + b"\n"
            b"garbage CFSREC seq=2 boot=ab-12 up=3\r\n"
            b"CFSREC seq=3 boot=ab-12 up=3.2")  # torn tail: no terminator yet
    assert parse_records(text) == [Record(0, "ab-12", 2.5), Record(1, "ab-12", 2.75),
                                   Record(2, "ab-12", 3.0)]


def test_module_order_reports_missing_module(tmp_path):
    (tmp_path / "modules.builtin").write_text("kernel/drivers/tty/serial/8250/8250.ko\n")
    assert module_load_order(tmp_path, ("8250",)) == []
    with pytest.raises(GuestUnavailable, match="virtio_blk"):
        module_load_order(tmp_path, ("virtio_blk",))
