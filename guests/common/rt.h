/*
 * Guest runtime: per-CPU state, IDT, LAPIC, shared_info, pvclock time,
 * the 2-level event channel upcall handler, wait helpers and AP bring-up.
 */
#ifndef GUEST_RT_H
#define GUEST_RT_H

#include <stdint.h>
#include "xen.h"

#define MAX_CPUS        2
#define STACK_SIZE      16384
#define UPCALL_VECTOR   0xF3
#define SPURIOUS_VECTOR 0xFF
#define PAGE_SIZE       4096UL

/* An unmapped guest virtual address: the page tables map only 0..4 GiB. */
#define BAD_PTR ((void *)0x100000000UL)

struct cpu {
    unsigned vcpu;                      /* Xen vcpu id == index */
    volatile struct vcpu_info *vi;      /* current vcpu_info location */
    volatile uint64_t upcalls;          /* upcall vector deliveries */
    volatile uint64_t events;           /* ports handled by this CPU */
    volatile uint64_t other_irqs;       /* unexpected vectors */
    volatile uint64_t online;           /* set by the CPU once running */
    uint32_t timer_port;                /* VIRQ_TIMER port, 0 = none */
    volatile uint64_t owned[64];        /* event channel ownership bitmap */
};

extern struct cpu cpus[MAX_CPUS];
extern uint8_t cpu_stacks[MAX_CPUS][STACK_SIZE];
extern volatile struct shared_info *shinfo;
extern struct hvm_start_info *start_info;
extern uint16_t my_domid;                   /* from CPUID base+4 ECX */
extern uint32_t xen_cpuid_base;

/* Per-port statistics updated by the upcall handler. */
extern volatile uint64_t port_hits[EVTCHN_2L_NR_CHANNELS];
extern volatile uint8_t port_last_cpu[EVTCHN_2L_NR_CHANNELS];

static inline unsigned this_cpu_id(void)
{
    uint64_t sp;
    asm volatile("mov %%rsp, %0" : "=r"(sp));
    return (unsigned)((sp - (uint64_t)cpu_stacks) / STACK_SIZE);
}
static inline struct cpu *this_cpu(void) { return &cpus[this_cpu_id()]; }

/* Page-aligned scratch pages every guest may use. */
extern uint8_t shinfo_page[4096];
extern uint8_t vcpu_info_page[4096];

/* Xen CPUID leaves: base (0 if absent). */
uint32_t find_xen_cpuid_base(void);

/* Set up IDT (exceptions, upcall, spurious) on this CPU and load it. */
void idt_load(void);
/* Software-enable this CPU's local APIC (SVR |= 0x1FF). */
void lapic_enable(void);

/* XENMEM_add_to_physmap(shared_info) at shinfo_page; returns rc. */
long map_shared_info(void);
/* HVMOP_set_evtchn_upcall_vector(vcpu, UPCALL_VECTOR); returns rc. */
long set_upcall_vector(unsigned vcpu);
/* VCPUOP_register_vcpu_info; updates cpus[vcpu].vi on success. */
long register_vcpu_info(unsigned vcpu, void *page, unsigned offset);

/* pvclock system time (ns) of the calling CPU's vcpu_info. */
uint64_t now_ns(void);
uint64_t pvclock_read(const volatile struct vcpu_time_info *t);

/* Event channel helpers (2-level ABI, shared_info must be mapped). */
int evtchn_is_pending(uint32_t port);
void evtchn_clear_pending(uint32_t port);
int evtchn_is_masked(uint32_t port);
void evtchn_set_mask(uint32_t port);
void evtchn_clear_mask(uint32_t port);
void evtchn_set_owner(uint32_t port, unsigned cpu);

long evtchn_alloc_unbound(uint16_t remote, uint32_t *port);
long evtchn_bind_interdomain(uint16_t rdom, uint32_t rport, uint32_t *lport);
long evtchn_bind_virq(uint32_t virq, uint32_t vcpu, uint32_t *port);
long evtchn_bind_ipi(uint32_t vcpu, uint32_t *port);
long evtchn_send(uint32_t port);
long evtchn_close(uint32_t port);
long evtchn_unmask(uint32_t port);
long evtchn_bind_vcpu(uint32_t port, uint32_t vcpu);
long evtchn_status(uint32_t port, struct evtchn_status *st);

long set_singleshot(unsigned vcpu, uint64_t deadline, uint32_t flags);
long sched_poll(uint32_t *ports, unsigned nr, uint64_t timeout);
long get_hvm_param(uint32_t index, uint64_t *value);

/*
 * Let a pending upcall run: sti, wait (bounded) until the upcall vector
 * has left the LAPIC IRR, cli.  Call with interrupts disabled.
 */
void irq_window(void);
/* Block (IF=0) in SCHEDOP_poll until `port` is pending or `deadline`. */
int wait_port(uint32_t port, uint64_t deadline);
/* Sleep until `deadline` using SCHEDOP_poll (no ports) with timeout. */
void sleep_until(uint64_t deadline);
/* Wait until *v != old or deadline; sleeps in small poll steps. */
int wait_change(volatile uint64_t *v, uint64_t old, uint64_t deadline);

/*
 * Bring up vCPU `vcpu` with VCPUOP_initialise (VCPU_HVM_MODE_64B) and
 * VCPUOP_up.  The AP loads GDT/IDT, enables its LAPIC, registers its
 * vcpu_info at vcpu_info_page + 64*vcpu, calls ap_hook(vcpu) if set,
 * then idles in sti;hlt.  Returns the first failing rc or 0.
 */
extern void (*ap_hook)(unsigned vcpu);
extern volatile long ap_register_rc;
long ap_initialise(unsigned vcpu);
long ap_up(unsigned vcpu);

#endif
