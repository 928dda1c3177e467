"""The ``kvm`` engine: guest code runs under /dev/kvm.

Policy decided here (and nowhere above the engine interface):

* an in-kernel LAPIC (split irqchip when the host offers it: PVH has no IOAPIC or PIC), so HLT,
  LAPIC timers, EOIs and INIT/SIPI never leave the kernel; interrupts are injected as MSIs;
* hypercall trapping without ``KVM_CAP_XEN_HVM``: VMCALL/VMMCALL sites are covered by hardware
  instruction breakpoints (``KVM_SET_GUEST_DEBUG``), hypercall-page stubs leave through an
  ``out`` to :attr:`Engine.HYPERCALL_PORT`; both surface as :attr:`ExitKind.HYPERCALL`;
* MSRs the VMM wants to see are routed to user space with an MSR filter.
"""

from __future__ import annotations

import ctypes
import os
import signal
import struct
import threading

from pyxen.cpustate import Regs, SRegs
from pyxen.engine.base import CpuidEntry, Engine, EngineVcpu, EngineVm, Exit, ExitKind
from pyxen.errors import EngineError, EngineUnavailable
from pyxen.kvm import bindings as b
from pyxen.kvm.system import Kvm, KvmVcpu, KvmVm

KICK_SIGNAL = signal.SIGUSR2
_HYPERCALL_INSN_LEN = 3          # VMCALL (0f 01 c1) and VMMCALL (0f 01 d9)
_TSS_ADDR = 0xFFFBD000           # VMX needs these three pages somewhere out of the guest's way
_IDENTITY_MAP_ADDR = 0xFFFBC000
_IA32_TSC = 0x10
_kick_handler_installed = False


def _install_kick_handler() -> None:
    """A no-op handler so that :data:`KICK_SIGNAL` interrupts KVM_RUN (EINTR) instead of killing us."""
    global _kick_handler_installed
    if _kick_handler_installed:
        return
    if threading.current_thread() is threading.main_thread():
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)
        _kick_handler_installed = True


class KvmEngine(Engine):
    """Engine over /dev/kvm (hardware virtualisation, or PVM on hosts without VT-x/AMD-V)."""

    name = "kvm"
    max_hypercall_sites = 4

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            self.kvm = Kvm(path)
        except OSError as e:
            raise EngineUnavailable(f"kvm engine: cannot open {path}: {e.strerror or e}") from e
        for cap, what in ((b.KVM_CAP_USER_MEMORY, "user memory"),
                          (b.KVM_CAP_SET_GUEST_DEBUG, "guest debug (hypercall breakpoints)"),
                          (b.KVM_CAP_SIGNAL_MSI, "MSI injection"),
                          (b.KVM_CAP_X86_USER_SPACE_MSR, "user-space MSR exits"),
                          (b.KVM_CAP_IMMEDIATE_EXIT, "immediate exit")):
            if not self.kvm.check_extension(cap):
                raise EngineUnavailable(f"kvm engine: host KVM lacks {what}")
        _install_kick_handler()

    @staticmethod
    def available(path: str = "/dev/kvm") -> bool:
        return os.access(path, os.R_OK | os.W_OK)

    def supported_cpuid(self) -> list[CpuidEntry]:
        return [CpuidEntry(e.function, e.index, e.eax, e.ebx, e.ecx, e.edx,
                           bool(e.flags & 1)) for e in self.kvm.supported_cpuid()]

    def create_vm(self) -> KvmEngineVm:
        return KvmEngineVm(self, self.kvm.create_vm())


