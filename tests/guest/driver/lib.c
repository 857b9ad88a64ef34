/* memset & co (gcc may emit calls to them), the COM1 console, time, power off. */
#include "lib.h"
#include "job.h"

u64 tsc_khz = 2000000;
bool quiet;

void *memset(void *d, int c, size_t n)
{
    u8 *p = d;
    while (n--)
        *p++ = (u8)c;
    return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
    u8 *p = d;
    const u8 *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}

void *memmove(void *d, const void *s, size_t n)
{
    u8 *p = d;
    const u8 *q = s;
    if (p < q) {
        while (n--)
            *p++ = *q++;
    } else {
        while (n--)
            p[n] = q[n];
    }
    return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const u8 *p = a, *q = b;
    for (; n; n--, p++, q++)
        if (*p != *q)
            return *p < *q ? -1 : 1;
    return 0;
}

void udelay(u64 us)
{
    u64 start = rdtsc(), len = us_to_tsc(us);
    while (rdtsc() - start < len)
        cpu_relax();
}

__attribute__((noreturn)) void poweroff(void)
{
    outb(SLEEP_CONTROL_PORT, S5_SLP_EN);
    for (;;)
        cpu_relax();
}

/* ---- console ---------------------------------------------------------------------------- */
#define LSR (COM1_PORT + 5)
#define LSR_THRE 0x20

static void putc_serial(char c)
{
    /* bounded: a missing UART reads all-ones, which says "ready" anyway */
    for (int i = 0; i < 100000 && !(inb(LSR) & LSR_THRE); i++)
        cpu_relax();
    outb(COM1_PORT, (u8)c);
}

struct out {
    char buf[128];
    unsigned n;
    int total;
};

static void flush(struct out *o)
{
    for (unsigned i = 0; i < o->n; i++)
        putc_serial(o->buf[i]);
    o->n = 0;
}

static void put(struct out *o, char c)
{
    if (o->n == sizeof(o->buf))
        flush(o);
    o->buf[o->n++] = c;
    o->total++;
}

static void put_num(struct out *o, u64 v, unsigned base, bool neg, int width, char pad)
{
    char tmp[24];
    int n = 0;
    do {
        unsigned d = v % base;
        tmp[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
        v /= base;
    } while (v);
    if (neg)
        tmp[n++] = '-';
    if (neg && pad == '0') { /* sign before zero padding */
        put(o, '-');
        n--;
        width--;
    }
    for (int i = n; i < width; i++)
        put(o, pad);
    while (n)
        put(o, tmp[--n]);
}

/* %s %c %d %i %u %x %p %% with l/ll/z length, a width and 0 padding. */
int vprintf(const char *fmt, va_list ap)
{
    struct out o;
    o.n = 0;
    o.total = 0;
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            put(&o, *fmt);
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
        while (*fmt == 'l' || *fmt == 'z') {
            lng++;
            fmt++;
        }
        switch (*fmt) {
        case 'd':
        case 'i': {
            long long v = lng ? va_arg(ap, long) : va_arg(ap, int);
            put_num(&o, v < 0 ? -(u64)v : (u64)v, 10, v < 0, width, pad);
            break;
        }
        case 'u':
            put_num(&o, lng ? va_arg(ap, unsigned long) : va_arg(ap, unsigned), 10, false, width, pad);
            break;
        case 'x':
            put_num(&o, lng ? va_arg(ap, unsigned long) : va_arg(ap, unsigned), 16, false, width, pad);
            break;
        case 'p':
            put(&o, '0');
            put(&o, 'x');
            put_num(&o, (u64)va_arg(ap, void *), 16, false, width, pad);
            break;
        case 'c':
            put(&o, (char)va_arg(ap, int));
            break;
        case 's': {
            const char *s = va_arg(ap, const char *);
            if (!s)
                s = "(null)";
            int len = 0;
            while (s[len])
                len++;
            for (int i = len; i < width; i++)
                put(&o, ' ');
            while (*s)
                put(&o, *s++);
            break;
        }
        case '%':
            put(&o, '%');
            break;
        case 0:
            fmt--;
            break;
        default:
            put(&o, '%');
            put(&o, *fmt);
        }
    }
    flush(&o);
    return o.total;
}

int printf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vprintf(fmt, ap);
    va_end(ap);
    return n;
}
