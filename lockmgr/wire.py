"""The wire: framing, the handshake's HMACs, addresses, the socket channel.

A frame is a 4-byte big-endian payload length followed by one msgpack array whose
first item is the operation code; the messages themselves are defined in
``lockmgr.messages``.  docs/LOCKS.md §3 is the protocol.
"""

import hashlib
import hmac
import os
import struct

import msgpack
import trio

from .errors import ConnectError, ProtocolError

PROTOCOL_VERSION = 1
NONCE_SIZE = 32
KEY_MIN = 16

_LEN = struct.Struct(">I")
_pack = msgpack.Packer(use_bin_type=True).pack


def frame(msg) -> bytes:
    """Encode one message as a frame."""
    body = _pack(msg)
    return _LEN.pack(len(body)) + body


class FrameDecoder:
    """Cut a byte stream into messages.

    Args:
        max_frame: the largest payload accepted; a longer one is a ProtocolError.
    """

    def __init__(self, max_frame: int):
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data) -> list:
        """Add received bytes; return the complete messages they finish.

        Raises:
            ProtocolError: oversized frame, malformed msgpack, or not an array that
                starts with an integer operation code.
        """
        buf = self._buf
        buf += data
        msgs = []
        pos = 0
        end = len(buf)
        unpack_len = _LEN.unpack_from
        while end - pos >= 4:
            (ln,) = unpack_len(buf, pos)
            if ln > self.max_frame:
                raise ProtocolError(f"frame of {ln} bytes exceeds the {self.max_frame} "
                                    "limit")
            if end - pos - 4 < ln:
                break
            try:
                msg = msgpack.unpackb(buf[pos + 4:pos + 4 + ln], raw=False,
                                      strict_map_key=True)
            except Exception as e:
                raise ProtocolError(f"malformed msgpack: {e.__class__.__name__}") from None
            if type(msg) is not list or not msg or type(msg[0]) is not int:
                raise ProtocolError("a message must be an array starting with an op code")
            msgs.append(msg)
            pos += 4 + ln
        if pos:
            del buf[:pos]
        return msgs


def client_mac(key: bytes, nonce_s: bytes, nonce_c: bytes) -> bytes:
    return hmac.new(key, b"clusterfs-lockmgr client\0" + nonce_s + nonce_c,
                    hashlib.sha256).digest()


def server_mac(key: bytes, nonce_s: bytes, nonce_c: bytes) -> bytes:
    return hmac.new(key, b"clusterfs-lockmgr server\0" + nonce_c + nonce_s,
                    hashlib.sha256).digest()


def new_nonce() -> bytes:
    return os.urandom(NONCE_SIZE)


def parse_addr(addr: str) -> tuple[str, str | int]:
    """``"host:port"`` -> ("tcp", host, port); ``"unix:/path"`` -> ("unix", path).

    Raises:
        ValueError: not an address.
    """
    if addr.startswith("unix:"):
        path = addr[5:]
        if not path:
            raise ValueError(f"bad address {addr!r}: empty socket path")
        return ("unix", path)
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"bad address {addr!r}: want HOST:PORT or unix:PATH")
    host = host.strip("[]") or "127.0.0.1"
    return ("tcp", host, int(port))


async def open_stream(addr: str) -> trio.abc.Stream:
    """Connect to ``addr`` (TCP, with TCP_NODELAY, or a Unix socket).

    Raises:
        ConnectError: the server cannot be reached.
    """
    kind = parse_addr(addr)
    try:
        if kind[0] == "unix":
            return await trio.open_unix_socket(kind[1])
        return await trio.open_tcp_stream(kind[1], kind[2])
    except OSError as e:
        raise ConnectError(f"cannot reach lock server at {addr}: "
                           f"{e.strerror or e}") from None


class Channel:
    """A byte channel over a trio stream, with a synchronous ``send``.

    For sockets it reads and writes the file descriptor directly: a write goes out at
    once from the calling task when the socket takes it (the writer task only sends
    what the kernel did not take), and a read waits for readability without the extra
    scheduling pass of ``SocketStream``.  That keeps the round trip of a lock request
    to one wake-up on each side.  Other streams (in-memory ones in tests) go through
    ``send_all`` / ``receive_some`` in the writer task.
    """

    __slots__ = ("stream", "fd", "buf", "wake", "closed", "error")

    def __init__(self, stream):
        self.stream = stream
        sock = getattr(stream, "socket", None)
        self.fd = sock.fileno() if sock is not None else None
        self.buf = bytearray()
        self.wake = trio.Event()
        self.closed = False
        self.error: BaseException | None = None

    def send(self, data: bytes) -> None:
        """Send ``data`` now (with whatever ``send_later`` queued before it); what the
        kernel does not take is left to the writer task.  Never blocks."""
        if self.closed:
            return
        buf = self.buf
        if self.fd is None:
            buf += data
            self.wake.set()
            return
        if buf:
            buf += data
            data = buf
        try:
            n = os.write(self.fd, data)
        except BlockingIOError:
            n = 0
        except OSError as e:
            self.error = e
            self.closed = True
            self.wake.set()
            return
        if data is buf:
            del buf[:n]
            if buf:
                self.wake.set()
        elif n < len(data):
            buf += data[n:]
            self.wake.set()

    def send_later(self, data: bytes) -> None:
        """Queue ``data`` for the writer task, so that what follows in the same
        scheduling pass goes out with it in one write (one wake-up of the peer)."""
        if not self.closed:
            self.buf += data
            self.wake.set()

    def pending(self) -> int:
        """Bytes queued and not yet handed to the kernel."""
        return len(self.buf)

    async def receive_some(self) -> bytes:
        """The next bytes from the peer; b"" at end of stream."""
        fd = self.fd
        if fd is None:
            return await self.stream.receive_some(65536)
        try:
            data = os.read(fd, 262144)
        except BlockingIOError:
            while True:
                await trio.lowlevel.wait_readable(fd)
                try:
                    return os.read(fd, 262144)
                except BlockingIOError:
                    pass
        await trio.lowlevel.checkpoint()    # stay fair when data keeps coming
        return data

    async def writer(self) -> None:
        """Send what ``send`` queued until closed (then flush and return).

        Raises:
            trio.BrokenResourceError: the peer went away.
        """
        fd = self.fd
        while True:
            if self.error is not None:
                raise trio.BrokenResourceError(str(self.error))
            buf = self.buf
            if buf:
                if fd is None:
                    data = bytes(buf)
                    buf.clear()
                    await self.stream.send_all(data)
                else:
                    try:
                        n = os.write(fd, buf)
                    except BlockingIOError:
                        n = 0
                    except OSError as e:
                        raise trio.BrokenResourceError(str(e)) from None
                    del buf[:n]
                    if buf:
                        await trio.lowlevel.wait_writable(fd)
                continue
            if self.closed:
                return
            await self.wake.wait()
            self.wake = trio.Event()

    def close(self) -> None:
        """Stop accepting data; the writer returns once the queue is sent."""
        self.closed = True
        self.wake.set()
