/* Minimal libc subset for the freestanding guests. */
#ifndef GUEST_LIB_H
#define GUEST_LIB_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
size_t strnlen(const char *s, size_t max);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);
const char *strstr(const char *hay, const char *needle);
/* Search for a byte string inside a buffer (not NUL terminated). */
const void *memmem(const void *hay, size_t hlen, const void *needle, size_t nlen);

int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);
int snprintf(char *buf, size_t size, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* printf to the debug port 0xE9; one call is written atomically (SMP safe). */
int printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void puts_raw(const char *s, size_t n);

/* Parse "key=value" from a command line; returns value length or -1. */
int cmdline_get(const char *cmdline, const char *key, char *val, size_t vlen);

#endif
