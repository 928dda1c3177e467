/*
 * Test reporting, the protocol `pyxen selftest` parses (all on port 0xE9):
 *   ok <area>: <check>
 *   FAIL <area>: <check>: <what happened>
 *   RESULT <area> PASS <n>          or   RESULT <area> FAIL <failed>/<n>
 * then SCHEDOP_shutdown(poweroff).
 */
#ifndef GUEST_TEST_H
#define GUEST_TEST_H

#include <stdint.h>

extern const char test_area[];          /* defined by each guest */

/* Record one check.  Returns cond.  fmt describes the failure. */
int check(int cond, const char *name, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Integer equality: prints "got <got> want <want>" on failure. */
int check_eq(const char *name, long got, long want);
/* Unsigned hex equality: prints "got 0x.. want 0x..". */
int check_eqx(const char *name, uint64_t got, uint64_t want);

void test_note(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
unsigned test_failures(void);
/* Print the RESULT line (exactly once). */
void test_report(void);
/* RESULT line, then SCHEDOP_shutdown(poweroff); never returns. */
__attribute__((noreturn)) void test_done(void);
/* SCHEDOP_shutdown(reason); if it returns print the FAIL line and halt. */
__attribute__((noreturn)) void shutdown_or_halt(unsigned reason);
/* Abort: FAIL line, RESULT line, SCHEDOP_shutdown(crash). */
__attribute__((noreturn)) void test_abort(const char *fmt, ...)
    __attribute__((format(printf, 1, 2)));

#endif
