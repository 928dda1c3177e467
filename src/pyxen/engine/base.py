"""The engine interface: the only way pyxen's upper layers execute guest instructions.

An *engine* runs x86-64 guest code: ``kvm`` (hardware, /dev/kvm) or, later, ``tcg`` (software).
Nothing above this module may know which engine runs. The interface is deliberately small:

* :class:`Engine` creates :class:`EngineVm` objects and answers capability questions;
* :class:`EngineVm` maps guest memory, creates vCPUs, injects interrupts (as MSIs to a LAPIC),
  reports dirty pages and is told where guests enter the hypervisor;
* :class:`EngineVcpu` gets/sets architectural state and runs until the next :class:`Exit`.

CPU state uses architectural x86 structures (:class:`Regs`, :class:`SRegs`) whose field names
and layout happen to match KVM's ``kvm_regs``/``kvm_sregs``; they are the neutral currency here.

Threading contract: a vCPU's ``run``/``get_*``/``set_*`` are called only from that vCPU's thread.
``EngineVm.inject_msi`` and ``EngineVcpu.kick`` may be called from any thread.
"""

from __future__ import annotations

import contextlib
import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass

from pyxen.cpustate import DTable, Regs, Segment, SRegs  # noqa: F401  (part of the interface)


@dataclass(frozen=True, slots=True)
class CpuidEntry:
    """One CPUID answer: ``function``/``index`` in, ``eax..edx`` out.

    ``significant_index`` says whether ``index`` (ECX) selects among sub-leaves.
    """

    function: int
    index: int
    eax: int
    ebx: int
    ecx: int
    edx: int
    significant_index: bool = False


# ----------------------------------------------------------------------------- exits

class ExitKind(enum.Enum):
    """Why :meth:`EngineVcpu.run` returned."""

    HYPERCALL = "hypercall"      # guest entered Xen (VMCALL/VMMCALL or a hypercall-page stub)
    IO = "io"                    # port I/O the engine could not complete itself
    MMIO = "mmio"                # access to guest-physical address with no memory behind it
    MSR_READ = "msr_read"        # RDMSR of an MSR the VMM asked to see
    MSR_WRITE = "msr_write"      # WRMSR of an MSR the VMM asked to see
    HALT = "halt"                # HLT with interrupts the engine cannot wake on (rare)
    SHUTDOWN = "shutdown"        # triple fault
    INTERRUPTED = "interrupted"  # kick() or a signal: nothing happened in the guest
    FAILED = "failed"            # the engine could not execute an instruction


@dataclass(slots=True)
class Exit:
    """One exit from the guest. Fields beyond ``kind`` depend on the kind.

    * HYPERCALL: ``via`` is ``"insn"`` (trapped VMCALL/VMMCALL) or ``"page"`` (stub port I/O).
      Arguments are read from registers by the caller; complete with
      :meth:`EngineVcpu.complete_hypercall`.
    * IO: ``port``, ``size`` (1/2/4), ``is_write``, ``data`` (bytes written, or b"" for reads;
      complete a read with :meth:`EngineVcpu.complete_io_read`).
    * MMIO: ``address``, ``size``, ``is_write``, ``data``.
    * MSR_READ/MSR_WRITE: ``msr``; for writes ``value``. Complete a read with
      :meth:`EngineVcpu.complete_msr_read`; a write with :meth:`EngineVcpu.complete_msr_write`.
    * FAILED: ``reason`` in words.
    """

    kind: ExitKind
    via: str = ""
    port: int = 0
    address: int = 0
    size: int = 0
    is_write: bool = False
    data: bytes = b""
    msr: int = 0
    value: int = 0
    reason: str = ""


# ----------------------------------------------------------------------------- interface

