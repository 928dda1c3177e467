"""Build small synthetic x86 ELF images (ELF64/ELF32) for the boot-path unit tests."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

PHYS32 = 18
KERNEL_MAP = 0xFFFFFFFF80000000


@dataclass
class Seg:
    vaddr: int
    paddr: int
    data: bytes
    memsz: int | None = None
    flags: int = 5  # R+X


@dataclass
class Image:
    segments: list[Seg]
    notes: list[tuple[bytes, int, bytes]] = field(default_factory=list)
    notes_in: str = "segment"  # "segment", "section", "both"
    symbols: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (value, size)
    machine: int = 62
    elfclass: int = 64


def note_blob(notes: list[tuple[bytes, int, bytes]]) -> bytes:
    out = b""
    for owner, ntype, desc in notes:
        name = owner + b"\0"
        out += struct.pack("<III", len(name), len(desc), ntype)
        out += name + b"\0" * (-len(name) % 4) + desc + b"\0" * (-len(desc) % 4)
    return out


def pvh_note(entry: int, size: int = 8) -> tuple[bytes, int, bytes]:
    return (b"Xen", PHYS32, entry.to_bytes(size, "little"))


def build(img: Image) -> bytes:
    is64 = img.elfclass == 64
    ehsize, phentsize, shentsize = (64, 56, 64) if is64 else (52, 32, 40)
    notes = note_blob(img.notes)
    phnum = len(img.segments) + (1 if img.notes_in in ("segment", "both") and notes else 0)
    body = bytearray(ehsize + phentsize * phnum)

    def append(data: bytes, align: int = 16) -> int:
        body.extend(b"\0" * (-len(body) % align))
        off = len(body)
        body.extend(data)
        return off

    phdrs = []
    for s in img.segments:
        off = append(s.data)
        memsz = len(s.data) if s.memsz is None else s.memsz
        phdrs.append((1, s.flags, off, s.vaddr, s.paddr, len(s.data), memsz, 16))
    note_off = append(notes, 4) if notes else 0
    if phnum > len(img.segments):
        phdrs.append((4, 4, note_off, 0, 0, len(notes), len(notes), 4))

    sections = [(0, 0, 0, 0, 0, 0)]  # type offset size link entsize align
    if notes and img.notes_in in ("section", "both"):
        sections.append((7, note_off, len(notes), 0, 0, 4))
    if img.symbols:
        strtab = b"\0" + b"".join(n.encode() + b"\0" for n in img.symbols)
        syms = [bytes(24 if is64 else 16)]
        pos = 1
        for name, (value, size) in img.symbols.items():
            if is64:
                syms.append(struct.pack("<IBBHQQ", pos, 0x12, 0, 1, value, size))
            else:
                syms.append(struct.pack("<IIIBBH", pos, value, size, 0x12, 0, 1))
            pos += len(name) + 1
        str_off = append(strtab)
        sym_off = append(b"".join(syms), 8)
        str_index = len(sections) + 1
        sections.append((2, sym_off, len(b"".join(syms)), str_index, len(syms[0]), 8))
        sections.append((3, str_off, len(strtab), 0, 0, 1))
    shoff = 0
    if len(sections) > 1:
        shdrs = b""
        for t, off, size, link, entsize, align in sections:
            if is64:
                shdrs += struct.pack("<IIQQQQIIQQ", 0, t, 0, 0, off, size, link, 0, align, entsize)
            else:
                shdrs += struct.pack("<IIIIIIIIII", 0, t, 0, 0, off, size, link, 0, align, entsize)
        shoff = append(shdrs, 8)
    else:
        sections = []

    ident = b"\x7fELF" + bytes([2 if is64 else 1, 1, 1]) + bytes(9)
    if is64:
        ehdr = struct.pack("<HHIQQQIHHHHHH", 2, img.machine, 1, 0, ehsize, shoff, 0, ehsize,
                           phentsize, phnum, shentsize, len(sections), 0)
    else:
        ehdr = struct.pack("<HHIIIIIHHHHHH", 2, img.machine, 1, 0, ehsize, shoff, 0, ehsize,
                           phentsize, phnum, shentsize, len(sections), 0)
    body[:ehsize] = ident + ehdr
    for i, (t, fl, off, va, pa, fs, ms, al) in enumerate(phdrs):
        at = ehsize + i * phentsize
        if is64:
            body[at:at + 56] = struct.pack("<IIQQQQQQ", t, fl, off, va, pa, fs, ms, al)
        else:
            body[at:at + 32] = struct.pack("<IIIIIIII", t, off, va, pa, fs, ms, fl, al)
    return bytes(body)


def hypercall_text(pad_before: int = 0x40) -> bytes:
    """Code bytes with Linux's stub layout at offset ``pad_before`` (16-aligned)."""
    amd = b"\x0f\x01\xd9" + b"\xe9\x00\x00\x00\x00" + b"\x0f\x1f\x84\x00\x00\x00\x00\x00"
    intel = b"\x0f\x01\xc1" + b"\xe9\x00\x00\x00\x00"
    return b"\x90" * pad_before + amd + intel + b"\xcc" * 0x30


def linux_like(symbols: bool = False, notes_in: str = "segment") -> Image:
    """A kernel shaped like Debian's: text at phys 16 MiB / virt KERNEL_MAP+16 MiB, PVH note."""
    text = hypercall_text()
    entry = 0x1000000 + 0x100
    img = Image(
        segments=[Seg(KERNEL_MAP + 0x1000000, 0x1000000, text + b"\x90" * 0x100, flags=5),
                  Seg(KERNEL_MAP + 0x1200000, 0x1200000, b"data" * 16, memsz=0x2000, flags=6),
                  Seg(0, 0x1400000, b"percpu", memsz=0x1000, flags=6)],
        notes=[(b"GNU", 3, b"\x11" * 20), (b"Xen", 6, b"linux\0"), (b"Xen", 17, b"\x01\x88\0\0"),
               pvh_note(entry)],
        notes_in=notes_in)
    if symbols:
        img.symbols = {"xen_hypercall_amd": (KERNEL_MAP + 0x1000040, 16),
                       "xen_hypercall_intel": (KERNEL_MAP + 0x1000050, 16),
                       "other": (KERNEL_MAP + 0x1000000, 4)}
    return img
