"""Raw /dev/kvm ABI: ioctl numbers, structures and constants (x86-64). No policy lives here.

Values mirror Linux's ``include/uapi/linux/kvm.h`` and ``arch/x86/include/uapi/asm/kvm.h``.
``ioctl`` goes through libc with the GIL released, so a vCPU thread blocked in ``KVM_RUN`` does
not stop the rest of the process.
"""

from __future__ import annotations

import ctypes
import os

from pyxen.cpustate import Regs, SRegs

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int

KVMIO = 0xAE
_IOC_WRITE, _IOC_READ = 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(0, nr, 0)


def _iow(nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, nr, size)


def _ior(nr: int, size: int) -> int:
    return _ioc(_IOC_READ, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


class KvmIoctlError(OSError):
    """An ioctl on a KVM file descriptor failed; ``errno`` is the host errno."""


def ioctl(fd: int, request: int, arg: object = None) -> int:
    """Issue ``request`` on ``fd``. ``arg`` is an int, a ctypes object (passed by reference) or None.

    Raises :class:`KvmIoctlError` on failure; EINTR is raised too (callers that expect it check).
    """
    if arg is None:
        ptr = None
    elif isinstance(arg, int):
        ptr = ctypes.c_void_p(arg)
    else:
        ptr = ctypes.cast(ctypes.byref(arg), ctypes.c_void_p)  # type: ignore[arg-type]
    ret = _libc.ioctl(fd, request, ptr)
    if ret < 0:
        err = ctypes.get_errno()
        raise KvmIoctlError(err, f"ioctl 0x{request:x}: {os.strerror(err)}")
    return ret


# ----------------------------------------------------------------------------- structures

class UserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [("slot", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("guest_phys_addr", ctypes.c_uint64), ("memory_size", ctypes.c_uint64),
                ("userspace_addr", ctypes.c_uint64)]


class CpuidEntry2(ctypes.Structure):
    _fields_ = [("function", ctypes.c_uint32), ("index", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("eax", ctypes.c_uint32), ("ebx", ctypes.c_uint32),
                ("ecx", ctypes.c_uint32), ("edx", ctypes.c_uint32),
                ("padding", ctypes.c_uint32 * 3)]


def cpuid2(nent: int) -> ctypes.Structure:
    """A ``struct kvm_cpuid2`` with room for ``nent`` entries."""

    class Cpuid2(ctypes.Structure):
        _fields_ = [("nent", ctypes.c_uint32), ("padding", ctypes.c_uint32),
                    ("entries", CpuidEntry2 * nent)]

    c = Cpuid2()
    c.nent = nent
    return c


class MsrEntry(ctypes.Structure):
    _fields_ = [("index", ctypes.c_uint32), ("reserved", ctypes.c_uint32),
                ("data", ctypes.c_uint64)]


class Msrs1(ctypes.Structure):
    """``struct kvm_msrs`` with exactly one entry."""

    _fields_ = [("nmsrs", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("entry", MsrEntry)]


def msrs(nent: int) -> ctypes.Structure:
    """A ``struct kvm_msrs`` with room for ``nent`` entries (KVM takes at most 256 per call)."""

    class Msrs(ctypes.Structure):
        _fields_ = [("nmsrs", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                    ("entries", MsrEntry * nent)]

    m = Msrs()
    m.nmsrs = nent
    return m


def msr_list(nent: int) -> ctypes.Structure:
    """A ``struct kvm_msr_list`` with room for ``nent`` indices."""

    class MsrList(ctypes.Structure):
        _fields_ = [("nmsrs", ctypes.c_uint32), ("indices", ctypes.c_uint32 * nent)]

    m = MsrList()
    m.nmsrs = nent
    return m


class Fpu(ctypes.Structure):
    """``struct kvm_fpu`` (FXSAVE-like: x87 registers, XMM0-15, MXCSR)."""

    _fields_ = [("fpr", ctypes.c_uint8 * 128), ("fcw", ctypes.c_uint16),
                ("fsw", ctypes.c_uint16), ("ftwx", ctypes.c_uint8), ("pad1", ctypes.c_uint8),
                ("last_opcode", ctypes.c_uint16), ("last_ip", ctypes.c_uint64),
                ("last_dp", ctypes.c_uint64), ("xmm", ctypes.c_uint8 * 256),
                ("mxcsr", ctypes.c_uint32), ("pad2", ctypes.c_uint32)]


#: ``struct kvm_xsave`` is 4096 bytes; with KVM_CAP_XSAVE2 the buffer is what the cap reports.
XSAVE_SIZE = 4096
#: offsets inside the XSAVE area (legacy region, then the XSAVE header)
XSAVE_MXCSR = 24
XSAVE_XMM0 = 160
XSAVE_XSTATE_BV = 512


class Xcr(ctypes.Structure):
    _fields_ = [("xcr", ctypes.c_uint32), ("reserved", ctypes.c_uint32),
                ("value", ctypes.c_uint64)]


KVM_MAX_XCRS = 16


class Xcrs(ctypes.Structure):
    _fields_ = [("nr_xcrs", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("xcrs", Xcr * KVM_MAX_XCRS), ("padding", ctypes.c_uint64 * 16)]


class LapicState(ctypes.Structure):
    """``struct kvm_lapic_state``: the 1 KiB xAPIC register page."""

    _fields_ = [("regs", ctypes.c_uint8 * 1024)]


class VcpuEvents(ctypes.Structure):
    """``struct kvm_vcpu_events``: pending/injected exception, interrupt, NMI, SMI, SIPI."""

    _fields_ = [("exception_injected", ctypes.c_uint8), ("exception_nr", ctypes.c_uint8),
                ("exception_has_error_code", ctypes.c_uint8),
                ("exception_pending", ctypes.c_uint8), ("exception_error_code", ctypes.c_uint32),
                ("interrupt_injected", ctypes.c_uint8), ("interrupt_nr", ctypes.c_uint8),
                ("interrupt_soft", ctypes.c_uint8), ("interrupt_shadow", ctypes.c_uint8),
                ("nmi_injected", ctypes.c_uint8), ("nmi_pending", ctypes.c_uint8),
                ("nmi_masked", ctypes.c_uint8), ("nmi_pad", ctypes.c_uint8),
                ("sipi_vector", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("smi_smm", ctypes.c_uint8), ("smi_pending", ctypes.c_uint8),
                ("smi_smm_inside_nmi", ctypes.c_uint8), ("smi_latched_init", ctypes.c_uint8),
                ("triple_fault_pending", ctypes.c_uint8), ("reserved", ctypes.c_uint8 * 26),
                ("exception_has_payload", ctypes.c_uint8),
                ("exception_payload", ctypes.c_uint64)]


KVM_VCPUEVENT_VALID_NMI_PENDING = 0x01
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x02
KVM_VCPUEVENT_VALID_SHADOW = 0x04
KVM_VCPUEVENT_VALID_SMM = 0x08
KVM_VCPUEVENT_VALID_PAYLOAD = 0x10
KVM_VCPUEVENT_VALID_TRIPLE_FAULT = 0x20


class DebugRegs(ctypes.Structure):
    """``struct kvm_debugregs``: the guest's own DR0-3, DR6, DR7."""

    _fields_ = [("db", ctypes.c_uint64 * 4), ("dr6", ctypes.c_uint64), ("dr7", ctypes.c_uint64),
                ("flags", ctypes.c_uint64), ("reserved", ctypes.c_uint64 * 9)]


class DirtyLog(ctypes.Structure):
    _fields_ = [("slot", ctypes.c_uint32), ("padding", ctypes.c_uint32),
                ("dirty_bitmap", ctypes.c_uint64)]


class Msi(ctypes.Structure):
    _fields_ = [("address_lo", ctypes.c_uint32), ("address_hi", ctypes.c_uint32),
                ("data", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("devid", ctypes.c_uint32), ("pad", ctypes.c_uint8 * 12)]


class GuestDebug(ctypes.Structure):
    _fields_ = [("control", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("debugreg", ctypes.c_uint64 * 8)]


class EnableCap(ctypes.Structure):
    _fields_ = [("cap", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("args", ctypes.c_uint64 * 4), ("pad", ctypes.c_uint8 * 64)]


class MsrFilterRange(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint32), ("nmsrs", ctypes.c_uint32),
                ("base", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("bitmap", ctypes.c_uint64)]


class MsrFilter(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("ranges", MsrFilterRange * 16)]


class Translation(ctypes.Structure):
    _fields_ = [("linear_address", ctypes.c_uint64), ("physical_address", ctypes.c_uint64),
                ("valid", ctypes.c_uint8), ("writeable", ctypes.c_uint8),
                ("usermode", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 5)]


# ----------------------------------------------------------------------------- ioctls

KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, 4)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, 8)
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, ctypes.sizeof(DirtyLog))
KVM_SET_USER_MEMORY_REGION = _iow(0x46, ctypes.sizeof(UserspaceMemoryRegion))
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, 8)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, ctypes.sizeof(Regs))
KVM_SET_REGS = _iow(0x82, ctypes.sizeof(Regs))
KVM_GET_SREGS = _ior(0x83, ctypes.sizeof(SRegs))
KVM_SET_SREGS = _iow(0x84, ctypes.sizeof(SRegs))
KVM_TRANSLATE = _iowr(0x85, ctypes.sizeof(Translation))
KVM_GET_MSRS = _iowr(0x88, 8)
KVM_SET_MSRS = _iow(0x89, 8)
KVM_GET_FPU = _ior(0x8C, ctypes.sizeof(Fpu))
KVM_SET_FPU = _iow(0x8D, ctypes.sizeof(Fpu))
KVM_GET_LAPIC = _ior(0x8E, ctypes.sizeof(LapicState))
KVM_SET_LAPIC = _iow(0x8F, ctypes.sizeof(LapicState))
KVM_SET_CPUID2 = _iow(0x90, 8)
KVM_GET_MP_STATE = _ior(0x98, 4)
KVM_SET_MP_STATE = _iow(0x99, 4)
KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4
KVM_GET_VCPU_EVENTS = _ior(0x9F, ctypes.sizeof(VcpuEvents))
KVM_SET_VCPU_EVENTS = _iow(0xA0, ctypes.sizeof(VcpuEvents))
KVM_GET_DEBUGREGS = _ior(0xA1, ctypes.sizeof(DebugRegs))
KVM_SET_DEBUGREGS = _iow(0xA2, ctypes.sizeof(DebugRegs))
KVM_SET_TSC_KHZ = _io(0xA2)
KVM_GET_XSAVE = _ior(0xA4, XSAVE_SIZE)
KVM_SET_XSAVE = _iow(0xA5, XSAVE_SIZE)
KVM_GET_XCRS = _ior(0xA6, ctypes.sizeof(Xcrs))
KVM_SET_XCRS = _iow(0xA7, ctypes.sizeof(Xcrs))
KVM_GET_XSAVE2 = _ior(0xCF, XSAVE_SIZE)
KVM_SET_GUEST_DEBUG = _iow(0x9B, ctypes.sizeof(GuestDebug))
KVM_GET_TSC_KHZ = _io(0xA3)
KVM_ENABLE_CAP = _iow(0xA3, ctypes.sizeof(EnableCap))
KVM_SIGNAL_MSI = _iow(0xA5, ctypes.sizeof(Msi))
KVM_X86_SET_MSR_FILTER = _iow(0xC6, ctypes.sizeof(MsrFilter))

# capabilities
KVM_CAP_IRQCHIP = 0
KVM_CAP_USER_MEMORY = 3
KVM_CAP_MP_STATE = 14
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_SET_GUEST_DEBUG = 23
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_DEBUGREGS = 50
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_TSC_CONTROL = 60
KVM_CAP_XEN_HVM = 38
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_SIGNAL_MSI = 77
KVM_CAP_SPLIT_IRQCHIP = 121
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_X86_USER_SPACE_MSR = 188
KVM_CAP_X86_MSR_FILTER = 189
KVM_CAP_XSAVE2 = 208

KVM_MEM_LOG_DIRTY_PAGES = 1

# exit reasons
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

# guest debug
KVM_GUESTDBG_ENABLE = 0x1
KVM_GUESTDBG_USE_HW_BP = 0x20000

# user-space MSR exits
KVM_MSR_EXIT_REASON_INVAL = 1 << 0
KVM_MSR_EXIT_REASON_UNKNOWN = 1 << 1
KVM_MSR_EXIT_REASON_FILTER = 1 << 2
KVM_MSR_FILTER_READ = 1 << 0
KVM_MSR_FILTER_WRITE = 1 << 1
KVM_MSR_FILTER_DEFAULT_ALLOW = 0

MSI_ADDRESS_BASE = 0xFEE00000

# ----------------------------------------------------------------------------- struct kvm_run offsets

RUN_IMMEDIATE_EXIT = 1
RUN_EXIT_REASON = 8
RUN_U = 32                 # start of the exit-specific union
RUN_IO_DIRECTION = RUN_U + 0
RUN_IO_SIZE = RUN_U + 1
RUN_IO_PORT = RUN_U + 2
RUN_IO_COUNT = RUN_U + 4
RUN_IO_DATA_OFFSET = RUN_U + 8
RUN_MMIO_PHYS = RUN_U + 0
RUN_MMIO_DATA = RUN_U + 8
RUN_MMIO_LEN = RUN_U + 16
RUN_MMIO_IS_WRITE = RUN_U + 20
RUN_DEBUG_EXCEPTION = RUN_U + 0
RUN_DEBUG_PC = RUN_U + 8
RUN_MSR_ERROR = RUN_U + 0
RUN_MSR_REASON = RUN_U + 8
RUN_MSR_INDEX = RUN_U + 12
RUN_MSR_DATA = RUN_U + 16
RUN_INTERNAL_SUBERROR = RUN_U + 0
RUN_INTERNAL_NDATA = RUN_U + 4
RUN_INTERNAL_DATA = RUN_U + 8
RUN_FAIL_ENTRY_REASON = RUN_U + 0
RUN_SYSTEM_EVENT_TYPE = RUN_U + 0
