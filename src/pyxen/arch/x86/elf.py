"""Parse a PVH-capable x86 ELF kernel image (ELF64 or ELF32, little-endian).

Contract: :func:`parse_pvh_elf` takes the whole image as bytes and returns a :class:`PvhKernel`
or raises :class:`~pyxen.errors.KernelImageError` naming the file and the reason. It is pure:
the caller (``kernel.load_pvh_kernel``) reads the file; the domain builder copies each
:class:`LoadSegment` to guest-physical ``paddr`` (``data``, then zeros up to ``memsz``) and
starts the BSP at ``entry`` (XEN_ELFNOTE_PHYS32_ENTRY, 32-bit protected mode, paging off).

``hypercall_sites`` are the guest *linear* addresses of the VMCALL/VMMCALL instructions that
Linux >= 6.1.119 uses for every hypercall (``xen_hypercall_amd``/``xen_hypercall_intel``).
Each site appears twice when its kernel virtual address and physical alias differ (the
kernel runs the code identity-mapped early and at its virtual address later). Empty means
none were found (an older kernel that asks for a hypercall page instead).

Trailing bytes after the ELF proper are ignored (a decompressed bzImage payload has the
relocation table appended).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterator, NamedTuple

from pyxen.errors import KernelImageError

ELF_MAGIC = b"\x7fELF"
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB = 1
EM_386, EM_X86_64 = 3, 62
PT_LOAD, PT_NOTE = 1, 4
PF_X = 1
SHT_SYMTAB, SHT_NOTE, SHT_DYNSYM = 2, 7, 11

# Xen ELF note types (xen/include/public/elfnote.h), owner "Xen".
XEN_ELFNOTE_ENTRY = 1
XEN_ELFNOTE_HYPERCALL_PAGE = 2
XEN_ELFNOTE_GUEST_OS = 6
XEN_ELFNOTE_SUSPEND_CANCEL = 14
XEN_ELFNOTE_SUPPORTED_FEATURES = 17
XEN_ELFNOTE_PHYS32_ENTRY = 18

VMCALL = b"\x0f\x01\xc1"   # Intel
VMMCALL = b"\x0f\x01\xd9"  # AMD
HYPERCALL_SYMBOLS = {"xen_hypercall_amd": VMMCALL, "xen_hypercall_intel": VMCALL}
#: In Linux's layout the Intel stub follows the AMD one 16 bytes later (xen-abi.md 2.1).
SCAN_STRIDE = 0x10


@dataclass(frozen=True)
class LoadSegment:
    """One PT_LOAD: copy ``data`` to guest-physical ``paddr``, then zero up to ``memsz`` bytes."""

    paddr: int
    vaddr: int
    data: bytes
    memsz: int
    executable: bool


@dataclass(frozen=True)
class PvhKernel:
    """A parsed PVH kernel; addresses are guest-physical unless named virtual/linear."""

    path: str
    entry: int  # XEN_ELFNOTE_PHYS32_ENTRY
    segments: tuple[LoadSegment, ...]
    notes: dict[int, bytes]  # Xen note type -> desc
    hypercall_sites: tuple[int, ...]  # linear addresses (virtual and physical aliases), sorted
    image_start: int  # lowest paddr
    image_end: int  # highest paddr + memsz
    guest_os: str
    supported_features: int


# ----------------------------------------------------------------------------- raw headers

class _Phdr(NamedTuple):
    type: int
    flags: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    align: int


class _Shdr(NamedTuple):
    type: int
    offset: int
    size: int
    link: int
    entsize: int
    align: int


@dataclass(frozen=True)
class _Format:
    """Struct layouts for one ELF class."""

    ehdr: struct.Struct  # from offset 16: type machine version entry phoff shoff flags ...
    phdr: struct.Struct
    shdr: struct.Struct
    sym: struct.Struct
    is64: bool

    def phdr_at(self, data: bytes, off: int) -> _Phdr:
        f = self.phdr.unpack_from(data, off)
        if self.is64:  # type flags offset vaddr paddr filesz memsz align
            return _Phdr(*f)
        t, o, v, p, fs, ms, fl, al = f
        return _Phdr(t, fl, o, v, p, fs, ms, al)

    def shdr_at(self, data: bytes, off: int) -> _Shdr:
        _name, t, _fl, _addr, o, size, link, _info, al, es = self.shdr.unpack_from(data, off)
        return _Shdr(t, o, size, link, es, al)

    def sym_name_value_size(self, fields: tuple) -> tuple[int, int, int]:
        if self.is64:  # name info other shndx value size
            return fields[0], fields[4], fields[5]
        return fields[0], fields[1], fields[2]  # name value size info other shndx


_FORMATS = {
    ELFCLASS64: _Format(struct.Struct("<HHIQQQIHHHHHH"), struct.Struct("<IIQQQQQQ"),
                        struct.Struct("<IIQQQQIIQQ"), struct.Struct("<IBBHQQ"), True),
    ELFCLASS32: _Format(struct.Struct("<HHIIIIIHHHHHH"), struct.Struct("<IIIIIIII"),
                        struct.Struct("<IIIIIIIIII"), struct.Struct("<IIIBBH"), False),
}


class _Elf(NamedTuple):
    fmt: _Format
    phdrs: list[_Phdr]
    shdrs: list[_Shdr]


def _fail(path: str, reason: str) -> KernelImageError:
    return KernelImageError(path, reason)


def _read_headers(data: bytes, path: str) -> _Elf:
    if len(data) < 16 or data[:4] != ELF_MAGIC:
        raise _fail(path, "not an ELF image (no \\x7fELF magic)")
    fmt = _FORMATS.get(data[4])
    if fmt is None:
        raise _fail(path, f"unknown ELF class {data[4]}")
    if data[5] != ELFDATA2LSB:
        raise _fail(path, "big-endian ELF: not an x86 image")
    if len(data) < 16 + fmt.ehdr.size:
        raise _fail(path, "truncated ELF header")
    (_t, machine, _v, _e, phoff, shoff, _f, _eh,
     phentsize, phnum, shentsize, shnum, _shstrndx) = fmt.ehdr.unpack_from(data, 16)
    if machine not in (EM_X86_64, EM_386):
        raise _fail(path, f"ELF machine {machine} is not x86 (EM_X86_64=62, EM_386=3)")
    phdrs = _read_table(data, path, "program", phoff, phentsize, phnum, fmt.phdr.size,
                        fmt.phdr_at)
    shdrs = _read_table(data, path, "section", shoff, shentsize, shnum, fmt.shdr.size,
                        fmt.shdr_at) if shoff else []
    return _Elf(fmt, phdrs, shdrs)


def _read_table(data: bytes, path: str, what: str, off: int, entsize: int, num: int,
                minsize: int, reader) -> list:
    if num == 0:
        return []
    if entsize < minsize:
        raise _fail(path, f"bad ELF {what} header entry size {entsize}")
    if off + entsize * num > len(data):
        raise _fail(path, f"truncated: ELF {what} headers extend past the end of the file")
    return [reader(data, off + i * entsize) for i in range(num)]


# ----------------------------------------------------------------------------- segments

def _load_segments(data: bytes, path: str, phdrs: list[_Phdr]) -> tuple[LoadSegment, ...]:
    segs = []
    for i, ph in enumerate(phdrs):
        if ph.type != PT_LOAD or ph.memsz == 0:
            continue
        if ph.filesz > ph.memsz:
            raise _fail(path, f"PT_LOAD segment {i} has filesz > memsz")
        if ph.offset + ph.filesz > len(data):
            raise _fail(path, f"truncated: PT_LOAD segment {i} extends past the end of the file")
        segs.append(LoadSegment(ph.paddr, ph.vaddr, bytes(data[ph.offset:ph.offset + ph.filesz]),
                                ph.memsz, bool(ph.flags & PF_X)))
    if not segs:
        raise _fail(path, "no PT_LOAD segments")
    segs.sort(key=lambda s: s.paddr)
    for a, b in zip(segs, segs[1:]):
        if a.paddr + a.memsz > b.paddr:
            raise _fail(path, f"PT_LOAD segments overlap at paddr {b.paddr:#x}")
    return tuple(segs)


# ----------------------------------------------------------------------------- notes

def _iter_notes(blob: bytes, align: int) -> Iterator[tuple[bytes, int, bytes]]:
    """Yield (owner without NUL, type, desc) for each note in a note segment/section."""
    align = 8 if align == 8 else 4
    pos = 0
    while pos + 12 <= len(blob):
        namesz, descsz, ntype = struct.unpack_from("<III", blob, pos)
        name_at = pos + 12
        desc_at = name_at + _round_up(namesz, align)
        end = desc_at + _round_up(descsz, align)
        if desc_at + descsz > len(blob):
            return  # truncated tail: ignore, as Xen's libelf does
        yield blob[name_at:name_at + namesz].rstrip(b"\0"), ntype, blob[desc_at:desc_at + descsz]
        pos = end


def _round_up(n: int, a: int) -> int:
    return (n + a - 1) & ~(a - 1)


def _xen_notes(data: bytes, path: str, elf: _Elf) -> dict[int, bytes]:
    regions = [(ph.offset, ph.filesz, ph.align) for ph in elf.phdrs if ph.type == PT_NOTE]
    regions += [(sh.offset, sh.size, sh.align) for sh in elf.shdrs if sh.type == SHT_NOTE]
    notes: dict[int, bytes] = {}
    for off, size, align in regions:
        if off + size > len(data):
            raise _fail(path, "truncated: a note segment extends past the end of the file")
        for owner, ntype, desc in _iter_notes(data[off:off + size], align):
            if owner == b"Xen":
                notes.setdefault(ntype, bytes(desc))
    return notes


def _phys32_entry(notes: dict[int, bytes], path: str) -> int:
    desc = notes.get(XEN_ELFNOTE_PHYS32_ENTRY)
    if desc is None:
        raise _fail(path, "no XEN_ELFNOTE_PHYS32_ENTRY note: not a PVH-capable kernel")
    if len(desc) not in (4, 8):
        raise _fail(path, f"XEN_ELFNOTE_PHYS32_ENTRY has a {len(desc)}-byte descriptor "
                          "(expected 4 or 8)")
    entry = int.from_bytes(desc, "little")
    if entry >= 1 << 32:
        raise _fail(path, f"XEN_ELFNOTE_PHYS32_ENTRY {entry:#x} is above 4 GiB")
    return entry


def _note_str(notes: dict[int, bytes], ntype: int) -> str:
    return notes.get(ntype, b"").split(b"\0", 1)[0].decode("ascii", "replace")


def _note_int(notes: dict[int, bytes], ntype: int) -> int:
    return int.from_bytes(notes.get(ntype, b"")[:8], "little")


# ----------------------------------------------------------------------------- hypercall sites

def _symbol_addresses(data: bytes, elf: _Elf, names: list[str]) -> dict[str, tuple[int, int]]:
    """name -> (value, size) for the wanted symbols found in any SHT_SYMTAB/SHT_DYNSYM."""
    found: dict[str, tuple[int, int]] = {}
    for sh in elf.shdrs:
        if sh.type not in (SHT_SYMTAB, SHT_DYNSYM) or sh.link >= len(elf.shdrs):
            continue
        strtab = elf.shdrs[sh.link]
        strings = data[strtab.offset:strtab.offset + strtab.size]
        wanted = _string_offsets(strings, names)
        if not wanted:
            continue
        symsize = elf.fmt.sym.size
        table = data[sh.offset:sh.offset + sh.size - sh.size % symsize]
        for fields in elf.fmt.sym.iter_unpack(table):
            name_off, value, size = elf.fmt.sym_name_value_size(fields)
            name = wanted.get(name_off)
            if name is not None and value:
                found.setdefault(name, (value, size))
    return found


def _string_offsets(strings: bytes, names: list[str]) -> dict[int, str]:
    """Every string-table offset at which one of ``names`` reads as a whole C string.

    Suffix-merged tables may point a symbol into the middle of a longer string, so any
    occurrence of ``name\\0`` counts.
    """
    out: dict[int, str] = {}
    for name in names:
        needle = name.encode() + b"\0"
        pos = strings.find(needle)
        while pos >= 0:
            out[pos] = name
            pos = strings.find(needle, pos + 1)
    return out


def _virt_to_bytes(segs: tuple[LoadSegment, ...], vaddr: int, length: int) -> bytes:
    for s in segs:
        if s.vaddr <= vaddr < s.vaddr + len(s.data):
            off = vaddr - s.vaddr
            return s.data[off:off + length]
    return b""


def _sites_from_symbols(data: bytes, elf: _Elf, segs: tuple[LoadSegment, ...]) -> list[int]:
    """The VMCALL/VMMCALL inside each hypercall symbol (its start if the bytes are not found)."""
    sites = []
    for name, (value, size) in _symbol_addresses(data, elf, list(HYPERCALL_SYMBOLS)).items():
        code = _virt_to_bytes(segs, value, max(size, 16))
        off = code.find(HYPERCALL_SYMBOLS[name])
        sites.append(value + off if off >= 0 else value)
    return sites


def _sites_from_scan(segs: tuple[LoadSegment, ...]) -> list[int]:
    """Linux layout: 16-byte aligned VMMCALL at X, VMCALL at X+0x10 (virtual addresses)."""
    sites = []
    for s in segs:
        if not s.executable:
            continue
        pos = s.data.find(VMMCALL)
        while pos >= 0:
            if (s.vaddr + pos) % 16 == 0 and \
                    s.data[pos + SCAN_STRIDE:pos + SCAN_STRIDE + 3] == VMCALL:
                sites += [s.vaddr + pos, s.vaddr + pos + SCAN_STRIDE]
            pos = s.data.find(VMMCALL, pos + 1)
    return sites


def _with_phys_aliases(virt_sites: list[int], segs: tuple[LoadSegment, ...]) -> tuple[int, ...]:
    out = set(virt_sites)
    for v in virt_sites:
        for s in segs:
            if s.vaddr <= v < s.vaddr + s.memsz:
                out.add(v - s.vaddr + s.paddr)
                break
    return tuple(sorted(out))


# ----------------------------------------------------------------------------- entry point

def parse_pvh_elf(data: bytes, path: str) -> PvhKernel:
    """Parse a PVH kernel ELF. ``path`` only names the image in errors and in the result."""
    elf = _read_headers(data, path)
    segs = _load_segments(data, path, elf.phdrs)
    notes = _xen_notes(data, path, elf)
    entry = _phys32_entry(notes, path)
    start = segs[0].paddr
    end = max(s.paddr + s.memsz for s in segs)
    if not start <= entry < end:
        raise _fail(path, f"PHYS32 entry {entry:#x} lies outside the loaded image "
                          f"[{start:#x}, {end:#x})")
    virt_sites = _sites_from_symbols(data, elf, segs) or _sites_from_scan(segs)
    return PvhKernel(
        path=path, entry=entry, segments=segs, notes=notes,
        hypercall_sites=_with_phys_aliases(virt_sites, segs),
        image_start=start, image_end=end,
        guest_os=_note_str(notes, XEN_ELFNOTE_GUEST_OS),
        supported_features=_note_int(notes, XEN_ELFNOTE_SUPPORTED_FEATURES))
