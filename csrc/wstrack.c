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

int lm_ws_init(struct lm_region *r, uint64_t api_features)
{
    r->ws_mark_seq = 1;
    /* The write-protect state (and the pagemap fd) is dirty.c's: it harvests for both. */
    return lm_dirty_init(r, api_features);
}

void lm_ws_close(struct lm_region *r)
{
    lm_dirty_close(r);
}

int lm_ws_tracks_writes(struct lm_region *r)
{
    return r->wp_async;
}

int lm_ws_mark(struct lm_region *r)
{
    r->ws_mark_seq = atomic_load(&r->touch_seq);
    /* Re-protecting the present pages goes through the harvest: the stores it finds still
       count for dirty tracking (a plain WP_MATCHING pass here used to drop them). */
    return lm_dirty_harvest(r, LM_HARVEST_RESET_WS);
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
    int rc = lm_dirty_harvest(r, 0);
    if (rc < 0)
        return rc;
    const uint32_t *chunk_of = atomic_load(&r->chunk_of);
    for (size_t w = 0; w < (r->npages + 63) / 64 && n < cap; w++) {
        uint64_t bits = atomic_load_explicit(&r->ws_written[w], memory_order_relaxed);
        while (bits && n < cap) {
            size_t p = w * 64 + (size_t)__builtin_ctzll(bits);
            bits &= bits - 1;
            uint64_t o = r->meta[p].order;
            if (o && o >= r->ws_mark_seq)
                continue;   /* already listed as a first touch */
            /* Chunk blocks are not write-protected: writes there are seen only as first
               touches, like a shared restore's (a bit from before the block was mapped). */
            if (chunk_of && p / r->blk_pages < r->nblocks && chunk_of[p / r->blk_pages])
                continue;
            out[n++] = p;
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
