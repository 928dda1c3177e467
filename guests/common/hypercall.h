/*
 * Hypercalls, x86-64 Xen ABI: RAX = number, args RDI RSI RDX R10 R8,
 * result in RAX.
 *
 * Direct calls go ONLY through xen_hypercall_amd (VMMCALL) or
 * xen_hypercall_intel (VMCALL) in start.S, chosen by CPUID vendor like
 * Linux's __xen_hypercall_setfunc().  The host traps those two symbols.
 * A debug Xen clobbers the argument registers (hvm/hypercall.c), so they
 * are all treated as clobbered here.
 */
#ifndef GUEST_HYPERCALL_H
#define GUEST_HYPERCALL_H

#include <stdint.h>
#include "xen.h"

extern void *hypercall_fn;      /* xen_hypercall_amd or xen_hypercall_intel */
extern int hypercall_is_amd;
void hypercall_init(void);

static inline long hypercall_via(void *fn, unsigned long nr, unsigned long a1,
                                 unsigned long a2, unsigned long a3,
                                 unsigned long a4, unsigned long a5)
{
    register unsigned long rdi asm("rdi") = a1;
    register unsigned long rsi asm("rsi") = a2;
    register unsigned long rdx asm("rdx") = a3;
    register unsigned long r10 asm("r10") = a4;
    register unsigned long r8 asm("r8") = a5;
    unsigned long rax = nr;

    asm volatile("call *%[fn]"
                 : "+a"(rax), "+r"(rdi), "+r"(rsi), "+r"(rdx), "+r"(r10), "+r"(r8)
                 : [fn] "r"(fn)
                 : "memory", "cc", "rcx", "r9", "r11");
    return (long)rax;
}

static inline long hypercall(unsigned long nr, unsigned long a1, unsigned long a2,
                             unsigned long a3, unsigned long a4, unsigned long a5)
{
    return hypercall_via(hypercall_fn, nr, a1, a2, a3, a4, a5);
}

#define HC_PTR(p) ((unsigned long)(p))

static inline long HYPERVISOR_xen_version(int cmd, void *arg)
{ return hypercall(__HYPERVISOR_xen_version, cmd, HC_PTR(arg), 0, 0, 0); }
static inline long HYPERVISOR_memory_op(unsigned long cmd, void *arg)
{ return hypercall(__HYPERVISOR_memory_op, cmd, HC_PTR(arg), 0, 0, 0); }
static inline long HYPERVISOR_hvm_op(unsigned long op, void *arg)
{ return hypercall(__HYPERVISOR_hvm_op, op, HC_PTR(arg), 0, 0, 0); }
static inline long HYPERVISOR_vcpu_op(int cmd, unsigned vcpu, void *arg)
{ return hypercall(__HYPERVISOR_vcpu_op, cmd, vcpu, HC_PTR(arg), 0, 0); }
static inline long HYPERVISOR_event_channel_op(int cmd, void *arg)
{ return hypercall(__HYPERVISOR_event_channel_op, cmd, HC_PTR(arg), 0, 0, 0); }
static inline long HYPERVISOR_grant_table_op(unsigned cmd, void *uop, unsigned count)
{ return hypercall(__HYPERVISOR_grant_table_op, cmd, HC_PTR(uop), count, 0, 0); }
static inline long HYPERVISOR_sched_op(int cmd, void *arg)
{ return hypercall(__HYPERVISOR_sched_op, cmd, HC_PTR(arg), 0, 0, 0); }
static inline long HYPERVISOR_console_io(int cmd, unsigned count, const void *buf)
{ return hypercall(__HYPERVISOR_console_io, cmd, count, HC_PTR(buf), 0, 0); }

#endif
