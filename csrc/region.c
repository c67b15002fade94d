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

#include "lm_internal.h"

#define CANON_RESERVE_MIN 65536u  /* canonical pages reserved (address space only) */
#define CHUNK_BYTES ((size_t)2 << 20)   /* a canonical chunk maps one 2 MiB block (design 3.6:
                                           a larger chunk saves VMAs but costs more to fill) */

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
    if (r->cfg.share_canonical < LM_SC_AUTO || r->cfg.share_canonical > LM_SC_ON)
        return lm_fail("config: share_canonical must be AUTO, OFF or ON", EINVAL);
    if (r->cfg.shared_first_touch < LM_FT_DEFAULT || r->cfg.shared_first_touch > LM_FT_KERNEL)
        return lm_fail("config: shared_first_touch must be DEFAULT, SEEN or KERNEL", EINVAL);
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
    /* A background checkpoint's pause moves the region's page tables whole only with it
       (freeze.c); the serving threads read and pass over the REMAP events it brings. */
    uint64_t remap = supported & UFFD_FEATURE_EVENT_REMAP;
    int rc;

    /* 2 MiB-aligned: a block mapped from a shared huge folio (a canonical chunk, a complete
       pool) is read through one PMD only if its address is aligned as its file offset is. */
    r->base = lm_map_aligned(r->nbytes, PROT_READ | PROT_WRITE,
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
        if ((rc = lm_uffd_api(r->uffd, want | shmem | remap, &features, &ioctls)) < 0)
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
    /* Canonical chunks need MINOR faults on a private shmem mapping. */
    bool minor = (features & UFFD_FEATURE_MINOR_SHMEM) != 0;
    if (r->cfg.share_canonical == LM_SC_ON && !minor)
        return lm_fail("Region(share_canonical=True): the kernel has no "
                       "UFFD_FEATURE_MINOR_SHMEM (needs Linux 5.14)", EOPNOTSUPP);
    r->share_canonical = minor && r->cfg.share_canonical != LM_SC_OFF &&
                         r->page_size <= CHUNK_BYTES;
    /* Benchmark 3 decided the default (docs/shared-pages.md 3): the kernel serves first
       touches of chunk blocks unless the program asks to see them. */
    r->kernel_first_touch = r->cfg.shared_first_touch != LM_FT_SEEN;
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
    r->uffd = r->meta_fd = r->canon_fd = r->stop_fd = r->pagemap_fd = -1;
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
    r->blk_pages = ps <= CHUNK_BYTES ? CHUNK_BYTES / ps : 1;
    r->nblocks = r->npages / r->blk_pages;   /* whole blocks only: a tail never maps a chunk */
    atomic_store(&r->touch_seq, 1);
    pthread_mutex_init(&r->chunk_lock, NULL);
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
    r->zero_sig = lm_xxh3(z, ps);
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
    lm_canon_chunks_close(r);   /* the mappings keep the chunks' memory while they exist */
    free(atomic_load(&r->chunk_of));
    free(r->pool_want);
    free(r->pool_kernel_map);
    pthread_mutex_destroy(&r->chunk_lock);
    free(r->canon_sig);
    free(r->canon_index);
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

static void budget_give(size_t n);

void lm_region_destroy(struct lm_region *r, int unmap_data)
{
    if (!r)
        return;
    /* The chunk VMAs go back to the budget now; with unmap_data 0 they live on until the
       buffer object unmaps the range (close() with views left): the budget's half of
       vm.max_map_count in reserve absorbs that. */
    budget_give(atomic_exchange(&r->chunk_vmas, 0));
    lm_remote_close(r);   /* first: the watcher may be starting serving threads */
    lm_background_stop(r);
    lm_serve_stop(r);
    lm_freeze_abandon(r);   /* nobody serves staged pages now: staging goes */
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
    budget_give(atomic_exchange(&r->chunk_vmas, 0));   /* the child has none of them */
    if (r->uffd >= 0)
        close(r->uffd);
    r->meta = MAP_FAILED;
    r->canon_base = MAP_FAILED;
    r->pool_view = MAP_FAILED;   /* not inherited either (MADV_DONTFORK) */
    r->zero_src = NULL;
    r->nthreads = 0;   /* scratch buffers are heap copies: leak them rather than guess */
    r->bgf = NULL;   /* the parent's threads are not here: leaked, like the scratch buffers */
    r->helper.t.scratch = NULL;
    lm_source_forget_remote(r);   /* an object store's fetchers are the parent's threads */
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
        atomic_load(&r->st_present) || !lm_meta_pristine(r) || r->src_nlayers)
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
       (fill.c, prefetch.c: pool_view == MAP_FAILED). So does a pool sealed against writes
       (F_SEAL_FUTURE_WRITE: a complete pool, section 2.5; a shared writable mapping of it
       cannot be made, and a holder that sealed an incomplete one costs only sharing). */
    int seals = fcntl(fd, F_GET_SEALS);
    bool sealed = seals >= 0 && (seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE));
    if ((acc & O_ACCMODE) != O_RDONLY && !sealed) {
        /* The view first: a failure below leaves the region's anonymous mapping untouched. */
        char *view = mmap(NULL, len, PROT_NONE, MAP_SHARED | MAP_NORESERVE, fd, 0);
        if (view == MAP_FAILED)
            return LM_FAIL("mmap(pool view)");
        r->pool_view = view;
        madvise(view, len, MADV_DONTFORK);
        if ((rc = lm_uffd_register(r->uffd, view, len, UFFDIO_REGISTER_MODE_MISSING)) < 0) {
            /* Sealed between the look and the registration (another process completed the
               pool: lm_pool_finish; the seal takes VM_MAYWRITE from new shared mappings, so
               registering one fails with EPERM): no view needed, nothing left to publish. */
            seals = fcntl(fd, F_GET_SEALS);
            if (rc != -EPERM || seals < 0 || !(seals & F_SEAL_FUTURE_WRITE))
                return rc;
            munmap(view, len);
            r->pool_view = MAP_FAILED;
        }
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

/* ---- canonical chunks (docs/shared-pages.md, section 3) ------------------------------ */

/*
 * The VMA budget. Every 2 MiB block mapped from a chunk is a VMA of its own (adjacent blocks map
 * the same file offset, which the kernel cannot merge), and vm.max_map_count bounds them for the
 * whole process: Python, its libraries, thread stacks, other regions. pylazymem's chunks may use
 * at most half of it, less the mappings the process had when chunks were first wanted; blocks
 * past that are copied as before. Process-wide: every region's chunks count.
 */
static _Atomic long vma_used;
static _Atomic long vma_test = -1;   /* lm_test_map_budget: a budget set by a test */
static long vma_default;
static pthread_once_t vma_once = PTHREAD_ONCE_INIT;

static long count_lines(const char *path, long fallback)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return fallback;
    char buf[16384];
    long lines = 0;
    for (;;) {
        ssize_t k = read(fd, buf, sizeof(buf));
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            break;
        for (ssize_t i = 0; i < k; i++)
            lines += buf[i] == '\n';
    }
    close(fd);
    return lines;
}

