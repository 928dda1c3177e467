"""vm_assist (21) and set_timer_op (15)."""

from __future__ import annotations

from pyxen.xen.abi.errno import EINVAL, ENOSYS, XenError
from pyxen.xen.context import HypercallContext

VMASST_CMD_enable = 0
VMASST_CMD_disable = 1
VMASST_TYPE_runstate_update_flag = 5
HVM_VM_ASSIST_MASK = 1 << VMASST_TYPE_runstate_update_flag


def do_vm_assist(ctx: HypercallContext) -> int:
    cmd, typ = ctx.args[0], ctx.args[1]
    if cmd not in (VMASST_CMD_enable, VMASST_CMD_disable):
        raise XenError(ENOSYS, f"vm_assist cmd {cmd}")
    if typ >= 64 or not HVM_VM_ASSIST_MASK >> typ & 1:
        raise XenError(EINVAL, f"vm_assist type {typ}")
    return 0


def do_set_timer_op(ctx: HypercallContext) -> int:
    """Absolute Xen system time in ns; 0 cancels. Shares the vCPU's singleshot timer."""
    deadline = ctx.args[0]
    timers = ctx.xd.timers
    if deadline == 0:
        timers.stop_singleshot(ctx.vcpu.index)
    else:
        timers.set_singleshot(ctx.vcpu.index, deadline)
    return 0
