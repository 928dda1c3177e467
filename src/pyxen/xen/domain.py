"""The Xen personality of one domain: shared_info, vcpu_info, event channels, grant table,
HVM params, timers, consoles, and the hypercall dispatch that ties them to a core Domain.

:class:`XenDomain` implements :class:`pyxen.core.domain.ExitHandlers`. Hypercall handlers live
in :mod:`pyxen.xen.hypercalls` (one module per hypercall) and receive a
:class:`~pyxen.xen.context.HypercallContext`. A handler signals a guest error by raising
:class:`XenError`; :meth:`XenDomain.hypercall` turns it into ``-errno`` and one log line.
Nothing a guest passes in can raise out of :meth:`XenDomain.hypercall`.
"""

from __future__ import annotations

import ctypes
import logging
import struct
import uuid
from dataclasses import dataclass, field
from typing import Callable

from pyxen.core import atomics
from pyxen.core.clock import DomainClock
from pyxen.core.domain import NO_RETURN, Domain, Vcpu
from pyxen.core.memory import GuestMemoryError
from pyxen.xen.abi import xen as X
from pyxen.xen.abi.errno import EFAULT, EINVAL, ENOSYS, EPERM, NAMES, XenError
from pyxen.xen.context import HypercallContext
from pyxen.xen.evtchn import EventChannels
from pyxen.xen.gnttab import GrantTable
from pyxen.xen.pages import XenPage
from pyxen.xen.timers import Timers

log = logging.getLogger("pyxen.xen")

XEN_VERSION = (4, 17)
HYPERCALL_STUB_SIZE = 32


@dataclass
class VcpuXenState:
    """Per-vCPU Xen state (serialisable)."""

    vcpu_info_gpa: int | None = None      # registered vcpu_info (None: shared_info slot)
    upcall_vector: int = 0
    runstate_gva: int | None = None
    time_area_gva: int | None = None
    hvm_context: bytes | None = None       # from VCPUOP_initialise


@dataclass
class ConsoleSink:
    """Where guest output goes: a per-domain log plus an optional live stream callback."""

    log: dict[str, bytearray] = field(default_factory=lambda: {"debug": bytearray(),
                                                              "console": bytearray()})
    stream: Callable[[str, bytes], None] | None = None
    limit: int = 1 << 20

    def emit(self, channel: str, data: bytes) -> None:
        buf = self.log[channel]
        buf += data
        if len(buf) > self.limit:
            del buf[:len(buf) - self.limit]
        if self.stream is not None:
            self.stream(channel, data)


def _opt_int(v: object) -> int | None:
    return None if v is None else int(v)  # type: ignore[call-overload]


