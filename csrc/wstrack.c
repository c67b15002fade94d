/*
 * wstrack.c: the working-set window.
 *
 * Pages first touched since the mark are known for free: the fault path stamps their
 * first-touch order. Pages that were already present when the window opened cause no fault;
 * where the kernel has async write-protect (UFFD_FEATURE_WP_ASYNC, 6.7+), the mark
 * write-protects them and PAGEMAP_SCAN later lists those written since. Reads of pages that
 * were present at the mark are invisible: docs/design.md, "Working sets".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#include "lm_internal.h"

/* PAGEMAP_SCAN (linux/fs.h, 6.7); spelled out for older headers. */
struct lm_pm_scan_arg {
    uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
    uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
struct lm_page_region {
    uint64_t start, end, categories;
};
#define LM_PAGEMAP_SCAN _IOWR('f', 16, struct lm_pm_scan_arg)
#define LM_PM_SCAN_WP_MATCHING (1u << 0)
#define LM_PM_SCAN_CHECK_WPASYNC (1u << 1)
#define LM_PAGE_IS_WRITTEN (1u << 1)
#define LM_PAGE_IS_PRESENT (1u << 3)

int lm_ws_init(struct lm_region *r, uint64_t api_features)
{
    r->ws_mark_seq = 1;
    r->wp_async = false;
    if (!(api_features & UFFD_FEATURE_WP_ASYNC_BIT))
        return 0;
    r->pagemap_fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    r->wp_async = r->pagemap_fd >= 0;   /* without it the window sees first touches only */
    return 0;
}

void lm_ws_close(struct lm_region *r)
{
    if (r->pagemap_fd >= 0)
        close(r->pagemap_fd);
    r->pagemap_fd = -1;
}

int lm_ws_tracks_writes(struct lm_region *r)
{
    return r->wp_async;
}

/* One PAGEMAP_SCAN call from *start; advances *start to where the walk stopped. */
static int scan(struct lm_region *r, uint64_t flags, uint64_t mask, struct lm_page_region *vec,
                size_t veclen, size_t *nvec_out, uint64_t *start)
{
    struct lm_pm_scan_arg a = {
        .size = sizeof(a),
        .flags = flags,
        .start = *start,
        .end = (uintptr_t)r->base + r->nbytes,
        .vec = (uintptr_t)vec,
        .vec_len = veclen,
        .category_mask = mask,
        .return_mask = mask,
    };
    long n = ioctl(r->pagemap_fd, LM_PAGEMAP_SCAN, &a);
    if (n < 0)
        return LM_FAIL("ioctl(PAGEMAP_SCAN)");
    *nvec_out = (size_t)n;
    *start = a.walk_end;
    return 0;
}

int lm_ws_mark(struct lm_region *r)
{
    r->ws_mark_seq = atomic_load(&r->touch_seq);
    if (!r->wp_async)
        return 0;
    struct lm_page_region vec[64];
    uint64_t start = (uintptr_t)r->base, end = start + r->nbytes;
    /* Blocks mapped from a canonical chunk are registered without WP (region.c says why):
       the scan passes over them instead of failing (CHECK_WPASYNC would refuse the region). */
    uint64_t check = atomic_load(&r->chunk_vmas) ? 0 : LM_PM_SCAN_CHECK_WPASYNC;
    while (start < end) {
        size_t n;
        int rc = scan(r, LM_PM_SCAN_WP_MATCHING | check, LM_PAGE_IS_PRESENT, vec, 64, &n,
                      &start);
        if (rc < 0)
            return rc;
    }
    return 0;
}

static int by_order(const void *a, const void *b)
{
    const uint64_t *x = a, *y = b;
    return x[0] < y[0] ? -1 : x[0] > y[0];
}

long lm_ws_collect(struct lm_region *r, uint64_t *out, size_t cap)
{
    size_t n = 0;
    /* First touches since the mark, in touch order: (order, page) pairs sorted. */
    size_t touched = 0;
    for (size_t p = 0; p < r->npages; p++)
        if (r->meta[p].order >= r->ws_mark_seq)
            touched++;
    /* Orders are unique sequence numbers below touch_seq: when they are dense enough, place
       each page at its order's slot (one pass) instead of sorting (qsort was ~18 ms of a
       1 GiB checkpoint's 140). */
    uint64_t span = atomic_load(&r->touch_seq) - r->ws_mark_seq + 1;
    if (touched && span <= 4 * (uint64_t)touched + 4096) {
        uint64_t *slot = malloc(span * sizeof(uint64_t));
        if (!slot)
            return lm_fail("malloc(working set)", ENOMEM);
        memset(slot, 0xff, span * sizeof(uint64_t));
        bool dense = true;
        for (size_t p = 0; p < r->npages; p++) {
            uint64_t o = r->meta[p].order;
            if (o < r->ws_mark_seq)
                continue;
            uint64_t i = o - r->ws_mark_seq;
            if (i >= span || slot[i] != UINT64_MAX) {
                dense = false;   /* a touch after the count above, or a repeated order */
                break;
            }
            slot[i] = p;
        }
        if (dense) {
            for (uint64_t i = 0; i < span && n < cap; i++)
                if (slot[i] != UINT64_MAX)
                    out[n++] = slot[i];
            free(slot);
            goto written;
        }
        free(slot);
    }
    uint64_t *pairs = malloc((touched ? touched : 1) * 2 * sizeof(uint64_t));
    if (!pairs)
        return lm_fail("malloc(working set)", ENOMEM);
    size_t k = 0;
    for (size_t p = 0; p < r->npages && k < touched; p++) {
        uint64_t o = r->meta[p].order;
        if (o >= r->ws_mark_seq) {
            pairs[2 * k] = o;
            pairs[2 * k + 1] = p;
            k++;
        }
    }
    qsort(pairs, k, 2 * sizeof(uint64_t), by_order);
    for (size_t i = 0; i < k && n < cap; i++)
        out[n++] = pairs[2 * i + 1];
    free(pairs);
written:
    if (!r->wp_async)
        return (long)n;

    /* Then pages present before the mark and written since, in address order. */
    struct lm_page_region vec[256];
    uint64_t start = (uintptr_t)r->base, end = start + r->nbytes;
    while (start < end && n < cap) {
        size_t nv = 0;
        int rc = scan(r, 0, LM_PAGE_IS_WRITTEN | LM_PAGE_IS_PRESENT, vec, 256, &nv, &start);
        if (rc < 0)
            return rc;
        for (size_t v = 0; v < nv; v++) {
            for (uint64_t a = vec[v].start; a < vec[v].end && n < cap; a += r->page_size) {
                size_t p = (a - (uintptr_t)r->base) >> r->page_shift;
                uint64_t o = r->meta[p].order;
                if (o && o >= r->ws_mark_seq)
                    continue;   /* already listed as a first touch */
                /* Not write-protected (a chunk block): every present page reads as written.
                   Writes there are seen only as first touches, like a shared restore's. */
                const uint32_t *chunk_of = atomic_load(&r->chunk_of);
                if (chunk_of && chunk_of[p / r->blk_pages])
                    continue;
                out[n++] = p;
            }
        }
    }
    return (long)n;
}

/*
 * Pages of a shared region that hold private memory (docs/shared-pages.md 1.5, 4.1): a store
 * to a page mapped from the pool copies it into an anonymous page, which the kernel does not
 * tell us about; /proc/self/pagemap does (bit 61, "file page or shared anon", is clear for a
 * private copy). fn(r, page) is called for every page present or swapped that is not a file
 * page; the caller decides which of them it cares about (pages it mapped from the pool).
 * Reading pagemap works on every kernel (PAGEMAP_SCAN needs 6.7); ~20 ms per mapped GiB.
 */
#define PM_CHUNK 4096

static int pagemap_read(int fd, struct lm_region *r, size_t first, size_t n, uint64_t *e)
{
    size_t base = (uintptr_t)r->base >> r->page_shift;
    size_t want = n * sizeof(uint64_t), got = 0;
    while (got < want) {
        ssize_t k = pread(fd, (char *)e + got, want - got,
                          (off_t)((base + first) * sizeof(uint64_t) + got));
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return k < 0 ? LM_FAIL("pread(/proc/self/pagemap)")
                         : lm_fail("pread(/proc/self/pagemap): short read", EIO);
        got += (size_t)k;
    }
    return 0;
}

int lm_ws_pagemap(struct lm_region *r, size_t first, size_t n, uint64_t *out)
{
    int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return LM_FAIL("open(/proc/self/pagemap)");
    int rc = pagemap_read(fd, r, first, n, out);
    close(fd);
    return rc;
}

int lm_ws_scan_private(struct lm_region *r, void (*fn)(struct lm_region *, size_t))
{
    int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return LM_FAIL("open(/proc/self/pagemap)");
    uint64_t *e = malloc(PM_CHUNK * sizeof(uint64_t));
    int rc = e ? 0 : lm_fail("malloc(pagemap)", ENOMEM);
    for (size_t p = 0; p < r->npages && rc == 0; p += PM_CHUNK) {
        size_t n = r->npages - p < PM_CHUNK ? r->npages - p : PM_CHUNK;
        if ((rc = pagemap_read(fd, r, p, n, e)) < 0)
            break;
        for (size_t i = 0; i < n; i++)
            if ((e[i] & (LM_PM_PRESENT | LM_PM_SWAPPED)) && !(e[i] & LM_PM_FILE))
                fn(r, p + i);
    }
    free(e);
    close(fd);
    return rc;
}

/*
 * Where the region's pages are, from the page tables: counts[0] mapped shared pages (file
 * pages: a pool or another memfd, not copied), [1] private pages (anonymous: copies, written
 * pages), [2] pages mapping the kernel's zero page, [3] pages not mapped. PAGEMAP_SCAN tells
 * the zero page apart (6.7+); reading /proc/self/pagemap, the fallback, counts it as private.
 */
#define LM_PAGE_IS_FILE (1u << 2)
#define LM_PAGE_IS_SWAPPED (1u << 4)
#define LM_PAGE_IS_PFNZERO (1u << 5)

int lm_page_counts(struct lm_region *r, uint64_t *counts)
{
    memset(counts, 0, 4 * sizeof(uint64_t));
    int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return LM_FAIL("open(/proc/self/pagemap)");
    struct lm_page_region vec[256];
    uint64_t mask = LM_PAGE_IS_PRESENT | LM_PAGE_IS_SWAPPED | LM_PAGE_IS_FILE | LM_PAGE_IS_PFNZERO;
    uint64_t start = (uintptr_t)r->base, end = start + r->nbytes, seen = 0;
    while (start < end) {
        struct lm_pm_scan_arg a = {
            .size = sizeof(a), .start = start, .end = end, .vec = (uintptr_t)vec,
            .vec_len = 256, .category_anyof_mask = LM_PAGE_IS_PRESENT | LM_PAGE_IS_SWAPPED,
            .return_mask = mask,
        };
        long n = ioctl(fd, LM_PAGEMAP_SCAN, &a);
        if (n < 0) {
            close(fd);
            if (errno != ENOTTY && errno != EINVAL)
                return LM_FAIL("ioctl(PAGEMAP_SCAN)");
            return lm_fail("page counts need PAGEMAP_SCAN (Linux 6.7)", EOPNOTSUPP);
        }
        for (long v = 0; v < n; v++) {
            uint64_t pages = (vec[v].end - vec[v].start) >> r->page_shift;
            uint64_t c = vec[v].categories;
            counts[c & LM_PAGE_IS_PFNZERO ? 2 : c & LM_PAGE_IS_FILE ? 0 : 1] += pages;
            seen += pages;
        }
        start = a.walk_end;
    }
    close(fd);
    counts[3] = r->npages - seen;
    return 0;
}
