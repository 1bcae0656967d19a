"""POSIX ACLs on a single-node mount: access and default ACLs, the mode kept in step,
inheritance on create, the umask, enforcement by the kernel for another user.

Most tests run one shell script (setfacl, getfacl, chmod, creates, accesses as
``nobody``) in a directory on the mount and in a directory of /tmp (a local Linux
file system with ACLs: ext4 here), and compare the two outputs; the lines that
matter are also checked against literal values, so that both cannot be wrong alike.
The last ones call ``acl.py`` and ``Filesystem`` directly.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile

import pytest

from clusterfs.errors import FSError
from clusterfs.fs import acl
from clusterfs.fs.posix import Ctx

NOBODY = 65534
ACCESS = "system.posix_acl_access"
DEFAULT = "system.posix_acl_default"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="acts as another user: needs root"),
]
needs_tools = pytest.mark.skipif(shutil.which("setfacl") is None,
                                 reason="setfacl/getfacl missing (Debian package acl)")

# ``probe HOW PATH`` in the scripts: try PATH as nobody (uid and gid 65534, no other
# group); prints "HOW PATH: ok" or the errno's name
PROBE = r"""
import errno, os, sys
os.setgroups([]); os.setgid(65534); os.setuid(65534)
how, path = sys.argv[1], sys.argv[2]
try:
    if how == "r":
        os.close(os.open(path, os.O_RDONLY))
    elif how == "w":
        os.close(os.open(path, os.O_WRONLY))
    elif how == "ls":
        os.listdir(path)
    elif how == "create":
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    else:
        raise SystemExit("bad probe " + how)
    print(how, path + ": ok")
except OSError as e:
    print(how, path + ":", errno.errorcode[e.errno])
"""

# ``xattrs PATH``: the ACL xattrs actually stored (a minimal ACL is not)
XATTRS = r"""
import os, sys
for path in sys.argv[1:]:
    names = sorted(n for n in os.listxattr(path, follow_symlinks=False)
                   if n.startswith("system.posix_acl"))
    print(path, names)
"""

# ``create PATH MODE``: open(O_CREAT) with an octal mode (touch uses 0666)
CREATE = r"""
import os, sys
os.close(os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, int(sys.argv[2], 8)))
"""

PRELUDE = """
probe() { "$PY" -c "$PROBE" "$@"; }
xattrs() { "$PY" -c "$XATTRS" "$@"; }
create() { "$PY" -c "$CREATE" "$@"; }
facl() { getfacl -cn "$@" 2>&1; }
mode() { stat -c '%a %n' "$@"; }
"""


def run_script(directory: str, script: str, umask: int = 0o022) -> str:
    """Run ``script`` (sh, with the helpers above) in ``directory`` as root with
    ``umask``; returns stdout and stderr, each command echoed first."""
    env = dict(os.environ, PY=sys.executable, PROBE=PROBE, XATTRS=XATTRS, CREATE=CREATE,
               LC_ALL="C")
    lines = [line.strip() for line in script.strip().splitlines() if line.strip()]
    body = "".join("echo '$ " + line.replace("'", "'\\''") + f"'\n{line}\n"
                   for line in lines)
    r = subprocess.run(["sh", "-c", PRELUDE + body], cwd=directory, env=env,
                       capture_output=True, text=True, timeout=120,
                       preexec_fn=lambda: os.umask(umask))
    return r.stdout + r.stderr


def probes(out: str) -> list[str]:
    """The probe results of a script's output, in order."""
    return [line for line in out.splitlines()
            if line.split(" ", 1)[0] in ("r", "w", "ls", "create") and ": " in line]


@pytest.fixture
def ref():
    """A directory like ``wd`` (mode 0777, in a world-traversable one) on /tmp's
    local file system, for the reference runs."""
    top = tempfile.mkdtemp(prefix="cfs-acl-ref-")
    os.chmod(top, 0o755)
    d = os.path.join(top, "wd")
    os.mkdir(d)
    os.chmod(d, 0o777)
    # the reference must have ACLs, or the comparison proves nothing
    probe_file = os.path.join(top, "probe")
    open(probe_file, "w").close()
    if shutil.which("setfacl"):
        subprocess.run(["setfacl", "-m", "u:65534:r", probe_file], check=True)
    yield d
    shutil.rmtree(top, ignore_errors=True)


