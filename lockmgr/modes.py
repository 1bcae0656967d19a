"""Lock modes and the standard DLM compatibility matrix.

The six modes form a lattice, weakest first::

    NL < CR < CW < PW < EX      NL < CR < PR < PW < EX      (CW and PR are not ordered)

``COMPAT[a][b]`` is true when a lock granted in mode ``a`` may coexist with one in
mode ``b`` held by another owner.  See ``docs/LOCKS.md``.
"""

from enum import IntEnum


class Mode(IntEnum):
    """A DLM lock mode."""

    NL = 0  #: null: holds a place, reads nothing (keeps the value block alive)
    CR = 1  #: concurrent read
    CW = 2  #: concurrent write
    PR = 3  #: protected read (shared)
    PW = 4  #: protected write (one writer, readers in CR)
    EX = 5  #: exclusive


NL, CR, CW, PR, PW, EX = Mode.NL, Mode.CR, Mode.CW, Mode.PR, Mode.PW, Mode.EX

#: COMPAT[held][requested]
COMPAT: tuple[tuple[bool, ...], ...] = (
    #      NL     CR     CW     PR     PW     EX
    (True, True, True, True, True, True),        # NL
    (True, True, True, True, True, False),       # CR
    (True, True, True, False, False, False),     # CW
    (True, True, False, True, False, False),     # PR
    (True, True, False, False, False, False),    # PW
    (True, False, False, False, False, False),   # EX
)

#: bit mask of the modes compatible with each mode (bit m set: compatible with m)
COMPAT_MASK: tuple[int, ...] = tuple(
    sum(1 << b for b in range(6) if COMPAT[a][b]) for a in range(6))

#: modes that write the value block when they are given up or down-converted
LVB_WRITERS = frozenset((PW, EX))


#: the modes by number (``MODES[3] is PR``), faster than ``Mode(3)``
MODES: tuple[Mode, ...] = tuple(Mode)


def compatible(a: int, b: int) -> bool:
    """Whether locks in modes ``a`` and ``b`` held by two owners may coexist."""
    return COMPAT[a][b]


def covers(held: int, wanted: int) -> bool:
    """Whether holding ``held`` gives at least the rights of ``wanted``.

    True when ``held`` is ``wanted`` or above it in the lattice, i.e. when every mode
    compatible with ``held`` is also compatible with ``wanted``.
    """
    mh, mw = COMPAT_MASK[held], COMPAT_MASK[wanted]
    return mh & mw == mh


def supremum(a: int, b: int) -> Mode:
    """The weakest mode that covers both ``a`` and ``b`` (CW and PR give PW)."""
    for m in Mode:
        if covers(m, a) and covers(m, b):
            return m
    raise AssertionError("EX covers everything")


def downgrade_for(held: int, requested: int) -> Mode:
    """The strongest mode at or below ``held`` that lets another owner have ``requested``.

    What a holder that got a blocking callback for ``requested`` should convert to
    (``NL`` means: give the lock up, or keep only a placeholder).
    """
    best = NL
    for m in Mode:
        if covers(held, m) and COMPAT[m][requested] and covers(m, best):
            best = m
    return best

