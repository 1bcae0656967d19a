"""The driver: ``Fsck.check()`` runs the passes of each layer in order.

Layers (a module each; ``LAYERS`` lists each one's passes, functions of the run's
``State``, in the order they run):

1. Volume       superblock and backup, revision, geometry against the device, the
                slot table (slots added after mkfs)
2. Cluster      slot heartbeats (live nodes refuse repair), journals of dead nodes,
                an interrupted grow (finished)
3. Allocation   group headers and bitmaps; a read-only scan of every dinode and tree
                builds the map of referenced blocks; bitmaps and counters against it
4. Inodes       dinode checksums and fields, extent trees, extents (range, overlap),
                blocks claimed as metadata and data (each extent gets its own copy),
                shared blocks (flags, reference counts, refcount trees), xattr
                blocks, sizes, block counts, generations
5. Namespace    root, directory trees and hashes, entries, connectivity (lost+found),
                link counts, orphans
6. Data         (--scan-data) every allocated data extent is read

Beside the layers: ``state`` (what the passes share), ``records`` (what is kept of
each inode), ``claims`` (the map of referenced blocks), ``treewalk`` (the tolerant
walk of trees), ``shared`` (refcount trees and shared blocks, passes of layers 3 and
4), ``allocator`` (bitmaps as repairs change them), ``repairs`` (repairs more than
one layer makes), ``salvage`` (tolerant decoding of damaged blocks).

Repairs write straight to the device through the format classes (no journal), in an
order that a crash of fsck itself leaves repairable: blocks are allocated (bitmap
written) before anything points at them, pointers are removed before their blocks
are freed, and the primary superblock is written last.  While it repairs, fsck holds
the host-local lock of the volume and keeps a heartbeat in a free slot, so that no
node mounts the volume meanwhile (and an fsck that died is seen as an unclean stop).
"""

from __future__ import annotations

import fcntl
import gc
import logging
import os
import traceback

from clusterfs.ondisk import blockhdr
from clusterfs.ondisk.blockdev import BlockDevice

from . import allocation, allocator, cluster, datascan, inodes, namespace, shared, volume
from .device import OverlayDevice
from .report import Cancelled, FsckError, Report, Unexpected
from .state import State

log = logging.getLogger(__name__)

