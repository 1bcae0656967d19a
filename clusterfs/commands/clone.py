"""``clusterfs clone SRC DST``: a reflink clone of a file (a VM image) in one step.

SRC and DST must lie on one mounted clusterfs volume (single-node or cluster mount).
The command creates DST and asks the mount to copy SRC into it with
copy_file_range(2), which the file system answers by sharing SRC's blocks (no data is
copied; later writes to either file copy the blocks they change, see
docs/FORMAT.md, "Shared blocks and refcount trees").  Holes stay holes.  DST is made
durable (fsync) before the command returns; a DST the command created is removed
again when the clone fails.
"""

from __future__ import annotations

import errno
import os
import stat as S

from ..errors import ClusterfsError, UsageError

FSTYPE = "fuse.clusterfs"


class CloneFailed(ClusterfsError):
    """The clone could not be made (the reason from the file system)."""


def register(sub) -> None:
    p = sub.add_parser(
        "clone", help="clone a file on a mounted volume (shared blocks, copy-on-write)",
        description="Clone SRC as DST on one mounted clusterfs volume: DST shares SRC's "
                    "blocks (copy-on-write), so a clone of a VM image of any size takes "
                    "a fraction of a second and no space until either file changes.")
    p.add_argument("src", metavar="SRC", help="the file to clone")
    p.add_argument("dst", metavar="DST",
                   help="the new file (a directory: SRC's name inside it)")
    p.add_argument("-f", "--force", action="store_true",
                   help="replace DST when it exists (else the clone is refused)")
    p.set_defaults(func=run)


def mount_of(path: str) -> tuple[str, str] | None:
    """(mount point, file-system type) of the mount that holds ``path``, from the
    device number of ``path`` and /proc/self/mountinfo; None if not found."""
    dev = os.stat(path).st_dev
    want = f"{os.major(dev)}:{os.minor(dev)}"
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.readlines()
    except OSError:
        return None
    found = None
    for line in lines:
        fields = line.split()
        if len(fields) < 10 or fields[2] != want:
            continue
        sep = fields.index("-", 6)
        point = fields[4].encode().decode("unicode_escape")
        found = (point, fields[sep + 1])
    return found


def _target(src: str, dst: str) -> str:
    if os.path.isdir(dst):
        return os.path.join(dst, os.path.basename(os.path.normpath(src)))
    return dst


def run(args) -> int:
    src, dst = args.src, _target(args.src, args.dst)
    try:
        st = os.stat(src)
    except OSError as e:
        raise UsageError(f"{src}: {e.strerror}") from None
    if not S.S_ISREG(st.st_mode):
        raise UsageError(f"{src}: not a regular file")
    where = os.path.dirname(os.path.abspath(dst)) or "."
    if not os.path.isdir(where):
        raise UsageError(f"{dst}: no such directory {where}")
    src_mount = mount_of(src)
    if src_mount is None or src_mount[1] != FSTYPE:
        raise UsageError(f"{src} is not on a clusterfs mount")
    if os.stat(where).st_dev != st.st_dev:
        raise UsageError(f"{src} and {dst} are not on the same clusterfs mount "
                         f"({src_mount[0]}): a clone shares blocks within one volume")
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | \
        (os.O_TRUNC if args.force else os.O_EXCL)
    fd_in = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            existed = os.path.lexists(dst)
            fd_out = os.open(dst, flags, S.S_IMODE(st.st_mode))
        except FileExistsError:
            raise UsageError(f"{dst} exists (--force replaces it)") from None
        except OSError as e:
            raise CloneFailed(f"cannot create {dst}: {e.strerror}") from None
        try:
            _clone(fd_in, fd_out, os.fstat(fd_in).st_size, src, dst)
            os.fsync(fd_out)
        except BaseException:
            os.close(fd_out)
            if not existed:
                try:
                    os.unlink(dst)
                except OSError:
                    pass
            raise
        os.close(fd_out)
    finally:
        os.close(fd_in)
    return 0


def _clone(fd_in: int, fd_out: int, size: int, src: str, dst: str) -> None:
    done = 0
    while done < size:
        try:
            n = os.copy_file_range(fd_in, fd_out, size - done, done, done)
        except OSError as e:
            if e.errno in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise CloneFailed(f"the mount of {src} cannot clone ({e.strerror}): "
                                  f"is it an older clusterfs?") from None
            raise CloneFailed(f"{src} -> {dst}: {e.strerror}") from None
        if n == 0:
            break           # the source shrank meanwhile
        done += n
