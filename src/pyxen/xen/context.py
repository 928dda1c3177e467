"""The context of one hypercall: arguments, and guest-virtual memory access on the calling vCPU.

Xen hypercall pointers are guest-virtual. :class:`HypercallContext` translates them through the
calling vCPU's page tables (read once per hypercall) page by page, so buffers may cross pages.
Any failure becomes ``XenError(EFAULT)``. Used only on the calling vCPU's thread.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from pyxen.arch.x86.paging import PageFault, translate
from pyxen.core.memory import GuestMemoryError
from pyxen.cpustate import Regs, SRegs
from pyxen.xen.abi.errno import EFAULT, XenError

if TYPE_CHECKING:
    from pyxen.core.domain import Vcpu
    from pyxen.xen.domain import XenDomain


class HypercallContext:
    """Arguments (``args[0..4]`` = RDI, RSI, RDX, R10, R8) and guest access for one call."""

    __slots__ = ("xd", "vcpu", "regs", "nr", "args", "_sregs")

    def __init__(self, xd: XenDomain, vcpu: Vcpu, regs: Regs) -> None:
        self.xd = xd
        self.vcpu = vcpu
        self.regs = regs
        self.nr = regs.rax
        self.args = (regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8)
        self._sregs: SRegs | None = None

    @property
    def sregs(self) -> SRegs:
        if self._sregs is None:
            self._sregs = self.vcpu.ev.get_sregs()
        return self._sregs

    @property
    def cpl(self) -> int:
        return self.sregs.cs.selector & 3 if self.sregs.cr0 & 1 else 0

    def gpa(self, gva: int, *, write: bool = False) -> int:
        """Translate one guest-virtual address (raises XenError(EFAULT))."""
        s = self.sregs
        try:
            return translate(self.xd.memory.read_u64, s.cr0, s.cr3, s.cr4, s.efer, gva,
                             write=write)
        except PageFault as e:
            raise XenError(EFAULT, str(e)) from None

    def read(self, gva: int, size: int) -> bytes:
        """copy_from_guest: ``size`` bytes at guest-virtual ``gva``."""
        if size == 0:
            return b""
        if gva == 0:
            raise XenError(EFAULT, "NULL guest handle")
        out = bytearray()
        mem = self.xd.memory
        try:
            while size:
                n = min(size, 4096 - (gva & 0xFFF))
                out += mem.read(self.gpa(gva), n)
                gva += n
                size -= n
        except GuestMemoryError as e:
            raise XenError(EFAULT, str(e)) from None
        return bytes(out)

    def write(self, gva: int, data: bytes) -> None:
        """copy_to_guest."""
        if not data:
            return
        if gva == 0:
            raise XenError(EFAULT, "NULL guest handle")
        mem = self.xd.memory
        pos = 0
        try:
            while pos < len(data):
                n = min(len(data) - pos, 4096 - (gva & 0xFFF))
                mem.write(self.gpa(gva, write=True), data[pos:pos + n])
                gva += n
                pos += n
        except GuestMemoryError as e:
            raise XenError(EFAULT, str(e)) from None

    def unpack(self, fmt: str, gva: int) -> tuple:
        """Read a little-endian struct (``fmt`` without byte-order prefix)."""
        return struct.unpack("<" + fmt, self.read(gva, struct.calcsize("<" + fmt)))

    def pack_into(self, fmt: str, gva: int, *values: int) -> None:
        self.write(gva, struct.pack("<" + fmt, *values))
