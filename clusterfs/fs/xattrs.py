"""Extended attributes and POSIX ACLs of inodes.

Part of ``posix.Filesystem`` (mixed into it): getxattr, listxattr, setxattr and
removexattr, with the POSIX ACLs (``system.posix_acl_access`` and ``_default``) checked
and kept in step with the mode.  The ACL rules are ``acl.py``'s; the attribute blocks
``inode.py``'s.
"""

from __future__ import annotations

import errno
import logging
import stat as S
import time

from ..errors import FSError
from ..ondisk.format import Dinode
from . import acl, inode

log = logging.getLogger(__name__)


class Xattrs:
    """Extended attributes and ACLs (``posix.Filesystem`` inherits these methods)."""

    # -- extended attributes ---------------------------------------------------------------

    def getxattr(self, ino: int, name: bytes) -> bytes:
        di = self.inode(ino)
        value = inode.xattr_get(self.vol, di, name)
        if value is None:
            raise FSError(errno.ENODATA, "no such attribute")
        return value

    def listxattr(self, ino: int) -> list[bytes]:
        di = self.inode(ino)
        return [k for k, _ in inode.xattr_items(self.vol, di)]

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
                inode.xattr_set(self.vol, di, name, value)
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
            if not inode.xattr_set(self.vol, di, name, None):
                if name in acl.NAMES:
                    return
                raise FSError(errno.ENODATA, "no such attribute")
            self.vol.touch(di)
            di.ctime = time.time_ns()
        self._change(change)

    # -- POSIX ACLs (the logic is acl.py's) ------------------------------------------------

    def _acl(self, di: Dinode, name: bytes) -> list[acl.Entry] | None:
        """The stored ACL ``name`` of ``di`` (None: none)."""
        value = inode.xattr_get(self.vol, di, name)
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
                inode.xattr_set(self.vol, di, name, None)
                return
        inode.xattr_set(self.vol, di, name, acl.build(entries))

    def _chmod_acl(self, di: Dinode) -> None:
        """After a mode change (inside its operation): the stored access ACL, if
        any, takes the new owner, group-class and other bits."""
        entries = self._acl(di, acl.ACCESS)
        if entries is not None:
            inode.xattr_set(self.vol, di, acl.ACCESS,
                            acl.build(acl.chmod(entries, di.mode)))