class KvmEngineVm(EngineVm):
    """A KVM VM with an in-kernel LAPIC."""

    def __init__(self, engine: KvmEngine, vm: KvmVm) -> None:
        self.engine = engine
        self.vm = vm
        self._slots: dict[int, int] = {}          # slot -> npages
        self._next_slot = 0
        self._sites: list[int] = []
        self._vcpus: list[KvmEngineVcpu] = []
        self._msr_bitmaps: list[ctypes.Array] = []
        self._lock = threading.Lock()
        try:
            vm.set_tss_addr(_TSS_ADDR)
            vm.set_identity_map_addr(_IDENTITY_MAP_ADDR)
        except b.KvmIoctlError:
            pass  # only VMX needs them; other KVM flavours may refuse
        try:
            vm.enable_cap(b.KVM_CAP_SPLIT_IRQCHIP, 24)
        except b.KvmIoctlError:
            vm.create_irqchip()
        vm.enable_cap(b.KVM_CAP_X86_USER_SPACE_MSR, b.KVM_MSR_EXIT_REASON_FILTER)

    # --- memory
    def map_memory(self, gpa: int, size: int, host_addr: int, *, log_dirty: bool = False) -> int:
        with self._lock:
            slot = self._next_slot
            self._next_slot += 1
            self.vm.set_user_memory_region(slot, gpa, size, host_addr,
                                           b.KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0)
            self._slots[slot] = size >> 12
            return slot

    def unmap_memory(self, slot: int) -> None:
        with self._lock:
            self.vm.set_user_memory_region(slot, 0, 0, 0)
            del self._slots[slot]

    def get_dirty_log(self, slot: int) -> bytes:
        return self.vm.get_dirty_log(slot, self._slots[slot])

    # --- vCPUs and interrupts
    def create_vcpu(self, index: int) -> KvmEngineVcpu:
        # On x86 the KVM vCPU id is the initial APIC ID, which pyxen defines as 2 * index.
        v = KvmEngineVcpu(self, self.vm.create_vcpu(2 * index), index)
        v.apply_debug(self._sites)
        self._vcpus.append(v)
        return v

    def inject_msi(self, apic_id: int, vector: int) -> None:
        self.vm.signal_msi(b.MSI_ADDRESS_BASE | (apic_id << 12), vector)

    def set_hypercall_sites(self, linear_addresses: list[int]) -> None:
        sites = sorted(set(linear_addresses))
        if len(sites) > self.engine.max_hypercall_sites:
            raise EngineError(f"kvm engine: {len(sites)} hypercall sites, at most "
                              f"{self.engine.max_hypercall_sites} hardware breakpoints")
        self._sites = sites
        for v in self._vcpus:
            v.pending_sites = sites

    def set_trapped_msrs(self, msrs: list[int]) -> None:
        flt = b.MsrFilter(flags=b.KVM_MSR_FILTER_DEFAULT_ALLOW)
        bitmaps = []
        for i, msr in enumerate(msrs[:16]):
            bm = (ctypes.c_uint8 * 8)()          # all bits 0: deny -> exit to user space
            bitmaps.append(bm)
            flt.ranges[i] = b.MsrFilterRange(
                flags=b.KVM_MSR_FILTER_READ | b.KVM_MSR_FILTER_WRITE, nmsrs=1, base=msr,
                bitmap=ctypes.addressof(bm))
        self.vm.set_msr_filter(flt)
        self._msr_bitmaps = bitmaps

    def close(self) -> None:
        for v in self._vcpus:
            v.close()
        self._vcpus.clear()
        self.vm.close()


