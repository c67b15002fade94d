/*
 * snapshot.c: serving pages from a snapshot store, restore prefetch, the background fill,
 * and the two checkpoint steps (plan, write). The file format is in docs/snapshot-format.md;
 * the Python side reads and checks the header and hands the tables over.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>
#include <xxhash.h>

#include "lm_internal.h"

#define SRC_CHECK_NS 10000000u   /* how often the store file is checked for changes (10 ms) */
#define BG_MIN 16u               /* background chunk after a demand fault: 64 KiB */
#define BG_MAX 1024u             /* ... grown while idle up to 4 MiB */
#define PREFETCH_BATCH 256u

_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "snapshot tables are little-endian");
_Static_assert(sizeof(struct lm_snap_page) == 4, "snapshot page-map entry is 4 bytes");

/* ---- the store file ------------------------------------------------------------------ */

int lm_source_attach(struct lm_region *r, int fd, uint64_t store_offset, uint64_t nstored,
                     uint64_t sigs_offset, uint64_t sigs_xxh3, int verify)
{
    if (r->src_fd >= 0)
        return lm_fail("region already has a snapshot source", EBUSY);
    struct stat st;
    if (fstat(fd, &st) < 0)
        return LM_FAIL("fstat(snapshot)");
    if (store_offset % r->page_size || nstored > (uint64_t)st.st_size / r->page_size ||
        store_offset + nstored * r->page_size > (uint64_t)st.st_size ||
        sigs_offset > (uint64_t)st.st_size || nstored > ((uint64_t)st.st_size - sigs_offset) / 8)
        return lm_fail("snapshot store or signatures outside the file", EINVAL);
    int dup = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (dup < 0)
        return LM_FAIL("fcntl(F_DUPFD_CLOEXEC)");
    r->src_fd = dup;
    r->src_store_off = store_offset;
    r->src_nstored = nstored;
    r->src_verify = verify != 0;
    r->src_size = st.st_size;
    r->src_mtime = st.st_mtim;
    r->src_sigs_off = sigs_offset;
    r->src_sigs_xxh3 = sigs_xxh3;
    atomic_store(&r->src_checked_ns, lm_now_ns());
    /* Verification compares every page served with its signature: they must be there first. */
    int rc = verify ? lm_source_signatures(r) : 0;
    if (rc < 0) {
        lm_source_close(r);
        return rc;
    }
    return 0;
}

void lm_source_close(struct lm_region *r)
{
    if (r->src_fd >= 0)
        close(r->src_fd);
    r->src_fd = -1;
    free(atomic_exchange(&r->src_sigs, NULL));
}

static int src_pread(struct lm_region *r, void *dst, size_t len, uint64_t off);

/*
 * The store's signatures are needed only to verify pages, to checkpoint a restored region
 * again (deduplication and the new file's signatures without reading the store) and to show
 * lazy pages' signatures (Region.meta, signatures()), so restore() does not read them.
 */
int lm_source_signatures(struct lm_region *r)
{
    if (r->src_fd < 0 || atomic_load(&r->src_sigs))
        return 0;
    size_t n = r->src_nstored;
    uint64_t *sigs = malloc((n ? n : 1) * sizeof(uint64_t));
    if (!sigs)
        return lm_fail("malloc(snapshot signatures)", ENOMEM);
    int rc = src_pread(r, sigs, n * sizeof(uint64_t), r->src_sigs_off);
    if (rc == 0 && XXH3_64bits(sigs, n * sizeof(uint64_t)) != r->src_sigs_xxh3)
        rc = lm_fail("snapshot signatures: checksum mismatch (corrupt signature section)",
                     EBADMSG);
    if (rc < 0) {
        free(sigs);
        return rc;
    }
    uint64_t *none = NULL;
    if (!atomic_compare_exchange_strong(&r->src_sigs, &none, sigs)) {
        free(sigs);   /* another thread read them first */
        return 0;
    }
    /* Records filled from the page map before now have signature 0: give them theirs. A
       claimer that took its bit before the store above may not have seen the signatures; this
       pass sees its bit (both sequentially consistent) and waits for its claim to end. */
    for (size_t w = 0; w < (r->npages + 63) / 64; w++) {
        uint64_t done = atomic_load_explicit(&r->base_done[w], memory_order_seq_cst);
        for (; done; done &= done - 1) {
            size_t p = w * 64 + (size_t)__builtin_ctzll(done);
            struct lm_page_meta *m = &r->meta[p];
            uint8_t s = lm_state_load(m);
            if (s != LM_BUSY &&
                !(s == LM_DEFERRED && m->cls == LM_CLS_SNAPSHOT && m->signature == 0))
                continue;
            s = lm_claim_wait(r, p);
            if (s == LM_DEFERRED && m->cls == LM_CLS_SNAPSHOT && m->signature == 0)
                m->signature = sigs[m->aux];
            lm_release(m, s);
        }
    }
    return 0;
}

