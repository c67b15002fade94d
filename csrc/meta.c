/*
 * meta.c: THE owner of the page record (struct lm_page_meta, r->meta). Every store to a
 * record's state is in this file; the layers above claim, release and mark pages through the
 * functions below and read records only while they hold the page (or, for statistics-like
 * reads, without any promise).
 *
 * The state machine (enum lm_state, lazymem.h):
 *
 *            claim / claim_wait / hold            unclaim / release
 *   EMPTY ─────────────────────────► BUSY ─────► EMPTY
 *   DEFERRED ──────────────────────► BUSY ─────► DEFERRED        (unclaim; defer; sync)
 *                                      │ ──────► PRESENT         (mark_present: contents in place)
 *                                      └ ──────► POISONED        (mark_poisoned: cannot be served)
 *   PRESENT ── claim_wait ─────────► BUSY ─────► PRESENT | DEFERRED (defer: memory dropped)
 *   PRESENT ── hold (a reader) ────► PINNED ───► PRESENT         (unhold)
 *   POISONED ─ claim_wait / hold ──► BUSY ─────► POISONED | DEFERRED (re-poison; defer)
 *
 *   - Claims are compare-and-swaps into BUSY: lm_claim (EMPTY/DEFERRED only, never waits),
 *     lm_claim_wait (any state, waits while BUSY or PINNED), lm_claim_present (PRESENT only),
 *     lm_hold (readers: PINNED for a present page, BUSY for any other). lm_claim_run extends a
 *     claim over following lazy pages of the same kind.
 *   - The claimer owns the record until it leaves BUSY, with a release store, through exactly
 *     one of: lm_release / lm_unclaim / lm_unhold (any resting state: the claimed-from state
 *     given back, or DEFERRED after a deferral), lm_mark_present (PRESENT, contents in place),
 *     lm_mark_poisoned (POISONED: an access raises SIGBUS, or SIGSEGV where the kernel has no
 *     UFFDIO_POISON). A PINNED page is present and unchanged: its reader gives it back to
 *     PRESENT. A fault on a PINNED page (its memory dropped behind our back) is served a zero
 *     page without its record (serve.c), so a reader never waits for the fault path.
 *   - Nobody else stores a state. Everybody else waits (lm_wait_busy, which lifts the idle-class
 *     background fill when it may be the holder) or passes over the page. A thread holding
 *     pages never waits for another held page unless it is the fault path's own claim order
 *     (ascending, run by run); readers hold one page at a time while they wait.
 *   - A first claim of an EMPTY page also fills its record lazily (below, "lazy records"):
 *     the claim then returns DEFERRED if a range deferral or a restore's table describes it.
 *
 * Legality: with LM_CHECK_STATES defined (the sanitizer build, scripts/sanitize.sh), every
 * release checks that the page is BUSY and the new state is not, and aborts with a message
 * naming the transition otherwise. Ordinary builds do not pay for the check on the fault path.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "lm_internal.h"

#ifdef LM_CHECK_STATES
static void illegal(const char *what, size_t page, uint8_t from, uint8_t to)
{
    fprintf(stderr, "pylazymem: illegal page transition (%s): page %zu state %u -> %u\n",
            what, page, (unsigned)from, (unsigned)to);
    abort();
}
/* The page must be held (BUSY) by the caller, and `to` must be a resting state. */
#define CHECK_HELD(r, page, to, what)                                                  \
    do {                                                                               \
        uint8_t from_ = lm_state_load(&(r)->meta[page]);                               \
        if (from_ != LM_BUSY || (to) == LM_BUSY || (to) == LM_PINNED ||                \
            (to) > LM_PINNED)                                                          \
            illegal((what), (page), from_, (to));                                      \
    } while (0)
#else
#define CHECK_HELD(r, page, to, what) ((void)0)
#endif

/* The one store of a state that ends a claim. */
static inline void store_state(struct lm_region *r, size_t page, uint8_t state, const char *what)
{
    CHECK_HELD(r, page, state, what);
    (void)what;
    __atomic_store_n(&r->meta[page].state, state, __ATOMIC_RELEASE);
}

/* ---- waiting --------------------------------------------------------------------------- */

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

/*
 * Priority inheritance by hand. The fill runs at SCHED_IDLE and may be preempted while it holds
 * a run of pages BUSY; a serving thread that waits for one of them would then wait as long as
 * the CPUs stay busy (seconds, measured). So a waiter lifts the fill's threads to normal
 * priority; each drops back to SCHED_IDLE once it holds no claimed run (prefetch.c,
 * bg_unboost), and a waiter that still waits lifts them again.
 * (Moved from snapshot.c, unchanged: the thread's data is in struct lm_region.)
 */
