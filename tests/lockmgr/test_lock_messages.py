"""The message definitions: every encoder gives the very bytes the positional arrays of
protocol 1 gave (older peers read them), every decoder gives back what was encoded and
refuses anything else with a ProtocolError, and handlers must take a message's fields."""

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lockmgr import CR, EX, PR, wire
from lockmgr.errors import ProtocolError
from lockmgr.messages import (FIELDS, F_FLOCK, F_NOTIFY, F_TRY, Held, Op, Reclaim,
                              Recovering, Resume, dispatch_table, handles)

NONCE = b"n" * 32
LVB = b"v" * 32

#: per message: its fields by name, and the array protocol 1 puts on the wire for them
SAMPLES = {
    Op.AUTH: ({"nonce_c": NONCE, "mac": b"m" * 32}, [1, NONCE, b"m" * 32]),
    Op.OPEN: ({"node": "a", "slot": 3, "lease": 5.0,
               "resume": Resume(boot_id=b"b" * 8, session=4, received=9),
               "reclaim": [Reclaim(name=b"r", mode=EX, lvb=LVB, lvb_ver=2)],
               "recovering": [Recovering(node="x", slot=1)],
               "plocks": [Held(name=b"P", owner=(1 << 64) - 1, ltype=1, start=0,
                               end=(1 << 63) - 1, pid=77)]},
              [2, "a", 3, 5.0, [b"b" * 8, 4, 9], [[b"r", 5, LVB, 2]], [["x", 1]],
               [[b"P", (1 << 64) - 1, 1, 0, (1 << 63) - 1, 77]]]),
    Op.LOCK: ({"rid": 7, "name": b"r", "mode": PR, "flags": F_TRY | F_NOTIFY,
               "timeout": 0.5}, [3, 7, b"r", 3, 3, 0.5]),
    Op.CONVERT: ({"rid": 8, "name": b"r", "mode": CR, "flags": 0, "timeout": None,
                  "lvb": LVB}, [4, 8, b"r", 1, 0, None, LVB]),
    Op.UNLOCK: ({"rid": 9, "name": b"r", "lvb": None}, [5, 9, b"r", None]),
    Op.CANCEL: ({"rid": 7, "name": b"r"}, [6, 7, b"r"]),
    Op.HB: ({"hb_id": 12, "received": 30}, [7, 12, 30]),
    Op.RECOVERED: ({"rid": 10, "slot": 4}, [8, 10, 4]),
    Op.STATUS: ({"rid": 11, "prefix": b"i/"}, [9, 11, b"i/"]),
    Op.BYE: ({}, [10]),
    Op.PLOCK: ({"rid": 12, "name": b"P", "owner": 5, "ltype": 0, "start": 10, "end": 19,
                "pid": 4242, "flags": F_TRY | F_FLOCK},
               [11, 12, b"P", 5, 0, 10, 19, 4242, 5]),
    Op.PGET: ({"rid": 13, "name": b"P", "owner": 5, "ltype": 1, "start": 0, "end": 9},
              [12, 13, b"P", 5, 1, 0, 9]),
    Op.PUNLOCK: ({"rid": 14, "name": b"P", "owner": 5, "start": 0, "end": (1 << 63) - 1},
                 [13, 14, b"P", 5, 0, (1 << 63) - 1]),
    Op.CHALLENGE: ({"version": 1, "nonce_s": NONCE, "boot_id": b"b" * 8},
                   [64, 1, NONCE, b"b" * 8]),
    Op.AUTH_OK: ({"mac": b"m" * 32}, [65, b"m" * 32]),
    Op.AUTH_FAIL: ({"text": "wrong key"}, [66, "wrong key"]),
    Op.OPENED: ({"state": "reclaimed", "session": 4, "boot_id": b"b" * 8, "lease": 5.0,
                 "last_rid": 0, "refused": [b"r"], "grace_left": 2.5},
                [67, "reclaimed", 4, b"b" * 8, 5.0, 0, [b"r"], 2.5]),
    Op.REFUSED: ({"code": "busy", "text": "slot 3 is in use"},
                 [68, "busy", "slot 3 is in use"]),
    Op.GRANT: ({"rid": 7, "mode": EX, "lvb": None, "lvb_ver": 0}, [69, 7, 5, None, 0]),
    Op.FAIL: ({"rid": 7, "code": "tryagain", "text": ""}, [70, 7, "tryagain", ""]),
    Op.BAST: ({"name": b"r", "mode": PR}, [71, b"r", 3]),
    Op.NODE_DOWN: ({"node": "a", "slot": 3}, [72, "a", 3]),
    Op.NODE_RECOVERED: ({"slot": 3}, [73, 3]),
    Op.HB_ACK: ({"hb_id": 12, "last_rid": 9}, [74, 12, 9]),
    Op.REPLY: ({"rid": 11, "value": {"nodes": []}}, [75, 11, {"nodes": []}]),
    Op.ERROR: ({"text": "session expired"}, [76, "session expired"]),
}


