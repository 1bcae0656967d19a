"""The checker: one class whose ``check()`` runs the layers' passes in order.

Layers and their passes (each pass is a ``check_<structure>_<what>`` method):

1. Volume       superblock and backup, revision, geometry against the device
2. Cluster      slot heartbeats (live nodes refuse repair), journals of dead nodes
3. Allocation   group headers and bitmaps; a read-only scan of every dinode and tree
                builds the map of referenced blocks; bitmaps and counters against it
4. Inodes       dinode checksums and fields, extent trees, extents (range, overlap),
                doubly-claimed blocks (each claimant gets its own copy), xattr blocks,
                sizes, block counts, generations
5. Namespace    root, directory trees and hashes, entries, connectivity (lost+found),
                link counts, orphans
6. Data         (--scan-data) every allocated data extent is read

Repairs write straight to the device through the format classes (no journal), in an
order that a crash of fsck itself leaves repairable: blocks are allocated (bitmap
written) before anything points at them, pointers are removed before their blocks
are freed, and the primary superblock is written last.  While it repairs, fsck holds
the host-local lock of the volume and keeps a heartbeat in a free slot, so that no
node mounts the volume meanwhile (and an fsck that died is seen as an unclean stop).
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import gc
import logging
import os
import re
import stat as S
import threading
import time
import traceback
from collections import Counter
from itertools import compress, filterfalse, islice, repeat
from operator import and_, attrgetter, itemgetter, lt, ne, rshift

from clusterfs.errors import CorruptBlock, QuietError
from clusterfs.ondisk import blockhdr
from clusterfs.ondisk import slots as slotmod
from clusterfs.ondisk.blockdev import BlockDevice
from clusterfs.ondisk.blockhdr import BLOCK_SIZE, HEADER_SIZE, BlockType, is_valid
from clusterfs.ondisk.format import (BLOCKS_PER_BITMAP, DF_DIRTREE, DF_EXTENTS, DF_INLINE,
                                     DINODE, DIRENT, EXTENT, FORMAT_REVISION, FREE,
                                     HASH_SHIFT, HB_FREE, HB_NOLOCK, NAME_MAX,
                                     NODE_CAPACITY, ROOT_CAPACITY, UNLINKED, USED, Bitmap,
                                     Dinode, Heartbeat, RgrpHeader, Superblock, TreeNode,
                                     XattrBlock, dtype_of, name_hash)
from journal import Journal, JournalCorrupt

from . import salvage
from .device import OverlayDevice, read_blocks
from .parallel import decoded_dinodes
from .report import EXIT_OPERATIONAL, Cancelled, Report, Unexpected

log = logging.getLogger(__name__)

MAX_DEPTH = 8                   # clusterfs.fs.btree.MAX_DEPTH
MAX_FILE_BLOCKS = 1 << 40       # clusterfs.fs.inode.MAX_FILE_BLOCKS
LINK_MAX = 65000                # clusterfs.fs.posix.LINK_MAX
SYMLINK_MAX = 4095

# claim codes (one byte per block of the volume)
C_NONE = 0          # referenced by nothing
C_DATA = 1          # file data
C_UNLINKED = 2      # a dinode with nlink 0
C_DINODE = 3        # a dinode
C_DEFER = 4         # held only by damaged metadata that layer 4 drops (and frees)
C_META = 5          # tree node or xattr block
C_GROUP = 6         # resource group header or bitmap block
META_CODES = (C_UNLINKED, C_DINODE, C_META, C_GROUP)

# claim code -> expected bitmap state (0xff: leave the bitmap alone)
_EXPECT = bytes([FREE, USED, UNLINKED, DINODE, 0xFF, USED, USED] + [0xFF] * 249)
_EXPAND = [bytes(((b >> (2 * k)) & 3) for b in range(256)) for k in range(4)]
_INODE_STATES = re.compile(rb"[\x02\x03]")
_UNLINKED_STATE = re.compile(re.escape(bytes([UNLINKED])))
_VALID_TYPES = {S.S_IFREG, S.S_IFDIR, S.S_IFLNK, S.S_IFIFO, S.S_IFSOCK, S.S_IFCHR,
                S.S_IFBLK}
_TYPE_OF_DTYPE = {dtype_of(t): t for t in _VALID_TYPES}
_STATE_NAME = {FREE: "free", USED: "used", UNLINKED: "unlinked", DINODE: "dinode"}
_FIRST, _SECOND, _THIRD = itemgetter(0), itemgetter(1), itemgetter(2)
_MODE, _NLINK, _BNO = attrgetter("di.mode"), attrgetter("di.nlink"), attrgetter("di.bno")
_NODES, _GEN = attrgetter("nodes"), attrgetter("di.generation")


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


def expand_bits(bits, n: int) -> bytearray:
    """2-bit bitmap entries -> one byte per block (the first ``n``)."""
    out = bytearray(len(bits) * 4)
    for k in range(4):
        out[k::4] = bits.translate(_EXPAND[k])
    del out[n:]
    return out


class Rec:
    """What fsck knows about one dinode that it keeps.

    Most inodes need nothing but their dinode: the list fields start as the empty
    tuple (a list is made on first use: ``own_lists``), so that a scan of 100,000
    inodes does not build 100,000 sets of empty lists.  Slots keep a record small and
    in one piece: every pass over the inodes reads one or two fields of each, and
    the time that takes is mostly the memory it touches.
    """

    __slots__ = ("di", "notes", "items", "nodes", "deferred", "tree_issues", "ext_issues",
                 "tree_bad", "ext", "ext_changed", "xattr_ok", "discovered", "dirty",
                 "reached", "where")

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
        self.ext = None         # extent files: final [lblk, pblk, n] list
        self.ext_changed = False
        self.xattr_ok = True
        self.discovered = False  # found through a directory entry, not the bitmap
        self.dirty = False      # the dinode must be written
        self.reached = False
        self.where = None       # (parent dir, name) of the entry it was reached by

    def own_lists(self) -> "Rec":
        """Make the list fields this record's own before appending to them."""
        for name in ("nodes", "deferred", "tree_issues", "ext_issues"):
            if type(getattr(self, name)) is tuple:
                setattr(self, name, list(getattr(self, name)))
        return self


