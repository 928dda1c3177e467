"""A domain: guest memory, vCPU threads, the run-state machine and exit dispatch.

This layer knows nothing about Xen. Upper layers plug in through :class:`ExitHandlers`
(hypercalls, port I/O, MSRs) and observe state changes through :meth:`Domain.wait_for`.

Run states (Xen's, as ``xl list`` shows them): ``running``, ``paused``, ``shutdown`` (with a
reason: poweroff, reboot, suspend, crash, watchdog, soft_reset) and ``dying`` (destroyed).

Threads: one per vCPU (engine ``run`` releases the GIL). :meth:`Domain.shutdown`,
:meth:`pause`, :meth:`unpause` and :meth:`destroy` may be called from any thread.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Protocol

from pyxen.core.memory import GuestMemory
from pyxen.engine.base import EngineVcpu, EngineVm, Exit, ExitKind

log = logging.getLogger("pyxen.domain")

#: A hypercall handler's return value that means "do not resume this vCPU now".
NO_RETURN = object()


class ExitHandlers(Protocol):
    """What an upper layer supplies to give the guest a platform."""

    def hypercall(self, vcpu: Vcpu) -> object:
        """Handle the pending hypercall; return the result (int) or :data:`NO_RETURN`."""

    def io_write(self, vcpu: Vcpu, port: int, data: bytes) -> None: ...

    def io_read(self, vcpu: Vcpu, port: int, size: int) -> bytes: ...

    def msr_write(self, vcpu: Vcpu, msr: int, value: int) -> bool:
        """Return False to raise #GP in the guest."""

    def msr_read(self, vcpu: Vcpu, msr: int) -> int | None:
        """Return None to raise #GP in the guest."""


@dataclass
class RunState:
    state: str = "paused"          # running | paused | shutdown | dying
    reason: str = ""               # shutdown reason
    detail: str = ""               # e.g. why the domain crashed


class Vcpu:
    """One vCPU: the engine vCPU plus the thread that runs it and its online state."""

    def __init__(self, domain: Domain, index: int, engine_vcpu: EngineVcpu) -> None:
        self.domain = domain
        self.index = index
        self.apic_id = 2 * index
        self.ev = engine_vcpu
        self.online = False          # Xen: !VPF_down
        #: the thread may wait inside the engine for INIT/SIPI (an AP the guest starts itself)
        self.sipi_wait = False
        self.initialised = False     # has a register state to start from
        self.thread: threading.Thread | None = None
        self.exits = 0
        self.hypercalls = 0
        self.cpu_time_ns = 0
        #: hypercall result to deliver when a NO_RETURN hypercall is resumed (e.g. suspend)
        self.resume_result: int | None = None
        self.parked_in_hypercall = False
        #: inside SCHEDOP_block / SCHEDOP_poll, waiting for an event
        self.in_block = False
        #: run once on the vCPU thread before it next enters the guest (e.g. load a context)
        self.setup: Callable[[Vcpu], None] | None = None

    @property
    def blocked(self) -> bool:
        """Waiting for an event (blocking hypercall or HLT); advisory, for state letters."""
        return self.in_block or self.ev.halted

    def start(self) -> None:
        """Bring the vCPU up (Xen: clear VPF_down) and make sure its thread runs."""
        self.online = True
        self.sipi_wait = False
        self._ensure_thread()

    def start_waiting_for_sipi(self) -> None:
        """Run the thread in the engine's wait-for-SIPI state (the guest starts the AP)."""
        self.sipi_wait = True
        self._ensure_thread()

    def _ensure_thread(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._main, name=f"vcpu{self.index}",
                                           daemon=True)
            self.thread.start()
        else:
            self.domain.notify()
            self.ev.kick()

    # --- the vCPU thread
    def _main(self) -> None:
        d = self.domain
        try:
            while True:
                if not d.wait_runnable(self):
                    return
                if self.parked_in_hypercall:
                    if self.resume_result is None:
                        d.wait_until(lambda: self.resume_result is not None or d.runstate.state == "dying")
                        if d.runstate.state == "dying":
                            return
                        continue
                    self.ev.complete_hypercall(self.resume_result)
                    self.parked_in_hypercall = False
                    self.resume_result = None
                if self.setup is not None:
                    setup, self.setup = self.setup, None
                    setup(self)
                t0 = time.thread_time_ns()
                ex = self.ev.run()
                self.cpu_time_ns += time.thread_time_ns() - t0
                self.exits += 1
                self._dispatch(ex)
        except Exception as e:  # a VMM bug: crash this domain only, never the process
            log.error("d%d vcpu%d: internal error: %s\n%s", d.domid, self.index, e,
                      traceback.format_exc())
            d.shutdown("crash", detail=f"VMM internal error on vcpu{self.index}: {e}")

    def _dispatch(self, ex: Exit) -> None:
        d = self.domain
        h = d.handlers
        k = ex.kind
        if k is ExitKind.HYPERCALL:
            self.hypercalls += 1
            result = h.hypercall(self)
            if result is NO_RETURN:
                self.parked_in_hypercall = True
            else:
                self.ev.complete_hypercall(result)  # type: ignore[arg-type]
        elif k is ExitKind.IO:
            if ex.is_write:
                h.io_write(self, ex.port, ex.data)
            else:
                self.ev.complete_io_read(h.io_read(self, ex.port, ex.size))
        elif k is ExitKind.MSR_WRITE:
            self.ev.complete_msr_write(fault=not h.msr_write(self, ex.msr, ex.value))
        elif k is ExitKind.MSR_READ:
            v = h.msr_read(self, ex.msr)
            self.ev.complete_msr_read(v or 0, fault=v is None)
        elif k is ExitKind.MMIO:
            if not ex.is_write:
                self.ev.complete_mmio_read(b"\xff" * ex.size)
        elif k is ExitKind.INTERRUPTED or k is ExitKind.HALT:
            pass
        elif k is ExitKind.SHUTDOWN:
            d.shutdown("crash", detail=f"vcpu{self.index}: {ex.reason}")
        elif k is ExitKind.FAILED:
            rip = self.ev.get_regs().rip
            d.shutdown("crash", detail=f"vcpu{self.index} at rip 0x{rip:x}: {ex.reason}")


