/*
 * freeze.c: the pause of a background checkpoint, and the region as it was at that pause.
 * docs/design.md, "Background checkpoints".
 *
 * The pause is one mremap(MREMAP_DONTUNMAP) of the whole region onto a staging range: the
 * present pages (and their write-protect bits) move there, the region keeps its mapping and
 * its userfaultfd registration, now empty. With UFFD_FEATURE_EVENT_REMAP the kernel moves page
 * tables whole (measured here for 1 GiB of 4 KiB pages: 0.19 ms; without the feature it must
 * walk every entry to clear its uffd-wp bit: 2.3 ms, 13 ms for 4 GiB), and the mremap returns
 * once the REMAP event has been read: a pump thread reads it, because the serving threads may
 * all be retrying a UFFDIO_COPY that fails with EAGAIN until somebody does.
 *
 * After the pause the program runs on. Its first touch of a staged page faults, and the fault
 * path serves it from staging (lm_freeze_fault: UFFDIO_COPY_MODE_WP, so dirty tracking sees
 * only stores made after the pause); lm_freeze_copy_back brings back the rest the same way.
 * A byte per page (`back`) decides who copies a page: whoever moves it from UNKNOWN to MOVING.
 * Staging itself is never written and keeps the pause's contents until lm_freeze_end, so the
 * checkpoint reads staged pages there (lm_view_hold), whenever it gets to them.
 *
 * Lazy pages (EMPTY, DEFERRED) are not moved: their records say what they hold, and meta.c
 * keeps the record of each one claimed while the freeze is armed (the stash) before anything
 * can fill it. The checkpoint's view of a page is therefore: staged -> its staging bytes;
 * else stashed -> the stashed record; else the page's record now (still lazy; a PRESENT page
 * with neither was dropped by the program before the pause and reads as zero).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "lm_internal.h"

#ifndef MREMAP_DONTUNMAP
#define MREMAP_DONTUNMAP 4
#endif
#ifndef UFFD_FEATURE_EVENT_REMAP
#define UFFD_FEATURE_EVENT_REMAP (1 << 1)
#endif

/* Staging has the region's offset within a 2 MiB block, so that the kernel can move whole
   page tables (a PMD's worth at a time) instead of their entries one by one. */
#define STAGE_ALIGN ((size_t)2 << 20)
#define RUN_MAX 512   /* pages brought back by one ioctl: keeps a MOVING window short */
#define SCAN_VEC 512

enum { B_UNKNOWN = 0, B_MOVING = 1, B_BACK = 2, B_NOT_STAGED = 3 };

struct lm_freeze {
    struct lm_region *r;
    char *resv;                   /* the staging reservation, resv_len bytes */
    size_t resv_len;
    char *stage;                  /* page p as it was at the pause: stage + p * page_size */
    _Atomic uint8_t *back;        /* per page, B_*: who brings a staged page back */
    uint64_t *staged;             /* present (or swapped) at the pause; valid once scanned */
    uint64_t *zero;               /* of those, mapping the zero page */
    uint64_t *old_dirty;          /* the dirty-tracking epoch that ended at the pause */
    _Atomic int scanned;
    _Atomic int moved;            /* the pause is over: staging is complete */
    char *test_copy;              /* lm_freeze_begin's test_copy */
    int stop_fd;                  /* eventfd: stops the pump */
    pthread_t pump;
    /* The copier: scan and copy-back, started right after the pause so that pages come back
       at once, without waiting for the caller (a Python thread may wait long for the GIL
       while the program's threads fault on staged pages). */
    pthread_t copier;
    bool copier_started, copier_joined;
    int copier_rc;
    const char *copier_op;        /* the copier thread's lm_last_op() when it failed */
    /* The copier's scan is settled (done or failed): lm_freeze_scan returns then, while the
       copier goes on bringing pages back beside the checkpoint's reads of staging. */
    pthread_mutex_t scan_mu;
    pthread_cond_t scan_cv;
    bool scan_settled;
    int scan_rc;
    const char *scan_op;
    pthread_mutex_t copier_lock;
    uint64_t arm_ns, pause_ns, begin_ns, nstaged;
    _Atomic uint64_t copied_back, fault_served, written, stray;
    _Atomic int test_fail_copies;  /* config.test_fail_copyback: copies left to fail */
};

static void *copier_main(void *arg);


