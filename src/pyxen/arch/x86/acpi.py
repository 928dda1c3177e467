"""ACPI tables for a PVH domain: RSDP, XSDT, RSDT, FADT, FACS, DSDT, MADT.

Contract: :func:`build_acpi_tables` returns ``(blob, rsdp_paddr)``; the domain builder writes
``blob`` at guest-physical ``base`` (normally ``layout.ACPI_BASE``, 64-byte aligned, at most
``layout.ACPI_SIZE`` bytes) and passes ``rsdp_paddr`` in ``hvm_start_info``.

What the guest sees (modelled on libxl's PVH tables, xen-abi.md 1.5, plus an S5 power-off):

* FADT rev 6, HW_REDUCED_ACPI (no PM timer, no PM1 blocks, no SCI), IAPC boot flags NO_VGA and
  NO_CMOS_RTC (no 8042), reset register = I/O port 0xCF9 value 6, and the HW-reduced sleep
  registers as 8-bit I/O ports :data:`ACPI_SLEEP_CONTROL_PORT` / :data:`ACPI_SLEEP_STATUS_PORT`.
* DSDT with only ``Name(\\_S5, Package(){5, 5})``. Linux powers off by writing
  ``(SLEEP_TYPE_S5 << 2) | SLP_EN`` (0x34) to the control port (after writing 0x80 to the status
  port to clear WAK_STS, and reading the status port back; the VMM should ignore those
  and return 0). :func:`decode_sleep_control` decodes that write.
* MADT: LAPIC at 0xFEE00000, flags PCAT_COMPAT (as libxl; Linux x86 ignores it and HW-reduced
  mode already gives it the null legacy PIC), no IOAPIC. One entry per vCPU i: ACPI processor
  UID i (= the Xen vcpu id Linux derives from it), APIC id 2*i, enabled iff i < online_vcpus;
  Local APIC entries (type 0) while the APIC id fits in 8 bits (<= 254), x2APIC entries
  (type 9) beyond. Note the LAPIC runs in xAPIC mode (cpuid.py hides x2APIC), so Linux cannot
  use vCPUs with APIC ids above 254 (i >= 128).
"""

from __future__ import annotations

import struct

from pyxen.arch.x86.layout import ACPI_SIZE, LAPIC_BASE

OEM_ID = b"PYXEN "
OEM_TABLE_ID = b"PYXENPVH"
OEM_REVISION = 1
CREATOR_ID = b"PYXN"
CREATOR_REVISION = 1

ACPI_SLEEP_CONTROL_PORT = 0x404
ACPI_SLEEP_STATUS_PORT = 0x405
ACPI_RESET_PORT = 0xCF9
ACPI_RESET_VALUE = 6
SLEEP_TYPE_S5 = 5
SLP_EN = 0x20  # bit 5 of the sleep control register
SLP_TYP_SHIFT, SLP_TYP_MASK = 2, 0x7
WAK_STS = 0x80  # bit 7 of the sleep status register

# FADT flags and IAPC_BOOT_ARCH bits (ACPI 6.x, 5.2.9)
FADT_WBINVD = 1 << 0
FADT_PROC_C1 = 1 << 2
FADT_PWR_BUTTON = 1 << 4  # set: no fixed-feature power button
FADT_SLP_BUTTON = 1 << 5
FADT_RESET_REG_SUP = 1 << 10
FADT_HW_REDUCED_ACPI = 1 << 20
BOOT_ARCH_8042 = 1 << 1
BOOT_ARCH_NO_VGA = 1 << 2
BOOT_ARCH_NO_CMOS_RTC = 1 << 5
FADT_REVISION, FADT_MINOR, FADT_SIZE = 6, 0, 276

MADT_PCAT_COMPAT = 1
MADT_TYPE_LAPIC, MADT_TYPE_X2APIC = 0, 9
MADT_ENABLED = 1
MAX_XAPIC_ID = 254  # 255 is the xAPIC broadcast id

GAS_SYSTEM_IO = 1
GAS_ACCESS_BYTE = 1

