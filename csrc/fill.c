/*
 * fill.c: filling claimed pages. A run's contents are assembled from the stores (store.c)
 * and installed with one UFFDIO_COPY or UFFDIO_ZEROPAGE (uffd.c); a page that cannot be
 * served is poisoned (uffd.c) and recorded so (meta.c). Used by every path that makes pages
 * present: the serving threads, prefetch, the background fill and lm_materialize (here).
 * (lm_fill_run, assemble, lm_materialize moved from region.c; lm_poison_page from handler.c,
 * its record part now lm_mark_poisoned in meta.c; fill_or_poison from snapshot.c.)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "lm_internal.h"

/*
 * Put the contents of copy-kind pages [first, first+n) into t->scratch: canonical pages from
 * the canonical store, snapshot pages from the store file (one read per run of consecutive
 * store entries). With verification on, a snapshot page whose bytes do not hash to its
 * signature stops the assembly: t->bad_page names it and -EBADMSG is returned.
 */
static int assemble(struct lm_region *r, struct lm_serve_thread *t, size_t first, size_t n)
{
    size_t ps = r->page_size;
    for (size_t i = 0; i < n;) {
        const struct lm_page_meta *m = &r->meta[first + i];
        char *out = t->scratch + i * ps;
        if (m->cls == LM_CLS_CANONICAL) {
            memcpy(out, lm_canon_page(r, m->canon), ps);
            i++;
            continue;
        }
        size_t run = 1;
        while (i + run < n && r->meta[first + i + run].cls == LM_CLS_SNAPSHOT &&
               r->meta[first + i + run].aux == m->aux + run)
            run++;
        int rc = lm_src_read(r, m->aux, run, out, t->read_once ? LM_SRC_ONCE : 0);
        if (rc < 0)
            return rc;
        if (r->src_verify) {
            for (size_t k = 0; k < run; k++) {
                if (lm_xxh3(out + k * ps, ps) != r->meta[first + i + k].signature) {
                    t->bad_page = first + i + k;
                    return lm_fail("verify: page contents differ from the snapshot's signature",
                                   EBADMSG);
                }
            }
        }
        i += run;
    }
    return 0;
}

/* ---- shared regions (docs/shared-pages.md, sections 1.3, 1.4, 2.4) ------------------------ */

/* Publishing leaves the page mapped (inaccessible) in the view, holding page tables and
   counted in this process's Rss: drop those entries every 2 MiB of publications. The pool's
   page cache keeps the pages; a publisher racing with the drop only loses its view entry. */
#define VIEW_ZAP_PAGES 512u

static void published(struct lm_region *r, size_t n)
{
    atomic_fetch_add_explicit(&r->st_published, n, memory_order_relaxed);
    if (atomic_fetch_add_explicit(&r->view_unzapped, n, memory_order_relaxed) + n >=
            VIEW_ZAP_PAGES &&
        atomic_exchange_explicit(&r->view_unzapped, 0, memory_order_relaxed) >= VIEW_ZAP_PAGES)
        madvise(r->pool_view, r->nbytes, MADV_DONTNEED);
}

int lm_pool_publish(struct lm_region *r, size_t first, size_t n, const char *src, size_t *done)
{
    size_t got = 0, fresh = 0;
    if (r->cfg.test_fail_publish) {
        if (done)
            *done = 0;
        return lm_fail("test hook: publishing into the pool", ENOMEM);
    }
    int rc = lm_uffd_copy_counted(r->uffd, r->pool_view + first * r->page_size, src,
                                  n * r->page_size, &got, &fresh);
    if (done)
        *done = got / r->page_size;
    if (fresh)   /* not pages another process published first (EEXIST) */
        published(r, fresh / r->page_size);
    return rc;
}

/* A read-only pool (a page server's, docs/shared-pages.md 5.3) has no view to run mincore()
   on: ask the memfd's page cache with SEEK_DATA / SEEK_HOLE instead (shmem answers both from
   its page cache; the file position they move is never used for I/O here). */
