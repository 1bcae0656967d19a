"""The wire format: framing, limits, and a fuzz test with random and mutated frames
(the server survives, drops only the offending connection, other clients carry on)."""

import logging
import random
import struct

import pytest
import trio
import trio.testing

from lockmgr import EX, PR, LockTable, wire
from lockmgr.errors import ProtocolError
from lockmgr.messages import F_TRY, Op
from tests.lockmgr.lockmgr_testutil import KEY, MemCluster, autojump


def test_frame_roundtrip_and_split_delivery():
    msgs = [[Op.LOCK, 1, b"name", 5, 0, None], [Op.HB, 3, 7], [Op.BYE]]
    data = b"".join(wire.frame(m) for m in msgs)
    dec = wire.FrameDecoder(1024)
    got = []
    for i in range(len(data)):          # one byte at a time
        got += dec.feed(data[i:i + 1])
    assert got == msgs


@pytest.mark.parametrize("data, why", [
    (struct.pack(">I", 70000) + b"x", "exceeds"),
    (struct.pack(">I", 1) + b"\xc1", "malformed msgpack"),
    (wire.frame({"op": 1}), "array"),
    (wire.frame([]), "array"),
    (wire.frame(["LOCK", 1]), "op code"),
])
def test_bad_frames_are_protocol_errors(data, why):
    with pytest.raises(ProtocolError, match=why):
        wire.FrameDecoder(65536).feed(data)


def test_parse_addr():
    assert wire.parse_addr("127.0.0.1:80") == ("tcp", "127.0.0.1", 80)
    assert wire.parse_addr("[::1]:80") == ("tcp", "::1", 80)
    assert wire.parse_addr("unix:/run/x.sock") == ("unix", "/run/x.sock")
    for bad in ("nohost", "host:port", "unix:", "h:99999"):
        with pytest.raises(ValueError):
            wire.parse_addr(bad)


# ---- fuzz ------------------------------------------------------------------------------

CORPUS = [
    [Op.OPEN, "fz", 9, 5.0, None, None, None],
    [Op.LOCK, 1, b"f1", EX, 0, None],
    [Op.LOCK, 2, b"f2", PR, F_TRY, 0.5],
    [Op.CONVERT, 3, b"f1", PR, 0, None, b"v" * 32],
    [Op.UNLOCK, 4, b"f1", None],
    [Op.CANCEL, 2, b"f2"],
    [Op.HB, 1, 0],
    [Op.RECOVERED, 5, 9],
    [Op.STATUS, 6],
    [Op.BYE],
]


def mutate(rnd: random.Random, msg: list) -> bytes:
    choice = rnd.randrange(8)
    msg = list(msg)
    if choice == 0 and len(msg) > 1:          # a field of the wrong type
        i = rnd.randrange(1, len(msg))
        msg[i] = rnd.choice([None, -1, 2**64 - 1, -2**63, "str", b"\xff" * 40, [1, 2],
                             {"a": 1}, 1.5, True, b""])
    elif choice == 1:                         # missing or extra fields
        msg = msg[:rnd.randrange(len(msg) + 1)] + [0] * rnd.randrange(3)
    elif choice == 2:                         # unknown op
        msg[0] = rnd.choice([0, 11, 63, 64, 69, 200, -5, 2**40])
    elif choice == 3:                         # a mode out of range
        if len(msg) > 3:
            msg[3] = rnd.choice([6, -1, 255])
    data = bytearray(wire.frame(msg))
    if choice == 4:                           # flip bits
        for _ in range(rnd.randrange(1, 4)):
            i = rnd.randrange(len(data))
            data[i] ^= 1 << rnd.randrange(8)
    elif choice == 5:                         # truncate (connection then closes)
        data = data[:rnd.randrange(len(data))]
    elif choice == 6:                         # a huge length prefix
        data[0:4] = struct.pack(">I", rnd.choice([65537, 2**31, 2**32 - 1]))
    return bytes(data)


async def authenticate(stream) -> None:
    dec = wire.FrameDecoder(1 << 20)
    msgs = []
    while not msgs:
        msgs = dec.feed(await stream.receive_some(65536))
    nonce_s = msgs[0][2]
    nonce_c = wire.new_nonce()
    await stream.send_all(wire.frame([Op.AUTH, nonce_c,
                                      wire.client_mac(KEY, nonce_s, nonce_c)]))


async def drain(stream) -> None:
    with trio.move_on_after(2):
        try:
            while await stream.receive_some(65536):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


@pytest.mark.parametrize("seed", [1, 2, 3])
@autojump
async def test_fuzz_random_and_mutated_frames(seed, caplog):
    caplog.set_level(logging.ERROR, "lockmgr.server")
    rnd = random.Random(seed)
    async with trio.open_nursery() as n:
        c = MemCluster(n, grace=0, lease=5.0)
        server = await c.start_server()
        a = await c.client("a", 0)
        b = await c.client("b", 1)
        handed = 0

        async def on_blocking(name, mode):
            await a.unlock(name)

        for i in range(60):
            raw = await c.raw()
            try:
                if rnd.random() < 0.3:
                    # random bytes, before authentication
                    await raw.send_all(bytes(rnd.randrange(256)
                                             for _ in range(rnd.randrange(1, 200))))
                else:
                    await authenticate(raw)
                    for _ in range(rnd.randrange(1, 6)):
                        msg = rnd.choice(CORPUS)
                        if rnd.random() < 0.5:
                            await raw.send_all(wire.frame(msg))
                        else:
                            await raw.send_all(mutate(rnd, msg))
                await raw.send_eof() if hasattr(raw, "send_eof") else None
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            await drain(raw)
            await raw.aclose()
            # the real clients are unaffected
            await a.lock(b"shared", EX, on_blocking=on_blocking)
            g = await b.lock(b"shared", PR)
            assert g.mode == PR
            await b.unlock(b"shared")
            handed += 1
        assert handed == 60
        server.table.check()
        assert "Traceback" not in caplog.text and not [
            r for r in caplog.records if r.levelno >= logging.ERROR]
        st = await a.status()
        assert {nd["node"] for nd in st["nodes"]} >= {"a", "b"}
        n.cancel_scope.cancel()


@autojump
async def test_frame_limit_drops_only_that_connection(caplog):
    caplog.set_level(logging.WARNING, "lockmgr.server")
    async with trio.open_nursery() as n:
        c = MemCluster(n, grace=0, max_frame=1024)
        await c.start_server()
        a = await c.client("a", 0)
        raw = await c.raw()
        await authenticate(raw)
        await raw.send_all(wire.frame([Op.STATUS, b"x" * 2000]))
        await drain(raw)
        assert "exceeds the 1024 limit" in caplog.text
        assert (await a.lock(b"r", EX)).mode == EX
        n.cancel_scope.cancel()


def test_table_survives_garbage_names():
    t = LockTable()
    for name in (b"", b"\x00" * 1024, bytes(range(256))):
        t.request("a", name, EX, 1)
        t.unlock("a", name)
    t.check()
