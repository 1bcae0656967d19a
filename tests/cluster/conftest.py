"""Fixtures of the cluster tests (helpers in ``cluster_util``).

``cluster``: a fresh volume and a key; ``cluster.mount(name)`` mounts a node (with
its lock manager candidate); teardown unmounts every node and checks the volume.
"""

from __future__ import annotations

import pytest

from tests.cluster.cluster_util import make_topdir, running_cluster


@pytest.fixture
def topdir():
    with make_topdir() as top:
        yield top


@pytest.fixture
def cluster(topdir):
    """A fresh 256 MiB volume (4 slots); ``cluster.mount(name)`` mounts a node.
    Teardown unmounts every node, then checks the volume."""
    with running_cluster(topdir) as c:
        yield c
