"""Directory entries cached by the kernel of a cluster member mounted with
``-o entrycache`` (docs/CLUSTER.md, "Coherence"): while a node holds a directory's
lock, its kernel answers path walks in that directory from its own cache, positive
and negative; when the lock goes to another node, the kernel's entry epoch is raised
and every cached entry is looked up again.  Counted through the mount's ``status``
(lookups that reached it).  Without the option (the default) nothing is cached, and
mounts made inside the cluster mount stay when directory locks move.

Two nodes (a, b) mount one volume for the module with ``-o entrycache``, a third (c)
without; each test works in its own directory.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from clusterfs import control
from tests.cluster.cluster_util import dir_for_test, mounted_cluster

# node c must mount without the option (CFS_CLUSTER_OPTIONS adds it to every mount)
without = pytest.mark.skipif("entrycache" in os.environ.get("CFS_CLUSTER_OPTIONS", ""),
                             reason="CFS_CLUSTER_OPTIONS gives every node the option")


@pytest.fixture(scope="module")
def nodes():
    with mounted_cluster(size="256M", fast=False) as c:
        c.mount("a", "-o", "entrycache")
        c.mount("b", "-o", "entrycache")
        c.mount("c")
        yield c


@pytest.fixture
def d(nodes, request):
    name = dir_for_test(request)
    os.mkdir(nodes.nodes["a"].p(name))

    class Dir:
        def on(self, node: str, *parts: str) -> str:
            return nodes.nodes[node].p(name, *parts)
    return Dir()


def entries(nodes, node: str) -> dict:
    return control.call(control.find(nodes.nodes[node].path), {"op": "status"})["entries"]


def lookups(nodes, node: str) -> int:
    return entries(nodes, node)["lookups"]


def test_the_kernel_caches_entries_while_the_lock_is_here(nodes, d):
    if not entries(nodes, "a")["cached"]:
        pytest.skip("this kernel keeps no entry epochs (Linux 6.16 and later do)")
    os.mkdir(d.on("a", "sub"))
    with open(d.on("a", "sub", "f"), "wb") as f:
        f.write(b"data")
    os.stat(d.on("a", "sub", "f"))
    with pytest.raises(FileNotFoundError):
        os.stat(d.on("a", "sub", "missing"))
    before = lookups(nodes, "a")
    for _ in range(50):
        assert os.stat(d.on("a", "sub", "f")).st_size == 4
        with pytest.raises(FileNotFoundError):
            os.stat(d.on("a", "sub", "missing"))
    # the 100 path walks of three names each were answered by the kernel (200
    # lookups without the cache; an entry lives 1 s, which a slow moment may pass)
    assert lookups(nodes, "a") - before < 20


@without
def test_a_node_without_the_entry_cache_asks_every_time(nodes, d):
    assert entries(nodes, "c")["cached"] is False
    with open(d.on("a", "f"), "wb") as f:
        f.write(b"x")
    os.stat(d.on("c", "f"))
    before = lookups(nodes, "c")
    for _ in range(20):
        os.stat(d.on("c", "f"))
    # each walk looks up the test's directory and the file
    assert lookups(nodes, "c") - before >= 40


def test_changes_on_another_node_reach_cached_entries(nodes, d):
    """a caches positive and negative entries in a directory and below it; b renames,
    removes and creates names there; a's next path walks see b's names."""
    os.mkdir(d.on("a", "sub"))
    for name in ("f", "g"):
        with open(d.on("a", name), "wb") as f:
            f.write(name.encode())
    with open(d.on("a", "sub", "inner"), "wb") as f:
        f.write(b"inner")
    ino_f = os.stat(d.on("a", "f")).st_ino
    for _ in range(3):        # a's kernel has them all, and the names that are not there
        for name in ("f", "g", "sub/inner"):
            os.stat(d.on("a", *name.split("/")))
        for name in ("h", "new", "sub2"):
            with pytest.raises(FileNotFoundError):
                os.stat(d.on("a", name))
    epochs = entries(nodes, "a")["epochs"]

    os.rename(d.on("b", "f"), d.on("b", "h"))          # f goes, h comes
    os.unlink(d.on("b", "g"))                          # g goes
    with open(d.on("b", "new"), "wb") as f:            # a name a found missing
        f.write(b"new")
    os.rename(d.on("b", "sub"), d.on("b", "sub2"))     # a directory a walked through

    with pytest.raises(FileNotFoundError):
        os.stat(d.on("a", "f"))
    with pytest.raises(FileNotFoundError):
        os.stat(d.on("a", "g"))
    with pytest.raises(FileNotFoundError):
        os.stat(d.on("a", "sub", "inner"))
    assert os.stat(d.on("a", "h")).st_ino == ino_f
    with open(d.on("a", "h"), "rb") as f:
        assert f.read() == b"f"
    with open(d.on("a", "new"), "rb") as f:
        assert f.read() == b"new"
    with open(d.on("a", "sub2", "inner"), "rb") as f:
        assert f.read() == b"inner"
    assert sorted(os.listdir(d.on("a"))) == ["h", "new", "sub2"]
    if entries(nodes, "a")["cached"]:
        assert entries(nodes, "a")["epochs"] > epochs


def test_a_name_replaced_on_another_node_is_the_new_file(nodes, d):
    """The same name, another inode: a's cached entry must not lead to the old file
    (whose inode b freed and may have reused)."""
    for round_ in range(5):
        with open(d.on("a", "f"), "wb") as f:
            f.write(b"a%d" % round_)
        with open(d.on("a", "f"), "rb") as f:
            assert f.read() == b"a%d" % round_
        os.unlink(d.on("b", "f"))
        with open(d.on("b", "f"), "wb") as f:
            f.write(b"b%d" % round_)
        with open(d.on("a", "f"), "rb") as f:
            assert f.read() == b"b%d" % round_
        assert os.stat(d.on("a", "f")).st_ino == os.stat(d.on("b", "f")).st_ino
        os.unlink(d.on("a", "f"))
        with pytest.raises(FileNotFoundError):
            os.stat(d.on("b", "f"))


@without
def test_a_mount_inside_survives_lock_moves_without_the_option(nodes, d, tmp_path):
    """A bind mount on a directory inside the cluster mount of node c (default
    options) stays while directory locks move between the nodes."""
    (tmp_path / "marker").write_bytes(b"m")
    os.makedirs(d.on("a", "mnt"))
    os.makedirs(d.on("a", "e"))
    target = d.on("c", "mnt")
    subprocess.run(["mount", "--bind", str(tmp_path), target], check=True)
    try:
        for i in range(3):
            assert sorted(os.listdir(d.on("c", "e"))) == [f"x{j}" for j in range(i)]
            with open(d.on("b", "e", f"x{i}"), "wb"):     # c's lock on e moves to b
                pass
            assert os.listdir(target) == ["marker"]
            assert os.path.ismount(target)
    finally:
        subprocess.run(["umount", target], check=False)