static void budget_init(void)
{
    long max = 65530;   /* the kernel's default, if the sysctl cannot be read */
    char buf[32] = {0};
    int fd = open("/proc/sys/vm/max_map_count", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        if (read(fd, buf, sizeof(buf) - 1) > 0 && atol(buf) > 0)
            max = atol(buf);
        close(fd);
    }
    /* Unknown maps count: assume the worst plausible, so that chunks stay modest. */
    long now = count_lines("/proc/self/maps", max / 4);
    vma_default = max / 2 - now > 0 ? max / 2 - now : 0;
}

static long budget_limit(void)
{
    pthread_once(&vma_once, budget_init);
    long t = atomic_load(&vma_test);
    return t >= 0 ? t : vma_default;
}

long lm_test_map_budget(long n)
{
    atomic_store(&vma_test, n < 0 ? -1 : n);
    return budget_limit();
}

/* Take up to `want` VMAs from the budget; returns how many were granted. */
static size_t budget_take(size_t want)
{
    long limit = budget_limit(), used = atomic_load(&vma_used);
    for (;;) {
        long room = limit - used;
        if (room <= 0 || want == 0)
            return 0;
        long take = (long)want < room ? (long)want : room;
        if (atomic_compare_exchange_weak(&vma_used, &used, used + take))
            return (size_t)take;
    }
}

