/*
 * region.c: a lazy region, its page metadata and its deferred updates.
 *
 * The metadata array is the only record of a page's state. Every transition goes through
 * BUSY: the thread that moves a page EMPTY/DEFERRED -> BUSY owns its record until it stores
 * the next state with release semantics; everybody else waits (briefly) or skips it. That is
 * what lets the fault path, materialize() and defer_fill() run at once on the same pages.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>
#include <xxhash.h>

#include "lm_internal.h"

#define CANON_RESERVE_MIN 65536u  /* canonical pages reserved (address space only) */

long lm_page_size(void)
{
    static long ps;
    if (!ps)
        ps = sysconf(_SC_PAGESIZE);
    return ps;
}

uint64_t lm_xxh3(const void *data, size_t len)
{
    return XXH3_64bits(data, len);
}

/* ---- page state transitions ---------------------------------------------------------- */

/*
 * Wait for a page another thread holds BUSY. Yielding alone is not enough: the holder may be
 * the background fill, which runs at SCHED_IDLE and would never get the CPU from a thread
 * that only yields; after a few yields, sleep briefly so it can finish.
 */
void lm_wait_busy(unsigned *spins)
{
    if (++*spins < 64) {
        sched_yield();
    } else {
        struct timespec ts = {0, 20000};
        nanosleep(&ts, NULL);
    }
}

static uint8_t try_claim(struct lm_page_meta *m)
{
    uint8_t s = lm_state_load(m);
    while (s == LM_EMPTY || s == LM_DEFERRED) {
        if (__atomic_compare_exchange_n(&m->state, &s, LM_BUSY, false, __ATOMIC_ACQ_REL,
                                        __ATOMIC_ACQUIRE))
            return s;
    }
    return s;
}

static uint8_t claim_wait(struct lm_page_meta *m)
{
    unsigned spins = 0;
    for (;;) {
        uint8_t s = lm_state_load(m);
        if (s == LM_BUSY) {
            lm_wait_busy(&spins);   /* held for one copy or madvise at most */
            continue;
        }
        if (__atomic_compare_exchange_n(&m->state, &s, LM_BUSY, false, __ATOMIC_ACQ_REL,
                                        __ATOMIC_ACQUIRE))
            return s;
    }
}

/*
 * Deferred metadata. Writing one 32-byte record per page is most of the cost of deferring a
 * large range or restoring a large snapshot (for 1 GiB, 8 MiB of fresh shared memory), so
 * records themselves are filled lazily: a page whose bit in base_done is clear has no
 * authoritative record yet; its record comes from the newest range deferral covering it
 * (lm_defer_fill's fast path), else from a restore's page table, else it is a fresh page. The
 * first claim of the page fills it (and sets the bit); lm_meta_sync() fills them all.
 *
 * Ordering: the claimer sets the bit before it reads the range list, and defer_fill publishes
 * a range before it reads the bits (both sequentially consistent). So either the claimer sees
 * the new range, or defer_fill sees the bit and updates that page's record itself.
 *
 * Called with the page claimed (BUSY) from EMPTY; returns the state the page is really in.
 */
static uint8_t apply_lazy_record(struct lm_region *r, size_t p, uint8_t s, uint64_t bit);

static uint8_t apply_base(struct lm_region *r, size_t p, uint8_t s)
{
    if (s != LM_EMPTY)
        return s;
    /* Every first claim sets the bit, lazy records or not: a page that has left EMPTY always
       has an authoritative record, which a later range deferral must update itself. */
    uint64_t bit = (uint64_t)1 << (p & 63);
    /* Counted before the bit is taken: lm_meta_sync() must not drop the ranges while a claimer
       that took a bit it had skipped is still reading them. */
    atomic_fetch_add_explicit(&r->applying, 1, memory_order_seq_cst);
    s = apply_lazy_record(r, p, s, bit);
    atomic_fetch_sub_explicit(&r->applying, 1, memory_order_release);
    return s;
}

static uint8_t apply_lazy_record(struct lm_region *r, size_t p, uint8_t s, uint64_t bit)
{
    if (atomic_fetch_or_explicit(&r->base_done[p >> 6], bit, memory_order_seq_cst) & bit)
        return s;   /* the record is authoritative */
    if (!atomic_load_explicit(&r->lazy_records, memory_order_seq_cst))
        return s;
    struct lm_page_meta *m = &r->meta[p];
    unsigned n = atomic_load_explicit(&r->nranges, memory_order_seq_cst);
    for (unsigned i = n; i-- > 0;) {
        const struct lm_range *g = &r->ranges[i];
        if (p < g->first || p >= g->first + g->n)
            continue;
        m->cls = g->cls;
        m->canon = g->canon;
        m->signature = g->signature;
        m->flags = g->cls == LM_CLS_CANONICAL ? LM_F_NEEDS_UPDATE : 0;
        return LM_DEFERRED;
    }
    return lm_snap_apply_base(r, p, s);   /* a restore's page map, if any */
}

