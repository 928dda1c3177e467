"""Two-level event channels (Xen's ``common/event_channel.c`` + ``event_2l.c`` semantics).

Per-port state lives here (type, notify vCPU, remote end); the guest-visible pending/mask bitmaps
live in shared_info and the selector/upcall bytes in each vCPU's vcpu_info, updated with atomic
operations because the guest changes the same words concurrently.

Delivery (:meth:`EventChannels.set_pending`) may run on any thread: it sets the pending bit, the
selector bit and ``evtchn_upcall_pending`` of the notify vCPU and then asks the domain to raise the
upcall (an MSI of the vCPU's upcall vector). Ports bound to "domain 0" are served by in-VMM
backends: a send from the guest calls the backend's callback.

Errors raise :class:`XenError` with Xen's errno for the same case.
"""

from __future__ import annotations

import contextlib

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

from pyxen.core import atomics
from pyxen.xen.abi import xen as X
from pyxen.xen.abi.errno import EEXIST, EINVAL, ENOENT, ENOSPC, EPERM, ESRCH, XenError

if TYPE_CHECKING:
    from pyxen.xen.domain import XenDomain

PORTS_PER_BUCKET = 64      # Xen allocates channel state in buckets; ports beyond are invalid
FREE, UNBOUND, INTERDOMAIN, PIRQ, VIRQ, IPI = 0, 1, 2, 3, 4, 5
BACKEND_DOMID = 0


@dataclass
class Port:
    """Hypervisor-side state of one event channel (serialisable)."""

    state: int = FREE
    notify_vcpu: int = 0
    remote_dom: int = 0        # UNBOUND: who may bind; INTERDOMAIN: the peer domain
    remote_port: int = 0       # INTERDOMAIN: the peer's port
    virq: int = 0
    backend: Callable[[int], None] | None = None   # INTERDOMAIN with dom0: in-VMM backend

    def to_dict(self) -> dict:
        return {"state": self.state, "notify_vcpu": self.notify_vcpu,
                "remote_dom": self.remote_dom, "remote_port": self.remote_port,
                "virq": self.virq}