static void budget_give(size_t n)
{
    if (n)
        atomic_fetch_sub(&vma_used, (long)n);
}

/* What lm_defer_fill's remap puts behind blocks: chunk `target` (its fd), or with target 0
   the region's normal backing. */
struct remap_job {
    uint32_t target;
    int fd;
    size_t *added;   /* blocks that became chunk blocks (their VMAs were reserved before) */
};

/*
 * Map blocks [b0, b1) (each replaced with MAP_FIXED, which discards what was there) and register
 * them on the region's uffd: a new VMA is unregistered and inherits nothing (no MADV_DONTFORK
 * either) until told again. The pages are held by the caller (lm_meta_defer_remap), so no fill
 * can run against them meanwhile.
 *
 * Chunk blocks are registered MISSING | MINOR (MINOR: every first touch still reaches us, so the
 * working set keeps first touches; MISSING: required with MINOR on shmem) and not WP: on a
 * file-backed range registered for write protection, dropping a page leaves a uffd-wp marker
 * and UFFDIO_ZEROPAGE / UFFDIO_COPY then fail with EEXIST (lm_region_share says more), which a
 * later partial deferral inside the block would meet. Anonymous blocks get the region's own
 * registration back (MISSING, plus WP where the working set tracks writes).
 *
 * The window between mmap and register: a chunk or anonymous block is mapped readable at once
 * and dropped again (MADV_DONTNEED) once registered, so anything the kernel populated meanwhile
 * without us (a racing access sees the chunk's template or zeros: the deferral's new contents)
 * is gone before the records are written. A pool block is mapped PROT_NONE until registered
 * instead (as lm_region_share does): an unregistered access to a pool hole would allocate a
 * zero page in the pool itself, which other processes would map.
 */
static int remap_blocks(struct lm_region *r, size_t b0, size_t b1, const struct remap_job *j)
{
    char *addr = r->base + b0 * CHUNK_BYTES;
    size_t len = (b1 - b0) * CHUNK_BYTES;
    bool pool = !j->target && r->pool_fd >= 0;
    bool kernel = (j->target & LM_CHUNK_KERNEL) != 0;
    uint64_t mode = UFFDIO_REGISTER_MODE_MISSING;
    for (size_t b = b0; b < b1; b++) {
        char *blk = r->base + b * CHUNK_BYTES;
        void *p;
        if (j->target)
            p = mmap(blk, CHUNK_BYTES, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_FIXED | MAP_NORESERVE, j->fd, 0);
        else if (pool)
            p = mmap(blk, CHUNK_BYTES, PROT_NONE, MAP_PRIVATE | MAP_FIXED | MAP_NORESERVE,
                     r->pool_fd, (off_t)(b * CHUNK_BYTES));
        else
            p = mmap(blk, CHUNK_BYTES, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED)
            return LM_FAIL(j->target ? "mmap(canonical chunk over the region)"
                                     : "mmap(region memory back over a chunk)");
    }
    /* Kernel-served: left unregistered, so nothing we do races with the kernel's own
       serving; whatever it maps from now on is the chunk's template, the new contents.
       MADV_DONTFORK: once for the whole piece, by defer_piece (one call for 512 VMAs). */
    if (kernel)
        return 0;
    if (j->target || pool)
        mode |= UFFDIO_REGISTER_MODE_MINOR;
    else if (r->wp_async)
        mode |= UFFDIO_REGISTER_MODE_WP;
    if (!j->target && !pool)
        madvise(addr, len, MADV_NOHUGEPAGE);   /* as open_uffd: a fault moves one cluster */
    int rc = lm_uffd_register(r->uffd, addr, len, mode);
    if (rc < 0)
        return rc;
    if (madvise(addr, len, MADV_DONTFORK) < 0)   /* per VMA: the new ones need it again */
        return LM_FAIL("madvise(MADV_DONTFORK)");
    if (pool && mprotect(addr, len, PROT_READ | PROT_WRITE) < 0)
        return LM_FAIL("mprotect(region over the pool)");
    if (!pool && madvise(addr, len, MADV_DONTNEED) < 0)
        return LM_FAIL("madvise(MADV_DONTNEED)");
    return 0;
}