static int holes_by_seek(struct lm_region *r, size_t first, size_t n, unsigned char *vec)
{
    off_t ps = (off_t)r->page_size, pos = (off_t)first * ps, end = (off_t)(first + n) * ps;
    memset(vec, 0, n);
    while (pos < end) {
        off_t d = lseek(r->pool_fd, pos, SEEK_DATA);
        if (d < 0) {
            if (errno == ENXIO)
                break;   /* no data from pos to the end of the pool */
            return LM_FAIL("lseek(pool, SEEK_DATA)");
        }
        if (d >= end)
            break;
        off_t h = lseek(r->pool_fd, d, SEEK_HOLE);
        if (h < 0)
            return LM_FAIL("lseek(pool, SEEK_HOLE)");
        if (h > end)
            h = end;
        for (off_t q = d / ps; q < (h + ps - 1) / ps; q++)
            vec[q - (off_t)first] = 1;
        pos = h > d ? h : d + ps;
    }
    return 0;
}

int lm_pool_finish(struct lm_region *r, const _Atomic int *stop)
{
    /* No view: the pool is read-only here (a page server's) or sealed already. */
    if (r->pool_fd < 0 || r->pool_view == MAP_FAILED || !r->pool_want)
        return 0;
    int seals = fcntl(r->pool_fd, F_GET_SEALS);
    if (seals < 0)
        return LM_FAIL("fcntl(pool, F_GET_SEALS)");
    if (seals & F_SEAL_FUTURE_WRITE)
        return 1;
    /* The blocks with a hole, found by the same walk that says the pool is complete. */
    uint64_t *holey = calloc((r->nblocks + 63) / 64 + 1, sizeof(uint64_t));
    unsigned char *vec = malloc(r->blk_pages);
    int rc = holey && vec ? lm_pool_complete(r, holey) : lm_fail("malloc(pool finish)", ENOMEM);
    if (rc <= 0) {
        free(holey);
        free(vec);
        return rc;
    }
    /* Huge folios first, then the seal: a process that finds the pool sealed may leave it to
       the kernel (store.c, pool_table), and gets PMDs only for blocks collapsed by then.
       The holes left are the snapshot's zero (and untouched) pages. In a block that holds
       data they are filled with pages of zeros first (UFFDIO_ZEROPAGE through the view: the
       one atomic way in, and zeros are those pages' contents): a block with a hole is
       neither collapsed (the kernel refuses while a MISSING registration maps the file:
       EBUSY) nor served by the kernel (its read fault would plant a zero page, harmless for
       these pages but not counted anywhere). A block of zeros only stays a hole: no memory.
       A collapse drops every process's mappings of the block's small pages; they fault
       again (a registered region: a MINOR fault, CONTINUE of its PRESENT SHARED page). */
    const size_t block = r->blk_pages * r->page_size;
    size_t whole = r->blk_pages > 1 ? r->npages / r->blk_pages : 0;
    /* Without huge folios here (lm_probe_huge_shared) the zeros would cost memory for
       nothing: blocks keep their holes, and a kernel-served restore serves only those with
       none. Probed once per process. */
    static _Atomic int huge = -1;
    if (atomic_load(&huge) < 0)
        atomic_store(&huge, lm_probe_huge_shared() == 0);
    if (!atomic_load(&huge))
        whole = 0;
    for (size_t b = 0; b < whole; b++) {
        if (stop && atomic_load_explicit(stop, memory_order_relaxed)) {
            free(holey);
            free(vec);
            return 0;   /* not sealed: the next fill to complete it does it all again */
        }
        size_t first = b * r->blk_pages;
        if (lm_bit(holey, b)) {
            size_t data = 0;
            for (size_t p = first; p < first + r->blk_pages; p++)
                data += lm_bit(r->pool_want, p);
            /* Zeros cost memory here, unlike holes: only in blocks that are mostly data (at
               most a third more than the data; a sparse block stays small and registered). */
            if (data * 4 < r->blk_pages * 3 || lm_pool_holes(r, first, r->blk_pages, vec) < 0)
                continue;
            for (size_t i = 0, j; i < r->blk_pages; i = j) {
                for (j = i + 1; j < r->blk_pages && (vec[j] & 1) == (vec[i] & 1); j++)
                    ;
                size_t done = 0;
                if (!(vec[i] & 1) &&
                    lm_uffd_zeropage(r->uffd, r->pool_view + (first + i) * r->page_size,
                                     (j - i) * r->page_size, false, &done) < 0)
                    break;   /* left a hole: the block stays small, served registered */
            }
        }
        lm_shmem_collapse(r->pool_fd, (uint64_t)(b * block), block);
    }
    free(holey);
    free(vec);
    if (fcntl(r->pool_fd, F_ADD_SEALS, F_SEAL_FUTURE_WRITE) < 0)
        return LM_FAIL("fcntl(pool, F_ADD_SEALS, FUTURE_WRITE)");
    return 1;
}

