#!/usr/bin/env python3
"""Boot time of Debian's stock kernel: ``pyxen run`` against QEMU's software emulation.

Both sides boot the same kernel and the same initramfs (pyxen's default image plus a run
overlay whose command prints a line and exits), with 1 vCPU and 256 MiB:

* pyxen: ``pyxen run --accel tcg -- echo <tag>`` as a subprocess (PVH domain, hvc0).
* QEMU (Debian's qemu-system-x86_64): ``-M microvm -accel tcg``, the kernel's vmlinux ELF
  (PVH entry) via ``-kernel``, console on ttyS0, ``poweroff -f`` through microvm's ACPI.

Measured per run (wall clock, seconds, from process start): ``first_output`` — the first
byte of the command's output (the earliest user-space moment both sides can see without
guest instrumentation; /init runs a few shell lines before it), and ``exit`` — process exit
after the guest powered off. Prints JSON with medians over ``--runs`` and
``ratio = pyxen exit / QEMU exit``.

Usage: bench/boot.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

TAG = "pyxen-bench-first-output"


# pyxen runs as a user would run it: with Python's bytecode cache (some CI shells disable it)
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def timed(cmd: list[str], tag: bytes, timeout: float = 300) -> tuple[float | None, float, int]:
    """Run ``cmd``; return (time to ``tag`` on stdout, time to exit, exit status)."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=ENV)
    seen: float | None = None
    buf = b""
    assert p.stdout is not None
    while True:
        chunk = p.stdout.read1(4096)
        if not chunk:
            break
        buf += chunk
        if seen is None and tag in buf:
            seen = time.monotonic() - t0
    rc = p.wait(timeout)
    return seen, time.monotonic() - t0, rc


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()

    from pyxen.image.build import ensure_image
    from qemu_peer import qemu_binary, qemu_command

    img = ensure_image()
    pyxen = str(Path(sys.executable).parent / "pyxen")
    result: dict = {"kernel": img.release, "runs": args.runs, "vcpus": 1, "memory_mib": 256}

    timed([pyxen, "run", "--accel", "tcg", "--", "true"], b"")        # warm-up: caches
    rows = [timed([pyxen, "run", "--accel", "tcg", "--", f"echo {TAG}"], TAG.encode())
            for _ in range(args.runs)]
    if any(rc != 0 or s is None for s, _, rc in rows):
        print(json.dumps({"error": "pyxen run failed", "rows": rows}))
        return 1
    result["pyxen"] = {"first_output_s": statistics.median(r[0] for r in rows),
                       "exit_s": statistics.median(r[1] for r in rows),
                       "samples_exit_s": [round(r[1], 3) for r in rows]}

    qemu = qemu_binary()
    if qemu:
        with tempfile.TemporaryDirectory() as tmp:
            # the same /init work as pyxen's run: it loads the image's frontend modules
            # (signature checks included); outside Xen their init just fails
            cmd = qemu_command(qemu, img, f"echo {TAG}", Path(tmp))
            qrows = [timed(cmd, TAG.encode()) for _ in range(args.runs)]
        result["qemu"] = {"command": " ".join(cmd[:12]) + " ...",
                          "first_output_s": statistics.median(r[0] or 0 for r in qrows),
                          "exit_s": statistics.median(r[1] for r in qrows),
                          "samples_exit_s": [round(r[1], 3) for r in qrows]}
        result["ratio"] = round(result["pyxen"]["exit_s"] / result["qemu"]["exit_s"], 3)
    else:
        result["qemu"] = None
        result["ratio"] = None
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
