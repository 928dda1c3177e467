#!/usr/bin/env python3
"""Block I/O in the guest: pyxen (xen-blkfront on pyxen's backend) against QEMU's software
emulation (virtio-blk), the same kernel, initramfs and raw image, in the same run.

Measured inside the guest (boot excluded) on a raw image the bench creates (``--image-mib``,
filled with non-zero data before every guest boot, so every boot starts from the same bytes),
by ``iobench`` (``bench/guest/iobench.c``, built here with ``gcc -O2 -static``), all O_DIRECT:

* ``seq_read`` / ``seq_write``: ``--mib`` MiB in 1 MiB blocks from offset 0 (as
  ``dd bs=1M iflag/oflag=direct``; the write's final fdatasync is timed). MiB/s.
* ``rand_read_4k`` / ``rand_write_4k``: 4 KiB at random 4 KiB-aligned offsets over the whole
  image (fixed-seed xorshift, the same offsets on both sides) for ``--seconds``. IOPS.

Order in each boot: seq read, random read (both see the host's data), seq write, random write.
Busybox's ``dd`` here prints no rate and its ``date`` has no ``%N``, so iobench does the
sequential runs too (same I/O pattern as dd, its own CLOCK_MONOTONIC timing).

How iobench gets into the guest: both sides boot the image's initramfs with an extra cpio
holding ``/usr/bin/iobench`` (``runspec.files_archive``). QEMU gets it inside the run overlay
(``make_overlay(files=...)``); pyxen gets ``--kernel <image vmlinux> --initrd <initramfs +
files archive>`` (existing ``pyxen run`` flags; pyxen appends its own run overlay), so no tools
disk is needed and the disk under test holds only data.

* pyxen: ``pyxen run --accel tcg --vcpus 1 --memory 256 --disk IMG,raw,xvdb,rw -- ...``
  (the guest sees /dev/xvdb through xen-blkfront).
* QEMU: ``qemu-system-x86_64 -M microvm -accel tcg -cpu max -m 256 -smp 1 ... -drive
  file=IMG,if=none,format=raw,id=d0,cache=writeback -device virtio-blk-device,drive=d0``
  (virtio-mmio found through microvm's ACPI tables; the guest loads virtio_mmio and
  virtio_blk from the image and sees /dev/vda). Both sides go through the host page cache.

Prints one JSON object: ``rows`` (test, unit, pyxen, qemu, ratio = pyxen/qemu; higher is
better for pyxen on every row), medians of ``--runs`` boots per side (runs alternate between
the sides), per-run samples, and ``errors`` ({side: message}) for a side that failed; that
side's values are null. Exit status 0 when both sides produced numbers, 1 otherwise.

Usage: bench/blk.py [--runs 3] [--mib 128] [--image-mib 256] [--seconds 10] [--dir /var/tmp]
       (quick check: bench/blk.py --mib 32 --image-mib 64 --seconds 3 --runs 1)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

# pyxen runs as a user would run it: with Python's bytecode cache (some CI shells disable it)
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}

SIDES = ("pyxen", "qemu")
IOBENCH_SRC = HERE / "guest" / "iobench.c"
GUEST_TOOL = "/usr/bin/iobench"
VIRTIO_MODULES = ["virtio_mmio", "virtio_blk", "virtio_net"]
MEMORY_MIB = 256
VCPUS = 1

TESTS = (  # name, unit, iobench mode, field of its JSON line
    ("seq_read", "MiB/s", "seqread", "mib_s"),
    ("rand_read_4k", "IOPS", "randread", "iops"),
    ("seq_write", "MiB/s", "seqwrite", "mib_s"),
    ("rand_write_4k", "IOPS", "randwrite", "iops"),
)


class SideError(Exception):
    """One side of the comparison could not produce a number (reported, not raised out)."""


# ------------------------------------------------------------------------------ shared helpers


def build_iobench(tmp: Path) -> bytes:
    """``bench/guest/iobench.c`` as a static x86-64 binary (host gcc and static glibc)."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise SystemExit(json.dumps({"error": "no gcc on the host to build iobench"}))
    out = tmp / "iobench"
    p = subprocess.run([cc, "-O2", "-static", "-o", str(out), str(IOBENCH_SRC)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(json.dumps({"error": "building iobench failed (needs gcc and a "
                                     "static libc, libc6-dev)", "detail": p.stderr[-2000:]}))
    return out.read_bytes()


def qemu_version(qemu: str) -> str:
    p = subprocess.run([qemu, "--version"], capture_output=True, text=True)
    return p.stdout.splitlines()[0] if p.stdout else "?"


def qemu_argv(qemu: str, image: Any, command: str, tmp: Path, files: Mapping[str, bytes],
              extra: list[str], tag: str = "q") -> list[str]:
    """The argv of ``bench/qemu_peer.py`` (``-M microvm -accel tcg -cpu max``, console on
    ttyS0) with the virtio modules, ``files`` in the run overlay and ``extra`` devices."""
    from pyxen.engine.tcg import _tsc_khz
    from pyxen.image.build import elf_kernel
    from pyxen.image.runspec import concat_initrd, make_overlay, new_nonce

    initrd = tmp / f"initrd-{tag}"
    initrd.write_bytes(concat_initrd(image.initramfs.read_bytes(),
                                     make_overlay("run", command, new_nonce(),
                                                  modules=VIRTIO_MODULES, files=files)))
    return [qemu, "-M", "microvm", "-accel", "tcg", "-cpu", "max", "-m", str(MEMORY_MIB),
            "-smp", str(VCPUS), "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
            "-kernel", str(elf_kernel(image)), "-initrd", str(initrd),
            "-append", f"console=ttyS0 quiet loglevel=1 tsc_early_khz={_tsc_khz()}", *extra]


def pyxen_argv(image: Any, command: str, tmp: Path, files: Mapping[str, bytes],
               devices: list[str], accel: str, timeout: float) -> list[str]:
    """``pyxen run`` with the image's kernel and initramfs plus a cpio holding ``files``."""
    from pyxen.image.build import elf_kernel
    from pyxen.image.runspec import concat_initrd, files_archive

    initrd = tmp / "initrd-pyxen-base"
    if not initrd.exists():
        initrd.write_bytes(concat_initrd(image.initramfs.read_bytes(), files_archive(files)))
    pyxen = str(Path(sys.executable).parent / "pyxen")
    return [pyxen, "run", "--accel", accel, "--vcpus", str(VCPUS), "--memory", str(MEMORY_MIB),
            "--timeout", str(int(timeout)), "--kernel", str(elf_kernel(image)),
            "--initrd", str(initrd), *devices, "--", command]


def json_lines(out: str) -> list[dict[str, Any]]:
    """The ``{"mode": ...}`` lines iobench printed (console noise around them ignored)."""
    found = []
    for m in re.finditer(r'\{"mode":[^\n{}]*\}', out):
        try:
            found.append(json.loads(m.group(0)))
        except ValueError:
            pass
    return found


def run_guest(argv: list[str], timeout: float) -> str:
    """Run one guest to completion; its stdout, or SideError with the tail of its output."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, errors="replace",
                           timeout=timeout, env=ENV, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) \
            else (e.stdout or "")
        raise SideError(f"timed out after {timeout:.0f}s; output tail: {out[-600:]!r}") from e
    except OSError as e:
        raise SideError(f"cannot start {argv[0]}: {e}") from e
    if p.returncode != 0:
        raise SideError(f"exit status {p.returncode}; stderr tail: {p.stderr[-800:]!r}; "
                        f"stdout tail: {p.stdout[-400:]!r}")
    return p.stdout


def median_rows(tests: list[tuple[str, str]], samples: dict[str, dict[str, list[float]]],
                errors: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    for name, unit in tests:
        row: dict[str, Any] = {"test": name, "unit": unit}
        for side in SIDES:
            vals = samples[side].get(name, [])
            row[side] = round(statistics.median(vals), 2) if vals and side not in errors \
                else None
        row["ratio"] = (round(row["pyxen"] / row["qemu"], 3)
                        if row["pyxen"] is not None and row["qemu"] else None)
        rows.append(row)
    return rows


def alternate(runs: int, sides: dict[str, Callable[[], dict[str, float]]],
              samples: dict[str, dict[str, list[float]]], errors: dict[str, str],
              log: Callable[[str], None]) -> None:
    """``runs`` rounds of one measurement per side (pyxen first); a side that fails once is
    recorded in ``errors`` and not tried again."""
    for i in range(runs):
        for side, fn in sides.items():
            if side in errors:
                continue
            try:
                got = fn()
            except SideError as e:
                errors[side] = str(e)
                log(f"{side}: run {i + 1} failed: {e}")
                continue
            log(f"{side}: run {i + 1}: {got}")
            for k, v in got.items():
                samples[side].setdefault(k, []).append(v)


def log_stderr(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ blk


def guest_script(dev: str, mib: int, seconds: float) -> str:
    """The guest command: wait for ``dev``, then the four iobench runs in order."""
    t = GUEST_TOOL
    return (f"i=0; while [ ! -b {dev} ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done; "
            f"[ -b {dev} ] || {{ echo 'no block device {dev}'; cat /proc/partitions; exit 3; }}; "
            f"{t} seqread {dev} -n {mib} && {t} randread {dev} -t {seconds} && "
            f"{t} seqwrite {dev} -n {mib} && {t} randwrite {dev} -t {seconds}")


def parse_blk(out: str) -> dict[str, float]:
    lines = {j["mode"]: j for j in json_lines(out)}
    res = {}
    for name, _unit, mode, field in TESTS:
        j = lines.get(mode)
        if j is None or "error" in j:
            raise SideError(f"{mode}: {j['error'] if j else 'no result'}; output tail: "
                            f"{out[-600:]!r}")
        res[name] = float(j[field])
    return res


def fill_image(path: Path, mib: int) -> None:
    """A fresh raw image of ``mib`` MiB, every block non-zero and distinct."""
    block = bytearray(os.urandom(1 << 20))
    with open(path, "wb") as f:
        for i in range(mib):
            block[:8] = i.to_bytes(8, "little")
            f.write(block)
        f.flush()
        os.fsync(f.fileno())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mib", type=int, default=128, help="sequential MiB per test")
    ap.add_argument("--image-mib", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=10, help="per random-I/O test")
    ap.add_argument("--accel", default="tcg", help="pyxen's engine (default tcg)")
    ap.add_argument("--timeout", type=float, default=600, help="per guest boot")
    ap.add_argument("--dir", default="/var/tmp", help="where the temporary image lives")
    ap.add_argument("--only", choices=SIDES, help="run one side only")
    args = ap.parse_args()
    image_mib = max(args.image_mib, args.mib)

    from pyxen.image.build import ensure_image
    from qemu_peer import qemu_binary

    img = ensure_image()
    qemu = qemu_binary()
    errors: dict[str, str] = {}
    samples: dict[str, dict[str, list[float]]] = {s: {} for s in SIDES}
    result: dict[str, Any] = {"runs": args.runs, "image_mib": image_mib, "seq_mib": args.mib,
                              "rand_seconds": args.seconds, "vcpus": VCPUS,
                              "memory_mib": MEMORY_MIB, "kernel": img.release,
                              "qemu_version": qemu_version(qemu) if qemu else None}
    with tempfile.TemporaryDirectory(prefix="pyxen-blk-", dir=args.dir) as tmpdir:
        tmp = Path(tmpdir)
        files = {GUEST_TOOL: build_iobench(tmp)}
        disk = tmp / "disk.img"
        qcmd = qemu_argv(qemu, img, guest_script("/dev/vda", args.mib, args.seconds), tmp,
                         files, ["-drive", f"file={disk},if=none,format=raw,id=d0,"
                                 "cache=writeback", "-device", "virtio-blk-device,drive=d0"]
                         ) if qemu else []
        pcmd = pyxen_argv(img, guest_script("/dev/xvdb", args.mib, args.seconds), tmp, files,
                          ["--disk", f"{disk},raw,xvdb,rw"], args.accel, args.timeout)
        result["commands"] = {"pyxen": " ".join(pcmd[:-1]) + " <script>",
                              "qemu": " ".join(qcmd) if qcmd else None}
        if not qemu:
            errors["qemu"] = "qemu-system-x86_64 not found (apt-get install qemu-system-x86)"
        if args.only:
            errors.setdefault(next(s for s in SIDES if s != args.only), "skipped (--only)")

        def one(argv: list[str]) -> Callable[[], dict[str, float]]:
            def fn() -> dict[str, float]:
                fill_image(disk, image_mib)
                return parse_blk(run_guest(argv, args.timeout + 30))
            return fn

        alternate(args.runs, {"pyxen": one(pcmd), "qemu": one(qcmd)}, samples, errors,
                  log_stderr)
    rows = median_rows([(t[0], t[1]) for t in TESTS], samples, errors)
    print(json.dumps({"rows": rows, **result, "samples": samples, "errors": errors}, indent=2))
    return 0 if not errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
