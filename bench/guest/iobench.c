/* iobench: the guest-side I/O tool of bench/blk.py and bench/net.py.
 *
 * Built on the host by the benches (gcc -O2 -static) and run inside the guest, which has only
 * busybox (whose dd prints no rate and whose date has no %N). Every mode times itself with
 * CLOCK_MONOTONIC and prints exactly one JSON line on stdout; errors print a JSON line with an
 * "error" field and exit 1.
 *
 *   iobench randread|randwrite DEV [-b BS] [-t SECONDS] [-n OPS] [-S SPAN] [-s SEED]
 *       O_DIRECT pread/pwrite of BS (default 4096) bytes at BS-aligned offsets drawn from a
 *       xorshift64 generator with a fixed seed, over the first SPAN bytes (default: the whole
 *       device), until SECONDS (default 10) have passed or OPS operations are done, whichever
 *       comes first. randwrite ends with fdatasync() inside the timed interval.
 *   iobench seqread|seqwrite DEV [-b BS] [-n BLOCKS]
 *       O_DIRECT sequential pread/pwrite of BLOCKS blocks of BS (default 1 MiB) bytes from
 *       offset 0 (like dd bs=1M iflag/oflag=direct); seqwrite ends with fdatasync(), timed.
 *   iobench send HOST PORT [-m MIB] [-t SECONDS]
 *       connects to HOST:PORT (IPv4 literal; retried for SECONDS, default 60, while refused or
 *       unreachable), writes MIB (default 64) MiB, shuts down its write side and waits for the
 *       peer to close, so the time covers delivery of the last byte.
 *   iobench recv PORT [-t SECONDS]
 *       accepts one connection on PORT and reads until EOF; times first byte to EOF; waits at
 *       most SECONDS (default 120) for the connection.
 *
 * Output: {"mode":..., "bs":..., "ops":..., "bytes":..., "seconds":..., "iops":..., "mib_s":...}
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static const char *mode = "?";

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void fail(const char *what)
{
    printf("{\"mode\":\"%s\",\"error\":\"%s: %s\"}\n", mode, what, strerror(errno));
    fflush(stdout);
    exit(1);
}

static void usage(void)
{
    fprintf(stderr, "usage: iobench randread|randwrite|seqread|seqwrite DEV [-b BS] [-t S] "
                    "[-n N] [-S SPAN] [-s SEED]\n"
                    "       iobench send HOST PORT [-m MIB] [-t S]\n"
                    "       iobench recv PORT [-t S]\n");
    exit(2);
}

static void report(uint64_t bs, uint64_t ops, uint64_t bytes, double secs)
{
    if (secs <= 0)
        secs = 1e-9;
    printf("{\"mode\":\"%s\",\"bs\":%llu,\"ops\":%llu,\"bytes\":%llu,\"seconds\":%.6f,"
           "\"iops\":%.1f,\"mib_s\":%.3f}\n", mode, (unsigned long long)bs,
           (unsigned long long)ops, (unsigned long long)bytes, secs, ops / secs,
           bytes / secs / 1048576.0);
    fflush(stdout);
}

static uint64_t xorshift64(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static void fill(unsigned char *buf, uint64_t len, uint64_t tag)
{
    for (uint64_t i = 0; i + 8 <= len; i += 8) {
        uint64_t v = (tag + i) * 0x9E3779B97F4A7C15ull | 1;
        memcpy(buf + i, &v, 8);
    }
}

static int blockio(int argc, char **argv)
{
    int rnd = strncmp(mode, "rand", 4) == 0;
    int wr = strstr(mode, "write") != NULL;
    uint64_t bs = rnd ? 4096 : 1048576, nops = 0, span = 0, seed = 0x2545F4914F6CDD1Dull;
    double limit = rnd ? 10 : 0;
    int c;
    if (argc < 3)
        usage();
    const char *dev = argv[2];
    optind = 3;
    while ((c = getopt(argc, argv, "b:t:n:S:s:")) != -1) {
        switch (c) {
        case 'b': bs = strtoull(optarg, NULL, 0); break;
        case 't': limit = strtod(optarg, NULL); break;
        case 'n': nops = strtoull(optarg, NULL, 0); break;
        case 'S': span = strtoull(optarg, NULL, 0); break;
        case 's': seed = strtoull(optarg, NULL, 0) | 1; break;
        default: usage();
        }
    }
    if (bs == 0 || bs % 512)
        usage();
    int fd = open(dev, (wr ? O_RDWR : O_RDONLY) | O_DIRECT);
    if (fd < 0)
        fail(dev);
    uint64_t size = 0;
    if (ioctl(fd, BLKGETSIZE64, &size) < 0) {
        struct stat st;
        if (fstat(fd, &st) < 0)
            fail("fstat");
        size = st.st_size;
    }
    if (span == 0 || span > size)
        span = size;
    uint64_t nblocks = span / bs;
    if (nblocks == 0) {
        errno = EINVAL;
        fail("device smaller than one block");
    }
    if (!rnd && (nops == 0 || nops > nblocks))
        nops = nblocks;
    if (rnd && nops == 0 && limit <= 0)
        limit = 10;
    unsigned char *buf;
    if (posix_memalign((void **)&buf, 4096, bs))
        fail("posix_memalign");
    fill(buf, bs, 1);
    uint64_t ops = 0;
    double t0 = now(), t = t0;
    for (;;) {
        if (nops && ops >= nops)
            break;
        if (limit > 0 && (ops & 15) == 0 && (t = now()) - t0 >= limit)
            break;
        uint64_t off = rnd ? (xorshift64(&seed) % nblocks) * bs : ops * bs;
        ssize_t n;
        if (wr) {
            memcpy(buf, &ops, sizeof ops);           /* every block written differs */
            n = pwrite(fd, buf, bs, off);
        } else {
            n = pread(fd, buf, bs, off);
        }
        if (n != (ssize_t)bs) {
            if (n >= 0)
                errno = EIO;
            fail(wr ? "pwrite" : "pread");
        }
        ops++;
    }
    if (wr && fdatasync(fd) < 0)
        fail("fdatasync");
    t = now();
    report(bs, ops, ops * bs, t - t0);
    return 0;
}

