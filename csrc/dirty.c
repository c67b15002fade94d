/*
 * dirty.c: which pages may have changed since the epoch began (the last lm_dirty_reset: a
 * checkpoint or a restore), and the harvest of write-protect state that the working-set
 * window (wstrack.c) shares with it. docs/design.md, "Dirty tracking".
 *
 * The rule is no false negatives: a page whose contents changed is always reported; a page
 * reported without having changed costs the caller a hash, nothing else.
 *
 * Where the region is registered for async write-protect (UFFD_FEATURE_WP_ASYNC, 6.7), the
 * kernel clears a page's uffd-wp bit on the first store after it was protected, and
 * PAGEMAP_SCAN reports such a page WRITTEN. PM_SCAN_WP_MATCHING returns the written pages and
 * protects them again in one step per page-table entry, so a store lands either before (it is
 * returned now) or after (it is returned by the next scan): nothing in between. That is the
 * harvest, and it is the only place that protects pages: whatever protects pages without
 * keeping what it found would lose writes (lm_ws_mark once did). Each harvest ORs the written
 * pages into two bitmaps: `dirty` (since lm_dirty_reset) and `ws_written` (since lm_ws_mark).
 *
 * What the page tables say elsewhere (no protection involved):
 *  - (scan B) VMAs not registered for WP (a shared restore's pool mapping, canonical chunk blocks) read
 *    WRITTEN for every present page, so WRITTEN means nothing there. They are private file
 *    mappings, though: a page the program stored to is an anonymous copy (PAGE_IS_FILE clear,
 *    not the zero page). Such pages are dirty, and stay dirty across resets ("sticky"): a later
 *    store to a page that is already a copy is not visible at all, and a copy dropped by the
 *    program (MADV_DONTNEED) reads as the file's page again without anyone being told.
 *  - (scan C, when the bitmap is read) A page whose record says PRESENT but that is neither
 *    present nor swapped was dropped by the program (madvise): it now reads as zero (or as
 *    the pool's page). Dirty, and reported again by every epoch until it is touched.
 * What other layers tell us (lm_dirty_mark): record changes (defer_fill: new contents),
 * poisoning (the contents are lost), and a refault of a dropped page (serve.c).
 *
 * Fills (faults, readahead, prefetch, background fill, materialize) install the contents the
 * record already had, but without the uffd-wp bit, so a filled page reads as WRITTEN: reported
 * until the next reset (an over-approximation). The kernel's zero page is exempt: a store
 * would replace it, so a page that maps it now has not been stored to since it was mapped, and
 * it holds zeros as its record said (a refault of a dropped page is marked by serve.c).
 *
 * Soft-dirty (/proc/PID/clear_refs, value 4) is not used: clearing it is process-wide. It
 * would reset every other region's tracking, and any other tool's use of the bit, each time
 * one region starts an epoch (Documentation/admin-guide/mm/soft-dirty.rst). Without WP_ASYNC
 * the mode is LM_DIRTY_NONE: every page that is not lazy (as the epoch left it or as a
 * deferral since recorded it) is reported, and the caller compares signatures.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "lm_internal.h"

#define LM_PM_SCAN_WP_MATCHING (1u << 0)
#define LM_PAGE_IS_WPALLOWED (1u << 0)

#define VEC 256

static inline void bit_or(_Atomic uint64_t *bits, size_t p)
{
    atomic_fetch_or_explicit(&bits[p >> 6], (uint64_t)1 << (p & 63), memory_order_relaxed);
}

/* Set bits [first, first + n). */
static void bits_or_range(_Atomic uint64_t *bits, size_t first, size_t n)
{
    size_t end = first + n;
    while (first < end) {
        size_t w = first >> 6, lo = first & 63;
        size_t hi = end - (first - lo) < 64 ? end - (first - lo) : 64;
        uint64_t mask = (hi == 64 ? ~(uint64_t)0 : (((uint64_t)1 << hi) - 1)) &
                        ~(((uint64_t)1 << lo) - 1);
        atomic_fetch_or_explicit(&bits[w], mask, memory_order_relaxed);
        first = (first - lo) + hi;
    }
}

static void bits_clear(_Atomic uint64_t *bits, size_t npages)
{
    for (size_t w = 0; w < (npages + 63) / 64; w++)
        atomic_store_explicit(&bits[w], 0, memory_order_relaxed);
}

