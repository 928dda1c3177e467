"""The software engine's own contract, with tiny 32-bit guests written in machine code: exits
leave the instruction unexecuted and ``complete_*`` performs it, HLT sleeps until the LAPIC has
a vector, a triple fault is an exit, two vCPUs share the CPU fairly, guest user space cannot
reach I/O ports."""

from __future__ import annotations

import ctypes
import mmap
import struct
import threading
import time

import pytest

from pyxen.arch.x86.cpu import pvh_entry_state
from pyxen.engine.base import ExitKind

pytestmark = pytest.mark.tcg

CODE, GDT, IDT, HANDLER, DATA = 0x1000, 0x800, 0x2000, 0x3000, 0x5000


def mov_eax(v: int) -> bytes:
    return b"\xB8" + v.to_bytes(4, "little")


@pytest.fixture
def vm():
    from pyxen.engine.tcg import TcgEngine
    vm = TcgEngine().create_vm()
    mem = mmap.mmap(-1, 4 << 20)
    vm.map_memory(0, 4 << 20, ctypes.addressof(ctypes.c_char.from_buffer(mem)))
    # GDT: null, null, flat 32-bit code (0x10), flat data (0x18), user code (0x23), user data (0x2b)
    gdt = struct.pack("<6Q", 0, 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF,
                      0x00CFFA000000FFFF, 0x00CFF2000000FFFF)
    mem[GDT:GDT + len(gdt)] = gdt
    vm.mem = mem
    vm.set_trapped_ports([0x80, 0x81])
    yield vm
    vm.close()


def boot(vm, index: int, code: bytes, *, idt_limit: int = 0x7FF):
    vm.mem[CODE + 0x400 * index:CODE + 0x400 * index + len(code)] = code
    v = vm.vcpus[index] if index < len(vm.vcpus) else vm.create_vcpu(index)
    s = v.get_sregs()
    r = pvh_entry_state(s, CODE + 0x400 * index, 0)
    r.rsp = 0x3F000 - 0x1000 * index
    s.gdt.base, s.gdt.limit = GDT, 6 * 8 - 1
    s.idt.base, s.idt.limit = IDT, idt_limit
    v.set_sregs(s)
    v.set_regs(r)
    if index:
        v.make_runnable()
    return v


def gate(vector: int, handler: int, vm, dpl: int = 0) -> None:
    lo = (handler & 0xFFFF) | (0x10 << 16)
    hi = (handler & 0xFFFF0000) | 0x8E00 | (dpl << 13)
    vm.mem[IDT + 8 * vector:IDT + 8 * vector + 8] = struct.pack("<II", lo, hi)


def test_in_exit_is_completed_by_the_vmm(vm):
    v = boot(vm, 0, b"\xE5\x80" + b"\xE7\x81")            # in eax,0x80 ; out 0x81,eax
    ex = v.run()
    assert (ex.kind, ex.port, ex.size, ex.is_write) == (ExitKind.IO, 0x80, 4, False)
    assert v.get_regs().rip == CODE                      # not executed yet
    v.complete_io_read((0x12345678).to_bytes(4, "little"))
    assert v.get_regs().rip == CODE + 2
    ex = v.run()
    assert (ex.kind, ex.port, ex.data) == (ExitKind.IO, 0x81, (0x12345678).to_bytes(4, "little"))


def test_vmcall_is_a_hypercall_exit(vm):
    v = boot(vm, 0, mov_eax(17) + b"\x0F\x01\xC1" + b"\xE7\x81")   # vmcall
    ex = v.run()
    assert ex.kind is ExitKind.HYPERCALL and ex.via == "insn"
    assert v.get_regs().rax == 17
    v.complete_hypercall(-38)
    ex = v.run()
    assert ex.kind is ExitKind.IO and int.from_bytes(ex.data, "little") == (-38) & 0xFFFFFFFF


def test_triple_fault_is_a_shutdown_exit(vm):
    v = boot(vm, 0, b"\xCC", idt_limit=0)                # int3 with an empty IDT
    assert v.run().kind is ExitKind.SHUTDOWN


