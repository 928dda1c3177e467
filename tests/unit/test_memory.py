"""pyxen.core.memory.GuestMemory over a FakeEngineVm."""

from __future__ import annotations

import ctypes
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyxen.core.memory import PAGE, GuestMemory, GuestMemoryError
from pyxen.testing.fakes import FakeEngineVm

MiB = 1 << 20


@pytest.fixture
def mem():
    vm = FakeEngineVm()
    m = GuestMemory(vm, "test")
    yield m
    m.close()


def test_add_region_registers_slot(mem):
    r = mem.add_region("low", 0, 1 * MiB, "ram")
    hi = mem.add_region("high", 0x1_0000_0000, 2 * PAGE, "ram")
    assert mem.vm.slots == {r.slot: (0, MiB, r.host), hi.slot: (0x1_0000_0000, 2 * PAGE, hi.host)}
    assert r.host % PAGE == 0 and r.end == MiB
    assert [x.name for x in mem.regions] == ["low", "high"]
    assert mem.find(0x1_0000_1FFF) is hi and mem.find(0x1_0000_2000) is None
    assert mem.is_ram(0) and not mem.is_ram(MiB)
    assert mem.read(0, 64) == bytes(64)                # new memory is zero


def test_regions_sorted_by_gpa(mem):
    mem.add_region("b", 0x10_0000, PAGE, "ram")
    mem.add_region("a", 0, PAGE, "acpi")
    mem.add_region("c", 0x20_0000, PAGE, "special")
    assert [r.name for r in mem.regions] == ["a", "b", "c"]
    assert not mem.is_ram(0)


def test_read_write_round_trip(mem):
    mem.add_region("ram", 0, 4 * PAGE, "ram")
    mem.write(0x123, b"hello")
    assert mem.read(0x120, 10) == b"\0\0\0hello\0\0"
    mem.write_u32(0x2000, 0x1_DEAD_BEEF)               # truncated to 32 bits
    assert mem.read_u32(0x2000) == 0xDEAD_BEEF
    assert mem.read(0x2000, 4) == bytes.fromhex("efbeadde")
    mem.write_u64(0x3FF8, -1)
    assert mem.read_u64(0x3FF8) == 2**64 - 1
    mem.zero(0x3FFC, 4)
    assert mem.read_u64(0x3FF8) == 0xFFFF_FFFF
    # the same bytes through the host address and through the memfd
    assert ctypes.string_at(mem.host_addr(0x123, 5), 5) == b"hello"
    assert os.pread(mem.fd, 5, mem.regions[0].offset + 0x123) == b"hello"


@settings(max_examples=50)
@given(writes=st.lists(st.tuples(st.integers(0, 3 * PAGE - 1), st.binary(min_size=1,
                                                                          max_size=PAGE)),
                       max_size=8))
