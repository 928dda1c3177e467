/*
 * console: HYPERVISOR_console_io (18) and the PV console ring.
 *
 * console_io: xen/drivers/char/console.c do_console_io() checks
 * xsm_console_io() first.  The default (dummy) XSM policy in
 * xen/include/xsm/dummy.h lets a domU without console capability use
 * CONSOLEIO_write only on a debug build (CONFIG_VERBOSE_DEBUG); everything
 * else (CONFIG_VERBOSE_DEBUG off, CONSOLEIO_read, unknown commands) is
 * -EPERM before the command is even looked at.  pyxen behaves like the debug
 * build.  guest_console_write() returns 0 (or -EFAULT on a bad buffer).
 *
 * Ring: public/io/console.h struct xencons_interface at HVM_PARAM_CONSOLE_PFN,
 * notified through HVM_PARAM_CONSOLE_EVTCHN (drivers/tty/hvc/hvc_xen.c).
 */
#include "arch.h"
#include "hypercall.h"
#include "lib.h"
#include "rt.h"
#include "test.h"

const char test_area[] = "console";

#define MS 1000000ULL

static volatile struct xencons_interface *ring;
static uint32_t cport;

static int ring_write(const char *s, size_t n)
{
    uint32_t cons = ring->out_cons, prod = ring->out_prod;
    rmb();
    if (prod - cons + n > sizeof(ring->out))
        return 0;
    for (size_t i = 0; i < n; i++)
        ring->out[(prod + i) & (sizeof(ring->out) - 1)] = s[i];
    wmb();
    ring->out_prod = prod + n;
    return evtchn_send(cport) == 0;
}

/* Wait (bounded) until the backend has consumed everything we produced. */
static int ring_drained(uint64_t deadline)
{
    for (;;) {
        if (ring->out_cons == ring->out_prod)
            return 1;
        uint64_t n = now_ns();
        if (n >= deadline)
            return 0;
        evtchn_clear_pending(cport);
        uint64_t step = n + 20 * MS;
        sched_poll(&cport, 1, step < deadline ? step : deadline);
    }
}

void guest_main(struct hvm_start_info *si)
{
    static const char msg[] = "console: hello from console_io\n";
    static char buf[64];
    uint64_t pfn = 0, port = 0;

    check_eq("console_io write", HYPERVISOR_console_io(CONSOLEIO_write, sizeof(msg) - 1, msg), 0);
    check_eq("console_io write count 0", HYPERVISOR_console_io(CONSOLEIO_write, 0, msg), 0);
    check_eq("console_io write bad buffer -> -EFAULT",
             HYPERVISOR_console_io(CONSOLEIO_write, 16, BAD_PTR), -XEN_EFAULT);
    check_eq("console_io read (domU, XSM dummy policy) -> -EPERM",
             HYPERVISOR_console_io(CONSOLEIO_read, sizeof(buf), buf), -XEN_EPERM);
    check_eq("console_io unknown cmd 99 -> -EPERM (XSM before the switch)",
             HYPERVISOR_console_io(99, 0, buf), -XEN_EPERM);

    if (!check_eq("map shared_info", map_shared_info(), 0))
        return;
    check_eq("get_param CONSOLE_PFN", get_hvm_param(HVM_PARAM_CONSOLE_PFN, &pfn), 0);
    check_eq("get_param CONSOLE_EVTCHN", get_hvm_param(HVM_PARAM_CONSOLE_EVTCHN, &port), 0);
    if (!check(pfn == 0xFEFFF && port != 0 && port < EVTCHN_2L_NR_CHANNELS,
               "console ring parameters", "pfn 0x%lx port %lu", pfn, port))
        return;
    ring = (volatile struct xencons_interface *)(pfn << 12);
    cport = (uint32_t)port;
    evtchn_set_mask(cport);     /* no upcalls: we poll the port with IF=0 */

    uint32_t out_used = ring->out_prod - ring->out_cons;
    uint32_t in_used = ring->in_prod - ring->in_cons;
    check(out_used <= sizeof(ring->out) && in_used <= sizeof(ring->in),
          "ring indexes sane", "out %u in %u", out_used, in_used);

    static const char hello[] = "hvc: hello from the ring\n";
    check(ring_write(hello, sizeof(hello) - 1), "ring write + notify", "ring full or send failed");
    check(ring_drained(now_ns() + 2000 * MS), "backend consumed the output",
          "out_cons %u out_prod %u", ring->out_cons, ring->out_prod);

    /* Input: the host writes "ping\n" into in[] after seeing READY. */
    printf("READY console-input\n");
    char line[32];
    unsigned len = 0;
    uint64_t deadline = now_ns() + 5000 * MS;
    while (now_ns() < deadline) {
        uint32_t cons = ring->in_cons, prod = ring->in_prod;
        rmb();
        while (cons != prod && len < sizeof(line) - 1) {
            char ch = ring->in[cons & (sizeof(ring->in) - 1)];
            cons++;
            line[len++] = ch;
            if (ch == '\n')
                break;
        }
        mb();
        ring->in_cons = cons;
        if (len && line[len - 1] == '\n')
            break;
        evtchn_clear_pending(cport);
        if (ring->in_cons == ring->in_prod)
            sched_poll(&cport, 1, now_ns() + 100 * MS);
    }
    line[len] = 0;
    evtchn_send(cport);         /* tell the backend we consumed input */
    check(strcmp(line, "ping\n") == 0, "read 'ping\\n' from the ring", "got %u bytes '%s'",
          len, line);

    static const char got[] = "hvc: got ping\n";
    check(ring_write(got, sizeof(got) - 1), "ring write reply", "ring full or send failed");
    check(ring_drained(now_ns() + 2000 * MS), "backend consumed the reply",
          "out_cons %u out_prod %u", ring->out_cons, ring->out_prod);
}
