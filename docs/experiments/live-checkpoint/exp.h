/* Helpers shared by the live-checkpoint experiments (issue 12, "Background"). Not product code:
   an experiment dies loudly on any unexpected error. The system headers here predate 6.7, so the
   newer uffd and PAGEMAP_SCAN definitions are spelled out. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PS 4096UL
#define GIB (1UL << 30)
#define DIE(...) do { fprintf(stderr, __VA_ARGS__); fprintf(stderr, ": %s\n", strerror(errno)); exit(1); } while (0)

#ifndef MREMAP_DONTUNMAP
#define MREMAP_DONTUNMAP 4
#endif
#define F_WP_UNPOPULATED (1ULL << 13)
#define F_POISON (1ULL << 14)
#define F_WP_ASYNC (1ULL << 15)
#define F_MOVE (1ULL << 16)

struct uffdio_move_x {
    uint64_t dst, src, len, mode;
    int64_t move;
};
#define UFFDIO_MOVE_X _IOWR(UFFDIO, 0x05, struct uffdio_move_x)
#define MOVE_DONTWAKE 1ULL
#define MOVE_ALLOW_SRC_HOLES 2ULL

struct pm_scan_arg {
    uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
    uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
struct page_region {
    uint64_t start, end, categories;
};
#define PAGEMAP_SCAN_X _IOWR('f', 16, struct pm_scan_arg)
#define PM_WP_MATCHING 1ULL
#define PM_CHECK_WPASYNC 2ULL
#define PAGE_IS_WPALLOWED (1ULL << 0)
#define PAGE_IS_WRITTEN (1ULL << 1)
#define PAGE_IS_PRESENT (1ULL << 3)

static inline double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static inline void pin(int cpu)
{
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(cpu, &s);
    sched_setaffinity(0, sizeof s, &s);
}

static inline int uffd_new(uint64_t features)
{
    int fd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        DIE("userfaultfd");
    struct uffdio_api api = {.api = UFFD_API, .features = features};
    if (ioctl(fd, UFFDIO_API, &api))
        DIE("UFFDIO_API features 0x%llx", (unsigned long long)features);
    return fd;
}

static inline void uffd_reg(int fd, void *a, size_t len, uint64_t mode)
{
    struct uffdio_register r = {.range = {(uintptr_t)a, len}, .mode = mode};
    if (ioctl(fd, UFFDIO_REGISTER, &r))
        DIE("UFFDIO_REGISTER mode %llu", (unsigned long long)mode);
}

static inline void uffd_unreg(int fd, void *a, size_t len)
{
    struct uffdio_range r = {(uintptr_t)a, len};
    if (ioctl(fd, UFFDIO_UNREGISTER, &r))
        DIE("UFFDIO_UNREGISTER");
}

static inline void uffd_wp(int fd, void *a, size_t len, bool on, bool wake)
{
    struct uffdio_writeprotect w = {
        .range = {(uintptr_t)a, len},
        /* WP together with DONTWAKE is EINVAL: protecting never wakes anyone */
        .mode = on ? UFFDIO_WRITEPROTECT_MODE_WP : (wake ? 0 : UFFDIO_WRITEPROTECT_MODE_DONTWAKE),
    };
    while (ioctl(fd, UFFDIO_WRITEPROTECT, &w))
        if (errno != EAGAIN)
            DIE("UFFDIO_WRITEPROTECT");
}

static inline void uffd_wake(int fd, void *a, size_t len)
{
    struct uffdio_range r = {(uintptr_t)a, len};
    if (ioctl(fd, UFFDIO_WAKE, &r))
        DIE("UFFDIO_WAKE");
}

/* UFFDIO_COPY of len bytes; pages already present (EEXIST) are stepped over. Returns the
   number of bytes this call installed. */
static inline size_t uffd_copy(int fd, void *dst, const void *src, size_t len, uint64_t mode)
{
    size_t done = 0, fresh = 0;
    while (done < len) {
        struct uffdio_copy c = {.dst = (uintptr_t)dst + done, .src = (uintptr_t)src + done,
                                .len = len - done, .mode = mode};
        int rc = ioctl(fd, UFFDIO_COPY, &c);
        if (c.copy > 0) {
            done += c.copy;
            fresh += c.copy;
        }
        if (rc == 0)
            break;
        if (errno == EEXIST)
            done += PS;
        else if (errno != EAGAIN)
            DIE("UFFDIO_COPY");
    }
    return fresh;
}