static void lm_boost_background(struct lm_region *r)
{
    if (!atomic_load(&r->bg_running) || pthread_mutex_trylock(&r->bg_lock))
        return;   /* not running, or being started/stopped/boosted by someone else */
    unsigned all = (1u << r->bg_nthreads) - 1;
    if (r->bg_started && (atomic_fetch_or(&r->bg_boosted, all) & all) != all) {
        struct sched_param sp = {0};
        for (unsigned i = 0; i < r->bg_nthreads; i++)
            pthread_setschedparam(r->bg_tid[i], SCHED_OTHER, &sp);
    }
    pthread_mutex_unlock(&r->bg_lock);
}

/* Every waiter for a held page: the holder may be the preempted idle-class fill. Lifted again
   every 256 waits, since the fill drops back once it holds no claimed run. */
void lm_wait_held(struct lm_region *r, unsigned *spins)
{
    if ((*spins & 255) == 16)
        lm_boost_background(r);
    lm_wait_busy(spins);
}

/* ---- claims ---------------------------------------------------------------------------- */

static uint8_t try_claim(struct lm_page_meta *m)
{
    uint8_t s = lm_state_load(m);
    while (s == LM_EMPTY || s == LM_DEFERRED) {
        if (__atomic_compare_exchange_n(&m->state, &s, LM_BUSY, false, __ATOMIC_SEQ_CST,
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
        if (s == LM_BUSY || s == LM_PINNED) {
            lm_wait_busy(&spins);   /* held for one copy, madvise or read at most */
            continue;
        }
        if (__atomic_compare_exchange_n(&m->state, &s, LM_BUSY, false, __ATOMIC_SEQ_CST,
                                        __ATOMIC_ACQUIRE))
            return s;
    }
}

/*
 * Lazy records. Writing one 32-byte record per page is most of the cost of deferring a
 * large range or restoring a large snapshot (for 1 GiB, 8 MiB of fresh shared memory), so
 * records themselves are filled lazily: a page whose bit in base_done is clear has no
 * authoritative record yet; its record comes from the newest range deferral covering it
 * (lm_meta_defer's fast path), else from a restore's page table, else it is a fresh page. The
 * first claim of the page fills it (and sets the bit); lm_meta_sync_locked() fills them all.
 *
 * Ordering: the claimer sets the bit before it reads the range list, and a deferral publishes
 * a range before it reads the bits (both sequentially consistent). So either the claimer sees
 * the new range, or the deferral sees the bit and updates that page's record itself.
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
    /* Counted before the bit is taken: lm_meta_sync_locked() must not drop the ranges while a
       claimer that took a bit it had skipped is still reading them. */
    atomic_fetch_add_explicit(&r->applying, 1, memory_order_seq_cst);
    s = apply_lazy_record(r, p, s, bit);
    atomic_fetch_sub_explicit(&r->applying, 1, memory_order_release);
    return s;
}

/* Fill claimed page p's record from a restore's page map (moved from snapshot.c's
   lm_snap_apply_base, unchanged); returns the state the page is really in. */
static uint8_t apply_table(struct lm_region *r, size_t p, uint8_t s)
{
    const struct lm_snap_page *map = atomic_load_explicit(&r->base_table, memory_order_acquire);
    if (!map)
        return s;
    struct lm_page_meta *m = &r->meta[p];
    uint32_t e = map[p].entry;
    /* A kernel-served block of a complete pool (lm_internal.h, pool_kernel_map): the pool
       holds the page, the kernel maps it, nothing is to be carried out. An untouched page
       there is a page of zeros the kernel maps from the pool (it has no hole in such a
       block), and a store to it is found by the sync like any other: recorded as zero. */
    bool kernel = lm_pool_kernel_block(r, p);
    if (e == LM_SNAP_ZERO || (kernel && e == LM_SNAP_UNTOUCHED)) {
        m->cls = LM_CLS_ZERO;
        m->signature = r->zero_sig;
        if (kernel)
            m->flags = LM_F_SHARED;
        return LM_DEFERRED;
    }
    if (e >= LM_SNAP_STORED) {
        /* Sequentially consistent: see lm_meta_fill_signatures(). */
        const uint64_t *sigs = atomic_load_explicit(&r->src_sigs, memory_order_seq_cst);
        m->cls = LM_CLS_SNAPSHOT;
        m->aux = e - LM_SNAP_STORED;   /* below nstored: checked by lm_restore_table */
        m->signature = sigs ? sigs[m->aux] : 0;
        m->flags = kernel ? LM_F_SHARED : LM_F_NEEDS_UPDATE;
        return LM_DEFERRED;
    }
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
        m->flags = g->flags;
        return LM_DEFERRED;
    }
    return apply_table(r, p, s);   /* a restore's page map, if any */
}

/*
 * Freezing (a background checkpoint, freeze.c): the checkpoint must read every page as it was
 * at its pause. A page present then is in the staging range; a lazy one is described by its
 * record, which stays true until a claimer fills the page. So while a freeze is armed, the
 * first claim of a lazy page keeps a copy of the record it found (the stash), before the
 * claimer can fill or change anything; the checkpoint reads the stash. Claims taken before
 * arming are waited for by lm_meta_freeze_arm (their fills could land after the pause with no
 * stash): the claim's compare-and-swap and the load of freeze_armed below, and arming's store
 * and its load of each state, are sequentially consistent, so either the claimer sees the
 * freeze or the arming sees the claim.
 */
