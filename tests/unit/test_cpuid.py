"""pyxen.arch.x86.cpuid: Xen leaves replace KVM's, per-vCPU values, leaf 1 edits."""

from __future__ import annotations

from pyxen.arch.x86 import cpuid as C
from pyxen.engine.base import CpuidEntry

KVM_SIG = (0x4B4D564B, 0x564B4D56, 0x4D)  # "KVMKVMKVM"

HOST = [
    CpuidEntry(0, 0, 0x1F, 0x756E6547, 0x6C65746E, 0x49656E69),  # GenuineIntel
    CpuidEntry(1, 0, 0x000906EA, 0x00000800, 0x7FFAFBFF | (1 << 21) | (1 << 24) | (1 << 3),
               0xBFEBFBFF),
    CpuidEntry(4, 0, 0x1C004121, 0x01C0003F, 0x3F, 0, significant_index=True),
    CpuidEntry(0xB, 0, 1, 1, 0x100, 0, significant_index=True),
    CpuidEntry(0xB, 1, 4, 8, 0x201, 0, significant_index=True),
    CpuidEntry(0x1F, 0, 1, 1, 0x100, 0, significant_index=True),
    CpuidEntry(0x40000000, 0, 0x40000001, *KVM_SIG),
    CpuidEntry(0x40000001, 0, 0x01007AFB, 0, 0, 0),
    CpuidEntry(0x40000100, 0, 0x40000101, *KVM_SIG),
    CpuidEntry(0x80000000, 0, 0x80000008, 0, 0, 0),
]


def build(vcpu_id=0, nr_vcpus=4, domid=7):
    return C.build_cpuid(HOST, vcpu_id=vcpu_id, domid=domid, nr_vcpus=nr_vcpus,
                         xen_version=(4, 17), hypercall_msr=C.HYPERCALL_PAGE_MSR)


def leaf(table, fn, idx=0):
    (e,) = [e for e in table if e.function == fn and e.index == idx]
    return e


def test_no_kvm_signature_left():
    t = build()
    for e in t:
        assert (e.ebx, e.ecx, e.edx) != KVM_SIG
    hv = sorted((e.function, e.index) for e in t if 0x40000000 <= e.function < 0x50000000)
    assert hv == [(0x40000000, 0), (0x40000001, 0), (0x40000002, 0), (0x40000003, 0),
                  (0x40000003, 1), (0x40000003, 2), (0x40000004, 0), (0x40000005, 0)]


def test_xen_leaves():
    t = build(vcpu_id=3, domid=12)
    base = leaf(t, 0x40000000)
    assert (base.eax, base.ebx, base.ecx, base.edx) == (0x40000005, 0x566E6558, 0x65584D4D,
                                                        0x4D4D566E)
    sig = b"".join(r.to_bytes(4, "little") for r in (base.ebx, base.ecx, base.edx))
    assert sig == b"XenVMMXenVMM"
    assert leaf(t, 0x40000001).eax == (4 << 16) | 17
    assert (leaf(t, 0x40000002).eax, leaf(t, 0x40000002).ebx) == (1, 0x40000200)
    for sub in range(3):
        e = leaf(t, 0x40000003, sub)
        assert e.significant_index and (e.eax, e.ebx, e.ecx, e.edx) == (0, 0, 0, 0)
    hvm = leaf(t, 0x40000004)
    assert (hvm.eax, hvm.ebx, hvm.ecx) == (0x58, 3, 12)
    assert C.XEN_HVM_FLAGS == 0x58


def test_per_vcpu_values():
    for v in range(4):
        t = build(vcpu_id=v)
        assert leaf(t, 0x40000004).ebx == v
        assert leaf(t, 1).ebx >> 24 == 2 * v
        assert leaf(t, 0xB, 0).edx == leaf(t, 0xB, 1).edx == leaf(t, 0x1F).edx == 2 * v


def test_leaf1_bits():
    e = leaf(build(nr_vcpus=4), 1)
    assert e.ecx & (1 << 31)
    assert not e.ecx & ((1 << 21) | (1 << 24) | (1 << 3))
    assert e.edx & (1 << 9) and e.edx & (1 << 28)
    assert (e.ebx >> 16) & 0xFF >= 2 * 3 + 1  # covers every APIC id
    assert e.ebx & 0xFFFF == HOST[1].ebx & 0xFFFF
    assert e.eax == HOST[1].eax
    single = leaf(build(nr_vcpus=1), 1)
    assert not single.edx & (1 << 28)


def test_logical_count_fits_8_bits():
    e = leaf(build(vcpu_id=127, nr_vcpus=128), 1)
    assert e.ebx >> 24 == 254 and (e.ebx >> 16) & 0xFF == 128


def test_rest_is_host():
    t = build()
    assert leaf(t, 0) == HOST[0]
    assert leaf(t, 4) == HOST[2]
    assert leaf(t, 0x80000000) == HOST[-1]
    assert t == sorted(t, key=lambda e: (e.function, e.index))
    for e in t:
        assert all(0 <= r < 1 << 32 for r in (e.eax, e.ebx, e.ecx, e.edx))
