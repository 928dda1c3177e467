/*
 * hvm: HYPERVISOR_hvm_op (34).
 *
 * Reference: xen/arch/x86/hvm/hvm.c do_hvm_op(), hvmop_set_param(),
 * hvmop_get_param(), hvm_allow_set_param(), hvm_allow_get_param(),
 * hvmop_set_evtchn_upcall_vector(); public/hvm/params.h.
 */
#include "arch.h"
#include "hypercall.h"
#include "lib.h"
#include "rt.h"
#include "test.h"

const char test_area[] = "hvm";

static long param_op(unsigned op, uint16_t domid, uint32_t index, uint64_t *value)
{
    struct xen_hvm_param p = { .domid = domid, .index = index, .value = *value };
    long rc = HYPERVISOR_hvm_op(op, &p);
    *value = p.value;
    return rc;
}

static long get_param(uint32_t index, uint64_t *v)
{
    *v = 0xDEADBEEF;
    return param_op(HVMOP_get_param, DOMID_SELF, index, v);
}

static long set_param(uint32_t index, uint64_t v)
{
    return param_op(HVMOP_set_param, DOMID_SELF, index, &v);
}

static long upcall_vector(uint32_t vcpu, uint8_t vector)
{
    struct xen_hvm_evtchn_upcall_vector op = { .vcpu = vcpu, .vector = vector };
    return HYPERVISOR_hvm_op(HVMOP_set_evtchn_upcall_vector, &op);
}

