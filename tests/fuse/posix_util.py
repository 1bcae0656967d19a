"""Syscalls Python's os module lacks (renameat2, utimensat with UTIME_OMIT, raw
getdents64), running a function as another user in a forked child, and what the
stateful tests compare (an operation's outcome, a tree's snapshot)."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import stat
import struct
import tempfile
import traceback

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
SYS_getdents64 = 217        # x86_64
SYS_renameat2 = 316


def _check(rc: int, what: str) -> None:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def renameat2(old: str, new: str, flags: int) -> None:
    _libc.syscall.restype = ctypes.c_long
    rc = _libc.syscall(ctypes.c_long(SYS_renameat2), ctypes.c_int(AT_FDCWD),
                       ctypes.c_char_p(os.fsencode(old)), ctypes.c_int(AT_FDCWD),
                       ctypes.c_char_p(os.fsencode(new)), ctypes.c_uint(flags))
    _check(rc, "renameat2")


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def utimensat(path: str, atime: tuple[int, int], mtime: tuple[int, int],
              follow: bool = True) -> None:
    """Each time is (sec, nsec); nsec may be UTIME_NOW or UTIME_OMIT."""
    ts = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    flags = 0 if follow else 0x100      # AT_SYMLINK_NOFOLLOW
    rc = _libc.utimensat(AT_FDCWD, os.fsencode(path), ts, flags)
    _check(rc, "utimensat")


def getdents(fd: int, bufsize: int = 512) -> list[tuple[int, int, int, bytes]]:
    """One getdents64 call: [(ino, off, type, name)] (empty at the end)."""
    buf = ctypes.create_string_buffer(bufsize)
    _libc.syscall.restype = ctypes.c_long
    n = _libc.syscall(ctypes.c_long(SYS_getdents64), ctypes.c_int(fd), buf,
                      ctypes.c_uint(bufsize))
    _check(n, "getdents64")
    out = []
    raw = buf.raw[:n]
    p = 0
    while p < n:
        ino, off, reclen, typ = struct.unpack_from("<QqHB", raw, p)
        name = raw[p + 19:p + reclen].split(b"\0", 1)[0]
        out.append((ino, off, typ, name))
        p += reclen
    return out


def as_user(uid: int, gid: int, fn, *args) -> object:
    """Run ``fn(*args)`` in a child with real/effective/saved uid and gid set;
    return its result, or the errno of the OSError it raised (as ('errno', n))."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 0
        try:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            try:
                res = repr(fn(*args))
            except OSError as e:
                res = repr(("errno", e.errno))
            os.write(w, res.encode())
        except BaseException:
            os.write(w, repr(("exception", traceback.format_exc())).encode())
            code = 1
        finally:
            os.close(w)
            os._exit(code)
    os.close(w)
    chunks = []
    while True:
        c = os.read(r, 65536)
        if not c:
            break
        chunks.append(c)
    os.close(r)
    os.waitpid(pid, 0)
    import ast
    res = ast.literal_eval(b"".join(chunks).decode())
    if isinstance(res, tuple) and res and res[0] == "exception":
        raise AssertionError("child failed:\n" + res[1])
    return res


def outcome(fn, *args):
    """("ok", result) or ("errno", name): what a model and the file system compare."""
    try:
        r = fn(*args)
        return ("ok", r if isinstance(r, (bytes, int, str, list)) else None)
    except OSError as e:
        return ("errno", errno.errorcode.get(e.errno, e.errno))


def snapshot(top: str, with_xattrs: bool = True) -> dict:
    """Every name under ``top`` with type, mode, link count, size, contents or
    target, and (``with_xattrs``) user xattrs."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        rel = os.path.relpath(dirpath, top)
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            st_ = os.lstat(p)
            kind = stat.S_IFMT(st_.st_mode)
            entry = [kind, stat.S_IMODE(st_.st_mode), st_.st_nlink]
            if stat.S_ISREG(kind):
                with open(p, "rb") as f:
                    entry += [st_.st_size, f.read()]
            elif stat.S_ISLNK(kind):
                entry += [st_.st_size, os.readlink(p)]
            if with_xattrs and not stat.S_ISLNK(kind):
                entry.append(sorted((k, os.getxattr(p, k)) for k in os.listxattr(p)
                                    if k.startswith("user.")))
            out[os.path.normpath(os.path.join(rel, name))] = entry
    return out


# file capabilities (struct vfs_cap_data, revision 2): CAP_NET_BIND_SERVICE permitted
# and effective; a write, a truncation and a change of owner remove them
CAPS_XATTR = "security.capability"
CAPS_VALUE = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)


def on_local_fs(fn) -> object:
    """``fn(directory)`` in a fresh world-writable directory of the local file system
    (ext4, under /var/tmp), removed after: the reference a mount is compared with."""
    ref = tempfile.mkdtemp(prefix="cfs-ref-", dir="/var/tmp")
    try:
        os.chmod(ref, 0o777)
        return fn(ref)
    finally:
        shutil.rmtree(ref, ignore_errors=True)


def privilege_transcript(directory: str) -> list[str]:
    """What writes, truncations and changes of owner leave of set-ID bits and file
    capabilities, in DIRECTORY (world-writable), one line per case: run it on a
    local file system and on a mount and compare.  Needs root."""
    out = []

    def prepare(name: str, mode: int, caps: bool = False) -> str:
        path = os.path.join(directory, name)
        with open(path, "wb") as f:
            f.write(b"0123456789")
        os.chmod(path, mode)
        if caps:
            os.setxattr(path, CAPS_XATTR, CAPS_VALUE)
        return path

    def state(name: str, path: str) -> None:
        try:
            caps = os.getxattr(path, CAPS_XATTR) == CAPS_VALUE
        except OSError:
            caps = False
        st = os.stat(path)
        out.append(f"{name} {stat.S_IMODE(st.st_mode):o} size={st.st_size} caps={caps}")

    def rw_write(path):                  # through the page cache (read-write open)
        fd = os.open(path, os.O_RDWR)
        try:
            os.pwrite(fd, b"x", 3)
            os.pwrite(fd, b"y", 5)
        finally:
            os.close(fd)

    def open_trunc(path):
        os.close(os.open(path, os.O_WRONLY | os.O_TRUNC))

    for who, uid in (("user", 1000), ("root", 0)):
        for what, fn in (("write", rw_write), ("truncate", lambda p: os.truncate(p, 4)),
                         ("otrunc", open_trunc)):
            name = f"{what}-{who}"
            path = prepare(name, 0o6777, caps=True)
            if uid:
                res = as_user(uid, uid, fn, path)
                assert res is None, (name, res)
            else:
                fn(path)
            state(name, path)
    # a change of owner (by root): set-user-ID goes, set-group-ID too when the file
    # is group-executable, and the capabilities
    for name, mode in (("chown-gx", 0o6755), ("chown-nogx", 0o6745)):
        path = prepare(name, mode, caps=True)
        os.chown(path, 1000, 1000)
        state(name, path)
    # a chmod keeps the capabilities
    path = prepare("chmod", 0o755, caps=True)
    os.chmod(path, 0o750)
    state("chmod", path)
    return out
