#include "test.h"
#include "lib.h"
#include "arch.h"
#include "hypercall.h"

static volatile uint64_t checks_run, checks_failed, reported;

int check(int cond, const char *name, const char *fmt, ...)
{
    char what[200];
    va_list ap;

    atomic_inc64(&checks_run);
    if (cond) {
        printf("ok %s: %s\n", test_area, name);
        return 1;
    }
    atomic_inc64(&checks_failed);
    va_start(ap, fmt);
    vsnprintf(what, sizeof(what), fmt, ap);
    va_end(ap);
    printf("FAIL %s: %s: %s\n", test_area, name, what);
    return 0;
}

int check_eq(const char *name, long got, long want)
{
    return check(got == want, name, "got %ld want %ld", got, want);
}

int check_eqx(const char *name, uint64_t got, uint64_t want)
{
    return check(got == want, name, "got 0x%lx want 0x%lx", got, want);
}

void test_note(const char *fmt, ...)
{
    char buf[240];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    printf("# %s: %s\n", test_area, buf);
}

unsigned test_failures(void)
{
    return (unsigned)checks_failed;
}

void test_report(void)
{
    if (xchg64(&reported, 1))
        return;
    if (checks_failed)
        printf("RESULT %s FAIL %lu/%lu\n", test_area,
               (unsigned long)checks_failed, (unsigned long)checks_run);
    else
        printf("RESULT %s PASS %lu\n", test_area, (unsigned long)checks_run);
}

void shutdown_or_halt(unsigned reason)
{
    struct sched_shutdown s = { .reason = reason };
    HYPERVISOR_sched_op(SCHEDOP_shutdown, &s);
    printf("FAIL %s: shutdown returned\n", test_area);
    halt_forever();
}

void test_done(void)
{
    test_report();
    shutdown_or_halt(SHUTDOWN_poweroff);
}

void test_abort(const char *fmt, ...)
{
    char buf[240];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    atomic_inc64(&checks_run);
    atomic_inc64(&checks_failed);
    printf("FAIL %s: abort: %s\n", test_area, buf);
    test_report();
    shutdown_or_halt(SHUTDOWN_crash);
}
