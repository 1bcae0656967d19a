"""Exceptions raised by the journal library."""

from __future__ import annotations

from clusterfs.errors import CorruptBlock


class JournalCorrupt(CorruptBlock):
    """The journal header is bad, or the log is corrupt in the middle.

    A torn tail (a transaction that never committed) is not corruption: replay drops
    it and reports it.  This is raised when a transaction that must have committed
    (because a later one did) cannot be read, or when the header cannot be trusted;
    mounting must be refused.  ``bno`` names the offending block.
    """


class JournalError(Exception):
    """The journal cannot do this in its current state (not open, needs replay, ...)."""


class JournalAborted(JournalError):
    """An earlier device error stopped the journal; nothing more is written.

    The on-disk journal is still consistent: replay it (after remounting) to recover
    the last committed transaction.  ``cause`` is the original exception.
    """

    def __init__(self, cause: BaseException):
        self.cause = cause
        super().__init__(f"journal aborted after a device error: {cause!r}")
