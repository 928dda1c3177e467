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

    def set_mp_state(self, state: int) -> None:
        b.ioctl(self.fd, b.KVM_SET_MP_STATE, ctypes.c_uint32(state))

    def get_tsc_khz(self) -> int:
        return b.ioctl(self.fd, b.KVM_GET_TSC_KHZ)

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

    def request_immediate_exit(self) -> None:
        """Make the next (or a concurrent, once signalled) KVM_RUN return EINTR. Any thread."""
        self.run_map[b.RUN_IMMEDIATE_EXIT] = 1

    def close(self) -> None:
        if self.fd >= 0:
            self.run_map.close()
            os.close(self.fd)
            self.fd = -1
