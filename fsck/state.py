"""What the passes of one fsck run share: every piece of it is declared here.

A pass reads what earlier passes found and adds what it finds, all through one
``State``; nothing else carries data from one pass to the next.  Its ``__init__``
declares every field, in the order the layers fill them; a pass adds none.
"""

from __future__ import annotations

from clusterfs.ondisk.format import Bitmap, Heartbeat, RgrpHeader, Superblock

from .records import Rec
from .report import Report


class State:
    """One fsck run: what it was asked, the devices, and what each layer found.

    Args:
        path, mode, report, force, scan_data, live_watch, hold_slot, given_dev: the
            run as asked (see ``Fsck``).
    """

    def __init__(self, path: str, mode: str, report: Report, *, force: bool = False,
                 scan_data: bool = False, live_watch: float | None = None,
                 hold_slot: bool = True, given_dev=None):
        # -- the run, as asked -------------------------------------------------------
        self.path = path                # image file or block device
        self.mode = mode                # "n", "y", "p" or "ask"
        self.report = report            # findings, answers to repair questions, progress
        self.force = force              # check even a clean volume
        self.scan_data = scan_data      # run layer 6
        self.live_watch = live_watch    # seconds to watch heartbeats (None: 2.5 beats)
        self.hold_slot = hold_slot      # keep a heartbeat in a free slot while repairing
        self.given_dev = given_dev      # a device given by the caller (left open)

        # -- devices and what the run holds ------------------------------------------
        self.real = None                # the device as opened (repairs write to it)
        self.dev = None                 # what reads go through: an overlay under -n
        self.lockfd = -1                # the host-local lock of the volume (repairs)
        self.host_busy = False          # that lock is held by a mount on this host
        self.heart = None               # (writer, device, stop, thread) of fsck's slot
        self.modified = False           # something was written to the volume
        self.clean_skip = False         # a clean volume: the layers after 2 are skipped
        self.stats: dict = {}           # counts for the summaries and the JSON report

        # -- layer 1: volume ---------------------------------------------------------
        self.sb: Superblock | None = None   # the superblock in use (repairs change it)
        self.write_primary = False      # rewrite the primary superblock at the end
        self.write_backup = False       # rewrite the backup superblock at the end
        self.grow_sb: Superblock | None = None  # the primary, when it records an
        #                                         unfinished grow (``sb``: the grown one)
        self.grow_fix = False           # finish that grow on the device (layer 2)
        self.claims = bytearray()       # claim code of every block (``claims``)
        self.gstart: list[int] = []     # first block of each group
        self.glen: list[int] = []       # blocks in each group
        self.dstart: list[int] = []     # first data block of each group
        self.gend: list[int] = []       # block after each group
        self.rstart = 0                 # first block of the groups
        self.rend = 0                   # block after the groups (the backup superblock)
        self.rblocks = 0                # blocks per group (the last may be shorter)
        self.rcount = 0                 # number of groups

        # -- layer 2: cluster --------------------------------------------------------
        self.live: dict[int, Heartbeat] = {}    # slot -> heartbeat of a live node
        self.stale_slots: list = []     # (slot, heartbeat) left by dead nodes
        self.bad_slots: list[int] = []  # slots whose heartbeat block is damaged
        self.any_mounted = False        # some slot is not free

        # -- layer 3: allocation -----------------------------------------------------
        self.hdrs: list[RgrpHeader] = []        # each group's header
        self.bms: list[list[Bitmap]] = []       # each group's bitmap blocks
        self.states: list[bytearray] = []       # each group's bitmap, a byte an entry
        #                                         (0xff: unknown, its bitmap block lost)
        self.dirty_bm: set[tuple[int, int]] = set()  # (group, j): bitmap blocks to write
        self.dirty_hdr: set[int] = set()        # group headers to write
        self.hdr_problem: dict[int, str] = {}   # group -> damage of its header
        self.bm_problem: dict[tuple[int, int], str] = {}  # (group, j) -> damage
        self.alloc_ok = True            # repairs that allocate blocks are possible
        self.inodes: dict[int, Rec] = {}        # ino -> record, in about inode order
        self.bad_inodes: dict[int, str] = {}    # ino -> why its dinode is unusable
        self.dups: set[int] = set()     # blocks claimed as metadata and as data
        self.multi: list = []           # (pblk, n): data blocks claimed more than once
        self.ref_found: list[list] = []     # each group's refcount records, as read
        self.ref_nodes: list[list] = []     # each group's refcount node blocks
        self.ref_deferred: list[list] = []  # each group's damaged refcount nodes
        self.ref_issues: dict[int, list] = {}   # group -> damage of its refcount tree
        self.dir_inos: set[int] = set()  # inodes that are or may become directories:
        #                                  the passes on directories go by these
        self.suspicious: list[Rec] = []  # files whose extents the scan held back

        # -- layer 4: inodes -----------------------------------------------------------
        self.refs: list[list] | None = None     # each group's counts, (start, n, k >= 2)
        #                                         runs, once layer 4 counted them
        self.ref_dirty: set[int] = set()        # groups whose refcount tree to rewrite

        # -- layer 5: namespace ------------------------------------------------------
        self.no_root = False            # no root directory: the namespace is not walked
        self.dirty_dirs: set[int] = set()   # directories to rewrite
        self.lost_found: Rec | None = None  # /lost+found, once found or made
        self.n_reached = 0              # inodes marked reached by the namespace walk
        self.where: dict | None = None  # ino -> (directory, name), made when first asked

    # -- helpers every layer uses ---------------------------------------------------

    @property
    def fixing(self) -> bool:
        """Whether repairs are allowed now."""
        return self.report.repairs_allowed

    def read(self, bno: int, count: int = 1):
        """``count`` blocks from ``bno``, or None if unreadable."""
        try:
            return self.dev.read(bno, count)
        except OSError:
            return None

    def write(self, bno: int, data) -> None:
        self.dev.write(bno, data)
        self.modified = True

    def write_obj(self, obj) -> None:
        """Write a format object (its sealed image) to its block."""
        self.write(obj.bno, obj.image())

    def data_start(self, rg: int) -> int:
        return self.gstart[rg] + 1 + self.sb.bitmap_blocks

    def in_data(self, bno: int, n: int = 1) -> bool:
        """Whether blocks [bno, bno+n) lie in the data area of one resource group."""
        off = bno - self.rstart
        if off < 0 or n < 1 or bno >= self.rend:
            return False
        rg = off // self.rblocks
        if rg >= self.rcount:
            rg = self.rcount - 1
        return bno >= self.dstart[rg] and bno + n <= self.gend[rg]

    def state_of(self, bno: int) -> int:
        """The bitmap entry of block ``bno``."""
        rg = self.sb.rgrp_of(bno)
        return self.states[rg][bno - self.gstart[rg]]