/*
 * With config.verify_shared: the pages of [first, first+n) that vec says the pool holds are
 * read from the pool and checked; vec[i] becomes POOL_BAD for one that does not match its
 * signature (`want`, when given, holds the run's good bytes: compared instead of hashed).
 * Another process of this uid can write the pool (docs/shared-pages.md 2.6): this keeps a
 * page planted before the check from being mapped; it cannot keep out a write after it.
 */
void lm_pool_check(struct lm_region *r, size_t first, size_t n, unsigned char *vec,
                   const char *want, char *buf)
{
    size_t ps = r->page_size;
    if (!r->cfg.verify_shared)
        return;
    for (size_t i = 0; i < n; i++) {
        if (!(vec[i] & 1))
            continue;
        ssize_t got = pread(r->pool_fd, buf, ps, (off_t)((first + i) * ps));
        bool ok = got == (ssize_t)ps &&
                  (want ? memcmp(buf, want + i * ps, ps) == 0
                        : lm_xxh3(buf, ps) == r->meta[first + i].signature);
        if (!ok) {
            vec[i] = LM_POOL_BAD;
            atomic_fetch_add_explicit(&r->st_verify_fail, 1, memory_order_relaxed);
        }
    }
}

int lm_pool_holes(struct lm_region *r, size_t first, size_t n, unsigned char *vec)
{
    /* The pool's page cache is the only record of what is filled (design 2.4): no bitmap
       that a killed filler could leave disagreeing with it. */
    if (r->pool_view == MAP_FAILED)
        return holes_by_seek(r, first, n, vec);
    if (mincore(r->pool_view + first * r->page_size, n * r->page_size, vec) < 0)
        return LM_FAIL("mincore(pool view)");
    return 0;
}

/*
 * Fill claimed snapshot pages of a shared region: the pages the pool lacks are read from the
 * store (verified: share implies verification, so a pool holds only bytes the snapshot's
 * content id commits to), published into the pool with UFFDIO_COPY through the view (the one
 * atomic publication step: another process sees a hole or the whole page; EEXIST means someone
 * published it first), then mapped from the pool with UFFDIO_CONTINUE. Stores to the pages
 * later copy them (MAP_PRIVATE): the pool never changes.
 * Pages that cannot be published are served by a private copy instead (sharing is lost, data
 * is not): publishing failed for want of memory, or the pool is read-only here (a page
 * server's pool, after the server died: docs/shared-pages.md 2.7, 5.3). Those pages are never
 * CONTINUE'd: over a pool hole CONTINUE fails with EFAULT even where a private page is mapped
 * (the kernel looks the page up in the pool first), so each segment of the run gets the one
 * operation that fits it.
 */