uint8_t lm_snap_apply_base(struct lm_region *r, size_t p, uint8_t s)
{
    const struct lm_snap_page *map = atomic_load_explicit(&r->base_table, memory_order_acquire);
    if (!map)
        return s;
    struct lm_page_meta *m = &r->meta[p];
    uint32_t e = map[p].entry;
    if (e == LM_SNAP_ZERO) {
        m->cls = LM_CLS_ZERO;
        m->signature = r->zero_sig;
        return LM_DEFERRED;
    }
    if (e >= LM_SNAP_STORED) {
        /* Sequentially consistent: see lm_source_signatures(). */
        const uint64_t *sigs = atomic_load_explicit(&r->src_sigs, memory_order_seq_cst);
        m->cls = LM_CLS_SNAPSHOT;
        m->aux = e - LM_SNAP_STORED;   /* below nstored: checked by lm_restore_table */
        m->signature = sigs ? sigs[m->aux] : 0;
        m->flags = LM_F_NEEDS_UPDATE;
        return LM_DEFERRED;
    }
    return s;
}

/* A store that changes under a running restore must fail loudly, not serve mixed data. */
static int source_still_valid(struct lm_region *r)
{
    int broken = atomic_load_explicit(&r->src_broken, memory_order_relaxed);
    if (broken)
        return broken;
    uint64_t now = lm_now_ns();
    uint64_t last = atomic_load_explicit(&r->src_checked_ns, memory_order_relaxed);
    if (now - last < SRC_CHECK_NS)
        return 0;
    atomic_store_explicit(&r->src_checked_ns, now, memory_order_relaxed);
    struct stat st;
    if (fstat(r->src_fd, &st) < 0)
        broken = -errno;
    else if (st.st_size != r->src_size || st.st_mtim.tv_sec != r->src_mtime.tv_sec ||
             st.st_mtim.tv_nsec != r->src_mtime.tv_nsec)
        broken = -ESTALE;
    if (broken)
        atomic_store(&r->src_broken, broken);
    return broken;
}

int lm_src_read(struct lm_region *r, uint64_t index, size_t count, void *dst)
{
    if (r->src_fd < 0)
        return lm_fail("snapshot page without a snapshot source", ENOENT);
    if (index > r->src_nstored || count > r->src_nstored - index)
        return lm_fail("snapshot store index out of range", ERANGE);
    size_t len = count * r->page_size;
    int rc = src_pread(r, dst, len, r->src_store_off + index * r->page_size);
    if (rc == 0)
        atomic_fetch_add_explicit(&r->st_src_bytes, len, memory_order_relaxed);
    return rc;
}

static int src_pread(struct lm_region *r, void *dst, size_t len, uint64_t offset)
{
    int broken = source_still_valid(r);
    if (broken)
        return lm_fail("snapshot file changed or vanished under a running restore", -broken);
    size_t done = 0;
    off_t off = (off_t)offset;
    while (done < len) {
        ssize_t got = pread(r->src_fd, (char *)dst + done, len - done, off + (off_t)done);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            return LM_FAIL("pread(snapshot)");
        }
        if (got == 0) {
            atomic_store(&r->src_broken, -ENODATA);
            return lm_fail("pread(snapshot): file truncated under a running restore", ENODATA);
        }
        done += (size_t)got;
    }
    return 0;
}

/* ---- restore ------------------------------------------------------------------------- */

int lm_snap_check(const struct lm_snap_page *map, size_t npages, uint64_t nstored,
                  const uint64_t *ws, size_t nws, uint64_t *counts)
{
    int rc = 0;
    uint64_t *used = calloc((nstored + 63) / 64 + 1, sizeof(uint64_t));
    uint64_t *in_ws = calloc((npages + 63) / 64 + 1, sizeof(uint64_t));
    if (!used || !in_ws) {
        rc = lm_fail("snapshot check: out of memory", ENOMEM);
        goto out;
    }
    for (size_t i = 0; i < nws; i++) {
        if (ws[i] >= npages) {
            rc = lm_fail("working set names a page outside the region", EINVAL);
            goto out;
        }
        if (in_ws[ws[i] >> 6] & ((uint64_t)1 << (ws[i] & 63))) {
            rc = lm_fail("working set lists a page twice", EINVAL);
            goto out;
        }
        in_ws[ws[i] >> 6] |= (uint64_t)1 << (ws[i] & 63);
    }
    /* Branch-free: the classes of neighbouring pages are as good as random. */
    uint64_t c[LM_SNAP_STORED] = {0, 0}, top = 0;
    for (size_t i = 0; i < npages; i++) {
        uint64_t e = map[i].entry;
        top = e > top ? e : top;
        c[0] += e == LM_SNAP_UNTOUCHED;
        c[1] += e == LM_SNAP_ZERO;
        uint64_t k = e - LM_SNAP_STORED;   /* wraps for the two classes that are not stored */
        used[(k < nstored ? k : nstored + 63) >> 6] |= (uint64_t)(k < nstored) << (k & 63);
    }
    if (top >= nstored + LM_SNAP_STORED) {
        rc = lm_fail("page map points past the end of the store", EINVAL);
        goto out;
    }
    for (uint64_t w = 0; w < nstored / 64; w++)
        if (used[w] != ~(uint64_t)0) {
            rc = lm_fail("store has entries no page uses", EINVAL);
            goto out;
        }
    if (nstored % 64 && used[nstored / 64] != ((uint64_t)1 << (nstored % 64)) - 1) {
        rc = lm_fail("store has entries no page uses", EINVAL);
        goto out;
    }
    if (counts) {
        counts[0] = c[0];
        counts[1] = c[1];
        counts[2] = npages - c[0] - c[1];
    }
out:
    free(used);
    free(in_ws);
    return rc;
}

