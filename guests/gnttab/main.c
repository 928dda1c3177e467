/*
 * gnttab: HYPERVISOR_grant_table_op (20), grant table v1.
 *
 * References: xen/common/grant_table.c do_grant_table_op(),
 * gnttab_query_size(), gnttab_setup_table(), gnttab_set_version(),
 * gnttab_get_version(), gnttab_copy() / gnttab_copy_one() /
 * gnttab_copy_lock_domain() / gnttab_copy_buf() / acquire_grant_for_copy() /
 * _set_status_v1(), gnttab_map_frame(); xen/arch/x86/hvm/hypercall.c
 * hvm_grant_table_op() (HVM command filter); public/grant_table.h.
 */
#include "arch.h"
#include "hypercall.h"
#include "lib.h"
#include "rt.h"
#include "test.h"

const char test_area[] = "gnttab";

#define GNT_GPFN 0xF0000UL      /* grant frame 0 mapped at GPA 0xF0000000 */

static uint8_t src_page[4096] __attribute__((aligned(4096)));
static uint8_t dst_page[4096] __attribute__((aligned(4096)));
static uint8_t back_page[4096] __attribute__((aligned(4096)));
static uint8_t ro_page[4096] __attribute__((aligned(4096)));

static volatile struct grant_entry_v1 *gnttab = (volatile void *)(GNT_GPFN << 12);

static long gop(unsigned cmd, void *arg, unsigned count)
{
    return HYPERVISOR_grant_table_op(cmd, arg, count);
}

static void grant(unsigned ref, uint16_t domid, void *page, uint16_t flags)
{
    gnttab[ref].domid = domid;
    gnttab[ref].frame = (uint32_t)((uint64_t)page >> 12);
    wmb();
    gnttab[ref].flags = flags;
}

/* One copy; returns the hypercall rc, *status the per-op status. */
static long copy1(uint32_t sref_or_gfn, uint16_t sdom, uint16_t soff,
                  uint64_t dref_or_gfn, uint16_t ddom, uint16_t doff,
                  uint16_t len, uint16_t flags, int16_t *status)
{
    struct gnttab_copy c;
    memset(&c, 0, sizeof(c));
    if (flags & GNTCOPY_source_gref)
        c.source.u.ref = sref_or_gfn;
    else
        c.source.u.gmfn = sref_or_gfn;
    c.source.domid = sdom;
    c.source.offset = soff;
    if (flags & GNTCOPY_dest_gref)
        c.dest.u.ref = (uint32_t)dref_or_gfn;
    else
        c.dest.u.gmfn = dref_or_gfn;
    c.dest.domid = ddom;
    c.dest.offset = doff;
    c.len = len;
    c.flags = flags;
    c.status = 0x5555;
    long rc = gop(GNTTABOP_copy, &c, 1);
    *status = c.status;
    return rc;
}

static void check_copy(const char *name, long rc, int16_t status, int16_t want)
{
    check(rc == 0 && status == want, name, "rc %ld status %d want rc 0 status %d", rc,
          status, want);
}