def same_on_both(wd: str, ref: str, script: str, umask: int = 0o022) -> str:
    """Run ``script`` on the mount and on the reference; the outputs must be equal.
    Returns the mount's."""
    ours = run_script(wd, script, umask)
    theirs = run_script(ref, script, umask)
    assert ours == theirs, f"clusterfs:\n{ours}\n----- reference (/tmp):\n{theirs}"
    return ours


# -- access ACLs and enforcement ---------------------------------------------------------

ACCESS_SCRIPT = """
echo secret > f
chmod 600 f
probe r f
setfacl -m u:65534:r f
facl f
mode f
xattrs f
probe r f
probe w f
setfacl -m m::- f
facl f
mode f
probe r f
chmod 640 f
facl f
probe r f
chmod 600 f
facl f
probe r f
chmod 660 f
setfacl -m g:65534:rw f
facl f
probe r f
probe w f
setfacl -x u:65534 f
facl f
probe w f
setfacl -x g:65534 f
facl f
mode f
xattrs f
probe r f
setfacl -m u::rwx,g::r,o::- f
facl f
mode f
xattrs f
setfacl -m u:65534:rw,m::rw f
mode f
setfacl -b f
facl f
mode f
xattrs f
probe r f
"""


@needs_tools
def test_access_acl_set_get_enforced_as_ext4(wd, ref):
    out = same_on_both(wd, ref, ACCESS_SCRIPT)
    assert probes(out) == [
        "r f: EACCES",      # 0600, no ACL
        "r f: ok",          # u:nobody:r granted
        "w f: EACCES",      # ... read only
        "r f: EACCES",      # the mask limits the named user
        "r f: ok",          # chmod 640 set the mask to r
        "r f: EACCES",      # chmod 600: mask ---
        "r f: ok",          # named group rw (the named user entry decides first)
        "w f: EACCES",      # ... but the named user has r only
        "w f: ok",          # named user gone: the named group's rw
        "r f: EACCES",      # every named entry gone: the mode, 0600 again
        "r f: EACCES",      # after setfacl -b
    ], out
    assert "f ['system.posix_acl_access']" in out
    assert "f []" in out        # an ACL equivalent to the mode is not stored
    assert "740 f" in out


@needs_tools
def test_chmod_updates_mask_not_group(wd, ref):
    out = same_on_both(wd, ref, """
        touch f
        setfacl -m u:65534:rwx,g::rwx,o::r f
        mode f
        facl f
        chmod 604 f
        facl f
        mode f
        chmod 770 f
        facl f
        setfacl -m g::r f
        mode f
        facl f
        setfacl -x u:65534 f
        facl f
        mode f
        chmod 751 f
        facl f
        mode f
    """)
    # chmod 604 changed the mask (and other), not group::rwx
    assert "group::rwx\t#effective:---\nmask::---\nother::r--" in out


# -- default ACLs and inheritance --------------------------------------------------------

INHERIT_SCRIPT = """
mkdir d
setfacl -d -m u:65534:rwx,g::rwx,o::rx d
facl d
xattrs d
touch d/f
facl d/f
mode d/f
xattrs d/f
create d/g 640
facl d/g
mode d/g
create d/h 0
facl d/h
mode d/h
mkdir d/sub
facl d/sub
mode d/sub
xattrs d/sub
mkdir -m 700 d/priv
facl d/priv
mode d/priv
mkfifo d/fifo
facl d/fifo
mode d/fifo
touch d/sub/f2
facl d/sub/f2
mode d/sub/f2
mkdir d/sub/deeper
facl d/sub/deeper
ln -s f d/link
stat -c '%a %F' d/link
xattrs d/link
probe w d/f
probe r d/g
probe create d/sub/nobody
facl d/sub/nobody
mode d/sub/nobody
stat -c '%u %g %n' d/sub/nobody
setfacl -k d
facl d
xattrs d
touch d/after
facl d/after
mode d/after
mkdir e
setfacl -d -m u::rwx,g::rwx,o::rwx e
facl e
touch e/f
mkdir e/sub
mode e/f e/sub
xattrs e/f e/sub
facl e/sub
"""