/* UFFDIO_MOVE of len bytes; a destination page already present (EEXIST) is stepped over (its
   source page stays where it is). Returns bytes moved. */
static inline size_t uffd_move(int fd, void *dst, void *src, size_t len, uint64_t mode)
{
    size_t done = 0, moved = 0;
    while (done < len) {
        struct uffdio_move_x m = {.dst = (uintptr_t)dst + done, .src = (uintptr_t)src + done,
                                  .len = len - done, .mode = mode};
        int rc = ioctl(fd, UFFDIO_MOVE_X, &m);
        if (m.move > 0) {
            done += m.move;
            moved += m.move;
        }
        if (rc == 0)
            break;
        if (errno == EEXIST)
            done += PS;
        else if (errno != EAGAIN)
            DIE("UFFDIO_MOVE");
    }
    return moved;
}

/* PAGEMAP_SCAN over [a, a+len) write-protecting the present pages (async WP). */
static inline void scan_wp(int pm, void *a, size_t len)
{
    struct page_region vec[64];
    uint64_t start = (uintptr_t)a, end = start + len;
    while (start < end) {
        struct pm_scan_arg s = {.size = sizeof s, .flags = PM_WP_MATCHING | PM_CHECK_WPASYNC,
                                .start = start, .end = end, .vec = (uintptr_t)vec, .vec_len = 64,
                                .category_mask = PAGE_IS_PRESENT, .return_mask = PAGE_IS_PRESENT};
        if (ioctl(pm, PAGEMAP_SCAN_X, &s) < 0)
            DIE("PAGEMAP_SCAN");
        start = s.walk_end;
    }
}

/* Count the pages of [a, a+len) that PAGEMAP_SCAN reports written (uffd-wp bit clear). */
static inline size_t scan_written(int pm, void *a, size_t len)
{
    struct page_region vec[256];
    uint64_t start = (uintptr_t)a, end = start + len;
    size_t n = 0;
    while (start < end) {
        struct pm_scan_arg s = {.size = sizeof s, .start = start, .end = end,
                                .vec = (uintptr_t)vec, .vec_len = 256,
                                .category_mask = PAGE_IS_WRITTEN | PAGE_IS_PRESENT,
                                .return_mask = PAGE_IS_WRITTEN | PAGE_IS_PRESENT};
        long k = ioctl(pm, PAGEMAP_SCAN_X, &s);
        if (k < 0)
            DIE("PAGEMAP_SCAN");
        for (long i = 0; i < k; i++)
            n += (vec[i].end - vec[i].start) / PS;
        start = s.walk_end;
    }
    return n;
}

/* A 1 GiB-aligned (or `align`-aligned) anonymous mapping of len bytes, like a pylazymem
   region: private, NORESERVE, no huge pages. */
static inline char *map_aligned(size_t len, size_t align, size_t skew)
{
    char *p = mmap(NULL, len + align + skew, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED)
        DIE("mmap reserve");
    char *a = (char *)(((uintptr_t)p + align - 1) & ~(align - 1)) + skew;
    char *q = mmap(a, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
    if (q == MAP_FAILED)
        DIE("mmap fixed");
    if (a > p)
        munmap(p, a - p);
    if (p + len + align + skew > a + len)
        munmap(a + len, p + len + align + skew - (a + len));
    madvise(a, len, MADV_NOHUGEPAGE);
    return a;
}

/* A reserved (PROT_NONE) aligned address for a staging area of len bytes. */
static inline char *reserve_aligned(size_t len, size_t align, size_t skew)
{
    char *p = mmap(NULL, len + align + skew, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED)
        DIE("mmap reserve");
    char *a = (char *)(((uintptr_t)p + align - 1) & ~(align - 1)) + skew;
    if (a > p)
        munmap(p, a - p);
    if (p + len + align + skew > a + len)
        munmap(a + len, p + len + align + skew - (a + len));
    return a;
}

static inline void fill_pattern(char *p, size_t len, uint64_t salt)
{
    for (size_t off = 0; off < len; off += PS)
        for (size_t w = 0; w < PS; w += 512)
            *(uint64_t *)(p + off + w) = (off / PS) * 1000003ULL + w + salt;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static inline double median(double *v, int n)
{
    qsort(v, n, sizeof(double), cmp_double);
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

static inline uint64_t xorshift(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}