static uint8_t note_lazy(struct lm_region *r, size_t p, uint8_t s)
{
    if (!atomic_load_explicit(&r->freeze_armed, memory_order_seq_cst))
        return s;
    uint64_t bit = (uint64_t)1 << (p & 63);
    if (atomic_load_explicit(&r->stash_bits[p >> 6], memory_order_acquire) & bit)
        return s;   /* the first claim since arming kept it; a lazy record does not change */
    r->stash[p] = r->meta[p];
    r->stash[p].state = s;
    atomic_fetch_or_explicit(&r->stash_bits[p >> 6], bit, memory_order_release);
    return s;
}

static inline bool lazy(uint8_t s)
{
    return s == LM_EMPTY || s == LM_DEFERRED;
}

uint8_t lm_claim(struct lm_region *r, size_t p)
{
    uint8_t s = try_claim(&r->meta[p]);
    if (s == LM_EMPTY)
        s = apply_base(r, p, s);
    return lazy(s) ? note_lazy(r, p, s) : s;
}

uint8_t lm_claim_wait(struct lm_region *r, size_t p)
{
    uint8_t s = claim_wait(&r->meta[p]);
    if (s == LM_EMPTY)
        s = apply_base(r, p, s);
    return lazy(s) ? note_lazy(r, p, s) : s;
}

bool lm_claim_present(struct lm_region *r, size_t p)
{
    uint8_t present = LM_PRESENT;
    return __atomic_compare_exchange_n(&r->meta[p].state, &present, LM_BUSY, false,
                                       __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

/* One attempt to hold page p for reading (see lm_hold); LM_BUSY if someone else holds it. */
uint8_t lm_try_hold(struct lm_region *r, size_t p)
{
    struct lm_page_meta *m = &r->meta[p];
    uint8_t s = lm_state_load(m);
    if (s == LM_BUSY || s == LM_PINNED)
        return LM_BUSY;
    uint8_t to = s == LM_PRESENT ? LM_PINNED : LM_BUSY;
    if (!__atomic_compare_exchange_n(&m->state, &s, to, false, __ATOMIC_SEQ_CST,
                                     __ATOMIC_ACQUIRE))
        return LM_BUSY;
    if (s == LM_EMPTY)
        s = apply_base(r, p, s);
    return lazy(s) ? note_lazy(r, p, s) : s;
}

uint8_t lm_hold(struct lm_region *r, size_t p)
{
    unsigned spins = 0;
    for (;;) {
        uint8_t s = lm_try_hold(r, p);
        if (s != LM_BUSY)
            return s;
        lm_wait_held(r, &spins);
    }
}

void lm_unhold(struct lm_region *r, size_t p, uint8_t s)
{
    if (s == LM_PRESENT) {
#ifdef LM_CHECK_STATES
        if (lm_state_load(&r->meta[p]) != LM_PINNED)
            illegal("unhold", p, lm_state_load(&r->meta[p]), LM_PRESENT);
#endif
        __atomic_store_n(&r->meta[p].state, LM_PRESENT, __ATOMIC_RELEASE);
    } else {
        store_state(r, p, s, "unhold");
    }
}

bool lm_needs_copy(const struct lm_page_meta *m)
{
    return m->cls == LM_CLS_CANONICAL || m->cls == LM_CLS_SNAPSHOT;
}

/* Pages fill together when they take one path through lm_fill_run: the zero page, a copy,
   (snapshot pages of a shared region) the pool, or (canonical pages recorded SHARED: their
   block maps a chunk of the template, region.c) UFFDIO_CONTINUE of the chunk's pages. */
static int fill_kind(const struct lm_region *r, const struct lm_page_meta *m)
{
    if (m->cls == LM_CLS_SNAPSHOT && r->pool_fd >= 0)
        return 2;
    if (m->cls == LM_CLS_CANONICAL && (m->flags & LM_F_SHARED))
        return 3;
    return lm_needs_copy(m);
}

/*
 * Claim the lazy pages that follow `first` (already claimed, old state old[0]) and can be
 * filled together with it: same kind, still lazy, at most `max` in all. Returns the run length.
 */
size_t lm_claim_run(struct lm_region *r, size_t first, size_t max, uint8_t *old)
{
    size_t run = 1;
    /* Once canonical chunks have been mapped or pool blocks left to the kernel, every 2 MiB
       block boundary may be a VMA boundary (region.c, store.c), and one UFFDIO_COPY /
       ZEROPAGE / CONTINUE acts inside one VMA (across one it fails with ENOENT): runs stop
       there. */
    size_t blk = lm_vma_blocks(r);
    while (run < max && first + run < r->npages) {
        if (blk && (first + run) % blk == 0)
            break;
        struct lm_page_meta *m = &r->meta[first + run];
        uint8_t s = lm_claim(r, first + run);
        if (s != LM_EMPTY && s != LM_DEFERRED)
            break;
        if (fill_kind(r, m) != fill_kind(r, &r->meta[first])) {
            lm_release(r, first + run, s);
            break;
        }
        old[run++] = s;
    }
    return run;
}

/* ---- ends of a claim ------------------------------------------------------------------- */

void lm_release(struct lm_region *r, size_t page, uint8_t state)
{
    store_state(r, page, state, "release");
}

void lm_unclaim(struct lm_region *r, size_t first, size_t n, const uint8_t *old)
{
    for (size_t i = 0; i < n; i++)
        store_state(r, first + i, old[i], "unclaim");
}

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
        uint16_t f = (uint16_t)((m->flags & ~(LM_F_NEEDS_UPDATE | LM_F_SHARED)) | flags);
        /* A snapshot page of a shared region maps the pool's page unless it was copied
           privately (fill.c, prefetch.c say so with PRIVATE_FILL). */
        if (m->cls == LM_CLS_SNAPSHOT && r->pool_fd >= 0 && !(f & LM_F_PRIVATE_FILL))
            f |= LM_F_SHARED;
        /* A canonical page recorded SHARED was filled from its chunk (runs are of one kind,
           fill.c CONTINUEs them): it maps the chunk's page. A write fault made it DATA
           (lm_meta_set_data) before this: the store about to happen copies the page. */
        if (m->cls == LM_CLS_CANONICAL && (m->flags & LM_F_SHARED))
            f |= LM_F_SHARED;
        m->flags = f;
        if (m->cls == LM_CLS_NONE) {   /* a fresh page now maps the zero page */
            m->cls = LM_CLS_ZERO;
            m->signature = r->zero_sig;
        }
        if (i < ordered && !m->order)
            m->order = atomic_fetch_add_explicit(&r->touch_seq, 1, memory_order_relaxed);
        store_state(r, first + i, LM_PRESENT, "mark_present");
    }
    atomic_fetch_add_explicit(&r->st_present, (int64_t)n, memory_order_relaxed);
}

