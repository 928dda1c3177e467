"""pyxen.core.clock: Xen's time scale, pvclock scaling, rdtsc and DomainClock."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyxen.core.clock import DomainClock, PvclockParams, rdtsc, scale_delta, time_scale

U32 = 0xFFFFFFFF


def xen_set_time_scale(ticks_per_sec: int) -> tuple[int, int]:
    """A transcription of xen/arch/x86/time.c set_time_scale() + div_frac() with C widths."""
    tps64 = ticks_per_sec
    shift = 0
    while tps64 > 1_000_000_000 * 2:
        tps64 >>= 1
        shift -= 1
    tps32 = tps64 & U32
    while tps32 <= 1_000_000_000:
        tps32 = (tps32 << 1) & U32
        shift += 1
    # div_frac(dividend, divisor): "divl" of (dividend << 32) by divisor, dividend < divisor
    assert 1_000_000_000 < tps32
    return ((1_000_000_000 << 32) // tps32) & U32, shift


# Precomputed with the formula above (mul_frac = floor(1e9 * 2**32 / tps32)).
KNOWN = {
    1_000_000_000: (0x80000000, 1),          # 1 GHz -> 2e9 << ... shift 1, mul 0.5
    2_500_000_000: (3435973836, -1),         # 1.25e9 after one halving: mul 0.8
    3_000_000_000: (2863311530, -1),         # 1.5e9: mul 2/3
    100_000_000: (2684354560, 4),            # 1.6e9 after four doublings: mul 0.625
    2_000_000_000: (0x80000000, 0),          # exactly the upper bound: no shift
}


@pytest.mark.parametrize("hz", sorted(KNOWN))
def test_time_scale_matches_xen(hz):
    assert time_scale(hz) == KNOWN[hz] == xen_set_time_scale(hz)


@pytest.mark.parametrize("hz", [1_000_000_000, 2_500_000_000, 3_000_000_000, 100_000_000,
                                2_595_780_000, 1_999_999_999, 3_700_000_000])
def test_one_second_of_ticks_is_1e9_ns(hz):
    mul, shift = time_scale(hz)
    assert abs(scale_delta(hz, mul, shift) - 1_000_000_000) <= 1_000      # 1 ppm
    # and it is linear: 10 s of ticks
    assert abs(scale_delta(10 * hz, mul, shift) - 10_000_000_000) <= 10_000


@given(st.integers(1_000_000, 100_000_000_000))
def test_time_scale_properties(hz):
    mul, shift = time_scale(hz)
    assert (mul, shift) == xen_set_time_scale(hz)
    assert 0 < mul <= U32                     # fits vcpu_time_info.tsc_to_system_mul (u32)
    assert -128 <= shift <= 127               # fits the i8 tsc_shift
    assert abs(scale_delta(hz, mul, shift) - 1_000_000_000) <= 1_000


def test_scale_delta_is_linux_pvclock_scale_delta():
    # Linux: delta <<= shift (or >>= -shift); ((u128)delta * mul) >> 32
    assert scale_delta(0, 123, 5) == 0
    assert scale_delta(1000, 1 << 32, 0) == 1000
    assert scale_delta(1000, 1 << 31, 1) == 1000
    assert scale_delta(1001, 1 << 32, -1) == 500
    assert scale_delta(1 << 62, 0xFFFFFFFF, 1) == ((1 << 63) * 0xFFFFFFFF) >> 32   # no overflow


def test_rdtsc_monotonic():
    prev = rdtsc()
    for _ in range(20_000):
        now = rdtsc()
        assert now >= prev
        prev = now
    assert rdtsc() > 0


def measure_khz(seconds: float = 0.1) -> int:
    t0, c0 = time.monotonic_ns(), rdtsc()
    time.sleep(seconds)
    t1, c1 = time.monotonic_ns(), rdtsc()
    return (c1 - c0) * 1_000_000 // (t1 - t0)


def test_domain_clock_tracks_monotonic():
    khz = measure_khz()
    clock = DomainClock()
    clock.anchor(rdtsc(), khz, system_time=5_000_000_000)
    assert clock.tsc_khz == khz
    assert (clock.params.mul, clock.params.shift) == time_scale(khz * 1000)
    t0, n0 = time.monotonic_ns(), clock.now_ns()
    assert 5_000_000_000 <= n0 < 5_000_000_000 + 50_000_000
    time.sleep(0.05)
    t1, n1 = time.monotonic_ns(), clock.now_ns()
    assert n1 > n0
    assert abs((n1 - n0) - (t1 - t0)) <= 0.05 * (t1 - t0)


def test_domain_clock_guest_tsc_offset_and_wallclock():
    clock = DomainClock()
    guest0 = (1 << 63) + 12345                        # a guest TSC far from the host's
    before = time.time_ns()
    clock.anchor(guest0, 1_000_000, system_time=7_000)
    after = time.time_ns()
    h0 = rdtsc()
    g = clock.guest_tsc()
    h1 = rdtsc()
    assert guest0 <= g < guest0 + 10**10
    assert h0 + clock.tsc_offset <= g <= h1 + clock.tsc_offset     # guest TSC = host + offset
    assert clock.params == PvclockParams(guest0, 7_000, *time_scale(1_000_000_000))
    assert before - 7_000 <= clock.wallclock_ns <= after - 7_000
    assert clock.now_ns() >= 7_000


def test_now_ns_never_before_system_time():
    clock = DomainClock()
    clock.anchor(rdtsc(), 1_000_000)
    # a pvclock timestamp in the future (negative delta) must not yield a time before it
    clock.params = PvclockParams(clock.guest_tsc() + 10**12, 42, *time_scale(10**9))
    assert clock.now_ns() == 42


def test_seconds_until():
    clock = DomainClock()
    clock.anchor(rdtsc(), measure_khz(0.02))
    now = clock.now_ns()
    assert clock.seconds_until(now - 1_000_000) == 0.0
    s = clock.seconds_until(now + 1_000_000_000)
    assert 0.9 < s <= 1.0


def test_clock_save_load_keeps_system_time():
    from pyxen.core.clock import DomainClock, rdtsc
    c = DomainClock()
    c.anchor(rdtsc(), 2_000_000, system_time=5_000_000_000)
    st = c.save()
    d = DomainClock()
    d.load(st, guest_tsc=rdtsc())              # same host TSC: offset 0 again
    assert d.params == c.params and d.wallclock_ns == c.wallclock_ns
    assert abs(d.now_ns() - c.now_ns()) < 50_000_000
    import pytest
    with pytest.raises(ValueError):
        DomainClock().load({**st, "tsc_khz": 0})
    with pytest.raises(ValueError):
        DomainClock().load({"params": [1]})
