"""grant_table_op (20) for a domU: query_size, set/get_version, setup_table, copy.

gnttab_copy (40 B): source {u64 ref|gmfn, u16 domid, u16 offset} @0, dest @16, u16 len @32,
u16 flags @34, i16 status @36. Per-op failures go into ``status``; the hypercall returns 0.
"""

from __future__ import annotations

import struct

from pyxen.core.memory import GuestMemoryError
from pyxen.xen.abi import xen as X
from pyxen.xen.abi.errno import EINVAL, ENOSYS, XenError
from pyxen.xen.context import HypercallContext
from pyxen.xen.gnttab import GrantError

COPY_SIZE = 40
MAX_BATCH = 1 << 16
INVALID_GFN = 0xFFFFFFFFFFFFFFFF


def _is_self(ctx: HypercallContext, domid: int) -> bool:
    return domid in (X.DOMID_SELF, ctx.xd.domid)


def do_grant_table_op(ctx: HypercallContext) -> int:
    cmd, uop, count = ctx.args[0], ctx.args[1], ctx.args[2] & 0xFFFFFFFF
    gt = ctx.xd.gnttab
    if cmd in (X.GNTTABOP_query_size, X.GNTTABOP_setup_table) and count != 1:
        raise XenError(EINVAL, f"grant_table_op {cmd} takes exactly one op")
    if cmd == X.GNTTABOP_query_size:
        for i in range(count):
            a = uop + 16 * i
            dom, = ctx.unpack("H", a)
            status = X.GNTST_okay if _is_self(ctx, dom) else X.GNTST_bad_domain
            ctx.pack_into("IIh", a + 4, gt.nr_frames, gt.max_frames, status)
        return 0
    if cmd == X.GNTTABOP_set_version:
        if count != 1:
            raise XenError(EINVAL, "set_version takes one op")
        version, = ctx.unpack("I", uop)
        errno = 0
        if version not in (1, 2):
            errno = EINVAL
        elif version == 2:
            errno = ENOSYS                      # only v1 is offered (max version 1)
        ctx.pack_into("I", uop, gt.version)     # Xen always writes back the current version
        if errno:
            raise XenError(errno, f"grant table version {version}")
        return 0
    if cmd == X.GNTTABOP_get_version:
        if count != 1:
            raise XenError(EINVAL, "get_version takes one op")
        dom, = ctx.unpack("H", uop)
        if not _is_self(ctx, dom):
            raise XenError(3, f"get_version of domain {dom}")   # ESRCH
        ctx.pack_into("I", uop + 4, gt.version)
        return 0
    if cmd == X.GNTTABOP_setup_table:
        for i in range(count):
            a = uop + 24 * i
            dom, nr_frames, _status, frame_list = ctx.unpack("HxxIhxxxxxxQ", a)
            if not _is_self(ctx, dom):
                status = X.GNTST_bad_domain
            elif nr_frames > gt.max_frames:
                status = X.GNTST_general_error
            else:
                gt.grow(nr_frames)
                gfns = [f.gfn if f.gfn is not None else INVALID_GFN
                        for f in gt.frames[:nr_frames]]
                ctx.write(frame_list, struct.pack(f"<{nr_frames}Q", *gfns))
                status = X.GNTST_okay
            ctx.pack_into("h", a + 8, status)
        return 0
    if cmd == X.GNTTABOP_copy:
        if count > MAX_BATCH:
            raise XenError(EINVAL, f"copy batch of {count}")
        for i in range(count):
            a = uop + COPY_SIZE * i
            op = ctx.read(a, COPY_SIZE)
            ctx.pack_into("h", a + 36, copy_one(ctx, op))
        return 0
    raise XenError(ENOSYS, f"grant_table_op cmd {cmd}")


def _buffer(ctx: HypercallContext, ref_or_gfn: int, domid: int, is_gref: bool,
            write: bool) -> int:
    """Guest-physical address of the page one side of a copy names."""
    xd = ctx.xd
    if is_gref:
        if not _is_self(ctx, domid):
            raise GrantError(X.GNTST_bad_domain, f"grant of domain {domid}")
        gfn = xd.gnttab.resolve(ref_or_gfn & 0xFFFFFFFF, xd.domid, write=write)
    else:
        if domid != X.DOMID_SELF:
            raise GrantError(X.GNTST_permission_denied, f"gmfn of domain {domid}")
        gfn = ref_or_gfn
    if not xd.memory.is_ram(gfn << 12):
        raise GrantError(X.GNTST_bad_page, f"frame 0x{gfn:x} is not RAM")
    return gfn << 12


def copy_one(ctx: HypercallContext, op: bytes) -> int:
    s_u, s_dom, s_off, d_u, d_dom, d_off, length, flags = struct.unpack_from("<QHHxxxxQHHxxxxHH", op)
    try:
        src = _buffer(ctx, s_u, s_dom, bool(flags & X.GNTCOPY_source_gref), write=False)
        dst = _buffer(ctx, d_u, d_dom, bool(flags & X.GNTCOPY_dest_gref), write=True)
        if s_off + length > 4096 or d_off + length > 4096:
            raise GrantError(X.GNTST_bad_copy_arg, "copy crosses a page")
        mem = ctx.xd.memory
        mem.write(dst + d_off, mem.read(src + s_off, length))
    except GrantError as e:
        ctx.xd.log_grant_failure(e)
        return e.status
    except GuestMemoryError:
        return X.GNTST_bad_page
    return X.GNTST_okay
