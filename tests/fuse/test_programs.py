"""Real programs on the mount: tar x of a large tarball then diff -r (and tar --diff
for modes, owners and times), git init/add/commit/gc/fsck, fio with crc32c verify."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.fuse.conftest import check_image
from tests.helpers import Mount, mkfs

SOURCES = ["/usr/lib/python3", "/usr/lib/python3.11"]
SHARE = "/usr/share"
MIN_BYTES = 100 << 20
MIN_FILES = 3000


def _tree_size(top: str) -> tuple[int, int]:
    size = files = 0
    for dirpath, _dirs, names in os.walk(top):
        for n in names:
            try:
                st = os.lstat(os.path.join(dirpath, n))
            except OSError:
                continue
            size += st.st_size
            files += 1
    return size, files


def _pick_sources() -> list[str]:
    """Whole directories (so diff -r can compare them) adding up to >= 100 MB and
    thousands of files."""
    picked, size, files = [], 0, 0
    cands = [d for d in SOURCES if os.path.isdir(d)]
    if os.path.isdir(SHARE):
        cands += sorted(os.path.join(SHARE, d) for d in os.listdir(SHARE))
    for d in cands:
        if not os.path.isdir(d) or os.path.islink(d):
            continue
        s, f = _tree_size(d)
        if s > 200 << 20:
            continue
        picked.append(d)
        size += s
        files += f
        if size >= MIN_BYTES and files >= MIN_FILES:
            return picked
    pytest.skip(f"not enough local files for a {MIN_BYTES >> 20} MB tarball")


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
    dirs = _pick_sources()
    tarball = str(tmp_path / "big.tar")
    _run(["tar", "cf", tarball, "--warning=no-file-changed", "--ignore-failed-read",
          *dirs])
    assert os.path.getsize(tarball) >= MIN_BYTES
    dest = big_mount.p("extract")
    os.mkdir(dest)
    _run(["tar", "xf", tarball, "-C", dest])
    for d in dirs:
        _run(["diff", "-r", "--no-dereference", d, os.path.join(dest, d.lstrip("/"))])
    # tar compares contents, sizes, modes, owners, mtimes and link targets
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
