"""The ``kvm`` engine: guest code runs under /dev/kvm.

Policy decided here (and nowhere above the engine interface):

* an in-kernel LAPIC (split irqchip when the host offers it: PVH has no IOAPIC or PIC), so HLT,
  LAPIC timers, EOIs and INIT/SIPI never leave the kernel; interrupts are injected as MSIs;
* hypercall trapping without ``KVM_CAP_XEN_HVM``: VMCALL/VMMCALL sites are covered by hardware
  instruction breakpoints (``KVM_SET_GUEST_DEBUG``), hypercall-page stubs leave through an
  ``out`` to :attr:`Engine.HYPERCALL_PORT`; both surface as :attr:`ExitKind.HYPERCALL`;
* MSRs the VMM wants to see are routed to user space with an MSR filter;
* dirty logging (:meth:`KvmEngineVm.set_dirty_logging`) re-registers every memory slot with
  ``KVM_MEM_LOG_DIRTY_PAGES`` and reads KVM's bitmap (KVM_GET_DIRTY_LOG, fetch and clear);
* vCPU state for save/restore and migration is a versioned blob of KVM's own state sections
  (see :func:`pack_state` and :meth:`KvmEngineVcpu.save_state`).
"""

from __future__ import annotations

import ctypes
import os
import signal
import struct
import threading
from dataclasses import dataclass

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

# ----------------------------------------------------------------------------- vCPU state blobs
#
# Layout (little endian): header ``magic[8] version:u32 nsections:u32``, then ``nsections``
# sections ``tag[4] length:u32 payload[length]``, nothing after the last one. Each tag at most
# once. Payloads are KVM's own structures (x86-64 layout) except MSRS and ENGN:
#
#   REGS  kvm_regs                         SREG  kvm_sregs (segments, CRs, EFER, APIC base)
#   XSAV  kvm_xsave area (>= 4096 bytes; KVM_GET_XSAVE2's size where larger)
#   FPU_  kvm_fpu (instead of XSAV, only where KVM lacks KVM_CAP_XSAVE)
#   XCRS  kvm_xcrs (optional: only with KVM_CAP_XCRS)
#   MSRS  n x (index:u32, value:u64)
#   LAPC  kvm_lapic_state (the in-kernel LAPIC's registers: IRR/ISR, timer, LVTs, ...)
#   EVNT  kvm_vcpu_events (pending/injected exception, interrupt, NMI, SIPI vector, shadow)
#   MPST  mp_state:u32 (runnable, halted, waiting for INIT/SIPI)
#   DREG  kvm_debugregs (optional: only with KVM_CAP_DEBUGREGS)
#   TSCK  guest TSC kHz:u32 (optional: only when KVM_GET_TSC_KHZ answers)
#   ENGN  this engine's bookkeeping: kvm vcpu id:u32, pending hypercall exit:u8
#         (0 none, 1 trapped VMCALL/VMMCALL, 2 hypercall-page OUT), nsites:u8, nsites x u64
#         (the hypercall-site breakpoints the vCPU runs with)

STATE_MAGIC = b"PYXENKVM"
STATE_VERSION = 1
STATE_FORMAT = f"kvm:{STATE_VERSION}"
_HDR = struct.Struct("<8sII")
_SEC = struct.Struct("<4sI")
_MSR = struct.Struct("<IQ")
_ENGN = struct.Struct("<IBB")
_FIXED_SECTIONS = {
    b"REGS": ctypes.sizeof(Regs), b"SREG": ctypes.sizeof(SRegs),
    b"FPU_": ctypes.sizeof(b.Fpu), b"XCRS": ctypes.sizeof(b.Xcrs),
    b"LAPC": ctypes.sizeof(b.LapicState), b"EVNT": ctypes.sizeof(b.VcpuEvents),
    b"MPST": 4, b"DREG": ctypes.sizeof(b.DebugRegs), b"TSCK": 4,
}
_VARIABLE_SECTIONS = (b"XSAV", b"MSRS", b"ENGN")
_REQUIRED_SECTIONS = (b"REGS", b"SREG", b"MSRS", b"LAPC", b"EVNT", b"MPST", b"ENGN")
_PENDING_CODES = {"": 0, "insn": 1, "page": 2}
_MAX_SECTION = 1 << 20