void lm_mark_poisoned(struct lm_region *r, size_t page)
{
    r->meta[page].flags |= LM_F_POISONED;
    atomic_fetch_add_explicit(&r->st_poisoned, 1, memory_order_relaxed);
    store_state(r, page, LM_POISONED, "mark_poisoned");
    lm_dirty_mark(r, page, 1);   /* its contents are lost: changed, as far as anyone knows */
}

/* ---- record fields written by a holder ----------------------------------------------- */

void lm_meta_set_data(struct lm_region *r, size_t page, bool forget_canon)
{
    struct lm_page_meta *m = &r->meta[page];
    CHECK_HELD(r, page, LM_PRESENT, "set_data");
    m->cls = LM_CLS_DATA;
    m->signature = 0;
    if (forget_canon)
        m->canon = 0;
}

void lm_meta_note_private(struct lm_region *r, size_t page)
{
    struct lm_page_meta *m = &r->meta[page];
    if (!(__atomic_load_n(&m->flags, __ATOMIC_RELAXED) & LM_F_SHARED))
        return;   /* a private copy we made (zero, canonical, PRIVATE_FILL) or already known */
    uint8_t s = lm_claim_wait(r, page);
    if (s == LM_PRESENT && (m->flags & LM_F_SHARED)) {
        m->flags &= (uint16_t)~LM_F_SHARED;
        m->cls = LM_CLS_DATA;   /* a store copied the pool's page: the program's data now */
        m->signature = 0;
    } else if (s == LM_DEFERRED && (m->flags & LM_F_SHARED) && lm_kernel_page(r, page)) {
        /* The kernel served its first touch (a chunk's template, a complete pool's page) and
           a store copied it: program data, present. Not a first touch we saw: no order. */
        m->cls = LM_CLS_DATA;
        m->signature = 0;
        lm_mark_present(r, page, 1, 0, 0);
        return;
    }
    lm_release(r, page, s);
}

void lm_meta_release_registered(struct lm_region *r, size_t first, size_t n, const uint8_t *old,
                                const uint64_t *pm)
{
    for (size_t i = 0; i < n; i++) {
        struct lm_page_meta *m = &r->meta[first + i];
        bool mapped = (pm[i] & (LM_PM_PRESENT | LM_PM_SWAPPED)) != 0;
        if (old[i] != LM_DEFERRED || !mapped || !(m->flags & LM_F_SHARED)) {
            store_state(r, first + i, old[i], "release_registered");
            continue;
        }
        /* Mapped by the kernel while unregistered: the chunk's or the pool's page (SHARED,
           kept by lm_mark_present) or a private copy a store made (the program's data). A registered
           block must not have DEFERRED pages that are mapped: no fault would ever come. */
        if (!(pm[i] & LM_PM_FILE)) {
            m->cls = LM_CLS_DATA;
            m->signature = 0;
        }
        lm_mark_present(r, first + i, 1, 0, 0);
    }
}

