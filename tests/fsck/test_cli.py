"""The ``clusterfs fsck`` command: options, exit codes, modes, output, JSON report."""

from __future__ import annotations

import io
import json
import os

import pytest

from clusterfs.commands.mkfs import make_volume
from clusterfs.fs import directory
from clusterfs.ondisk.format import DT_REG, FORMAT_REVISION, FREE, USED
from fsck.checker import Fsck
from fsck.report import Report
from tests.fsck.fsckutil import (Api, bitmap_state, dinode, put_dinode, read_block, reseal,
                                 set_bitmap_state, superblock, write_block)
from tests.helpers import run_cli


def fsck_cli(*args, **kw):
    """``clusterfs fsck ARGS`` in a process of its own."""
    return run_cli("fsck", *args, check=False, **kw)


class Done:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def cli(capsys):
    """``clusterfs fsck ARGS`` in this process (the same code path, no start-up cost)."""
    from clusterfs.cli import main

    def run(*args):
        capsys.readouterr()
        try:
            code = main(["fsck", *args])
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return Done(code, out, err)
    return run


def leak_a_block(img: str) -> int:
    """Mark a free block used (and count it in its group header): one finding."""
    from clusterfs.ondisk.format import RgrpHeader
    sb = superblock(img)
    start, length = sb.rgrp_range(sb.rgrp_count - 1)
    victim = start + length - 3
    set_bitmap_state(img, victim, USED)
    hdr = RgrpHeader.decode(read_block(img, start), start)
    hdr.free -= 1
    hdr.seq -= 1
    write_block(img, start, hdr.image())
    return victim


def dangle_an_entry(img: str) -> None:
    with Api(img) as fs:
        with fs.vol.operation():
            directory.add(fs.vol, fs.vol.dinode(fs.root_ino), b"ghost", 5, DT_REG)


@pytest.fixture
def small(tmp_path):
    img = str(tmp_path / "small.img")
    make_volume(img, 32 << 20, slots=2)
    return img


# -- usage and operational errors --------------------------------------------------------

def test_usage_errors_exit_16(cli):
    proc = fsck_cli("--bogus", "X")
    assert proc.returncode == 16, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    for args in ([], ["-n", "-y", "X"], ["-p", "-n", "X"], ["X", "--scan-data=3"]):
        assert cli(*args).returncode == 16, args


def test_not_a_volume_is_one_line_exit_8(tmp_path):
    junk = str(tmp_path / "junk.img")
    with open(junk, "wb") as f:
        f.write(os.urandom(1 << 20))
    proc = fsck_cli("-fn", junk)
    assert proc.returncode == 8
    assert "no usable clusterfs superblock" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    proc = fsck_cli("-n", str(tmp_path / "missing.img"))
    assert proc.returncode == 8 and "cannot open" in proc.stdout + proc.stderr


def test_other_revision_is_refused(cli, small):
    other = FORMAT_REVISION + 1
    buf = read_block(small, 0)
    buf[32] = other                            # format_rev
    write_block(small, 0, reseal(buf))
    proc = cli("-fy", small)
    assert proc.returncode == 8 and f"format revision {other}" in proc.stdout


def test_truncated_device_is_refused(cli, small):
    with open(small, "r+b") as f:
        f.truncate(16 << 20)
    proc = cli("-fy", small)
    assert proc.returncode == 8
    assert "Traceback" not in proc.stdout + proc.stderr


# -- clean volumes --------------------------------------------------------------------------

def test_clean_volume_is_skipped_unless_forced(cli, small):
    proc = cli("-n", small)
    assert proc.returncode == 0 and "clean" in proc.stdout
    assert "Layer 3" not in proc.stdout
    proc = cli("-fn", small)
    assert proc.returncode == 0, proc.stdout
    for n in (1, 2, 3, 4, 5):
        assert sum(line.startswith(f"Layer {n} ") for line in proc.stdout.splitlines()) == 1
    proc = cli("-fn", "--scan-data", small)
    assert proc.returncode == 0 and "Layer 6 Data surface scan" in proc.stdout


def test_skip_does_not_hide_a_crash(cli, small):
    """A slot left mounted makes the volume unclean: no skip without -f."""
    from clusterfs.ondisk.format import Heartbeat
    sb = superblock(small)
    bno = sb.heartbeat_bno(0)
    write_block(small, bno, Heartbeat(slot=0, state=1, counter=3, node="x",
                                      interval_ms=100).image(bno))
    proc = cli("-n", small)
    assert proc.returncode == 4 and "Layer 3" in proc.stdout, proc.stdout


# -- modes ------------------------------------------------------------------------------------

