/* x86-64 helpers: port I/O, CPUID, MSRs, control registers, atomics, LAPIC. */
#ifndef GUEST_ARCH_H
#define GUEST_ARCH_H

#include <stdint.h>

#define barrier() asm volatile("" ::: "memory")
/* Full barrier: a locked no-op RMW on the stack (no mfence needed). */
#define mb() asm volatile("lock addl $0,(%%rsp)" ::: "memory", "cc")
/* x86 is TSO: store/load ordering needs only a compiler barrier. */
#define wmb() barrier()
#define rmb() barrier()

static inline void outb(uint16_t port, uint8_t v)
{
    asm volatile("outb %0, %1" :: "a"(v), "Nd"(port));
}

static inline void cpuid(uint32_t leaf, uint32_t sub, uint32_t *a, uint32_t *b,
                         uint32_t *c, uint32_t *d)
{
    asm volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d)
                 : "0"(leaf), "2"(sub));
}

static inline uint64_t rdmsr(uint32_t idx)
{
    uint32_t lo, hi;
    asm volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(idx));
    return ((uint64_t)hi << 32) | lo;
}

static inline void wrmsr(uint32_t idx, uint64_t v)
{
    asm volatile("wrmsr" :: "c"(idx), "a"((uint32_t)v), "d"((uint32_t)(v >> 32))
                 : "memory");
}

static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    asm volatile("rdtsc" : "=a"(lo), "=d"(hi) :: "memory");
    return ((uint64_t)hi << 32) | lo;
}

#define MSR_EFER 0xC0000080

static inline uint64_t read_cr0(void) { uint64_t v; asm volatile("mov %%cr0,%0" : "=r"(v)); return v; }
static inline uint64_t read_cr3(void) { uint64_t v; asm volatile("mov %%cr3,%0" : "=r"(v)); return v; }
static inline uint64_t read_cr4(void) { uint64_t v; asm volatile("mov %%cr4,%0" : "=r"(v)); return v; }

static inline void cli(void) { asm volatile("cli" ::: "memory"); }
static inline void sti(void) { asm volatile("sti" ::: "memory"); }
static inline void cpu_relax(void) { asm volatile("pause" ::: "memory"); }

static inline uint64_t save_flags_cli(void)
{
    uint64_t f;
    asm volatile("pushfq; popq %0; cli" : "=r"(f) :: "memory");
    return f;
}

static inline void restore_flags(uint64_t f)
{
    if (f & (1u << 9))
        sti();
}

static inline __attribute__((noreturn)) void halt_forever(void)
{
    for (;;)
        asm volatile("cli; hlt" ::: "memory");
}

/* Atomics: only 8-byte locked operations (fine on the interpreted CPU). */
static inline void atomic_or64(volatile uint64_t *p, uint64_t v)
{
    asm volatile("lock orq %1, %0" : "+m"(*p) : "r"(v) : "memory", "cc");
}

static inline void atomic_and64(volatile uint64_t *p, uint64_t v)
{
    asm volatile("lock andq %1, %0" : "+m"(*p) : "r"(v) : "memory", "cc");
}

static inline void atomic_inc64(volatile uint64_t *p)
{
    asm volatile("lock incq %0" : "+m"(*p) :: "memory", "cc");
}

static inline uint64_t xchg64(volatile uint64_t *p, uint64_t v)
{
    asm volatile("xchgq %0, %1" : "+r"(v), "+m"(*p) :: "memory");
    return v;
}

/* ---- local APIC (xAPIC MMIO, identity mapped) ---- */
#define LAPIC_BASE      0xFEE00000UL
#define LAPIC_ID        0x020
#define LAPIC_EOI       0x0B0
#define LAPIC_SVR       0x0F0
#define LAPIC_IRR       0x200

static inline uint32_t lapic_read(uint32_t reg)
{
    return *(volatile uint32_t *)(LAPIC_BASE + reg);
}

static inline void lapic_write(uint32_t reg, uint32_t v)
{
    *(volatile uint32_t *)(LAPIC_BASE + reg) = v;
}

static inline uint32_t lapic_id(void) { return lapic_read(LAPIC_ID) >> 24; }
static inline void lapic_eoi(void) { lapic_write(LAPIC_EOI, 0); }

static inline int lapic_irr_pending(unsigned vec)
{
    return (lapic_read(LAPIC_IRR + 0x10 * (vec / 32)) >> (vec % 32)) & 1;
}

#endif
