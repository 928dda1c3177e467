"""The software engine (``tcg``): guest code runs on pyxen's patched Unicorn (QEMU TCG).

One Unicorn CPU per VM is time-multiplexed over all vCPUs, as QEMU's single-threaded TCG does:
guest locked instructions and code patching stay coherent because only one vCPU executes at a
time. Each vCPU keeps its architectural state in a Unicorn context; the vCPU thread that owns
the engine loads its context, runs, and leaves it loaded until another vCPU needs the engine.

* Ownership: :class:`_EngineLock` hands the CPU out first-come first-served. A vCPU that has
  waited a whole time slice asks the running one to stop (``uc_emu_stop``, made race-free by the
  patch set). :meth:`TcgVm.exclusive` takes the same lock for VMM threads that must not race the
  guest (event-channel bit updates, memory map changes).
* Exits: trapped port I/O, trapped MSRs, VMCALL/VMMCALL and triple faults leave ``uc_emu_start``
  with the instruction *not executed*; the ``complete_*`` calls perform its effect. HLT is
  handled here: the vCPU sleeps until its LAPIC has a deliverable interrupt.
* Interrupts: a :class:`~pyxen.arch.x86.lapic.Lapic` per vCPU (MMIO at 0xFEE00000). The CPU asks
  for the vector at delivery time (``irq_ack``); INIT/SIPI start application processors.
* Untrapped port I/O has no device behind it (reads all-ones, writes dropped), in C.
* Live migration: a guest-write log in the patched TLB (:meth:`TcgVm.set_dirty_logging`,
  :meth:`TcgVm.get_dirty_log`) and vCPU state blobs (:meth:`TcgVcpu.save_state`) that hold
  the CPU context as QEMU lays it out, so they restore only on the same engine build
  (:attr:`TcgEngine.state_format`).

Threading: as :mod:`pyxen.engine.base`. ``inject_msi``/``kick``/``exclusive`` from any thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import struct
import threading
import time
from collections import deque
from typing import Iterator

from pyxen.arch.x86 import lapic as L
from pyxen.cpustate import Regs, SRegs
from pyxen.engine.base import CpuidEntry, Engine, EngineVcpu, EngineVm, Exit, ExitKind
from pyxen.errors import EngineError, EngineUnavailable
from pyxen.tcg import bindings as B

log = logging.getLogger("pyxen.tcg")

LAPIC_BASE = 0xFEE00000
MAX_VOID_PAGES = 1024         # unbacked pages a guest may touch before it is stopped
SLICE_S = 0.004               # how long a runnable vCPU waits before preempting the running one
_IA32_TSC = 0x10
_IA32_APIC_BASE = 0x1B

# CPUID bits QEMU 5.0's TCG cannot execute (the default Haswell model advertises them).
_L1_ECX_DROP = ((1 << 12) | (1 << 28) | (1 << 29) | (1 << 27) | (1 << 26) | (1 << 21)
                | (1 << 24) | (1 << 3) | (1 << 5) | (1 << 18) | (1 << 25))
# leaf 1 ECX: FMA(12) AVX(28) F16C(29) OSXSAVE(27) XSAVE(26) x2APIC(21) TSC-deadline(24)
# MONITOR(3) VMX(5) DCA(18) AES(25)
_L7_EBX_DROP = (1 << 5) | (1 << 4) | (1 << 11) | (1 << 14) | (1 << 16) | (1 << 2)
# leaf 7 EBX: AVX2(5) HLE(4) RTM(11) MPX(14) AVX512F(16) SGX(2)


def _tsc_khz() -> int:
    """Host TSC frequency, measured once per process against CLOCK_MONOTONIC."""
    global _TSC_KHZ
    if _TSC_KHZ is None:
        from pyxen.core.clock import rdtsc
        t0, c0 = time.monotonic_ns(), rdtsc()
        time.sleep(0.02)              # ~0.01 % error: guest time is defined by the TSC anyway
        t1, c1 = time.monotonic_ns(), rdtsc()
        _TSC_KHZ = round((c1 - c0) * 1_000_000 / (t1 - t0))
    return _TSC_KHZ


_TSC_KHZ: int | None = None

# vCPU state blobs (TcgVcpu.save_state): magic, version, format/context/metadata lengths
_STATE_MAGIC = b"PYXTCGV1"
_STATE_VERSION = 1
_STATE_HEADER = struct.Struct("<8sHHII")


def _parse_meta(raw: bytes) -> dict:  # type: ignore[type-arg]
    """The JSON metadata of a vCPU blob, type-checked. ValueError/TypeError if malformed."""
    d = json.loads(raw.decode("utf-8"))
    keys = {"lapic", "halted", "halt_if", "started", "init_pending", "sipi_vector", "fault",
            "msrs"}
    if not isinstance(d, dict) or not keys <= set(d) <= keys | {"pending_hypercall"}:
        raise ValueError("metadata: unexpected keys")
    ph = d.setdefault("pending_hypercall", None)
    if ph is not None and not (isinstance(ph, dict) and ph.get("via") in ("insn", "page")
                               and type(ph.get("len")) is int and 1 <= ph["len"] <= 15):
        raise ValueError("metadata: bad pending_hypercall")
    for k in ("halted", "halt_if", "started", "init_pending"):
        if not isinstance(d[k], bool):
            raise ValueError(f"metadata: {k} must be a bool")
    for k, top in (("sipi_vector", 0xFF), ("fault", 31)):
        v = d[k]
        if v is not None and (type(v) is not int or not 0 <= v <= top):
            raise ValueError(f"metadata: bad {k}")
    msrs = d["msrs"]
    if not isinstance(msrs, list) or not all(
            isinstance(m, list) and len(m) == 2 and all(type(x) is int for x in m)
            and 0 <= m[0] <= 0xFFFFFFFF and 0 <= m[1] < 1 << 64 for m in msrs):
        raise ValueError("metadata: bad msrs")
    lapic = d["lapic"]
    if not isinstance(lapic, dict) or not all(type(lapic.get(k)) is int
                                              for k in ("apic_id", "bus_hz")):
        raise ValueError("metadata: bad lapic")
    start = lapic.get("timer_start_ns")
    if start is not None and type(start) is not int:
        raise ValueError("metadata: bad lapic timer start")
    return d


def state_format() -> str:
    """The vCPU state format of this build (without loading the engine)."""
    from pyxen.tcg.build import build_id
    return f"tcg:unicorn-{build_id()}"


class TcgEngine(Engine):
    """Unicorn with pyxen's sysvm patches. Raises EngineUnavailable when it is not built."""

    name = "tcg"
    max_hypercall_sites = 1 << 30       # every VMCALL/VMMCALL traps; sites are not needed

    def __init__(self) -> None:
        self.lib = B.load()
        #: vCPU blobs hold QEMU's CPUX86State layout: they restore only into the same
        #: Unicorn version built from the same patch set ("tcg:unicorn-2.1.4-<hash>").
        self.state_format = state_format()
        self._cpuid: list[CpuidEntry] | None = None
        _tsc_khz()                               # measure once, up front

    @staticmethod
    def available() -> bool:
        try:
            B.load()
            return True
        except EngineUnavailable:
            return False

    def create_vm(self) -> TcgVm:
        return TcgVm(self)

    def supported_cpuid(self) -> list[CpuidEntry]:
        """The emulated CPU model's CPUID, minus what TCG cannot execute."""
        if self._cpuid is None:
            vm = TcgVm(self)
            try:
                self._cpuid = vm.native_cpuid()
            finally:
                vm.close()
        return list(self._cpuid)