uint8_t lm_claim(struct lm_region *r, size_t p)
{
    uint8_t s = try_claim(&r->meta[p]);
    return s == LM_EMPTY ? apply_base(r, p, s) : s;
}

uint8_t lm_claim_wait(struct lm_region *r, size_t p)
{
    uint8_t s = claim_wait(&r->meta[p]);
    return s == LM_EMPTY ? apply_base(r, p, s) : s;
}

/* Fill every record still pending; afterwards no lazy record is read again. */
static void meta_sync_locked(struct lm_region *r)
{
    if (atomic_load(&r->lazy_records)) {
        for (size_t w = 0; w < (r->npages + 63) / 64; w++) {
            uint64_t done = atomic_load_explicit(&r->base_done[w], memory_order_relaxed);
            if (done == ~(uint64_t)0)
                continue;
            for (size_t p = w * 64; p < (w + 1) * 64 && p < r->npages; p++)
                if (!(done & ((uint64_t)1 << (p & 63))))
                    lm_release(&r->meta[p], lm_claim_wait(r, p));
        }
        /* Every bit is set: no new claim reads the ranges or the table; wait for claimers
           that took a bit before this pass saw it and may still be reading them. */
        for (unsigned spins = 0; atomic_load_explicit(&r->applying, memory_order_seq_cst);)
            lm_wait_busy(&spins);
        atomic_store(&r->nranges, 0);
        atomic_store(&r->lazy_records, 0);
    }
}

int lm_meta_sync(struct lm_region *r)
{
    /* Records of restored pages carry signatures only once the snapshot's signature section
       has been read: whoever reads every record needs them. A failure to read them (a corrupt
       section) leaves those signatures 0 (unknown) and is returned. Under the lock, so that a
       second caller waits until the first has given lazy records their signatures. */
    pthread_mutex_lock(&r->records_lock);
    int rc = lm_source_signatures(r);
    meta_sync_locked(r);
    pthread_mutex_unlock(&r->records_lock);
    return rc < 0 ? rc : 0;
}

int lm_meta_pending(struct lm_region *r)
{
    return atomic_load(&r->lazy_records);
}

bool lm_needs_copy(const struct lm_page_meta *m)
{
    return m->cls == LM_CLS_CANONICAL || m->cls == LM_CLS_SNAPSHOT;
}

/* Give claimed pages back in the states they were claimed from. */
void lm_unclaim(struct lm_region *r, size_t first, size_t n, const uint8_t *old)
{
    for (size_t i = 0; i < n; i++)
        lm_release(&r->meta[first + i], old[i]);
}

/*
 * Claim the lazy pages that follow `first` (already claimed, old state old[0]) and can be
 * filled together with it: same kind, still lazy, at most `max` in all. Returns the run length.
 */
size_t lm_claim_run(struct lm_region *r, size_t first, size_t max, uint8_t *old)
{
    size_t run = 1;
    while (run < max && first + run < r->npages) {
        struct lm_page_meta *m = &r->meta[first + run];
        uint8_t s = lm_claim(r, first + run);
        if (s != LM_EMPTY && s != LM_DEFERRED)
            break;
        if (lm_needs_copy(m) != lm_needs_copy(&r->meta[first])) {
            lm_release(m, s);
            break;
        }
        old[run++] = s;
    }
    return run;
}

/* Mark claimed pages present. The first `ordered` pages were touched (in that order). */
static uint8_t path_of(uint16_t flags)
{
    return flags & LM_F_READAHEAD      ? LM_PATH_READAHEAD
           : flags & LM_F_PREFETCHED   ? LM_PATH_PREFETCH
           : flags & LM_F_BACKGROUND   ? LM_PATH_BACKGROUND
           : flags & LM_F_MATERIALIZED ? LM_PATH_MATERIALIZE
                                       : LM_PATH_DEMAND;
}

