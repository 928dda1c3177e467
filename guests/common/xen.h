/*
 * Xen guest ABI constants and structures used by the pyxen test guests.
 *
 * Our own header: every value is taken from Xen's public headers
 * (xen-project/xen, xen/include/public/...), file named next to each block.
 * Layouts are the x86_64 ones; _Static_asserts below pin the offsets.
 */
#ifndef GUEST_XEN_H
#define GUEST_XEN_H

#include <stdint.h>

/* ---- public/xen.h: hypercall numbers ---------------------------------- */
#define __HYPERVISOR_set_trap_table     0
#define __HYPERVISOR_mmu_update         1
#define __HYPERVISOR_memory_op         12
#define __HYPERVISOR_set_timer_op      15
#define __HYPERVISOR_xen_version       17
#define __HYPERVISOR_console_io        18
#define __HYPERVISOR_grant_table_op    20
#define __HYPERVISOR_vm_assist         21
#define __HYPERVISOR_vcpu_op           24
#define __HYPERVISOR_sched_op          29
#define __HYPERVISOR_event_channel_op  32
#define __HYPERVISOR_physdev_op        33
#define __HYPERVISOR_hvm_op            34

/* public/xen.h: special domain ids */
#define DOMID_FIRST_RESERVED  0x7FF0
#define DOMID_SELF            0x7FF0
#define DOMID_IO              0x7FF1
#define DOMID_XEN             0x7FF2
#define DOMID_COW             0x7FF3
#define DOMID_INVALID         0x7FF4

/* public/xen.h: VIRQs */
#define VIRQ_TIMER      0   /* per-vCPU */
#define VIRQ_DEBUG      1   /* per-vCPU */
#define VIRQ_CONSOLE    2   /* global */
#define VIRQ_DOM_EXC    3   /* global */
#define NR_VIRQS       24

/* public/xen.h: console_io commands */
#define CONSOLEIO_write 0
#define CONSOLEIO_read  1

/* public/errno.h (Xen's own errno values) */
#define XEN_EPERM       1
#define XEN_ENOENT      2
#define XEN_ESRCH       3
#define XEN_EINTR       4
#define XEN_EIO         5
#define XEN_ENXIO       6
#define XEN_E2BIG       7
#define XEN_EAGAIN     11
#define XEN_ENOMEM     12
#define XEN_EACCES     13
#define XEN_EFAULT     14
#define XEN_EBUSY      16
#define XEN_EEXIST     17
#define XEN_ENODEV     19
#define XEN_EINVAL     22
#define XEN_ENOSPC     28
#define XEN_ENOSYS     38
#define XEN_ETIME      62
#define XEN_EOPNOTSUPP 95

/* ---- public/version.h ------------------------------------------------- */
#define XENVER_version              0
#define XENVER_extraversion         1
#define XENVER_compile_info         2
#define XENVER_capabilities         3
#define XENVER_changeset            4
#define XENVER_platform_parameters  5
#define XENVER_get_features         6
#define XENVER_pagesize             7
#define XENVER_guest_handle         8

struct xen_compile_info {
    char compiler[64];
    char compile_by[16];
    char compile_domain[32];
    char compile_date[32];
};

struct xen_feature_info {
    uint32_t submap_idx;    /* IN */
    uint32_t submap;        /* OUT */
};

/* public/features.h */
#define XENFEAT_writable_page_tables        0
#define XENFEAT_writable_descriptor_tables  1
#define XENFEAT_auto_translated_physmap     2
#define XENFEAT_supervisor_mode_kernel      3
#define XENFEAT_pae_pgdir_above_4gb         4
#define XENFEAT_hvm_callback_vector         8
#define XENFEAT_hvm_safe_pvclock            9
#define XENFEAT_hvm_pirqs                  10
#define XENFEAT_dom0                       11

