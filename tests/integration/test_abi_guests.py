"""Each in-tree test guest checks one area of the Xen ABI from inside a real KVM domain."""

from __future__ import annotations

import pytest

from pyxen.testing.guests import SHUTDOWN_REASONS, SUITE, available, run_guest

pytestmark = pytest.mark.kvm


def _id(spec):
    if spec.name != "sched":
        return spec.name
    return "sched-suspend-cancelled" if spec.resume_suspend else f"sched-{spec.reason}"


@pytest.mark.parametrize("spec", available(SUITE + SHUTDOWN_REASONS), ids=_id)
def test_guest(spec, guest_elfs):
    r = run_guest(spec, guest_elfs)
    assert r.passed, f"{spec.name}: {r.summary}\n{r.debug}"
    assert r.checks > 0


@pytest.mark.skipif(not available(tuple(s for s in SUITE if s.name == "console")),
                    reason="console guest not in this checkout")
def test_console_ring_output_reaches_the_console_log(guest_elfs):
    spec = next(s for s in SUITE if s.name == "console")
    r = run_guest(spec, guest_elfs)
    assert "hvc: hello from the ring" in r.console
    assert "hvc: got ping" in r.console
