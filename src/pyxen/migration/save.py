"""The sending side of save and live migration: one domain, written as a record stream.

:class:`DomainSaver` runs in the domain's VMM process (it owns guest memory and the vCPUs):

* :meth:`DomainSaver.precopy` -- live rounds: every guest frame once, then the frames dirtied
  since the previous round (the engine's dirty log plus every page pyxen itself wrote), until
  the dirty set is small, stops shrinking, or a round/volume bound is hit;
* :meth:`DomainSaver.final` -- quiesce the vCPUs, stop the backends, freeze the guest's
  xenstore connection (export), and send the last dirty frames, the hypervisor pages, each
  vCPU's engine state, the Xen state, the xenstore state, the devices and END;
* :meth:`DomainSaver.abort` -- undo :meth:`final`'s side effects (thaw, backends re-attach,
  unpause): the domain carries on here, nothing lost.

The saver writes to a :class:`Sink` (a file or a connected socket). Progress is reported to
an optional callback as dicts (``phase``, ``round``, ``pages``, ``dirty``, ``bytes``,
``rate_mib_s``, ``eta_s``). Times are ``time.monotonic()`` based; sizes in bytes.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from pyxen.backends.disk import (WRITE_LOG_CHUNK, fetch_write_log, start_write_log,
                                 stop_write_log)
from pyxen.core.memory import PAGE, GuestMemory
from pyxen.errors import PyxenError
from pyxen.migration import stream as S

log = logging.getLogger("pyxen.migration")

#: pre-copy ends when a round's dirty set is at most this many frames
STOP_PAGES = 256
#: ... or after this many rounds
MAX_ROUNDS = 30
#: ... or when this many rounds in a row did not shrink the dirty set
NO_PROGRESS_ROUNDS = 3
#: ... or when this many times the domain's memory has been sent
MAX_VOLUME = 3.0
_IOV_MAX = 1024
_DISK_PIECE = 1 << 20          # bytes per DISK_DATA record
MODES = ("transparent", "suspend")
#: the parts of a domain's xenstore home its guest writes (libxl gives it these)
GUEST_OWNED = ("control", "data", "attr", "drivers", "feature", "error")
SUSPEND_TIMEOUT = 30.0         # s a guest has to honour control/shutdown = suspend


class MigrationError(PyxenError):
    """A save or migration failed; the message says at which step and why."""


class Sink(Protocol):
    def write(self, parts: list[bytes | memoryview]) -> None: ...


class FdSink:
    """Writes buffers to a blocking file descriptor (file, pipe or socket) with writev;
    counts :attr:`bytes`. OSError propagates (a broken connection, a full disk)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.bytes = 0

    def write(self, parts: list[bytes | memoryview]) -> None:
        i = 0
        parts = [p for p in parts if len(p)]
        while i < len(parts):
            batch = parts[i:i + _IOV_MAX]
            n = os.writev(self.fd, batch)
            self.bytes += n
            for p in batch:                      # skip what was written, keep the rest
                if n >= len(p):
                    n -= len(p)
                    i += 1
                else:
                    parts[i] = memoryview(p)[n:]
                    break


@dataclass
class SaveStats:
    """What a save or migration did. ``pause_ms``: from quiesce to the end of the stream
    (the caller extends it to the target's resume for a migration)."""

    rounds: int = 0
    pages_sent: int = 0
    zero_pages: int = 0
    bytes_sent: int = 0
    started: float = field(default_factory=time.monotonic)
    paused_at: float | None = None
    stream_done_at: float | None = None
    dirty_history: list[int] = field(default_factory=list)
    #: (step, monotonic time at its end) of the paused part, for the pause breakdown
    steps: list[tuple[str, float]] = field(default_factory=list)

    def step(self, name: str) -> None:
        self.steps.append((name, time.monotonic()))

    def breakdown_ms(self) -> dict[str, float]:
        out, t = {}, self.paused_at
        for name, end in self.steps:
            if t is not None:
                out[name] = round((end - t) * 1000, 2)
            t = end
        return out

    def to_dict(self) -> dict:
        return {"rounds": self.rounds, "pages_sent": self.pages_sent,
                "zero_pages": self.zero_pages, "bytes_sent": self.bytes_sent,
                "dirty_history": self.dirty_history, "pause_steps_ms": self.breakdown_ms()}


