"""The kvm engine's migration primitives on /dev/kvm, with tiny 32-bit guests in machine code
(paging off, ring 0): the dirty-page log (KVM_GET_DIRTY_LOG over re-registered slots) and vCPU
state blobs (save_state in one VM, load_state in another, both continue to the same result).

Only architectural behaviour is asserted, so the same tests hold on VT-x/AMD-V hosts and on
kvm_pvm (where guest ring 0 runs in KVM's instruction emulator): plain moves, MSR and LAPIC
accesses, port I/O and a MOVDQU, no instruction the emulator lacks.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
import threading
import time

import pytest

from pyxen.arch.x86.cpu import pvh_entry_state
from pyxen.engine.base import ExitKind
from pyxen.errors import EngineError
from pyxen.kvm.bindings import KVM_MP_STATE_HALTED

pytestmark = pytest.mark.kvm

MEM = 4 << 20
GDT, CODE, XMM_SRC, RESULTS, WORK = 0x800, 0x1000, 0x5000, 0x6000, 0x10000
LSTAR, KERNEL_GS_BASE = 0xC0000082, 0xC0000102
LSTAR_VALUE, KGS_VALUE = 0xFFFF8123_9ABCDEF0, 0x00000FFE_DDCCBBAA
XMM3 = bytes(range(0xA0, 0xB0))
SEED, ROUNDS = 0x12345678, 2048
CR4_OSFXSR_OSXMMEXCPT = 0x600

# The state guest (as --32):
#   mov $LSTAR,%ecx; mov $0x9ABCDEF0,%eax; mov $0xFFFF8123,%edx; wrmsr
#   mov $KERNEL_GS_BASE,%ecx; mov $0xDDCCBBAA,%eax; mov $0xFFE,%edx; wrmsr
#   movdqu 0x5000,%xmm3;  movl $0x1FF,0xFEE000F0          (LAPIC software enable)
#   mov $SEED,%eax; mov $WORK,%edi; mov $ROUNDS,%ecx
#   1: xorshift32 %eax (<<13, >>17, <<5); mov %eax,(%edi); add $4,%edi; dec %ecx; jnz 1b
#   out %al,$0x80                                          <- saved here
#   mov $ROUNDS,%ecx; 2: (the same loop, continuing at %edi)
#   mov %eax,0x6028; mov $LSTAR,%ecx; rdmsr; mov %eax,0x6000; mov %edx,0x6004
#   movdqu %xmm3,0x6010; mov 0xFEE000F0,%ebx; mov %ebx,0x6020   (SVR)
#   mov 0xFEE00220,%ebx; mov %ebx,0x6024                        (IRR, vectors 0x40-0x5F)
#   mov 0x6028,%eax; out %eax,$0x81
STATE_GUEST = bytes.fromhex(
    "b9820000c0b8f0debc9aba2381ffff0f30b9020100c0b8aabbccddbafe0f00000f30f30f6f1d00500000"
    "c705f000e0feff010000b878563412bf00000100b90008000089c2c1e20d31d089c2c1ea1131d089c2c1"
    "e20531d0890783c7044975e3e680b90008000089c2c1e20d31d089c2c1ea1131d089c2c1e20531d08907"
    "83c7044975e3a328600000b9820000c00f32a300600000891504600000f30f7f1d106000008b1df000e0"
    "fe891d206000008b1d2002e0fe891d24600000a128600000e781")

# The hypercall guest: mov $17,%eax; out %eax,$0xEB (hypercall page stub); mov %eax,%ebx;
# mov $18,%eax; hc: vmcall (a trapped hypercall site); mov %eax,%esi; out %al,$0x81
HYPERCALL_GUEST = bytes.fromhex("b811000000e7eb89c3b8120000000f01c189c6e681")
VMCALL_AT = CODE + 0x0E


# The long-mode guest (as --64): mov $KERNEL_GS_BASE,%ecx; mov $0x7000,%eax; xor %edx,%edx;
# wrmsr; movabs $0x1122334455667788,%r12; mov $0x5000,%eax; movdqu (%rax),%xmm9;
# out %al,$0x80 (saved here); swapgs; mov $GS_BASE,%ecx; rdmsr; mov %eax,0x6000;
# mov %edx,0x6004; movdqu %xmm9,0x6010; mov %r12,0x6020; out %al,$0x81
LONG_MODE_GUEST = bytes.fromhex(
    "b9020100c0b80070000031d20f3049bc8877665544332211b800500000f3440f6f08e6800f01f8b90101"
    "00c00f328904250060000089142504600000f3440f7f0c25106000004c89242520600000e681")
PML4, PDPT, PD, KGS_LONG = 0x20000, 0x21000, 0x22000, 0x7000


# The halting guest: movl $0x1FF,0xFEE000F0 (LAPIC on); mov $0x5A,%eax; sti; hlt;
# mov $0x66,%eax; out %al,$0x80;  handler (vector 0x40, at CODE + 0x18): out %al,$0x81
HALT_GUEST = bytes.fromhex("c705f000e0feff010000b85a000000fbf4b866000000e680e681")
IDT, VECTOR = 0x2000, 0x40


def movl(addr: int, value: int) -> bytes:
    return b"\xC7\x05" + addr.to_bytes(4, "little") + value.to_bytes(4, "little")


def out_al(port: int) -> bytes:
    return b"\xE6" + bytes([port])


def xorshift32(x: int) -> int:
    x ^= (x << 13) & 0xFFFFFFFF
    x ^= x >> 17
    x ^= (x << 5) & 0xFFFFFFFF
    return x


@pytest.fixture(scope="module")
def engine():
    from pyxen.engine.kvm import KvmEngine
    return KvmEngine()


class Guest:
    """One VM with ``MEM`` bytes of RAM at 0 (slot ``slot``) and a flat 32-bit GDT."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.vm = engine.create_vm()
        self.maps: list[mmap.mmap] = []
        self.mem = self.add_memory(0, MEM)
        self.slot = self.last_slot
        gdt = struct.pack("<4Q", 0, 0, 0x00CF9B000000FFFF, 0x00CF93000000FFFF)
        self.mem[GDT:GDT + len(gdt)] = gdt

    def add_memory(self, gpa: int, size: int, **kw) -> mmap.mmap:
        m = mmap.mmap(-1, size)
        self.maps.append(m)
        self.last_slot = self.vm.map_memory(gpa, size,
                                            ctypes.addressof(ctypes.c_char.from_buffer(m)), **kw)
        return m

    def vcpu(self, index: int = 0, code: bytes | None = None):
        v = self.vm.create_vcpu(index)
        v.set_cpuid(self.engine.supported_cpuid())
        if code is not None:
            self.mem[CODE:CODE + len(code)] = code
            s = v.get_sregs()
            r = pvh_entry_state(s, CODE, 0)
            r.rsp = 0x3F000
            s.gdt.base, s.gdt.limit = GDT, 4 * 8 - 1
            s.cr4 |= CR4_OSFXSR_OSXMMEXCPT
            v.set_sregs(s)
            v.set_regs(r)
        return v

    def close(self) -> None:
        self.vm.close()


