/*
 * prefetch.c: bringing pages in before they are touched: restore's working-set prefetch (a
 * pipeline of store reads and copies) and the background fill (idle-class threads, a reader
 * and an installer, that fill every pending page). Waiters lift the fill's priority through
 * lm_wait_held (meta.c).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "lm_internal.h"

#define BG_MIN 16u               /* background chunk after a demand fault: 64 KiB */
#define BG_MAX 1024u             /* ... grown while idle up to 4 MiB */
#define PREFETCH_BATCH 256u
/* After a run the fill left lazy (an object store that failed for a reason that may pass:
   fill.c), the reader waits BG_BACKOFF_MS, doubled at each failure in a row up to
   BG_BACKOFF_MAX_MS, then reads again from that run; after BG_GIVE_UP failures in a row it
   stops (the rest stays lazy: faults fetch their pages). */
#define BG_BACKOFF_MS 250u
#define BG_BACKOFF_MAX_MS 8000u
#define BG_GIVE_UP 10u


/* Pairs of u64 in lexicographic order: (store entry, page) and (page, list index) alike. */
static int by_pair(const void *a, const void *b)
{
    const uint64_t *x = a, *y = b;
    return x[0] != y[0] ? (x[0] < y[0] ? -1 : 1) : (x[1] < y[1] ? -1 : x[1] > y[1]);
}

/*
 * Prefetch of a shared region (docs/shared-pages.md 2.4): pages the pool holds are only mapped
 * (a later process prefetches without reading the store); holes in address runs of at least
 * PUBLISH_MIN_RUN pages are published, then mapped; scattered holes are copied privately
 * (PRIVATE_FILL), because publishing one page costs 2.5-4.8x a private copy (measured, exp12)
 * and prefetch is on restore's critical path. The background fill publishes them later.
 * Marks what it fills present; returns 0 or -errno with *done = pages filled from p.
 */
#define PUBLISH_MIN_RUN 16

static int prefetch_shared(struct lm_region *r, size_t p, size_t run, const char *src,
                           size_t *done)
{
    size_t ps = r->page_size;
    unsigned char vec[PREFETCH_BATCH];
    *done = 0;
    int rc = lm_pool_holes(r, p, run, vec);
    if (rc == 0 && r->cfg.verify_shared) {
        char *buf = malloc(ps);
        if (!buf)
            return lm_fail("malloc(pool check)", ENOMEM);
        for (size_t i = 0; i < run; i++)
            vec[i] &= 1;
        lm_pool_check(r, p, run, vec, src, buf);   /* src: the store's bytes, verified */
        free(buf);
    }
    for (size_t a = 0; a < run && rc == 0;) {
        unsigned char kind = vec[a] & 1 ? 1 : vec[a];
        size_t b = a + 1;
        while (b < run && (vec[b] & 1 ? 1 : vec[b]) == kind)
            b++;
        bool in_pool = kind == 1;
        char *dst = r->base + (p + a) * ps;
        size_t n = b - a, got = 0, shared = 0, priv = 0;
        /* A read-only pool (a page server's, section 5.3) has no view: every hole private.
           So is a page the pool holds with other bytes than the store's (POOL_BAD). */
        size_t pub = kind == LM_POOL_BAD ||
                     (!in_pool && (n < PUBLISH_MIN_RUN || r->pool_view == MAP_FAILED)) ? 0 : n;
        if (!in_pool && pub) {
            int prc = lm_pool_publish(r, p + a, n, src + a * ps, &pub);   /* [a, a+pub) in */
            /* Publishing refused for want of memory (a memory cgroup's limit, a full
               tmpfs): the rest of the run is copied privately below, as fill_shared does:
               sharing is lost, data is not. */
            if (prc < 0 && prc != -ENOMEM && prc != -ENOSPC)
                rc = prc;
        }
        if (pub) {
            int crc = lm_uffd_continue(r->uffd, dst, pub * ps, true, &got);
            shared = got / ps;
            if (rc == 0)
                rc = crc;
            if (rc == 0 && shared < pub)
                rc = lm_fail("prefetch: the pool lost a published page", EFAULT);
            atomic_fetch_add_explicit(&r->st_shared_mapped, shared, memory_order_relaxed);
            if (shared)
                lm_mark_present(r, p + a, shared, LM_F_PREFETCHED, 0);
        }
        if (rc == 0 && pub < n) {
            rc = lm_uffd_copy(r->uffd, dst + pub * ps, src + (a + pub) * ps, (n - pub) * ps,
                              true, &got);
            priv = got / ps;
            atomic_fetch_add_explicit(&r->st_pool_fallback, priv, memory_order_relaxed);
            if (priv)
                lm_mark_present(r, p + a + pub, priv, LM_F_PREFETCHED | LM_F_PRIVATE_FILL, 0);
        }
        atomic_fetch_add_explicit(&r->st_bytes, (shared + priv) * ps, memory_order_relaxed);
        *done += shared + priv;
        a = b;
    }
    return rc;
}

