"""pyxen.arch.x86.acpi: table structure, checksums, MADT, FADT, DSDT \\_S5."""

from __future__ import annotations

import struct

import pytest

from pyxen.arch.x86 import acpi
from pyxen.arch.x86.layout import ACPI_BASE, ACPI_SIZE, LAPIC_BASE

COUNTS = [1, 2, 8, 32, 128]


def tables(n: int, online: int | None = None) -> dict[str, bytes]:
    blob, rsdp = acpi.build_acpi_tables(ACPI_BASE, n, online_vcpus=online)
    assert len(blob) <= ACPI_SIZE
    assert ACPI_BASE <= rsdp < ACPI_BASE + len(blob) and rsdp % 16 == 0
    return acpi.parse_tables(blob, ACPI_BASE, rsdp)


def madt_entries(madt: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 44
    while pos < len(madt):
        typ, length = madt[pos], madt[pos + 1]
        out.append((typ, madt[pos:pos + length]))
        pos += length
    return out


@pytest.mark.parametrize("n", COUNTS)
def test_checksums_and_signatures(n):
    t = tables(n)
    assert set(t) == {"RSDP", "XSDT", "RSDT", "FACP", "APIC", "DSDT", "FACS"}
    rsdp = t["RSDP"]
    assert rsdp[:8] == b"RSD PTR " and rsdp[15] == 2
    assert acpi.checksum_ok(rsdp[:20]) and acpi.checksum_ok(rsdp[:36])
    assert rsdp[9:15] == b"PYXEN "
    for sig in ("XSDT", "RSDT", "FACP", "APIC", "DSDT"):
        table = t[sig]
        assert table[:4] == sig.encode()
        assert struct.unpack_from("<I", table, 4)[0] == len(table)
        assert acpi.checksum_ok(table), sig
        assert table[10:16] == b"PYXEN "
    assert t["FACS"][:4] == b"FACS" and len(t["FACS"]) == 64


def test_rsdt_matches_xsdt():
    t = tables(4)
    x = struct.unpack_from("<QQ", t["XSDT"], 36)
    r = struct.unpack_from("<II", t["RSDT"], 36)
    assert x == r


@pytest.mark.parametrize("n", COUNTS)
def test_madt_one_lapic_per_vcpu(n):
    madt = tables(n)["APIC"]
    assert struct.unpack_from("<II", madt, 36) == (LAPIC_BASE, 1)
    entries = madt_entries(madt)
    assert [typ for typ, _ in entries] == [0] * n  # no IOAPIC, nothing else
    for i, (_, e) in enumerate(entries):
        assert struct.unpack("<BBBBI", e) == (0, 8, i, 2 * i, 1)


def test_offline_vcpus_disabled():
    entries = madt_entries(tables(4, online=2)["APIC"])
    assert [struct.unpack("<BBBBI", e)[4] for _, e in entries] == [1, 1, 0, 0]


def test_x2apic_entries_beyond_127():
    entries = madt_entries(tables(200)["APIC"])
    assert len(entries) == 200
    assert all(typ == 0 for typ, _ in entries[:128])
    assert struct.unpack("<BBBBI", entries[127][1]) == (0, 8, 127, 254, 1)
    for i, (typ, e) in enumerate(entries[128:], start=128):
        assert typ == 9
        assert struct.unpack("<BBHIII", e) == (9, 16, 0, 2 * i, 1, i)


@pytest.mark.parametrize("n,online", [(0, None), (4, 0), (4, 5)])
def test_bad_counts(n, online):
    with pytest.raises(ValueError):
        acpi.build_acpi_tables(ACPI_BASE, n, online_vcpus=online)


def test_too_many_vcpus_do_not_fit():
    with pytest.raises(ValueError, match="reserved"):
        acpi.build_acpi_tables(ACPI_BASE, 8192)


def test_dsdt_s5():
    dsdt = tables(1)["DSDT"]
    assert struct.unpack_from("<I", dsdt, 4)[0] == len(dsdt)
    aml = dsdt[36:]
    assert b"_S5_" in aml
    assert aml == b"\x08\\_S5_\x12\x06\x02\x0a\x05\x0a\x05"


def test_fadt_fields():
    t = tables(2)
    f = t["FACP"]
    assert f[8] == 6 and len(f) == 276  # revision 6
    flags = struct.unpack_from("<I", f, 112)[0]
    assert flags & (1 << 20) and flags & (1 << 10)
    boot = struct.unpack_from("<H", f, 109)[0]
    assert boot & (1 << 2) and boot & (1 << 5) and not boot & (1 << 1)
    assert struct.unpack_from("<I", f, 76)[0] == 0 and f[91] == 0  # no PM timer
    assert struct.unpack_from("<BBBBQ", f, 116) == (1, 8, 0, 1, 0xCF9) and f[128] == 6
    assert struct.unpack_from("<BBBBQ", f, 244) == (1, 8, 0, 1, acpi.ACPI_SLEEP_CONTROL_PORT)
    assert struct.unpack_from("<BBBBQ", f, 256) == (1, 8, 0, 1, acpi.ACPI_SLEEP_STATUS_PORT)
    facs32, dsdt32 = struct.unpack_from("<II", f, 36)
    facs64, dsdt64 = struct.unpack_from("<QQ", f, 132)
    assert (facs32, dsdt32) == (facs64, dsdt64)
    assert facs64 % 64 == 0


def test_sleep_control_decoding():
    assert (acpi.ACPI_SLEEP_CONTROL_PORT, acpi.ACPI_SLEEP_STATUS_PORT) == (0x404, 0x405)
    poweroff = (acpi.SLEEP_TYPE_S5 << 2) | 0x20
    assert poweroff == 0x34
    assert acpi.decode_sleep_control(poweroff) == acpi.SLEEP_TYPE_S5
    assert acpi.decode_sleep_control(acpi.SLEEP_TYPE_S5 << 2) is None
    assert acpi.decode_sleep_control(0x20) == 0


def test_checksum_ok():
    assert acpi.checksum_ok(b"\x01\xff")
    assert not acpi.checksum_ok(b"\x01\x01")
