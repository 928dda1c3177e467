"""xen_version (17): version numbers, strings and the feature bitmap (xen/common/kernel.c)."""

from __future__ import annotations

from pyxen.xen.abi import xen as X
from pyxen.xen.abi.errno import EINVAL, ENOSYS, EPERM, XenError
from pyxen.xen.context import HypercallContext
from pyxen.xen.domain import XEN_VERSION

EXTRAVERSION = b".0-pyxen"
CAPABILITIES = b"xen-3.0-x86_64 hvm-3.0-x86_32 hvm-3.0-x86_32p hvm-3.0-x86_64"
CHANGESET = b"pyxen"
DENIED = b"<denied>"

#: XENVER_get_features submap 0 for a PVH domU
FEATURES = ((1 << X.XENFEAT_writable_page_tables) | (1 << X.XENFEAT_auto_translated_physmap)
            | (1 << X.XENFEAT_hvm_callback_vector) | (1 << X.XENFEAT_hvm_safe_pvclock)
            | (1 << X.XENFEAT_not_direct_mapped))


def _string(value: bytes, size: int) -> bytes:
    return value[:size - 1].ljust(size, b"\0")


def do_xen_version(ctx: HypercallContext) -> int:
    cmd, arg = ctx.args[0], ctx.args[1]
    major, minor = XEN_VERSION
    if cmd == X.XENVER_version:
        return (major << 16) | minor
    if cmd == X.XENVER_extraversion:
        ctx.write(arg, _string(EXTRAVERSION, 16))
    elif cmd == X.XENVER_compile_info:
        ctx.write(arg, _string(b"gcc (pyxen)", 64) + _string(b"pyxen", 16)
                  + _string(b"pyxen.local", 32) + _string(b"Sat Nov 21 00:00:00 UTC 2026", 32))
    elif cmd == X.XENVER_capabilities:
        ctx.write(arg, _string(CAPABILITIES, 1024))
    elif cmd == X.XENVER_changeset:
        ctx.write(arg, _string(CHANGESET, 64))
    elif cmd == X.XENVER_platform_parameters:
        ctx.pack_into("Q", arg, 0)          # HVM guests: no hypervisor hole in their VA space
    elif cmd == X.XENVER_get_features:
        idx, = ctx.unpack("I", arg)
        if idx != 0:
            raise XenError(EINVAL, f"feature submap {idx}")
        ctx.pack_into("II", arg, idx, FEATURES)
    elif cmd == X.XENVER_pagesize:
        if arg:
            raise XenError(EINVAL, "pagesize takes a NULL argument")
        return 4096
    elif cmd == X.XENVER_guest_handle:
        ctx.write(arg, ctx.xd.uuid.bytes)
    elif cmd == X.XENVER_commandline:
        ctx.write(arg, _string(DENIED, 1024))   # only the hardware domain sees it
    elif cmd == X.XENVER_build_id:
        raise XenError(EPERM, "build id is for the hardware domain")
    else:
        raise XenError(ENOSYS, f"xen_version cmd {cmd}")
    return 0