/*
 * Copy claimed snapshot pages from a buffer holding store entries [base, base + nbuf): runs
 * of address-adjacent pages with consecutive entries go in one UFFDIO_COPY. A page that fails
 * verification or cannot be copied is poisoned; pages a failed copy did fill are present.
 */
static size_t copy_from_batch(struct lm_region *r, const uint64_t *pairs, size_t k,
                              const char *buf, const uint8_t *bad, uint64_t base)
{
    size_t ps = r->page_size, done = 0;
    for (size_t i = 0; i < k;) {
        uint64_t idx = pairs[2 * i], p = pairs[2 * i + 1];
        const char *src = buf + (idx - base) * ps;
        if (bad[idx - base]) {   /* a compressed entry that does not decode: never served */
            lm_poison_page(r, p, lm_fail("snapshot store: an entry does not decompress to its "
                                         "page or differs from its signature (corrupt entry)",
                                         EBADMSG));
            i++;
            continue;
        }
        if (r->src_verify && lm_xxh3(src, ps) != r->meta[p].signature) {
            lm_poison_page(r, p, lm_fail("verify: page contents differ from the snapshot's "
                                         "signature", EBADMSG));
            i++;
            continue;
        }
        size_t run = 1;
        /* Chunk blocks (region.c) and kernel-served pool blocks (store.c) make 2 MiB
           boundaries VMA boundaries: no ioctl crosses one. */
        size_t blk = lm_vma_blocks(r);
        while (i + run < k && pairs[2 * (i + run)] == idx + run &&
               pairs[2 * (i + run) + 1] == p + run && !(blk && (p + run) % blk == 0) &&
               !bad[idx + run - base] &&
               (!r->src_verify ||
                lm_xxh3(src + run * ps, ps) == r->meta[p + run].signature))
            run++;
        char *dst = r->base + p * ps;
        /* One ioctl that also wakes: prefetch normally runs before anyone can fault here, and
           a faulter that is waiting sees the page present a moment before its record does. */
        size_t filled = 0;
        int rc = lm_fill_hook(r);
        if (rc == 0 && r->pool_fd >= 0) {
            rc = prefetch_shared(r, p, run, src, &filled);   /* marks what it fills */
            done += filled;
        } else if (rc == 0) {
            rc = lm_uffd_copy(r->uffd, dst, src, run * ps, true, &filled);
            filled = rc == 0 ? run : filled / ps;
            atomic_fetch_add_explicit(&r->st_bytes, filled * ps, memory_order_relaxed);
            if (filled) {
                lm_mark_present(r, p, filled, LM_F_PREFETCHED, 0);
                done += filled;
            }
        }
        if (rc == -ENOENT || rc == -ESRCH) {
            /* Not registered any more: a deferral made the block kernel-served under us (it
               records the pages again), or the region is going away. Given back, not
               poisoned, as lm_fill_or_poison does; whoever waits on them retries. */
            for (size_t q = filled; q < run; q++)
                lm_release(r, p + q, LM_DEFERRED);
            if (filled < run)
                lm_uffd_wake(r->uffd, r->base + (p + filled) * ps, (run - filled) * ps);
        } else {
            for (size_t q = filled; q < run; q++)
                lm_poison_page(r, p + q, rc);
        }
        i += run;
    }
    return done;
}

/*
 * The store's entries are read in batches, in order, by one thread (one sequential stream for
 * the kernel's readahead), while this thread and a second helper decode (compressed stores)
 * and copy the batches already read to the pages that use them: on a cold page cache the disk
 * and the copies overlap, and both CPUs decode and copy (one UFFDIO_COPY per run of pages, ~2
 * us a page, is most of a scattered prefetch; decoding a zstd page costs 1-5x that).
 */
enum { PREFETCH_BUFS = 8 };

struct batch {
    size_t i, j;        /* pairs[i..j) */
    uint64_t base, count;
    bool ready;         /* read into bufs[index % PREFETCH_BUFS] */
    bool done;          /* copied (pages that failed to copy are poisoned) */
};

struct pipeline {
    struct lm_region *r;
    const uint64_t *pairs;
    struct batch *b;
    size_t nb, next_copy, copied;
    char *bufs[PREFETCH_BUFS];
    uint8_t *bad[PREFETCH_BUFS];   /* per buffer: entries that did not decode */
    int rc;             /* a failed read: -errno, and op names it (the reader's lm_last_op) */
    const char *op;
    bool stop;
    pthread_mutex_t mu;
    pthread_cond_t cv;
};

