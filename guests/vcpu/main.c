/*
 * vcpu: HYPERVISOR_vcpu_op (24), booted with 2 vCPUs.
 *
 * References: xen/common/domain.c common_vcpu_op(), map_guest_area(),
 * vcpu_info_populate(); xen/arch/x86/domain.c do_vcpu_op() (-ENOENT for an
 * unknown vCPU), arch_initialise_vcpu(); xen/arch/x86/hvm/domain.c
 * arch_set_info_hvm_guest(); public/vcpu.h, public/hvm/hvm_vcpu.h.
 */
#include "arch.h"
#include "hypercall.h"
#include "lib.h"
#include "rt.h"
#include "test.h"

const char test_area[] = "vcpu";

#define MS 1000000ULL

static struct vcpu_runstate_info rs0, rs1;

/* Results reported by the AP (vCPU 1). */
static volatile uint64_t ap_cpuid_vcpu = ~0UL, ap_lapic = ~0UL, ap_upcalls;
static volatile uint64_t ap_timer_rc = 1, ap_timer_hits, ap_is_up = ~0UL;
static volatile uint64_t ap_stage, ap_go_down, ap_down_rc = 1;
static uint32_t ap_timer_port;

static long vcpu_op(int cmd, unsigned vcpu, void *arg)
{
    return HYPERVISOR_vcpu_op(cmd, vcpu, arg);
}

static void ap_tests(unsigned vcpu)
{
    uint32_t a, b, c, d;

    cpuid(xen_cpuid_base + 4, 0, &a, &b, &c, &d);
    ap_cpuid_vcpu = b;
    ap_lapic = lapic_id();
    /* register_vcpu_info (done in ap_entry_c) marked events pending: take the upcall. */
    irq_window();
    ap_upcalls = cpus[vcpu].upcalls;
    ap_is_up = vcpu_op(VCPUOP_is_up, vcpu, NULL);

    /* A singleshot timer on this vCPU (VIRQ_TIMER bound to vCPU 1 by the BSP). */
    uint64_t deadline = now_ns() + 2 * MS;
    ap_timer_rc = set_singleshot(vcpu, deadline, 0);
    wait_port(ap_timer_port, now_ns() + 1000 * MS);
    irq_window();
    ap_timer_hits = port_hits[ap_timer_port];
    ap_stage = 1;

    /* Wait for the BSP, then take ourselves down; VCPUOP_up resumes us here. */
    while (!ap_go_down)
        sched_poll(NULL, 0, now_ns() + 1 * MS);
    ap_down_rc = vcpu_op(VCPUOP_down, vcpu, NULL);
    ap_stage = 2;
}

static void test_register_vcpu_info(void)
{
    struct cpu *c = &cpus[0];

    /* Error paths first: once registered, the -EBUSY check comes first. */
    check_eq("register_vcpu_info offset 4064 (crosses page) -> -ENXIO",
             register_vcpu_info(0, vcpu_info_page, 4064), -XEN_ENXIO);
    check_eq("register_vcpu_info offset 4096 (gfn changes) -> -EINVAL",
             register_vcpu_info(0, vcpu_info_page, 4096), -XEN_EINVAL);
    check_eq("register_vcpu_info offset 4 (misaligned) -> -ENXIO",
             register_vcpu_info(0, vcpu_info_page, 4), -XEN_ENXIO);
    check(c->vi == &shinfo->vcpu_info[0], "failed registrations keep shared_info slot",
          "vi moved");

    memset(vcpu_info_page, 0, 64);
    uint64_t before = c->upcalls;
    if (!check_eq("register_vcpu_info(0, page, 0)", register_vcpu_info(0, vcpu_info_page, 0), 0))
        return;
    volatile struct vcpu_info *vi = (volatile struct vcpu_info *)vcpu_info_page;
    /* map_guest_area(): populate copies, then pending_sel = ~0, upcall_pending = 1. */
    check(vi->time.version != 0 && !(vi->time.version & 1) && vi->time.tsc_to_system_mul,
          "new vcpu_info has valid time at once", "version %u mul %u", vi->time.version,
          vi->time.tsc_to_system_mul);
    check(vi->evtchn_upcall_pending == 1, "new vcpu_info: evtchn_upcall_pending = 1",
          "got %u", vi->evtchn_upcall_pending);
    check_eqx("new vcpu_info: evtchn_pending_sel = ~0", vi->evtchn_pending_sel, ~0UL);
    irq_window();
    check(c->upcalls > before, "upcall after register_vcpu_info", "no upcall");

    check_eq("register_vcpu_info again -> -EBUSY",
             register_vcpu_info(0, vcpu_info_page, 0), -XEN_EBUSY);
    check_eq("register_vcpu_info again elsewhere -> -EBUSY",
             register_vcpu_info(0, vcpu_info_page, 128), -XEN_EBUSY);
    c->vi = vi;     /* the failed call above must not have moved it */

    uint64_t t1 = now_ns();
    sleep_until(t1 + 1 * MS);
    uint64_t t2 = now_ns();
    check(t2 >= t1 + 1 * MS, "time advances in the registered vcpu_info", "t1 %lu t2 %lu",
          t1, t2);
}

