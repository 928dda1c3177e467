#!/usr/bin/env python3
"""Guest user-space under load: N fork+exec of ``/bin/true`` in a busybox shell loop.

Runs the loop inside ``pyxen run --accel tcg`` and, side by side, inside QEMU's software
emulation (``-M microvm -accel tcg``, same kernel and initramfs). The guest times the loop
itself (``/proc/uptime`` before and after), so boot time is excluded. Prints JSON with the
count, seconds, forks per second and ``ratio = pyxen seconds / QEMU seconds``; a guest
error (a failed fork or exec, a non-zero status) fails the run.

Usage: bench/forkexec.py [--count 10000] [--runs 3]   (the issue's 10^6: --count 1000000)
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))


def loop(count: int) -> str:
    return ("a=$(cut -d' ' -f1 /proc/uptime); i=0; e=0; "
            f"while [ $i -lt {count} ]; do /bin/true || e=$((e+1)); i=$((i+1)); done; "
            "b=$(cut -d' ' -f1 /proc/uptime); echo LOOP $i $e $a $b")


def parse(out: str, count: int) -> float:
    m = re.search(r"LOOP (\d+) (\d+) ([\d.]+) ([\d.]+)", out)
    if not m or int(m.group(1)) != count or int(m.group(2)) != 0:
        raise SystemExit(f"guest loop failed: {out[-500:]!r}")
    return float(m.group(4)) - float(m.group(3))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=10000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    from pyxen.image.build import ensure_image
    from qemu_peer import qemu_binary, qemu_command

    img = ensure_image()
    pyxen = str(Path(sys.executable).parent / "pyxen")
    res: dict = {"count": args.count, "runs": args.runs, "kernel": img.release}
    secs = []
    for _ in range(args.runs):
        p = subprocess.run([pyxen, "run", "--accel", "tcg", "--", loop(args.count)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"pyxen run failed ({p.returncode}): {p.stderr[-500:]}")
        secs.append(parse(p.stdout, args.count))
    res["pyxen"] = {"seconds": statistics.median(secs),
                    "forks_per_s": round(args.count / statistics.median(secs), 1)}
    qemu = qemu_binary()
    if qemu:
        qsecs = []
        with tempfile.TemporaryDirectory() as tmp:
            cmd = qemu_command(qemu, img, loop(args.count), Path(tmp), modules=[])
            for _ in range(args.runs):
                p = subprocess.run(cmd, capture_output=True, text=True)
                qsecs.append(parse(p.stdout, args.count))
        res["qemu"] = {"seconds": statistics.median(qsecs),
                       "forks_per_s": round(args.count / statistics.median(qsecs), 1)}
        res["ratio"] = round(res["pyxen"]["seconds"] / res["qemu"]["seconds"], 3)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
