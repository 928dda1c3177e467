"""``struct hvm_start_info`` (PVH boot information), built as one blob.

Contract: :func:`build_start_info_blob` returns bytes the domain builder writes at
guest-physical ``base`` (8-byte aligned, the whole blob below 1 GiB: Linux reads the modlist
and memmap through ``__va()`` while only the first GiB is mapped). The BSP starts with
``EBX = base``. The blob holds, in order: ``hvm_start_info`` (56 B), the kernel command line
(NUL-terminated, padded to 8), each module's command line (same), the modlist (32 B per
entry), the memmap (24 B per entry). Every pointer in it is ``base`` + an offset into the
blob, except module ``paddr`` (where the caller loaded the module) and ``rsdp_paddr``.
Layout: xen-abi.md 1.3, xen/include/public/arch-x86/hvm/start_info.h.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pyxen.arch.x86.layout import MemoryRange

HVM_START_MAGIC = 0x336EC578
START_INFO_VERSION = 1
START_INFO_SIZE = 56
MODLIST_ENTRY_SIZE = 32
MEMMAP_ENTRY_SIZE = 24
PVH_BOOT_LIMIT = 1 << 30  # everything start_info points at must be below this

# magic version flags nr_modules modlist cmdline rsdp memmap memmap_entries reserved
_START_INFO = struct.Struct("<IIIIQQQQII")
_MODLIST = struct.Struct("<QQQQ")  # paddr size cmdline_paddr reserved
_MEMMAP = struct.Struct("<QQII")  # addr size type reserved
assert _START_INFO.size == START_INFO_SIZE and _MODLIST.size == MODLIST_ENTRY_SIZE
assert _MEMMAP.size == MEMMAP_ENTRY_SIZE


@dataclass(frozen=True)
class Module:
    """One ``hvm_modlist_entry``: ``size`` bytes at ``paddr``; command line at ``cmdline_paddr``."""

    paddr: int
    size: int
    cmdline_paddr: int = 0


def _cstring(text: str) -> bytes:
    """NUL-terminated, zero-padded to a multiple of 8."""
    raw = text.encode()
    if b"\0" in raw:
        raise ValueError("command line contains a NUL byte")
    raw += b"\0"
    return raw + b"\0" * (-len(raw) % 8)


def build_start_info_blob(base: int, *, cmdline: str, modules: list[tuple[int, int, str]],
                          memmap: list[MemoryRange], rsdp_paddr: int) -> bytes:
    """Build start_info + cmdlines + modlist + memmap for guest-physical ``base``.

    ``modules`` are (paddr, size, cmdline); Linux 6.1 uses module 0 as its initrd. An empty
    ``cmdline`` (or module cmdline) gives a 0 pointer. ``rsdp_paddr`` 0 means "no ACPI".
    """
    if base % 8:
        raise ValueError(f"start_info base {base:#x} is not 8-byte aligned")
    tail = bytearray()
    offset = START_INFO_SIZE

    def place(chunk: bytes) -> int:
        nonlocal offset
        addr = base + offset
        tail.extend(chunk)
        offset += len(chunk)
        return addr

    cmdline_paddr = place(_cstring(cmdline)) if cmdline else 0
    mod_cmdlines = [place(_cstring(text)) if text else 0 for _, _, text in modules]
    modlist = b"".join(_MODLIST.pack(paddr, size, cl, 0)
                       for (paddr, size, _), cl in zip(modules, mod_cmdlines))
    modlist_paddr = place(modlist) if modules else 0
    memmap_paddr = place(b"".join(_MEMMAP.pack(e.addr, e.size, e.type, 0) for e in memmap)) \
        if memmap else 0
    head = _START_INFO.pack(HVM_START_MAGIC, START_INFO_VERSION, 0, len(modules), modlist_paddr,
                            cmdline_paddr, rsdp_paddr, memmap_paddr, len(memmap), 0)
    blob = head + bytes(tail)
    if base + len(blob) > PVH_BOOT_LIMIT:
        raise ValueError(f"start_info blob [{base:#x}, {base + len(blob):#x}) must lie below "
                         "1 GiB")
    return blob


def _read_cstring(blob: bytes, base: int, paddr: int) -> str | None:
    if paddr == 0:
        return None
    off = paddr - base
    end = blob.index(b"\0", off)
    return blob[off:end].decode()


def parse_start_info(blob: bytes, base: int) -> dict:
    """Decode a blob from :func:`build_start_info_blob` (pointers must lie inside it).

    Returns the raw header fields by their C names plus ``cmdline`` (str or None),
    ``modules`` (list of :class:`Module`), ``module_cmdlines`` (str or None each) and
    ``memmap`` (list of :class:`MemoryRange`).
    """
    names = ("magic", "version", "flags", "nr_modules", "modlist_paddr", "cmdline_paddr",
             "rsdp_paddr", "memmap_paddr", "memmap_entries", "reserved")
    info: dict = dict(zip(names, _START_INFO.unpack_from(blob, 0)))
    info["cmdline"] = _read_cstring(blob, base, info["cmdline_paddr"])
    mods = []
    for i in range(info["nr_modules"]):
        paddr, size, cl, _ = _MODLIST.unpack_from(
            blob, info["modlist_paddr"] - base + i * MODLIST_ENTRY_SIZE)
        mods.append(Module(paddr, size, cl))
    info["modules"] = mods
    info["module_cmdlines"] = [_read_cstring(blob, base, m.cmdline_paddr) for m in mods]
    info["memmap"] = [MemoryRange(*_MEMMAP.unpack_from(
        blob, info["memmap_paddr"] - base + i * MEMMAP_ENTRY_SIZE)[:3])
        for i in range(info["memmap_entries"])]
    return info
