"""pyxen.xen.gnttab.GrantTable: v1 grant entries in hypervisor frames the guest maps."""

from __future__ import annotations

import struct
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyxen.core.memory import PAGE, GuestMemory
from pyxen.testing.fakes import FakeEngineVm
from pyxen.xen.abi import xen as X
from pyxen.xen.abi.errno import EINVAL, XenError
from pyxen.xen.gnttab import ENTRIES_PER_FRAME, GrantError, GrantTable

BACKEND = 0                      # the grantee: in-VMM backends act as domain 0
GNT_WINDOW = 0xF000              # gfn of an unused window (no RAM) where Linux maps grant frames


@pytest.fixture
def mem():
    m = GuestMemory(FakeEngineVm(), "gnttab")
    m.add_region("ram", 0, 256 * PAGE, "ram")
    yield m
    m.close()


@pytest.fixture
def gt(mem):
    return GrantTable(SimpleNamespace(memory=mem), max_frames=4)


def entry(flags: int, domid: int, frame: int) -> bytes:
    return struct.pack("<HHI", flags, domid, frame)


def guest_grant(mem, ref: int, flags: int, domid: int, frame: int, window: int = GNT_WINDOW):
    """What a guest does: write the entry through its mapping of the grant frames."""
    mem.write(window * PAGE + ref * 8, entry(flags, domid, frame))


def test_codes_are_xens():
    assert (X.GNTST_okay, X.GNTST_general_error, X.GNTST_bad_gntref) == (0, -1, -3)
    assert (X.GTF_permit_access, X.GTF_type_mask, X.GTF_readonly) == (1, 3, 4)


def test_initial_table(gt):
    assert gt.nr_frames == 1 and gt.version == 1
    assert gt.entry(0) == (0, 0, 0)
    assert gt.entry(ENTRIES_PER_FRAME - 1) == (0, 0, 0)


def test_entries_written_by_guest_resolve(gt, mem):
    gt.map_frame(0, GNT_WINDOW)
    assert mem.find(GNT_WINDOW * PAGE) is gt.frames[0].private
    guest_grant(mem, 8, X.GTF_permit_access, BACKEND, 0x1234)
    guest_grant(mem, 9, X.GTF_permit_access | X.GTF_readonly, BACKEND, 0x5678)
    guest_grant(mem, 511, X.GTF_permit_access | X.GTF_reading | X.GTF_writing, 5, 0xABCDEF01)
    assert gt.entry(8) == (X.GTF_permit_access, BACKEND, 0x1234)
    assert gt.resolve(8, BACKEND, write=True) == 0x1234
    assert gt.resolve(8, BACKEND, write=False) == 0x1234
    assert gt.resolve(9, BACKEND, write=False) == 0x5678
    assert gt.resolve(511, 5, write=True) == 0xABCDEF01      # status bits do not matter


def test_entries_in_frame_placed_over_ram(gt, mem):
    gt.frames[0].write(3 * 8, entry(X.GTF_permit_access, BACKEND, 77))
    gt.map_frame(0, 0x20)                                     # Linux may also use a RAM frame
    assert gt.resolve(3, BACKEND, write=True) == 77
    guest_grant(mem, 4, X.GTF_permit_access, BACKEND, 78, window=0x20)
    assert gt.resolve(4, BACKEND, write=False) == 78
    gt.map_frame(0, GNT_WINDOW)                               # moved: contents follow
    assert gt.resolve(3, BACKEND, write=True) == 77 and gt.resolve(4, BACKEND, write=True) == 78


@pytest.mark.parametrize("flags", [X.GTF_invalid, X.GTF_accept_transfer, X.GTF_transitive,
                                   X.GTF_readonly, X.GTF_invalid | X.GTF_reading])
def test_wrong_type_refused(gt, mem, flags):
    gt.map_frame(0, GNT_WINDOW)
    guest_grant(mem, 1, flags, BACKEND, 0x99)
    for write in (False, True):
        with pytest.raises(GrantError) as ei:
            gt.resolve(1, BACKEND, write=write)
        assert ei.value.status == X.GNTST_general_error


