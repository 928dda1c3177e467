"""pyxen's own test guests (``guests/``): building them and booting each with what it expects.

Each guest checks one area of the Xen ABI from the inside and prints ``RESULT <area> PASS <n>``
or ``RESULT <area> FAIL <k>/<n>`` on the debug port, preceded by ``FAIL <area>: ...`` lines.
:func:`run_guest` boots one guest with the vCPUs, command line, modules and console input its
spec names, and judges the run from that line and the domain's shutdown reason.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pyxen.errors import GuestBuildError

MODULE_BYTES = b"pyxen-module-0"


@dataclass(frozen=True)
class GuestSpec:
    """How to boot one test guest and what a pass looks like."""

    name: str
    vcpus: int = 1
    memory: int = 16                       # MiB
    cmdline: str = ""
    modules: tuple[tuple[bytes, str], ...] = ()
    reason: str = "poweroff"               # expected shutdown reason
    console_input: tuple[tuple[str, bytes], ...] = ()   # (text seen on debug port, input)
    resume_suspend: bool = False           # answer SHUTDOWN_suspend with "cancelled" (1)
    timeout: float = 60.0


def _sched(reason: str, **kw: object) -> GuestSpec:
    return GuestSpec("sched", cmdline=f"selftest sched reason={reason}", reason=reason, **kw)


#: The selftest suite: one entry per ABI area (plus every shutdown reason for sched).
SUITE: tuple[GuestSpec, ...] = (
    GuestSpec("boot", vcpus=2, cmdline="selftest boot arg=42 vcpus=2",
              modules=((MODULE_BYTES, "mod0 arg"),)),
    GuestSpec("version"),
    GuestSpec("hcall_page"),
    GuestSpec("memory", memory=32),
    GuestSpec("hvm"),
    GuestSpec("vcpu", vcpus=2),
    GuestSpec("evtchn", vcpus=2),
    GuestSpec("gnttab"),
    _sched("poweroff"),
    GuestSpec("console", console_input=(("READY console-input", b"ping\n"),)),
)

#: Extra shutdown reasons exercised by the integration tests and ``selftest --all``.
SHUTDOWN_REASONS: tuple[GuestSpec, ...] = (
    _sched("reboot"), _sched("crash"), _sched("watchdog"), _sched("soft_reset"),
    GuestSpec("sched", cmdline="selftest sched reason=suspend", reason="poweroff",
              resume_suspend=True),
)


def available(specs: tuple[GuestSpec, ...]) -> tuple[GuestSpec, ...]:
    """The specs whose guest sources exist in this checkout."""
    src = source_dir()
    return tuple(s for s in specs if (src / s.name / "main.c").exists())


def source_dir() -> Path:
    """The ``guests/`` directory (a checkout) or the copy installed with the package."""
    env = os.environ.get("PYXEN_GUESTS_SRC")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "guests" / "Makefile").exists():
            return parent / "guests"
    raise GuestBuildError("cannot find the guests/ sources (set PYXEN_GUESTS_SRC)")


def build_guests(out_dir: Path | None = None) -> Path:
    """Build every test guest with the system gcc (``make -C guests``); returns the ELF dir."""
    if shutil.which("make") is None or shutil.which("gcc") is None:
        raise GuestBuildError("building the test guests needs make and gcc "
                              "(apt-get install build-essential)")
    src = source_dir()
    out = out_dir or Path(os.environ.get("PYXEN_GUESTS_OUT",
                                         Path(tempfile.gettempdir()) / "pyxen-guests"))
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["make", "-s", "-C", str(src), f"BUILD={out}"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise GuestBuildError(f"make -C {src} failed:\n{proc.stdout}{proc.stderr}")
    return out


@dataclass
class GuestResult:
    """Outcome of one guest run."""

    spec: GuestSpec
    passed: bool
    summary: str
    reason: str = ""
    checks: int = 0
    failures: list[str] = field(default_factory=list)
    debug: str = ""
    console: str = ""
    seconds: float = 0.0


_RESULT = re.compile(r"^RESULT (\S+) (PASS|FAIL) (\S+)\s*$", re.M)


def run_guest(spec: GuestSpec, elf_dir: Path, accel: str = "kvm") -> GuestResult:
    """Boot ``spec``'s guest, feed it its console input, wait for shutdown, judge the result."""
    from pyxen.vmm.builder import DomainConfig, build

    t0 = time.monotonic()
    elf = elf_dir / f"{spec.name}.elf"
    debug = bytearray()
    console = bytearray()
    seen = threading.Condition()

    def stream(channel: str, data: bytes) -> None:
        with seen:
            (debug if channel == "debug" else console).extend(data)
            seen.notify_all()

    with tempfile.TemporaryDirectory() as tmp:
        mods = []
        for i, (data, mcmd) in enumerate(spec.modules):
            p = Path(tmp) / f"module{i}"
            p.write_bytes(data)
            mods.append((str(p), mcmd))
        cfg = DomainConfig(kernel=str(elf), name=f"selftest-{spec.name}", memory=spec.memory,
                           vcpus=spec.vcpus, cmdline=spec.cmdline, modules=mods, accel=accel)
        vmm = build(cfg, stream=stream)
        try:
            vmm.start()
            deadline = time.monotonic() + spec.timeout
            for trigger, text in spec.console_input:
                with seen:
                    ok = seen.wait_for(lambda: trigger.encode() in debug
                                       or vmm.domain.runstate.state != "running",
                                       max(0.0, deadline - time.monotonic()))
                if ok and vmm.domain.runstate.state == "running":
                    vmm.console.send_input(text)
            state = vmm.wait(max(0.0, deadline - time.monotonic()))
            suspended = False
            if (state is not None and spec.resume_suspend and state.state == "shutdown"
                    and state.reason == "suspend"):
                suspended = True
                vmm.domain.resume_from_suspend(1)
                time.sleep(0.01)
                state = vmm.wait(max(0.0, deadline - time.monotonic()))
            reason = "timeout" if state is None else (state.reason or state.state)
            detail = "" if state is None else state.detail
        finally:
            vmm.destroy()
    text = debug.decode(errors="replace")
    failures = [line for line in text.splitlines() if line.startswith("FAIL ")]
    m = None
    for m in _RESULT.finditer(text):
        pass
    checks = 0
    if m is None:
        summary = f"no RESULT line (domain ended: {reason}{', ' + detail if detail else ''})"
        passed = False
    else:
        verdict, count = m.group(2), m.group(3)
        checks = int(count.split("/")[-1]) if count.split("/")[-1].isdigit() else 0
        passed = verdict == "PASS" and reason == spec.reason and not failures
        if spec.resume_suspend and not (suspended and "RESUMED 1" in text):
            passed = False
            summary_extra = ", suspend was not seen and cancelled"
        else:
            summary_extra = ""
        summary = f"{verdict} {count}{summary_extra}"
        if reason != spec.reason:
            summary += f", ended with {reason} (expected {spec.reason})"
    return GuestResult(spec, passed, summary, reason, checks, failures, text,
                       console.decode(errors="replace"), time.monotonic() - t0)
