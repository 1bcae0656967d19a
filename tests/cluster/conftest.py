"""Fixtures of the cluster tests (helpers in ``cluster_util``).

``lockd``: a ``clusterfs lockd`` on 127.0.0.1 at a free port, key from
``clusterfs keygen``, stopped by its PID.  ``cluster``: a fresh volume and its own
lock manager; ``cluster.mount(name)`` mounts a node; teardown unmounts every node,
stops the lock manager and checks the volume.
"""

from __future__ import annotations

import os

import pytest

from tests.cluster.cluster_util import Lockd, make_key, make_topdir, running_cluster


@pytest.fixture
def topdir():
    with make_topdir() as top:
        yield top


@pytest.fixture
def cluster(topdir):
    """A fresh 256 MiB volume (4 slots) and a lock manager (lease 3 s);
    ``cluster.mount(name)`` mounts a node.  Teardown unmounts every node, stops the
    lock manager (by PID), then checks the volume."""
    with running_cluster(topdir) as c:
        yield c


@pytest.fixture
def keyfile(topdir):
    """A key file made by ``clusterfs keygen``."""
    return make_key(os.path.join(topdir, "lockd.key"))


@pytest.fixture
def lockd(keyfile, topdir):
    """A lock manager on 127.0.0.1 at a free port (lease 3 s), stopped by PID."""
    srv = Lockd(keyfile, log=os.path.join(topdir, "lockd-fixture.log")).start()
    try:
        yield srv
    finally:
        srv.stop()
