"""A fake engine VM for unit tests that need an :class:`~pyxen.engine.base.EngineVm` but no KVM.

:class:`FakeEngineVm` records what the layers above ask of the engine (memory slots mapped and
unmapped, MSIs injected, hypercall sites and trapped MSRs) so tests of ``GuestMemory``,
``XenPage``, grant tables, event delivery and the like can run anywhere. It executes no guest
code: :meth:`FakeEngineVcpu.run` raises :class:`NotImplementedError`.
"""

from __future__ import annotations

import threading

from pyxen.cpustate import Regs, SRegs
from pyxen.engine.base import CpuidEntry, EngineVcpu, EngineVm, Exit

FAKE_TSC_KHZ = 2_000_000


class FakeEngineVcpu(EngineVcpu):
    """A vCPU that only stores state: registers, MSRs, CPUID and completion values."""

    def __init__(self, vm: FakeEngineVm, index: int) -> None:
        self.vm = vm
        self.index = index
        self.regs = Regs()
        self.sregs = SRegs()
        self.msrs: dict[int, int] = {}
        self.cpuid: list[CpuidEntry] = []
        self.completions: list[tuple] = []       # ("hypercall", result), ("io_read", data), ...
        self.runnable = index == 0
        self.kicks = 0
        self.closed = False
        self._tsc = 0

    def get_regs(self) -> Regs:
        return Regs.from_buffer_copy(self.regs)

    def set_regs(self, regs: Regs) -> None:
        self.regs = Regs.from_buffer_copy(regs)

    def get_sregs(self) -> SRegs:
        return SRegs.from_buffer_copy(self.sregs)

    def set_sregs(self, sregs: SRegs) -> None:
        self.sregs = SRegs.from_buffer_copy(sregs)

    def get_msr(self, index: int) -> int:
        return self.msrs.get(index, 0)

    def set_msr(self, index: int, value: int) -> None:
        self.msrs[index] = value

    def set_cpuid(self, entries: list[CpuidEntry]) -> None:
        self.cpuid = list(entries)

    def run(self) -> Exit:
        raise NotImplementedError("FakeEngineVcpu executes no guest code")

    def complete_hypercall(self, result: int) -> None:
        self.completions.append(("hypercall", result))

    def complete_io_read(self, data: bytes) -> None:
        self.completions.append(("io_read", bytes(data)))

    def complete_mmio_read(self, data: bytes) -> None:
        self.completions.append(("mmio_read", bytes(data)))

    def complete_msr_read(self, value: int, fault: bool = False) -> None:
        self.completions.append(("msr_read", value, fault))

    def complete_msr_write(self, fault: bool = False) -> None:
        self.completions.append(("msr_write", fault))

    def make_runnable(self) -> None:
        self.runnable = True

    def kick(self) -> None:
        self.kicks += 1

    def get_tsc(self) -> int:
        """A counter that advances by 1000 ticks per call (strictly monotonic)."""
        self._tsc += 1000
        return self._tsc

    def tsc_khz(self) -> int:
        return FAKE_TSC_KHZ

    def close(self) -> None:
        self.closed = True


class FakeEngineVm(EngineVm):
    """Records engine calls. ``slots`` maps live slot id -> (gpa, size, host_addr)."""

    def __init__(self) -> None:
        self.slots: dict[int, tuple[int, int, int]] = {}
        self.mapped: list[int] = []              # slot ids in map order (never pruned)
        self.unmapped: list[int] = []            # slot ids in unmap order
        self.msis: list[tuple[int, int]] = []    # (apic_id, vector)
        self.vcpus: list[FakeEngineVcpu] = []
        self.hypercall_sites: list[int] = []
        self.trapped_msrs: list[int] = []
        self.closed = False
        self._next_slot = 0
        self._lock = threading.Lock()            # inject_msi may come from any thread

    def map_memory(self, gpa: int, size: int, host_addr: int, *, log_dirty: bool = False) -> int:
        assert gpa % 4096 == 0 and size % 4096 == 0 and host_addr % 4096 == 0
        with self._lock:
            slot = self._next_slot
            self._next_slot += 1
            self.slots[slot] = (gpa, size, host_addr)
            self.mapped.append(slot)
            return slot

    def unmap_memory(self, slot: int) -> None:
        with self._lock:
            if slot not in self.slots:
                raise KeyError(f"slot {slot} is not mapped")
            del self.slots[slot]
            self.unmapped.append(slot)

    def get_dirty_log(self, slot: int) -> bytes:
        _gpa, size, _host = self.slots[slot]
        return bytes((size // 4096 + 7) // 8)    # the fake guest never writes

    def create_vcpu(self, index: int) -> FakeEngineVcpu:
        v = FakeEngineVcpu(self, index)
        self.vcpus.append(v)
        return v

    def inject_msi(self, apic_id: int, vector: int) -> None:
        with self._lock:
            self.msis.append((apic_id, vector))

    def set_hypercall_sites(self, linear_addresses: list[int]) -> None:
        self.hypercall_sites = list(linear_addresses)

    def set_trapped_msrs(self, msrs: list[int]) -> None:
        self.trapped_msrs = list(msrs)

    def close(self) -> None:
        self.closed = True