class XenstoreHooks(Protocol):
    def export(self, domid: int, roots: list[str]) -> dict: ...
    def thaw(self, domid: int) -> None: ...
    def read(self, domid: int, key: str) -> bytes | None: ...
    def write(self, domid: int, key: str, value: str) -> None: ...


class DomainSaver:
    """Streams one built domain (``vmm``, a :class:`pyxen.vmm.builder.Vmm`) to ``sink``.

    ``config``: the DOMAIN_CONFIG record (JSON object). ``xenstore``: export/thaw of the
    guest's xenstore state (the standalone xenstored). Call from a thread that is not one of
    the domain's vCPUs; one saver per domain at a time.
    """

    def __init__(self, vmm, config: dict, sink: Sink, xenstore: XenstoreHooks, *,  # type: ignore[no-untyped-def]
                 progress: Callable[[dict], None] | None = None,
                 copy_disks: list[tuple[int, str]] | None = None,
                 mode: str = "transparent") -> None:
        self.vmm = vmm
        self.mem: GuestMemory = vmm.domain.memory
        self.config = config
        self.sink = sink
        self.xenstore = xenstore
        self.progress = progress
        self.stats = SaveStats()
        self._was_running = False
        self._quiesced = False
        self._devices_suspended = False
        self._frozen = False
        self._timers_held = False
        self._carry: set[int] = set()
        #: (devid, image path) of disks sent in the stream (hosts without shared storage)
        self.copy_disks = copy_disks or []
        if mode not in MODES:
            raise MigrationError(f"unknown mode {mode!r} (one of {', '.join(MODES)})")
        #: "transparent" (the VMM stops the guest) or "suspend" (the guest suspends itself)
        self.mode = mode
        self._suspended = False
        self._frames = self.mem.guest_frames()
        self.total_pages = sum(n for _b, n in self._frames)

    # ----------------------------------------------------------------- stream pieces
    def _send(self, parts: list[bytes | memoryview]) -> None:
        self.sink.write(parts)
        self.stats.bytes_sent += sum(len(p) for p in parts)

    def send_header(self) -> None:
        self._send([S.stream_headers(), S.encode_json(S.DOMAIN_CONFIG, self.config)])

    def _all_frames(self) -> list[int]:
        return [pfn for base, n in self._frames for pfn in range(base, base + n)]

    def send_pages(self, pfns: list[int], *, snapshot: bool) -> None:
        """PAGE_DATA for ``pfns`` (sorted). ``snapshot``: copy each page before it is
        checksummed (the guest is running and may change it under us)."""
        mem = self.mem
        cache: tuple[int, int, memoryview] | None = None
        for i in range(0, len(pfns), S.MAX_PAGES_PER_RECORD):
            entries: list[tuple[int, bytes | memoryview | None]] = []
            for pfn in pfns[i:i + S.MAX_PAGES_PER_RECORD]:
                gpa = pfn * PAGE
                if cache is None or not cache[0] <= gpa < cache[1]:
                    r = mem.find(gpa)
                    if r is None or r.kind == "xenpage":
                        continue                     # not guest memory (any more)
                    cache = (r.gpa, r.end, memoryview(r.mm))
                off = gpa - cache[0]
                view = cache[2][off:off + PAGE]
                if S.is_zero_page(view):
                    entries.append((pfn, None))
                    self.stats.zero_pages += 1
                else:
                    entries.append((pfn, bytes(view) if snapshot else view))
            if entries:
                self._send(S.encode_page_data(entries))
                self.stats.pages_sent += len(entries)

    def _report(self, phase: str, **kw: object) -> None:
        if self.progress is not None:
            elapsed = max(1e-6, time.monotonic() - self.stats.started)
            rate = self.stats.bytes_sent / elapsed / (1 << 20)
            self.progress({"phase": phase, "round": self.stats.rounds,
                           "pages": self.stats.pages_sent, "total_pages": self.total_pages,
                           "bytes": self.stats.bytes_sent, "rate_mib_s": round(rate, 1),
                           **kw})

    # ----------------------------------------------------------------- disk copy
    def send_disks(self) -> None:
        """Start the disks' write logs, then send every allocated, non-zero extent."""
        for devid, path in self.copy_disks:
            start_write_log(path)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                size = os.fstat(fd).st_size
                for off, length in _data_extents(fd, size):
                    self._send_disk_range(fd, devid, off, length)
            finally:
                os.close(fd)
            self._report("disks", devid=devid)

    def send_disk_changes(self) -> int:
        """Send the chunks the guest wrote since the last call; returns how many."""
        n = 0
        for devid, path in self.copy_disks:
            chunks = sorted(fetch_write_log(path))
            if not chunks:
                continue
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                size = os.fstat(fd).st_size
                for c in chunks:
                    off = c * WRITE_LOG_CHUNK
                    self._send_disk_range(fd, devid, off, min(WRITE_LOG_CHUNK, size - off),
                                          zeroes_too=True)
            finally:
                os.close(fd)
            n += len(chunks)
        return n

    def _send_disk_range(self, fd: int, devid: int, off: int, length: int,
                         zeroes_too: bool = False) -> None:
        end = off + length
        while off < end:
            n = min(_DISK_PIECE, end - off)
            data = os.pread(fd, n, off)
            if len(data) < n:
                data += bytes(n - len(data))
            if data.count(0) == n:
                if zeroes_too:
                    self._send([S.encode_disk_data(devid, off, None, n)])
            else:
                self._send([S.encode_disk_data(devid, off, data)])
            off += n

    def _stop_disk_logs(self) -> None:
        for _devid, path in self.copy_disks:
            stop_write_log(path)

    # ----------------------------------------------------------------- live rounds
    def precopy(self, *, max_rounds: int = MAX_ROUNDS, stop_pages: int = STOP_PAGES) -> None:
        """Iterative pre-copy while the guest runs. Returns when the next round would be
        small enough (or no better) to send with the domain paused."""
        if self.copy_disks:
            self.send_disks()
        self.mem.set_dirty_logging(True)
        pfns = self._all_frames()
        best, stale = len(pfns), 0
        while True:
            self.stats.rounds += 1
            t0 = time.monotonic()
            self.send_pages(pfns, snapshot=True)
            if self.copy_disks:
                self.send_disk_changes()
            dt = max(1e-6, time.monotonic() - t0)
            dirty = sorted(self.mem.fetch_dirty())
            self.stats.dirty_history.append(len(dirty))
            rate_pages = len(pfns) / dt
            self._report("precopy", dirty=len(dirty),
                         eta_s=round(len(dirty) / rate_pages, 3) if rate_pages else None)
            if len(dirty) < best:
                best, stale = len(dirty), 0
            else:
                stale += 1
            volume = self.stats.pages_sent / max(1, self.total_pages)
            if (len(dirty) <= stop_pages or self.stats.rounds >= max_rounds
                    or stale >= NO_PROGRESS_ROUNDS or volume >= MAX_VOLUME):
                self._carry = set(dirty)         # fetched (log cleared) but not yet sent
                return
            pfns = dirty

    # ----------------------------------------------------------------- the paused part
    def quiesce(self) -> None:
        """Stop the guest -- park its vCPUs (transparent) or have it suspend itself
        (suspend) -- then stop the backends. Raises MigrationError; :meth:`abort` undoes."""
        d = self.vmm.domain
        st = d.runstate.state
        if st not in ("running", "paused"):
            raise MigrationError(f"domain {d.name} is {st}: only a running or paused domain "
                                 "can be saved")
        self.stats.paused_at = time.monotonic()
        self._was_running = st == "running"
        if self.mode == "suspend":
            self._suspend_guest()
            self.stats.step("guest-suspend")
        else:
            self._quiesced = True
            if not d.quiesce(timeout=5.0):
                raise MigrationError("a vCPU did not stop within 5 s")
            self.stats.step("vcpus")
        if self.vmm.devices is not None:
            self._devices_suspended = True
            self.vmm.devices.suspend()
        self.stats.step("backends")

    def _suspend_guest(self, timeout: float = SUSPEND_TIMEOUT) -> None:
        """Xen's cooperative suspend: write ``control/shutdown = suspend`` and wait for the
        guest's SCHEDOP_shutdown(SHUTDOWN_suspend). Its vCPU stays parked in that hypercall:
        the target completes it with 0 (resumed in a new domain), :meth:`abort` with 1
        (suspend cancelled)."""
        d = self.vmm.domain
        if self.xenstore.read(d.domid, "control/feature-suspend") != b"1":
            raise MigrationError(f"domain {d.name} does not support suspend (no "
                                 "control/feature-suspend): use the transparent mode")
        if d.runstate.state == "paused":
            raise MigrationError(f"domain {d.name} is paused: it cannot suspend itself")
        self.xenstore.write(d.domid, "control/shutdown", "suspend")
        if not d.wait_until(lambda: d.runstate.state != "running", timeout):
            self.xenstore.write(d.domid, "control/shutdown", "")
            raise MigrationError(f"domain {d.name} did not suspend within {timeout:g} s")
        rs = d.runstate
        if rs.state != "shutdown" or rs.reason != "suspend":
            raise MigrationError(f"domain {d.name} went {rs.state} ({rs.reason}) instead of "
                                 "suspending")
        self._suspended = True
        if not d.wait_until(lambda: all(
                v.thread is None or not v.thread.is_alive() or v.index in d.parked
                or v.parked_in_hypercall for v in d.vcpus), 5.0):
            raise MigrationError("a vCPU did not stop within 5 s of the suspend")

    def final(self) -> None:
        """Quiesce (unless :meth:`quiesce` ran) and send everything else, ending with END.
        Without a preceding :meth:`precopy` every guest frame is sent (a plain save).

        Order matters: with the vCPUs parked and the backends stopped, the timers are held
        and xenstore frozen, so nothing changes the event state (shared_info, vcpu_info,
        LAPICs) while it is captured."""
        if not (self._quiesced or self._suspended):
            self.quiesce()
        vmm, xd = self.vmm, self.vmm.xen
        domid = vmm.domain.domid
        xd.timers.hold(True)
        self._timers_held = True
        uuid = self.config.get("uuid")
        roots = [f"/local/domain/{domid}", f"/libxl/{domid}",
                 f"/local/domain/0/backend/vbd/{domid}", f"/local/domain/0/backend/vif/{domid}"]
        if uuid:
            roots.append(f"/vm/{uuid}")
        if self.mode == "suspend":
            # the target starts a fresh tree and connection; what the guest itself wrote
            # there (control/feature-*, data/, attr/, ...) it does not write again on resume
            store = self.xenstore.export(domid, [f"/local/domain/{domid}/{sub}" for sub in
                                                 GUEST_OWNED])
            self._frozen = True
        else:
            store = self.xenstore.export(domid, roots)
            self._frozen = True
        self.stats.step("xenstore")
        state = xd.save_state()
        state["core_vcpus"] = [{"online": v.online, "sipi_wait": v.sipi_wait,
                                "initialised": v.initialised,
                                "parked_in_hypercall": v.parked_in_hypercall}
                               for v in vmm.domain.vcpus]
        state["was_running"] = self._was_running
        state["suspended"] = self._suspended
        state["system_time_ns"] = xd.clock.now_ns()
        if self.mem.dirty_logging:
            pfns = self.mem.fetch_dirty() | self._carry
            # written without the engine seeing it: rings xenstored and the console backend
            # serve straight in the memfd, event bits the VMM sets in vcpu_info
            pfns.update(self._special_frames())
            for st in xd.vcpu_state:
                if st.vcpu_info_gpa is not None:
                    pfns.add(st.vcpu_info_gpa // PAGE)
            self.mem.set_dirty_logging(False)
            pfns_list = sorted(pfns)
        else:
            pfns_list = self._all_frames()
        self.stats.dirty_history.append(len(pfns_list))
        self.stats.step("dirty-log")
        if self.copy_disks:                  # the backends are stopped: this is the last
            self.send_disk_changes()
            self._stop_disk_logs()
            self.stats.step("disks")
        self.send_pages(pfns_list, snapshot=False)
        self.stats.step("pages")
        parts: list[bytes | memoryview] = []
        for kind, index, data in xd.hypervisor_pages():
            parts.append(S.encode_hypervisor_page(kind, index, data))
        for v in vmm.domain.vcpus:
            parts.append(S.encode_vcpu_state(v.index, v.ev.save_state()))
        parts.append(S.encode_json(S.XEN_STATE, state))
        parts.append(S.encode_json(S.XENSTORE, store))
        devices = vmm.devices.save_state() if vmm.devices is not None else {}
        parts.append(S.encode_json(S.DEVICES, devices))
        parts.append(S.encode_end())
        self.stats.step("state")
        self._send(parts)
        self.stats.stream_done_at = time.monotonic()
        self.stats.step("send")
        self._report("done", dirty=0, eta_s=0)

    def _special_frames(self) -> set[int]:
        out = set()
        for base, n in self._frames:
            r = self.mem.find(base * PAGE)
            if r is not None and r.kind == "special":
                out.update(range(base, base + n))
        return out

    def abort(self) -> None:
        """Undo :meth:`quiesce`/:meth:`final`: thaw xenstore, re-attach the backends, stop
        dirty logging, and unpause if the domain was running. Errors are logged: this runs
        on a failure path and must get the domain going again if at all possible."""
        d = self.vmm.domain
        self._stop_disk_logs()
        if self.mem.dirty_logging:
            try:
                self.mem.set_dirty_logging(False)
            except Exception as e:                        # noqa: BLE001 (failure path)
                log.warning("d%d: stopping the dirty log: %s", d.domid, e)
        if self._timers_held:
            self._timers_held = False
            self.vmm.xen.timers.hold(False)
        if self._frozen:
            self._frozen = False
            try:
                self.xenstore.thaw(d.domid)
            except Exception as e:                        # noqa: BLE001
                log.error("d%d: xenstore thaw failed: %s", d.domid, e)
        if self._devices_suspended:
            self._devices_suspended = False
            try:
                self.vmm.devices.resume()
            except Exception as e:                        # noqa: BLE001
                log.error("d%d: backends did not re-attach: %s", d.domid, e)
        if self._quiesced:
            self._quiesced = False
            if self._was_running:
                d.unpause()
        if self._suspended:                  # SCHEDOP_shutdown returns 1: cancelled
            self._suspended = False
            try:
                d.resume_from_suspend(1)
            except RuntimeError as e:
                log.error("d%d: cannot cancel the suspend: %s", d.domid, e)


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of the allocated parts of a file (SEEK_DATA/SEEK_HOLE); the whole
    file where the filesystem cannot tell."""
    out, off = [], 0
    try:
        while off < size:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:                   # ENXIO: no data after off
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, min(end, size) - start))
            off = end
    except OSError:
        return [(0, size)]
    return out
