"""What fsck keeps of each inode (``Rec``), and the columns of a directory's records."""

from __future__ import annotations

from operator import itemgetter

from clusterfs.ondisk.format import DF_DIRTREE, Dinode

_FIRST, _SECOND, _THIRD = itemgetter(0), itemgetter(1), itemgetter(2)


class Rec:
    """What fsck knows about one dinode that it keeps.

    Most inodes need nothing but their dinode: the list fields start as the empty
    tuple (a list is made on first use: ``own_lists``), so that a scan of 100,000
    inodes does not build 100,000 sets of empty lists.  Slots keep a record small and
    in one piece: every pass over the inodes reads one or two fields of each, and
    the time that takes is mostly the memory it touches.
    """

    __slots__ = ("di", "notes", "items", "nodes", "deferred", "tree_issues", "ext_issues",
                 "tree_bad", "ext", "xattr_ok", "dirty", "reached", "where")

    def __init__(self, di: Dinode, notes):
        self.di = di
        self.notes = notes      # salvage notes (damage found in the dinode block)
        self.items = ()         # tree records (key, value) in key order (for a file of
                                # one extent that the scan settles at once, only ext)
        self.nodes = ()         # tree node blocks (valid, in this tree)
        self.deferred = ()      # damaged node / xattr blocks to free
        self.tree_issues = ()   # (kind, message) found in the trees
        self.ext_issues = ()    # messages about extent records
        self.tree_bad = False   # the tree must be rebuilt from ``items``
        self.ext = None         # extent files: final [lblk, pblk, n, flags] list
        self.xattr_ok = True
        self.dirty = False      # the dinode must be written
        self.reached = False
        self.where = None       # (parent dir, name) of the entry it was reached by

    def own_lists(self) -> "Rec":
        """Make the list fields this record's own before appending to them."""
        for name in ("nodes", "deferred", "tree_issues", "ext_issues"):
            if type(getattr(self, name)) is tuple:
                setattr(self, name, list(getattr(self, name)))
        return self


def dir_recs(s) -> list[Rec]:
    """The records of directory trees (``DF_DIRTREE``) of run ``s``, in inode order."""
    get = s.inodes.get
    return [r for r in map(get, sorted(s.dir_inos))
            if r is not None and r.di.flags & DF_DIRTREE]


def entry_columns(items) -> tuple[list, list, list, list]:
    """(keys, inode numbers, types, names) of a directory's records, each a list.

    The namespace passes look at a whole directory at once through these (built-in
    functions over lists), and at one record at a time only where that finds
    something to say: on 100,000 entries that is most of their time saved.
    """
    vals = list(map(_SECOND, items))
    return (list(map(_FIRST, items)), list(map(_FIRST, vals)), list(map(_SECOND, vals)),
            list(map(_THIRD, vals)))


def entry_inos(items) -> list[int]:
    """The inode numbers a directory's records point at, in record order."""
    return list(map(_FIRST, map(_SECOND, items)))
