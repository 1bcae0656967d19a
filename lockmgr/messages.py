"""The lock protocol's messages, each defined once: its code and its fields.

A message is one msgpack array, ``[code, field, ...]`` (``wire`` frames it).  Two
tables define them all:

* ``FIELDS``: what each field name holds (a name means the same in every message);
* ``Op``: every message's code and field names in wire order (``prefix?``: optional,
  last), and whether it is *numbered* (a session's stream, replayed after a
  reconnection).

From them each message gets ``Op.X.encode(field=..., ...)`` (its frame) and
``Op.X.decode(msg)`` (its fields as a tuple in wire order, modes as ``Mode``; a
malformed message is a ``ProtocolError``, which drops that peer only).  ``handles``
binds a handler to a message: its parameters must be the message's field names, checked
at import, so that a received message reaches its handler as one tuple unpack
(``dispatch_table``); code that reads a field or two of a message uses
``Op.X.parse(msg)``, the same fields as a named tuple.  docs/LOCKS.md §3 holds the same
tables (tests/lockmgr/test_locks_doc.py compares them).
"""

import inspect
from collections import namedtuple
from enum import IntEnum
from typing import Callable, NamedTuple

from .errors import ProtocolError
from .modes import MODES
from .table import LVB_SIZE
from .wire import NONCE_SIZE, frame

#: the longest resource name
MAX_NAME = 1024

# LOCK / CONVERT flags
F_TRY = 1
F_NOTIFY = 2    # a failed try-lock still sends the holders in its way a BAST
# PLOCK flags (F_TRY: do not wait)
F_FLOCK = 4     # a flock(2) lock: whole file, no deadlock detection (as Linux)


#: what the generated code sees (the record types add themselves)
_NAMESPACE = {"frame": frame, "MODES": MODES}


class Kind(NamedTuple):
    """What a field may hold."""

    what: str              #: as docs/LOCKS.md writes it
    test: str              #: a Python expression over ``{v}``, true when well-formed
    convert: str = "{v}"   #: the value handed on (``{v}``: as received)


def _or_nil(k: Kind) -> Kind:
    convert = (k.convert if k.convert == "{v}"
               else f"(None if {{v}} is None else {k.convert})")
    return Kind(f"{k.what} or nil", f"({{v}} is None or {k.test})", convert)


def _list_of(k: Kind) -> Kind:
    convert = ("{v}" if k.convert == "{v}"
               else f"[{k.convert.replace('{v}', '_x')} for _x in {{v}}]")
    return Kind(f"[{k.what}, ...]",
                f"(type({{v}}) is list and all({k.test.replace('{v}', '_x')} "
                f"for _x in {{v}}))", convert)


def _record(t: type) -> Kind:
    """An array of named fields inside a message, handed on as the named tuple ``t``."""
    at = [(FIELDS[n], f"{{v}}[{i}]") for i, n in enumerate(t._fields)]
    _NAMESPACE[t.__name__] = t
    return Kind(f"[{', '.join(t._fields)}]",
                f"(type({{v}}) is list and len({{v}}) == {len(at)} and "
                f"{' and '.join(k.test.replace('{v}', v) for k, v in at)})",
                f"{t.__name__}({', '.join(k.convert.replace('{v}', v) for k, v in at)})")


_INT = Kind("int", "type({v}) is int")
_STR = Kind("str", "type({v}) is str")
_BYTES = Kind("bytes", "type({v}) is bytes")
_SECONDS = Kind("seconds", "(type({v}) is float or type({v}) is int)")
_NONCE = Kind(f"{NONCE_SIZE} bytes",
              f"(type({{v}}) is bytes and len({{v}}) == {NONCE_SIZE})")