/* ---- public/arch-x86/cpuid.h ------------------------------------------ */
#define XEN_CPUID_FIRST_LEAF            0x40000000
#define XEN_CPUID_SIGNATURE_EBX         0x566e6558 /* "XenV" */
#define XEN_CPUID_SIGNATURE_ECX         0x65584d4d /* "MMXe" */
#define XEN_CPUID_SIGNATURE_EDX         0x4d4d566e /* "nVMM" */
#define XEN_HVM_CPUID_APIC_ACCESS_VIRT  (1u << 0)
#define XEN_HVM_CPUID_X2APIC_VIRT       (1u << 1)
#define XEN_HVM_CPUID_IOMMU_MAPPINGS    (1u << 2)
#define XEN_HVM_CPUID_VCPU_ID_PRESENT   (1u << 3)
#define XEN_HVM_CPUID_DOMID_PRESENT     (1u << 4)
#define XEN_HVM_CPUID_UPCALL_VECTOR     (1u << 6)

/* ---- public/arch-x86/hvm/start_info.h --------------------------------- */
#define XEN_HVM_START_MAGIC_VALUE 0x336ec578

struct hvm_start_info {
    uint32_t magic;
    uint32_t version;
    uint32_t flags;
    uint32_t nr_modules;
    uint64_t modlist_paddr;
    uint64_t cmdline_paddr;
    uint64_t rsdp_paddr;
    uint64_t memmap_paddr;
    uint32_t memmap_entries;
    uint32_t reserved;
};

struct hvm_modlist_entry {
    uint64_t paddr;
    uint64_t size;
    uint64_t cmdline_paddr;
    uint64_t reserved;
};

struct hvm_memmap_table_entry {
    uint64_t addr;
    uint64_t size;
    uint32_t type;
    uint32_t reserved;
};

#define XEN_HVM_MEMMAP_TYPE_RAM       1
#define XEN_HVM_MEMMAP_TYPE_RESERVED  2
#define XEN_HVM_MEMMAP_TYPE_ACPI      3
#define XEN_HVM_MEMMAP_TYPE_NVS       4

/* ---- public/arch-x86/xen.h + public/xen.h: shared_info / vcpu_info ---- */
struct vcpu_time_info {
    uint32_t version;
    uint32_t pad0;
    uint64_t tsc_timestamp;
    uint64_t system_time;
    uint32_t tsc_to_system_mul;
    int8_t   tsc_shift;
    uint8_t  flags;
    uint8_t  pad1[2];
};

struct vcpu_info {
    uint8_t  evtchn_upcall_pending;
    uint8_t  evtchn_upcall_mask;
    uint8_t  pad0[6];
    uint64_t evtchn_pending_sel;
    uint64_t cr2;                   /* struct arch_vcpu_info */
    uint64_t pad1;
    struct vcpu_time_info time;
};

#define XEN_LEGACY_MAX_VCPUS 32

struct shared_info {
    struct vcpu_info vcpu_info[XEN_LEGACY_MAX_VCPUS];
    uint64_t evtchn_pending[64];
    uint64_t evtchn_mask[64];
    uint32_t wc_version;
    uint32_t wc_sec;
    uint32_t wc_nsec;
    uint32_t wc_sec_hi;
    /* struct arch_shared_info follows (PV only). */
};

/* ---- public/memory.h --------------------------------------------------- */
#define XENMEM_increase_reservation   0
#define XENMEM_decrease_reservation   1
#define XENMEM_maximum_ram_page       2
#define XENMEM_current_reservation    3
#define XENMEM_populate_physmap       6
#define XENMEM_add_to_physmap         7
#define XENMEM_memory_map             9
#define XENMEM_machine_memory_map    10
#define XENMEM_machphys_mapping      12

#define XENMAPSPACE_shared_info   0
#define XENMAPSPACE_grant_table   1
#define XENMAPSPACE_gmfn          2
#define XENMAPSPACE_gmfn_range    3
#define XENMAPSPACE_gmfn_foreign  4
#define XENMAPSPACE_dev_mmio      5

struct xen_add_to_physmap {
    uint16_t domid;
    uint16_t size;
    uint32_t space;
    uint64_t idx;
    uint64_t gpfn;
};

struct xen_memory_reservation {
    uint64_t extent_start;      /* GUEST_HANDLE(xen_pfn_t) */
    uint64_t nr_extents;
    uint32_t extent_order;
    uint32_t mem_flags;
    uint16_t domid;
    uint16_t pad[3];
};

