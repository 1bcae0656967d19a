"""fsck: the multi-layer checker and repairer of clusterfs volumes.

``clusterfs fsck VOLUME [-n | -y | -p] [-f] [--scan-data] [--json FILE]`` checks a
volume layer by layer (volume, cluster, allocation, inodes and extents, namespace,
data surface) and repairs what it finds.  It reads the volume only through the format
classes of ``clusterfs.ondisk.format`` (one parser).

Modules:
    checker  the ``Fsck`` class: ``check()`` runs every layer's passes in order
    salvage  tolerant decoding of damaged blocks (through the format classes)
    device   an in-memory overlay device (``-n`` replays journals into it) and
             batched, error-tolerant reads
    report   findings, answers (-n/-y/-p/interactive), exit status, JSON report
    cli      the ``fsck`` subcommand
"""

from .checker import Fsck
from .report import Report

__all__ = ["Fsck", "Report"]