/*
 * Batch k is read a buffer-ring ahead of time: an object store's fetchers get it now. A local
 * file is told only when the batch does not continue the one before it in the store: the
 * kernel's readahead follows a sequential stream by itself, and a POSIX_FADV_WILLNEED costs
 * the reader the page allocations and submissions it asks for (204 MiB of working set: the
 * hints took 41 ms of the reader's 110-150; without them the prefetch took 118-144 ms instead
 * of 153-195, measured).
 */
static void hint(const struct pipeline *pl, size_t k)
{
    const struct batch *b = &pl->b[k], *prev = &pl->b[k - 1];
    if (!lm_src_follows_streams(pl->r) || b->base != prev->base + prev->count)
        lm_src_willneed(pl->r, b->base, b->count);
}

static void *pipeline_reader(void *arg)
{
    struct pipeline *pl = arg;
    for (size_t idx = 0; idx < pl->nb; idx++) {
        pthread_mutex_lock(&pl->mu);
        /* its buffer is free once the batch PREFETCH_BUFS earlier has been copied */
        while (!pl->stop && idx >= PREFETCH_BUFS && !pl->b[idx - PREFETCH_BUFS].done)
            pthread_cond_wait(&pl->cv, &pl->mu);
        bool stop = pl->stop;
        pthread_mutex_unlock(&pl->mu);
        if (stop)
            break;
        struct batch *b = &pl->b[idx];
        /* the batch a buffer-ring later is read ahead meanwhile (the kernel's readahead, or
           an object store's fetchers); at the start, the whole first ring */
        for (size_t k = 1; idx == 0 && k < PREFETCH_BUFS && k < pl->nb; k++)
            hint(pl, k);
        if (idx + PREFETCH_BUFS < pl->nb)
            hint(pl, idx + PREFETCH_BUFS);
        int rc = lm_src_fetch(pl->r, b->base, b->count, pl->bufs[idx % PREFETCH_BUFS]);
        pthread_mutex_lock(&pl->mu);
        if (rc < 0) {
            pl->rc = rc;
            pl->op = lm_last_op();
            pl->stop = true;
        } else {
            b->ready = true;
        }
        pthread_cond_broadcast(&pl->cv);
        pthread_mutex_unlock(&pl->mu);
        if (rc < 0)
            break;
    }
    return NULL;
}

static void *pipeline_copier(void *arg)
{
    struct pipeline *pl = arg;
    size_t copied = 0;
    pthread_mutex_lock(&pl->mu);
    while (pl->next_copy < pl->nb) {
        size_t idx = pl->next_copy;
        struct batch *b = &pl->b[idx];
        if (!b->ready) {
            if (pl->stop)
                break;   /* the store could not be read */
            pthread_cond_wait(&pl->cv, &pl->mu);
            continue;    /* the other copier may have taken it meanwhile */
        }
        pl->next_copy++;
        pthread_mutex_unlock(&pl->mu);
        /* decoded here, not by the reader: both copiers decode, while the reader only reads
           (a zstd page takes ~2-10 us to decode against ~2 us to copy) */
        char *buf = pl->bufs[idx % PREFETCH_BUFS];
        uint8_t *bad = pl->bad[idx % PREFETCH_BUFS];
        int drc = lm_src_decode(pl->r, b->base, b->count, buf, bad);
        if (drc < 0) {
            /* a whole decode fails on an allocation, or on an object store that could not
               be asked again (the network, credentials): the batch stays not done, and its
               pages go back to lazy when the pipeline ends (copy_store_pipelined) */
            pthread_mutex_lock(&pl->mu);
            pl->rc = drc;
            pl->op = lm_last_op();
            pl->stop = true;
            pthread_cond_broadcast(&pl->cv);
            break;
        }
        copied += copy_from_batch(pl->r, pl->pairs + 2 * b->i, b->j - b->i,
                                  buf, bad, b->base);
        pthread_mutex_lock(&pl->mu);
        b->done = true;
        pthread_cond_broadcast(&pl->cv);
    }
    pl->copied += copied;
    pthread_mutex_unlock(&pl->mu);
    return NULL;
}

/* Everything the pipeline needs, allocated before any page is claimed: once pages are
   claimed, nothing may fail but the reads and copies themselves, whose pages are given back
   or poisoned (issue 10: a failed allocation here used to leave claimed pages BUSY). */
struct pipeline_mem {
    struct batch *b;              /* one per page at most */
    char *bufs[PREFETCH_BUFS];
    uint8_t *bad[PREFETCH_BUFS];
    size_t nbufs;
};

static int pipeline_alloc(struct lm_region *r, size_t n, struct pipeline_mem *pm)
{
    memset(pm, 0, sizeof(*pm));
    pm->b = malloc((n ? n : 1) * sizeof(*pm->b));
    pm->nbufs = n < PREFETCH_BUFS ? n : PREFETCH_BUFS;
    int ok = pm->b != NULL;
    for (size_t i = 0; i < pm->nbufs && ok; i++)
        ok = (pm->bufs[i] = malloc((size_t)PREFETCH_BATCH * r->page_size)) != NULL &&
             (pm->bad[i] = malloc(PREFETCH_BATCH)) != NULL;
    return ok ? 0 : lm_fail("malloc(prefetch buffers)", ENOMEM);
}

