"""journal: one write-ahead metadata journal per node slot (JBD2-style physical REDO log).

A library with no knowledge of FUSE or of the file-system format: it logs whole
4096-byte block images, replays committed transactions after a crash, and tells a
torn tail (dropped) from corruption in the middle of the log (refused).  The on-disk
format is described in ``docs/JOURNAL-FORMAT.md``.

Modules:
    format  constants, field tables and block codecs (matches the format document)
    log     the ``Journal``: writing, checkpointing, scanning and replay
    errors  ``JournalCorrupt``, ``JournalError``, ``JournalAborted``
"""

from .errors import JournalAborted, JournalCorrupt, JournalError
from .format import FORMAT_VERSION, MIN_LENGTH, JournalHeader
from .log import Journal, ReplayReport, TornTail

__all__ = [
    "FORMAT_VERSION", "MIN_LENGTH", "Journal", "JournalAborted", "JournalCorrupt",
    "JournalError", "JournalHeader", "ReplayReport", "TornTail",
]
