/*
 * sched: HYPERVISOR_sched_op (29).
 *
 * References: xen/common/sched/core.c do_sched_op(), do_poll() /
 * vcpu_poll(), vcpu_block_enable_events(); xen/common/domain.c
 * domain_shutdown() (uses a code recorded by SCHEDOP_shutdown_code);
 * public/sched.h.
 *
 * Command line: "selftest sched reason=<poweroff|reboot|crash|watchdog|
 * soft_reset|suspend>" (default poweroff).  The RESULT line is printed
 * before the final SCHEDOP_shutdown(reason).  For suspend the host may
 * return 1 (cancelled) from the hypercall: the guest prints "RESUMED 1"
 * and powers off.
 */
#include "arch.h"
#include "hypercall.h"
#include "lib.h"
#include "rt.h"
#include "test.h"

const char test_area[] = "sched";

#define MS 1000000ULL

static const char *const reasons[] = {
    [SHUTDOWN_poweroff] = "poweroff", [SHUTDOWN_reboot] = "reboot",
    [SHUTDOWN_suspend] = "suspend",   [SHUTDOWN_crash] = "crash",
    [SHUTDOWN_watchdog] = "watchdog", [SHUTDOWN_soft_reset] = "soft_reset",
};

static unsigned parse_reason(struct hvm_start_info *si)
{
    char val[16];
    const char *cmdline = si->cmdline_paddr ? (const char *)si->cmdline_paddr : "";

    if (cmdline_get(cmdline, "reason", val, sizeof(val)) <= 0)
        return SHUTDOWN_poweroff;
    for (unsigned r = 0; r < sizeof(reasons) / sizeof(reasons[0]); r++)
        if (strcmp(val, reasons[r]) == 0)
            return r;
    check(0, "reason= on the command line", "unknown reason '%s'", val);
    return SHUTDOWN_poweroff;
}

void guest_main(struct hvm_start_info *si)
{
    unsigned reason = parse_reason(si);
    uint32_t ipi = 0, tport = 0;
    uint64_t t0, t1, deadline;

    test_note("final shutdown reason %s (%u)", reasons[reason], reason);
    check_eq("SCHEDOP_yield", HYPERVISOR_sched_op(SCHEDOP_yield, NULL), 0);

    if (!check_eq("map shared_info", map_shared_info(), 0))
        test_abort("no shared_info");
    check_eq("set_evtchn_upcall_vector(vcpu 0)", set_upcall_vector(0), 0);
    irq_window();
    check_eq("stop_periodic_timer(0)", HYPERVISOR_vcpu_op(VCPUOP_stop_periodic_timer, 0, NULL), 0);
    check_eq("bind_virq(VIRQ_TIMER, 0)", evtchn_bind_virq(VIRQ_TIMER, 0, &tport), 0);
    check_eq("bind_ipi(vcpu 0)", evtchn_bind_ipi(0, &ipi), 0);
    irq_window();

    /*
     * All polls run with interrupts disabled: for HVM, do_poll() returns
     * at once when local_events_need_delivery(), i.e. a deliverable interrupt.
     */

    /* Poll on a pending (masked) port returns at once: pending is what counts. */
    evtchn_set_mask(ipi);
    check_eq("send(ipi) with the port masked", evtchn_send(ipi), 0);
    check(evtchn_is_pending(ipi), "masked ipi port pending", "not pending");
    t0 = now_ns();
    check_eq("poll on a pending port", sched_poll(&ipi, 1, t0 + 2000 * MS), 0);
    t1 = now_ns();
    check(t1 - t0 < 500 * MS, "poll on a pending port returns at once", "took %lu ns",
          t1 - t0);
    evtchn_clear_pending(ipi);

    /* Nothing pending: returns after the (absolute) timeout. */
    t0 = now_ns();
    deadline = t0 + 20 * MS;
    check_eq("poll with timeout, nothing pending", sched_poll(&ipi, 1, deadline), 0);
    t1 = now_ns();
    check(t1 >= deadline && t1 < t0 + 1000 * MS, "poll returns after its timeout",
          "returned %ld ns after the deadline", (long)(t1 - deadline));
    check(!evtchn_is_pending(ipi), "poll timeout: port still idle", "pending");

    /* Woken by an event on a polled port: singleshot timer on VIRQ_TIMER. */
    deadline = now_ns() + 5 * MS;
    check_eq("set_singleshot_timer +5 ms", set_singleshot(0, deadline, 0), 0);
    t0 = now_ns();
    check_eq("poll on the timer port", sched_poll(&tport, 1, t0 + 2000 * MS), 0);
    t1 = now_ns();
    check(evtchn_is_pending(tport) && t1 >= deadline && t1 < t0 + 1000 * MS,
          "poll woken by VIRQ_TIMER", "pending %d after %lu ns", evtchn_is_pending(tport),
          t1 - t0);
    irq_window();

    /* Limits (do_poll: "Fairly arbitrary limit" of 128 ports) and bad pointers. */
    static uint32_t many[129];
    check_eq("poll nr_ports 129 -> -EINVAL", sched_poll(many, 129, 0), -XEN_EINVAL);
    check_eq("poll with bad ports pointer -> -EFAULT", sched_poll(BAD_PTR, 1, now_ns() + MS),
             -XEN_EFAULT);
    check_eq("poll with bad argument pointer -> -EFAULT",
             HYPERVISOR_sched_op(SCHEDOP_poll, BAD_PTR), -XEN_EFAULT);

    /* SCHEDOP_block (IF=0) returns once an event arrives. */
    irq_window();
    deadline = now_ns() + 3 * MS;
    uint64_t hits = port_hits[tport];
    check_eq("set_singleshot_timer +3 ms", set_singleshot(0, deadline, 0), 0);
    check_eq("SCHEDOP_block", HYPERVISOR_sched_op(SCHEDOP_block, NULL), 0);
    t1 = now_ns();
    check(t1 >= deadline, "block returns after the timer event", "%ld ns early",
          (long)(deadline - t1));
    irq_window();
    check(port_hits[tport] > hits, "VIRQ_TIMER delivered after block", "no event");

    /* shutdown_code records the reason used by a later shutdown (domain_shutdown()),
       so record the same reason as the final one. */
    struct sched_shutdown sc = { .reason = reason };
    check_eq("SCHEDOP_shutdown_code", HYPERVISOR_sched_op(SCHEDOP_shutdown_code, &sc), 0);
    check_eq("sched_op unknown cmd 99 -> -ENOSYS", HYPERVISOR_sched_op(99, NULL), -XEN_ENOSYS);

    test_report();
    struct sched_shutdown s = { .reason = reason };
    long rc = HYPERVISOR_sched_op(SCHEDOP_shutdown, &s);
    if (reason == SHUTDOWN_suspend) {
        /* 1: suspend cancelled, same domain (xc_domain_resume); 0: new domain. */
        printf("RESUMED %ld\n", rc);
        shutdown_or_halt(SHUTDOWN_poweroff);
    }
    printf("FAIL %s: shutdown returned\n", test_area);
    halt_forever();
}
