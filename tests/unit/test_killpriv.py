"""The file system drops privileges itself (FUSE_HANDLE_KILLPRIV_V2): a write, a
truncation and a change of owner remove the file's capabilities whoever the caller,
and clear set-ID bits as the kernel would.  Through a mount the kernel usually removes
capabilities first (it checks again after each refresh of an inode's attributes), so
these run on ``Filesystem`` itself, where nothing else would."""

from __future__ import annotations

import errno
import os

import pytest

from clusterfs.errors import FSError
from clusterfs.fs.posix import Ctx
from tests.fuse.posix_util import CAPS_VALUE
from tests.helpers import DeviceMount, fsck_device, power_loss_volume

CAPS = b"security.capability"
ROOT = Ctx(uid=0, gid=0)
USER = Ctx(uid=1000, gid=1000)


@pytest.fixture
def fs():
    dev = power_loss_volume()
    m = DeviceMount(dev)
    fs = m.start()
    yield fs
    m.stop()
    code, text = fsck_device(dev)
    assert code == 0, text


def _file(fs, name: bytes, mode: int, caps: bool = True):
    fh, di = fs.create(fs.root_ino, name, 0o100000 | mode, os.O_RDWR, ROOT)
    fs.write(fh, 0, b"0123456789", ROOT)
    fs.setattr(di.bno, mode=mode)
    if caps:
        fs.setxattr(di.bno, CAPS, CAPS_VALUE)
    return fh, di.bno


def _caps(fs, ino) -> bool:
    try:
        return fs.getxattr(ino, CAPS) == CAPS_VALUE
    except FSError as e:
        assert e.errno == errno.ENODATA
        return False


def _mode(fs, ino) -> int:
    return fs.getattr(ino).mode & 0o7777


def test_write_drops_capabilities_for_anyone_and_set_id_bits_for_users(fs):
    fh, ino = _file(fs, b"w-root", 0o6777)
    fs.write(fh, 3, b"x", ROOT)
    assert (_mode(fs, ino), _caps(fs, ino)) == (0o6777, False)
    assert ino in fs.privileges_dropped        # the kernel's cached mode must go
    fh, ino = _file(fs, b"w-user", 0o6777)
    fs.write(fh, 3, b"x", USER)
    assert (_mode(fs, ino), _caps(fs, ino)) == (0o777, False)
    # an overwrite in place right after the file changed drops them too
    fh, ino = _file(fs, b"w-fast", 0o755)
    fs.write(fh, 0, b"a" * 4096, ROOT)
    fs.setxattr(ino, CAPS, CAPS_VALUE)
    fs.write(fh, 0, b"b" * 4096, ROOT)
    assert not _caps(fs, ino)
    # nothing to drop: nothing noted
    fs.privileges_dropped.clear()
    fs.write(fh, 0, b"c", USER)
    assert not fs.privileges_dropped


def test_truncation_and_o_trunc_open(fs):
    _fh, ino = _file(fs, b"t-user", 0o6777)
    fs.setattr(ino, size=4, ctx=USER)
    assert (_mode(fs, ino), _caps(fs, ino)) == (0o777, False)
    _fh, ino = _file(fs, b"t-root", 0o6777)
    fs.setattr(ino, size=4, ctx=ROOT)
    assert (_mode(fs, ino), _caps(fs, ino)) == (0o6777, False)
    _fh, ino = _file(fs, b"o-user", 0o6777)
    fs.open(ino, os.O_WRONLY | os.O_TRUNC, USER)
    assert (_mode(fs, ino), _caps(fs, ino), fs.getattr(ino).size) == (0o777, False, 0)
    # an empty file too (the open changes its privileges, not its size)
    _fh, ino = _file(fs, b"o-empty", 0o6777)
    fs.setattr(ino, size=0, ctx=ROOT)
    fs.setxattr(ino, CAPS, CAPS_VALUE)
    fs.open(ino, os.O_WRONLY | os.O_TRUNC, USER)
    assert (_mode(fs, ino), _caps(fs, ino)) == (0o777, False)


def test_chown_drops_set_user_id_always_and_set_group_id_when_group_executable(fs):
    _fh, ino = _file(fs, b"c-gx", 0o6755)
    fs.setattr(ino, uid=1000, gid=1000, ctx=ROOT)
    assert (_mode(fs, ino), _caps(fs, ino)) == (0o755, False)
    _fh, ino = _file(fs, b"c-nogx", 0o6745)
    fs.setattr(ino, uid=1000, ctx=ROOT)
    assert (_mode(fs, ino), _caps(fs, ino)) == (0o2745, False)
    # a caller outside the file's group loses set-group-ID as well
    _fh, ino = _file(fs, b"c-other", 0o6745)
    fs.setattr(ino, gid=0, ctx=Ctx(uid=1000, gid=1000))
    assert _mode(fs, ino) == 0o745
    # chmod and times keep the capabilities
    _fh, ino = _file(fs, b"keep", 0o755)
    fs.setattr(ino, mode=0o750, ctx=ROOT)
    assert (_mode(fs, ino), _caps(fs, ino)) == (0o750, True)
    # a directory keeps its set-group-ID bit across a chown
    d = fs.mkdir(fs.root_ino, b"dir", 0o2775, ROOT)
    before = _mode(fs, d.bno)
    fs.setattr(d.bno, uid=1000, ctx=ROOT)
    assert _mode(fs, d.bno) == before and before & 0o2000
