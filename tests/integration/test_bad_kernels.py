"""Kernel files that cannot be booted get an error naming the file and the reason."""

from __future__ import annotations

import pytest

from pyxen.errors import KernelImageError
from pyxen.vmm.builder import DomainConfig, build


def test_missing_file(tmp_path):
    path = tmp_path / "nope"
    with pytest.raises(KernelImageError) as e:
        build(DomainConfig(kernel=str(path)))
    assert str(path) in str(e.value)


def test_not_an_elf(tmp_path):
    path = tmp_path / "junk"
    path.write_bytes(b"this is not a kernel" * 100)
    with pytest.raises(KernelImageError) as e:
        build(DomainConfig(kernel=str(path)))
    assert str(path) in str(e.value)


def test_elf_without_pvh_note(tmp_path):
    import shutil
    import subprocess
    if shutil.which("gcc") is None:
        pytest.skip("no gcc")
    src = tmp_path / "plain.S"
    src.write_text(".globl _start\n_start: hlt\n")
    elf = tmp_path / "plain.elf"
    subprocess.run(["gcc", "-nostdlib", "-static", "-Wl,-Ttext=0x100000", "-o", str(elf),
                    str(src)], check=True)
    with pytest.raises(KernelImageError) as e:
        build(DomainConfig(kernel=str(elf)))
    assert "PHYS32_ENTRY" in str(e.value) and str(elf) in str(e.value)
