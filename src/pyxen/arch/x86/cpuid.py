"""The CPUID table a PVH vCPU sees: the host's supported leaves, made Xen-flavoured.

Contract: :func:`build_cpuid` takes what the engine reports as supported (for KVM,
``KVM_GET_SUPPORTED_CPUID``) and returns the table for ONE vCPU (leaf 0x40000004 EBX and the
APIC ids differ per vCPU), which the caller installs with ``EngineVcpu.set_cpuid``.

* Every leaf in 0x40000000-0x4FFFFFFF (KVM's "KVMKVMKVM", Hyper-V) is dropped and Xen's
  leaves go at :data:`XEN_CPUID_BASE` (xen-abi.md 2.1): signature "XenVMMXenVMM", version,
  one hypercall page through MSR ``hypercall_msr``, time leaf (all zero: Linux 6.1 does not
  read it, so no guest TSC frequency is advertised there), HVM flags 0x58
  (VCPU_ID_PRESENT | DOMID_PRESENT | UPCALL_VECTOR) with EBX = vcpu id, ECX = domid.
* Leaf 1: initial APIC id 2*vcpu_id, HTT (and a power-of-two logical count covering every APIC
  id) only when nr_vcpus > 1, hypervisor bit set, APIC bit set; x2APIC, TSC-deadline and
  MONITOR cleared (the LAPIC is an xAPIC; MWAIT is not offered).
* Leaves 0xB/0x1F: EDX (x2APIC id) = 2*vcpu_id in every subleaf.
* Everything else (vendor string, leaf 4, ...) is the host's.
"""

from __future__ import annotations

from dataclasses import replace

from pyxen.engine.base import CpuidEntry

XEN_CPUID_BASE = 0x40000000
XEN_CPUID_LEAVES = 5  # base+1 .. base+5
#: Hypercall-page MSR advertised in base+2 EBX. 0x40000000 is KVM's Hyper-V GUEST_OS_ID here;
#: Xen itself uses 0x40000200 when Viridian is enabled, so guests accept it.
HYPERCALL_PAGE_MSR = 0x40000200
HYPERVISOR_RANGE = range(0x40000000, 0x50000000)

XEN_SIGNATURE = (0x566E6558, 0x65584D4D, 0x4D4D566E)  # "XenV" "MMXe" "nVMM"

# base+4 EAX (public/arch-x86/cpuid.h)
XEN_HVM_CPUID_APIC_ACCESS_VIRT = 1 << 0
XEN_HVM_CPUID_X2APIC_VIRT = 1 << 1
XEN_HVM_CPUID_IOMMU_MAPPINGS = 1 << 2
XEN_HVM_CPUID_VCPU_ID_PRESENT = 1 << 3
XEN_HVM_CPUID_DOMID_PRESENT = 1 << 4
XEN_HVM_CPUID_EXT_DEST_ID = 1 << 5
XEN_HVM_CPUID_UPCALL_VECTOR = 1 << 6
XEN_HVM_FLAGS = (XEN_HVM_CPUID_VCPU_ID_PRESENT | XEN_HVM_CPUID_DOMID_PRESENT
                 | XEN_HVM_CPUID_UPCALL_VECTOR)  # 0x58

# leaf 1
LEAF1_ECX_MONITOR = 1 << 3
LEAF1_ECX_X2APIC = 1 << 21
LEAF1_ECX_TSC_DEADLINE = 1 << 24
LEAF1_ECX_HYPERVISOR = 1 << 31
LEAF1_EDX_APIC = 1 << 9
LEAF1_EDX_HTT = 1 << 28
TOPOLOGY_LEAVES = (0xB, 0x1F)


def apic_id(vcpu_id: int) -> int:
    """The APIC id of a vCPU (Xen's HVM convention: 2 * vcpu id)."""
    return 2 * vcpu_id


def xen_leaves(*, vcpu_id: int, domid: int, xen_version: tuple[int, int],
               hypercall_msr: int, base: int = XEN_CPUID_BASE) -> list[CpuidEntry]:
    """Xen's hypervisor leaves base+0 .. base+5 for one vCPU."""
    major, minor = xen_version
    if not (0 <= major <= 0xFFFF and 0 <= minor <= 0xFFFF):
        raise ValueError(f"bad Xen version {xen_version}")
    return [
        CpuidEntry(base, 0, base + XEN_CPUID_LEAVES, *XEN_SIGNATURE),
        CpuidEntry(base + 1, 0, (major << 16) | minor, 0, 0, 0),
        CpuidEntry(base + 2, 0, 1, hypercall_msr, 0, 0),
        *(CpuidEntry(base + 3, sub, 0, 0, 0, 0, significant_index=True) for sub in range(3)),
        CpuidEntry(base + 4, 0, XEN_HVM_FLAGS, vcpu_id, domid, 0),
        CpuidEntry(base + 5, 0, 0, 0, 0, 0),
    ]


def _logical_count(nr_vcpus: int) -> int:
    """Leaf 1 EBX[23:16]: a power of two covering every APIC id (2*i), capped to 8 bits."""
    count = 1
    while count < 2 * nr_vcpus and count < 128:
        count <<= 1
    return count


def _leaf1(e: CpuidEntry, vcpu_id: int, nr_vcpus: int) -> CpuidEntry:
    ebx = (e.ebx & 0x0000FFFF) | (apic_id(vcpu_id) & 0xFF) << 24
    edx = e.edx | LEAF1_EDX_APIC
    if nr_vcpus > 1:
        ebx |= _logical_count(nr_vcpus) << 16
        edx |= LEAF1_EDX_HTT
    else:
        ebx |= 1 << 16
        edx &= ~LEAF1_EDX_HTT
    ecx = (e.ecx | LEAF1_ECX_HYPERVISOR) & ~(LEAF1_ECX_X2APIC | LEAF1_ECX_TSC_DEADLINE
                                             | LEAF1_ECX_MONITOR)
    return replace(e, ebx=ebx, ecx=ecx & 0xFFFFFFFF, edx=edx & 0xFFFFFFFF)


def build_cpuid(host: list[CpuidEntry], *, vcpu_id: int, domid: int, nr_vcpus: int,
                xen_version: tuple[int, int], hypercall_msr: int) -> list[CpuidEntry]:
    """CPUID table for vCPU ``vcpu_id`` of domain ``domid``, sorted by (function, index)."""
    out = []
    for e in host:
        if e.function in HYPERVISOR_RANGE:
            continue
        if e.function == 1:
            e = _leaf1(e, vcpu_id, nr_vcpus)
        elif e.function in TOPOLOGY_LEAVES:
            e = replace(e, edx=apic_id(vcpu_id))
        out.append(e)
    out += xen_leaves(vcpu_id=vcpu_id, domid=domid, xen_version=xen_version,
                      hypercall_msr=hypercall_msr)
    return sorted(out, key=lambda e: (e.function, e.index))
