#include "rt.h"
#include "arch.h"
#include "hypercall.h"
#include "lib.h"
#include "test.h"

struct cpu cpus[MAX_CPUS];
uint8_t cpu_stacks[MAX_CPUS][STACK_SIZE] __attribute__((aligned(4096)));
volatile struct shared_info *shinfo;
struct hvm_start_info *start_info;
uint16_t my_domid;
uint32_t xen_cpuid_base;

volatile uint64_t port_hits[EVTCHN_2L_NR_CHANNELS];
volatile uint8_t port_last_cpu[EVTCHN_2L_NR_CHANNELS];

uint8_t shinfo_page[4096] __attribute__((aligned(4096)));
uint8_t vcpu_info_page[4096] __attribute__((aligned(4096)));

void (*ap_hook)(unsigned vcpu);
volatile long ap_register_rc = 1;

void guest_main(struct hvm_start_info *si);

/* ---- IDT ----------------------------------------------------------------- */

struct idt_entry {
    uint16_t off_lo;
    uint16_t sel;
    uint8_t ist;
    uint8_t type;
    uint16_t off_mid;
    uint32_t off_hi;
    uint32_t zero;
} __attribute__((packed));

static struct idt_entry idt[256] __attribute__((aligned(16)));
static volatile uint64_t idt_built;

extern uint64_t exc_table[32];
extern char upcall_entry[], spurious_entry[], irq_other_entry[];

static void idt_set(unsigned vec, void *handler)
{
    uint64_t a = (uint64_t)handler;
    idt[vec].off_lo = a & 0xFFFF;
    idt[vec].sel = 0x08;
    idt[vec].ist = 0;
    idt[vec].type = 0x8E;               /* present, DPL0, 64-bit interrupt gate */
    idt[vec].off_mid = (a >> 16) & 0xFFFF;
    idt[vec].off_hi = a >> 32;
    idt[vec].zero = 0;
}

void idt_load(void)
{
    struct {
        uint16_t limit;
        uint64_t base;
    } __attribute__((packed)) desc = { sizeof(idt) - 1, (uint64_t)idt };

    if (!xchg64(&idt_built, 1)) {
        for (unsigned v = 0; v < 256; v++)
            idt_set(v, irq_other_entry);
        for (unsigned v = 0; v < 32; v++)
            idt_set(v, (void *)exc_table[v]);
        idt_set(UPCALL_VECTOR, upcall_entry);
        idt_set(SPURIOUS_VECTOR, spurious_entry);
    }
    asm volatile("lidt %0" :: "m"(desc) : "memory");
}

struct exc_frame {
    uint64_t r15, r14, r13, r12, r11, r10, r9, r8;
    uint64_t rdi, rsi, rbp, rbx, rdx, rcx, rax;
    uint64_t vec, err, rip, cs, rflags, rsp, ss;
};

void exception_c(struct exc_frame *f)
{
    uint64_t cr2;
    asm volatile("mov %%cr2, %0" : "=r"(cr2));
    test_abort("cpu%u exception %lu err=0x%lx rip=0x%lx cr2=0x%lx rsp=0x%lx",
               this_cpu_id(), f->vec, f->err, f->rip, cr2, f->rsp);
}

void irq_other_c(void)
{
    atomic_inc64(&this_cpu()->other_irqs);
    lapic_eoi();
}

/*
 * The upcall, as Linux's 2-level handler does it: clear upcall_pending,
 * xchg pending_sel to 0, and for each selected word handle
 * pending & ~mask (restricted to the ports this CPU owns), clearing the
 * pending bits it handles.  Then EOI the LAPIC.
 */