@needs_tools
def test_default_acl_inherited_as_ext4(wd, ref):
    """With a default ACL the umask does not apply (umask 0 here: see
    test_default_acl_ignores_umask for why)."""
    out = same_on_both(wd, ref, INHERIT_SCRIPT, umask=0)
    assert probes(out) == ["w d/f: ok", "r d/g: ok", "create d/sub/nobody: ok"], out
    # a file made with 0666 in d: the named user's entry, within the mask rw-
    assert "user:65534:rwx\t#effective:rw-\ngroup::rwx\t#effective:rw-\nmask::rw-\n" \
           "other::r--" in out
    assert "664 d/f" in out and "640 d/g" in out and "0 d/h" in out
    assert "775 d/sub" in out and "700 d/priv" in out and "664 d/fifo" in out
    assert "d/sub ['system.posix_acl_access', 'system.posix_acl_default']" in out
    assert "666 d/after" in out          # no default ACL any more: the umask (0) only
    # a default ACL of the base entries alone: an access ACL that equals the mode,
    # not stored; a directory still gets the default ACL
    assert "e/f []" in out and "e/sub ['system.posix_acl_default']" in out


@needs_tools
def test_default_acl_inherited_with_umask_022(wd, ref):
    """umask 022 with a default ACL whose group class (its mask) and others have no
    write: the same as ext4 whether or not the kernel applied the umask first."""
    out = same_on_both(wd, ref, """
        mkdir d
        setfacl -d -m u:65534:rx,g::rx,o::- d
        touch d/f
        facl d/f
        mode d/f
        mkdir d/sub
        facl d/sub
        mode d/sub
        probe r d/f
        probe w d/f
        probe ls d/sub
    """, umask=0o022)
    assert probes(out) == ["r d/f: ok", "w d/f: EACCES", "ls d/sub: ok"], out
    assert "640 d/f" in out and "750 d/sub" in out


@needs_tools
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_default_acl_ignores_umask(wd, ref, umask):
    # the binding asks for FUSE_CAP_DONT_MASK with ACLs: the mode arrives unmasked
    same_on_both(wd, ref, INHERIT_SCRIPT, umask=umask)


BIG_ACL = ",".join(f"u:{uid}:r" for uid in range(1000, 1120)) + "," + \
    ",".join(f"g:{gid}:rx" for gid in range(2000, 2040))
BIG_SCRIPT = f"""
mkdir d
setfacl -m {BIG_ACL} d
setfacl -d -m {BIG_ACL},u:65534:rwx d
mkdir d/sub
touch d/sub/f
facl d/sub d/sub/f
mode d/sub d/sub/f
xattrs d d/sub d/sub/f
probe create d/sub/nobody
chmod 700 d/sub
facl d/sub
"""


@needs_tools
def test_big_acls_as_ext4(wd, ref):
    """ACLs that do not fit in the dinode (an xattr block, allocated by the create
    that inherits them)."""
    out = same_on_both(wd, ref, BIG_SCRIPT, umask=0)
    assert probes(out) == ["create d/sub/nobody: ok"], out
    assert out.count("user:1119:r--") == 5      # d/sub (access, default) twice, d/sub/f


@needs_tools
def test_default_acl_only_on_directories(wd, ref):
    out = same_on_both(wd, ref, """
        touch f
        setfacl -d -m u:65534:r f
        echo $?
        setfacl -k f
        echo $?
        xattrs f
        mkdir d
        setfacl -k d
        echo $?
        setfacl -d -m u:65534:r d
        setfacl -x -d u:65534 d
        facl d
        setfacl -k d
        facl d
        xattrs d
    """)
    assert "Only directories can have default ACLs" in out


# -- the umask without a default ACL ------------------------------------------------------

def created_modes(directory: str, umask: int) -> list[str]:
    """Create a file (0666), a directory (0777), a FIFO (0666), a node by mknod
    (0666) and a file with 0640 under ``umask``; their modes."""
    old = os.umask(umask)
    try:
        os.close(os.open(os.path.join(directory, "f"), os.O_CREAT | os.O_WRONLY, 0o666))
        os.mkdir(os.path.join(directory, "d"), 0o777)
        os.mkfifo(os.path.join(directory, "p"), 0o666)
        os.mknod(os.path.join(directory, "n"), stat.S_IFREG | 0o666)
        os.close(os.open(os.path.join(directory, "g"), os.O_CREAT | os.O_WRONLY, 0o640))
    finally:
        os.umask(old)
    return [f"{n} {stat.S_IMODE(os.lstat(os.path.join(directory, n)).st_mode):o}"
            for n in ("f", "d", "p", "n", "g")]


