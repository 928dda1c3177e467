/*
 * evtchn: HYPERVISOR_event_channel_op (32), 2-level ABI, booted with 2 vCPUs.
 *
 * References: xen/common/event_channel.c (evtchn_alloc_unbound,
 * evtchn_bind_interdomain, evtchn_bind_virq, evtchn_bind_ipi, evtchn_close,
 * evtchn_send, evtchn_status, evtchn_bind_vcpu, evtchn_unmask,
 * do_event_channel_op); xen/common/event_2l.c (set_pending, unmask);
 * public/event_channel.h.
 */
#include "arch.h"
#include "hypercall.h"
#include "lib.h"
#include "rt.h"
#include "test.h"

const char test_area[] = "evtchn";

#define MS 1000000ULL
#define BAD_PORT 5000           /* >= 4096: never valid for the 2-level ABI */

static long op(int cmd, void *arg)
{
    return HYPERVISOR_event_channel_op(cmd, arg);
}

static void check_status(const char *name, uint32_t port, uint32_t want_status,
                         uint32_t want_vcpu)
{
    struct evtchn_status st;
    long rc = evtchn_status(port, &st);
    check(rc == 0 && st.status == want_status && st.vcpu == want_vcpu, name,
          "rc %ld status %u vcpu %u, want status %u vcpu %u", rc, st.status, st.vcpu,
          want_status, want_vcpu);
}

static int wait_hit_on_ap(uint32_t port, uint64_t old)
{
    return wait_change(&port_hits[port], old, now_ns() + 1000 * MS);
}