void guest_main(struct hvm_start_info *si)
{
    uint64_t v, store_port = 0, cons_port = 0;

    /* The toolstack's parameters (libxl: special_pfn(4) store, (7) console). */
    check_eq("get_param STORE_PFN rc", get_param(HVM_PARAM_STORE_PFN, &v), 0);
    check_eqx("STORE_PFN == 0xFEFFC", v, 0xFEFFC);
    check_eq("get_param STORE_EVTCHN rc", get_param(HVM_PARAM_STORE_EVTCHN, &store_port), 0);
    check(store_port != 0 && store_port < EVTCHN_2L_NR_CHANNELS, "STORE_EVTCHN valid port",
          "got %lu", store_port);
    check_eq("get_param CONSOLE_PFN rc", get_param(HVM_PARAM_CONSOLE_PFN, &v), 0);
    check_eqx("CONSOLE_PFN == 0xFEFFF", v, 0xFEFFF);
    check_eq("get_param CONSOLE_EVTCHN rc", get_param(HVM_PARAM_CONSOLE_EVTCHN, &cons_port), 0);
    check(cons_port != 0 && cons_port < EVTCHN_2L_NR_CHANNELS && cons_port != store_port,
          "CONSOLE_EVTCHN valid port, != STORE_EVTCHN", "got %lu (store %lu)", cons_port,
          store_port);

    /* CALLBACK_IRQ as Linux writes it after per-vCPU vectors (GSI 1, ignored for PVH). */
    check_eq("set_param CALLBACK_IRQ = 1", set_param(HVM_PARAM_CALLBACK_IRQ, 1), 0);
    check_eq("get_param CALLBACK_IRQ rc", get_param(HVM_PARAM_CALLBACK_IRQ, &v), 0);
    check_eqx("CALLBACK_IRQ reads back 1", v, 1);

    /* An ordinary guest-settable and guest-readable parameter round trip. */
    check_eq("set_param VM_GENERATION_ID_ADDR",
             set_param(HVM_PARAM_VM_GENERATION_ID_ADDR, 0x12345000), 0);
    check_eq("get_param VM_GENERATION_ID_ADDR rc",
             get_param(HVM_PARAM_VM_GENERATION_ID_ADDR, &v), 0);
    check_eqx("VM_GENERATION_ID_ADDR round trip", v, 0x12345000);
    check_eq("set_param VM_GENERATION_ID_ADDR = 0",
             set_param(HVM_PARAM_VM_GENERATION_ID_ADDR, 0), 0);

    /* Index range: hvmop_{get,set}_param check index >= HVM_NR_PARAMS (39 on x86). */
    check_eq("get_param index 39 (HVM_NR_PARAMS) -> -EINVAL", get_param(HVM_NR_PARAMS, &v),
             -XEN_EINVAL);
    check_eq("get_param index 1000 -> -EINVAL", get_param(1000, &v), -XEN_EINVAL);
    check_eq("set_param index 39 -> -EINVAL", set_param(HVM_NR_PARAMS, 0), -XEN_EINVAL);

    /* Permission lists (hvm_allow_get_param / hvm_allow_set_param) for the domain itself. */
    check_eq("get_param TIMER_MODE (not guest readable) -> -EPERM",
             get_param(HVM_PARAM_TIMER_MODE, &v), -XEN_EPERM);
    check_eq("get_param PAE_ENABLED (deprecated) -> -EINVAL",
             get_param(HVM_PARAM_PAE_ENABLED, &v), -XEN_EINVAL);
    check_eq("set_param STORE_PFN (not guest settable) -> -EPERM",
             set_param(HVM_PARAM_STORE_PFN, 0x1234), -XEN_EPERM);
    check_eq("set_param IDENT_PT -> -EPERM", set_param(HVM_PARAM_IDENT_PT, 0), -XEN_EPERM);
    check_eq("set_param ALTP2M (read-only) -> -EEXIST", set_param(HVM_PARAM_ALTP2M, 0),
             -XEN_EEXIST);
    check_eq("get_param STORE_PFN unchanged", get_param(HVM_PARAM_STORE_PFN, &v) == 0 ? (long)v : -1,
             0xFEFFC);

    v = 0;
    check_eq("get_param domid DOMID_INVALID -> -ESRCH",
             param_op(HVMOP_get_param, DOMID_INVALID, HVM_PARAM_STORE_PFN, &v), -XEN_ESRCH);
    check_eq("get_param bad pointer -> -EFAULT", HYPERVISOR_hvm_op(HVMOP_get_param, BAD_PTR),
             -XEN_EFAULT);

    /* Per-vCPU upcall vector: shared_info first so the handler can scan it. */
    if (!check_eq("map shared_info", map_shared_info(), 0))
        return;
    uint64_t before = cpus[0].upcalls;
    check_eq("set_evtchn_upcall_vector(vcpu 0, 0xF3)", upcall_vector(0, UPCALL_VECTOR), 0);
    /* hvmop_set_evtchn_upcall_vector() ends with hvm_assert_evtchn_irq(v). */
    irq_window();
    check(cpus[0].upcalls > before, "upcall vector asserted after set_evtchn_upcall_vector",
          "no interrupt on vector 0x%x", UPCALL_VECTOR);
    check_eq("set_evtchn_upcall_vector vector 0x0F -> -EINVAL", upcall_vector(0, 0x0F),
             -XEN_EINVAL);
    check_eq("set_evtchn_upcall_vector vcpu 99 -> -ENOENT", upcall_vector(99, UPCALL_VECTOR),
             -XEN_ENOENT);
    /* The vector is checked before the vCPU. */
    check_eq("set_evtchn_upcall_vector vcpu 99 vector 5 -> -EINVAL", upcall_vector(99, 5),
             -XEN_EINVAL);

    /* pagetable_dying: only meaningful with shadow paging; HAP domains get -EINVAL. */
    struct xen_hvm_pagetable_dying pd = { .domid = DOMID_SELF, .gpa = 0 };
    check_eq("pagetable_dying (HAP) -> -EINVAL",
             HYPERVISOR_hvm_op(HVMOP_pagetable_dying, &pd), -XEN_EINVAL);
    pd.domid = DOMID_INVALID;
    check_eq("pagetable_dying domid DOMID_INVALID -> -ESRCH",
             HYPERVISOR_hvm_op(HVMOP_pagetable_dying, &pd), -XEN_ESRCH);

    check_eq("hvm_op unknown op 200 -> -ENOSYS", HYPERVISOR_hvm_op(200, NULL), -XEN_ENOSYS);
}
