/*
 * exp15: huge folios for shmem although shmem_enabled is "never" (session 16; benchmarks 2, 3).
 *  A. 1 GiB pool filled page by page (UFFDIO_COPY through a MAP_SHARED view, as the product
 *     publishes), then MADV_COLLAPSE of every 2 MiB block: does it work with shmem_enabled=never,
 *     what does it cost with and without another mapping (a process that already mapped every
 *     page, MINOR-registered: its PTEs are dropped, it faults again), and how fast does an
 *     unregistered MAP_PRIVATE mapping of the collapsed pool read one word a page, against the
 *     same bytes as a file in the page cache (np.load(mmap_mode="r")).
 *  B. A 2 MiB template chunk mapped per 2 MiB over 1 GiB, 1% random reads: 4 KiB folios (kernel
 *     fault-around) against one huge folio (one PMD per block); and the cheap way to make the
 *     chunk huge: one page written, the empty rest collapsed (MADV_COLLAPSE refuses a range
 *     with no page at all: EINVAL), the rest written through a shared mapping of the huge folio.
 * Usage: ./exp15 FILE   (FILE: 1 GiB, e.g. head -c 1G /dev/urandom > FILE); UNMAP_FIRST=1 to
 * collapse with no other mapping of the pool.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif
#define G (1UL << 30)
#define C2 (2UL << 20)
#define PS 4096UL

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
static int uffd;
static char *base;
static volatile long nfaults;

static void *handler(void *a)
{
    (void)a;
    for (;;) {
        struct pollfd p = {uffd, POLLIN, 0};
        struct uffd_msg m;
        poll(&p, 1, -1);
        if (read(uffd, &m, sizeof m) != sizeof m)
            continue;
        nfaults++;
        unsigned long off = (m.arg.pagefault.address - (unsigned long)base) & ~(C2 - 1);
        struct uffdio_continue c = {.range = {(unsigned long)base + off, C2}};
        /* EAGAIN stops at a page mapped already (a COWed one): step over it */
        while (ioctl(uffd, UFFDIO_CONTINUE, &c) && errno == EAGAIN) {
            c.range.start += c.mapped + PS;
            c.range.len -= c.mapped + PS;
            c.mapped = 0;
            if (!c.range.len)
                break;
        }
    }
    return NULL;
}

