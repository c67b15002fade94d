/*
 * uffd.c: acquiring a userfaultfd and the ioctls the fault path uses.
 *
 * The acquisition order is fixed by what each path can serve: /dev/userfaultfd gives full
 * mode to anyone allowed to open the device; the syscall gives full mode to privileged callers
 * (or with vm.unprivileged_userfaultfd=1); UFFD_USER_MODE_ONLY works unprivileged but kernel
 * accesses to missing pages (read() into the region, KVM) then fail with EFAULT.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "lm_internal.h"

static int open_dev(void)
{
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0)
        return -errno;
    int fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
    int err = errno;
    close(dev);
    return fd < 0 ? -err : fd;
}

static int open_syscall(int extra)
{
#ifdef SYS_userfaultfd
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | extra);
    return fd < 0 ? -errno : fd;
#else
    (void)extra;
    return -ENOSYS;
#endif
}

int lm_uffd_open(int acquire, int *mode, int *source, struct lm_features *why)
{
    int fd;
    *mode = LM_MODE_UNAVAILABLE;
    *source = LM_SRC_NONE;
    if (acquire == LM_ACQ_AUTO || acquire == LM_ACQ_DEV) {
        fd = open_dev();
        if (fd >= 0) {
            *mode = LM_MODE_FULL;
            *source = LM_SRC_DEV;
            return fd;
        }
        why->dev_errno = -fd;
    }
    if (acquire == LM_ACQ_AUTO || acquire == LM_ACQ_SYSCALL) {
        fd = open_syscall(0);
        if (fd >= 0) {
            *mode = LM_MODE_FULL;
            *source = LM_SRC_SYSCALL;
            return fd;
        }
        why->syscall_errno = -fd;
    }
    if (acquire == LM_ACQ_AUTO || acquire == LM_ACQ_USER_ONLY) {
        fd = open_syscall(UFFD_USER_MODE_ONLY);
        if (fd >= 0) {
            *mode = LM_MODE_USER_ONLY;
            *source = LM_SRC_SYSCALL;
            return fd;
        }
        why->user_only_errno = -fd;
    }
    /* Report the most telling error: a permission problem beats "not built in". */
    int err = why->user_only_errno ? why->user_only_errno
              : why->syscall_errno ? why->syscall_errno : why->dev_errno;
    if (why->dev_errno == EACCES || why->dev_errno == EPERM)
        err = why->dev_errno;
    return lm_fail("userfaultfd", err ? err : ENOSYS);
}

int lm_uffd_api(int fd, uint64_t want, uint64_t *features, uint64_t *ioctls)
{
    /* With want = 0 the kernel answers with everything it supports. */
    struct uffdio_api api = {.api = UFFD_API, .features = want};
    if (ioctl(fd, UFFDIO_API, &api) < 0)
        return LM_FAIL("ioctl(UFFDIO_API)");
    *features = api.features;
    *ioctls = api.ioctls;
    return 0;
}

int lm_probe(int acquire, struct lm_features *out)
{
    memset(out, 0, sizeof(*out));
    int fd = lm_uffd_open(acquire, &out->mode, &out->source, out);
    if (fd < 0)
        return 0;   /* "unavailable" is an answer, not a failure of the probe */
    int rc = lm_uffd_api(fd, 0, &out->api_features, &out->ioctls);
    if (rc < 0) {
        out->api_errno = -rc;
        out->mode = LM_MODE_UNAVAILABLE;
    }
    close(fd);
    return 0;
}

/* What a shared region needs, tried on one page: the feature, a memfd, and a MISSING | MINOR
   registration of a private mapping of it that offers CONTINUE (lm_region_share). */
