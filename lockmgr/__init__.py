"""lockmgr: the clusterfs distributed lock manager (server, client, lock table).

A library of its own: trio + msgpack, no FUSE and no file-system import.

========================  ===========================================================
module                    job
========================  ===========================================================
``lockmgr.modes``         lock modes, the compatibility matrix, mode lattice helpers
``lockmgr.table``         ``LockTable``: the pure lock state machine (no I/O)
``lockmgr.server``        ``LockServer``: sessions, leases, recovery, grace, listeners
``lockmgr.client``        ``LockClient``: a node's locks, grants, callbacks, plocks
``lockmgr.link``          its session with the server: connect, resume, lease, reader
``lockmgr.handshake``     a new connection's first messages; ``query_status``
``lockmgr.messages``      ``Op``: every message's code and fields, encoders, decoders
``lockmgr.wire``          framing, HMAC-SHA256 proofs, addresses, the socket channel
``lockmgr.election``      ``DeltaLease``: the master's election by a lease on shared storage
``lockmgr.keyfile``       ``keygen`` / ``load_key``
``lockmgr.errors``        the exceptions
========================  ===========================================================

Protocol and semantics: docs/LOCKS.md.
"""

from .client import Grant, LockClient
from .election import FREE, DeltaLease, LeaseRecord, LeaseStore, LeaseTimings
from .errors import (AuthError, ConnectError, Deadlock, LeaseLost, LockCancelled, LockError,
                     LockTimeout, NodeBusy, NotRecovered, ProtocolError, TryAgain)
from .handshake import query_status
from .keyfile import KeyFileError, keygen, load_key
from .modes import (COMPAT, CR, CW, EX, NL, PR, PW, Mode, compatible, covers, downgrade_for,
                    supremum)
from .server import LockServer
from .table import LVB_SIZE, LockTable

__all__ = [
    "LockClient", "Grant", "query_status", "LockServer", "LockTable", "LVB_SIZE",
    "Mode", "NL", "CR", "CW", "PR", "PW", "EX", "COMPAT", "compatible", "covers",
    "supremum", "downgrade_for",
    "LockError", "TryAgain", "NotRecovered", "LockTimeout", "Deadlock", "LockCancelled",
    "LeaseLost", "AuthError", "ProtocolError", "NodeBusy", "ConnectError",
    "keygen", "load_key", "KeyFileError",
    "DeltaLease", "LeaseRecord", "LeaseStore", "LeaseTimings", "FREE",
]