static int sock_send(int argc, char **argv)
{
    uint64_t mib = 64;
    double limit = 60;
    int c;
    if (argc < 4)
        usage();
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
    if (inet_pton(AF_INET, argv[2], &sa.sin_addr) != 1) {
        errno = EINVAL;
        fail("HOST must be an IPv4 address");
    }
    optind = 4;
    while ((c = getopt(argc, argv, "m:t:")) != -1) {
        switch (c) {
        case 'm': mib = strtoull(optarg, NULL, 0); break;
        case 't': limit = strtod(optarg, NULL); break;
        default: usage();
        }
    }
    int fd = -1;
    double start = now();
    for (;;) {
        fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0)
            fail("socket");
        if (connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0)
            break;
        int e = errno;
        close(fd);
        errno = e;
        if (now() - start > limit || (e != ECONNREFUSED && e != EHOSTUNREACH &&
                                      e != ENETUNREACH && e != ETIMEDOUT))
            fail("connect");
        usleep(100000);
    }
    const uint64_t chunk = 65536;
    unsigned char *buf = malloc(chunk);
    if (!buf)
        fail("malloc");
    fill(buf, chunk, 7);
    uint64_t total = mib << 20, sent = 0;
    double t0 = now();
    while (sent < total) {
        uint64_t want = total - sent < chunk ? total - sent : chunk;
        ssize_t n = write(fd, buf, want);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fail("write");
        }
        sent += n;
    }
    if (shutdown(fd, SHUT_WR) < 0)
        fail("shutdown");
    while (read(fd, buf, chunk) > 0)          /* the peer closes once it has read it all */
        ;
    report(chunk, (sent + chunk - 1) / chunk, sent, now() - t0);
    return 0;
}

static int sock_recv(int argc, char **argv)
{
    double limit = 120;
    int c, one = 1;
    if (argc < 3)
        usage();
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2])),
                             .sin_addr.s_addr = htonl(INADDR_ANY)};
    optind = 3;
    while ((c = getopt(argc, argv, "t:")) != -1) {
        switch (c) {
        case 't': limit = strtod(optarg, NULL); break;
        default: usage();
        }
    }
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    if (ls < 0)
        fail("socket");
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(ls, (struct sockaddr *)&sa, sizeof sa) < 0)
        fail("bind");
    if (listen(ls, 1) < 0)
        fail("listen");
    printf("{\"mode\":\"recv\",\"listening\":%d}\n", ntohs(sa.sin_port));
    fflush(stdout);
    struct pollfd p = {.fd = ls, .events = POLLIN};
    int r = poll(&p, 1, (int)(limit * 1000));
    if (r <= 0) {
        errno = r == 0 ? ETIMEDOUT : errno;
        fail("accept");
    }
    int fd = accept(ls, NULL, NULL);
    if (fd < 0)
        fail("accept");
    const uint64_t chunk = 262144;
    unsigned char *buf = malloc(chunk);
    if (!buf)
        fail("malloc");
    uint64_t got = 0, reads = 0;
    double t0 = 0;
    for (;;) {
        ssize_t n = read(fd, buf, chunk);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fail("read");
        }
        if (n == 0)
            break;
        if (got == 0)
            t0 = now();
        got += n;
        reads++;
    }
    double t1 = now();
    close(fd);
    report(chunk, reads, got, got ? t1 - t0 : 0);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        usage();
    mode = argv[1];
    if (!strcmp(mode, "randread") || !strcmp(mode, "randwrite") || !strcmp(mode, "seqread") ||
        !strcmp(mode, "seqwrite"))
        return blockio(argc, argv);
    if (!strcmp(mode, "send"))
        return sock_send(argc, argv);
    if (!strcmp(mode, "recv"))
        return sock_recv(argc, argv);
    usage();
    return 2;
}
