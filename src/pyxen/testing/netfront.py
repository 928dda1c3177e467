"""A netfront in Python and a fake TAP, for testing netback without KVM, a guest kernel or
``/dev/net/tun``.

:class:`FakeNetfront` plays Linux's ``xen-netfront`` on a :class:`~pyxen.testing.blkfront.
FakeGuest`: it allocates and grants the TX and RX ring pages, allocates unbound event channels
for domain 0 (one, or ``-tx``/``-rx`` with split channels), writes the frontend keys of
``talk_to_netback`` (``tx-ring-ref``, ``rx-ring-ref``, ``event-channel[-tx|-rx]``,
``request-rx-copy``, ``feature-rx-notify``, ``feature-sg``, ``feature-gso-tcpv4``...) and
switches to Connected (or Initialised). It then

* transmits: a frame is split into chunks, each copied into its own page granted *read-only*
  to domain 0 (as netfront grants TX pages), at a chosen offset; the first request carries the
  total size and ``NETTXF_*`` flags, extras (GSO, multicast) follow it, and
  ``NETTXF_more_data`` chains the rest. Raw 12-byte entries can be queued too;
* receives: posts pages granted *writable* as RX requests, and parses RX responses into
  packets as ``xennet_get_responses`` does (first data slot, extras after it, then data slots
  while ``NETRXF_more_data``).

Ring indices use ring.h's macros (``RING_PUSH_REQUESTS_AND_CHECK_NOTIFY``,
``RING_FINAL_CHECK_FOR_RESPONSES``), written here independently of
:mod:`pyxen.backends.ring`. Grant refs and pages are recycled, so a 512-entry grant table is
enough for long tests.

:class:`FakeTap` stands in for :class:`pyxen.host.tap.Tap`: frames queued with
:meth:`FakeTap.inject` (12-byte virtio-net header + Ethernet frame) make :attr:`FakeTap.fd`
readable until read; :meth:`FakeTap.writev` records what the backend sent.
"""

from __future__ import annotations

import collections
import errno
import os
import threading
import time
from dataclasses import dataclass, field

from pyxen.backends import netif as N
from pyxen.backends.xenbus import (CLOSED, CLOSING, CONNECTED, INITIALISING, INITWAIT,
                                   backend_path, frontend_path)
from pyxen.core.memory import PAGE
from pyxen.host.tap import VNET_HDR_LEN, pack_vnet_hdr, unpack_vnet_hdr
from pyxen.testing.blkfront import BACKEND, FakeFrontend, FakeGuest
from pyxen.xen.abi import xen as X
from pyxen.xenstore.server import XenstoreServer

HEADER = 64
M32 = 0xFFFFFFFF
MAX_REF = 512                    # grant table frame 0 only (v1: 8-byte entries)

#: the feature keys Linux 6.x netfront writes (``talk_to_netback``)
DEFAULT_FEATURES = {"feature-rx-notify": "1", "feature-sg": "1", "feature-gso-tcpv4": "1",
                    "feature-gso-tcpv6": "1", "feature-ipv6-csum-offload": "1",
                    "feature-multicast-control": "1"}


# --- xenstore ---------------------------------------------------------------------------------

def create_vif_nodes(server: XenstoreServer, domid: int, devid: int, *,
                     mac: str = "00:16:3e:00:00:01", extra_backend: dict | None = None) -> None:
    """The directories libxl writes for a vif before the backend starts (both
    Initialising)."""
    fe, be = frontend_path("vif", domid, devid), backend_path("vif", domid, devid)
    server.write(fe, "")
    server.set_perms(fe, [f"n{domid}", "r0"])
    server.write(be, "")
    server.set_perms(be, ["n0", f"r{domid}"])
    for k, v in {"backend": be, "backend-id": "0", "state": str(INITIALISING),
                 "handle": str(devid), "mac": mac}.items():
        server.write(f"{fe}/{k}", v)
    bkeys = {"frontend": fe, "frontend-id": str(domid), "online": "1",
             "state": str(INITIALISING), "handle": str(devid), "mac": mac, "type": "vif"}
    bkeys.update(extra_backend or {})
    for k, v in bkeys.items():
        server.write(f"{be}/{k}", v)


# --- the fake TAP ------------------------------------------------------------------------------

