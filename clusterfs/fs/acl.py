"""POSIX access control lists: the xattr format, its checks, and how an ACL and the
file mode follow each other.  Pure functions; ``posix.Filesystem`` stores the results.

With FUSE_CAP_POSIX_ACL the kernel enforces ACLs itself (it reads them through
getxattr and caches them), and leaves the rest to the file system (libfuse's
``fuse_common.h``): storing them, keeping the mode in step with the access ACL, and
inheriting a directory's default ACL on create.  These functions do that as Linux's
local file systems do (ext4, OCFS2, GFS2):

- an ACL is stored as the xattr ``system.posix_acl_access`` (access ACL) or
  ``system.posix_acl_default`` (default ACL, directories only), in the format below;
- setting an access ACL sets the mode's permission bits from it (``mode_of``); an
  access ACL that says no more than the mode (the three base entries alone) is not
  stored at all, only the mode (``equivalent``);
- chmod rewrites the owner, group-class and other entries of a stored access ACL
  (``chmod``);
- a node created in a directory with a default ACL gets an access ACL made from it,
  each class limited by the create mode, and the mode limited by it in turn; the
  umask is then not applied (``inherit``).  A new directory also gets the default ACL
  as its own.  Without a default ACL, the umask applies.

The xattr value (little-endian), as the kernel passes it (``posix_acl_xattr_header``
and ``posix_acl_xattr_entry`` in ``linux/posix_acl_xattr.h``)::

    u32 version (2)
    then one entry per ACL entry:  u16 tag, u16 perm (rwx = 4|2|1), u32 id

Tags, in the order the entries must come: USER_OBJ (the owner), USER (a named user,
by uid), GROUP_OBJ (the owning group), GROUP (a named group, by gid), MASK (the most
any named entry or GROUP_OBJ may grant), OTHER.  Entries without an id carry
``UNDEFINED_ID``.  An ACL is an ordered list of ``Entry``.
"""

from __future__ import annotations

import errno
import stat as S
import struct
from typing import NamedTuple

from ..errors import FSError

ACCESS = b"system.posix_acl_access"
DEFAULT = b"system.posix_acl_default"
NAMES = (ACCESS, DEFAULT)

VERSION = 2
UNDEFINED_ID = 0xFFFFFFFF

USER_OBJ = 0x01
USER = 0x02
GROUP_OBJ = 0x04
GROUP = 0x08
MASK = 0x10
OTHER = 0x20
TAGS = (USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER)    # in their required order
NAMED = (USER, GROUP)           # the tags whose entries carry an id

READ, WRITE, EXECUTE = 4, 2, 1
RWX = READ | WRITE | EXECUTE

_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")


class Entry(NamedTuple):
    """One ACL entry: ``tag`` (USER_OBJ ... OTHER), ``perm`` (0-7), ``id`` (a uid for
    USER, a gid for GROUP, else UNDEFINED_ID)."""

    tag: int
    perm: int
    id: int = UNDEFINED_ID


def _invalid(why: str) -> FSError:
    return FSError(errno.EINVAL, f"invalid POSIX ACL: {why}")


# -- the xattr value ------------------------------------------------------------------


def parse(value: bytes) -> list[Entry]:
    """The entries of an ACL xattr value, checked (``validate``).

    EINVAL for a value that is not version 2 or not a whole number of entries, or
    whose entries do not make a valid ACL.  A value of the header alone is the empty
    list: the Linux xattr interface reads it as "no ACL" (``is_removal``).
    The id of an entry that has none is read as UNDEFINED_ID whatever it holds (as
    Linux ignores it)."""
    value = bytes(value)
    if len(value) < _HEADER.size:
        raise _invalid("shorter than its header")
    (version,) = _HEADER.unpack_from(value)
    if version != VERSION:
        raise _invalid(f"version {version}, not {VERSION}")
    body = len(value) - _HEADER.size
    if body % _ENTRY.size:
        raise _invalid("not a whole number of entries")
    entries = []
    for off in range(_HEADER.size, len(value), _ENTRY.size):
        tag, perm, ident = _ENTRY.unpack_from(value, off)
        entries.append(Entry(tag, perm, ident if tag in NAMED else UNDEFINED_ID))
    if entries:
        validate(entries)
    return entries


def build(entries) -> bytes:
    """The xattr value of an ACL (entries in order; no check)."""
    out = bytearray(_HEADER.pack(VERSION))
    for e in entries:
        out += _ENTRY.pack(e.tag, e.perm, e.id if e.tag in NAMED else UNDEFINED_ID)
    return bytes(out)


def validate(entries) -> None:
    """Raise EINVAL unless ``entries`` make a valid ACL (as Linux's
    ``posix_acl_valid``): the tags in the order of ``TAGS``; exactly one USER_OBJ,
    GROUP_OBJ and OTHER; at most one MASK, which is required when there is a USER or
    GROUP entry; USER and GROUP entries in strictly increasing id order (so each id
    once), with a real id; permissions within rwx."""
    counts = dict.fromkeys(TAGS, 0)
    last_tag = 0
    last_id = -1
    for e in entries:
        if e.tag not in counts:
            raise _invalid(f"unknown tag {e.tag:#x}")
        if e.perm & ~RWX:
            raise _invalid(f"permission {e.perm:#x} beyond rwx")
        if e.tag < last_tag:
            raise _invalid("entries out of order")
        if e.tag != last_tag:
            last_id = -1
        if e.tag in NAMED:
            if e.id == UNDEFINED_ID:
                raise _invalid("named entry without an id")
            if e.id <= last_id:
                raise _invalid("named entries out of order, or repeated")
            last_id = e.id
        elif counts[e.tag]:
            raise _invalid(f"tag {e.tag:#x} more than once")
        counts[e.tag] += 1
        last_tag = e.tag
    for tag in (USER_OBJ, GROUP_OBJ, OTHER):
        if counts[tag] != 1:
            raise _invalid(f"no entry of tag {tag:#x}")
    if (counts[USER] or counts[GROUP]) and not counts[MASK]:
        raise _invalid("named entries without a mask")