def test_n_changes_nothing_and_y_fixes(cli, small):
    victim = leak_a_block(small)
    before = open(small, "rb").read()
    proc = cli("-fn", small)
    assert proc.returncode == 4 and "leaked" in proc.stdout
    assert open(small, "rb").read() == before
    proc = cli("-fy", small)
    assert proc.returncode == 1 and "VOLUME WAS MODIFIED" in proc.stdout
    assert bitmap_state(small, victim) == FREE
    assert cli("-fn", small).returncode == 0


def test_no_mode_off_a_terminal_checks_only(small):
    leak_a_block(small)
    proc = fsck_cli("-f", small, stdin=open(os.devnull))
    assert proc.returncode == 4
    assert "checking only" in proc.stdout
    assert fsck_cli("-fn", small).returncode == 4


def test_preen_repairs_safe_problems(cli, small):
    victim = leak_a_block(small)
    proc = cli("-fp", small)
    assert proc.returncode == 1, proc.stdout
    assert bitmap_state(small, victim) == FREE


def test_preen_stops_at_unexpected_inconsistency(cli, small):
    dangle_an_entry(small)
    proc = cli("-fp", small)
    assert proc.returncode & 4, proc.stdout
    assert "UNEXPECTED INCONSISTENCY" in proc.stdout
    proc = cli("-fy", small)
    assert proc.returncode == 1
    assert cli("-fn", small).returncode == 0


def _interactive(img, answers: str):
    out = io.StringIO()
    rep = Report("ask", out=out, err=out, ask_in=io.StringIO(answers))
    code = Fsck(img, mode="ask", force=True, report=rep).check()
    return code, rep, out.getvalue()


def test_interactive_answers(small):
    victim = leak_a_block(small)
    code, rep, text = _interactive(small, "n\n")
    assert code == 4 and "Fix (mark free)?" in text
    assert bitmap_state(small, victim) == USED
    code, rep, text = _interactive(small, "y\n")
    assert code == 1
    assert bitmap_state(small, victim) == FREE


def test_interactive_quit_is_cancelled(small):
    leak_a_block(small)
    code, rep, text = _interactive(small, "q\n")
    assert code & 32 and rep.cancelled
    code, rep, text = _interactive(small, "")          # end of input: cancelled too
    assert code & 32


# -- reports --------------------------------------------------------------------------------------

def test_json_report(cli, small, tmp_path):
    victim = leak_a_block(small)
    di = dinode(small, superblock(small).root_ino)
    di.nlink = 9
    put_dinode(small, di)
    path = str(tmp_path / "r.json")
    proc = cli("-fn", "--json", path, small)
    assert proc.returncode == 4
    rep = json.load(open(path))
    assert rep["exit_code"] == 4 and rep["errors"] == 2 and rep["fixed"] == 0
    assert [lay["layer"] for lay in rep["layers"]] == [1, 2, 3, 4, 5]
    by = {f["code"]: f for f in rep["findings"]}
    assert by["leaked-blocks"]["layer"] == 3 and by["leaked-blocks"]["block"] == victim
    assert by["leaked-blocks"]["layer_name"] == "Allocation"
    assert by["link-count"]["layer"] == 5 and not by["link-count"]["fixed"]
    proc = cli("-fy", "--json", "-", small)
    rep = json.loads(proc.stdout)
    assert rep["exit_code"] == 1 and all(f["fixed"] for f in rep["findings"]
                                        if f["severity"] == "error")


def test_program_output_complete_at_exit(small, tmp_path):
    """The program ends without freeing its heap (``clusterfs.cli.run``): its exit
    status, its lines on stdout and both JSON reports (file and stdout) are whole."""
    victim = leak_a_block(small)
    path = str(tmp_path / "r.json")
    proc = fsck_cli("-fn", "--json", path, small)
    assert proc.returncode == 4, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("Layer ")]
    assert [ln.split()[1] for ln in lines] == ["1", "2", "3", "4", "5"]
    assert proc.stdout.rstrip().splitlines()[-1].startswith(small)
    rep = json.load(open(path))
    assert rep["exit_code"] == 4 and rep["findings"][0]["block"] == victim
    proc = fsck_cli("-fy", "--json", "-", small)
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["exit_code"] == 1


def test_summary_line_per_layer(cli, small):
    proc = cli("-fn", small)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("Layer ")]
    assert [ln.split()[1] for ln in lines] == ["1", "2", "3", "4", "5"]
    assert all(ln.endswith("ok") for ln in lines)


def test_a_check_leaves_earlier_cycles_collectable(vol):
    """fsck turns the cyclic collector off while it runs; after, the cycles that were
    alive then (the caller's own) must still be collected once dropped."""
    import gc
    import weakref

    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    gc.enable()
    code = Fsck(vol[0], mode="n", force=True).check()
    assert code == 0
    del a, b
    gc.collect()
    assert gone() is None