# (layer, its summary line, its passes in order)
LAYERS = (
    (1, volume.summary, (volume.check_superblock, volume.check_geometry,
                         volume.check_slot_table)),
    (2, cluster.summary, (cluster.check_slot_heartbeats, cluster.check_lease,
                          cluster.check_journals, cluster.finish_grow,
                          cluster.check_clean)),
    (3, allocation.summary, (allocation.check_rgrp_headers, shared.scan_refcount_trees,
                             allocation.scan_metadata, allocation.check_bitmaps,
                             allocation.check_rgrp_counts)),
    (4, inodes.summary, (inodes.check_dinodes, inodes.check_extents,
                         inodes.check_dup_blocks, shared.check_shared_blocks,
                         inodes.check_xattr_blocks, inodes.check_sizes,
                         inodes.check_generations)),
    (5, namespace.summary, (namespace.check_root, namespace.check_dir_entries,
                            namespace.check_connectivity, namespace.check_link_counts,
                            namespace.check_orphans, namespace.check_dir_writeback)),
    (6, datascan.summary, (datascan.check_data_extents,)),
)
DATA_LAYER = 6          # run only when asked (``scan_data``)


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
        device: a device to check instead of opening ``path`` (left open).
    """

    def __init__(self, path: str, *, mode: str = "n", force: bool = False,
                 scan_data: bool = False, report: Report | None = None,
                 live_watch: float | None = None, hold_slot: bool = True,
                 device=None):
        self.state = State(path=path, mode=mode, report=report or Report(mode, quiet=True),
                           force=force, scan_data=scan_data, live_watch=live_watch,
                           hold_slot=hold_slot, given_dev=device)
        self.internal_error: str | None = None   # the traceback of an internal error

    @property
    def stats(self) -> dict:
        """Counts of the run (summaries, the JSON report)."""
        return self.state.stats

    def check(self) -> int:
        """Run every layer in order; returns the exit status (see ``report``)."""
        s = self.state
        rep = s.report
        s.stats["crc32c"] = blockhdr.CRC32C_IMPL
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
            _open(s)
            for layer, summary, passes in LAYERS:
                if s.clean_skip:
                    break
                if layer == DATA_LAYER and not s.scan_data:
                    continue
                rep.begin_layer(layer)
                for run in passes:
                    run(s)
                    if s.clean_skip:
                        break
                if rep.current is not None:
                    rep.end_layer(summary(s))
            _finish(s)
        except FsckError as e:
            rep.operational_error = str(e)
            rep.progress.clear()
            rep.say(f"{s.path}: {e}")
        except Cancelled:
            rep.cancelled = True
            rep.say(f"{s.path}: cancelled by the user")
            _finish(s, abort=True)
        except Unexpected:
            rep.say(f"{s.path}: UNEXPECTED INCONSISTENCY; RUN fsck MANUALLY "
                    f"(without -p)")
            _finish(s, abort=True)
        except Exception as e:      # never a traceback for the user; kept for tests
            self.internal_error = traceback.format_exc()
            log.debug("internal error:\n%s", self.internal_error)
            rep.operational_error = f"internal error: {type(e).__name__}: {e}"
            rep.progress.clear()
            rep.say(f"{s.path}: fsck failed: {type(e).__name__}: {e}")
            try:
                _finish(s, abort=True)
            except Exception:
                pass
        finally:
            _close(s)
            if gc_was:
                gc.freeze()
                gc.unfreeze()
                gc.enable()
        code = rep.exit_code()
        if not s.clean_skip and rep.operational_error is None:
            _final_line(s)
        return code


def _final_line(s: State) -> None:
    if s.sb is None:
        return
    total = sum(s.sb.rgrp_range(i)[1] for i in range(s.sb.rgrp_count))
    used = total - sum(h.free for h in s.hdrs if h is not None)
    s.report.say(f"{s.path}: {len(s.inodes)} inodes, {used}/{total} blocks")
    if s.modified:
        s.report.say(f"***** {s.path}: VOLUME WAS MODIFIED *****")


# -- opening and closing ---------------------------------------------------------------

def _open(s: State) -> None:
    if s.given_dev is not None:
        s.real = s.given_dev
    else:
        try:
            s.real = BlockDevice(s.path, readonly=s.mode == "n")
        except OSError as e:
            raise FsckError(f"cannot open {s.path}: {e.strerror or e}") from None
        if s.mode != "n":
            _lock_host(s)
    if s.real.nblocks < 2:
        raise FsckError("too small to hold a clusterfs volume")
    s.dev = OverlayDevice(s.real) if s.mode == "n" else s.real


def _lock_host(s: State) -> None:
    s.lockfd = os.open(s.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(s.lockfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        s.host_busy = True          # refused after the heartbeats name the node


def _close(s: State) -> None:
    cluster.release_slot(s)
    if s.real is not None and s.given_dev is None:
        s.real.close()
    if s.lockfd >= 0:
        os.close(s.lockfd)
        s.lockfd = -1


def _finish(s: State, abort: bool = False) -> None:
    """Write the superblocks (backup first, primary last) and flush."""
    if s.sb is None or s.mode == "n" or s.dev is not s.real:
        return
    if not abort:
        shared.flush(s)
    if not abort or s.modified:
        allocator.flush(s)
    if s.write_backup or s.write_primary:
        s.sb.seq = max(s.sb.seq, 1)
        s.real.flush()
        s.real.write(s.sb.backup_bno, s.sb.image(s.sb.backup_bno))
        s.real.flush()
        if s.write_primary:
            s.real.write(0, s.sb.image(0))
        s.modified = True
    s.real.flush()
