"""Thin owners of /dev/kvm, VM and vCPU file descriptors. One method per ioctl; no policy.

Who may call what: :class:`KvmVcpu` methods only from the thread that runs that vCPU, except
:meth:`KvmVcpu.request_immediate_exit`. :class:`KvmVm` methods from any thread.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct

from pyxen.cpustate import Regs, SRegs
from pyxen.kvm import bindings as b


class Kvm:
    """The /dev/kvm system handle."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        version = b.ioctl(self.fd, b.KVM_GET_API_VERSION)
        if version != 12:
            os.close(self.fd)
            raise OSError(f"{path}: KVM API version {version}, need 12")
        self.vcpu_mmap_size = b.ioctl(self.fd, b.KVM_GET_VCPU_MMAP_SIZE)

    def check_extension(self, cap: int) -> int:
        return b.ioctl(self.fd, b.KVM_CHECK_EXTENSION, cap)

    def supported_cpuid(self) -> list[b.CpuidEntry2]:
        cpuid = b.cpuid2(256)
        b.ioctl(self.fd, b.KVM_GET_SUPPORTED_CPUID, cpuid)
        return [cpuid.entries[i] for i in range(cpuid.nent)]

    def create_vm(self) -> KvmVm:
        return KvmVm(self, b.ioctl(self.fd, b.KVM_CREATE_VM, 0))

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and emulates (not all readable on
        every vCPU: some depend on its CPUID)."""
        probe = b.msr_list(0)
        try:
            b.ioctl(self.fd, b.KVM_GET_MSR_INDEX_LIST, probe)
        except b.KvmIoctlError as e:
            if e.errno != 7:                        # E2BIG: probe.nmsrs now says how many
                raise
        lst = b.msr_list(probe.nmsrs)
        b.ioctl(self.fd, b.KVM_GET_MSR_INDEX_LIST, lst)
        return [lst.indices[i] for i in range(lst.nmsrs)]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class KvmVm:
    """A KVM VM file descriptor."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd

    def check_extension(self, cap: int) -> int:
        return b.ioctl(self.fd, b.KVM_CHECK_EXTENSION, cap)

    def enable_cap(self, cap: int, *args: int) -> None:
        ec = b.EnableCap()
        ec.cap = cap
        for i, a in enumerate(args):
            ec.args[i] = a
        b.ioctl(self.fd, b.KVM_ENABLE_CAP, ec)

    def set_user_memory_region(self, slot: int, gpa: int, size: int, host_addr: int,
                               flags: int = 0) -> None:
        r = b.UserspaceMemoryRegion(slot=slot, flags=flags, guest_phys_addr=gpa,
                                    memory_size=size, userspace_addr=host_addr)
        b.ioctl(self.fd, b.KVM_SET_USER_MEMORY_REGION, r)

    def get_dirty_log(self, slot: int, npages: int) -> bytes:
        buf = ctypes.create_string_buffer(((npages + 63) // 64) * 8)
        log = b.DirtyLog(slot=slot, dirty_bitmap=ctypes.addressof(buf))
        b.ioctl(self.fd, b.KVM_GET_DIRTY_LOG, log)
        return buf.raw

    def set_tss_addr(self, addr: int) -> None:
        b.ioctl(self.fd, b.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        b.ioctl(self.fd, b.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(addr))

    def create_irqchip(self) -> None:
        b.ioctl(self.fd, b.KVM_CREATE_IRQCHIP)

    def signal_msi(self, address: int, data: int) -> int:
        msi = b.Msi(address_lo=address & 0xFFFFFFFF, address_hi=address >> 32, data=data)
        return b.ioctl(self.fd, b.KVM_SIGNAL_MSI, msi)

    def set_msr_filter(self, flt: b.MsrFilter) -> None:
        b.ioctl(self.fd, b.KVM_X86_SET_MSR_FILTER, flt)

    def create_vcpu(self, vcpu_id: int) -> KvmVcpu:
        return KvmVcpu(self, vcpu_id, b.ioctl(self.fd, b.KVM_CREATE_VCPU, vcpu_id))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class KvmVcpu:
    """A KVM vCPU file descriptor and its shared ``struct kvm_run`` page."""

    def __init__(self, vm: KvmVm, vcpu_id: int, fd: int) -> None:
        self.vm = vm
        self.vcpu_id = vcpu_id
        self.fd = fd
        self.run_map = mmap.mmap(fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)

    # --- register state
    def get_regs(self) -> Regs:
        r = Regs()
        b.ioctl(self.fd, b.KVM_GET_REGS, r)
        return r

    def set_regs(self, regs: Regs) -> None:
        b.ioctl(self.fd, b.KVM_SET_REGS, regs)

    def get_sregs(self) -> SRegs:
        s = SRegs()
        b.ioctl(self.fd, b.KVM_GET_SREGS, s)
        return s

    def set_sregs(self, sregs: SRegs) -> None:
        b.ioctl(self.fd, b.KVM_SET_SREGS, sregs)

    def get_msr(self, index: int) -> int:
        m = b.Msrs1(nmsrs=1)
        m.entry.index = index
        if b.ioctl(self.fd, b.KVM_GET_MSRS, m) != 1:
            raise OSError(f"KVM_GET_MSRS: MSR 0x{index:x} not readable")
        return m.entry.data

    def set_msr(self, index: int, value: int) -> None:
        m = b.Msrs1(nmsrs=1)
        m.entry.index = index
        m.entry.data = value
        if b.ioctl(self.fd, b.KVM_SET_MSRS, m) != 1:
            raise OSError(f"KVM_SET_MSRS: MSR 0x{index:x} not writable")

    def get_msrs(self, indices: list[int]) -> list[tuple[int, int]]:
        """KVM_GET_MSRS: ``(index, value)`` for the leading run of ``indices`` KVM could read
        (KVM stops at the first MSR it rejects; the caller skips it and asks again)."""
        m = b.msrs(len(indices))
        for i, index in enumerate(indices):
            m.entries[i].index = index
        n = b.ioctl(self.fd, b.KVM_GET_MSRS, m) if indices else 0
        return [(m.entries[i].index, m.entries[i].data) for i in range(n)]

    def set_msrs(self, values: list[tuple[int, int]]) -> int:
        """KVM_SET_MSRS: returns how many leading entries KVM accepted."""
        m = b.msrs(len(values))
        for i, (index, value) in enumerate(values):
            m.entries[i].index = index
            m.entries[i].data = value
        return b.ioctl(self.fd, b.KVM_SET_MSRS, m) if values else 0

    def get_fpu(self) -> b.Fpu:
        f = b.Fpu()
        b.ioctl(self.fd, b.KVM_GET_FPU, f)
        return f

    def set_fpu(self, fpu: b.Fpu) -> None:
        b.ioctl(self.fd, b.KVM_SET_FPU, fpu)

    def get_xsave(self, size: int = b.XSAVE_SIZE) -> bytes:
        """The guest's XSAVE area (KVM_GET_XSAVE2 when ``size`` exceeds 4 KiB)."""
        buf = ctypes.create_string_buffer(max(size, b.XSAVE_SIZE))
        req = b.KVM_GET_XSAVE2 if size > b.XSAVE_SIZE else b.KVM_GET_XSAVE
        b.ioctl(self.fd, req, ctypes.addressof(buf))
        return buf.raw

    def set_xsave(self, area: bytes) -> None:
        """KVM_SET_XSAVE (KVM reads as many bytes as its XSAVE2 size; ``area`` must have them)."""
        buf = ctypes.create_string_buffer(bytes(area), max(len(area), b.XSAVE_SIZE))
        b.ioctl(self.fd, b.KVM_SET_XSAVE, ctypes.addressof(buf))

    def get_xcrs(self) -> b.Xcrs:
        x = b.Xcrs()
        b.ioctl(self.fd, b.KVM_GET_XCRS, x)
        return x

    def set_xcrs(self, xcrs: b.Xcrs) -> None:
        b.ioctl(self.fd, b.KVM_SET_XCRS, xcrs)

    def get_lapic(self) -> b.LapicState:
        s = b.LapicState()
        b.ioctl(self.fd, b.KVM_GET_LAPIC, s)
        return s

    def set_lapic(self, state: b.LapicState) -> None:
        b.ioctl(self.fd, b.KVM_SET_LAPIC, state)

    def get_vcpu_events(self) -> b.VcpuEvents:
        e = b.VcpuEvents()
        b.ioctl(self.fd, b.KVM_GET_VCPU_EVENTS, e)
        return e

    def set_vcpu_events(self, events: b.VcpuEvents) -> None:
        b.ioctl(self.fd, b.KVM_SET_VCPU_EVENTS, events)

    def get_debugregs(self) -> b.DebugRegs:
        d = b.DebugRegs()
        b.ioctl(self.fd, b.KVM_GET_DEBUGREGS, d)
        return d

    def set_debugregs(self, dregs: b.DebugRegs) -> None:
        b.ioctl(self.fd, b.KVM_SET_DEBUGREGS, dregs)

    def set_cpuid2(self, entries: list[b.CpuidEntry2]) -> None:
        c = b.cpuid2(len(entries))
        for i, e in enumerate(entries):
            c.entries[i] = e
        b.ioctl(self.fd, b.KVM_SET_CPUID2, c)

    def set_guest_debug(self, control: int, debugreg: list[int]) -> None:
        g = b.GuestDebug(control=control)
        for i, v in enumerate(debugreg):
            g.debugreg[i] = v
        b.ioctl(self.fd, b.KVM_SET_GUEST_DEBUG, g)

    def get_mp_state(self) -> int:
        s = ctypes.c_uint32()
        b.ioctl(self.fd, b.KVM_GET_MP_STATE, s)
        return s.value

    def set_mp_state(self, state: int) -> None:
        b.ioctl(self.fd, b.KVM_SET_MP_STATE, ctypes.c_uint32(state))

    def get_tsc_khz(self) -> int:
        return b.ioctl(self.fd, b.KVM_GET_TSC_KHZ)

    def set_tsc_khz(self, khz: int) -> None:
        b.ioctl(self.fd, b.KVM_SET_TSC_KHZ, khz)

    # --- running
    def run(self) -> int:
        """KVM_RUN; returns the exit reason, or KVM_EXIT_INTR when interrupted (EINTR)."""
        try:
            b.ioctl(self.fd, b.KVM_RUN)
        except b.KvmIoctlError as e:
            if e.errno in (4, 11):  # EINTR, EAGAIN
                self.run_map[b.RUN_IMMEDIATE_EXIT] = 0
                return b.KVM_EXIT_INTR
            raise
        return struct.unpack_from("<I", self.run_map, b.RUN_EXIT_REASON)[0]

    def finish_pending_exit(self) -> int | None:
        """Let KVM finish the instruction behind the last I/O, MMIO or MSR exit (it does so at
        the start of the next KVM_RUN, from the data in the run page) without running the
        guest further: KVM_RUN with ``immediate_exit`` set. Until then the architectural
        state KVM reports is not final (Documentation/virt/kvm/api.rst, KVM_RUN).

        Returns None when done, or the exit reason when completing the instruction needed
        another exit (a multi-part access); that exit is then in the run page, unhandled.
        Call only while no thread is in :meth:`run`."""
        prev = self.run_map[b.RUN_IMMEDIATE_EXIT]
        self.run_map[b.RUN_IMMEDIATE_EXIT] = 1
        try:
            b.ioctl(self.fd, b.KVM_RUN)
        except b.KvmIoctlError as e:
            if e.errno not in (4, 11):  # EINTR, EAGAIN: finished, nothing executed
                raise
            return None
        finally:
            self.run_map[b.RUN_IMMEDIATE_EXIT] = prev
        return struct.unpack_from("<I", self.run_map, b.RUN_EXIT_REASON)[0]

    def request_immediate_exit(self) -> None:
        """Make the next (or a concurrent, once signalled) KVM_RUN return EINTR. Any thread."""
        self.run_map[b.RUN_IMMEDIATE_EXIT] = 1

    def close(self) -> None:
        if self.fd >= 0:
            self.run_map.close()
            os.close(self.fd)
            self.fd = -1
