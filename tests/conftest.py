"""Shared fixtures: volumes, real FUSE mounts in a subprocess, and the fsck oracle.

A mount runs ``clusterfs mount --foreground`` in its own process; the fixture polls
``os.path.ismount`` (failing at once if the process died) and its teardown always
unmounts (``fusermount3 -u``, then ``-z``) and stops the process, even when the test
failed, so a stale mount never breaks the next test.

Imports: one style for the whole suite.  pyproject's ``[tool.pytest.ini_options]
pythonpath`` puts the repository first on pytest's path, and every helper module is
imported by its package path (``tests.helpers``, ``tests.journal.jtools``, ...).
``pytest_configure`` puts the same directory first on ``PYTHONPATH`` for the
processes the tests start (mounts, lock managers, workloads), so that they run this
checkout's code whatever their working directory.
"""

from __future__ import annotations

import gc
import os
import subprocess
import time

import pytest

from tests.helpers import Mount, mkfs, run_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    """The repository first on the started processes' ``PYTHONPATH``."""
    path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = REPO + (os.pathsep + path if path else "")


def _malloc_trim():
    """glibc's malloc_trim(0), or None where there is no glibc."""
    try:
        import ctypes
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()


@pytest.fixture(autouse=True)
def _give_memory_back():
    """After each test, hand the memory it freed back to the system.

    Tests that run a file system in this process (the crash campaigns keep a whole
    in-memory device) free gigabytes at their end, but glibc keeps freed memory in
    per-thread arenas and reuses it badly: a run of the slow crash cases grew past
    20 GiB and was killed by the OOM killer, while each case alone peaks at 3 GiB.
    """
    yield
    if _TRIM is not None:
        gc.collect()
        _TRIM(0)


@pytest.fixture
def volume(tmp_path):
    """A fresh 256 MiB volume image."""
    path = str(tmp_path / "vol.img")
    mkfs(path, "256M")
    return path


@pytest.fixture
def mounted(volume, tmp_path):
    """A single-node mount of a fresh volume; yields the Mount."""
    m = Mount(volume, str(tmp_path / "mnt"))
    m.start()
    try:
        yield m
    finally:
        m.stop()


__all__ = ["volume", "mounted", "run_cli", "subprocess", "time"]
