"""Exceptions shared by the clusterfs packages.

Everything below the FUSE layer raises these (or ``OSError``).  Two families:

- ``FSError`` carries an errno: the FUSE layer turns it into the reply of one request
  (``CorruptBlock`` and ``Fenced`` are EIO).
- ``ClusterfsError`` is a failure to tell the user in one line (what is wrong, what to
  do): a volume that cannot be opened or is in use, a bad argument, a mount the kernel
  refused.  Library code raises the subclass that says which; the command line
  (``clusterfs.cli.exit_status``) alone turns the class into an exit status.
"""

import errno


class ClusterfsError(Exception):
    """A failure the user reads as one line, no traceback (exit status 1 unless a
    subclass says otherwise in ``clusterfs.cli``)."""


class UsageError(ClusterfsError):
    """A bad argument, option or value on the command line."""


class VolumeError(ClusterfsError):
    """The volume cannot be used as asked: the device cannot be opened, its superblock
    is damaged or describes more blocks than the device has, a journal is corrupt or
    needs replay first."""


class FormatMismatch(VolumeError):
    """The volume has another format revision or is not a clusterfs volume."""



class NoSpace(ClusterfsError):
    """The volume has no room for what was asked (e.g. ``add-slots``: not enough
    contiguous free space); nothing was changed."""


class VolumeBusy(ClusterfsError):
    """Another live mount has the volume (or the slot asked for); no slot is free."""


class ClusterUnreachable(ClusterfsError):
    """The cluster cannot be joined: the lock manager is out of reach or refused us."""


class AuthRefused(ClusterfsError):
    """A lock manager refused our key (``lockd-status``)."""


class MountFailed(ClusterfsError):
    """The kernel refused the FUSE mount."""


def run_surfacing(fn, *args):
    """``trio.run(fn, *args)``, with a user-facing error that a nursery wrapped in an
    exception group raised as itself (the first one, when there are several)."""
    import trio
    try:
        return trio.run(fn, *args)
    except BaseExceptionGroup as group:  # noqa: F821 (3.11 builtin)
        user = group.subgroup(lambda e: isinstance(e, ClusterfsError))
        if user is None:
            raise
        first = user
        while isinstance(first, BaseExceptionGroup):  # noqa: F821
            first = first.exceptions[0]
        raise first from None


class FSError(OSError):
    """A file-system level error carrying an errno (ENOENT, ENOSPC, ...)."""

    def __init__(self, err: int, message: str = ""):
        super().__init__(err, message or errno.errorcode.get(err, str(err)))


class CorruptBlock(FSError):
    """A metadata block failed validation (magic, type, own block number or crc32c).

    Raised as EIO to applications; the message names the block.
    """

    def __init__(self, bno: int, reason: str):
        self.bno = bno
        self.reason = reason
        super().__init__(errno.EIO, f"corrupt metadata block {bno}: {reason}")


class WrongBlockType(CorruptBlock):
    """The block holds no metadata block of the type expected: never written (all
    zeros), no magic, or a block of another type.  Where a block number may be stale
    (an inode number whose file was removed and its block reused) this means "not
    that object any more" rather than damage."""


class Fenced(FSError):
    """The node lost its lease: every write to the volume is refused."""

    def __init__(self, message: str = "node is fenced: lease lost, volume writes stopped"):
        super().__init__(errno.EIO, message)
