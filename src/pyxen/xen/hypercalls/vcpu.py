"""vcpu_op (24) as Xen offers it to a PVH vCPU (xen/common/domain.c, hvm/hypercall.c).

vcpu_info registration (new Xen semantics: a second registration is -EBUSY, an area crossing a
page -ENXIO), runstate/time areas (guest-virtual), Xen timers, and PVH AP bring-up through
VCPUOP_initialise (struct vcpu_hvm_context) + VCPUOP_up, and VCPUOP_down.
"""

from __future__ import annotations

import ctypes
import struct

from pyxen.xen.abi import xen as X
from pyxen.xen.abi.errno import EBUSY, EEXIST, EINVAL, ENOENT, ENOSYS, ENXIO, XenError
from pyxen.xen.context import HypercallContext

MILLISECS = 1_000_000
STIME_DELTA_MAX = (1 << 62) - 1
RUNSTATE_running, RUNSTATE_runnable, RUNSTATE_blocked, RUNSTATE_offline = 0, 1, 2, 3
VCPU_HVM_MODE_32B = 0
VCPU_HVM_MODE_64B = 1
HVM_CONTEXT_SIZE = 128


def do_vcpu_op(ctx: HypercallContext) -> int:
    cmd, vcpuid, arg = ctx.args[0], ctx.args[1] & 0xFFFFFFFF, ctx.args[2]
    xd = ctx.xd
    if vcpuid >= len(xd.vcpu_state):
        raise XenError(ENOENT, f"no vcpu {vcpuid}")
    st = xd.vcpu_state[vcpuid]
    target = xd.domain.vcpus[vcpuid]
    self_call = target is ctx.vcpu
    if cmd == X.VCPUOP_register_vcpu_info:
        mfn, offset, _rsvd = ctx.unpack("QII", arg)
        gaddr = (mfn << 12) + offset
        if gaddr >> 52 or (gaddr >> 12) != mfn:
            raise XenError(EINVAL, "vcpu_info offset leaves the frame")
        if st.vcpu_info_gpa is not None:
            raise XenError(EBUSY, f"vcpu {vcpuid} already has a vcpu_info")
        if gaddr & 7 or (gaddr & ~0xFFF) != ((gaddr + X.VCPU_INFO_SIZE - 1) & ~0xFFF):
            raise XenError(ENXIO, "vcpu_info misaligned or crossing a page")
        if not xd.memory.is_ram(gaddr):
            raise XenError(EINVAL, f"vcpu_info frame 0x{gaddr >> 12:x} is not RAM")
        register_vcpu_info(xd, vcpuid, gaddr)
        return 0
    if cmd == X.VCPUOP_register_runstate_memory_area:
        gva, = ctx.unpack("Q", arg)
        st.runstate_gva = gva or None
        if gva:     # Xen writes the area at once, for the caller or any other vCPU
            now = xd.clock.now_ns()
            state = RUNSTATE_running if self_call else (
                RUNSTATE_runnable if target.online else RUNSTATE_offline)
            ctx.write(gva, struct.pack("<iiQ4Q", state, 0, now, now if self_call else 0,
                                       0, 0, 0 if target.online else now))
        return 0
    if cmd == X.VCPUOP_register_vcpu_time_memory_area:
        gva, = ctx.unpack("Q", arg)
        st.time_area_gva = gva or None
        if gva and self_call:
            gpa = ctx.gpa(gva, write=True)
            xd.write_time(xd.memory.host_addr(gpa, 32))
        return 0
    if cmd == X.VCPUOP_set_singleshot_timer:
        if not self_call:
            raise XenError(EINVAL, "singleshot timer of another vcpu")
        deadline, _flags = ctx.unpack("QI", arg)
        # Current Xen ignores VCPU_SSHOTTMR_future: a past deadline fires at once.
        xd.timers.set_singleshot(vcpuid, deadline)
        return 0
    if cmd == X.VCPUOP_stop_singleshot_timer:
        if not self_call:
            raise XenError(EINVAL, "singleshot timer of another vcpu")
        xd.timers.stop_singleshot(vcpuid)
        return 0
    if cmd == X.VCPUOP_set_periodic_timer:
        period, = ctx.unpack("Q", arg)
        if period < MILLISECS or period > STIME_DELTA_MAX:
            raise XenError(EINVAL, f"period {period} ns")
        xd.timers.set_periodic(vcpuid, period)
        return 0
    if cmd == X.VCPUOP_stop_periodic_timer:
        xd.timers.stop_periodic(vcpuid)
        return 0
    if cmd == X.VCPUOP_is_up:
        return 1 if target.online else 0
    if cmd == X.VCPUOP_initialise:
        if target.initialised:
            raise XenError(EEXIST, f"vcpu {vcpuid} already initialised")
        initialise(ctx, vcpuid, ctx.read(arg, HVM_CONTEXT_SIZE))
        return 0
    if cmd == X.VCPUOP_up:
        if not target.initialised:
            raise XenError(EINVAL, f"vcpu {vcpuid} not initialised")
        if not target.online:
            xd.start_vcpu(vcpuid)
        return 0
    if cmd == X.VCPUOP_down:
        if target.online:
            target.online = False
            if not self_call:
                target.ev.kick()
        return 0
    raise XenError(ENOSYS, f"vcpu_op cmd {cmd} (not available to HVM/PVH)")