static int fill_shared(struct lm_region *r, struct lm_serve_thread *t, size_t first, size_t n,
                       bool wake, size_t *filled)
{
    size_t ps = r->page_size, done = 0;   /* pages filled from `first` without a gap */
    unsigned char vec[LM_MAX_CLUSTER];
    int rc = 0;
    if (filled)
        *filled = 0;
    if (n > LM_MAX_CLUSTER)
        return lm_fail("shared fill: run longer than a cluster", EINVAL);
    if ((rc = lm_pool_holes(r, first, n, vec)) < 0)
        return rc;
    for (size_t i = 0; i < n; i++)
        vec[i] &= 1;
    t->scratch_canon = 0;   /* the check reads pool pages into scratch */
    lm_pool_check(r, first, n, vec, NULL, t->scratch);
    for (size_t a = 0; a < n && rc == 0;) {
        unsigned char kind = vec[a];
        size_t b = a + 1;
        while (b < n && vec[b] == kind)
            b++;
        bool in_pool = kind == 1;
        size_t seg = b - a, pub = seg, got = 0;
        char *dst = r->base + (first + a) * ps;
        if (kind == LM_POOL_BAD) {
            /* held by the pool with other bytes than its signature's: the store's, privately */
            t->scratch_canon = 0;
            if ((rc = assemble(r, t, first + a, seg)) < 0)
                break;
            pub = 0;
            rc = -EROFS;   /* served below by a private copy, never from the pool */
        } else if (!in_pool) {
            t->scratch_canon = 0;   /* overwritten below */
            if ((rc = assemble(r, t, first + a, seg)) < 0)
                break;   /* the caller retries page by page: only a bad page is poisoned */
            pub = 0;
            rc = r->pool_view != MAP_FAILED
                     ? lm_pool_publish(r, first + a, seg, t->scratch, &pub)
                     : -EROFS;
        }
        int prc = rc;   /* the publication's outcome; pages [a, a + pub) are in the pool */
        rc = 0;
        if (pub) {
            rc = lm_uffd_continue(r->uffd, dst, pub * ps, wake, &got);
            got = rc == 0 ? pub : got / ps;
            atomic_fetch_add_explicit(&r->st_shared_mapped, got, memory_order_relaxed);
            atomic_fetch_add_explicit(&r->st_bytes, got * ps, memory_order_relaxed);
            done = a + got;
        }
        if (rc == 0 && (prc == -ENOMEM || prc == -ENOSPC || prc == -EROFS)) {
            size_t priv = 0;
            rc = lm_uffd_copy(r->uffd, dst + pub * ps, t->scratch + pub * ps, (seg - pub) * ps,
                              wake, &priv);
            priv = rc == 0 ? seg - pub : priv / ps;
            for (size_t q = 0; q < priv; q++)
                r->meta[first + a + pub + q].flags |= LM_F_PRIVATE_FILL;   /* claimed by us */
            atomic_fetch_add_explicit(&r->st_pool_fallback, priv, memory_order_relaxed);
            atomic_fetch_add_explicit(&r->st_bytes, priv * ps, memory_order_relaxed);
            done = a + pub + priv;
        } else if (rc == 0 && prc < 0) {
            rc = prc;
        }
        a = b;
    }
    if (filled)
        *filled = done;
    return rc;
}

/*
 * Fill claimed canonical pages whose block maps a chunk of their template (records SHARED,
 * region.c): the chunk is complete and immutable, so the run is one UFFDIO_CONTINUE, which maps
 * the chunk's page-cache pages (no copy, no memory of ours); a store later copies the page
 * (MAP_PRIVATE). EEXIST (already mapped here) is stepped over by lm_uffd_continue.
 */
static int fill_chunk(struct lm_region *r, size_t first, size_t n, bool wake, size_t *filled)
{
    size_t ps = r->page_size, done = 0;
    int rc = lm_uffd_continue(r->uffd, r->base + first * ps, n * ps, wake, &done);
    if (rc == 0)
        done = n * ps;
    if (filled)
        *filled = done / ps;
    atomic_fetch_add_explicit(&r->st_canon_shared, done / ps, memory_order_relaxed);
    atomic_fetch_add_explicit(&r->st_bytes, done, memory_order_relaxed);
    return rc;
}

int lm_fill_hook(struct lm_region *r)
{
    int fail = atomic_load_explicit(&r->cfg_test_fail_fills, memory_order_relaxed);
    if (fail == 1 ||
        (fail > 1 && atomic_fetch_add_explicit(&r->fill_attempts, 1, memory_order_relaxed) %
                             (uint64_t)fail == 0))
        return lm_fail("test hook: the page source is broken", EIO);
    return 0;
}

/* May claimed pages [first, first+n) be filled write-protected: the region is registered
   for async WP and none of them lies in a chunk block (registered MINOR, without WP; a held
   page's block cannot be remapped: the remap holds it first). */
static bool fill_wp(struct lm_region *r, size_t first, size_t n)
{
    if (!r->wp_async || r->pool_fd >= 0)
        return false;
    const uint32_t *chunk_of = atomic_load_explicit(&r->chunk_of, memory_order_acquire);
    if (!chunk_of)
        return true;
    for (size_t b = first / r->blk_pages; b <= (first + n - 1) / r->blk_pages; b++)
        if (b < r->nblocks && __atomic_load_n(&chunk_of[b], __ATOMIC_ACQUIRE))
            return false;
    return true;
}

/*
 * Read ahead of the copy: a pipeline (the background fill) assembles a claimed run on one
 * thread and installs it with lm_fill_run on another, so that the store is read while the
 * previous run is copied. Only runs that start with a snapshot page of a private region
 * (what there is to read); returns 1 (nothing done: lm_fill_run does all of such a run, a
 * canonical one from memory), 0 (assembled), or -errno (the fill will read the run again
 * itself and poison what cannot be served).
 */