class KvmEngineVcpu(EngineVcpu):
    """One KVM vCPU; translates KVM exits into engine :class:`Exit` objects."""

    def __init__(self, vm: KvmEngineVm, vcpu: KvmVcpu, index: int) -> None:
        self.vmobj = vm
        self.vcpu = vcpu
        self.index = index
        self.sites: list[int] = []
        self.pending_sites: list[int] | None = None
        self._thread: int | None = None
        self._regs: Regs | None = None
        self._pending: str = ""          # what the last exit needs to be completed

    def apply_debug(self, sites: list[int]) -> None:
        dr = [0] * 8
        dr7 = 0x600 if sites else 0
        for i, addr in enumerate(sites):
            dr[i] = addr
            dr7 |= 2 << (2 * i)           # global enable, execute breakpoint, length 1
        dr[7] = dr7
        control = (b.KVM_GUESTDBG_ENABLE | b.KVM_GUESTDBG_USE_HW_BP) if sites else 0
        self.vcpu.set_guest_debug(control, dr)
        self.sites = sites

    # --- state
    def get_regs(self) -> Regs:
        if self._regs is None:
            self._regs = self.vcpu.get_regs()
        return self._regs

    def set_regs(self, regs: Regs) -> None:
        self.vcpu.set_regs(regs)
        self._regs = regs

    def get_sregs(self) -> SRegs:
        return self.vcpu.get_sregs()

    def set_sregs(self, sregs: SRegs) -> None:
        self.vcpu.set_sregs(sregs)

    def get_msr(self, index: int) -> int:
        return self.vcpu.get_msr(index)

    def set_msr(self, index: int, value: int) -> None:
        self.vcpu.set_msr(index, value)

    def set_cpuid(self, entries: list[CpuidEntry]) -> None:
        self.vcpu.set_cpuid2([b.CpuidEntry2(function=e.function, index=e.index,
                                            flags=1 if e.significant_index else 0,
                                            eax=e.eax, ebx=e.ebx, ecx=e.ecx, edx=e.edx)
                              for e in entries])

    def get_tsc(self) -> int:
        return self.vcpu.get_msr(_IA32_TSC)

    def tsc_khz(self) -> int:
        return self.vcpu.get_tsc_khz()

    # --- running
    def run(self) -> Exit:
        self._thread = threading.get_ident()
        if self.pending_sites is not None:
            sites, self.pending_sites = self.pending_sites, None
            self.apply_debug(sites)
        self._regs = None
        self._pending = ""
        reason = self.vcpu.run()
        m = self.vcpu.run_map
        if reason == b.KVM_EXIT_IO:
            direction, size, port, count, off = struct.unpack_from("<BBHIQ", m, b.RUN_IO_DIRECTION)
            if port == Engine.HYPERCALL_PORT and direction == b.KVM_EXIT_IO_OUT:
                self._pending = "page"
                return Exit(ExitKind.HYPERCALL, via="page")
            if direction == b.KVM_EXIT_IO_OUT:
                return Exit(ExitKind.IO, port=port, size=size, is_write=True,
                            data=bytes(m[off:off + size * count]))
            self._pending = "io_in"
            self._io_in = (off, size * count)
            return Exit(ExitKind.IO, port=port, size=size, is_write=False)
        if reason == b.KVM_EXIT_DEBUG:
            pc = struct.unpack_from("<Q", m, b.RUN_DEBUG_PC)[0]
            if pc in self.sites:
                self._pending = "insn"
                return Exit(ExitKind.HYPERCALL, via="insn", address=pc)
            return Exit(ExitKind.FAILED, reason=f"unexpected debug exit at 0x{pc:x}")
        if reason == b.KVM_EXIT_MMIO:
            phys, data, length, is_write = struct.unpack_from("<Q8sIB", m, b.RUN_MMIO_PHYS)
            self._pending = "mmio" if not is_write else ""
            return Exit(ExitKind.MMIO, address=phys, size=length, is_write=bool(is_write),
                        data=data[:length] if is_write else b"")
        if reason in (b.KVM_EXIT_X86_RDMSR, b.KVM_EXIT_X86_WRMSR):
            index, data = struct.unpack_from("<IQ", m, b.RUN_MSR_INDEX)
            if reason == b.KVM_EXIT_X86_RDMSR:
                self._pending = "rdmsr"
                return Exit(ExitKind.MSR_READ, msr=index)
            self._pending = "wrmsr"
            return Exit(ExitKind.MSR_WRITE, msr=index, value=data)
        if reason == b.KVM_EXIT_INTR:
            return Exit(ExitKind.INTERRUPTED)
        if reason == b.KVM_EXIT_HLT:
            return Exit(ExitKind.HALT)
        if reason == b.KVM_EXIT_SHUTDOWN:
            return Exit(ExitKind.SHUTDOWN, reason="triple fault")
        if reason == b.KVM_EXIT_SYSTEM_EVENT:
            return Exit(ExitKind.SHUTDOWN, reason="system event %d" %
                        struct.unpack_from("<I", m, b.RUN_SYSTEM_EVENT_TYPE)[0])
        if reason == b.KVM_EXIT_INTERNAL_ERROR:
            sub, ndata = struct.unpack_from("<II", m, b.RUN_INTERNAL_SUBERROR)
            data = struct.unpack_from(f"<{min(ndata, 16)}Q", m, b.RUN_INTERNAL_DATA)
            return Exit(ExitKind.FAILED, reason=f"KVM internal error, suberror {sub} "
                        f"(data {' '.join(hex(x) for x in data)})")
        if reason == b.KVM_EXIT_FAIL_ENTRY:
            hw = struct.unpack_from("<Q", m, b.RUN_FAIL_ENTRY_REASON)[0]
            return Exit(ExitKind.FAILED, reason=f"KVM entry failed, reason 0x{hw:x}")
        return Exit(ExitKind.FAILED, reason=f"unhandled KVM exit reason {reason}")

    def complete_hypercall(self, result: int) -> None:
        regs = self.get_regs()
        regs.rax = result & 0xFFFFFFFFFFFFFFFF
        if self._pending == "insn":
            regs.rip += _HYPERCALL_INSN_LEN
        elif self._pending != "page":
            raise EngineError("complete_hypercall without a pending hypercall exit")
        self.set_regs(regs)
        self._pending = ""

    def complete_io_read(self, data: bytes) -> None:
        off, n = self._io_in
        self.vcpu.run_map[off:off + n] = data[:n].ljust(n, b"\xff")
        self._pending = ""

    def complete_mmio_read(self, data: bytes) -> None:
        self.vcpu.run_map[b.RUN_MMIO_DATA:b.RUN_MMIO_DATA + len(data)] = data

    def complete_msr_read(self, value: int, fault: bool = False) -> None:
        struct.pack_into("<B", self.vcpu.run_map, b.RUN_MSR_ERROR, 1 if fault else 0)
        struct.pack_into("<Q", self.vcpu.run_map, b.RUN_MSR_DATA, value & (2**64 - 1))
        self._pending = ""

    def complete_msr_write(self, fault: bool = False) -> None:
        struct.pack_into("<B", self.vcpu.run_map, b.RUN_MSR_ERROR, 1 if fault else 0)
        self._pending = ""

    def make_runnable(self) -> None:
        self.vcpu.set_mp_state(b.KVM_MP_STATE_RUNNABLE)

    def kick(self) -> None:
        self.vcpu.request_immediate_exit()
        t = self._thread
        if t is not None and _kick_handler_installed:
            try:
                signal.pthread_kill(t, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        self.vcpu.close()
