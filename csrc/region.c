/*
 * region.c: the top layer. A lazy region's creation and teardown (which call down into every
 * layer that owns a part of it), defer_fill (checked here and against the canonical store,
 * recorded by meta.c), statistics and the fault timeline.
 *
 * The page record, its state machine and the lazy records moved to meta.c; the canonical
 * store to store.c; lm_fill_run and lm_materialize to fill.c; lm_signatures to
 * checkpoint.c; lm_meta_sync to store.c; lm_page_size and lm_xxh3 to util.c.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include "lm_internal.h"

#define CANON_RESERVE_MIN 65536u  /* canonical pages reserved (address space only) */

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
    uint64_t supported = supported_features(r->cfg.acquire);
    uint64_t want = supported & UFFD_FEATURE_WP_ASYNC_BIT;
    /* Asked for whenever offered: they change nothing for anonymous memory, and a region may
       become shared (lm_region_share) only after its one UFFDIO_API handshake. */
    uint64_t shmem = supported & (UFFD_FEATURE_MINOR_SHMEM | UFFD_FEATURE_WP_HUGETLBFS_SHMEM);
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
        if ((rc = lm_uffd_api(r->uffd, want | shmem, &features, &ioctls)) < 0)
            return rc;
        r->api_features = features;
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
    /* How a page that cannot be served fails loudly (fill.c): poisoned where the kernel can
       (6.6+), else made inaccessible. */
    r->has_poison = (features & ((uint64_t)1 << 14)) && !r->cfg.test_no_poison;   /* POISON */
    return lm_ws_init(r, want);
}

void lm_region_test_fail_fills(struct lm_region *r, int n)
{
    atomic_store(&r->cfg_test_fail_fills, n);
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
    r->pool_fd = -1;
    r->pool_view = MAP_FAILED;
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
    atomic_store(&r->cfg_test_fail_fills, r->cfg.test_fail_fills);

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
    if (r->pool_view != MAP_FAILED)
        munmap(r->pool_view, r->nbytes);
    if (r->pool_fd >= 0)
        close(r->pool_fd);   /* the pool lives on while other processes map it */
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
    r->pool_view = MAP_FAILED;   /* not inherited either (MADV_DONTFORK) */
    r->zero_src = NULL;
    r->nthreads = 0;   /* scratch buffers are heap copies: leak them rather than guess */
    r->bg.scratch = NULL;
    r->helper.t.scratch = NULL;
    free_bookkeeping(r);
    free(r);
}

/* ---- sharing a pool (docs/shared-pages.md, section 1.2) ---------------------------- */