int lm_fill_assemble(struct lm_region *r, struct lm_serve_thread *t, size_t first, size_t n)
{
    const struct lm_page_meta *m0 = &r->meta[first];
    t->pre_n = 0;
    if (m0->cls != LM_CLS_SNAPSHOT || r->pool_fd >= 0)
        return 1;
    t->scratch_canon = 0;   /* overwritten now */
    int rc = assemble(r, t, first, n);
    if (rc < 0)
        return rc;
    t->pre_first = first;
    t->pre_n = n;
    return 0;
}

/*
 * Carry out the updates of claimed pages [first, first+n), which all need a copy or all map
 * the zero page. Copies are assembled in the thread's scratch buffer so that a cluster costs
 * one UFFDIO_COPY; scratch remembers which canonical page it holds, so a run of one template
 * (the common case) is assembled once and reused.
 */
int lm_fill_run(struct lm_region *r, struct lm_serve_thread *t, size_t first, size_t n,
                bool wake, bool write, size_t *filled)
{
    char *dst = r->base + first * r->page_size;
    size_t len = n * r->page_size, done = 0;
    struct lm_page_meta *m0 = &r->meta[first];
    int rc;

    if (filled)
        *filled = 0;
    /* what lm_fill_assemble left in scratch for exactly this run; any other call forgets it */
    bool ready = t->pre_n == n && t->pre_first == first;
    t->pre_n = 0;
    if ((rc = lm_fill_hook(r)) < 0)
        return rc;

    if (m0->cls == LM_CLS_SNAPSHOT && r->pool_fd >= 0)   /* runs are of one kind (meta.c) */
        return fill_shared(r, t, first, n, wake, filled);
    if (m0->cls == LM_CLS_CANONICAL && (m0->flags & LM_F_SHARED))
        return fill_chunk(r, first, n, wake, filled);
    if (lm_needs_copy(m0)) {
        uint32_t same = m0->cls == LM_CLS_CANONICAL ? m0->canon : 0;
        for (size_t i = 1; i < n && same; i++)
            if (r->meta[first + i].cls != LM_CLS_CANONICAL || r->meta[first + i].canon != same)
                same = 0;
        if (ready) {
            t->scratch_canon = 0;   /* assembled by lm_fill_assemble: a mix, maybe */
        } else if (!(same && t->scratch_canon == same && t->scratch_pages >= n)) {
            t->scratch_canon = 0;   /* partly overwritten if the assembly fails */
            if ((rc = assemble(r, t, first, n)) < 0)
                return rc;
            t->scratch_canon = same;
            t->scratch_pages = same ? (uint32_t)n : 0;
        }
        /* The record's own contents, installed write-protected where the region tracks
           writes, so that dirty tracking does not take the fill for a store (dirty.c). Not
           for a write fault: its page is stored to at once, and the protection would cost
           the writer a second (kernel-resolved) fault for nothing. */
        if (!write && fill_wp(r, first, n))
            rc = lm_uffd_copy_wp(r->uffd, dst, t->scratch, len, wake, &done);
        else
            rc = lm_uffd_copy(r->uffd, dst, t->scratch, len, wake, &done);
        /* Pages that a shared chunk would have served but for the VMA budget (region.c). */
        size_t copied = rc == 0 ? n : done / r->page_size, fb = 0;
        for (size_t i = 0; i < copied; i++)
            fb += (r->meta[first + i].flags & LM_F_COPY_FALLBACK) != 0;
        if (fb)
            atomic_fetch_add_explicit(&r->st_canon_copied, fb, memory_order_relaxed);
    } else if (write && r->cfg.zero_write == LM_ZW_COPY) {
        /* The page is about to be written: allocate it now rather than map the zero page
           and take a second (kernel) fault for the copy-on-write. */
        rc = lm_uffd_copy(r->uffd, dst, r->zero_src, len, wake, &done);
    } else {
        rc = lm_uffd_zeropage(r->uffd, dst, len, wake, &done);
    }
    if (rc == 0)
        done = len;
    if (filled)
        *filled = done / r->page_size;
    atomic_fetch_add_explicit(&r->st_bytes, done, memory_order_relaxed);
    return rc;
}

