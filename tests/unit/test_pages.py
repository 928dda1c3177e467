"""pyxen.xen.pages.XenPage: hypervisor pages placed into the guest's physical space."""

from __future__ import annotations

import os

import pytest

from pyxen.core.memory import PAGE, GuestMemory
from pyxen.testing.fakes import FakeEngineVm
from pyxen.xen.pages import XenPage

RAM_PAGES = 64
EMPTY_GFN = 0x1000          # no memory there
EMPTY_GFN2 = 0x1001
PATTERN = bytes(range(256)) * (PAGE // 256)


@pytest.fixture
def mem():
    m = GuestMemory(FakeEngineVm(), "pages")
    m.add_region("ram", 0, RAM_PAGES * PAGE, "ram")
    yield m
    m.close()


def test_unplaced_page_is_private(mem):
    p = XenPage(mem, "shared_info")
    assert p.gfn is None and p.addr == p.private.host
    p.write(0, b"abc")
    assert p.read(0, 3) == b"abc"
    assert mem.vmm_dirty == set()                      # not guest-visible yet: nothing to resend
    assert len(mem.vm.slots) == 1                      # only the RAM region


def test_place_in_ram_then_empty_then_back(mem):
    vm = mem.vm
    p = XenPage(mem, "shared_info")
    p.write(0, PATTERN)

    # 1. onto a RAM frame: used in place, no new slot
    mem.write(5 * PAGE, b"\xAA" * PAGE)                # old RAM contents are replaced
    mem.vmm_dirty.clear()
    p.place(5)
    assert p.gfn == 5 and p.addr == mem.host_addr(5 * PAGE)
    assert mem.read(5 * PAGE, PAGE) == PATTERN
    assert len(vm.mapped) == 1 and vm.unmapped == []
    assert 5 in mem.vmm_dirty
    p.write(10, b"in-ram")
    mem.write(5 * PAGE + 20, b"guest")                 # the guest writes the same bytes
    assert mem.read(5 * PAGE + 10, 6) == b"in-ram" and p.read(20, 5) == b"guest"

    # 2. onto an empty frame: the private page becomes a new slot there
    p.place(EMPTY_GFN)
    slot = p.private.slot
    assert slot is not None and vm.slots[slot] == (EMPTY_GFN * PAGE, PAGE, p.private.host)
    assert p.addr == p.private.host
    expect = bytearray(PATTERN)
    expect[10:16], expect[20:25] = b"in-ram", b"guest"
    assert mem.read(EMPTY_GFN * PAGE, PAGE) == bytes(expect)
    assert mem.find(EMPTY_GFN * PAGE) is p.private
    assert os.pread(mem.fd, PAGE, p.private.offset) == bytes(expect)
    mem.write(EMPTY_GFN * PAGE + 100, b"window")
    p.place(EMPTY_GFN)                                 # same frame: nothing happens
    assert vm.slots[slot][0] == EMPTY_GFN * PAGE and len(vm.mapped) == 2
    expect[100:106] = b"window"

    # 2b. to another empty frame: old slot released, new slot mapped
    p.place(EMPTY_GFN2)
    assert vm.unmapped == [slot] and mem.find(EMPTY_GFN * PAGE) is None
    assert mem.read(EMPTY_GFN2 * PAGE, PAGE) == bytes(expect)
    slot2 = p.private.slot

    # 3. back into RAM (a different frame): the slot goes, contents land in the RAM frame
    p.place(7)
    assert vm.unmapped == [slot, slot2] and p.private.slot is None
    assert mem.find(EMPTY_GFN2 * PAGE) is None
    assert p.addr == mem.host_addr(7 * PAGE)
    assert mem.read(7 * PAGE, PAGE) == bytes(expect)
    assert p.read(0, PAGE) == bytes(expect)

    # 4. RAM frame to RAM frame, then back to the first
    p.write(0, b"last")
    p.place(5)
    expect[0:4] = b"last"
    assert mem.read(5 * PAGE, PAGE) == bytes(expect)
    assert len(vm.slots) == 1                          # only the RAM region is mapped


def test_write_marks_dirty_at_its_frame(mem):
    p = XenPage(mem, "grant0")
    p.place(EMPTY_GFN)
    mem.vmm_dirty.clear()
    p.write(PAGE - 2, b"xy")
    assert mem.vmm_dirty == {EMPTY_GFN}
    p.place(3)
    mem.vmm_dirty.clear()
    p.write(0, b"z")
    assert mem.vmm_dirty == {3}