/* Not a transition: a signature computed from a held page's contents (lm_signatures, the
   checkpoint's classification hold it: a deferral cannot slip in between). */
void lm_meta_note_signature(struct lm_region *r, size_t page, uint64_t sig)
{
#ifdef LM_CHECK_STATES
    uint8_t s = lm_state_load(&r->meta[page]);
    if (s != LM_PINNED && s != LM_BUSY)
        illegal("note_signature of a page not held", page, s, s);
#endif
    r->meta[page].signature = sig;
}

/* ---- syncing lazy records ------------------------------------------------------------ */

void lm_records_lock(struct lm_region *r)
{
    pthread_mutex_lock(&r->records_lock);
}

void lm_records_unlock(struct lm_region *r)
{
    pthread_mutex_unlock(&r->records_lock);
}

/* Fill every record still pending; afterwards no lazy record is read again. */
void lm_meta_sync_locked(struct lm_region *r)
{
    if (atomic_load(&r->lazy_records)) {
        for (size_t w = 0; w < (r->npages + 63) / 64; w++) {
            uint64_t done = atomic_load_explicit(&r->base_done[w], memory_order_relaxed);
            if (done == ~(uint64_t)0)
                continue;
            for (size_t p = w * 64; p < (w + 1) * 64 && p < r->npages; p++)
                if (!(done & ((uint64_t)1 << (p & 63))))
                    lm_release(r, p, lm_claim_wait(r, p));
        }
        /* Every bit is set: no new claim reads the ranges or the table; wait for claimers
           that took a bit before this pass saw it and may still be reading them. */
        for (unsigned spins = 0; atomic_load_explicit(&r->applying, memory_order_seq_cst);)
            lm_wait_busy(&spins);
        atomic_store(&r->nranges, 0);
        atomic_store(&r->lazy_records, 0);
    }
}

int lm_meta_pending(struct lm_region *r)
{
    return atomic_load(&r->lazy_records);
}

bool lm_meta_pristine(struct lm_region *r)
{
    return !r->base_table && !atomic_load(&r->nranges);
}

void lm_meta_install_base(struct lm_region *r, const struct lm_snap_page *map)
{
    /* The caller keeps `map` alive until lm_meta_pending() is 0 or the region ends. */
    atomic_store_explicit(&r->base_table, map, memory_order_release);
    atomic_store_explicit(&r->lazy_records, 1, memory_order_seq_cst);
}

/*
 * Records filled from the page map before the signatures were published have signature 0:
 * give them theirs. A claimer that took its bit before the publication may not have seen the
 * signatures; this pass sees its bit (both sequentially consistent) and waits for its claim to
 * end. (The second half of lm_source_signatures, moved from snapshot.c, unchanged.)
 */
void lm_meta_fill_signatures(struct lm_region *r, const uint64_t *sigs)
{
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
            lm_release(r, p, s);
        }
    }
}

/* ---- freezing (see note_lazy) ------------------------------------------------------- */

