"""pyxen.arch.x86.lapic: registers, priorities, IPIs, INIT/SIPI, timer, serialisation."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyxen.arch.x86 import lapic as L
from pyxen.arch.x86.lapic import Ipi, Lapic

T0 = 1_000_000


def enabled(apic_id: int = 2, **kw) -> Lapic:
    a = Lapic(apic_id, **kw)
    a.write(L.REG_SVR, 0x1FF, 0)
    return a


def esr(a: Lapic) -> int:
    """Linux's way to read ESR: write (latch), then read."""
    a.write(L.REG_ESR, 0, 0)
    return a.read(L.REG_ESR, 0)


# ---- reset values and register access ----

RESET = {
    L.REG_ID: 2 << 24, L.REG_VERSION: 0x00050014, L.REG_TPR: 0, L.REG_APR: 0, L.REG_PPR: 0,
    L.REG_EOI: 0, L.REG_RRD: 0, L.REG_LDR: 0, L.REG_DFR: 0xFFFFFFFF, L.REG_SVR: 0xFF,
    L.REG_ESR: 0, L.REG_LVT_CMCI: 0x10000, L.REG_ICR_LOW: 0, L.REG_ICR_HIGH: 0,
    L.REG_LVT_TIMER: 0x10000, L.REG_LVT_THERMAL: 0x10000, L.REG_LVT_PERF: 0x10000,
    L.REG_LVT_LINT0: 0x10000, L.REG_LVT_LINT1: 0x10000, L.REG_LVT_ERROR: 0x10000,
    L.REG_TIMER_INITIAL: 0, L.REG_TIMER_CURRENT: 0, L.REG_TIMER_DIVIDE: 0,
    **{base + 0x10 * i: 0 for base in (L.REG_ISR, L.REG_TMR, L.REG_IRR) for i in range(8)},
}


@pytest.mark.parametrize("offset", sorted(RESET))
def test_reset_values(offset):
    assert Lapic(2).read(offset, T0) == RESET[offset]


def test_reset_is_software_disabled_and_running():
    a = Lapic(2)
    assert not a.enabled and a.state == "running"
    assert a.timer_deadline() is None and a.deliverable() is None


def test_version_advertises_six_lvts():
    v = Lapic(0).read(L.REG_VERSION, 0)
    assert v & 0xFF == 0x14 and (v >> 16) & 0xFF == 5


def test_constructor_rejects_bad_args():
    with pytest.raises(ValueError):
        Lapic(256)
    with pytest.raises(ValueError):
        Lapic(0, bus_hz=0)
    with pytest.raises(ValueError):
        Lapic(0, state="halted")
    assert Lapic(4, state="wait_for_sipi").state == "wait_for_sipi"


def test_id_writable_bits_31_24():
    a = Lapic(2)
    a.write(L.REG_ID, 0x07123456, 0)
    assert a.read(L.REG_ID, 0) == 0x07000000 and a.apic_id == 7
    assert a.matches(0, 7) and not a.matches(0, 2)


@pytest.mark.parametrize("size,offset", [(1, L.REG_TPR), (2, L.REG_TPR), (8, L.REG_TPR),
                                         (4, L.REG_TPR + 4), (4, L.REG_TPR + 1),
                                         (4, 0x1000), (4, -0x10)])
def test_bad_size_or_offset_reads_zero_and_ignores_writes(size, offset):
    a = enabled()
    a.write(L.REG_TPR, 0x20, 0)
    assert a.write(offset, 0x55, 0, size=size) == []
    assert a.read(offset, 0, size=size) == 0
    assert a.read(L.REG_TPR, 0) == 0x20
    if size != 4:
        a.write(L.REG_ID, 0x09000000, 0, size=size)  # not honoured at a valid offset either
        assert a.apic_id == 2


