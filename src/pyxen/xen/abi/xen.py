"""Numbers from Xen's public headers (xen/include/public/xen.h, sched.h, vcpu.h, memory.h,
event_channel.h, grant_table.h, hvm/params.h, hvm/hvm_op.h, version.h, features.h)."""

from __future__ import annotations

# hypercall numbers (xen.h)
HYPERVISOR_set_timer_op = 15
HYPERVISOR_memory_op = 12
HYPERVISOR_xen_version = 17
HYPERVISOR_console_io = 18
HYPERVISOR_grant_table_op = 20
HYPERVISOR_vm_assist = 21
HYPERVISOR_vcpu_op = 24
HYPERVISOR_sched_op = 29
HYPERVISOR_event_channel_op = 32
HYPERVISOR_physdev_op = 33
HYPERVISOR_hvm_op = 34
NR_HYPERCALLS = 64

DOMID_SELF = 0x7FF0
DOMID_FIRST_RESERVED = 0x7FF0

XEN_LEGACY_MAX_VCPUS = 32
SHARED_INFO_SIZE = 3136
VCPU_INFO_SIZE = 64
# shared_info offsets
SI_EVTCHN_PENDING = 2048
SI_EVTCHN_MASK = 2560
SI_WC_VERSION = 3072
SI_WC_SEC = 3076
SI_WC_NSEC = 3080
SI_WC_SEC_HI = 3084
# vcpu_info offsets
VI_UPCALL_PENDING = 0
VI_UPCALL_MASK = 1
VI_PENDING_SEL = 8
VI_TIME = 32

# sched_op (sched.h)
SCHEDOP_yield = 0
SCHEDOP_block = 1
SCHEDOP_shutdown = 2
SCHEDOP_poll = 3
SCHEDOP_remote_shutdown = 4
SCHEDOP_shutdown_code = 5
SCHEDOP_watchdog = 6
SCHEDOP_pin_override = 7
SHUTDOWN_poweroff = 0
SHUTDOWN_reboot = 1
SHUTDOWN_suspend = 2
SHUTDOWN_crash = 3
SHUTDOWN_watchdog = 4
SHUTDOWN_soft_reset = 5
SHUTDOWN_NAMES = {0: "poweroff", 1: "reboot", 2: "suspend", 3: "crash", 4: "watchdog",
                  5: "soft_reset"}

# xen_version (version.h)
XENVER_version = 0
XENVER_extraversion = 1
XENVER_compile_info = 2
XENVER_capabilities = 3
XENVER_changeset = 4
XENVER_platform_parameters = 5
XENVER_get_features = 6
XENVER_pagesize = 7
XENVER_guest_handle = 8
XENVER_commandline = 9
XENVER_build_id = 10

# features.h
XENFEAT_writable_page_tables = 0
XENFEAT_auto_translated_physmap = 2
XENFEAT_hvm_callback_vector = 8
XENFEAT_hvm_safe_pvclock = 9
XENFEAT_memory_op_vnode_supported = 13
XENFEAT_not_direct_mapped = 16

# console_io
CONSOLEIO_write = 0
CONSOLEIO_read = 1

# memory_op (memory.h)
XENMEM_increase_reservation = 0
XENMEM_decrease_reservation = 1
XENMEM_populate_physmap = 6
XENMEM_add_to_physmap = 7
XENMEM_memory_map = 9
XENMEM_add_to_physmap_batch = 23
MEMOP_CMD_MASK = 0x3F
XENMAPSPACE_shared_info = 0
XENMAPSPACE_grant_table = 1
XENMAPSPACE_gmfn = 2
XENMAPSPACE_gmfn_range = 3
XENMAPSPACE_gmfn_foreign = 4
XENMAPSPACE_dev_mmio = 5
XENMAPIDX_grant_table_status = 0x80000000

