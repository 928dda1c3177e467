"""pyxen.arch.x86.layout: RAM ranges and the guest memory map."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyxen.arch.x86 import layout as L

MiB, GiB = 1 << 20, 1 << 30


def test_constants_consistent():
    assert L.XENSTORE_PFN == (L.SPECIAL_PAGES_BASE >> 12) + 4
    assert L.CONSOLE_PFN == (L.SPECIAL_PAGES_BASE >> 12) + 7
    assert L.SPECIAL_PAGES_BASE + L.SPECIAL_PAGES_COUNT * L.PAGE_SIZE == 0xFF000000
    assert L.MMIO_HOLE_START <= L.ACPI_BASE < L.LAPIC_BASE < L.SPECIAL_PAGES_BASE


def test_small_guest():
    assert L.build_memmap(512 * MiB) == [
        L.MemoryRange(0, 512 * MiB, L.E820_RAM),
        L.MemoryRange(L.ACPI_BASE, L.ACPI_SIZE, L.E820_NVS),
        L.MemoryRange(L.SPECIAL_PAGES_BASE, 8 * 4096, L.E820_RESERVED)]


def test_large_guest_splits_around_hole():
    assert L.ram_ranges(6 * GiB) == [(0, L.MMIO_HOLE_START),
                                     (1 << 32, 6 * GiB - L.MMIO_HOLE_START)]
    mm = L.build_memmap(6 * GiB)
    assert mm[-1] == L.MemoryRange(1 << 32, 6 * GiB - L.MMIO_HOLE_START, L.E820_RAM)


@pytest.mark.parametrize("bad", [0, -4096, 4097])
def test_bad_sizes(bad):
    with pytest.raises(ValueError):
        L.ram_ranges(bad)


@given(st.integers(min_value=256, max_value=16 * 1024 * 1024).map(lambda p: p * 4096))
def test_memmap_properties(mem):
    mm = L.build_memmap(mem)
    assert mm == sorted(mm, key=lambda e: e.addr)
    for a, b in zip(mm, mm[1:]):
        assert a.end <= b.addr
    assert mm[0].addr == 0 and mm[0].type == L.E820_RAM
    assert sum(e.size for e in mm if e.type == L.E820_RAM) == mem
    for e in mm:
        assert e.size > 0 and e.addr % 4096 == 0 and e.size % 4096 == 0
        if e.type == L.E820_RAM:
            assert e.end <= L.MMIO_HOLE_START or e.addr >= 1 << 32
