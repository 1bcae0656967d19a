"""Extended attributes and POSIX ACLs of inodes.

Their storage: inside the dinode while they fit, the rest in one xattr block of the
inode's (``xattr_items``, ``xattr_get``, ``xattr_set``, ``free_xattr_block``).  And
the requests, part of ``posix.Filesystem`` (``Xattrs`` is mixed into it): getxattr,
listxattr, setxattr and removexattr, with the POSIX ACLs (``system.posix_acl_access``
and ``_default``) checked and kept in step with the mode.  The ACL rules are
``acl.py``'s.
"""

from __future__ import annotations

import errno
import logging
import stat as S
import time

from ..errors import CorruptBlock, FSError
from ..ondisk.format import (XATTR_BLOCK_SIZE, XATTR_INLINE_SIZE, Dinode, XattrBlock,
                             xattr_size)
from . import acl

log = logging.getLogger(__name__)

XATTR_NAME_MAX = 255
# file capabilities: a write, a truncation or a change of owner removes them
CAPS_XATTR = b"security.capability"
XATTR_VALUE_MAX = XATTR_BLOCK_SIZE - 3 - 1


def xattr_items(vol, di: Dinode) -> list[tuple[bytes, bytes]]:
    items = list(di.xattrs)
    if di.xattr_block:
        xb = vol.xattr_block(di.xattr_block)
        if xb.owner != di.bno:
            raise CorruptBlock(xb.bno, f"xattr block of inode {xb.owner} in inode {di.bno}")
        items.extend(xb.items)
    return items


def xattr_get(vol, di: Dinode, name: bytes) -> bytes | None:
    for k, v in di.xattrs:
        if k == name:
            return v
    if di.xattr_block:
        for k, v in xattr_items(vol, di)[len(di.xattrs):]:
            if k == name:
                return v
    return None


def has_caps(vol, di: Dinode) -> bool:
    """Whether the inode has file capabilities (``security.capability``)."""
    return bool(di.xattrs or di.xattr_block) and xattr_get(vol, di, CAPS_XATTR) is not None


def xattr_set(vol, di: Dinode, name: bytes, value: bytes | None) -> bool:
    """Set (or, with value None, remove) an attribute.  Returns whether it existed."""
    if not name or len(name) > XATTR_NAME_MAX:
        raise FSError(errno.ERANGE, "xattr name length")
    if value is not None and len(value) > XATTR_VALUE_MAX:
        raise FSError(errno.ENOSPC, "xattr value too large for this file system")
    items = xattr_items(vol, di)
    existed = any(k == name for k, _ in items)
    items = [(k, v) for k, v in items if k != name]
    if value is not None:
        items.append((name, value))
    elif not existed:
        return False
    inline, over = [], []
    used = 0
    for k, v in items:
        sz = xattr_size(k, v)
        if not over and used + sz <= XATTR_INLINE_SIZE:
            inline.append((k, v))
            used += sz
        else:
            over.append((k, v))
    if sum(xattr_size(k, v) for k, v in over) > XATTR_BLOCK_SIZE:
        raise FSError(errno.ENOSPC, "no room for more extended attributes")
    vol.touch(di)
    di.xattrs = inline
    if over:
        if di.xattr_block:
            xb = vol.xattr_block(di.xattr_block)
            vol.touch(xb)
            xb.items = over
        else:
            bno = vol.alloc.alloc_meta(di.bno)
            xb = XattrBlock(bno, di.bno, over)
            vol.created(xb)
            di.xattr_block = bno
            di.blocks += 1
    elif di.xattr_block:
        xb = vol.xattr_block(di.xattr_block)
        vol.free_meta(xb)
        di.xattr_block = 0
        di.blocks -= 1
    return existed


def free_xattr_block(vol, di: Dinode) -> None:
    if di.xattr_block:
        try:
            xb = vol.xattr_block(di.xattr_block)
        except CorruptBlock:
            # free the block anyway: the inode is going away
            vol.alloc.free(di.xattr_block, 1, data=False)
        else:
            vol.free_meta(xb)
        vol.touch(di)
        di.xattr_block = 0
        di.blocks -= 1


