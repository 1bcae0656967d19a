"""Exceptions raised by the lock manager library.

All of them derive from ``LockError``.  The wire protocol carries a short code for the
ones a server can return (see ``CODES``).
"""


class LockError(Exception):
    """A lock operation failed (base class)."""

    code = "error"


class TryAgain(LockError):
    """A try-lock could not be granted at once."""

    code = "tryagain"


class NotRecovered(TryAgain):
    """A try-lock is blocked by a dead node's lock that waits for recovery."""

    code = "notrecovered"


class LockTimeout(LockError):
    """The request was not granted within its timeout."""

    code = "timeout"


class Deadlock(LockError):
    """The request was chosen to break a cycle in the wait-for graph."""

    code = "deadlock"


class LockCancelled(LockError):
    """The request was cancelled (by an unlock of the same lock, or by the client)."""

    code = "cancelled"


class LeaseLost(LockError):
    """The session was lost: the server declared this node dead, or a restarted server
    could not take the node's locks back.  The locks held before are gone."""

    code = "leaselost"


class AuthError(LockError):
    """Authentication failed (wrong key, or the peer is not a lock server)."""

    code = "auth"


class ProtocolError(LockError):
    """The peer broke the wire protocol; the connection is dropped."""

    code = "protocol"


class NodeBusy(LockError):
    """The node name or slot already belongs to a live session."""

    code = "busy"


class ConnectError(LockError):
    """The lock server could not be reached."""

    code = "connect"


CODES: dict[str, type[LockError]] = {
    cls.code: cls for cls in (LockError, TryAgain, NotRecovered, LockTimeout, Deadlock,
                              LockCancelled, LeaseLost, AuthError, ProtocolError, NodeBusy)
}


def from_code(code: str, message: str = "") -> LockError:
    """The exception for a wire error code (unknown codes give ``LockError``)."""
    return CODES.get(code, LockError)(message or code)