def register_vcpu_info(xd, vcpuid: int, gaddr: int) -> None:
    """Move vCPU ``vcpuid``'s vcpu_info to ``gaddr``: copy the old contents, refresh time, then
    set every selector bit and upcall_pending and raise the upcall (as Xen does)."""
    old = xd.vcpu_info_addr(vcpuid)
    new = xd.memory.host_addr(gaddr, X.VCPU_INFO_SIZE)
    if old is not None:
        ctypes.memmove(new, old, X.VCPU_INFO_SIZE)
    else:
        ctypes.memset(new, 0, X.VCPU_INFO_SIZE)
    xd.vcpu_state[vcpuid].vcpu_info_gpa = gaddr
    xd.memory.mark_dirty(gaddr, X.VCPU_INFO_SIZE)
    xd.write_time(new + X.VI_TIME)
    ctypes.c_uint64.from_address(new + X.VI_PENDING_SEL).value = 0xFFFFFFFFFFFFFFFF
    ctypes.c_uint8.from_address(new + X.VI_UPCALL_PENDING).value = 0
    xd.mark_events_pending(vcpuid)


def initialise(ctx: HypercallContext, vcpuid: int, raw: bytes) -> None:
    """Check a vcpu_hvm_context the way arch_set_info_hvm_guest does and stage it."""
    mode, = struct.unpack_from("<I", raw)
    if mode == VCPU_HVM_MODE_64B:
        (rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, rip, rflags,
         cr0, cr3, cr4, efer) = struct.unpack_from("<14Q", raw, 8)
        if not (0 <= rip < 1 << 47 or rip >> 47 == (1 << 17) - 1):
            raise XenError(EINVAL, "non-canonical rip")
        if not cr0 & (1 << 31) or not cr0 & 1:
            raise XenError(EINVAL, "64-bit mode needs CR0.PE and CR0.PG")
        if not cr4 & (1 << 5):
            raise XenError(EINVAL, "64-bit mode needs CR4.PAE")
        if not efer & (1 << 8):
            raise XenError(EINVAL, "64-bit mode needs EFER.LME")
        state = dict(mode=64, rax=rax, rcx=rcx, rdx=rdx, rbx=rbx, rsp=rsp, rbp=rbp, rsi=rsi,
                     rdi=rdi, rip=rip, rflags=rflags | 2, cr0=cr0, cr3=cr3, cr4=cr4,
                     efer=efer | (1 << 10))
    elif mode == VCPU_HVM_MODE_32B:
        regs = struct.unpack_from("<10I", raw, 8)
        cr0, cr3, cr4 = struct.unpack_from("<3I", raw, 48)
        efer, = struct.unpack_from("<Q", raw, 64)
        if cr0 & (1 << 31):
            raise XenError(EINVAL, "32-bit mode with paging is not supported by pyxen")
        state = dict(mode=32, rax=regs[0], rcx=regs[1], rdx=regs[2], rbx=regs[3],
                     rsp=regs[4], rbp=regs[5], rsi=regs[6], rdi=regs[7], rip=regs[8],
                     rflags=regs[9] | 2, cr0=cr0 | 1, cr3=cr3, cr4=cr4, efer=efer)
    else:
        raise XenError(EINVAL, f"vcpu_hvm_context mode {mode}")
    ctx.xd.stage_vcpu_context(vcpuid, state)
