/*
 * _baseline.c: the simplest correct userfaultfd MISSING handler, used by the benchmarks as
 * the yardstick for pylazymem's fault path.
 *
 * One region (private anonymous, MADV_NOHUGEPAGE, registered for MISSING faults), one
 * serving thread (optionally pinned to one CPU) that loops:
 *     poll(uffd, stopfd) -> read() one message -> UFFDIO_COPY one page from a fixed source page
 * Nothing else: no metadata, no readahead, no statistics beyond a fault counter.
 *
 * Compiled at benchmark time through cffi (see _baseline.py); not part of the package's C core.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/userfaultfd.h>

#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif

typedef struct bl_handler bl_handler;

struct bl_handler {
    char *addr;            /* the registered region */
    size_t len;            /* its length in bytes (multiple of the page size) */
    size_t page;           /* page size */
    char *src;             /* the fixed source page (page-aligned, its own mapping) */
    int uffd;              /* O_NONBLOCK userfaultfd */
    int stopfd;            /* eventfd: written once to stop the thread */
    int cpu;               /* CPU the thread is pinned to, -1 = unpinned */
    int started;           /* the thread exists and has not been joined */
    pthread_t thread;
    uint64_t faults;       /* page faults served (written by the thread only) */
    int error;             /* first unexpected errno seen by the thread (0 = none) */
};

static int open_uffd(void)
{
    int flags = O_CLOEXEC | O_NONBLOCK;  /* poll() on a blocking uffd reports POLLERR */
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev >= 0) {
        int fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
        close(dev);
        if (fd >= 0)
            return fd;
    }
    return (int)syscall(SYS_userfaultfd, flags);
}

static void *serve(void *arg)
{
    struct bl_handler *h = arg;
    struct pollfd pfd[2] = {
        { .fd = h->uffd, .events = POLLIN },
        { .fd = h->stopfd, .events = POLLIN },
    };
    for (;;) {
        if (poll(pfd, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            h->error = errno;
            break;
        }
        if (pfd[1].revents)
            break;
        if (!(pfd[0].revents & POLLIN))
            continue;

        struct uffd_msg msg;
        ssize_t n = read(h->uffd, &msg, sizeof msg);
        if (n != (ssize_t)sizeof msg) {
            if (n < 0 && (errno == EAGAIN || errno == EINTR))
                continue;
            h->error = n < 0 ? errno : EIO;
            break;
        }
        if (msg.event != UFFD_EVENT_PAGEFAULT)
            continue;

        struct uffdio_copy copy = {
            .dst = msg.arg.pagefault.address & ~(uint64_t)(h->page - 1),
            .src = (uint64_t)(uintptr_t)h->src,
            .len = h->page,
            .mode = 0,
        };
        while (ioctl(h->uffd, UFFDIO_COPY, &copy) < 0) {
            if (errno == EEXIST)           /* already resolved: the faulter is woken anyway */
                break;
            if (errno == EAGAIN) {         /* partial copy or mapping change: retry the rest */
                if (copy.copy > 0) {
                    copy.dst += copy.copy;
                    copy.src += copy.copy;
                    copy.len -= copy.copy;
                }
                copy.copy = 0;
                continue;
            }
            if (!h->error)
                h->error = errno;
            break;
        }
        h->faults++;
    }
    return NULL;
}

/* Free everything that exists; safe on a half-built handler. */
static void destroy(struct bl_handler *h)
{
    if (h->uffd >= 0)
        close(h->uffd);         /* closing the uffd unregisters the range */
    if (h->stopfd >= 0)
        close(h->stopfd);
    if (h->addr)
        munmap(h->addr, h->len);
    if (h->src)
        munmap(h->src, h->page);
    free(h);
}

/*
 * Create a region of nbytes (rounded up to pages) whose missing pages read as a copy of
 * `page` (page-size bytes; NULL = a page of 0x5a), served by one thread pinned to `cpu`
 * (-1 = unpinned, the thread inherits the caller's affinity). Returns NULL and sets *err
 * to a positive errno on failure.
 */
struct bl_handler *bl_create(size_t nbytes, const void *page, int cpu, int *err)
{
    struct bl_handler *h = calloc(1, sizeof *h);
    int e = 0;
    if (!h) {
        *err = ENOMEM;
        return NULL;
    }
    h->uffd = h->stopfd = -1;
    h->cpu = cpu;
    h->page = (size_t)sysconf(_SC_PAGESIZE);
    h->len = (nbytes + h->page - 1) & ~(h->page - 1);
    if (h->len == 0) {
        e = EINVAL;
        goto fail;
    }

    h->src = mmap(NULL, h->page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (h->src == MAP_FAILED) {
        h->src = NULL;
        e = errno;
        goto fail;
    }
    if (page)
        memcpy(h->src, page, h->page);
    else
        memset(h->src, 0x5a, h->page);

    h->addr = mmap(NULL, h->len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (h->addr == MAP_FAILED) {
        h->addr = NULL;
        e = errno;
        goto fail;
    }
    madvise(h->addr, h->len, MADV_NOHUGEPAGE);

    if ((h->uffd = open_uffd()) < 0) {
        e = errno;
        goto fail;
    }
    struct uffdio_api api = { .api = UFFD_API, .features = 0 };
    if (ioctl(h->uffd, UFFDIO_API, &api) < 0) {
        e = errno;
        goto fail;
    }
    struct uffdio_register reg = {
        .range = { .start = (uint64_t)(uintptr_t)h->addr, .len = h->len },
        .mode = UFFDIO_REGISTER_MODE_MISSING,
    };
    if (ioctl(h->uffd, UFFDIO_REGISTER, &reg) < 0) {
        e = errno;
        goto fail;
    }
    if ((h->stopfd = eventfd(0, EFD_CLOEXEC)) < 0) {
        e = errno;
        goto fail;
    }

    pthread_attr_t attr;
    pthread_attr_init(&attr);
    if (cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(cpu, &set);
        e = pthread_attr_setaffinity_np(&attr, sizeof set, &set);
    }
    if (!e)
        e = pthread_create(&h->thread, &attr, serve, h);
    pthread_attr_destroy(&attr);
    if (e)
        goto fail;
    h->started = 1;
    return h;

fail:
    destroy(h);
    *err = e ? e : EIO;
    return NULL;
}

uintptr_t bl_address(struct bl_handler *h) { return (uintptr_t)h->addr; }
size_t bl_length(struct bl_handler *h) { return h->len; }
uint64_t bl_faults(struct bl_handler *h) { return h->faults; }
int bl_error(struct bl_handler *h) { return h->error; }

/* Stop and join the serving thread (idempotent). Touching a missing page afterwards hangs. */
int bl_stop(struct bl_handler *h)
{
    if (!h->started)
        return 0;
    uint64_t one = 1;
    if (write(h->stopfd, &one, sizeof one) != (ssize_t)sizeof one)
        return -errno;
    int e = pthread_join(h->thread, NULL);
    h->started = 0;
    return -e;
}

/* Stop the thread, unregister, unmap, free. */
void bl_destroy(struct bl_handler *h)
{
    if (!h)
        return;
    bl_stop(h);
    destroy(h);
}
