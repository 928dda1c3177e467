#include "hypercall.h"
#include "arch.h"

extern char xen_hypercall_amd[], xen_hypercall_intel[];

void *hypercall_fn = xen_hypercall_intel;
int hypercall_is_amd;

/* Like Linux's __xen_hypercall_setfunc(): AMD and Hygon use VMMCALL. */
void hypercall_init(void)
{
    uint32_t a, b, c, d;

    cpuid(0, 0, &a, &b, &c, &d);
    /* "AuthenticAMD" = b "Auth" d "enti" c "cAMD"; "HygonGenuine" likewise */
    int amd = (b == 0x68747541 && d == 0x69746e65 && c == 0x444d4163);
    int hygon = (b == 0x6f677948 && d == 0x6e65476e && c == 0x656e6975);

    hypercall_is_amd = amd || hygon;
    hypercall_fn = hypercall_is_amd ? (void *)xen_hypercall_amd
                                    : (void *)xen_hypercall_intel;
}