class _EngineLock:
    """FIFO ownership of the single CPU; a waiter preempts the owner after one slice, or at
    the owner's next PAUSE (``contended(True)`` turns pause-loop exiting on)."""

    def __init__(self, preempt, contended) -> None:  # type: ignore[no-untyped-def]
        self._cv = threading.Condition()
        self._owner: object | None = None
        self._queue: deque[object] = deque()
        self._preempt = preempt
        self._contended = contended

    def acquire(self, who: object, urgent: bool = False) -> None:
        """Take the CPU. ``urgent`` (VMM work) stops the running vCPU at once."""
        with self._cv:
            if self._owner is None and not self._queue:
                self._owner = who
                return
            if not self._queue:
                self._contended(True)
            if urgent:
                self._queue.appendleft(who)
                self._preempt()
            else:
                self._queue.append(who)
            while not (self._owner is None and self._queue[0] is who):
                if not self._cv.wait(SLICE_S):
                    self._preempt()
            self._queue.popleft()
            if not self._queue:
                self._contended(False)
            self._owner = who

    def release(self) -> None:
        with self._cv:
            self._owner = None
            self._cv.notify_all()


class TcgVm(EngineVm):
    """One VM: the Unicorn instance, guest memory mappings, LAPICs and the CPU scheduler."""

    def __init__(self, engine: TcgEngine) -> None:
        self.engine = engine
        lib = self.lib = engine.lib
        h = ctypes.c_void_p()
        B.check(lib, lib.uc_open(B.UC_ARCH_X86, B.UC_MODE_64, ctypes.byref(h)), "uc_open")
        self.uc = h
        # QEMU's own TCG identity (qemu64), not a real part: a software CPU does not
        # speculate, and a Haswell identity makes Linux route every return through a
        # mitigation thunk (retbleed/ITS), which costs TCG a branch lookup per return.
        B.check(lib, lib.uc_ctl(h, ctypes.c_int(B.CTL_SET_CPU_MODEL),
                                ctypes.c_int(B.UC_CPU_X86_QEMU64)), "CPU model")
        self._ack_cb = B.IRQ_ACK(self._irq_ack)
        B.check(lib, lib.uc_sysvm_enable(h, self._ack_cb, None), "uc_sysvm_enable")
        self.exit = lib.uc_sysvm_exit_record(h).contents
        self._io_bitmap = (ctypes.c_uint8 * 8192)()
        lib.uc_sysvm_set_io_bitmap(h, self._io_bitmap)
        self._slots: dict[int, tuple[int, int, int]] = {}     # slot -> (gpa, size, host)
        self._dirty_logging = False
        self._next_slot = 0
        self.vcpus: list[TcgVcpu] = []
        self.current: TcgVcpu | None = None        # whose context is in the CPU
        self.running: TcgVcpu | None = None        # inside uc_emu_start
        self.lock = _EngineLock(self._preempt,
                                lambda on: lib.uc_sysvm_set_pause_yield(h, int(on)))
        self.apic_lock = threading.RLock()          # LAPIC models and wake-ups
        self._mmio_read = B.MMIO_READ(self._lapic_read)
        self._mmio_write = B.MMIO_WRITE(self._lapic_write)
        B.check(lib, lib.uc_mmio_map(h, LAPIC_BASE, L.PAGE_SIZE, self._mmio_read, None,
                                     self._mmio_write, None), "mapping the LAPIC")
        # Unbacked guest-physical addresses read as all-ones and ignore writes, as on the kvm
        # engine (the VMM's MMIO answer): the first access maps a "void" page there.
        self._exclusive_owner: threading.Thread | None = None
        self._void_pages: set[int] = set()
        self._void_read = B.MMIO_READ(lambda _uc, _off, size, _u: (1 << (8 * size)) - 1)
        self._void_write = B.MMIO_WRITE(lambda _uc, _off, _size, _value, _u: None)
        self._unmapped_cb = B.MEM_UNMAPPED(self._unmapped)
        hh = ctypes.c_size_t()
        B.check(lib, lib.uc_hook_add(h, ctypes.byref(hh), B.UC_HOOK_MEM_UNMAPPED,
                                     self._unmapped_cb, None, 1, 0), "unmapped-memory hook")
        self._reset_ctx = ctypes.c_void_p()
        B.check(lib, lib.uc_context_alloc(h, ctypes.byref(self._reset_ctx)), "context alloc")
        B.check(lib, lib.uc_context_save(h, self._reset_ctx), "context save")
        self._sregs_buf = SRegs()
        self._closed = False

    # ------------------------------------------------------------------ capabilities
    def native_cpuid(self) -> list[CpuidEntry]:
        out = (ctypes.c_uint32 * 4)()

        def q(fn: int, idx: int = 0) -> tuple[int, int, int, int]:
            self.lib.uc_sysvm_native_cpuid(self.uc, fn, idx, out)
            return out[0], out[1], out[2], out[3]

        entries: list[CpuidEntry] = []
        max_basic = q(0)[0]
        for fn in range(0, max_basic + 1):
            if fn in (4, 7, 0xB, 0xD, 0x1F):
                for idx in range(0, 8):
                    a, b, c, d = q(fn, idx)
                    entries.append(CpuidEntry(fn, idx, a, b, c, d, True))
                continue
            a, b, c, d = q(fn)
            if fn == 1:
                c &= ~_L1_ECX_DROP
            entries.append(CpuidEntry(fn, 0, a, b, c, d))
        max_ext = q(0x80000000)[0]
        for fn in range(0x80000000, min(max_ext, 0x80000020) + 1):
            a, b, c, d = q(fn)
            if fn == 0x80000001:
                c &= ~(1 << 2)                  # SVM: no nested virtualisation here
            entries.append(CpuidEntry(fn, 0, a, b, c, d))
        fixed = []
        for e in entries:
            if e.function == 7 and e.index == 0:
                e = CpuidEntry(7, 0, e.eax, e.ebx & ~_L7_EBX_DROP, e.ecx & ~(1 << 2), 0, True)
            if e.function == 0xD:
                e = CpuidEntry(0xD, e.index, 0, 0, 0, 0, True)   # no XSAVE
            fixed.append(e)
        return fixed

    # ------------------------------------------------------------------ memory
    def _unmapped(self, _uc: int, _type: int, address: int, _size: int, _value: int,
                  _u: int) -> bool:
        """vCPU thread, inside a run: give the page under ``address`` no device behind it."""
        page = address & ~0xFFF
        if len(self._void_pages) >= MAX_VOID_PAGES or page in self._void_pages:
            log.warning("tcg: guest access to unbacked 0x%x refused (%d void pages)", address,
                        len(self._void_pages))
            return False                          # the run fails: the domain crashes
        if self.lib.uc_mmio_map(self.uc, page, 0x1000, self._void_read, None,
                                self._void_write, None) != B.UC_ERR_OK:
            return False
        self._void_pages.add(page)
        return True

    def map_memory(self, gpa: int, size: int, host_addr: int, *, log_dirty: bool = False) -> int:
        with self.exclusive():
            for page in [p for p in self._void_pages if gpa <= p < gpa + size]:
                self.lib.uc_mem_unmap(self.uc, page, 0x1000)
                self._void_pages.discard(page)
            B.check(self.lib, self.lib.uc_mem_map_ptr(self.uc, gpa, size, B.UC_PROT_ALL,
                                                      host_addr),
                    f"mapping 0x{gpa:x}+0x{size:x}")
        slot = self._next_slot
        self._next_slot += 1
        self._slots[slot] = (gpa, size, host_addr)
        return slot

    def unmap_memory(self, slot: int) -> None:
        gpa, size, _host = self._slots.pop(slot)
        with self.exclusive():
            B.check(self.lib, self.lib.uc_mem_unmap(self.uc, gpa, size), "unmap")

    def set_dirty_logging(self, enabled: bool) -> None:
        """Start (clearing the log) or stop recording guest writes to guest RAM (any thread).

        While on, every write the guest's code makes -- plain stores, atomics, string
        instructions, page-table A/D updates by the page walker -- marks its page. Writes
        made from the host (the VMM's own, through the memfd) are not recorded. The cost is
        one slow-path store per page per fetch (see :meth:`get_dirty_log`)."""
        with self.exclusive():
            if self._closed:
                raise EngineError("tcg: the VM was closed")
            if enabled:
                B.check(self.lib, self.lib.uc_sysvm_dirty_log_start(self.uc), "dirty log")
            else:
                self.lib.uc_sysvm_dirty_log_stop(self.uc)
            self._dirty_logging = enabled

    def get_dirty_log(self, slot: int) -> bytes:
        """Pages of ``slot`` the guest wrote since logging started or the last fetch, as a
        bitmap (bit n = page n of the slot, LSB first); the slot's bits are cleared and the
        next guest write to any of its pages is recorded again. Any thread: the running
        vCPU is stopped for the fetch (the engine lock; ~0.2 ms, mostly the hand-over: the
        fetch itself is a bitmap copy plus one TLB scan, ~1 us for a clean 256 MiB slot).
        All ones while logging is off (correct without a log)."""
        gpa, size, _host = self._slots[slot]
        nbytes = ((size >> 12) + 7) // 8
        if not self._dirty_logging:
            return b"\xff" * nbytes
        buf = (ctypes.c_uint8 * nbytes)()
        with self.exclusive():
            if self._closed:
                raise EngineError("tcg: the VM was closed")
            # all ones if logging stopped meanwhile
            err = self.lib.uc_sysvm_dirty_log_fetch(self.uc, gpa, size, buf)
        if err != B.UC_ERR_OK:
            raise EngineError(f"tcg: dirty log of slot {slot} (0x{gpa:x}+0x{size:x}): "
                              f"{self.lib.uc_strerror(err).decode()}")
        return bytes(buf)

    def read_physical(self, gpa: int, n: int) -> bytes | None:
        """``n`` bytes of guest RAM at ``gpa`` (within one mapping), or None."""
        for base, size, host in self._slots.values():
            if base <= gpa and gpa + n <= base + size:
                return ctypes.string_at(host + gpa - base, n)
        return None

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the CPU: no guest instruction executes inside the block (any thread)."""
        me = threading.current_thread()
        if self._exclusive_owner is me:
            yield
            return
        self.lock.acquire(me, urgent=True)
        self._exclusive_owner = me
        try:
            yield
        finally:
            self._exclusive_owner = None
            self.lock.release()

    def paging_key(self) -> tuple[int, int, int, int] | None:
        """(CR0, CR3, CR4, EFER) of the loaded vCPU, or None if none is loaded (lock held)."""
        if self.current is None:
            return None
        s = self._sregs_buf
        self.lib.uc_sysvm_get_sregs(self.uc, ctypes.byref(s))
        return s.cr0, s.cr3, s.cr4, s.efer

    def evict(self) -> None:
        """Save the loaded vCPU's state into its context; the CPU is then free (lock held)."""
        if self.current is not None:
            self.lib.uc_context_save(self.uc, self.current.ctx)
            self.current = None

    def _preempt(self) -> None:
        self.lib.uc_emu_stop(self.uc)

    # ------------------------------------------------------------------ vCPUs and interrupts
    def create_vcpu(self, index: int) -> TcgVcpu:
        v = TcgVcpu(self, index)
        self.vcpus.append(v)
        return v

    def _by_apic(self, apic_id: int) -> TcgVcpu | None:
        for v in self.vcpus:
            if v.lapic.read(L.REG_ID, 0) >> 24 == apic_id:
                return v
        return None

    def inject_msi(self, apic_id: int, vector: int) -> None:
        with self.apic_lock:
            v = self._by_apic(apic_id)
            if v is not None and v.lapic.accept_fixed(vector):
                self._signal(v)

    def _signal(self, v: TcgVcpu) -> None:
        """``v``'s LAPIC may have a deliverable interrupt (apic_lock held)."""
        if v.lapic.deliverable() is None:
            return
        if self.running is v:
            self.lib.uc_sysvm_poll_irq(self.uc)
        with v.cv:
            v.cv.notify_all()

    def _irq_ack(self, _uc: int, _opaque: int) -> int:
        """The CPU takes an external interrupt now (vCPU thread, inside uc_emu_start)."""
        v = self.running
        if v is None:
            return -1
        with self.apic_lock:
            vec = v.lapic.ack()
            return -1 if vec is None else vec

    def _lapic_read(self, _uc: int, offset: int, size: int, _u: int) -> int:
        v = self.running
        if v is None:
            return 0
        with self.apic_lock:
            return v.lapic.read(offset, time.monotonic_ns(), size=size)

    def _lapic_write(self, _uc: int, offset: int, size: int, value: int, _u: int) -> None:
        v = self.running
        if v is None:
            return
        with self.apic_lock:
            ipis = v.lapic.write(offset, value, time.monotonic_ns(), size=size)
            for ipi in ipis:
                self._route_ipi(v, ipi)
            if v.lapic.deliverable() is not None:
                self.lib.uc_sysvm_poll_irq(self.uc)

    def _route_ipi(self, src: TcgVcpu, ipi: L.Ipi) -> None:
        if ipi.is_init_deassert:
            return
        if ipi.shorthand == 1:
            targets = [src]
        elif ipi.shorthand == 2:
            targets = list(self.vcpus)
        elif ipi.shorthand == 3:
            targets = [v for v in self.vcpus if v is not src]
        else:
            targets = [v for v in self.vcpus if v.lapic.matches(ipi.dest_mode, ipi.dest)]
        mode = ipi.delivery_mode
        if mode == 1 and targets:             # lowest priority: the first match will do
            targets = targets[:1]
        for t in targets:
            if mode in (0, 1):
                if t.lapic.accept_fixed(ipi.vector, bool(ipi.trigger)):
                    self._signal(t)
            elif mode == 5:
                if not t.started:        # Xen: nothing to do for a vCPU still in reset
                    continue
                t.started = False
                t.lapic.receive_init()
                t.init_pending = True
                with t.cv:
                    t.cv.notify_all()
            elif mode == 6:
                vec = t.lapic.receive_sipi(ipi.vector)
                if vec is not None:
                    t.started = True
                    t.sipi_vector = vec
                    with t.cv:
                        t.cv.notify_all()
            else:
                log.info("tcg: IPI delivery mode %d to APIC %d not supported; dropped", mode,
                         t.apic_id)

    def set_hypercall_sites(self, linear_addresses: list[int]) -> None:
        """Every VMCALL/VMMCALL traps on this engine; nothing to do."""

    def set_trapped_msrs(self, msrs: list[int]) -> None:
        arr = (ctypes.c_uint32 * len(msrs))(*msrs)
        B.check(self.lib, self.lib.uc_sysvm_set_msr_traps(self.uc, arr, len(msrs)),
                "MSR traps")

    def set_trapped_ports(self, ports: list[int]) -> None:
        ctypes.memset(self._io_bitmap, 0, ctypes.sizeof(self._io_bitmap))
        for p in ports:
            self._io_bitmap[p >> 3] |= 1 << (p & 7)

    def close(self) -> None:
        """Free the CPU. Taken under the engine lock, so no vCPU thread is inside a run."""
        if self._closed:
            return
        with self.exclusive():
            self._closed = True
            for v in self.vcpus:
                v.close()
            self.lib.uc_context_free(self._reset_ctx)
            self.lib.uc_close(self.uc)


