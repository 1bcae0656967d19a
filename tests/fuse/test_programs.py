"""Real programs on the mount: tar x of a large tarball then diff -r (and tar --diff
for modes, owners and times), git init/add/commit/gc/fsck, fio with crc32c verify.

The tarball is made from a tree the test builds (``build_tree``), not from a system
directory: a package installed meanwhile would change the source under diff."""

from __future__ import annotations

import os
import random
import shutil
import subprocess

import pytest

from tests.fuse.conftest import check_image
from tests.helpers import Mount, mkfs

MIN_BYTES = 100 << 20
MIN_FILES = 3000
FILE_MODES = [0o644, 0o644, 0o755, 0o600, 0o640, 0o444, 0o700, 0o4755, 0o2755, 0o1644]
DIR_MODES = [0o755, 0o755, 0o700, 0o750, 0o1777, 0o2775]
OWNERS = [(0, 0), (0, 0), (1000, 1000), (65534, 65534), (2, 4)]


def _name(rng: random.Random, key: str, ext: str = "") -> str:
    """A name unique by ``key``: plain mostly, else with spaces, UTF-8, a leading
    dash, shell characters, or 255 bytes long."""
    kind = rng.random()
    if kind < 0.7:
        return key + ext
    if kind < 0.75:
        return f"a name with spaces {key}{ext}"
    if kind < 0.8:
        return f"ünïcødé-{key}-名前{ext}"
    if kind < 0.85:
        return f"-{key}-dash{ext}"
    if kind < 0.9:
        return f"q'u\"o$t&e;({key})[*]{ext}"
    prefix = f"{key}-long-"
    return prefix + "L" * (255 - len(prefix) - len(ext)) + ext