static void pipeline_free(struct pipeline_mem *pm)
{
    for (size_t i = 0; i < PREFETCH_BUFS; i++) {
        free(pm->bufs[i]);
        free(pm->bad[i]);
    }
    free(pm->b);
}

static int copy_store_pipelined(struct lm_region *r, const uint64_t *pairs, size_t k,
                                struct pipeline_mem *pm, size_t *done)
{
    if (!k)
        return 0;
    struct pipeline pl = {.r = r, .pairs = pairs, .b = pm->b};
    for (size_t i = 0; i < k; pl.nb++) {
        size_t j = i;
        while (j < k && pairs[2 * j] - pairs[2 * i] < PREFETCH_BATCH)
            j++;
        pl.b[pl.nb] = (struct batch){i, j, pairs[2 * i], pairs[2 * (j - 1)] - pairs[2 * i] + 1,
                                     false, false};
        i = j;
    }
    memcpy(pl.bufs, pm->bufs, sizeof(pl.bufs));   /* nb <= k <= n: enough of them */
    memcpy(pl.bad, pm->bad, sizeof(pl.bad));
    int rc = 0;
    pthread_mutex_init(&pl.mu, NULL);
    pthread_cond_init(&pl.cv, NULL);
    pthread_t reader, copier;
    bool have_reader = false, have_copier = false;
    if (pl.nb > 1 &&
        (have_reader = lm_thread_start(&reader, NULL, pipeline_reader, &pl) == 0)) {
        have_copier = lm_thread_start(&copier, NULL, pipeline_copier, &pl) == 0;
        pipeline_copier(&pl);
    } else {
        /* one batch, or no thread to be had: read a batch, copy it, and so on */
        for (size_t idx = 0; idx < pl.nb && pl.rc == 0; idx++) {
            struct batch *b = &pl.b[idx];
            if ((pl.rc = lm_src_read_each(r, b->base, b->count, pl.bufs[0], pl.bad[0])) < 0) {
                pl.op = lm_last_op();
                break;
            }
            pl.copied += copy_from_batch(r, pairs + 2 * b->i, b->j - b->i, pl.bufs[0],
                                         pl.bad[0], b->base);
            b->done = true;
        }
    }
    pthread_mutex_lock(&pl.mu);
    pl.stop = true;   /* a reader still waiting for a buffer after a failure: let it go */
    pthread_cond_broadcast(&pl.cv);
    pthread_mutex_unlock(&pl.mu);
    if (have_copier)
        pthread_join(copier, NULL);
    if (have_reader)
        pthread_join(reader, NULL);
    if (pl.rc < 0)
        rc = lm_fail(pl.op, -pl.rc);
    *done += pl.copied;
    /* The store could not be read: every page not copied goes back, still lazy, and the
       caller fails (restore() raises rather than return a broken region). */
    for (size_t idx = 0; idx < pl.nb; idx++)
        if (!pl.b[idx].done)
            for (size_t q = pl.b[idx].i; q < pl.b[idx].j; q++)
                lm_release(r, pairs[2 * q + 1], LM_DEFERRED);
    pthread_mutex_destroy(&pl.mu);
    pthread_cond_destroy(&pl.cv);
    return rc;
}

/*
 * Which entries of pages[0..n) repeat an earlier one (first mention wins): bit i of skip.
 * A bitmap over the region where the list is dense, else a sort of (page, index) pairs.
 */
static int find_repeats(struct lm_region *r, const uint64_t *pages, size_t n, uint64_t *skip)
{
    if (r->npages / 64 <= n) {
        uint64_t *seen = calloc(r->npages / 64 + 1, sizeof(uint64_t));
        if (!seen)
            return lm_fail("calloc(prefetch: pages seen)", ENOMEM);
        for (size_t i = 0; i < n; i++) {
            uint64_t p = pages[i], bit = (uint64_t)1 << (p & 63);
            if (seen[p >> 6] & bit)
                skip[i >> 6] |= (uint64_t)1 << (i & 63);
            seen[p >> 6] |= bit;
        }
        free(seen);
        return 0;
    }
    uint64_t *pi = malloc(n * 2 * sizeof(uint64_t));
    if (!pi)
        return lm_fail("malloc(prefetch: repeats)", ENOMEM);
    for (size_t i = 0; i < n; i++)
        pi[2 * i] = pages[i], pi[2 * i + 1] = i;
    qsort(pi, n, 2 * sizeof(uint64_t), by_pair);
    for (size_t i = 1; i < n; i++)
        if (pi[2 * i] == pi[2 * i - 2])
            skip[pi[2 * i + 1] >> 6] |= (uint64_t)1 << (pi[2 * i + 1] & 63);
    free(pi);
    return 0;
}

