"""The software engine's live-migration primitives, with tiny 32-bit guests in machine code:
the guest-write (dirty page) log, and vCPU state blobs that continue a computation in a
second engine instance exactly where the first one stopped."""

from __future__ import annotations

import ctypes
import math
import mmap
import struct
import threading
import time

import pytest

from pyxen.arch.x86 import lapic as L
from pyxen.arch.x86.cpu import pvh_entry_state
from pyxen.engine.base import ExitKind
from pyxen.errors import EngineError

pytestmark = pytest.mark.tcg

MEM = 4 << 20
CODE, GDT, DATA = 0x1000, 0x800, 0x6000
SLOT_B, SLOT_B_SIZE = 0x800000, 0x10000
PD, PT, PT_B = 0x10000, 0x11000, 0x12000          # 32-bit paging structures
PAGE_TABLE_PAGES = {PD >> 12, PT >> 12, PT_B >> 12}


@pytest.fixture(scope="module")
def engine():
    from pyxen.engine.tcg import TcgEngine
    return TcgEngine()


def new_vm(engine, trapped=(0x80, 0x81)):
    vm = engine.create_vm()
    mem = mmap.mmap(-1, MEM)
    vm.slot = vm.map_memory(0, MEM, ctypes.addressof(ctypes.c_char.from_buffer(mem)))
    gdt = struct.pack("<4Q", 0, 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF)
    mem[GDT:GDT + len(gdt)] = gdt
    vm.mem = mem
    vm.set_trapped_ports(list(trapped))
    return vm


@pytest.fixture
def vms(engine):
    made = []

    def make():
        made.append(new_vm(engine))
        return made[-1]
    yield make
    for vm in made:
        vm.close()


def boot(vm, code: bytes, *, paging: bool = False, sse: bool = False):
    vm.mem[CODE:CODE + len(code)] = code
    v = vm.vcpus[0] if vm.vcpus else vm.create_vcpu(0)
    s = v.get_sregs()
    r = pvh_entry_state(s, CODE, 0)
    r.rsp = 0x3F000
    s.gdt.base, s.gdt.limit = GDT, 4 * 8 - 1
    if paging:
        s.cr3, s.cr0 = PD, s.cr0 | 0x80000000
    if sse:
        s.cr0 = (s.cr0 & ~0x4) | 0x2                    # EM off, MP on
        s.cr4 |= 0x600                                 # OSFXSR, OSXMMEXCPT
    v.set_sregs(s)
    v.set_regs(r)
    return v


def movd(addr: int, value: int) -> bytes:            # mov dword [addr], value
    return b"\xC7\x05" + struct.pack("<II", addr, value)


OUT_81 = b"\xE6\x81"


def dirty_pages(bitmap: bytes) -> set[int]:
    return {i for i in range(len(bitmap) * 8) if bitmap[i >> 3] >> (i & 7) & 1}


# ------------------------------------------------------------------------------- dirty log