class EngineVcpu(ABC):
    """One virtual CPU. See the module docstring for the threading contract."""

    index: int
    #: the vCPU is halted inside the engine waiting for an interrupt (read-only, advisory:
    #: for ``vcpu-list``/``list`` state letters; engines that cannot tell leave it False)
    halted: bool = False

    @abstractmethod
    def get_regs(self) -> Regs: ...

    @abstractmethod
    def set_regs(self, regs: Regs) -> None: ...

    @abstractmethod
    def get_sregs(self) -> SRegs: ...

    @abstractmethod
    def set_sregs(self, sregs: SRegs) -> None: ...

    @abstractmethod
    def get_msr(self, index: int) -> int: ...

    @abstractmethod
    def set_msr(self, index: int, value: int) -> None: ...

    @abstractmethod
    def set_cpuid(self, entries: list[CpuidEntry]) -> None:
        """Install this vCPU's CPUID table (per vCPU: leaf 0x40000004 EBX differs)."""

    @abstractmethod
    def run(self) -> Exit:
        """Run the guest until the next exit that needs the VMM."""

    @abstractmethod
    def complete_hypercall(self, result: int) -> None:
        """Return ``result`` (a signed long) from the hypercall that caused the last exit."""

    @abstractmethod
    def complete_io_read(self, data: bytes) -> None:
        """Supply the bytes an IN instruction reads (length = exit ``size``)."""

    @abstractmethod
    def complete_mmio_read(self, data: bytes) -> None:
        """Supply the bytes a read from unbacked guest-physical memory returns."""

    @abstractmethod
    def complete_msr_read(self, value: int, fault: bool = False) -> None: ...

    @abstractmethod
    def complete_msr_write(self, fault: bool = False) -> None: ...

    @abstractmethod
    def make_runnable(self) -> None:
        """Start an application processor at its loaded registers (leave wait-for-SIPI)."""

    @abstractmethod
    def kick(self) -> None:
        """Make a concurrent or the next :meth:`run` return ``INTERRUPTED`` soon (any thread)."""

    @abstractmethod
    def get_tsc(self) -> int:
        """The guest's current TSC value (vCPU thread only)."""

    @abstractmethod
    def tsc_khz(self) -> int:
        """The guest TSC frequency in kHz."""

    def save_state(self) -> bytes:
        """The vCPU's complete state as an engine-specific blob: registers, FPU/SSE, MSRs,
        the local APIC and whether it is halted or waiting for SIPI -- everything needed to
        continue it in another process (:meth:`load_state`). Call on the vCPU's thread, or
        on any thread while that thread is parked outside :meth:`run` (domain paused).
        Raises EngineError if the engine cannot save."""
        from pyxen.errors import EngineError
        raise EngineError(f"{type(self).__name__}: vCPU state cannot be saved")

    def load_state(self, blob: bytes) -> None:
        """Replace the vCPU's state with one :meth:`save_state` produced on an engine of the
        same :attr:`Engine.state_format`, before the vCPU first runs or while it is parked.
        Raises EngineError for a blob it cannot use (wrong format, size or values)."""
        from pyxen.errors import EngineError
        raise EngineError(f"{type(self).__name__}: vCPU state cannot be loaded")

    @abstractmethod
    def close(self) -> None: ...


class EngineVm(ABC):
    """One virtual machine: memory, vCPUs, interrupt injection, dirty tracking."""

    @abstractmethod
    def map_memory(self, gpa: int, size: int, host_addr: int, *, log_dirty: bool = False) -> int:
        """Map ``size`` bytes of host memory at ``host_addr`` as guest-physical ``gpa``.

        Both must be page aligned and ``host_addr`` must stay valid until unmapped. Returns an
        opaque slot id for :meth:`unmap_memory` / :meth:`get_dirty_log`.
        """

    @abstractmethod
    def unmap_memory(self, slot: int) -> None: ...

    @abstractmethod
    def get_dirty_log(self, slot: int) -> bytes:
        """Bitmap (bit n = page n of the slot) of pages the guest wrote since the last call
        (fetch and clear). Only meaningful while dirty logging is on; engines that cannot
        tell report every page."""

    def set_dirty_logging(self, enabled: bool) -> None:
        """Start (or stop) recording guest writes to every mapped slot for
        :meth:`get_dirty_log` (live migration's pre-copy). Starting clears the log. Any
        thread; costs guest speed while on. The default keeps no log (every page dirty)."""

    @abstractmethod
    def create_vcpu(self, index: int) -> EngineVcpu:
        """Create vCPU ``index`` (its APIC ID is ``2 * index``) in the PVH reset state."""

    @abstractmethod
    def inject_msi(self, apic_id: int, vector: int) -> None:
        """Deliver a fixed, edge-triggered interrupt ``vector`` to LAPIC ``apic_id`` (any thread)."""

    @abstractmethod
    def set_hypercall_sites(self, linear_addresses: list[int]) -> None:
        """Trap execution of the VMCALL/VMMCALL instructions at these guest linear addresses.

        At most :attr:`Engine.max_hypercall_sites` addresses. Engines that trap every
        VMCALL/VMMCALL natively may ignore the list.
        """

    @abstractmethod
    def set_trapped_msrs(self, msrs: list[int]) -> None:
        """Report RDMSR/WRMSR of these MSR indices as MSR_READ/MSR_WRITE exits."""

    def set_trapped_ports(self, ports: list[int]) -> None:
        """The I/O ports the VMM handles (IO exits). Engines may treat every other port as
        having no device (reads all-ones, writes dropped) without exiting; by default every
        port exits."""

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        """A block during which no guest instruction runs concurrently (any thread).

        Wrap read-modify-writes of guest memory that the guest also updates with locked
        instructions (event-channel bits). Hardware engines execute guest atomics atomically,
        so host atomics suffice and the default is a no-op; the software engine stops its CPU.
        """
        return contextlib.nullcontext()

    @abstractmethod
    def close(self) -> None: ...


class Engine(ABC):
    """A way of executing guest code. ``name`` is what ``--accel`` selects."""

    name: str
    #: Which vCPU state blobs this engine reads and writes (:meth:`EngineVcpu.save_state`):
    #: a saved domain restores only on an engine with the same value.
    state_format: str = ""
    #: How many distinct hypercall instruction addresses :meth:`EngineVm.set_hypercall_sites` takes.
    max_hypercall_sites: int = 4
    #: The I/O port a hypercall-page stub uses to leave the guest (``in $port, %eax``).
    HYPERCALL_PORT = 0x0EB  # unused by PC hardware; 0x80 (io_delay) and 0xE9 (debug) are taken

    @abstractmethod
    def create_vm(self) -> EngineVm: ...

    @abstractmethod
    def supported_cpuid(self) -> list[CpuidEntry]:
        """What this engine's CPU can execute, as CPUID entries (the VMM filters them)."""