/*
 * Working-set prefetch. The working set's pages are the first entries of the store, in the
 * order given, so the store is read in large sequential chunks (PREFETCH_BATCH entries per
 * pread) and each entry copied to the pages that use it; pages of other kinds (zero,
 * canonical) are filled one by one. A page listed twice is taken once; a page another thread
 * holds (a fault filling it, a deferral, a reader) is passed over, as are present and
 * poisoned pages: prefetch holds the pages it collects, so it must never wait for another.
 */
int lm_prefetch(struct lm_region *r, const uint64_t *pages, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (pages[i] >= r->npages)
            return lm_fail("prefetch: page index outside the region", ERANGE);
    size_t ps = r->page_size;
    struct lm_serve_thread t = {.r = r};
    struct pipeline_mem pm;
    t.scratch = malloc((size_t)r->cfg.max_cluster_pages * ps);
    uint64_t *pairs = malloc((n ? n : 1) * 2 * sizeof(uint64_t));
    uint64_t *skip = calloc(n / 64 + 1, sizeof(uint64_t));
    int rc = pipeline_alloc(r, n, &pm);
    if (rc == 0 && (!t.scratch || !pairs || !skip))
        rc = lm_fail("malloc(prefetch buffers)", ENOMEM);
    if (rc == 0)
        rc = find_repeats(r, pages, n, skip);
    /* Pages of kernel-served chunk blocks are filled by us only once their block is registered
       (store.c); taken over before any page is claimed here (a take-over holds whole blocks). */
    for (size_t i = 0; i < n && rc == 0; i++)
        if (lm_kernel_page(r, pages[i]))
            rc = lm_chunk_take_over(r, pages[i], 1, false);
    size_t done = 0, k = 0;
    for (size_t i = 0; i < n && rc == 0; i++) {
        if (skip[i >> 6] & ((uint64_t)1 << (i & 63)))
            continue;
        size_t p = pages[i];
        uint8_t s = lm_claim(r, p);
        if (s != LM_EMPTY && s != LM_DEFERRED)
            continue;   /* not claimed: present, poisoned, or held by another thread */
        if (s == LM_EMPTY) {   /* untouched memory: nothing to bring in */
            lm_release(r, p, s);
            continue;
        }
        if (r->meta[p].cls == LM_CLS_SNAPSHOT) {
            pairs[2 * k] = r->meta[p].aux;   /* stays claimed until copied below */
            pairs[2 * k + 1] = p;
            k++;
        } else {
            done += lm_fill_or_poison(r, &t, p, 1, &s, LM_F_PREFETCHED);
        }
    }
    if (rc == 0) {
        qsort(pairs, k, 2 * sizeof(uint64_t), by_pair);
        rc = copy_store_pipelined(r, pairs, k, &pm, &done);
    }
    atomic_fetch_add_explicit(&r->st_prefetched, done, memory_order_relaxed);
    pipeline_free(&pm);
    free(t.scratch);
    free(pairs);
    free(skip);
    return rc;
}

/* ---- background fill ----------------------------------------------------------------- */

/*
 * A reader and an installer. One thread that reads a run of store entries and then copies it
 * leaves the disk idle while it copies and one CPU doing every copy: 2 GiB filled in 2.2-6 s
 * against 0.9 s for the kernel to read the file into its page cache (measured). Two threads
 * that each take the next window from a cursor overlap the two, but read the store as two
 * interleaved streams that the kernel's readahead serves unevenly (1.2-2.8 s, bimodal). So
 * here one thread (the reader) claims runs in address order and reads each into a slot's
 * scratch (lm_fill_assemble): one sequential stream. The other (the installer) copies ready
 * slots into the region (lm_fill_or_poison, which finds the run assembled). BG_SLOTS slots
 * let the reader run ahead. A slot's pages are claimed from the moment the reader takes them
 * until the installer has filled them, so the installer empties every ready slot even when
 * told to stop; the reader waits for a free slot before it claims. On one CPU, and for a shared
 * region (nothing to read ahead), the reader fills each run itself.
 */
#define BG_SLOTS 4

struct lm_bgslot {
    struct lm_serve_thread t;   /* its scratch holds the run once read */
    size_t first, n;
    uint8_t old[BG_MAX];        /* the pages' states before the claim (lm_unclaim) */
};

struct lm_bgfill {
    struct lm_region *r;
    pthread_mutex_t lock;
    pthread_cond_t cond;        /* a slot became ready or free, or the reader finished */
    unsigned head, count;       /* ready slots: head, head+1, ... (mod BG_SLOTS) */
    bool reader_done;
    size_t retry_from;          /* the first page of a run left lazy (SIZE_MAX: none) */
    unsigned streak;            /* runs left lazy since the last one filled */
    struct lm_bgslot slot[BG_SLOTS];
};