struct xen_memory_map {
    uint32_t nr_entries;
    uint32_t pad;
    uint64_t buffer;            /* GUEST_HANDLE(void): packed e820 entries */
};

struct e820entry {
    uint64_t addr;
    uint64_t size;
    uint32_t type;
} __attribute__((packed));

/* ---- public/hvm/hvm_op.h + public/hvm/params.h ------------------------ */
#define HVMOP_set_param                 0
#define HVMOP_get_param                 1
#define HVMOP_pagetable_dying           9
#define HVMOP_get_time                 10
#define HVMOP_set_evtchn_upcall_vector 23

struct xen_hvm_param {
    uint16_t domid;
    uint16_t pad;
    uint32_t index;
    uint64_t value;
};

struct xen_hvm_evtchn_upcall_vector {
    uint32_t vcpu;
    uint8_t  vector;
    uint8_t  pad[3];
};

struct xen_hvm_pagetable_dying {
    uint16_t domid;
    uint16_t pad[3];
    uint64_t gpa;
};

#define HVM_PARAM_CALLBACK_IRQ           0
#define HVM_PARAM_STORE_PFN              1
#define HVM_PARAM_STORE_EVTCHN           2
#define HVM_PARAM_PAE_ENABLED            4   /* deprecated */
#define HVM_PARAM_TIMER_MODE            10
#define HVM_PARAM_IDENT_PT              12
#define HVM_PARAM_CONSOLE_PFN           17
#define HVM_PARAM_CONSOLE_EVTCHN        18
#define HVM_PARAM_VM_GENERATION_ID_ADDR 34
#define HVM_PARAM_ALTP2M                35
#define HVM_NR_PARAMS                   39   /* x86 */

/* ---- public/vcpu.h ----------------------------------------------------- */
#define VCPUOP_initialise                   0
#define VCPUOP_up                           1
#define VCPUOP_down                         2
#define VCPUOP_is_up                        3
#define VCPUOP_get_runstate_info            4
#define VCPUOP_register_runstate_memory_area 5
#define VCPUOP_set_periodic_timer           6
#define VCPUOP_stop_periodic_timer          7
#define VCPUOP_set_singleshot_timer         8
#define VCPUOP_stop_singleshot_timer        9
#define VCPUOP_register_vcpu_info          10

struct vcpu_register_vcpu_info {
    uint64_t mfn;
    uint32_t offset;
    uint32_t rsvd;
};

struct vcpu_runstate_info {
    int32_t  state;
    uint32_t pad;
    uint64_t state_entry_time;
    uint64_t time[4];
};
#define RUNSTATE_running  0
#define RUNSTATE_runnable 1
#define RUNSTATE_blocked  2
#define RUNSTATE_offline  3

struct vcpu_register_runstate_memory_area {
    uint64_t addr;              /* guest virtual address */
};

struct vcpu_set_periodic_timer {
    uint64_t period_ns;
};

struct vcpu_set_singleshot_timer {
    uint64_t timeout_abs_ns;
    uint32_t flags;
    uint32_t pad;
};
#define VCPU_SSHOTTMR_future (1u << 0)

/* ---- public/hvm/hvm_vcpu.h --------------------------------------------- */
#define VCPU_HVM_MODE_32B 0
#define VCPU_HVM_MODE_64B 1

struct vcpu_hvm_x86_64 {
    uint64_t rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi;
    uint64_t rip, rflags;
    uint64_t cr0, cr3, cr4, efer;
};

struct vcpu_hvm_context {
    uint32_t mode;
    uint32_t pad;
    union {
        uint8_t x86_32[120];    /* struct vcpu_hvm_x86_32 (size 120) */
        struct vcpu_hvm_x86_64 x86_64;
    } cpu_regs;
};

