"""The cluster's lock manager: a candidate on every node, one master at a time.

Every cluster member runs a lock manager *candidate* as a child process
(``clusterfs lockd VOLUME``; the same command, run by hand, is a lock manager that
mounts nothing).  The candidates elect the master through the volume's lease block
with the delta-lease algorithm (``lockmgr.election``; the block: ``ondisk/lease.py``):
plain reads and writes of one block, so the election works for two nodes as well as
for eight, with no network majority needed.  The master serves ``lockmgr.LockServer``
at the address it wrote in the lease block; every member reads the block to find it.

A master's term, in order (docs/LOCKS.md, "Election and failover"):

1. acquire the lease (a FREE lease at once; a held one after seeing it unchanged for
   its expiry: its master is dead, paused or cut off from the disk, and has stopped
   acting);
2. serve, frozen for the grace period: the members reconnect and reclaim their locks,
   modes and value blocks.  The members expected are the slots whose heartbeat says
   "cluster"; the grace period ends as soon as each of them has reclaimed or is known
   dead, and lasts at most one member lease (a member's lease runs by its own clock,
   so by then a member that has not reclaimed has fenced itself);
3. a slot whose disk heartbeat stopped (``slots.quiet_period``) and that has no
   session is declared dead here (the old master's own member, typically): its locks
   are unknown, so nothing is granted until a member has recovered it, except the
   recovery locks ``J<slot>``;
4. renew the lease every ``renew``; act only while it is valid (``may_act``): a master
   that was paused wakes, finds its lease invalid, and stops before it grants or
   sends anything;
5. step down when it hears from fewer of the live members than it cannot hear
   (``STEP_DOWN_SILENCE``): it is the one cut off, and the others elect a new master
   once its lease expired.  A two-node cluster split in two keeps its master (a tie).
"""

from __future__ import annotations

import fcntl
import logging
import signal
import socket
import struct
import time

import trio

from lockmgr import DeltaLease, LeaseRecord, LeaseTimings, LockServer
from lockmgr.server import LIVE, accept_streams

from ..errors import ClusterfsError, CorruptBlock, FormatMismatch, UsageError, run_surfacing
from ..fs.volume import read_superblock
from ..ondisk import slots as slotmod
from ..ondisk.blockdev import BlockDevice
from ..ondisk.format import HB_CLUSTER, HB_FENCED, SB_LAYOUT
from ..ondisk.lease import candidate_id, decode_lease, encode_lease
from .locks import RECOVERY

log = logging.getLogger(__name__)

# -- the table of the election's and failover's constants (docs/LOCKS.md) ---------------
TIMINGS = LeaseTimings()       # renew 0.3, valid 1.2, expire 1.6, io_bound 0.15, settle 0.4
STEP_DOWN_SILENCE = 1.2        # a master unheard-of by most live members this long resigns
STEP_DOWN_HOLDOFF = 2 * TIMINGS.expire + TIMINGS.settle   # ... and stays out this long
RECONNECT_BOUND = 0.5          # a member finds the new master and reclaims within this
DEFAULT_LEASE = 8.0            # a member's lease with the lock manager (seconds)
DEFAULT_PORT = 7789            # where a candidate serves when elected (TCP)


def failover_bound(timings: LeaseTimings = TIMINGS) -> float:
    """The longest a member can go without a master: a partition is noticed
    (``STEP_DOWN_SILENCE``), the master's last renewal (``renew``) expires
    (``expire``), a candidate claims and verifies (``settle``), the members reconnect
    and reclaim (``RECONNECT_BOUND``)."""
    return (STEP_DOWN_SILENCE + timings.renew + timings.expire + timings.settle
            + RECONNECT_BOUND)


def check_member_lease(lease: float, timings: LeaseTimings = TIMINGS) -> None:
    """A member lease must outlast a failover with room to spare, or healthy members
    would fence themselves while a new master is elected: lease − margin (a fifth of
    the lease, the client's safety margin) > ``failover_bound`` + 1 s.

    Raises:
        UsageError: the lease is too short.
    """
    need = (failover_bound(timings) + 1.0) * 5 / 4
    if lease < need:
        raise UsageError(f"a lease of {lease:g}s is shorter than a lock manager failover "
                         f"can take; use --lease {need:.1f} or more")