int lm_meta_freeze_arm(struct lm_region *r)
{
    size_t words = (r->npages + 63) / 64;
    if (!r->stash) {
        /* Never freed before the region: a claimer that read freeze_armed just before a
           disarm may still write its page's slot (harmless in memory we keep). */
        void *st = mmap(NULL, r->npages * sizeof(struct lm_page_meta), PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (st == MAP_FAILED)
            return LM_FAIL("mmap(freeze stash)");
        r->stash_bits = calloc(words, sizeof(uint64_t));
        if (!r->stash_bits) {
            munmap(st, r->npages * sizeof(struct lm_page_meta));
            return lm_fail("calloc(freeze stash bits)", ENOMEM);
        }
        r->stash = st;
    }
    for (size_t w = 0; w < words; w++)
        atomic_store_explicit(&r->stash_bits[w], 0, memory_order_relaxed);
    atomic_store_explicit(&r->freeze_armed, 1, memory_order_seq_cst);
    /* Deferrals change records and memory together: those in flight finish, new ones are
       refused (defer_enter). */
    for (unsigned spins = 0; atomic_load_explicit(&r->defers_active, memory_order_seq_cst);)
        lm_wait_busy(&spins);
    /* A page BUSY now without a stash may be a claim from before arming: wait for it to end.
       (A claim from after arming has stashed, or will before it fills anything.) */
    for (size_t p = 0; p < r->npages; p++) {
        uint64_t bit = (uint64_t)1 << (p & 63);
        for (unsigned spins = 0;
             __atomic_load_n(&r->meta[p].state, __ATOMIC_SEQ_CST) == LM_BUSY &&
             !(atomic_load_explicit(&r->stash_bits[p >> 6], memory_order_acquire) & bit);) {
            lm_wait_held(r, &spins);
        }
    }
    return 0;
}

void lm_meta_freeze_disarm(struct lm_region *r)
{
    atomic_store_explicit(&r->freeze_armed, 0, memory_order_seq_cst);
    if (r->stash)
        madvise(r->stash, r->npages * sizeof(struct lm_page_meta), MADV_DONTNEED);
}

const struct lm_page_meta *lm_meta_stashed(struct lm_region *r, size_t p)
{
    if (!r->stash)
        return NULL;
    uint64_t bit = (uint64_t)1 << (p & 63);
    return atomic_load_explicit(&r->stash_bits[p >> 6], memory_order_acquire) & bit
               ? &r->stash[p]
               : NULL;
}

void lm_meta_freeze_free(struct lm_region *r)
{
    if (r->stash)
        munmap(r->stash, r->npages * sizeof(struct lm_page_meta));
    free(r->stash_bits);
    r->stash = NULL;
    r->stash_bits = NULL;
}

/* A deferral changes records and memory: not while a freeze is armed. */
static int defer_enter(struct lm_region *r)
{
    atomic_fetch_add_explicit(&r->defers_active, 1, memory_order_seq_cst);
    if (!atomic_load_explicit(&r->freeze_armed, memory_order_seq_cst))
        return 0;
    atomic_fetch_sub_explicit(&r->defers_active, 1, memory_order_seq_cst);
    return lm_fail("defer_fill: a background checkpoint is in progress (wait for it)", EBUSY);
}

static void defer_leave(struct lm_region *r)
{
    atomic_fetch_sub_explicit(&r->defers_active, 1, memory_order_seq_cst);
}

/* ---- deferral ------------------------------------------------------------------------ */

#define CHUNK 512   /* pages claimed at once: keeps the BUSY window short */

typedef int (*remap_fn)(struct lm_region *, size_t, size_t, void *);
static int defer_pages(struct lm_region *r, size_t first, size_t n, int cls, uint32_t canon,
                       uint64_t sig, uint16_t flags, bool only_done, const uint64_t *skip,
                       remap_fn remap, void *arg);

static bool publish_range(struct lm_region *r, size_t first, size_t n, int cls, uint32_t canon,
                          uint64_t sig, uint16_t flags)
{
    if (n >= LM_RANGE_MIN_PAGES && atomic_load(&r->nranges) == LM_MAX_RANGES)
        lm_meta_sync_locked(r);   /* the list is full: fill every record once, start anew */
    if (n < LM_RANGE_MIN_PAGES || atomic_load(&r->nranges) >= LM_MAX_RANGES)
        return false;
    struct lm_range *g = &r->ranges[atomic_load(&r->nranges)];
    *g = (struct lm_range){first, n, (uint8_t)cls, flags, canon, sig};
    atomic_store_explicit(&r->lazy_records, 1, memory_order_seq_cst);
    atomic_fetch_add_explicit(&r->nranges, 1, memory_order_seq_cst);
    return true;
}

/* The record part of lm_defer_fill (moved from region.c, unchanged). */
int lm_meta_defer(struct lm_region *r, size_t first, size_t n, int cls, uint32_t canon,
                  uint64_t sig, uint16_t flags)
{
    int rc = defer_enter(r);
    if (rc < 0)
        return rc;
    pthread_mutex_lock(&r->records_lock);
    /* Fast path: record the deferral once for the whole range. Pages whose record is not
       authoritative yet take it when first claimed; the others are updated below. */
    bool fast = publish_range(r, first, n, cls, canon, sig, flags);
    rc = defer_pages(r, first, n, cls, canon, sig, flags, fast, NULL, NULL, NULL);
    pthread_mutex_unlock(&r->records_lock);
    defer_leave(r);
    return rc;
}


static inline bool authoritative(struct lm_region *r, size_t p)
{
    return (atomic_load_explicit(&r->base_done[p >> 6], memory_order_seq_cst) >> (p & 63)) & 1;
}

/*
 * One block of lm_meta_defer_remap: hold the pages `all` says (every page) or whose record is
 * authoritative, write their records, remap the block, give them back DEFERRED; held[] (bits
 * relative to `base`) says which were held. On a failed remap the held pages are recorded as
 * copies (the caller's remap put the normal backing back; the caller records the block again).
 */
static int remap_block(struct lm_region *r, size_t c, size_t len, size_t base, int cls,
                       uint32_t canon, uint64_t sig, uint16_t flags, bool all, uint64_t *held,
                       remap_fn remap, void *arg)
{
    size_t present = 0, poisoned = 0;
    bool mine[CHUNK];
    int rc = 0;
    for (size_t i = c; i < c + len; i++) {
        if (!all && i % 64 == 0 && i + 64 <= c + len &&
            !atomic_load_explicit(&r->base_done[i >> 6], memory_order_seq_cst)) {
            memset(&mine[i - c], 0, 64);   /* 64 pages never claimed: nothing to hold */
            i += 63;
            continue;
        }
        mine[i - c] = all || authoritative(r, i);
        if (!mine[i - c])
            continue;
        struct lm_page_meta *m = &r->meta[i];
        uint8_t old = lm_claim_wait(r, i);
        if (old == LM_POISONED) {
            poisoned++;   /* the remap drops the marker; PROT_NONE (no UFFDIO_POISON) too */
        } else if (old == LM_PRESENT) {
            present++;
        }
        m->cls = (uint8_t)cls;
        m->canon = canon;
        m->signature = sig;
        m->order = 0;
        m->flags = flags;
        if (held)
            held[(i - base) >> 6] |= (uint64_t)1 << ((i - base) & 63);
    }
    rc = remap(r, c, len, arg);
    atomic_fetch_sub_explicit(&r->st_present, (int64_t)present, memory_order_relaxed);
    atomic_fetch_sub_explicit(&r->st_poisoned, (int64_t)poisoned, memory_order_relaxed);
    for (size_t i = c; i < c + len; i++) {
        if (!mine[i - c])
            continue;
        if (rc < 0)
            r->meta[i].flags = (uint16_t)((flags & ~LM_F_SHARED) | LM_F_NEEDS_UPDATE);
        store_state(r, i, LM_DEFERRED, "defer_remap");
    }
    return rc;
}

/*
 * Why the pages never claimed need no hold (only authoritative ones are held): a page whose
 * base_done bit is clear has never been claimed, so no fill, reader or fault is working on
 * it when its block is remapped. One may be claimed during the remap (a fault raised against
 * the old mapping, a reader): the claim sets the bit and then reads the ranges, and we publish
 * the range and then read the bits (all sequentially consistent), so either the claimer sees
 * the new range (published only after every block was remapped: the new record meets the new
 * mapping), or the pass after publication sees its bit and holds the page (waiting for its
 * fill to end), rewrites its record and drops what the fill put there (MADV_DONTNEED: back to
 * the chunk). A fill with an old record against the new mapping either lands there (dropped
 * again by that pass) or fails with ENOENT when the new block is not registered (kernel-served):
 * the fill paths give such a page back and wake its faulter (serve.c, fill.c), never poison it.
 * Kernel-served blocks being remapped are held whole: readers read their memory (store.c).
 */
int lm_meta_defer_remap(struct lm_region *r, size_t first, size_t n, int cls, uint32_t canon,
                        uint64_t sig, uint16_t flags, remap_fn remap, void *arg,
                        size_t *failed_at)
{
    size_t bp = r->blk_pages;
    *failed_at = first;
    int rc = defer_enter(r);
    if (rc < 0)
        return rc;
    *failed_at = first + n;
    pthread_mutex_lock(&r->records_lock);
    if (n >= LM_RANGE_MIN_PAGES && atomic_load(&r->nranges) == LM_MAX_RANGES)
        lm_meta_sync_locked(r);   /* room for the range record below */
    bool fast = n >= LM_RANGE_MIN_PAGES && atomic_load(&r->nranges) < LM_MAX_RANGES &&
                bp <= CHUNK;
    uint64_t *held = fast ? calloc((n + 63) / 64, sizeof(uint64_t)) : NULL;
    fast = held != NULL;
    for (size_t c = first; c < first + n && rc == 0; c += bp) {
        if (!fast) {   /* every page held across its block's remap */
            rc = defer_pages(r, c, bp, cls, canon, sig, flags, false, NULL, remap, arg);
        } else {
            rc = remap_block(r, c, bp, first, cls, canon, sig, flags, lm_kernel_page(r, c),
                             held, remap, arg);
        }
        if (rc < 0)
            *failed_at = c;
    }
    size_t done = *failed_at - first;
    if (fast && done) {
        publish_range(r, first, done, cls, canon, sig, flags);   /* room was made above */
        int prc = defer_pages(r, first, done, cls, canon, sig, flags, true, held, NULL, NULL);
        if (rc == 0)
            rc = prc;
    }
    free(held);
    pthread_mutex_unlock(&r->records_lock);
    defer_leave(r);
    return rc;
}

/* Word by word: does [c, c+len) hold no page that is authoritative and not in skip? Only
   for 64-aligned stretches (else: false, the caller looks page by page). */
static bool nothing_to_do(struct lm_region *r, size_t c, size_t len, size_t first,
                          const uint64_t *skip)
{
    if (c % 64 || len % 64 || (c - first) % 64)
        return false;
    for (size_t w = c / 64; w < (c + len) / 64; w++) {
        uint64_t done = atomic_load_explicit(&r->base_done[w], memory_order_seq_cst);
        if (done & ~(skip ? skip[(w * 64 - first) / 64] : 0))
            return false;
    }
    return true;
}

/* Pages of a chunk's or a pool's page cache (SHARED) in a registered block may be mapped by
   one huge page. The kernel cannot drop part of a file's huge mapping: a drop of [c, c+len)
   drops the whole block's, and its other pages, still recorded PRESENT, were left unmapped.
   A reader holding one then faulted on it while holding it; a serving thread waiting for a
   page of this deferral in the same batch as that fault made a deadlock (review). Each such
   page that can be held now is mapped again from the page cache (CONTINUE; EEXIST: it still
   was). One that cannot (held elsewhere) faults once if touched, and is served so. */
/* A present page whose memory is a page of a chunk's or the pool's page cache: SHARED, or a
   zero page of a shared region's block (the pool holds it as zeros, and a take-over records
   it without SHARED: store.c, lm_mark_present). */
static bool page_cache_page(const struct lm_region *r, const struct lm_page_meta *m)
{
    return (__atomic_load_n(&m->flags, __ATOMIC_RELAXED) & LM_F_SHARED) ||
           (r->pool_fd >= 0 && m->cls == LM_CLS_ZERO);
}

static void remap_neighbours(struct lm_region *r, size_t c, size_t len)
{
    size_t bp = r->blk_pages;
    if (!bp)
        return;
    for (size_t b = c / bp; b <= (c + len - 1) / bp && b * bp < r->npages; b++) {
        size_t end = (b + 1) * bp < r->npages ? (b + 1) * bp : r->npages;
        for (size_t p = b * bp; p < end; p++) {
            if (p >= c && p < c + len)
                continue;
            if (!page_cache_page(r, &r->meta[p]) || !lm_claim_present(r, p))
                continue;
            size_t done;
            (void)lm_uffd_continue(r->uffd, r->base + p * r->page_size, r->page_size, false,
                                   &done);
            store_state(r, p, LM_PRESENT, "remap_neighbours");
        }
    }
}

/* The per-page part of a deferral: with only_done, pages whose record is not yet
   authoritative are left to the range just published; pages set in skip (bits relative to
   first) were recorded already. */
static int defer_pages(struct lm_region *r, size_t first, size_t n, int cls, uint32_t canon,
                       uint64_t sig, uint16_t flags, bool only_done, const uint64_t *skip,
                       remap_fn remap, void *arg)
{
    int rc = 0;
    for (size_t c = first; c < first + n; c += CHUNK) {
        size_t len = first + n - c < CHUNK ? first + n - c : CHUNK;
        size_t present = 0, poisoned = 0, claimed = 0;
        bool mine[CHUNK], was_present[CHUNK], shared = false;
        if (only_done && nothing_to_do(r, c, len, first, skip))
            continue;   /* no page here was ever claimed, or all were recorded already */
        for (size_t i = c; i < c + len; i++) {
            mine[i - c] = !(skip && lm_bit(skip, i - first)) && (!only_done || authoritative(r, i));
            was_present[i - c] = false;
            if (!mine[i - c])
                continue;
            struct lm_page_meta *m = &r->meta[i];
            uint8_t old = lm_claim_wait(r, i);
            if (old == LM_PRESENT || old == LM_POISONED) {
                /* Both have a page-table entry to drop: the page, or the poison marker (which
                   MADV_DONTNEED removes too); without UFFDIO_POISON the page was made
                   inaccessible, and gets its access back first. */
                if (old == LM_POISONED) {
                    poisoned++;
                    if (!r->has_poison &&
                        mprotect(r->base + i * r->page_size, r->page_size,
                                 PROT_READ | PROT_WRITE) < 0 && rc == 0)
                        rc = LM_FAIL("mprotect(poisoned page)");
                } else {
                    present++;
                    if (page_cache_page(r, m))
                        shared = true;
                }
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
        /* A remap (canonical chunks) replaces the memory of the held pages: MAP_FIXED
           discards the old contents and poison markers itself. */
        if (remap) {
            int mrc = remap(r, c, len, arg);
            if (mrc < 0 && rc == 0)
                rc = mrc;
        }
        /* Return the old contents' memory; the range is missing again, so the next access
           faults into the handler, which finds the update recorded above. Only pages this
           call holds: a page it left to the range record may be being filled right now. */
        for (size_t i = 0; !remap && present + poisoned && i < len && rc == 0;) {
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
        if (shared && rc == 0)
            remap_neighbours(r, c, len);
        atomic_fetch_sub_explicit(&r->st_present, (int64_t)present, memory_order_relaxed);
        atomic_fetch_sub_explicit(&r->st_poisoned, (int64_t)poisoned, memory_order_relaxed);
        for (size_t i = c; i < c + len; i++) {
            if (!mine[i - c])
                continue;
            if (remap && rc < 0)   /* the normal backing is back: copy, never CONTINUE */
                r->meta[i].flags = (uint16_t)((flags & ~LM_F_SHARED) | LM_F_NEEDS_UPDATE);
            store_state(r, i, LM_DEFERRED, "defer");
        }
        if (rc < 0)
            return rc;
    }
    return rc;
}

/* A page range given by a caller: inside the region and not empty. */
int lm_check_range(struct lm_region *r, size_t first, size_t n)
{
    if (n == 0 || first >= r->npages || n > r->npages - first)
        return lm_fail("page range outside the region", ERANGE);
    return 0;
}