void upcall_handler_c(void)
{
    unsigned cpu = this_cpu_id();
    struct cpu *c = &cpus[cpu];
    volatile struct vcpu_info *vi = c->vi;

    atomic_inc64(&c->upcalls);
    if (vi && shinfo) {
        for (int round = 0; round < 8; round++) {
            vi->evtchn_upcall_pending = 0;
            barrier();
            uint64_t sel = xchg64(&vi->evtchn_pending_sel, 0);
            for (unsigned w = 0; sel; w++, sel >>= 1) {
                if (!(sel & 1))
                    continue;
                uint64_t pend = shinfo->evtchn_pending[w] &
                                ~shinfo->evtchn_mask[w] & c->owned[w];
                if (!pend)
                    continue;
                atomic_and64(&shinfo->evtchn_pending[w], ~pend);
                for (unsigned b = 0; pend; b++, pend >>= 1) {
                    if (!(pend & 1))
                        continue;
                    unsigned port = w * 64 + b;
                    atomic_inc64(&port_hits[port]);
                    port_last_cpu[port] = (uint8_t)cpu;
                    atomic_inc64(&c->events);
                }
            }
            barrier();
            if (!vi->evtchn_upcall_pending)
                break;
        }
    }
    lapic_eoi();
}

void lapic_enable(void)
{
    lapic_write(LAPIC_SVR, lapic_read(LAPIC_SVR) | 0x1FF);
}

/* ---- CPUID ---------------------------------------------------------------- */

uint32_t find_xen_cpuid_base(void)
{
    uint32_t a, b, c, d;
    for (uint32_t base = 0x40000000; base < 0x40010000; base += 0x100) {
        cpuid(base, 0, &a, &b, &c, &d);
        if (b == XEN_CPUID_SIGNATURE_EBX && c == XEN_CPUID_SIGNATURE_ECX &&
            d == XEN_CPUID_SIGNATURE_EDX && a - base >= 2)
            return base;
    }
    return 0;
}

/* ---- entry ---------------------------------------------------------------- */

void rt_entry(struct hvm_start_info *si)
{
    uint32_t a, b, c, d;

    start_info = si;
    cpus[0].vcpu = 0;
    cpus[0].online = 1;
    for (unsigned w = 0; w < 64; w++)
        cpus[0].owned[w] = ~0UL;

    hypercall_init();
    idt_load();
    lapic_enable();
    xen_cpuid_base = find_xen_cpuid_base();
    if (xen_cpuid_base) {
        cpuid(xen_cpuid_base + 4, 0, &a, &b, &c, &d);
        if (a & XEN_HVM_CPUID_DOMID_PRESENT)
            my_domid = (uint16_t)c;
    }
    printf("# %s: start (%s, start_info %p, domid %u)\n", test_area,
           hypercall_is_amd ? "vmmcall" : "vmcall", (void *)si, my_domid);
    guest_main(si);
    test_done();
}

/* ---- Xen helpers ---------------------------------------------------------- */

long map_shared_info(void)
{
    struct xen_add_to_physmap xatp = {
        .domid = DOMID_SELF,
        .space = XENMAPSPACE_shared_info,
        .idx = 0,
        .gpfn = (uint64_t)shinfo_page >> 12,
    };
    long rc = HYPERVISOR_memory_op(XENMEM_add_to_physmap, &xatp);
    if (rc == 0) {
        shinfo = (volatile struct shared_info *)shinfo_page;
        for (unsigned i = 0; i < MAX_CPUS; i++)
            if (!cpus[i].vi)
                cpus[i].vi = &shinfo->vcpu_info[i];
    }
    return rc;
}

long set_upcall_vector(unsigned vcpu)
{
    struct xen_hvm_evtchn_upcall_vector op = { .vcpu = vcpu, .vector = UPCALL_VECTOR };
    return HYPERVISOR_hvm_op(HVMOP_set_evtchn_upcall_vector, &op);
}

long register_vcpu_info(unsigned vcpu, void *page, unsigned offset)
{
    struct vcpu_register_vcpu_info info = {
        .mfn = (uint64_t)page >> 12,
        .offset = offset,
    };
    long rc = HYPERVISOR_vcpu_op(VCPUOP_register_vcpu_info, vcpu, &info);
    if (rc == 0 && vcpu < MAX_CPUS)
        cpus[vcpu].vi = (volatile struct vcpu_info *)((uint8_t *)page + offset);
    return rc;
}