def test_writes_match_model_and_dirty_pfns(writes):
    m = GuestMemory(FakeEngineVm(), "prop")
    try:
        base = 0x40_0000
        m.add_region("ram", base, 4 * PAGE, "ram")
        model = bytearray(4 * PAGE)
        dirty = set()
        for off, data in writes:
            m.write(base + off, data)
            model[off:off + len(data)] = data
            dirty |= set(range((base + off) // PAGE, (base + off + len(data) - 1) // PAGE + 1))
        assert m.read(base, 4 * PAGE) == bytes(model)
        assert m.vmm_dirty == dirty
    finally:
        m.close()


def test_writes_recorded_as_dirty_pfns(mem):
    mem.add_region("ram", 0x10_0000, 8 * PAGE, "ram")
    assert mem.vmm_dirty == set()
    mem.read(0x10_0000, 3 * PAGE)                      # reads are not writes
    assert mem.vmm_dirty == set()
    mem.write(0x10_0FFE, b"abcd")                      # straddles pages 0x100 and 0x101
    assert mem.vmm_dirty == {0x100, 0x101}
    mem.write_u64(0x10_3000, 1)
    mem.zero(0x10_5000, 2 * PAGE)
    assert mem.vmm_dirty == {0x100, 0x101, 0x103, 0x105, 0x106}
    v = mem.view(0x10_7000, 16)
    v[:3] = b"xyz"
    assert mem.read(0x10_7000, 3) == b"xyz"
    assert 0x107 not in mem.vmm_dirty                  # views are the caller's job ...
    mem.mark_dirty(0x10_7000, 16)
    assert 0x107 in mem.vmm_dirty                      # ... through mark_dirty
    v.release()


@pytest.mark.parametrize("gpa,size", [
    (4 * PAGE, 1),                  # just past the end
    (4 * PAGE - 4, 8),              # straddles the end
    (0x1_0000_0000, 8),             # nowhere near
    (2 * PAGE - 1, 2),              # straddles the boundary between two adjacent regions
])
def test_out_of_range_raises(mem, gpa, size):
    mem.add_region("a", 0, 2 * PAGE, "ram")
    mem.add_region("b", 2 * PAGE, 2 * PAGE, "ram")
    with pytest.raises(GuestMemoryError) as ei:
        mem.read(gpa, size)
    assert ei.value.gpa == gpa
    for op in (lambda: mem.write(gpa, bytes(size)), lambda: mem.host_addr(gpa, size),
               lambda: mem.view(gpa, size), lambda: mem.zero(gpa, size)):
        with pytest.raises(GuestMemoryError):
            op()
    assert mem.vmm_dirty == set()                      # failed writes mark nothing


@pytest.mark.parametrize("gpa,size", [(0, PAGE), (PAGE, 4 * PAGE), (3 * PAGE, PAGE),
                                      (0, 16 * PAGE)])
def test_overlapping_regions_rejected(mem, gpa, size):
    mem.add_region("ram", PAGE, 3 * PAGE, "ram")
    nslots = len(mem.vm.slots)
    if gpa == 0 and size == PAGE:                       # adjacent, not overlapping: fine
        mem.add_region("ok", gpa, size, "ram")
        return
    with pytest.raises(ValueError, match="overlaps"):
        mem.add_region("bad", gpa, size, "ram")
    assert len(mem.vm.slots) == nslots and [r.name for r in mem.regions] == ["ram"]


def test_new_page_map_unmap(mem):
    mem.add_region("ram", 0, 16 * PAGE, "ram")
    vm = mem.vm
    page = mem.new_page("shared_info")
    assert page.kind == "xenpage" and page.slot is None and page.gpa == -1
    assert page not in mem.regions and len(vm.slots) == 1
    page.mm[:4] = b"xen!"

    mem.map_page(page, 0x10_0000)
    assert page.slot is not None and vm.slots[page.slot] == (0x10_0000, PAGE, page.host)
    assert mem.find(0x10_0FFF) is page and not mem.is_ram(0x10_0000)
    assert mem.read(0x10_0000, 4) == b"xen!"
    mem.write(0x10_0004, b"abc")
    assert page.mm[:7] == b"xen!abc"
    assert os.pread(mem.fd, 7, page.offset) == b"xen!abc"

    first = page.slot
    mem.map_page(page, 0x20_0000)                      # moving it releases the old slot
    assert vm.unmapped == [first] and first not in vm.slots
    assert vm.slots[page.slot] == (0x20_0000, PAGE, page.host)
    assert mem.find(0x10_0000) is None
    assert mem.read(0x20_0000, 7) == b"xen!abc"

    second = page.slot
    mem.unmap_page(page)
    assert vm.unmapped == [first, second] and page.slot is None and page.gpa == -1
    assert page not in mem.regions
    with pytest.raises(GuestMemoryError):
        mem.read(0x20_0000, 1)
    mem.unmap_page(page)                               # idempotent
    assert vm.unmapped == [first, second]
    assert page.mm[:7] == b"xen!abc"                   # the page itself lives on


def test_close_releases_fd():
    m = GuestMemory(FakeEngineVm())
    m.add_region("ram", 0, PAGE, "ram")
    fd = m.fd
    m.close()
    assert m.regions == []
    with pytest.raises(OSError):
        os.fstat(fd)
