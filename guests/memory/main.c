/*
 * memory: HYPERVISOR_memory_op (12).
 *
 * References: xen/common/memory.c do_memory_op(), xenmem_add_to_physmap(),
 * decrease_reservation(), populate_physmap(), increase_reservation();
 * xen/arch/x86/mm/p2m.c xenmem_add_to_physmap_one();
 * xen/arch/x86/mm.c arch_memory_op() (XENMEM_memory_map);
 * xen/arch/x86/hvm/hypercall.c hvm_memory_op() (HVM filter).
 */
#include "arch.h"
#include "hypercall.h"
#include "lib.h"
#include "rt.h"
#include "test.h"

const char test_area[] = "memory";

/* Two pages to give back and take again (decrease/populate). */
static uint8_t balloon[2][4096] __attribute__((aligned(4096)));

static long add_to_physmap(uint16_t domid, uint32_t space, uint64_t idx, uint64_t gpfn)
{
    struct xen_add_to_physmap x = { .domid = domid, .space = space, .idx = idx, .gpfn = gpfn };
    return HYPERVISOR_memory_op(XENMEM_add_to_physmap, &x);
}

static long reservation(unsigned cmd, uint64_t *gfns, uint64_t nr, uint32_t order,
                        uint16_t domid)
{
    struct xen_memory_reservation r = {
        .extent_start = (uint64_t)gfns, .nr_extents = nr,
        .extent_order = order, .domid = domid,
    };
    return HYPERVISOR_memory_op(cmd, &r);
}

static void check_time(void)
{
    volatile struct vcpu_time_info *t = &shinfo->vcpu_info[0].time;

    check((t->version & 1) == 0 && t->version != 0, "vcpu_info[0].time version even, set",
          "version %u", t->version);
    check(t->tsc_to_system_mul != 0, "vcpu_info[0].time tsc_to_system_mul != 0", "mul 0");
    uint64_t t1 = pvclock_read(t);
    for (volatile int i = 0; i < 2000; i++)
        ;
    uint64_t t2 = pvclock_read(t);
    check(t1 > 0 && t2 > t1, "pvclock system_time advances", "t1 %lu t2 %lu", t1, t2);
    test_note("system time %lu ns, mul %u shift %d", t2, t->tsc_to_system_mul, t->tsc_shift);

    check((shinfo->wc_version & 1) == 0, "wc_version even", "wc_version %u",
          shinfo->wc_version);
    check(shinfo->wc_sec > 1600000000u, "wallclock wc_sec plausible (> 1.6e9)",
          "wc_sec %u", shinfo->wc_sec);
    check(shinfo->wc_nsec < 1000000000u, "wallclock wc_nsec < 1e9", "wc_nsec %u",
          shinfo->wc_nsec);
}

static void check_memory_map(struct hvm_start_info *si)
{
    static struct e820entry map[32];
    struct xen_memory_map mm = { .nr_entries = 32, .buffer = (uint64_t)map };
    const struct hvm_memmap_table_entry *sm = (const void *)si->memmap_paddr;

    long rc = HYPERVISOR_memory_op(XENMEM_memory_map, &mm);
    check_eq("XENMEM_memory_map rc", rc, 0);
    check_eq("memory_map entries == start_info memmap_entries", mm.nr_entries,
             si->memmap_entries);
    unsigned diff = 0;
    for (unsigned i = 0; i < mm.nr_entries && i < si->memmap_entries; i++)
        if (map[i].addr != sm[i].addr || map[i].size != sm[i].size ||
            map[i].type != sm[i].type)
            diff++;
    check(diff == 0, "memory_map entries == start_info memmap", "%u entries differ", diff);

    /* A smaller buffer: nr_entries = min(capacity, nr_e820), rc 0. */
    static struct e820entry one[1];
    struct xen_memory_map m1 = { .nr_entries = 1, .buffer = (uint64_t)one };
    check_eq("memory_map capacity 1 rc", HYPERVISOR_memory_op(XENMEM_memory_map, &m1), 0);
    check(m1.nr_entries == 1 && one[0].addr == sm[0].addr && one[0].size == sm[0].size,
          "memory_map capacity 1 returns the first entry", "nr %u addr 0x%lx",
          m1.nr_entries, (unsigned long)one[0].addr);
}