class FakeTap:
    """:class:`pyxen.host.tap.Tap`'s data-path API over a queue and a pipe.

    ``fd`` is the read end of a pipe holding one byte per queued frame, so it is readable
    exactly while a frame is queued (what the backend's ``select`` needs). Thread-safe.
    """

    def __init__(self, name: str = "vif-fake") -> None:
        self._name = name
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._lock = threading.Lock()
        self._queue: collections.deque[bytes] = collections.deque()
        self._cond = threading.Condition(self._lock)
        self.sent: list[bytes] = []             # every frame written (vnet header included)
        self.pieces: list[int] = []             # number of buffers of each writev
        self.offloads: list[int] = []           # every set_offload() argument
        self.write_result: int | None = None    # force writev's return (e.g. -errno.EIO)
        self.reads = 0

    # --- Tap API
    @property
    def name(self) -> str:
        return self._name

    @property
    def fd(self) -> int:
        return self._r

    @property
    def closed(self) -> bool:
        return self._r < 0

    def set_offload(self, flags: int) -> None:
        self.offloads.append(flags)

    def read(self, buf: bytearray | memoryview) -> int:
        with self._lock:
            if self._r < 0:
                raise OSError(errno.EBADF, "fake TAP closed")
            if not self._queue:
                return 0
            os.read(self._r, 1)
            frame = self._queue.popleft()
            self.reads += 1
            n = min(len(frame), len(buf))       # a TAP truncates to the buffer
            buf[:n] = frame[:n]
            self._cond.notify_all()
            return n

    def writev(self, buffers) -> int:
        data = b"".join(bytes(b) for b in buffers)     # copy now: views of guest memory
        with self._lock:
            if self.write_result is not None:
                return self.write_result
            self.sent.append(data)
            self.pieces.append(len(buffers))
            self._cond.notify_all()
            return len(data)

    def close(self) -> None:
        with self._lock:
            r, w, self._r, self._w = self._r, self._w, -1, -1
            for fd in (r, w):
                if fd >= 0:
                    os.close(fd)

    # --- test side
    def inject(self, frame: bytes) -> None:
        """Queue one frame for the backend to read (vnet header included)."""
        if not frame:
            raise ValueError("a TAP never yields an empty frame")
        with self._lock:
            self._queue.append(bytes(frame))
            os.write(self._w, b"f")

    def inject_frame(self, eth: bytes, **hdr) -> None:
        """Queue an Ethernet frame behind a virtio-net header built from ``hdr``
        (:func:`pyxen.host.tap.pack_vnet_hdr` arguments)."""
        self.inject(pack_vnet_hdr(**hdr) + eth)

    def queued(self) -> int:
        with self._lock:
            return len(self._queue)

    def drain(self) -> int:
        """Drop the frames still queued; how many there were."""
        with self._lock:
            n = len(self._queue)
            while self._queue:
                self._queue.popleft()
                os.read(self._r, 1)
            return n

    def wait_sent(self, n: int, timeout: float = 5.0) -> list[bytes]:
        """The first ``n`` frames written (TimeoutError if fewer come)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.sent) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(self.sent)} of {n} frames written to the TAP")
                self._cond.wait(left)
            return list(self.sent[:n])

    def take_sent(self) -> list[bytes]:
        with self._lock:
            out, self.sent = self.sent, []
            self.pieces = []
            return out

    @staticmethod
    def split(frame: bytes):
        """``(VnetHdr, Ethernet frame)`` of a recorded frame."""
        return unpack_vnet_hdr(frame[:VNET_HDR_LEN]), frame[VNET_HDR_LEN:]


# --- rings -------------------------------------------------------------------------------------

@dataclass
class NetRing:
    """One single-page ring as the frontend sees it (FRONT_RING of ring.h)."""

    guest: FakeGuest
    gfn: int
    ref: int
    entry: int
    size: int = 0
    req_prod_pvt: int = 0
    rsp_cons: int = 0
    notifies: int = 0

    def __post_init__(self) -> None:
        n = (PAGE - HEADER) // self.entry
        self.size = 1 << (n.bit_length() - 1)

    @property
    def base(self) -> int:
        return self.gfn * PAGE

    def word(self, i: int) -> int:
        return self.guest.mem.read_u32(self.base + 4 * i)

    def set_word(self, i: int, v: int) -> None:
        self.guest.mem.view(self.base + 4 * i, 4)[:] = (v & M32).to_bytes(4, "little")

    req_prod = property(lambda s: s.word(0))
    req_event = property(lambda s: s.word(1))
    rsp_prod = property(lambda s: s.word(2))
    rsp_event = property(lambda s: s.word(3))

    def init(self, start: int = 0) -> None:
        """SHARED_RING_INIT + FRONT_RING_INIT (optionally with indices at ``start``)."""
        self.guest.mem.view(self.base, PAGE)[:] = bytes(PAGE)
        for i, v in enumerate((start, start + 1, start, start + 1)):
            self.set_word(i, v)
        self.req_prod_pvt = self.rsp_cons = start & M32

    def slot(self, idx: int) -> int:
        return self.base + HEADER + (idx & (self.size - 1)) * self.entry

    def free(self) -> int:
        return self.size - ((self.req_prod_pvt - self.rsp_cons) & M32)

    def put(self, entry: bytes) -> int:
        """Write the next request (padded to the entry size); returns its index."""
        assert len(entry) <= self.entry
        assert self.free() > 0, "ring full"
        idx = self.req_prod_pvt
        self.guest.mem.view(self.slot(idx), self.entry)[:] = entry.ljust(self.entry, b"\0")
        self.req_prod_pvt = (idx + 1) & M32
        return idx

    def push(self, port: int, force_notify: bool = False) -> bool:
        """RING_PUSH_REQUESTS_AND_CHECK_NOTIFY, then notify ``port`` if the backend asked."""
        old, new = self.req_prod, self.req_prod_pvt
        self.set_word(0, new)
        notify = (new - self.req_event) & M32 < (new - old) & M32
        if notify or force_notify:
            self.notifies += 1
            self.guest.xd.evtchn.send(port)
        return notify

    def poll(self) -> list[tuple[int, bytes]]:
        """Consume the responses published so far, as ``(ring index, raw entry)``;
        RING_FINAL_CHECK_FOR_RESPONSES (re-arms rsp_event)."""
        out = []
        while True:
            prod = self.rsp_prod
            if (prod - self.rsp_cons) & M32 > self.size:
                raise AssertionError(f"backend produced {prod - self.rsp_cons} responses")
            while self.rsp_cons != prod:
                out.append((self.rsp_cons, self.guest.mem.read(self.slot(self.rsp_cons),
                                                               self.entry)))
                self.rsp_cons = (self.rsp_cons + 1) & M32
            self.set_word(3, self.rsp_cons + 1)
            if self.rsp_prod == prod:
                return out


@dataclass
class RxPacket:
    """A received packet as netfront assembles it."""
    data: bytes                                  # the good data slots, concatenated
    flags: int                                   # NETRXF_* of the first slot
    extras: list[N.Extra]
    slots: list[tuple[int, int, int, int]]       # (id, offset, flags, status) of data slots
    mismatched: list[int] = field(default_factory=list)   # ring indices whose id was wrong

    @property
    def error(self) -> bool:
        return any(s[3] < 0 for s in self.slots)


@dataclass
class _Buf:
    gfn: int
    ref: int


class _Refs:
    """Grant refs of the fake guest, recycled (gnttab_end_foreign_access then reuse)."""

    def __init__(self, guest: FakeGuest) -> None:
        self.guest = guest
        self.free: list[int] = []

    def grant(self, gfn: int, readonly: bool = False) -> int:
        if self.free:
            return self.guest.grant(gfn, readonly=readonly, ref=self.free.pop())
        if self.guest.next_ref >= MAX_REF:
            raise MemoryError("fake guest out of grant refs")
        return self.guest.grant(gfn, readonly=readonly)

    def release(self, ref: int) -> None:
        """The entry becomes invalid and the ref reusable."""
        self.guest.grant(0, flags=0, domid=0, ref=ref)
        self.free.append(ref)


@dataclass
class _Pool:
    """Pages granted to dom0 (read-only or writable), reused."""
    guest: FakeGuest
    refs: _Refs
    readonly: bool
    free: list[_Buf] = field(default_factory=list)

    def get(self) -> _Buf:
        if self.free:
            return self.free.pop()
        gfn = self.guest.alloc_page(gap=1)
        return _Buf(gfn, self.refs.grant(gfn, readonly=self.readonly))

    def put(self, buf: _Buf) -> None:
        self.free.append(buf)


class FakeNetfront(FakeFrontend):
    """Linux's xen-netfront handshake and ring use for vif ``devid`` of ``guest``.

    ``features`` overrides :data:`DEFAULT_FEATURES` (a value of None removes the key).
    """

    def __init__(self, guest: FakeGuest, server: XenstoreServer, devid: int = 0, *,
                 split: bool = False, features: dict[str, str | None] | None = None,
                 rx_copy: bool = True, tx_start: int = 0, rx_start: int = 0) -> None:
        self.guest = guest
        self.server = server
        self.devid = devid
        self.split = split
        self.features = dict(DEFAULT_FEATURES)
        self.features.update(features or {})
        self.rx_copy = rx_copy
        self.tx_start, self.rx_start = tx_start, rx_start
        self.fe = frontend_path("vif", guest.domid, devid)
        self.be = backend_path("vif", guest.domid, devid)
        self.refs = _Refs(guest)
        self.tx_pool = _Pool(guest, self.refs, readonly=True)
        self.rx_pool = _Pool(guest, self.refs, readonly=False)
        self.tx: NetRing | None = None
        self.rx: NetRing | None = None
        self.tx_port = self.rx_port = 0
        self._tx_ids = list(range(255, -1, -1))
        self._tx_bufs: dict[int, _Buf] = {}
        self.tx_responses: list[tuple[int, int]] = []
        #: posted RX buffers by ring slot (netfront finds them by index, not by id)
        self.rx_posted: dict[int, tuple[int, _Buf]] = {}      # slot -> (id, buffer)
        self._rx_raw: list[tuple[int, bytes]] = []
        self.rx_packets: list[RxPacket] = []

    # --- xenstore (the rest: FakeFrontend)
    def fe_rm(self, key: str) -> None:
        self.server.rm(f"{self.fe}/{key}")

    # --- handshake (netfront's talk_to_netback)
    def setup_rings(self) -> None:
        g = self.guest
        ev = g.xd.evtchn
        old = []
        for ring in (self.tx, self.rx):          # netfront's xennet_disconnect_backend
            if ring is not None:
                self.refs.release(ring.ref)
                old.append(ring.gfn)             # the pages are reused for the new rings
        for port in {self.tx_port, self.rx_port} - {0}:
            ev.close(port)
        tx_gfn = old.pop(0) if old else g.alloc_page(gap=3)
        rx_gfn = old.pop(0) if old else g.alloc_page(gap=3)
        self.tx = NetRing(g, tx_gfn, self.refs.grant(tx_gfn), N.TX_ENTRY_SIZE)
        self.rx = NetRing(g, rx_gfn, self.refs.grant(rx_gfn), N.RX_ENTRY_SIZE)
        self.tx.init(self.tx_start)
        self.rx.init(self.rx_start)
        self.tx_port = ev.alloc_unbound(X.DOMID_SELF, BACKEND)
        self.rx_port = ev.alloc_unbound(X.DOMID_SELF, BACKEND) if self.split else self.tx_port
        for buf in self._tx_bufs.values():
            self.tx_pool.put(buf)
        self._tx_ids = list(range(255, -1, -1))
        self._tx_bufs = {}
        self.tx_responses, self._rx_raw, self.rx_packets = [], [], []
        for _rid, buf in self.rx_posted.values():
            self.rx_pool.put(buf)
        self.rx_posted = {}

    def write_keys(self) -> None:
        assert self.tx is not None and self.rx is not None
        self.fe_write("tx-ring-ref", str(self.tx.ref))
        self.fe_write("rx-ring-ref", str(self.rx.ref))
        if self.split:
            self.fe_write("event-channel-tx", str(self.tx_port))
            self.fe_write("event-channel-rx", str(self.rx_port))
        else:
            self.fe_write("event-channel", str(self.tx_port))
        self.fe_write("request-rx-copy", "1" if self.rx_copy else "0")
        for k, v in self.features.items():
            if v is not None:
                self.fe_write(k, v)

    def connect(self, state: int = CONNECTED, timeout: float = 5.0) -> None:
        """Rings and keys, then ``state`` (netfront goes straight to Connected); wait for the
        backend to be Connected."""
        self.setup_rings()
        self.write_keys()
        self.set_state(state)
        if not self.wait_backend(CONNECTED, timeout):
            raise TimeoutError(f"backend state {self.backend_state()} "
                               f"(error {self.be_read('error')!r})")
        if state != CONNECTED:
            self.set_state(CONNECTED)

    def close(self, timeout: float = 5.0) -> bool:
        """Closing then Closed; True once the backend is Closed."""
        self.set_state(CLOSING)
        self.set_state(CLOSED)
        return self.wait_backend(CLOSED, timeout)

    def reconnect(self, timeout: float = 5.0) -> None:
        """Closed -> Initialising -> (backend InitWait) -> connect with fresh rings."""
        if self.backend_state() != CLOSED:
            assert self.close(timeout), f"backend state {self.backend_state()}"
        self.set_state(INITIALISING)
        assert self.wait_backend(INITWAIT, timeout), f"backend state {self.backend_state()}"
        self.connect(timeout=timeout)

    # --- transmit
    def _tx_id(self) -> int:
        return self._tx_ids.pop()

    def build_tx(self, frame: bytes, *, chunks: list[int] | None = None,
                 offsets: list[int] | None = None, csum_blank: bool = False,
                 data_validated: bool = False, gso: tuple[int, int] | None = None,
                 extras: list[bytes] = ()) -> tuple[list[bytes], list[int]]:
        """The ring entries for ``frame`` and their request ids (extras have none).

        ``chunks``: sizes of the slots (default: one slot; they must add up to the frame);
        ``offsets``: where each slot's data starts in its page (default 0).
        ``gso``: ``(gso_size, XEN_NETIF_GSO_TYPE_*)`` for a GSO extra; ``extras``: more raw
        8-byte extras (their MORE flags are set here)."""
        chunks = list(chunks) if chunks is not None else [len(frame)]
        assert sum(chunks) == len(frame), "chunks must add up to the frame"
        offsets = list(offsets) if offsets is not None else [0] * len(chunks)
        all_extras = ([N.pack_extra_gso(*gso)] if gso else []) + list(extras)
        entries: list[bytes] = []
        ids: list[int] = []
        pos = 0
        for i, (size, off) in enumerate(zip(chunks, offsets)):
            buf = self.tx_pool.get()
            assert off + size <= PAGE, "a slot must stay within its page"
            self.guest.mem.view(buf.gfn * PAGE + off, size)[:] = frame[pos:pos + size]
            pos += size
            rid = self._tx_id()
            self._tx_bufs[rid] = buf
            ids.append(rid)
            flags = N.NETTXF_more_data if i < len(chunks) - 1 else 0
            if i == 0:
                flags |= (N.NETTXF_csum_blank if csum_blank else 0) | \
                    (N.NETTXF_data_validated if data_validated else 0) | \
                    (N.NETTXF_extra_info if all_extras else 0)
                entries.append(N.pack_tx_request(buf.ref, off, flags, rid, len(frame)))
                for j, ex in enumerate(all_extras):
                    ex = bytearray(ex)
                    if j < len(all_extras) - 1:
                        ex[1] |= N.XEN_NETIF_EXTRA_FLAG_MORE
                    entries.append(bytes(ex))
            else:
                entries.append(N.pack_tx_request(buf.ref, off, flags, rid, size))
        return entries, ids

    def put_tx(self, entries: list[bytes]) -> None:
        assert self.tx is not None
        for e in entries:
            self.tx.put(e)

    def push_tx(self, force_notify: bool = False) -> bool:
        assert self.tx is not None
        return self.tx.push(self.tx_port, force_notify)

    def send(self, frame: bytes, **kw) -> list[int]:
        """Queue and push one packet (see :meth:`build_tx`); its request ids."""
        entries, ids = self.build_tx(frame, **kw)
        self.put_tx(entries)
        self.push_tx()
        return ids

    def poll_tx(self) -> int:
        """Collect TX responses into :attr:`tx_responses` as ``(id, status)``; ids of
        answered requests are freed (NULL responses carry no id)."""
        assert self.tx is not None
        got = self.tx.poll()
        for _idx, raw in got:
            rid, status = N.unpack_tx_response(raw)
            self.tx_responses.append((rid, status))
            if status != N.NETIF_RSP_NULL and rid in self._tx_bufs:
                self.tx_pool.put(self._tx_bufs.pop(rid))
                self._tx_ids.insert(0, rid)
        return len(got)

    def wait_tx(self, n: int, timeout: float = 5.0) -> list[tuple[int, int]]:
        """The next ``n`` TX responses (TimeoutError if they do not come)."""
        deadline = time.monotonic() + timeout
        while len(self.tx_responses) < n:
            self.poll_tx()
            if len(self.tx_responses) >= n:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.tx_responses)} of {n} TX responses")
            time.sleep(0.0005)
        out, self.tx_responses = self.tx_responses[:n], self.tx_responses[n:]
        return out

    # --- receive
    def put_rx(self, rid: int, gref: int) -> None:
        assert self.rx is not None
        self.rx.put(N.pack_rx_request(rid, gref))

    def push_rx(self, force_notify: bool = False) -> bool:
        assert self.rx is not None
        return self.rx.push(self.rx_port, force_notify)

    def post_rx(self, n: int, push: bool = True) -> list[int]:
        """Post ``n`` fresh writable buffers (id = ring index, as netfront's
        ``xennet_rxidx``); push (notifying if req_event asks)."""
        assert self.rx is not None
        ids = []
        for _ in range(n):
            rid = self.rx.req_prod_pvt & (self.rx.size - 1)
            assert rid not in self.rx_posted, "RX slot still in use"
            buf = self.rx_pool.get()
            self.guest.mem.view(buf.gfn * PAGE, PAGE)[:] = b"\xee" * PAGE   # stale content
            self.rx_posted[rid] = (rid, buf)
            self.put_rx(rid, buf.ref)
            ids.append(rid)
        if push:
            self.push_rx()
        return ids

    def poll_rx_raw(self) -> list[tuple[int, bytes]]:
        """Consume RX responses as raw ``(ring index, 8 bytes)`` (no parsing)."""
        assert self.rx is not None
        return self.rx.poll()

    def poll_rx(self) -> int:
        """Consume RX responses and assemble the complete packets into
        :attr:`rx_packets`; returns how many packets were completed."""
        assert self.rx is not None
        self._rx_raw.extend(self.rx.poll())
        done = 0
        while True:
            pkt, used = self._parse(self._rx_raw)
            if pkt is None:
                return done
            self._rx_raw = self._rx_raw[used:]
            self.rx_packets.append(pkt)
            done += 1

    def _parse(self, raw: list[tuple[int, bytes]]) -> tuple[RxPacket | None, int]:
        """xennet_get_responses over ``raw`` ((ring index, entry) pairs): (packet, responses
        used), or (None, 0) if the packet is not complete yet."""
        if not raw:
            return None, 0
        first = N.unpack_rx_response(raw[0][1])
        extras: list[N.Extra] = []
        i = 1
        if first[2] & N.NETRXF_extra_info:
            while True:
                if i >= len(raw):
                    return None, 0
                ex = N.unpack_extra(raw[i][1])
                extras.append(ex)
                i += 1
                if not ex.more:
                    break
        data_idx = [raw[0][0]]
        slots = [first]
        while slots[-1][2] & N.NETRXF_more_data:
            if i >= len(raw):
                return None, 0
            data_idx.append(raw[i][0])
            slots.append(N.unpack_rx_response(raw[i][1]))
            i += 1
        data = b""
        mismatched = []
        for idx, (rid, off, _fl, status) in zip(data_idx, slots):
            posted = self.rx_posted.get(idx & (self.rx.size - 1))   # type: ignore[union-attr]
            if posted is None or posted[0] != rid:
                mismatched.append(idx)
                continue
            if 0 < status and off + status <= PAGE:
                data += self.guest.mem.read(posted[1].gfn * PAGE + off, status)
        for idx, _r in raw[:i]:                  # every slot's buffer comes back
            posted = self.rx_posted.pop(idx & (self.rx.size - 1), None)  # type: ignore[union-attr]
            if posted is not None:
                self.rx_pool.put(posted[1])
        return RxPacket(data, first[2], extras, slots, mismatched), i

    def wait_rx(self, n: int, timeout: float = 5.0) -> list[RxPacket]:
        """The next ``n`` received packets (TimeoutError if they do not come)."""
        deadline = time.monotonic() + timeout
        while len(self.rx_packets) < n:
            self.poll_rx()
            if len(self.rx_packets) >= n:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.rx_packets)} of {n} RX packets")
            time.sleep(0.0005)
        out, self.rx_packets = self.rx_packets[:n], self.rx_packets[n:]
        return out


__all__ = ["DEFAULT_FEATURES", "FakeNetfront", "FakeTap", "NetRing", "RxPacket",
           "create_vif_nodes"]
