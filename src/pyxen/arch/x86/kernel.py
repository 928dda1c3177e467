"""Load a PVH kernel file: an ELF vmlinux or a bzImage wrapping one.

Contract: :func:`load_pvh_kernel` is the one function that touches the file system on the
boot path. The domain builder calls it once per boot and uses the returned
:class:`~pyxen.arch.x86.elf.PvhKernel`. Every failure is a
:class:`~pyxen.errors.KernelImageError` naming the file and the reason.
"""

from __future__ import annotations

from pyxen.arch.x86 import bzimage
from pyxen.arch.x86.elf import ELF_MAGIC, PvhKernel, parse_pvh_elf
from pyxen.errors import KernelImageError


def read_kernel_file(path: str) -> bytes:
    """The file's bytes; OS errors become KernelImageError with a plain reason."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise KernelImageError(path, "file not found") from None
    except IsADirectoryError:
        raise KernelImageError(path, "is a directory, not a kernel image") from None
    except OSError as exc:
        raise KernelImageError(path, f"cannot read: {exc.strerror or exc}") from None


def load_pvh_kernel(path: str) -> PvhKernel:
    """Read ``path`` and parse it as a PVH kernel (ELF directly, or the ELF inside a bzImage)."""
    data = read_kernel_file(path)
    if data[:4] == ELF_MAGIC:
        return parse_pvh_elf(data, path)
    if bzimage.is_bzimage(data):
        return parse_pvh_elf(bzimage.extract_elf(data, path), path)
    raise KernelImageError(path, "neither an ELF image nor a bzImage "
                                 f"(starts with {data[:8].hex(' ') or 'nothing: empty file'})")
