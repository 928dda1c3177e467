"""sched_op (29): yield, block, poll, shutdown (every reason), shutdown_code."""

from __future__ import annotations

import os
import struct

from pyxen.xen.abi import xen as X
from pyxen.xen.abi.errno import EINVAL, ENOSYS, EPERM, XenError
from pyxen.xen.context import HypercallContext

MAX_POLL_PORTS = 128


def do_sched_op(ctx: HypercallContext) -> object:
    cmd, arg = ctx.args[0], ctx.args[1]
    xd = ctx.xd
    d = xd.domain
    v = ctx.vcpu.index
    if cmd == X.SCHEDOP_yield:
        os.sched_yield()
        return 0
    if cmd == X.SCHEDOP_block:
        # HVM: enable event delivery, sleep until an upcall is pending for this vCPU.
        ctx.vcpu.in_block = True
        try:
            d.wait_until(lambda: xd.upcall_pending(v) or d.runstate.state != "running")
        finally:
            ctx.vcpu.in_block = False
        return 0
    if cmd == X.SCHEDOP_poll:
        ports_gva, nr_ports, timeout = ctx.unpack("QIxxxxQ", arg)
        if nr_ports > MAX_POLL_PORTS:
            raise XenError(EINVAL, f"poll of {nr_ports} ports")
        ports = struct.unpack(f"<{nr_ports}I", ctx.read(ports_gva, 4 * nr_ports))
        for p in ports:
            if not 0 <= p < len(xd.evtchn.ports):
                raise XenError(EINVAL, f"poll of port {p}")
        ev = xd.evtchn
        clock = xd.clock

        def done() -> bool:
            return (any(ev.is_pending(p) for p in ports) or d.runstate.state != "running"
                    or (timeout != 0 and clock.now_ns() >= timeout))
        while not done():
            d.wait_until(done, clock.seconds_until(timeout) if timeout else None)
        return 0
    if cmd == X.SCHEDOP_shutdown:
        reason, = ctx.unpack("I", arg)
        return xd.guest_shutdown(ctx.vcpu, reason & 0xFF)
    if cmd == X.SCHEDOP_shutdown_code:
        reason, = ctx.unpack("I", arg)
        if xd.shutdown_code is None:
            xd.shutdown_code = reason & 0xFF
        return 0
    if cmd == X.SCHEDOP_remote_shutdown:
        raise XenError(EPERM, "remote_shutdown is for privileged domains")
    raise XenError(ENOSYS, f"sched_op cmd {cmd}")
