"""What every cached metadata object shares: ``MetaObject``, a blank block, clones.

The structure classes (``rgrp``, ``dinode``, ``tree``, ``xattr``) derive from
``MetaObject``: one object per block, whose ``image()`` gives the sealed 4096 bytes.
"""

from __future__ import annotations

from .blockhdr import BLOCK_SIZE


def _blank() -> bytearray:
    return bytearray(BLOCK_SIZE)


class MetaObject:
    """Base of the cached metadata objects: one per block, ``image()`` seals it."""

    __slots__ = ("bno", "seq")

    def clone(self):
        raise NotImplementedError

    def restore(self, snap) -> None:
        _copier(type(self))(snap, self)

    @classmethod
    def _state_slots(cls):
        out = []
        for k in cls.__mro__:
            out.extend(getattr(k, "__slots__", ()))
        return out


_COPIERS: dict = {}


def _copier(cls):
    """A function ``copy(src, dst)`` assigning every slot of ``cls``, made once per
    class (objects are cloned at every metadata change, for rollback: a generic
    getattr/setattr loop was a measurable share of each request)."""
    fn = _COPIERS.get(cls)
    if fn is None:
        body = "".join(f"    dst.{k} = src.{k}\n" for k in cls._state_slots())
        ns: dict = {}
        exec(f"def copy(src, dst):\n{body or '    pass'}\n", ns)
        fn = _COPIERS[cls] = ns["copy"]
    return fn