# hvm_op (hvm/hvm_op.h, hvm/params.h)
HVMOP_set_param = 0
HVMOP_get_param = 1
HVMOP_pagetable_dying = 9
HVMOP_get_time = 10
HVMOP_set_evtchn_upcall_vector = 23
HVM_PARAM_CALLBACK_IRQ = 0
HVM_PARAM_STORE_PFN = 1
HVM_PARAM_STORE_EVTCHN = 2
HVM_PARAM_CONSOLE_PFN = 17
HVM_PARAM_CONSOLE_EVTCHN = 18
HVM_NR_PARAMS = 39

# vcpu_op (vcpu.h)
VCPUOP_initialise = 0
VCPUOP_up = 1
VCPUOP_down = 2
VCPUOP_is_up = 3
VCPUOP_get_runstate_info = 4
VCPUOP_register_runstate_memory_area = 5
VCPUOP_set_periodic_timer = 6
VCPUOP_stop_periodic_timer = 7
VCPUOP_set_singleshot_timer = 8
VCPUOP_stop_singleshot_timer = 9
VCPUOP_register_vcpu_info = 10
VCPUOP_send_nmi = 11
VCPUOP_get_physid = 12
VCPUOP_register_vcpu_time_memory_area = 13
VCPU_SSHOTTMR_future = 1

# event_channel_op (event_channel.h)
EVTCHNOP_bind_interdomain = 0
EVTCHNOP_bind_virq = 1
EVTCHNOP_bind_pirq = 2
EVTCHNOP_close = 3
EVTCHNOP_send = 4
EVTCHNOP_status = 5
EVTCHNOP_alloc_unbound = 6
EVTCHNOP_bind_ipi = 7
EVTCHNOP_bind_vcpu = 8
EVTCHNOP_unmask = 9
EVTCHNOP_reset = 10
EVTCHNOP_init_control = 11
EVTCHNOP_expand_array = 12
EVTCHNOP_set_priority = 13
EVTCHNSTAT_closed = 0
EVTCHNSTAT_unbound = 1
EVTCHNSTAT_interdomain = 2
EVTCHNSTAT_pirq = 3
EVTCHNSTAT_virq = 4
EVTCHNSTAT_ipi = 5
EVTCHN_2L_NR_CHANNELS = 4096
VIRQ_TIMER = 0
VIRQ_DEBUG = 1
VIRQ_CONSOLE = 2
VIRQ_DOM_EXC = 3
VIRQ_XENPMU = 13
NR_VIRQS = 24
VIRQ_PER_VCPU = frozenset({0, 1, 7, 13})  # TIMER, DEBUG, XENOPROF, XENPMU (virq_is_global)

# grant_table_op (grant_table.h)
GNTTABOP_map_grant_ref = 0
GNTTABOP_unmap_grant_ref = 1
GNTTABOP_setup_table = 2
GNTTABOP_dump_table = 3
GNTTABOP_transfer = 4
GNTTABOP_copy = 5
GNTTABOP_query_size = 6
GNTTABOP_unmap_and_replace = 7
GNTTABOP_set_version = 8
GNTTABOP_get_status_frames = 9
GNTTABOP_get_version = 10
GNTTABOP_swap_grant_ref = 11
GNTTABOP_cache_flush = 12
GTF_invalid = 0
GTF_permit_access = 1
GTF_accept_transfer = 2
GTF_transitive = 3
GTF_type_mask = 3
GTF_readonly = 1 << 2
GTF_reading = 1 << 3
GTF_writing = 1 << 4
GNTCOPY_source_gref = 1
GNTCOPY_dest_gref = 2
GNTST_okay = 0
GNTST_general_error = -1
GNTST_bad_domain = -2
GNTST_bad_gntref = -3
GNTST_bad_handle = -4
GNTST_bad_virt_addr = -5
GNTST_bad_dev_addr = -6
GNTST_no_device_space = -7
GNTST_permission_denied = -8
GNTST_bad_page = -9
GNTST_bad_copy_arg = -10
GNTST_address_too_big = -11
GNTST_eagain = -12
