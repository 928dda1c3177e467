"""A sans-IO xAPIC (local APIC) model, as a Linux 6.1 x86-64 PVH guest drives it.

One :class:`Lapic` per vCPU. It does no I/O, starts no threads, takes no locks and reads no
clock: the caller (the CPU engine) serialises every call and passes ``now_ns`` (guest time in
nanoseconds, monotonic) wherever time matters. All state is explicit and round-trips exactly
through :meth:`Lapic.to_dict` / :meth:`Lapic.from_dict` (JSON-compatible values).

Who calls what:

* MMIO at ``LAPIC_BASE`` (0xFEE00000): the engine calls :meth:`Lapic.read` / :meth:`Lapic.write`
  with the byte offset into the 4 KiB page. Registers are 32 bits wide at 16-byte strides; only
  4-byte accesses at 16-byte-aligned offsets are honoured. Any other size or offset (reserved
  slots, offsets outside the page) reads 0 and ignores writes. Read-only registers ignore
  writes; write-only EOI reads 0.
* Interrupt acceptance: whoever routes an interrupt here (another vCPU's :class:`Ipi`, the timer,
  an MSI) calls :meth:`Lapic.accept_fixed`; the engine polls :meth:`Lapic.deliverable` when the
  vCPU can take an interrupt (RFLAGS.IF etc. are its business) and :meth:`Lapic.ack` when it
  injects one.
* IPIs: a write to ICR-low returns an :class:`Ipi`; the caller routes it (using
  :meth:`Lapic.matches` on each target, or the shorthand) and calls ``accept_fixed`` /
  ``receive_init`` / ``receive_sipi`` on the targets. Delivery status always reads 0 ("idle").
  INIT level de-assert IPIs (:attr:`Ipi.is_init_deassert`) must be dropped by the caller.
* Timer: the engine arms a host timer for :meth:`Lapic.timer_deadline` and calls
  :meth:`Lapic.timer_expired` once ``now_ns >= deadline``.

Behaviour follows the Intel SDM vol. 3 "Advanced Programmable Interrupt Controller" chapter:
PPR from TPR and the highest in-service vector; an IRR vector is deliverable when its priority
class (vector[7:4]) exceeds PPR[7:4]; EOI retires the highest ISR bit. Version 0x00050014
(version 0x14, max LVT entry 5: timer, thermal, perf, LINT0, LINT1, error). The CMCI LVT
(0x2F0) is storage only (not counted by the version register, never delivers). LVT error,
thermal, perf, LINT0/LINT1 accept writes but never deliver. TSC-deadline timer mode is not
offered (CPUID hides it): LVT timer modes 2/3 keep the timer disarmed. SVR bit 12 (EOI-broadcast
suppression) is not supported and reads 0. x2APIC and the APIC base MSR are not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# ---- register offsets (bytes into the 4 KiB page) ----
REG_ID = 0x20
REG_VERSION = 0x30
REG_TPR = 0x80
REG_APR = 0x90
REG_PPR = 0xA0
REG_EOI = 0xB0
REG_RRD = 0xC0
REG_LDR = 0xD0
REG_DFR = 0xE0
REG_SVR = 0xF0
REG_ISR = 0x100  # .. 0x170
REG_TMR = 0x180  # .. 0x1F0
REG_IRR = 0x200  # .. 0x270
REG_ESR = 0x280
REG_LVT_CMCI = 0x2F0
REG_ICR_LOW = 0x300
REG_ICR_HIGH = 0x310
REG_LVT_TIMER = 0x320
REG_LVT_THERMAL = 0x330
REG_LVT_PERF = 0x340
REG_LVT_LINT0 = 0x350
REG_LVT_LINT1 = 0x360
REG_LVT_ERROR = 0x370
REG_TIMER_INITIAL = 0x380
REG_TIMER_CURRENT = 0x390
REG_TIMER_DIVIDE = 0x3E0

PAGE_SIZE = 0x1000
LAPIC_VERSION = 0x00050014

# ---- field values ----
DM_FIXED, DM_LOWEST, DM_SMI, DM_NMI, DM_INIT, DM_STARTUP, DM_EXTINT = 0, 1, 2, 4, 5, 6, 7
DEST_PHYSICAL, DEST_LOGICAL = 0, 1
SH_NONE, SH_SELF, SH_ALL_INCL_SELF, SH_ALL_EXCL_SELF = 0, 1, 2, 3
TIMER_ONESHOT, TIMER_PERIODIC, TIMER_TSC_DEADLINE = 0, 1, 2

LVT_MASKED = 1 << 16
SVR_ENABLE = 1 << 8
SVR_WRITABLE = 0x3FF  # vector, APIC software enable, focus-processor-check disable
ESR_SEND_ILLEGAL_VECTOR = 1 << 5
ESR_RECV_ILLEGAL_VECTOR = 1 << 6
ICR_LOW_WRITABLE = 0x000CCFFF  # vector, mode, dest mode, level, trigger, shorthand
ICR_HIGH_WRITABLE = 0xFF000000
DFR_FLAT, DFR_CLUSTER = 0xF, 0x0  # DFR[31:28]

#: Writable bits of each LVT (read-only delivery status and remote IRR excluded).
_LVT_WRITABLE = {
    REG_LVT_CMCI: 0x000107FF,     # vector, delivery mode, mask
    REG_LVT_TIMER: 0x000700FF,    # vector, mask, timer mode (bits 18:17)
    REG_LVT_THERMAL: 0x000107FF,
    REG_LVT_PERF: 0x000107FF,
    REG_LVT_LINT0: 0x0001A7FF,    # + input polarity (13), trigger mode (15)
    REG_LVT_LINT1: 0x0001A7FF,
    REG_LVT_ERROR: 0x000100FF,
}
_LVT_NAMES = {REG_LVT_CMCI: "cmci", REG_LVT_TIMER: "timer", REG_LVT_THERMAL: "thermal",
              REG_LVT_PERF: "perf", REG_LVT_LINT0: "lint0", REG_LVT_LINT1: "lint1",
              REG_LVT_ERROR: "error"}
_LVT_BY_NAME = {name: off for off, name in _LVT_NAMES.items()}

STATE_RUNNING = "running"
STATE_WAIT_FOR_SIPI = "wait_for_sipi"
_STATES = (STATE_RUNNING, STATE_WAIT_FOR_SIPI)

_NS_PER_S = 1_000_000_000
_U32 = 0xFFFFFFFF


@dataclass(frozen=True)
class Ipi:
    """An inter-processor interrupt as sent by a write to ICR-low (SDM ICR field layout).

    ``delivery_mode``: 0 fixed, 1 lowest priority, 2 SMI, 4 NMI, 5 INIT, 6 start-up (SIPI);
    ``dest_mode``: 0 physical, 1 logical; ``dest``: 8-bit destination (ICR-high[31:24]);
    ``shorthand``: 0 none, 1 self, 2 all including self, 3 all excluding self; ``level``: 1 assert,
    0 de-assert; ``trigger``: 0 edge, 1 level; ``source``: the sender's APIC id.
    """

    delivery_mode: int
    vector: int
    dest_mode: int
    dest: int
    shorthand: int
    level: int
    trigger: int
    source: int

    @classmethod
    def from_icr(cls, low: int, high: int, source: int) -> Ipi:
        """Decode ICR-low/ICR-high register values sent by APIC ``source``."""
        return cls(delivery_mode=(low >> 8) & 7, vector=low & 0xFF, dest_mode=(low >> 11) & 1,
                   dest=(high >> 24) & 0xFF, shorthand=(low >> 18) & 3, level=(low >> 14) & 1,
                   trigger=(low >> 15) & 1, source=source)

    @property
    def icr_low(self) -> int:
        """The ICR-low value that encodes this IPI (delivery status 0)."""
        return (self.vector | self.delivery_mode << 8 | self.dest_mode << 11
                | self.level << 14 | self.trigger << 15 | self.shorthand << 18)

    @property
    def icr_high(self) -> int:
        """The ICR-high value that encodes this IPI's destination."""
        return self.dest << 24

    @property
    def is_init_deassert(self) -> bool:
        """INIT level de-assert (level 0, trigger level): every receiver must ignore it."""
        return self.delivery_mode == DM_INIT and self.level == 0 and self.trigger == 1