/* ---- public/event_channel.h -------------------------------------------- */
#define EVTCHNOP_bind_interdomain  0
#define EVTCHNOP_bind_virq         1
#define EVTCHNOP_bind_pirq         2
#define EVTCHNOP_close             3
#define EVTCHNOP_send              4
#define EVTCHNOP_status            5
#define EVTCHNOP_alloc_unbound     6
#define EVTCHNOP_bind_ipi          7
#define EVTCHNOP_bind_vcpu         8
#define EVTCHNOP_unmask            9
#define EVTCHNOP_reset            10
#define EVTCHNOP_init_control     11
#define EVTCHNOP_expand_array     12
#define EVTCHNOP_set_priority     13

#define EVTCHNSTAT_closed       0
#define EVTCHNSTAT_unbound      1
#define EVTCHNSTAT_interdomain  2
#define EVTCHNSTAT_pirq         3
#define EVTCHNSTAT_virq         4
#define EVTCHNSTAT_ipi          5

#define EVTCHN_2L_NR_CHANNELS 4096

struct evtchn_alloc_unbound { uint16_t dom, remote_dom; uint32_t port; };
struct evtchn_bind_interdomain { uint16_t remote_dom; uint16_t pad;
                                 uint32_t remote_port, local_port; };
struct evtchn_bind_virq { uint32_t virq, vcpu, port; };
struct evtchn_bind_ipi { uint32_t vcpu, port; };
struct evtchn_port_op { uint32_t port; };   /* close, send, unmask */
struct evtchn_status {
    uint16_t dom;
    uint16_t pad;
    uint32_t port;
    uint32_t status;
    uint32_t vcpu;
    union {
        struct { uint16_t dom; } unbound;
        struct { uint16_t dom; uint16_t pad; uint32_t port; } interdomain;
        uint32_t pirq;
        uint32_t virq;
    } u;
};
struct evtchn_bind_vcpu { uint32_t port, vcpu; };
struct evtchn_init_control {
    uint64_t control_gfn;
    uint32_t offset;
    uint32_t vcpu;
    uint8_t  link_bits;
    uint8_t  pad[7];
};

/* ---- public/grant_table.h ---------------------------------------------- */
#define GNTTABOP_map_grant_ref      0
#define GNTTABOP_unmap_grant_ref    1
#define GNTTABOP_setup_table        2
#define GNTTABOP_dump_table         3
#define GNTTABOP_transfer           4
#define GNTTABOP_copy               5
#define GNTTABOP_query_size         6
#define GNTTABOP_unmap_and_replace  7
#define GNTTABOP_set_version        8
#define GNTTABOP_get_status_frames  9
#define GNTTABOP_get_version       10

#define GTF_invalid          0
#define GTF_permit_access    1
#define GTF_accept_transfer  2
#define GTF_transitive       3
#define GTF_type_mask        3
#define GTF_readonly         (1u << 2)
#define GTF_reading          (1u << 3)
#define GTF_writing          (1u << 4)

#define GNTST_okay              0
#define GNTST_general_error   (-1)
#define GNTST_bad_domain      (-2)
#define GNTST_bad_gntref      (-3)
#define GNTST_bad_handle      (-4)
#define GNTST_bad_virt_addr   (-5)
#define GNTST_bad_dev_addr    (-6)
#define GNTST_no_device_space (-7)
#define GNTST_permission_denied (-8)
#define GNTST_bad_page        (-9)
#define GNTST_bad_copy_arg   (-10)
#define GNTST_address_too_big (-11)
#define GNTST_eagain         (-12)

struct grant_entry_v1 {
    uint16_t flags;
    uint16_t domid;
    uint32_t frame;
};

struct gnttab_query_size {
    uint16_t dom;
    uint16_t pad;
    uint32_t nr_frames;
    uint32_t max_nr_frames;
    int16_t  status;
    uint16_t pad2;
};

struct gnttab_setup_table {
    uint16_t dom;
    uint16_t pad;
    uint32_t nr_frames;
    int16_t  status;
    uint16_t pad2[3];
    uint64_t frame_list;        /* GUEST_HANDLE(xen_pfn_t) */
};

struct gnttab_set_version { uint32_t version; };
struct gnttab_get_version { uint16_t dom; uint16_t pad; uint32_t version; };

