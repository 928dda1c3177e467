"""What a split-driver backend may do to its frontend's domain: map granted pages and use
event channels -- and nothing else.

Backends (blkback, netback) reach guest memory only through :class:`GuestAccess`, the
interface dom0's ``/dev/xen/gntdev`` and ``/dev/xen/evtchn`` give Xen's backends. The
in-process implementation, :class:`DomainGuestAccess`, serves backends that live in the
domain's own VMM process (QEMU's "qdisk" model): it checks each grant in the domain's grant
table and hands out a view of the granted page in the domain's memfd. A backend moved into its
own process would get another implementation of the same interface.

Grant rules are Xen's: the entry must be ``permit_access`` to the backend domain (0) and
writable if the backend writes. A granted frame must be the guest's own memory (RAM, ACPI or
special pages), never a hypervisor page. Every write a backend makes through a mapping is
recorded as VMM-dirty (:meth:`mark_dirty`) so live migration resends the page.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

from pyxen.core.memory import PAGE, GuestMemoryError
from pyxen.xen.abi.errno import XenError
from pyxen.xen.gnttab import GrantError

if TYPE_CHECKING:
    from pyxen.xen.domain import XenDomain

BACKEND_DOMID = 0
GUEST_KINDS = ("ram", "acpi", "special")


class GuestAccessError(Exception):
    """A grant or event channel the frontend named cannot be used (bad ref, wrong grantee,
    read-only for a write, not guest memory, port not offered to dom0). The device answers
    the request with an error or disconnects; the VMM carries on."""


class GuestAccess(Protocol):
    """A backend's handle on one frontend domain. Thread-safe."""

    domid: int

    def map_grant(self, ref: int, write: bool) -> memoryview:
        """The 4096-byte page granted by ``ref`` (GuestAccessError if it may not be used)."""

    def map_grants(self, refs: list[int], write: bool) -> tuple[list[memoryview], list[int]]:
        """The pages granted by ``refs`` and their frame numbers (for :meth:`mark_dirty_gfns`)."""

    def pin_grant(self, ref: int, write: bool) -> tuple[memoryview, int]:
        """Map ``ref`` and mark it in use until :meth:`unpin_grant` (persistent grants)."""

    def unpin_grant(self, ref: int, write: bool) -> None:
        """Drop :meth:`pin_grant`'s mark."""

    def mark_dirty_gfns(self, gfns: list[int]) -> None:
        """Record that the backend wrote these frames (for migration)."""

    def bind_port(self, port: int, on_event: Callable[[], None]) -> int:
        """Bind the frontend's unbound port (offered to dom0); ``on_event`` runs (any thread,
        briefly) each time the frontend notifies it. Returns the backend's local port."""

    def unbind_port(self, port: int) -> None:
        """Close the backend's end; the frontend's port goes back to unbound."""

    def notify(self, port: int) -> None:
        """Raise the frontend's ``port``."""


class DomainGuestAccess:
    """:class:`GuestAccess` for a domain in this process (its :class:`XenDomain`)."""

    def __init__(self, xd: XenDomain) -> None:
        self.xd = xd
        self.domid = xd.domid
        self.memory = xd.domain.memory

    def grant_frame(self, ref: int, write: bool) -> int:
        try:
            gfn = self.xd.gnttab.resolve(ref, BACKEND_DOMID, write=write)
        except GrantError as e:
            raise GuestAccessError(str(e)) from e
        region = self.memory.find(gfn * PAGE)
        if region is None or region.kind not in GUEST_KINDS:
            raise GuestAccessError(f"grant ref {ref}: frame 0x{gfn:x} is not guest memory")
        return gfn

    def map_grant(self, ref: int, write: bool) -> memoryview:
        gfn = self.grant_frame(ref, write)
        try:
            return self.memory.view(gfn * PAGE, PAGE)
        except GuestMemoryError as e:
            raise GuestAccessError(f"grant ref {ref}: {e}") from e

    def pin_grant(self, ref: int, write: bool) -> tuple[memoryview, int]:
        """Map ``ref`` and keep it mapped (Xen's map_grant_ref without the unmap): the guest
        sees the grant in use and cannot end access until :meth:`unpin_grant`. For
        persistent grants. Returns (page view, frame)."""
        try:
            gfn = self.xd.gnttab.pin(ref, BACKEND_DOMID, write=write)
        except GrantError as e:
            raise GuestAccessError(str(e)) from e
        region = self.memory.find(gfn * PAGE)
        if region is None or region.kind not in GUEST_KINDS:
            self.xd.gnttab.unpin(ref, write=write)
            raise GuestAccessError(f"grant ref {ref}: frame 0x{gfn:x} is not guest memory")
        return self.memory.view(gfn * PAGE, PAGE), gfn

    def unpin_grant(self, ref: int, write: bool) -> None:
        self.xd.gnttab.unpin(ref, write=write)

    def map_grants(self, refs: list[int], write: bool) -> tuple[list[memoryview], list[int]]:
        """Views and frame numbers of several grants."""
        gfns = [self.grant_frame(r, write) for r in refs]
        return [self.memory.view(g * PAGE, PAGE) for g in gfns], gfns

    def mark_dirty_gfns(self, gfns: list[int]) -> None:
        self.memory.vmm_dirty.update(gfns)

    def bind_port(self, port: int, on_event: Callable[[], None]) -> int:
        try:
            return self.xd.evtchn.bind_backend(port, lambda _p: on_event())
        except XenError as e:
            raise GuestAccessError(f"event channel {port}: {e}") from e

    def unbind_port(self, port: int) -> None:
        self.xd.evtchn.unbind_backend(port)

    def notify(self, port: int) -> None:
        self.xd.evtchn.set_pending(port)


__all__ = ["BACKEND_DOMID", "DomainGuestAccess", "GuestAccess", "GuestAccessError"]