int lm_probe_shared(int acquire)
{
    struct lm_features why = {0};
    int mode, source, rc;
    size_t ps = (size_t)lm_page_size();
    int fd = lm_uffd_open(acquire, &mode, &source, &why);
    if (fd < 0)
        return fd;
    uint64_t features = 0, ioctls = 0;
    if ((rc = lm_uffd_api(fd, 0, &features, &ioctls)) < 0)
        goto out;
    if (!(features & UFFD_FEATURE_MINOR_SHMEM)) {
        rc = lm_fail("the kernel has no UFFD_FEATURE_MINOR_SHMEM (needs Linux 5.14)",
                     EOPNOTSUPP);
        goto out;
    }
    close(fd);   /* UFFDIO_API is once per uffd: a second one asks for the feature */
    if ((fd = lm_uffd_open(acquire, &mode, &source, &why)) < 0)
        return fd;
    if ((rc = lm_uffd_api(fd, UFFD_FEATURE_MINOR_SHMEM, &features, &ioctls)) < 0)
        goto out;
    int mfd = memfd_create("pylazymem-probe", MFD_CLOEXEC);
    if (mfd < 0) {
        rc = LM_FAIL("memfd_create");
        goto out;
    }
    void *p = MAP_FAILED;
    if (ftruncate(mfd, (off_t)ps) < 0)
        rc = LM_FAIL("ftruncate(memfd)");
    else if ((p = mmap(NULL, ps, PROT_NONE, MAP_PRIVATE | MAP_NORESERVE, mfd, 0)) == MAP_FAILED)
        rc = LM_FAIL("mmap(memfd, MAP_PRIVATE)");
    else
        rc = lm_uffd_register(fd, p, ps,
                              UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR);
    if (p != MAP_FAILED)
        munmap(p, ps);
    close(mfd);
out:
    close(fd);
    return rc;
}

/* Undo a registration (the kernel wakes the faults pending in the range: they retry). */
int lm_uffd_unregister(int fd, void *addr, size_t len)
{
    struct uffdio_range range = {.start = (uintptr_t)addr, .len = len};
    if (ioctl(fd, UFFDIO_UNREGISTER, &range) < 0)
        return LM_FAIL("ioctl(UFFDIO_UNREGISTER)");
    return 0;
}

int lm_uffd_register(int fd, void *addr, size_t len, uint64_t mode)
{
    struct uffdio_register reg = {
        .range = {.start = (uintptr_t)addr, .len = len},
        .mode = mode,
    };
    if (ioctl(fd, UFFDIO_REGISTER, &reg) < 0)
        return LM_FAIL("ioctl(UFFDIO_REGISTER)");
    if (!(reg.ioctls & ((uint64_t)1 << _UFFDIO_COPY)) ||
        !(reg.ioctls & ((uint64_t)1 << _UFFDIO_ZEROPAGE)))
        return lm_fail("ioctl(UFFDIO_REGISTER): COPY/ZEROPAGE not offered", ENOTSUP);
    if ((mode & UFFDIO_REGISTER_MODE_MINOR) && !(reg.ioctls & ((uint64_t)1 << _UFFDIO_CONTINUE)))
        return lm_fail("ioctl(UFFDIO_REGISTER): CONTINUE not offered", ENOTSUP);
    return 0;
}

/* One fill ioctl over [dst, dst+len): 0 or errno; *progress = bytes filled before it stopped. */
typedef int (*fill_op)(int fd, char *dst, const char *src, size_t len, bool wake,
                       int64_t *progress);

static int op_copy(int fd, char *dst, const char *src, size_t len, bool wake, int64_t *progress)
{
    struct uffdio_copy c = {
        .dst = (uintptr_t)dst, .src = (uintptr_t)src, .len = len,
        .mode = wake ? 0 : UFFDIO_COPY_MODE_DONTWAKE,
    };
    int rc = ioctl(fd, UFFDIO_COPY, &c) == 0 ? 0 : errno;
    *progress = rc ? c.copy : (int64_t)len;
    return rc;
}

/* UFFDIO_COPY with the uffd-wp bit set on the new page-table entries: where the region is
   registered for async write-protect, the page then counts as not written (dirty.c). */
static int op_copy_wp(int fd, char *dst, const char *src, size_t len, bool wake,
                      int64_t *progress)
{
    struct uffdio_copy c = {
        .dst = (uintptr_t)dst, .src = (uintptr_t)src, .len = len,
        .mode = UFFDIO_COPY_MODE_WP | (wake ? 0 : UFFDIO_COPY_MODE_DONTWAKE),
    };
    int rc = ioctl(fd, UFFDIO_COPY, &c) == 0 ? 0 : errno;
    *progress = rc ? c.copy : (int64_t)len;
    return rc;
}

