"""The peer both Linux benchmarks compare with: Debian's QEMU, software emulation, booting
pyxen's default image (the same kernel ELF and initramfs, plus a run overlay)."""

from __future__ import annotations

import shutil
from pathlib import Path


def qemu_binary() -> str | None:
    return shutil.which("qemu-system-x86_64")


def qemu_command(qemu: str, image, command: str, tmp: Path,  # type: ignore[no-untyped-def]
                 modules: list[str] | None = None) -> list[str]:
    """argv for ``-M microvm -accel tcg`` (1 vCPU, 256 MiB, console on ttyS0) running
    ``command`` through the image's /init; ``modules`` as for ``make_overlay``."""
    from pyxen.engine.tcg import _tsc_khz
    from pyxen.image.build import elf_kernel
    from pyxen.image.runspec import concat_initrd, make_overlay, new_nonce

    initrd = tmp / "initrd"
    initrd.write_bytes(concat_initrd(image.initramfs.read_bytes(),
                                     make_overlay("run", command, new_nonce(), modules=modules)))
    return [qemu, "-M", "microvm", "-accel", "tcg", "-cpu", "max", "-m", "256", "-smp", "1",
            "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
            "-kernel", str(elf_kernel(image)), "-initrd", str(initrd),
            "-append", f"console=ttyS0 quiet tsc_early_khz={_tsc_khz()}"]
