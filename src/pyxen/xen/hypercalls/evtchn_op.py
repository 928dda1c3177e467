"""event_channel_op (32): the 2-level ABI; FIFO ops fail so guests fall back to 2-level."""

from __future__ import annotations

import struct

from pyxen.xen.abi import xen as X
from pyxen.xen.abi.errno import ENOSYS, XenError
from pyxen.xen.context import HypercallContext


def do_event_channel_op(ctx: HypercallContext) -> int:
    cmd, arg = ctx.args[0], ctx.args[1]
    ev = ctx.xd.evtchn
    if cmd == X.EVTCHNOP_alloc_unbound:
        dom, remote = ctx.unpack("HH", arg)
        ctx.pack_into("I", arg + 4, ev.alloc_unbound(dom, remote))
    elif cmd == X.EVTCHNOP_bind_interdomain:
        remote_dom, remote_port = ctx.unpack("HxxI", arg)
        ctx.pack_into("I", arg + 8, ev.bind_interdomain(remote_dom, remote_port))
    elif cmd == X.EVTCHNOP_bind_virq:
        virq, vcpu = ctx.unpack("II", arg)
        ctx.pack_into("I", arg + 8, ev.bind_virq(virq, vcpu))
    elif cmd == X.EVTCHNOP_bind_ipi:
        vcpu, = ctx.unpack("I", arg)
        ctx.pack_into("I", arg + 4, ev.bind_ipi(vcpu))
    elif cmd == X.EVTCHNOP_bind_vcpu:
        port, vcpu = ctx.unpack("II", arg)
        ev.bind_vcpu(port, vcpu)
    elif cmd == X.EVTCHNOP_send:
        port, = ctx.unpack("I", arg)
        ev.send(port)
    elif cmd == X.EVTCHNOP_close:
        port, = ctx.unpack("I", arg)
        ev.close(port)
    elif cmd == X.EVTCHNOP_unmask:
        port, = ctx.unpack("I", arg)
        ev.unmask(port)
    elif cmd == X.EVTCHNOP_status:
        dom, port = ctx.unpack("HxxI", arg)
        status, vcpu, union = ev.status(dom, port)
        ctx.write(arg + 8, struct.pack("<II", status, vcpu) + union)
    elif cmd == X.EVTCHNOP_reset:
        dom, = ctx.unpack("H", arg)
        from pyxen.xen.hypercalls.memory import check_self
        check_self(ctx, dom)
        ev.reset()
    elif cmd in (X.EVTCHNOP_init_control, X.EVTCHNOP_expand_array, X.EVTCHNOP_set_priority):
        raise XenError(ENOSYS, "FIFO event channels are not offered; use 2-level")
    else:
        raise XenError(ENOSYS, f"event_channel_op cmd {cmd}")
    return 0
