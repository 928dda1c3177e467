"""console_io (18): the hypervisor console, as a debug build of Xen offers it to a domU.

A release Xen refuses console_io to a domU (-EPERM); pyxen allows it (write goes to the
domain's debug log, read takes bytes queued with :attr:`XenDomain.console_input`).
"""

from __future__ import annotations

from pyxen.xen.abi import xen as X
from pyxen.xen.abi.errno import EINVAL, ENOSYS, XenError
from pyxen.xen.context import HypercallContext

MAX_COUNT = 1 << 20


def do_console_io(ctx: HypercallContext) -> int:
    cmd, count, buf = ctx.args[0], ctx.args[1] & 0xFFFFFFFF, ctx.args[2]
    if count >> 31:
        raise XenError(EINVAL, "negative count")
    if cmd == X.CONSOLEIO_write:
        if count > MAX_COUNT:
            raise XenError(EINVAL, f"count {count} too large")
        ctx.xd.sink.emit("debug", ctx.read(buf, count))
        return 0
    if cmd == X.CONSOLEIO_read:
        pending = ctx.xd.console_input
        data = bytes(pending[:count])
        ctx.write(buf, data)
        del pending[:len(data)]
        return len(data)
    raise XenError(ENOSYS, f"console_io cmd {cmd}")
