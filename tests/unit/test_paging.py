"""pyxen.arch.x86.paging.translate: software page walks over guest page tables."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyxen.arch.x86.paging import (CR0_PG, CR4_LA57, CR4_PAE, CR4_PSE, EFER_LMA, PageFault,
                                   translate)

P, RW, US, PS = 1, 2, 4, 0x80
NX = 1 << 63
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
CR0 = CR0_PG | 1          # PG + PE
LONG = dict(cr0=CR0, cr4=CR4_PAE, efer=EFER_LMA | (1 << 8))


class Mem:
    """Page-table memory: a bytearray; reads beyond it raise (like a GPA with no RAM)."""

    def __init__(self, size: int = 2 * MiB, first_table: int = 0x10000) -> None:
        self.buf = bytearray(size)
        self.next = first_table
        self.reads: list[int] = []

    def read_u64(self, gpa: int) -> int:
        if not 0 <= gpa <= len(self.buf) - 8:
            raise IndexError(f"no memory at 0x{gpa:x}")
        self.reads.append(gpa)
        return int.from_bytes(self.buf[gpa:gpa + 8], "little")

    def put(self, gpa: int, value: int, size: int = 8) -> None:
        self.buf[gpa:gpa + size] = value.to_bytes(size, "little")

    def get(self, gpa: int, size: int = 8) -> int:
        return int.from_bytes(self.buf[gpa:gpa + size], "little")

    def table(self) -> int:
        t = self.next
        self.next += 4096
        assert self.next <= len(self.buf)
        return t


class LongTables:
    """4- or 5-level long-mode page tables."""

    def __init__(self, levels: int = 4) -> None:
        self.mem = Mem()
        self.levels = levels
        self.root = self.mem.table()
        self.shifts = (48, 39, 30, 21, 12)[5 - levels:]

    def map(self, gva: int, gpa: int, size: int = 4096, leaf_flags: int = P | RW,
            mid_flags: int = P | RW | US) -> None:
        leaf_shift = {4 * KiB: 12, 2 * MiB: 21, 1 * GiB: 30}[size]
        table = self.root
        for shift in self.shifts:
            slot = table + ((gva >> shift) & 0x1FF) * 8
            if shift == leaf_shift:
                self.mem.put(slot, gpa | leaf_flags | (PS if shift != 12 else 0))
                return
            entry = self.mem.get(slot)
            if not entry & P:
                entry = self.mem.table() | mid_flags
                self.mem.put(slot, entry)
            table = entry & 0x000FFFFFFFFFF000

    def slot(self, gva: int, shift: int) -> int:
        """Address of the entry for ``gva`` at the level indexed by ``shift``."""
        table = self.root
        for s in self.shifts:
            slot = table + ((gva >> s) & 0x1FF) * 8
            if s == shift:
                return slot
            table = self.mem.get(slot) & 0x000FFFFFFFFFF000
        raise AssertionError(shift)

    def tr(self, gva: int, write: bool = False) -> int:
        cr4 = LONG["cr4"] | (CR4_LA57 if self.levels == 5 else 0)
        return translate(self.mem.read_u64, LONG["cr0"], self.root | 0x18, cr4, LONG["efer"],
                         gva, write=write)


# ----------------------------------------------------------------------------- paging off

@pytest.mark.parametrize("gva", [0, 0x1234, 0xFFFFF000, 0x1_0000_1234, 0xFFFF_FFFF_FFFF_FFFF])
def test_paging_off_is_identity(gva):
    mem = Mem()
    # 32-bit protected mode / real mode: linear addresses are 32 bits
    assert translate(mem.read_u64, 1, 0, 0, 0, gva) == gva & 0xFFFFFFFF
    assert translate(mem.read_u64, 0, 0, 0, 0, gva, write=True) == gva & 0xFFFFFFFF
    assert mem.reads == []


# ----------------------------------------------------------------------------- long mode

def test_4k_2m_1g_mappings():
    t = LongTables()
    t.map(0x40_1000, 0x7_6543_2000)
    t.map(0x7F_4020_0000, 0x3_0000_0000 + 0x20_0000, 2 * MiB)
    t.map(0x80_4000_0000, 0x5_4000_0000, 1 * GiB)
    assert t.tr(0x40_1000) == 0x7_6543_2000
    assert t.tr(0x40_1ABC) == 0x7_6543_2ABC
    assert t.tr(0x7F_4020_0000 + 0x1_2345) == 0x3_0020_0000 + 0x1_2345
    assert t.tr(0x80_4000_0000 + 0x1234_5678) == 0x5_4000_0000 + 0x1234_5678
    assert t.tr(0x80_4000_0000 + GiB - 1, write=True) == 0x5_4000_0000 + GiB - 1
    # neighbouring pages are not mapped
    for gva in (0x40_2000, 0x40_0000, 0x7F_4040_0000, 0x80_8000_0000):
        with pytest.raises(PageFault):
            t.tr(gva)


def test_flag_bits_do_not_leak_into_address():
    t = LongTables()
    # NX, accessed/dirty, global, PAT (bit 12 of a large page) and available bits set
    t.map(0x20_0000, 0x1_0000_0000, 2 * MiB, leaf_flags=NX | P | RW | 0x60 | 0x100 | 0x1000 | 0xE00)
    t.map(0x5000, 0xABC_D000, leaf_flags=NX | (0x7FF << 52) | P | 0x60 | 0x100 | 0xE00)
    assert t.tr(0x20_0000 + 0x1F_FFFF) == 0x1_0000_0000 + 0x1F_FFFF
    assert t.tr(0x5FFF) == 0xABC_DFFF


def test_higher_half_kernel_mapping():
    t = LongTables()
    t.map(0xFFFF_FFFF_8000_0000, 0x100_0000, 2 * MiB)
    t.map(0xFFFF_8880_0000_0000, 0, 1 * GiB)
    assert t.tr(0xFFFF_FFFF_8012_3456) == 0x112_3456
    assert t.tr(0xFFFF_8880_0ABC_DEF0) == 0xABC_DEF0


@given(page=st.integers(0, (1 << 36) - 1), frame=st.integers(0, (1 << 40) - 1),
       off=st.integers(0, 4095))
def test_4k_any_address(page, frame, off):
    gva = page << 12
    if gva >> 47:
        gva |= 0xFFFF << 48                       # make it canonical
    t = LongTables()
    t.map(gva, frame << 12)
    assert t.tr(gva | off) == (frame << 12) | off


@pytest.mark.parametrize("shift", [39, 30, 21, 12])
def test_not_present_at_each_level(shift):
    t = LongTables()
    t.map(0x1234_5678_9000, 0x9000)
    assert t.tr(0x1234_5678_9000) == 0x9000
    slot = t.slot(0x1234_5678_9000, shift)
    t.mem.put(slot, t.mem.get(slot) & ~P)
    with pytest.raises(PageFault, match="not present"):
        t.tr(0x1234_5678_9000)


@pytest.mark.parametrize("size,shift", [(4 * KiB, 12), (2 * MiB, 21), (1 * GiB, 30)])
def test_write_to_read_only_leaf(size, shift):
    t = LongTables()
    t.map(0x40_0000_0000, 0x8000_0000, size, leaf_flags=P)
    assert t.tr(0x40_0000_0000) == 0x8000_0000
    with pytest.raises(PageFault, match="read-only"):
        t.tr(0x40_0000_0000, write=True)


@pytest.mark.parametrize("shift", [39, 30, 21])
def test_write_through_read_only_upper_level(shift):
    t = LongTables()
    t.map(0x40_0000_0000, 0x8000_0000)
    slot = t.slot(0x40_0000_0000, shift)
    t.mem.put(slot, t.mem.get(slot) & ~RW)
    assert t.tr(0x40_0000_0000) == 0x8000_0000
    with pytest.raises(PageFault):
        t.tr(0x40_0000_0000, write=True)


@pytest.mark.parametrize("gva", [1 << 47, 0x0000_8000_0000_1000, 0xFFFF_7FFF_FFFF_F000,
                                 0x8000_0000_0000_0000, 0x0001_0000_0000_0000])
def test_non_canonical_4_level(gva):
    t = LongTables()
    with pytest.raises(PageFault, match="non-canonical"):
        t.tr(gva)
    assert t.mem.reads == []


def test_tables_outside_memory_fault():
    t = LongTables()
    t.mem.put(t.root, 0x7000_0000 | P | RW)          # PML4E -> a PDPT with no memory behind it
    with pytest.raises(PageFault, match="unreadable"):
        t.tr(0x1000)


def test_5_level():
    t = LongTables(levels=5)
    va = 0x00FF_1234_5678_9000                        # needs bits above 47: only valid with LA57
    t.map(va, 0x1_2345_6000)
    t.map(0xFF00_0000_0000_0000, 0x4000_0000, 1 * GiB)
    assert t.tr(va + 0x123) == 0x1_2345_6123
    assert t.tr(0xFF00_0000_0123_4567) == 0x4123_4567
    with pytest.raises(PageFault, match="non-canonical"):
        t.tr(0x0100_0000_0000_0000)
    with pytest.raises(PageFault, match="non-canonical"):
        t.tr(0xFE00_0000_0000_0000)
    # the same tables walked with 4 levels: the address is non-canonical there
    with pytest.raises(PageFault):
        translate(t.mem.read_u64, CR0, t.root, CR4_PAE, EFER_LMA, va)


def test_5_level_not_present_top():
    t = LongTables(levels=5)
    t.map(0x1000, 0x2000)
    assert t.tr(0x1000) == 0x2000
    t.mem.put(t.root, 0)
    with pytest.raises(PageFault):
        t.tr(0x1000)


# ----------------------------------------------------------------------------- 32-bit

def test_pae_walk():
    mem = Mem()
    pdpt = 0x10020                                    # PAE CR3 is 32-byte aligned
    pd0, pd3, pt = 0x20000, 0x21000, 0x22000
    mem.put(pdpt + 0 * 8, pd0 | P)
    mem.put(pdpt + 3 * 8, pd3 | P)
    mem.put(pd0 + 1 * 8, pt | P | RW)                 # 0x0020_0000..: 4 KiB pages
    mem.put(pt + 5 * 8, 0x1_2345_6000 | P | RW)       # PAE maps above 4 GiB
    mem.put(pt + 6 * 8, 0x7000 | P)                   # read-only
    mem.put(pd3 + 2 * 8, 0x3_0000_0000 | 0x20_0000 * 7 | P | RW | PS)   # 2 MiB at 0xC040_0000

    def tr(gva, write=False):
        return translate(mem.read_u64, CR0, pdpt, CR4_PAE, 0, gva, write=write)

    assert tr(0x0020_5ABC) == 0x1_2345_6ABC
    assert tr(0x0020_6010) == 0x7010
    with pytest.raises(PageFault, match="read-only"):
        tr(0x0020_6010, write=True)
    assert tr(0xC040_0000 + 0x1_2345, write=True) == 0x3_00E0_0000 + 0x1_2345
    assert tr(0x1_0020_5ABC) == 0x1_2345_6ABC        # linear addresses are 32 bits
    for gva in (0x4000_0000, 0x8000_0000, 0x0020_7000, 0xC060_0000):   # PDPTE 1/2, PTE, PDE
        with pytest.raises(PageFault, match="not present"):
            tr(gva)


def test_32bit_non_pae_walk():
    mem = Mem()
    pd, pt = 0x10000, 0x11000
    mem.put(pd + 1 * 4, pt | P | RW, 4)               # 0x0040_0000: 4 KiB pages
    mem.put(pd + 2 * 4, 0xDEAD_0000, 4)               # garbage in the next entry's high half
    mem.put(pt + 3 * 4, 0x0ABC_D000 | P | RW, 4)
    mem.put(pt + 4 * 4, 0x0123_4000 | P, 4)
    mem.put(pd + 0x300 * 4, 0x0800_0000 | P | RW | PS, 4)               # 4 MiB at 0xC000_0000
    mem.put(pd + 0x301 * 4, 0x0040_0000 | (0x12 << 13) | P | PS, 4)      # PSE-36: 0x12_0040_0000

    def tr(gva, write=False, cr4=CR4_PSE):
        return translate(mem.read_u64, CR0, pd, cr4, 0, gva, write=write)

    assert tr(0x0040_3123, write=True) == 0x0ABC_D123
    assert tr(0x0040_4FFF) == 0x0123_4FFF
    with pytest.raises(PageFault, match="read-only"):
        tr(0x0040_4000, write=True)
    assert tr(0xC012_3456) == 0x0812_3456
    assert tr(0xC000_0000 + 4 * MiB + 5) == 0x12_0040_0005
    with pytest.raises(PageFault, match="read-only"):
        tr(0xC040_0000, write=True)
    with pytest.raises(PageFault, match="not present"):
        tr(0x0040_5000)                               # PTE 5 empty
    with pytest.raises(PageFault, match="not present"):
        tr(0x0080_0000)                               # PDE 2: high bits of a u64 read ignored


def test_32bit_pse_bit_ignored_without_cr4_pse():
    mem = Mem(4 * MiB)
    pd = 0x10000
    pt = 0x0020_0000                                  # with CR4.PSE=0 the PDE points to a PT
    mem.put(pd + 0x300 * 4, pt | P | RW | PS, 4)
    mem.put(pt + 0x123 * 4, 0x0055_5000 | P | RW, 4)
    assert translate(mem.read_u64, CR0, pd, 0, 0, 0xC012_3456) == 0x0055_5456
    # with CR4.PSE=1 it is a 4 MiB page (bits 21:13 of the PDE are PSE-36/reserved, zero here)
    assert translate(mem.read_u64, CR0, pd, CR4_PSE, 0, 0xC012_3456) == 0x0012_3456