static void test_timers(uint32_t tport)
{
    uint64_t hits, now, deadline;

    /* As Linux's xen_time_init(): no periodic tick on VIRQ_TIMER from here on. */
    check_eq("stop_periodic_timer(0)", vcpu_op(VCPUOP_stop_periodic_timer, 0, NULL), 0);
    irq_window();

    check_eq("set_periodic_timer 100 us -> -EINVAL (< 1 ms)",
             vcpu_op(VCPUOP_set_periodic_timer, 0,
                     &(struct vcpu_set_periodic_timer){ .period_ns = 100000 }),
             -XEN_EINVAL);

    /* Singleshot 2 ms ahead: VIRQ_TIMER arrives, not before the deadline. */
    hits = port_hits[tport];
    deadline = now_ns() + 2 * MS;
    check_eq("set_singleshot_timer +2 ms", set_singleshot(0, deadline, 0), 0);
    int fired = wait_port(tport, now_ns() + 1000 * MS);
    now = now_ns();
    check(fired, "singleshot timer fires (VIRQ_TIMER pending)", "nothing within 1 s");
    check(!fired || now >= deadline, "singleshot timer not early", "%lu ns early",
          deadline - now);
    irq_window();
    check(port_hits[tport] > hits, "VIRQ_TIMER delivered through the upcall",
          "hits %lu", port_hits[tport]);

    /*
     * A deadline in the past with VCPU_SSHOTTMR_future: Xen >= 4.18 ignores
     * the flag (commit 19c6cbd90965 "xen/vcpu: ignore VCPU_SSHOTTMR_future");
     * common_vcpu_op() sends the timer event at once and returns 0.
     */
    hits = port_hits[tport];
    check_eq("singleshot in the past with VCPU_SSHOTTMR_future -> 0",
             set_singleshot(0, now_ns() - 1 * MS, VCPU_SSHOTTMR_future), 0);
    check(evtchn_is_pending(tport), "past singleshot: VIRQ_TIMER pending at once",
          "not pending");
    irq_window();
    check(port_hits[tport] > hits, "past singleshot delivered", "no upcall");

    /* stop_singleshot_timer cancels. */
    check_eq("set_singleshot_timer +5 ms", set_singleshot(0, now_ns() + 5 * MS, 0), 0);
    check_eq("stop_singleshot_timer", vcpu_op(VCPUOP_stop_singleshot_timer, 0, NULL), 0);
    hits = port_hits[tport];
    sleep_until(now_ns() + 15 * MS);
    irq_window();
    check(!evtchn_is_pending(tport) && port_hits[tport] == hits,
          "stopped singleshot does not fire", "VIRQ_TIMER arrived");

    /* Only the calling vCPU's singleshot timer can be set or stopped. */
    check_eq("set_singleshot_timer for vcpu 1 from vcpu 0 -> -EINVAL",
             set_singleshot(1, now_ns() + 1 * MS, 0), -XEN_EINVAL);
    check_eq("stop_singleshot_timer for vcpu 1 -> -EINVAL",
             vcpu_op(VCPUOP_stop_singleshot_timer, 1, NULL), -XEN_EINVAL);

    /* Periodic 1 ms: at least 3 ticks, then stop. */
    hits = port_hits[tport];
    check_eq("set_periodic_timer 1 ms",
             vcpu_op(VCPUOP_set_periodic_timer, 0,
                     &(struct vcpu_set_periodic_timer){ .period_ns = 1 * MS }), 0);
    deadline = now_ns() + 500 * MS;
    while (port_hits[tport] < hits + 3 && now_ns() < deadline) {
        if (wait_port(tport, deadline))
            irq_window();
    }
    check(port_hits[tport] >= hits + 3, "periodic timer fires >= 3 times in 500 ms",
          "%lu ticks", port_hits[tport] - hits);
    check_eq("stop_periodic_timer", vcpu_op(VCPUOP_stop_periodic_timer, 0, NULL), 0);
    sleep_until(now_ns() + 2 * MS);
    irq_window();               /* a tick already in flight */
    hits = port_hits[tport];
    sleep_until(now_ns() + 10 * MS);
    irq_window();
    check(port_hits[tport] == hits && !evtchn_is_pending(tport),
          "no ticks after stop_periodic_timer", "%lu more", port_hits[tport] - hits);
}