@pytest.mark.parametrize("offset", [0x00, 0x10, 0x40, 0x3A0, 0x3F0, 0xFF0])
def test_reserved_slots(offset):
    a = Lapic(2)
    before = a.to_dict()
    assert a.write(offset, 0xFFFFFFFF, 0) == [] and a.read(offset, 0) == 0
    assert a.to_dict() == before


@pytest.mark.parametrize("offset", [L.REG_VERSION, L.REG_APR, L.REG_PPR, L.REG_RRD,
                                    L.REG_ISR, L.REG_TMR + 0x10, L.REG_IRR + 0x70,
                                    L.REG_TIMER_CURRENT])
def test_read_only_registers_ignore_writes(offset):
    a = enabled()
    before = a.read(offset, 0)
    a.write(offset, 0xFFFFFFFF, 0)
    assert a.read(offset, 0) == before
    assert a.irr == a.isr == a.tmr == 0 and a.tpr == 0


def test_register_write_masks():
    a = enabled()
    for off, val, want in [
        (L.REG_TPR, 0xFFFFFFFF, 0xFF), (L.REG_LDR, 0xFFFFFFFF, 0xFF000000),
        (L.REG_DFR, 0x00000000, 0x0FFFFFFF), (L.REG_DFR, 0xF0000000, 0xFFFFFFFF),
        (L.REG_SVR, 0xFFFFFFFF, 0x3FF),  # bit 12 (EOI-broadcast suppression) ignored
        (L.REG_ICR_HIGH, 0xFFFFFFFF, 0xFF000000), (L.REG_TIMER_DIVIDE, 0xFFFFFFFF, 0xB),
        (L.REG_LVT_ERROR, 0xFFFFFFFF, 0x100FF), (L.REG_LVT_TIMER, 0xFFFFFFFF, 0x700FF),
        (L.REG_LVT_LINT0, 0xFFFFFFFF, 0x1A7FF), (L.REG_LVT_LINT1, 0x700, 0x700),
        (L.REG_LVT_PERF, 0xFFFFFFFF, 0x107FF), (L.REG_LVT_THERMAL, 0x400, 0x400),
        (L.REG_LVT_CMCI, 0xFFFFFFFF, 0x107FF),
    ]:
        a.write(off, val, 0)
        assert a.read(off, 0) == want, hex(off)


def test_apr_and_eoi_read_zero_even_with_state():
    a = enabled()
    a.accept_fixed(0x40)
    a.ack()
    assert a.read(L.REG_APR, 0) == 0 and a.read(L.REG_EOI, 0) == 0


# ---- software enable / disable ----

def test_disabled_forces_lvt_masks():
    a = Lapic(2)
    a.write(L.REG_LVT_TIMER, 0x000000EC, 0)
    assert a.read(L.REG_LVT_TIMER, 0) == 0x100EC  # mask cannot be cleared while disabled
    a.write(L.REG_SVR, 0x1FF, 0)
    a.write(L.REG_LVT_TIMER, 0x000000EC, 0)
    a.write(L.REG_LVT_ERROR, 0x000000FE, 0)
    assert a.read(L.REG_LVT_TIMER, 0) == 0xEC and a.read(L.REG_LVT_ERROR, 0) == 0xFE
    a.write(L.REG_SVR, 0x0FF, 0)  # software disable sets every mask
    for off in (L.REG_LVT_TIMER, L.REG_LVT_ERROR, L.REG_LVT_LINT0, L.REG_LVT_CMCI):
        assert a.read(off, 0) & L.LVT_MASKED
    assert a.read(L.REG_LVT_TIMER, 0) == 0x100EC


def test_disabled_latches_fixed_and_holds_irr():
    a = Lapic(2)
    assert a.accept_fixed(0x50) is True and a.deliverable() is None   # Xen: latched, not lost
    a.write(L.REG_SVR, 0x1FF, 0)
    assert a.ack() == 0x50
    a.write(L.REG_EOI, 0, 0)
    assert a.accept_fixed(0x40) is True
    a.write(L.REG_SVR, 0xFF, 0)
    assert a.deliverable() is None and a.ack() is None
    assert a.read(L.REG_IRR + 0x20, 0) == 1  # held, not lost
    a.write(L.REG_SVR, 0x1FF, 0)
    assert a.ack() == 0x40


