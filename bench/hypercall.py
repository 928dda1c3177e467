#!/usr/bin/env python3
"""Hypercall round trip by trap kind, and domain create-to-first-guest-instruction time.

Boots ``bench/hcbench.S`` (built here with gcc) several times on the kvm engine. The guest
emits markers on port 0xE9 around N direct VMCALL/VMMCALL hypercalls (trapped by a hardware
breakpoint), N bare port-I/O exits (the engine's floor), and N hypercalls through the
hypercall page (port-I/O stubs); the host timestamps the markers. Prints JSON.

Peer: QEMU from Debian (if installed) boots the same PVH image with -accel kvm, for the
create-to-first-instruction figure. QEMU cannot run Xen hypercalls on this host
(KVM_CAP_XEN_HVM = 0), so there is no peer figure for the round trip.

Usage: bench/hypercall.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from pyxen.vmm.builder import DomainConfig, build  # noqa: E402

N = 2000


def build_guest(tmp: Path) -> Path:
    elf = tmp / "hcbench.elf"
    subprocess.run(["gcc", "-nostdlib", "-static", "-no-pie", "-Wl,-Ttext=0x100000",
                    "-Wl,--build-id=none", "-o", str(elf), str(HERE / "hcbench.S")], check=True)
    return elf


def one_run(elf: Path) -> dict:
    marks: dict[str, int] = {}

    def stream(channel: str, data: bytes) -> None:
        now = time.perf_counter_ns()
        for ch in data.decode(errors="replace"):
            marks.setdefault(ch, now)

    t0 = time.perf_counter_ns()
    vmm = build(DomainConfig(kernel=str(elf), memory=16, name="hcbench", accel="kvm"),
                stream=stream)
    t_built = time.perf_counter_ns()
    vmm.start()
    state = vmm.wait(120)
    vmm.destroy()
    if state is None or state.reason != "poweroff" or not all(c in marks for c in "ABCDE"):
        raise RuntimeError(f"benchmark guest failed: {state}, markers {sorted(marks)}")
    return {
        "insn_us": (marks["C"] - marks["B"]) / N / 1000,
        "bare_exit_us": (marks["D"] - marks["C"]) / N / 1000,
        "page_us": (marks["E"] - marks["D"]) / N / 1000,
        "build_ms": (t_built - t0) / 1e6,
        "create_to_first_insn_ms": (marks["A"] - t0) / 1e6,
    }


def qemu_first_insn(elf: Path) -> float | None:
    """ms from starting QEMU (-accel kvm, microvm, same PVH image) to the guest's first byte."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return None
    t0 = time.perf_counter_ns()
    p = subprocess.Popen([qemu, "-M", "microvm", "-accel", "kvm", "-m", "16", "-nodefaults",
                          "-no-user-config", "-display", "none", "-kernel", str(elf),
                          "-debugcon", "stdio"], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)
    try:
        first = p.stdout.read(1) if p.stdout else b""
        t1 = time.perf_counter_ns()
    finally:
        p.kill()
        p.wait()
    return (t1 - t0) / 1e6 if first == b"A" else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        elf = build_guest(Path(tmp))
        runs = [one_run(elf) for _ in range(args.runs)]
        qemu = [q for q in (qemu_first_insn(elf) for _ in range(args.runs)) if q is not None]

    def med(key: str) -> float:
        return round(statistics.median(r[key] for r in runs), 2)

    result = {
        "engine": "kvm",
        "runs": args.runs,
        "hypercalls_per_run": N,
        "roundtrip_us": {"vmcall_breakpoint": med("insn_us"), "hypercall_page_pio": med("page_us")},
        "bare_port_exit_us": med("bare_exit_us"),
        "domain_build_ms": med("build_ms"),
        "create_to_first_insn_ms": med("create_to_first_insn_ms"),
        "peer": {
            "name": "qemu-system-x86_64 -M microvm -accel kvm (Debian)",
            "create_to_first_insn_ms": round(statistics.median(qemu), 2) if qemu else None,
            "roundtrip_us": None,
            "note": "QEMU's Xen emulation needs KVM_CAP_XEN_HVM, which this host lacks",
        },
    }
    if qemu:
        result["create_to_first_insn_ratio_vs_qemu"] = round(
            result["create_to_first_insn_ms"] / result["peer"]["create_to_first_insn_ms"], 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