static inline void set_bit(uint64_t *bits, size_t p)
{
    bits[p >> 6] |= (uint64_t)1 << (p & 63);
}

static void freeze_free(struct lm_freeze *fz)
{
    if (!fz)
        return;
    if (fz->copier_started && !fz->copier_joined)
        pthread_join(fz->copier, NULL);
    pthread_mutex_destroy(&fz->copier_lock);
    pthread_mutex_destroy(&fz->scan_mu);
    pthread_cond_destroy(&fz->scan_cv);
    if (fz->resv && fz->resv != MAP_FAILED)
        munmap(fz->resv, fz->resv_len);
    if (fz->stop_fd >= 0)
        close(fz->stop_fd);
    free((void *)fz->back);
    free(fz->staged);
    free(fz->zero);
    free(fz->old_dirty);
    free(fz);
}

/* ---- the pause ----------------------------------------------------------------------- */

/* Reads the uffd while the mremap waits for its REMAP event to be read. A page fault it reads
   instead is woken, not served: the faulter retries and its new fault goes to a serving
   thread (the copy would fail with EAGAIN now anyway). */
static void *pump_main(void *arg)
{
    struct lm_freeze *fz = arg;
    struct lm_region *r = fz->r;
    struct pollfd pfd[2] = {{.fd = r->uffd, .events = POLLIN}, {.fd = fz->stop_fd, .events = POLLIN}};
    for (;;) {
        if (poll(pfd, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (pfd[1].revents)
            break;
        if (!(pfd[0].revents & POLLIN))
            continue;
        struct uffd_msg msgs[16];
        ssize_t n = read(r->uffd, msgs, sizeof(msgs));
        if (n <= 0)
            continue;   /* EAGAIN: a serving thread took it */
        for (size_t i = 0; i < (size_t)n / sizeof(msgs[0]); i++) {
            if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
                continue;
            uint64_t a = msgs[i].arg.pagefault.address & ~((uint64_t)r->page_size - 1);
            lm_uffd_wake(r->uffd, (void *)(uintptr_t)a, r->page_size);
        }
    }
    return NULL;
}

static int do_pause(void *arg)
{
    struct lm_freeze *fz = arg;
    struct lm_region *r = fz->r;
    uint64_t t0 = lm_now_ns();
    void *p = mremap(r->base, r->nbytes, r->nbytes,
                     MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP, fz->stage);
    fz->pause_ns = lm_now_ns() - t0;
    if (p == MAP_FAILED)
        return LM_FAIL("mremap(MREMAP_DONTUNMAP) of the region to staging");
    if (fz->test_copy) {
        /* Before anything can change staging (nothing does), page by page: a page not
           staged is not there to read (its fault would be served zeros, lm_freeze_stray). */
        size_t ps = r->page_size;
        for (size_t i = 0; i < r->npages; i++) {
            unsigned char v;
            if (mincore(fz->stage + i * ps, ps, &v) == 0 && (v & 1))
                memcpy(fz->test_copy + i * ps, fz->stage + i * ps, ps);
            else
                memset(fz->test_copy + i * ps, 0, ps);
        }
    }
    atomic_store_explicit(&fz->moved, 1, memory_order_seq_cst);
    return 0;
}

static int refuse(struct lm_region *r)
{
    /* What the region is first: a shared region is not registered for WP at all. */
    if (r->pool_fd >= 0)
        return lm_fail("background checkpoint: not of a shared restore (share=True)",
                       EOPNOTSUPP);
    if (atomic_load(&r->remote) != LM_REMOTE_NONE)
        return lm_fail("background checkpoint: not of a region a page server serves",
                       EOPNOTSUPP);
    if (!(r->api_features & UFFD_FEATURE_EVENT_REMAP))
        return lm_fail("background checkpoint: the kernel has no UFFD_FEATURE_EVENT_REMAP",
                       EOPNOTSUPP);
    if (!r->wp_async || r->pagemap_fd < 0)
        return lm_fail("background checkpoint: needs async write-protect and PAGEMAP_SCAN "
                       "(Linux 6.7)", EOPNOTSUPP);
    if (!atomic_load(&r->serving))
        return lm_fail("background checkpoint: the region is not serving", EINVAL);
    return 0;
}

int lm_freeze_begin(struct lm_region *r, void *test_copy, struct lm_freeze **out)
{
    uint64_t t_begin = lm_now_ns();
    *out = NULL;
    int rc = refuse(r);
    if (rc < 0)
        return rc;
    size_t words = (r->npages + 63) / 64;
    struct lm_freeze *fz = calloc(1, sizeof(*fz));
    if (!fz)
        return lm_fail("calloc(freeze)", ENOMEM);
    fz->r = r;
    atomic_store(&fz->test_fail_copies, r->cfg.test_fail_copyback);
    fz->stop_fd = -1;
    pthread_mutex_init(&fz->copier_lock, NULL);
    pthread_mutex_init(&fz->scan_mu, NULL);
    pthread_cond_init(&fz->scan_cv, NULL);
    fz->test_copy = test_copy;
    fz->back = calloc(r->npages, 1);
    fz->staged = calloc(words, sizeof(uint64_t));
    fz->zero = calloc(words, sizeof(uint64_t));
    fz->old_dirty = calloc(words, sizeof(uint64_t));
    if (!fz->back || !fz->staged || !fz->zero || !fz->old_dirty) {
        freeze_free(fz);
        return lm_fail("calloc(freeze bitmaps)", ENOMEM);
    }
    fz->resv_len = r->nbytes + STAGE_ALIGN;
    fz->resv = mmap(NULL, fz->resv_len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                    -1, 0);
    if (fz->resv == MAP_FAILED) {
        rc = LM_FAIL("mmap(staging)");
        freeze_free(fz);
        return rc;
    }
    size_t off = ((uintptr_t)r->base - (uintptr_t)fz->resv) & (STAGE_ALIGN - 1);
    fz->stage = fz->resv + off;
    fz->stop_fd = eventfd(0, EFD_CLOEXEC);
    if (fz->stop_fd < 0) {
        rc = LM_FAIL("eventfd(freeze)");
        freeze_free(fz);
        return rc;
    }

    /* Arming and the check for chunk blocks under chunk_lock, where deferrals decide them. */
    pthread_mutex_lock(&r->chunk_lock);
    if (atomic_load(&r->chunk_of))
        rc = lm_fail("background checkpoint: not of a region with canonical chunks mapped "
                     "(share_canonical)", EOPNOTSUPP);
    else if (atomic_load(&r->freeze) || atomic_load(&r->freeze_armed))
        rc = lm_fail("background checkpoint: another one is in progress", EBUSY);
    if (rc < 0) {
        pthread_mutex_unlock(&r->chunk_lock);
        freeze_free(fz);
        return rc;
    }
    uint64_t t_arm = lm_now_ns();
    rc = lm_meta_freeze_arm(r);
    /* The fault path consults fz from here, not during arming: until the pause is over it
       makes faulters retry (serve_staged), which only the pause itself should cost them. */
    if (rc == 0)
        atomic_store_explicit(&r->freeze, fz, memory_order_seq_cst);
    pthread_mutex_unlock(&r->chunk_lock);
    fz->arm_ns = lm_now_ns() - t_arm;
    int err = rc < 0 ? 0 : lm_thread_start(&fz->pump, NULL, pump_main, fz);
    if (err)
        rc = lm_fail("pthread_create(freeze pump)", err);
    if (rc == 0) {
        rc = lm_dirty_freeze(r, fz->old_dirty, do_pause, fz);
        uint64_t one = 1;
        if (write(fz->stop_fd, &one, sizeof(one)) != sizeof(one))
            rc = rc ?: LM_FAIL("write(eventfd)");
        pthread_join(fz->pump, NULL);
    }
    if (rc < 0 && !atomic_load(&fz->moved)) {
        atomic_store(&r->freeze, NULL);   /* (NULL already if arming failed) */
        for (unsigned spins = 0; atomic_load(&r->freeze_users);)
            lm_wait_busy(&spins);
        lm_meta_freeze_disarm(r);
        freeze_free(fz);
        return rc;
    }
    /* Without the copier the caller's lm_freeze_copy_back does its work. */
    fz->copier_started = lm_thread_start(&fz->copier, NULL, copier_main, fz) == 0;
    fz->begin_ns = lm_now_ns() - t_begin;
    *out = fz;
    return 0;
}

/* ---- what was staged ------------------------------------------------------------------ */

static int scan(struct lm_freeze *fz)
{
    struct lm_region *r = fz->r;
    if (atomic_load(&fz->scanned))
        return 0;
    struct lm_page_region vec[SCAN_VEC];
    uint64_t start = (uintptr_t)fz->stage, end = start + r->nbytes;
    while (start < end) {
        struct lm_pm_scan_arg a = {
            .size = sizeof(a),
            .start = start,
            .end = end,
            .vec = (uintptr_t)vec,
            .vec_len = SCAN_VEC,
            .category_anyof_mask = LM_PAGE_IS_PRESENT | LM_PAGE_IS_SWAPPED,
            .return_mask = LM_PAGE_IS_PRESENT | LM_PAGE_IS_SWAPPED | LM_PAGE_IS_WRITTEN |
                           LM_PAGE_IS_PFNZERO,
        };
        long n = ioctl(r->pagemap_fd, LM_PAGEMAP_SCAN, &a);
        if (n < 0)
            return LM_FAIL("ioctl(PAGEMAP_SCAN) of staging");
        for (long i = 0; i < n; i++) {
            size_t p0 = (size_t)(vec[i].start - (uintptr_t)fz->stage) >> r->page_shift;
            size_t p1 = (size_t)(vec[i].end - (uintptr_t)fz->stage) >> r->page_shift;
            uint64_t c = vec[i].categories;
            for (size_t p = p0; p < p1 && p < r->npages; p++) {
                /* A poisoned page's marker moved too (PAGEMAP_SCAN calls it swapped): it has
                   no contents to bring back, and its record stays POISONED, so a touch is
                   poisoned again by the fault path (serve.c), and the checkpoint fails. */
                if (lm_state_load(&r->meta[p]) == LM_POISONED)
                    continue;
                set_bit(fz->staged, p);
                fz->nstaged++;
                if (c & LM_PAGE_IS_PFNZERO)
                    set_bit(fz->zero, p);
                else if (c & LM_PAGE_IS_WRITTEN)   /* stored to since the last harvest */
                    set_bit(fz->old_dirty, p);
            }
        }
        if (a.walk_end <= start)
            break;
        start = a.walk_end;
    }
    /* A page recorded present but neither staged nor lazy at the pause was dropped by the
       program (madvise) before it: it reads as zero now, a change (dirty.c, scan C). */
    for (size_t p = 0; p < r->npages; p++) {
        if (lm_bit(fz->staged, p) || lm_meta_stashed(r, p))
            continue;
        uint8_t s = lm_state_load(&r->meta[p]);
        if (s == LM_PRESENT || s == LM_PINNED)
            set_bit(fz->old_dirty, p);
    }
    atomic_store_explicit(&fz->scanned, 1, memory_order_release);
    return 0;
}

/* Is page p staged? From the scan once it is done, else from /proc/self/pagemap. 1, 0, or
   -errno. */
static int is_staged(struct lm_freeze *fz, size_t p)
{
    struct lm_region *r = fz->r;
    if (atomic_load_explicit(&fz->scanned, memory_order_acquire))
        return lm_bit(fz->staged, p);
    if (lm_state_load(&r->meta[p]) == LM_POISONED)
        return 0;   /* its marker moved, nothing else: as scan() decides */
    uint64_t e;
    off_t off = (off_t)(((uintptr_t)fz->stage + p * r->page_size) / r->page_size * 8);
    if (pread(r->pagemap_fd, &e, sizeof(e), off) != (ssize_t)sizeof(e))
        return LM_FAIL("pread(/proc/self/pagemap)");
    return (e & (LM_PM_PRESENT | LM_PM_SWAPPED)) != 0;
}

/* Bring staged pages [first, first+n) back (claimed MOVING by the caller), waking faulters,
   and record which came back: B_BACK for those, B_UNKNOWN again for the rest (a copy can
   fail for want of memory: staging doubles the region's). Those stay staged, whoever faults
   on one is woken to fault again, which tries again (serve_staged), and so does the next
   copy-back; a page never reads as zero, nor waits, because a copy failed once. */
static int bring_back(struct lm_freeze *fz, size_t first, size_t n, bool zero, size_t *nback)
{
    struct lm_region *r = fz->r;
    size_t ps = r->page_size, done = 0;
    char *dst = r->base + first * ps;
    /* The zero page again where it was (a copy would give each its own zeroed page). */
    int rc;
    if (!zero && atomic_load_explicit(&fz->test_fail_copies, memory_order_relaxed) > 0 &&
        atomic_fetch_sub(&fz->test_fail_copies, 1) > 0)
        rc = lm_fail("test hook: ioctl(UFFDIO_COPY, MODE_WP) of a copy-back", ENOMEM);
    else
        rc = zero ? lm_uffd_zeropage(r->uffd, dst, n * ps, true, &done)
                  : lm_uffd_copy_wp(r->uffd, dst, fz->stage + first * ps, n * ps, true, &done);
    size_t back = rc == 0 ? n : done / ps;
    for (size_t i = 0; i < n; i++)
        atomic_store_explicit(&fz->back[first + i], i < back ? B_BACK : B_UNKNOWN,
                              memory_order_release);
    if (back < n)
        lm_uffd_wake(r->uffd, dst + back * ps, (n - back) * ps);
    *nback = back;
    return rc;
}

/* ---- the fault path ------------------------------------------------------------------- */

static bool serve_staged(struct lm_freeze *fz, size_t p)
{
    struct lm_region *r = fz->r;
    void *addr = r->base + p * r->page_size;
    for (unsigned spins = 0;;) {
        uint8_t b = atomic_load_explicit(&fz->back[p], memory_order_acquire);
        if (b == B_NOT_STAGED)
            return false;
        if (b == B_BACK)
            /* Brought back after this fault was raised (the normal path finds the page
               present: EEXIST, the faulter woken), or dropped by the program since it came
               back (madvise(MADV_DONTNEED)): then the normal path maps the zero page, as for
               any dropped page. Waking alone here refaulted forever until the freeze ended,
               and deadlocked a faulter that held the GIL the checkpoint needs. */
            return false;
        if (b == B_MOVING) {   /* its copy wakes our faulter; wait so as not to handle it twice */
            lm_wait_busy(&spins);
            continue;
        }
        int st = is_staged(fz, p);
        if (st < 0) {
            lm_record_error(r, st);
            lm_uffd_wake(r->uffd, addr, r->page_size);
            return true;
        }
        if (!st) {
            if (!atomic_load_explicit(&fz->moved, memory_order_seq_cst)) {
                /* The pause is under way: whether the page is staged is not settled. The
                   faulter retries (a present page's fault must not reach the normal path,
                   which would map the zero page over a page the move is taking away). */
                lm_uffd_wake(r->uffd, addr, r->page_size);
                return true;
            }
            uint8_t u = B_UNKNOWN;
            atomic_compare_exchange_strong(&fz->back[p], &u, B_NOT_STAGED);
            return false;
        }
        uint8_t u = B_UNKNOWN;
        if (!atomic_compare_exchange_strong(&fz->back[p], &u, B_MOVING))
            continue;
        size_t back = 0;
        int rc = bring_back(fz, p, 1, false, &back);   /* woken either way */
        if (rc < 0)
            lm_record_error(r, rc);
        atomic_fetch_add_explicit(&fz->fault_served, back, memory_order_relaxed);
        return true;
    }
}

/* The fault path may hold fz while lm_freeze_end frees it: users are counted (the pointer is
   read again after the count is raised, and the end waits for the count to drop). */
static struct lm_freeze *enter(struct lm_region *r)
{
    if (!atomic_load_explicit(&r->freeze, memory_order_acquire))
        return NULL;
    atomic_fetch_add_explicit(&r->freeze_users, 1, memory_order_seq_cst);
    struct lm_freeze *fz = atomic_load_explicit(&r->freeze, memory_order_seq_cst);
    if (!fz)
        atomic_fetch_sub_explicit(&r->freeze_users, 1, memory_order_release);
    return fz;
}

static void leave(struct lm_region *r)
{
    atomic_fetch_sub_explicit(&r->freeze_users, 1, memory_order_release);
}

bool lm_freeze_fault(struct lm_region *r, size_t p)
{
    struct lm_freeze *fz = enter(r);
    if (!fz)
        return false;
    bool done = serve_staged(fz, p);
    leave(r);
    return done;
}

bool lm_freeze_stray(struct lm_region *r, uint64_t addr)
{
    struct lm_freeze *fz = enter(r);
    if (!fz)
        return false;
    bool ours = addr >= (uintptr_t)fz->stage && addr < (uintptr_t)fz->stage + r->nbytes;
    if (ours) {
        /* Staging is registered too (EVENT_REMAP carried the registration over). Nothing here
           reads a staging page that is not there; were it to happen, zeros rather than a
           hang. */
        void *a = (void *)(uintptr_t)(addr & ~((uint64_t)r->page_size - 1));
        lm_uffd_zeropage(r->uffd, a, r->page_size, true, NULL);
        atomic_fetch_add_explicit(&fz->stray, 1, memory_order_relaxed);
    }
    leave(r);
    return ours;
}

/* ---- bringing pages back ------------------------------------------------------------ */

static int copy_back(struct lm_freeze *fz)
{
    struct lm_region *r = fz->r;
    int rc = scan(fz), first_rc = 0;
    if (rc < 0)
        return rc;
    /* A run that fails is left staged (bring_back) and the rest goes on: as much as can come
       back does; the first failure is returned, and the next copy-back retries. */
    for (size_t p = 0; p < r->npages;) {
        if (!lm_bit(fz->staged, p)) {
            p++;
            continue;
        }
        bool zero = lm_bit(fz->zero, p);
        size_t n = 0;
        while (n < RUN_MAX && p + n < r->npages && lm_bit(fz->staged, p + n) &&
               lm_bit(fz->zero, p + n) == zero) {
            uint8_t u = B_UNKNOWN;
            if (!atomic_compare_exchange_strong(&fz->back[p + n], &u, B_MOVING))
                break;
            n++;
        }
        if (n == 0) {   /* the fault path has it, or had it */
            p++;
            continue;
        }
        size_t back = 0;
        rc = bring_back(fz, p, n, zero, &back);
        atomic_fetch_add_explicit(&fz->copied_back, back, memory_order_relaxed);
        if (rc < 0 && first_rc == 0)
            first_rc = rc;
        p += n;
    }
    return first_rc;
}

static void *copier_main(void *arg)
{
    struct lm_freeze *fz = arg;
    int rc = scan(fz);
    pthread_mutex_lock(&fz->scan_mu);
    fz->scan_rc = rc;
    fz->scan_op = lm_last_op();
    fz->scan_settled = true;
    pthread_cond_broadcast(&fz->scan_cv);
    pthread_mutex_unlock(&fz->scan_mu);
    fz->copier_rc = rc < 0 ? rc : copy_back(fz);
    fz->copier_op = lm_last_op();   /* thread-local: carried to whoever joins */
    return NULL;
}

/* The copier's work is done (joined), and with it the scan; its result. */
static int copier_done(struct lm_freeze *fz)
{
    pthread_mutex_lock(&fz->copier_lock);
    if (fz->copier_started && !fz->copier_joined) {
        pthread_join(fz->copier, NULL);
        fz->copier_joined = true;
    }
    int rc = fz->copier_started ? fz->copier_rc : copy_back(fz);
    if (rc < 0 && fz->copier_started)
        rc = lm_fail(fz->copier_op, -rc);   /* the failed op named in the caller's thread */
    pthread_mutex_unlock(&fz->copier_lock);
    return rc;
}

int lm_freeze_scan(struct lm_freeze *fz)
{
    if (!fz->copier_started) {   /* no thread to be had: scan here (copy-back comes later) */
        pthread_mutex_lock(&fz->copier_lock);
        int rc = scan(fz);
        pthread_mutex_unlock(&fz->copier_lock);
        return rc;
    }
    pthread_mutex_lock(&fz->scan_mu);
    while (!fz->scan_settled)
        pthread_cond_wait(&fz->scan_cv, &fz->scan_mu);
    int rc = fz->scan_rc;
    const char *op = fz->scan_op;
    pthread_mutex_unlock(&fz->scan_mu);
    return rc < 0 ? lm_fail(op, -rc) : 0;
}

int lm_freeze_copy_back(struct lm_freeze *fz)
{
    /* The copier's result says whether all came back then; what failed is staged still and
       tried again now (cheap where nothing is left): this is the answer. */
    (void)copier_done(fz);
    return copy_back(fz);
}

/* ---- the region as it was at the pause -------------------------------------------------- */

uint8_t lm_view_hold(struct lm_region *r, size_t p, bool wait, struct lm_view *v)
{
    uint8_t s = wait ? lm_hold(r, p) : lm_try_hold(r, p);
    if (s == LM_BUSY)
        return LM_BUSY;
    v->held = v->s = s;
    v->m = &r->meta[p];
    v->mem = s == LM_PRESENT ? r->base + p * r->page_size : NULL;
    v->frozen = false;
    /* The freeze's owner (the checkpoint reading through these views) keeps fz alive. */
    struct lm_freeze *fz = atomic_load_explicit(&r->freeze, memory_order_acquire);
    if (!fz || !atomic_load_explicit(&fz->scanned, memory_order_acquire))
        return s;
    v->frozen = true;
    const struct lm_page_meta *st;
    if (lm_bit(fz->staged, p)) {
        v->s = LM_PRESENT;
        v->mem = fz->stage + p * r->page_size;
    } else if ((st = lm_meta_stashed(r, p))) {
        v->s = st->state;
        v->m = st;
        v->mem = NULL;
    } else if (s == LM_PRESENT) {
        v->mem = r->zero_src;   /* dropped before the pause: it read as zero */
    }
    return v->s;
}

void lm_view_unhold(struct lm_region *r, size_t p, const struct lm_view *v)
{
    lm_unhold(r, p, v->held);
}

int lm_view_read(struct lm_region *r, size_t p, const struct lm_view *v, void *out)
{
    if (v->s == LM_PRESENT) {
        memcpy(out, v->mem, r->page_size);
        return 0;
    }
    return lm_read_record(r, p, v->m, v->s, out);
}

void lm_freeze_count_written(struct lm_region *r, size_t n)
{
    struct lm_freeze *fz = atomic_load_explicit(&r->freeze, memory_order_acquire);
    if (fz)
        atomic_fetch_add_explicit(&fz->written, n, memory_order_relaxed);
}

int lm_freeze_page_read(struct lm_freeze *fz, size_t page, void *out)
{
    struct lm_region *r = fz->r;
    if (page >= r->npages)
        return lm_fail("page index outside the region", ERANGE);
    int rc = lm_freeze_scan(fz);
    if (rc < 0)
        return rc;
    struct lm_view v;
    lm_view_hold(r, page, true, &v);
    rc = lm_view_read(r, page, &v, out);
    lm_view_unhold(r, page, &v);
    return rc;
}

int lm_freeze_old_dirty(struct lm_freeze *fz, uint64_t *words)
{
    struct lm_region *r = fz->r;
    int rc = lm_freeze_scan(fz);
    if (rc < 0)
        return rc;
    size_t nw = (r->npages + 63) / 64;
    memcpy(words, fz->old_dirty, nw * sizeof(uint64_t));
    if (r->npages & 63)
        words[nw - 1] &= ((uint64_t)1 << (r->npages & 63)) - 1;
    return 0;
}

void lm_freeze_stats(struct lm_freeze *fz, struct lm_freeze_stats *o)
{
    memset(o, 0, sizeof(*o));
    o->arm_ns = fz->arm_ns;
    o->pause_ns = fz->pause_ns;
    o->begin_ns = fz->begin_ns;
    o->staged = atomic_load(&fz->scanned) ? fz->nstaged : 0;
    o->copied_back = atomic_load(&fz->copied_back);
    o->fault_served = atomic_load(&fz->fault_served);
    o->written = atomic_load(&fz->written);
    o->stray = atomic_load(&fz->stray);
}

/* ---- the end ------------------------------------------------------------------------ */

static void unpublish(struct lm_region *r)
{
    atomic_store_explicit(&r->freeze, NULL, memory_order_seq_cst);
    for (unsigned spins = 0; atomic_load_explicit(&r->freeze_users, memory_order_seq_cst);)
        lm_wait_busy(&spins);
}

int lm_freeze_end(struct lm_freeze *fz, int failed)
{
    struct lm_region *r = fz->r;
    /* Every staged page back in the region before staging goes: otherwise its next touch
       would find neither. */
    int rc = lm_freeze_copy_back(fz);
    if (rc < 0)
        return rc;
    if (failed)
        lm_dirty_merge(r, fz->old_dirty);   /* the epoch did not end after all */
    unpublish(r);
    lm_meta_freeze_disarm(r);
    freeze_free(fz);
    return 0;
}

void lm_freeze_abandon(struct lm_region *r)
{
    struct lm_freeze *fz = atomic_load(&r->freeze);
    if (fz) {
        unpublish(r);
        lm_meta_freeze_disarm(r);
        freeze_free(fz);
    }
    lm_meta_freeze_free(r);
}
