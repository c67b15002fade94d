/*
 * exp14: the floor of 4 KiB mappings, against the page cache's large folios (benchmarks 2, 3).
 *  A. 1 GiB filled pool (memfd), MAP_PRIVATE, one word read per page: kernel fault-around
 *     (unregistered; MISSING-only registration keeps it), MINOR|MISSING + 512-page CONTINUE per
 *     fault (our second process), MADV_POPULATE_READ then read; against the same bytes as a file
 *     on disk in the page cache, mapped MAP_SHARED read-only (np.load(mmap_mode="r")).
 *  B. 1% random first reads (2621 pages) of 1 GiB: a 2 MiB template chunk mapped per 2 MiB,
 *     unregistered (kernel fault-around) or registered WP (no fault-around), against anonymous
 *     memory's zero page (the cheapest first touch there is).
 * Usage: ./exp14 FILE   (FILE: 1 GiB, e.g. head -c 1G /dev/urandom > FILE)
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

#define G (1UL << 30)
#define C2 (2UL << 20)
#define PS 4096UL
#define CL 512UL

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
static int uffd;
static char *base;

static void *handler(void *a)
{
    (void)a;
    for (;;) {
        struct pollfd p = {uffd, POLLIN, 0};
        struct uffd_msg m;
        poll(&p, 1, -1);
        if (read(uffd, &m, sizeof m) != sizeof m)
            continue;
        unsigned long off = (m.arg.pagefault.address - (unsigned long)base) & ~(CL * PS - 1);
        struct uffdio_continue c = {.range = {(unsigned long)base + off, CL * PS}};
        ioctl(uffd, UFFDIO_CONTINUE, &c);   /* EEXIST: mapped already */
    }
    return NULL;
}

static double read_words(const char *b)
{
    volatile long s = 0;
    double t = now();
    for (size_t i = 0; i < G; i += PS)
        s += *(const long *)(b + i);
    return (now() - t) * 1e3;
}

int main(int argc, char **argv)
{
    if (argc < 2) { fprintf(stderr, "usage: %s FILE(1 GiB)\n", argv[0]); return 2; }
    int file = open(argv[1], O_RDONLY);
    /* Into the page cache the way np.load finds a file it wrote or read before: by readahead,
       which allocates large folios (a file written in small writes has 4 KiB folios, and its
       mapping costs what the pool's does). */
    posix_fadvise(file, 0, 0, POSIX_FADV_DONTNEED);
    static char buf[1 << 20];
    while (read(file, buf, sizeof buf) > 0)
        ;
    int pool = memfd_create("pool", 0);
    ftruncate(pool, G);
    char *w = mmap(0, G, PROT_READ | PROT_WRITE, MAP_SHARED, pool, 0);
    for (size_t i = 0; i < G; i += 8) *(long *)(w + i) = (long)i;
    munmap(w, G);
    uffd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    struct uffdio_api api = {.api = UFFD_API,
                             .features = UFFD_FEATURE_MINOR_SHMEM | UFFD_FEATURE_WP_HUGETLBFS_SHMEM |
                                         (1ULL << 15) /* WP_ASYNC */};
    if (ioctl(uffd, UFFDIO_API, &api)) { perror("UFFDIO_API"); return 1; }
    pthread_t t;
    pthread_create(&t, NULL, handler, NULL);
    const char *names[] = {"pool, unregistered (fault-around)", "pool, MISSING only (fault-around)",
                           "pool, MINOR|MISSING + CONTINUE 512", "pool, POPULATE_READ then read",
                           "file MAP_SHARED (np.load mmap r)"};
    for (int rep = 0; rep < 3; rep++)
        for (int mode = 0; mode < 5; mode++) {
            base = mode == 4 ? mmap(0, G, PROT_READ, MAP_SHARED, file, 0)
                             : mmap(0, G, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, pool, 0);
            if (mode == 1 || mode == 2) {
                struct uffdio_register rg = {.range = {(unsigned long)base, G},
                    .mode = UFFDIO_REGISTER_MODE_MISSING | (mode == 2 ? UFFDIO_REGISTER_MODE_MINOR : 0)};
                if (ioctl(uffd, UFFDIO_REGISTER, &rg)) perror("register");
            }
            double t0 = now();
            if (mode == 3) madvise(base, G, MADV_POPULATE_READ);
            double pre = (now() - t0) * 1e3, rd = read_words(base);
            printf("A rep %d %-36s: %6.1f ms (populate %.1f + read %.1f)\n", rep, names[mode], pre + rd, pre, rd);
            munmap(base, G);
        }

    size_t npg = G / PS, nt = npg / 100;
    size_t *idx = malloc(nt * sizeof *idx);
    unsigned long long x = 3;
    for (size_t i = 0; i < nt; i++) { x = x * 6364136223846793005ULL + 1442695040888963407ULL; idx[i] = (x >> 17) % npg; }
    int chunk = memfd_create("chunk", 0);
    ftruncate(chunk, C2);
    w = mmap(0, C2, PROT_READ | PROT_WRITE, MAP_SHARED, chunk, 0);
    for (size_t i = 0; i < C2; i++) w[i] = (char)(i * 7);
    munmap(w, C2);
    const char *bn[] = {"chunks, unregistered (fault-around)", "chunks, WP registered (no fault-around)",
                        "anonymous, zero page"};
    for (int rep = 0; rep < 3; rep++)
        for (int mode = 0; mode < 3; mode++) {
            double t0 = now();
            base = mmap(0, G, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (mode < 2)
                for (size_t o = 0; o < G; o += C2)
                    mmap(base + o, C2, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED | MAP_NORESERVE, chunk, 0);
            if (mode == 1) {
                struct uffdio_register rg = {.range = {(unsigned long)base, G}, .mode = UFFDIO_REGISTER_MODE_WP};
                if (ioctl(uffd, UFFDIO_REGISTER, &rg)) perror("register WP");
            }
            double t1 = now();
            volatile long s = 0;
            for (size_t i = 0; i < nt; i++) s += base[idx[i] * PS + 7];
            double t2 = now();
            printf("B rep %d %-40s: map %.2f ms, %zu reads %.2f ms (%.2f us/page)\n", rep, bn[mode],
                   (t1 - t0) * 1e3, nt, (t2 - t1) * 1e3, (t2 - t1) * 1e6 / nt);
            munmap(base, G);
        }
    return 0;
}
