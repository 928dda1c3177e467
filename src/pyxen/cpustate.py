"""Architectural x86-64 CPU state structures: the neutral currency between engines and the VMM.

A leaf module (any layer may import it). Field names and layout match KVM's ``kvm_regs`` and
``kvm_sregs`` so the KVM engine passes them to ioctls as they are; other engines fill them in.
"""

from __future__ import annotations

import ctypes


class Regs(ctypes.Structure):
    """General-purpose registers, RIP and RFLAGS (all u64)."""

    _fields_ = [(n, ctypes.c_uint64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class Segment(ctypes.Structure):
    """One segment register's hidden state (base, limit, selector, attribute bits)."""

    _fields_ = [
        ("base", ctypes.c_uint64), ("limit", ctypes.c_uint32), ("selector", ctypes.c_uint16),
        ("type", ctypes.c_uint8), ("present", ctypes.c_uint8), ("dpl", ctypes.c_uint8),
        ("db", ctypes.c_uint8), ("s", ctypes.c_uint8), ("l", ctypes.c_uint8),
        ("g", ctypes.c_uint8), ("avl", ctypes.c_uint8), ("unusable", ctypes.c_uint8),
        ("padding", ctypes.c_uint8)]


class DTable(ctypes.Structure):
    """GDTR/IDTR."""

    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint16),
                ("padding", ctypes.c_uint16 * 3)]


class SRegs(ctypes.Structure):
    """Segment, descriptor-table and control registers, EFER and the APIC base."""

    _fields_ = [
        ("cs", Segment), ("ds", Segment), ("es", Segment), ("fs", Segment),
        ("gs", Segment), ("ss", Segment), ("tr", Segment), ("ldt", Segment),
        ("gdt", DTable), ("idt", DTable),
        ("cr0", ctypes.c_uint64), ("cr2", ctypes.c_uint64), ("cr3", ctypes.c_uint64),
        ("cr4", ctypes.c_uint64), ("cr8", ctypes.c_uint64), ("efer", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64), ("interrupt_bitmap", ctypes.c_uint64 * 4)]