# ---- priorities ----

@pytest.mark.parametrize("tpr,isr,ppr", [
    (0x00, None, 0x00), (0x35, None, 0x35), (0x20, 0x51, 0x50), (0x5F, 0x51, 0x5F),
    (0x50, 0x5A, 0x50), (0x4F, 0x5A, 0x50), (0xFF, 0xEC, 0xFF),
])
def test_ppr(tpr, isr, ppr):
    a = enabled()
    if isr is not None:
        a.accept_fixed(isr)
        assert a.ack() == isr
    a.write(L.REG_TPR, tpr, 0)
    assert a.read(L.REG_PPR, 0) == ppr


@pytest.mark.parametrize("tpr,vector,ok", [
    (0x00, 0x20, True), (0x40, 0x45, False), (0x40, 0x4F, False), (0x3F, 0x45, True),
    (0x40, 0x50, True), (0xF0, 0xFF, False), (0xEF, 0xFF, True),
])
def test_tpr_masks_by_class(tpr, vector, ok):
    a = enabled()
    a.write(L.REG_TPR, tpr, 0)
    assert a.accept_fixed(vector)
    assert a.deliverable() == (vector if ok else None)
    assert a.ack() == (vector if ok else None)


def test_lowering_tpr_releases_interrupt():
    a = enabled()
    a.write(L.REG_TPR, 0x80, 0)
    a.accept_fixed(0x61)
    assert a.deliverable() is None
    a.write(L.REG_TPR, 0x00, 0)
    assert a.deliverable() == 0x61


def test_nested_irr_isr_eoi():
    a = enabled()
    a.accept_fixed(0x31)
    assert a.ack() == 0x31
    a.accept_fixed(0x51)
    a.accept_fixed(0x41)
    assert a.deliverable() == 0x51
    assert a.ack() == 0x51                         # nests above 0x31
    assert a.deliverable() is None                 # 0x41 class 4 < in-service class 5
    assert a.read(L.REG_PPR, 0) == 0x50
    a.write(L.REG_EOI, 0, 0)                       # retires 0x51 (highest), not 0x31
    assert a.isr == 1 << 0x31 and a.deliverable() == 0x41
    assert a.ack() == 0x41
    assert a.read(L.REG_ISR + 0x20, 0) == 0x2 and a.read(L.REG_ISR + 0x10, 0) == 0x20000
    a.write(L.REG_EOI, 0, 0)
    assert a.isr == 1 << 0x31
    a.write(L.REG_EOI, 0, 0)
    assert a.isr == 0 and a.irr == 0 and a.ack() is None


def test_same_class_blocked_by_in_service():
    a = enabled()
    a.accept_fixed(0x31)
    a.ack()
    a.accept_fixed(0x3F)
    assert a.deliverable() is None
    a.write(L.REG_EOI, 0, 0)
    assert a.ack() == 0x3F


def test_highest_irr_wins_and_irr_words():
    a = enabled()
    for v in (0x22, 0xEC, 0x81):
        a.accept_fixed(v)
    assert a.read(L.REG_IRR + 0x70, 0) == 1 << 12 and a.read(L.REG_IRR + 0x40, 0) == 2
    assert [a.ack(), a.ack(), a.ack()] == [0xEC, None, None]
    a.write(L.REG_EOI, 0, 0)
    assert a.ack() == 0x81


def test_accept_returns_newly_set_only():
    a = enabled()
    assert a.accept_fixed(0x40) is True
    assert a.accept_fixed(0x40) is False
    a.ack()
    assert a.accept_fixed(0x40) is True  # IRR free again while in service
    with pytest.raises(ValueError):
        a.accept_fixed(256)