def test_hlt_sleeps_until_an_interrupt_arrives(vm):
    gate(0x40, HANDLER, vm)
    vm.mem[HANDLER:HANDLER + 2] = b"\xE6\x81"            # out 0x81,al
    svr = b"\xC7\x05" + (0xFEE000F0).to_bytes(4, "little") + (0x1FF).to_bytes(4, "little")
    v = boot(vm, 0, svr + mov_eax(0x5A) + b"\xFB\xF4")   # enable LAPIC; sti; hlt
    result = []
    t = threading.Thread(target=lambda: result.append(v.run()))
    t.start()
    time.sleep(0.3)
    assert t.is_alive(), "run() returned while the vCPU should be halted"
    vm.inject_msi(0, 0x40)
    t.join(5)
    assert result and result[0].kind is ExitKind.IO and result[0].port == 0x81
    assert result[0].data == b"\x5A"


def test_two_vcpus_share_the_cpu(vm):
    spin = lambda off: b"\xFF\x05" + (DATA + off).to_bytes(4, "little") + b"\xEB\xF8"  # inc; jmp
    v0, v1 = boot(vm, 0, spin(0)), None
    v1 = boot(vm, 1, spin(4))
    threads = [threading.Thread(target=v.run) for v in (v0, v1)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    for v in (v0, v1):
        v.kick()
    for t in threads:
        t.join(5)
    c0, c1 = struct.unpack_from("<II", vm.mem, DATA)
    assert c0 > 1000 and c1 > 1000, (c0, c1)
    assert 0.2 < c0 / c1 < 5, (c0, c1)                    # neither starves


def _to_ring3(vm, tr_present: int):
    gate(13, HANDLER, vm)
    vm.mem[HANDLER:HANDLER + 2] = b"\xE6\x80"            # #GP handler: out 0x80,al (ring 0)
    tss = 0x4000
    vm.mem[tss + 4:tss + 8] = (0x3F000).to_bytes(4, "little")   # esp0
    vm.mem[tss + 8:tss + 12] = (0x18).to_bytes(4, "little")     # ss0
    user = CODE + 0x200
    vm.mem[user:user + 2] = b"\xE6\x81"                  # out 0x81,al in ring 3
    # iret to ring 3: push ss, esp, eflags, cs, eip
    code = (b"\x6A\x2B" + b"\x68" + (0x3E000).to_bytes(4, "little") + b"\x6A\x02"
            + b"\x6A\x23" + b"\x68" + user.to_bytes(4, "little") + b"\xCF")
    v = boot(vm, 0, code)
    s = v.get_sregs()
    s.tr.base, s.tr.limit, s.tr.selector, s.tr.type, s.tr.present = tss, 0x67, 0, 0xB, tr_present
    v.set_sregs(s)
    return v


def test_bad_task_register_is_the_guests_fault_not_the_vmms(vm):
    # A ring change with TR not present is #TS for the guest (QEMU would abort the process);
    # with no #TS handler it escalates to a triple fault, an exit like any other.
    v = _to_ring3(vm, tr_present=0)
    assert v.run().kind is ExitKind.SHUTDOWN


def test_user_mode_port_io_faults(vm):
    # ring 3 (IOPL 0) executing OUT must raise #GP, not reach the VMM's port
    v = _to_ring3(vm, tr_present=1)
    ex = v.run()
    assert (ex.kind, ex.port) == (ExitKind.IO, 0x80), "user-mode OUT reached the VMM"


def test_unbacked_memory_reads_all_ones_and_drops_writes(vm):
    # mov dword [0x800000], 0x1234 ; mov eax, [0x800000] ; out 0x81, eax   (4 MiB VM)
    code = (b"\xC7\x05" + (0x800000).to_bytes(4, "little") + (0x1234).to_bytes(4, "little")
            + b"\xA1" + (0x800000).to_bytes(4, "little") + b"\xE7\x81")
    v = boot(vm, 0, code)
    ex = v.run()
    assert (ex.kind, ex.port, ex.data) == (ExitKind.IO, 0x81, b"\xff\xff\xff\xff")


def test_memory_mapped_later_replaces_a_void_page(vm):
    code = b"\xA1" + (0x800000).to_bytes(4, "little") + b"\xE7\x81"   # mov eax,[0x800000]; out
    v = boot(vm, 0, code)
    assert v.run().data == b"\xff\xff\xff\xff"
    extra = mmap.mmap(-1, 0x1000)
    extra[0:4] = b"\x78\x56\x34\x12"
    vm.map_memory(0x800000, 0x1000, ctypes.addressof(ctypes.c_char.from_buffer(extra)))
    vm.extra = extra
    boot(vm, 0, code)
    assert v.run().data == b"\x78\x56\x34\x12"