def received(data: bytes) -> list:
    (msg,) = wire.FrameDecoder(1 << 20).feed(data)
    return msg


def test_every_message_has_a_sample():
    assert set(SAMPLES) == set(Op)


@pytest.mark.parametrize("op", list(Op), ids=lambda op: op.name)
def test_encode_gives_protocol_1_bytes_and_decode_gives_the_fields_back(op):
    fields, array = SAMPLES[op]
    data = op.encode(**fields)
    assert data == wire.frame(array)
    assert op.decode(received(data)) == tuple(fields.values())
    assert op.parse(received(data))._asdict() == fields


def test_pinned_bytes():
    """Independent of msgpack's packer: GRANT and an OPEN that reclaims, byte by byte."""
    assert Op.GRANT.encode(rid=7, mode=EX, lvb=None, lvb_ver=0) == \
        bytes.fromhex("00000006" "95" "45" "07" "05" "c0" "00")
    assert msgpack.packb(Resume(b"", 1, 2)) == bytes.fromhex("93" "c400" "01" "02")


def test_optional_field_left_out():
    assert Op.STATUS.encode(rid=1) == wire.frame([9, 1])
    assert Op.STATUS.decode([9, 1]) == (1, None)


@pytest.mark.parametrize("msg, why", [
    ([69, 7, 5, None], "3 fields, want 4"),
    ([69, 7, 5, None, 0, 0], "5 fields, want 4"),
    ([69, 7, 6, None, 0], "mode is 6"),
    ([69, 7, True, None, 0], "mode is True"),
    ([69, "7", 5, None, 0], "rid is '7'"),
    ([69, 7, 5, b"short", 0], "lvb is b'short'"),
    ([3, 1, b"x" * 1025, 5, 0, None], "name is"),
    ([3, 1, b"r", 5, 0, "soon"], "timeout is 'soon'"),
    ([9, 1, b"p", 0], "3 fields, want 1 to 2"),
    ([9, 1, "p"], "prefix is 'p'"),
    ([2, "a", 0, 5.0, [b"b", 1], None, None], "resume is"),
    ([2, "a", 0, 5.0, None, [[b"r", 9, None, 0]], None], "reclaim is"),
    ([2, "a", 0, 5.0, None, None, [["x", "1"]]], "recovering is"),
    ([1, b"short", b"m"], "nonce_c is"),
])
def test_malformed_messages_are_protocol_errors(msg, why):
    with pytest.raises(ProtocolError, match=f"malformed {Op(msg[0]).name}: {why}"):
        Op(msg[0]).decode(msg)


_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats()
    | st.text(max_size=8) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=12)


@settings(max_examples=400, deadline=None)
@given(op=st.sampled_from(list(Op)), values=st.lists(_VALUES, max_size=8))
def test_decode_returns_or_raises_protocol_error(op, values):
    msg = received(wire.frame([int(op), *values]))
    try:
        out = op.decode(msg)
    except ProtocolError:
        return
    assert len(out) == len(op.fields)


def test_every_field_has_a_kind():
    assert {f for op in Op for f in op.fields} == FIELDS.keys()


def test_a_handler_must_take_the_fields_in_order():
    with pytest.raises(TypeError, match="cannot handle GRANT"):
        @handles(Op.GRANT, "self")
        def on_grant(self, rid, lvb, mode, lvb_ver):
            pass

    class Side:
        @handles(Op.BAST, "self")
        def on_bast(self, name, mode):
            return name, mode

        @handles(Op.OPENED, "self", "t")
        def opened(self, t, state, session, boot_id, lease, last_rid, refused,
                   grace_left):
            pass

    table = dispatch_table(Side, "self")
    assert set(table) == {Op.BAST}
    decode, fn, numbered = table[Op.BAST]
    assert numbered and fn(None, *decode([71, b"r", 3])) == (b"r", PR)
