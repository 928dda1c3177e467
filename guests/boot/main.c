/*
 * boot: the PVH boot contract.
 *
 * start_info (public/arch-x86/hvm/start_info.h, docs/misc/pvh.pandoc),
 * command line and module 0, the memory map, ACPI (RSDP -> XSDT -> MADT,
 * FADT -> DSDT), the Xen CPUID leaves (public/arch-x86/cpuid.h) and the
 * absence of the KVM signature.  No hypercall is needed except the final
 * SCHEDOP_shutdown.
 *
 * Host provides (see README.md): vcpus=2, kernel command line
 *   "selftest boot arg=42 vcpus=2", module 0 = the 14 bytes "pyxen-module-0"
 * with module command line "mod0 arg".
 */
#include "arch.h"
#include "lib.h"
#include "rt.h"
#include "test.h"

const char test_area[] = "boot";

#define WANT_CMDLINE    "selftest boot arg=42 vcpus=2"
#define WANT_MODULE     "pyxen-module-0"
#define WANT_MODCMDLINE "mod0 arg"

extern char __image_start[], __image_end[];

static uint8_t sum8(const void *p, size_t n)
{
    const uint8_t *b = p;
    uint8_t s = 0;
    for (size_t i = 0; i < n; i++)
        s += b[i];
    return s;
}

struct acpi_header {
    char sig[4];
    uint32_t length;
    uint8_t revision;
    uint8_t checksum;
    char oem_id[6];
    char oem_table_id[8];
    uint32_t oem_revision;
    uint32_t creator_id;
    uint32_t creator_revision;
} __attribute__((packed));

struct rsdp {
    char sig[8];
    uint8_t checksum;
    char oem_id[6];
    uint8_t revision;
    uint32_t rsdt_address;
    uint32_t length;
    uint64_t xsdt_address;
    uint8_t ext_checksum;
    uint8_t reserved[3];
} __attribute__((packed));

static const struct acpi_header *table_ok(uint64_t addr, const char *sig)
{
    const struct acpi_header *h = (const void *)addr;
    if (!addr || addr >= 0x100000000UL)
        return NULL;
    if (memcmp(h->sig, sig, 4) || h->length < sizeof(*h) || h->length > 0x100000)
        return NULL;
    return h;
}

/* Is [addr, addr+len) inside one memmap entry of the given type? */
static int in_memmap(const struct hvm_memmap_table_entry *mm, unsigned n,
                     uint64_t addr, uint64_t len, uint32_t type)
{
    for (unsigned i = 0; i < n; i++)
        if (mm[i].type == type && addr >= mm[i].addr &&
            addr + len <= mm[i].addr + mm[i].size)
            return 1;
    return 0;
}

static void check_start_info(struct hvm_start_info *si, unsigned *vcpus)
{
    char val[16];

    check_eqx("start_info.magic", si->magic, XEN_HVM_START_MAGIC_VALUE);
    check_eq("start_info.version", si->version, 1);
    check_eqx("start_info.flags (domU: no SIF_PRIVILEGED/INITDOMAIN)", si->flags, 0);
    check((uint64_t)si + sizeof(*si) <= (uint64_t)__image_start ||
          (uint64_t)si >= (uint64_t)__image_end,
          "start_info outside the kernel image", "start_info %p image %p-%p",
          (void *)si, __image_start, __image_end);

    const char *cmdline = (const char *)si->cmdline_paddr;
    if (check(si->cmdline_paddr != 0, "cmdline present", "cmdline_paddr 0")) {
        check(strcmp(cmdline, WANT_CMDLINE) == 0, "cmdline", "got '%s' want '%s'",
              cmdline, WANT_CMDLINE);
        if (cmdline_get(cmdline, "vcpus", val, sizeof(val)) > 0)
            *vcpus = val[0] - '0';
    }

    check_eq("nr_modules", si->nr_modules, 1);
    if (si->nr_modules >= 1 && si->modlist_paddr) {
        const struct hvm_modlist_entry *m = (const void *)si->modlist_paddr;
        check_eq("module0.size", (long)m->size, (long)strlen(WANT_MODULE));
        check(m->size == strlen(WANT_MODULE) &&
              memcmp((const void *)m->paddr, WANT_MODULE, m->size) == 0,
              "module0 content", "module at 0x%lx does not hold '%s'",
              (unsigned long)m->paddr, WANT_MODULE);
        check((m->paddr & 0xFFF) == 0, "module0 page aligned", "paddr 0x%lx",
              (unsigned long)m->paddr);
        check(m->cmdline_paddr &&
              strcmp((const char *)m->cmdline_paddr, WANT_MODCMDLINE) == 0,
              "module0 cmdline", "got '%s' want '%s'",
              m->cmdline_paddr ? (const char *)m->cmdline_paddr : "(none)",
              WANT_MODCMDLINE);
    } else {
        check(0, "modlist present", "modlist_paddr 0x%lx", (unsigned long)si->modlist_paddr);
    }
}