int lm_dirty_init(struct lm_region *r, uint64_t api_features)
{
    size_t words = (r->npages + 63) / 64;
    r->dirty = calloc(words, sizeof(uint64_t));
    r->ws_written = calloc(words, sizeof(uint64_t));
    if (!r->dirty || !r->ws_written)
        return lm_fail("calloc(dirty bitmaps)", ENOMEM);
    pthread_mutex_init(&r->harvest_lock, NULL);
    r->harvest_lock_ok = true;
    r->wp_async = false;
    /* PAGEMAP_SCAN came with WP_ASYNC (both 6.7): one test covers both. */
    if (!(api_features & UFFD_FEATURE_WP_ASYNC_BIT))
        return 0;
    r->pagemap_fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    r->wp_async = r->pagemap_fd >= 0;   /* without it: first touches only, mode NONE */
    return 0;
}

void lm_dirty_close(struct lm_region *r)
{
    if (r->pagemap_fd >= 0)
        close(r->pagemap_fd);
    r->pagemap_fd = -1;
    free(r->dirty);
    free(r->ws_written);
    r->dirty = r->ws_written = NULL;
    if (r->harvest_lock_ok)
        pthread_mutex_destroy(&r->harvest_lock);
    r->harvest_lock_ok = false;
}

int lm_dirty_mode(struct lm_region *r)
{
    if (r->cfg.test_no_dirty || r->pagemap_fd < 0)
        return LM_DIRTY_NONE;
    /* A shared region (lm_region_share) is not registered for WP: page tables only. */
    return r->wp_async ? LM_DIRTY_WP_ASYNC : LM_DIRTY_PAGE_TABLES;
}

void lm_dirty_mark(struct lm_region *r, size_t first, size_t n)
{
    if (r->dirty)
        bits_or_range(r->dirty, first, n);
}

/* One PAGEMAP_SCAN call over [*start, end of region); advances *start to where it stopped. */
static int scan(struct lm_region *r, uint64_t flags, uint64_t inverted, uint64_t mask,
                uint64_t anyof, uint64_t ret, struct lm_page_region *vec, size_t *nvec,
                uint64_t *start)
{
    struct lm_pm_scan_arg a = {
        .size = sizeof(a),
        .flags = flags,
        .start = *start,
        .end = (uintptr_t)r->base + r->nbytes,
        .vec = (uintptr_t)vec,
        .vec_len = VEC,
        .category_inverted = inverted,
        .category_mask = mask,
        .category_anyof_mask = anyof,
        .return_mask = ret,
    };
    long n = ioctl(r->pagemap_fd, LM_PAGEMAP_SCAN, &a);
    if (n < 0)
        return LM_FAIL("ioctl(PAGEMAP_SCAN)");
    *nvec = (size_t)n;
    *start = a.walk_end;
    return 0;
}

static inline size_t page_of(struct lm_region *r, uint64_t addr)
{
    return (size_t)(addr - (uintptr_t)r->base) >> r->page_shift;
}

/* Scan A: written pages of WP-registered VMAs, protected again as they are returned; ORed
   into `dst` (NULL: none) and, with `ws`, into ws_written. VMAs without WP are passed over by
   the kernel (WP_MATCHING skips them): scan B covers those. */
static int harvest_wp(struct lm_region *r, _Atomic uint64_t *dst, bool ws)
{
    struct lm_page_region vec[VEC];
    uint64_t start = (uintptr_t)r->base, end = start + r->nbytes;
    while (start < end) {
        size_t n;
        /* Written and not the zero page (which a store would replace: never protected, it
           needs no protection; see the top of the file). */
        int rc = scan(r, LM_PM_SCAN_WP_MATCHING, LM_PAGE_IS_PFNZERO,
                      LM_PAGE_IS_WRITTEN | LM_PAGE_IS_PFNZERO,
                      LM_PAGE_IS_PRESENT | LM_PAGE_IS_SWAPPED, LM_PAGE_IS_WRITTEN, vec, &n,
                      &start);
        if (rc < 0)
            return rc;
        for (size_t v = 0; v < n; v++) {
            size_t p = page_of(r, vec[v].start), k = page_of(r, vec[v].end) - p;
            if (dst)
                bits_or_range(dst, p, k);
            if (ws)
                bits_or_range(r->ws_written, p, k);
        }
    }
    return 0;
}

/* Mark in dst the pages of [from, to) that have been claimed and whose state `want` accepts.
   Pages never claimed (base_done clear) are lazy: their records come from a deferral or the
   restore's table and are not read (reading them would fault in the metadata memfd's
   pages). */
static void mark_claimed(struct lm_region *r, _Atomic uint64_t *dst, size_t from, size_t to,
                         bool (*want)(uint8_t))
{
    for (size_t p = from; p < to; p++) {
        uint64_t done = atomic_load_explicit(&r->base_done[p >> 6], memory_order_relaxed);
        if (!done) {
            p |= 63;
            continue;
        }
        if ((done >> (p & 63)) & 1 && want(lm_state_load(&r->meta[p])))
            bit_or(dst, p);
    }
}