/* a mapping at a 2 MiB-aligned address (PMDs need the address aligned as the file offset) */
static char *amap(size_t len, int prot, int flags, int fd)
{
    char *r = mmap(0, len + C2, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    char *a = (char *)(((unsigned long)r + C2 - 1) & ~(C2 - 1));
    return mmap(a, len, prot, flags | MAP_FIXED, fd, 0);
}

static double read_words(const char *b, size_t len, long *sum)
{
    long s = 0;
    double t = now();
    for (size_t i = 0; i < len; i += PS)
        s += *(volatile const long *)(b + i);
    *sum = s;
    return (now() - t) * 1e3;
}

static void pmd_line(const char *tag)
{
    FILE *f = fopen("/proc/self/smaps_rollup", "r");
    char l[256];
    while (fgets(l, sizeof l, f))
        if (strstr(l, "ShmemPmdMapped"))
            printf("   %s %s", tag, l);
    fclose(f);
}

int main(int argc, char **argv)
{
    if (argc < 2) { fprintf(stderr, "usage: %s FILE(1 GiB)\n", argv[0]); return 2; }
    setvbuf(stdout, 0, _IOLBF, 0);
    int file = open(argv[1], O_RDONLY);
    posix_fadvise(file, 0, 0, POSIX_FADV_DONTNEED);
    static char buf[1 << 20];
    while (read(file, buf, sizeof buf) > 0)
        ;
    int pool = memfd_create("pool", 0);
    ftruncate(pool, G);
    char *view = amap(G, PROT_READ | PROT_WRITE, MAP_SHARED, pool);
    uffd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    struct uffdio_api api = {.api = UFFD_API, .features = UFFD_FEATURE_MINOR_SHMEM};
    if (ioctl(uffd, UFFDIO_API, &api)) { perror("UFFDIO_API"); return 1; }
    struct uffdio_register rv = {.range = {(unsigned long)view, G}, .mode = UFFDIO_REGISTER_MODE_MISSING};
    ioctl(uffd, UFFDIO_REGISTER, &rv);
    char *src = mmap(0, C2, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    double t0 = now();
    for (size_t o = 0; o < G; o += C2) {
        pread(file, src, C2, o);
        struct uffdio_copy c = {.dst = (unsigned long)view + o, .src = (unsigned long)src, .len = C2,
                                .mode = UFFDIO_COPY_MODE_DONTWAKE};
        if (ioctl(uffd, UFFDIO_COPY, &c)) { perror("UFFDIO_COPY"); return 1; }
    }
    printf("A publish 1 GiB (4 KiB pages): %.1f ms\n", (now() - t0) * 1e3);
    struct uffdio_range ur = {(unsigned long)view, G};
    ioctl(uffd, UFFDIO_UNREGISTER, &ur);
    madvise(view, G, MADV_DONTNEED);
    pthread_t th;
    pthread_create(&th, NULL, handler, NULL);
    base = amap(G, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, pool);
    struct uffdio_register rg = {.range = {(unsigned long)base, G},
                                 .mode = UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR};
    ioctl(uffd, UFFDIO_REGISTER, &rg);
    long s0, s1;
    double r0 = read_words(base, G, &s0);
    printf("A first process (MINOR, 2 MiB CONTINUEs): read %.1f ms, %ld faults\n", r0, nfaults);
    if (getenv("UNMAP_FIRST"))
        munmap(base, G);
    t0 = now();
    int bad = 0;
    for (size_t o = 0; o < G; o += C2)
        if (madvise(view + o, C2, MADV_COLLAPSE) && !bad++)
            perror("MADV_COLLAPSE");
    printf("A collapse 1 GiB%s: %.1f ms, %d blocks failed\n",
           getenv("UNMAP_FIRST") ? " (no other mapping)" : " (first process maps every page)",
           (now() - t0) * 1e3, bad);
    madvise(view, G, MADV_DONTNEED);
    if (!getenv("UNMAP_FIRST")) {
        long f0 = nfaults;
        double r1 = read_words(base, G, &s1);
        printf("A first process reads again: %.1f ms, %ld new faults, same words %d\n", r1, nfaults - f0, s0 == s1);
    }
    for (int i = 0; i < 3; i++) {
        char *p2 = amap(G, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, pool);
        long s2;
        double r2 = read_words(p2, G, &s2);
        printf("A rep %d collapsed pool, unregistered MAP_PRIVATE: %.1f ms (same words %d)\n", i, r2, s2 == s0);
        if (i == 0)
            pmd_line("while mapped:");
        munmap(p2, G);
        char *fm = amap(G, PROT_READ, MAP_SHARED, file);
        double r3 = read_words(fm, G, &s2);
        printf("A rep %d file MAP_SHARED (np.load mmap r): %.1f ms\n", i, r3);
        munmap(fm, G);
    }

    size_t npg = G / PS, nt = npg / 100;
    size_t *idx = malloc(nt * sizeof *idx);
    unsigned long long x = 3;
    for (size_t k = 0; k < nt; k++) { x = x * 6364136223846793005ULL + 1442695040888963407ULL; idx[k] = (x >> 17) % npg; }
    static char tmpl[PS];
    for (size_t k = 0; k < PS; k++)
        tmpl[k] = (char)(k * 7);
    for (int huge = 0; huge < 2; huge++) {
        t0 = now();
        int chunk = memfd_create("chunk", MFD_ALLOW_SEALING);
        ftruncate(chunk, C2);
        pwrite(chunk, tmpl, PS, 0);
        char *w = amap(C2, PROT_READ | PROT_WRITE, MAP_SHARED, chunk);
        int rc = huge ? madvise(w, C2, MADV_COLLAPSE) : 0;
        for (size_t o = PS; o < C2; o += PS)
            memcpy(w + o, tmpl, PS);
        munmap(w, C2);
        fcntl(chunk, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE);
        printf("B chunk made (%s): %.2f ms, collapse rc %d\n", huge ? "huge" : "4 KiB pages", (now() - t0) * 1e3, rc);
        for (int rep = 0; rep < 3; rep++) {
            double a = now();
            char *b = amap(G, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1);
            for (size_t o = 0; o < G; o += C2)
                mmap(b + o, C2, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED | MAP_NORESERVE, chunk, 0);
            double m = now();
            volatile long s = 0;
            for (size_t k = 0; k < nt; k++)
                s += b[idx[k] * PS + 7];
            double e = now();
            printf("B rep %d %s chunk: 512 mmaps %.2f ms, %zu reads %.2f ms\n", rep, huge ? "huge " : "small",
                   (m - a) * 1e3, nt, (e - m) * 1e3);
            munmap(b, G);
        }
        close(chunk);
    }
    return 0;
}