uint64_t pvclock_read(const volatile struct vcpu_time_info *t)
{
    uint32_t ver;
    uint64_t tsc_ts, sys, delta;
    uint32_t mul;
    int8_t shift;

    for (int tries = 0; tries < 1000; tries++) {
        ver = t->version;
        rmb();
        tsc_ts = t->tsc_timestamp;
        sys = t->system_time;
        mul = t->tsc_to_system_mul;
        shift = t->tsc_shift;
        rmb();
        if (!(ver & 1) && ver == t->version)
            break;
    }
    uint64_t tsc = rdtsc();
    delta = tsc > tsc_ts ? tsc - tsc_ts : 0;
    if (shift < 0)
        delta >>= -shift;
    else
        delta <<= shift;
    return sys + (uint64_t)(((unsigned __int128)delta * mul) >> 32);
}

uint64_t now_ns(void)
{
    volatile struct vcpu_info *vi = this_cpu()->vi;
    if (!vi)
        return 0;
    return pvclock_read(&vi->time);
}

/* ---- event channels ------------------------------------------------------- */

int evtchn_is_pending(uint32_t port)
{
    return (shinfo->evtchn_pending[port / 64] >> (port % 64)) & 1;
}

void evtchn_clear_pending(uint32_t port)
{
    atomic_and64(&shinfo->evtchn_pending[port / 64], ~(1UL << (port % 64)));
}

int evtchn_is_masked(uint32_t port)
{
    return (shinfo->evtchn_mask[port / 64] >> (port % 64)) & 1;
}

void evtchn_set_mask(uint32_t port)
{
    atomic_or64(&shinfo->evtchn_mask[port / 64], 1UL << (port % 64));
}

void evtchn_clear_mask(uint32_t port)
{
    atomic_and64(&shinfo->evtchn_mask[port / 64], ~(1UL << (port % 64)));
}

void evtchn_set_owner(uint32_t port, unsigned cpu)
{
    for (unsigned i = 0; i < MAX_CPUS; i++) {
        if (i == cpu)
            atomic_or64(&cpus[i].owned[port / 64], 1UL << (port % 64));
        else
            atomic_and64(&cpus[i].owned[port / 64], ~(1UL << (port % 64)));
    }
}

long evtchn_alloc_unbound(uint16_t remote, uint32_t *port)
{
    struct evtchn_alloc_unbound op = { .dom = DOMID_SELF, .remote_dom = remote };
    long rc = HYPERVISOR_event_channel_op(EVTCHNOP_alloc_unbound, &op);
    *port = op.port;
    return rc;
}

long evtchn_bind_interdomain(uint16_t rdom, uint32_t rport, uint32_t *lport)
{
    struct evtchn_bind_interdomain op = { .remote_dom = rdom, .remote_port = rport };
    long rc = HYPERVISOR_event_channel_op(EVTCHNOP_bind_interdomain, &op);
    *lport = op.local_port;
    return rc;
}

long evtchn_bind_virq(uint32_t virq, uint32_t vcpu, uint32_t *port)
{
    struct evtchn_bind_virq op = { .virq = virq, .vcpu = vcpu };
    long rc = HYPERVISOR_event_channel_op(EVTCHNOP_bind_virq, &op);
    *port = op.port;
    return rc;
}

long evtchn_bind_ipi(uint32_t vcpu, uint32_t *port)
{
    struct evtchn_bind_ipi op = { .vcpu = vcpu };
    long rc = HYPERVISOR_event_channel_op(EVTCHNOP_bind_ipi, &op);
    *port = op.port;
    return rc;
}

long evtchn_send(uint32_t port)
{
    struct evtchn_port_op op = { .port = port };
    return HYPERVISOR_event_channel_op(EVTCHNOP_send, &op);
}

long evtchn_close(uint32_t port)
{
    struct evtchn_port_op op = { .port = port };
    return HYPERVISOR_event_channel_op(EVTCHNOP_close, &op);
}

long evtchn_unmask(uint32_t port)
{
    struct evtchn_port_op op = { .port = port };
    return HYPERVISOR_event_channel_op(EVTCHNOP_unmask, &op);
}

long evtchn_bind_vcpu(uint32_t port, uint32_t vcpu)
{
    struct evtchn_bind_vcpu op = { .port = port, .vcpu = vcpu };
    return HYPERVISOR_event_channel_op(EVTCHNOP_bind_vcpu, &op);
}

long evtchn_status(uint32_t port, struct evtchn_status *st)
{
    memset(st, 0xAA, sizeof(*st));
    st->dom = DOMID_SELF;
    st->port = port;
    return HYPERVISOR_event_channel_op(EVTCHNOP_status, st);
}