/* A serving thread lifts both threads out of SCHED_IDLE while it waits for a page they hold
   (lm_wait_held); each drops back once it holds no claimed run: the reader when it has
   passed its run on, the installer when no slot is ready. Not while the fill is being
   stopped: lm_background_stop lifts both so that its join is not left to idle time. */
static void bg_unboost(struct lm_region *r, unsigned self)
{
    struct sched_param sp = {0};
    if (atomic_load_explicit(&r->bg_stop, memory_order_relaxed))
        return;
    if (atomic_fetch_and(&r->bg_boosted, ~self) & self) {
        pthread_setschedparam(pthread_self(), SCHED_IDLE, &sp);
        /* lifted again between the two (its booster saw the bit still set): stay up */
        if (atomic_load(&r->bg_boosted) & self)
            pthread_setschedparam(pthread_self(), SCHED_OTHER, &sp);
    }
}

/* Under b->lock: how a run that starts at `first` went (kept_lazy: lm_fill_kept_lazy). */
static void bg_outcome(struct lm_bgfill *b, size_t first, int kept_lazy)
{
    if (kept_lazy) {
        if (first < b->retry_from)
            b->retry_from = first;
        b->streak++;
    } else if (b->retry_from == SIZE_MAX) {
        b->streak = 0;
    }
}

/* After runs were left lazy: wait (b->streak's pause, or until told to stop) and return the
   page to read again from; SIZE_MAX: give up (too many failures in a row) or stop. */
static size_t bg_backoff(struct lm_bgfill *b, size_t p)
{
    struct lm_region *r = b->r;
    pthread_mutex_lock(&b->lock);
    size_t again = b->retry_from;
    unsigned streak = b->streak;
    b->retry_from = SIZE_MAX;
    if (again == SIZE_MAX) {
        pthread_mutex_unlock(&b->lock);
        return p;
    }
    if (streak >= BG_GIVE_UP) {
        pthread_mutex_unlock(&b->lock);
        return SIZE_MAX;
    }
    uint64_t ms = (uint64_t)BG_BACKOFF_MS << (streak > 1 ? (streak - 1 < 6 ? streak - 1 : 6) : 0);
    if (ms > BG_BACKOFF_MAX_MS)
        ms = BG_BACKOFF_MAX_MS;
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += (time_t)(ms / 1000);
    until.tv_nsec += (long)(ms % 1000) * 1000000L;
    if (until.tv_nsec >= 1000000000L) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000L;
    }
    /* lm_background_stop broadcasts b->cond under b->lock */
    while (!atomic_load_explicit(&r->bg_stop, memory_order_relaxed) &&
           pthread_cond_timedwait(&b->cond, &b->lock, &until) != ETIMEDOUT)
        ;
    pthread_mutex_unlock(&b->lock);
    if (atomic_load_explicit(&r->bg_stop, memory_order_relaxed))
        return SIZE_MAX;
    return again < p ? again : p;
}

static void *bg_installer(void *arg)
{
    struct lm_bgfill *b = arg;
    struct lm_region *r = b->r;
    struct sched_param sp = {0};
    lm_objs_thread_setup(&r->bg_stop, true);
    pthread_setschedparam(pthread_self(), SCHED_IDLE, &sp);
    pthread_mutex_lock(&b->lock);
    for (;;) {
        while (!b->count && !b->reader_done)
            pthread_cond_wait(&b->cond, &b->lock);
        if (!b->count)
            break;   /* the reader is done and every slot is filled */
        struct lm_bgslot *s = &b->slot[b->head];
        pthread_mutex_unlock(&b->lock);
        size_t done = lm_fill_or_poison(r, &s->t, s->first, s->n, s->old, LM_F_BACKGROUND);
        atomic_fetch_add_explicit(&r->st_background, done, memory_order_relaxed);
        pthread_mutex_lock(&b->lock);
        bg_outcome(b, s->first, lm_fill_kept_lazy);
        b->head = (b->head + 1) % BG_SLOTS;
        b->count--;
        pthread_cond_broadcast(&b->cond);
        if (!b->count)   /* a waiter's page may be in any ready slot */
            bg_unboost(r, 2u);
    }
    pthread_mutex_unlock(&b->lock);
    atomic_fetch_sub(&r->bg_running, 1);
    return NULL;
}

