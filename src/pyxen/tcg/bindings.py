"""ctypes bindings for pyxen's patched Unicorn: the calls the software engine makes, no more.

Loaded once per process from the cache (see :mod:`pyxen.tcg.build`). ``load()`` raises
:class:`~pyxen.errors.EngineUnavailable` with the command to run when the library is missing or
lacks the sysvm extension. All calls release the GIL (ctypes does for CDLL functions), so
``uc_emu_start`` runs guest code while other Python threads go on.
"""

from __future__ import annotations

import ctypes
from ctypes import (CFUNCTYPE, POINTER, c_bool, c_int, c_int64, c_size_t, c_uint,
                    c_uint32, c_uint64, c_void_p)

from pyxen.errors import EngineUnavailable

UC_ARCH_X86 = 4
UC_MODE_64 = 1 << 3
UC_PROT_ALL = 7
UC_ERR_OK = 0

UC_HOOK_MEM_READ_UNMAPPED = 1 << 4
UC_HOOK_MEM_WRITE_UNMAPPED = 1 << 5
UC_HOOK_MEM_FETCH_UNMAPPED = 1 << 6
UC_HOOK_MEM_UNMAPPED = UC_HOOK_MEM_READ_UNMAPPED | UC_HOOK_MEM_WRITE_UNMAPPED | UC_HOOK_MEM_FETCH_UNMAPPED

# uc_ctl(UC_CTL_WRITE(UC_CTL_TLB_FLUSH, 0))
UC_CTL_TLB_FLUSH = 11
UC_CTL_IO_WRITE = 1
CTL_FLUSH_TLB = UC_CTL_TLB_FLUSH | (0 << 26) | (UC_CTL_IO_WRITE << 30)

# uc_ctl(UC_CTL_WRITE(UC_CTL_CPU_MODEL, 1), model): before the CPU is first used
UC_CTL_CPU_MODEL = 7
CTL_SET_CPU_MODEL = UC_CTL_CPU_MODEL | (1 << 26) | (UC_CTL_IO_WRITE << 30)
UC_CPU_X86_QEMU64 = 0

# sysvm exit kinds (unicorn.h)
EXIT_NONE, EXIT_IO, EXIT_MSR_READ, EXIT_MSR_WRITE, EXIT_HYPERCALL, EXIT_HALT, EXIT_SHUTDOWN = range(7)


class SysvmExit(ctypes.Structure):
    _fields_ = [("kind", c_uint32), ("size", c_uint32), ("is_write", c_uint32),
                ("index", c_uint32), ("value", c_uint64)]


class SysvmCpuid(ctypes.Structure):
    _fields_ = [("function", c_uint32), ("index", c_uint32), ("flags", c_uint32),
                ("eax", c_uint32), ("ebx", c_uint32), ("ecx", c_uint32), ("edx", c_uint32),
                ("pad", c_uint32)]


IRQ_ACK = CFUNCTYPE(c_int, c_void_p, c_void_p)
MMIO_READ = CFUNCTYPE(c_uint64, c_void_p, c_uint64, c_uint, c_void_p)
MMIO_WRITE = CFUNCTYPE(None, c_void_p, c_uint64, c_uint, c_uint64, c_void_p)
MEM_UNMAPPED = CFUNCTYPE(c_bool, c_void_p, c_int, c_uint64, c_int, c_int64, c_void_p)

_lib: ctypes.CDLL | None = None


def _proto(lib: ctypes.CDLL, name: str, restype, *argtypes) -> None:  # type: ignore[no-untyped-def]
    fn = getattr(lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)