static int op_zeropage(int fd, char *dst, const char *src, size_t len, bool wake,
                       int64_t *progress)
{
    (void)src;
    struct uffdio_zeropage z = {
        .range = {.start = (uintptr_t)dst, .len = len},
        .mode = wake ? 0 : UFFDIO_ZEROPAGE_MODE_DONTWAKE,
    };
    int rc = ioctl(fd, UFFDIO_ZEROPAGE, &z) == 0 ? 0 : errno;
    *progress = rc ? z.zeropage : (int64_t)len;
    return rc;
}

/*
 * Fill `len` bytes of missing pages. A page some other path filled meanwhile (EEXIST) is
 * skipped, not an error; a partial fill because the mm is changing (EAGAIN) is retried from
 * where the kernel stopped, or, without retry_eagain, returned: a handler that receives
 * non-cooperative events must read the pending one before any fill can succeed.
 */
static int fill_counted(int fd, fill_op op, const char *name, char *dst, const char *src,
                        size_t len, bool wake, bool retry_eagain, size_t *done_out,
                        size_t *skipped_out);

static int fill(int fd, fill_op op, const char *name, char *dst, const char *src, size_t len,
                bool wake, bool retry_eagain, size_t *done_out)
{
    return fill_counted(fd, op, name, dst, src, len, wake, retry_eagain, done_out, NULL);
}

/* fill, also saying how many bytes were stepped over as already there (EEXIST). */
static int fill_counted(int fd, fill_op op, const char *name, char *dst, const char *src,
                        size_t len, bool wake, bool retry_eagain, size_t *done_out,
                        size_t *skipped_out)
{
    size_t done = 0, ps = (size_t)lm_page_size();
    size_t dummy;
    if (!done_out)
        done_out = &dummy;
    *done_out = 0;
    bool skipped = false;
    while (done < len) {
        int64_t progress = 0;
        int err = op(fd, dst + done, src ? src + done : NULL, len - done, wake, &progress);
        if (progress > 0)
            done += (size_t)progress;
        *done_out = done;
        if (!err || (err == EAGAIN && retry_eagain))
            continue;
        if (err != EEXIST)
            return lm_fail(name, err);
        done += ps;   /* this page is already there */
        *done_out = done;
        skipped = true;
        if (skipped_out)
            *skipped_out += ps;
    }
    /* A wake-up may have been skipped with the page we stepped over. */
    if (skipped && wake)
        return lm_uffd_wake(fd, dst, len);
    return 0;
}

/* UFFDIO_CONTINUE: map the pages the shared memory behind a MINOR-registered range already
   holds. Over a range with a hole (a page the memory does not hold) the kernel maps the pages
   before it and says EAGAIN; the retry, starting at the hole, fails with EFAULT, which is
   returned: the caller publishes holes before it continues (fill.c). */
static int op_continue(int fd, char *dst, const char *src, size_t len, bool wake,
                       int64_t *progress)
{
    (void)src;
    struct uffdio_continue c = {
        .range = {.start = (uintptr_t)dst, .len = len},
        .mode = wake ? 0 : UFFDIO_CONTINUE_MODE_DONTWAKE,
    };
    int rc = ioctl(fd, UFFDIO_CONTINUE, &c) == 0 ? 0 : errno;
    *progress = rc ? c.mapped : (int64_t)len;
    return rc;
}

int lm_uffd_continue(int fd, void *dst, size_t len, bool wake, size_t *done)
{
    return fill(fd, op_continue, "ioctl(UFFDIO_CONTINUE)", dst, NULL, len, wake, true, done);
}

int lm_uffd_copy_counted(int fd, void *dst, const void *src, size_t len, size_t *done,
                         size_t *fresh)
{
    size_t skipped = 0, d = 0;
    int rc = fill_counted(fd, op_copy, "ioctl(UFFDIO_COPY)", dst, src, len, false, true, &d,
                          &skipped);
    if (rc == 0)
        d = len;
    if (done)
        *done = d;
    *fresh = (d - (skipped < d ? skipped : d));
    return rc;
}

