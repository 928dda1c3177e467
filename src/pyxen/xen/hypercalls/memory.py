"""memory_op (12): physmap placement of Xen pages, the memory map, and reservations.

Struct layouts (x86-64): xen_add_to_physmap {u16 domid, u16 size, u32 space, u64 idx, u64 gpfn};
xen_memory_map {u32 nr_entries, pad, u64 buffer}; xen_memory_reservation {u64 extent_start,
u64 nr_extents, u32 extent_order, u32 mem_flags, u16 domid}.
"""

from __future__ import annotations

import struct

from pyxen.xen.abi import xen as X
from pyxen.xen.abi.errno import EINVAL, ENOSYS, EPERM, ESRCH, XenError
from pyxen.xen.context import HypercallContext

MAX_GPFN = (1 << 40) - 1          # 52-bit guest-physical addresses
MAX_EXTENT_ORDER = 9              # Xen's default domU max order (2 MiB)


def check_self(ctx: HypercallContext, domid: int) -> None:
    """Accept DOMID_SELF or our own id; refuse others as Xen refuses a domU."""
    if domid in (X.DOMID_SELF, ctx.xd.domid):
        return
    raise XenError(ESRCH if domid >= X.DOMID_FIRST_RESERVED else EPERM,
                   f"domain {domid} is not the caller")


def do_memory_op(ctx: HypercallContext) -> int:
    cmd = ctx.args[0] & X.MEMOP_CMD_MASK
    arg = ctx.args[1]
    if cmd == X.XENMEM_add_to_physmap:
        return add_to_physmap(ctx, arg)
    if cmd == X.XENMEM_memory_map:
        return memory_map(ctx, arg)
    if cmd in (X.XENMEM_increase_reservation, X.XENMEM_decrease_reservation,
               X.XENMEM_populate_physmap):
        return reservation(ctx, cmd, arg, ctx.args[0] >> 6)
    if cmd == 2:                                   # maximum_ram_page
        return ctx.xd.max_pages
    if cmd in (3, 4):                              # current / maximum_reservation
        domid, = ctx.unpack("H", arg)
        check_self(ctx, domid)
        return ctx.xd.tot_pages if cmd == 3 else ctx.xd.max_pages
    if cmd == 14:                                  # maximum_gpfn
        domid, = ctx.unpack("H", arg)
        check_self(ctx, domid)
        return max(r.end for r in ctx.xd.memory.regions) // 4096 - 1
    raise XenError(ENOSYS, f"memory_op cmd {cmd}")


def add_to_physmap(ctx: HypercallContext, arg: int) -> int:
    domid, _size, space, idx, gpfn = ctx.unpack("HHIQQ", arg)
    check_self(ctx, domid)
    if gpfn > MAX_GPFN:
        raise XenError(EINVAL, f"gpfn 0x{gpfn:x} beyond the guest-physical address width")
    xd = ctx.xd
    if space == X.XENMAPSPACE_shared_info:
        if idx != 0:
            raise XenError(EINVAL, f"shared_info index {idx}")
        xd.shared_info.place(gpfn)
        xd.publish_time()
        return 0
    if space == X.XENMAPSPACE_grant_table:
        xd.gnttab.map_frame(idx, gpfn)
        return 0
    if space in (X.XENMAPSPACE_gmfn, X.XENMAPSPACE_gmfn_range):
        raise XenError(ENOSYS, "moving RAM frames (XENMAPSPACE_gmfn) is not supported")
    if space == X.XENMAPSPACE_gmfn_foreign:
        raise XenError(ENOSYS, "gmfn_foreign exists only in add_to_physmap_batch")
    raise XenError(EINVAL, f"map space {space}")


def memory_map(ctx: HypercallContext, arg: int) -> int:
    capacity, buffer = ctx.unpack("IxxxxQ", arg)
    e820 = ctx.xd.e820
    n = min(capacity, len(e820))
    ctx.write(buffer, b"".join(struct.pack("<QQI", a, s, t) for a, s, t in e820[:n]))
    ctx.pack_into("I", arg, n)
    return 0


def reservation(ctx: HypercallContext, cmd: int, arg: int, start: int) -> int:
    """increase/decrease_reservation and populate_physmap; returns extents done (Xen style:
    failures stop the batch and the count so far is returned, not an errno)."""
    try:
        extent_start, nr, order, _flags, domid = ctx.unpack("QQIIH", arg)
        check_self(ctx, domid)
    except XenError:
        return start                  # Xen returns start_extent, not an errno, here
    if order > MAX_EXTENT_ORDER:
        return start
    xd = ctx.xd
    mem = xd.memory
    pages = 1 << order
    done = start
    while done < nr:
        if cmd == X.XENMEM_increase_reservation:
            if xd.tot_pages + pages > xd.max_pages:
                break
            xd.tot_pages += pages
        else:
            try:
                gfn, = ctx.unpack("Q", extent_start + 8 * done)
            except XenError:
                break
            gpa = gfn << 12
            if gfn & (pages - 1) or not all(mem.is_ram(gpa + i * 4096) for i in (0, pages - 1)):
                break
            frames = range(gfn, gfn + pages)
            if cmd == X.XENMEM_decrease_reservation:
                if any(f in xd.ballooned for f in frames):
                    break                       # nothing there to give back
                mem.zero(gpa, pages * 4096)     # the frame's contents are gone
                xd.ballooned.update(frames)
                xd.tot_pages -= pages
            else:
                if xd.tot_pages + pages > xd.max_pages:
                    break
                mem.zero(gpa, pages * 4096)
                xd.ballooned.difference_update(frames)
                xd.tot_pages += pages
        done += 1
    return done