def test_eoi_level_and_tmr():
    a = enabled()
    a.accept_fixed(0x60, level_triggered=True)
    assert a.read(L.REG_TMR + 0x30, 0) == 1
    a.ack()
    a.write(L.REG_EOI, 0, 0)
    assert a.last_eoi_level_vector == 0x60
    a.accept_fixed(0x60)  # edge acceptance clears TMR
    assert a.tmr == 0
    a.ack()
    a.write(L.REG_EOI, 0, 0)
    assert a.last_eoi_level_vector is None
    a.accept_fixed(0x70, level_triggered=True)
    a.ack()
    a.write(L.REG_EOI, 0, 0)
    a.write(L.REG_EOI, 0, 0)  # nothing in service: no-op, resets the record
    assert a.last_eoi_level_vector is None and a.isr == 0


# ---- errors ----

@pytest.mark.parametrize("vector", [0, 2, 15])
def test_illegal_received_vector(vector):
    a = enabled()
    assert a.accept_fixed(vector) is False
    assert a.irr == 0 and a.read(L.REG_ESR, 0) == 0  # not latched before the ESR write
    assert esr(a) == 0x40
    assert esr(a) == 0  # the write cleared what was collected


def test_legal_vector_16_sets_no_error():
    a = enabled()
    assert a.accept_fixed(16) is True and esr(a) == 0


def test_illegal_sent_vector():
    a = enabled()
    a.write(L.REG_ICR_HIGH, 4 << 24, 0)
    assert a.write(L.REG_ICR_LOW, 0x00004005, 0) == []
    assert esr(a) == 0x20
    # NMI/INIT carry no vector: no error
    assert len(a.write(L.REG_ICR_LOW, 0x00004400, 0)) == 1 and esr(a) == 0


# ---- ICR / IPIs ----

@pytest.mark.parametrize("low,high,want", [
    (0x0000C500, 4 << 24, Ipi(5, 0, 0, 4, 0, 1, 1, 2)),      # INIT assert
    (0x00008500, 4 << 24, Ipi(5, 0, 0, 4, 0, 0, 1, 2)),      # INIT de-assert
    (0x0000069A, 4 << 24, Ipi(6, 0x9A, 0, 4, 0, 0, 0, 2)),   # SIPI
    (0x000040FB, 6 << 24, Ipi(0, 0xFB, 0, 6, 0, 1, 0, 2)),   # Linux fixed IPI, physical
    (0x000048FD, 0x0C << 24, Ipi(0, 0xFD, 1, 0x0C, 0, 1, 0, 2)),  # logical
    (0x000440F6, 0, Ipi(0, 0xF6, 0, 0, 1, 1, 0, 2)),         # self
    (0x000800FC, 0, Ipi(0, 0xFC, 0, 0, 2, 0, 0, 2)),         # all incl. self
    (0x000C0400, 0, Ipi(4, 0, 0, 0, 3, 0, 0, 2)),            # NMI to all but self
    (0x000C4500, 0, Ipi(5, 0, 0, 0, 3, 1, 0, 2)),            # INIT all but self
    (0x000041F2, 0xFF << 24, Ipi(1, 0xF2, 0, 0xFF, 0, 1, 0, 2)),  # lowest priority broadcast
])
def test_icr_decode(low, high, want):
    a = enabled()
    a.write(L.REG_ICR_HIGH, high, 0)
    assert a.write(L.REG_ICR_LOW, low, 0) == [want]
    assert want.icr_low == low and want.icr_high == high
    assert a.read(L.REG_ICR_LOW, 0) == low and a.read(L.REG_ICR_HIGH, 0) == high


def test_icr_delivery_status_reads_idle():
    a = enabled()
    a.write(L.REG_ICR_LOW, 0xFFF350FB, 0)  # status bit 12 + reserved bits
    assert a.read(L.REG_ICR_LOW, 0) == 0x000040FB
    assert not a.read(L.REG_ICR_LOW, 0) & (1 << 12)