void lm_record_error(struct lm_region *r, int rc)
{
    atomic_fetch_add_explicit(&r->st_errors, 1, memory_order_relaxed);
    atomic_store_explicit(&r->st_last_error, rc, memory_order_relaxed);
}

/*
 * Make an access to pages [first, first+n) fail loudly: UFFDIO_POISON (6.6+: SIGBUS, kernel
 * accesses EFAULT); without it, the pages are made inaccessible (SIGSEGV; EFAULT), which the
 * uffd registration survives. A deferral gives such pages new contents (meta.c). The faulter
 * must be woken by the caller after the record says POISONED.
 */
static int make_loud(struct lm_region *r, size_t first, size_t n)
{
    char *addr = r->base + first * r->page_size;
    size_t len = n * r->page_size;
    if (r->has_poison)
        return lm_uffd_poison(r->uffd, addr, len);
    if (mprotect(addr, len, PROT_NONE) < 0)
        return LM_FAIL("mprotect(PROT_NONE) of an unservable page");
    return 0;
}

/* Pages we cannot serve must not leave their faulters waiting forever, nor read as zeros:
   poison them. The pages are claimed (BUSY) by the caller; rc says why (stats.last_error). */
void lm_poison_run(struct lm_region *r, size_t first, size_t n, int rc)
{
    lm_record_error(r, rc);
    if (rc == -EBADMSG)   /* counted here, once per page, however many paths tried it */
        atomic_fetch_add_explicit(&r->st_verify_fail, n, memory_order_relaxed);
    int prc = make_loud(r, first, n);
    if (prc < 0) {
        /* Nothing can make these pages loud (out of memory for the mapping change): they stay
           lazy, the faulter keeps waiting, stats.errors says why. */
        lm_record_error(r, prc);
        for (size_t i = 0; i < n; i++)   /* a fresh page stays fresh: never served as zero */
            lm_release(r, first + i,
                       r->meta[first + i].cls == LM_CLS_NONE ? LM_EMPTY : LM_DEFERRED);
        return;
    }
    for (size_t i = 0; i < n; i++)
        lm_mark_poisoned(r, first + i);
    lm_uffd_wake(r->uffd, r->base + first * r->page_size, n * r->page_size);
}

void lm_poison_page(struct lm_region *r, size_t page, int rc)
{
    lm_poison_run(r, page, 1, rc);
}

/* A poisoned page faulted again: its marker was dropped behind our back (madvise), or this
   fault was raised before the poison. Poison it again; held (BUSY, from POISONED). */
void lm_poison_again(struct lm_region *r, size_t page)
{
    int rc = make_loud(r, page, 1);
    if (rc < 0)
        lm_record_error(r, rc);
    lm_release(r, page, LM_POISONED);
    lm_uffd_wake(r->uffd, r->base + page * r->page_size, r->page_size);
}

__thread int lm_fill_kept_lazy;   /* lm_internal.h */

/* Give pages [first, first+n) back lazy (their states before the claim) and wake whoever
   waits on them: they retry. */
static void give_back(struct lm_region *r, size_t first, size_t n, const uint8_t *old)
{
    lm_unclaim(r, first, n, old);
    lm_uffd_wake(r->uffd, r->base + first * r->page_size, n * r->page_size);
}

/*
 * Fill claimed pages [first, first+n) (one kind), falling back to one page at a time when the
 * run fails, so that a single bad page is poisoned and its neighbours are still served. Pages
 * a failed attempt did fill are marked present (their page-table entries are there).
 *
 * The background fill (flag LM_F_BACKGROUND) has no caller to report to and reads pages no
 * one has asked for yet: an object store's failure that may pass (the gateway down or slow,
 * credentials refused, the fill being stopped) leaves the run's unfilled pages lazy instead
 * of poisoning them, and sets lm_fill_kept_lazy to its -errno (the fill backs off,
 * prefetch.c); a demand fault on them later fetches again, and fails loudly then if it must.
 * Only pages whose contents are wrong for good (a corrupt chunk or entry: -EBADMSG) are
 * poisoned by it. Told to stop, it gives the rest of a run back rather than try each page.
 */