def load() -> ctypes.CDLL:
    """The patched library, loaded and prototyped (cached)."""
    global _lib
    if _lib is not None:
        return _lib
    from pyxen.tcg.build import find_library
    path = find_library()
    if path is None:
        raise EngineUnavailable("the software engine (tcg) is not built on this host: run "
                                "./tools/setup.sh or `python -m pyxen.tcg.build`")
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise EngineUnavailable(f"{path}: cannot load: {e}") from e
    if not hasattr(lib, "uc_sysvm_enable"):
        raise EngineUnavailable(f"{path}: not pyxen's patched Unicorn (no sysvm extension)")
    if not hasattr(lib, "uc_sysvm_dirty_log_fetch"):
        raise EngineUnavailable(f"{path}: built from an older pyxen patch set: run "
                                "`python -m pyxen.tcg.build`")
    P = POINTER
    _proto(lib, "uc_open", c_int, c_int, c_int, P(c_void_p))
    _proto(lib, "uc_close", c_int, c_void_p)
    _proto(lib, "uc_strerror", ctypes.c_char_p, c_int)
    _proto(lib, "uc_mem_map_ptr", c_int, c_void_p, c_uint64, c_size_t, c_uint32, c_void_p)
    _proto(lib, "uc_mem_unmap", c_int, c_void_p, c_uint64, c_size_t)
    _proto(lib, "uc_mmio_map", c_int, c_void_p, c_uint64, c_size_t, MMIO_READ, c_void_p,
           MMIO_WRITE, c_void_p)
    _proto(lib, "uc_emu_start", c_int, c_void_p, c_uint64, c_uint64, c_uint64, c_size_t)
    _proto(lib, "uc_hook_add", c_int, c_void_p, P(c_size_t), c_int, MEM_UNMAPPED, c_void_p,
           c_uint64, c_uint64)
    _proto(lib, "uc_emu_stop", c_int, c_void_p)
    _proto(lib, "uc_context_alloc", c_int, c_void_p, P(c_void_p))
    _proto(lib, "uc_context_save", c_int, c_void_p, c_void_p)
    _proto(lib, "uc_context_restore", c_int, c_void_p, c_void_p)
    _proto(lib, "uc_context_free", c_int, c_void_p)
    lib.uc_ctl.restype = c_int           # variadic: argtypes left open
    _proto(lib, "uc_sysvm_enable", c_int, c_void_p, IRQ_ACK, c_void_p)
    _proto(lib, "uc_sysvm_exit_record", P(SysvmExit), c_void_p)
    _proto(lib, "uc_sysvm_set_io_bitmap", None, c_void_p, c_void_p)
    _proto(lib, "uc_sysvm_set_msr_traps", c_int, c_void_p, P(c_uint32), c_int)
    _proto(lib, "uc_sysvm_set_cpuid", None, c_void_p, P(SysvmCpuid), c_int)
    _proto(lib, "uc_sysvm_poll_irq", None, c_void_p)
    _proto(lib, "uc_sysvm_set_pause_yield", None, c_void_p, c_int)
    _proto(lib, "uc_sysvm_clear_irq", None, c_void_p)
    _proto(lib, "uc_sysvm_inject_exception", None, c_void_p, c_int, c_int, c_uint32)
    _proto(lib, "uc_sysvm_get_regs", None, c_void_p, c_void_p)
    _proto(lib, "uc_sysvm_set_regs", None, c_void_p, c_void_p)
    _proto(lib, "uc_sysvm_get_sregs", None, c_void_p, c_void_p)
    _proto(lib, "uc_sysvm_set_sregs", None, c_void_p, c_void_p)
    _proto(lib, "uc_sysvm_native_cpuid", None, c_void_p, c_uint32, c_uint32, P(c_uint32))
    # guest-write log (CPU stopped: the caller holds the engine)
    _proto(lib, "uc_sysvm_dirty_log_start", c_int, c_void_p)
    _proto(lib, "uc_sysvm_dirty_log_stop", None, c_void_p)
    _proto(lib, "uc_sysvm_dirty_log_fetch", c_int, c_void_p, c_uint64, c_uint64, c_void_p)
    # a uc_context's CPU state as bytes (vCPU save/restore)
    _proto(lib, "uc_sysvm_context_data_size", c_size_t, c_void_p)
    _proto(lib, "uc_sysvm_context_export", c_int, c_void_p, c_void_p, c_void_p, c_size_t)
    _proto(lib, "uc_sysvm_context_import", c_int, c_void_p, c_void_p, c_void_p, c_size_t)
    _lib = lib
    return lib


def check(lib: ctypes.CDLL, err: int, what: str) -> None:
    if err != UC_ERR_OK:
        raise EngineUnavailable(f"unicorn: {what}: {lib.uc_strerror(err).decode()}")


__all__ = ["load", "check", "SysvmExit", "SysvmCpuid", "IRQ_ACK", "MMIO_READ", "MMIO_WRITE",
           "MEM_UNMAPPED"]
