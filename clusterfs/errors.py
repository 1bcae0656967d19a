"""Exceptions shared by the clusterfs packages.

Everything below the FUSE layer raises these (or ``OSError``); the FUSE layer turns
them into ``pyfuse3.FUSEError`` and the CLI turns ``QuietError`` into one line on
stderr and an exit code.
"""

import errno


class QuietError(Exception):
    """A user-facing failure: printed as one line, no traceback.

    Args:
        message: the line to print.
        exitcode: the process exit status.
    """

    def __init__(self, message: str, exitcode: int = 1):
        super().__init__(message)
        self.exitcode = exitcode


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


class Fenced(FSError):
    """The node lost its lease: every write to the volume is refused."""

    def __init__(self, message: str = "node is fenced: lease lost, volume writes stopped"):
        super().__init__(errno.EIO, message)


class FormatMismatch(QuietError):
    """The volume has another format revision or is not a clusterfs volume."""

    def __init__(self, message: str):
        super().__init__(message, exitcode=8)