class Fsck:
    """Check (and repair) one volume.

    Args:
        path: image file or block device.
        mode: "n" (check only), "y" (repair everything), "p" (repair what is safe),
            "ask" (ask before each repair).
        force: check even a clean volume.
        scan_data: run layer 6 (read every data extent).
        report: where findings go (a new ``Report`` by default).
        live_watch: seconds to watch heartbeats (default: 2.5 intervals).
        hold_slot: keep a heartbeat in a free slot while repairing.
    """

    def __init__(self, path: str, *, mode: str = "n", force: bool = False,
                 scan_data: bool = False, report: Report | None = None,
                 live_watch: float | None = None, hold_slot: bool = True,
                 device=None):
        self.path = path
        self.mode = mode
        self.force = force
        self.scan_data = scan_data
        self.report = report or Report(mode, quiet=True)
        self.live_watch = live_watch
        self.hold_slot = hold_slot
        self._given_dev = device
        self.real = None
        self.dev = None
        self.sb: Superblock | None = None
        self.write_primary = False
        self.write_backup = False
        self.live: dict[int, Heartbeat] = {}
        self.lockfd = -1
        self.heart = None
        self.internal_error: str | None = None
        self.alloc_ok = True          # repairs that allocate blocks are possible
        self.stats: dict = {}
        self.clean_skip = False
        self.modified = False
        self.host_busy = False
        self.n_reached = 0            # inodes marked reached by the namespace walk
        self._where = None            # inode -> (directory, name): _entry_of

    # =================================================================================
    # driver
    # =================================================================================

    LAYERS = [
        (1, ["check_superblock", "check_geometry"]),
        (2, ["check_slot_heartbeats", "check_journals", "check_clean"]),
        (3, ["check_rgrp_headers", "scan_metadata", "check_bitmaps", "check_rgrp_counts"]),
        (4, ["check_dinodes", "check_extents", "check_dup_blocks", "check_xattr_blocks",
             "check_sizes", "check_generations"]),
        (5, ["check_root", "check_dir_entries", "check_connectivity",
             "check_link_counts", "check_orphans", "check_dir_writeback"]),
        (6, ["check_data_extents"]),
    ]

    def check(self) -> int:
        """Run every layer in order; returns the exit status (see ``report``)."""
        rep = self.report
        self.stats["crc32c"] = blockhdr.CRC32C_IMPL
        # fsck builds a few objects per inode and frees almost nothing until it ends:
        # the cyclic collector would walk the whole growing heap again and again (a
        # quarter of the run on 100,000 inodes) to find nothing.  It is off for the
        # check and back on (as it was) after, with what exists then moved to the
        # oldest generation (frozen, then unfrozen): else the first young collection
        # after would walk that whole heap once more.  Not left frozen: a process that
        # goes on (a test suite, a tool using Fsck) would never collect the cycles
        # that were alive then, its own included.
        gc_was = gc.isenabled()
        gc.disable()
        try:
            self._open()
            for layer, passes in self.LAYERS:
                if self.clean_skip:
                    break
                if layer == 6 and not self.scan_data:
                    continue
                rep.begin_layer(layer)
                for name in passes:
                    getattr(self, name)()
                    if self.clean_skip:
                        break
                if rep.current is not None:
                    rep.end_layer(self._layer_summary(layer))
            self._finish()
        except QuietError as e:
            rep.operational_error = str(e)
            rep.progress.clear()
            rep.say(f"{self.path}: {e}")
        except Cancelled:
            rep.cancelled = True
            rep.say(f"{self.path}: cancelled by the user")
            self._finish(abort=True)
        except Unexpected:
            rep.say(f"{self.path}: UNEXPECTED INCONSISTENCY; RUN fsck MANUALLY "
                    f"(without -p)")
            self._finish(abort=True)
        except Exception as e:      # never a traceback for the user; kept for tests
            self.internal_error = traceback.format_exc()
            log.debug("internal error:\n%s", self.internal_error)
            rep.operational_error = f"internal error: {type(e).__name__}: {e}"
            rep.progress.clear()
            rep.say(f"{self.path}: fsck failed: {type(e).__name__}: {e}")
            try:
                self._finish(abort=True)
            except Exception:
                pass
        finally:
            self._close()
            if gc_was:
                gc.freeze()
                gc.unfreeze()
                gc.enable()
        code = rep.exit_code()
        if not self.clean_skip and rep.operational_error is None:
            self._final_line()
        return code

    def _layer_summary(self, layer: int) -> str:
        st = self.stats
        if layer == 1:
            sb = self.sb
            return (f"revision {sb.format_rev}, {sb.total_blocks} blocks, "
                    f"{sb.rgrp_count} resource groups, {sb.nslots} slots")
        if layer == 2:
            return (f"{self.sb.nslots} slots, {st.get('live', 0)} live, "
                    f"{st.get('replayed', 0)} journal(s) replayed")
        if layer == 3:
            return (f"{st.get('dinodes', 0)} dinodes, {st.get('tree_nodes', 0)} tree nodes, "
                    f"{st.get('used_blocks', 0)} blocks referenced")
        if layer == 4:
            return (f"{st.get('files', 0)} files, {st.get('dirs', 0)} directories, "
                    f"{st.get('extents', 0)} extents")
        if layer == 5:
            return (f"{st.get('entries', 0)} entries, {st.get('reachable', 0)} reachable "
                    f"inodes")
        return (f"{st.get('scanned_blocks', 0)} data blocks read, "
                f"{st.get('bad_blocks', 0)} unreadable")

    def _final_line(self) -> None:
        rep = self.report
        if self.sb is None:
            return
        files = len(getattr(self, "inodes", {}))
        total = sum(self.sb.rgrp_range(i)[1] for i in range(self.sb.rgrp_count))
        used = total - sum(h.free for h in getattr(self, "hdrs", []) if h is not None)
        rep.say(f"{self.path}: {files} inodes, {used}/{total} blocks")
        if self.modified:
            rep.say(f"***** {self.path}: VOLUME WAS MODIFIED *****")

    # -- opening and closing -----------------------------------------------------------

    @property
    def fixing(self) -> bool:
        return self.report.repairs_allowed

    def _open(self) -> None:
        if self._given_dev is not None:
            self.real = self._given_dev
        else:
            try:
                self.real = BlockDevice(self.path, readonly=self.mode == "n")
            except OSError as e:
                raise QuietError(f"cannot open {self.path}: {e.strerror or e}",
                                 EXIT_OPERATIONAL) from None
            if self.mode != "n":
                self._lock_host()
        if self.real.nblocks < 2:
            raise QuietError("too small to hold a clusterfs volume", EXIT_OPERATIONAL)
        self.dev = OverlayDevice(self.real) if self.mode == "n" else self.real

    def _lock_host(self) -> None:
        self.lockfd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(self.lockfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.host_busy = True       # refused after the heartbeats name the node

    def _close(self) -> None:
        self._release_slot()
        if self.real is not None and self._given_dev is None:
            self.real.close()
        if self.lockfd >= 0:
            os.close(self.lockfd)
            self.lockfd = -1

    def _finish(self, abort: bool = False) -> None:
        """Write the superblocks (backup first, primary last) and flush."""
        if self.sb is None or self.mode == "n" or self.dev is not self.real:
            return
        if not abort or self.modified:
            self._flush_alloc()
        if self.write_backup or self.write_primary:
            self.sb.seq = max(self.sb.seq, 1)
            self.real.flush()
            self.real.write(self.sb.backup_bno, self.sb.image(self.sb.backup_bno))
            self.real.flush()
            if self.write_primary:
                self.real.write(0, self.sb.image(0))
            self.modified = True
        self.real.flush()

    # -- the slot fsck holds while it repairs -----------------------------------------

    def _claim_slot(self) -> None:
        if not self.hold_slot or self.mode == "n" or self._given_dev is not None:
            return
        for slot in range(self.sb.nslots):
            hb = slotmod.read_heartbeat(self.real, self.sb, slot)
            if hb is not None and hb.state == HB_FREE:
                break
        else:
            return
        try:
            dev = BlockDevice(self.path)
        except OSError:
            return
        w = slotmod.HeartbeatWriter(dev, self.sb, slot, "fsck", HB_NOLOCK, 1.0)
        w.set_state(HB_NOLOCK)
        stop = threading.Event()

        def beat():
            while not stop.wait(1.0):
                try:
                    w.beat()
                except OSError:
                    return
        t = threading.Thread(target=beat, name="fsck-heartbeat", daemon=True)
        t.start()
        self.heart = (w, dev, stop, t)

    def _release_slot(self) -> None:
        if self.heart is None:
            return
        w, dev, stop, t = self.heart
        self.heart = None
        stop.set()
        t.join()
        try:
            w.set_state(HB_FREE)
        finally:
            dev.close()

    # -- low-level helpers ---------------------------------------------------------------

    def _read(self, bno: int, count: int = 1):
        try:
            return self.dev.read(bno, count)
        except OSError:
            return None

    def _write(self, bno: int, data) -> None:
        self.dev.write(bno, data)
        self.modified = True

    def _write_obj(self, obj) -> None:
        self._write(obj.bno, obj.image())

    # =================================================================================
    # Layer 1: Volume
    # =================================================================================

    def check_superblock(self) -> None:
        rep = self.report
        nblocks = self.real.nblocks
        buf0 = self._read(0)
        prim = prim_err = None
        if buf0 is None:
            prim_err = "unreadable"
        else:
            prim, prim_err = self._decode_sb(buf0, 0)
        if prim is not None:
            self._check_fits(prim)
        # where is the backup?
        cands = []
        if prim is not None:
            cands.append(prim.backup_bno)
        elif buf0 is not None and buf0[:4] == b"CFS1":
            raw_total = int.from_bytes(buf0[40:48], "little")
            if 2 <= raw_total <= nblocks:
                cands.append(raw_total - 1)
        cands.append(nblocks - 1)
        backup = backup_err = None
        backup_bno = cands[0]
        for bno in dict.fromkeys(cands):
            if not 0 < bno < nblocks:
                continue
            buf = self._read(bno)
            if buf is None:
                backup_err = backup_err or "unreadable"
                continue
            sb, err = self._decode_sb(buf, bno)
            if sb is not None and sb.backup_bno == bno:
                backup, backup_bno, backup_err = sb, bno, None
                break
            backup_err = backup_err or err or "not at its own backup location"
        if prim is None and backup is None:
            # both damaged: accept one whose header alone is damaged
            for bno, buf in ((0, buf0), (backup_bno, self._read(backup_bno))):
                if buf is None:
                    continue
                try:
                    sb, notes = salvage.decode_superblock(buf, bno)
                except (CorruptBlock, QuietError):
                    continue
                if sb.total_blocks <= nblocks:
                    if rep.problem("superblocks-damaged",
                                   f"both superblocks are damaged (primary: {prim_err}; "
                                   f"backup: {backup_err}); block {bno} is usable "
                                   f"({', '.join(notes)})",
                                   "rewrite both from it", safe=False):
                        self.write_primary = self.write_backup = True
                    self.sb = sb
                    return
            raise QuietError(f"no usable clusterfs superblock (primary: {prim_err}; "
                             f"backup: {backup_err}): not a clusterfs volume, or damaged "
                             f"beyond repair", EXIT_OPERATIONAL)
        if prim is None:
            self._check_fits(backup)
            self.sb = backup
            if rep.problem("primary-superblock", f"primary superblock is damaged "
                           f"({prim_err})", "rewrite it from the backup", safe=False,
                           block=0):
                self.write_primary = True
            return
        self.sb = prim
        if backup is None:
            if rep.problem("backup-superblock", f"backup superblock at block "
                           f"{prim.backup_bno} is damaged ({backup_err})",
                           "rewrite it from the primary", safe=True,
                           block=prim.backup_bno):
                self.write_backup = True
            return
        a = Superblock(**{**prim.__dict__, "seq": 0}).image(0)
        b = Superblock(**{**backup.__dict__, "seq": 0}).image(0)
        if a != b:
            if rep.problem("superblocks-differ", "primary and backup superblocks "
                           "disagree", "rewrite the backup from the primary", safe=True,
                           block=prim.backup_bno):
                self.write_backup = True

    @staticmethod
    def _decode_sb(buf, bno: int):
        """(Superblock, None) or (None, reason); a valid block of another revision is
        an operational error (exit 8)."""
        if buf[:4] == b"CFS1" and is_valid(buf, BlockType.SUPERBLOCK, bno):
            rev = int.from_bytes(buf[32:36], "little")
            if rev != FORMAT_REVISION:
                raise QuietError(f"volume has format revision {rev}; this fsck handles "
                                 f"revision {FORMAT_REVISION} only", EXIT_OPERATIONAL)
        try:
            return Superblock.decode(buf, bno), None
        except CorruptBlock as e:
            return None, e.reason
        except QuietError as e:         # FormatMismatch: no magic
            return None, str(e)

    def _check_fits(self, sb: Superblock) -> None:
        if sb.total_blocks > self.real.nblocks:
            raise QuietError(f"the superblock describes {sb.total_blocks} blocks but the "
                             f"device has only {self.real.nblocks}: wrong device, or a "
                             f"truncated image", EXIT_OPERATIONAL)

    def check_geometry(self) -> None:
        sb = self.sb
        self._check_fits(sb)
        self.claims = bytearray(sb.total_blocks)
        self.gstart = [sb.rgrp_range(i)[0] for i in range(sb.rgrp_count)]
        self.glen = [sb.rgrp_range(i)[1] for i in range(sb.rgrp_count)]
        self._rstart, self._rend = sb.rgrp_start, sb.total_blocks - 1
        self._rblocks, self._rcount = sb.rgrp_blocks, sb.rgrp_count
        self._dstart = [g + 1 + sb.bitmap_blocks for g in self.gstart]
        self._gend = [g + n for g, n in zip(self.gstart, self.glen)]

    # =================================================================================
    # Layer 2: Cluster
    # =================================================================================

    def check_slot_heartbeats(self) -> None:
        rep, sb = self.report, self.sb
        hbs = []
        raw = {}
        for slot in range(sb.nslots):
            bno = sb.heartbeat_bno(slot)
            buf = self._read(bno)
            raw[slot] = bytes(buf) if buf is not None else None
            try:
                hbs.append(Heartbeat.decode(buf, bno) if buf is not None else None)
            except CorruptBlock:
                hbs.append(None)
        busy = [i for i, hb in enumerate(hbs) if hb is None or hb.state != HB_FREE]
        self.stats["live"] = 0
        self.stale_slots = []
        self.bad_slots = []
        self.any_mounted = bool(busy)
        if not busy:
            self._refuse_if_host_busy()
            return
        live = dict(slotmod.live_slots(self.real, sb, watch=self.live_watch))
        for i, hb in enumerate(hbs):
            if hb is None:
                buf = self._read(sb.heartbeat_bno(i))
                now = bytes(buf) if buf is not None else None
                if now != raw[i]:
                    try:
                        live[i] = Heartbeat.decode(now, sb.heartbeat_bno(i))
                    except (CorruptBlock, TypeError):
                        live[i] = Heartbeat(slot=i, node="?")
        self.live = live
        self.stats["live"] = len(live)
        if live:
            names = "; ".join(slotmod.describe(hb) for hb in live.values())
            if self.mode != "n":
                raise QuietError(f"the volume is in use: {names}; refusing to repair "
                                 f"while a node is alive (only -n is allowed)",
                                 EXIT_OPERATIONAL)
            rep.warn("volume-in-use", f"the volume is in use ({names}): checking a "
                     f"live volume, findings may be transient")
        self._refuse_if_host_busy()
        for i, hb in enumerate(hbs):
            if i in live:
                continue
            if hb is None:
                self.bad_slots.append(i)
            elif hb.state != HB_FREE or hb.slot != i:
                self.stale_slots.append((i, hb))

    def _refuse_if_host_busy(self) -> None:
        if self.host_busy:
            raise QuietError("the volume is in use: mounted on this host (its lock is "
                             "held); refusing to repair (only -n is allowed)",
                             EXIT_OPERATIONAL)

    def check_journals(self) -> None:
        rep, sb = self.report, self.sb
        self.stats["replayed"] = 0
        for slot in range(sb.nslots):
            if slot in self.live:
                continue
            start, length = sb.journal_range(slot)
            stale = any(i == slot for i, _ in self.stale_slots) or slot in self.bad_slots
            try:
                j = Journal(self.dev, start, length, slot=slot)
                hdr = j.read_header()
            except (JournalCorrupt, ValueError) as e:
                reason = getattr(e, "reason", str(e))
                if rep.problem("journal-header", f"journal of slot {slot} has a damaged "
                               f"header ({reason})" + (": its transactions are lost"
                                                       if stale else ""),
                               "write an empty journal", safe=not stale, block=start):
                    Journal.format(self.dev, start, length, slot=slot)
                    self.modified = True
                continue
            if hdr.clean:
                continue
            try:
                report = j.scan()
            except JournalCorrupt as e:
                self._corrupt_journal(slot, j, hdr, e)
                continue
            msg = f"journal of slot {slot} needs replay: {report.summary()}"
            replayed = rep.problem("journal-replay", msg, "replay it", safe=True, block=start)
            if replayed:
                j.replay()
                self.real.flush()
                self.modified = True
                self.stats["replayed"] += 1
            else:
                self._view_only()
                Journal(self.dev, start, length, slot=slot).replay()
            if report.torn is not None:
                t = report.torn
                rep.record("journal-torn-tail", f"journal of slot {slot} ends with a torn "
                           f"transaction {t.seq} at block {t.bno} ({t.reason})",
                           "drop it (it never committed)", replayed, safe=True, block=t.bno)
        # slots left by dead nodes, now recovered
        for i, hb in self.stale_slots:
            what = (f"slot {i} heartbeat names slot {hb.slot}" if hb.slot != i else
                    f"slot {i} was left mounted by node '{hb.node}' on {hb.host or '?'} "
                    f"(pid {hb.pid}), whose heartbeat has stopped")
            if rep.problem("stale-slot", what, "mark the slot free", safe=True,
                           block=sb.heartbeat_bno(i)):
                self._write(sb.heartbeat_bno(i), Heartbeat(slot=i).image(sb.heartbeat_bno(i)))
        for i in self.bad_slots:
            bno = sb.heartbeat_bno(i)
            if rep.problem("bad-heartbeat", f"heartbeat block of slot {i} is damaged",
                           "rewrite it as a free slot", safe=True, block=bno):
                self._write(bno, Heartbeat(slot=i).image(bno))
        if self.fixing:
            self.real.flush()

    def _view_only(self) -> None:
        """A journal replay was declined: check what a replay would leave, in memory,
        and repair nothing more (repairs on top of an unreplayed journal would be
        overwritten by its replay)."""
        if self.dev is self.real:
            self.dev = OverlayDevice(self.real)
        if self.report.repairs_allowed:
            self.report.repairs_allowed = False
            self.report.note("  (no further repairs: the journal was not replayed)")

    def _corrupt_journal(self, slot: int, j: Journal, hdr, err: JournalCorrupt) -> None:
        """Replay the transactions committed before the damage, discard the rest."""
        rep, sb = self.report, self.sb
        start, length = sb.journal_range(slot)
        log0, L = start + 1, length - 1
        hidden = []
        if log0 <= err.bno < start + length:
            pos = err.bno - log0
            while True:
                hidden.append(log0 + pos)
                pos = (pos + 1) % L
                if pos == hdr.tail_pos:
                    break
        ov = OverlayDevice(self.dev, hidden=hidden)
        try:
            report = Journal(ov, start, length, slot=slot).replay()
            writes = ov.written(exclude=set(hidden) | {start})
            what = (f"replay the {report.transactions} transaction(s) committed before "
                    f"the damage, discard the rest and reset the journal")
        except (JournalCorrupt, ValueError):
            writes = {}
            what = "discard the journal (nothing before the damage can be replayed)"
        msg = f"journal of slot {slot} is corrupt in the middle (block {err.bno}: {err.reason})"
        fix = rep.problem("journal-corrupt", msg, what, safe=False, block=err.bno)
        if not fix:
            self._view_only()
        for bno in sorted(writes):
            self.dev.write(bno, writes[bno])
        self.dev.flush()
        if fix:
            Journal.format(self.dev, start, length, slot=slot)
            self.modified = True
            self.stats["replayed"] = self.stats.get("replayed", 0) + 1

    def check_clean(self) -> None:
        """A clean volume (no slot mounted, every journal clean) is skipped unless -f."""
        if self.force or self.report.errors() or self.any_mounted:
            self._claim_slot()
            return
        self.clean_skip = True
        self.report.end_layer(self._layer_summary(2))
        hdrs = []
        for rg in range(self.sb.rgrp_count):
            buf = self._read(self.gstart[rg])
            try:
                hdrs.append(RgrpHeader.decode(buf, self.gstart[rg]))
            except (CorruptBlock, TypeError):
                hdrs.append(None)
        total = sum(self.glen)
        free = sum(h.free for h in hdrs if h)
        files = sum(h.dinodes for h in hdrs if h)
        self.report.say(f"{self.path}: clean, {files} inodes, {total - free}/{total} blocks "
                        f"(use -f to check anyway)")

    # =================================================================================
    # Layer 3: Allocation
    # =================================================================================

    def _data_start(self, rg: int) -> int:
        return self.gstart[rg] + 1 + self.sb.bitmap_blocks

    def _in_data(self, bno: int, n: int = 1) -> bool:
        """Whether blocks [bno, bno+n) lie in the data area of one resource group."""
        off = bno - self._rstart
        if off < 0 or n < 1 or bno >= self._rend:
            return False
        rg = off // self._rblocks
        if rg >= self._rcount:
            rg = self._rcount - 1
        return bno >= self._dstart[rg] and bno + n <= self._gend[rg]

    def check_rgrp_headers(self) -> None:
        """Read every group's header and bitmap blocks (one read per group)."""
        rep, sb = self.report, self.sb
        nbm = sb.bitmap_blocks
        self.hdrs: list[RgrpHeader] = []
        self.bms: list[list[Bitmap]] = []
        self.states: list[bytearray | None] = []
        self.dirty_bm: set[tuple[int, int]] = set()
        self.dirty_hdr: set[int] = set()
        self.hdr_problem: dict[int, str] = {}
        self.bm_problem: dict[tuple[int, int], str] = {}
        rep.progress.start("Reading group bitmaps", sb.rgrp_count)
        for rg in range(sb.rgrp_count):
            start, length = self.gstart[rg], self.glen[rg]
            data = self._read(start, 1 + nbm)
            blocks = [None] * (1 + nbm)
            if data is None:
                for k in range(1 + nbm):
                    blocks[k] = self._read(start + k)
            else:
                mv = memoryview(data)
                for k in range(1 + nbm):
                    blocks[k] = mv[k * BLOCK_SIZE:(k + 1) * BLOCK_SIZE]
            hdr = None
            if blocks[0] is not None:
                try:
                    hdr, notes = salvage.decode_simple(blocks[0], start, BlockType.RGRP,
                                                       RgrpHeader.decode)
                    if notes:
                        self.hdr_problem[rg] = ", ".join(notes)
                except CorruptBlock as e:
                    self.hdr_problem[rg] = e.reason
            else:
                self.hdr_problem[rg] = "unreadable"
            if hdr is not None and (hdr.index != rg or hdr.length != length or
                                    hdr.bitmap_blocks != nbm):
                self.hdr_problem[rg] = (f"fields disagree with the superblock (index "
                                        f"{hdr.index}, length {hdr.length}, bitmap blocks "
                                        f"{hdr.bitmap_blocks})")
            if hdr is None or rg in self.hdr_problem:
                igen = hdr.igeneration if hdr is not None else 1
                hdr = RgrpHeader(start, rg, start, length, nbm, free=0,
                                 igeneration=igen, seq=hdr.seq if hdr else 1)
            self.hdrs.append(hdr)
            bms = []
            ok = True
            for j in range(nbm):
                bno = start + 1 + j
                bm = None
                if blocks[1 + j] is not None:
                    try:
                        bm, notes = salvage.decode_simple(
                            blocks[1 + j], bno, BlockType.BITMAP,
                            lambda b, n, j=j: Bitmap.decode(b, n, rg, j * BLOCKS_PER_BITMAP))
                        if notes:
                            self.bm_problem[(rg, j)] = ", ".join(notes)
                    except CorruptBlock as e:
                        self.bm_problem[(rg, j)] = e.reason
                else:
                    self.bm_problem[(rg, j)] = "unreadable"
                if bm is None:
                    ok = False
                    bm = Bitmap(bno, rg, j * BLOCKS_PER_BITMAP,
                                bytearray(BLOCK_SIZE - HEADER_SIZE))
                bms.append(bm)
            self.bms.append(bms)
            bits = b"".join(bytes(bm.bits) for bm in bms)
            st = expand_bits(bits, length)
            if not ok:
                # entries of unreadable bitmap blocks are unknown (0xff)
                for j in range(nbm):
                    if (rg, j) in self.bm_problem and \
                            not self.bm_problem[(rg, j)].startswith(("crc", "bad magic",
                                                                      "type", "header")):
                        lo = j * BLOCKS_PER_BITMAP
                        hi = min(length, lo + BLOCKS_PER_BITMAP)
                        st[lo:hi] = b"\xff" * (hi - lo)
            self.states.append(st)
            # the group's own header and bitmap blocks
            self.claims[start:start + 1 + nbm] = bytes([C_GROUP]) * (1 + nbm)
            rep.progress.step()
        for rg, why in sorted(self.hdr_problem.items()):
            if rep.problem("rgrp-header", f"resource group {rg} header (block "
                           f"{self.gstart[rg]}) is damaged: {why}",
                           "rebuild it from the superblock and the bitmap", safe=False,
                           block=self.gstart[rg]):
                self.dirty_hdr.add(rg)
        for (rg, j), why in sorted(self.bm_problem.items()):
            unknown = self.states[rg][min(j * BLOCKS_PER_BITMAP, self.glen[rg] - 1)] == 0xFF
            if rep.problem("bitmap-block", f"bitmap block {j} of resource group {rg} "
                           f"(block {self.gstart[rg] + 1 + j}) is damaged: {why}",
                           "rebuild it from the blocks found in use" if unknown else
                           "rewrite it (its entries are checked below)", safe=False,
                           block=self.gstart[rg] + 1 + j):
                self.dirty_bm.add((rg, j))

    # -- the metadata scan ------------------------------------------------------------

    def scan_metadata(self) -> None:
        """Read every dinode and tree; build the map of referenced blocks.

        Nothing is repaired here: the problems found are kept for layers 4 and 5.
        """
        rep, sb = self.report, self.sb
        self.inodes: dict[int, Rec] = {}
        self.bad_inodes: dict[int, str] = {}
        self.dups: set[int] = set()
        # every inode that is or may become a directory (a directory tree, or the
        # directory type, when read; and those fsck makes): the passes that look at
        # directories only go through these, not through every inode
        self.dir_inos: set[int] = set()
        todo = []
        for rg in range(sb.rgrp_count):
            base = self.gstart[rg]
            st = self.states[rg]
            todo.extend(base + m.start() for m in _INODE_STATES.finditer(st))
        self.stats["dinodes"] = len(todo)
        rep.progress.start("Reading dinodes", len(todo))
        claims = self.claims
        step = rep.progress.step
        inodes, dups, dir_inos = self.inodes, self.dups, self.dir_inos
        self._suspicious = suspicious = []
        plan, in_data = self._plan_extents, self._in_data
        is_dir = S.S_IFDIR
        slow = []           # dinodes whose trees have nodes, damaged ones, xattr blocks
        for i, (bno, di, buf) in enumerate(decoded_dinodes(self.dev, todo, Dinode)):
            if not i & 1023:
                step(1024)
            if di is None:                  # damaged or unreadable: salvage
                rec = self._load_inode(bno, buf)
                if rec is not None:
                    slow.append(rec)
                continue
            rec = inodes[bno] = Rec(di, ())
            if claims[bno] == C_DATA:
                dups.add(bno)
            claims[bno] = C_DINODE if di.nlink else C_UNLINKED
            flags = di.flags
            if flags & DF_DIRTREE or di.mode & 0o170000 == is_dir:
                dir_inos.add(bno)
            if flags & (DF_EXTENTS | DF_DIRTREE):
                root = di.root
                if root.level or di.xattr_block:
                    slow.append(rec)
                    continue
                keys, vals = root.keys, root.vals
                if flags & DF_EXTENTS and len(keys) == 1:
                    # one extent, the common file: _plan_extents's first case, inline
                    lblk = keys[0]
                    pblk, n, eflags = vals[0]
                    if n and not eflags and lblk + n <= -(-di.size // BLOCK_SIZE) and \
                            in_data(pblk, n) and claims.count(0, pblk, pblk + n) == n:
                        claims[pblk:pblk + n] = b"\x01" * n
                        rec.ext = [[lblk, pblk, n]]
                        continue
                rec.items = list(zip(keys, vals))   # decode checked the order
                if flags & DF_EXTENTS:
                    plan(rec, suspicious)
            elif di.xattr_block:
                slow.append(rec)
        # where a bitmap block is lost, every block is looked at for dinodes (freed
        # dinodes have link count 0 and are not taken)
        unknown = []
        for rg in range(sb.rgrp_count):
            base = self.gstart[rg]
            for m in re.finditer(rb"\xff+", self.states[rg]):
                unknown.extend(b for b in range(base + m.start(), base + m.end())
                               if self._in_data(b) and not claims[b])
        if unknown:
            rep.progress.start("Searching for dinodes", len(unknown))
            for bno, buf in read_blocks(self.dev, unknown):
                rep.progress.step()
                if buf is not None and buf[:4] == b"CFS1" and \
                        int.from_bytes(buf[4:6], "little") == BlockType.DINODE:
                    rec = self._load_inode(bno, buf, discovered=True)
                    if rec is not None:
                        slow.append(rec)
        root = sb.root_ino
        if root not in self.inodes and root not in self.bad_inodes and \
                self._in_data(root) and not claims[root]:
            buf = self._read(root)
            if buf is not None:
                rec = self._load_inode(root, buf, discovered=True)
                if rec is not None:
                    slow.append(rec)
        # the other trees, now that every dinode the bitmap marks holds its block
        rep.progress.start("Reading trees", len(slow))
        for rec in sorted(slow, key=lambda r: r.di.bno):
            step()
            self._scan_trees(rec)
            if rec.di.flags & DF_EXTENTS:
                plan(rec, suspicious)
        # dinodes reached by directory entries that the bitmap does not mark
        self._discover()
        # extents held back: settled once every plausible extent holds its blocks
        for rec in suspicious:
            self._resolve_extents(rec)
        # garbage dinodes whose block turns out to hold something else
        for ino in list(self.bad_inodes):
            if claims[ino] != C_DEFER:
                del self.bad_inodes[ino]
        self.stats["tree_nodes"] = sum(map(len, map(_NODES, self.inodes.values())))
        self.stats["used_blocks"] = len(claims) - claims.count(0)

    def _load_inode(self, bno: int, buf, discovered: bool = False) -> Rec | None:
        if buf is None:
            self.bad_inodes[bno] = "unreadable"
            if not self.claims[bno]:
                self.claims[bno] = C_DEFER
            return None
        try:
            di, notes = Dinode.decode(buf, bno), []
        except CorruptBlock:
            try:
                di, notes = salvage.decode_dinode(buf, bno)
            except CorruptBlock as e:
                if discovered:
                    return None
                self.bad_inodes[bno] = e.reason
                if not self.claims[bno]:
                    self.claims[bno] = C_DEFER
                return None
        if discovered and (notes or di.nlink == 0):
            return None
        rec = Rec(di, notes)
        if discovered:
            rec.discovered = True
        self.inodes[bno] = rec
        if di.flags & DF_DIRTREE or di.mode & 0o170000 == S.S_IFDIR:
            self.dir_inos.add(bno)
        if self.claims[bno] == C_DATA:
            self.dups.add(bno)
        self.claims[bno] = C_DINODE if di.nlink else C_UNLINKED
        return rec

    def _scan_trees(self, rec: Rec) -> None:
        di = rec.di
        if di.flags & DF_EXTENTS:
            self._walk_tree(rec, EXTENT)
        elif di.flags & DF_DIRTREE:
            self._walk_tree(rec, DIRENT)
        if di.xattr_block:
            self._scan_xattr_block(rec)

    def _scan_xattr_block(self, rec: Rec) -> None:
        rec.own_lists()
        di = rec.di
        bno = di.xattr_block
        why = None
        if not self._in_data(bno):
            why = f"points outside the data area (block {bno})"
        elif self.claims[bno] in META_CODES:
            why = f"points at block {bno}, which holds other metadata"
        else:
            buf = self._read(bno)
            try:
                if buf is None:
                    raise CorruptBlock(bno, "unreadable")
                xb, notes = salvage.decode_simple(buf, bno, BlockType.XATTR,
                                                  XattrBlock.decode)
            except CorruptBlock as e:
                why = f"block {bno} is damaged ({e.reason})"
                if not self.claims[bno]:
                    self.claims[bno] = C_DEFER
                rec.deferred.append(bno)
            else:
                if xb.owner != di.bno:
                    why = f"block {bno} belongs to inode {xb.owner}"
                else:
                    if notes:
                        rec.tree_issues.append(("xattr-block",
                                                f"xattr block {bno} damaged ({', '.join(notes)})"))
                        rec.dirty = True
                    self._claim_meta(bno)
                    return
        rec.xattr_ok = False
        rec.tree_issues.append(("xattr-block", f"extended attribute block {why}"))

    def _claim_meta(self, bno: int) -> None:
        c = self.claims[bno]
        if c == C_DATA:
            self.dups.add(bno)
        self.claims[bno] = C_META

    def _walk_tree(self, rec: Rec, kind: int) -> None:
        rec.own_lists()
        di = rec.di
        root = di.root
        items: list = []
        seen: set[int] = set()
        issues = rec.tree_issues
        what = "extent tree" if kind == EXTENT else "directory tree"
        if root.level >= MAX_DEPTH:
            issues.append(("tree", f"{what} root level {root.level} is impossible"))
            rec.tree_bad = True
            root.level, root.keys, root.vals = 0, [], []
            root.recount()
        if root.level > 0 and root.keys:
            # the root's level field against its first child's
            child = self._peek_node(root.vals[0], kind, di.bno)
            if child is not None and child.level != root.level - 1 and \
                    child.level + 1 < MAX_DEPTH:
                issues.append(("tree", f"{what} root level {root.level} disagrees with "
                                       f"its children (level {child.level})"))
                rec.tree_bad = True
                root.level = child.level + 1
        if root.level == 0:
            rec.items = list(zip(root.keys, root.vals))    # decode checked the order
            if rec.notes and any("tree root" in n for n in rec.notes):
                rec.tree_bad = True
            return
        self._walk_node(rec, root, kind, None, None, items, seen, what)
        # records must be in key order across nodes, each key once
        for a, b in zip(items, items[1:]):
            if a[0] >= b[0]:
                issues.append(("tree", f"{what} keys out of order across nodes"))
                rec.tree_bad = True
                items.sort(key=lambda kv: kv[0])
                uniq = []
                for kv in items:
                    if uniq and uniq[-1][0] == kv[0]:
                        continue
                    uniq.append(kv)
                items = uniq
                break
        rec.items = items
        if rec.notes and any("tree root" in n for n in rec.notes):
            rec.tree_bad = True

    def _peek_node(self, bno: int, kind: int, owner: int):
        if not self._in_data(bno) or self.claims[bno] in META_CODES:
            return None
        buf = self._read(bno)
        if buf is None:
            return None
        try:
            node, _ = salvage.decode_node(buf, bno, kind)
        except CorruptBlock:
            return None
        return node if node.owner == owner else None

    def _walk_node(self, rec, node, kind, lo, hi, items, seen, what) -> None:
        issues = rec.tree_issues
        if node.level == 0:
            keys = node.keys            # in order (decoding checked): the ends suffice
            if keys and lo is not None and keys[0] < lo:
                k = keys[0]
            elif keys and hi is not None and keys[-1] >= hi:
                k = keys[bisect.bisect_left(keys, hi)]
            else:
                k = None
            if k is not None:
                issues.append(("tree", f"{what} node {node.bno}: key {k} outside the "
                                       f"range of its parent"))
                rec.tree_bad = True
            items.extend(zip(keys, node.vals))
            return
        n = len(node.keys)
        for i in range(n):
            k = node.keys[i]
            nhi = node.keys[i + 1] if i + 1 < n else hi
            child = self._load_node(rec, node.vals[i], kind, node.level - 1, seen, what)
            if child is None:
                rec.tree_bad = True
                continue
            if child.keys[0] != k:
                issues.append(("tree", f"{what} index key {k} != first key {child.keys[0]} "
                                       f"of node {child.bno}"))
                rec.tree_bad = True
            self._walk_node(rec, child, kind, k if lo is None else max(k, lo), nhi, items,
                            seen, what)

    def _load_node(self, rec, bno, kind, level, seen, what):
        issues = rec.tree_issues
        ino = rec.di.bno
        if bno in seen:
            issues.append(("tree", f"{what} points at node {bno} twice"))
            return None
        if not self._in_data(bno):
            issues.append(("tree", f"{what} points outside the data area (block {bno})"))
            return None
        if self.claims[bno] in META_CODES:
            issues.append(("tree", f"{what} points at block {bno}, which holds other "
                                   f"metadata"))
            return None
        buf = self._read(bno)
        try:
            if buf is None:
                raise CorruptBlock(bno, "unreadable")
            node, notes = salvage.decode_node(buf, bno, kind)
        except CorruptBlock as e:
            issues.append(("tree", f"{what} node {bno} is unreadable ({e.reason})"))
            if not self.claims[bno]:
                self.claims[bno] = C_DEFER
            rec.deferred.append(bno)
            return None
        if node.owner != ino:
            if node.owner in self.inodes or node.owner in self.bad_inodes:
                issues.append(("tree", f"{what} points at node {bno} of inode {node.owner}"))
                return None
            issues.append(("tree", f"{what} node {bno} names owner {node.owner}"))
            node.owner = ino
            notes = notes + ["owner"]
        if node.level != level:
            issues.append(("tree", f"{what} node {bno} has level {node.level}, expected "
                                   f"{level}"))
            if not self.claims[bno]:
                self.claims[bno] = C_DEFER
            rec.deferred.append(bno)
            return None
        if not node.keys:
            issues.append(("tree", f"{what} node {bno} is empty"))
            if not self.claims[bno]:
                self.claims[bno] = C_DEFER
            rec.deferred.append(bno)
            return None
        if notes:
            issues.append(("tree", f"{what} node {bno} is damaged ({', '.join(notes)})"))
            rec.tree_bad = True
        seen.add(bno)
        rec.nodes.append(bno)
        self._claim_meta(bno)
        return node

    def _dir_recs(self) -> list[Rec]:
        """The records of directory trees (``DF_DIRTREE``), in inode order."""
        get = self.inodes.get
        return [r for r in map(get, sorted(self.dir_inos))
                if r is not None and r.di.flags & DF_DIRTREE]

    def _discover(self) -> None:
        """Follow directory entries to dinodes the bitmap does not mark as in use."""
        queue = self._dir_recs()
        while queue:
            rec = queue.pop()
            for ino in filterfalse(self.inodes.__contains__,
                                   sorted(set(entry_inos(rec.items)))):
                if ino in self.bad_inodes or not self._in_data(ino):
                    continue
                if self.claims[ino] != C_NONE:
                    continue
                rg = self.sb.rgrp_of(ino)
                if self.states[rg][ino - self.gstart[rg]] in (UNLINKED, DINODE):
                    continue
                buf = self._read(ino)
                new = self._load_inode(ino, buf, discovered=True) if buf is not None else None
                if new is None:
                    continue
                self._scan_trees(new)
                if new.di.flags & DF_EXTENTS:
                    self._plan_extents(new, self._suspicious)
                if new.di.flags & DF_DIRTREE:
                    queue.append(new)

    # -- extents ------------------------------------------------------------------------

    def _plan_extents(self, rec: Rec, suspicious: list) -> None:
        """Validate one file's extent records; claim the plausible ones now.

        An extent is plausible when it lies in one group's data area, overlaps neither
        neighbour logically and ends before EOF.  The others wait until every plausible
        extent of every file has claimed its blocks (``_resolve_extents``).
        """
        di = rec.di
        items = rec.items
        if len(items) == 1:
            lblk, (pblk, n, flags) = items[0]
            if n and not flags and lblk + n <= -(-di.size // BLOCK_SIZE) and \
                    self._in_data(pblk, n):
                claims = self.claims
                if claims.count(0, pblk, pblk + n) == n:
                    claims[pblk:pblk + n] = b"\x01" * n
                else:
                    self._claim_data(pblk, n)
                rec.ext = [[lblk, pblk, n]]
                return
        issues = rec.own_lists().ext_issues
        ext = []
        for lblk, (pblk, n, flags) in items:
            if n == 0:
                issues.append(f"extent at logical block {lblk} has length 0: dropped")
                rec.ext_changed = True
                continue
            if flags:
                issues.append(f"extent at logical block {lblk} has unknown flags "
                              f"{flags:#x}: cleared")
                rec.ext_changed = True
            if lblk >= MAX_FILE_BLOCKS:
                issues.append(f"extent at logical block {lblk} lies beyond the largest "
                              f"file: dropped")
                rec.ext_changed = True
                continue
            ext.append([lblk, pblk, n, True])
        rec.ext = ext
        eof = -(-di.size // BLOCK_SIZE)
        deferred = False
        for i, e in enumerate(ext):
            lblk, pblk, n, _ = e
            ok = self._in_data(pblk, n) and lblk + n <= eof
            if ok and i + 1 < len(ext) and lblk + n > ext[i + 1][0]:
                ok = False
            if ok and i > 0 and ext[i - 1][0] + ext[i - 1][2] > lblk:
                ok = False
            if ok:
                self._claim_data(pblk, n)
            else:
                e[3] = False
                deferred = True
        if deferred:
            suspicious.append(rec)
        else:
            rec.ext = [e[:3] for e in ext]

    def _phys_prefix(self, pblk: int, n: int) -> int:
        """How many blocks from ``pblk`` are marked used, held by nobody and inside
        one group's data area (at most n)."""
        rg = self.sb.rgrp_of(pblk)
        if rg < 0 or pblk < self._data_start(rg):
            return 0
        base = self.gstart[rg]
        limit = min(n, base + self.glen[rg] - pblk)
        st = self.states[rg]
        claims = self.claims
        m = 0
        while m < limit and st[pblk + m - base] == USED and claims[pblk + m] in (
                C_NONE, C_DEFER):
            m += 1
        return m

    def _resolve_extents(self, rec: Rec) -> None:
        """Settle the extents ``_plan_extents`` held back, in logical order.

        The blocks themselves decide the length: damage to a length field leaves the
        extent running into blocks that are free or held by others, and it is cut
        where they start.  A logical overlap (damage to a logical block field) is
        settled by moving one extent into the gap it fits, else by trimming the later
        one.  An extent whose blocks are all its own but that runs past EOF is kept:
        then the size is wrong (fixed with the sizes).
        """
        ext = rec.ext
        issues = rec.own_lists().ext_issues
        eof = -(-rec.di.size // BLOCK_SIZE)
        prev_end = 0
        out = []
        for i, e in enumerate(ext):
            lblk, pblk, n, ok = e
            if ok:
                out.append([lblk, pblk, n])
                prev_end = lblk + n
                continue
            desc = f"extent ({lblk}, {pblk}, {n})"
            m = self._phys_prefix(pblk, n)
            if m == 0:
                issues.append(f"{desc} points outside the file's allocated blocks: dropped")
                rec.ext_changed = True
                continue
            if m < n:
                issues.append(f"{desc} runs past the blocks allocated to it: trimmed to "
                              f"{m} block(s)")
                rec.ext_changed = True
                n = m
            nxt = ext[i + 1] if i + 1 < len(ext) else None
            if lblk < prev_end:
                limit = nxt[0] if nxt is not None else max(eof, prev_end + n)
                rec.ext_changed = True
                if prev_end + n <= limit:
                    issues.append(f"{desc} overlaps the previous extent: moved to logical "
                                  f"block {prev_end}")
                    lblk = prev_end
                else:
                    cut = prev_end - lblk
                    if cut >= n:
                        issues.append(f"{desc} lies inside the previous extent: dropped")
                        continue
                    issues.append(f"{desc} overlaps the previous extent: its first {cut} "
                                  f"block(s) dropped")
                    lblk, pblk, n = lblk + cut, pblk + cut, n - cut
            elif nxt is not None and lblk + n > nxt[0]:
                limit = ext[i + 2][0] if i + 2 < len(ext) else max(eof, lblk + n + nxt[2])
                if lblk + n + nxt[2] > limit and nxt[0] - n >= prev_end:
                    issues.append(f"{desc} overlaps the next extent: moved to logical "
                                  f"block {nxt[0] - n}")
                    rec.ext_changed = True
                    lblk = nxt[0] - n
            self._claim_data(pblk, n)
            out.append([lblk, pblk, n])
            prev_end = lblk + n
        out.sort(key=lambda x: x[0])
        rec.ext = out

    def _claim_data(self, pblk: int, n: int) -> None:
        claims = self.claims
        seg = claims[pblk:pblk + n]
        if seg.count(0) == n:
            claims[pblk:pblk + n] = b"\x01" * n
            return
        for b in range(pblk, pblk + n):
            c = claims[b]
            if c in (C_NONE, C_DEFER):
                claims[b] = C_DATA
            else:
                self.dups.add(b)

    # -- bitmaps against the map ------------------------------------------------------

    def check_bitmaps(self) -> None:
        rep, sb = self.report, self.sb
        claims = self.claims
        rep.progress.start("Comparing bitmaps", sb.rgrp_count)
        for rg in range(sb.rgrp_count):
            base, length = self.gstart[rg], self.glen[rg]
            exp = claims[base:base + length].translate(_EXPECT)
            act = self.states[rg]
            if exp != act:
                self._diff_group(rg, exp, act)
            self._check_bitmap_tail(rg)
            rep.progress.step()

    def _diff_group(self, rg: int, exp: bytes, act: bytearray) -> None:
        rep = self.report
        base, length = self.gstart[rg], self.glen[rg]
        runs = []       # (kind, first entry, count, want)
        CH = 1024
        for lo in range(0, length, CH):
            if exp[lo:lo + CH] == act[lo:lo + CH]:
                continue
            for e in range(lo, min(length, lo + CH)):
                want, have = exp[e], act[e]
                if want == have:
                    continue
                if want == 0xFF:
                    if have == 0xFF:
                        act_fix = FREE       # unknown entry of a lost bitmap block
                        kind = "unknown"
                    else:
                        continue             # held by damaged metadata: layer 4 frees it
                elif want in (UNLINKED, DINODE) and have in (UNLINKED, DINODE):
                    continue                 # settled with the link counts (layer 5)
                else:
                    act_fix = want
                    if have == 0xFF:
                        kind = "unknown"
                    elif want == FREE:
                        kind = "leaked"
                    elif have == FREE:
                        kind = "in-use-free"
                    else:
                        kind = "wrong-state"
                if runs and runs[-1][0] == kind and runs[-1][1] + runs[-1][2] == e and \
                        runs[-1][3] == act_fix and runs[-1][4] == have:
                    runs[-1][2] += 1
                else:
                    runs.append([kind, e, 1, act_fix, have])
        for kind, e, n, want, have in runs:
            first = base + e
            rng = f"block {first}" if n == 1 else f"blocks {first}-{first + n - 1}"
            if kind == "unknown":
                if self.fixing:
                    self._set_states(rg, e, n, want)
                continue
            if kind == "leaked":
                msg = (f"{rng} marked {_STATE_NAME[have]} but referenced by nothing "
                       f"(leaked)")
                fix, code = "mark free", "leaked-blocks"
            elif kind == "in-use-free":
                msg = f"{rng} in use ({_STATE_NAME[want]}) but marked free"
                fix, code = f"mark {_STATE_NAME[want]}", "referenced-free-blocks"
            else:
                msg = f"{rng} marked {_STATE_NAME[have]}, in use as {_STATE_NAME[want]}"
                fix, code = f"mark {_STATE_NAME[want]}", "wrong-block-state"
            if rep.problem(code, msg, fix, safe=True, block=first, count=n):
                self._set_states(rg, e, n, want)
            elif want != FREE:
                self.alloc_ok = False     # the allocator could hand these out again

    def _check_bitmap_tail(self, rg: int) -> None:
        """Entries past the end of the group must be zero."""
        length = self.glen[rg]
        bad = False
        for j, bm in enumerate(self.bms[rg]):
            first = max(0, length - j * BLOCKS_PER_BITMAP)
            if first >= BLOCKS_PER_BITMAP:
                continue
            nb = first >> 2
            if any(bm.bits[nb + (1 if first & 3 else 0):]) or \
                    (first & 3 and bm.bits[nb] >> ((first & 3) * 2)):
                bad = True
        if not bad:
            return
        if self.report.problem("bitmap-tail", f"bitmap of resource group {rg} marks blocks "
                               f"past the end of the group", "clear them", safe=True,
                               block=self.gstart[rg] + 1):
            for j, bm in enumerate(self.bms[rg]):
                first = max(0, length - j * BLOCKS_PER_BITMAP)
                if first < BLOCKS_PER_BITMAP:
                    bm.set_run(first, BLOCKS_PER_BITMAP - first, FREE)
                    self.dirty_bm.add((rg, j))

    def _set_states(self, rg: int, e: int, n: int, state: int) -> None:
        """Set bitmap entries [e, e+n) of a group (memory; written by _flush_alloc)."""
        st = self.states[rg]
        hdr = self.hdrs[rg]
        for k in range(e, e + n):
            old = st[k]
            if old == FREE:
                hdr.free -= 1
            elif old == DINODE:
                hdr.dinodes -= 1
            elif old == UNLINKED:
                hdr.unlinked -= 1
            if state == FREE:
                hdr.free += 1
            elif state == DINODE:
                hdr.dinodes += 1
            elif state == UNLINKED:
                hdr.unlinked += 1
        st[e:e + n] = bytes([state]) * n
        while n > 0:
            j, off = divmod(e, BLOCKS_PER_BITMAP)
            take = min(n, BLOCKS_PER_BITMAP - off)
            self.bms[rg][j].set_run(off, take, state)
            self.dirty_bm.add((rg, j))
            e += take
            n -= take
        self.dirty_hdr.add(rg)

    def _set_state(self, bno: int, state: int) -> None:
        rg = self.sb.rgrp_of(bno)
        self._set_states(rg, bno - self.gstart[rg], 1, state)

    def _state(self, bno: int) -> int:
        rg = self.sb.rgrp_of(bno)
        return self.states[rg][bno - self.gstart[rg]]

    def check_rgrp_counts(self) -> None:
        rep = self.report
        for rg in range(self.sb.rgrp_count):
            st = self.states[rg]
            hdr = self.hdrs[rg]
            free, dinodes, unlinked = st.count(FREE), st.count(DINODE), st.count(UNLINKED)
            if rg in self.hdr_problem:
                hdr.free, hdr.dinodes, hdr.unlinked = free, dinodes, unlinked
                continue
            if (hdr.free, hdr.dinodes, hdr.unlinked) != (free, dinodes, unlinked):
                if st.count(0xFF):
                    hdr.free, hdr.dinodes, hdr.unlinked = free, dinodes, unlinked
                    continue
                msg = (f"resource group {rg} counts free {hdr.free}, dinodes "
                       f"{hdr.dinodes}, unlinked {hdr.unlinked}; its bitmap has "
                       f"{free}, {dinodes}, {unlinked}")
                if rep.problem("rgrp-counts", msg, "fix the counts", safe=True,
                               block=self.gstart[rg]):
                    self.dirty_hdr.add(rg)
                hdr.free, hdr.dinodes, hdr.unlinked = free, dinodes, unlinked
        if self.fixing:
            self._flush_alloc()

    def _flush_alloc(self) -> None:
        """Write changed bitmap blocks, then their group headers."""
        if not getattr(self, "dirty_bm", None) and not getattr(self, "dirty_hdr", None):
            return
        if not self.fixing and self.dev is not self.real:
            self.dirty_bm.clear()
            self.dirty_hdr.clear()
            return
        for rg, j in sorted(self.dirty_bm):
            self._write_obj(self.bms[rg][j])
        for rg in sorted(self.dirty_hdr):
            self._write_obj(self.hdrs[rg])
        self.dirty_bm.clear()
        self.dirty_hdr.clear()

    # -- allocation for repairs --------------------------------------------------------

    def _find_free(self, goal: int | None, want: int, min_len: int = 1):
        """First run of free, unreferenced blocks near ``goal``: (bno, n <= want)."""
        sb = self.sb
        rg0 = sb.rgrp_of(goal) if goal is not None else 0
        rg0 = max(rg0, 0)
        for k in range(sb.rgrp_count):
            rg = (rg0 + k) % sb.rgrp_count
            if self.hdrs[rg].free <= 0:
                continue
            st = self.states[rg]
            base = self.gstart[rg]
            pos = self._data_start(rg) - base
            if goal is not None and k == 0 and goal - base > pos:
                pos = goal - base
            for start in (pos, self._data_start(rg) - base):
                e = st.find(b"\0" * min(min_len, want), start)
                while e >= 0:
                    n = 0
                    while n < want and e + n < len(st) and st[e + n] == FREE and \
                            self.claims[base + e + n] == C_NONE:
                        n += 1
                    if n >= min(min_len, want):
                        return base + e, n
                    e = st.find(b"\0" * min(min_len, want), e + max(n, 1))
        return None

    def _alloc(self, goal: int | None, want: int, state: int = USED,
               code: int = C_DATA) -> list[tuple[int, int]]:
        """Allocate ``want`` blocks (several runs if needed); ENOSPC raises OSError."""
        runs = []
        left = want
        while left:
            found = self._find_free(goal, left)
            if found is None:
                for b, n in runs:
                    self._release(b, n)
                raise OSError(errno.ENOSPC, "no free blocks for the repair")
            b, n = found
            self._set_state(b, state) if n == 1 else self._set_states(
                self.sb.rgrp_of(b), b - self.gstart[self.sb.rgrp_of(b)], n, state)
            self.claims[b:b + n] = bytes([code]) * n
            runs.append((b, n))
            goal = b + n
            left -= n
        return runs

    def _release(self, bno: int, n: int = 1) -> None:
        """Mark blocks free in the bitmap and the map (memory; flushed later)."""
        while n > 0:
            rg = self.sb.rgrp_of(bno)
            e = bno - self.gstart[rg]
            take = min(n, self.glen[rg] - e)
            st = self.states[rg]
            # only blocks not already free (counts stay right)
            k = 0
            while k < take:
                if st[e + k] != FREE:
                    j = k
                    while j < take and st[e + j] != FREE:
                        j += 1
                    self._set_states(rg, e + k, j - k, FREE)
                    k = j
                else:
                    k += 1
            self.claims[bno:bno + take] = bytes(take)
            bno += take
            n -= take

    # =================================================================================
    # Layer 4: Inodes and extents
    # =================================================================================

    def check_dinodes(self) -> None:
        rep = self.report
        # dinodes that hold nothing credible
        for ino in sorted(self.bad_inodes):
            why = self.bad_inodes[ino]
            if rep.problem("bad-dinode", f"inode {ino}: dinode is damaged beyond use "
                           f"({why})", "clear it (its directory entries are removed "
                           "below)", safe=False, ino=ino, block=ino):
                if self.claims[ino] == C_DEFER:
                    self._release(ino)
                self._flush_alloc()
        # salvaged or damaged-in-place dinodes and their fields
        files = dirs = 0
        rep.progress.start("Checking dinodes", len(self.inodes))
        fixing = self.fixing
        look = []           # the records with more to look at than the common case
        for rec in self.inodes.values():        # in memory order (about inode order)
            di = rec.di
            mode = di.mode & 0o170000
            if rec.notes or (rec.dirty and fixing) or not di.generation or di.rdev or (
                    not (mode == S.S_IFDIR and not di.size) if di.flags & DF_DIRTREE
                    else mode != S.S_IFREG):
                look.append(rec)
            elif mode == S.S_IFDIR:     # the common case: nothing for _check_fields
                dirs += 1
            else:
                files += 1
        rep.progress.step(len(self.inodes))
        for rec in sorted(look, key=_BNO):
            di = rec.di
            ino = di.bno
            if rec.notes:
                detail = "; ".join(rec.notes)
                code = "dinode-checksum" if detail == "crc32c mismatch" else "dinode-damaged"
                if rep.problem(code, f"inode {ino}: dinode block damaged ({detail})",
                               "rewrite it with what could be salvaged", safe=False,
                               ino=ino, block=ino):
                    rec.dirty = True
            if self._check_fields(rec) == "clear":
                self._free_inode(rec)
                del self.inodes[ino]
                self.bad_inodes[ino] = "cleared"
                continue
            if di.mode & 0o170000 == S.S_IFDIR:
                dirs += 1
            else:
                files += 1
            if rec.dirty and self.fixing and not (di.flags & (DF_EXTENTS | DF_DIRTREE)
                                                  and rec.tree_bad):
                self._write_obj(di)
                rec.dirty = False
        self.stats["files"], self.stats["dirs"] = files, dirs

    def _check_fields(self, rec: Rec) -> str | None:
        """A dinode's type, size, device number and generation (check_dinodes passes
        the common case over before calling this)."""
        di = rec.di
        rep = self.report
        ino = di.bno
        typ = S.S_IFMT(di.mode)
        kind = di.flags & (DF_INLINE | DF_EXTENTS | DF_DIRTREE)
        want = typ
        if kind == DF_DIRTREE:
            want = S.S_IFDIR
        elif typ == S.S_IFDIR or typ not in _VALID_TYPES:
            want = S.S_IFREG
        if want != typ:
            if rep.problem("bad-mode", f"inode {ino}: file type {typ >> 12:o} does not "
                           f"fit its data ({'directory' if kind == DF_DIRTREE else 'file data'})",
                           f"make it a {'directory' if want == S.S_IFDIR else 'regular file'}",
                           ino=ino):
                di.mode = want | (di.mode & 0o7777)
                rec.dirty = True
        if S.S_ISDIR(di.mode) and di.size:
            if rep.problem("dir-size", f"inode {ino}: directory has size {di.size}",
                           "set it to 0", safe=True, ino=ino):
                di.size = 0
                rec.dirty = True
        if S.S_ISLNK(di.mode) and not 0 < di.size <= SYMLINK_MAX:
            if rep.problem("symlink-size", f"inode {ino}: symbolic link of length "
                           f"{di.size}", "clear it (its directory entries are removed "
                           "below)", ino=ino):
                return "clear"
        if not S.S_ISCHR(di.mode) and not S.S_ISBLK(di.mode) and di.rdev:
            if rep.problem("rdev", f"inode {ino}: device number {di.rdev:#x} on a "
                           f"non-device", "clear it", safe=True, ino=ino):
                di.rdev = 0
                rec.dirty = True
        if di.generation == 0:
            if rep.problem("generation", f"inode {ino}: generation 0", "set it to 1",
                           safe=True, ino=ino):
                di.generation = 1
                rec.dirty = True
        return None

    def check_extents(self) -> None:
        """Extent trees: structure, records, rebuilt where damaged."""
        rep = self.report
        n_ext = 0
        look = []
        for rec in self.inodes.values():        # in memory order (about inode order)
            if not rec.di.flags & DF_EXTENTS:
                continue
            if not (rec.tree_issues or rec.ext_issues or rec.tree_bad):
                n_ext += len(rec.ext)           # the common case: nothing to say
            else:
                look.append(rec)
        for rec in sorted(look, key=_BNO):
            ino = rec.di.bno
            tree_msgs = [m for c, m in rec.tree_issues if c == "tree"]
            fix = False
            for m in tree_msgs:
                fix |= rep.problem("extent-tree", f"inode {ino}: {m}",
                                   "rebuild the extent tree", safe=False, ino=ino)
            for m in rec.ext_issues:
                fix |= rep.problem("bad-extent", f"inode {ino}: {m}", "rebuild the extent "
                                   "tree without it", safe=False, ino=ino)
            n_ext += len(rec.ext)
            if rec.tree_bad and not tree_msgs and not rec.ext_issues:
                fix = self.fixing           # a salvaged root (approved with the dinode)
            if fix:
                self._rebuild_tree(rec, EXTENT, [(l, (p, n, 0)) for l, p, n in rec.ext])
                self._free_deferred(rec)
        self.stats["extents"] = n_ext

    def _free_deferred(self, rec: Rec) -> None:
        for bno in rec.deferred:
            if self.claims[bno] == C_DEFER:
                self._release(bno)
        rec.deferred = []
        self._flush_alloc()

    def _rebuild_tree(self, rec: Rec, kind: int, items: list) -> bool:
        """Write a new tree holding ``items`` (sorted) for ``rec``; free the old nodes.

        New node blocks are allocated and written first, then the dinode, then the old
        nodes are freed: a crash in between leaves only leaked blocks.
        """
        di = rec.di
        ino = di.bno
        leaf_cap = NODE_CAPACITY - 64
        idx_cap = (NODE_CAPACITY // 16) - 4

        def rsize(val) -> int:
            return 24 if kind == EXTENT else 18 + len(val[2])

        total = sum(rsize(v) for _k, v in items)
        new_nodes: list[TreeNode] = []
        try:
            if total <= ROOT_CAPACITY:
                root = TreeNode(ino, kind, 0, ino, [k for k, _ in items],
                                [v for _, v in items], is_root=True)
            else:
                if not self.alloc_ok:
                    raise OSError(errno.ENOSPC, "allocation map not trusted")
                level = 0
                chunks, cur, size = [], [], 0
                for k, v in items:
                    s = rsize(v)
                    if cur and size + s > leaf_cap:
                        chunks.append(cur)
                        cur, size = [], 0
                    cur.append((k, v))
                    size += s
                if cur:
                    chunks.append(cur)
                nodes = []
                for chunk in chunks:
                    (b, _n), = self._alloc(ino, 1, USED, C_META)
                    node = TreeNode(b, kind, 0, ino, [k for k, _ in chunk],
                                    [v for _, v in chunk])
                    nodes.append(node)
                    new_nodes.append(node)
                while len(nodes) * 16 > ROOT_CAPACITY:
                    level += 1
                    parents = []
                    for s in range(0, len(nodes), idx_cap):
                        group = nodes[s:s + idx_cap]
                        (b, _n), = self._alloc(ino, 1, USED, C_META)
                        node = TreeNode(b, kind, level, ino, [c.keys[0] for c in group],
                                        [c.bno for c in group])
                        parents.append(node)
                        new_nodes.append(node)
                    nodes = parents
                root = TreeNode(ino, kind, level + 1, ino, [c.keys[0] for c in nodes],
                                [c.bno for c in nodes], is_root=True)
        except OSError as e:
            for node in new_nodes:
                self._release(node.bno)
            self.report.unfix(why=str(e))
            return False
        self._flush_alloc()
        for node in new_nodes:
            self._write_obj(node)
        old = list(rec.nodes)
        di.root = root
        rec.nodes = [n.bno for n in new_nodes]
        rec.tree_bad = False
        self._recount_blocks(rec)
        self._write_obj(di)
        rec.dirty = False
        for b in old:
            if self.claims[b] == C_META:
                self._release(b)
        self._flush_alloc()
        return True

    def _recount_blocks(self, rec: Rec) -> int:
        di = rec.di
        n = len(rec.nodes) + (1 if di.xattr_block else 0)
        if rec.ext is not None and di.flags & DF_EXTENTS:
            n += sum(e[2] for e in rec.ext)
        di.blocks = n
        return n

    # -- doubly-claimed blocks (e2fsck pass 1b) ---------------------------------------

    def check_dup_blocks(self) -> None:
        rep = self.report
        if not self.dups:
            return
        dups = self.dups
        # who claims them?  metadata (the block's claim code) keeps its block
        claimants: dict[int, list[tuple[int, int]]] = {}   # block -> [(ino, ext index)]
        for ino in sorted(self.inodes):
            rec = self.inodes[ino]
            if not rec.ext:
                continue
            for i, (lb, pb, n) in enumerate(rec.ext):
                if n > 64 and not any(pb <= d < pb + n for d in dups):
                    continue
                for b in range(pb, pb + n):
                    if b in dups:
                        claimants.setdefault(b, []).append((ino, i))
        clone: dict[int, set[int]] = {}     # ino -> its dup blocks to copy
        for b in sorted(dups):
            cl = claimants.get(b, [])
            keep_first = self.claims[b] == C_DATA
            for k, (ino, _i) in enumerate(cl):
                if k == 0 and keep_first:
                    continue
                clone.setdefault(ino, set()).add(b)
        for ino in sorted(clone):
            rec = self.inodes[ino]
            blocks = sorted(clone[ino])
            others = sorted({o for b in blocks for o, _ in claimants.get(b, []) if o != ino}
                            | {-1 for b in blocks if self.claims[b] != C_DATA})
            who = ", ".join("metadata" if o < 0 else f"inode {o}" for o in others) or \
                "itself"
            msg = (f"inode {ino}: {len(blocks)} block(s) also claimed by {who} "
                   f"(first {blocks[0]})")
            if rep.problem("dup-blocks", msg, "give this file its own copy", safe=False,
                           ino=ino, block=blocks[0], count=len(blocks)):
                if not self.alloc_ok or not self._clone_blocks(rec, set(blocks)):
                    rep.unfix(why="no space for the copy" if self.alloc_ok else
                              "allocation map not trusted")

    def _clone_blocks(self, rec: Rec, blocks: set[int]) -> bool:
        ino = rec.di.bno
        new_ext = []
        copies = []
        try:
            for lb, pb, n in rec.ext:
                k = 0
                while k < n:
                    dup = (pb + k) in blocks
                    j = k
                    while j < n and ((pb + j) in blocks) == dup:
                        j += 1
                    if not dup:
                        new_ext.append([lb + k, pb + k, j - k])
                    else:
                        off = 0
                        for nb, nn in self._alloc(ino, j - k, USED, C_DATA):
                            copies.append((pb + k + off, nb, nn))
                            new_ext.append([lb + k + off, nb, nn])
                            off += nn
                    k = j
        except OSError:
            for _src, nb, nn in copies:
                self._release(nb, nn)
            return False
        self._flush_alloc()
        for src, dst, n in copies:
            for s in range(0, n, 256):
                c = min(256, n - s)
                data = self._read(src + s, c)
                if data is None:
                    data = b"".join(self._read(src + s + t) or bytes(BLOCK_SIZE)
                                    for t in range(c))
                self._write(dst + s, data)
        self.real.flush()
        rec.ext = new_ext
        ok = self._rebuild_tree(rec, EXTENT, [(l, (p, n, 0)) for l, p, n in new_ext])
        for b in blocks:
            self.dups.discard(b)
        return ok

    def check_xattr_blocks(self) -> None:
        rep = self.report
        for rec in sorted((r for r in self.inodes.values() if r.tree_issues), key=_BNO):
            ino = rec.di.bno
            for code, m in rec.tree_issues:
                if code != "xattr-block":
                    continue
                if rec.xattr_ok:
                    if rep.problem("xattr-block", f"inode {ino}: {m}", "rewrite it",
                                   safe=False, ino=ino):
                        self._rewrite_xattr_block(rec)
                    continue
                if rep.problem("xattr-block", f"inode {ino}: {m}",
                               "drop the extended attributes stored there", safe=False,
                               ino=ino):
                    rec.di.xattr_block = 0
                    self._recount_blocks(rec)
                    self._write_obj(rec.di)
                    self._free_deferred(rec)

    def _rewrite_xattr_block(self, rec: Rec) -> None:
        bno = rec.di.xattr_block
        buf = self._read(bno)
        try:
            xb, _ = salvage.decode_simple(buf, bno, BlockType.XATTR, XattrBlock.decode)
        except CorruptBlock:
            return
        self._write_obj(xb)

    def check_sizes(self) -> None:
        rep = self.report
        fixing = self.fixing
        look = []
        for rec in self.inodes.values():        # in memory order (about inode order)
            di = rec.di
            ext = rec.ext
            if len(ext or ()) == 1 and di.flags & DF_EXTENTS and not rec.nodes and \
                    not di.xattr_block and not (rec.dirty and fixing):
                # the common case, one extent: the checks below in short
                lblk, _pblk, n = ext[0]
                if di.blocks == n and lblk + n <= -(-di.size // BLOCK_SIZE) and \
                        di.size <= MAX_FILE_BLOCKS * BLOCK_SIZE:
                    continue
            look.append(rec)
        for rec in sorted(look, key=_BNO):
            di = rec.di
            ino = di.bno
            changed = False
            if di.flags & DF_EXTENTS and rec.ext is not None:
                end = max((e[0] + e[2] for e in rec.ext), default=0)
                if di.size > MAX_FILE_BLOCKS * BLOCK_SIZE:
                    if rep.problem("bad-size", f"inode {ino}: size {di.size} is impossible",
                                   f"set it to {end * BLOCK_SIZE}", ino=ino):
                        di.size = end * BLOCK_SIZE
                        changed = True
                elif end * BLOCK_SIZE > di.size and -(-di.size // BLOCK_SIZE) < end:
                    if rep.problem("bad-size", f"inode {ino}: size {di.size} ends before "
                                   f"its last mapped block ({end - 1})",
                                   f"set it to {end * BLOCK_SIZE}", ino=ino):
                        di.size = end * BLOCK_SIZE
                        changed = True
            want = len(rec.nodes) + (1 if di.xattr_block else 0)
            if di.flags & DF_EXTENTS and rec.ext is not None:
                want += sum(e[2] for e in rec.ext)
            if di.blocks != want:
                if rep.problem("block-count", f"inode {ino}: block count {di.blocks}, "
                               f"owns {want}", "fix it", safe=True, ino=ino):
                    di.blocks = want
                    changed = True
            if (changed or rec.dirty) and self.fixing and not (rec.tree_bad and
                                                              di.flags & DF_DIRTREE):
                self._write_obj(di)
                rec.dirty = False

    def check_generations(self) -> None:
        rep = self.report
        top: dict[int, int] = {}
        inos = list(self.inodes)                # in memory order: inode order but for
        gens = list(map(_GEN, self.inodes.values()))    # inodes found or made later
        if not all(map(lt, inos, islice(inos, 1, None))):
            inos, gens = map(list, zip(*sorted(zip(inos, gens))))
        # each group's inodes are a slice of the sorted list: its largest generation
        for rg in range(self.sb.rgrp_count):
            lo = bisect.bisect_left(inos, self.gstart[rg])
            hi = bisect.bisect_left(inos, self.gstart[rg] + self.glen[rg], lo)
            if hi > lo:
                top[rg] = max(gens[lo:hi])
        for rg, g in sorted(top.items()):
            hdr = self.hdrs[rg]
            if hdr.igeneration <= g:
                if rep.problem("igeneration", f"resource group {rg} would give generation "
                               f"{hdr.igeneration} to its next inode, but inode "
                               f"generation {g} is in use", f"set it to {g + 1}",
                               safe=True, block=self.gstart[rg]):
                    hdr.igeneration = g + 1
                    self.dirty_hdr.add(rg)
        if self.fixing:
            self._flush_alloc()

    # =================================================================================
    # Layer 5: Namespace
    # =================================================================================

    def _new_dinode(self, goal: int, mode: int, parent: int, at: int | None = None) -> Rec:
        """Create an empty directory dinode (allocated now, written by the caller)."""
        if at is not None:
            ino = at
            self._set_state(ino, DINODE)
            self.claims[ino] = C_DINODE
        else:
            (ino, _n), = self._alloc(goal, 1, DINODE, C_DINODE)
        rg = self.sb.rgrp_of(ino)
        hdr = self.hdrs[rg]
        gen = hdr.igeneration
        hdr.igeneration += 1
        self.dirty_hdr.add(rg)
        self._flush_alloc()
        t = time.time_ns()
        di = Dinode(ino, generation=gen, mode=mode, nlink=2, atime=t, mtime=t, ctime=t,
                    btime=t, flags=DF_DIRTREE, parent=parent,
                    root=TreeNode(ino, DIRENT, 0, ino, is_root=True))
        rec = Rec(di, [])
        rec.ext = None
        self.inodes[ino] = rec
        self.dir_inos.add(ino)
        return rec

    def check_root(self) -> None:
        rep, sb = self.report, self.sb
        self.dirty_dirs: set[int] = set()
        root = sb.root_ino
        rec = self.inodes.get(root)
        if rec is not None and S.S_ISDIR(rec.di.mode):
            if rec.di.parent != root:
                if rep.problem("root-parent", f"root directory's parent is "
                               f"{rec.di.parent}", "point it at itself", safe=True,
                               ino=root):
                    rec.di.parent = root
                    rec.dirty = True
            return
        why = "missing" if rec is None else "not a directory"
        if rec is not None:
            # a non-directory at the root's place: it keeps its block, we need another
            at = None
        else:
            at = root if (self._in_data(root) and self.claims[root] in (C_NONE, C_DEFER)
                          and self._state(root) in (FREE, DINODE, UNLINKED, 0xFF)) else None
        if not rep.problem("root", f"root directory (inode {root}) is {why}",
                           "create a new empty root directory (what it held is "
                           "reconnected under /lost+found)", safe=False, ino=root):
            self.no_root = True
            return
        if at is not None and self.claims[root] == C_DEFER:
            self._release(root)
        try:
            new = self._new_dinode(root, S.S_IFDIR | 0o755, 0, at=at)
        except OSError as e:
            rep.unfix(why=str(e))
            self.no_root = True
            return
        new.di.parent = new.di.bno
        self.bad_inodes.pop(new.di.bno, None)
        self._write_obj(new.di)
        if new.di.bno != sb.root_ino:
            sb.root_ino = new.di.bno
            self.write_primary = self.write_backup = True

    def _entry_name_fix(self, key: int, name: bytes) -> bytes | None:
        """A name whose one damaged byte can be recovered from the entry's hash."""
        h = key >> HASH_SHIFT
        for i in range(len(name)):
            for v in range(1, 256):
                if v == name[i] or v == 0x2F:
                    continue
                cand = name[:i] + bytes([v]) + name[i + 1:]
                if name_hash(cand) == h:
                    return cand
        return None

    def check_dir_entries(self) -> None:
        """Every directory's tree and entries: names, hashes, targets, types."""
        rep = self.report
        self.no_root = getattr(self, "no_root", False)
        total = 0
        dirs = self._dir_recs()
        rep.progress.start("Checking directories", len(dirs))
        step = rep.progress.step
        get, crc, root = self.inodes.get, name_hash, self.sb.root_ino
        for rec in dirs:
            step()
            di = rec.di
            ino = di.bno
            if not S.S_ISDIR(di.mode):
                continue
            changed = False
            msgs = [m for code, m in rec.tree_issues if code == "tree"]
            for m in msgs:
                changed |= rep.problem("dir-tree", f"directory {ino}: {m}",
                                       "rebuild the directory tree from its readable "
                                       "entries", safe=False, ino=ino)
            if rec.tree_bad and not msgs:
                changed = self.fixing       # a salvaged root (approved with the dinode)
            names: dict[bytes, int] = {}
            items = rec.items
            total += len(items)
            entries = None          # the records kept, made once one is not as read
            all_names = None
            if self._entries_plain(ino, items):
                items = ()          # every record as the common case below wants it
            for i, (key, val) in enumerate(items):
                child, dtype, name = val
                target = get(child)
                if target is not None and key >> HASH_SHIFT == crc(name) and \
                        child != root and child != ino and \
                        dtype == (target.di.mode >> 12) & 0xF and name not in names and \
                        b"/" not in name and b"\0" not in name and \
                        len(name) <= NAME_MAX and name != b"." and name != b"..":
                    # the common case, an entry with nothing to say (each check below)
                    names[name] = child
                    if entries is not None:
                        entries.append([key, child, dtype, name])
                    continue
                if entries is None:
                    entries = [[k, *v] for k, v in items[:i]]
                    all_names = {v[2] for _k, v in items}
                # the name
                bad_name = (b"/" in name or b"\0" in name or name in (b".", b"..")
                            or len(name) > NAME_MAX)
                want = name_hash(name)
                if key >> HASH_SHIFT != want or bad_name:
                    fixed_name = self._entry_name_fix(key, name)
                    if fixed_name is not None and (fixed_name in all_names or
                                                   b"/" in fixed_name or
                                                   b"\0" in fixed_name):
                        fixed_name = None
                    if fixed_name is not None:
                        if rep.problem("dir-entry-name", f"directory {ino}: entry "
                                       f"{name!r} does not match its hash", f"restore the "
                                       f"name {fixed_name!r} (one damaged byte)",
                                       safe=False, ino=ino):
                            name = fixed_name
                            changed = True
                    elif bad_name:
                        new = name.replace(b"/", b"_").replace(b"\0", b"_")
                        if new in (b".", b".."):
                            new = new + b"_"
                        if rep.problem("dir-entry-name", f"directory {ino}: invalid name "
                                       f"{name!r}", f"rename it {new!r}", safe=False,
                                       ino=ino):
                            name = new
                            changed = True
                    else:
                        if rep.problem("dir-hash", f"directory {ino}: entry {name!r} is "
                                       f"stored under hash {key >> HASH_SHIFT:#x}, its "
                                       f"name hashes to {want:#x}", "re-file it under the "
                                       "right hash", safe=False, ino=ino):
                            changed = True
                # the target
                target = self.inodes.get(child)
                if target is None:
                    why = ("a damaged dinode" if child in self.bad_inodes else
                           "a block that is not an inode")
                    if rep.problem("dangling-entry", f"directory {ino}: entry {name!r} "
                                   f"points at {why} ({child})", "remove the entry",
                                   safe=False, ino=ino):
                        changed = True
                        continue
                    entries.append([key, child, dtype, name])
                    continue
                if child == self.sb.root_ino or child == ino:
                    if rep.problem("dir-entry-loop", f"directory {ino}: entry {name!r} "
                                   f"points at " + ("the root" if child != ino else
                                                    "the directory itself"),
                                   "remove the entry", safe=False, ino=ino):
                        changed = True
                        continue
                tdt = dtype_of(target.di.mode)
                if dtype != tdt:
                    if rep.problem("dir-entry-type", f"directory {ino}: entry {name!r} "
                                   f"has type {dtype}, inode {child} is type {tdt}",
                                   "fix the type", safe=True, ino=ino):
                        dtype = tdt
                        changed = True
                if name in names:
                    k = 1
                    while name + b"~%d" % k in names:
                        k += 1
                    new = name + b"~%d" % k
                    if rep.problem("dup-entry", f"directory {ino}: two entries named "
                                   f"{name!r}", f"rename the second {new!r}",
                                   safe=False, ino=ino):
                        name = new
                        changed = True
                names[name] = child
                entries.append([key, child, dtype, name])
            if entries is not None:
                rec.items = [(k, (c, d, n)) for k, c, d, n in entries]
            if changed and self.fixing:
                self.dirty_dirs.add(ino)
                di.entries = len(rec.items)     # bookkeeping of the change just made
        self.stats["entries"] = total

    def _entries_plain(self, ino: int, items) -> bool:
        """Whether every record of directory ``ino`` is one that the record-by-record
        check of ``check_dir_entries`` passes with nothing to say: its target is a
        known inode (not the root, not the directory itself) of the type it names, its
        key holds its name's hash, and the names are distinct, legal and not "." or
        ".."."""
        if not items:
            return True
        keys, inos, dtypes, names = entry_columns(items)
        n = len(names)
        pointed = set(inos)
        if self.sb.root_ino in pointed or ino in pointed:
            return False
        distinct = sorted(pointed)      # looked up in inode order: the order in memory
        m = len(distinct)
        targets = list(map(self.inodes.get, distinct))
        if None in targets:
            return False
        if list(map(rshift, keys, repeat(HASH_SHIFT, n))) != list(map(name_hash, names)):
            return False
        dtype_of_ino = dict(zip(distinct, map(and_, map(rshift, map(_MODE, targets),
                                                        repeat(12, m)), repeat(0xF, m))))
        if list(map(dtype_of_ino.__getitem__, inos)) != dtypes:
            return False
        unique = set(names)
        if len(unique) != n or b"." in unique or b".." in unique:
            return False
        joined = b"/".join(names)       # n - 1 slashes: no name holds one
        return joined.count(b"/") == n - 1 and b"\0" not in joined and \
            max(map(len, names)) <= NAME_MAX

    def _rekey(self, items) -> list:
        """Sorted (key, value) records with keys that match the names' hashes."""
        out = []
        used: dict[int, set[int]] = {}
        pending = []
        for key, val in items:
            h = name_hash(val[2])
            cidx = key & ((1 << HASH_SHIFT) - 1)
            if key >> HASH_SHIFT == h and cidx not in used.setdefault(h, set()):
                used[h].add(cidx)
                out.append((key, val))
            else:
                pending.append((h, val))
        for h, val in pending:
            s = used.setdefault(h, set())
            c = 0
            while c in s:
                c += 1
            s.add(c)
            out.append(((h << HASH_SHIFT) | c, val))
        out.sort(key=lambda kv: kv[0])
        return out

    def check_connectivity(self) -> None:
        """Walk from the root; reconnect what cannot be reached under /lost+found."""
        rep = self.report
        inodes = self.inodes
        root = self.sb.root_ino
        self.lost_found: Rec | None = None
        if self.no_root or root not in inodes:
            return
        for rec in inodes.values():
            if rec.reached or rec.where is not None:
                rec.reached = False
                rec.where = None
        self._where = None
        self.n_reached = 0
        self._bfs(root)
        if self.n_reached == len(inodes):
            self.stats["reachable"] = len(inodes)      # all of them: nothing to look for
            return
        # directories not reached: reconnect the topmost of each unreachable subtree
        dirs = [r for r in inodes.values() if not r.reached and
                r.di.mode & 0o170000 == S.S_IFDIR and r.di.flags & DF_DIRTREE]
        if dirs:
            holder: dict[int, int] = {}      # dir -> a directory holding an entry to it
            for r in inodes.values():
                if S.S_ISDIR(r.di.mode) and r.di.flags & DF_DIRTREE and not r.reached:
                    for _k, (c, _d, _n) in r.items:
                        if c in inodes and S.S_ISDIR(inodes[c].di.mode) and \
                                inodes[c].di.flags & DF_DIRTREE:
                            holder.setdefault(c, r.di.bno)
            for r in sorted(dirs, key=lambda r: r.di.bno):
                if r.reached:
                    continue
                top = r.di.bno
                seen = {top}
                while holder.get(top) is not None and holder[top] not in seen and \
                        not inodes[holder[top]].reached:
                    top = holder[top]
                    seen.add(top)
                trec = inodes[top]
                if not trec.items and trec.di.nlink == 0:
                    continue        # an empty removed directory: an orphan
                if rep.problem("unreachable-dir", f"directory {top} cannot be reached "
                               f"from the root", f"reconnect it as /lost+found/#{top}",
                               safe=False, ino=top):
                    if self._reconnect(trec):
                        self._bfs(top)
        # other inodes with no entry in a reachable directory
        for ino in sorted(i for i, r in inodes.items() if not r.reached):
            r = inodes[ino]
            if S.S_ISDIR(r.di.mode) and r.di.flags & DF_DIRTREE:
                continue
            if r.di.nlink == 0:
                continue            # an orphan: freed below
            if rep.problem("unreachable-inode", f"inode {ino} ({self._kind(r)}) is "
                           f"linked from no directory", f"reconnect it as "
                           f"/lost+found/#{ino}", safe=False, ino=ino):
                if self._reconnect(r):
                    r.reached = True
        self.stats["reachable"] = sum(1 for r in inodes.values() if r.reached)

    @staticmethod
    def _kind(rec: Rec) -> str:
        m = rec.di.mode
        if S.S_ISREG(m):
            return f"regular file of {rec.di.size} bytes"
        if S.S_ISDIR(m):
            return "directory"
        if S.S_ISLNK(m):
            return "symbolic link"
        return "special file"

    def _bfs(self, start: int) -> None:
        """Mark what ``start`` reaches; a directory reached twice loses the extra entry.

        Directories are walked whole: the records that point at directories (with
        trees) one by one, in order; the other targets as a set.  A directory's
        ``where`` is the entry it was reached by; other inodes find theirs when a
        report needs a path (``_path``).
        """
        rep = self.report
        inodes = self.inodes
        get = inodes.get
        walked = {r.di.bno for r in self._dir_recs() if r.di.mode & 0o170000 == S.S_IFDIR}
        reached = 0 if inodes[start].reached else 1     # records newly marked
        inodes[start].reached = True
        queue = [start]
        while queue:
            d = queue.pop()
            drec = inodes[d]
            items = drec.items
            targets = set(entry_inos(items))
            subdirs = targets & walked
            if subdirs:
                targets -= subdirs
                drop = []           # indexes of entries removed
                for i, (_key, (c, _dt, name)) in enumerate(items):
                    if c not in subdirs:
                        continue
                    crec = inodes[c]
                    if crec.reached:
                        if rep.problem("dir-hard-link", f"directory {d}: entry {name!r} "
                                       f"is a second link to directory {c}",
                                       "remove the entry", safe=False, ino=d):
                            drop.append(i)
                        continue
                    crec.reached = True
                    reached += 1
                    crec.where = (d, name)
                    queue.append(c)
                if drop:
                    gone = set(drop)
                    drec.items = [r for i, r in enumerate(items) if i not in gone]
                    drec.di.entries = len(drec.items)
                    self.dirty_dirs.add(d)
            for crec in map(get, sorted(targets)):     # in inode order: memory order
                if crec is not None and not crec.reached:
                    crec.reached = True
                    reached += 1
        self.n_reached += reached

    def _get_lost_found(self) -> Rec | None:
        if self.lost_found is not None:
            return self.lost_found
        root = self.inodes[self.sb.root_ino]
        name = b"lost+found"
        taken = {n for _k, (_c, _d, n) in root.items}
        for _k, (c, _d, n) in root.items:
            if n == name and c in self.inodes and S.S_ISDIR(self.inodes[c].di.mode):
                self.lost_found = self.inodes[c]
                return self.lost_found
        k = 0
        while name in taken:
            k += 1
            name = b"lost+found~%d" % k
        if not self.alloc_ok:
            return None
        try:
            lf = self._new_dinode(root.di.bno, S.S_IFDIR | 0o700, root.di.bno)
        except OSError:
            return None
        lf.reached = True
        lf.where = (root.di.bno, name)
        self._write_obj(lf.di)
        self._add_entry(root, lf, name)
        self.lost_found = lf
        self.report.note(f"  created /{name.decode()} (inode {lf.di.bno})")
        return lf

    def _add_entry(self, drec: Rec, crec: Rec, name: bytes) -> None:
        h = name_hash(name)
        used = {k & 0xFFFF for k, _ in drec.items if k >> HASH_SHIFT == h}
        c = 0
        while c in used:
            c += 1
        key = (h << HASH_SHIFT) | c
        items = list(drec.items)
        items.append((key, (crec.di.bno, dtype_of(crec.di.mode), name)))
        items.sort(key=lambda kv: kv[0])
        drec.items = items
        self.dirty_dirs.add(drec.di.bno)
        drec.di.entries = len(drec.items)
        if S.S_ISDIR(crec.di.mode):
            drec.di.nlink += 1          # the new subdirectory's '..'
        drec.dirty = True

    def _reconnect(self, rec: Rec) -> bool:
        lf = self._get_lost_found()
        if lf is None:
            self.report.unfix(why="cannot create /lost+found")
            return False
        name = b"#%d" % rec.di.bno
        self._add_entry(lf, rec, name)
        if S.S_ISDIR(rec.di.mode):
            rec.di.parent = lf.di.bno
            rec.dirty = True
        rec.where = (lf.di.bno, name)
        return True

    def check_link_counts(self) -> None:
        rep = self.report
        if self.no_root:
            return
        inodes = self.inodes
        # entries in reached directories, counted by target; subdirectories by parent
        links: Counter = Counter()
        subdirs: dict[int, int] = {}
        parent_of: dict[int, int] = {}
        is_dir = {d for d in self.dir_inos
                  if d in inodes and inodes[d].di.mode & 0o170000 == S.S_IFDIR}.__contains__
        for drec in self._dir_recs():
            if not drec.reached:
                continue
            d = drec.di.bno
            targets = entry_inos(drec.items)
            links.update(targets)
            if any(map(is_dir, targets)):
                for c in filter(is_dir, targets):
                    subdirs[d] = subdirs.get(d, 0) + 1
                    parent_of[c] = d
        root = self.sb.root_ino
        # the blocks the bitmaps mark "unlinked" (few): the last check below
        marked_unlinked = set()
        for rg, st in enumerate(self.states):
            if st is not None:
                base = self.gstart[rg]
                marked_unlinked.update(base + m.start() for m in _UNLINKED_STATE.finditer(st))
        # the inodes with something to look at below: directories, those the bitmaps
        # mark unlinked, and those whose link count is not the count of their entries
        # (the rest, nearly all, are passed over whole, in memory order)
        look = set(compress(inodes, map(ne, map(_NLINK, inodes.values()),
                                        map(links.get, inodes, repeat(0)))))
        look.update(d for d in self.dir_inos if d in inodes)
        look.update(i for i in marked_unlinked if i in inodes)
        for ino in sorted(look):
            r = inodes[ino]
            di = r.di
            if not r.reached:
                continue
            if di.mode & 0o170000 == S.S_IFDIR:
                want = 2 + subdirs.get(ino, 0)
                par = root if ino == root else parent_of.get(ino)
                if par is not None and di.parent != par:
                    if rep.problem("dir-parent", f"directory {ino}: '..' is {di.parent}, "
                                   f"its entry is in directory {par}", f"set '..' to {par}",
                                   safe=True, ino=ino):
                        di.parent = par
                        r.dirty = True
                nent = len(r.items)
                if di.entries != nent:
                    if rep.problem("dir-entries", f"directory {ino}: entry count "
                                   f"{di.entries}, holds {nent}", "fix it", safe=True,
                                   ino=ino):
                        di.entries = nent
                        r.dirty = True
            else:
                want = links[ino]
            if di.nlink != want and want > 0:
                if rep.problem("link-count", f"inode {ino}: link count {di.nlink}, "
                               f"should be {want}", f"set it to {want}", safe=False,
                               ino=ino):
                    di.nlink = min(want, LINK_MAX) if not S.S_ISDIR(di.mode) else want
                    r.dirty = True
            if di.nlink and ino in marked_unlinked and self._state(ino) == UNLINKED:
                if rep.problem("unlinked-state", f"inode {ino} is marked unlinked but has "
                               f"{di.nlink} link(s)", "mark it in use", safe=True, ino=ino):
                    self._set_state(ino, DINODE)
                    self.claims[ino] = C_DINODE

    def check_orphans(self) -> None:
        """Inodes nothing links to and whose link count is 0 are freed."""
        rep = self.report
        if self.no_root:
            return
        if all(r.reached for r in self.inodes.values()):
            return                  # an orphan is an inode nothing reaches
        for ino in sorted(self.inodes):
            r = self.inodes[ino]
            if r.reached or r.di.nlink != 0:
                continue
            state = self._state(ino)
            what = "unlinked inode" if state == UNLINKED else "inode with no links"
            if rep.problem("orphan", f"inode {ino}: {what} ({self._kind(r)}) not freed",
                           "free it", safe=True, ino=ino):
                self._free_inode(r)
        for ino in [i for i, r in self.inodes.items() if r.di.nlink == 0 and not r.reached
                    and self.claims[i] == C_NONE]:
            del self.inodes[ino]

    def _free_inode(self, rec: Rec) -> None:
        """Free a dinode and everything it holds (the dinode first)."""
        di = rec.di
        self._release(di.bno)
        self._flush_alloc()
        if rec.ext:
            for _l, p, n in rec.ext:
                if not self.dups or not any(p <= d < p + n for d in self.dups):
                    self._release(p, n)
                else:
                    for b in range(p, p + n):
                        if b not in self.dups:
                            self._release(b)
        for b in rec.nodes:
            self._release(b)
        if di.xattr_block and rec.xattr_ok and self.claims[di.xattr_block] == C_META:
            self._release(di.xattr_block)
        for b in rec.deferred:
            if self.claims[b] == C_DEFER:
                self._release(b)
        self._flush_alloc()

    def check_dir_writeback(self) -> None:
        """Write the directories and dinodes changed by this layer."""
        if not self.fixing:
            return
        for ino in sorted(getattr(self, "dirty_dirs", ())):
            rec = self.inodes.get(ino)
            if rec is None:
                continue
            items = self._rekey(rec.items)
            rec.items = items
            rec.di.entries = len(items)
            if not self._rebuild_tree(rec, DIRENT, items):
                continue
            self._free_deferred(rec)
        for ino in sorted(self.inodes):
            rec = self.inodes[ino]
            if rec.dirty and self.claims[ino] in (C_DINODE, C_UNLINKED):
                if rec.di.flags & DF_DIRTREE and rec.tree_bad:
                    items = self._rekey(rec.items)
                    rec.items = items
                    rec.di.entries = len(items)
                    self._rebuild_tree(rec, DIRENT, items)
                    continue
                if rec.di.flags & DF_DIRTREE:
                    self._recount_blocks(rec)
                self._write_obj(rec.di)
                rec.dirty = False
        self._flush_alloc()
        self.real.flush()

    # =================================================================================
    # Layer 6: Data surface scan
    # =================================================================================

    def check_data_extents(self) -> None:
        rep = self.report
        total = sum(e[2] for r in self.inodes.values() if r.ext for e in r.ext)
        rep.progress.start("Reading data", total)
        scanned = bad_total = 0
        CH = 256
        for ino in sorted(self.inodes):
            rec = self.inodes[ino]
            if not rec.ext:
                continue
            bad = []
            for lb, pb, n in rec.ext:
                for s in range(0, n, CH):
                    c = min(CH, n - s)
                    try:
                        self.dev.read(pb + s, c)
                    except OSError:
                        for t in range(c):
                            try:
                                self.dev.read(pb + s + t, 1)
                            except OSError:
                                bad.append((lb + s + t, pb + s + t))
                    scanned += c
                    rep.progress.step(c)
            if bad:
                bad_total += len(bad)
                runs = []
                for lb, pb in bad:
                    if runs and runs[-1][1] + runs[-1][2] == pb:
                        runs[-1][2] += 1
                    else:
                        runs.append([lb, pb, 1])
                desc = ", ".join(f"blocks {p}-{p + n - 1} (file blocks {l}-{l + n - 1})"
                                 for l, p, n in runs)
                path = self._path(ino)
                rep.problem("unreadable-data", f"inode {ino}"
                            + (f" ({path})" if path else "") + f": unreadable {desc}",
                            "", ino=ino, block=runs[0][1], count=len(bad), path=path)
        self.stats["scanned_blocks"] = scanned
        self.stats["bad_blocks"] = bad_total

    def _path(self, ino: int) -> str | None:
        parts = []
        seen = set()
        root = self.sb.root_ino
        while ino != root:
            rec = self.inodes.get(ino)
            where = None if rec is None or not rec.reached else \
                rec.where or self._entry_of(ino)
            if where is None or ino in seen:
                return None
            seen.add(ino)
            parent, name = where
            parts.append(name.decode(errors="replace"))
            ino = parent
        return "/" + "/".join(reversed(parts))

    def _entry_of(self, ino: int):
        """(directory, name) of one entry in a reached directory pointing at ``ino``
        (None if there is none).  The map is made at the first question, after the
        namespace layer, for the few paths reports name."""
        if self._where is None:
            where: dict[int, tuple[int, bytes]] = {}
            for drec in self._dir_recs():
                if drec.reached:
                    for _k, (c, _dt, name) in drec.items:
                        where.setdefault(c, (drec.di.bno, name))
            self._where = where
        return self._where.get(ino)
