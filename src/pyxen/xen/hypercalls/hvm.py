"""hvm_op (34): HVM params, the per-vCPU upcall vector, get_time (xen/arch/x86/hvm/hvm.c)."""

from __future__ import annotations

from pyxen.xen.abi import xen as X
from pyxen.xen.abi.errno import EEXIST, EINVAL, ENOENT, ENOSYS, EPERM, XenError
from pyxen.xen.context import HypercallContext
from pyxen.xen.hypercalls.memory import check_self

#: params a guest may set on itself (hvm_allow_set_param) and read (hvm_allow_get_param)
#: CALLBACK_IRQ, STORE_EVTCHN, VM86_TSS, CONSOLE_EVTCHN, ACPI_IOPORTS_LOCATION,
#: VM_GENERATION_ID_ADDR, X87_FIP_WIDTH, VM86_TSS_SIZED; readable adds STORE_PFN, CONSOLE_PFN, ALTP2M
GUEST_SETTABLE = frozenset({0, 2, 15, 18, 19, 34, 36, 37})
GUEST_READABLE = GUEST_SETTABLE | {1, 17, 35}
#: PAE_ENABLED, MEMORY_EVENT_CR0/CR3/CR4/INT3/SINGLE_STEP/MSR: deprecated, -EINVAL either way
DEPRECATED = frozenset({4, 20, 21, 22, 23, 25, 30})
#: set by Xen or the toolstack only; a guest write is -EEXIST
READ_ONLY = frozenset({35})


def do_hvm_op(ctx: HypercallContext) -> int:
    op, arg = ctx.args[0], ctx.args[1]
    xd = ctx.xd
    if op in (X.HVMOP_set_param, X.HVMOP_get_param):
        domid, index, value = ctx.unpack("HxxIQ", arg)
        check_self(ctx, domid)
        if index >= X.HVM_NR_PARAMS or index in DEPRECATED:
            raise XenError(EINVAL, f"param {index}")
        if op == X.HVMOP_set_param:
            if index in READ_ONLY:
                raise XenError(EEXIST, f"param {index} is read-only")
            if index not in GUEST_SETTABLE:
                raise XenError(EPERM, f"param {index} is not guest-settable")
            xd.params[index] = value
            return 0
        if index not in GUEST_READABLE:
            raise XenError(EPERM, f"param {index} is not guest-readable")
        ctx.pack_into("Q", arg + 8, xd.params.get(index, 0))
        return 0
    if op == X.HVMOP_set_evtchn_upcall_vector:
        vcpu, vector = ctx.unpack("IB", arg)
        if vector < 0x10:
            raise XenError(EINVAL, f"upcall vector 0x{vector:x}")
        if vcpu >= len(xd.vcpu_state):
            raise XenError(ENOENT, f"no vcpu {vcpu}")
        xd.vcpu_state[vcpu].upcall_vector = vector
        xd.assert_upcall(vcpu)               # hvm_assert_evtchn_irq(), unconditionally
        return 0
    if op == X.HVMOP_get_time:
        ctx.pack_into("Q", arg, xd.clock.now_ns())
        return 0
    if op == X.HVMOP_pagetable_dying:
        domid, _gpa = ctx.unpack("HxxxxxxQ", arg)
        check_self(ctx, domid)
        raise XenError(EINVAL, "pagetable_dying is only for shadow-paged domains")
    raise XenError(ENOSYS, f"hvm_op {op}")