class XenDomain:
    """Xen hypervisor state for one :class:`Domain` and its exit handlers."""

    def __init__(self, domain: Domain, *, hypercall_msr: int, clock: DomainClock,
                 max_pages: int, sink: ConsoleSink | None = None) -> None:
        self.domain = domain
        self.domid = domain.domid
        self.memory = domain.memory
        self.clock = clock
        self.uuid = uuid.uuid4()
        self.hypercall_msr = hypercall_msr
        self.shared_info = XenPage(self.memory, "shared_info")
        self.vcpu_state: list[VcpuXenState] = []
        self.evtchn = EventChannels(self)
        self.gnttab = GrantTable(self)
        self.params: dict[int, int] = {}
        self.shutdown_code: int | None = None
        self.max_pages = max_pages
        self.tot_pages = max_pages
        self.ballooned: set[int] = set()        # RAM frames given back with decrease_reservation
        self.sink = sink or ConsoleSink()
        self.io_write_handlers: dict[int, Callable[[Vcpu, int, bytes], None]] = {}
        self.io_read_handlers: dict[int, Callable[[Vcpu, int, int], bytes]] = {}
        self.timers = Timers(clock, self._timer_fired, f"d{self.domid}")
        self.bad_hypercalls = 0
        from pyxen.xen.hypercalls import TABLE  # late: handlers import this module's types
        self.table = TABLE

    def add_vcpu_state(self) -> None:
        self.vcpu_state.append(VcpuXenState())

    # ------------------------------------------------------------------ ExitHandlers
    def hypercall(self, vcpu: Vcpu) -> object:
        regs = vcpu.ev.get_regs()
        ctx = HypercallContext(self, vcpu, regs)
        nr = ctx.nr
        handler = self.table.get(nr)
        try:
            if ctx.cpl != 0:
                raise XenError(EPERM, f"hypercall from CPL {ctx.cpl}")
            if handler is None:
                raise XenError(ENOSYS, f"unknown hypercall {nr}")
            result = handler(ctx)
        except XenError as e:
            self._log_bad(vcpu, nr, ctx.args, e.errno, e.why)
            return -e.errno
        except GuestMemoryError as e:
            self._log_bad(vcpu, nr, ctx.args, EFAULT, str(e))
            return -EFAULT
        except Exception as e:  # a pyxen bug: the guest gets an error, the VMM goes on
            log.exception("d%dv%d hypercall %d: internal error: %s", self.domid, vcpu.index,
                          nr, e)
            return -EINVAL
        return result

    def log_grant_failure(self, e: Exception) -> None:
        log.info("d%d grant copy failed: %s", self.domid, e)

    def _log_bad(self, vcpu: Vcpu, nr: int, args: tuple, errno: int, why: str) -> None:
        self.bad_hypercalls += 1
        name = getattr(self.table.get(nr), "hypercall_name", str(nr))
        log.info("d%dv%d %s(%s) -> -%s%s", self.domid, vcpu.index, name,
                 ", ".join(hex(a) for a in args[:3]), NAMES.get(errno, errno),
                 f": {why}" if why else "")

    def io_write(self, vcpu: Vcpu, port: int, data: bytes) -> None:
        h = self.io_write_handlers.get(port)
        if h is not None:
            h(vcpu, port, data)

    def io_read(self, vcpu: Vcpu, port: int, size: int) -> bytes:
        h = self.io_read_handlers.get(port)
        return h(vcpu, port, size) if h is not None else b"\xff" * size

    def msr_write(self, vcpu: Vcpu, msr: int, value: int) -> bool:
        if msr == self.hypercall_msr:
            return self.write_hypercall_page(value)
        return False

    def msr_read(self, vcpu: Vcpu, msr: int) -> int | None:
        return None

    # ------------------------------------------------------------------ vCPU lifecycle
    def stage_vcpu_context(self, vcpuid: int, state: dict) -> None:
        """VCPUOP_initialise: remember the context; it is loaded on the vCPU's own thread."""
        from pyxen.arch.x86.cpu import hvm_context_state
        v = self.domain.vcpus[vcpuid]

        def load(vcpu: Vcpu) -> None:
            sregs = vcpu.ev.get_sregs()
            regs = hvm_context_state(sregs, state)
            vcpu.ev.set_sregs(sregs)
            vcpu.ev.set_regs(regs)
            vcpu.ev.make_runnable()
        v.setup = load
        v.initialised = True

    def start_vcpu(self, vcpuid: int) -> None:
        self.domain.vcpus[vcpuid].start()

    def guest_shutdown(self, vcpu: Vcpu, reason: int) -> object:
        """SCHEDOP_shutdown: the domain shuts down; the calling vCPU does not continue."""
        name = X.SHUTDOWN_NAMES.get(reason, "crash")
        detail = "" if reason in X.SHUTDOWN_NAMES else f"unknown shutdown reason {reason}"
        if self.shutdown_code is None:
            self.shutdown_code = reason
        self.domain.shutdown(name, detail)
        return NO_RETURN

    # ------------------------------------------------------------------ hypercall page
    def write_hypercall_page(self, value: int) -> bool:
        """Fill the page at ``value & ~0xFFF`` with stubs (``mov $nr,%eax; out %eax,$port; ret``).

        Returns False (the guest gets #GP) for a page index other than 0 or a frame without RAM.
        """
        from pyxen.engine.base import Engine
        gpa = value & ~0xFFF
        if value & 0xFFF or not self.memory.is_ram(gpa):
            log.info("d%d: bad hypercall page MSR value 0x%x", self.domid, value)
            return False
        page = bytearray(4096)
        for nr in range(4096 // HYPERCALL_STUB_SIZE):
            stub = b"\xb8" + struct.pack("<I", nr) + bytes([0xE7, Engine.HYPERCALL_PORT, 0xC3])
            page[nr * HYPERCALL_STUB_SIZE:nr * HYPERCALL_STUB_SIZE + len(stub)] = stub
        self.memory.write(gpa, bytes(page))
        return True

    # ------------------------------------------------------------------ vcpu_info & delivery
    def vcpu_info_addr(self, vcpu: int) -> int | None:
        """Host address of vCPU ``vcpu``'s vcpu_info, or None if it has none."""
        st = self.vcpu_state[vcpu]
        if st.vcpu_info_gpa is not None:
            try:
                return self.memory.host_addr(st.vcpu_info_gpa, X.VCPU_INFO_SIZE)
            except GuestMemoryError:
                return None
        if vcpu < X.XEN_LEGACY_MAX_VCPUS:
            return self.shared_info.addr + vcpu * X.VCPU_INFO_SIZE
        return None

    def mark_selector(self, vcpu: int, port: int) -> None:
        """Set the selector bit for ``port`` on ``vcpu``; raise the upcall if it was clear."""
        vi = self.vcpu_info_addr(vcpu)
        if vi is None:
            return
        if not atomics.test_and_set_bit(vi + X.VI_PENDING_SEL, port // 64):
            self.mark_events_pending(vcpu)

    def mark_events_pending(self, vcpu: int) -> None:
        """Xen's ``vcpu_mark_events_pending``: set upcall_pending, then assert the upcall."""
        vi = self.vcpu_info_addr(vcpu)
        if vi is None:
            return
        if not atomics.fetch_or(vi + X.VI_UPCALL_PENDING, 1) & 1:
            self.assert_upcall(vcpu)
        self.domain.notify()

    def assert_upcall(self, vcpu: int) -> None:
        vector = self.vcpu_state[vcpu].upcall_vector
        if vector == 0:
            via = self.params.get(X.HVM_PARAM_CALLBACK_IRQ, 0)
            if via >> 56 == 2 and vcpu == 0:          # HVM_PARAM_CALLBACK_TYPE_VECTOR
                vector = via & 0xFF
        if vector:
            self.domain.vm.inject_msi(self.domain.vcpus[vcpu].apic_id, vector)

    def resync_events(self) -> None:
        """After a restore: make event state captured mid-change consistent and deliver
        it. Pending unmasked ports get their selectors (:meth:`EventChannels.repair_pending`),
        vCPUs with selector bits get ``evtchn_upcall_pending``, every port served by an
        in-VMM backend gets one (spurious) event, and every vCPU with an upcall pending
        gets its vector again. Spurious events are harmless in Xen's model: the receiver
        checks its ring."""
        self.evtchn.repair_pending()
        with self.domain.vm.exclusive(), self.evtchn.lock:
            for i in range(len(self.vcpu_state)):
                vi = self.vcpu_info_addr(i)
                if vi is not None and atomics.load(vi + X.VI_PENDING_SEL):
                    self.mark_events_pending(i)
        for port, ch in enumerate(self.evtchn.ports):
            if ch.backend is not None:
                self.evtchn.set_pending(port)
        for i in range(len(self.vcpu_state)):
            if self.upcall_pending(i):
                self.assert_upcall(i)

    def upcall_pending(self, vcpu: int) -> bool:
        vi = self.vcpu_info_addr(vcpu)
        return vi is not None and bool(ctypes.c_uint8.from_address(vi).value & 1)

    def clear_port_bits(self, port: int) -> None:
        si = self.shared_info.addr
        atomics.test_and_clear_bit(si + X.SI_EVTCHN_PENDING, port)

    # ------------------------------------------------------------------ time
    def time_info(self, version: int) -> bytes:
        p = self.clock.params
        return struct.pack("<IIQQIbBxx", version, 0, p.tsc_timestamp, p.system_time, p.mul,
                           p.shift, 0)

    def write_time(self, addr: int) -> None:
        """Write pvclock into the vcpu_time_info at host address ``addr`` (version protocol)."""
        ver = ctypes.c_uint32.from_address(addr)
        v = (ver.value + 1) | 1
        ver.value = v                               # odd: update in progress
        ctypes.memmove(addr + 4, self.time_info(v)[4:], 28)
        ver.value = v + 1

    def publish_time(self) -> None:
        """Refresh pvclock in every vcpu_info copy and the wallclock in shared_info."""
        for i in range(len(self.vcpu_state)):
            if i < X.XEN_LEGACY_MAX_VCPUS:
                self.write_time(self.shared_info.addr + i * X.VCPU_INFO_SIZE + X.VI_TIME)
            vi = self.vcpu_info_addr(i)
            if vi is not None:
                self.write_time(vi + X.VI_TIME)
        si = self.shared_info.addr
        wc = self.clock.wallclock_ns
        ver = ctypes.c_uint32.from_address(si + X.SI_WC_VERSION)
        v = (ver.value + 1) | 1
        ver.value = v
        ctypes.memmove(si + X.SI_WC_SEC, struct.pack("<III", (wc // 10**9) & 0xFFFFFFFF,
                                                     wc % 10**9, wc // 10**9 >> 32), 12)
        ver.value = v + 1

    def _timer_fired(self, vcpu: int) -> None:
        self.evtchn.send_virq(vcpu, X.VIRQ_TIMER)

    # ------------------------------------------------------------------ save/restore
    def save_state(self) -> dict:
        """Everything Xen keeps for this domain outside guest RAM, JSON-compatible, except
        the hypervisor pages' contents (:meth:`hypervisor_pages`). The domain is quiesced."""
        return {
            "uuid": str(self.uuid), "params": {str(k): v for k, v in self.params.items()},
            "shutdown_code": self.shutdown_code, "max_pages": self.max_pages,
            "tot_pages": self.tot_pages, "ballooned": sorted(self.ballooned),
            "e820": [list(e) for e in getattr(self, "e820", [])],
            "vcpus": [{"vcpu_info_gpa": st.vcpu_info_gpa, "upcall_vector": st.upcall_vector,
                       "runstate_gva": st.runstate_gva, "time_area_gva": st.time_area_gva,
                       "hvm_context": st.hvm_context.hex() if st.hvm_context else None}
                      for st in self.vcpu_state],
            "shared_info_gfn": self.shared_info.gfn,
            "evtchn": self.evtchn.save(), "gnttab": self.gnttab.save(),
            "timers": self.timers.save(), "clock": self.clock.save(),
        }

    def hypervisor_pages(self) -> list[tuple[int, int, bytes]]:
        """(kind, index, contents) of every hypervisor page: kind 1 shared_info, 2 grant frame."""
        out = [(1, 0, self.shared_info.contents())]
        out += [(2, i, f.contents()) for i, f in enumerate(self.gnttab.frames)]
        return out

    def load_state(self, st: dict, pages: dict[tuple[int, int], bytes]) -> None:
        """Apply :meth:`save_state`'s output and the hypervisor pages to this fresh domain
        (built with the same config, not yet run). Raises ValueError naming the bad part.
        Timers are re-armed last; the clock is loaded by the caller (it needs the vCPUs)."""
        try:
            self.uuid = uuid.UUID(st["uuid"])
            params = {int(k): int(v) for k, v in st["params"].items()}
            vcpus = st["vcpus"]
            if len(vcpus) != len(self.vcpu_state):
                raise ValueError(f"{len(vcpus)} vCPUs saved, {len(self.vcpu_state)} configured")
            states = []
            for v in vcpus:
                states.append(VcpuXenState(
                    _opt_int(v["vcpu_info_gpa"]), int(v["upcall_vector"]) & 0xFF,
                    _opt_int(v["runstate_gva"]), _opt_int(v["time_area_gva"]),
                    bytes.fromhex(v["hvm_context"]) if v["hvm_context"] else None))
            max_pages, tot_pages = int(st["max_pages"]), int(st["tot_pages"])
            ballooned = {int(x) for x in st["ballooned"]}
            e820 = [(int(a), int(b), int(c)) for a, b, c in st["e820"]]
            si_gfn = _opt_int(st["shared_info_gfn"])
            code = _opt_int(st["shutdown_code"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"Xen state: {e}") from None
        self.evtchn.load(st.get("evtchn", {}))
        self.gnttab.load(st.get("gnttab", {}),
                         {i: data for (kind, i), data in pages.items() if kind == 2})
        if (1, 0) in pages:
            self.shared_info.write(0, pages[(1, 0)])
        if si_gfn is not None:
            self.shared_info.place(si_gfn)
        self.params, self.vcpu_state = params, states
        self.max_pages, self.tot_pages, self.ballooned = max_pages, tot_pages, ballooned
        self.e820, self.shutdown_code = e820, code
        self.timers.load(st.get("timers", {}), len(self.vcpu_state))

    def close(self) -> None:
        self.timers.close()

