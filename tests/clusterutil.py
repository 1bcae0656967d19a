"""Cluster mounts for tests and benchmarks.

``local_cluster`` makes a volume and a key and mounts the volume as several nodes
(each runs a lock manager candidate on a free loopback port; the volume elects the
master), and always unmounts everything on exit.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Iterator

from tests.helpers import Mount, fsck_clean, mkfs, run_cli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_cluster(workdir: str, nodes: int = 2, *, size: str = "1G", lease: float | None = None,
                  mount_args: tuple[str, ...] = (), check: bool = True
                  ) -> Iterator[tuple[str, str, list[Mount]]]:
    """(volume, key file, mounts) of a fresh volume mounted as ``nodes`` nodes.

    On exit every node is unmounted and (``check``) the volume must pass
    ``clusterfs fsck -fn``.
    """
    os.makedirs(workdir, exist_ok=True)
    volume = os.path.join(workdir, "volume.img")
    key = os.path.join(workdir, "cluster.key")
    mkfs(volume, size, "--slots", str(max(4, nodes)))
    run_cli("keygen", key)
    mounts: list[Mount] = []
    try:
        for i in range(nodes):
            name = f"node{i + 1}"
            args = ["--key", key, "--node", name, "--listen", "127.0.0.1:0"]
            if lease is not None:
                args += ["--lease", str(lease)]
            m = Mount(volume, os.path.join(workdir, name), *args, *mount_args)
            mounts.append(m)
            m.start()
        yield volume, key, mounts
    finally:
        errors = []
        for m in mounts:
            try:
                m.stop()
            except AssertionError as e:
                errors.append(str(e))
    if errors:
        raise AssertionError("\n".join(errors))
    if check:
        fsck_clean(volume)