void guest_main(struct hvm_start_info *si)
{
    uint64_t shinfo_gfn = (uint64_t)shinfo_page >> 12;

    /* add_to_physmap error paths first (shared_info not yet mapped). */
    check_eq("add_to_physmap bad space 99 -> -EINVAL (p2m.c: mfn stays INVALID)",
             add_to_physmap(DOMID_SELF, 99, 0, shinfo_gfn), -XEN_EINVAL);
    check_eq("add_to_physmap shared_info idx 1 -> -EINVAL",
             add_to_physmap(DOMID_SELF, XENMAPSPACE_shared_info, 1, shinfo_gfn), -XEN_EINVAL);
    check_eq("add_to_physmap gmfn_foreign -> -ENOSYS (batch only)",
             add_to_physmap(DOMID_SELF, XENMAPSPACE_gmfn_foreign, 0, shinfo_gfn), -XEN_ENOSYS);
    check_eq("add_to_physmap domid DOMID_INVALID -> -ESRCH",
             add_to_physmap(DOMID_INVALID, XENMAPSPACE_shared_info, 0, shinfo_gfn), -XEN_ESRCH);
    check_eq("add_to_physmap bad arg pointer -> -EFAULT",
             HYPERVISOR_memory_op(XENMEM_add_to_physmap, BAD_PTR), -XEN_EFAULT);

    long rc = map_shared_info();
    if (!check_eq("add_to_physmap(shared_info, 0, gpfn)", rc, 0))
        test_abort("no shared_info");
    check_time();

    check_memory_map(si);

    /* Balloon: give back two pages, then take them again. */
    uint64_t gfns[2] = { (uint64_t)balloon[0] >> 12, (uint64_t)balloon[1] >> 12 };
    memset(balloon, 0x5A, sizeof(balloon));
    check_eq("decrease_reservation(2 pages) -> 2",
             reservation(XENMEM_decrease_reservation, gfns, 2, 0, DOMID_SELF), 2);
    /* guest_remove_page() on an empty p2m slot fails: no extent done. */
    check_eq("decrease_reservation of freed gfns -> 0",
             reservation(XENMEM_decrease_reservation, gfns, 2, 0, DOMID_SELF), 0);
    check_eq("populate_physmap(2 pages) -> 2",
             reservation(XENMEM_populate_physmap, gfns, 2, 0, DOMID_SELF), 2);
    int zero = 1;
    const volatile uint8_t *bp = &balloon[0][0];
    for (unsigned i = 0; i < sizeof(balloon); i++)
        if (bp[i])
            zero = 0;
    check(zero, "populated pages read as zero (scrubbed)", "old contents visible");
    volatile uint8_t *last = &balloon[1][4095];
    *last = 0xA7;
    check_eq("populated page is writable RAM", *last, 0xA7);

    /* Errors in the reservation ops return the number of extents done (0). */
    check_eq("increase_reservation nr_extents 0 -> 0",
             reservation(XENMEM_increase_reservation, NULL, 0, 0, DOMID_SELF), 0);
    check_eq("increase_reservation extent_order 20 (> max_order) -> 0",
             reservation(XENMEM_increase_reservation, NULL, 1, 20, DOMID_SELF), 0);
    check_eq("populate_physmap extent_order 20 -> 0",
             reservation(XENMEM_populate_physmap, gfns, 1, 20, DOMID_SELF), 0);
    check_eq("decrease_reservation extent_order 20 -> 0",
             reservation(XENMEM_decrease_reservation, gfns, 1, 20, DOMID_SELF), 0);
    check_eq("decrease_reservation domid DOMID_INVALID -> 0 (no domain)",
             reservation(XENMEM_decrease_reservation, gfns, 1, 0, DOMID_INVALID), 0);
    check_eq("decrease_reservation domid 0 -> 0 (XSM_TARGET denies)",
             reservation(XENMEM_decrease_reservation, gfns, 1, 0, 0), 0);
    check_eq("decrease_reservation bad arg pointer -> 0 (copy fails: start_extent)",
             HYPERVISOR_memory_op(XENMEM_decrease_reservation, BAD_PTR), 0);
    check(bp[0] == 0 && *last == 0xA7, "balloon pages still mapped", "contents changed");

    /* HVM filter and unknown commands. */
    check_eq("machphys_mapping -> -ENOSYS for HVM",
             HYPERVISOR_memory_op(XENMEM_machphys_mapping, balloon[0]), -XEN_ENOSYS);
    check_eq("machine_memory_map -> -ENOSYS for HVM",
             HYPERVISOR_memory_op(XENMEM_machine_memory_map, balloon[0]), -XEN_ENOSYS);
    check_eq("memory_op unknown cmd 63 -> -ENOSYS", HYPERVISOR_memory_op(63, NULL),
             -XEN_ENOSYS);

    /* shared_info still live after all that. */
    check((shinfo->vcpu_info[0].time.version & 1) == 0 && now_ns() > 0,
          "shared_info time still valid", "version %u", shinfo->vcpu_info[0].time.version);
}