@pytest.mark.parametrize("umask,expected", [
    (0o022, ["f 644", "d 755", "p 644", "n 644", "g 640"]),
    (0o077, ["f 600", "d 700", "p 600", "n 600", "g 600"]),
    (0o000, ["f 666", "d 777", "p 666", "n 666", "g 640"]),
])
def test_umask_without_default_acl(wd, ref, umask, expected):
    assert created_modes(ref, umask) == expected
    assert created_modes(wd, umask) == expected


# -- the xattr values ----------------------------------------------------------------------

def value(*entries, version=2) -> bytes:
    return struct.pack("<I", version) + b"".join(
        struct.pack("<HHI", tag, perm, ident) for tag, perm, ident in entries)


U = acl.UNDEFINED_ID
BASE = [(acl.USER_OBJ, 6, U), (acl.GROUP_OBJ, 4, U), (acl.OTHER, 0, U)]
NAMED = [(acl.USER_OBJ, 6, U), (acl.USER, 4, NOBODY), (acl.GROUP_OBJ, 4, U),
         (acl.MASK, 4, U), (acl.OTHER, 0, U)]
BAD_VALUES = {
    "version 1": value(*BASE, version=1),
    "truncated entry": value(*BASE)[:-2],
    "no header": b"\x02\x00",
    "no OTHER": value(*BASE[:2]),
    "two USER_OBJ": value(BASE[0], *BASE),
    "out of order": value(BASE[1], BASE[0], BASE[2]),
    "named without mask": value(NAMED[0], NAMED[1], NAMED[2], NAMED[4]),
    "named twice": value(NAMED[0], NAMED[1], NAMED[1], *NAMED[2:]),
    "ids descending": value(NAMED[0], NAMED[1], (acl.USER, 4, 1000), *NAMED[2:]),
    "perm beyond rwx": value((acl.USER_OBJ, 8, U), *BASE[1:]),
    "unknown tag": value(BASE[0], (0x40, 4, U), *BASE[1:]),
    "named without id": value(NAMED[0], (acl.USER, 4, U), *NAMED[2:]),
}


def xattr_results(directory: str) -> list[str]:
    """Set every bad value, a default ACL on a file and good ones with os.setxattr;
    the errno or the value read back."""
    f = os.path.join(directory, "f")
    d = os.path.join(directory, "d")
    open(f, "w").close()
    os.chmod(f, 0o640)
    os.mkdir(d, 0o755)
    out = []
    for what, v in BAD_VALUES.items():
        try:
            os.setxattr(f, ACCESS, v)
            out.append(f"{what}: accepted")
        except OSError as e:
            out.append(f"{what}: {errno.errorcode[e.errno]}")
    for path, name, v in ((f, DEFAULT, value(*NAMED)), (f, ACCESS, value(*NAMED)),
                          (d, DEFAULT, value(*NAMED)), (d, ACCESS, value(*BASE))):
        try:
            os.setxattr(path, name, v)
            got = os.getxattr(path, name).hex() if name in os.listxattr(path) else "none"
            out.append(f"{os.path.basename(path)} {name}: {got} "
                       f"{stat.S_IMODE(os.stat(path).st_mode):o}")
        except OSError as e:
            out.append(f"{os.path.basename(path)} {name}: {errno.errorcode[e.errno]}")
    os.removexattr(f, ACCESS)
    out.append(f"removed: {stat.S_IMODE(os.stat(f).st_mode):o} {os.listxattr(f)}")
    for path, name in ((f, ACCESS), (d, DEFAULT), (f, DEFAULT)):
        try:
            os.removexattr(path, name)
            out.append(f"remove {name} again: ok")
        except OSError as e:
            out.append(f"remove {name} again: {errno.errorcode[e.errno]}")
    return out


# Linux (since 3.8) no longer checks the order of the ids of named entries, nor that
# each comes once (setfacl always sorts them): clusterfs refuses such a value
STRICTER = ("named twice", "ids descending")