int lm_restore_table(struct lm_region *r, const struct lm_snap_page *map, size_t npages,
                     uint64_t nstored)
{
    if (npages != r->npages)
        return lm_fail("snapshot page count differs from the region's", EINVAL);
    if (r->base_table || r->used || atomic_load(&r->st_faults) || atomic_load(&r->st_present) ||
        atomic_load(&r->nranges))
        return lm_fail("restore into a region that is already in use", EBUSY);
    if (nstored > r->src_nstored)
        return lm_fail("page map names more store entries than the source has", EINVAL);
    /* Every store index the fault path will read must be in range (a vectorised max). */
    uint32_t top = 0;
    for (size_t i = 0; i < npages; i++)
        top = map[i].entry > top ? map[i].entry : top;
    if (top >= nstored + LM_SNAP_STORED)
        return lm_fail("page map: store index out of range", EINVAL);
    /* The caller keeps `map` alive until lm_meta_pending() is 0 or the region ends. */
    atomic_store_explicit(&r->base_table, map, memory_order_release);
    atomic_store_explicit(&r->lazy_records, 1, memory_order_seq_cst);
    return 0;
}

/*
 * Fill claimed pages [first, first+n) (one kind), falling back to one page at a time when the
 * run fails, so that a single bad page is poisoned and its neighbours are still served.
 */
static size_t fill_or_poison(struct lm_region *r, struct lm_serve_thread *t, size_t first,
                             size_t n, const uint8_t *old, uint16_t flag)
{
    int rc = lm_fill_run(r, t, first, n, false, false);
    if (rc == 0) {
        lm_mark_present(r, first, n, flag, 0);
        lm_uffd_wake(r->uffd, r->base + first * r->page_size, n * r->page_size);
        return n;
    }
    size_t done = 0;
    for (size_t i = 0; i < n; i++) {
        if (n > 1)
            rc = lm_fill_run(r, t, first + i, 1, false, false);
        if (rc == 0) {
            lm_mark_present(r, first + i, 1, flag, 0);
            lm_uffd_wake(r->uffd, r->base + (first + i) * r->page_size, r->page_size);
            done++;
        } else if (rc == -ENOENT || rc == -ESRCH) {
            lm_unclaim(r, first + i, n - i, old + i);   /* region going away */
            break;
        } else {
            lm_poison_page(r, first + i, rc);
        }
    }
    return done;
}

static int by_store(const void *a, const void *b)
{
    const uint64_t *x = a, *y = b;
    return x[0] != y[0] ? (x[0] < y[0] ? -1 : 1) : (x[1] < y[1] ? -1 : x[1] > y[1]);
}

/*
 * Copy claimed snapshot pages from a buffer holding store entries [base, base + nbuf): runs
 * of address-adjacent pages with consecutive entries go in one UFFDIO_COPY.
 */
static size_t copy_from_batch(struct lm_region *r, const uint64_t *pairs, size_t k,
                              const char *buf, uint64_t base)
{
    size_t ps = r->page_size, done = 0;
    for (size_t i = 0; i < k;) {
        uint64_t idx = pairs[2 * i], p = pairs[2 * i + 1];
        const char *src = buf + (idx - base) * ps;
        if (r->src_verify && XXH3_64bits(src, ps) != r->meta[p].signature) {
            lm_poison_page(r, p, lm_fail("verify: page contents differ from the snapshot's "
                                         "signature", EBADMSG));
            i++;
            continue;
        }
        size_t run = 1;
        while (i + run < k && pairs[2 * (i + run)] == idx + run &&
               pairs[2 * (i + run) + 1] == p + run &&
               (!r->src_verify ||
                XXH3_64bits(src + run * ps, ps) == r->meta[p + run].signature))
            run++;
        char *dst = r->base + p * ps;
        /* One ioctl that also wakes: prefetch normally runs before anyone can fault here, and
           a faulter that is waiting sees the page present a moment before its record does. */
        int rc = lm_uffd_copy(r->uffd, dst, src, run * ps, true);
        if (rc == 0) {
            atomic_fetch_add_explicit(&r->st_bytes, run * ps, memory_order_relaxed);
            lm_mark_present(r, p, run, LM_F_PREFETCHED, 0);
            done += run;
        } else {
            for (size_t q = 0; q < run; q++)
                lm_poison_page(r, p + q, rc);
        }
        i += run;
    }
    return done;
}

