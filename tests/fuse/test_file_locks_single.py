"""File locks on a single-node mount are the kernel's own (the mount does not ask for
lock requests): the lock program of tests/cluster/lockprog.py gives the transcript it
gives on ext4, and QEMU can lock its images there."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import pytest

from tests.cluster.lockprog import run_scenario


def test_lock_program_as_on_ext4(wd):
    ref = tempfile.mkdtemp(prefix="cfs-lockprog-")
    try:
        reference = run_scenario({"a": ref, "b": ref, "c": ref})
    finally:
        shutil.rmtree(ref, ignore_errors=True)
    assert run_scenario({"a": wd, "b": wd, "c": wd}) == reference


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")
def test_qemu_img_locks_its_image(wd):
    # qemu-img create takes QEMU's image locks (fcntl OFD locks): ENOSYS from the file
    # system would fail it with "Failed to lock byte"
    img = os.path.join(wd, "vm.qcow2")
    r = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "16M"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["qemu-img", "info", img], capture_output=True, text=True)
    assert r.returncode == 0 and "qcow2" in r.stdout, r.stderr
