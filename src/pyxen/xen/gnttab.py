"""Grant tables, version 1 (Xen's ``common/grant_table.c`` semantics for an HVM/PVH guest).

The table is an array of 8-byte entries ``{u16 flags, u16 domid, u32 frame}`` in hypervisor
pages the guest maps with ``XENMEM_add_to_physmap(XENMAPSPACE_grant_table)``. Entries are written
by the guest; the hypervisor (and in-VMM backends) read them to resolve a grant reference to a
guest frame, checking type, grantee and read-only-ness.

This module owns the frames and the entry checks; the copy operation's guest-memory I/O is done
by the caller through :meth:`GrantTable.resolve`.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from pyxen.core import atomics
from pyxen.xen.abi import xen as X
from pyxen.xen.abi.errno import EINVAL, XenError
from pyxen.xen.pages import XenPage

if TYPE_CHECKING:
    from pyxen.xen.domain import XenDomain

ENTRIES_PER_FRAME = 512
ENTRY_SIZE = 8
MAX_FRAMES = 64              # what query_size reports as max_nr_frames (QEMU and Xen default)
INITIAL_FRAMES = 1


class GrantError(Exception):
    """A grant could not be used; ``status`` is the GNTST_* code for the guest."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


class GrantTable:
    """One domain's v1 grant table."""

    def __init__(self, xd: XenDomain, max_frames: int = MAX_FRAMES) -> None:
        self.xd = xd
        self.max_frames = max_frames
        self.frames: list[XenPage] = []
        self.version = 1
        self.grow(INITIAL_FRAMES)

    @property
    def nr_frames(self) -> int:
        return len(self.frames)

    def grow(self, n: int) -> None:
        if n > self.max_frames:
            raise XenError(EINVAL, f"grant table frame {n - 1} beyond max {self.max_frames}")
        while len(self.frames) < n:
            self.frames.append(XenPage(self.xd.memory, f"gnttab{len(self.frames)}"))

    def map_frame(self, idx: int, gfn: int) -> None:
        """XENMEM_add_to_physmap(XENMAPSPACE_grant_table, idx, gfn)."""
        if idx & X.XENMAPIDX_grant_table_status:
            raise XenError(EINVAL, "status frames exist only in grant table v2")
        if idx >= self.max_frames:
            raise XenError(EINVAL, f"grant frame {idx} >= max {self.max_frames}")
        self.grow(idx + 1)
        self.frames[idx].place(gfn)

    def save(self) -> dict:
        """Frames and where the guest placed them; their contents travel separately
        (:attr:`frames`' ``addr``)."""
        return {"version": self.version, "frames": [f.gfn for f in self.frames]}

    def load(self, st: dict, contents: dict[int, bytes]) -> None:
        """Recreate the frames of :meth:`save` with ``contents`` (frame index -> 4096 bytes)
        and place them (a fresh domain, before it runs). Raises ValueError."""
        frames = st.get("frames")
        if not isinstance(frames, list) or not 1 <= len(frames) <= self.max_frames:
            raise ValueError(f"grant table: 'frames' must list 1..{self.max_frames} frames")
        if st.get("version", 1) != 1:
            raise ValueError(f"grant table: version {st.get('version')!r} (v1 only)")
        self.grow(len(frames))
        for i, gfn in enumerate(frames):
            page = self.frames[i]
            if i in contents:
                page.write(0, contents[i])
            if gfn is not None:
                if not isinstance(gfn, int) or gfn < 0:
                    raise ValueError(f"grant table: frame {i} at bad gfn {gfn!r}")
                page.place(gfn)

    def set_version(self, version: int) -> int:
        if version == 0:
            return self.version
        if version != 1:
            raise XenError(EINVAL, f"grant table version {version} not supported (v1 only)")
        return self.version

    def entry(self, ref: int) -> tuple[int, int, int]:
        """(flags, domid, frame) of grant ``ref`` (GrantError(bad_gntref) if out of range)."""
        if not 0 <= ref < self.nr_frames * ENTRIES_PER_FRAME:
            raise GrantError(X.GNTST_bad_gntref, f"grant ref {ref} beyond the table")
        page = self.frames[ref // ENTRIES_PER_FRAME]
        return struct.unpack("<HHI", page.read((ref % ENTRIES_PER_FRAME) * ENTRY_SIZE, 8))

    def resolve(self, ref: int, grantee: int, *, write: bool) -> int:
        """The guest frame number granted by ``ref`` to domain ``grantee`` for read or write."""
        flags, domid, frame = self.entry(ref)
        # Xen's _set_status_v1: every refusal past the range check is GNTST_general_error
        if flags & X.GTF_type_mask != X.GTF_permit_access:
            raise GrantError(X.GNTST_general_error, f"grant ref {ref} not permit_access "
                             f"(flags 0x{flags:x})")
        if domid != grantee:
            raise GrantError(X.GNTST_general_error, f"grant ref {ref} is for domain {domid}, "
                             f"not {grantee}")
        if write and flags & X.GTF_readonly:
            raise GrantError(X.GNTST_general_error, f"grant ref {ref} is read-only")
        return frame

    # --- mappings (GNTTABOP_map_grant_ref's effect on the entry)
    def pin(self, ref: int, grantee: int, *, write: bool) -> int:
        """Resolve ``ref`` as :meth:`resolve` does and mark it in use, as Xen marks a mapped
        grant: ``GTF_reading`` (and ``GTF_writing`` for a writable mapping) are set in the
        entry with a compare-and-swap, so the granting guest cannot end access (its
        ``gnttab_end_foreign_access`` sees the bits) until :meth:`unpin`. Linux's blkfront
        keeps such grants as persistent. Returns the frame."""
        if not 0 <= ref < self.nr_frames * ENTRIES_PER_FRAME:
            raise GrantError(X.GNTST_bad_gntref, f"grant ref {ref} beyond the table")
        addr = self.frames[ref // ENTRIES_PER_FRAME].addr + (ref % ENTRIES_PER_FRAME) * 8
        bits = X.GTF_reading | (X.GTF_writing if write else 0)
        for _ in range(64):                          # the guest may race us; Xen retries too
            old = atomics.load(addr)
            flags, domid, frame = old & 0xFFFF, (old >> 16) & 0xFFFF, old >> 32
            if flags & X.GTF_type_mask != X.GTF_permit_access or domid != grantee:
                raise GrantError(X.GNTST_general_error, f"grant ref {ref} not permit_access "
                                 f"for domain {grantee} (flags 0x{flags:x}, dom {domid})")
            if write and flags & X.GTF_readonly:
                raise GrantError(X.GNTST_general_error, f"grant ref {ref} is read-only")
            ok, _ = atomics.compare_exchange(addr, old, old | bits)
            if ok:
                return frame
        raise GrantError(X.GNTST_general_error, f"grant ref {ref}: entry kept changing")

    def unpin(self, ref: int, *, write: bool) -> None:
        """Drop the mark :meth:`pin` set (the guest may then end access)."""
        if not 0 <= ref < self.nr_frames * ENTRIES_PER_FRAME:
            return
        addr = self.frames[ref // ENTRIES_PER_FRAME].addr + (ref % ENTRIES_PER_FRAME) * 8
        bits = X.GTF_reading | (X.GTF_writing if write else 0)
        atomics.fetch_and(addr, ~bits & 0xFFFFFFFFFFFFFFFF)