class Xattrs:
    """Extended attributes and ACLs (``posix.Filesystem`` inherits these methods)."""

    # -- extended attributes ---------------------------------------------------------------

    def getxattr(self, ino: int, name: bytes) -> bytes:
        di = self.inode(ino)
        value = xattr_get(self.vol, di, name)
        if value is None:
            raise FSError(errno.ENODATA, "no such attribute")
        return value

    def listxattr(self, ino: int) -> list[bytes]:
        di = self.inode(ino)
        return [k for k, _ in xattr_items(self.vol, di)]

    def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        """Set an attribute; the POSIX ACLs (``acl.NAMES``) are checked first and
        kept in step with the mode (``_set_acl``)."""
        di = self.inode(ino)
        if name in acl.NAMES:
            entries = acl.parse(value)
            if acl.is_removal(entries):
                self.removexattr(ino, name)
                return
            self._check_acl_target(di, name)

        def change():
            if name in acl.NAMES:
                self._set_acl(di, name, entries)
            else:
                xattr_set(self.vol, di, name, value)
            self.vol.touch(di)
            di.ctime = time.time_ns()
        self._change(change)

    def removexattr(self, ino: int, name: bytes) -> None:
        """Remove an attribute (ENODATA when there is none).  Removing a POSIX ACL
        leaves the mode as it is, and removing one that is not there succeeds and
        changes nothing (as on ext4, where this is setting "no ACL")."""
        di = self.inode(ino)
        if name in acl.NAMES:
            self._check_acl_target(di, name, removing=True)

        def change():
            if not xattr_set(self.vol, di, name, None):
                if name in acl.NAMES:
                    return
                raise FSError(errno.ENODATA, "no such attribute")
            self.vol.touch(di)
            di.ctime = time.time_ns()
        self._change(change)

    # -- POSIX ACLs (the logic is acl.py's) ------------------------------------------------

    def _acl(self, di: Dinode, name: bytes) -> list[acl.Entry] | None:
        """The stored ACL ``name`` of ``di`` (None: none)."""
        value = xattr_get(self.vol, di, name)
        if value is None:
            return None
        try:
            entries = acl.parse(value)
        except FSError:
            log.error("inode %d: invalid %s stored", di.bno, name.decode())
            raise FSError(errno.EIO, f"inode {di.bno}: invalid {name.decode()}") from None
        return entries or None

    @staticmethod
    def _check_acl_target(di: Dinode, name: bytes, removing: bool = False) -> None:
        """Whether ``di`` can have the ACL ``name``: not a symbolic link (EOPNOTSUPP);
        a default ACL only on a directory (EACCES, as Linux's ``set_posix_acl``,
        where removing one from a non-directory is no error)."""
        if S.S_ISLNK(di.mode):
            raise FSError(errno.EOPNOTSUPP, "no ACLs on symbolic links")
        if name == acl.DEFAULT and not S.S_ISDIR(di.mode) and not removing:
            raise FSError(errno.EACCES, "a default ACL only on a directory")

    def _set_acl(self, di: Dinode, name: bytes, entries: list[acl.Entry]) -> None:
        """Store a checked ACL (inside an operation).  An access ACL sets the mode's
        permission bits, and is not stored when the mode says it all
        (``acl.equivalent``)."""
        if name == acl.ACCESS:
            self.vol.touch(di)
            di.mode = acl.mode_of(entries, di.mode)
            if acl.equivalent(entries):
                xattr_set(self.vol, di, name, None)
                return
        xattr_set(self.vol, di, name, acl.build(entries))

    def _chmod_acl(self, di: Dinode) -> None:
        """After a mode change (inside its operation): the stored access ACL, if
        any, takes the new owner, group-class and other bits."""
        entries = self._acl(di, acl.ACCESS)
        if entries is not None:
            xattr_set(self.vol, di, acl.ACCESS,
                            acl.build(acl.chmod(entries, di.mode)))
