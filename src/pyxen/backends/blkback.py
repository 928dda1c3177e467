"""blkback: the block backend Linux's xen-blkfront talks to (Xen's ``qdisk``/Linux's
``xen-blkback`` role), serving one virtual disk of one domain.

Negotiation (keys as Linux 6.1's blkback writes and blkfront reads):

* probe: ``feature-flush-cache``, ``feature-discard`` (+ ``discard-granularity``,
  ``discard-alignment``, ``discard-secure``), ``feature-persistent``,
  ``feature-max-indirect-segments``, ``max-ring-page-order``, ``multi-queue-max-queues``;
* the frontend writes ``ring-ref`` (or ``ring-page-order`` + ``ring-ref0..N-1``),
  ``event-channel``, ``protocol``, ``feature-persistent`` -- per queue under ``queue-N/``
  when it uses several (``multi-queue-num-queues``);
* connect: ``sectors`` (512-byte units), ``info`` (VDISK_* flags), ``sector-size``,
  ``physical-sector-size``, then Connected.

Each ring has a worker thread. The guest's notification only wakes it; the worker takes
every pending request, does the I/O with ``preadv``/``pwritev`` directly on views of the
granted pages, writes the responses, notifies if asked and re-arms ``req_event``.

Bad input from the frontend never escapes the device: a bad request (unknown operation,
segment count out of range, a segment outside its page, sectors beyond the disk, an unusable
grant) gets an error response; a corrupt ring (more requests than fit) stops that ring and
closes the device. Writes to a read-only disk get BLKIF_RSP_ERROR.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from pyxen.backends import blkif as B
from pyxen.backends.disk import DiskImage
from pyxen.backends.guestio import GuestAccess, GuestAccessError
from pyxen.backends.ring import BackRing, RingError, RingPages
from pyxen.backends.xenbus import BackendBus, DeviceError, XenbusBackend

log = logging.getLogger("pyxen.backends")

MAX_RING_PAGE_ORDER = 4          # XENBUS_MAX_RING_GRANT_ORDER, what Linux's blkback offers
MAX_QUEUES = 4
MAX_PERSISTENT_GRANTS = 1056     # Linux blkback's default max_persistent_grants
BATCH = 64                       # requests taken per pass before responding


@dataclass
class BlkStats:
    reads: int = 0
    writes: int = 0
    flushes: int = 0
    discards: int = 0
    errors: int = 0
    bytes_read: int = 0
    bytes_written: int = 0


class _Queue:
    """One ring of the device and the thread that serves it."""

    def __init__(self, dev: BlkBackend, index: int, ring: BackRing, port: int) -> None:
        self.dev = dev
        self.index = index
        self.ring = ring
        self.port = port
        self.wake = threading.Event()
        self.lock = threading.Lock()               # held by whoever serves the ring
        self.inline = dev.inline
        self.stopping = False
        self.broken = False
        self.persistent: dict[int, tuple[memoryview, int]] = {}
        self.ring_gfns: list[int] = []
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"blkback-d{dev.domid}-{dev.devid}-q{index}")

    def kick(self) -> None:
        """The frontend notified (its vCPU's thread, inside the hypercall). Reads and writes
        are served right here when no other thread holds the ring -- a page-cache copy is
        cheaper than waking the worker -- up to the first flush/barrier, which (with anything
        after it) goes to the worker so a vCPU never waits on fdatasync."""
        if self.inline and not self.stopping and self.lock.acquire(blocking=False):
            try:
                if self._service(inline=True):
                    return
            except RingError as e:
                self._broken(e)
                return
            finally:
                self.lock.release()
        self.wake.set()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=10)
        with self.lock:
            for gref in self.persistent:
                self.dev.guest.unpin_grant(gref, True)
            self.persistent.clear()

    def _service(self, inline: bool) -> bool:
        """Serve pending requests until the ring is idle (req_event armed): True. With
        ``inline``, stop before a slow request and return False (the worker takes over).
        Caller holds :attr:`lock`."""
        ring, guest = self.ring, self.dev.guest
        while not self.stopping:
            entries = ring.peek(BATCH)
            done = 0
            for entry in entries:
                if inline and entry[0] not in (B.OP_READ, B.OP_WRITE, B.OP_INDIRECT):
                    break
                ring.put_response(self.dev.handle(entry, self))
                done += 1
            ring.advance(done)
            if ring.push_responses():
                guest.notify(self.port)
            guest.mark_dirty_gfns(self.ring_gfns)          # responses, req_event
            if done < len(entries):
                return False
            if not ring.final_check():
                return True
        return True

    def _broken(self, e: RingError) -> None:
        self.broken = True
        self.stopping = True
        why = f"queue {self.index}: {e}"
        self.dev.bus.call_soon(lambda: self.dev.fatal(why))

    def _run(self) -> None:
        self.wake.set()                            # requests queued before we bound the port
        while True:
            self.wake.wait()
            self.wake.clear()
            if self.stopping:
                return
            try:
                with self.lock:
                    self._service(inline=False)
            except RingError as e:
                self._broken(e)
                return


class BlkBackend(XenbusBackend):
    """One virtual block device: ``disk`` exported to domain ``guest.domid`` as ``devid``."""

    kind = "vbd"

    def __init__(self, bus: BackendBus, guest: GuestAccess, devid: int,
                 disk: DiskImage, *, discard: bool = True, max_queues: int = MAX_QUEUES,
                 inline: bool = True) -> None:
        super().__init__(bus, guest.domid, devid)
        self.guest = guest
        self.disk = disk
        self.discard = discard and disk.can_discard
        self.max_queues = max_queues
        self.inline = inline
        self.queues: list[_Queue] = []
        self.persistent = False
        self.stats = BlkStats()

    # --- xenbus hooks
    def probe(self) -> None:
        w = self.bus.write
        w(f"{self.be}/feature-flush-cache", "1")
        w(f"{self.be}/feature-discard", "1" if self.discard else "0")
        if self.discard:
            w(f"{self.be}/discard-granularity", "4096")
            w(f"{self.be}/discard-alignment", "0")
            w(f"{self.be}/discard-secure", "0")
        w(f"{self.be}/feature-persistent", "1")
        w(f"{self.be}/feature-max-indirect-segments", str(B.MAX_INDIRECT_SEGMENTS))
        w(f"{self.be}/max-ring-page-order", str(MAX_RING_PAGE_ORDER))
        w(f"{self.be}/multi-queue-max-queues", str(self.max_queues))

    def connect(self) -> None:
        proto = self.read_fe("protocol", B.PROTOCOL_X86_64)
        if proto != B.PROTOCOL_X86_64:
            raise DeviceError(f"unsupported ring protocol {proto!r}")
        nq = self.read_fe_int("multi-queue-num-queues", 1)
        if not 1 <= nq <= self.max_queues:
            raise DeviceError(f"frontend asked for {nq} queues (max {self.max_queues})")
        self.persistent = self.read_fe_int("feature-persistent", 0) == 1
        order = self.read_fe_int("ring-page-order", 0)
        if not 0 <= order <= MAX_RING_PAGE_ORDER:
            raise DeviceError(f"ring-page-order {order} (max {MAX_RING_PAGE_ORDER})")
        queues = []
        try:
            for q in range(nq):
                prefix = "" if nq == 1 else f"queue-{q}/"
                queues.append(self._connect_queue(q, prefix, order))
        except (DeviceError, GuestAccessError) as e:
            for qu in queues:
                self.guest.unbind_port(qu.port)
            raise DeviceError(str(e)) from e
        self.queues = queues
        w = self.bus.write
        w(f"{self.be}/feature-persistent", "1" if self.persistent else "0")
        w(f"{self.be}/sectors", str(self.disk.sectors))
        w(f"{self.be}/info", str(B.VDISK_READONLY if self.disk.readonly else 0))
        w(f"{self.be}/sector-size", str(B.SECTOR))
        w(f"{self.be}/physical-sector-size", str(B.SECTOR))
        for qu in queues:
            qu.thread.start()
        log.info("d%d vbd/%d: connected, %d queue(s), ring order %d, persistent %s",
                 self.domid, self.devid, nq, order, self.persistent)

    def _connect_queue(self, q: int, prefix: str, order: int) -> _Queue:
        if order == 0:
            refs = [self.read_fe_int(f"{prefix}ring-ref")]
        else:
            refs = [self.read_fe_int(f"{prefix}ring-ref{i}") for i in range(1 << order)]
        port = self.read_fe_int(f"{prefix}event-channel")
        views, frames = self.guest.map_grants(refs, write=True)
        ring = BackRing(RingPages(views), B.ENTRY_SIZE)
        queue = _Queue(self, q, ring, port)
        queue.ring_gfns = frames
        self.guest.bind_port(port, queue.kick)
        return queue

    def disconnect(self) -> None:
        queues, self.queues = self.queues, []
        for q in queues:
            q.stop()
            self.guest.unbind_port(q.port)

    def stop(self) -> None:
        super().stop()
        self.disk.close()

    # --- data path (runs on a queue's thread)
    def handle(self, entry: bytes, queue: _Queue) -> bytes:
        """Serve one ring entry; returns the response entry. Never raises."""
        try:
            req = B.parse_request(entry)
            if req.ring_op == B.OP_INDIRECT:
                self._load_indirect(req)
            op = req.operation
            if self.disk.readonly and req.writes:
                raise B.BadRequest(req.id, req.operation, B.RSP_ERROR, "write to read-only disk")
            if op == B.OP_DISCARD:
                if not self.discard:
                    raise B.BadRequest(req.id, req.operation, B.RSP_EOPNOTSUPP, "discard off")
                if req.secure:
                    raise B.BadRequest(req.id, req.operation, B.RSP_EOPNOTSUPP, "secure discard")
                B.check_bounds(req, self.disk.sectors)
                self.disk.discard(req.sector * B.SECTOR, req.nr_sectors * B.SECTOR)
                self.stats.discards += 1
            else:
                if req.segments:
                    B.check_bounds(req, self.disk.sectors)
                    self._transfer(req, queue)
                if op in (B.OP_FLUSH_DISKCACHE, B.OP_WRITE_BARRIER):
                    self.disk.flush()
                    self.stats.flushes += 1
            return B.pack_response(req.id, req.operation, B.RSP_OKAY)
        except B.BadRequest as e:
            self.stats.errors += 1
            log.debug("d%d vbd/%d: request %#x refused: %s", self.domid, self.devid, e.id, e)
            return B.pack_response(e.id, e.op, e.status)
        except (GuestAccessError, OSError) as e:
            self.stats.errors += 1
            rid, op = _id_op(entry)
            log.info("d%d vbd/%d: request %#x failed: %s", self.domid, self.devid, rid, e)
            return B.pack_response(rid, op, B.RSP_ERROR)

    def _load_indirect(self, req: B.Request) -> None:
        raw = bytearray()
        for gref in req.indirect_grefs:
            raw += self._map(gref, False, None)[0]
        req.segments = B.parse_segments(bytes(raw), req.nr_segments)
        B.check_segments(req)

    def _map(self, gref: int, write: bool, queue: _Queue | None) -> tuple[memoryview, int]:
        if queue is not None and self.persistent:
            hit = queue.persistent.get(gref)
            if hit is not None:
                return hit
            if len(queue.persistent) < MAX_PERSISTENT_GRANTS:
                try:
                    hit = self.guest.pin_grant(gref, True)
                except GuestAccessError:
                    hit = None                 # e.g. a read-only grant: map it per request
                if hit is not None:
                    queue.persistent[gref] = hit
                    return hit
        (page,), (frame,) = self.guest.map_grants([gref], write)
        return page, frame

    def _transfer(self, req: B.Request, queue: _Queue) -> None:
        to_guest = req.operation == B.OP_READ
        views, frames = [], []
        for s in req.segments:
            page, frame = self._map(s.gref, to_guest, queue)
            views.append(page[s.first_sect * B.SECTOR:(s.last_sect + 1) * B.SECTOR])
            frames.append(frame)
        offset = req.sector * B.SECTOR
        n = req.nbytes
        if to_guest:
            self.disk.readv(views, offset)
            self.guest.mark_dirty_gfns(frames)
            self.stats.reads += 1
            self.stats.bytes_read += n
        else:
            self.disk.writev(views, offset)
            self.stats.writes += 1
            self.stats.bytes_written += n

    def info(self) -> dict:
        """What ``block-list`` shows."""
        return {"devid": self.devid, "state": self.state,
                "frontend_state": self.frontend_state(), "path": self.disk.path,
                "readonly": self.disk.readonly, "sectors": self.disk.sectors,
                "queues": len(self.queues), "persistent": self.persistent,
                "stats": vars(self.stats).copy()}


def _id_op(entry: bytes) -> tuple[int, int]:
    """The id and response operation of a raw entry (an indirect request's indirect_op)."""
    op = entry[1] if entry[0] == B.OP_INDIRECT else entry[0]
    return int.from_bytes(entry[8:16], "little"), op