def test_dirty_log_records_guest_writes_and_rearms_after_a_fetch(vms):
    vm = vms()
    extra = mmap.mmap(-1, SLOT_B_SIZE)
    slot_b = vm.map_memory(SLOT_B, SLOT_B_SIZE, ctypes.addressof(ctypes.c_char.from_buffer(extra)))
    # identity-mapped 32-bit paging with A/D bits clear: the walker sets them (guest writes)
    vm.mem[PD:PD + 12] = struct.pack("<3I", PT | 3, 0, PT_B | 3)
    vm.mem[PT:PT + 4096] = struct.pack("<1024I", *((i << 12) | 3 for i in range(1024)))
    vm.mem[PT_B:PT_B + 64] = struct.pack("<16I", *((SLOT_B + (i << 12)) | 3 for i in range(16)))
    phase1 = (movd(0x100000, 1) + movd(0x105000, 2) + movd(0x2FF000, 3)
              + b"\xF0\xFF\x05" + struct.pack("<I", 0x190000)        # lock inc [0x190000]
              + b"\xB9\x05\x00\x00\x00\x31\xC0"                      # mov ecx,5; xor eax,eax
              + b"\xF0\x0F\xB1\x0D" + struct.pack("<I", 0x1A0000)    # lock cmpxchg [..],ecx
              + b"\xBF" + struct.pack("<I", 0x180FF8)                # mov edi,0x180ff8
              + b"\xB9\x04\x00\x00\x00\xB8\x55\x00\x00\x00"          # mov ecx,4; mov eax,0x55
              + b"\xFC\xF3\xAB"                                      # cld; rep stosd (2 pages)
              + movd(SLOT_B + 0x1000, 4) + OUT_81)
    phase2 = movd(0x105004, 5) + movd(0x200000, 6) + OUT_81
    v = boot(vm, phase1 + phase2 + OUT_81, paging=True)
    vm.set_dirty_logging(True)
    assert dirty_pages(vm.get_dirty_log(vm.slot)) == set()

    assert v.run().port == 0x81
    written = {0x100, 0x105, 0x2FF, 0x190, 0x1A0, 0x180, 0x181}
    got = dirty_pages(vm.get_dirty_log(vm.slot))
    assert got - PAGE_TABLE_PAGES == written
    assert PT >> 12 in got                               # the walker's A/D updates count
    assert dirty_pages(vm.get_dirty_log(slot_b)) == {1}
    assert struct.unpack_from("<I", vm.mem, 0x1A0000)[0] == 5
    # fetching cleared the log
    assert dirty_pages(vm.get_dirty_log(vm.slot)) == set()
    assert dirty_pages(vm.get_dirty_log(slot_b)) == set()

    # a page written before the fetch (its TLB entry is hot) is caught again
    assert v.run().port == 0x81
    assert dirty_pages(vm.get_dirty_log(vm.slot)) - PAGE_TABLE_PAGES == {0x105, 0x200}
    assert dirty_pages(vm.get_dirty_log(slot_b)) == set()

    vm.set_dirty_logging(False)
    assert v.run().port == 0x81
    assert vm.get_dirty_log(vm.slot) == b"\xff" * (MEM >> 15)
    assert vm.get_dirty_log(slot_b) == b"\xff" * (SLOT_B_SIZE >> 15)
    vm.unmap_memory(slot_b)


def test_dirty_log_fetch_while_the_guest_runs(vms):
    vm = vms()
    v = boot(vm, b"\xFF\x05" + struct.pack("<I", 0x300000) + b"\xEB\xF8")   # inc [..]; jmp
    vm.set_dirty_logging(True)
    t = threading.Thread(target=v.run)
    t.start()
    try:
        for _ in range(5):
            time.sleep(0.02)
            before = struct.unpack_from("<I", vm.mem, 0x300000)[0]
            assert dirty_pages(vm.get_dirty_log(vm.slot)) == {0x300}
            time.sleep(0.02)
            assert struct.unpack_from("<I", vm.mem, 0x300000)[0] != before   # still running
    finally:
        v.kick()
        t.join(5)
    assert not t.is_alive()


# ------------------------------------------------------------------------------- vCPU state