static void test_bringup(void)
{
    long rc;

    check_eq("VCPUOP_up(1) before initialise -> -EINVAL", vcpu_op(VCPUOP_up, 1, NULL),
             -XEN_EINVAL);
    check_eq("set_evtchn_upcall_vector(vcpu 1)", set_upcall_vector(1), 0);
    check_eq("bind_virq(VIRQ_TIMER, vcpu 1)", evtchn_bind_virq(VIRQ_TIMER, 1, &ap_timer_port), 0);
    evtchn_set_owner(ap_timer_port, 1);

    ap_hook = ap_tests;
    check_eq("VCPUOP_initialise(1) 64-bit context", ap_initialise(1), 0);
    check_eq("VCPUOP_initialise(1) again -> -EEXIST", ap_initialise(1), -XEN_EEXIST);
    check_eq("VCPUOP_initialise(0) (running) -> -EEXIST", ap_initialise(0), -XEN_EEXIST);
    check_eq("is_up(1) after initialise, before up", vcpu_op(VCPUOP_is_up, 1, NULL), 0);

    rc = vcpu_op(VCPUOP_up, 1, NULL);
    check_eq("VCPUOP_up(1)", rc, 0);
    if (rc)
        return;
    uint64_t deadline = now_ns() + 3000 * MS;
    check(wait_change(&ap_stage, 0, deadline), "AP (vcpu 1) runs its tests",
          "online %lu stage %lu", cpus[1].online, ap_stage);
    check_eq("AP registered its own vcpu_info", ap_register_rc, 0);
    check_eq("AP: CPUID base+4 EBX (vcpu id)", (long)ap_cpuid_vcpu, 1);
    check_eq("AP: local APIC id (2 * vcpu)", (long)ap_lapic, 2);
    check(ap_upcalls >= 1, "AP: upcall after its register_vcpu_info", "upcalls %lu",
          ap_upcalls);
    check_eq("AP: is_up(1) from vcpu 1", (long)ap_is_up, 1);
    check_eq("AP: set_singleshot_timer on itself", (long)ap_timer_rc, 0);
    check(ap_timer_hits >= 1 && port_last_cpu[ap_timer_port] == 1,
          "AP: its VIRQ_TIMER handled on vcpu 1", "hits %lu cpu %u", ap_timer_hits,
          port_last_cpu[ap_timer_port]);
    check_eq("is_up(1) after up", vcpu_op(VCPUOP_is_up, 1, NULL), 1);
    check_eq("VCPUOP_up(1) while up -> 0", vcpu_op(VCPUOP_up, 1, NULL), 0);

    /* The AP takes itself down (VCPUOP_down); VCPUOP_up resumes it. */
    ap_go_down = 1;
    deadline = now_ns() + 2000 * MS;
    while ((rc = vcpu_op(VCPUOP_is_up, 1, NULL)) != 0 && now_ns() < deadline)
        sleep_until(now_ns() + 1 * MS);
    check_eq("is_up(1) after the AP's VCPUOP_down", rc, 0);
    check_eq("VCPUOP_up(1) again", vcpu_op(VCPUOP_up, 1, NULL), 0);
    check(wait_change(&ap_stage, 1, now_ns() + 2000 * MS) && ap_stage == 2,
          "AP resumes after VCPUOP_down/VCPUOP_up", "stage %lu", ap_stage);
    check_eq("AP: VCPUOP_down returned 0 on resume", (long)ap_down_rc, 0);
}

void guest_main(struct hvm_start_info *si)
{
    uint32_t tport;

    if (!check_eq("map shared_info", map_shared_info(), 0))
        return;
    check_eq("set_evtchn_upcall_vector(vcpu 0)", set_upcall_vector(0), 0);
    irq_window();

    check_eq("is_up(0)", vcpu_op(VCPUOP_is_up, 0, NULL), 1);
    check_eq("is_up(1) before bring-up", vcpu_op(VCPUOP_is_up, 1, NULL), 0);
    check_eq("is_up(99) -> -ENOENT", vcpu_op(VCPUOP_is_up, 99, NULL), -XEN_ENOENT);
    check_eq("vcpu_op unknown cmd 99 -> -ENOSYS", vcpu_op(99, 0, NULL), -XEN_ENOSYS);

    test_register_vcpu_info();

    memset(&rs0, 0xFF, sizeof(rs0));
    check_eq("register_runstate_memory_area(0)",
             vcpu_op(VCPUOP_register_runstate_memory_area, 0,
                     &(struct vcpu_register_runstate_memory_area){ (uint64_t)&rs0 }), 0);
    check_eq("runstate(0).state == running", rs0.state, RUNSTATE_running);
    memset(&rs1, 0xFF, sizeof(rs1));
    check_eq("register_runstate_memory_area(1)",
             vcpu_op(VCPUOP_register_runstate_memory_area, 1,
                     &(struct vcpu_register_runstate_memory_area){ (uint64_t)&rs1 }), 0);
    check_eq("runstate(1).state == offline (vcpu 1 down)", rs1.state, RUNSTATE_offline);

    if (!check_eq("bind_virq(VIRQ_TIMER, vcpu 0)", evtchn_bind_virq(VIRQ_TIMER, 0, &tport), 0))
        return;
    cpus[0].timer_port = tport;
    test_timers(tport);

    test_bringup();
}
