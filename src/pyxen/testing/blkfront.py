"""A blkfront in Python, for testing blkback without KVM or a guest kernel.

:class:`FakeGuest` is a domain as the backends see it: a :class:`XenDomain` over a
:class:`FakeEngineVm`-backed :class:`GuestMemory` (RAM only), with grant table frame 0 placed in
an unused window as Linux places it, and helpers that write grant entries as the guest does.

:class:`FakeBlkfront` plays Linux's ``xen-blkfront``: it allocates (non-contiguous) ring pages,
grants them to domain 0, allocates unbound event channels for domain 0, writes the frontend
keys (``ring-ref``/``ring-refN``, ``event-channel``, ``protocol``, ``feature-persistent``, per
queue under ``queue-N/``), switches to Initialised and waits for the backend to be Connected.
It then produces requests and consumes responses on the shared rings with ring.h's macros
(``RING_PUSH_REQUESTS_AND_CHECK_NOTIFY``, ``RING_FINAL_CHECK_FOR_RESPONSES``), written here
independently of :mod:`pyxen.backends.ring`.

:func:`create_vbd_nodes` writes the xenstore directories as libxl does before a backend starts.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field

from pyxen.backends.xenbus import (CLOSED, CONNECTED, INITIALISED, INITIALISING, backend_path,
                                   frontend_path)
from pyxen.core.clock import DomainClock
from pyxen.core.domain import Domain
from pyxen.core.memory import PAGE, GuestMemory
from pyxen.testing.fakes import FakeEngineVm
from pyxen.xen.abi import xen as X
from pyxen.xen.domain import XenDomain
from pyxen.xenstore.server import XenstoreServer

GNT_WINDOW = 0xF000                # gfn where the guest maps grant table frame 0 (no RAM there)
FIRST_REF = 8                      # Linux reserves refs 0..7 (GNTTAB_NR_RESERVED_ENTRIES)
BACKEND = 0
HEADER = 64
ENTRY = 112                        # blkif ring entry (x86_64)
M32 = 0xFFFFFFFF


class FakeGuest:
    """One domain's memory, grant table and event channels, without a CPU."""

    def __init__(self, domid: int = 5, ram_bytes: int = 2 << 20, name: str = "fakeguest") -> None:
        self.domid = domid
        self.vm = FakeEngineVm()
        self.mem = GuestMemory(self.vm, f"{name}-d{domid}")
        self.ram_bytes = ram_bytes
        self.mem.add_region("ram", 0, ram_bytes, "ram")
        self.domain = Domain(domid, name, self.vm, self.mem)
        self.xd = XenDomain(self.domain, hypercall_msr=0x40000000, clock=DomainClock(),
                            max_pages=ram_bytes // PAGE)
        self.domain.handlers = self.xd
        self.domain.add_vcpu(0)
        self.xd.add_vcpu_state()
        self.xd.gnttab.map_frame(0, GNT_WINDOW)
        self.next_ref = FIRST_REF
        self.next_gfn = 0x20

    # --- memory
    def alloc_page(self, gap: int = 2) -> int:
        """A fresh zeroed RAM frame; successive frames are ``gap`` apart (not contiguous)."""
        gfn = self.next_gfn
        self.next_gfn += gap
        if (gfn + 1) * PAGE > self.ram_bytes:
            raise MemoryError("fake guest out of RAM")
        self.mem.write(gfn * PAGE, bytes(PAGE))
        return gfn

    def read_page(self, gfn: int) -> bytes:
        return self.mem.read(gfn * PAGE, PAGE)

    def ram(self) -> bytes:
        return self.mem.read(0, self.ram_bytes)

    # --- grants (what gnttab_grant_foreign_access_ref writes)
    def grant(self, frame: int, *, readonly: bool = False, domid: int = BACKEND,
              flags: int | None = None, ref: int | None = None) -> int:
        if ref is None:
            ref = self.next_ref
            self.next_ref += 1
        f = X.GTF_permit_access | (X.GTF_readonly if readonly else 0) if flags is None else flags
        self.mem.write(GNT_WINDOW * PAGE + ref * 8, struct.pack("<HHI", f, domid, frame))
        return ref

    def grant_entry(self, ref: int) -> tuple[int, int, int]:
        return self.xd.gnttab.entry(ref)

    def grant_table(self) -> bytes:
        return self.mem.read(GNT_WINDOW * PAGE, PAGE)

    def close(self) -> None:
        self.xd.close()
        self.mem.close()


def create_vbd_nodes(server: XenstoreServer, domid: int, devid: int, *,
                     readonly: bool = False) -> None:
    """The directories libxl writes for a vbd before the backend starts (both Initialising)."""
    fe, be = frontend_path("vbd", domid, devid), backend_path("vbd", domid, devid)
    server.write(fe, "")
    server.set_perms(fe, [f"n{domid}", "r0"])
    server.write(be, "")
    server.set_perms(be, ["n0", f"r{domid}"])
    for k, v in {"backend": be, "backend-id": "0", "state": str(INITIALISING),
                 "virtual-device": str(devid), "device-type": "disk"}.items():
        server.write(f"{fe}/{k}", v)
    for k, v in {"frontend": fe, "frontend-id": str(domid), "online": "1",
                 "state": str(INITIALISING), "mode": "r" if readonly else "w"}.items():
        server.write(f"{be}/{k}", v)


@dataclass
class FrontRing:
    """One ring as the frontend sees it (FRONT_RING of ring.h) over guest frames."""

    guest: FakeGuest
    gfns: list[int]
    refs: list[int]
    port: int
    size: int = 0
    req_prod_pvt: int = 0
    rsp_cons: int = 0
    notifies: int = 0
    responses: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = (len(self.gfns) * PAGE - HEADER) // ENTRY
        self.size = 1 << (n.bit_length() - 1)

    # byte access across the (non-contiguous) pages
    def _gpa(self, off: int) -> tuple[int, int]:
        p, o = divmod(off, PAGE)
        return self.gfns[p] * PAGE + o, PAGE - o

    def write(self, off: int, data: bytes) -> None:
        """The guest's own stores: through a view, so not recorded as VMM-dirty (KVM's dirty
        log covers guest writes; ``vmm_dirty`` is for what the VMM and backends write)."""
        while data:
            gpa, room = self._gpa(off)
            k = min(room, len(data))
            self.guest.mem.view(gpa, k)[:] = data[:k]
            off += k
            data = data[k:]

    def read(self, off: int, n: int) -> bytes:
        out = b""
        while n:
            gpa, room = self._gpa(off)
            k = min(room, n)
            out += self.guest.mem.read(gpa, k)
            off += k
            n -= k
        return out

    def word(self, i: int) -> int:
        return self.guest.mem.read_u32(self.gfns[0] * PAGE + 4 * i)

    def set_word(self, i: int, v: int) -> None:
        self.write(4 * i, (v & M32).to_bytes(4, "little"))

    req_prod = property(lambda s: s.word(0))
    req_event = property(lambda s: s.word(1))
    rsp_prod = property(lambda s: s.word(2))
    rsp_event = property(lambda s: s.word(3))

    def init(self, start: int = 0) -> None:
        """SHARED_RING_INIT + FRONT_RING_INIT (optionally with indices at ``start``)."""
        for i in range(len(self.gfns)):
            self.write(i * PAGE, bytes(PAGE))
        self.set_word(0, start)
        self.set_word(1, start + 1)
        self.set_word(2, start)
        self.set_word(3, start + 1)
        self.req_prod_pvt = self.rsp_cons = start & M32

    def slot(self, idx: int) -> int:
        return HEADER + (idx & (self.size - 1)) * ENTRY

    def put(self, entry: bytes) -> None:
        assert len(entry) == ENTRY
        assert (self.req_prod_pvt - self.rsp_cons) & M32 < self.size, "ring full"
        self.write(self.slot(self.req_prod_pvt), entry)
        self.req_prod_pvt = (self.req_prod_pvt + 1) & M32

    def push(self, force_notify: bool = False) -> bool:
        """RING_PUSH_REQUESTS_AND_CHECK_NOTIFY, then notify the backend if it asked."""
        old, new = self.req_prod, self.req_prod_pvt
        self.set_word(0, new)
        notify = (new - self.req_event) & M32 < (new - old) & M32
        if notify or force_notify:
            self.notifies += 1
            self.guest.xd.evtchn.send(self.port)
        return notify

    def poll(self) -> int:
        """Consume the responses published so far; RING_FINAL_CHECK_FOR_RESPONSES."""
        got = 0
        while True:
            prod = self.rsp_prod
            while self.rsp_cons != prod:
                self.responses.append(self.read(self.slot(self.rsp_cons), 16))
                self.rsp_cons = (self.rsp_cons + 1) & M32
                got += 1
            self.set_word(3, self.rsp_cons + 1)
            if self.rsp_prod == prod:
                return got


def poll(pred, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    """Whether ``pred()`` became true within ``timeout`` seconds (checked every 2 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.002)
    return bool(pred())


class FakeFrontend:
    """The xenstore side every fake frontend shares: its directory ``fe`` (written as the
    guest), the backend's ``be`` (read), and waiting for a backend state."""

    guest: FakeGuest
    server: XenstoreServer
    fe: str
    be: str

    def fe_write(self, key: str, value: str) -> None:
        self.server.write(f"{self.fe}/{key}", value, domid=self.guest.domid)

    def be_read(self, key: str) -> str | None:
        try:
            return self.server.read(f"{self.be}/{key}").decode()
        except Exception:
            return None

    def backend_state(self) -> int:
        v = self.be_read("state")
        return int(v) if v else 0

    def wait_backend(self, state: int, timeout: float = 5.0) -> bool:
        return poll(lambda: self.backend_state() == state, timeout)

    def set_state(self, state: int) -> None:
        self.fe_write("state", str(state))


class FakeBlkfront(FakeFrontend):
    """Linux's xen-blkfront handshake and ring use, for device ``devid`` of ``guest``."""

    def __init__(self, guest: FakeGuest, server: XenstoreServer, devid: int = 51712, *,
                 ring_page_order: int = 0, queues: int = 1, persistent: bool = True,
                 protocol: str = "x86_64-abi", start_index: int = 0) -> None:
        self.guest = guest
        self.server = server
        self.devid = devid
        self.order = ring_page_order
        self.nqueues = queues
        self.persistent = persistent
        self.protocol = protocol
        self.start_index = start_index
        self.fe = frontend_path("vbd", guest.domid, devid)
        self.be = backend_path("vbd", guest.domid, devid)
        self.rings: list[FrontRing] = []

    # --- handshake (blkfront's talk_to_blkback + blkfront_connect)
    def setup_rings(self) -> None:
        g = self.guest
        self.rings = []
        for _ in range(self.nqueues):
            gfns = [g.alloc_page(gap=3) for _ in range(1 << self.order)]
            refs = [g.grant(f) for f in gfns]
            port = g.xd.evtchn.alloc_unbound(X.DOMID_SELF, BACKEND)
            ring = FrontRing(g, gfns, refs, port)
            ring.init(self.start_index)
            self.rings.append(ring)

    def write_keys(self) -> None:
        if self.order:
            self.fe_write("ring-page-order", str(self.order))
        if self.nqueues > 1:
            self.fe_write("multi-queue-num-queues", str(self.nqueues))
        for q, ring in enumerate(self.rings):
            prefix = f"queue-{q}/" if self.nqueues > 1 else ""
            if self.order:
                for i, ref in enumerate(ring.refs):
                    self.fe_write(f"{prefix}ring-ref{i}", str(ref))
            else:
                self.fe_write(f"{prefix}ring-ref", str(ring.refs[0]))
            self.fe_write(f"{prefix}event-channel", str(ring.port))
        self.fe_write("protocol", self.protocol)
        self.fe_write("feature-persistent", "1" if self.persistent else "0")

    def connect(self, timeout: float = 5.0) -> None:
        """Initialise rings and keys, go Initialised, wait for Connected, go Connected."""
        self.setup_rings()
        self.write_keys()
        self.set_state(INITIALISED)
        if not self.wait_backend(CONNECTED, timeout):
            err = self.be_read("error")
            raise TimeoutError(f"backend state {self.backend_state()} (error {err!r})")
        self.set_state(CONNECTED)

    def close(self, timeout: float = 5.0) -> bool:
        """Closing then Closed (as blkfront does on removal); True once the backend is Closed."""
        self.set_state(5)
        self.set_state(CLOSED)
        return self.wait_backend(CLOSED, timeout)

    # --- I/O
    def submit(self, entries: list[bytes], queue: int = 0, force_notify: bool = False) -> None:
        ring = self.rings[queue]
        for e in entries:
            ring.put(e)
        ring.push(force_notify)

    def wait_responses(self, n: int, queue: int = 0, timeout: float = 5.0) -> list[bytes]:
        """The next ``n`` responses of ``queue`` (TimeoutError if they do not come)."""
        ring = self.rings[queue]
        deadline = time.monotonic() + timeout
        while len(ring.responses) < n:
            ring.poll()
            if len(ring.responses) >= n:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(ring.responses)} of {n} responses")
            time.sleep(0.0005)
        out, ring.responses = ring.responses[:n], ring.responses[n:]
        return out

    def request(self, entries: list[bytes], queue: int = 0,
                timeout: float = 5.0) -> list[tuple[int, int, int]]:
        """Submit and wait: [(id, op, status)] in response order."""
        self.submit(entries, queue)
        return [struct.unpack_from("<QBxh", r)
                for r in self.wait_responses(len(entries), queue, timeout)]


__all__ = ["FakeBlkfront", "FakeGuest", "FrontRing", "GNT_WINDOW", "create_vbd_nodes"]