/* lm_meta_defer_remap's callback: pages [first, first+n) are whole blocks, all held. */
static int remap_held(struct lm_region *r, size_t first, size_t n, void *arg)
{
    const struct remap_job *j = arg;
    uint32_t *chunk_of = atomic_load(&r->chunk_of);
    size_t b0 = first / r->blk_pages, b1 = (first + n) / r->blk_pages;
    int rc = remap_blocks(r, b0, b1, j);
    if (rc < 0 && j->target) {
        /* Whatever was mapped is not fit to serve (unregistered, or a hole): the region's
           normal backing again, and its budget back. The records then say copy: the caller
           writes them without SHARED when this fails (lm_defer_fill). */
        struct remap_job normal = {0, -1, NULL};
        int brc = remap_blocks(r, b0, b1, &normal);
        if (brc < 0)
            lm_record_error(r, brc);   /* the range cannot be served: stats say why */
    }
    for (size_t b = b0; b < b1; b++) {
        uint32_t now = rc < 0 ? 0 : j->target;
        if (chunk_of[b] && !now) {
            atomic_fetch_sub(&r->chunk_vmas, 1);
            budget_give(1);
        } else if (!chunk_of[b] && now) {
            atomic_fetch_add(&r->chunk_vmas, 1);   /* reserved by defer_blocks */
            (*j->added)++;
        }
        if (chunk_of[b] & LM_CHUNK_KERNEL)
            atomic_fetch_sub(&r->kernel_blocks, 1);
        if (now & LM_CHUNK_KERNEL)
            atomic_fetch_add(&r->kernel_blocks, 1);
        __atomic_store_n(&chunk_of[b], now, __ATOMIC_RELEASE);
    }
    return rc;
}

/* How one piece of a deferral is recorded (defer_blocks). */
struct piece {
    bool remap;        /* its blocks' mapping changes */
    uint32_t target;   /* chunk mapped there afterwards, 0 = normal backing */
    uint16_t flags;    /* the records' flags */
};

