"""Where the scenario's two views of one storage come from.

A `Storage` gives, inside `views()`, two directories (DIR_A, DIR_B) that show the same
files: "host A" and "host B" of `scenario.run_scenario`.

- `LocalStorage`: one local directory, both views the same path (the anchor).
- `ClusterfsStorage`: one clusterfs volume mounted twice (node A and node B, separate
  processes, one lock manager); the views are the same directory inside each mount.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


class StorageUnavailable(RuntimeError):
    """This storage cannot be set up here (yet)."""


class Storage:
    """Two views of one storage; see the module docstring."""

    name = "storage"

    @contextlib.contextmanager
    def views(self) -> Iterator[tuple[Path, Path]]:
        """Yield (dir_a, dir_b); tear everything down on exit."""
        raise NotImplementedError
        yield  # pragma: no cover


class LocalStorage(Storage):
    """A fresh directory under ROOT (default: /var/tmp), seen identically by A and B."""

    name = "local"

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root else Path("/var/tmp")

    @contextlib.contextmanager
    def views(self) -> Iterator[tuple[Path, Path]]:
        self.root.mkdir(parents=True, exist_ok=True)
        d = Path(tempfile.mkdtemp(prefix="cfsvm-local-", dir=self.root))
        try:
            yield d, d
        finally:
            shutil.rmtree(d, ignore_errors=True)


class ClusterfsStorage(Storage):
    """One clusterfs volume mounted by two nodes; views = one directory in each mount.

    Inside ``views()``: a sparse volume image of SIZE_MIB (under WORKDIR, default a
    temporary directory in /var/tmp) made with ``clusterfs mkfs``, and two
    ``clusterfs mount VOLUME MOUNTPOINT --key KEYFILE --listen 127.0.0.1:0``
    processes (node A, node B; they elect the lock manager's master among them), with
    ``-o OPTIONS`` when given.  A directory created through A is
    yielded as (path through A, same path through B).  On exit both mounts are
    unmounted, the processes ended by PID, and fsck of the volume must be clean.
    """

    name = "clusterfs"

    def __init__(self, size_mib: int = 8192, workdir: Path | str | None = None,
                 options: str = ""):
        self.size_mib = size_mib
        self.workdir = Path(workdir) if workdir else None
        self.options = options      # mount options of both nodes (-o), if any

    @contextlib.contextmanager
    def views(self) -> Iterator[tuple[Path, Path]]:
        from tests.clusterutil import local_cluster
        base = self.workdir or Path("/var/tmp")
        base.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="cfsvm-cluster-", dir=base))
        try:
            with local_cluster(str(work), nodes=2, size=f"{self.size_mib}M",
                               mount_args=("-o", self.options) if self.options else ()) as (
                    _volume, _key, (node_a, node_b)):
                d = Path(node_a.path) / "vms"
                d.mkdir()
                yield d, Path(node_b.path) / "vms"
        finally:
            shutil.rmtree(work, ignore_errors=True)


STORAGES = {"local": LocalStorage, "clusterfs": ClusterfsStorage}
