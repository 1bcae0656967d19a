"""A per-node-slot write-ahead metadata journal: a physical REDO log in JBD2 style.

The byte-level format is ``docs/JOURNAL-FORMAT.md``; ``journal.format`` holds its
constants and codecs.  In short: the region ``[start, start+length)`` holds a header
block and a circular log of transactions; a transaction is descriptor blocks (each
followed by the block images it tags), revoke blocks and a commit block, all sealed
with the common block header and the transaction's sequence number.

Writing (``open`` .. ``close``):

* ``add``/``revoke`` build the running transaction in memory.
* ``commit`` writes descriptors, images and revokes, flushes, writes the commit block
  and flushes again.  The flush before the commit block also makes every file-data
  write issued before ``commit`` durable, so data always reaches the device before
  the metadata that points at it commits (ordered mode).
* ``seal`` is ``commit`` in two steps: the transaction is closed at once and its
  writes (``SealedCommit.write``) can run on another thread while the next
  transaction fills; every later call that does I/O finishes them first.
* Committed images stay in memory until ``checkpoint`` writes them home, flushes and
  advances the header's tail (flushed again before the log space is reused).

Recovery (``replay``), in order:

1. Read the header; if it is clean there is nothing to do.
2. Walk the log from the header's tail, one transaction per expected sequence number,
   verifying every block (common header crc32c, image crc32c from its tag, the commit
   block's count, start and transaction crc32c).
3. Where the walk stops, sweep the whole log region: a valid block of this journal with
   a higher sequence number means the stopped transaction was committed and then
   damaged: raise ``JournalCorrupt`` naming the block.  Otherwise the stop is the end
   of the log, and a partly written transaction there is a torn tail: dropped.
4. Build the revoke table (block -> highest revoking seq) and keep, per home block, the
   newest image not suppressed by a later revoke.
5. Write those images home, flush.
6. Write the header: clean, tail at the end of the walk, next sequence number above
   every sequence number seen in the region (so stale blocks are never mistaken for
   new ones); flush.

A power cut anywhere in 5-6 leaves the old header, so replay simply runs again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from typing import NamedTuple, Protocol, Union

from clusterfs.ondisk.blockhdr import BLOCK_SIZE, HEADER, MAGIC, BlockType, crc32c, crc_ok

from .errors import JournalAborted, JournalCorrupt, JournalError
from .format import (FORMAT_VERSION, LOG_TYPES, MIN_LENGTH, REVOKES_PER_BLOCK,
                     TAGS_PER_DESCRIPTOR, JournalHeader, log_block_journal_id, pack_commit,
                     pack_descriptor, pack_revoke, transaction_blocks, unpack_commit,
                     unpack_revokes, unpack_tags)

_SWEEP_CHUNK = 256      # blocks per read when sweeping the log region


class ImageSource(Protocol):
    """A block whose contents are taken when the transaction commits."""

    def image(self) -> bytes:
        """The block's current 4096 bytes."""


Source = Union[bytes, bytearray, memoryview, ImageSource]


@dataclasses.dataclass
class TornTail:
    """A transaction at the end of the log that never committed (dropped by replay)."""

    seq: int        #: its sequence number
    pos: int        #: log index of its first block
    bno: int        #: absolute block number where the walk stopped
    reason: str     #: what was wrong with that block
    blocks: int     #: blocks of the transaction found intact before ``bno``


@dataclasses.dataclass
class ReplayReport:
    """What ``scan`` found, or what ``replay`` did.

    ``blocks`` maps each home block that replay writes to the sequence number of the
    transaction whose image it writes (the newest one not revoked later).
    """

    clean: bool = False                 #: the header was clean: nothing was examined
    replayed: bool = False              #: images were written home (``replay``)
    tail_seq: int = 0                   #: where the walk started
    tail_pos: int = 0
    transactions: int = 0               #: committed transactions found
    seqs: list[int] = dataclasses.field(default_factory=list)
    blocks: dict[int, int] = dataclasses.field(default_factory=dict)
    images: int = 0                     #: images in those transactions (before revokes)
    revoked: set[int] = dataclasses.field(default_factory=set)  #: revoke records seen
    suppressed: int = 0                 #: images skipped because of a later revoke
    end_pos: int = 0                    #: log index just past the last committed txn
    end_reason: str = ""                #: why the walk stopped there
    torn: TornTail | None = None        #: the dropped torn tail, if any
    next_seq: int = 0                   #: first sequence number after replay

    def summary(self) -> str:
        """One line for logs and fsck output."""
        if self.clean:
            return "journal clean: nothing to replay"
        verb = "replayed" if self.replayed else "would replay"
        msg = (f"{verb} {self.transactions} transaction(s)"
               + (f" (seq {self.seqs[0]}..{self.seqs[-1]})" if self.seqs else "")
               + f", {len(self.blocks)} block(s), {self.suppressed} revoked image(s) skipped")
        if self.torn is not None:
            msg += (f"; dropped torn transaction {self.torn.seq} at block {self.torn.bno}"
                    f" ({self.torn.reason})")
        return msg