def default_listen() -> str:
    """The host's first non-loopback IPv4 address and ``DEFAULT_PORT``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for _index, name in socket.if_nameindex():
            try:
                req = struct.pack("256s", name.encode()[:15])
                addr = socket.inet_ntoa(fcntl.ioctl(sock.fileno(), 0x8915, req)[20:24])
            except OSError:
                continue                      # SIOCGIFADDR: no IPv4 address
            if not addr.startswith("127."):
                return f"{addr}:{DEFAULT_PORT}"
    finally:
        sock.close()
    return f"127.0.0.1:{DEFAULT_PORT}"


class VolumeLeaseStore:
    """``lockmgr.LeaseStore`` over the volume's lease block.

    The I/O runs on a worker thread, so the event loop that serves the lock manager
    never waits for the device.  No flush: what the election needs is that the other
    nodes read the block (a block device is opened with O_DIRECT; an image file's page
    cache is shared by the processes of one host), not durability.
    """

    def __init__(self, dev, sb):
        self.dev = dev
        self.bno = sb.lease_bno

    async def read(self) -> LeaseRecord | None:
        buf = await trio.to_thread.run_sync(self.dev.read, self.bno)
        try:
            return LeaseRecord(*decode_lease(buf, self.bno))
        except CorruptBlock:
            return None

    async def write(self, rec: LeaseRecord) -> None:
        await trio.to_thread.run_sync(self.dev.write, self.bno, encode_lease(rec, self.bno))


class SlotWatch:
    """When each slot's disk heartbeat last changed, as this process saw it.

    Slots added while the candidate runs (``clusterfs add-slots``) are watched from
    the first update after the primary superblock counts them: each update reads
    block 0 and, when its slot count or slot table changed, the superblock anew.
    """

    def __init__(self, dev, sb):
        self.dev = dev
        self.sb = sb
        self.seen: dict[int, tuple[int, float]] = {}     # slot -> (counter, since)
        self.hbs: dict[int, object] = {}
        self.read_at = float("-inf")      # when the read behind ``hbs`` was issued

    def _read(self) -> list:
        """The heartbeats of every slot (the superblock re-read first if the slots
        changed; a superblock that does not read right is ignored until it does)."""
        try:
            buf = self.dev.read(0)
            now = (SB_LAYOUT.get(buf, "nslots"), SB_LAYOUT.get(buf, "slot_table"))
            if now != (self.sb.nslots, self.sb.slot_table):
                sb = read_superblock(self.dev)
                if sb.uuid == self.sb.uuid and sb.nslots >= self.sb.nslots:
                    log.info("the volume now has %d slots (was %d)", sb.nslots,
                             self.sb.nslots)
                    self.sb = sb
        except (CorruptBlock, FormatMismatch) as e:
            log.warning("re-reading the superblock: %s", e)
        return slotmod.read_heartbeats(self.dev, self.sb)

    async def update(self) -> None:
        issued = trio.current_time()
        hbs = await trio.to_thread.run_sync(self._read)
        self.read_at = issued
        now = trio.current_time()
        for slot, hb in enumerate(hbs):
            self.hbs[slot] = hb
            counter = hb.counter if hb is not None else -1
            old = self.seen.get(slot)
            if old is None or old[0] != counter:
                self.seen[slot] = (counter, now)

    def members(self) -> dict[int, str]:
        """Slots whose heartbeat says a cluster member has them: slot -> node."""
        return {slot: hb.node for slot, hb in self.hbs.items()
                if hb is not None and hb.state in (HB_CLUSTER, HB_FENCED)}

    def quiet(self, slot: int) -> bool:
        """Whether the slot's heartbeat stayed unchanged for its quiet period (its node
        has stopped writing: ``slots.HeartbeatWriter``)."""
        hb = self.hbs.get(slot)
        if hb is None or slot not in self.seen:
            return False
        quiet = slotmod.quiet_period(max(hb.interval_ms, 1) / 1000.0)
        return trio.current_time() - self.seen[slot][1] >= quiet


class LockManagerService:
    """One lock manager candidate (and, when elected, the master).

    Args:
        volume: the volume (image file or block device).
        key: the cluster's shared secret.
        listen: ``HOST:PORT`` to serve on when elected (port 0: any free port).
        node: the node name written in the lease block.
        lease: the members' lease with the lock manager (and the longest grace).
        timings: the election's constants (every node uses the same table).
    """

    def __init__(self, volume: str, key: bytes, *, listen: str, node: str,
                 lease: float = DEFAULT_LEASE, timings: LeaseTimings = TIMINGS,
                 direct: bool | None = None):
        self.volume = volume
        self.key = key
        self.listen = listen
        self.node = node
        self.lease = lease
        self.timings = timings
        self.direct = direct
        self.addr: str | None = None
        self.server: LockServer | None = None
        self.election: DeltaLease | None = None
        self._term: trio.Nursery | None = None
        self._nursery: trio.Nursery | None = None
        self.terms = 0

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Stand as a candidate until cancelled; ``task_status.started(addr)`` once
        listening."""
        from lockmgr.wire import parse_addr
        kind = parse_addr(self.listen)
        if kind[0] != "tcp":
            raise UsageError(f"--listen wants HOST:PORT, not {self.listen}")
        try:
            dev = BlockDevice(self.volume, direct=self.direct)
        except OSError as e:
            raise ClusterfsError(f"cannot open the volume {self.volume}: "
                                 f"{e.strerror or e}") from None
        try:
            try:
                sb = read_superblock(dev)
            except OSError as e:
                raise ClusterfsError(f"cannot read the volume {self.volume}: "
                                     f"{e.strerror or e}") from None
            listeners = await trio.open_tcp_listeners(kind[2], host=kind[1])
            host, port = listeners[0].socket.getsockname()[:2]
            self.addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            watch = SlotWatch(dev, sb)
            self.election = DeltaLease(VolumeLeaseStore(dev, sb), candidate_id(),
                                       self.node, self.addr, self.timings)
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for lst in listeners:
                    nursery.start_soon(accept_streams, lst, self._accepted)
                nursery.start_soon(self._watch, watch)
                log.info("lock manager candidate %s listening on %s", self.node, self.addr)
                task_status.started(self.addr)
                while True:
                    if await self.election.acquire():
                        resigned = await self._serve_term(watch)
                        if resigned:
                            await trio.sleep(STEP_DOWN_HOLDOFF)
                    else:
                        await trio.sleep(self.timings.renew)
        finally:
            dev.close()

    async def _watch(self, watch: SlotWatch) -> None:
        while True:
            try:
                await watch.update()
            except OSError as e:
                log.warning("reading the heartbeats: %s", e)
            await trio.sleep(self.timings.renew)

    def _accepted(self, stream, peer: str) -> None:
        """A connection to this candidate: served while it is the master."""
        term, server = self._term, self.server
        if term is None or server is None:
            self._nursery.start_soon(stream.aclose)     # not the master (any more)
            return
        term.start_soon(server.serve_stream, stream, peer)

    async def _serve_term(self, watch: SlotWatch) -> bool:
        """Serve as the master until the lease is lost or we resign; returns True
        when we resigned (cut off from most members)."""
        election = self.election
        self.terms += 1
        rec = election.record
        server = LockServer(self.key, lease=self.lease, grace=self.lease,
                            may_act=election.valid, thaw_prefix=RECOVERY)
        server.info = {"master": self.node, "address": self.addr,
                       "generation": election.generation,
                       "since_ns": rec.acquired_ns if rec is not None else time.time_ns()}
        log.warning("elected lock manager master (generation %d) at %s",
                    election.generation, self.addr)
        resigned = False
        async with trio.open_nursery() as term:
            await term.start(server.run)
            members = watch.members()
            server.expect_slots(set(members))
            self._term, self.server = term, server

            async def hold():
                await election.hold()
                term.cancel_scope.cancel()

            async def guard():
                nonlocal resigned
                resigned = await self._guard_term(server, watch)
                election.step_down()
                term.cancel_scope.cancel()

            term.start_soon(hold)
            term.start_soon(guard)
        self._term = self.server = None
        log.warning("no longer the lock manager master (generation %d)%s",
                    election.generation, ": resigned, cut off from the members"
                    if resigned else "")
        return resigned

    async def _guard_term(self, server: LockServer, watch: SlotWatch) -> bool:
        """The master's watch of the members; returns when it must resign."""
        election = self.election
        while election.valid():
            now = trio.current_time()
            live_sessions = {s.slot: s for s in server.sessions.values() if s.state == LIVE}
            members = watch.members()
            for slot, node in members.items():
                if server.last_recovered.get(slot, float("-inf")) >= watch.read_at:
                    continue        # recovered since the heartbeats were read
                if slot not in live_sessions and watch.quiet(slot) and \
                        not any(s.slot == slot for s in server.sessions.values()):
                    log.warning("node %s (slot %d): disk heartbeat stopped and no "
                                "session here: declared dead", node, slot)
                    server.declare_slot_dead(node, slot)
            if not server.in_grace:
                live = {slot for slot in members if not watch.quiet(slot)}
                heard = {slot for slot in live if slot in live_sessions and
                         now - live_sessions[slot].last_heard < STEP_DOWN_SILENCE}
                if len(live - heard) > len(heard):
                    log.error("cut off from the members (hearing %d of %d live ones for "
                              "%.1fs): resigning as lock manager master", len(heard),
                              len(live), STEP_DOWN_SILENCE)
                    return True
            await trio.sleep(self.timings.renew)
        return False


def run_lockd(volume: str, key: bytes, *, listen: str, node: str, lease: float) -> int:
    """Run a candidate in the foreground until SIGTERM/SIGINT (``clusterfs lockd``)."""
    check_member_lease(lease)
    service = LockManagerService(volume, key, listen=listen, node=node, lease=lease)

    async def main():
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(service.run)
            except OSError as e:
                raise ClusterfsError(f"cannot listen on {listen}: {e.strerror or e}") \
                    from None
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
                async for sig in sigs:
                    log.info("signal %d: the lock manager candidate stops", sig)
                    if service.election is not None:
                        service.election.step_down()
                    nursery.cancel_scope.cancel()
                    return
    run_surfacing(main)
    return 0
