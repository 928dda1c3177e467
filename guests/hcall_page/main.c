/*
 * hcall_page: the hypercall page installed through the MSR named by
 * CPUID leaf base+2 (public/arch-x86/cpuid.h; Xen: arch/x86/msr.c
 * guest_wrmsr_xen() -> hvm init_hypercall_page(): 32-byte stubs, stub n
 * at page + 32*n, each "mov $n,%eax; <enter Xen>; ret").
 */
#include "arch.h"
#include "hypercall.h"
#include "lib.h"
#include "rt.h"
#include "test.h"

const char test_area[] = "hcall_page";

static uint8_t hcall_page[4096] __attribute__((aligned(4096)));

static long page_call(unsigned nr, unsigned long a1, unsigned long a2, unsigned long a3)
{
    return hypercall_via(hcall_page + 32 * nr, nr, a1, a2, a3, 0, 0);
}

static int all_zero(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i])
            return 0;
    return 1;
}

void guest_main(struct hvm_start_info *si)
{
    uint32_t a, b, c, d;

    if (!check(xen_cpuid_base != 0, "Xen CPUID leaves", "no XenVMMXenVMM signature"))
        return;
    cpuid(xen_cpuid_base + 2, 0, &a, &b, &c, &d);
    check(a >= 1, "CPUID base+2 EAX: hypercall pages >= 1", "eax %u", a);
    if (!check(b != 0, "CPUID base+2 EBX: MSR index", "ebx 0"))
        return;
    test_note("hypercall page MSR 0x%x", b);

    long direct_ver = HYPERVISOR_xen_version(XENVER_version, NULL);

    /* Low 12 bits of the value = page index 0; the rest is the page GPA. */
    check(all_zero(hcall_page, sizeof(hcall_page)), "page is zero before the MSR write",
          "page already written");
    wrmsr(b, (uint64_t)hcall_page);
    check(!all_zero(hcall_page, sizeof(hcall_page)), "page filled after the MSR write",
          "page still all zero");
    check(!all_zero(hcall_page + 32 * __HYPERVISOR_xen_version, 32),
          "stub 17 (xen_version) present", "32 zero bytes at page+0x220");

    long ver = page_call(__HYPERVISOR_xen_version, XENVER_version, 0, 0);
    check_eqx("xen_version(VERSION) through the page == direct", (uint64_t)ver,
              (uint64_t)direct_ver);

    static struct xen_feature_info fd, fp;
    fd.submap_idx = fp.submap_idx = 0;
    HYPERVISOR_xen_version(XENVER_get_features, &fd);
    check_eq("get_features through the page rc",
             page_call(__HYPERVISOR_xen_version, XENVER_get_features, HC_PTR(&fp), 0), 0);
    check_eqx("get_features through the page == direct", fp.submap, fd.submap);

    check_eq("hypercall 63 through the page -> -ENOSYS", page_call(63, 0, 0, 0),
             -XEN_ENOSYS);

    static const char msg[] = "hcall_page: console_io through the hypercall page\n";
    check_eq("console_io(write) through the page",
             page_call(__HYPERVISOR_console_io, CONSOLEIO_write, sizeof(msg) - 1, HC_PTR(msg)),
             0);

    check_eq("sched_op(yield) through the page", page_call(__HYPERVISOR_sched_op,
                                                           SCHEDOP_yield, 0, 0), 0);

    /* Direct VMCALL/VMMCALL keeps working with the page installed. */
    check_eqx("direct xen_version after installing the page",
              (uint64_t)HYPERVISOR_xen_version(XENVER_version, NULL), (uint64_t)direct_ver);
}