@dataclasses.dataclass
class _Txn:
    """A committed transaction found by the log walk."""

    seq: int
    pos: int
    nblocks: int                        # commit block included
    images: list[tuple[int, bytes]]
    revokes: list[int]


class _Stop(NamedTuple):
    """Where and why the walk stopped inside (or at the start of) a transaction."""

    bno: int
    reason: str
    claimed: bool       # some block there belongs to the expected transaction


class Journal:
    """The journal of one node slot, in the region ``[start, start+length)`` of ``dev``.

    Args:
        dev: a block device (``read``, ``write``, ``flush``, ``nblocks``).
        start: absolute block number of the journal header.
        length: blocks in the region, header included (at least ``MIN_LENGTH``).
        slot: the node slot that owns the journal; the header must agree.

    Raises:
        ValueError: the region is too small or outside the device.
    """

    def __init__(self, dev, start: int, length: int, *, slot: int = 0):
        _check_region(dev, start, length)
        self.dev = dev
        self.start = start
        self.length = length
        self.slot = slot
        self.log_size = length - 1          # circular log: indexes 0 .. log_size-1
        self._open = False
        self._aborted: BaseException | None = None
        self._hdr: JournalHeader | None = None
        self._journal_id = 0
        self._tail_pos = 0                  # first block of the oldest txn in the log
        self._head_pos = 0                  # where the next txn goes
        self._used = 0                      # log blocks from tail to head
        self._next_seq = 0
        self._running: dict[int, Source] = {}
        self._running_revokes: set[int] = set()
        self._sealed: SealedCommit | None = None  # sealed, maybe not yet written
        self._pending: dict[int, bytes] = {}    # committed images not yet written home
        self._in_log: set[int] = set()          # blocks with an image between tail and head
        self._stats = dict(commits=0, blocks_logged=0, revokes_logged=0,
                           log_blocks_written=0, checkpoints=0, blocks_checkpointed=0,
                           flushes=0)

    # -- format and header ------------------------------------------------------------

    @staticmethod
    def format(dev, start: int, length: int, *, slot: int = 0) -> None:
        """Write an empty, clean journal header.

        The log blocks are not touched (mkfs of a large volume stays fast): a fresh
        random ``journal_id`` keeps blocks left over from an earlier journal in the
        same place from ever being taken for this one's.

        Args:
            dev: the block device.
            start: absolute block number of the header.
            length: blocks in the region, header included.
            slot: node slot number recorded in the header.

        Raises:
            ValueError: the region is too small or outside the device.
        """
        _check_region(dev, start, length)
        journal_id = 0
        while journal_id == 0:
            journal_id = int.from_bytes(os.urandom(8), "little")
        hdr = JournalHeader(version=FORMAT_VERSION, slot=slot, start=start, length=length,
                            journal_id=journal_id, tail_seq=1, tail_pos=0, next_seq=1,
                            clean=True, mount_count=0, open_ns=0, close_ns=0, owner="")
        dev.write(start, hdr.pack())
        dev.flush()

    def read_header(self) -> JournalHeader:
        """Read and validate the header block.

        Returns:
            The decoded header.

        Raises:
            JournalCorrupt: the header block is unreadable, fails its checks or
                describes another slot or region.
        """
        try:
            buf = self.dev.read(self.start)
        except OSError as exc:
            raise JournalCorrupt(self.start, f"journal header unreadable: {exc}") from None
        hdr = JournalHeader.unpack(buf, self.start)
        problem = None
        if hdr.slot != self.slot:
            problem = f"belongs to slot {hdr.slot}, expected slot {self.slot}"
        elif hdr.start != self.start or hdr.length != self.length:
            problem = (f"describes region {hdr.start}+{hdr.length}, "
                       f"expected {self.start}+{self.length}")
        elif hdr.journal_id == 0:
            problem = "journal_id is zero"
        elif hdr.tail_pos >= self.log_size:
            problem = f"tail_pos {hdr.tail_pos} outside the log ({self.log_size} blocks)"
        elif hdr.tail_seq > hdr.next_seq:
            problem = f"tail_seq {hdr.tail_seq} above next_seq {hdr.next_seq}"
        if problem:
            raise JournalCorrupt(self.start, f"journal header: {problem}")
        return hdr

    def is_clean(self) -> bool:
        """True when the header says the journal was closed or replayed (nothing to replay)."""
        return self.read_header().clean

    # -- recovery -----------------------------------------------------------------------

    def scan(self) -> ReplayReport:
        """Find, without writing anything, what ``replay`` would do.

        Returns:
            The report; ``replayed`` is False.

        Raises:
            JournalCorrupt: bad header, or corruption in the middle of the log.
        """
        hdr = self.read_header()
        if hdr.clean:
            return _clean_report(hdr)
        report, _final = self._recover(hdr)
        return report

    def replay(self) -> ReplayReport:
        """Write every committed transaction's images home and mark the journal clean.

        Idempotent and crash safe: the header moves (in one sector) only after the
        images are durable, so a power cut at any point leaves a journal that replays
        to the same result.  A clean journal is left alone.  This is also how a
        surviving node recovers a dead node's journal.

        Returns:
            The report of what was replayed and what was dropped.

        Raises:
            JournalCorrupt: bad header, or corruption in the middle of the log.
            JournalError: this instance has the journal open for writing.
        """
        if self._open:
            raise JournalError(f"journal slot {self.slot} is open; close it before replay")
        hdr = self.read_header()
        if hdr.clean:
            return _clean_report(hdr)
        report, final = self._recover(hdr)
        if final:
            self._write_home(final)
            self._flush()
        new = dataclasses.replace(hdr, clean=True, tail_pos=report.end_pos,
                                  tail_seq=report.next_seq, next_seq=report.next_seq,
                                  close_ns=time.time_ns())
        self.dev.write(self.start, new.pack())
        self._flush()
        report.replayed = True
        return report

    def _recover(self, hdr: JournalHeader) -> tuple[ReplayReport, dict[int, bytes]]:
        """Steps 2-4 of recovery: walk, tell torn tail from corruption, apply revokes."""
        report = ReplayReport(tail_seq=hdr.tail_seq, tail_pos=hdr.tail_pos)
        txns, pos, seq, stop = self._walk(hdr)
        walked = sum(txn.nblocks for txn in txns)
        later, max_seen = self._sweep(hdr.journal_id, seq, pos, self.log_size - walked)
        if later is not None:
            later_seq, later_bno = later
            raise JournalCorrupt(
                stop.bno, f"journal slot {self.slot}: {stop.reason} in transaction {seq} "
                          f"(log index {pos}), but transaction {later_seq} (block "
                          f"{later_bno}) was committed after it")
        report.end_pos = pos
        report.end_reason = stop.reason
        next_seq = max(hdr.next_seq, seq, max_seen + 1)
        if stop.claimed:
            found = (stop.bno - self._abs(pos)) % self.log_size
            report.torn = TornTail(seq=seq, pos=pos, bno=stop.bno, reason=stop.reason,
                                   blocks=found)
            next_seq = max(next_seq, seq + 1)
        report.next_seq = next_seq

        revoked: dict[int, int] = {}
        for txn in txns:
            for target in txn.revokes:
                revoked[target] = txn.seq
        final: dict[int, bytes] = {}
        for txn in txns:
            report.seqs.append(txn.seq)
            report.images += len(txn.images)
            for target, image in txn.images:
                if revoked.get(target, -1) > txn.seq:
                    report.suppressed += 1
                    continue
                final[target] = image
                report.blocks[target] = txn.seq
        report.transactions = len(txns)
        report.revoked = set(revoked)
        return report, final

    def _walk(self, hdr: JournalHeader) -> tuple[list[_Txn], int, int, _Stop]:
        """Read committed transactions from the tail; return them and where it stopped."""
        pos, seq, used = hdr.tail_pos, hdr.tail_seq, 0
        txns: list[_Txn] = []
        while True:
            txn = self._read_txn(pos, seq, self.log_size - used, hdr.journal_id)
            if isinstance(txn, _Stop):
                return txns, pos, seq, txn
            txns.append(txn)
            pos = (pos + txn.nblocks) % self.log_size
            used += txn.nblocks
            seq += 1

    def _read_txn(self, pos: int, seq: int, room: int, journal_id: int) -> _Txn | _Stop:
        """Read and verify the transaction ``seq`` that should start at log index ``pos``.

        ``room`` is how many log blocks remain before the walk would lap its start.
        """
        L = self.log_size
        first = pos
        n = 0                       # blocks of this transaction read so far
        crc = 0
        images: list[tuple[int, bytes]] = []
        revokes: list[int] = []
        while True:
            bno = self._abs(pos)
            if n >= room:
                return _Stop(bno, "transaction runs into the start of the log", n > 0)
            buf = self._read_log(pos, 1)[0]
            if buf is None:
                return _Stop(bno, "unreadable block", n > 0)
            btype, problem, claimed = _check_log_block(buf, bno, seq, journal_id)
            if problem and n and not claimed:
                return _Stop(bno, f"transaction ends before its commit block ({problem})",
                             True)
            if problem:
                return _Stop(bno, problem, claimed)
            if btype == BlockType.JOURNAL_DESCRIPTOR:
                try:
                    tags = unpack_tags(buf)
                except ValueError as exc:
                    return _Stop(bno, f"descriptor: {exc}", True)
                if n + 1 + len(tags) + 1 > room:
                    return _Stop(bno, "descriptor tags run into the start of the log", True)
                crc = crc32c(buf, crc)
                pos = (pos + 1) % L
                n += 1
                for (target, flags, tag_crc), image in zip(tags, self._read_log(pos, len(tags))):
                    ibno = self._abs(pos)
                    if flags:
                        return _Stop(bno, f"descriptor: unknown tag flags {flags:#x}", True)
                    if image is None:
                        return _Stop(ibno, f"image of block {target} unreadable", True)
                    if crc32c(image) != tag_crc:
                        return _Stop(ibno, f"image of block {target}: crc32c mismatch", True)
                    crc = crc32c(image, crc)
                    images.append((target, image))
                    pos = (pos + 1) % L
                    n += 1
                continue
            if btype == BlockType.JOURNAL_REVOKE:
                try:
                    revokes += unpack_revokes(buf)
                except ValueError as exc:
                    return _Stop(bno, f"revoke block: {exc}", True)
                crc = crc32c(buf, crc)
                pos = (pos + 1) % L
                n += 1
                continue
            rec = unpack_commit(buf)       # JOURNAL_COMMIT
            if rec.nblocks != n or rec.first_pos != first:
                return _Stop(bno, f"commit block: describes {rec.nblocks} block(s) from "
                                  f"log index {rec.first_pos}, found {n} from {first}", True)
            if rec.nimages != len(images) or rec.nrevokes != len(revokes):
                return _Stop(bno, "commit block: image or revoke count mismatch", True)
            if rec.txn_crc != crc:
                return _Stop(bno, "commit block: transaction crc32c mismatch", True)
            return _Txn(seq, first, n + 1, images, revokes)

    def _sweep(self, journal_id: int, seq: int, pos: int,
               count: int) -> tuple[tuple[int, int] | None, int]:
        """Look for a block of this journal with a seq above ``seq`` outside the walk.

        Reads ``count`` log blocks from index ``pos`` (wrapping): the part of the log
        the walk did not consume, whose blocks all carry lower seqs unless a later
        transaction committed.

        Returns:
            ((seq, bno) of the first such block or None, highest valid seq seen or 0).
        """
        later = None
        max_seen = 0
        while count:
            n = min(count, _SWEEP_CHUNK, self.log_size - pos)
            for i, buf in enumerate(self._read_log(pos, n)):
                if buf is None:
                    continue
                bno = self._abs(pos + i)
                magic, btype, _f, crc, _r, own, bseq = HEADER.unpack_from(buf, 0)
                if (magic != MAGIC or btype not in LOG_TYPES or own != bno
                        or bseq <= max_seen and bseq <= seq):
                    continue
                if not crc_ok(buf, crc) or log_block_journal_id(buf) != journal_id:
                    continue
                max_seen = max(max_seen, bseq)
                if bseq > seq and later is None:
                    later = (bseq, bno)
            count -= n
            pos = (pos + n) % self.log_size
        return later, max_seen

    # -- writing ------------------------------------------------------------------------

    def open(self, owner: str = "") -> None:
        """Start writing: mark the journal in use (header clean=0) and flush.

        Args:
            owner: who opens it (e.g. node name), recorded in the header (<= 64 bytes).

        Raises:
            JournalError: already open, or the journal holds transactions that were not
                replayed (call ``replay`` first).
            JournalCorrupt: bad header.
            ValueError: owner too long.
        """
        if self._open:
            raise JournalError(f"journal slot {self.slot} is already open")
        self._check_alive()
        hdr = self.read_header()
        if not hdr.clean:
            raise JournalError(f"journal slot {self.slot} was not closed cleanly: "
                               "replay it before opening")
        next_seq = max(hdr.next_seq, hdr.tail_seq)
        new = dataclasses.replace(hdr, clean=False, tail_seq=next_seq, next_seq=next_seq,
                                  mount_count=hdr.mount_count + 1, open_ns=time.time_ns(),
                                  owner=owner)
        block = new.pack()                       # raises ValueError before any I/O
        with self._io():
            self.dev.write(self.start, block)
            self._flush()
        self._hdr = new
        self._journal_id = hdr.journal_id
        self._tail_pos = self._head_pos = hdr.tail_pos
        self._used = 0
        self._next_seq = next_seq
        self._running.clear()
        self._running_revokes.clear()
        self._pending.clear()
        self._in_log.clear()
        self._open = True

    def add(self, bno: int, source: Source) -> None:
        """Put block ``bno`` in the running transaction.

        Args:
            bno: the home block number.
            source: the 4096-byte image (bytes-like, copied now), or an object whose
                ``image()`` is called at commit time (the contents then win).
                Adding a block again replaces its source; adding a block revoked in
                the running transaction cancels that revoke.

        Raises:
            ValueError: bad block number or image size.
            TypeError: ``source`` is neither bytes-like nor has ``image()``.
        """
        if self._running.get(bno) is source and self._open and self._aborted is None:
            return      # already there (an object dirtied again); no revoke can be pending
        self._require_open()
        self._check_target(bno)
        if isinstance(source, (bytes, bytearray, memoryview)):
            image = bytes(source)
            if len(image) != BLOCK_SIZE:
                raise ValueError(f"image of block {bno} is {len(image)} bytes, "
                                 f"not {BLOCK_SIZE}")
            self._running[bno] = image
        elif callable(getattr(source, "image", None)):
            self._running[bno] = source
        else:
            raise TypeError(f"source for block {bno} is neither bytes nor has image()")
        self._running_revokes.discard(bno)

    def revoke(self, bno: int) -> None:
        """Record that block ``bno`` was freed in the running transaction.

        Its image leaves the running transaction, and replay will never write an
        image of it logged before this transaction.  When this transaction commits
        its committed image leaves the checkpoint set for good, so it is never
        written home again (the block may become file data).

        Until then the last committed image is still the committed state and stays
        in the checkpoint set: a checkpoint before the commit writes it home.  So, as
        in ext4, the caller must not write a freed block as file data before the
        transaction that freed it has committed.

        No record is written when the log holds no image of the block.

        Raises:
            ValueError: bad block number.
        """
        self._require_open()
        self._check_target(bno)
        self._running.pop(bno, None)
        if bno in self._in_log:
            self._running_revokes.add(bno)

    def running_blocks(self) -> int:
        """Number of blocks in the running transaction."""
        return len(self._running)

    def should_commit(self) -> bool:
        """True when the running transaction is big (>= 1/4 of the log) or log space is short."""
        if not self._running and not self._running_revokes:
            return False
        need = transaction_blocks(len(self._running), len(self._running_revokes))
        return need >= max(1, self.log_size // 4) or need > self.log_size - self._used

    def max_transaction_blocks(self) -> int:
        """The most blocks one transaction can hold (without revokes)."""
        n = self.log_size - 1
        while transaction_blocks(n, 0) > self.log_size:
            n -= 1
        return n

    def commit(self) -> int | None:
        """Commit the running transaction.

        Writes its descriptor, image and revoke blocks (one device write per
        contiguous run), flushes, writes the commit block and flushes.  Every device
        write issued before this call is durable before the commit block is written
        (ordered mode).  Checkpoints first when the log lacks room.  A transaction
        sealed earlier (``seal``) is written first.

        Returns:
            The transaction's sequence number, or None when it was empty.

        Raises:
            ValueError: the transaction does not fit in the whole log (see
                ``max_transaction_blocks``); it stays running, nothing is written.
            JournalAborted: an earlier device error stopped the journal.
        """
        sealed = self.seal()
        if sealed is None:
            return None
        sealed.write()
        return sealed.seq

    def seal(self) -> "SealedCommit | None":
        """Close the running transaction for commit; its writes are left to the caller.

        The returned ``SealedCommit``'s ``write()`` does the device I/O of ``commit``
        and may run on another thread, while this journal takes ``add``/``revoke``
        for the next transaction.  Until it is written the sealed transaction counts
        as committed in memory (its images are in the checkpoint set, revokes see
        its blocks), and every call that does I/O (``commit``, ``seal``,
        ``checkpoint``, ``close``) first finishes its writes, so nothing overtakes
        it on the device.  Data written after ``seal`` may or may not be covered by
        its ordered-mode flush; data written before is.

        Returns:
            None when the running transaction is empty.

        Raises:
            ValueError: the transaction does not fit in the whole log (it stays
                running, nothing is written).
            JournalAborted: an earlier device error stopped the journal.
        """
        self._require_open()
        self.wait_sealed()
        if not self._running and not self._running_revokes:
            return None
        images = []
        for bno in sorted(self._running):
            source = self._running[bno]
            image = source if isinstance(source, bytes) else bytes(source.image())
            if len(image) != BLOCK_SIZE:
                raise ValueError(f"image() of block {bno} returned {len(image)} bytes")
            images.append((bno, image))
        revokes = sorted(self._running_revokes)
        need = transaction_blocks(len(images), len(revokes))
        if need > self.log_size:
            raise ValueError(
                f"transaction of {len(images)} block(s) and {len(revokes)} revoke(s) needs "
                f"{need} log blocks; journal slot {self.slot} has {self.log_size} "
                f"(at most {self.max_transaction_blocks()} blocks per transaction)")
        if need > self.log_size - self._used:
            with self._io():
                self._checkpoint()
            # The log is empty now: no image left for the revokes to suppress.
            revokes = []
            if not images:
                self._running.clear()
                self._running_revokes.clear()
                return None
            need = transaction_blocks(len(images), 0)
        seq = self._next_seq
        first = self._head_pos
        log, txn_crc = self._build_log(seq, first, images, revokes)
        nblocks = need - 1
        cpos = (first + nblocks) % self.log_size
        commit_block = pack_commit(
            self._abs(cpos), seq, self._journal_id, nblocks=nblocks, txn_crc=txn_crc,
            first_pos=first, time_ns=time.time_ns(), nimages=len(images),
            nrevokes=len(revokes))
        sealed = SealedCommit(self, seq, first, log, self._abs(cpos), commit_block)
        self._head_pos = (first + need) % self.log_size
        self._used += need
        self._next_seq = seq + 1
        for bno, image in images:
            self._pending[bno] = image
            self._in_log.add(bno)
        for bno in revokes:
            self._pending.pop(bno, None)
        self._running.clear()
        self._running_revokes.clear()
        sealed.counts = (len(images), len(revokes), need)
        self._sealed = sealed
        return sealed

    def wait_sealed(self) -> None:
        """Finish the sealed transaction's writes (doing them here when nobody has
        started them); raises ``JournalAborted`` when they failed."""
        sealed = self._sealed
        if sealed is not None:
            sealed.write()
        self._check_alive()

    def checkpoint(self) -> None:
        """Write every committed image home, flush, and empty the log.

        Writes the images as committed (never newer running contents), one device
        write per run of adjacent blocks, flushes, then moves the header's tail to
        the head and flushes.  The running transaction is untouched.

        Raises:
            JournalAborted: an earlier device error stopped the journal.
        """
        self._require_open()
        self.wait_sealed()
        if not self._used and not self._pending:
            return
        with self._io():
            self._checkpoint()

    def close(self) -> None:
        """Commit, checkpoint, and mark the journal clean (header clean=1), flushed.

        Raises:
            JournalAborted: an earlier device error stopped the journal.
        """
        self._require_open()
        self.commit()
        with self._io():
            self._checkpoint(clean=True)
        self._open = False

    def checkpoint_pending(self) -> set[int]:
        """Block numbers committed but not yet written home.

        A block revoked in the running transaction stays in this set until that
        transaction commits (its committed image is the committed state until then).
        """
        return set(self._pending)

    def stats(self) -> dict:
        """Counters and log occupancy.

        Returns:
            commits, blocks_logged, revokes_logged, log_blocks_written, checkpoints,
            blocks_checkpointed, flushes (issued by the journal), log_size, log_used,
            log_free, running_blocks, checkpoint_pending, next_seq.
        """
        return dict(self._stats, log_size=self.log_size, log_used=self._used,
                    log_free=self.log_size - self._used, running_blocks=len(self._running),
                    checkpoint_pending=len(self._pending), next_seq=self._next_seq)

    @property
    def is_open(self) -> bool:
        """True between ``open`` and ``close``."""
        return self._open

    @property
    def aborted(self) -> BaseException | None:
        """The device error that stopped the journal (None while it works)."""
        return self._aborted

    # -- internals --------------------------------------------------------------------

    def _abs(self, pos: int) -> int:
        return self.start + 1 + pos

    def _require_open(self) -> None:
        self._check_alive()
        if not self._open:
            raise JournalError(f"journal slot {self.slot} is not open")

    def _check_alive(self) -> None:
        if self._aborted is not None:
            raise JournalAborted(self._aborted)

    @contextlib.contextmanager
    def _io(self):
        """Run device I/O; any failure aborts the journal (JBD2 style)."""
        self._check_alive()
        try:
            yield
        except BaseException as exc:
            self._aborted = exc
            raise

    def _check_target(self, bno: int) -> None:
        if not 0 <= bno < self.dev.nblocks:
            raise ValueError(f"block {bno} outside the device ({self.dev.nblocks} blocks)")
        if self.start <= bno < self.start + self.length:
            raise ValueError(f"block {bno} lies inside journal slot {self.slot}'s region")

    def _flush(self) -> None:
        self.dev.flush()
        self._stats["flushes"] += 1

    def _build_log(self, seq: int, first: int, images: list[tuple[int, bytes]],
                   revokes: list[int]) -> tuple[bytearray, int]:
        """The transaction's blocks before the commit, in log order, and their crc32c."""
        L = self.log_size
        nblocks = transaction_blocks(len(images), len(revokes)) - 1
        buf = bytearray(nblocks * BLOCK_SIZE)
        off = 0
        pos = first
        for i in range(0, len(images), TAGS_PER_DESCRIPTOR):
            chunk = images[i:i + TAGS_PER_DESCRIPTOR]
            desc_off, desc_pos = off, pos
            off += BLOCK_SIZE
            tags = []
            for bno, image in chunk:
                buf[off:off + BLOCK_SIZE] = image
                tags.append((bno, crc32c(image)))
                off += BLOCK_SIZE
            pack_descriptor(buf, desc_off, self._abs(desc_pos), seq, self._journal_id, tags)
            pos = (pos + 1 + len(chunk)) % L
        for i in range(0, len(revokes), REVOKES_PER_BLOCK):
            pack_revoke(buf, off, self._abs(pos), seq, self._journal_id,
                        revokes[i:i + REVOKES_PER_BLOCK])
            off += BLOCK_SIZE
            pos = (pos + 1) % L
        return buf, crc32c(buf)

    def _write_log(self, pos: int, buf) -> None:
        """Write whole blocks at log index ``pos``: one device write, two if it wraps."""
        count = len(buf) // BLOCK_SIZE
        if not count:
            return
        mv = memoryview(buf)
        first = min(count, self.log_size - pos)
        self.dev.write(self._abs(pos), mv[:first * BLOCK_SIZE])
        if count > first:
            self.dev.write(self._abs(0), mv[first * BLOCK_SIZE:])

    def _read_log(self, pos: int, count: int) -> list[bytes | None]:
        """Read ``count`` log blocks from index ``pos`` (wrapping); None where unreadable."""
        out: list[bytes | None] = []
        while count:
            n = min(count, self.log_size - pos)
            try:
                data = self.dev.read(self._abs(pos), n)
                out += [data[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE] for i in range(n)]
            except OSError:
                for i in range(n):
                    try:
                        out.append(self.dev.read(self._abs(pos + i)))
                    except OSError:
                        out.append(None)
            count -= n
            pos = (pos + n) % self.log_size
        return out

    def _write_home(self, images: dict[int, bytes]) -> None:
        """Write images to their home blocks, one device write per run of adjacent blocks."""
        order = sorted(images)
        i = 0
        while i < len(order):
            j = i + 1
            while j < len(order) and order[j] == order[j - 1] + 1:
                j += 1
            run = order[i:j]
            self.dev.write(run[0], b"".join(images[b] for b in run))
            i = j

    def _checkpoint(self, *, clean: bool = False) -> None:
        """Write pending images home, flush, move the tail to the head, flush."""
        if self._pending:
            self._write_home(self._pending)
            self._flush()
            self._stats["blocks_checkpointed"] += len(self._pending)
        self._stats["checkpoints"] += 1
        hdr = dataclasses.replace(self._hdr, tail_pos=self._head_pos,
                                  tail_seq=self._next_seq, next_seq=self._next_seq,
                                  clean=clean)
        if clean:
            hdr.close_ns = time.time_ns()
        self.dev.write(self.start, hdr.pack())
        self._flush()
        self._hdr = hdr
        self._tail_pos = self._head_pos
        self._used = 0
        self._pending.clear()
        self._in_log.clear()
        self._running_revokes.clear()       # the log holds no image they could suppress


class SealedCommit:
    """A transaction closed by ``Journal.seal`` whose log blocks are still to be
    written: ``write()`` writes them, flushes, writes the commit block and flushes.

    ``write()`` may run on a worker thread; the first caller does the I/O and any
    other waits for it, so it happens once.  A device error aborts the journal (the
    error is re-raised to every caller).
    """

    def __init__(self, journal: "Journal", seq: int, first: int, log: bytearray,
                 commit_bno: int, commit_block: bytes):
        self.journal = journal
        self.seq = seq
        self._first = first
        self._log = log
        self._commit_bno = commit_bno
        self._commit_block = commit_block
        self.counts = (0, 0, 0)    # images, revokes, log blocks (for the stats)
        self._lock = threading.Lock()
        self._done = False

    def write(self) -> None:
        j = self.journal
        with self._lock:
            if self._done:
                j._check_alive()
                return
            self._done = True
            try:
                with j._io():
                    j._write_log(self._first, self._log)
                    j._flush()
                    j.dev.write(self._commit_bno, self._commit_block)
                    j._flush()
                st = j._stats
                st["commits"] += 1
                st["blocks_logged"] += self.counts[0]
                st["revokes_logged"] += self.counts[1]
                st["log_blocks_written"] += self.counts[2]
            finally:
                self._log = b""
                if j._sealed is self:
                    j._sealed = None


def _clean_report(hdr: JournalHeader) -> ReplayReport:
    return ReplayReport(clean=True, tail_seq=hdr.tail_seq, tail_pos=hdr.tail_pos,
                        end_pos=hdr.tail_pos, end_reason="journal is clean",
                        next_seq=max(hdr.next_seq, hdr.tail_seq))


def _check_region(dev, start: int, length: int) -> None:
    if length < MIN_LENGTH:
        raise ValueError(f"journal region of {length} blocks is below the minimum "
                         f"of {MIN_LENGTH}")
    if start < 0 or start + length > dev.nblocks:
        raise ValueError(f"journal region {start}+{length} outside the device "
                         f"({dev.nblocks} blocks)")


def _check_log_block(buf, bno: int, seq: int, journal_id: int) -> tuple[int, str, bool]:
    """Check a block that should be a log block of transaction ``seq``.

    Returns:
        (type, problem or "", claimed): ``claimed`` is True when the block's header
        says it belongs to transaction ``seq`` of this journal (so a problem with it
        is a torn write of that transaction, not merely the end of the log).
    """
    magic, btype, _flags, crc, _res, own, bseq = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        return btype, ("block never written" if not any(buf) else "no journal block"), False
    if btype not in LOG_TYPES or own != bno:
        return btype, "no journal block", False
    if bseq != seq:
        return btype, f"block holds seq {bseq}, expected {seq}", False
    if not crc_ok(buf, crc):
        kind = BlockType(btype).name.removeprefix("JOURNAL_").lower()
        return btype, f"{kind} block: crc32c mismatch", True
    if log_block_journal_id(buf) != journal_id:
        return btype, "block belongs to an earlier journal (other journal_id)", False
    return btype, "", True
