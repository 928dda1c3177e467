"""pyxen.arch.x86.elf: PT_LOAD, Xen notes, hypercall sites, errors."""

from __future__ import annotations

import pytest

from pyxen.arch.x86.elf import PvhKernel, parse_pvh_elf
from pyxen.errors import KernelImageError
from synth_elf import KERNEL_MAP, Image, Seg, build, hypercall_text, linux_like, pvh_note

AMD_VIRT = KERNEL_MAP + 0x1000040
AMD_PHYS = 0x1000040
ALL_SITES = (AMD_PHYS, AMD_PHYS + 0x10, AMD_VIRT, AMD_VIRT + 0x10)


def parse(img: Image) -> PvhKernel:
    return parse_pvh_elf(build(img), "vmlinux")


@pytest.mark.parametrize("notes_in", ["segment", "section", "both"])
def test_segments_notes_and_entry(notes_in):
    k = parse(linux_like(notes_in=notes_in))
    assert k.entry == 0x1000100
    assert k.path == "vmlinux"
    assert [s.paddr for s in k.segments] == [0x1000000, 0x1200000, 0x1400000]
    assert k.segments[2].vaddr == 0  # percpu: load by paddr, not vaddr
    assert k.segments[1].memsz == 0x2000 and k.segments[1].data == b"data" * 16
    assert [s.executable for s in k.segments] == [True, False, False]
    assert k.image_start == 0x1000000 and k.image_end == 0x1401000
    assert k.guest_os == "linux"
    assert k.supported_features == 0x8801
    assert set(k.notes) == {6, 17, 18}  # the GNU note is not Xen's


def test_four_byte_entry_note():
    img = linux_like()
    img.notes[-1] = pvh_note(0x1000100, size=4)
    assert parse(img).entry == 0x1000100


def test_bad_entry_note_size():
    img = linux_like()
    img.notes[-1] = pvh_note(0x100, size=2)
    with pytest.raises(KernelImageError, match="2-byte"):
        parse(img)


def test_entry_outside_image():
    img = linux_like()
    img.notes[-1] = pvh_note(0x100)
    with pytest.raises(KernelImageError, match="outside"):
        parse(img)


def test_symbol_sites_virtual_and_physical():
    assert parse(linux_like(symbols=True)).hypercall_sites == ALL_SITES


def test_symbol_site_skips_prefix_to_instruction():
    img = linux_like(symbols=True)
    img.symbols["xen_hypercall_amd"] = (AMD_VIRT - 4, 20)  # e.g. an endbr64 before vmmcall
    assert parse(img).hypercall_sites == ALL_SITES


def test_stripped_pattern_scan():
    k = parse(linux_like(symbols=False))
    assert k.hypercall_sites == ALL_SITES


def test_scan_requires_alignment_and_executable():
    img = linux_like()
    img.segments[0] = Seg(KERNEL_MAP + 0x1000000, 0x1000000, hypercall_text(0x44) + bytes(0x100))
    img.notes[-1] = pvh_note(0x1000000)
    assert parse(img).hypercall_sites == ()
    img = linux_like()
    img.segments[0].flags = 4  # not executable
    assert parse(img).hypercall_sites == ()


def test_identity_mapped_sites_are_deduplicated():
    img = Image([Seg(0x100000, 0x100000, hypercall_text())], [pvh_note(0x100000, 4)],
                machine=3, elfclass=32)
    k = parse(img)
    assert k.hypercall_sites == (0x100040, 0x100050)
    assert k.entry == 0x100000 and k.guest_os == "" and k.supported_features == 0


def test_elf32_with_symbols():
    img = Image([Seg(0x100000, 0x100000, hypercall_text())], [pvh_note(0x100000, 4)],
                notes_in="section", symbols={"xen_hypercall_intel": (0x100050, 8)},
                machine=3, elfclass=32)
    assert parse(img).hypercall_sites == (0x100050,)


def test_missing_phys32_note():
    img = linux_like()
    img.notes.pop()
    with pytest.raises(KernelImageError, match="no XEN_ELFNOTE_PHYS32_ENTRY note") as exc:
        parse(img)
    assert exc.value.path == "vmlinux"


def test_note_from_other_owner_ignored():
    img = linux_like()
    img.notes[-1] = (b"Linux", 18, (0x1000100).to_bytes(8, "little"))
    with pytest.raises(KernelImageError, match="PHYS32_ENTRY"):
        parse(img)


def test_not_an_elf():
    with pytest.raises(KernelImageError, match="not an ELF"):
        parse_pvh_elf(b"MZ" + bytes(100), "x.efi")


def test_wrong_machine():
    img = linux_like()
    img.machine = 183  # aarch64
    with pytest.raises(KernelImageError, match="not x86"):
        parse(img)


@pytest.mark.parametrize("cut", [10, 40, 100, 0x120])
def test_truncated(cut):
    data = build(linux_like())
    with pytest.raises(KernelImageError, match="truncated|not an ELF"):
        parse_pvh_elf(data[:cut], "vmlinux")


def test_truncated_segment_data():
    data = build(linux_like())
    with pytest.raises(KernelImageError, match="truncated"):
        parse_pvh_elf(data[:len(data) - 200], "vmlinux")


def test_trailing_bytes_ignored():
    data = build(linux_like())
    assert parse_pvh_elf(data + b"relocs" * 100, "v").entry == 0x1000100


def test_overlapping_segments():
    img = linux_like()
    img.segments[1].paddr = 0x1000010
    with pytest.raises(KernelImageError, match="overlap"):
        parse(img)


def test_no_load_segments():
    img = Image([], [pvh_note(0x1000000)])
    with pytest.raises(KernelImageError, match="no PT_LOAD"):
        parse(img)
