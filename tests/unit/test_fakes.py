"""pyxen.testing.fakes: the fake engine VM used by the other unit tests."""

from __future__ import annotations

import pytest

from pyxen.cpustate import Regs, SRegs
from pyxen.engine.base import CpuidEntry, EngineVcpu, EngineVm
from pyxen.testing.fakes import FakeEngineVcpu, FakeEngineVm


def test_vm_records_slots_and_msis():
    vm = FakeEngineVm()
    assert isinstance(vm, EngineVm)
    a = vm.map_memory(0, 0x2000, 0x7F00_0000_0000)
    b = vm.map_memory(0x10_0000, 0x1000, 0x7F00_0001_0000, log_dirty=True)
    assert a != b and vm.mapped == [a, b]
    assert vm.slots == {a: (0, 0x2000, 0x7F00_0000_0000), b: (0x10_0000, 0x1000, 0x7F00_0001_0000)}
    assert vm.get_dirty_log(a) == bytes(1)
    vm.unmap_memory(a)
    assert vm.unmapped == [a] and list(vm.slots) == [b]
    with pytest.raises(KeyError):
        vm.unmap_memory(a)
    vm.inject_msi(2, 0xF3)
    vm.inject_msi(0, 0x30)
    assert vm.msis == [(2, 0xF3), (0, 0x30)]
    vm.set_hypercall_sites([0x1000])
    vm.set_trapped_msrs([0x40000000])
    assert vm.hypercall_sites == [0x1000] and vm.trapped_msrs == [0x40000000]


def test_vcpu_stores_state():
    vm = FakeEngineVm()
    v = vm.create_vcpu(1)
    assert isinstance(v, (EngineVcpu, FakeEngineVcpu)) and v.index == 1 and vm.vcpus == [v]
    regs = Regs(rax=1, rip=0x10_0000, rflags=2)
    v.set_regs(regs)
    regs.rax = 99                                   # the vCPU keeps its own copy
    got = v.get_regs()
    assert (got.rax, got.rip, got.rflags) == (1, 0x10_0000, 2)
    got.rip = 5
    assert v.get_regs().rip == 0x10_0000
    s = SRegs()
    s.cr0, s.cr3, s.efer, s.cs.selector = 0x80000011, 0x1000, 0x500, 0x10
    v.set_sregs(s)
    got = v.get_sregs()
    assert (got.cr0, got.cr3, got.efer, got.cs.selector) == (0x80000011, 0x1000, 0x500, 0x10)
    v.set_msr(0x10, 7)
    assert v.get_msr(0x10) == 7 and v.get_msr(0x11) == 0
    v.set_cpuid([CpuidEntry(0, 0, 1, 2, 3, 4)])
    assert v.cpuid[0].eax == 1
    with pytest.raises(NotImplementedError):
        v.run()
    t1, t2 = v.get_tsc(), v.get_tsc()
    assert t2 > t1 and v.tsc_khz() == 2_000_000
    v.complete_hypercall(-22)
    assert v.completions == [("hypercall", -22)]