void guest_main(struct hvm_start_info *si)
{
    long rc;
    int16_t st;
    uint64_t gfn_src = (uint64_t)src_page >> 12, gfn_dst = (uint64_t)dst_page >> 12;

    /* ---- sizes and versions ---- */
    struct gnttab_query_size qs = { .dom = DOMID_SELF, .status = 0x55 };
    check_eq("query_size rc", gop(GNTTABOP_query_size, &qs, 1), 0);
    check_eq("query_size status", qs.status, GNTST_okay);
    check(qs.max_nr_frames >= 1 && qs.nr_frames <= qs.max_nr_frames,
          "query_size nr_frames <= max_nr_frames, max >= 1", "nr %u max %u", qs.nr_frames,
          qs.max_nr_frames);
    uint32_t max_frames = qs.max_nr_frames;
    test_note("grant frames %u, max %u", qs.nr_frames, qs.max_nr_frames);
    check_eq("query_size count 2 -> -EINVAL", gop(GNTTABOP_query_size, &qs, 2), -XEN_EINVAL);
    struct gnttab_query_size qb = { .dom = DOMID_INVALID };
    check(gop(GNTTABOP_query_size, &qb, 1) == 0 && qb.status == GNTST_bad_domain,
          "query_size DOMID_INVALID: rc 0, status GNTST_bad_domain", "status %d", qb.status);

    struct gnttab_get_version gv = { .dom = DOMID_SELF, .version = 77 };
    check_eq("get_version rc", gop(GNTTABOP_get_version, &gv, 1), 0);
    check_eq("get_version == 1", gv.version, 1);
    struct gnttab_set_version sv = { .version = 1 };
    check_eq("set_version(1)", gop(GNTTABOP_set_version, &sv, 1), 0);
    check_eq("set_version(1) reports 1", sv.version, 1);
    sv.version = 3;
    check_eq("set_version(3) -> -EINVAL", gop(GNTTABOP_set_version, &sv, 1), -XEN_EINVAL);
    check_eq("set_version(3) writes back the current version", sv.version, 1);
    /*
     * Version 2: pyxen implements v1 only, i.e. Xen with the domain's
     * max_grant_version = 1 (xl.cfg max_grant_version=1, or gnttab=max-ver:1):
     * gnttab_set_version() returns -ENOSYS ("behave as before set_version was
     * introduced") and writes back the current version.
     */
    sv.version = 2;
    check_eq("set_version(2) with max version 1 -> -ENOSYS",
             gop(GNTTABOP_set_version, &sv, 1), -XEN_ENOSYS);
    check_eq("set_version(2) writes back 1", sv.version, 1);
    gv.version = 77;
    gop(GNTTABOP_get_version, &gv, 1);
    check_eq("get_version still 1", gv.version, 1);

    /* ---- map frame 0 and check setup_table ---- */
    struct xen_add_to_physmap xatp = {
        .domid = DOMID_SELF, .space = XENMAPSPACE_grant_table, .idx = 0, .gpfn = GNT_GPFN,
    };
    rc = HYPERVISOR_memory_op(XENMEM_add_to_physmap, &xatp);
    if (!check_eq("add_to_physmap(grant_table, 0, 0xF0000)", rc, 0))
        return;
    xatp.idx = max_frames;
    xatp.gpfn = GNT_GPFN + 1;
    check_eq("add_to_physmap(grant_table, idx max_nr_frames) -> -EINVAL",
             HYPERVISOR_memory_op(XENMEM_add_to_physmap, &xatp), -XEN_EINVAL);

    qs.status = 0x55;
    gop(GNTTABOP_query_size, &qs, 1);
    check(qs.nr_frames >= 1, "query_size nr_frames >= 1 after mapping frame 0", "nr %u",
          qs.nr_frames);

    static uint64_t frames[2];
    frames[0] = frames[1] = 0xAAAA;
    struct gnttab_setup_table stab = { .dom = DOMID_SELF, .nr_frames = 1,
                                       .frame_list = (uint64_t)frames };
    check_eq("setup_table rc", gop(GNTTABOP_setup_table, &stab, 1), 0);
    check_eq("setup_table status", stab.status, GNTST_okay);
    check_eqx("setup_table frame 0 == mapped gpfn", frames[0], GNT_GPFN);
    stab.nr_frames = max_frames + 1;
    check(gop(GNTTABOP_setup_table, &stab, 1) == 0 && stab.status == GNTST_general_error,
          "setup_table nr_frames > max: status GNTST_general_error", "status %d", stab.status);
    check_eq("setup_table count 2 -> -EINVAL", gop(GNTTABOP_setup_table, &stab, 2),
             -XEN_EINVAL);

    /* ---- grants to ourselves (domid from CPUID base+4 ECX) ---- */
    for (unsigned i = 0; i < 4096; i++) {
        src_page[i] = (uint8_t)(i * 7 + 3);
        dst_page[i] = 0;
        back_page[i] = 0;
        ro_page[i] = 0xEE;
    }
    grant(10, my_domid, src_page, GTF_permit_access | GTF_readonly);
    grant(11, my_domid, ro_page, GTF_permit_access | GTF_readonly);
    grant(12, my_domid, back_page, GTF_permit_access);
    grant(14, 0, src_page, GTF_permit_access);          /* granted to dom0, not us */
    gnttab[13].flags = 0;

    /* gref 10 -> local gmfn, 256 bytes at source offset 16, dest offset 32 */
    rc = copy1(10, DOMID_SELF, 16, gfn_dst, DOMID_SELF, 32, 256, GNTCOPY_source_gref, &st);
    check_copy("copy gref -> gmfn", rc, st, GNTST_okay);
    check(memcmp(dst_page + 32, src_page + 16, 256) == 0 && dst_page[31] == 0 &&
          dst_page[288] == 0, "copy gref -> gmfn data", "data mismatch");

    /* local gmfn -> gref 12 (writable grant), full page */
    rc = copy1(gfn_src, DOMID_SELF, 0, 12, DOMID_SELF, 0, 4096, GNTCOPY_dest_gref, &st);
    check_copy("copy gmfn -> gref", rc, st, GNTST_okay);
    check(memcmp(back_page, src_page, 4096) == 0, "copy gmfn -> gref data", "data mismatch");

    /* release_grant_for_copy() drops GTF_reading/GTF_writing again */
    check(gnttab[10].flags == (GTF_permit_access | GTF_readonly) &&
          gnttab[12].flags == GTF_permit_access, "grant flags restored after copies",
          "flags 10: 0x%x 12: 0x%x", gnttab[10].flags, gnttab[12].flags);

    /* ---- copy errors (per-op status, hypercall rc 0) ---- */
    rc = copy1(100000, DOMID_SELF, 0, gfn_dst, DOMID_SELF, 0, 16, GNTCOPY_source_gref, &st);
    check_copy("copy bad gref -> GNTST_bad_gntref", rc, st, GNTST_bad_gntref);
    rc = copy1(13, DOMID_SELF, 0, gfn_dst, DOMID_SELF, 0, 16, GNTCOPY_source_gref, &st);
    check_copy("copy from an ungranted ref -> GNTST_general_error", rc, st,
               GNTST_general_error);
    rc = copy1(14, DOMID_SELF, 0, gfn_dst, DOMID_SELF, 0, 16, GNTCOPY_source_gref, &st);
    check_copy("copy from a grant to another domid -> GNTST_general_error", rc, st,
               GNTST_general_error);
    /* _set_status_v1(): "Attempt to write-pin a r/o grant entry" */
    rc = copy1(gfn_src, DOMID_SELF, 0, 11, DOMID_SELF, 0, 16, GNTCOPY_dest_gref, &st);
    check_copy("copy to a read-only grant -> GNTST_general_error", rc, st,
               GNTST_general_error);
    check(ro_page[0] == 0xEE, "read-only grant page unchanged", "byte 0x%x", ro_page[0]);
    /* gnttab_copy_buf(): offset + len beyond the page */
    rc = copy1(10, DOMID_SELF, 4000, gfn_dst, DOMID_SELF, 0, 200, GNTCOPY_source_gref, &st);
    check_copy("copy crossing the source page -> GNTST_bad_copy_arg", rc, st,
               GNTST_bad_copy_arg);
    rc = copy1(10, DOMID_SELF, 0, gfn_dst, DOMID_SELF, 3900, 200, GNTCOPY_source_gref, &st);
    check_copy("copy crossing the dest page -> GNTST_bad_copy_arg", rc, st,
               GNTST_bad_copy_arg);
    /* gnttab_copy_lock_domain(): only DOMID_SELF may reference a frame directly */
    rc = copy1(gfn_src, my_domid, 0, gfn_dst, DOMID_SELF, 0, 16, 0, &st);
    check_copy("copy by gmfn with a numeric domid -> GNTST_permission_denied", rc, st,
               GNTST_permission_denied);
    rc = copy1(10, DOMID_INVALID, 0, gfn_dst, DOMID_SELF, 0, 16, GNTCOPY_source_gref, &st);
    check_copy("copy from DOMID_INVALID gref -> GNTST_bad_domain", rc, st, GNTST_bad_domain);

    /* A batch: each op gets its own status. */
    static struct gnttab_copy batch[2];
    memset(batch, 0, sizeof(batch));
    batch[0].source.u.ref = 10;
    batch[0].source.domid = DOMID_SELF;
    batch[0].dest.u.gmfn = gfn_dst;
    batch[0].dest.domid = DOMID_SELF;
    batch[0].len = 8;
    batch[0].flags = GNTCOPY_source_gref;
    batch[1] = batch[0];
    batch[1].source.u.ref = 100000;
    batch[0].status = batch[1].status = 0x5555;
    rc = gop(GNTTABOP_copy, batch, 2);
    check(rc == 0 && batch[0].status == GNTST_okay && batch[1].status == GNTST_bad_gntref,
          "copy batch of 2: statuses okay, bad_gntref", "rc %ld status %d %d", rc,
          batch[0].status, batch[1].status);

    check_eq("copy count 0 -> 0", gop(GNTTABOP_copy, batch, 0), 0);
    check_eq("copy count 1 with bad pointer -> -EFAULT", gop(GNTTABOP_copy, BAD_PTR, 1),
             -XEN_EFAULT);

    /* ---- commands outside the HVM whitelist and unknown commands ---- */
    check_eq("GNTTABOP_transfer (not allowed for HVM) -> -ENOSYS",
             gop(GNTTABOP_transfer, batch, 1), -XEN_ENOSYS);
    check_eq("GNTTABOP_get_status_frames (not allowed for HVM) -> -ENOSYS",
             gop(GNTTABOP_get_status_frames, batch, 1), -XEN_ENOSYS);
    check_eq("grant_table_op unknown cmd 99 -> -ENOSYS", gop(99, batch, 1), -XEN_ENOSYS);
}