/*
 * The store's entries are read in batches, in order, by one thread (one sequential stream for
 * the kernel's readahead), while this thread and a second helper copy the batches already read
 * to the pages that use them: on a cold page cache the disk and the copies overlap, and both
 * CPUs copy (one UFFDIO_COPY per run of pages, ~2 us a page, is most of a scattered prefetch).
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
    int rc;             /* a failed read: -errno, and op names it (the reader's lm_last_op) */
    const char *op;
    bool stop;
    pthread_mutex_t mu;
    pthread_cond_t cv;
};

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
        int rc = lm_src_read(pl->r, b->base, b->count, pl->bufs[idx % PREFETCH_BUFS]);
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
        copied += copy_from_batch(pl->r, pl->pairs + 2 * b->i, b->j - b->i,
                                  pl->bufs[idx % PREFETCH_BUFS], b->base);
        pthread_mutex_lock(&pl->mu);
        b->done = true;
        pthread_cond_broadcast(&pl->cv);
    }
    pl->copied += copied;
    pthread_mutex_unlock(&pl->mu);
    return NULL;
}

static int copy_store_pipelined(struct lm_region *r, const uint64_t *pairs, size_t k,
                                size_t *done)
{
    if (!k)
        return 0;
    struct pipeline pl = {.r = r, .pairs = pairs};
    pl.b = malloc(k * sizeof(*pl.b));
    if (!pl.b)
        return lm_fail("malloc(prefetch batches)", ENOMEM);
    for (size_t i = 0; i < k; pl.nb++) {
        size_t j = i;
        while (j < k && pairs[2 * j] - pairs[2 * i] < PREFETCH_BATCH)
            j++;
        pl.b[pl.nb] = (struct batch){i, j, pairs[2 * i], pairs[2 * (j - 1)] - pairs[2 * i] + 1,
                                     false, false};
        i = j;
    }
    int rc = 0;
    for (size_t i = 0; i < (pl.nb < PREFETCH_BUFS ? pl.nb : PREFETCH_BUFS) && rc == 0; i++)
        if (!(pl.bufs[i] = malloc((size_t)PREFETCH_BATCH * r->page_size)))
            rc = lm_fail("malloc(prefetch buffers)", ENOMEM);
    pthread_mutex_init(&pl.mu, NULL);
    pthread_cond_init(&pl.cv, NULL);
    pthread_t reader, copier;
    bool have_reader = false, have_copier = false;
    if (rc == 0 && pl.nb > 1 && (have_reader = lm_thread_start(&reader, NULL, pipeline_reader, &pl) == 0)) {
        have_copier = lm_thread_start(&copier, NULL, pipeline_copier, &pl) == 0;
        pipeline_copier(&pl);
    } else if (rc == 0) {
        /* one batch, or no thread to be had: read a batch, copy it, and so on */
        for (size_t idx = 0; idx < pl.nb && pl.rc == 0; idx++) {
            struct batch *b = &pl.b[idx];
            if ((pl.rc = lm_src_read(r, b->base, b->count, pl.bufs[0])) < 0) {
                pl.op = lm_last_op();
                break;
            }
            pl.copied += copy_from_batch(r, pairs + 2 * b->i, b->j - b->i, pl.bufs[0], b->base);
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
    if (rc == 0 && pl.rc < 0)
        rc = lm_fail(pl.op, -pl.rc);
    *done += pl.copied;
    /* The store could not be read: every page not copied goes back, still lazy, and the
       caller fails (restore() raises rather than return a broken region). */
    for (size_t idx = 0; idx < pl.nb; idx++)
        if (!pl.b[idx].done)
            for (size_t q = pl.b[idx].i; q < pl.b[idx].j; q++)
                lm_release(&r->meta[pairs[2 * q + 1]], LM_DEFERRED);
    pthread_mutex_destroy(&pl.mu);
    pthread_cond_destroy(&pl.cv);
    for (size_t i = 0; i < PREFETCH_BUFS; i++)
        free(pl.bufs[i]);
    free(pl.b);
    return rc;
}

/*
 * Working-set prefetch. The working set's pages are the first entries of the store, in the
 * order given, so the store is read in large sequential chunks (PREFETCH_BATCH entries per
 * pread) and each entry copied to the pages that use it; pages of other kinds (zero,
 * canonical) are filled one by one.
 */
int lm_prefetch(struct lm_region *r, const uint64_t *pages, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (pages[i] >= r->npages)
            return lm_fail("prefetch: page index outside the region", ERANGE);
    size_t ps = r->page_size;
    struct lm_serve_thread t = {.r = r};
    t.scratch = malloc((size_t)r->cfg.max_cluster_pages * ps);
    uint64_t *pairs = malloc((n ? n : 1) * 2 * sizeof(uint64_t));
    if (!t.scratch || !pairs) {
        free(t.scratch);
        free(pairs);
        return lm_fail("malloc(prefetch buffers)", ENOMEM);
    }
    size_t done = 0, k = 0;
    unsigned spins = 0;
    int rc = 0;
    for (size_t i = 0; i < n;) {
        size_t p = pages[i];
        uint8_t s = lm_claim(r, p);
        if (s == LM_BUSY) {
            lm_wait_busy(&spins);
            continue;
        }
        i++;
        if (s == LM_PRESENT)
            continue;
        if (s == LM_EMPTY) {   /* untouched memory: nothing to bring in */
            lm_release(&r->meta[p], s);
            continue;
        }
        if (r->meta[p].cls == LM_CLS_SNAPSHOT) {
            pairs[2 * k] = r->meta[p].aux;   /* stays claimed until copied below */
            pairs[2 * k + 1] = p;
            k++;
        } else {
            done += fill_or_poison(r, &t, p, 1, &s, LM_F_PREFETCHED);
        }
    }
    qsort(pairs, k, 2 * sizeof(uint64_t), by_store);
    rc = copy_store_pipelined(r, pairs, k, &done);
    atomic_fetch_add_explicit(&r->st_prefetched, done, memory_order_relaxed);
    free(t.scratch);
    free(pairs);
    return rc;
}

/* ---- background fill ----------------------------------------------------------------- */

static void *bg_main(void *arg)
{
    struct lm_region *r = arg;
    /* Demand faults always come first: run only when a CPU would otherwise idle, and restart
       with small chunks after every demand fault (CRIU's lazy-pages policy). */
    struct sched_param sp = {0};
    pthread_setschedparam(pthread_self(), SCHED_IDLE, &sp);
    uint8_t *old = malloc(BG_MAX);
    uint32_t chunk = BG_MIN;
    uint64_t faults_seen = atomic_load(&r->st_faults);
    size_t p = 0;
    while (old && p < r->npages && !atomic_load_explicit(&r->bg_stop, memory_order_relaxed)) {
        uint64_t f = atomic_load_explicit(&r->st_faults, memory_order_relaxed);
        if (f != faults_seen) {
            faults_seen = f;
            chunk = BG_MIN;
            sched_yield();
        } else if (chunk < BG_MAX) {
            chunk *= 2;
        }
        struct lm_page_meta *m = &r->meta[p];
        if (lm_state_load(m) == LM_PRESENT) {
            p++;
            continue;
        }
        uint8_t s = lm_claim(r, p);
        if (s != LM_DEFERRED || !(m->flags & LM_F_NEEDS_UPDATE)) {
            /* zero and untouched pages cost nothing until touched: leave them */
            if (s != LM_BUSY && s != LM_PRESENT)
                lm_release(m, s);
            p++;
            continue;
        }
        old[0] = s;
        size_t run = lm_claim_run(r, p, chunk, old);
        size_t done = fill_or_poison(r, &r->bg, p, run, old, LM_F_BACKGROUND);
        atomic_fetch_add_explicit(&r->st_background, done, memory_order_relaxed);
        p += run;
        if (atomic_exchange(&r->bg_boosted, 0))
            pthread_setschedparam(pthread_self(), SCHED_IDLE, &sp);   /* back to idle */
    }
    free(old);
    atomic_store(&r->bg_running, 0);
    return NULL;
}

static int background_start_locked(struct lm_region *r);

/*
 * Priority inheritance by hand. The fill runs at SCHED_IDLE and may be preempted while it holds
 * a run of pages BUSY; a serving thread that waits for one of them would then wait as long as
 * the CPUs stay busy (seconds, measured). So a waiter lifts the fill to normal priority; the
 * fill drops back to SCHED_IDLE as soon as it has released that run.
 */
void lm_boost_background(struct lm_region *r)
{
    if (!atomic_load(&r->bg_running) || pthread_mutex_trylock(&r->bg_lock))
        return;   /* not running, or being started/stopped/boosted by someone else */
    if (r->bg_started && !atomic_exchange(&r->bg_boosted, 1)) {
        struct sched_param sp = {0};
        pthread_setschedparam(r->bg_tid, SCHED_OTHER, &sp);
    }
    pthread_mutex_unlock(&r->bg_lock);
}

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
    if (!r->bg.scratch) {
        r->bg.r = r;
        r->bg.scratch = malloc((size_t)BG_MAX * r->page_size);
        if (!r->bg.scratch)
            return lm_fail("malloc(background scratch)", ENOMEM);
    }
    atomic_store(&r->bg_stop, 0);
    atomic_store(&r->bg_running, 1);
    int err = lm_thread_start(&r->bg_tid, NULL, bg_main, r);
    if (err) {
        atomic_store(&r->bg_running, 0);
        return lm_fail("pthread_create(background fill)", err);
    }
    r->bg_started = true;
    return 0;
}

int lm_background_stop(struct lm_region *r)
{
    pthread_mutex_lock(&r->bg_lock);
    if (r->bg_started) {
        atomic_store(&r->bg_stop, 1);
        pthread_join(r->bg_tid, NULL);
        r->bg_started = false;
    }
    pthread_mutex_unlock(&r->bg_lock);
    return 0;
}

/* ---- reading contents without faulting ----------------------------------------------- */

int lm_page_read(struct lm_region *r, size_t page, void *out)
{
    if (page >= r->npages)
        return lm_fail("page index outside the region", ERANGE);
    struct lm_page_meta *m = &r->meta[page];
    unsigned spins = 0;
    for (;;) {
        uint8_t s = lm_state_load(m);
        if (s == LM_BUSY) {
            lm_wait_busy(&spins);
            continue;
        }
        if (s == LM_PRESENT) {
            memcpy(out, r->base + page * r->page_size, r->page_size);
            return 0;
        }
        /* Lazy: take the page so it cannot change under us, read its source, give it back. */
        s = lm_claim(r, page);
        if (s == LM_BUSY || s == LM_PRESENT)
            continue;
        int rc = 0;
        if (m->cls == LM_CLS_CANONICAL)
            memcpy(out, lm_canon_page(r, m->canon), r->page_size);
        else if (m->cls == LM_CLS_SNAPSHOT)
            rc = lm_src_read(r, m->aux, 1, out);
        else
            memset(out, 0, r->page_size);
        lm_release(m, s);
        return rc;
    }
}

/* ---- checkpoint ---------------------------------------------------------------------- */

/* Where a page's contents come from, for comparing two pages without faulting either. */
struct content {
    const char *mem;   /* in memory (present page or canonical page), or NULL */
    uint64_t store;    /* snapshot store entry when mem is NULL */
};

static int page_equal(struct lm_region *r, const struct content *a, const struct content *b,
                      char *buf_a, char *buf_b, bool *equal)
{
    const char *pa = a->mem, *pb = b->mem;
    int rc;
    if (!pa && !pb && a->store == b->store) {
        *equal = true;
        return 0;
    }
    if (!pa) {
        if ((rc = lm_src_read(r, a->store, 1, buf_a)) < 0)
            return rc;
        pa = buf_a;
    }
    if (!pb) {
        if ((rc = lm_src_read(r, b->store, 1, buf_b)) < 0)
            return rc;
        pb = buf_b;
    }
    *equal = memcmp(pa, pb, r->page_size) == 0;
    return 0;
}

static bool is_zero(const char *p, size_t len)
{
    const uint64_t *w = (const uint64_t *)p;
    for (size_t i = 0; i < len / 8; i += 4)
        if (w[i] | w[i + 1] | w[i + 2] | w[i + 3])
            return false;
    return true;
}

/* Open addressing on the signature: one slot (key and entry together, one cache miss). */
struct slot {
    uint64_t key;     /* signature */
    uint64_t store;   /* store index + 1, 0 = empty */
};

struct dedup {
    struct slot *slots;
    size_t mask;
};

/* What the plan knows of one page. */
struct plan_page {
    struct content c;
    uint64_t sig;
    uint8_t cls;      /* enum lm_snap_class */
    bool placed;      /* has its store entry (working-set pages are placed first) */
};

/* Classify one page: its class, signature and where its contents are. */
static int classify(struct lm_region *r, size_t p, struct plan_page *e)
{
    struct lm_page_meta *m = &r->meta[p];
    uint8_t s;
    for (unsigned spins = 0; (s = lm_state_load(m)) == LM_BUSY;)
        lm_wait_busy(&spins);
    memset(e, 0, sizeof(*e));
    if (s == LM_EMPTY) {
        e->cls = LM_SNAP_UNTOUCHED;
        return 0;
    }
    if (s == LM_DEFERRED) {
        if (m->cls == LM_CLS_CANONICAL) {
            e->c.mem = lm_canon_page(r, m->canon);
            e->sig = m->signature;
            e->cls = is_zero(e->c.mem, r->page_size) ? LM_SNAP_ZERO : LM_SNAP_STORED;
        } else if (m->cls == LM_CLS_SNAPSHOT) {
            /* Taken from the source store, not faulted in; its signature from the source's
               signature section (lm_ckpt_plan has read it). */
            const uint64_t *sigs = atomic_load(&r->src_sigs);
            if (!sigs)
                return lm_fail("checkpoint: the source snapshot's signatures are not available",
                               ENODATA);
            e->c.store = m->aux;
            e->sig = sigs[m->aux];
            e->cls = e->sig == r->zero_sig ? LM_SNAP_ZERO : LM_SNAP_STORED;
        } else {
            e->cls = LM_SNAP_ZERO;
        }
        if (e->cls == LM_SNAP_ZERO)
            e->sig = r->zero_sig;
        return 0;
    }
    /* Present: hash what is there. */
    e->c.mem = r->base + p * r->page_size;
    if (is_zero(e->c.mem, r->page_size)) {
        e->cls = LM_SNAP_ZERO;
        e->sig = r->zero_sig;
    } else {
        e->cls = LM_SNAP_STORED;
        e->sig = XXH3_64bits(e->c.mem, r->page_size);
    }
    m->signature = e->sig;
    return 0;
}

/*
 * Give page p (classified STORED) a store entry, sharing one with the same signature. With
 * `verify`, contents are compared byte by byte and a collision gets its own entry; without,
 * the first entry with the signature is taken (lm_ckpt_compare checks them afterwards).
 */
static int place(struct lm_region *r, struct dedup *d, size_t p, struct plan_page *pp,
                 struct lm_snap_page *map, uint64_t *sigs, uint64_t *store_pages,
                 uint64_t *nstored, char *buf, bool verify)
{
    struct plan_page *e = &pp[p];
    e->placed = true;
    size_t h = e->sig & d->mask;
    for (; d->slots[h].store; h = (h + 1) & d->mask) {
        if (d->slots[h].key != e->sig)
            continue;
        uint64_t idx = d->slots[h].store - 1;
        if (verify) {
            bool eq;
            int rc = page_equal(r, &e->c, &pp[store_pages[idx]].c, buf, buf + r->page_size,
                                &eq);
            if (rc < 0)
                return rc;
            if (!eq)
                continue;
        }
        map[p].entry = (uint32_t)(LM_SNAP_STORED + idx);
        return 0;
    }
    /* New contents (or a hash collision): a new store entry. */
    d->slots[h].key = e->sig;
    d->slots[h].store = *nstored + 1;
    store_pages[*nstored] = p;
    sigs[*nstored] = e->sig;
    map[p].entry = (uint32_t)(LM_SNAP_STORED + *nstored);
    (*nstored)++;
    return 0;
}

/*
 * Classifying every page (zero check and hash) is most of the plan's time and each page is
 * independent: the pages are split between this thread and a helper.
 */
struct plan_part {
    struct lm_region *r;
    struct plan_page *pp;
    size_t lo, hi;
    int rc;
    const char *op;       /* lm_last_op() of a failure, from the thread that failed */
};

static void *plan_part_main(void *arg)
{
    struct plan_part *a = arg;
    for (size_t p = a->lo; p < a->hi && a->rc == 0; p++)
        a->rc = classify(a->r, p, &a->pp[p]);
    if (a->rc < 0)
        a->op = lm_last_op();
    return NULL;
}

static int classify_all(struct lm_region *r, struct plan_page *pp)
{
    size_t n = r->npages;
    struct plan_part part[2] = {{.r = r, .pp = pp, .lo = 0, .hi = n / 2},
                                {.r = r, .pp = pp, .lo = n / 2, .hi = n}};
    pthread_t tid;
    bool threaded = false;
    if (n >= 4096) {   /* a thread costs more than classifying a small region */
        threaded = lm_thread_start(&tid, NULL, plan_part_main, &part[1]) == 0;
    }
    plan_part_main(&part[0]);
    if (threaded)
        pthread_join(tid, NULL);
    else
        plan_part_main(&part[1]);
    for (int i = 0; i < 2; i++)
        if (part[i].rc < 0)
            return lm_fail(part[i].op, -part[i].rc);
    return 0;
}

/* Lay out the store: the working set first, in its order (restore prefetches it in one
   read), then the other pages in address order. */
static int plan_place(struct lm_region *r, struct plan_page *pp, const uint64_t *ws, size_t nws,
                      struct lm_snap_page *map, uint64_t *sigs, uint64_t *store_pages,
                      uint64_t *nstored, bool verify)
{
    size_t n = r->npages, cap = 1024;
    while (cap < 2 * n)
        cap *= 2;
    struct dedup d = {calloc(cap, sizeof(struct slot)), cap - 1};
    char *buf = malloc(2 * r->page_size);
    int rc = 0;
    if (!d.slots || !buf) {
        rc = lm_fail("checkpoint: out of memory", ENOMEM);
        goto out;
    }
    *nstored = 0;
    for (size_t p = 0; p < n; p++)
        map[p].entry = pp[p].cls;   /* stored pages get their entry below */
    for (size_t i = 0; i < nws && rc == 0; i++)
        if (pp[ws[i]].cls == LM_SNAP_STORED && !pp[ws[i]].placed)
            rc = place(r, &d, ws[i], pp, map, sigs, store_pages, nstored, buf, verify);
    for (size_t p = 0; p < n && rc == 0; p++)
        if (pp[p].cls == LM_SNAP_STORED && !pp[p].placed)
            rc = place(r, &d, p, pp, map, sigs, store_pages, nstored, buf, verify);
out:
    free(d.slots);
    free(buf);
    return rc;
}

int lm_ckpt_plan(struct lm_region *r, const uint64_t *ws, size_t nws,
                 struct lm_snap_page *map, uint64_t *sigs, uint64_t *store_pages,
                 uint64_t *nstored, int compare)
{
    size_t n = r->npages;
    if (n > UINT32_MAX - LM_SNAP_STORED)
        return lm_fail("checkpoint: more pages than the format's 32-bit page map", EFBIG);
    for (size_t i = 0; i < nws; i++)
        if (ws[i] >= n)
            return lm_fail("checkpoint: working-set page outside the region", ERANGE);
    int rc = lm_meta_sync(r);   /* also reads the source's signatures, if any */
    if (rc < 0)
        return rc;
    struct plan_page *pp = malloc(n * sizeof(*pp));
    if (!pp)
        return lm_fail("checkpoint: out of memory", ENOMEM);
    if ((rc = classify_all(r, pp)) == 0)
        rc = plan_place(r, pp, ws, nws, map, sigs, store_pages, nstored, compare != 0);
    free(pp);
    return rc;
}

/* Where page p's contents are now, without faulting it in. */
static void locate(struct lm_region *r, size_t p, struct content *c)
{
    struct lm_page_meta *m = &r->meta[p];
    uint8_t s;
    for (unsigned spins = 0; (s = lm_state_load(m)) == LM_BUSY;)
        lm_wait_busy(&spins);
    c->mem = r->zero_src;
    c->store = 0;
    if (s == LM_PRESENT)
        c->mem = r->base + p * r->page_size;
    else if (s == LM_DEFERRED && m->cls == LM_CLS_CANONICAL)
        c->mem = lm_canon_page(r, m->canon);
    else if (s == LM_DEFERRED && m->cls == LM_CLS_SNAPSHOT)
        c->mem = NULL, c->store = m->aux;
}

int lm_ckpt_compare(struct lm_region *r, const struct lm_snap_page *map,
                    const uint64_t *store_pages, uint64_t nstored)
{
    char *buf = malloc(2 * r->page_size);
    if (!buf)
        return lm_fail("checkpoint: out of memory", ENOMEM);
    int rc = 0;
    for (size_t p = 0; p < r->npages && rc == 0; p++) {
        uint64_t e = map[p].entry;
        if (e < LM_SNAP_STORED)
            continue;
        if (e - LM_SNAP_STORED >= nstored || store_pages[e - LM_SNAP_STORED] >= r->npages) {
            rc = lm_fail("checkpoint: page map and store disagree", EINVAL);
            break;
        }
        size_t owner = store_pages[e - LM_SNAP_STORED];
        if (owner == p)
            continue;
        struct content a, b;
        bool eq;
        locate(r, p, &a);
        locate(r, owner, &b);
        if ((rc = page_equal(r, &a, &b, buf, buf + r->page_size, &eq)) == 0 && !eq)
            rc = 1;   /* same signature, other contents */
    }
    free(buf);
    return rc;
}

int lm_ckpt_write(struct lm_region *r, int fd, uint64_t offset, const uint64_t *store_pages,
                  size_t n)
{
    enum { IOV = 1024 };   /* IOV_MAX: fewer, larger writes */
    struct iovec iov[IOV];
    char *bufs = malloc((size_t)IOV * r->page_size);
    if (!bufs)
        return lm_fail("malloc(checkpoint buffer)", ENOMEM);
    int rc = 0;
    size_t ps = r->page_size;
    for (size_t i = 0; i < n && rc == 0;) {
        /* Gather up to IOV pages; present pages are written straight from the region, lazy
           ones are read from their source (never faulted in), adjacent pages coalesce. */
        int k = 0;
        size_t bytes = 0, start = i;
        while (i < n && k < IOV) {
            size_t p = store_pages[i];
            if (p >= r->npages) {
                rc = lm_fail("checkpoint: store page outside the region", ERANGE);
                break;
            }
            struct lm_page_meta *m = &r->meta[p];
            const char *src;
            if (lm_state_load(m) == LM_PRESENT) {
                src = r->base + p * ps;
            } else {
                if ((rc = lm_page_read(r, p, bufs + (size_t)k * ps)) < 0)
                    break;
                src = bufs + (size_t)k * ps;
            }
            if (k > 0 && (const char *)iov[k - 1].iov_base + iov[k - 1].iov_len == src &&
                src != bufs + (size_t)k * ps) {
                iov[k - 1].iov_len += ps;
            } else {
                iov[k].iov_base = (void *)src;
                iov[k].iov_len = ps;
                k++;
            }
            bytes += ps;
            i++;
        }
        if (rc < 0)
            break;
        off_t off = (off_t)(offset + start * ps);
        size_t written = 0;
        int first = 0;
        while (written < bytes) {
            ssize_t w = pwritev(fd, iov + first, k - first, off + (off_t)written);
            if (w < 0) {
                if (errno == EINTR)
                    continue;
                rc = LM_FAIL("pwritev(snapshot)");
                break;
            }
            written += (size_t)w;
            /* Advance past what was written (short writes are rare but legal). */
            while (first < k && (size_t)w >= iov[first].iov_len) {
                w -= (ssize_t)iov[first].iov_len;
                first++;
            }
            if (first < k && w > 0) {
                iov[first].iov_base = (char *)iov[first].iov_base + w;
                iov[first].iov_len -= (size_t)w;
            }
        }
    }
    free(bufs);
    return rc;
}