class TcgVcpu(EngineVcpu):
    """One vCPU: a saved CPU context, a LAPIC, a CPUID table and the pending-exit bookkeeping."""

    def __init__(self, vm: TcgVm, index: int) -> None:
        self.vm = vm
        self.index = index
        self.apic_id = 2 * index
        lib = vm.lib
        self.ctx = ctypes.c_void_p()
        B.check(lib, lib.uc_context_alloc(vm.uc, ctypes.byref(self.ctx)), "context alloc")
        self.lapic = L.Lapic(self.apic_id, state=L.STATE_RUNNING if index == 0
                             else L.STATE_WAIT_FOR_SIPI)
        self.cv = threading.Condition(vm.apic_lock)
        self._cpuid = (B.SysvmCpuid * 0)()
        self._kicked = False
        self.halted = False
        self.halt_if = True
        self.started = index == 0               # has run since its last reset (INIT is a no-op before)
        self.init_pending = False
        self.sipi_vector: int | None = None
        self._pending: Exit | None = None       # the exit whose completion is due
        self._insn_len = 0                      # length of the instruction that exited
        self._exit_regs: Regs | None = None     # register copy while the vCPU is not running
        self._exit_sregs: SRegs | None = None
        self._regs_dirty = False
        self._fault: int | None = None          # exception vector to raise at next entry
        self._msrs: dict[int, int] = {}
        # a new vCPU starts from the engine's reset state
        with vm.exclusive():
            vm.evict()
            lib.uc_context_restore(vm.uc, vm._reset_ctx)
            lib.uc_context_save(vm.uc, self.ctx)

    # --- state access (the vCPU's own thread; the engine lock makes the context current)
    @contextlib.contextmanager
    def _loaded(self) -> Iterator[None]:
        with self.vm.exclusive():
            if self.vm._closed:
                raise EngineError(f"tcg: vcpu{self.index}: the VM was closed")
            self._load()
            yield

    def _load(self) -> None:
        vm = self.vm
        if vm.current is self:
            return
        lib = vm.lib
        before = vm.paging_key()
        vm.evict()
        lib.uc_context_restore(vm.uc, self.ctx)
        # The TLB caches translations of page tables in (shared) guest memory: when both
        # vCPUs use the same tables and paging modes it stays valid (a flush either vCPU
        # did has reached the shared TLB too). Otherwise it must go.
        if before is None or vm.paging_key() != before:
            lib.uc_ctl(vm.uc, B.CTL_FLUSH_TLB)
        lib.uc_sysvm_set_cpuid(vm.uc, self._cpuid, len(self._cpuid))
        vm.current = self

    # Between runs the vCPU thread works on a copy of the registers taken at the exit
    # (``_exit_regs``/``_exit_sregs``); changes are written back when the vCPU next runs. So
    # handling an exit (read the arguments, complete it) never needs the shared CPU.

    def get_regs(self) -> Regs:
        if self._exit_regs is not None:
            return Regs.from_buffer_copy(self._exit_regs)
        r = Regs()
        with self._loaded():
            self.vm.lib.uc_sysvm_get_regs(self.vm.uc, ctypes.byref(r))
        return r

    def set_regs(self, regs: Regs) -> None:
        if self._exit_regs is not None:
            self._exit_regs = Regs.from_buffer_copy(regs)
            self._regs_dirty = True
            return
        with self._loaded():
            self.vm.lib.uc_sysvm_set_regs(self.vm.uc, ctypes.byref(regs))

    def get_sregs(self) -> SRegs:
        if self._exit_sregs is not None:
            s = SRegs.from_buffer_copy(self._exit_sregs)
        else:
            s = SRegs()
            with self._loaded():
                self.vm.lib.uc_sysvm_get_sregs(self.vm.uc, ctypes.byref(s))
        s.apic_base = LAPIC_BASE | (1 << 11) | ((1 << 8) if self.index == 0 else 0)
        return s

    def set_sregs(self, sregs: SRegs) -> None:
        self._flush_exit_state()
        with self._loaded():
            self.vm.lib.uc_sysvm_set_sregs(self.vm.uc, ctypes.byref(sregs))
        self._exit_sregs = None

    def _flush_exit_state(self) -> None:
        """Write back a changed register copy now (engine lock not held by the caller)."""
        if self._regs_dirty:
            with self._loaded():
                self._write_back(fault=False)

    def _write_back(self, fault: bool = True) -> None:
        """Loaded, lock held: apply the exit-time copy (and, if ``fault``, a pending fault,
        which is raised by the next ``uc_emu_start``: only just before a run); drop the copy."""
        lib = self.vm.lib
        if self._regs_dirty and self._exit_regs is not None:
            lib.uc_sysvm_set_regs(self.vm.uc, ctypes.byref(self._exit_regs))
        if fault and self._fault is not None:
            lib.uc_sysvm_inject_exception(self.vm.uc, self._fault, 1, 0)
            self._fault = None
        self._regs_dirty = False
        self._exit_regs = None
        self._exit_sregs = None

    def get_msr(self, index: int) -> int:
        if index == _IA32_TSC:
            return self.get_tsc()
        return self._msrs.get(index, 0)

    def set_msr(self, index: int, value: int) -> None:
        self._msrs[index] = value

    def set_cpuid(self, entries: list[CpuidEntry]) -> None:
        t = (B.SysvmCpuid * len(entries))()
        for i, e in enumerate(entries):
            t[i] = B.SysvmCpuid(e.function, e.index, 1 if e.significant_index else 0,
                                e.eax, e.ebx, e.ecx, e.edx, 0)
        self._cpuid = t
        with self._loaded():
            self.vm.lib.uc_sysvm_set_cpuid(self.vm.uc, t, len(t))

    def get_tsc(self) -> int:
        from pyxen.core.clock import rdtsc
        return rdtsc()

    def tsc_khz(self) -> int:
        return _tsc_khz()

    # --- running
    def run(self) -> Exit:
        vm = self.vm
        while True:
            action = None
            with vm.apic_lock:
                if self._kicked:
                    self._kicked = False
                    return Exit(ExitKind.INTERRUPTED)
                if self.init_pending:
                    self.init_pending = False
                    self.halted = False
                    action = ("init", 0)
                elif self.sipi_vector is not None:
                    vec, self.sipi_vector = self.sipi_vector, None
                    self.halted = False
                    action = ("sipi", vec)
                elif self.lapic.state == L.STATE_WAIT_FOR_SIPI:
                    self.cv.wait()
                    continue
                elif self.halted:
                    if not (self.halt_if and self.lapic.deliverable() is not None):
                        self.cv.wait(self._halt_timeout())
                        self._check_lapic_timer()
                        continue
                    self.halted = False
            if action is not None:       # engine lock is taken without apic_lock held
                if action[0] == "init":
                    self._reset_cpu()
                else:
                    self._start_at_sipi(action[1])
                continue
            ex = self._run_once()
            if ex is not None:
                return ex

    def _halt_timeout(self) -> float | None:
        d = self.lapic.timer_deadline()
        if d is None:
            return None
        return max(0.0, (d - time.monotonic_ns()) / 1e9)

    def _check_lapic_timer(self) -> None:
        d = self.lapic.timer_deadline()
        if d is not None:
            now = time.monotonic_ns()
            if now >= d:
                self.lapic.timer_expired(now)

    def _run_once(self) -> Exit | None:
        vm = self.vm
        lib = vm.lib
        vm.lock.acquire(self)
        try:
            if vm._closed:
                return Exit(ExitKind.FAILED, reason="the VM was closed")
            self._load()
            self._write_back()
            with vm.apic_lock:
                if self._kicked:                 # a kick that found us not yet running
                    return None
                self._check_lapic_timer()
                lib.uc_sysvm_clear_irq(vm.uc)
                if self.lapic.deliverable() is not None:
                    lib.uc_sysvm_poll_irq(vm.uc)
                vm.running = self
            r = Regs()
            lib.uc_sysvm_get_regs(vm.uc, ctypes.byref(r))
            err = lib.uc_emu_start(vm.uc, r.rip, 0, 0, 0)
            with vm.apic_lock:
                vm.running = None
            self._capture()
            e = vm.exit
            kind = e.kind
            regs = self._exit_regs
            assert regs is not None
            if err != B.UC_ERR_OK and kind == B.EXIT_NONE:
                return Exit(ExitKind.FAILED, reason=f"{lib.uc_strerror(err).decode()} "
                            f"(rip 0x{regs.rip:x})")
            if kind == B.EXIT_NONE:
                return None                       # stopped: kick, preemption or exclusive()
            if kind == B.EXIT_HALT:
                self.halt_if = bool(regs.rflags & 0x200)
                self.halted = True
                return None
            if kind == B.EXIT_IO:
                data = (e.value & ((1 << (8 * e.size)) - 1)).to_bytes(e.size, "little") \
                    if e.is_write else b""
                ex = Exit(ExitKind.IO, port=e.index, size=e.size, is_write=bool(e.is_write),
                          data=data)
                if e.is_write and e.index == Engine.HYPERCALL_PORT and e.size == 4:
                    ex = Exit(ExitKind.HYPERCALL, via="page")
                ex_len = self._io_insn_len()
                if ex_len is None:
                    return Exit(ExitKind.FAILED, reason=f"unsupported I/O instruction at "
                                f"rip 0x{regs.rip:x} (port 0x{e.index:x})")
                self._insn_len = ex_len
                if e.is_write and ex.kind is ExitKind.IO:
                    # performed once the VMM has seen it: step over it at the next entry
                    # (nothing left to complete)
                    regs.rip += ex_len
                    self._regs_dirty = True
                    self._pending = None
                else:
                    self._pending = ex
                return ex
            if kind in (B.EXIT_MSR_READ, B.EXIT_MSR_WRITE):
                is_w = kind == B.EXIT_MSR_WRITE
                ex = Exit(ExitKind.MSR_WRITE if is_w else ExitKind.MSR_READ, msr=e.index,
                          value=e.value if is_w else 0)
                self._insn_len = 2
                self._pending = ex
                return ex
            if kind == B.EXIT_HYPERCALL:
                self._insn_len = 3
                ex = Exit(ExitKind.HYPERCALL, via="insn")
                self._pending = ex
                return ex
            if kind == B.EXIT_SHUTDOWN:
                return Exit(ExitKind.SHUTDOWN, reason="triple fault")
            return Exit(ExitKind.FAILED, reason=f"unknown engine exit {kind}")
        finally:
            vm.lock.release()

    def _capture(self) -> None:
        """Loaded, lock held, just after a run: take the register copies exits work on."""
        lib = self.vm.lib
        r, s = Regs(), SRegs()
        lib.uc_sysvm_get_regs(self.vm.uc, ctypes.byref(r))
        lib.uc_sysvm_get_sregs(self.vm.uc, ctypes.byref(s))
        self._exit_regs, self._exit_sregs, self._regs_dirty = r, s, False

    def _io_insn_len(self) -> int | None:
        """Length of the IN/OUT at RIP (prefixes + opcode [+ imm8]); None for string I/O.
        Works on the exit-time register copies (after :meth:`_capture`)."""
        r, s = self._exit_regs, self._exit_sregs
        assert r is not None and s is not None
        code = self._read_code(s, (r.rip + s.cs.base) & 0xFFFFFFFFFFFFFFFF, 15)
        n = 0
        while n < len(code) and (code[n] in (0x66, 0x67, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26,
                                             0x64, 0x65) or 0x40 <= code[n] <= 0x4F):
            n += 1
        if n >= len(code):
            return None
        op = code[n]
        if op in (0xE4, 0xE5, 0xE6, 0xE7):
            return n + 2
        if op in (0xEC, 0xED, 0xEE, 0xEF):
            return n + 1
        return None

    def _read_code(self, s: SRegs, linear: int, n: int) -> bytes:
        """Up to ``n`` instruction bytes at ``linear`` (stops at an unmapped byte)."""
        from pyxen.arch.x86.paging import PageFault, translate
        vm = self.vm

        def read_u64(gpa: int) -> int:
            b = vm.read_physical(gpa, 8)
            if b is None:
                raise PageFault(f"page table at 0x{gpa:x} outside memory")
            return int.from_bytes(b, "little")
        out = bytearray()
        while len(out) < n:
            addr = linear + len(out)
            try:                                  # one walk per page, not per byte
                gpa = translate(read_u64, s.cr0, s.cr3, s.cr4, s.efer, addr)
            except PageFault:
                break
            chunk = min(n - len(out), 0x1000 - (addr & 0xFFF))
            b = vm.read_physical(gpa, chunk)
            if b is None:
                break
            out += b
        return bytes(out)

    # --- completions
    def _complete(self, fn) -> None:  # type: ignore[no-untyped-def]
        if self._pending is None:
            raise EngineError("tcg: completion without a pending exit")
        self._pending = None
        r = self.get_regs()
        if fn(r) is not False:
            r.rip += self._insn_len
        self.set_regs(r)

    def complete_hypercall(self, result: int) -> None:

        def f(r: Regs) -> None:
            r.rax = result & 0xFFFFFFFFFFFFFFFF
        self._complete(f)

    def complete_io_read(self, data: bytes) -> None:
        def f(r: Regs) -> None:
            v = int.from_bytes(data, "little")
            if len(data) == 4:
                r.rax = v
            elif len(data) == 2:
                r.rax = (r.rax & ~0xFFFF) | v
            else:
                r.rax = (r.rax & ~0xFF) | (v & 0xFF)
        self._complete(f)

    def complete_mmio_read(self, data: bytes) -> None:
        raise EngineError("tcg: the software engine completes MMIO itself")

    def complete_msr_read(self, value: int, fault: bool = False) -> None:
        def f(r: Regs) -> bool:
            if fault:
                self._fault = 13                  # #GP(0) at the next entry
                return False
            r.rax = value & 0xFFFFFFFF
            r.rdx = (value >> 32) & 0xFFFFFFFF
            return True
        self._complete(f)

    def complete_msr_write(self, fault: bool = False) -> None:
        def f(_r: Regs) -> bool:
            if fault:
                self._fault = 13                  # #GP(0) at the next entry
                return False
            return True
        self._complete(f)

    # --- save / restore
    def save_state(self) -> bytes:
        """This vCPU's state as a blob for :meth:`load_state` (any thread; the vCPU's own
        thread must be outside :meth:`run`, its last exit completed).

        Layout (little-endian): magic ``PYXTCGV1``, u16 version, u16 format length, u32
        context length, u32 metadata length, then the engine's :attr:`TcgEngine.state_format`
        (ASCII), the CPU context (QEMU's CPUX86State prefix as ``uc_context_save`` keeps it:
        registers, segments, control/debug registers, FPU/SSE, the MSRs QEMU models, with
        this process's pointers zeroed) and JSON metadata: the LAPIC (armed timer start
        relative to the save, in ns), halted/halt_if/started/init_pending/sipi_vector, the
        VMM-level MSRs, an exception still to be raised at the next entry, and a hypercall
        exit not yet completed (a guest parked in SCHEDOP_shutdown(suspend): whoever loads
        the blob completes it). The exit-time register copy is folded into the context
        first. Raises EngineError if another exit is still pending or the VM is closed."""
        vm = self.vm
        lib = vm.lib
        size = lib.uc_sysvm_context_data_size(vm.uc)
        data = (ctypes.c_uint8 * size)()
        with vm.exclusive():
            if vm._closed:
                raise EngineError(f"tcg: vcpu{self.index}: the VM was closed")
            pending = self._pending
            if pending is not None and pending.kind is not ExitKind.HYPERCALL:
                raise EngineError(f"tcg: vcpu{self.index}: cannot save with a "
                                  f"{pending.kind.value} exit not completed")
            if self._regs_dirty:
                self._load()
                self._write_back(fault=False)      # a pending fault is kept in the metadata
            if vm.current is self:
                lib.uc_context_save(vm.uc, self.ctx)
            err = lib.uc_sysvm_context_export(vm.uc, self.ctx, data, size)
            if err != B.UC_ERR_OK:
                raise EngineError(f"tcg: vcpu{self.index}: exporting the CPU context: "
                                  f"{lib.uc_strerror(err).decode()}")
            with vm.apic_lock:
                now = time.monotonic_ns()
                lapic = self.lapic.to_dict()
                if lapic["timer_start_ns"] is not None:
                    lapic["timer_start_ns"] -= now     # relative: rebased at load
                meta = {
                    "lapic": lapic, "halted": self.halted, "halt_if": self.halt_if,
                    "started": self.started, "init_pending": self.init_pending,
                    "sipi_vector": self.sipi_vector, "fault": self._fault,
                    "msrs": sorted([k, v] for k, v in self._msrs.items()),
                }
                if pending is not None:          # a suspended guest: completed after load
                    meta["pending_hypercall"] = {"via": pending.via, "len": self._insn_len}
        fmt = vm.engine.state_format.encode()
        meta_b = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
        return (_STATE_HEADER.pack(_STATE_MAGIC, _STATE_VERSION, len(fmt), size, len(meta_b))
                + fmt + bytes(data) + meta_b)

    def load_state(self, blob: bytes) -> None:
        """Replace this vCPU's state with a :meth:`save_state` blob (any thread; before the
        vCPU first runs or while its thread is outside :meth:`run`). The LAPIC timer keeps
        its remaining count: its start is rebased on this host's CLOCK_MONOTONIC. Raises
        EngineError, leaving the vCPU unchanged, for a blob of another format or engine
        build, a truncated or corrupted one, or one for another APIC ID."""
        vm = self.vm
        lib = vm.lib
        blob = bytes(blob)
        what = f"tcg: vcpu{self.index}: cannot load the saved state"
        hlen = _STATE_HEADER.size
        if len(blob) < hlen:
            raise EngineError(f"{what}: {len(blob)} bytes is too short")
        magic, version, flen, clen, mlen = _STATE_HEADER.unpack_from(blob)
        if magic != _STATE_MAGIC:
            raise EngineError(f"{what}: not a tcg vCPU state (magic {magic!r})")
        if version != _STATE_VERSION:
            raise EngineError(f"{what}: version {version}, this engine reads {_STATE_VERSION}")
        if len(blob) != hlen + flen + clen + mlen:
            raise EngineError(f"{what}: {len(blob)} bytes, the header says "
                              f"{hlen + flen + clen + mlen}")
        fmt = blob[hlen:hlen + flen].decode("ascii", "replace")
        if fmt != vm.engine.state_format:
            raise EngineError(f"{what}: saved by engine {fmt!r}, this is "
                              f"{vm.engine.state_format!r}")
        size = lib.uc_sysvm_context_data_size(vm.uc)
        if clen != size:
            raise EngineError(f"{what}: CPU context of {clen} bytes, expected {size}")
        ctx_data = blob[hlen + flen:hlen + flen + clen]
        try:
            st = _parse_meta(blob[hlen + flen + clen:])
            st["lapic"]["timer_start_ns"] = (None if st["lapic"]["timer_start_ns"] is None
                                             else st["lapic"]["timer_start_ns"]
                                             + time.monotonic_ns())
            lapic = L.Lapic.from_dict(st["lapic"])
        except (ValueError, TypeError, KeyError, RecursionError) as e:
            raise EngineError(f"{what}: {e}") from None
        if lapic.apic_id != self.apic_id:
            raise EngineError(f"{what}: it is APIC ID {lapic.apic_id}'s, this vCPU is "
                              f"{self.apic_id}")
        buf = (ctypes.c_uint8 * size).from_buffer_copy(ctx_data)
        with vm.exclusive():
            if vm._closed:
                raise EngineError(f"tcg: vcpu{self.index}: the VM was closed")
            err = lib.uc_sysvm_context_import(vm.uc, self.ctx, buf, size)
            if err != B.UC_ERR_OK:
                raise EngineError(f"{what}: the CPU context is invalid")
            if vm.current is self:
                vm.current = None             # the CPU holds the old state: reload at next use
            ph = st["pending_hypercall"]
            self._pending = None if ph is None else Exit(ExitKind.HYPERCALL, via=ph["via"])
            self._insn_len = 0 if ph is None else ph["len"]
            self._exit_regs = self._exit_sregs = None
            self._regs_dirty = False
            self._fault = st["fault"]
            with vm.apic_lock:
                self.lapic = lapic
                self.halted, self.halt_if = st["halted"], st["halt_if"]
                self.started, self.init_pending = st["started"], st["init_pending"]
                self.sipi_vector = st["sipi_vector"]
                self._msrs = dict(st["msrs"])
                self.cv.notify_all()

    # --- INIT/SIPI
    def _reset_cpu(self) -> None:
        """INIT: back to the reset state, waiting for SIPI (vCPU thread, no locks held)."""
        vm = self.vm
        with vm.exclusive():
            if vm.current is self:
                vm.current = None            # its state is being replaced, not kept
            vm.evict()
            vm.lib.uc_context_restore(vm.uc, vm._reset_ctx)
            vm.lib.uc_context_save(vm.uc, self.ctx)
            self._pending = None
            self._exit_regs = self._exit_sregs = None
            self._regs_dirty, self._fault = False, None

    def _start_at_sipi(self, vector: int) -> None:
        """SIPI: real mode at CS = vector << 8, IP = 0 (Intel SDM 8.4.4.1)."""
        from pyxen.arch.x86.cpu import real_mode_state
        s = self.get_sregs()
        regs = real_mode_state(s, vector)
        self.set_sregs(s)
        self.set_regs(regs)

    def make_runnable(self) -> None:
        with self.vm.apic_lock:
            self.lapic.state = L.STATE_RUNNING
            self.started = True
            self.sipi_vector = None
            self.halted = False

    def kick(self) -> None:
        vm = self.vm
        with vm.apic_lock:
            self._kicked = True
            if vm.running is self:
                vm.lib.uc_emu_stop(vm.uc)
            self.cv.notify_all()

    def close(self) -> None:
        if self.ctx:
            self.vm.lib.uc_context_free(self.ctx)
            self.ctx = ctypes.c_void_p()