static void check_memmap(struct hvm_start_info *si)
{
    const struct hvm_memmap_table_entry *mm = (const void *)si->memmap_paddr;
    unsigned n = si->memmap_entries;

    if (!check(si->memmap_paddr && n >= 2, "memmap present",
               "memmap_paddr 0x%lx entries %u", (unsigned long)si->memmap_paddr, n))
        return;
    for (unsigned i = 0; i < n; i++)
        test_note("memmap[%u] 0x%lx+0x%lx type %u", i, (unsigned long)mm[i].addr,
                  (unsigned long)mm[i].size, mm[i].type);

    check(mm[0].addr == 0 && mm[0].type == XEN_HVM_MEMMAP_TYPE_RAM,
          "memmap: RAM from 0", "entry0 0x%lx type %u", (unsigned long)mm[0].addr,
          mm[0].type);
    int sorted = 1;
    for (unsigned i = 1; i < n; i++)
        if (mm[i].addr < mm[i - 1].addr + mm[i - 1].size)
            sorted = 0;
    check(sorted, "memmap sorted, no overlap", "entries overlap or unsorted");
    check(in_memmap(mm, n, (uint64_t)__image_start,
                    (uint64_t)__image_end - (uint64_t)__image_start,
                    XEN_HVM_MEMMAP_TYPE_RAM),
          "kernel image in RAM", "image %p-%p not inside a RAM entry",
          __image_start, __image_end);
    check(in_memmap(mm, n, (uint64_t)si, sizeof(*si), XEN_HVM_MEMMAP_TYPE_RAM),
          "start_info in RAM", "start_info %p not inside a RAM entry", (void *)si);
    /* Xen special pages 0xFEFF8000-0xFF000000 (special_pfn(0..7)). */
    check(in_memmap(mm, n, 0xFEFF8000UL, 0x8000, XEN_HVM_MEMMAP_TYPE_RESERVED),
          "memmap: special pages reserved",
          "0xFEFF8000-0xFEFFFFFF not inside one reserved entry");
}

static void check_acpi(struct hvm_start_info *si, unsigned vcpus)
{
    const struct rsdp *r = (const void *)si->rsdp_paddr;

    if (!check(si->rsdp_paddr != 0, "rsdp_paddr", "rsdp_paddr is 0"))
        return;
    if (!check(memcmp(r->sig, "RSD PTR ", 8) == 0, "RSDP signature", "bad signature"))
        return;
    check(sum8(r, 20) == 0, "RSDP checksum", "sum 0x%x", sum8(r, 20));
    check(r->revision >= 2, "RSDP revision >= 2", "revision %u", r->revision);
    check(r->length >= 36 && sum8(r, 36) == 0, "RSDP extended checksum",
          "length %u sum 0x%x", r->length, sum8(r, 36));

    const struct acpi_header *xsdt = table_ok(r->xsdt_address, "XSDT");
    if (!check(xsdt != NULL, "XSDT", "no XSDT at 0x%lx", (unsigned long)r->xsdt_address))
        return;
    check(sum8(xsdt, xsdt->length) == 0, "XSDT checksum", "bad checksum");

    const struct acpi_header *madt = NULL, *fadt = NULL;
    unsigned nent = (xsdt->length - sizeof(*xsdt)) / 8;
    const uint64_t *ent = (const void *)(xsdt + 1);
    for (unsigned i = 0; i < nent; i++) {
        uint64_t a;
        memcpy(&a, &ent[i], 8);
        if (table_ok(a, "APIC"))
            madt = (const void *)a;
        if (table_ok(a, "FACP"))
            fadt = (const void *)a;
    }

    if (check(madt != NULL, "MADT present", "no APIC table in XSDT")) {
        check(sum8(madt, madt->length) == 0, "MADT checksum", "bad checksum");
        uint32_t lapic_addr;
        memcpy(&lapic_addr, (const uint8_t *)madt + 36, 4);
        check_eqx("MADT local APIC address", lapic_addr, 0xFEE00000);
        unsigned count = 0, bad = 0;
        const uint8_t *p = (const uint8_t *)madt + 44;
        const uint8_t *end = (const uint8_t *)madt + madt->length;
        while (p + 2 <= end && p[1] >= 2 && p + p[1] <= end) {
            if (p[0] == 0 && p[1] == 8) {       /* processor local APIC */
                uint32_t flags;
                memcpy(&flags, p + 4, 4);
                test_note("MADT LAPIC uid %u apic id %u flags 0x%x", p[2], p[3], flags);
                if (p[2] != count || p[3] != 2 * count || !(flags & 1))
                    bad++;
                count++;
            }
            p += p[1];
        }
        check_eq("MADT LAPIC entries == vcpus", count, vcpus);
        check(bad == 0, "MADT entry i: uid i, apic id 2i, enabled",
              "%u entries differ", bad);
    }

    if (check(fadt != NULL, "FADT present", "no FACP table in XSDT")) {
        check(sum8(fadt, fadt->length) == 0, "FADT checksum", "bad checksum");
        uint64_t dsdt_addr = 0;
        uint32_t dsdt32;
        memcpy(&dsdt32, (const uint8_t *)fadt + 40, 4);
        if (fadt->length >= 148)
            memcpy(&dsdt_addr, (const uint8_t *)fadt + 140, 8);   /* X_DSDT */
        if (!dsdt_addr)
            dsdt_addr = dsdt32;
        const struct acpi_header *dsdt = table_ok(dsdt_addr, "DSDT");
        if (check(dsdt != NULL, "DSDT present", "no DSDT at 0x%lx",
                  (unsigned long)dsdt_addr)) {
            check(sum8(dsdt, dsdt->length) == 0, "DSDT checksum", "bad checksum");
            check(memmem(dsdt, dsdt->length, "_S5_", 4) != NULL, "DSDT has _S5_",
                  "no _S5_ object");
        }
    }
}

