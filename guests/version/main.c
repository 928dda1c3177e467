/*
 * version: HYPERVISOR_xen_version (17) and unknown hypercall numbers.
 *
 * Reference: xen/common/kernel.c do_xen_version(); dispatch in
 * xen/arch/x86/hvm/hypercall.c hvm_hypercall().
 */
#include "arch.h"
#include "hypercall.h"
#include "lib.h"
#include "rt.h"
#include "test.h"

const char test_area[] = "version";

/* NUL within the first n bytes of a buffer pre-filled with 0xFF. */
static int nul_terminated(const char *s, size_t n)
{
    return strnlen(s, n) < n;
}

void guest_main(struct hvm_start_info *si)
{
    long rc;
    uint32_t a, b, c, d;

    /* XENVER_version: (major << 16) | minor, the value CPUID base+1 EAX shows. */
    long ver = HYPERVISOR_xen_version(XENVER_version, NULL);
    check(ver > 0 && (ver >> 16) >= 4, "XENVER_version", "got 0x%lx", ver);
    cpuid(xen_cpuid_base + 1, 0, &a, &b, &c, &d);
    check_eqx("XENVER_version == CPUID base+1 EAX", (uint64_t)ver, a);
    test_note("Xen %ld.%ld", ver >> 16, ver & 0xFFFF);

    static char extra[16];
    memset(extra, 0xFF, sizeof(extra));
    rc = HYPERVISOR_xen_version(XENVER_extraversion, extra);
    check_eq("XENVER_extraversion rc", rc, 0);
    check(nul_terminated(extra, sizeof(extra)), "XENVER_extraversion NUL-terminated",
          "no NUL in 16 bytes");

    static struct xen_compile_info ci;
    memset(&ci, 0xFF, sizeof(ci));
    rc = HYPERVISOR_xen_version(XENVER_compile_info, &ci);
    check_eq("XENVER_compile_info rc", rc, 0);
    check(nul_terminated(ci.compiler, sizeof(ci.compiler)) &&
          nul_terminated(ci.compile_by, sizeof(ci.compile_by)) &&
          nul_terminated(ci.compile_domain, sizeof(ci.compile_domain)) &&
          nul_terminated(ci.compile_date, sizeof(ci.compile_date)),
          "XENVER_compile_info strings NUL-terminated", "a field lacks its NUL");

    static char caps[1024];
    memset(caps, 0xFF, sizeof(caps));
    rc = HYPERVISOR_xen_version(XENVER_capabilities, caps);
    check_eq("XENVER_capabilities rc", rc, 0);
    if (check(nul_terminated(caps, sizeof(caps)), "XENVER_capabilities NUL-terminated",
              "no NUL in 1024 bytes"))
        /* arch_get_xen_caps() (xen/arch/x86/setup.c) lists hvm-3.0-x86_64 when HVM is on */
        check(strstr(caps, "hvm-3.0-x86_64") != NULL, "XENVER_capabilities has hvm-3.0-x86_64",
              "got '%s'", caps);

    static char chg[64];
    memset(chg, 0xFF, sizeof(chg));
    rc = HYPERVISOR_xen_version(XENVER_changeset, chg);
    check_eq("XENVER_changeset rc", rc, 0);
    check(nul_terminated(chg, sizeof(chg)), "XENVER_changeset NUL-terminated",
          "no NUL in 64 bytes");

    static uint64_t params;
    rc = HYPERVISOR_xen_version(XENVER_platform_parameters, &params);
    check_eq("XENVER_platform_parameters rc", rc, 0);

    /* XENVER_get_features submap 0: what kernel.c gives an HVM domU. */
    static struct xen_feature_info fi;
    fi.submap_idx = 0;
    fi.submap = 0xDEADBEEF;
    rc = HYPERVISOR_xen_version(XENVER_get_features, &fi);
    check_eq("XENVER_get_features(0) rc", rc, 0);
    uint32_t want_set = (1u << XENFEAT_writable_page_tables) |
                        (1u << XENFEAT_auto_translated_physmap) |
                        (1u << XENFEAT_hvm_callback_vector) |
                        (1u << XENFEAT_hvm_safe_pvclock);
    uint32_t want_clear = (1u << XENFEAT_hvm_pirqs) | (1u << XENFEAT_dom0) |
                          (1u << XENFEAT_supervisor_mode_kernel);
    test_note("features submap 0 = 0x%x", fi.submap);
    check((fi.submap & want_set) == want_set,
          "features: writable_pt, auto_translated, callback_vector, safe_pvclock set",
          "submap 0x%x lacks 0x%x", fi.submap, want_set & ~fi.submap);
    check((fi.submap & want_clear) == 0, "features: hvm_pirqs, dom0, smk clear",
          "submap 0x%x has 0x%x", fi.submap, fi.submap & want_clear);

    /* Only submap 0 exists (XENFEAT_NR_SUBMAPS 1): kernel.c returns -EINVAL. */
    fi.submap_idx = 1;
    check_eq("XENVER_get_features(1) -> -EINVAL",
             HYPERVISOR_xen_version(XENVER_get_features, &fi), -XEN_EINVAL);

    /* XENVER_pagesize: PAGE_SIZE with a NULL argument, -EINVAL with a non-NULL one. */
    check_eq("XENVER_pagesize", HYPERVISOR_xen_version(XENVER_pagesize, NULL), 4096);
    check_eq("XENVER_pagesize with non-NULL arg -> -EINVAL",
             HYPERVISOR_xen_version(XENVER_pagesize, &params), -XEN_EINVAL);

    static uint8_t handle[16];
    check_eq("XENVER_guest_handle rc", HYPERVISOR_xen_version(XENVER_guest_handle, handle), 0);

    /* Unknown sub-command: do_xen_version() falls out of its switch: -ENOSYS. */
    check_eq("XENVER unknown cmd 64 -> -ENOSYS", HYPERVISOR_xen_version(64, NULL),
             -XEN_ENOSYS);

    /* Unmapped guest virtual address: copy_to/from_guest fails: -EFAULT. */
    check_eq("XENVER_extraversion bad pointer -> -EFAULT",
             HYPERVISOR_xen_version(XENVER_extraversion, BAD_PTR), -XEN_EFAULT);
    check_eq("XENVER_compile_info bad pointer -> -EFAULT",
             HYPERVISOR_xen_version(XENVER_compile_info, BAD_PTR), -XEN_EFAULT);
    check_eq("XENVER_get_features bad pointer -> -EFAULT",
             HYPERVISOR_xen_version(XENVER_get_features, BAD_PTR), -XEN_EFAULT);

    /*
     * Hypercall numbers with no HVM handler: hvm_hypercall() returns -ENOSYS
     * for numbers beyond its table and for empty slots (PV-only calls).
     */
    check_eq("hypercall 63 -> -ENOSYS", hypercall(63, 0, 0, 0, 0, 0), -XEN_ENOSYS);
    check_eq("hypercall 1000 -> -ENOSYS", hypercall(1000, 0, 0, 0, 0, 0), -XEN_ENOSYS);
    check_eq("hypercall 1 (mmu_update, PV only) -> -ENOSYS",
             hypercall(__HYPERVISOR_mmu_update, 0, 0, 0, 0, 0), -XEN_ENOSYS);

    /* The direct path still works after the errors. */
    check_eq("XENVER_version again", HYPERVISOR_xen_version(XENVER_version, NULL), ver);
}