class Domain:
    """An isolated guest. Built by the VMM layer, which adds memory, vCPUs and handlers."""

    def __init__(self, domid: int, name: str, vm: EngineVm, memory: GuestMemory) -> None:
        self.domid = domid
        self.name = name
        self.vm = vm
        self.memory = memory
        self.vcpus: list[Vcpu] = []
        self.handlers: ExitHandlers = None  # type: ignore[assignment]
        self.runstate = RunState()
        self.cv = threading.Condition()
        self.created_ns = time.monotonic_ns()
        self.first_entry_ns: int | None = None
        self.on_state_change: list[Callable[[RunState], None]] = []
        #: indices of vCPUs whose thread waits in :meth:`wait_runnable` (under ``cv``)
        self.parked: set[int] = set()

    # --- vCPUs
    def add_vcpu(self, index: int) -> Vcpu:
        v = Vcpu(self, index, self.vm.create_vcpu(index))
        self.vcpus.append(v)
        return v

    def wait_runnable(self, vcpu: Vcpu) -> bool:
        """Block the vCPU thread until it may run; False when the domain is gone. While it
        waits here the vCPU is *parked* (see :meth:`quiesce`)."""
        with self.cv:
            try:
                while True:
                    st = self.runstate.state
                    if st == "dying":
                        return False
                    if st == "running" and (vcpu.online or vcpu.sipi_wait):
                        if self.first_entry_ns is None:
                            self.first_entry_ns = time.monotonic_ns()
                        return True
                    if vcpu.index not in self.parked:
                        self.parked.add(vcpu.index)
                        self.cv.notify_all()
                    self.cv.wait()
            finally:
                self.parked.discard(vcpu.index)

    def quiesce(self, timeout: float = 5.0) -> bool:
        """Pause the domain and wait until every vCPU thread is parked outside the engine,
        its last exit completed (a vCPU inside a blocking hypercall returns from it first).
        Then vCPU state may be read from any thread (save, migration). Returns False if a
        vCPU did not park within ``timeout`` seconds (the domain stays paused). Any thread
        but a vCPU's own."""
        self.pause()
        return self.wait_until(lambda: self.runstate.state != "running" and all(
            v.thread is None or not v.thread.is_alive() or v.index in self.parked
            for v in self.vcpus), timeout)

    def wait_until(self, predicate: Callable[[], bool], timeout: float | None = None) -> bool:
        """Wait on the domain's condition (notified on every event/state change)."""
        with self.cv:
            return self.cv.wait_for(predicate, timeout)

    def notify(self) -> None:
        with self.cv:
            self.cv.notify_all()

    def kick_all(self) -> None:
        for v in self.vcpus:
            v.ev.kick()

    # --- state machine
    def _set_state(self, state: str, reason: str = "", detail: str = "") -> None:
        with self.cv:
            self.runstate = RunState(state, reason, detail)
            self.cv.notify_all()
        self.kick_all()
        for cb in list(self.on_state_change):
            cb(self.runstate)

    def unpause(self) -> None:
        if self.runstate.state == "paused":
            self._set_state("running")

    def pause(self) -> None:
        if self.runstate.state == "running":
            self._set_state("paused")

    def shutdown(self, reason: str, detail: str = "") -> None:
        """The domain shut down (guest request, crash). First reason wins, as in Xen."""
        with self.cv:
            if self.runstate.state in ("shutdown", "dying"):
                return
        log.info("d%d (%s): shutdown, reason %s%s", self.domid, self.name, reason,
                 f" ({detail})" if detail else "")
        self._set_state("shutdown", reason, detail)

    def resume_from_suspend(self, result: int) -> None:
        """Continue a domain that shut down with reason suspend; its SCHEDOP_shutdown returns ``result``."""
        with self.cv:
            if self.runstate.state != "shutdown" or self.runstate.reason != "suspend":
                raise RuntimeError(f"domain {self.name} is not suspended")
            for v in self.vcpus:
                if v.parked_in_hypercall:
                    v.resume_result = result
        self._set_state("running")

    def destroy(self) -> None:
        self._set_state("dying")
        for v in self.vcpus:
            if v.thread is not None and v.thread is not threading.current_thread():
                v.thread.join(timeout=5)

    def wait_for_shutdown(self, timeout: float | None = None) -> RunState | None:
        if self.wait_until(lambda: self.runstate.state in ("shutdown", "dying"), timeout):
            return self.runstate
        return None
