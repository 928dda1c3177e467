"""Each in-tree test guest checks one area of the Xen ABI from inside a real domain, on both
engines: the same guests and the same expectations for kvm and tcg."""

from __future__ import annotations

import pytest

from pyxen.testing.guests import SHUTDOWN_REASONS, SUITE, available, run_guest

ENGINES = [pytest.param("kvm", marks=pytest.mark.kvm), pytest.param("tcg", marks=pytest.mark.tcg)]


def _id(spec):
    if spec.name != "sched":
        return spec.name
    return "sched-suspend-cancelled" if spec.resume_suspend else f"sched-{spec.reason}"


@pytest.mark.parametrize("accel", ENGINES)
@pytest.mark.parametrize("spec", available(SUITE + SHUTDOWN_REASONS), ids=_id)
def test_guest(spec, accel, guest_elfs):
    r = run_guest(spec, guest_elfs, accel=accel)
    assert r.passed, f"{spec.name}: {r.summary}\n{r.debug}"
    assert r.checks > 0


@pytest.mark.skipif(not available(tuple(s for s in SUITE if s.name == "console")),
                    reason="console guest not in this checkout")
@pytest.mark.parametrize("accel", ENGINES)
def test_console_ring_output_reaches_the_console_log(accel, guest_elfs):
    spec = next(s for s in SUITE if s.name == "console")
    r = run_guest(spec, guest_elfs, accel=accel)
    assert "hvc: hello from the ring" in r.console
    assert "hvc: got ping" in r.console