# MSRs: everything KVM_GET_MSR_INDEX_LIST names that KVM_GET_MSRS reads on this vCPU, plus
# these (some are not in KVM's list because they travel in kvm_sregs too). A save fails if one
# of _MSR_REQUIRED cannot be read. kvmclock's MSRs are left out: their values only make sense
# with the VM-wide KVM clock (KVM_GET/SET_CLOCK), and pyxen guests never see KVM's paravirt
# CPUID leaves, so a save refuses a guest that enabled kvmclock rather than drop it silently.
_MSR_REQUIRED = (0xC0000080, 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084, 0xC0000102,
                 0x174, 0x175, 0x176, 0x277, 0x1A0, 0x1B, _IA32_TSC)
#               EFER, STAR, LSTAR, CSTAR, SFMASK, KERNEL_GS_BASE, SYSENTER_CS/ESP/EIP, PAT,
#               MISC_ENABLE, APIC_BASE, TSC
_MSR_OPTIONAL = (0xC0000103,)                        # TSC_AUX (RDTSCP/RDPID hosts)
_MSR_KVMCLOCK = (0x11, 0x12, 0x4B564D00, 0x4B564D01)
_MSR_TSC_DEADLINE = 0x6E0                            # restored after the LAPIC (needs LVTT mode)
_MSR_BATCH = 255                                     # KVM's MAX_IO_MSRS is 256
_TSC_TOLERANCE_PPM = 250                             # KVM's own tolerance before it scales
_KERNEL_COMPLETION = (b.KVM_EXIT_IO, b.KVM_EXIT_MMIO, b.KVM_EXIT_X86_RDMSR,
                      b.KVM_EXIT_X86_WRMSR)


def pack_state(sections: list[tuple[bytes, bytes]]) -> bytes:
    """Serialise ``(tag, payload)`` sections into a state blob (header + sections)."""
    out = [_HDR.pack(STATE_MAGIC, STATE_VERSION, len(sections))]
    for tag, payload in sections:
        out.append(_SEC.pack(tag, len(payload)))
        out.append(payload)
    return b"".join(out)


def parse_state(blob: bytes) -> dict[bytes, bytes]:
    """Check a state blob's framing and section sizes; return ``{tag: payload}``.

    Raises EngineError naming what is wrong: magic, version, a truncated header or section,
    an unknown, duplicated, missing or wrongly sized section, or bytes after the last one.
    """
    def bad(why: str) -> EngineError:
        return EngineError(f"kvm engine: bad vCPU state blob: {why}")

    blob = bytes(blob)
    if len(blob) < _HDR.size:
        raise bad(f"{len(blob)} bytes, shorter than the {_HDR.size}-byte header")
    magic, version, count = _HDR.unpack_from(blob)
    if magic != STATE_MAGIC:
        raise bad(f"magic {magic!r}, expected {STATE_MAGIC!r} (not a {STATE_FORMAT} blob)")
    if version != STATE_VERSION:
        raise bad(f"version {version}, this engine reads version {STATE_VERSION}")
    sections: dict[bytes, bytes] = {}
    pos = _HDR.size
    for i in range(count):
        if pos + _SEC.size > len(blob):
            raise bad(f"truncated: section {i + 1} of {count} header missing at offset {pos}")
        tag, length = _SEC.unpack_from(blob, pos)
        pos += _SEC.size
        name = tag.decode("ascii", "replace")
        if tag in sections:
            raise bad(f"section {name} appears twice")
        if tag not in _FIXED_SECTIONS and tag not in _VARIABLE_SECTIONS:
            raise bad(f"unknown section {name!r}")
        if length > _MAX_SECTION or pos + length > len(blob):
            raise bad(f"truncated: section {name} says {length} bytes, "
                      f"{max(0, len(blob) - pos)} left")
        want = _FIXED_SECTIONS.get(tag)
        if want is not None and length != want:
            raise bad(f"section {name} is {length} bytes, expected {want}")
        payload = blob[pos:pos + length]
        pos += length
        if tag == b"XSAV" and length < b.XSAVE_SIZE:
            raise bad(f"section XSAV is {length} bytes, at least {b.XSAVE_SIZE} expected")
        if tag == b"MSRS" and length % _MSR.size:
            raise bad(f"section MSRS is {length} bytes, not a multiple of {_MSR.size}")
        if tag == b"ENGN":
            if length < _ENGN.size:
                raise bad(f"section ENGN is {length} bytes, at least {_ENGN.size} expected")
            _vid, pending, nsites = _ENGN.unpack_from(payload)
            if length != _ENGN.size + 8 * nsites or nsites > 4:
                raise bad(f"section ENGN is {length} bytes for {nsites} hypercall sites")
            if pending not in _PENDING_CODES.values():
                raise bad(f"section ENGN: unknown pending-exit code {pending}")
        sections[tag] = payload
    if pos != len(blob):
        raise bad(f"{len(blob) - pos} bytes after the last section")
    missing = [t.decode() for t in _REQUIRED_SECTIONS if t not in sections]
    if b"XSAV" not in sections and b"FPU_" not in sections:
        missing.append("XSAV or FPU_")
    if missing:
        raise bad(f"missing section(s) {', '.join(missing)}")
    return sections