struct gnttab_copy_ptr {
    union {
        uint32_t ref;
        uint64_t gmfn;
    } u;
    uint16_t domid;
    uint16_t offset;
    uint32_t pad;
};
struct gnttab_copy {
    struct gnttab_copy_ptr source;
    struct gnttab_copy_ptr dest;
    uint16_t len;
    uint16_t flags;
    int16_t  status;
    uint16_t pad;
};
#define GNTCOPY_source_gref (1u << 0)
#define GNTCOPY_dest_gref   (1u << 1)

/* ---- public/sched.h ---------------------------------------------------- */
#define SCHEDOP_yield            0
#define SCHEDOP_block            1
#define SCHEDOP_shutdown         2
#define SCHEDOP_poll             3
#define SCHEDOP_remote_shutdown  4
#define SCHEDOP_shutdown_code    5
#define SCHEDOP_watchdog         6

#define SHUTDOWN_poweroff    0
#define SHUTDOWN_reboot      1
#define SHUTDOWN_suspend     2
#define SHUTDOWN_crash       3
#define SHUTDOWN_watchdog    4
#define SHUTDOWN_soft_reset  5

struct sched_shutdown { uint32_t reason; };
struct sched_poll {
    uint64_t ports;             /* GUEST_HANDLE(evtchn_port_t) */
    uint32_t nr_ports;
    uint32_t pad;
    uint64_t timeout;           /* absolute system time, 0 = none */
};

/* ---- public/io/console.h ----------------------------------------------- */
struct xencons_interface {
    char in[1024];
    char out[2048];
    uint32_t in_cons, in_prod;
    uint32_t out_cons, out_prod;
};

/* ---- layout checks (offsets from the x86_64 public headers) ------------ */
#define XEN_OFFSET(t, f) __builtin_offsetof(struct t, f)
_Static_assert(sizeof(struct hvm_start_info) == 56, "start_info");
_Static_assert(sizeof(struct hvm_modlist_entry) == 32, "modlist");
_Static_assert(sizeof(struct hvm_memmap_table_entry) == 24, "memmap");
_Static_assert(sizeof(struct vcpu_time_info) == 32, "vcpu_time_info");
_Static_assert(sizeof(struct vcpu_info) == 64, "vcpu_info");
_Static_assert(XEN_OFFSET(shared_info, evtchn_pending) == 2048, "pending");
_Static_assert(XEN_OFFSET(shared_info, evtchn_mask) == 2560, "mask");
_Static_assert(XEN_OFFSET(shared_info, wc_version) == 3072, "wc");
_Static_assert(sizeof(struct xen_add_to_physmap) == 24, "xatp");
_Static_assert(sizeof(struct xen_memory_reservation) == 32, "reservation");
_Static_assert(sizeof(struct e820entry) == 20, "e820");
_Static_assert(sizeof(struct xen_hvm_param) == 16, "hvm_param");
_Static_assert(sizeof(struct vcpu_runstate_info) == 48, "runstate");
_Static_assert(sizeof(struct vcpu_hvm_context) == 128, "hvm ctx");
_Static_assert(XEN_OFFSET(vcpu_hvm_context, cpu_regs.x86_64.rip) == 72, "rip");
_Static_assert(sizeof(struct evtchn_status) == 24, "evtchn_status");
_Static_assert(XEN_OFFSET(evtchn_status, u.interdomain.port) == 20, "st");
_Static_assert(sizeof(struct evtchn_bind_interdomain) == 12, "bind_idom");
_Static_assert(sizeof(struct gnttab_query_size) == 16, "query_size");
_Static_assert(sizeof(struct gnttab_setup_table) == 24, "setup_table");
_Static_assert(sizeof(struct gnttab_copy) == 40, "gnttab_copy");
_Static_assert(XEN_OFFSET(gnttab_copy, status) == 36, "copy status");
_Static_assert(sizeof(struct sched_poll) == 24, "sched_poll");
_Static_assert(XEN_OFFSET(xencons_interface, out_prod) == 3084, "cons");
_Static_assert(sizeof(struct xen_compile_info) == 144, "compile_info");

#endif