def _data(rng: random.Random, size: int) -> bytes:
    kind = rng.random()
    if kind < 0.5:
        return rng.randbytes(size)
    if kind < 0.9:
        return (rng.randbytes(64) * (size // 64 + 1))[:size]       # compressible
    return bytes(size)


def _file_size(rng: random.Random) -> int:
    kind = rng.random()
    if kind < 0.04:
        return 0
    if kind < 0.65:
        return rng.randrange(1, 4096)
    if kind < 0.95:
        return rng.randrange(4096, 48 << 10)
    return rng.randrange(48 << 10, 512 << 10)


def build_tree(top: str, seed: int = 14) -> tuple[int, int]:
    """A tree of the shape of a system directory, made here so that nothing changes
    it while the test runs: 3,500 files in nested directories (most small, some
    large, at least 100 MB in all), empty files and directories, symlinks (relative,
    absolute, to directories, dangling, with long targets), hard links (in one
    directory and across), setuid / setgid / sticky and read-only modes, other
    owners (when run as root), old mtimes, and odd or 255-byte names in paths far
    longer than tar's 100-byte name field.

    Returns:
        (bytes in regular files, number of non-directory entries).
    """
    rng = random.Random(seed)
    os.mkdir(top)
    dirs = [top]
    for i in range(240):
        parent = rng.choice(dirs)
        if len(parent) - len(top) > 1500:
            parent = top
        dirs.append(os.path.join(parent, _name(rng, f"d{i}")))
        os.mkdir(dirs[-1])
    files, size = [], 0
    for i in range(3500):
        path = os.path.join(rng.choice(dirs), _name(rng, f"f{i}", rng.choice(
            ["", ".txt", ".py", ".gz", ".so", ".1"])))
        n = _file_size(rng)
        with open(path, "wb") as f:
            f.write(_data(rng, n))
        files.append(path)
        size += n
    i = 0
    while size < MIN_BYTES + (4 << 20):      # a few big files make up the rest
        n = rng.randrange(2 << 20, 12 << 20)
        path = os.path.join(rng.choice(dirs), f"big-{i}.bin")
        with open(path, "wb") as f:
            f.write(_data(rng, n))
        files.append(path)
        size += n
        i += 1
    links = []
    for i in range(120):
        d = rng.choice(dirs)
        target = rng.choice(files)
        kind = rng.random()
        if kind < 0.4:
            dest = os.path.relpath(target, d)
        elif kind < 0.6:
            dest = target
        elif kind < 0.75:
            dest = os.path.relpath(rng.choice(dirs), d)
        elif kind < 0.9:
            dest = f"nowhere/{i}/dangling"
        else:
            dest = "/".join(["..", "long-target"] * 60) + f"/{i}"
        links.append(os.path.join(d, f"link-{i}"))
        os.symlink(dest, links[-1])
    for i in range(100):
        src = rng.choice(files)
        d = os.path.dirname(src) if i % 3 == 0 else rng.choice(dirs)
        os.link(src, os.path.join(d, f"hard-{i}"))
    root = os.geteuid() == 0                 # (others cannot give files away)
    for path in files + links:
        if root:
            os.lchown(path, *rng.choice(OWNERS))
        if not os.path.islink(path):
            os.chmod(path, rng.choice(FILE_MODES))      # after chown, which clears setuid
        t = rng.randrange(946684800, 1700000000) * 10**9 + rng.randrange(10**9)
        os.utime(path, ns=(t, t), follow_symlinks=False)
    for d in reversed(dirs):                 # children first: their times stay put
        if root:
            os.lchown(d, *rng.choice(OWNERS))
        os.chmod(d, rng.choice(DIR_MODES))
        t = rng.randrange(946684800, 1700000000) * 10**9
        os.utime(d, ns=(t, t))
    return size, len(files) + len(links) + 100


def _run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def big_mount(tmp_path_factory):
    d = tmp_path_factory.mktemp("programs")
    vol = str(d / "vol.img")
    mkfs(vol, "2G")
    m = Mount(vol, str(d / "mnt")).start()
    try:
        yield m
    finally:
        m.stop()
    check_image(vol)


def test_tar_extract_then_diff(big_mount, tmp_path):
    size, entries = build_tree(str(tmp_path / "tree"))
    assert size >= MIN_BYTES and entries >= MIN_FILES
    tarball = str(tmp_path / "big.tar")
    _run(["tar", "cf", tarball, "-C", str(tmp_path), "tree"])
    assert os.path.getsize(tarball) >= MIN_BYTES
    dest = big_mount.p("extract")
    os.mkdir(dest)
    _run(["tar", "xf", tarball, "-C", dest])
    _run(["diff", "-r", "--no-dereference", str(tmp_path / "tree"),
          os.path.join(dest, "tree")])
    # tar compares contents, sizes, modes, owners, mtimes, link targets and hard links
    _run(["tar", "--diff", "-f", tarball, "-C", dest])
    n = sum(len(f) for _d, _s, f in os.walk(dest))
    assert n >= MIN_FILES
    shutil.rmtree(dest)
    assert not os.path.exists(dest)


def test_git_repository(big_mount):
    repo = big_mount.p("repo")
    os.mkdir(repo)
    src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for sub in ("clusterfs", "journal", "tests"):
        shutil.copytree(os.path.join(src, sub), os.path.join(repo, sub),
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis",
                                                      ".pytest_cache"))
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.invalid",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.invalid",
               HOME=big_mount.path, GIT_CONFIG_NOSYSTEM="1")
    git = lambda *a: _run(["git", "-C", repo, *a], env=env)      # noqa: E731
    git("init", "-q")
    git("add", "-A")
    git("commit", "-q", "-m", "first")
    with open(os.path.join(repo, "clusterfs", "fs.py"), "a") as f:
        f.write("\n# changed on clusterfs\n")
    os.rename(os.path.join(repo, "journal"), os.path.join(repo, "journal2"))
    git("add", "-A")
    git("commit", "-q", "-m", "second")
    git("gc", "-q")
    git("fsck", "--full", "--strict")
    assert git("status", "--porcelain") == ""
    assert git("log", "--format=%s").split() == ["second", "first"]
    clone = big_mount.p("clone")
    _run(["git", "clone", "-q", repo, clone], env=env)
    _run(["git", "-C", clone, "fsck", "--full"], env=env)
    _run(["diff", "-r", "-x", ".git", repo, clone])


@pytest.mark.parametrize("bs,size,rw", [("1M", "128M", "write"), ("4k", "16M", "randwrite")])
def test_fio_verify(big_mount, bs, size, rw):
    if shutil.which("fio") is None:
        pytest.skip("fio is not installed (.ci/install-deps installs it)")
    path = big_mount.p(f"fio-{bs}")
    _run(["fio", "--name=verify", f"--filename={path}", f"--size={size}", f"--bs={bs}",
          f"--rw={rw}", "--ioengine=psync", "--verify=crc32c", "--do_verify=1",
          "--verify_fatal=1", "--randrepeat=0", "--fsync_on_close=1",
          "--verify_state_save=0", "--output-format=terse"], cwd=big_mount.path)
    # and a second pass that verifies what the first one wrote, after a re-read
    _run(["fio", "--name=verify", f"--filename={path}", f"--size={size}", f"--bs={bs}",
          f"--rw={'read' if rw == 'write' else 'randread'}", "--ioengine=psync",
          "--verify=crc32c", "--verify_only=1", "--verify_fatal=1",
          "--verify_state_save=0", "--output-format=terse"], cwd=big_mount.path)
    os.unlink(path)