@dataclass
class _Slot:
    gpa: int
    size: int
    host: int
    log_dirty: bool          # the caller asked for a dirty log on this slot (map_memory)

    @property
    def npages(self) -> int:
        return self.size >> 12


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
    state_format = STATE_FORMAT
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
        self._msr_index_list: list[int] | None = None

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST, asked once."""
        if self._msr_index_list is None:
            try:
                self._msr_index_list = self.kvm.msr_index_list()
            except b.KvmIoctlError:
                self._msr_index_list = []
        return self._msr_index_list

    def has(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION, 0 when KVM does not know the capability."""
        try:
            return self.kvm.check_extension(cap)
        except b.KvmIoctlError:
            return 0

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
        self._slots: dict[int, _Slot] = {}
        self._dirty_logging = False
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
    def _logging(self, s: _Slot) -> bool:
        return s.log_dirty or self._dirty_logging

    def _register(self, slot: int, s: _Slot) -> None:
        self.vm.set_user_memory_region(slot, s.gpa, s.size, s.host,
                                       b.KVM_MEM_LOG_DIRTY_PAGES if self._logging(s) else 0)

    def map_memory(self, gpa: int, size: int, host_addr: int, *, log_dirty: bool = False) -> int:
        """Map a slot; it logs dirty pages if ``log_dirty`` or while dirty logging is on."""
        with self._lock:
            slot = self._next_slot
            self._next_slot += 1
            s = _Slot(gpa, size, host_addr, log_dirty)
            self._register(slot, s)
            self._slots[slot] = s
            return slot

    def unmap_memory(self, slot: int) -> None:
        with self._lock:
            self.vm.set_user_memory_region(slot, 0, 0, 0)
            del self._slots[slot]

    def set_dirty_logging(self, enabled: bool) -> None:
        """Turn ``KVM_MEM_LOG_DIRTY_PAGES`` on (off) for every slot, mapped now or later, by
        re-registering each slot with the same address, size and host memory. Turning it on
        clears the log (a fetch is discarded); slots mapped with ``log_dirty=True`` keep
        logging when it is turned off. Any thread; vCPUs may be running. EngineError if KVM
        refuses (some slots may then be left logging)."""
        with self._lock:
            self._dirty_logging = bool(enabled)
            try:
                for slot, s in self._slots.items():
                    self._register(slot, s)
                if enabled:
                    for slot, s in self._slots.items():
                        self.vm.get_dirty_log(slot, s.npages)
            except b.KvmIoctlError as e:
                raise EngineError(f"kvm engine: turning dirty logging "
                                  f"{'on' if enabled else 'off'}: {e.strerror}") from e

    def get_dirty_log(self, slot: int) -> bytes:
        """KVM_GET_DIRTY_LOG (fetch and clear): bit n = page n of the slot, in 64-bit words.
        A slot that is not logging reports every page dirty (same length, no padding bits).
        Raises KeyError for a slot that is not mapped."""
        with self._lock:
            s = self._slots[slot]
            if self._logging(s):
                try:
                    return self.vm.get_dirty_log(slot, s.npages)
                except b.KvmIoctlError as e:
                    raise EngineError(f"kvm engine: dirty log of slot {slot}: "
                                      f"{e.strerror}") from e
        n = s.npages
        full = b"\xff" * (n // 8) + (bytes([(1 << (n % 8)) - 1]) if n % 8 else b"")
        return full.ljust(((n + 63) // 64) * 8, b"\0")

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
        #: KVM finishes the last exit's instruction at the next KVM_RUN (I/O, MMIO, MSR exits)
        self._kernel_completion = False
        #: an exit KVM produced while finishing an instruction outside run(), not yet reported
        self._stashed_exit: int | None = None

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
        if self._stashed_exit is not None:
            reason, self._stashed_exit = self._stashed_exit, None
        else:
            reason = self.vcpu.run()
        self._kernel_completion = reason in _KERNEL_COMPLETION
        return self._decode(reason)

    def _decode(self, reason: int) -> Exit:
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
        self._pending = ""

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

    # --- save / restore
    def _finish_exit(self) -> None:
        """Let KVM finish the instruction behind the last exit (see
        :meth:`KvmVcpu.finish_pending_exit`) so that the state it reports is final."""
        if not self._kernel_completion:
            return
        self._kernel_completion = False
        self._regs = None
        reason = self.vcpu.finish_pending_exit()
        if reason is not None:
            self._stashed_exit = reason          # run() reports it next
            self._kernel_completion = reason in _KERNEL_COMPLETION
            raise EngineError(f"kvm engine: vCPU {self.index} is inside a multi-part I/O "
                              f"instruction (exit {reason}); run it to its next exit and save "
                              f"again")

    def _read_msrs(self, indices: list[int]) -> dict[int, int]:
        """Every MSR in ``indices`` KVM_GET_MSRS reads on this vCPU (the others skipped)."""
        out: dict[int, int] = {}
        rest = list(dict.fromkeys(indices))
        while rest:
            chunk = rest[:_MSR_BATCH]
            got = self.vcpu.get_msrs(chunk)
            out.update(got)
            rest = rest[len(got) + (1 if len(got) < len(chunk) else 0):]
        return out

    def _write_msrs(self, values: list[tuple[int, int]]) -> None:
        """KVM_SET_MSRS; an MSR KVM refuses is fine only if it already holds the value."""
        rest = list(values)
        while rest:
            chunk = rest[:_MSR_BATCH]
            n = self.vcpu.set_msrs(chunk)
            if n < len(chunk):
                index, value = chunk[n]
                now = dict(self.vcpu.get_msrs([index]))
                if now.get(index) != value:
                    have = f"0x{now[index]:x}" if index in now else "unreadable"
                    raise EngineError(f"kvm engine: vCPU {self.index}: KVM refuses MSR "
                                      f"0x{index:x} = 0x{value:x} (it holds {have})")
                n += 1
            rest = rest[n:]

    def save_state(self) -> bytes:
        """The vCPU's complete KVM state as a ``kvm:1`` blob (layout: :func:`pack_state`).

        Sections: REGS, SREG, XSAV (FPU_ without KVM_CAP_XSAVE), XCRS (if KVM_CAP_XCRS), MSRS
        (KVM's MSR index list as far as this vCPU reads it, plus EFER, the SYSCALL/SYSENTER
        MSRs, KERNEL_GS_BASE, PAT, TSC_AUX, MISC_ENABLE, APIC_BASE, TSC; not kvmclock), LAPC,
        EVNT, MPST, DREG (if KVM_CAP_DEBUGREGS), TSCK, ENGN (a hypercall exit still awaiting
        :meth:`complete_hypercall`, the hypercall-site breakpoints).

        Call on the vCPU's thread, or on any thread while it is parked outside :meth:`run`.
        KVM first finishes the instruction behind the last I/O/MMIO/MSR exit (KVM_RUN with
        ``immediate_exit``: no further guest instruction runs), so complete such an exit
        before saving; only a hypercall exit may stay pending (it is saved and completed on
        whichever vCPU loads the blob). Raises EngineError when the state cannot be saved."""
        if self._pending not in _PENDING_CODES:
            raise EngineError(f"kvm engine: vCPU {self.index}: the last exit ({self._pending}) "
                              f"awaits its complete_* call; complete it before saving")
        if self._stashed_exit is not None:
            raise EngineError(f"kvm engine: vCPU {self.index} has an exit run() has not "
                              f"reported yet; run it to that exit and save again")
        engine = self.vmobj.engine
        v = self.vcpu
        step = "finishing the last exit"
        try:
            self._finish_exit()
            sec: list[tuple[bytes, bytes]] = []
            step = "registers"
            sec.append((b"REGS", bytes(v.get_regs())))
            sec.append((b"SREG", bytes(v.get_sregs())))
            step = "FPU/SSE state"
            if engine.has(b.KVM_CAP_XSAVE):
                sec.append((b"XSAV", v.get_xsave(max(engine.has(b.KVM_CAP_XSAVE2),
                                                     b.XSAVE_SIZE))))
            else:
                sec.append((b"FPU_", bytes(v.get_fpu())))
            if engine.has(b.KVM_CAP_XCRS):
                step = "XCRs"
                sec.append((b"XCRS", bytes(v.get_xcrs())))
            step = "MSRs"
            sec.append((b"MSRS", self._save_msrs(engine)))
            step = "LAPIC"
            sec.append((b"LAPC", bytes(v.get_lapic())))
            step = "vCPU events"
            sec.append((b"EVNT", bytes(v.get_vcpu_events())))
            step = "MP state"
            sec.append((b"MPST", struct.pack("<I", v.get_mp_state())))
            if engine.has(b.KVM_CAP_DEBUGREGS):
                step = "debug registers"
                sec.append((b"DREG", bytes(v.get_debugregs())))
            try:
                sec.append((b"TSCK", struct.pack("<I", v.get_tsc_khz())))
            except b.KvmIoctlError:
                pass                               # KVM does not know the TSC rate: no check
        except b.KvmIoctlError as e:
            raise EngineError(f"kvm engine: vCPU {self.index}: saving {step}: "
                              f"{e.strerror}") from e
        sites = self.pending_sites if self.pending_sites is not None else self.sites
        sec.append((b"ENGN", _ENGN.pack(v.vcpu_id, _PENDING_CODES[self._pending], len(sites))
                    + b"".join(struct.pack("<Q", a) for a in sites)))
        return pack_state(sec)

    def _save_msrs(self, engine: KvmEngine) -> bytes:
        wanted = [*_MSR_REQUIRED, *_MSR_OPTIONAL, *engine.msr_index_list()]
        clocks = self._read_msrs(list(_MSR_KVMCLOCK))
        if any(val & 1 for val in clocks.values()):
            raise EngineError(f"kvm engine: vCPU {self.index}: the guest enabled kvmclock, "
                              f"whose state this engine cannot save")
        values = self._read_msrs([i for i in wanted if i not in _MSR_KVMCLOCK])
        missing = [f"0x{i:x}" for i in _MSR_REQUIRED if i not in values]
        if missing:
            raise EngineError(f"kvm engine: vCPU {self.index}: KVM cannot read MSR(s) "
                              f"{', '.join(missing)}")
        return b"".join(_MSR.pack(i, val) for i, val in values.items())

    def load_state(self, blob: bytes) -> None:
        """Replace this vCPU's state with a blob from :meth:`save_state` (same KVM vCPU id).

        Call before the vCPU first runs or while it is parked, after :meth:`set_cpuid` (KVM
        checks XCR0 and some MSRs against the CPUID). The blob is checked completely before
        anything changes (EngineError for a bad one); an ioctl that rejects a value later
        raises EngineError naming the section, leaving the vCPU partly loaded. Restore order:
        TSC rate, SREG, REGS, XCRS, XSAV/FPU_, MSRS (APIC base, TSC, ... but TSC_DEADLINE),
        LAPC, TSC_DEADLINE, DREG, EVNT, MPST, then the hypercall breakpoints. The guest TSC
        continues from its saved value (it does not advance while the state is stored)."""
        sec = parse_state(blob)
        engine = self.vmobj.engine
        v = self.vcpu
        vcpu_id, pending, nsites = _ENGN.unpack_from(sec[b"ENGN"])
        sites = list(struct.unpack_from(f"<{nsites}Q", sec[b"ENGN"], _ENGN.size))
        if vcpu_id != v.vcpu_id:
            raise EngineError(f"kvm engine: state of KVM vCPU {vcpu_id} (APIC ID {vcpu_id}) "
                              f"cannot be loaded into vCPU {v.vcpu_id}")
        msrs = [_MSR.unpack_from(sec[b"MSRS"], o) for o in range(0, len(sec[b"MSRS"]), _MSR.size)]
        step = "TSC frequency"
        try:
            if b"TSCK" in sec:
                self._check_tsc_khz(struct.unpack("<I", sec[b"TSCK"])[0], engine)
            if b"XSAV" in sec and not engine.has(b.KVM_CAP_XSAVE):
                raise EngineError("kvm engine: the state has an XSAVE area, this KVM lacks "
                                  "KVM_CAP_XSAVE")
            xcrs = b.Xcrs.from_buffer_copy(sec[b"XCRS"]) if b"XCRS" in sec else None
            if xcrs is not None and not engine.has(b.KVM_CAP_XCRS):
                if any(xcrs.xcrs[i].xcr == 0 and xcrs.xcrs[i].value != 1
                       for i in range(min(xcrs.nr_xcrs, b.KVM_MAX_XCRS))):
                    raise EngineError("kvm engine: the guest's XCR0 is set, this KVM lacks "
                                      "KVM_CAP_XCRS")
                xcrs = None
            dregs = b.DebugRegs.from_buffer_copy(sec[b"DREG"]) if b"DREG" in sec else None
            if dregs is not None and not engine.has(b.KVM_CAP_DEBUGREGS):
                if any(dregs.db) or dregs.dr7 & 0xFF:
                    raise EngineError("kvm engine: the guest uses debug registers, this KVM "
                                      "lacks KVM_CAP_DEBUGREGS")
                dregs = None
            # Nothing changed so far. Let KVM finish this vCPU's own last exit first, so that
            # it does not complete a stale instruction on top of the loaded state.
            if self._kernel_completion:
                self._kernel_completion = False
                v.finish_pending_exit()            # an exit it produces dies with the old state
            step = "SREG"
            v.set_sregs(SRegs.from_buffer_copy(sec[b"SREG"]))
            step = "REGS"
            v.set_regs(Regs.from_buffer_copy(sec[b"REGS"]))
            if xcrs is not None:
                step = "XCRS"
                v.set_xcrs(xcrs)
            if b"XSAV" in sec:
                step = "XSAV"
                area = sec[b"XSAV"]
                size = max(engine.has(b.KVM_CAP_XSAVE2), b.XSAVE_SIZE)
                v.set_xsave(area.ljust(size, b"\0"))
            else:
                step = "FPU_"
                v.set_fpu(b.Fpu.from_buffer_copy(sec[b"FPU_"]))
            step = "MSRS"
            self._write_msrs([(i, val) for i, val in msrs if i != _MSR_TSC_DEADLINE])
            step = "LAPC"
            v.set_lapic(b.LapicState.from_buffer_copy(sec[b"LAPC"]))
            step = "MSRS"
            self._write_msrs([(i, val) for i, val in msrs if i == _MSR_TSC_DEADLINE])
            if dregs is not None:
                step = "DREG"
                v.set_debugregs(dregs)
            step = "EVNT"
            events = b.VcpuEvents.from_buffer_copy(sec[b"EVNT"])
            events.flags |= b.KVM_VCPUEVENT_VALID_SIPI_VECTOR
            v.set_vcpu_events(events)
            step = "MPST"
            v.set_mp_state(struct.unpack("<I", sec[b"MPST"])[0])
            step = "hypercall breakpoints"
            self.pending_sites = None
            self.apply_debug(sites)
        except b.KvmIoctlError as e:
            raise EngineError(f"kvm engine: vCPU {self.index}: KVM rejects section {step} of "
                              f"the state: {e.strerror}") from e
        self._regs = None
        self._pending = next(k for k, c in _PENDING_CODES.items() if c == pending)
        self._stashed_exit = None

    def _check_tsc_khz(self, khz: int, engine: KvmEngine) -> None:
        here = self.vcpu.get_tsc_khz()
        if abs(here - khz) * 1_000_000 <= _TSC_TOLERANCE_PPM * khz:
            return
        if engine.has(b.KVM_CAP_TSC_CONTROL):
            self.vcpu.set_tsc_khz(khz)
            return
        raise EngineError(f"kvm engine: the guest TSC runs at {khz} kHz, this host's at "
                          f"{here} kHz, and KVM cannot scale it (no KVM_CAP_TSC_CONTROL)")

    def close(self) -> None:
        self.vcpu.close()
