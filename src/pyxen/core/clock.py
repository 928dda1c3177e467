"""Domain time: Xen system time defined by the guest TSC, exactly as the guest computes it.

Xen system time (ns) is published to the guest as pvclock parameters (tsc_timestamp,
system_time, mul, shift) and the guest evaluates it over its TSC. The VMM must compare timer
deadlines with *the same formula over the same TSC*, or calibration error makes every deadline
look early or late (a timer storm). So :class:`DomainClock` reads the host TSC directly
(``rdtsc`` through a 10-byte stub) and applies the guest's TSC offset.

Units: TSC ticks, nanoseconds. Thread-safe after :meth:`DomainClock.anchor`.
"""

from __future__ import annotations

import ctypes
import mmap
import time
from dataclasses import dataclass

# rdtsc; shl $32,%rdx; or %rdx,%rax; ret
_RDTSC_CODE = bytes.fromhex("0f3148c1e2204809d0c3")


def _make_rdtsc() -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(_RDTSC_CODE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
    fn = ctypes.CFUNCTYPE(ctypes.c_uint64)(addr)
    fn._page = page  # keep the code page alive with the function
    return fn


rdtsc = _make_rdtsc()


def time_scale(tsc_hz: int) -> tuple[int, int]:
    """Xen's ``set_time_scale``: (mul, shift) with ns = ((tsc << shift) * mul) >> 32."""
    shift = 0
    t = tsc_hz
    while t > 2_000_000_000:
        t >>= 1
        shift -= 1
    while t <= 1_000_000_000:
        t <<= 1
        shift += 1
    return (1_000_000_000 << 32) // t, shift


def scale_delta(delta: int, mul: int, shift: int) -> int:
    """The guest's pvclock scaling of a TSC delta to ns (Linux ``pvclock_scale_delta``)."""
    delta = delta << shift if shift >= 0 else delta >> -shift
    return (delta * mul) >> 32


@dataclass(frozen=True)
class PvclockParams:
    """What goes into a ``vcpu_time_info`` (besides the version counter)."""

    tsc_timestamp: int
    system_time: int
    mul: int
    shift: int


class DomainClock:
    """Maps guest TSC <-> Xen system time (ns since the domain's clock anchor).

    ``tsc_offset`` is guest TSC minus host TSC (constant on hosts with a stable TSC).
    ``wallclock_ns`` is Unix time at system time 0 (for shared_info's wc_* fields).
    """

    def __init__(self) -> None:
        self.tsc_offset = 0
        self.tsc_khz = 0
        self.params = PvclockParams(0, 0, 0, 0)
        self.wallclock_ns = 0

    def anchor(self, guest_tsc: int, tsc_khz: int, system_time: int = 0) -> None:
        """Fix system time ``system_time`` at guest TSC ``guest_tsc`` (read just now, same thread)."""
        host = rdtsc()
        self.tsc_offset = (guest_tsc - host) & 0xFFFFFFFFFFFFFFFF
        self.tsc_khz = tsc_khz
        mul, shift = time_scale(tsc_khz * 1000)
        self.params = PvclockParams(guest_tsc, system_time, mul, shift)
        self.wallclock_ns = time.time_ns() - system_time

    def guest_tsc(self) -> int:
        return (rdtsc() + self.tsc_offset) & 0xFFFFFFFFFFFFFFFF

    def now_ns(self) -> int:
        """Current Xen system time, as the guest would compute it now."""
        p = self.params
        delta = (self.guest_tsc() - p.tsc_timestamp) & 0xFFFFFFFFFFFFFFFF
        if delta >> 63:
            delta = 0
        return p.system_time + scale_delta(delta, p.mul, p.shift)

    def seconds_until(self, deadline_ns: int) -> float:
        return max(0.0, (deadline_ns - self.now_ns()) / 1e9)

    def save(self) -> dict:
        return {"tsc_offset": self.tsc_offset, "tsc_khz": self.tsc_khz,
                "params": [self.params.tsc_timestamp, self.params.system_time,
                           self.params.mul, self.params.shift],
                "wallclock_ns": self.wallclock_ns}

    def load(self, st: dict, guest_tsc: int | None = None) -> None:
        """Continue :meth:`save`'s clock: the same pvclock parameters (the guest holds
        copies of them), so Xen system time goes on from the guest TSC. ``guest_tsc`` (read
        just now, after the vCPUs' state was loaded) re-derives the guest-host TSC offset,
        which differs in a new VM on engines that restore the TSC value itself."""
        try:
            ts, st_ns, mul, shift = (int(x) for x in st["params"])
            khz, wc = int(st["tsc_khz"]), int(st["wallclock_ns"])
            offset = int(st["tsc_offset"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"clock: bad state {st!r}") from None
        if khz <= 0 or not 0 < mul < 1 << 32 or not -32 < shift < 32:
            raise ValueError(f"clock: bad scale (tsc_khz {khz}, mul {mul}, shift {shift})")
        self.tsc_khz = khz
        self.params = PvclockParams(ts, st_ns, mul, shift)
        self.wallclock_ns = wc
        self.tsc_offset = offset if guest_tsc is None else \
            (guest_tsc - rdtsc()) & 0xFFFFFFFFFFFFFFFF