def test_acl_xattrs_as_ext4(wd, ref):
    ours = xattr_results(wd)
    theirs = xattr_results(ref)
    for what in STRICTER:
        assert f"{what}: accepted" in theirs
        theirs[theirs.index(f"{what}: accepted")] = f"{what}: EINVAL"
    assert ours == theirs
    assert "f system.posix_acl_default: EACCES" in ours
    assert f"f system.posix_acl_access: {value(*NAMED).hex()} 640" in ours
    assert "d system.posix_acl_access: none 640" in ours     # the mode, not stored
    assert "removed: 640 []" in ours                          # the mode stays
    assert "remove system.posix_acl_access again: ok" in ours


# -- acl.py and Filesystem, without the kernel ------------------------------------------

@pytest.mark.parametrize("what", sorted(BAD_VALUES))
def test_parse_rejects(what):
    with pytest.raises(FSError) as e:
        acl.parse(BAD_VALUES[what])
    assert e.value.errno == errno.EINVAL


def test_parse_build_round_trip():
    entries = acl.parse(value(*NAMED))
    assert acl.to_text(entries) == "u::rw-,u:65534:r--,g::r--,m::r--,o::---"
    assert acl.build(entries) == value(*NAMED)
    # an id in an entry that has none is not kept
    odd = value((acl.USER_OBJ, 6, 7), *BASE[1:])
    assert acl.build(acl.parse(odd)) == value(*BASE)
    assert acl.parse(value()) == [] and acl.is_removal(acl.parse(value()))


def test_mode_and_chmod():
    named = acl.parse(value(*NAMED))
    assert acl.mode_of(named, stat.S_IFREG | 0o4777) == stat.S_IFREG | 0o4640
    assert not acl.equivalent(named)
    assert not acl.equivalent([e for e in named if e.tag != acl.USER])
    assert acl.equivalent(acl.parse(value(*BASE)))
    after = acl.chmod(named, 0o751)
    assert acl.to_text(after) == "u::rwx,u:65534:r--,g::r--,m::r-x,o::--x"
    base = acl.chmod(acl.parse(value(*BASE)), 0o751)
    assert acl.to_text(base) == "u::rwx,g::r-x,o::--x"


def test_inherit():
    default = acl.parse(value((acl.USER_OBJ, 7, U), (acl.USER, 7, NOBODY),
                              (acl.GROUP_OBJ, 7, U), (acl.MASK, 7, U),
                              (acl.OTHER, 5, U)))
    mode, access, dflt = acl.inherit(default, stat.S_IFREG | 0o666, 0o077)
    assert mode == stat.S_IFREG | 0o664            # no umask
    assert acl.to_text(access) == "u::rw-,u:65534:rwx,g::rwx,m::rw-,o::r--"
    assert dflt is None
    mode, access, dflt = acl.inherit(default, stat.S_IFDIR | 0o2750, 0o077)
    assert mode == stat.S_IFDIR | 0o2750
    assert acl.to_text(access) == "u::rwx,u:65534:rwx,g::rwx,m::r-x,o::---"
    assert dflt == default
    assert acl.inherit(None, stat.S_IFREG | 0o666, 0o027) == (stat.S_IFREG | 0o640,
                                                             None, None)
    assert acl.inherit(default, stat.S_IFLNK | 0o777, 0o022) == (stat.S_IFLNK | 0o777,
                                                                None, None)
    base = acl.parse(value((acl.USER_OBJ, 7, U), (acl.GROUP_OBJ, 5, U), (acl.OTHER, 0, U)))
    mode, access, dflt = acl.inherit(base, stat.S_IFREG | 0o666, 0o022)
    assert (mode, access, dflt) == (stat.S_IFREG | 0o640, None, None)


def test_permits():
    entries = acl.parse(value(*NAMED))
    assert acl.permits(entries, 0o640, 0, 0, NOBODY, (NOBODY,), 4)
    assert not acl.permits(entries, 0o640, 0, 0, NOBODY, (NOBODY,), 2)
    assert not acl.permits(entries, 0o640, 0, 0, 1000, (1000,), 4)
    assert acl.permits(entries, 0o640, 0, 0, 1000, (0,), 4)          # owning group
    masked = acl.chmod(entries, 0o600)
    assert not acl.permits(masked, 0o600, 0, 0, NOBODY, (NOBODY,), 4)
    assert acl.permits(None, 0o604, 0, 0, NOBODY, (NOBODY,), 4)