LSTAR = 0xC0000082
# 32-bit code (see the listing in the comments); stops at `out 0x80` half-way
PROGRAM = bytes.fromhex(
    "b9820000c0"          # mov ecx, 0xC0000082
    "b8efcdab89"          # mov eax, 0x89ABCDEF
    "ba67452301"          # mov edx, 0x01234567
    "0f30"                # wrmsr                     LSTAR = 0x0123456789ABCDEF
    "dbe3d9e8d9ebdec1"    # fninit; fld1; fldpi; faddp  st0 = 1 + pi
    "f30f6f1d00600000"    # movdqu xmm3, [0x6000]
    "660ffedb"            # paddd xmm3, xmm3
    "be00000000"          # mov esi, 0
    "bb07000000"          # mov ebx, 7
    "6bdb03"              # 1: imul ebx, ebx, 3
    "01f3"                # add ebx, esi
    "891cb500700000"      # mov [0x7000 + esi*4], ebx
    "46"                  # inc esi
    "83fe10"              # cmp esi, 16
    "75ee"                # jne 1b
    "e680"                # out 0x80, al              <- saved here
    "d8c8"                # fmul st0, st0             st0 = (1 + pi)^2
    "660ffe1d00600000"    # paddd xmm3, [0x6000]
    "f30f7f1d00710000"    # movdqu [0x7100], xmm3
    "dd1d00720000"        # fstp qword [0x7200]
    "b9820000c0"          # mov ecx, 0xC0000082
    "0f32"                # rdmsr
    "a310720000"          # mov [0x7210], eax
    "891514720000"        # mov [0x7214], edx
    "6bdb03"              # 2: imul ebx, ebx, 3
    "01f3"                # add ebx, esi
    "891cb500700000"      # mov [0x7000 + esi*4], ebx
    "46"                  # inc esi
    "83fe20"              # cmp esi, 32
    "75ee"                # jne 2b
    "e681"                # out 0x81, al
)


def _expected_table() -> list[int]:
    out, ebx = [], 7
    for esi in range(32):
        ebx = (ebx * 3 + esi) & 0xFFFFFFFF
        out.append(ebx)
    return out


def _start(vm):
    vm.mem[DATA:DATA + 16] = struct.pack("<4I", 1, 2, 3, 4)
    v = boot(vm, PROGRAM, sse=True)
    v.set_msr(0x4B564D00, 0xDEADBEEF)                  # a VMM-level MSR
    ex = v.run()
    assert (ex.kind, ex.port, ex.is_write) == (ExitKind.IO, 0x80, True)
    return v


def test_state_continues_in_another_engine_instance(vms):
    vm1, vm2 = vms(), vms()
    v1 = _start(vm1)
    now = time.monotonic_ns()
    v1.lapic.write(L.REG_TIMER_DIVIDE, 0xB, now)        # divide by 1: 1 tick = 1 ns
    v1.lapic.write(L.REG_TIMER_INITIAL, 10**9, now)      # an armed one-second timer
    blob = v1.save_state()
    remaining = v1.lapic.timer_deadline() - time.monotonic_ns()
    vm2.mem[:] = vm1.mem[:]
    v2 = vm2.create_vcpu(0)
    v2.load_state(blob)
    assert abs((v2.lapic.timer_deadline() - time.monotonic_ns()) - remaining) < 50_000_000
    assert v2.get_msr(0x4B564D00) == 0xDEADBEEF
    assert bytes(v2.get_regs()) == bytes(v1.get_regs())
    assert bytes(v2.get_sregs()) == bytes(v1.get_sregs())

    for v in (v1, v2):
        ex = v.run()
        assert (ex.kind, ex.port) == (ExitKind.IO, 0x81)
    assert bytes(v2.get_regs()) == bytes(v1.get_regs())
    assert bytes(v2.get_sregs()) == bytes(v1.get_sregs())
    assert vm2.mem[:] == vm1.mem[:]
    # and both computed the right thing: FPU stack, SSE register, LSTAR, the loop state
    m = vm2.mem
    assert list(struct.unpack_from("<32I", m, 0x7000)) == _expected_table()
    assert struct.unpack_from("<4I", m, 0x7100) == (3, 6, 9, 12)
    assert struct.unpack_from("<d", m, 0x7200)[0] == pytest.approx((1 + math.pi) ** 2, rel=1e-15)
    assert struct.unpack_from("<Q", m, 0x7210)[0] == 0x0123456789ABCDEF
    assert v2.get_regs().rsi == 32


def test_state_round_trips_in_place(vms):
    vm = vms()
    v = _start(vm)
    blob = v.save_state()
    assert v.save_state() == blob                      # saving changes nothing
    v.load_state(blob)
    assert v.run().port == 0x81
    assert list(struct.unpack_from("<32I", vm.mem, 0x7000)) == _expected_table()


