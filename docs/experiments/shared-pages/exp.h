/* Helpers shared by the shared-pages experiments (not product code). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
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
#define DIE(...) do { fprintf(stderr, __VA_ARGS__); fprintf(stderr, ": %s\n", strerror(errno)); exit(1); } while (0)

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

static inline int uffd_new(uint64_t features, uint64_t *got)
{
    int fd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        DIE("userfaultfd");
    struct uffdio_api api = {.api = UFFD_API, .features = features};
    if (ioctl(fd, UFFDIO_API, &api))
        DIE("UFFDIO_API features 0x%llx", (unsigned long long)features);
    if (got)
        *got = api.features;
    return fd;
}

static inline int uffd_reg(int fd, void *a, size_t len, uint64_t mode, uint64_t *ioctls)
{
    struct uffdio_register r = {.range = {(uintptr_t)a, len}, .mode = mode};
    int rc = ioctl(fd, UFFDIO_REGISTER, &r);
    if (ioctls)
        *ioctls = r.ioctls;
    return rc ? -errno : 0;
}

/* returns bytes done (>=0) and sets *err to 0 / -errno */
static inline long uffd_copy(int fd, void *dst, const void *src, size_t len, int dontwake, int *err)
{
    struct uffdio_copy c = {.dst = (uintptr_t)dst, .src = (uintptr_t)src, .len = len,
                            .mode = dontwake ? UFFDIO_COPY_MODE_DONTWAKE : 0};
    int rc = ioctl(fd, UFFDIO_COPY, &c);
    *err = rc ? -errno : 0;
    return c.copy;
}

static inline long uffd_continue(int fd, void *dst, size_t len, int dontwake, int *err)
{
    struct uffdio_continue c = {.range = {(uintptr_t)dst, len},
                                .mode = dontwake ? UFFDIO_CONTINUE_MODE_DONTWAKE : 0};
    int rc = ioctl(fd, UFFDIO_CONTINUE, &c);
    *err = rc ? -errno : 0;
    return c.mapped;
}

static inline long uffd_zeropage(int fd, void *dst, size_t len, int *err)
{
    struct uffdio_zeropage z = {.range = {(uintptr_t)dst, len}, .mode = 0};
    int rc = ioctl(fd, UFFDIO_ZEROPAGE, &z);
    *err = rc ? -errno : 0;
    return z.zeropage;
}

/* PAGEMAP_SCAN (linux/fs.h 6.7), spelled out */
struct pm_page_region { uint64_t start, end, categories; };
struct pm_scan_arg {
    uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
    uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
#define PAGEMAP_SCAN_IOC _IOWR('f', 16, struct pm_scan_arg)
#define PAGE_IS_WPALLOWED (1 << 0)
#define PAGE_IS_WRITTEN (1 << 1)
#define PAGE_IS_FILE (1 << 2)
#define PAGE_IS_PRESENT (1 << 3)
#define PAGE_IS_SWAPPED (1 << 4)
#define PAGE_IS_PFNZERO (1 << 5)
#define PAGE_IS_HUGE (1 << 6)
#define PAGE_IS_SOFT_DIRTY (1 << 7)

static inline long pss_kb(pid_t pid)
{
    char p[64], line[256];
    snprintf(p, sizeof p, "/proc/%d/smaps_rollup", (int)pid);
    FILE *f = fopen(p, "r");
    if (!f)
        return -1;
    long v = -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "Pss: %ld kB", &v) == 1)
            break;
    fclose(f);
    return v;
}