static bool present(uint8_t s)
{
    return s == LM_PRESENT || s == LM_PINNED;
}

static bool not_lazy(uint8_t s)
{
    return s != LM_EMPTY && s != LM_DEFERRED;
}

/* Pages [from, to) are neither present nor swapped: those whose record says PRESENT were
   dropped behind our back. */
static void absent_pages(struct lm_region *r, _Atomic uint64_t *dst, size_t from, size_t to)
{
    /* Not a page recorded as a shared pool's unwritten page (SHARED): dropped, it reads the
       same pool page again (serve.c, serve_spurious), and its stores are found as private
       copies by scan_copies. A pool's completion drops them all (fill.c, lm_pool_finish). */
    for (size_t p = from; p < to; p++) {
        uint64_t done = atomic_load_explicit(&r->base_done[p >> 6], memory_order_relaxed);
        if (!done) {
            p |= 63;
            continue;
        }
        const struct lm_page_meta *m = &r->meta[p];
        if ((done >> (p & 63)) & 1 && present(lm_state_load(m)) &&
            !(r->pool_fd >= 0 && (__atomic_load_n(&m->flags, __ATOMIC_RELAXED) & LM_F_SHARED)))
            bit_or(dst, p);
    }
}

/* Scan B: private copies (present or swapped, not a file page, not the zero page) in VMAs
   without WP go into `dst` and `sticky` (either may be NULL). The kernel passes over the
   VMAs whose categories cannot match (WP ones) without walking them: nearly free on a plain
   region. */
static int scan_copies(struct lm_region *r, _Atomic uint64_t *dst, _Atomic uint64_t *sticky)
{
    struct lm_page_region vec[VEC];
    uint64_t start = (uintptr_t)r->base, end = start + r->nbytes;
    uint64_t not = LM_PAGE_IS_WPALLOWED | LM_PAGE_IS_FILE | LM_PAGE_IS_PFNZERO;
    while (start < end) {
        size_t n;
        int rc = scan(r, 0, not, not, LM_PAGE_IS_PRESENT | LM_PAGE_IS_SWAPPED,
                      LM_PAGE_IS_PRESENT, vec, &n, &start);
        if (rc < 0)
            return rc;
        for (size_t v = 0; v < n; v++) {
            size_t p = page_of(r, vec[v].start), q = page_of(r, vec[v].end);
            if (dst)
                bits_or_range(dst, p, q - p);
            if (sticky)
                bits_or_range(sticky, p, q - p);
        }
    }
    return 0;
}

/* Scan C: pages whose record says PRESENT but that are neither present nor swapped (dropped
   behind our back) go into `dst`. Only the page tables' present bits are asked for, which
   the kernel answers without looking at the pages. */
static int scan_absent(struct lm_region *r, _Atomic uint64_t *dst)
{
    struct lm_page_region vec[VEC];
    uint64_t start = (uintptr_t)r->base, end = start + r->nbytes;
    size_t next = 0;   /* first page not yet accounted for */
    while (start < end) {
        size_t n;
        int rc = scan(r, 0, 0, 0, LM_PAGE_IS_PRESENT | LM_PAGE_IS_SWAPPED,
                      LM_PAGE_IS_PRESENT | LM_PAGE_IS_SWAPPED, vec, &n, &start);
        if (rc < 0)
            return rc;
        for (size_t v = 0; v < n; v++) {
            size_t p = page_of(r, vec[v].start);
            if (p > next)
                absent_pages(r, dst, next, p);
            next = page_of(r, vec[v].end);
        }
    }
    if (next < r->npages)
        absent_pages(r, dst, next, r->npages);
    return 0;
}

int lm_dirty_harvest(struct lm_region *r, int reset)
{
    if (!r->wp_async)
        return 0;
    pthread_mutex_lock(&r->harvest_lock);
    /* Cleared before the scan: a store the scan returns is then kept in `dirty`, and one
       landing after it is returned by the next harvest. Harvests are serialised, so none can
       OR a store into ws_written between our clear and our scan only to lose it. */
    if (reset & LM_HARVEST_RESET_WS)
        bits_clear(r->ws_written, r->npages);
    int rc = harvest_wp(r, r->dirty, !(reset & LM_HARVEST_RESET_WS));
    pthread_mutex_unlock(&r->harvest_lock);
    return rc;
}


/* Everything the epoch so far changed, ORed into dst (harvest_lock held). */
static int collect(struct lm_region *r, _Atomic uint64_t *dst, _Atomic uint64_t *sticky)
{
    int rc = 0, mode = lm_dirty_mode(r);
    if (r->wp_async)
        rc = harvest_wp(r, dst, true);
    if (rc == 0 && mode != LM_DIRTY_NONE)
        rc = scan_copies(r, dst, sticky);
    if (rc == 0 && mode != LM_DIRTY_NONE)
        rc = scan_absent(r, dst);
    if (mode == LM_DIRTY_NONE)
        mark_claimed(r, dst, 0, r->npages, not_lazy);   /* mode NONE: every page not lazy */
    return rc;
}

