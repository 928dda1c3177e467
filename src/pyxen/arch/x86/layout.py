"""Guest-physical layout of a PVH domain and its E820-style memory map.

Contract: constants are guest-physical byte addresses (``*_PFN`` are page frame numbers).
:func:`ram_ranges` tells the memory manager where to back guest RAM (memslots);
:func:`build_memmap` gives the table written into ``hvm_start_info`` (and returned by
XENMEM_memory_map). Layout follows libxl's PVH map (xen-abi.md 1.4)::

    0            .. low_end         RAM (no hole at 640 KiB: Linux reserves ISA itself)
    0xF0000000   .. 4 GiB           MMIO hole (RAM that would land here goes above 4 GiB)
      0xFC000000 +64 KiB            ACPI tables, E820 NVS (as libxl)
      0xFEE00000                    LAPIC
      0xFEFF8000 +8 pages           Xen special pages (xenstore 0xFEFFC, console 0xFEFFF), RESERVED
    4 GiB        .. 4 GiB + rest    high RAM
"""

from __future__ import annotations

from dataclasses import dataclass

PAGE_SIZE = 4096
ACPI_BASE = 0xFC000000
ACPI_SIZE = 0x10000
SPECIAL_PAGES_BASE = 0xFEFF8000
SPECIAL_PAGES_COUNT = 8
XENSTORE_PFN = 0xFEFFC
CONSOLE_PFN = 0xFEFFF
LAPIC_BASE = 0xFEE00000
MMIO_HOLE_START = 0xF0000000
HIGH_RAM_BASE = 1 << 32
#: Where a guest could map grant frames; Linux 6.1 picks its own free iomem range instead.
GRANT_FRAMES_HINT = 0xF0000

E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3
E820_NVS = 4
E820_UNUSABLE = 5


@dataclass(frozen=True)
class MemoryRange:
    """One memory-map entry: ``size`` bytes at guest-physical ``addr`` of E820 ``type``."""

    addr: int
    size: int
    type: int

    @property
    def end(self) -> int:
        return self.addr + self.size


def ram_ranges(mem_bytes: int) -> list[tuple[int, int]]:
    """(gpa, size) of guest RAM for ``mem_bytes`` of memory (page multiple, > 0)."""
    if mem_bytes <= 0 or mem_bytes % PAGE_SIZE:
        raise ValueError(f"guest memory {mem_bytes} must be a positive multiple of {PAGE_SIZE}")
    low = min(mem_bytes, MMIO_HOLE_START)
    ranges = [(0, low)]
    if mem_bytes > low:
        ranges.append((HIGH_RAM_BASE, mem_bytes - low))
    return ranges


def build_memmap(mem_bytes: int) -> list[MemoryRange]:
    """The guest's memory map: RAM, ACPI (NVS), special pages (RESERVED); sorted, disjoint."""
    entries = [MemoryRange(gpa, size, E820_RAM) for gpa, size in ram_ranges(mem_bytes)]
    entries.append(MemoryRange(ACPI_BASE, ACPI_SIZE, E820_NVS))
    entries.append(MemoryRange(SPECIAL_PAGES_BASE, SPECIAL_PAGES_COUNT * PAGE_SIZE,
                               E820_RESERVED))
    return sorted(entries, key=lambda e: e.addr)