int lm_region_share(struct lm_region *r, int pool_fd)
{
    size_t len = r->nbytes;
    struct stat st;
    if (r->pool_fd >= 0)
        return lm_fail("region already shares a pool", EBUSY);
    if (atomic_load(&r->serving) || r->used || atomic_load(&r->st_faults) ||
        atomic_load(&r->st_present) || !lm_meta_pristine(r) || r->src_fd >= 0)
        return lm_fail("share: the region must be fresh (before serving, restore or deferral)",
                       EBUSY);
    if (!(r->api_features & UFFD_FEATURE_MINOR_SHMEM))
        return lm_fail("share: the kernel has no UFFD_FEATURE_MINOR_SHMEM (needs Linux 5.14)",
                       EOPNOTSUPP);
    if (fstat(pool_fd, &st) < 0)
        return LM_FAIL("fstat(pool)");
    if (!S_ISREG(st.st_mode) || (uint64_t)st.st_size < len)
        return lm_fail("share: the pool is not a memfd of at least the region's size", EINVAL);
    int fd = fcntl(pool_fd, F_DUPFD_CLOEXEC, 0);
    if (fd < 0)
        return LM_FAIL("fcntl(F_DUPFD_CLOEXEC)");
    r->pool_fd = fd;
    int rc, acc = fcntl(fd, F_GETFL);
    if (acc < 0)
        return LM_FAIL("fcntl(pool, F_GETFL)");
    /* A read-only pool (a page server's, docs/shared-pages.md 5.3) gets no view: a MAP_SHARED
       mapping of an O_RDONLY fd cannot be registered (no VM_MAYWRITE: EPERM), so this region
       can map the pool's pages but never publish; its holes are served by private copies
       (fill.c, prefetch.c: pool_view == MAP_FAILED). */
    if ((acc & O_ACCMODE) != O_RDONLY) {
        /* The view first: a failure below leaves the region's anonymous mapping untouched. */
        char *view = mmap(NULL, len, PROT_NONE, MAP_SHARED | MAP_NORESERVE, fd, 0);
        if (view == MAP_FAILED)
            return LM_FAIL("mmap(pool view)");
        r->pool_view = view;
        madvise(view, len, MADV_DONTFORK);
        if ((rc = lm_uffd_register(r->uffd, view, len, UFFDIO_REGISTER_MODE_MISSING)) < 0)
            return rc;
    }
    /* The region over the pool: PROT_NONE until registered, so that nothing (mlockall's
       population, another thread) can fault a hole of the pool in as a zero page that every
       other process would then map (the kernel allocates into shmem on a hole). MISSING as
       well as MINOR for the same reason. MAP_NORESERVE: a private writable mapping of this
       size would otherwise be refused under heuristic overcommit. */
    if (mmap(r->base, len, PROT_NONE, MAP_PRIVATE | MAP_FIXED | MAP_NORESERVE, fd, 0) ==
        MAP_FAILED)
        return LM_FAIL("mmap(region over the pool)");
    if (madvise(r->base, len, MADV_DONTFORK) < 0)   /* per VMA: the new one needs it again */
        return LM_FAIL("madvise(MADV_DONTFORK)");
    /* Not WP: on a file-backed range registered for write protection, dropping a page
       (defer_fill's MADV_DONTNEED) leaves a uffd-wp marker in its page-table entry, and
       UFFDIO_ZEROPAGE / UFFDIO_COPY then fail with EEXIST on it (measured): a deferral to
       zero over a shared page would read the pool's page again. The working-set window of a
       shared region therefore sees first touches (in order, every one: MINOR registration
       has no fault-around) but not writes to pages present at the mark; checkpoint finds
       written pages in the page tables (lm_meta_sync). */
    r->wp_async = false;
    uint64_t mode = UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR;
    if ((rc = lm_uffd_register(r->uffd, r->base, len, mode)) < 0)
        return rc;
    if (mprotect(r->base, len, PROT_READ | PROT_WRITE) < 0)
        return LM_FAIL("mprotect(shared region)");
    return 0;
}

/* ---- deferred updates ---------------------------------------------------------------- */

int lm_defer_fill(struct lm_region *r, size_t first, size_t n, int cls, uint32_t canon)
{
    int rc = lm_check_range(r, first, n);
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
        if ((rc = lm_canon_signature(r, canon, &sig)) < 0)
            return rc;
        flags = LM_F_NEEDS_UPDATE;
    } else {
        return lm_fail("defer_fill: class must be ZERO or CANONICAL", EINVAL);
    }
    return lm_meta_defer(r, first, n, cls, canon, sig, flags);
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
    o->service_ns_max = LD(lat.ns_max);
    o->service_ns_total = LD(lat.ns_total);
    for (int i = 0; i < LM_HIST_BUCKETS; i++)
        o->hist[i] = LD(lat.hist[i]);
    for (int i = 0; i < r->nthreads; i++)
        o->served_by_thread[i] = LD(threads[i].served);
    o->wakeups_empty = LD(st_empty_wakeups);
    o->prefetched_pages = LD(st_prefetched);
    o->background_pages = LD(st_background);
    o->source_bytes_read = LD(st_src_bytes);
    o->verify_failures = LD(st_verify_fail);
    o->background_running = LD(bg_running);
    o->remote = LD(remote);
    int64_t poisoned = LD(st_poisoned);
    o->pages_poisoned = poisoned > 0 ? (uint64_t)poisoned : 0;
    o->shared = r->pool_fd >= 0;
    o->pages_shared_mapped = LD(st_shared_mapped);
    o->pages_published = LD(st_published);
    o->pool_fallback_pages = LD(st_pool_fallback);
#undef LD
    return 0;
}
