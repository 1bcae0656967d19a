"""Progress of mkfs, fsck, grow and snapshot (#16 item 7): one line on a terminal.

Each command runs with its stderr on a pseudo-terminal (``pty.openpty``) and its
stdout on a pipe, then with both on pipes, then with ``-q``: the progress line
(rewritten with ``\\r``) shows only in the first run, and stdout is the same in all
of them.
"""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys

from tests.helpers import mkfs

PY = sys.executable


def run_with_tty_stderr(*args: str, timeout: float = 120) -> tuple[int, str, str]:
    """``clusterfs ARGS`` with stderr on a terminal: (status, stdout, terminal text)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([PY, "-m", "clusterfs.cli", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    tty = b""
    while True:
        ready, _, _ = select.select([master], [], [], timeout)
        assert ready, "the command hung"
        try:
            chunk = os.read(master, 65536)
        except OSError:             # EIO: every writer of the terminal is gone
            break
        if not chunk:
            break
        tty += chunk
    os.close(master)
    out = proc.stdout.read().decode()
    proc.stdout.close()
    return proc.wait(timeout=timeout), out, tty.decode(errors="replace")


def run_piped(*args: str) -> tuple[int, str, str]:
    p = subprocess.run([PY, "-m", "clusterfs.cli", *args], capture_output=True, text=True,
                       timeout=120)
    return p.returncode, p.stdout, p.stderr


def _no_uuid(text: str) -> str:
    return re.sub(r"uuid\s+[0-9a-f]{32}", "uuid X", text)


def test_mkfs_progress(tmp_path):
    vol = str(tmp_path / "v.img")
    rc, out, tty = run_with_tty_stderr("mkfs", vol, "--size", "64G")
    assert rc == 0, tty
    assert "\rwriting resource groups: " in tty, tty
    # the last line: every slot and group written, and the line ended
    assert re.search(r"\rwriting resource groups: (\d+) of \1 \(100%\) *\r\n$", tty), tty
    rc2, out2, err2 = run_piped("mkfs", vol, "--size", "64G", "-f")
    assert (rc2, err2) == (0, "")
    assert _no_uuid(out2) == _no_uuid(out) and out.startswith("clusterfs volume on ")
    rc3, out3, tty3 = run_with_tty_stderr("mkfs", vol, "--size", "64G", "-f", "-q")
    assert (rc3, out3, tty3) == (0, "", "")
    # an error: its line alone, no progress left on the terminal
    rc4, out4, tty4 = run_with_tty_stderr("mkfs", vol)
    assert rc4 != 0 and out4 == ""
    assert tty4.strip("\r\n") == (f"clusterfs mkfs: {vol} already holds a clusterfs file "
                                  f"system; use --force to overwrite it"), repr(tty4)


def test_fsck_progress(tmp_path):
    vol = str(tmp_path / "v.img")
    mkfs(vol, "1G")
    rc, out, tty = run_with_tty_stderr("fsck", "-fn", vol)
    assert rc == 0, out + tty
    for label in ("Reading group bitmaps", "Reading dinodes", "Comparing bitmaps",
                  "Checking dinodes", "Checking directories"):
        assert f"\r{label}: " in tty, tty
    # each pass's line is erased: the terminal ends on a blank carriage return
    assert tty.rstrip(" ").endswith("\r"), repr(tty[-200:])
    rc2, out2, err2 = run_piped("fsck", "-fn", vol)
    assert (rc2, out2, err2) == (0, out, "")
    assert "Layer 5 Namespace" in out
    rc3, out3, tty3 = run_with_tty_stderr("fsck", "-fn", "-q", vol)
    assert (rc3, out3, tty3) == (0, out, "")
    rc4, out4, err4 = run_piped("fsck", "-fnq", vol)
    assert (rc4, out4, err4) == (0, out, "")


def test_grow_and_snapshot_progress(tmp_path):
    vol = str(tmp_path / "v.img")
    mkfs(vol, "64M")
    rc, out, tty = run_with_tty_stderr("grow", vol, "--size", "16G")
    assert rc == 0, out + tty
    assert "\rwriting resource groups: " in tty and tty.endswith("\r\n"), repr(tty[-200:])
    assert "grown from 64.0 MiB" in out
    snap = str(tmp_path / "s.img")
    rc, out, tty = run_with_tty_stderr("snapshot", vol, snap)
    assert rc == 0, out + tty
    assert re.search(r"\rcopying the volume: .* of 16\.0 GiB \(100%\)", tty), repr(tty)
    assert "new volume UUID" in out
    # piped, and with -q on a terminal: no progress
    rc, out, err = run_piped("snapshot", vol, snap, "-f")
    assert rc == 0 and err == "" and "new volume UUID" in out
    rc, out, tty = run_with_tty_stderr("snapshot", vol, snap, "-f", "-q")
    assert (rc, out, tty) == (0, "", "")