static int defer_piece(struct lm_region *r, size_t first, size_t n, int cls, uint32_t canon,
                       uint64_t sig, uint16_t flags, const struct piece *k, int fd,
                       size_t *added)
{
    if (!k->remap && (k->target & LM_CHUNK_KERNEL)) {
        if (!(k->flags & LM_F_SHARED)) {
            /* Other contents inside a kernel-served block: pages we are to fill. The block
               becomes registered first (its records made true), then records as anywhere. */
            int rc = lm_chunk_take_over(r, first, n, true);
            if (rc < 0)
                return rc;
        } else if (madvise(r->base + first * r->page_size, n * r->page_size,
                           MADV_DONTNEED) < 0) {
            /* The same template again: pages the program wrote go back to the chunk's. The
               records below say DEFERRED SHARED for all of them (a PRESENT DATA page that a
               sync found written is held and dropped again by lm_meta_defer). */
            return LM_FAIL("madvise(MADV_DONTNEED)");
        }
    }
    if (!k->remap)
        return lm_meta_defer(r, first, n, cls, canon, sig, k->flags);
    struct remap_job j = {k->target, fd, added};
    size_t failed_at;
    int rc = lm_meta_defer_remap(r, first, n, cls, canon, sig, k->flags, remap_held, &j,
                                 &failed_at);
    /* The new VMAs of kernel-served blocks (remap_blocks): a forked child must not inherit
       them. One call over the blocks mapped (a block that failed has the normal backing back,
       which needs it too: it is included). */
    size_t mapped_end = failed_at < first + n ? failed_at + r->blk_pages : first + n;
    if ((k->target & LM_CHUNK_KERNEL) &&
        madvise(r->base + first * r->page_size, (mapped_end - first) * r->page_size,
                MADV_DONTFORK) < 0 && rc == 0)
        rc = LM_FAIL("madvise(MADV_DONTFORK)");
    if (rc < 0 && k->target && failed_at < first + n) {
        /* The failed block is back on the normal backing (remap_held); the blocks after it
           were never remapped and may still be kernel-served chunks of other contents, which
           no fault would ever correct: registered first, so that records that copy are
           carried out by the fault path everywhere. */
        int trc = lm_chunk_take_over(r, failed_at, first + n - failed_at, true);
        if (trc < 0)
            lm_record_error(r, trc);
        lm_meta_defer(r, failed_at, first + n - failed_at, cls, canon, sig, flags);
    }
    return rc;
}

/*
 * A deferral over a region that has (or is to have) chunk blocks, under chunk_lock. The range
 * [first, first+n) is cut into pieces, each recorded by meta.c in one call, in address order:
 *  - whole blocks whose mapping changes (to chunk `canon`, from a chunk to another chunk or to
 *    the normal backing) go through lm_meta_defer_remap (pages held across the remap);
 *  - the other pages get records only: SHARED where their block maps this very chunk (a
 *    deferral of the same template over a chunk span: MADV_DONTNEED of the present pages, which
 *    brings COWed pages back to the chunk, is all it takes), COPY_FALLBACK for whole blocks the
 *    budget refused, the plain flags elsewhere (the partial blocks at the ends, and pages in
 *    blocks of another chunk, are served by copies or zero pages into whatever maps them).
 */
