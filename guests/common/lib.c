/* Minimal libc subset: string functions and a printf to port 0xE9. */
#include "lib.h"
#include "arch.h"

void *memset(void *d, int c, size_t n)
{
    void *ret = d;
    asm volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return ret;
}

void *memcpy(void *d, const void *s, size_t n)
{
    void *ret = d;
    asm volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) :: "memory");
    return ret;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const unsigned char *x = a, *y = b;
    for (size_t i = 0; i < n; i++)
        if (x[i] != y[i])
            return x[i] - y[i];
    return 0;
}

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

size_t strnlen(const char *s, size_t max)
{
    size_t n = 0;
    while (n < max && s[n])
        n++;
    return n;
}

int strcmp(const char *a, const char *b)
{
    while (*a && *a == *b) {
        a++;
        b++;
    }
    return (unsigned char)*a - (unsigned char)*b;
}

int strncmp(const char *a, const char *b, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (a[i] != b[i] || !a[i])
            return (unsigned char)a[i] - (unsigned char)b[i];
    }
    return 0;
}

const void *memmem(const void *hay, size_t hlen, const void *needle, size_t nlen)
{
    const char *h = hay;
    if (nlen == 0)
        return hay;
    for (size_t i = 0; i + nlen <= hlen; i++)
        if (memcmp(h + i, needle, nlen) == 0)
            return h + i;
    return NULL;
}

const char *strstr(const char *hay, const char *needle)
{
    return memmem(hay, strlen(hay), needle, strlen(needle));
}

int cmdline_get(const char *cmdline, const char *key, char *val, size_t vlen)
{
    size_t klen = strlen(key);
    const char *p = cmdline;

    while (p && *p) {
        while (*p == ' ')
            p++;
        if (strncmp(p, key, klen) == 0 && p[klen] == '=') {
            const char *v = p + klen + 1;
            size_t n = 0;
            while (v[n] && v[n] != ' ')
                n++;
            if (n + 1 > vlen)
                return -1;
            memcpy(val, v, n);
            val[n] = 0;
            return (int)n;
        }
        while (*p && *p != ' ')
            p++;
    }
    return -1;
}

/* ---- formatted output -------------------------------------------------- */

struct outbuf {
    char *buf;
    size_t size, len;
};

static void out_c(struct outbuf *o, char c)
{
    if (o->len + 1 < o->size)
        o->buf[o->len] = c;
    o->len++;
}

static void out_num(struct outbuf *o, uint64_t v, unsigned base, int neg,
                    int width, char pad)
{
    char tmp[24];
    int n = 0;
    do {
        unsigned d = v % base;
        tmp[n++] = d < 10 ? '0' + d : 'a' + d - 10;
        v /= base;
    } while (v);
    if (neg)
        tmp[n++] = '-';
    if (neg && pad == '0') {
        /* keep the sign in front of zero padding */
        out_c(o, '-');
        n--;
        width--;
    }
    for (int i = n; i < width; i++)
        out_c(o, pad);
    while (n)
        out_c(o, tmp[--n]);
}

int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
    struct outbuf o = { buf, size, 0 };

    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            out_c(&o, *fmt);
            continue;
        }
        fmt++;
        char pad = ' ';
        int width = 0, lng = 0;
        if (*fmt == '0') {
            pad = '0';
            fmt++;
        }
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (*fmt++ - '0');
        while (*fmt == 'l') {
            lng++;
            fmt++;
        }
        switch (*fmt) {
        case 'd':
        case 'i': {
            int64_t v = lng ? va_arg(ap, long) : va_arg(ap, int);
            out_num(&o, v < 0 ? -(uint64_t)v : (uint64_t)v, 10, v < 0, width, pad);
            break;
        }
        case 'u': {
            uint64_t v = lng ? va_arg(ap, unsigned long) : va_arg(ap, unsigned int);
            out_num(&o, v, 10, 0, width, pad);
            break;
        }
        case 'x': {
            uint64_t v = lng ? va_arg(ap, unsigned long) : va_arg(ap, unsigned int);
            out_num(&o, v, 16, 0, width, pad);
            break;
        }
        case 'p':
            out_c(&o, '0');
            out_c(&o, 'x');
            out_num(&o, (uint64_t)va_arg(ap, void *), 16, 0, width, pad);
            break;
        case 's': {
            const char *s = va_arg(ap, const char *);
            if (!s)
                s = "(null)";
            int n = (int)strlen(s);
            for (int i = n; i < width; i++)
                out_c(&o, ' ');
            while (*s)
                out_c(&o, *s++);
            break;
        }
        case 'c':
            out_c(&o, (char)va_arg(ap, int));
            break;
        case '%':
            out_c(&o, '%');
            break;
        case 0:
            fmt--;
            break;
        default:
            out_c(&o, '%');
            out_c(&o, *fmt);
            break;
        }
    }
    if (size)
        buf[o.len < size ? o.len : size - 1] = 0;
    return (int)o.len;
}

int snprintf(char *buf, size_t size, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, size, fmt, ap);
    va_end(ap);
    return n;
}

static volatile uint64_t print_lock;

void puts_raw(const char *s, size_t n)
{
    uint64_t flags = save_flags_cli();
    /* bounded spin: never deadlock the reporter */
    for (unsigned i = 0; i < 1000000 && xchg64(&print_lock, 1); i++)
        cpu_relax();
    for (size_t i = 0; i < n; i++)
        outb(0xE9, (uint8_t)s[i]);
    print_lock = 0;
    restore_flags(flags);
}

int printf(const char *fmt, ...)
{
    char buf[320];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    if (n > (int)sizeof(buf) - 1)
        n = sizeof(buf) - 1;
    puts_raw(buf, n);
    return n;
}
