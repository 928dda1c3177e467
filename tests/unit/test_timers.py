"""pyxen.xen.timers.Timers: singleshot and periodic timers against a real DomainClock."""

from __future__ import annotations

import threading
import time

import pytest

from pyxen.core.clock import DomainClock, rdtsc
from pyxen.xen.timers import Timers

MS = 1_000_000


@pytest.fixture(scope="module")
def khz() -> int:
    t0, c0 = time.monotonic_ns(), rdtsc()
    time.sleep(0.1)
    t1, c1 = time.monotonic_ns(), rdtsc()
    return (c1 - c0) * 1_000_000 // (t1 - t0)


@pytest.fixture
def clock(khz) -> DomainClock:
    c = DomainClock()
    c.anchor(rdtsc(), khz)
    return c


class Fired:
    """fire(vcpu) callback recording (vcpu, clock.now_ns()) at each call."""

    def __init__(self, clock: DomainClock) -> None:
        self.clock = clock
        self.calls: list[tuple[int, int]] = []
        self.cv = threading.Condition()

    def __call__(self, vcpu: int) -> None:
        with self.cv:
            self.calls.append((vcpu, self.clock.now_ns()))
            self.cv.notify_all()

    def wait_for(self, n: int, timeout: float = 2.0) -> bool:
        with self.cv:
            return self.cv.wait_for(lambda: len(self.calls) >= n, timeout)


@pytest.fixture
def timers(clock):
    fired = Fired(clock)
    t = Timers(clock, fired, "test")
    t.fired = fired
    yield t
    t.close()
    t._thread.join(2)
    assert not t._thread.is_alive()


def test_singleshot_fires_once_not_early(timers, clock):
    deadline = clock.now_ns() + 20 * MS
    timers.set_singleshot(1, deadline)
    assert timers.fired.wait_for(1)
    vcpu, at = timers.fired.calls[0]
    assert vcpu == 1 and at >= deadline
    assert at < deadline + 500 * MS                   # and not absurdly late
    assert timers.singleshot == {}
    time.sleep(0.04)
    assert len(timers.fired.calls) == 1


def test_singleshot_in_the_past_fires_at_once(timers, clock):
    timers.set_singleshot(0, clock.now_ns() - 5 * MS)
    assert timers.fired.wait_for(1, 1.0)
    assert timers.fired.calls[0][0] == 0


def test_stop_singleshot_cancels(timers, clock):
    timers.set_singleshot(0, clock.now_ns() + 20 * MS)
    timers.stop_singleshot(0)
    time.sleep(0.06)
    assert timers.fired.calls == []
    timers.stop_singleshot(0)                          # stopping a stopped timer is fine


def test_rearmed_singleshot_fires_only_at_new_deadline(timers, clock):
    now = clock.now_ns()
    timers.set_singleshot(0, now + 10 * MS)
    timers.set_singleshot(0, now + 40 * MS)            # replaces the first
    assert timers.fired.wait_for(1)
    assert timers.fired.calls[0][1] >= now + 40 * MS
    time.sleep(0.02)
    assert len(timers.fired.calls) == 1


def test_singleshots_on_several_vcpus_fire_in_deadline_order(timers, clock):
    now = clock.now_ns()
    timers.set_singleshot(2, now + 30 * MS)
    timers.set_singleshot(0, now + 10 * MS)
    timers.set_singleshot(1, now + 20 * MS)
    assert timers.fired.wait_for(3)
    assert [v for v, _ in timers.fired.calls] == [0, 1, 2]


def test_periodic_fires_repeatedly_and_stops(timers, clock):
    start = clock.now_ns()
    timers.set_periodic(3, 5 * MS)
    assert timers.fired.wait_for(6)
    calls = list(timers.fired.calls)
    assert {v for v, _ in calls} == {3}
    assert calls[0][1] >= start + 5 * MS
    # never early: the k-th tick comes no sooner than k periods after arming
    for k, (_, at) in enumerate(calls, 1):
        assert at >= start + k * 5 * MS
    timers.stop_periodic(3)
    time.sleep(0.01)                                   # a tick already in fire() may land
    n = len(timers.fired.calls)
    time.sleep(0.03)
    assert len(timers.fired.calls) == n
    assert timers.periodic == {}


def test_periodic_and_singleshot_together(timers, clock):
    now = clock.now_ns()
    timers.set_periodic(0, 5 * MS)
    timers.set_singleshot(1, now + 12 * MS)
    assert timers.fired.wait_for(4)
    timers.stop_periodic(0)
    assert [v for v, _ in timers.fired.calls].count(1) <= 1
    deadline = time.monotonic() + 1
    while 1 not in [v for v, _ in timers.fired.calls] and time.monotonic() < deadline:
        time.sleep(0.005)
    assert [v for v, _ in timers.fired.calls].count(1) == 1


def test_close_stops_worker(clock):
    fired = Fired(clock)
    t = Timers(clock, fired, "closing")
    t.set_periodic(0, 5 * MS)
    t.close()
    t._thread.join(2)
    assert not t._thread.is_alive()
    n = len(fired.calls)
    time.sleep(0.02)
    assert len(fired.calls) == n


def test_save_load_rearms_timers(clock):
    fired = Fired(clock)
    t = Timers(clock, fired, "save")
    now = clock.now_ns()
    t.set_singleshot(0, now + 60_000 * MS)
    t.set_periodic(1, 30_000 * MS)
    st = t.save()
    t.close()
    fired2 = Fired(clock)
    t2 = Timers(clock, fired2, "load")
    try:
        t2.load(st, nvcpus=2)
        assert t2.save() == st
        # a deadline already past fires at once, as Xen raises it before the guest resumes
        t2.load({"singleshot": [[0, clock.now_ns() - MS]]}, nvcpus=2)
        assert [v for v, _ in fired2.calls] == [0]
        with pytest.raises(ValueError):
            t2.load({"singleshot": [[5, now]]}, nvcpus=2)
        with pytest.raises(ValueError):
            t2.load({"periodic": [[0, now, 0]]}, nvcpus=2)
    finally:
        t2.close()


def test_hold_delays_firing_until_release(clock):
    fired = Fired(clock)
    t = Timers(clock, fired, "hold")
    try:
        t.hold(True)
        t.set_singleshot(0, clock.now_ns() + 20 * MS)
        time.sleep(0.1)
        assert fired.calls == []
        assert t.save()["singleshot"]          # still armed: a save captures it
        t.hold(False)
        deadline = time.monotonic() + 2
        while not fired.calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [v for v, _ in fired.calls] == [0]
    finally:
        t.close()