@pytest.fixture
def guests(engine):
    made: list[Guest] = []

    def make() -> Guest:
        g = Guest(engine)
        made.append(g)
        return g

    yield make
    for g in made:
        g.close()


def run_to(v, port: int):
    ex = v.run()
    assert ex.kind is ExitKind.IO and ex.port == port, ex
    return ex


def dirty_pages(bitmap: bytes) -> set[int]:
    return {i for i in range(len(bitmap) * 8) if bitmap[i // 8] >> (i % 8) & 1}


# ----------------------------------------------------------------------------- dirty log

def test_dirty_log_records_guest_writes_and_clears_on_fetch(guests):
    g = guests()
    pre = g.add_memory(0x400000, 0x1000, log_dirty=True)     # logs from the start
    pre_slot = g.last_slot
    code = (movl(0x9000, 1) + movl(0x400000, 1) + out_al(0x80)
            + movl(0x5010, 2) + movl(0x11000, 2) + movl(0x2FF000, 2) + out_al(0x80)
            + movl(0x28000, 3) + movl(0x401000, 3) + out_al(0x80)
            + movl(0x29000, 4) + out_al(0x81))
    v = g.vcpu(0, code)
    npages = MEM >> 12

    assert dirty_pages(g.vm.get_dirty_log(g.slot)) == set(range(npages)), "logging off: all"
    run_to(v, 0x80)
    assert pre[0:4] == b"\x01\0\0\0"
    g.vm.set_dirty_logging(True)                            # starting clears every log
    assert dirty_pages(g.vm.get_dirty_log(g.slot)) == set()
    assert dirty_pages(g.vm.get_dirty_log(pre_slot)) == set()

    run_to(v, 0x80)
    assert dirty_pages(g.vm.get_dirty_log(g.slot)) == {0x5, 0x11, 0x2FF}
    assert dirty_pages(g.vm.get_dirty_log(g.slot)) == set(), "a fetch clears the log"

    late = g.add_memory(0x401000, 0x1000)                   # mapped while logging is on
    late_slot = g.last_slot
    run_to(v, 0x80)
    assert late[0:4] == b"\x03\0\0\0"
    assert dirty_pages(g.vm.get_dirty_log(g.slot)) == {0x28}
    assert dirty_pages(g.vm.get_dirty_log(late_slot)) == {0}
    assert dirty_pages(g.vm.get_dirty_log(pre_slot)) == set()

    g.vm.set_dirty_logging(False)
    bitmap = g.vm.get_dirty_log(g.slot)
    assert dirty_pages(bitmap) == set(range(npages)) and len(bitmap) == npages // 8
    assert dirty_pages(g.vm.get_dirty_log(late_slot)) == {0}  # one page: one bit, no padding
    assert dirty_pages(g.vm.get_dirty_log(pre_slot)) == set()  # asked for its own log
    run_to(v, 0x81)                                          # the guest runs on unlogged
    assert g.mem[0x29000:0x29004] == b"\x04\0\0\0"


# ----------------------------------------------------------------------------- vCPU state

def test_state_moves_a_running_vcpu_into_another_vm(engine, guests):
    src = guests()
    src.mem[XMM_SRC:XMM_SRC + 16] = XMM3
    a = src.vcpu(0, STATE_GUEST)
    run_to(a, 0x80)
    src.vm.inject_msi(0, 0x40)           # pending in the LAPIC's IRR: the guest runs with IF=0
    tsc_at_save = a.get_tsc()
    blob = a.save_state()
    assert engine.state_format == "kvm:1"

    dst = guests()
    dst.mem[:] = src.mem[:]
    b = dst.vcpu(0)
    b.load_state(blob)
    assert tsc_at_save <= b.get_tsc() < tsc_at_save + 10 * 1000 * b.tsc_khz()

    x = SEED
    for i in range(ROUNDS):
        x = xorshift32(x)
    ends = [run_to(v, 0x81).data for v in (a, b)]           # both continue from the save point
    for i in range(ROUNDS):
        x = xorshift32(x)
    assert ends == [x.to_bytes(4, "little")] * 2

    for g, v in ((src, a), (dst, b)):
        lstar, xmm3, svr, irr, last = struct.unpack_from("<Q8x16sIII", g.mem, RESULTS)
        assert lstar == LSTAR_VALUE
        assert xmm3 == XMM3
        assert svr & 0x1FF == 0x1FF                         # LAPIC enabled
        assert irr & 1                                      # vector 0x40 still pending
        assert last == x
        assert v.get_msr(LSTAR) == LSTAR_VALUE and v.get_msr(KERNEL_GS_BASE) == KGS_VALUE
        xsave = v.vcpu.get_xsave()
        assert xsave[160 + 3 * 16:160 + 4 * 16] == XMM3
    assert src.mem[WORK:WORK + 2 * ROUNDS * 4] == dst.mem[WORK:WORK + 2 * ROUNDS * 4]
    assert bytes(a.get_regs()) == bytes(b.get_regs())
    sa, sb = a.get_sregs(), b.get_sregs()
    assert (sa.cr0, sa.cr4, sa.efer, sa.apic_base, bytes(sa.cs)) == \
           (sb.cr0, sb.cr4, sb.efer, sb.apic_base, bytes(sb.cs))


def test_state_in_long_mode_with_paging(guests):
    src = guests()
    m = src.mem
    m[XMM_SRC:XMM_SRC + 16] = XMM3
    struct.pack_into("<Q", m, PML4, PDPT | 3)
    struct.pack_into("<Q", m, PDPT, PD | 3)
    struct.pack_into("<2Q", m, PD, 0x83, 0x200000 | 0x83)  # 2 x 2 MiB, identity
    a = src.vcpu(0, LONG_MODE_GUEST)
    s = a.get_sregs()
    s.cs.l, s.cs.db = 1, 0
    s.cr3, s.cr4 = PML4, 0x20 | CR4_OSFXSR_OSXMMEXCPT      # PAE
    s.cr0 |= 0x80000000                                     # PG
    s.efer = 0x500                                          # LME | LMA
    a.set_sregs(s)
    run_to(a, 0x80)
    blob = a.save_state()

    dst = guests()
    dst.mem[:] = src.mem[:]
    b = dst.vcpu(0)
    b.load_state(blob)
    for g, v in ((src, a), (dst, b)):
        run_to(v, 0x81)
        gs_base, xmm9, r12 = struct.unpack_from("<Q8x16sQ", g.mem, RESULTS)
        assert (gs_base, xmm9, r12) == (KGS_LONG, XMM3, 0x1122334455667788)  # SWAPGS'd
        s = v.get_sregs()
        assert (s.efer & 0x500, s.cr3, s.gs.base) == (0x500, PML4, KGS_LONG)
        assert v.get_msr(KERNEL_GS_BASE) == 0                # swapped into GS.base
    assert bytes(a.get_regs()) == bytes(b.get_regs())


def test_a_halted_vcpu_wakes_in_the_vm_that_loads_it(guests):
    src = guests()
    handler = CODE + 0x18
    gate = struct.pack("<II", (handler & 0xFFFF) | (0x10 << 16), (handler & 0xFFFF0000) | 0x8E00)
    src.mem[IDT + 8 * VECTOR:IDT + 8 * VECTOR + 8] = gate
    a = src.vcpu(0, HALT_GUEST)
    s = a.get_sregs()
    s.idt.base, s.idt.limit = IDT, 0x7FF
    a.set_sregs(s)
    deadline = time.monotonic() + 10
    while True:                                             # until it halts in the kernel
        result: list = []
        t = threading.Thread(target=lambda: result.append(a.run()))
        t.start()
        time.sleep(0.05)
        a.kick()
        t.join(10)
        assert result and result[0].kind is ExitKind.INTERRUPTED, result
        if a.vcpu.get_mp_state() == KVM_MP_STATE_HALTED or time.monotonic() > deadline:
            break
    assert a.vcpu.get_mp_state() == KVM_MP_STATE_HALTED
    blob = a.save_state()

    dst = guests()
    dst.mem[:] = src.mem[:]
    b = dst.vcpu(0)
    b.load_state(blob)
    dst.vm.inject_msi(0, VECTOR)
    ex = run_to(b, 0x81)                                    # woken by the interrupt
    assert ex.data == b"\x5A"


def test_pending_hypercalls_complete_on_the_vcpu_that_loads_them(guests):
    src, dst = guests(), guests()
    src.vm.set_hypercall_sites([VMCALL_AT])
    a = src.vcpu(0, HYPERCALL_GUEST)
    b = dst.vcpu(0)

    ex = a.run()
    assert ex.kind is ExitKind.HYPERCALL and ex.via == "page"
    saved: list[bytes] = []
    t = threading.Thread(target=lambda: saved.append(a.save_state()))  # a parked vCPU
    t.start()
    t.join(10)
    dst.mem[:] = src.mem[:]
    b.load_state(saved[0])
    for v in (a, b):
        assert v.get_regs().rax == 17
        v.complete_hypercall(0x1111)
        ex = v.run()
        assert ex.kind is ExitKind.HYPERCALL and ex.via == "insn" and ex.address == VMCALL_AT

    b.load_state(a.save_state())                            # load into a vCPU that has run
    for v in (a, b):
        v.complete_hypercall(0x2222)
        run_to(v, 0x81)
        r = v.get_regs()
        assert (r.rbx, r.rsi, r.rip) == (0x1111, 0x2222, CODE + len(HYPERCALL_GUEST))


def test_state_of_an_ap_waiting_for_sipi(guests):
    src, dst = guests(), guests()
    src.vcpu(0)
    ap = src.vcpu(1)
    mp = ap.vcpu.get_mp_state()
    blob = ap.save_state()
    bsp2 = dst.vcpu(0)
    ap2 = dst.vcpu(1)
    ap2.make_runnable()
    ap2.load_state(blob)
    assert ap2.vcpu.get_mp_state() == mp
    with pytest.raises(EngineError, match="vCPU 2.*vCPU 0"):
        bsp2.load_state(blob)                               # APIC IDs differ


def test_bad_blobs_are_refused_and_change_nothing(guests):
    from pyxen.engine.kvm import STATE_MAGIC, parse_state, pack_state

    g = guests()
    v = g.vcpu(0, HYPERCALL_GUEST)
    blob = v.save_state()
    before = bytes(v.get_regs())
    sections = parse_state(blob)

    def without(tag: bytes) -> bytes:
        return pack_state([(t, p) for t, p in sections.items() if t != tag])

    bad = {
        "truncated": blob[:-1],
        "header only": blob[:16],
        "too short": blob[:5],
        "wrong magic": b"NOTKVM!!" + blob[8:],
        "wrong version": STATE_MAGIC + struct.pack("<I", 99) + blob[12:],
        "trailing bytes": blob + b"\0",
        "missing LAPC": without(b"LAPC"),
        "bad LAPC size": pack_state([(t, p[:-4] if t == b"LAPC" else p)
                                     for t, p in sections.items()]),
        "empty": b"",
    }
    for what, data in bad.items():
        with pytest.raises(EngineError, match="bad vCPU state blob"):
            v.load_state(data)
        assert bytes(v.get_regs()) == before, what
    v.load_state(blob)                                       # the good one still loads
    assert bytes(v.get_regs()) == before