/* Waits for a free slot (NULL: told to stop). */
static struct lm_bgslot *bg_free_slot(struct lm_bgfill *b)
{
    struct lm_region *r = b->r;
    pthread_mutex_lock(&b->lock);
    while (b->count == BG_SLOTS && !atomic_load_explicit(&r->bg_stop, memory_order_relaxed))
        pthread_cond_wait(&b->cond, &b->lock);
    struct lm_bgslot *s = b->count < BG_SLOTS ? &b->slot[(b->head + b->count) % BG_SLOTS] : NULL;
    pthread_mutex_unlock(&b->lock);
    return atomic_load_explicit(&r->bg_stop, memory_order_relaxed) ? NULL : s;
}

static void *bg_reader(void *arg)
{
    struct lm_bgfill *b = arg;
    struct lm_region *r = b->r;
    bool installer = r->bg_nthreads > 1;
    /* Demand faults always come first: run only when a CPU would otherwise idle, and restart
       with small chunks after every demand fault (CRIU's lazy-pages policy). */
    struct sched_param sp = {0};
    pthread_setschedparam(pthread_self(), SCHED_IDLE, &sp);
    lm_objs_thread_setup(&r->bg_stop, true);
    uint32_t chunk = BG_MIN;
    uint64_t faults_seen = atomic_load(&r->st_faults);
    size_t p = 0;
    for (;;) {
        /* runs left lazy (the store failed, may pass): pause, then from the first again */
        size_t again = bg_backoff(b, p);
        if (again == SIZE_MAX)
            break;
        if (again != p) {
            p = again;
            chunk = BG_MIN;
        }
        if (p >= r->npages) {
            /* at the end: wait for the installer's last runs, which may be left lazy */
            pthread_mutex_lock(&b->lock);
            while (installer && b->count && b->retry_from == SIZE_MAX &&
                   !atomic_load_explicit(&r->bg_stop, memory_order_relaxed))
                pthread_cond_wait(&b->cond, &b->lock);
            bool more = b->retry_from != SIZE_MAX;
            pthread_mutex_unlock(&b->lock);
            if (more)
                continue;
            break;
        }
        struct lm_bgslot *s = bg_free_slot(b);
        if (!s)
            break;
        /* small again after a demand fault, and its turn given up before anything is held */
        uint64_t f = atomic_load_explicit(&r->st_faults, memory_order_relaxed);
        if (f != faults_seen) {
            faults_seen = f;
            chunk = BG_MIN;
            sched_yield();
        } else if (chunk < BG_MAX) {
            chunk *= 2;
        }
        /* the next run that needs an update, claimed */
        size_t run = 0;
        for (; p < r->npages && !atomic_load_explicit(&r->bg_stop, memory_order_relaxed); p++) {
            struct lm_page_meta *m = &r->meta[p];
            if (lm_state_load(m) == LM_PRESENT)
                continue;
            uint8_t st = lm_claim(r, p);
            if (st == LM_DEFERRED && (m->flags & LM_F_NEEDS_UPDATE)) {
                s->old[0] = st;
                run = lm_claim_run(r, p, chunk < r->npages - p ? chunk : r->npages - p, s->old);
                break;
            }
            /* zero and untouched pages cost nothing until touched: leave them (and pages it
               could not claim: present, poisoned, or held by another thread) */
            if (st == LM_EMPTY || st == LM_DEFERRED)
                lm_release(r, p, st);
        }
        if (!run)
            continue;   /* at the end (or told to stop): the top decides */
        s->first = p;
        s->n = run;
        p += run;
        /* Files need no hint: this is one sequential stream, which the kernel reads ahead. An
           object store's chunks are fetched ahead on a hint (from held records only: the
           restore table may be gone once every record is filled). */
        const struct lm_page_meta *last = &r->meta[s->first + run - 1];
        if (last->cls == LM_CLS_SNAPSHOT && !lm_src_follows_streams(r))
            lm_src_willneed(r, (uint64_t)last->aux + 1, BG_MAX);
        if (!installer) {
            size_t done = lm_fill_or_poison(r, &s->t, s->first, run, s->old, LM_F_BACKGROUND);
            atomic_fetch_add_explicit(&r->st_background, done, memory_order_relaxed);
            pthread_mutex_lock(&b->lock);
            bg_outcome(b, s->first, lm_fill_kept_lazy);
            pthread_mutex_unlock(&b->lock);
        } else {
            (void)lm_fill_assemble(r, &s->t, s->first, run);   /* a failure: the fill reads again */
            pthread_mutex_lock(&b->lock);
            b->count++;
            pthread_cond_broadcast(&b->cond);
            pthread_mutex_unlock(&b->lock);
        }
        bg_unboost(r, 1u);
    }
    pthread_mutex_lock(&b->lock);
    b->reader_done = true;
    pthread_cond_broadcast(&b->cond);
    pthread_mutex_unlock(&b->lock);
    /* Every page of this region went through: a shared region's pool may be complete now
       (other processes filled the rest, or this one did): made huge and sealed (2.5). At idle
       priority, and given up when told to stop. A failure costs only the seal. */
    if (r->pool_fd >= 0 && p >= r->npages && !atomic_load(&r->bg_stop))
        (void)lm_pool_finish(r, &r->bg_stop);
    atomic_fetch_sub(&r->bg_running, 1);
    return NULL;
}