static int defer_blocks(struct lm_region *r, size_t first, size_t n, int cls, uint32_t canon,
                        uint64_t sig, uint16_t flags)
{
    size_t bp = r->blk_pages, end = first + n;
    size_t b0 = (first + bp - 1) / bp, b1 = end / bp;   /* the whole blocks of the range */
    bool chunks = cls == LM_CLS_CANONICAL && r->share_canonical && b0 < b1;
    uint32_t *chunk_of = atomic_load(&r->chunk_of);
    uint32_t kbit = r->kernel_first_touch ? LM_CHUNK_KERNEL : 0;
    struct remap_job job = {chunks ? canon | kbit : 0, -1, NULL};
    int rc = 0;
    if (!chunks && !chunk_of)
        return lm_meta_defer(r, first, n, cls, canon, sig, flags);
    if (chunks) {
        if ((job.fd = lm_canon_chunk_fd(r, canon, CHUNK_BYTES)) < 0)
            return job.fd;   /* nothing changed yet */
        if (!chunk_of) {
            if (!(chunk_of = calloc(r->nblocks, sizeof(uint32_t))))
                return lm_fail("calloc(chunk table)", ENOMEM);
            atomic_store(&r->chunk_of, chunk_of);
        }
    }
    if (b0 > b1)
        b0 = b1 = 0;   /* inside one block: no whole block */
    /* Blocks that need a new chunk VMA, granted in address order as far as the budget goes. */
    size_t need = 0;
    for (size_t b = b0; chunks && b < b1; b++)
        need += !chunk_of[b];
    size_t granted = budget_take(need), reserved = granted, added = 0;
    if (granted < need)
        atomic_fetch_add_explicit(&r->st_budget_fallbacks, 1, memory_order_relaxed);

    /* One block at a time, in address order (the budget is granted in that order); blocks
       that take the same path are recorded together. */
    struct piece cur = {0};
    size_t start = first, stop = first;
    bool open = false;
    for (size_t b = first / bp; b <= (end - 1) / bp && rc == 0; b++) {
        size_t lo = b * bp > first ? b * bp : first;
        size_t hi = (b + 1) * bp < end ? (b + 1) * bp : end;
        uint32_t have = chunk_of && b < r->nblocks ? chunk_of[b] : 0;
        struct piece k = {false, have, 0};   /* a partial block keeps its mapping */
        bool fallback = false;
        if (b >= b0 && b < b1) {
            k.target = job.target;
            if (k.target && !have) {
                if (granted) {
                    granted--;
                } else {
                    k.target = 0;
                    fallback = true;
                }
            }
            k.remap = k.target != have;
        }
        k.flags = k.target && (k.target & ~LM_CHUNK_KERNEL) == canon && cls == LM_CLS_CANONICAL
                      ? LM_F_SHARED
                      : (uint16_t)(flags | (fallback ? LM_F_COPY_FALLBACK : 0));
        if (open && k.remap == cur.remap && k.target == cur.target && k.flags == cur.flags) {
            stop = hi;
            continue;
        }
        if (open)
            rc = defer_piece(r, start, stop - start, cls, canon, sig, flags, &cur, job.fd, &added);
        cur = k;
        start = lo;
        stop = hi;
        open = true;
    }
    if (open && rc == 0)
        rc = defer_piece(r, start, stop - start, cls, canon, sig, flags, &cur, job.fd, &added);
    budget_give(reserved - added);   /* reserved for blocks a failure left unmapped */
    return rc;
}

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
    /* Serialises the mapping decisions (chunk table, budget) of concurrent deferrals. */
    pthread_mutex_lock(&r->chunk_lock);
    /* Under chunk_lock: lm_freeze_begin checks for chunk blocks and arms under it too. */
    if (atomic_load(&r->freeze_armed))
        rc = lm_fail("defer_fill: a background checkpoint is in progress (wait for it)", EBUSY);
    /* A kernel-served pool span is registered first: the kernel would otherwise go on
       mapping the pool's pages where the records now say other contents. */
    else if ((rc = lm_pool_take_over(r)) == 0)
        rc = defer_blocks(r, first, n, cls, canon, sig, flags);
    pthread_mutex_unlock(&r->chunk_lock);
    if (rc == -EBUSY && atomic_load(&r->freeze_armed))
        return rc;   /* nothing was recorded */
    /* New contents relative to the epoch's, once recorded (a reset meanwhile keeps them
       dirty); on failure too: part of the range may be recorded. */
    lm_dirty_mark(r, first, n);
    return rc;
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
    o->background_running = LD(bg_running) > 0;
    o->remote = LD(remote);
    int64_t poisoned = LD(st_poisoned);
    o->pages_poisoned = poisoned > 0 ? (uint64_t)poisoned : 0;
    o->shared = r->pool_fd >= 0;
    o->pages_shared_mapped = LD(st_shared_mapped);
    o->pages_published = LD(st_published);
    o->pool_fallback_pages = LD(st_pool_fallback);
    o->canonical_shared_pages = LD(st_canon_shared);
    o->canonical_copied_pages = LD(st_canon_copied);
    o->map_budget_fallbacks = LD(st_budget_fallbacks);
    o->share_canonical = r->share_canonical;
    o->shared_first_touch = !r->kernel_first_touch;
    o->canonical_kernel_pages = LD(kernel_blocks) * r->blk_pages;
    o->pool_kernel_pages = LD(pool_kernel_blocks) * r->blk_pages;
#undef LD
    return 0;
}