static void check_cpuid(void)
{
    uint32_t a, b, c, d;
    const uint32_t kvm_b = 0x4b4d564b, kvm_c = 0x564b4d56, kvm_d = 0x4d; /* KVMKVMKVM */

    cpuid(1, 0, &a, &b, &c, &d);
    check(c & (1u << 31), "CPUID.1 hypervisor bit", "ecx 0x%x", c);

    cpuid(0x40000000, 0, &a, &b, &c, &d);
    check(b == XEN_CPUID_SIGNATURE_EBX && c == XEN_CPUID_SIGNATURE_ECX &&
          d == XEN_CPUID_SIGNATURE_EDX, "CPUID 0x40000000 XenVMMXenVMM",
          "ebx 0x%x ecx 0x%x edx 0x%x", b, c, d);
    check(a >= 0x40000004 && a < 0x40000100, "CPUID 0x40000000 max leaf >= base+4",
          "eax 0x%x", a);
    cpuid(0x40000100, 0, &a, &b, &c, &d);
    check(!(b == kvm_b && c == kvm_c && d == kvm_d), "no KVM signature at 0x40000100",
          "KVMKVMKVM present");

    uint32_t base = xen_cpuid_base;
    if (!check(base == 0x40000000, "Xen CPUID base 0x40000000", "base 0x%x", base))
        return;
    cpuid(base + 1, 0, &a, &b, &c, &d);
    check((a >> 16) >= 4, "CPUID base+1 version major >= 4", "eax 0x%x", a);
    cpuid(base + 2, 0, &a, &b, &c, &d);
    check(a >= 1 && b != 0, "CPUID base+2 hypercall pages and MSR",
          "eax %u ebx 0x%x", a, b);
    cpuid(base + 4, 0, &a, &b, &c, &d);
    uint32_t need = XEN_HVM_CPUID_VCPU_ID_PRESENT | XEN_HVM_CPUID_DOMID_PRESENT |
                    XEN_HVM_CPUID_UPCALL_VECTOR;
    check((a & need) == need, "CPUID base+4 flags VCPU_ID|DOMID|UPCALL_VECTOR",
          "eax 0x%x", a);
    check_eq("CPUID base+4 EBX vcpu id (BSP)", b, 0);
    check(c >= 1 && c < DOMID_FIRST_RESERVED, "CPUID base+4 ECX domid is a domU id",
          "ecx %u", c);
}

void guest_main(struct hvm_start_info *si)
{
    unsigned vcpus = 0;

    check_start_info(si, &vcpus);
    check(vcpus == 2, "cmdline vcpus=2", "vcpus=%u", vcpus);
    check_memmap(si);
    check_acpi(si, vcpus);
    check_cpuid();
    check_eq("BSP local APIC id", lapic_id(), 0);
}