static void bgfill_free(struct lm_bgfill *b)
{
    if (!b)
        return;
    for (unsigned i = 0; i < BG_SLOTS; i++)
        free(b->slot[i].t.scratch);
    pthread_cond_destroy(&b->cond);
    pthread_mutex_destroy(&b->lock);
    free(b);
}

static struct lm_bgfill *bgfill_new(struct lm_region *r, unsigned nslots)
{
    struct lm_bgfill *b = calloc(1, sizeof(*b));
    if (!b)
        return NULL;
    /* a run is at most BG_MAX pages, and no more than the region has */
    size_t slot_pages = r->npages < BG_MAX ? r->npages : BG_MAX;
    b->r = r;
    b->retry_from = SIZE_MAX;
    pthread_mutex_init(&b->lock, NULL);
    pthread_cond_init(&b->cond, NULL);
    for (unsigned i = 0; i < nslots; i++) {
        b->slot[i].t.r = r;
        b->slot[i].t.read_once = true;   /* the bulk of the file: see LM_SRC_ONCE */
        b->slot[i].t.scratch = malloc((size_t)slot_pages * r->page_size);
        if (!b->slot[i].t.scratch) {
            bgfill_free(b);
            return NULL;
        }
    }
    return b;
}

static int background_start_locked(struct lm_region *r);

int lm_background_start(struct lm_region *r)
{
    pthread_mutex_lock(&r->bg_lock);
    int rc = background_start_locked(r);
    pthread_mutex_unlock(&r->bg_lock);
    return rc;
}

static int background_start_locked(struct lm_region *r)
{
    if (r->bg_started)
        return 0;
    /* The CPUs this thread may run on (a cpuset or taskset; the fill's threads inherit its
       mask), not the machine's: on one, the reader fills each run itself, in one slot (a
       second thread would only take turns). So it does for a shared region, whose runs go to
       the pool rather than through scratch (nothing to read ahead). A mask too large for
       cpu_set_t: more than one. */
    cpu_set_t set;
    long ncpu = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 2;
    unsigned want = ncpu > 1 && r->pool_fd < 0 ? LM_BG_THREADS : 1;
    struct lm_bgfill *b = bgfill_new(r, want > 1 ? BG_SLOTS : 1);
    if (!b)
        return lm_fail("malloc(background fill)", ENOMEM);
    atomic_store(&r->bg_stop, 0);
    atomic_store(&r->bg_boosted, 0);   /* a boost of an earlier fill must not stick */
    atomic_store(&r->bg_running, (int)want);
    r->bg_nthreads = want;   /* read by the reader: whether it has an installer */
    int err = 0;
    if (want > 1 && (err = lm_thread_start(&r->bg_tid[1], NULL, bg_installer, b)) != 0) {
        want = 1;   /* then the reader fills alone */
        r->bg_nthreads = 1;
        atomic_store(&r->bg_running, 1);
    }
    if ((err = lm_thread_start(&r->bg_tid[0], NULL, bg_reader, b)) != 0) {
        if (want > 1) {   /* the installer waits for a reader that never comes */
            pthread_mutex_lock(&b->lock);
            b->reader_done = true;
            pthread_cond_broadcast(&b->cond);
            pthread_mutex_unlock(&b->lock);
            pthread_join(r->bg_tid[1], NULL);
        }
        atomic_store(&r->bg_running, 0);
        bgfill_free(b);
        return lm_fail("pthread_create(background fill)", err);
    }
    r->bgf = b;
    r->bg_started = true;
    return 0;
}

int lm_background_stop(struct lm_region *r)
{
    pthread_mutex_lock(&r->bg_lock);
    if (r->bg_started) {
        atomic_store(&r->bg_stop, 1);
        /* what they hold is finished at normal priority: the join does not wait for idle
           CPUs (they no longer drop back, bg_unboost) */
        struct sched_param sp = {0};
        for (unsigned i = 0; i < r->bg_nthreads; i++)
            pthread_setschedparam(r->bg_tid[i], SCHED_OTHER, &sp);
        pthread_mutex_lock(&r->bgf->lock);   /* wakes a reader that waits for a slot */
        pthread_cond_broadcast(&r->bgf->cond);
        pthread_mutex_unlock(&r->bgf->lock);
        /* the reader first: the installer then empties the slots it filled and ends */
        pthread_join(r->bg_tid[0], NULL);
        if (r->bg_nthreads > 1)
            pthread_join(r->bg_tid[1], NULL);
        bgfill_free(r->bgf);
        r->bgf = NULL;
        r->bg_started = false;
    }
    pthread_mutex_unlock(&r->bg_lock);
    return 0;
}
