"""Debian's stock cloud kernel as a pyxen PVH guest, through ``pyxen run`` (the user's path).

One boot runs a script that reports everything the checks need and exits 3; a second boot
has 4 vCPUs. The image comes from Debian's archive (``pyxen image``), cached outside git.
The kvm variant runs only where KVM executes guest ring 0 natively (VT-x/AMD-V).
"""

from __future__ import annotations

import io
import re

import pytest

from pyxen.testing.toolstack import guest_image
from pyxen.vmm.builder import hardware_virtualisation

pytestmark = pytest.mark.tcg

FORKS = 300

SCRIPT = (
    "echo TYPE=$(cat /sys/hypervisor/type); echo UNAME=$(uname -r); "
    "i=0; while [ $i -lt %d ]; do /bin/true || echo FORKFAIL; i=$((i+1)); done; echo FORKS=$i; "
    "echo DMESG-BEGIN; dmesg; echo DMESG-END; exit 3" % FORKS)


@pytest.fixture(scope="module")
def image():
    return guest_image()


def _run(command: str, **kw):
    from pyxen.vmm.run import RunOptions, run
    out = io.BytesIO()
    r = run(RunOptions(command=command, timeout=kw.pop("timeout", 240), **kw), out)
    return r, out.getvalue().decode(errors="replace")


@pytest.fixture(scope="module")
def report(image):
    r, out = _run(SCRIPT, accel="tcg")
    assert r.status is not None, f"no exit status ({r.reason} {r.detail}):\n{r.console_tail}"
    return r, out


def test_runs_on_xen_with_the_debian_kernel(report, image):
    _r, out = report
    assert "TYPE=xen" in out
    assert f"UNAME={image.release}" in out


def test_exit_status_is_the_commands(report):
    r, _out = report
    assert r.status == 3
    assert r.reason == "poweroff"


def test_dmesg_shows_pvh_xen_clock_and_events_and_no_warnings(report):
    _r, out = report
    dmesg = out.split("DMESG-BEGIN", 1)[1].split("DMESG-END", 1)[0]
    assert "Booting kernel on Xen PVH" in dmesg or "Xen PVH" in dmesg
    assert re.search(r"Hypervisor detected: Xen", dmesg)
    assert "clocksource: Switched to clocksource xen" in dmesg
    assert re.search(r"xen:events: Using (2-level|FIFO)", dmesg)
    for bad in ("WARNING:", "BUG:", "Oops", "Call Trace", "soft lockup", "RCU stall"):
        assert bad not in dmesg, f"{bad!r} in guest dmesg"


def test_fork_exec_loop_completes(report):
    _r, out = report
    assert f"FORKS={FORKS}" in out and "FORKFAIL" not in out


@pytest.mark.parametrize("vcpus", [4, 8])
def test_smp_guest_sees_every_vcpu(image, vcpus):
    r, out = _run("nproc; grep -c ^processor /proc/cpuinfo; cat /sys/devices/system/cpu/online",
                  accel="tcg", vcpus=vcpus, memory=512)
    assert r.status == 0, r.console_tail
    assert out.split()[:3] == [str(vcpus), str(vcpus), f"0-{vcpus - 1}"]


@pytest.mark.kvm
@pytest.mark.skipif(not hardware_virtualisation(),
                    reason="KVM here cannot run guest ring 0 natively (no VT-x/AMD-V): "
                           "a stock kernel cannot boot on the kvm engine on this host")
def test_same_boot_path_on_kvm(image):
    r, out = _run("cat /sys/hypervisor/type; exit 3", accel="kvm")
    assert r.status == 3 and "xen" in out


def test_interactive_shell_and_ctrl_bracket_detach(image):
    """Without a command: a shell on hvc0 through a terminal; Ctrl-] ends the session."""
    import os
    import pty
    import select
    import sys
    import time

    pid, fd = pty.fork()
    if pid == 0:                                     # child: the CLI on a pseudo-terminal
        os.execv(sys.executable, [sys.executable, "-m", "pyxen.cli.main", "run",
                                  "--accel", "tcg"])
    buf = bytearray()

    def read_until(token: bytes, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if token in buf:
                return True
            r, _, _ = select.select([fd], [], [], 0.1)
            if r:
                try:
                    buf.extend(os.read(fd, 4096))
                except OSError:
                    break
        return token in buf

    try:
        assert read_until(b"pyxen:~# ", 120), bytes(buf[-500:])
        os.write(fd, b"echo answer-$((6*7))\r")
        assert read_until(b"answer-42", 60), bytes(buf[-500:])
        os.write(fd, b"\x1d")                        # Ctrl-]
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        os.close(fd)


@pytest.mark.parametrize("command, reason", [
    ("reboot -f", "reboot"),                         # ACPI reset register
    ("echo c > /proc/sysrq-trigger", "crash"),       # panic -> SCHEDOP_shutdown(crash)
])
def test_reboot_and_crash_end_the_domain_with_their_reason(image, command, reason):
    r, _out = _run(command, accel="tcg", timeout=120)
    assert r.status is None and r.reason == reason, (r.reason, r.detail, r.console_tail[-500:])