def test_wrong_domid_refused(gt, mem):
    gt.map_frame(0, GNT_WINDOW)
    guest_grant(mem, 2, X.GTF_permit_access, 3, 0x99)
    with pytest.raises(GrantError) as ei:
        gt.resolve(2, BACKEND, write=False)
    assert ei.value.status == X.GNTST_general_error
    assert gt.resolve(2, 3, write=False) == 0x99


def test_write_to_readonly_refused(gt, mem):
    gt.map_frame(0, GNT_WINDOW)
    guest_grant(mem, 2, X.GTF_permit_access | X.GTF_readonly, BACKEND, 0x99)
    assert gt.resolve(2, BACKEND, write=False) == 0x99
    with pytest.raises(GrantError) as ei:
        gt.resolve(2, BACKEND, write=True)
    assert ei.value.status == X.GNTST_general_error


def test_ref_beyond_table(gt, mem):
    for ref in (ENTRIES_PER_FRAME, 10**6, -1):
        with pytest.raises(GrantError) as ei:
            gt.resolve(ref, BACKEND, write=False)
        assert ei.value.status == X.GNTST_bad_gntref
    gt.map_frame(2, GNT_WINDOW + 2)                           # grows the table to 3 frames
    assert gt.nr_frames == 3
    ref = 2 * ENTRIES_PER_FRAME + 5
    guest_grant(mem, ref, X.GTF_permit_access, BACKEND, 42)   # (GNT_WINDOW + 2) * PAGE + 5 * 8
    assert gt.resolve(ref, BACKEND, write=True) == 42
    assert gt.entry(ENTRIES_PER_FRAME) == (0, 0, 0)           # frame 1 exists, unplaced
    with pytest.raises(GrantError) as ei:
        gt.entry(3 * ENTRIES_PER_FRAME)
    assert ei.value.status == X.GNTST_bad_gntref


def test_map_frame_errors(gt):
    with pytest.raises(XenError) as ei:
        gt.map_frame(X.XENMAPIDX_grant_table_status | 0, GNT_WINDOW)   # v2 status frame
    assert ei.value.errno == EINVAL
    for idx in (4, 5, 1 << 20):
        with pytest.raises(XenError) as ei:
            gt.map_frame(idx, GNT_WINDOW)
        assert ei.value.errno == EINVAL
    assert gt.nr_frames == 1                                  # nothing grew
    gt.map_frame(3, GNT_WINDOW)                               # the last allowed frame
    assert gt.nr_frames == 4
    with pytest.raises(XenError):
        gt.grow(5)


def test_set_version(gt):
    assert gt.set_version(1) == 1
    assert gt.set_version(0) == 1                             # 0 queries
    for v in (2, 3):
        with pytest.raises(XenError) as ei:
            gt.set_version(v)
        assert ei.value.errno == EINVAL
    assert gt.version == 1


@settings(max_examples=40)
@given(st.lists(st.tuples(st.integers(0, 2 * ENTRIES_PER_FRAME - 1), st.integers(0, 0xFFFF),
                          st.integers(0, 0xFFFF), st.integers(0, 2**32 - 1)), max_size=20))
def test_entries_round_trip(grants):
    m = GuestMemory(FakeEngineVm(), "prop")
    try:
        t = GrantTable(SimpleNamespace(memory=m), max_frames=2)
        t.map_frame(0, GNT_WINDOW)
        t.map_frame(1, GNT_WINDOW + 1)
        model = {}
        for ref, flags, domid, frame in grants:
            guest_grant(m, ref, flags, domid, frame)
            model[ref] = (flags, domid, frame)
        for ref, (flags, domid, frame) in model.items():
            assert t.entry(ref) == (flags, domid, frame)
            ok = flags & X.GTF_type_mask == X.GTF_permit_access and domid == BACKEND
            for write in (False, True):
                if ok and not (write and flags & X.GTF_readonly):
                    assert t.resolve(ref, BACKEND, write=write) == frame
                else:
                    with pytest.raises(GrantError):
                        t.resolve(ref, BACKEND, write=write)
    finally:
        m.close()