static void mask_tail(struct lm_region *r, uint64_t *words)
{
    if (r->npages & 63)
        words[r->npages / 64] &= ((uint64_t)1 << (r->npages & 63)) - 1;
}

/*
 * The epoch's bitmap is taken and cleared in one atomic exchange per word, then the scans add
 * what they find to the taken copy: a store or a mark lands either in the epoch that ends
 * (before the exchange, or before the scan passes its page) or in the new one, never in
 * neither. A store between the exchange and the scan counts for the old epoch only, which is
 * right for a caller that reads the pages after this returns (a checkpoint).
 */
int lm_dirty_reset(struct lm_region *r, uint64_t *words)
{
    size_t nw = (r->npages + 63) / 64;
    int rc;
    /* The epoch that ended at a background checkpoint's pause is that checkpoint's until it
       ends (lm_freeze_end merges it back if it fails): another reset would take it, and a
       later incremental checkpoint miss what was stored in it. */
    if (atomic_load(&r->freeze) || atomic_load(&r->freeze_armed))
        return lm_fail("a background checkpoint of this region is in progress", EBUSY);
    pthread_mutex_lock(&r->harvest_lock);
    for (size_t w = 0; w < nw; w++) {
        uint64_t old = atomic_exchange_explicit(&r->dirty[w], 0, memory_order_relaxed);
        if (words)
            words[w] = old;
    }
    /* Copies in VMAs without WP stay dirty (sticky: see the top of this file). */
    if (words)
        rc = collect(r, (_Atomic uint64_t *)words, r->dirty);
    else if ((rc = r->wp_async ? harvest_wp(r, NULL, true) : 0) == 0 &&
             lm_dirty_mode(r) != LM_DIRTY_NONE)
        rc = scan_copies(r, NULL, r->dirty);
    pthread_mutex_unlock(&r->harvest_lock);
    if (rc < 0) {
        /* An epoch we cannot vouch for: all of it, in both. */
        lm_dirty_mark(r, 0, r->npages);
        if (words)
            memset(words, 0xff, nw * sizeof(uint64_t));
    }
    if (words)
        mask_tail(r, words);
    return rc;
}

int lm_dirty_bitmap(struct lm_region *r, uint64_t *words)
{
    pthread_mutex_lock(&r->harvest_lock);
    int rc = collect(r, r->dirty, NULL);
    pthread_mutex_unlock(&r->harvest_lock);
    if (rc < 0)
        return rc;
    for (size_t w = 0; w < (r->npages + 63) / 64; w++)
        words[w] = atomic_load_explicit(&r->dirty[w], memory_order_relaxed);
    mask_tail(r, words);
    return 0;
}

/*
 * A background checkpoint's pause (freeze.c): the epoch's bitmap is taken (into words) and
 * pause(arg) moves the region's pages away, both under harvest_lock, so that no harvest
 * protects a page and files its store under the new epoch in between: a store before the
 * pause is then in words or still in its page-table entry (which moves with the page: the
 * freeze reads it there), one after it is the new epoch's.
 */
int lm_dirty_freeze(struct lm_region *r, uint64_t *words, int (*pause)(void *), void *arg)
{
    size_t nw = (r->npages + 63) / 64;
    pthread_mutex_lock(&r->harvest_lock);
    for (size_t w = 0; w < nw; w++)
        words[w] = atomic_exchange_explicit(&r->dirty[w], 0, memory_order_relaxed);
    int rc = pause(arg);
    if (rc < 0)   /* nothing moved: the epoch goes on */
        for (size_t w = 0; w < nw; w++)
            atomic_fetch_or_explicit(&r->dirty[w], words[w], memory_order_relaxed);
    pthread_mutex_unlock(&r->harvest_lock);
    return rc;
}

/* Give an epoch's pages back to the current one (a background checkpoint that failed: its
   epoch does not end). */
int lm_dirty_putback(struct lm_region *r, const uint64_t *words)
{
    if (!words)
        return lm_fail("lm_dirty_putback: no words", EINVAL);
    lm_dirty_merge(r, words);
    return 0;
}

void lm_dirty_merge(struct lm_region *r, const uint64_t *words)
{
    for (size_t w = 0; w < (r->npages + 63) / 64; w++)
        if (words[w])
            atomic_fetch_or_explicit(&r->dirty[w], words[w], memory_order_relaxed);
}