def test_ipi_sent_while_disabled_and_source_is_current_id():
    a = Lapic(2)  # software-disabled APICs still send
    a.write(L.REG_ID, 9 << 24, 0)
    [ipi] = a.write(L.REG_ICR_LOW, 0x000C4500, 0)
    assert ipi.source == 9


def test_init_deassert_flag():
    assert Ipi.from_icr(0x00008500, 0, 0).is_init_deassert
    assert not Ipi.from_icr(0x0000C500, 0, 0).is_init_deassert
    assert not Ipi.from_icr(0x00000500, 0, 0).is_init_deassert  # edge INIT
    assert not Ipi.from_icr(0x00008000, 0, 0).is_init_deassert  # fixed level de-assert


@given(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF), st.integers(0, 255))
def test_icr_roundtrip(low, high, src):
    ipi = Ipi.from_icr(low, high, src)
    assert ipi.icr_low == low & L.ICR_LOW_WRITABLE
    assert ipi.icr_high == high & 0xFF000000
    assert Ipi.from_icr(ipi.icr_low, ipi.icr_high, src) == ipi


# ---- destination matching ----

def test_matches_physical():
    a = Lapic(6)
    assert a.matches(0, 6) and a.matches(0, 0xFF)
    assert not a.matches(0, 7) and not a.matches(0, 0x16)


def test_matches_logical_flat():
    a = Lapic(6)
    assert not a.matches(1, 0xFF)  # LDR 0 matches nothing
    a.write(L.REG_LDR, 0x04000000, 0)
    assert a.matches(1, 0x04) and a.matches(1, 0x0C) and a.matches(1, 0xFF)
    assert not a.matches(1, 0x03) and not a.matches(1, 0x08)


def test_matches_logical_cluster():
    a = Lapic(6)
    a.write(L.REG_DFR, 0x0FFFFFFF, 0)
    a.write(L.REG_LDR, 0x32000000, 0)  # cluster 3, member bit 1
    assert a.matches(1, 0x32) and a.matches(1, 0x3F) and a.matches(1, 0xFF)
    assert not a.matches(1, 0x31)       # same cluster, other member
    assert not a.matches(1, 0x22)       # other cluster
    assert not a.matches(1, 0x0F)
    a.write(L.REG_DFR, 0xFFFFFFFF, 0)   # flat: 0x22 & 0x32 != 0
    assert a.matches(1, 0x22)


def test_matches_bad_model():
    a = Lapic(6)
    a.write(L.REG_LDR, 0xFF000000, 0)
    a.write(L.REG_DFR, 0x5FFFFFFF, 0)
    assert not a.matches(1, 0xFF) and a.matches(0, 6)


# ---- INIT / SIPI ----

def test_init_resets_all_but_id():
    a = enabled(4)
    a.write(L.REG_ID, 8 << 24, 0)
    a.write(L.REG_TPR, 0x30, 0)
    a.write(L.REG_LDR, 0x01000000, 0)
    a.write(L.REG_DFR, 0x0FFFFFFF, 0)
    a.write(L.REG_LVT_TIMER, 0x200EC, 0)
    a.write(L.REG_TIMER_INITIAL, 100, 0)
    a.accept_fixed(0x50, level_triggered=True)
    a.accept_fixed(0x5)
    a.ack()
    a.receive_init()
    assert a.state == "wait_for_sipi" and a.apic_id == 8
    want = Lapic(8, state="wait_for_sipi").to_dict()
    assert a.to_dict() == want
    assert a.timer_deadline() is None


def test_init_sipi_state_machine():
    ap = Lapic(2, state="wait_for_sipi")
    assert ap.receive_sipi(0x9A) == 0x9A and ap.state == "running"
    assert ap.receive_sipi(0x9A) is None  # second SIPI of INIT-SIPI-SIPI ignored
    bsp = Lapic(0)
    assert bsp.receive_sipi(0x10) is None and bsp.state == "running"
    bsp.receive_init()
    assert bsp.state == "wait_for_sipi" and bsp.receive_sipi(0x10) == 0x10


# ---- timer ----

