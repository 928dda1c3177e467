"""console_io (18): the hypervisor console, as a debug build of Xen offers it to a domU.

A release Xen refuses console_io to a domU (-EPERM). pyxen applies the policy of a debug build
(XSM dummy with CONFIG_VERBOSE_DEBUG): CONSOLEIO_write is allowed and goes to the domain's debug
log; every other command, including read and unknown ones, is -EPERM before it is looked at.
"""

from __future__ import annotations

from pyxen.xen.abi import xen as X
from pyxen.xen.abi.errno import EINVAL, EPERM, XenError
from pyxen.xen.context import HypercallContext

MAX_COUNT = 1 << 20


def do_console_io(ctx: HypercallContext) -> int:
    cmd, count, buf = ctx.args[0], ctx.args[1] & 0xFFFFFFFF, ctx.args[2]
    if cmd != X.CONSOLEIO_write:
        raise XenError(EPERM, f"console_io cmd {cmd} is for the hardware domain")
    if count >> 31:
        raise XenError(EINVAL, "negative count")
    if count > MAX_COUNT:
        raise XenError(EINVAL, f"count {count} too large")
    ctx.xd.sink.emit("debug", ctx.read(buf, count))
    return 0
