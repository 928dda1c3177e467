"""pyxen.arch.x86.bzimage and kernel.load_pvh_kernel."""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import struct
from pathlib import Path

import lz4.block
import pytest
import zstandard

from pyxen.arch.x86.bzimage import extract_elf, is_bzimage
from pyxen.arch.x86.kernel import load_pvh_kernel
from pyxen.errors import KernelImageError
from synth_elf import build, linux_like

ELF = build(linux_like())


def lz4_legacy(data: bytes, block: int = 8 << 20) -> bytes:
    out = b"\x02\x21\x4c\x18"
    for i in range(0, len(data), block):
        c = lz4.block.compress(data[i:i + block], store_size=False)
        out += struct.pack("<I", len(c)) + c
    return out


COMPRESSORS = {
    "gzip": gzip.compress,
    "xz": lambda d: lzma.compress(d, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32),
    "lz4": lz4_legacy,
    "lz4-multiblock": lambda d: lz4_legacy(d, block=100),
    "zstd": lambda d: zstandard.ZstdCompressor(level=19).compress(d),
    "bzip2": bz2.compress,
    "lzma": lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE),
    "none": lambda d: d,
}


def make_bzimage(payload: bytes, *, setup_sects: int = 3, version: int = 0x020F,
                 payload_offset: int = 0x3B4, trailer: bytes = b"") -> bytes:
    nsects = setup_sects or 4
    setup = bytearray((nsects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x1FE:0x200] = b"\x55\xaa"
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    struct.pack_into("<II", setup, 0x248, payload_offset, len(payload))
    pm_code = b"\xfc" * payload_offset  # the decompressor stub in a real image
    return bytes(setup) + pm_code + payload + trailer


@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_each_compression(name):
    # The kernel build appends the uncompressed size: trailing bytes inside payload_length.
    payload = COMPRESSORS[name](ELF) + struct.pack("<I", len(ELF))
    image = make_bzimage(payload, trailer=b"\0" * 512)
    assert is_bzimage(image)
    out = extract_elf(image, "bzImage")
    assert out[:len(ELF)] == ELF


@pytest.mark.parametrize("setup_sects", [0, 1, 30])
def test_setup_sects(setup_sects):
    image = make_bzimage(gzip.compress(ELF), setup_sects=setup_sects)
    assert extract_elf(image, "bz") == ELF


def test_unknown_compression_names_magic():
    image = make_bzimage(b"\xde\xad\xbe\xef\x01\x02" + bytes(64))
    with pytest.raises(KernelImageError, match="de ad be ef 01 02") as exc:
        extract_elf(image, "bz")
    assert exc.value.path == "bz"


def test_old_boot_protocol():
    with pytest.raises(KernelImageError, match="older than 2.08"):
        extract_elf(make_bzimage(gzip.compress(ELF), version=0x0206), "bz")


def test_payload_beyond_file():
    image = make_bzimage(gzip.compress(ELF))
    with pytest.raises(KernelImageError, match="truncated"):
        extract_elf(image[:-100], "bz")


def test_corrupt_stream():
    payload = bytearray(gzip.compress(ELF))
    payload[20:40] = b"\xff" * 20
    with pytest.raises(KernelImageError, match="does not decompress"):
        extract_elf(make_bzimage(bytes(payload)), "bz")


def test_not_bzimage():
    with pytest.raises(KernelImageError, match="HdrS"):
        extract_elf(bytes(4096), "bz")


# ----------------------------------------------------------------------------- load_pvh_kernel

def test_load_elf_and_bzimage(tmp_path: Path):
    (tmp_path / "vmlinux").write_bytes(ELF)
    (tmp_path / "bzImage").write_bytes(make_bzimage(COMPRESSORS["zstd"](ELF) + b"\1\2\3\4"))
    a = load_pvh_kernel(str(tmp_path / "vmlinux"))
    b = load_pvh_kernel(str(tmp_path / "bzImage"))
    assert a.entry == b.entry == 0x1000100
    assert a.hypercall_sites == b.hypercall_sites and len(a.hypercall_sites) == 4
    assert b.path == str(tmp_path / "bzImage")


def test_load_errors(tmp_path: Path):
    with pytest.raises(KernelImageError, match="file not found"):
        load_pvh_kernel(str(tmp_path / "missing"))
    with pytest.raises(KernelImageError, match="directory"):
        load_pvh_kernel(str(tmp_path))
    (tmp_path / "junk").write_bytes(b"hello world")
    with pytest.raises(KernelImageError, match="neither an ELF image nor a bzImage"):
        load_pvh_kernel(str(tmp_path / "junk"))
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(KernelImageError, match="empty"):
        load_pvh_kernel(str(tmp_path / "empty"))


def _real_kernels() -> list[Path]:
    dirs = [Path("/var/cache/pyxen"), Path(os.path.expanduser("~/.cache/pyxen"))]
    return sorted(p for d in dirs if d.is_dir() for p in d.rglob("vmlinuz*") if p.is_file())


@pytest.mark.skipif(not _real_kernels(), reason="no cached Debian kernel (vmlinuz*) present")
def test_real_debian_kernel():
    k = load_pvh_kernel(str(_real_kernels()[0]))
    assert 0x1000000 <= k.entry < k.image_end
    assert k.guest_os == "linux"
    # xen_hypercall_amd/intel: virtual + physical alias each (xen-abi.md 2.1)
    assert len(k.hypercall_sites) == 4
    phys = [s for s in k.hypercall_sites if s < 1 << 32]
    assert phys[1] - phys[0] == 0x10 and phys[0] % 16 == 0


def test_truncated_setup_header():
    image = make_bzimage(gzip.compress(ELF))
    with pytest.raises(KernelImageError, match="truncated bzImage setup header"):
        extract_elf(image[:0x210], "bz")