def arm(a: Lapic, lvt: int, tdcr: int, count: int, now: int = T0) -> None:
    a.write(L.REG_TIMER_DIVIDE, tdcr, now)
    a.write(L.REG_LVT_TIMER, lvt, now)
    a.write(L.REG_TIMER_INITIAL, count, now)


def test_oneshot():
    a = enabled()
    arm(a, 0xEC, 0xB, 1000)  # divide by 1
    assert a.timer_deadline() == T0 + 1000
    assert a.read(L.REG_TIMER_CURRENT, T0) == 1000
    assert a.read(L.REG_TIMER_CURRENT, T0 + 1) == 999
    assert a.read(L.REG_TIMER_CURRENT, T0 + 400) == 600
    assert a.read(L.REG_TIMER_CURRENT, T0 + 5000) == 0
    assert a.timer_expired(T0 + 999) is False and a.irr == 0
    assert a.timer_expired(T0 + 1000) is True
    assert a.irr == 1 << 0xEC and a.tmr == 0
    assert a.timer_deadline() is None and a.read(L.REG_TIMER_CURRENT, T0 + 1001) == 0
    assert a.timer_expired(T0 + 2000) is False
    assert a.read(L.REG_TIMER_INITIAL, 0) == 1000


def test_periodic():
    a = enabled()
    arm(a, 0x200EF, 0x0, 50)  # divide by 2 -> 100 ns period
    assert a.timer_deadline() == T0 + 100
    assert a.read(L.REG_TIMER_CURRENT, T0 + 30) == 35
    assert a.read(L.REG_TIMER_CURRENT, T0 + 130) == 35  # wrapped before the caller noticed
    assert a.timer_expired(T0 + 100) is True
    assert a.timer_deadline() == T0 + 200
    assert a.read(L.REG_TIMER_CURRENT, T0 + 100) == 50
    assert a.timer_expired(T0 + 210) is False  # IRR bit already pending
    assert a.timer_deadline() == T0 + 300
    assert a.ack() == 0xEF
    assert a.timer_expired(T0 + 755) is True   # late: missed periods coalesce, phase kept
    assert a.timer_deadline() == T0 + 800
    assert a.read(L.REG_TIMER_CURRENT, T0 + 755) == 50 - 55 // 2


@pytest.mark.parametrize("tdcr,div", [(0x0, 2), (0x1, 4), (0x2, 8), (0x3, 16), (0x8, 32),
                                      (0x9, 64), (0xA, 128), (0xB, 1), (0xF4, 2)])
def test_divide_config(tdcr, div):
    a = enabled()
    arm(a, 0xEC, tdcr, 10)
    assert a.timer_deadline() == T0 + 10 * div
    assert a.read(L.REG_TIMER_CURRENT, T0 + div - 1) == 10
    assert a.read(L.REG_TIMER_CURRENT, T0 + div) == 9


def test_bus_hz():
    a = enabled(bus_hz=100_000_000)  # 10 ns per bus cycle
    arm(a, 0xEC, 0xB, 10)
    assert a.timer_deadline() == T0 + 100
    assert a.read(L.REG_TIMER_CURRENT, T0 + 55) == 5
    b = enabled(bus_hz=3_000_000_000)  # deadline rounds up to whole ns
    arm(b, 0xEC, 0xB, 10)
    assert b.timer_deadline() == T0 + 4
    assert b.timer_expired(T0 + 3) is False and b.timer_expired(T0 + 4) is True


def test_masked_timer_counts_but_does_not_interrupt():
    a = enabled()
    arm(a, 0x300EC, 0xB, 100)
    assert a.timer_expired(T0 + 100) is False and a.irr == 0
    assert a.timer_deadline() == T0 + 200  # periodic still re-armed
    a.write(L.REG_LVT_TIMER, 0x200EC, T0 + 150)
    assert a.timer_expired(T0 + 200) is True