int lm_uffd_copy(int fd, void *dst, const void *src, size_t len, bool wake, size_t *done)
{
    return fill(fd, op_copy, "ioctl(UFFDIO_COPY)", dst, src, len, wake, true, done);
}

int lm_uffd_copy_wp(int fd, void *dst, const void *src, size_t len, bool wake, size_t *done)
{
    return fill(fd, op_copy_wp, "ioctl(UFFDIO_COPY, MODE_WP)", dst, src, len, wake, true,
                done);
}

int lm_uffd_zeropage(int fd, void *dst, size_t len, bool wake, size_t *done)
{
    return fill(fd, op_zeropage, "ioctl(UFFDIO_ZEROPAGE)", dst, NULL, len, wake, true, done);
}

int lm_uffd_fill_or_eagain(int fd, void *dst, const void *src, size_t len)
{
    return src ? fill(fd, op_copy, "ioctl(UFFDIO_COPY)", dst, src, len, true, false, NULL)
               : fill(fd, op_zeropage, "ioctl(UFFDIO_ZEROPAGE)", dst, NULL, len, true, false,
                      NULL);
}

int lm_uffd_wake(int fd, void *addr, size_t len)
{
    struct uffdio_range range = {.start = (uintptr_t)addr, .len = len};
    if (ioctl(fd, UFFDIO_WAKE, &range) < 0)
        return LM_FAIL("ioctl(UFFDIO_WAKE)");
    return 0;
}

/* Make an access to the range fail with SIGBUS: how an unservable fault fails loudly. */
/* DONTWAKE: the caller wakes the faulters once the record says POISONED, so that a woken
   faulter (and whoever reads r.meta after its SIGBUS) never sees the page still BUSY. */
int lm_uffd_poison(int fd, void *addr, size_t len)
{
    struct uffdio_poison p = {.range = {.start = (uintptr_t)addr, .len = len},
                              .mode = UFFDIO_POISON_MODE_DONTWAKE};
    if (ioctl(fd, UFFDIO_POISON, &p) < 0 && errno != EEXIST)
        return LM_FAIL("ioctl(UFFDIO_POISON)");
    return 0;
}

int lm_probe_huge_shared(void)
{
    const size_t block = (size_t)2 << 20;
    /* Blocks are 2 MiB (region.c): a PMD of another size (16 or 64 KiB pages) maps none. */
    FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size", "r");
    unsigned long pmd = 0;
    if (f) {
        if (fscanf(f, "%lu", &pmd) != 1)
            pmd = 0;
        fclose(f);
    }
    if (pmd != block)
        return lm_fail(pmd ? "huge pages here are not 2 MiB (hpage_pmd_size)"
                           : "no transparent huge pages (no hpage_pmd_size)", EOPNOTSUPP);
    int rc = 0, mfd = memfd_create("pylazymem-probe", MFD_CLOEXEC);
    if (mfd < 0)
        return LM_FAIL("memfd_create");
    static const char one = 1;
    char *p = MAP_FAILED;
    if (ftruncate(mfd, (off_t)block) < 0)
        rc = LM_FAIL("ftruncate(memfd)");
    else if (pwrite(mfd, &one, 1, 0) != 1)   /* a range without any page is refused */
        rc = LM_FAIL("pwrite(memfd)");
    else if ((p = lm_map_aligned(block, PROT_READ, MAP_SHARED, mfd, 0)) == MAP_FAILED)
        rc = LM_FAIL("mmap(memfd)");
    else if (lm_collapse(p, block) != 1)   /* errno: the madvise's */
        rc = errno == EINVAL ? lm_fail("madvise(MADV_COLLAPSE) of shmem (needs Linux 6.1 and "
                                       "transparent_hugepage/shmem_enabled not \"deny\")",
                                       EOPNOTSUPP)
                             : LM_FAIL("madvise(MADV_COLLAPSE) of shmem");
    if (p != MAP_FAILED)
        munmap(p, block);
    close(mfd);
    return rc;
}
