"""pyxen.arch.x86.pvh: hvm_start_info blob layout and round trip."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyxen.arch.x86 import pvh
from pyxen.arch.x86.layout import E820_RAM, MemoryRange, build_memmap

BASE = 0x6000


def test_struct_sizes():
    assert (pvh.START_INFO_SIZE, pvh.MODLIST_ENTRY_SIZE, pvh.MEMMAP_ENTRY_SIZE) == (56, 32, 24)


def test_offsets_match_abi():
    mm = build_memmap(256 << 20)
    blob = pvh.build_start_info_blob(BASE, cmdline="console=hvc0", modules=[(0x800000, 1234,
                                     "initrd")], memmap=mm, rsdp_paddr=0xFC000040)
    magic, version, flags, nr_mod = struct.unpack_from("<IIII", blob, 0)
    assert (magic, version, flags, nr_mod) == (0x336EC578, 1, 0, 1)
    modlist, cmdline, rsdp, memmap = struct.unpack_from("<QQQQ", blob, 16)
    entries, reserved = struct.unpack_from("<II", blob, 48)
    assert rsdp == 0xFC000040 and entries == len(mm) and reserved == 0
    assert cmdline == BASE + 56  # cmdline right after the struct
    assert blob[56:56 + 13] == b"console=hvc0\0"
    for p in (cmdline, modlist, memmap):
        assert BASE <= p < BASE + len(blob) and p % 8 == 0
    assert modlist < memmap
    paddr, size, mcl, res = struct.unpack_from("<QQQQ", blob, modlist - BASE)
    assert (paddr, size, res) == (0x800000, 1234, 0)
    assert blob[mcl - BASE:mcl - BASE + 7] == b"initrd\0"
    addr, size, typ, res = struct.unpack_from("<QQII", blob, memmap - BASE)
    assert (addr, size, typ, res) == (0, 256 << 20, E820_RAM, 0)
    assert len(blob) == memmap - BASE + 24 * len(mm)


def test_empty_cmdline_and_no_modules():
    blob = pvh.build_start_info_blob(BASE, cmdline="", modules=[], memmap=[], rsdp_paddr=0)
    info = pvh.parse_start_info(blob, BASE)
    assert len(blob) == 56
    assert info["cmdline_paddr"] == info["modlist_paddr"] == info["memmap_paddr"] == 0
    assert info["cmdline"] is None and info["modules"] == [] and info["memmap"] == []


def test_must_stay_below_1gib():
    with pytest.raises(ValueError, match="1 GiB"):
        pvh.build_start_info_blob((1 << 30) - 64, cmdline="x" * 100, modules=[], memmap=[],
                                  rsdp_paddr=0)


def test_nul_in_cmdline_rejected():
    with pytest.raises(ValueError):
        pvh.build_start_info_blob(BASE, cmdline="a\0b", modules=[], memmap=[], rsdp_paddr=0)


text = st.text(st.characters(min_codepoint=1, max_codepoint=0x7E), max_size=80)


@given(cmdline=text,
       modules=st.lists(st.tuples(st.integers(0, 1 << 40), st.integers(0, 1 << 32), text),
                        max_size=4),
       mem=st.integers(1, 1 << 20).map(lambda p: p * 4096),
       rsdp=st.integers(0, 1 << 32),
       base=st.integers(0, (1 << 26) - 1).map(lambda x: x * 8))  # below 512 MiB
def test_round_trip(cmdline, modules, mem, rsdp, base):
    mm = build_memmap(mem)
    blob = pvh.build_start_info_blob(base, cmdline=cmdline, modules=modules, memmap=mm,
                                     rsdp_paddr=rsdp)
    assert base + len(blob) < 1 << 30
    info = pvh.parse_start_info(blob, base)
    assert info["magic"] == pvh.HVM_START_MAGIC and info["version"] == 1 and info["flags"] == 0
    assert info["cmdline"] == (cmdline or None)
    assert [(m.paddr, m.size) for m in info["modules"]] == [(p, s) for p, s, _ in modules]
    assert info["module_cmdlines"] == [c or None for _, _, c in modules]
    assert info["memmap"] == mm
    assert info["rsdp_paddr"] == rsdp
    assert info["memmap"] == [MemoryRange(e.addr, e.size, e.type) for e in mm]
