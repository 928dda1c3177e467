"""Initial vCPU register states (pure functions over :mod:`pyxen.cpustate` structures).

* :func:`pvh_entry_state` — Xen's PVH boot contract (docs/misc/pvh.pandoc): 32-bit protected
  mode, paging off, flat segments, EBX = start_info.
* :func:`hvm_context_state` — a ``vcpu_hvm_context`` (VCPUOP_initialise) in 32- or 64-bit mode.
* :func:`real_mode_state` — an application processor started by INIT + SIPI.
"""

from __future__ import annotations

from pyxen.cpustate import Regs, Segment, SRegs

CR0_PE_ET = 0x11


def _flat(seg: Segment, selector: int, type_: int, *, code64: bool = False) -> None:
    seg.base, seg.limit, seg.selector, seg.type = 0, 0xFFFFFFFF, selector, type_
    seg.present, seg.dpl, seg.s, seg.g, seg.avl, seg.unusable = 1, 0, 1, 1, 0, 0
    seg.l, seg.db = (1, 0) if code64 else (0, 1)


def _tss(seg: Segment) -> None:
    seg.base, seg.limit, seg.selector, seg.type = 0, 0x67, 0, 0xB   # 32/64-bit busy TSS
    seg.present, seg.dpl, seg.s, seg.g, seg.l, seg.db, seg.unusable = 1, 0, 0, 0, 0, 0, 0


def _data_segments(s: SRegs, selector: int) -> None:
    for name in ("ds", "es", "ss", "fs", "gs"):
        _flat(getattr(s, name), selector, 3)
    s.ldt.selector, s.ldt.present, s.ldt.unusable, s.ldt.type = 0, 0, 1, 2


def pvh_entry_state(sregs: SRegs, entry: int, start_info: int) -> Regs:
    """Modify ``sregs`` (as read from a fresh vCPU) for the PVH entry; return the GPRs."""
    _flat(sregs.cs, 0x10, 0xB)
    _data_segments(sregs, 0x18)
    _tss(sregs.tr)
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = CR0_PE_ET, 0, 0, 0
    regs = Regs()
    regs.rip, regs.rbx, regs.rflags = entry, start_info, 0x2
    return regs


def hvm_context_state(sregs: SRegs, ctx: dict) -> Regs:
    """Apply a checked ``vcpu_hvm_context`` (see xen.hypercalls.vcpu.initialise)."""
    long_mode = ctx["mode"] == 64
    _flat(sregs.cs, 0x10 if not long_mode else 0x08, 0xB, code64=long_mode)
    _data_segments(sregs, 0x18 if not long_mode else 0x10)
    _tss(sregs.tr)
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = ctx["cr0"], ctx["cr3"], ctx["cr4"], ctx["efer"]
    regs = Regs()
    for name in ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "rip", "rflags"):
        setattr(regs, name, ctx[name])
    return regs


def real_mode_state(sregs: SRegs, sipi_vector: int) -> Regs:
    """The state after INIT + SIPI (Intel SDM 8.4.4/9.1.1): real mode at CS:IP = vector<<8 : 0."""
    for name in ("ds", "es", "ss", "fs", "gs"):
        seg = getattr(sregs, name)
        seg.base, seg.limit, seg.selector, seg.type = 0, 0xFFFF, 0, 3
        seg.present, seg.dpl, seg.s, seg.g, seg.l, seg.db, seg.avl, seg.unusable = 1, 0, 1, 0, 0, 0, 0, 0
    cs = sregs.cs
    cs.selector, cs.base, cs.limit, cs.type = sipi_vector << 8, sipi_vector << 12, 0xFFFF, 0xB
    cs.present, cs.dpl, cs.s, cs.g, cs.l, cs.db, cs.avl, cs.unusable = 1, 0, 1, 0, 0, 0, 0, 0
    tr = sregs.tr
    tr.base, tr.limit, tr.selector, tr.type = 0, 0xFFFF, 0, 0xB
    tr.present, tr.dpl, tr.s, tr.g, tr.l, tr.db, tr.unusable = 1, 0, 0, 0, 0, 0, 0
    ldt = sregs.ldt
    ldt.base, ldt.limit, ldt.selector, ldt.type = 0, 0xFFFF, 0, 2
    ldt.present, ldt.s, ldt.unusable = 1, 0, 0
    sregs.gdt.base, sregs.gdt.limit = 0, 0xFFFF
    sregs.idt.base, sregs.idt.limit = 0, 0xFFFF
    sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4, sregs.efer = 0x60000010, 0, 0, 0, 0
    regs = Regs()
    regs.rip, regs.rflags, regs.rdx = 0, 0x2, 0x600
    return regs
