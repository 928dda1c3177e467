"""Guest memory: one memfd per domain, mapped into the VMM and registered with the engine.

Layout of the memfd: every guest-visible region (RAM below the hole, RAM above 4 GiB, the ACPI
area, the Xen special pages) and every *hypervisor page* (shared_info, grant-table frames: pages
Xen owns and a guest maps into its physical space on request) gets its own page-aligned offset.
Backends, migration and xenstored can reach the same pages through the fd.

Addresses: ``gpa`` = guest-physical byte address. Reads/writes that touch no region raise
:class:`GuestMemoryError` (hypercall code turns it into ``-EFAULT``). Every write the VMM makes is
recorded in :attr:`GuestMemory.vmm_dirty` (page frame numbers) so live migration can resend them.

Threading: reads/writes are plain memory accesses and may come from any thread; region changes
(:meth:`map_page`, :meth:`unmap_page`) are serialised by an internal lock.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from dataclasses import dataclass, field

from pyxen.engine.base import EngineVm

PAGE = 4096


_ZERO_CHUNK = bytes(4096)


def _next_nonzero(buf: bytes, pos: int) -> int:
    """Index of the first non-zero byte of ``buf`` at or after ``pos``, or -1."""
    n = len(buf)
    while pos < n:
        end = min(n, pos + 4096)
        if buf[pos:end] != _ZERO_CHUNK[:end - pos]:
            while buf[pos] == 0:
                pos += 1
            return pos
        pos = end
    return -1


class GuestMemoryError(Exception):
    """A guest-physical access hit no memory (or straddled a region boundary)."""

    def __init__(self, gpa: int, size: int) -> None:
        super().__init__(f"no guest memory at 0x{gpa:x} (+{size})")
        self.gpa = gpa


@dataclass
class Region:
    """A run of guest-physical pages backed by the memfd at ``offset``."""

    name: str
    gpa: int
    size: int
    offset: int
    kind: str                       # "ram", "acpi", "special", "xenpage"
    mm: mmap.mmap = field(repr=False)
    host: int = 0                   # host virtual address of the mapping
    slot: int | None = None         # engine slot id while mapped

    def __post_init__(self) -> None:
        self.host = ctypes.addressof(ctypes.c_char.from_buffer(self.mm))

    @property
    def end(self) -> int:
        return self.gpa + self.size


class GuestMemory:
    """All memory of one domain. Create with the engine VM the regions are registered with."""

    def __init__(self, vm: EngineVm, name: str = "guest") -> None:
        self.vm = vm
        self.fd = os.memfd_create(f"pyxen-{name}", os.MFD_CLOEXEC)
        self._fd_size = 0
        self.regions: list[Region] = []          # guest-visible, sorted by gpa
        self._lock = threading.Lock()
        self._dirty_lock = threading.Lock()
        self.vmm_dirty: set[int] = set()
        self.dirty_logging = False

    # --- construction
    def _alloc(self, size: int) -> tuple[int, mmap.mmap]:
        offset = self._fd_size
        self._fd_size += size
        os.ftruncate(self.fd, self._fd_size)
        mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                       offset=offset)
        return offset, mm

    def add_region(self, name: str, gpa: int, size: int, kind: str) -> Region:
        """Create ``size`` bytes of zeroed memory and map it at ``gpa`` (page aligned)."""
        assert gpa % PAGE == 0 and size % PAGE == 0 and size > 0
        offset, mm = self._alloc(size)
        r = Region(name, gpa, size, offset, kind, mm)
        with self._lock:
            for o in self.regions:
                if gpa < o.end and o.gpa < gpa + size:
                    raise ValueError(f"region {name} overlaps {o.name}")
            r.slot = self.vm.map_memory(gpa, size, r.host)
            self.regions.append(r)
            self.regions.sort(key=lambda x: x.gpa)
        return r

    def new_page(self, name: str) -> Region:
        """A hypervisor-owned page, not (yet) visible to the guest."""
        offset, mm = self._alloc(PAGE)
        return Region(name, -1, PAGE, offset, "xenpage", mm)

    def map_page(self, page: Region, gpa: int) -> None:
        """Make hypervisor page ``page`` visible at ``gpa`` (which must hold no memory)."""
        with self._lock:
            if page.slot is not None:
                self.vm.unmap_memory(page.slot)
                self.regions.remove(page)
            page.gpa = gpa
            page.slot = self.vm.map_memory(gpa, PAGE, page.host)
            self.regions.append(page)
            self.regions.sort(key=lambda x: x.gpa)

    def unmap_page(self, page: Region) -> None:
        with self._lock:
            if page.slot is not None:
                self.vm.unmap_memory(page.slot)
                self.regions.remove(page)
                page.slot = None
                page.gpa = -1

    # --- lookup
    def find(self, gpa: int) -> Region | None:
        for r in self.regions:
            if r.gpa <= gpa < r.end:
                return r
        return None

    def is_ram(self, gpa: int) -> bool:
        r = self.find(gpa)
        return r is not None and r.kind == "ram"

    def _locate(self, gpa: int, size: int) -> tuple[Region, int]:
        r = self.find(gpa)
        if r is None or gpa + size > r.end:
            raise GuestMemoryError(gpa, size)
        return r, gpa - r.gpa

    def host_addr(self, gpa: int, size: int = 1) -> int:
        """Host virtual address of ``gpa``; the ``size`` bytes must lie in one region."""
        r, off = self._locate(gpa, size)
        return r.host + off

    # --- access
    def read(self, gpa: int, size: int) -> bytes:
        r, off = self._locate(gpa, size)
        return r.mm[off:off + size]

    def write(self, gpa: int, data: bytes) -> None:
        r, off = self._locate(gpa, len(data))
        r.mm[off:off + len(data)] = data
        self._mark(gpa, len(data))

    def view(self, gpa: int, size: int) -> memoryview:
        """A writable view (zero copy). Callers that write through it call :meth:`mark_dirty`."""
        r, off = self._locate(gpa, size)
        return memoryview(r.mm)[off:off + size]

    def zero(self, gpa: int, size: int) -> None:
        self.write(gpa, bytes(size))

    def mark_dirty(self, gpa: int, size: int) -> None:
        self._mark(gpa, size)

    def _mark(self, gpa: int, size: int) -> None:
        with self._dirty_lock:
            self.vmm_dirty.update(range(gpa >> 12, (gpa + size - 1 >> 12) + 1))

    # --- live migration
    def guest_frames(self) -> list[tuple[int, int]]:
        """(first pfn, count) of every guest-visible region that migration copies as page
        data (RAM, ACPI, special pages; hypervisor pages travel on their own)."""
        with self._lock:
            return [(r.gpa >> 12, r.size >> 12) for r in self.regions if r.kind != "xenpage"]

    def set_dirty_logging(self, enabled: bool) -> None:
        """Start/stop the engine's dirty log on every region; starting also forgets the
        VMM's own record (:attr:`vmm_dirty`), so :meth:`fetch_dirty` reports writes from now."""
        self.vm.set_dirty_logging(enabled)
        with self._dirty_lock:
            self.vmm_dirty.clear()
        self.dirty_logging = enabled

    def fetch_dirty(self) -> set[int]:
        """Frames written since the last call (or since logging started), by the guest
        (the engine's log) or by the VMM (:attr:`vmm_dirty`); both logs are cleared."""
        with self._dirty_lock:
            out, self.vmm_dirty = self.vmm_dirty, set()
        with self._lock:
            regions = [r for r in self.regions if r.kind != "xenpage" and r.slot is not None]
        for r in regions:
            bitmap = self.vm.get_dirty_log(r.slot)  # type: ignore[arg-type]
            base = r.gpa >> 12
            npages = r.size >> 12
            pos = 0
            while True:
                pos = _next_nonzero(bitmap, pos)
                if pos < 0:
                    break
                b = bitmap[pos]
                for bit in range(8):
                    if b >> bit & 1 and pos * 8 + bit < npages:
                        out.add(base + pos * 8 + bit)
                pos += 1
        return out

    def read_u32(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 4), "little")

    def read_u64(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 8), "little")

    def write_u32(self, gpa: int, v: int) -> None:
        self.write(gpa, (v & 0xFFFFFFFF).to_bytes(4, "little"))

    def write_u64(self, gpa: int, v: int) -> None:
        self.write(gpa, (v & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little"))

    def close(self) -> None:
        for r in self.regions:
            try:
                r.mm.close()
            except BufferError:
                pass
        self.regions.clear()
        os.close(self.fd)