@pytest.fixture
def api_fs():
    from tests.helpers import DeviceMount, power_loss_volume
    m = DeviceMount(power_loss_volume())
    fs = m.start()
    yield fs
    m.stop()


def test_filesystem_checks_and_stores(api_fs):
    fs = api_fs
    root = Ctx(uid=0, gid=0, umask=0o022)
    fh, f = fs.create(fs.root_ino, b"f", 0o640, os.O_RDWR, root)
    fs.release(fh)
    for what, v in BAD_VALUES.items():
        with pytest.raises(FSError) as e:
            fs.setxattr(f.bno, ACCESS.encode(), v)
        assert e.value.errno == errno.EINVAL, what
    with pytest.raises(FSError) as e:
        fs.setxattr(f.bno, DEFAULT.encode(), value(*NAMED))
    assert e.value.errno == errno.EACCES
    fs.setxattr(f.bno, ACCESS.encode(), value(*NAMED))
    assert fs.getxattr(f.bno, ACCESS.encode()) == value(*NAMED)
    assert fs.access(f.bno, os.R_OK, Ctx(uid=NOBODY, gid=NOBODY))
    assert not fs.access(f.bno, os.W_OK, Ctx(uid=NOBODY, gid=NOBODY))
    fs.setattr(f.bno, mode=0o600)
    assert acl.to_text(acl.parse(fs.getxattr(f.bno, ACCESS.encode()))) == \
        "u::rw-,u:65534:r--,g::r--,m::---,o::---"
    assert not fs.access(f.bno, os.R_OK, Ctx(uid=NOBODY, gid=NOBODY))
    fs.removexattr(f.bno, ACCESS.encode())
    assert stat.S_IMODE(fs.getattr(f.bno).mode) == 0o600
    fs.removexattr(f.bno, ACCESS.encode())          # none: no error, as on ext4
    with pytest.raises(FSError) as e:
        fs.removexattr(f.bno, b"user.none")
    assert e.value.errno == errno.ENODATA
    # a header alone is "no ACL"
    fs.setxattr(f.bno, ACCESS.encode(), value(*NAMED))
    fs.setxattr(f.bno, ACCESS.encode(), value())
    assert fs.listxattr(f.bno) == []


def test_filesystem_create_mode_given_unmasked(api_fs):
    """What the file system does when the kernel leaves the umask to it
    (FUSE_CAP_DONT_MASK): the umask without a default ACL, the default ACL alone
    with one."""
    fs = api_fs
    ctx = Ctx(uid=0, gid=0, umask=0o077)
    fh, f = fs.create(fs.root_ino, b"plain", 0o666, os.O_RDWR, ctx)
    fs.release(fh)
    assert stat.S_IMODE(f.mode) == 0o600
    d = fs.mkdir(fs.root_ino, b"d", 0o777, ctx)
    assert stat.S_IMODE(d.mode) == 0o700
    fs.setxattr(d.bno, DEFAULT.encode(), value(
        (acl.USER_OBJ, 7, U), (acl.USER, 7, NOBODY), (acl.GROUP_OBJ, 7, U),
        (acl.MASK, 7, U), (acl.OTHER, 5, U)))
    fh, f = fs.create(d.bno, b"f", 0o666, os.O_RDWR, ctx)
    fs.release(fh)
    assert stat.S_IMODE(f.mode) == 0o664
    assert acl.to_text(acl.parse(fs.getxattr(f.bno, ACCESS.encode()))) == \
        "u::rw-,u:65534:rwx,g::rwx,m::rw-,o::r--"
    sub = fs.mkdir(d.bno, b"sub", 0o777, ctx)
    assert stat.S_IMODE(sub.mode) == 0o775
    assert fs.getxattr(sub.bno, DEFAULT.encode()) == fs.getxattr(d.bno, DEFAULT.encode())
    node = fs.mknod(sub.bno, b"fifo", stat.S_IFIFO | 0o600, 0, ctx)
    assert stat.S_IMODE(node.mode) == 0o600
    link = fs.symlink(d.bno, b"link", b"f", ctx)
    assert stat.S_IMODE(link.mode) == 0o777 and fs.listxattr(link.bno) == []