def test_state_needs_the_exit_completed(vms):
    vm = vms()
    v = boot(vm, b"\xE5\x80\xE7\x81")                 # in eax, 0x80; out 0x81, eax
    assert v.run().kind is ExitKind.IO
    with pytest.raises(EngineError, match="not completed"):
        v.save_state()
    v.complete_io_read(b"\x01\x02\x03\x04")
    blob = v.save_state()
    vm2 = vms()
    vm2.mem[:] = vm.mem[:]
    v2 = vm2.create_vcpu(0)
    v2.load_state(blob)
    assert v2.run().data == b"\x01\x02\x03\x04"


def _corrupt(blob: bytes, offset: int, new: bytes) -> bytes:
    return blob[:offset] + new + blob[offset + len(new):]


def _with_meta(blob: bytes, edit) -> bytes:
    """``blob`` with its JSON metadata replaced by ``edit(metadata)`` (header kept consistent)."""
    from pyxen.engine.tcg import _STATE_HEADER
    magic, ver, flen, clen, mlen = _STATE_HEADER.unpack_from(blob)
    start = _STATE_HEADER.size + flen + clen
    meta = edit(blob[start:])
    return (_STATE_HEADER.pack(magic, ver, flen, clen, len(meta)) + blob[_STATE_HEADER.size:start]
            + meta)


def test_bad_blobs_are_refused_and_change_nothing(vms, engine):
    from pyxen.engine.tcg import _STATE_HEADER
    vm = vms()
    v = _start(vm)
    blob = v.save_state()
    vm2 = vms()
    v2 = vm2.create_vcpu(0)
    other = vm2.create_vcpu(1)
    before = bytes(v2.get_regs()), bytes(v2.get_sregs())
    _magic, _ver, flen, clen, _mlen = _STATE_HEADER.unpack_from(blob)
    ctx = _STATE_HEADER.size + flen
    meta = ctx + clen
    bad = {
        "empty": b"",
        "truncated": blob[:-1],
        "too long": blob + b"\0",
        "magic": _corrupt(blob, 0, b"NOTTCGV1"),
        "version": _corrupt(blob, 8, b"\x63\x00"),
        "engine build": _corrupt(blob, _STATE_HEADER.size + flen - 4, b"zzzz"),
        "lazy flags op": _corrupt(blob, ctx + 168, b"\xff\xff\x00\x00"),   # cc_op
        "breakpoint pointer": None,
        "metadata": _corrupt(blob, meta, b"["),
        "nested metadata": _with_meta(blob, lambda m: b"[" * 100_000 + b"]" * 100_000),
        "lapic": _with_meta(blob, lambda m: m.replace(b'"svr":', b'"svr":-')),
        "lapic clock": _with_meta(blob, lambda m: m.replace(b'"bus_hz":1000000000',
                                                             b'"bus_hz":1000000000.5')),
        "flag": _with_meta(blob, lambda m: m.replace(b'"halted":false', b'"halted":0')),
    }
    # CPUX86State: dr[6], dr[7] (reset values), then the cpu_breakpoint[4] host pointers
    dr67 = struct.pack("<QQ", 0xFFFF0FF0, 0x400)
    at = blob.index(dr67 + bytes(32), ctx) + len(dr67)
    bad["breakpoint pointer"] = _corrupt(blob, at, struct.pack("<Q", 0x7FFF12345678))
    for what, b in bad.items():
        assert b != blob, what
        match = "CPU context is invalid" if what in ("lazy flags op", "breakpoint pointer") \
            else "cannot load"
        with pytest.raises(EngineError, match=match):
            v2.load_state(b)
        assert (bytes(v2.get_regs()), bytes(v2.get_sregs())) == before, what
    with pytest.raises(EngineError, match="APIC ID"):
        other.load_state(blob)
    v2.load_state(blob)                                # the good one still loads
    assert v2.get_msr(0x4B564D00) == 0xDEADBEEF


def test_state_format_names_the_engine_build(engine):
    from pyxen.tcg.build import build_id
    assert engine.state_format == f"tcg:unicorn-{build_id()}"