FIELDS: dict[str, Kind] = {
    "rid": _INT, "hb_id": _INT, "received": _INT, "last_rid": _INT, "session": _INT,
    "slot": _INT, "flags": _INT, "lvb_ver": _INT, "version": _INT,
    "node": _STR, "state": _STR, "code": _STR, "text": _STR,
    "boot_id": _BYTES, "mac": _BYTES, "prefix": _BYTES,
    "nonce_c": _NONCE, "nonce_s": _NONCE,
    "name": Kind(f"bytes (at most {MAX_NAME})",
                 f"(type({{v}}) is bytes and len({{v}}) <= {MAX_NAME})"),
    "mode": Kind("mode (0-5)", "(type({v}) is int and 0 <= {v} <= 5)", "MODES[{v}]"),
    "lvb": _or_nil(Kind(f"{LVB_SIZE} bytes",
                        f"(type({{v}}) is bytes and len({{v}}) == {LVB_SIZE})")),
    "lease": _SECONDS, "grace_left": _SECONDS, "timeout": _or_nil(_SECONDS),
    "value": Kind("any", "True"),
    "owner": Kind("int (0 to 2^64-1)", "(type({v}) is int and 0 <= {v} < 1 << 64)"),
    "ltype": Kind("0 or 1", "(type({v}) is int and 0 <= {v} <= 1)"),
    "start": Kind("int (0 to 2^63-1)", "(type({v}) is int and 0 <= {v} < 1 << 63)"),
    "end": Kind("int (0 to 2^63-1)", "(type({v}) is int and 0 <= {v} < 1 << 63)"),
    "pid": _INT,
}
FIELDS["refused"] = _list_of(FIELDS["name"])

#: the records inside OPEN (msgpack sends a named tuple as an array)
Resume = namedtuple("Resume", "boot_id session received")
Reclaim = namedtuple("Reclaim", "name mode lvb lvb_ver")
Recovering = namedtuple("Recovering", "node slot")
Held = namedtuple("Held", "name owner ltype start end pid")

FIELDS["resume"] = _or_nil(_record(Resume))
FIELDS["reclaim"] = _or_nil(_list_of(_record(Reclaim)))
FIELDS["recovering"] = _or_nil(_list_of(_record(Recovering)))
FIELDS["plocks"] = _or_nil(_list_of(_record(Held)))


class Op(IntEnum):
    """The messages: ``Op.X`` is X's code (an int on the wire).

    Attributes:
        fields: its field names, in wire order.
        optional: how many of the last fields may be left out.
        numbered: part of a session's numbered stream (server -> client).
        encode: ``encode(field=..., ...) -> bytes``, the frame (optional fields left
            out when None).
        decode: ``decode(msg) -> tuple`` of the fields of a received array, checked.
        parse: ``parse(msg)``: the same as a named tuple (``.rid``, ...).
    """

    fields: tuple[str, ...]
    optional: int
    numbered: bool
    encode: Callable[..., bytes]
    decode: Callable[[list], tuple]
    parse: Callable[[list], tuple]

    def __new__(cls, code: int, fields: str, numbered: bool = False):
        op = int.__new__(cls, code)
        op._value_ = code
        spec = fields.split()
        op.fields = tuple(f.rstrip("?") for f in spec)
        op.optional = sum(f.endswith("?") for f in spec)
        op.numbered = numbered
        return op

    # client -> server
    AUTH = 1, "nonce_c mac"
    OPEN = 2, "node slot lease resume reclaim recovering plocks?"
    LOCK = 3, "rid name mode flags timeout"
    CONVERT = 4, "rid name mode flags timeout lvb"
    UNLOCK = 5, "rid name lvb"
    CANCEL = 6, "rid name"
    HB = 7, "hb_id received"
    RECOVERED = 8, "rid slot"
    STATUS = 9, "rid prefix?"
    BYE = 10, ""
    PLOCK = 11, "rid name owner ltype start end pid flags"
    PGET = 12, "rid name owner ltype start end"
    PUNLOCK = 13, "rid name owner start end"

    # server -> client
    CHALLENGE = 64, "version nonce_s boot_id"
    AUTH_OK = 65, "mac"
    AUTH_FAIL = 66, "text"
    OPENED = 67, "state session boot_id lease last_rid refused grace_left"
    REFUSED = 68, "code text"
    GRANT = 69, "rid mode lvb lvb_ver", True
    FAIL = 70, "rid code text", True
    BAST = 71, "name mode", True
    NODE_DOWN = 72, "node slot", True
    NODE_RECOVERED = 73, "slot", True
    HB_ACK = 74, "hb_id last_rid"
    REPLY = 75, "rid value", True
    ERROR = 76, "text"


# ---- generated encoders and decoders --------------------------------------------------

def _compile(src: str, name: str, env: dict) -> Callable:
    ns = dict(_NAMESPACE, **env)
    exec(compile(src, f"<lockmgr.messages {name}>", "exec"), ns)
    return ns[name]