def _words(bitmap: int) -> list[int]:
    return [(bitmap >> (32 * i)) & _U32 for i in range(8)]


def _bitmap(words: Any, name: str) -> int:
    if not (isinstance(words, list) and len(words) == 8
            and all(isinstance(w, int) and 0 <= w <= _U32 for w in words)):
        raise ValueError(f"lapic state: {name} must be a list of 8 u32 words")
    return sum(w << (32 * i) for i, w in enumerate(words))


class Lapic:
    """One vCPU's local APIC in xAPIC mode. See the module docstring for the calling contract.

    ``bus_hz`` is the APIC timer's input clock (before the divide configuration); the default
    1 GHz makes one bus cycle one nanosecond. ``state`` is ``"running"`` (BSP) or
    ``"wait_for_sipi"`` (an AP before its start-up IPI); the caller may set it directly.
    """

    def __init__(self, apic_id: int, *, bus_hz: int = 1_000_000_000,
                 state: str = STATE_RUNNING) -> None:
        if not 0 <= apic_id <= 0xFF:
            raise ValueError(f"xAPIC id {apic_id} does not fit in 8 bits")
        if bus_hz <= 0:
            raise ValueError("bus_hz must be positive")
        if state not in _STATES:
            raise ValueError(f"bad state {state!r}")
        self.apic_id = apic_id
        self.bus_hz = bus_hz
        self.state = state
        self._reset()

    def _reset(self) -> None:
        """Power-on / INIT state of every register except the APIC id (SDM)."""
        self.tpr = 0
        self.ldr = 0
        self.dfr = _U32
        self.svr = 0xFF
        self.esr = 0            # readable ESR (latched by the last ESR write)
        self.esr_pending = 0    # errors detected since the last ESR write
        self.icr_low = 0
        self.icr_high = 0
        self.lvt = {off: LVT_MASKED for off in _LVT_NAMES}
        self.irr = 0            # 256-bit bitmaps, bit n = vector n
        self.isr = 0
        self.tmr = 0
        self.tmict = 0
        self.tdcr = 0
        # Armed timer: counts down from timer_count at timer_start_ns (None = disarmed).
        self.timer_start_ns: int | None = None
        self.timer_count = 0
        #: Set by every EOI write: the vector retired if it was level-triggered (TMR set), else
        #: None. A caller with an IOAPIC forwards it there.
        self.last_eoi_level_vector: int | None = None

    # ---- derived values ----

    @property
    def enabled(self) -> bool:
        """SVR bit 8: APIC software enabled."""
        return bool(self.svr & SVR_ENABLE)

    def ppr(self) -> int:
        """Processor priority: TPR if TPR[7:4] >= ISRV[7:4], else ISRV & 0xF0."""
        isrv = self.isr.bit_length() - 1 if self.isr else 0
        if (self.tpr & 0xF0) >= (isrv & 0xF0):
            return self.tpr & 0xFF
        return isrv & 0xF0

    def _divisor(self) -> int:
        code = (self.tdcr & 3) | ((self.tdcr >> 1) & 4)
        return 1 << ((code + 1) & 7)  # 2, 4, 8, 16, 32, 64, 128, 1

    def _timer_mode(self) -> int:
        return (self.lvt[REG_LVT_TIMER] >> 17) & 3

    def _ticks_ns(self, ticks: int) -> int:
        """Nanoseconds (rounded up) that ``ticks`` timer ticks take at the current divisor."""
        return -(-ticks * self._divisor() * _NS_PER_S // self.bus_hz)

    def _elapsed_ticks(self, now_ns: int) -> int:
        assert self.timer_start_ns is not None
        elapsed = max(0, now_ns - self.timer_start_ns)
        return elapsed * self.bus_hz // (_NS_PER_S * self._divisor())

    def _current_count(self, now_ns: int) -> int:
        if self.timer_start_ns is None:
            return 0
        ticks = self._elapsed_ticks(now_ns)
        if ticks < self.timer_count:
            return self.timer_count - ticks
        if self._timer_mode() == TIMER_PERIODIC and self.tmict:
            return self.tmict - (ticks - self.timer_count) % self.tmict
        return 0

    # ---- MMIO ----

    def read(self, offset: int, now_ns: int, *, size: int = 4) -> int:
        """Value of the register at byte ``offset`` (0 for anything but an aligned 4-byte read
        of a defined register). ``now_ns`` is used by the timer current count."""
        if size != 4 or offset & 0xF or not 0 <= offset < PAGE_SIZE:
            return 0
        if offset == REG_ID:
            return self.apic_id << 24
        if offset == REG_VERSION:
            return LAPIC_VERSION
        if offset == REG_TPR:
            return self.tpr
        if offset == REG_PPR:
            return self.ppr()
        if offset == REG_LDR:
            return self.ldr
        if offset == REG_DFR:
            return self.dfr
        if offset == REG_SVR:
            return self.svr
        for base, bitmap in ((REG_ISR, self.isr), (REG_TMR, self.tmr), (REG_IRR, self.irr)):
            if base <= offset < base + 0x80:
                return (bitmap >> (32 * ((offset - base) >> 4))) & _U32
        if offset == REG_ESR:
            return self.esr
        if offset in self.lvt:
            return self.lvt[offset]
        if offset == REG_ICR_LOW:
            return self.icr_low
        if offset == REG_ICR_HIGH:
            return self.icr_high
        if offset == REG_TIMER_INITIAL:
            return self.tmict
        if offset == REG_TIMER_CURRENT:
            return self._current_count(now_ns)
        if offset == REG_TIMER_DIVIDE:
            return self.tdcr
        return 0  # APR, EOI, RRD, reserved

    def write(self, offset: int, value: int, now_ns: int, *, size: int = 4) -> list[Ipi]:
        """Write ``value`` (u32) to the register at byte ``offset``; returns the IPIs to route
        (one for an ICR-low write, else none). Non-4-byte or unaligned writes are ignored."""
        if size != 4 or offset & 0xF or not 0 <= offset < PAGE_SIZE:
            return []
        value &= _U32
        if offset == REG_ID:
            self.apic_id = value >> 24
        elif offset == REG_TPR:
            self.tpr = value & 0xFF
        elif offset == REG_EOI:
            self._eoi()
        elif offset == REG_LDR:
            self.ldr = value & 0xFF000000
        elif offset == REG_DFR:
            self.dfr = value | 0x0FFFFFFF
        elif offset == REG_SVR:
            self.svr = value & SVR_WRITABLE
            if not self.enabled:
                for off in self.lvt:
                    self.lvt[off] |= LVT_MASKED
        elif offset == REG_ESR:
            self.esr, self.esr_pending = self.esr_pending, 0
        elif offset in self.lvt:
            self._write_lvt(offset, value)
        elif offset == REG_ICR_LOW:
            return self._send_ipi(value)
        elif offset == REG_ICR_HIGH:
            self.icr_high = value & ICR_HIGH_WRITABLE
        elif offset == REG_TIMER_INITIAL:
            if self._timer_mode() in (TIMER_ONESHOT, TIMER_PERIODIC):
                self.tmict = value
                self.timer_start_ns = now_ns if value else None
                self.timer_count = value
        elif offset == REG_TIMER_DIVIDE:
            self._write_tdcr(value, now_ns)
        return []

    def _write_lvt(self, offset: int, value: int) -> None:
        if not self.enabled:
            value |= LVT_MASKED
        old_mode = self._timer_mode()
        self.lvt[offset] = value & _LVT_WRITABLE[offset]
        # Entering TSC-deadline (or reserved) mode disarms the count-down timer.
        if offset == REG_LVT_TIMER and self._timer_mode() >= 2 and old_mode < 2:
            self.timer_start_ns = None

    def _write_tdcr(self, value: int, now_ns: int) -> None:
        """New divisor; the ticks already counted are kept, later ones use the new divisor."""
        if self.timer_start_ns is not None:
            deadline = self.timer_deadline()
            assert deadline is not None
            if now_ns >= deadline:
                remaining = 0  # expiry due but not yet processed: keep it due at once
            else:
                remaining = self.timer_count - self._elapsed_ticks(now_ns)
            self.timer_start_ns, self.timer_count = now_ns, remaining
        self.tdcr = value & 0xB

    def _send_ipi(self, value: int) -> list[Ipi]:
        self.icr_low = value & ICR_LOW_WRITABLE
        ipi = Ipi.from_icr(self.icr_low, self.icr_high, self.apic_id)
        if ipi.delivery_mode in (DM_FIXED, DM_LOWEST) and ipi.vector < 16:
            self.esr_pending |= ESR_SEND_ILLEGAL_VECTOR
            return []
        return [ipi]

    def _eoi(self) -> None:
        self.last_eoi_level_vector = None
        if not self.isr:
            return
        vector = self.isr.bit_length() - 1
        self.isr &= ~(1 << vector)
        if self.tmr >> vector & 1:
            self.last_eoi_level_vector = vector

    # ---- interrupt acceptance and delivery ----

    def matches(self, dest_mode: int, dest: int) -> bool:
        """Does this APIC accept a no-shorthand message to ``dest`` (8 bits) in ``dest_mode``?

        Physical: dest == APIC id, or 0xFF (broadcast). Logical, flat model (DFR[31:28] = 0xF):
        dest AND LDR[31:24] nonzero. Logical, cluster model (DFR[31:28] = 0): 0xFF matches
        every APIC; otherwise the cluster nibbles (bits 7:4) must be equal and the member
        nibbles (bits 3:0) must share a bit. Other DFR models match nothing.
        """
        dest &= 0xFF
        if dest_mode == DEST_PHYSICAL:
            return dest == 0xFF or dest == self.apic_id
        logical = self.ldr >> 24
        model = self.dfr >> 28
        if model == DFR_FLAT:
            return bool(dest & logical)
        if model == DFR_CLUSTER:
            if dest == 0xFF:
                return True
            return (dest >> 4) == (logical >> 4) and bool(dest & logical & 0xF)
        return False

    def accept_fixed(self, vector: int, level_triggered: bool = False) -> bool:
        """Accept a fixed (or lowest-priority) interrupt: set its IRR bit, and its TMR bit for
        level-triggered, clear it for edge (SDM). Vectors 0-15 are illegal: recorded as ESR
        "receive illegal vector" and dropped. A software-disabled APIC still latches the vector
        in IRR and delivers it once enabled, as Xen's ``vlapic_set_irq`` does (Linux registers
        its Xen upcall vector before it enables the APIC). Returns True iff the IRR bit was
        newly set."""
        if not 0 <= vector <= 0xFF:
            raise ValueError(f"vector {vector} out of range")
        if vector < 16:
            self.esr_pending |= ESR_RECV_ILLEGAL_VECTOR
            return False
        bit = 1 << vector
        new = not self.irr & bit
        self.irr |= bit
        if level_triggered:
            self.tmr |= bit
        else:
            self.tmr &= ~bit
        return new

    def deliverable(self) -> int | None:
        """Highest IRR vector whose priority class exceeds PPR's, if software enabled; else
        None. Interrupt-flag and interrupt-shadow checks are the caller's."""
        if not self.enabled or not self.irr:
            return None
        vector = self.irr.bit_length() - 1
        return vector if (vector >> 4) > (self.ppr() >> 4) else None

    def ack(self) -> int | None:
        """The CPU takes the interrupt: move the :meth:`deliverable` vector from IRR to ISR and
        return it (None if nothing is deliverable)."""
        vector = self.deliverable()
        if vector is not None:
            self.irr &= ~(1 << vector)
            self.isr |= 1 << vector
        return vector

    # ---- INIT / SIPI ----

    def receive_init(self) -> None:
        """INIT (assert) received: every register back to its power-on value except the APIC
        id; state becomes ``"wait_for_sipi"``. The caller resets the CPU itself and must not
        call this for INIT de-assert (:attr:`Ipi.is_init_deassert`)."""
        self._reset()
        self.state = STATE_WAIT_FOR_SIPI

    def receive_sipi(self, vector: int) -> int | None:
        """Start-up IPI: in ``"wait_for_sipi"``, become ``"running"`` and return ``vector`` (the
        CPU starts in real mode at CS = vector << 8, IP = 0); otherwise ignored (None)."""
        if self.state != STATE_WAIT_FOR_SIPI:
            return None
        self.state = STATE_RUNNING
        return vector & 0xFF

    # ---- timer ----

    def timer_deadline(self) -> int | None:
        """Absolute time (ns, rounded up) at which the count-down timer next reaches zero, or
        None if it is not running (count 0, expired one-shot, or TSC-deadline mode)."""
        if self.timer_start_ns is None:
            return None
        return self.timer_start_ns + self._ticks_ns(self.timer_count)

    def timer_expired(self, now_ns: int) -> bool:
        """Process a timer expiry; the caller calls it once ``now_ns >= timer_deadline()``
        (earlier calls do nothing). One-shot: the timer stops. Periodic: it reloads from the
        initial count, keeping phase; periods missed by a late call are coalesced into one
        interrupt. Unless LVT timer is masked the vector is raised (edge) in IRR. Returns True
        iff an interrupt became pending (the IRR bit was newly set)."""
        deadline = self.timer_deadline()
        if deadline is None or now_ns < deadline:
            return False
        if self._timer_mode() == TIMER_PERIODIC and self.tmict:
            self.timer_count = self.tmict
            period = self._ticks_ns(self.tmict)
            self.timer_start_ns = deadline + (now_ns - deadline) // period * period
        else:
            self.timer_start_ns = None
        lvt = self.lvt[REG_LVT_TIMER]
        if lvt & LVT_MASKED:
            return False
        return self.accept_fixed(lvt & 0xFF)

    # ---- serialisation ----

    def to_dict(self) -> dict[str, Any]:
        """The complete state as JSON-compatible values (bitmaps as 8 u32 words, low first)."""
        return {
            "apic_id": self.apic_id, "bus_hz": self.bus_hz, "state": self.state,
            "tpr": self.tpr, "ldr": self.ldr, "dfr": self.dfr, "svr": self.svr,
            "esr": self.esr, "esr_pending": self.esr_pending,
            "icr_low": self.icr_low, "icr_high": self.icr_high,
            "lvt": {name: self.lvt[off] for off, name in _LVT_NAMES.items()},
            "irr": _words(self.irr), "isr": _words(self.isr), "tmr": _words(self.tmr),
            "tmict": self.tmict, "tdcr": self.tdcr,
            "timer_start_ns": self.timer_start_ns, "timer_count": self.timer_count,
            "last_eoi_level_vector": self.last_eoi_level_vector,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Lapic:
        """Rebuild a :class:`Lapic` from :meth:`to_dict` output; ValueError on a malformed dict."""
        expected = {"apic_id", "bus_hz", "state", "tpr", "ldr", "dfr", "svr", "esr",
                    "esr_pending", "icr_low", "icr_high", "lvt", "irr", "isr", "tmr", "tmict",
                    "tdcr", "timer_start_ns", "timer_count", "last_eoi_level_vector"}
        if set(d) != expected:
            raise ValueError(f"lapic state: keys differ by {sorted(set(d) ^ expected)}")
        lapic = cls(d["apic_id"], bus_hz=d["bus_hz"], state=d["state"])
        for key in ("tpr", "ldr", "dfr", "svr", "esr", "esr_pending", "icr_low", "icr_high",
                    "tmict", "tdcr", "timer_count"):
            v = d[key]
            if not (isinstance(v, int) and 0 <= v <= _U32):
                raise ValueError(f"lapic state: {key} must be a u32")
            setattr(lapic, key, v)
        if not isinstance(d["lvt"], dict) or set(d["lvt"]) != set(_LVT_BY_NAME):
            raise ValueError("lapic state: bad lvt")
        if not all(isinstance(v, int) and 0 <= v <= _U32 for v in d["lvt"].values()):
            raise ValueError("lapic state: lvt values must be u32")
        lapic.lvt = {off: d["lvt"][name] for off, name in _LVT_NAMES.items()}
        lapic.irr, lapic.isr, lapic.tmr = (_bitmap(d[k], k) for k in ("irr", "isr", "tmr"))
        start, last = d["timer_start_ns"], d["last_eoi_level_vector"]
        if start is not None and not isinstance(start, int):
            raise ValueError("lapic state: timer_start_ns must be an int or None")
        if last is not None and not (isinstance(last, int) and 0 <= last <= 0xFF):
            raise ValueError("lapic state: last_eoi_level_vector must be a vector or None")
        lapic.timer_start_ns, lapic.last_eoi_level_vector = start, last
        return lapic