_HEADER = struct.Struct("<4sIBB6s8sI4sI")  # 36 bytes
_GAS = struct.Struct("<BBBBQ")  # space_id bit_width bit_offset access_size address
_ALIGN = 16


def checksum_ok(table: bytes) -> bool:
    """True if the bytes sum to 0 mod 256 (pass a whole table, or RSDP[:20] / RSDP[:36])."""
    return sum(table) & 0xFF == 0


def decode_sleep_control(value: int) -> int | None:
    """The SLP_TYP written to the sleep control port, or None if SLP_EN is clear."""
    if not value & SLP_EN:
        return None
    return (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK


def _fix_checksum(raw: bytearray, at: int, length: int) -> None:
    raw[at] = 0
    raw[at] = -sum(raw[:length]) & 0xFF


def _table(sig: bytes, revision: int, body: bytes) -> bytes:
    """Header + body with length and checksum filled in."""
    raw = bytearray(_HEADER.pack(sig, _HEADER.size + len(body), revision, 0, OEM_ID,
                                 OEM_TABLE_ID, OEM_REVISION, CREATOR_ID, CREATOR_REVISION) + body)
    _fix_checksum(raw, 9, len(raw))
    return bytes(raw)


def _gas_io(port: int) -> bytes:
    return _GAS.pack(GAS_SYSTEM_IO, 8, 0, GAS_ACCESS_BYTE, port)


# ----------------------------------------------------------------------------- tables

def _facs() -> bytes:
    # signature length hw_signature waking_vector global_lock flags x_waking_vector version
    # reserved[3] ospm_flags reserved[24]
    return struct.pack("<4sIIIIIQB3sI24s", b"FACS", 64, 0, 0, 0, 0, 0, 2, b"", 0, b"")


def _dsdt() -> bytes:
    # Name(\_S5_, Package(){5, 5}): NameOp NameString PackageOp PkgLength NumElements
    # BytePrefix 5 BytePrefix 5
    package = bytes([2, 0x0A, SLEEP_TYPE_S5, 0x0A, SLEEP_TYPE_S5])
    aml = b"\x08\\_S5_" + b"\x12" + bytes([len(package) + 1]) + package
    return _table(b"DSDT", 2, aml)


def _fadt(facs: int, dsdt: int) -> bytes:
    body = bytearray(FADT_SIZE - _HEADER.size)

    def put(offset: int, fmt: str, *values: int | bytes) -> None:
        struct.pack_into(fmt, body, offset - _HEADER.size, *values)

    put(36, "<II", facs, dsdt)  # FIRMWARE_CTRL, DSDT
    put(46, "<H", 9)  # SCI_INT (unused in HW-reduced mode; libxl's value)
    put(109, "<H", BOOT_ARCH_NO_VGA | BOOT_ARCH_NO_CMOS_RTC)
    put(112, "<I", FADT_WBINVD | FADT_PROC_C1 | FADT_PWR_BUTTON | FADT_SLP_BUTTON
        | FADT_RESET_REG_SUP | FADT_HW_REDUCED_ACPI)
    put(116, "<12s", _gas_io(ACPI_RESET_PORT))
    put(128, "<B", ACPI_RESET_VALUE)
    put(131, "<B", FADT_MINOR)
    put(132, "<QQ", facs, dsdt)  # X_FIRMWARE_CTRL, X_DSDT
    put(244, "<12s", _gas_io(ACPI_SLEEP_CONTROL_PORT))
    put(256, "<12s", _gas_io(ACPI_SLEEP_STATUS_PORT))
    return _table(b"FACP", FADT_REVISION, bytes(body))


def _madt(nr_vcpus: int, online_vcpus: int) -> bytes:
    entries = bytearray(struct.pack("<II", LAPIC_BASE, MADT_PCAT_COMPAT))
    for i in range(nr_vcpus):
        flags = MADT_ENABLED if i < online_vcpus else 0
        apic_id = 2 * i
        if apic_id <= MAX_XAPIC_ID:
            entries += struct.pack("<BBBBI", MADT_TYPE_LAPIC, 8, i, apic_id, flags)
        else:
            entries += struct.pack("<BBHIII", MADT_TYPE_X2APIC, 16, 0, apic_id, flags, i)
    return _table(b"APIC", 4, bytes(entries))


def _rsdp(rsdt: int, xsdt: int) -> bytes:
    raw = bytearray(struct.pack("<8sB6sBIIQB3s", b"RSD PTR ", 0, OEM_ID, 2, rsdt, 36, xsdt, 0,
                                b""))
    _fix_checksum(raw, 8, 20)
    _fix_checksum(raw, 32, 36)
    return bytes(raw)


# ----------------------------------------------------------------------------- assembly

class _Blob:
    """Append-only image of the ACPI area; ``place`` returns a table's guest-physical address."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.raw = bytearray()

    def place(self, data: bytes) -> int:
        self.raw += b"\0" * (-len(self.raw) % _ALIGN)
        addr = self.base + len(self.raw)
        self.raw += data
        return addr


def build_acpi_tables(base: int, nr_vcpus: int, *,
                      online_vcpus: int | None = None) -> tuple[bytes, int]:
    """Build every table for ``nr_vcpus`` vCPUs (the first ``online_vcpus`` enabled).

    Returns (blob for guest-physical ``base``, guest-physical address of the RSDP).
    Raises ValueError for a bad vCPU count or if the tables exceed ``layout.ACPI_SIZE``.
    """
    online = nr_vcpus if online_vcpus is None else online_vcpus
    if nr_vcpus < 1 or not 1 <= online <= nr_vcpus:
        raise ValueError(f"bad vCPU counts: nr_vcpus={nr_vcpus}, online_vcpus={online}")
    if base % 64:
        raise ValueError(f"ACPI base {base:#x} must be 64-byte aligned (FACS)")
    blob = _Blob(base)
    facs = blob.place(_facs())  # offset 0: 64-byte aligned
    rsdp_at = blob.place(bytes(36))  # filled in below
    dsdt = blob.place(_dsdt())
    fadt = blob.place(_fadt(facs, dsdt))
    madt = blob.place(_madt(nr_vcpus, online))
    xsdt = blob.place(_table(b"XSDT", 1, struct.pack("<QQ", fadt, madt)))
    rsdt = blob.place(_table(b"RSDT", 1, struct.pack("<II", fadt, madt)))
    off = rsdp_at - base
    blob.raw[off:off + 36] = _rsdp(rsdt, xsdt)
    if len(blob.raw) > ACPI_SIZE:
        raise ValueError(f"ACPI tables for {nr_vcpus} vCPUs need {len(blob.raw)} bytes, "
                         f"more than the {ACPI_SIZE} reserved")
    return bytes(blob.raw), rsdp_at


def parse_tables(blob: bytes, base: int, rsdp_paddr: int) -> dict[str, bytes]:
    """Signature -> table bytes, found by walking RSDP -> XSDT (and FADT -> DSDT/FACS).

    The RSDP itself is under "RSDP" (36 bytes); the RSDT it names is included too.
    """
    def at(paddr: int, length: int | None = None) -> bytes:
        off = paddr - base
        if length is None:
            length = struct.unpack_from("<I", blob, off + 4)[0]
        return blob[off:off + length]

    rsdp = at(rsdp_paddr, 36)
    rsdt_addr, _length, xsdt_addr = struct.unpack_from("<IIQ", rsdp, 16)
    tables = {"RSDP": rsdp, "XSDT": at(xsdt_addr), "RSDT": at(rsdt_addr)}
    xsdt = tables["XSDT"]
    for (addr,) in struct.iter_unpack("<Q", xsdt[_HEADER.size:]):
        table = at(addr)
        tables[table[:4].decode()] = table
    fadt = tables.get("FACP")
    if fadt is not None:
        x_facs, x_dsdt = struct.unpack_from("<QQ", fadt, 132)
        tables["DSDT"] = at(x_dsdt)
        tables["FACS"] = at(x_facs)
    return tables
