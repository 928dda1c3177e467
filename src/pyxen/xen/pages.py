"""Hypervisor-owned pages a guest maps into its physical space: shared_info, grant frames.

Xen owns these pages; ``XENMEM_add_to_physmap`` places them at a guest frame. pyxen keeps each
in a private memfd page until the guest asks. Placed on a frame that already holds guest memory
(a RAM page, as Linux does for shared_info), the page *moves into* that frame: its contents are
copied there and the frame is used in place, which is indistinguishable for the guest from Xen
replacing the RAM page. Placed on an empty frame (Linux puts grant frames in an unused window),
the private page is mapped there as a new memory slot.

:attr:`XenPage.addr` is the host address where the page's bytes currently live.
"""

from __future__ import annotations

import ctypes

from pyxen.core.memory import PAGE, GuestMemory


class XenPage:
    """One hypervisor page. ``gfn`` is where the guest sees it (None until placed)."""

    def __init__(self, memory: GuestMemory, name: str) -> None:
        self.memory = memory
        self.private = memory.new_page(name)
        self.gfn: int | None = None
        self._in_place = False
        self.addr = self.private.host

    def place(self, gfn: int) -> None:
        """Make the page visible at guest frame ``gfn`` (contents preserved)."""
        if gfn == self.gfn:
            return
        mem = self.memory
        content = ctypes.string_at(self.addr, PAGE)
        target = mem.find(gfn << 12)
        if self._in_place:                      # leaving a frame it was using in place
            self._in_place = False
        elif self.private.slot is not None:
            mem.unmap_page(self.private)
        if target is not None and target is not self.private:
            self.addr = mem.host_addr(gfn << 12, PAGE)
            self._in_place = True
            ctypes.memmove(self.addr, content, PAGE)
            mem.mark_dirty(gfn << 12, PAGE)
        else:
            self.addr = self.private.host
            ctypes.memmove(self.addr, content, PAGE)
            mem.map_page(self.private, gfn << 12)
        self.gfn = gfn

    def contents(self) -> bytes:
        """The page's 4096 bytes, wherever they live now."""
        return ctypes.string_at(self.addr, PAGE)

    def read(self, off: int, size: int) -> bytes:
        return ctypes.string_at(self.addr + off, size)

    def write(self, off: int, data: bytes) -> None:
        ctypes.memmove(self.addr + off, data, len(data))
        if self.gfn is not None:
            self.memory.mark_dirty((self.gfn << 12) + off, len(data))
