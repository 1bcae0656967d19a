"""A client's first messages on a new connection: the protocol version, the proof of the
shared key both ways, and one request (OPEN; or STATUS, without a session).

``LockClient`` (to open or resume its session) and ``query_status`` (the status query
of ``clusterfs lockd-status``) both go through ``exchange``; the server's half is
``LockServer._authenticate``.  See docs/LOCKS.md §3.
"""

import hmac
from collections import deque
from contextlib import contextmanager
from typing import NamedTuple

import trio

from . import wire
from .errors import AuthError, ConnectError, ProtocolError
from .messages import Op

#: the largest frame a client accepts (a status reply may list every lock)
CLIENT_MAX_FRAME = 64 << 20


class Answer(NamedTuple):
    """The server's answer to the first request, and what the connection goes on with."""

    msg: list                     #: the answer
    sent_at: float                #: trio time just before the request was sent
    decoder: wire.FrameDecoder    #: cuts what follows on the connection
    leftover: list                #: messages after the answer, already received


@contextmanager
def connection_errors(addr: str, timeout: float):
    """Run the block within ``timeout`` seconds; a timeout or a lost connection in it
    becomes a ``ConnectError``."""
    try:
        with trio.fail_after(timeout):
            yield
    except trio.TooSlowError:
        raise ConnectError(f"lock server at {addr} did not answer") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
        raise ConnectError(f"lock server at {addr}: {e}") from None


async def exchange(stream, key: bytes, addr: str, request: bytes) -> Answer:
    """Authenticate on the new connection ``stream``, send ``request``, return the answer.

    Args:
        stream: a connected trio stream to the lock server at ``addr``.
        key: the shared secret.
        request: the first request's frame.

    Raises:
        ConnectError: the connection closed.
        AuthError: the server refused the key, or could not prove that it has it.
        ProtocolError: not a lock server, another protocol version, a malformed message.
    """
    decoder = wire.FrameDecoder(CLIENT_MAX_FRAME)
    queue: deque = deque()

    async def receive() -> list:
        while not queue:
            try:
                data = await stream.receive_some(65536)
            except (trio.BrokenResourceError, OSError) as e:
                raise ConnectError(f"lock server at {addr} closed the connection: "
                                   f"{e}") from None
            if not data:
                raise ConnectError(f"lock server at {addr} closed the connection")
            queue.extend(decoder.feed(data))
        return queue.popleft()

    msg = await receive()
    if msg[0] != Op.CHALLENGE or len(msg) < 4:
        raise ProtocolError(f"{addr} is not a lock server")
    if msg[1] != wire.PROTOCOL_VERSION:
        raise ProtocolError(f"lock server speaks protocol {msg[1]}, "
                            f"not {wire.PROTOCOL_VERSION}")
    nonce_s = Op.CHALLENGE.parse(msg).nonce_s
    nonce_c = wire.new_nonce()
    await stream.send_all(Op.AUTH.encode(nonce_c=nonce_c,
                                         mac=wire.client_mac(key, nonce_s, nonce_c)))
    msg = await receive()
    if msg[0] == Op.AUTH_FAIL:
        raise AuthError(f"lock server at {addr} refused the key "
                        f"({Op.AUTH_FAIL.parse(msg).text})")
    if msg[0] != Op.AUTH_OK or not hmac.compare_digest(
            Op.AUTH_OK.parse(msg).mac, wire.server_mac(key, nonce_s, nonce_c)):
        raise AuthError(f"lock server at {addr} failed to prove the shared key")
    sent_at = trio.current_time()
    await stream.send_all(request)
    msg = await receive()
    return Answer(msg, sent_at, decoder, list(queue))


async def query_status(addr: str, key: bytes, *, timeout: float = 10.0,
                       prefix: bytes | None = None) -> dict:
    """Authenticate and ask the server for its status without opening a session;
    with ``prefix`` the answer lists the granted locks whose names start with it
    (``held``: name, node, slot, mode, dead).

    Raises:
        ConnectError, AuthError, ProtocolError.
    """
    stream = await wire.open_stream(addr)
    try:
        with connection_errors(addr, timeout):
            answer = await exchange(stream, key, addr, Op.STATUS.encode(rid=1,
                                                                        prefix=prefix))
            if answer.msg[0] != Op.REPLY:
                raise ProtocolError(f"unexpected answer {answer.msg[0]} to STATUS")
            await stream.send_all(Op.BYE.encode())
            return Op.REPLY.parse(answer.msg).value
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()