size_t lm_fill_or_poison(struct lm_region *r, struct lm_serve_thread *t, size_t first,
                         size_t n, const uint8_t *old, uint16_t flag)
{
    bool bg = flag == LM_F_BACKGROUND;
    size_t filled = 0;
    if (bg) {
        lm_fill_kept_lazy = 0;
        (void)lm_objs_transient_take();
    }
    int rc = lm_fill_run(r, t, first, n, false, false, &filled);
    if (filled) {
        lm_mark_present(r, first, filled, flag, 0);
        lm_uffd_wake(r->uffd, r->base + first * r->page_size, filled * r->page_size);
    }
    if (rc == 0)
        return n;
    size_t done = filled;
    for (size_t i = filled; i < n; i++) {
        size_t one = 0;
        /* The run's failure (or the last page's) may pass, or the fill is being stopped:
           the rest stays lazy, for a later read to try again. */
        if (bg && (atomic_load_explicit(&r->bg_stop, memory_order_relaxed) ||
                   (rc < 0 && rc != -EBADMSG && lm_objs_transient_take()))) {
            lm_fill_kept_lazy = rc < 0 ? rc : -ECANCELED;
            give_back(r, first + i, n - i, old + i);
            break;
        }
        if (n > 1)   /* else the one attempt above was this page's */
            rc = lm_fill_run(r, t, first + i, 1, false, false, &one);
        if (rc == 0 || one) {
            lm_mark_present(r, first + i, 1, flag, 0);
            lm_uffd_wake(r->uffd, r->base + (first + i) * r->page_size, r->page_size);
            done++;
        } else if (rc == -ENOENT || rc == -ESRCH) {
            /* The range is not registered (any more): a deferral remapped the block to a
               kernel-served chunk under us (it records the pages again), or the region is
               going away. Given back; a faulter waiting on them retries. */
            give_back(r, first + i, n - i, old + i);
            break;
        } else if (bg && rc != -EBADMSG && lm_objs_transient_take()) {
            lm_fill_kept_lazy = rc;
            give_back(r, first + i, n - i, old + i);
            break;
        } else {
            lm_poison_page(r, first + i, rc);
        }
    }
    return done;
}

/*
 * Carry out every pending update of [first, first+n) now. Present pages are passed over;
 * poisoned pages cannot be made present: the rest is done and -EHWPOISON returned (the caller
 * names them from the records). A fill that fails leaves its pages lazy (nothing is lost).
 */
int lm_materialize(struct lm_region *r, size_t first, size_t n)
{
    int rc = lm_check_range(r, first, n);
    if (rc < 0)
        return rc;
    struct lm_serve_thread t = {.r = r, .read_once = true};   /* every page copied once */
    uint8_t old[LM_MAX_CLUSTER];
    t.scratch = malloc((size_t)r->cfg.max_cluster_pages * r->page_size);
    if (!t.scratch)
        return lm_fail("malloc(scratch)", ENOMEM);
    r->used = true;

    size_t i = first, end = first + n;
    bool poisoned = false;
    unsigned spins = 0, retries = 0;
    /* Kernel-served chunk blocks are filled by us only once registered (store.c). */
    rc = lm_chunk_take_over(r, first, n, false);
    while (i < end && rc == 0) {
        /* Claim a run of lazy pages of one kind; present pages are passed over. */
        uint8_t s = lm_claim(r, i);
        if (s == LM_BUSY || s == LM_PINNED) {
            lm_wait_busy(&spins);
            continue;
        }
        if (s == LM_PRESENT || s == LM_POISONED) {
            poisoned |= s == LM_POISONED;
            i++;
            continue;
        }
        old[0] = s;
        size_t max = end - i < r->cfg.max_cluster_pages ? end - i : r->cfg.max_cluster_pages;
        size_t run = lm_claim_run(r, i, max, old), filled = 0;
        rc = lm_fill_run(r, &t, i, run, true, false, &filled);
        if (filled) {
            lm_mark_present(r, i, filled, LM_F_MATERIALIZED, 0);
            atomic_fetch_add_explicit(&r->st_materialized, filled, memory_order_relaxed);
        }
        if (rc < 0)
            lm_unclaim(r, i + filled, run - filled, old + filled);   /* still lazy */
        if (rc == -ENOENT && retries++ < 8) {
            /* A concurrent deferral made this block kernel-served after the take-over
               above: take it over again and carry on from the first page not filled. */
            i += filled;
            rc = lm_chunk_take_over(r, i, 1, false);
            continue;
        }
        i += run;
    }
    free(t.scratch);
    if (rc == 0 && poisoned)
        rc = lm_fail("materialize: poisoned pages in the range", EHWPOISON);
    return rc;
}