void lm_mark_present(struct lm_region *r, size_t first, size_t n, uint16_t flags,
                     size_t ordered)
{
    if (r->tl_us) {   /* claimed pages: nobody else writes these entries now */
        uint64_t us = (lm_now_ns() - r->tl_t0) / 1000 + 1;
        for (size_t i = first; i < first + n; i++) {
            if (!r->tl_us[i]) {
                r->tl_us[i] = us > UINT32_MAX ? UINT32_MAX : (uint32_t)us;
                r->tl_path[i] = path_of(flags);
            }
        }
    }
    for (size_t i = 0; i < n; i++) {
        struct lm_page_meta *m = &r->meta[first + i];
        m->flags = (uint16_t)((m->flags & ~(LM_F_NEEDS_UPDATE)) | flags);
        if (m->cls == LM_CLS_NONE) {   /* a fresh page now maps the zero page */
            m->cls = LM_CLS_ZERO;
            m->signature = r->zero_sig;
        }
        if (i < ordered && !m->order)
            m->order = atomic_fetch_add_explicit(&r->touch_seq, 1, memory_order_relaxed);
        lm_release(m, LM_PRESENT);
    }
    atomic_fetch_add_explicit(&r->st_present, (int64_t)n, memory_order_relaxed);
}

const char *lm_canon_page(struct lm_region *r, uint32_t id)
{
    return r->canon_base + (size_t)(id - 1) * r->page_size;
}

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
        int rc = lm_src_read(r, m->aux, run, out);
        if (rc < 0)
            return rc;
        if (r->src_verify) {
            for (size_t k = 0; k < run; k++) {
                if (XXH3_64bits(out + k * ps, ps) != r->meta[first + i + k].signature) {
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

/*
 * Carry out the updates of claimed pages [first, first+n), which all need a copy or all map
 * the zero page. Copies are assembled in the thread's scratch buffer so that a cluster costs
 * one UFFDIO_COPY; scratch remembers which canonical page it holds, so a run of one template
 * (the common case) is assembled once and reused.
 */
int lm_fill_run(struct lm_region *r, struct lm_serve_thread *t, size_t first, size_t n,
                bool wake, bool write)
{
    char *dst = r->base + first * r->page_size;
    size_t len = n * r->page_size;
    struct lm_page_meta *m0 = &r->meta[first];
    int rc;

    if (r->cfg.test_fail_fills == 1 ||
        (r->cfg.test_fail_fills > 1 &&
         atomic_fetch_add_explicit(&r->fill_attempts, 1, memory_order_relaxed) %
                 (uint64_t)r->cfg.test_fail_fills == 0))
        return lm_fail("test hook: the page source is broken", EIO);

    if (lm_needs_copy(m0)) {
        uint32_t same = m0->cls == LM_CLS_CANONICAL ? m0->canon : 0;
        for (size_t i = 1; i < n && same; i++)
            if (r->meta[first + i].cls != LM_CLS_CANONICAL || r->meta[first + i].canon != same)
                same = 0;
        if (!(same && t->scratch_canon == same && t->scratch_pages >= n)) {
            if ((rc = assemble(r, t, first, n)) < 0)
                return rc;
            t->scratch_canon = same;
            t->scratch_pages = same ? (uint32_t)n : 0;
        }
        rc = lm_uffd_copy(r->uffd, dst, t->scratch, len, wake);
    } else if (write && r->cfg.zero_write == LM_ZW_COPY) {
        /* The page is about to be written: allocate it now rather than map the zero page
           and take a second (kernel) fault for the copy-on-write. */
        rc = lm_uffd_copy(r->uffd, dst, r->zero_src, len, wake);
    } else {
        rc = lm_uffd_zeropage(r->uffd, dst, len, wake);
    }
    if (rc == 0)
        atomic_fetch_add_explicit(&r->st_bytes, len, memory_order_relaxed);
    return rc;
}

/* ---- creation and teardown ----------------------------------------------------------- */

static int parse_config(struct lm_region *r, const struct lm_config *cfg)
{
    if (cfg)
        r->cfg = *cfg;
    r->cfg.cpus = NULL;
    if (r->cfg.zero_write == LM_ZW_DEFAULT)
        r->cfg.zero_write = LM_ZW_COPY;
    if (r->cfg.zero_write != LM_ZW_COPY && r->cfg.zero_write != LM_ZW_ZEROPAGE)
        return lm_fail("config: zero_write must be COPY or ZEROPAGE", EINVAL);
    if (!r->cfg.max_cluster_pages)
        r->cfg.max_cluster_pages = LM_DEFAULT_CLUSTER;
    if (r->cfg.max_cluster_pages > LM_MAX_CLUSTER)
        return lm_fail("config: max_cluster_pages above 4096", EINVAL);
    if (cfg && cfg->ncpus > 0) {
        if (cfg->ncpus > LM_MAX_THREADS)
            return lm_fail("config: more serving CPUs than supported (64)", EINVAL);
        for (int i = 0; i < cfg->ncpus; i++) {
            if (cfg->cpus[i] < 0 || cfg->cpus[i] >= CPU_SETSIZE)
                return lm_fail("config: CPU number out of range", EINVAL);
            r->cpus[i] = cfg->cpus[i];
        }
        r->nthreads = cfg->ncpus;
    } else {
        int n = r->cfg.nthreads > 0 ? r->cfg.nthreads : 1;
        if (n > LM_MAX_THREADS)
            return lm_fail("config: more serving threads than supported (64)", EINVAL);
        for (int i = 0; i < n; i++)
            r->cpus[i] = -1;
        r->nthreads = n;
    }
    return 0;
}

static int map_memfd(const char *name, size_t len, int *fd_out, void **addr_out)
{
    int fd = memfd_create(name, MFD_CLOEXEC);
    if (fd < 0)
        return LM_FAIL("memfd_create");
    if (ftruncate(fd, (off_t)len) < 0) {
        int rc = LM_FAIL("ftruncate(memfd)");
        close(fd);
        return rc;
    }
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0);
    if (p == MAP_FAILED) {
        int rc = LM_FAIL("mmap(memfd)");
        close(fd);
        return rc;
    }
    /* A forked child has no serving threads: it must not inherit what they maintain. */
    madvise(p, len, MADV_DONTFORK);
    *fd_out = fd;
    *addr_out = p;
    return 0;
}

/* What the kernel supports, asked once: UFFDIO_API can be called only once per uffd, so a
   region must know before its own handshake whether it may ask for WP_ASYNC. */
static uint64_t supported_features(int acquire)
{
    static _Atomic uint64_t cached[4];
    static _Atomic int known[4];
    if (acquire < 0 || acquire > 3)
        return 0;
    if (!atomic_load(&known[acquire])) {
        struct lm_features f;
        lm_probe(acquire, &f);
        atomic_store(&cached[acquire], f.mode == LM_MODE_UNAVAILABLE ? 0 : f.api_features);
        atomic_store(&known[acquire], 1);
    }
    return atomic_load(&cached[acquire]);
}

/*
 * Map the region and register it. Where the kernel has async write-protect, the range is
 * registered for WP too: the working-set window then sees writes to pages that were already
 * present (wstrack.c). Without it, MISSING alone.
 */
static int open_uffd(struct lm_region *r)
{
    struct lm_features why = {0};
    uint64_t features, ioctls;
    uint64_t want = supported_features(r->cfg.acquire) & UFFD_FEATURE_WP_ASYNC_BIT;
    int rc;

    r->base = mmap(NULL, r->nbytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (r->base == MAP_FAILED)
        return LM_FAIL("mmap(region)");
    /* Huge pages would make a 4 KiB fault move 2 MiB; the fault path chooses its own
       cluster size. A forked child gets no mapping at all rather than one nobody serves
       (which would read deferred pages as zeros): see docs/design.md, "fork". */
    madvise(r->base, r->nbytes, MADV_NOHUGEPAGE);
    if (madvise(r->base, r->nbytes, MADV_DONTFORK) < 0)
        return LM_FAIL("madvise(MADV_DONTFORK)");

    for (;;) {
        r->uffd = lm_uffd_open(r->cfg.acquire, &r->mode, &r->source, &why);
        if (r->uffd < 0)
            return r->uffd;
        if ((rc = lm_uffd_api(r->uffd, want, &features, &ioctls)) < 0)
            return rc;
        uint64_t mode = UFFDIO_REGISTER_MODE_MISSING | (want ? UFFDIO_REGISTER_MODE_WP : 0);
        rc = lm_uffd_register(r->uffd, r->base, r->nbytes, mode);
        if (rc == 0 || !want)
            break;
        close(r->uffd);   /* WP refused: a new uffd without it (API is once per uffd) */
        r->uffd = -1;
        want = 0;
    }
    if (rc < 0)
        return rc;
    return lm_ws_init(r, want);
}

int lm_region_create(size_t nbytes, const struct lm_config *cfg, struct lm_region **out)
{
    size_t ps = (size_t)lm_page_size();
    *out = NULL;
    if (nbytes == 0 || nbytes % ps)
        return lm_fail("region size must be a positive multiple of the page size", EINVAL);

    struct lm_region *r = calloc(1, sizeof(*r));
    if (!r)
        return lm_fail("calloc(region)", ENOMEM);
    r->uffd = r->meta_fd = r->canon_fd = r->stop_fd = r->src_fd = r->pagemap_fd = -1;
    r->watch_stop_fd = -1;
    r->base = MAP_FAILED;
    r->canon_base = MAP_FAILED;
    r->meta = MAP_FAILED;
    r->page_size = ps;
    r->page_shift = __builtin_ctzl(ps);
    r->nbytes = nbytes;
    r->npages = nbytes / ps;
    atomic_store(&r->touch_seq, 1);
    pthread_mutex_init(&r->canon_lock, NULL);
    pthread_mutex_init(&r->serve_lock, NULL);
    pthread_mutex_init(&r->records_lock, NULL);
    pthread_mutex_init(&r->bg_lock, NULL);

    int rc = parse_config(r, cfg);
    if (rc < 0)
        goto fail;

    if ((rc = open_uffd(r)) < 0)
        goto fail;

    void *meta;
    if ((rc = map_memfd("pylazymem-meta", r->npages * sizeof(struct lm_page_meta), &r->meta_fd,
                        &meta)) < 0)
        goto fail;
    r->meta = meta;
    /* Source for copies of zeros: anonymous memory never written reads as the zero page. */
    void *z = mmap(NULL, (size_t)r->cfg.max_cluster_pages * ps, PROT_READ,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (z == MAP_FAILED) {
        rc = LM_FAIL("mmap(zero source)");
        goto fail;
    }
    r->zero_src = z;
    r->zero_sig = XXH3_64bits(z, ps);
    /* An all-zero record is a fresh page (EMPTY, class NONE): the metadata memfd needs no
       initialisation pass and costs memory only where pages are used. */

    r->canon_cap = r->npages > CANON_RESERVE_MIN ? r->npages : CANON_RESERVE_MIN;
    void *canon;
    if ((rc = map_memfd("pylazymem-canonical", r->canon_cap * ps, &r->canon_fd, &canon)) < 0)
        goto fail;
    r->canon_base = canon;
    r->canon_sig = calloc(r->canon_cap, sizeof(uint64_t));
    r->canon_index_cap = 1024;
    r->canon_index = calloc(r->canon_index_cap, sizeof(uint32_t));
    if (!r->canon_sig || !r->canon_index) {
        rc = lm_fail("calloc(canonical index)", ENOMEM);
        goto fail;
    }

    if (r->cfg.timeline) {
        r->tl_us = calloc(r->npages, sizeof(uint32_t));
        r->tl_path = calloc(r->npages, 1);
        r->tl_t0 = lm_now_ns();
        if (!r->tl_us || !r->tl_path) {
            rc = lm_fail("calloc(timeline)", ENOMEM);
            goto fail;
        }
    }
    r->base_done = calloc((r->npages + 63) / 64, sizeof(uint64_t));
    if (!r->base_done) {
        rc = lm_fail("calloc(record bitmap)", ENOMEM);
        goto fail;
    }

    r->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (r->stop_fd < 0) {
        rc = LM_FAIL("eventfd");
        goto fail;
    }
    *out = r;
    return 0;

fail:
    lm_region_destroy(r, 1);
    return rc;
}

void *lm_region_addr(struct lm_region *r) { return r->base; }
size_t lm_region_npages(struct lm_region *r) { return r->npages; }
int lm_region_meta_fd(struct lm_region *r) { return r->meta_fd; }
int lm_region_mode(struct lm_region *r) { return r->mode; }

static void free_bookkeeping(struct lm_region *r)
{
    if (r->meta != MAP_FAILED)
        munmap(r->meta, r->npages * sizeof(struct lm_page_meta));
    if (r->canon_base != MAP_FAILED)
        munmap(r->canon_base, r->canon_cap * r->page_size);
    if (r->zero_src)
        munmap((void *)r->zero_src, (size_t)r->cfg.max_cluster_pages * r->page_size);
    for (int i = 0; i < r->nthreads; i++)
        free(r->threads[i].scratch);
    if (r->meta_fd >= 0)
        close(r->meta_fd);
    if (r->canon_fd >= 0)
        close(r->canon_fd);
    if (r->stop_fd >= 0)
        close(r->stop_fd);
    free(r->canon_sig);
    free(r->canon_index);
    free(r->bg.scratch);
    free(r->helper.t.scratch);
    free(r->base_done);
    free(r->tl_us);
    free(r->tl_path);
    lm_source_close(r);
    lm_ws_close(r);
    pthread_mutex_destroy(&r->canon_lock);
    pthread_mutex_destroy(&r->serve_lock);
    pthread_mutex_destroy(&r->records_lock);
    pthread_mutex_destroy(&r->bg_lock);
}

void lm_region_destroy(struct lm_region *r, int unmap_data)
{
    if (!r)
        return;
    lm_remote_close(r);   /* first: the watcher may be starting serving threads */
    lm_background_stop(r);
    lm_serve_stop(r);
    /* Unmap before closing the uffd: closing it first would let a straggling access fault
       in a zero page where deferred contents belong. */
    if (unmap_data && r->base != MAP_FAILED)
        munmap(r->base, r->nbytes);
    if (r->uffd >= 0)
        close(r->uffd);
    free_bookkeeping(r);
    free(r);
}

void lm_region_forget(struct lm_region *r)
{
    /* After fork() the child has none of the parent's threads; the mappings were not
       inherited (MADV_DONTFORK), only the descriptors and the heap copy. */
    if (!r)
        return;
    if (r->uffd >= 0)
        close(r->uffd);
    r->meta = MAP_FAILED;
    r->canon_base = MAP_FAILED;
    r->zero_src = NULL;
    r->nthreads = 0;   /* scratch buffers are heap copies: leak them rather than guess */
    r->bg.scratch = NULL;
    r->helper.t.scratch = NULL;
    free_bookkeeping(r);
    free(r);
}

/* ---- canonical pages ----------------------------------------------------------------- */

static int canon_index_insert(struct lm_region *r, uint64_t sig, uint32_t id)
{
    if ((size_t)(atomic_load(&r->canon_count) + 1) * 2 > r->canon_index_cap) {
        size_t cap = r->canon_index_cap * 2;
        uint32_t *idx = calloc(cap, sizeof(uint32_t));
        if (!idx)
            return lm_fail("calloc(canonical index)", ENOMEM);
        for (size_t i = 0; i < r->canon_index_cap; i++) {
            uint32_t old = r->canon_index[i];
            if (!old)
                continue;
            size_t h = r->canon_sig[old - 1] & (cap - 1);
            while (idx[h])
                h = (h + 1) & (cap - 1);
            idx[h] = old;
        }
        free(r->canon_index);
        r->canon_index = idx;
        r->canon_index_cap = cap;
    }
    size_t h = sig & (r->canon_index_cap - 1);
    while (r->canon_index[h])
        h = (h + 1) & (r->canon_index_cap - 1);
    r->canon_index[h] = id;
    return 0;
}

int lm_canonical(struct lm_region *r, const void *page, uint32_t *id_out, uint64_t *sig_out)
{
    uint64_t sig = XXH3_64bits(page, r->page_size);
    int rc = 0;
    pthread_mutex_lock(&r->canon_lock);
    size_t mask = r->canon_index_cap - 1;
    for (size_t h = sig & mask; r->canon_index[h]; h = (h + 1) & mask) {
        uint32_t id = r->canon_index[h];
        if (r->canon_sig[id - 1] == sig &&
            memcmp(lm_canon_page(r, id), page, r->page_size) == 0) {
            *id_out = id;
            goto out;
        }
    }
    uint32_t n = atomic_load(&r->canon_count);
    if (n >= r->canon_cap) {
        rc = lm_fail("canonical store full (one canonical page per region page)", ENOSPC);
        goto out;
    }
    uint32_t id = n + 1;
    memcpy((char *)lm_canon_page(r, id), page, r->page_size);
    r->canon_sig[id - 1] = sig;
    if ((rc = canon_index_insert(r, sig, id)) < 0)
        goto out;
    /* Publish: the fault path may read page `id` once a deferral names it. */
    atomic_store_explicit(&r->canon_count, id, memory_order_release);
    *id_out = id;
out:
    pthread_mutex_unlock(&r->canon_lock);
    if (rc == 0)
        *sig_out = sig;
    return rc;
}

int lm_canonical_read(struct lm_region *r, uint32_t id, void *out)
{
    if (id == 0 || id > atomic_load_explicit(&r->canon_count, memory_order_acquire))
        return lm_fail("canonical id out of range", EINVAL);
    memcpy(out, lm_canon_page(r, id), r->page_size);
    return 0;
}

uint32_t lm_canonical_count(struct lm_region *r)
{
    return atomic_load(&r->canon_count);
}

/* ---- deferred updates ---------------------------------------------------------------- */

static int check_range(struct lm_region *r, size_t first, size_t n)
{
    if (n == 0 || first >= r->npages || n > r->npages - first)
        return lm_fail("page range outside the region", ERANGE);
    return 0;
}

#define CHUNK 512   /* pages claimed at once: keeps the BUSY window short */

static int defer_pages(struct lm_region *r, size_t first, size_t n, int cls, uint32_t canon,
                       uint64_t sig, uint16_t flags, bool only_done);

int lm_defer_fill(struct lm_region *r, size_t first, size_t n, int cls, uint32_t canon)
{
    int rc = check_range(r, first, n);
    if (rc < 0)
        return rc;
    uint64_t sig;
    uint16_t flags;
    r->used = true;
    if (cls == LM_CLS_ZERO) {
        canon = 0;
        flags = 0;   /* the shared zero page needs no update: nothing to carry out */
        sig = r->zero_sig;
    } else if (cls == LM_CLS_CANONICAL) {
        if (canon == 0 || canon > atomic_load_explicit(&r->canon_count, memory_order_acquire))
            return lm_fail("canonical id does not belong to this region", EINVAL);
        flags = LM_F_NEEDS_UPDATE;
        sig = r->canon_sig[canon - 1];
    } else {
        return lm_fail("defer_fill: class must be ZERO or CANONICAL", EINVAL);
    }

    pthread_mutex_lock(&r->records_lock);
    if (n >= LM_RANGE_MIN_PAGES && atomic_load(&r->nranges) == LM_MAX_RANGES)
        meta_sync_locked(r);   /* the list is full: fill every record once, start a new list */
    if (n >= LM_RANGE_MIN_PAGES && atomic_load(&r->nranges) < LM_MAX_RANGES) {
        /* Fast path: record the deferral once for the whole range. Pages whose record is not
           authoritative yet take it when first claimed; the others are updated below. */
        struct lm_range *g = &r->ranges[atomic_load(&r->nranges)];
        *g = (struct lm_range){first, n, (uint8_t)cls, canon, sig};
        atomic_store_explicit(&r->lazy_records, 1, memory_order_seq_cst);
        atomic_fetch_add_explicit(&r->nranges, 1, memory_order_seq_cst);
        rc = defer_pages(r, first, n, cls, canon, sig, flags, true);
    } else {
        rc = defer_pages(r, first, n, cls, canon, sig, flags, false);
    }
    pthread_mutex_unlock(&r->records_lock);
    return rc;
}

/* The per-page part of lm_defer_fill: with only_done, pages whose record is not yet
   authoritative are left to the range just published. */
static int defer_pages(struct lm_region *r, size_t first, size_t n, int cls, uint32_t canon,
                       uint64_t sig, uint16_t flags, bool only_done)
{
    int rc = 0;
    for (size_t c = first; c < first + n; c += CHUNK) {
        size_t len = first + n - c < CHUNK ? first + n - c : CHUNK;
        size_t present = 0, claimed = 0;
        bool mine[CHUNK], was_present[CHUNK];
        for (size_t i = c; i < c + len; i++) {
            mine[i - c] = !only_done ||
                          (atomic_load_explicit(&r->base_done[i >> 6], memory_order_seq_cst) &
                           ((uint64_t)1 << (i & 63)));
            was_present[i - c] = false;
            if (!mine[i - c])
                continue;
            struct lm_page_meta *m = &r->meta[i];
            if (lm_claim_wait(r, i) == LM_PRESENT) {
                present++;
                was_present[i - c] = true;
            }
            m->cls = (uint8_t)cls;
            m->canon = canon;
            m->signature = sig;
            m->order = 0;
            m->flags = flags;
            claimed++;
        }
        if (!claimed)
            continue;
        /* Return the old contents' memory; the range is missing again, so the next access
           faults into the handler, which finds the update recorded above. Only pages this
           call holds: a page it left to the range record may be being filled right now. */
        for (size_t i = 0; present && i < len && rc == 0;) {
            if (!was_present[i]) {
                i++;
                continue;
            }
            size_t run = 1;
            while (i + run < len && was_present[i + run])
                run++;
            if (madvise(r->base + (c + i) * r->page_size, run * r->page_size,
                        MADV_DONTNEED) < 0)
                rc = LM_FAIL("madvise(MADV_DONTNEED)");
            i += run;
        }
        atomic_fetch_sub_explicit(&r->st_present, (int64_t)present, memory_order_relaxed);
        for (size_t i = c; i < c + len; i++)
            if (mine[i - c])
                lm_release(&r->meta[i], LM_DEFERRED);
        if (rc < 0)
            return rc;
    }
    return rc;
}
int lm_materialize(struct lm_region *r, size_t first, size_t n)
{
    int rc = check_range(r, first, n);
    if (rc < 0)
        return rc;
    struct lm_serve_thread t = {.r = r};
    uint8_t old[LM_MAX_CLUSTER];
    t.scratch = malloc((size_t)r->cfg.max_cluster_pages * r->page_size);
    if (!t.scratch)
        return lm_fail("malloc(scratch)", ENOMEM);
    r->used = true;

    size_t i = first, end = first + n;
    unsigned spins = 0;
    while (i < end && rc == 0) {
        /* Claim a run of lazy pages of one kind; present pages are passed over. */
        uint8_t s = lm_claim(r, i);
        if (s == LM_BUSY) {
            lm_wait_busy(&spins);
            continue;
        }
        if (s == LM_PRESENT) {
            i++;
            continue;
        }
        old[0] = s;
        size_t max = end - i < r->cfg.max_cluster_pages ? end - i : r->cfg.max_cluster_pages;
        size_t run = lm_claim_run(r, i, max, old);
        rc = lm_fill_run(r, &t, i, run, true, false);
        if (rc == 0) {
            lm_mark_present(r, i, run, LM_F_MATERIALIZED, 0);
            atomic_fetch_add_explicit(&r->st_materialized, run, memory_order_relaxed);
        } else {
            lm_unclaim(r, i, run, old);   /* leave them lazy: nothing was lost */
        }
        i += run;
    }
    free(t.scratch);
    return rc;
}

int lm_signatures(struct lm_region *r, size_t first, size_t n, uint64_t *out)
{
    int rc = check_range(r, first, n);
    if (rc < 0)
        return rc;
    if ((rc = lm_meta_sync(r)) < 0)
        return rc;
    for (size_t i = first; i < first + n; i++) {
        struct lm_page_meta *m = &r->meta[i];
        uint8_t s;
        for (unsigned spins = 0; (s = lm_state_load(m)) == LM_BUSY;)
            lm_wait_busy(&spins);
        uint64_t sig;
        if (s == LM_PRESENT) {
            /* Reading a present page never waits on the fault path (unless something outside
               pylazymem dropped it, and then the handler serves it). */
            sig = XXH3_64bits(r->base + i * r->page_size, r->page_size);
            m->signature = sig;
        } else if (s == LM_EMPTY) {
            sig = r->zero_sig;    /* fresh anonymous memory reads as zero */
        } else {
            sig = m->signature;   /* pending contents: known when the update was recorded */
        }
        if (out)
            out[i - first] = sig;
    }
    return 0;
}

/* ---- statistics ---------------------------------------------------------------------- */

int lm_timeline(struct lm_region *r, uint32_t *us, uint8_t *path)
{
    if (!r->tl_us)
        return lm_fail("the fault timeline is off (Region(timeline=True))", ENOENT);
    memcpy(us, r->tl_us, r->npages * sizeof(uint32_t));
    memcpy(path, r->tl_path, r->npages);
    return 0;
}

int lm_stats(struct lm_region *r, struct lm_stats *o)
{
    memset(o, 0, sizeof(*o));
#define LD(x) atomic_load_explicit(&r->x, memory_order_relaxed)
    o->faults = LD(st_faults);
    o->faults_zero = LD(st_faults_zero);
    o->faults_canonical = LD(st_faults_canonical);
    o->faults_empty = LD(st_faults_empty);
    o->faults_snapshot = LD(st_faults_snapshot);
    o->faults_spurious = LD(st_faults_spurious);
    o->faults_write = LD(st_faults_write);
    o->readahead_pages = LD(st_readahead);
    int64_t present = LD(st_present);
    o->pages_present = present > 0 ? (uint64_t)present : 0;
    o->bytes_materialized = LD(st_bytes);
    o->materialized_pages = LD(st_materialized);
    o->errors = LD(st_errors);
    o->last_error = LD(st_last_error);
    o->serving_threads = LD(serving);
    o->service_ns_max = LD(st_ns_max);
    o->service_ns_total = LD(st_ns_total);
    for (int i = 0; i < LM_HIST_BUCKETS; i++)
        o->hist[i] = LD(hist[i]);
    for (int i = 0; i < r->nthreads; i++)
        o->served_by_thread[i] = LD(threads[i].served);
    o->wakeups_empty = LD(st_empty_wakeups);
    o->prefetched_pages = LD(st_prefetched);
    o->background_pages = LD(st_background);
    o->source_bytes_read = LD(st_src_bytes);
    o->verify_failures = LD(st_verify_fail);
    o->background_running = LD(bg_running);
    o->remote = LD(remote);
#undef LD
    return 0;
}