def test_timer_stop_and_restart():
    a = enabled()
    arm(a, 0xEC, 0xB, 100)
    a.write(L.REG_TIMER_INITIAL, 0, T0 + 10)
    assert a.timer_deadline() is None and a.read(L.REG_TIMER_CURRENT, T0 + 10) == 0
    a.write(L.REG_TIMER_INITIAL, 40, T0 + 20)
    assert a.timer_deadline() == T0 + 60


def test_tsc_deadline_mode_disarms():
    a = enabled()
    arm(a, 0xEC, 0xB, 100)
    a.write(L.REG_LVT_TIMER, 0x400EC, T0)
    assert a.read(L.REG_LVT_TIMER, 0) == 0x400EC
    assert a.timer_deadline() is None and a.read(L.REG_TIMER_CURRENT, T0) == 0
    a.write(L.REG_TIMER_INITIAL, 5, T0)
    assert a.timer_deadline() is None and a.read(L.REG_TIMER_INITIAL, 0) == 100
    assert a.timer_expired(T0 + 10**9) is False and a.irr == 0


def test_divide_change_mid_count():
    a = enabled()
    arm(a, 0xEC, 0xB, 100)                       # 1 ns per tick
    a.write(L.REG_TIMER_DIVIDE, 0x1, T0 + 40)    # now 4 ns per tick, 60 ticks left
    assert a.read(L.REG_TIMER_CURRENT, T0 + 40) == 60
    assert a.timer_deadline() == T0 + 40 + 240
    assert a.read(L.REG_TIMER_CURRENT, T0 + 80) == 50


def test_divide_change_after_unprocessed_expiry():
    a = enabled()
    arm(a, 0xEC, 0xB, 100)
    a.write(L.REG_TIMER_DIVIDE, 0x1, T0 + 150)
    assert a.timer_deadline() == T0 + 150       # still due
    assert a.timer_expired(T0 + 150) is True


def test_timer_illegal_vector_reports_error():
    a = enabled()
    arm(a, 0x05, 0xB, 1)
    assert a.timer_expired(T0 + 1) is False and a.irr == 0
    assert esr(a) == 0x40


def test_disabling_apic_masks_timer():
    a = enabled()
    arm(a, 0x200EC, 0xB, 10)
    a.write(L.REG_SVR, 0xFF, T0)
    assert a.timer_expired(T0 + 10) is False and a.irr == 0
    assert a.timer_deadline() == T0 + 20


# ---- serialisation ----

def test_to_dict_is_json_and_exact():
    a = enabled()
    arm(a, 0x200EC, 0x3, 77)
    a.accept_fixed(0xFE, level_triggered=True)
    a.accept_fixed(0x21)
    a.ack()
    a.accept_fixed(3)
    d = a.to_dict()
    assert json.loads(json.dumps(d)) == d
    b = Lapic.from_dict(json.loads(json.dumps(d)))
    assert b.to_dict() == d
    assert b.irr == a.irr and b.isr == a.isr and b.tmr == a.tmr
    assert b.timer_deadline() == a.timer_deadline()


@pytest.mark.parametrize("mutate", [
    lambda d: d.pop("tpr"),
    lambda d: d.update(extra=1),
    lambda d: d.update(irr=[0] * 7),
    lambda d: d.update(isr=[-1] + [0] * 7),
    lambda d: d.update(tpr=2**32),
    lambda d: d.update(state="halted"),
    lambda d: d["lvt"].pop("cmci"),
    lambda d: d["lvt"].update(timer="0x10000"),
    lambda d: d.update(timer_start_ns="5"),
    lambda d: d.update(last_eoi_level_vector=300),
])
def test_from_dict_rejects_malformed(mutate):
    d = enabled().to_dict()
    mutate(d)
    with pytest.raises(ValueError):
        Lapic.from_dict(d)