long set_singleshot(unsigned vcpu, uint64_t deadline, uint32_t flags)
{
    struct vcpu_set_singleshot_timer t = { .timeout_abs_ns = deadline, .flags = flags };
    return HYPERVISOR_vcpu_op(VCPUOP_set_singleshot_timer, vcpu, &t);
}

long sched_poll(uint32_t *ports, unsigned nr, uint64_t timeout)
{
    struct sched_poll p = { .ports = (uint64_t)ports, .nr_ports = nr, .timeout = timeout };
    return HYPERVISOR_sched_op(SCHEDOP_poll, &p);
}

long get_hvm_param(uint32_t index, uint64_t *value)
{
    struct xen_hvm_param p = { .domid = DOMID_SELF, .index = index };
    long rc = HYPERVISOR_hvm_op(HVMOP_get_param, &p);
    *value = p.value;
    return rc;
}

/* ---- waiting ------------------------------------------------------------- */

void irq_window(void)
{
    struct cpu *c = this_cpu();
    uint64_t before = c->upcalls;
    uint64_t deadline = c->vi ? now_ns() + 5000000 : 0;

    sti();
    for (unsigned i = 0; i < 100000; i++) {
        cpu_relax();
        if (c->upcalls != before && !lapic_irr_pending(UPCALL_VECTOR))
            break;
        if ((i & 31) == 31 && deadline && now_ns() > deadline)
            break;
    }
    cli();
}

int wait_port(uint32_t port, uint64_t deadline)
{
    for (;;) {
        if (evtchn_is_pending(port))
            return 1;
        if (now_ns() >= deadline)
            return 0;
        sched_poll(&port, 1, deadline);
    }
}

void sleep_until(uint64_t deadline)
{
    while (now_ns() < deadline)
        sched_poll(NULL, 0, deadline);
}

int wait_change(volatile uint64_t *v, uint64_t old, uint64_t deadline)
{
    for (;;) {
        if (*v != old)
            return 1;
        uint64_t n = now_ns();
        if (n >= deadline)
            return 0;
        uint64_t step = n + 1000000;
        sched_poll(NULL, 0, step < deadline ? step : deadline);
    }
}

/* ---- AP bring-up ---------------------------------------------------------- */

extern char ap_entry64[];

long ap_initialise(unsigned vcpu)
{
    struct vcpu_hvm_context ctx;

    memset(&ctx, 0, sizeof(ctx));
    ctx.mode = VCPU_HVM_MODE_64B;
    ctx.cpu_regs.x86_64.rip = (uint64_t)ap_entry64;
    ctx.cpu_regs.x86_64.rsp = (uint64_t)&cpu_stacks[vcpu][STACK_SIZE];
    ctx.cpu_regs.x86_64.rdi = vcpu;
    ctx.cpu_regs.x86_64.rflags = 0x2;
    ctx.cpu_regs.x86_64.cr0 = read_cr0();
    ctx.cpu_regs.x86_64.cr3 = read_cr3();
    ctx.cpu_regs.x86_64.cr4 = read_cr4();
    ctx.cpu_regs.x86_64.efer = rdmsr(MSR_EFER);
    if (vcpu < MAX_CPUS) {
        cpus[vcpu].vcpu = vcpu;
        if (!cpus[vcpu].vi && shinfo)
            cpus[vcpu].vi = &shinfo->vcpu_info[vcpu];
    }
    return HYPERVISOR_vcpu_op(VCPUOP_initialise, vcpu, &ctx);
}

long ap_up(unsigned vcpu)
{
    return HYPERVISOR_vcpu_op(VCPUOP_up, vcpu, NULL);
}

/* Called from ap_entry64 (start.S) with the stack set up by VCPUOP_initialise. */
void ap_entry_c(unsigned vcpu)
{
    struct cpu *c = this_cpu();

    idt_load();
    lapic_enable();
    ap_register_rc = register_vcpu_info(vcpu, vcpu_info_page, 64 * vcpu);
    c->online = 1;
    if (ap_hook)
        ap_hook(vcpu);
    for (;;)
        asm volatile("sti; hlt; cli" ::: "memory");
}