def _encoder(op: Op) -> Callable[..., bytes]:
    n = len(op.fields)
    params = [f if i < n - op.optional else f"{f}=None" for i, f in enumerate(op.fields)]
    items = ", ".join([str(int(op)), *op.fields])
    body = f"    return frame([{items}])\n"
    if op.optional:
        body = (f"    msg = [{items}]\n"
                f"    while len(msg) > {1 + n - op.optional} and msg[-1] is None:\n"
                f"        msg.pop()\n"
                f"    return frame(msg)\n")
    fn = _compile(f"def encode({', '.join(params)}):\n{body}", "encode", {})
    fn.__qualname__ = f"Op.{op.name}.encode"
    fn.__doc__ = f"The frame of {op.name}: [{int(op)}, {', '.join(op.fields)}]."
    return fn


def _decoder(op: Op) -> Callable[[list], tuple]:
    n = len(op.fields)
    lines = ["def decode(msg):"]
    if op.optional:
        lines += [f"    if {1 + n - op.optional} <= len(msg) < {1 + n}:",
                  f"        msg = msg + [None] * ({1 + n} - len(msg))"]
    tests = []
    for i, f in enumerate(op.fields):
        test = FIELDS[f].test.format(v=f)
        if i >= n - op.optional:
            test = f"({f} is None or {test})"
        if test != "True":
            tests.append(test)
    out = "".join(FIELDS[f].convert.format(v=f) + ", " for f in op.fields)
    lines += [f"    if len(msg) == {1 + n}:",
              f"        {''.join(f + ', ' for f in ('_', *op.fields))}= msg"]
    if tests:
        lines += [f"        if {' and '.join(tests)}:",
                  f"            return ({out})"]
    else:
        lines += [f"        return ({out})"]
    lines += ["    raise _malformed(OP, msg)"]
    fn = _compile("\n".join(lines) + "\n", "decode", {"OP": op, "_malformed": _malformed})
    fn.__qualname__ = f"Op.{op.name}.decode"
    fn.__doc__ = f"The fields of a received {op.name}, checked (ProtocolError if not)."
    return fn


_CHECK = {f: _compile(f"def check(v):\n    return {k.test.format(v='v')}\n", "check", {})
          for f, k in FIELDS.items()}


def _malformed(op: Op, msg: list) -> ProtocolError:
    """The error that says what is wrong with ``msg`` (which ``op.decode`` refused)."""
    n = len(op.fields)
    if not 1 + n - op.optional <= len(msg) <= 1 + n:
        want = n if not op.optional else f"{n - op.optional} to {n}"
        return ProtocolError(f"malformed {op.name}: {len(msg) - 1} fields, want {want}")
    for f, v in zip(op.fields, msg[1:]):
        if not _CHECK[f](v):
            shown = repr(v)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            return ProtocolError(f"malformed {op.name}: {f} is {shown}, "
                                 f"want {FIELDS[f].what}")
    return ProtocolError(f"malformed {op.name}")


def _parser(op: Op) -> Callable[[list], tuple]:
    make = namedtuple(op.name, op.fields)._make
    decode = op.decode

    def parse(msg: list) -> tuple:
        return make(decode(msg))
    parse.__qualname__ = f"Op.{op.name}.parse"
    parse.__doc__ = f"The fields of a received {op.name} by name, checked."
    return parse


for _op in Op:
    _op.encode = _encoder(_op)
    _op.decode = _decoder(_op)
    _op.parse = _parser(_op)
del _op


# ---- handlers ---------------------------------------------------------------------------

def handles(op: Op, *before: str):
    """Decorator: the function handles ``op`` messages.

    Its parameters must be ``before`` (e.g. ``self``, context the caller passes) and
    then ``op``'s fields in wire order; this is checked here, once, so that
    ``fn(*before_values, *op.decode(msg))`` binds every field to its name.

    Raises:
        TypeError: the parameters are not those.
    """
    want = (*before, *op.fields)

    def mark(fn):
        got = tuple(inspect.signature(fn).parameters)
        if got != want:
            raise TypeError(f"{fn.__qualname__}{got} cannot handle {op.name}: "
                            f"want the parameters {want}")
        fn.handles = (op, before)
        return fn
    return mark


def dispatch_table(cls: type, *before: str) -> dict[int, tuple]:
    """The handlers ``cls`` defines with ``@handles(op, *before)``, by code:
    ``{code: (op.decode, handler, op.numbered)}``.

    Raises:
        TypeError: two handlers for one message.
    """
    table: dict[int, tuple] = {}
    for fn in vars(cls).values():
        mark = getattr(fn, "handles", None)
        if mark is None or mark[1] != before:
            continue
        op = mark[0]
        if op in table:
            raise TypeError(f"{cls.__name__}: two handlers for {op.name}")
        table[int(op)] = (op.decode, fn, op.numbered)
    return table
