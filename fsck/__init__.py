"""fsck: the multi-layer checker and repairer of clusterfs volumes.

``clusterfs fsck VOLUME [-n | -y | -p] [-f] [--scan-data] [--json FILE]`` checks a
volume layer by layer (volume, cluster, allocation, inodes and extents, namespace,
data surface) and repairs what it finds.  It reads the volume only through the format
classes of ``clusterfs.ondisk.format`` (one parser).

Modules:
    checker     the driver, ``Fsck``: ``check()`` runs every layer's passes in order
    volume      layer 1: superblocks, revision, geometry
    cluster     layer 2: slot heartbeats, journals of dead nodes, fsck's own slot
    allocation  layer 3: group headers and bitmaps, the scan of every dinode and
                tree, bitmaps and counters against the map of referenced blocks
    inodes      layer 4: dinode fields, extents, doubly-claimed blocks, xattr
                blocks, sizes, block counts, generations
    namespace   layer 5: root, directory entries, connectivity, link counts, orphans
    datascan    layer 6: every allocated data extent is read
    state       everything the passes share, declared in one place
    records     what is kept of each inode (``Rec``)
    claims      the map of referenced blocks; extents claim their blocks
    treewalk    the tolerant walk of an inode's trees and xattr block
    allocator   the bitmaps as repairs change them (allocate, free, write back)
    repairs     repairs more than one layer makes (trees, inodes, directories)
    salvage     tolerant decoding of damaged blocks (through the format classes)
    parallel    dinodes read and decoded by forked processes
    device      an in-memory overlay device (``-n`` replays journals into it) and
                batched, error-tolerant reads
    report      findings, answers (-n/-y/-p/interactive), exit status, JSON report
    cli         the ``fsck`` subcommand
"""

from .checker import Fsck
from .report import Report

__all__ = ["Fsck", "Report"]