def is_removal(entries) -> bool:
    """Whether a parsed value says "no ACL" (the header alone)."""
    return not entries


# -- the ACL and the mode ---------------------------------------------------------------


def _find(entries, tag: int) -> Entry | None:
    for e in entries:
        if e.tag == tag:
            return e
    return None


def _group_class_tag(entries) -> int:
    """The entry that the mode's group bits stand for: MASK if any, else GROUP_OBJ."""
    return MASK if _find(entries, MASK) is not None else GROUP_OBJ


def equivalent(entries) -> bool:
    """Whether an access ACL says no more than a mode does: the three base entries
    alone (USER_OBJ, GROUP_OBJ, OTHER), as Linux's ``posix_acl_equiv_mode`` (a MASK
    makes an ACL worth storing even without named entries: it keeps GROUP_OBJ apart
    from the group bits).  Such an ACL is not stored; the mode says it all."""
    return all(e.tag in (USER_OBJ, GROUP_OBJ, OTHER) for e in entries)


def mode_of(entries, mode: int) -> int:
    """``mode`` with its permission bits set from an access ACL: owner = USER_OBJ,
    group = MASK if present else GROUP_OBJ, other = OTHER.  The file type and the
    set-ID and sticky bits are kept."""
    owner = _find(entries, USER_OBJ).perm
    group = _find(entries, _group_class_tag(entries)).perm
    other = _find(entries, OTHER).perm
    return (mode & ~0o777) | owner << 6 | group << 3 | other


def chmod(entries, mode: int) -> list[Entry]:
    """A stored access ACL after chmod to ``mode``: USER_OBJ, the group class (MASK,
    or GROUP_OBJ without one) and OTHER take the mode's bits; named entries and (when
    there is a mask) GROUP_OBJ stay."""
    group_tag = _group_class_tag(entries)
    bits = {USER_OBJ: (mode >> 6) & RWX, group_tag: (mode >> 3) & RWX, OTHER: mode & RWX}
    return [e._replace(perm=bits[e.tag]) if e.tag in bits else e for e in entries]


def inherit(default: list[Entry] | None, mode: int, umask: int
            ) -> tuple[int, list[Entry] | None, list[Entry] | None]:
    """What a node created with ``mode`` (type and permission bits) gets in a
    directory whose default ACL is ``default`` (None: it has none), as Linux's
    ``posix_acl_create``.  Returns (mode, access ACL or None, default ACL or None).

    Without a default ACL: the mode less the umask, and no ACL.  With one, the umask
    does not apply; the new access ACL is the default ACL with its owner, group-class
    (MASK, or GROUP_OBJ without one) and other entries each limited to the create
    mode's bits for that class, and the mode's permission bits are those entries.
    The access ACL is stored only when it has entries beyond the three base ones
    (``equivalent``).  A directory also gets ``default`` as its default
    ACL.  Symbolic links get neither ACLs nor the umask: their mode is 0777."""
    if S.S_ISLNK(mode):
        return mode, None, None
    if default is None:
        return mode & ~(umask & 0o777), None, None
    group_tag = _group_class_tag(default)
    shift = {USER_OBJ: 6, group_tag: 3, OTHER: 0}
    access = [e._replace(perm=e.perm & (mode >> shift[e.tag]) & RWX) if e.tag in shift
              else e for e in default]
    mode = mode_of(access, mode)
    if equivalent(access):
        access = None
    return mode, access, list(default) if S.S_ISDIR(mode) else None


def permits(entries, mode: int, file_uid: int, file_gid: int, uid: int, gids,
            want: int) -> bool:
    """Whether a process of ``uid`` in the groups ``gids`` may access a file with
    the rwx bits ``want``, by its access ACL (``entries``; None or empty: by the
    mode), as Linux's ``posix_acl_permission`` (no privileges: the caller checks
    root first).  The owner gets USER_OBJ; a named user its entry within the mask;
    a member of the owning group or of named groups any of those entries that
    grants all of ``want``, within the mask (no such entry: denied); others OTHER."""
    if not entries:
        if uid == file_uid:
            bits = mode >> 6
        elif file_gid in gids:
            bits = mode >> 3
        else:
            bits = mode
        return bits & want & RWX == want
    mask_entry = _find(entries, MASK)
    mask = mask_entry.perm if mask_entry is not None else RWX
    if uid == file_uid:
        return _find(entries, USER_OBJ).perm & want == want
    for e in entries:
        if e.tag == USER and e.id == uid:
            return e.perm & mask & want == want
    member = False
    for e in entries:
        if (e.tag == GROUP_OBJ and file_gid in gids) or (e.tag == GROUP and e.id in gids):
            member = True
            if e.perm & mask & want == want:
                return True
    if member:
        return False
    return _find(entries, OTHER).perm & want == want


def to_text(entries) -> str:
    """The short text form (``u::rw-,u:1000:r--,g::r--,m::r--,o::---``), for logs and
    tests."""
    names = {USER_OBJ: "u", USER: "u", GROUP_OBJ: "g", GROUP: "g", MASK: "m", OTHER: "o"}
    out = []
    for e in entries:
        ident = str(e.id) if e.tag in NAMED else ""
        perm = "".join(c if e.perm & bit else "-" for c, bit in
                       (("r", READ), ("w", WRITE), ("x", EXECUTE)))
        out.append(f"{names[e.tag]}:{ident}:{perm}")
    return ",".join(out)