class EventChannels:
    """All event channels of one domain."""

    def __init__(self, xd: XenDomain) -> None:
        self.xd = xd
        self.ports: list[Port] = [Port(state=FREE)]    # port 0 is reserved, never allocated
        self.virqs: dict[tuple[int, int], int] = {}   # (vcpu, virq) -> port
        self.lock = threading.RLock()
        self._backend_ports = 0

    # --- helpers
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The table lock, always taken inside ``vm.exclusive()`` (one lock order everywhere:
        engine, then table), because set_pending may run under it and must not race the
        guest's own locked updates of the same words."""
        with self.xd.domain.vm.exclusive(), self.lock:
            yield

    @property
    def domid(self) -> int:
        return self.xd.domid

    def _valid(self, port: int) -> bool:
        return 0 <= port < len(self.ports)

    def _get(self, port: int) -> Port:
        if not 0 < port < len(self.ports) or port >= X.EVTCHN_2L_NR_CHANNELS:
            raise XenError(EINVAL, f"port {port} out of range")
        return self.ports[port]

    def _alloc(self) -> int:
        for p in range(1, len(self.ports)):
            if self.ports[p].state == FREE:
                return p
        p = len(self.ports)
        if p >= X.EVTCHN_2L_NR_CHANNELS:
            raise XenError(ENOSPC, "no free event channel")
        self.ports.extend(Port() for _ in range(PORTS_PER_BUCKET - p % PORTS_PER_BUCKET))
        return p

    def _resolve_dom(self, dom: int) -> int:
        return self.domid if dom == X.DOMID_SELF else dom

    def _check_vcpu(self, vcpu: int) -> None:
        if not 0 <= vcpu < len(self.xd.domain.vcpus):
            raise XenError(ENOENT, f"no vcpu {vcpu}")

    # --- operations (EVTCHNOP_*)
    def alloc_unbound(self, dom: int, remote_dom: int) -> int:
        if self._resolve_dom(dom) != self.domid:
            raise XenError(EPERM if dom < X.DOMID_FIRST_RESERVED else ESRCH,
                           f"alloc_unbound for domain {dom}")
        with self._locked():
            p = self._alloc()
            self.ports[p] = Port(UNBOUND, 0, self._resolve_dom(remote_dom))
            return p

    def bind_interdomain(self, remote_dom: int, remote_port: int) -> int:
        rdom = self._resolve_dom(remote_dom)
        if rdom != self.domid:
            # Other domains live in other VMM processes; a domU binds only within itself.
            raise XenError(ESRCH if rdom != BACKEND_DOMID else EPERM,
                           f"bind_interdomain to domain {remote_dom}")
        with self._locked():
            if not 0 < remote_port < len(self.ports):
                raise XenError(EINVAL, f"remote port {remote_port}")
            r = self.ports[remote_port]
            if r.state != UNBOUND or r.remote_dom != self.domid:
                raise XenError(EINVAL, f"remote port {remote_port} not unbound for us")
            p = self._alloc()
            self.ports[p] = Port(INTERDOMAIN, 0, self.domid, remote_port)
            r.state, r.remote_dom, r.remote_port = INTERDOMAIN, self.domid, p
        # Notifications sent to the unbound port may be lost: Xen conservatively raises the new
        # local port (evtchn_bind_interdomain).
        self.set_pending(p)
        return p

    def bind_virq(self, virq: int, vcpu: int) -> int:
        if not 0 <= virq < X.NR_VIRQS:
            raise XenError(EINVAL, f"virq {virq}")
        if virq not in X.VIRQ_PER_VCPU and vcpu != 0:
            raise XenError(EINVAL, f"global virq {virq} on vcpu {vcpu}")
        self._check_vcpu(vcpu)
        with self._locked():
            if (vcpu, virq) in self.virqs:
                raise XenError(EEXIST, f"virq {virq} already bound on vcpu {vcpu}")
            p = self._alloc()
            self.ports[p] = Port(VIRQ, vcpu, virq=virq)
            self.virqs[(vcpu, virq)] = p
            return p

    def bind_ipi(self, vcpu: int) -> int:
        self._check_vcpu(vcpu)
        with self._locked():
            p = self._alloc()
            self.ports[p] = Port(IPI, vcpu)
            return p

    def bind_vcpu(self, port: int, vcpu: int) -> None:
        self._check_vcpu(vcpu)
        with self._locked():
            ch = self._get(port)
            if ch.state == VIRQ and ch.virq in X.VIRQ_PER_VCPU:
                raise XenError(EINVAL, "per-vcpu virq cannot move")
            if ch.state not in (UNBOUND, INTERDOMAIN, VIRQ, PIRQ):
                raise XenError(EINVAL, f"port {port} in state {ch.state} cannot move")
            ch.notify_vcpu = vcpu     # a global VIRQ stays bound as (0, virq); only delivery moves

    def close(self, port: int) -> None:
        with self._locked():
            ch = self._get(port)
            if ch.state == FREE:
                raise XenError(EINVAL, f"port {port} not in use")
            if ch.state == VIRQ:
                key = (ch.notify_vcpu if ch.virq in X.VIRQ_PER_VCPU else 0, ch.virq)
                self.virqs.pop(key, None)
            elif ch.state == INTERDOMAIN and ch.remote_dom == self.domid and ch.backend is None:
                peer = self.ports[ch.remote_port]
                peer.state, peer.remote_dom, peer.remote_port = UNBOUND, self.domid, 0
            self.ports[port] = Port()
            self.xd.clear_port_bits(port)

    def status(self, dom: int, port: int) -> tuple[int, int, bytes]:
        """Returns (status, vcpu, 8-byte union) as EVTCHNOP_status reports them."""
        if self._resolve_dom(dom) != self.domid:
            raise XenError(ESRCH if dom != BACKEND_DOMID else EPERM, f"status of domain {dom}")
        with self._locked():
            if not 0 <= port < len(self.ports):
                raise XenError(EINVAL, f"port {port} out of range")
            ch = self.ports[port]
            u = bytes(8)
            if ch.state == UNBOUND:
                u = ch.remote_dom.to_bytes(2, "little") + bytes(6)
            elif ch.state == INTERDOMAIN:
                u = (ch.remote_dom.to_bytes(2, "little") + bytes(2)
                     + ch.remote_port.to_bytes(4, "little"))
            elif ch.state == VIRQ:
                u = ch.virq.to_bytes(4, "little") + bytes(4)
            return ch.state, ch.notify_vcpu, u

    def send(self, port: int) -> None:
        with self._locked():
            ch = self._get(port)
            if ch.state == INTERDOMAIN:
                if ch.backend is not None:
                    backend = ch.backend
                else:
                    self.set_pending(ch.remote_port)
                    return
            elif ch.state == IPI:
                self.set_pending(port)
                return
            elif ch.state == UNBOUND:
                return                           # silently dropped, as Xen does
            else:
                raise XenError(EINVAL, f"cannot send on port {port} (state {ch.state})")
        backend(port)                            # outside the lock: backends may raise events

    def unmask(self, port: int) -> None:
        with self._locked():
            ch = self._get(port)
            xd = self.xd
            si = xd.shared_info.addr
            if (atomics.test_and_clear_bit(si + X.SI_EVTCHN_MASK, port)
                    and atomics.test_bit(si + X.SI_EVTCHN_PENDING, port)):
                xd.mark_selector(ch.notify_vcpu, port)

    def repair_pending(self) -> None:
        """Give every pending, unmasked port its selector bit (and upcall) again, as
        EVTCHNOP_unmask does for one port. For event state copied while it changed (a
        restore): a port left pending without its selector would never be delivered,
        since a later send finds its pending bit already set."""
        with self._locked():
            si = self.xd.shared_info.addr
            for port, ch in enumerate(self.ports):
                if (port and ch.state != FREE
                        and atomics.test_bit(si + X.SI_EVTCHN_PENDING, port)
                        and not atomics.test_bit(si + X.SI_EVTCHN_MASK, port)):
                    self.xd.mark_selector(ch.notify_vcpu, port)

    def reset(self) -> None:
        with self._locked():
            for p in range(1, len(self.ports)):
                if self.ports[p].state != FREE and self.ports[p].backend is None:
                    self.close(p)

    # --- delivery
    def set_pending(self, port: int) -> None:
        """Raise event ``port`` (any thread). Xen's ``evtchn_2l_set_pending``.

        Inside ``vm.exclusive()``: the guest updates the same words with locked instructions.
        """
        with self._locked():
            if not 0 < port < len(self.ports) or self.ports[port].state == FREE:
                return
            vcpu = self.ports[port].notify_vcpu
            si = self.xd.shared_info.addr
            if atomics.test_and_set_bit(si + X.SI_EVTCHN_PENDING, port):
                return
            if not atomics.test_bit(si + X.SI_EVTCHN_MASK, port):
                self.xd.mark_selector(vcpu, port)
        self.xd.domain.notify()                  # wake SCHEDOP_poll / block waiters

    def send_virq(self, vcpu: int, virq: int) -> None:
        port = self.virqs.get((vcpu if virq in X.VIRQ_PER_VCPU else 0, virq))
        if port:
            self.set_pending(port)

    def is_pending(self, port: int) -> bool:
        return atomics.test_bit(self.xd.shared_info.addr + X.SI_EVTCHN_PENDING, port)

    # --- save/restore
    def save(self) -> dict:
        """The table as JSON-compatible data. A port served by an in-VMM backend is saved
        as unbound for domain 0: backends are not state, they re-attach after a restore."""
        with self._locked():
            ports = []
            for ch in self.ports:
                d = ch.to_dict()
                if ch.backend is not None:
                    d.update(state=UNBOUND, remote_dom=BACKEND_DOMID, remote_port=0)
                ports.append(d)
            return {"ports": ports,
                    "virqs": [[v, virq, p] for (v, virq), p in sorted(self.virqs.items())]}

    def load(self, st: dict) -> None:
        """Replace the table with :meth:`save`'s output (a fresh domain, before it runs).
        Raises ValueError naming the bad entry; the table is unchanged then."""
        nvcpus = len(self.xd.domain.vcpus)
        raw = st.get("ports")
        if not isinstance(raw, list) or not 1 <= len(raw) <= X.EVTCHN_2L_NR_CHANNELS:
            raise ValueError("event channels: 'ports' must be a list of 1.."
                             f"{X.EVTCHN_2L_NR_CHANNELS} entries")
        ports: list[Port] = []
        for i, d in enumerate(raw):
            try:
                ch = Port(int(d["state"]), int(d["notify_vcpu"]), int(d["remote_dom"]),
                          int(d["remote_port"]), int(d["virq"]))
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"event channel {i}: {e!r}") from None
            if (not FREE <= ch.state <= IPI or ch.state == PIRQ or not 0 <= ch.notify_vcpu < nvcpus
                    or not 0 <= ch.virq < X.NR_VIRQS
                    or not 0 <= ch.remote_dom < X.DOMID_FIRST_RESERVED
                    or not 0 <= ch.remote_port < len(raw) or (i == 0 and ch.state != FREE)):
                raise ValueError(f"event channel {i}: bad state {d}")
            ports.append(ch)
        for i, ch in enumerate(ports):
            if ch.state == INTERDOMAIN and (ch.remote_dom != self.domid
                                             or ports[ch.remote_port].state != INTERDOMAIN):
                raise ValueError(f"event channel {i}: interdomain peer is not a local port")
        virqs: dict[tuple[int, int], int] = {}
        for e in st.get("virqs", []):
            try:
                v, virq, p = (int(x) for x in e)
            except (TypeError, ValueError):
                raise ValueError(f"event channels: bad virq entry {e!r}") from None
            if not 0 < p < len(ports) or ports[p].state != VIRQ or ports[p].virq != virq:
                raise ValueError(f"event channels: virq {virq} names port {p}, not a VIRQ port")
            virqs[(v, virq)] = p
        with self._locked():
            self.ports = ports
            self.virqs = virqs

    # --- in-VMM backends ("domain 0" ends)
    def bind_backend(self, port: int, callback: Callable[[int], None]) -> int:
        """Connect an in-VMM backend to guest port ``port`` (unbound for domain 0).

        Returns the backend's own port number (as EVTCHNOP_status shows it to the guest).
        """
        with self._locked():
            ch = self._get(port)
            if ch.state != UNBOUND or ch.remote_dom != BACKEND_DOMID:
                raise XenError(EINVAL, f"port {port} is not unbound for domain 0")
            self._backend_ports += 1
            ch.state, ch.remote_port, ch.backend = INTERDOMAIN, self._backend_ports, callback
            return self._backend_ports

    def unbind_backend(self, port: int) -> None:
        """The in-VMM backend closed its end of ``port``: the guest's port becomes unbound
        for domain 0 again (as when a dom0 backend closes an interdomain channel). A port the
        guest already closed or reused is left alone."""
        with self._locked():
            if not 0 < port < len(self.ports):
                return
            ch = self.ports[port]
            if ch.state == INTERDOMAIN and ch.backend is not None:
                ch.state, ch.remote_dom, ch.remote_port, ch.backend = \
                    UNBOUND, BACKEND_DOMID, 0, None
