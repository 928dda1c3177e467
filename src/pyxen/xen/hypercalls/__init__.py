"""Hypercall handlers, one module per Xen hypercall. :data:`TABLE` maps number -> handler.

Each handler takes a :class:`~pyxen.xen.context.HypercallContext` and returns the value for RAX
(or :data:`pyxen.core.domain.NO_RETURN`); guest errors are raised as ``XenError``.
"""

from __future__ import annotations

from typing import Callable

from pyxen.xen.abi import xen as X
from pyxen.xen.hypercalls import (console, evtchn_op, gnttab_op, hvm, memory, misc, sched,
                                  vcpu, version)

TABLE: dict[int, Callable] = {
    X.HYPERVISOR_xen_version: version.do_xen_version,
    X.HYPERVISOR_memory_op: memory.do_memory_op,
    X.HYPERVISOR_hvm_op: hvm.do_hvm_op,
    X.HYPERVISOR_vcpu_op: vcpu.do_vcpu_op,
    X.HYPERVISOR_event_channel_op: evtchn_op.do_event_channel_op,
    X.HYPERVISOR_grant_table_op: gnttab_op.do_grant_table_op,
    X.HYPERVISOR_sched_op: sched.do_sched_op,
    X.HYPERVISOR_console_io: console.do_console_io,
    X.HYPERVISOR_vm_assist: misc.do_vm_assist,
    X.HYPERVISOR_set_timer_op: misc.do_set_timer_op,
}

for _nr, _fn in TABLE.items():
    _fn.hypercall_name = _fn.__name__.removeprefix("do_")  # type: ignore[attr-defined]