OFFSETS = sorted(set(RESET) | {0x10, 0x3F0, L.REG_TPR + 4})
U32 = st.integers(0, 0xFFFFFFFF)
VALUES = st.one_of(U32, st.integers(0, 300), st.sampled_from([
    0x1FF, 0xFF, 0xEC, 0x100EC, 0x200EC, 0x400EC, 0x0FFFFFFF, 0xFFFFFFFF, 0x0000C500,
    0x00008500, 0x0000069A, 0x000C40FB, 0x000440F6, 0x01000000, 0x32000000, 0xB, 0x8]))
OPS = st.one_of(
    st.tuples(st.just("write"), st.sampled_from(OFFSETS), VALUES),
    st.tuples(st.just("write"), st.just(L.REG_SVR), st.just(0x1FF)),
    st.tuples(st.just("write"), st.just(L.REG_EOI), st.just(0)),
    st.tuples(st.just("read"), st.sampled_from(OFFSETS)),
    st.tuples(st.just("accept"), st.integers(0, 255), st.booleans()),
    st.tuples(st.just("ack")),
    st.tuples(st.just("deliverable")),
    st.tuples(st.just("expire")),
    st.tuples(st.just("init")),
    st.tuples(st.just("sipi"), st.integers(0, 255)),
    st.tuples(st.just("advance"), st.integers(0, 5000)),
)


def run(a: Lapic, ops, now: int) -> tuple[list, int]:
    out: list = []
    for op in ops:
        kind = op[0]
        if kind == "write":
            out.append(a.write(op[1], op[2], now))
        elif kind == "read":
            out.append(a.read(op[1], now))
        elif kind == "accept":
            out.append(a.accept_fixed(op[1], op[2]))
        elif kind == "ack":
            out.append(a.ack())
        elif kind == "deliverable":
            out.append(a.deliverable())
        elif kind == "expire":
            deadline = a.timer_deadline()
            if deadline is not None:
                now = max(now, deadline)
            out.append(a.timer_expired(now))
        elif kind == "init":
            out.append(a.receive_init())
        elif kind == "sipi":
            out.append(a.receive_sipi(op[1]))
        else:
            now += op[1]
        out.append((a.timer_deadline(), a.last_eoi_level_vector, a.state))
    return out, now


@settings(max_examples=300, deadline=None)
@given(st.lists(OPS, max_size=40), st.lists(OPS, max_size=40), st.integers(0, 255),
       st.sampled_from([1_000_000_000, 100_000_000, 3_000_000_000, 24_000_000]))
def test_roundtrip_behaves_identically(prefix, suffix, apic_id, bus_hz):
    a = Lapic(apic_id, bus_hz=bus_hz)
    _, now = run(a, prefix, T0)
    d = a.to_dict()
    b = Lapic.from_dict(json.loads(json.dumps(d)))
    assert b.to_dict() == d
    out_a, now_a = run(a, suffix, now)
    out_b, now_b = run(b, suffix, now)
    assert out_a == out_b and now_a == now_b
    assert a.to_dict() == b.to_dict()
    for off in OFFSETS:
        assert a.read(off, now_a) == b.read(off, now_a)
    for mode in (0, 1):
        for dest in (0, 1, 0x32, apic_id, 0xFF):
            assert a.matches(mode, dest) == b.matches(mode, dest)


@settings(max_examples=200, deadline=None)
@given(st.lists(OPS, max_size=60))
def test_invariants(ops):
    a = Lapic(3)
    run(a, ops, T0)
    assert a.irr & 0xFFFF == 0 and a.isr & 0xFFFF == 0
    ppr = a.read(L.REG_PPR, 0)
    v = a.deliverable()
    if v is not None:
        assert a.enabled and (v >> 4) > (ppr >> 4) and a.irr >> v == 1
    for off in (L.REG_LVT_TIMER, L.REG_LVT_ERROR, L.REG_LVT_LINT0):
        if not a.enabled:
            assert a.read(off, 0) & L.LVT_MASKED
    assert a.read(L.REG_DFR, 0) & 0x0FFFFFFF == 0x0FFFFFFF
    assert not a.read(L.REG_ICR_LOW, 0) & (1 << 12)
