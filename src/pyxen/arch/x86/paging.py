"""Guest-virtual to guest-physical translation through the guest's own page tables.

Xen hypercall arguments are guest-virtual addresses. :func:`translate` walks the tables the
calling vCPU has loaded (CR3/CR4/EFER from its SRegs) over guest memory, in software, so it is the
same for every engine. Supports paging off, 32-bit (non-PAE and PAE) and 4/5-level long mode.
"""

from __future__ import annotations

from typing import Callable

CR0_PG = 1 << 31
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12
EFER_LMA = 1 << 10
_P, _RW, _US, _PS = 1, 2, 4, 0x80
_ADDR = 0x000FFFFFFFFFF000


class PageFault(Exception):
    """No valid translation (not present, non-canonical, or the tables are outside memory)."""


def translate(read_u64: Callable[[int], int], cr0: int, cr3: int, cr4: int, efer: int,
              gva: int, *, write: bool = False) -> int:
    """Return the guest-physical address of ``gva``.

    ``read_u64(gpa)`` reads one page-table entry (raising any exception if no memory is there).
    With ``write`` a read-only final mapping counts as a fault (supervisor writes honour CR0.WP
    in hardware; Xen copy_to_guest fails on read-only pages, so we always check).
    """
    if not cr0 & CR0_PG:
        return gva & 0xFFFFFFFF if not efer & EFER_LMA else gva
    try:
        if efer & EFER_LMA:
            return _walk_long(read_u64, cr3, cr4, gva, write)
        if cr4 & CR4_PAE:
            return _walk_pae(read_u64, cr3, gva & 0xFFFFFFFF, write)
        return _walk_32(read_u64, cr3, cr4, gva & 0xFFFFFFFF, write)
    except PageFault:
        raise
    except Exception as e:
        raise PageFault(f"page tables unreadable at 0x{gva:x}: {e}") from e


def _check(entry: int, gva: int, write: bool, level: str) -> None:
    if not entry & _P:
        raise PageFault(f"0x{gva:x}: {level} entry not present")
    if write and not entry & _RW:
        raise PageFault(f"0x{gva:x}: {level} entry read-only")


def _walk_long(read_u64: Callable[[int], int], cr3: int, cr4: int, gva: int, write: bool) -> int:
    bits = 57 if cr4 & CR4_LA57 else 48
    top = gva >> (bits - 1)
    if top not in (0, (1 << (65 - bits)) - 1):
        raise PageFault(f"0x{gva:x}: non-canonical address")
    table = cr3 & _ADDR
    levels = (48, 39, 30, 21, 12) if bits == 57 else (39, 30, 21, 12)
    for shift in levels:
        entry = read_u64(table + ((gva >> shift) & 0x1FF) * 8)
        _check(entry, gva, write, f"level-{shift}")
        if shift in (30, 21) and entry & _PS:
            base = entry & _ADDR & ~((1 << shift) - 1)
            return base | (gva & ((1 << shift) - 1))
        table = entry & _ADDR
    return table | (gva & 0xFFF)


def _walk_pae(read_u64: Callable[[int], int], cr3: int, gva: int, write: bool) -> int:
    pdpte = read_u64((cr3 & 0xFFFFFFE0) + ((gva >> 30) & 3) * 8)
    if not pdpte & _P:
        raise PageFault(f"0x{gva:x}: PDPTE not present")
    pde = read_u64((pdpte & _ADDR) + ((gva >> 21) & 0x1FF) * 8)
    _check(pde, gva, write, "PDE")
    if pde & _PS:
        return (pde & _ADDR & ~0x1FFFFF) | (gva & 0x1FFFFF)
    pte = read_u64((pde & _ADDR) + ((gva >> 12) & 0x1FF) * 8)
    _check(pte, gva, write, "PTE")
    return (pte & _ADDR) | (gva & 0xFFF)


def _walk_32(read_u64: Callable[[int], int], cr3: int, cr4: int, gva: int, write: bool) -> int:
    pde = read_u64((cr3 & 0xFFFFF000) + (gva >> 22) * 4) & 0xFFFFFFFF
    _check(pde, gva, write, "PDE")
    if pde & _PS and cr4 & CR4_PSE:
        return ((pde & 0xFFC00000) | ((pde >> 13 & 0xFF) << 32)) | (gva & 0x3FFFFF)
    pte = read_u64((pde & 0xFFFFF000) + ((gva >> 12) & 0x3FF) * 4) & 0xFFFFFFFF
    _check(pte, gva, write, "PTE")
    return (pte & 0xFFFFF000) | (gva & 0xFFF)