void guest_main(struct hvm_start_info *si)
{
    uint32_t a = 0, b = 0, t = 0, p = 0, ipi = 0;
    uint64_t hits;
    struct evtchn_status st;

    if (!check_eq("map shared_info", map_shared_info(), 0))
        return;
    check_eq("set_evtchn_upcall_vector(vcpu 0)", set_upcall_vector(0), 0);
    irq_window();

    /* FIFO ABI: pyxen offers 2-level only, like Xen built without FIFO support
       for this domain; Linux then falls back to 2-level (events_base.c). */
    struct evtchn_init_control ic = { .control_gfn = (uint64_t)vcpu_info_page >> 12 };
    check_eq("EVTCHNOP_init_control (FIFO) -> -ENOSYS", op(EVTCHNOP_init_control, &ic),
             -XEN_ENOSYS);
    check_eq("event_channel_op unknown cmd 99 -> -ENOSYS", op(99, &ic), -XEN_ENOSYS);

    /* vCPU 1 comes up and idles in sti;hlt, handling the ports it owns. */
    check_eq("set_evtchn_upcall_vector(vcpu 1)", set_upcall_vector(1), 0);
    check_eq("VCPUOP_initialise(1)", ap_initialise(1), 0);
    check_eq("VCPUOP_up(1)", ap_up(1), 0);
    check(wait_change(&cpus[1].online, 0, now_ns() + 3000 * MS), "vcpu 1 online",
          "AP did not start");

    /* ---- loopback interdomain pair within the domain ---- */
    check_eq("alloc_unbound(remote DOMID_SELF)", evtchn_alloc_unbound(DOMID_SELF, &a), 0);
    check(a > 0 && a < EVTCHN_2L_NR_CHANNELS, "alloc_unbound port in range", "port %u", a);
    evtchn_status(a, &st);
    check(st.status == EVTCHNSTAT_unbound && st.u.unbound.dom == my_domid && st.vcpu == 0,
          "status(unbound): 1, remote = own domid, vcpu 0",
          "status %u dom %u vcpu %u", st.status, st.u.unbound.dom, st.vcpu);

    check_eq("bind_interdomain(DOMID_SELF, a)", evtchn_bind_interdomain(DOMID_SELF, a, &b), 0);
    check(b > 0 && b != a, "bind_interdomain local port", "a %u b %u", a, b);
    /* evtchn_bind_interdomain() always sets pending on the new local port. */
    check(evtchn_is_pending(b), "new local port pending after bind_interdomain",
          "not pending");
    hits = port_hits[b];
    irq_window();
    check(port_hits[b] > hits, "bind_interdomain notification delivered", "no upcall");

    evtchn_status(a, &st);
    check(st.status == EVTCHNSTAT_interdomain && st.u.interdomain.dom == my_domid &&
          st.u.interdomain.port == b, "status(a): interdomain to (self, b)",
          "status %u dom %u port %u", st.status, st.u.interdomain.dom, st.u.interdomain.port);
    evtchn_status(b, &st);
    check(st.status == EVTCHNSTAT_interdomain && st.u.interdomain.port == a,
          "status(b): interdomain to (self, a)", "status %u port %u", st.status,
          st.u.interdomain.port);

    hits = port_hits[b];
    check_eq("send(a)", evtchn_send(a), 0);
    check(evtchn_is_pending(b), "send(a) sets pending on b", "not pending");
    irq_window();
    check_eq("send(a) delivered on b", (long)(port_hits[b] - hits), 1);
    hits = port_hits[a];
    check_eq("send(b)", evtchn_send(b), 0);
    irq_window();
    check_eq("send(b) delivered on a", (long)(port_hits[a] - hits), 1);

    /* ---- masking ---- */
    evtchn_set_mask(b);
    hits = port_hits[b];
    uint64_t upcalls = cpus[0].upcalls;
    check_eq("send(a) with b masked", evtchn_send(a), 0);
    check(evtchn_is_pending(b), "masked port still becomes pending", "not pending");
    irq_window();
    check(port_hits[b] == hits && cpus[0].upcalls == upcalls, "masked port: no upcall",
          "upcalls %lu -> %lu", upcalls, cpus[0].upcalls);
    check_eq("EVTCHNOP_unmask(b)", evtchn_unmask(b), 0);
    check(!evtchn_is_masked(b), "unmask clears the mask bit", "still masked");
    irq_window();
    check_eq("unmask delivers the pending event", (long)(port_hits[b] - hits), 1);

    /* ---- VIRQs ---- */
    check_eq("bind_virq(VIRQ_TIMER, vcpu 0)", evtchn_bind_virq(VIRQ_TIMER, 0, &t), 0);
    check_eq("bind_virq(VIRQ_TIMER, vcpu 0) again -> -EEXIST",
             evtchn_bind_virq(VIRQ_TIMER, 0, &p), -XEN_EEXIST);
    check_eq("bind_virq(virq 100) -> -EINVAL", evtchn_bind_virq(100, 0, &p), -XEN_EINVAL);
    check_eq("bind_virq(NR_VIRQS) -> -EINVAL", evtchn_bind_virq(NR_VIRQS, 0, &p), -XEN_EINVAL);
    check_eq("bind_virq(VIRQ_CONSOLE (global), vcpu 1) -> -EINVAL",
             evtchn_bind_virq(VIRQ_CONSOLE, 1, &p), -XEN_EINVAL);
    check_eq("bind_virq(VIRQ_TIMER, vcpu 99) -> -ENOENT",
             evtchn_bind_virq(VIRQ_TIMER, 99, &p), -XEN_ENOENT);
    evtchn_status(t, &st);
    check(st.status == EVTCHNSTAT_virq && st.u.virq == VIRQ_TIMER && st.vcpu == 0,
          "status(virq): 4, virq 0, vcpu 0", "status %u virq %u vcpu %u", st.status,
          st.u.virq, st.vcpu);
    check_eq("bind_vcpu(VIRQ_TIMER port, 1) -> -EINVAL (per-vCPU VIRQ)",
             evtchn_bind_vcpu(t, 1), -XEN_EINVAL);

    /* ---- IPI to vCPU 1 ---- */
    check_eq("bind_ipi(vcpu 1)", evtchn_bind_ipi(1, &ipi), 0);
    evtchn_status(ipi, &st);
    check(st.status == EVTCHNSTAT_ipi && st.vcpu == 1, "status(ipi): 5, vcpu 1",
          "status %u vcpu %u", st.status, st.vcpu);
    evtchn_set_owner(ipi, 1);
    hits = port_hits[ipi];
    check_eq("send(ipi)", evtchn_send(ipi), 0);
    check(wait_hit_on_ap(ipi, hits) && port_last_cpu[ipi] == 1, "IPI handled on vcpu 1",
          "hits %lu cpu %u", port_hits[ipi] - hits, port_last_cpu[ipi]);
    check_eq("bind_ipi(vcpu 99) -> -ENOENT", evtchn_bind_ipi(99, &p), -XEN_ENOENT);
    check_eq("bind_vcpu(ipi port, 0) -> -EINVAL", evtchn_bind_vcpu(ipi, 0), -XEN_EINVAL);

    /* ---- bind_vcpu moves an interdomain port to vCPU 1 ---- */
    evtchn_set_owner(b, 1);
    check_eq("bind_vcpu(b, 1)", evtchn_bind_vcpu(b, 1), 0);
    check_status("status(b).vcpu == 1", b, EVTCHNSTAT_interdomain, 1);
    hits = port_hits[b];
    check_eq("send(a) after bind_vcpu", evtchn_send(a), 0);
    check(wait_hit_on_ap(b, hits) && port_last_cpu[b] == 1, "event on b handled on vcpu 1",
          "hits %lu cpu %u", port_hits[b] - hits, port_last_cpu[b]);
    check_eq("bind_vcpu(b, 99) -> -ENOENT", evtchn_bind_vcpu(b, 99), -XEN_ENOENT);

    /* ---- close ---- */
    check_eq("close(b)", evtchn_close(b), 0);
    check_status("status(b) after close: closed", b, EVTCHNSTAT_closed, 0);
    evtchn_status(a, &st);
    check(st.status == EVTCHNSTAT_unbound && st.u.unbound.dom == my_domid,
          "status(a) after peer close: unbound, remote own domid", "status %u dom %u",
          st.status, st.u.unbound.dom);
    check_eq("send(b) closed -> -EINVAL", evtchn_send(b), -XEN_EINVAL);
    check_eq("close(b) again -> -EINVAL", evtchn_close(b), -XEN_EINVAL);
    check_eq("send(a) unbound -> 0 (dropped)", evtchn_send(a), 0);
    check(!evtchn_is_pending(a) && !evtchn_is_pending(b), "send on unbound port sets nothing",
          "pending a %d b %d", evtchn_is_pending(a), evtchn_is_pending(b));
    check_eq("bind_interdomain to a non-unbound port -> -EINVAL",
             evtchn_bind_interdomain(DOMID_SELF, ipi, &p), -XEN_EINVAL);
    check_eq("close(a)", evtchn_close(a), 0);
    check_eq("close(ipi)", evtchn_close(ipi), 0);
    check_eq("close(virq)", evtchn_close(t), 0);
    check_status("status(virq) after close: closed", t, EVTCHNSTAT_closed, 0);

    /* ---- invalid ports and arguments ---- */
    check_eq("send(5000) -> -EINVAL", evtchn_send(BAD_PORT), -XEN_EINVAL);
    check_eq("close(5000) -> -EINVAL", evtchn_close(BAD_PORT), -XEN_EINVAL);
    check_eq("status(5000) -> -EINVAL", evtchn_status(BAD_PORT, &st), -XEN_EINVAL);
    check_eq("unmask(5000) -> -EINVAL", evtchn_unmask(BAD_PORT), -XEN_EINVAL);
    check_eq("bind_vcpu(5000, 0) -> -EINVAL", evtchn_bind_vcpu(BAD_PORT, 0), -XEN_EINVAL);
    check_status("status(0): reserved port reads closed", 0, EVTCHNSTAT_closed, 0);
    check_eq("close(0) (reserved) -> -EINVAL", evtchn_close(0), -XEN_EINVAL);
    struct evtchn_alloc_unbound au = { .dom = DOMID_INVALID, .remote_dom = DOMID_SELF };
    check_eq("alloc_unbound(dom DOMID_INVALID) -> -ESRCH", op(EVTCHNOP_alloc_unbound, &au),
             -XEN_ESRCH);
    check_eq("bind_interdomain(DOMID_INVALID) -> -ESRCH",
             evtchn_bind_interdomain(DOMID_INVALID, 1, &p), -XEN_ESRCH);
    check_eq("status bad pointer -> -EFAULT", op(EVTCHNOP_status, BAD_PTR), -XEN_EFAULT);
}
