"""Extract the vmlinux ELF from a Linux bzImage (boot protocol >= 2.08).

Contract: :func:`is_bzimage` recognises the setup header; :func:`extract_elf` returns the
decompressed payload (an ELF image, possibly followed by the kernel's relocation table) or
raises :class:`~pyxen.errors.KernelImageError`. Called by ``kernel.load_pvh_kernel``.

Setup header (Documentation/x86/boot.rst, arch/x86/boot/header.S), byte offsets in the file:
``setup_sects`` u8 @0x1F1 (0 means 4), ``"HdrS"`` @0x202, ``version`` u16 @0x206,
``payload_offset`` u32 @0x248 and ``payload_length`` u32 @0x24C, both relative to the
protected-mode code, which starts at ``(setup_sects + 1) * 512``.

Compressions: gzip, xz, lz4 (Linux "legacy" frames), zstd, bzip2, lzma (alone), or none.
The kernel build appends the uncompressed size (4 bytes) to the payload; trailing bytes
after the compressed stream are ignored.
"""

from __future__ import annotations

import bz2
import lzma
import struct
import zlib
from typing import Callable

import lz4.block
import zstandard

from pyxen.errors import KernelImageError

SETUP_SECTS_OFFSET = 0x1F1
HDRS_OFFSET = 0x202
HDRS_MAGIC = b"HdrS"
VERSION_OFFSET = 0x206
PAYLOAD_OFFSET_OFFSET = 0x248
PAYLOAD_LENGTH_OFFSET = 0x24C
MIN_VERSION = 0x0208  # first protocol with payload_offset/payload_length
SECTOR = 512

LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
LZ4_LEGACY_BLOCK = 8 << 20  # each legacy block decompresses to at most 8 MiB


def is_bzimage(data: bytes) -> bool:
    """True if ``data`` carries an x86 boot setup header ("HdrS" at 0x202)."""
    return data[HDRS_OFFSET:HDRS_OFFSET + 4] == HDRS_MAGIC


def payload(data: bytes, path: str) -> bytes:
    """The compressed payload bytes named by the setup header."""
    if not is_bzimage(data):
        raise KernelImageError(path, "not a bzImage (no \"HdrS\" setup header at 0x202)")
    if len(data) < PAYLOAD_LENGTH_OFFSET + 4:
        raise KernelImageError(path, "truncated bzImage setup header")
    version = struct.unpack_from("<H", data, VERSION_OFFSET)[0]
    if version < MIN_VERSION:
        raise KernelImageError(path, f"bzImage boot protocol {version >> 8}.{version & 0xFF:02d} "
                                     "is older than 2.08 (no payload_offset)")
    setup_sects = data[SETUP_SECTS_OFFSET] or 4
    off, length = struct.unpack_from("<II", data, PAYLOAD_OFFSET_OFFSET)
    start = (setup_sects + 1) * SECTOR + off
    if length == 0 or start + length > len(data):
        raise KernelImageError(path, f"truncated bzImage: payload [{start:#x}, "
                                     f"{start + length:#x}) is beyond the file ({len(data):#x})")
    return data[start:start + length]


def extract_elf(data: bytes, path: str) -> bytes:
    """Decompress a bzImage's payload; the result starts with the vmlinux ELF header."""
    blob = payload(data, path)
    for magic, decompress in _DECOMPRESSORS:
        if blob.startswith(magic):
            try:
                return decompress(blob)
            except (OSError, EOFError, ValueError, RuntimeError, zlib.error, lzma.LZMAError,
                    zstandard.ZstdError) as exc:
                raise KernelImageError(path, f"bzImage payload does not decompress: {exc}") \
                    from exc
    raise KernelImageError(path, f"bzImage payload uses an unsupported compression "
                                 f"(magic bytes {blob[:6].hex(' ')})")


# ----------------------------------------------------------------------------- decompressors

def _gunzip(blob: bytes) -> bytes:
    d = zlib.decompressobj(wbits=31)
    out = d.decompress(blob)
    if not d.eof:
        raise ValueError("gzip stream is truncated")
    return out


def _stream(decompressor) -> Callable[[bytes], bytes]:
    def run(blob: bytes) -> bytes:
        d = decompressor()
        out = d.decompress(blob)
        if not d.eof:
            raise ValueError("compressed stream is truncated")
        return out
    return run


def _unzstd(blob: bytes) -> bytes:
    d = zstandard.ZstdDecompressor().decompressobj()
    out = d.decompress(blob)
    if not d.eof:
        raise ValueError("zstd stream is truncated")
    return out


def _unlz4_legacy(blob: bytes) -> bytes:
    """Linux lz4 legacy format: magic, then [u32 LE compressed size][block]... .

    Stops at the end of the data or at a size that does not fit (the appended 4-byte
    uncompressed length); a repeated magic starts a new concatenated stream.
    """
    out = []
    pos = 4
    while pos + 4 <= len(blob):
        size = struct.unpack_from("<I", blob, pos)[0]
        if blob[pos:pos + 4] == LZ4_LEGACY_MAGIC:
            pos += 4
            continue
        if size == 0 or pos + 4 + size > len(blob):
            break
        out.append(lz4.block.decompress(blob[pos + 4:pos + 4 + size],
                                        uncompressed_size=LZ4_LEGACY_BLOCK))
        pos += 4 + size
    if not out:
        raise ValueError("lz4 stream has no blocks")
    return b"".join(out)


_DECOMPRESSORS: list[tuple[bytes, Callable[[bytes], bytes]]] = [
    (b"\x1f\x8b", _gunzip),
    (b"\xfd7zXZ\x00", _stream(lambda: lzma.LZMADecompressor(lzma.FORMAT_XZ))),
    (LZ4_LEGACY_MAGIC, _unlz4_legacy),
    (b"\x28\xb5\x2f\xfd", _unzstd),
    (b"BZh", _stream(bz2.BZ2Decompressor)),
    (b"\x5d\x00\x00", _stream(lambda: lzma.LZMADecompressor(lzma.FORMAT_ALONE))),
    (b"\x7fELF", lambda blob: blob),  # CONFIG_KERNEL_UNCOMPRESSED
]
