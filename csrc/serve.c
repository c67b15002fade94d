/*
 * serve.c (was handler.c): the fault path. Native threads read page-fault messages from the
 * region's userfaultfd and carry out the pages' recorded updates. Nothing here takes the GIL
 * or calls into Python: a faulting thread may be holding the GIL while it waits for us.
 *
 * Placement: a fault costs ~8 us when the serving thread runs on the faulting thread's CPU and
 * ~40 us when it must be woken on another one (docs/design.md). Without knowing where the
 * faulter runs, the default is one serving thread pinned to each CPU, all polling the same
 * uffd: the one on the faulter's CPU, which has just gone idle, wins the message; the others
 * find nothing to read and go back to poll().
 *
 * Moved from handler.c; the latency histogram and lm_thread_start went to util.c,
 * lm_poison_page to fill.c, page-state stores to meta.c (lm_claim_present, lm_release,
 * lm_meta_set_data).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "lm_internal.h"

#define MSG_BATCH 16

/*
 * Adaptive readahead: a fault at (or just past) where a tracked stream expects its next fault
 * doubles that stream's cluster; any other fault starts a new stream at one page. Random
 * access thus pays for exactly the page it touches, sequential access quickly moves to the
 * measured per-page floor (2 MiB per fault). The table is shared by the serving threads and
 * updated without locks: a lost update only costs a smaller cluster.
 */
static uint32_t cluster_for(struct lm_region *r, size_t page, struct lm_stream **stream)
{
    uint32_t max = r->cfg.max_cluster_pages;
    for (int i = 0; i < LM_STREAMS; i++) {
        struct lm_stream *s = &r->streams[i];
        size_t next = atomic_load_explicit(&s->next, memory_order_relaxed);
        uint32_t c = atomic_load_explicit(&s->cluster, memory_order_relaxed);
        if (c && page >= next && page <= next + c) {
            *stream = s;
            return c * 2 < max ? c * 2 : max;
        }
    }
    unsigned slot = atomic_fetch_add_explicit(&r->stream_rr, 1, memory_order_relaxed);
    *stream = &r->streams[slot % LM_STREAMS];
    return 1;
}

static void count_fault(struct lm_region *r, const struct lm_page_meta *m, uint8_t old,
                        bool write)
{
    _Atomic uint64_t *c = old == LM_EMPTY                ? &r->st_faults_empty
                          : m->cls == LM_CLS_CANONICAL  ? &r->st_faults_canonical
                          : m->cls == LM_CLS_SNAPSHOT   ? &r->st_faults_snapshot
                                                        : &r->st_faults_zero;
    atomic_fetch_add_explicit(c, 1, memory_order_relaxed);
    if (write)
        atomic_fetch_add_explicit(&r->st_faults_write, 1, memory_order_relaxed);
}

/*
 * Runs of at least 2 * SPLIT_MIN pages (the clusters of a sequential stream) are filled in two
 * halves at once, the second by the fill helper, so both CPUs copy while the faulting thread
 * waits; smaller runs (random faults) do not pay for the hand-off.
 */
#define SPLIT_MIN 64

static void *helper_main(void *arg)
{
    struct lm_region *r = arg;
    struct lm_fill_helper *h = &r->helper;
    pthread_mutex_lock(&h->lock);
    for (;;) {
        while (h->state != 1 && h->state != 3)
            pthread_cond_wait(&h->cond, &h->lock);
        if (h->state == 3)
            break;
        size_t first = h->first, n = h->n, filled = 0;
        pthread_mutex_unlock(&h->lock);
        int rc = lm_fill_run(r, &h->t, first, n, false, false, &filled);
        pthread_mutex_lock(&h->lock);
        h->rc = rc;
        h->filled = filled;
        h->state = 2;
        pthread_cond_broadcast(&h->cond);
    }
    pthread_mutex_unlock(&h->lock);
    return NULL;
}

/*
 * Fill the claimed run [first, first+n); ok[i] says which pages were filled (a failed fill
 * may have filled some: their page-table entries are present, so their records must say so).
 * Returns 0 when all were, else the first error.
 */
static int fill_split(struct lm_region *r, struct lm_serve_thread *t, size_t first, size_t n,
                      bool write, uint8_t *ok)
{
    struct lm_fill_helper *h = &r->helper;
    int idle = 0;
    size_t filled = 0;
    if (n < 2 * SPLIT_MIN || !h->started ||
        !atomic_compare_exchange_strong(&h->busy, &idle, 1)) {
        int rc = lm_fill_run(r, t, first, n, false, write, &filled);
        for (size_t i = 0; i < n; i++)
            ok[i] = rc == 0 || i < filled;
        return rc;
    }
    size_t half = n / 2;
    pthread_mutex_lock(&h->lock);
    h->first = first + half;
    h->n = n - half;
    h->state = 1;
    pthread_cond_signal(&h->cond);
    pthread_mutex_unlock(&h->lock);
    int rc = lm_fill_run(r, t, first, half, false, write, &filled);
    pthread_mutex_lock(&h->lock);
    while (h->state != 2)
        pthread_cond_wait(&h->cond, &h->lock);
    int rc2 = h->rc;
    size_t filled2 = h->filled;
    h->state = 0;
    pthread_mutex_unlock(&h->lock);
    atomic_store(&h->busy, 0);
    for (size_t i = 0; i < half; i++)
        ok[i] = rc == 0 || i < filled;
    for (size_t i = half; i < n; i++)
        ok[i] = rc2 == 0 || i - half < filled2;
    return rc < 0 ? rc : rc2;
}

static int helper_start(struct lm_region *r)
{
    struct lm_fill_helper *h = &r->helper;
    cpu_set_t set;
    if (h->started || r->cfg.max_cluster_pages < 2 * SPLIT_MIN ||
        sched_getaffinity(0, sizeof(set), &set) != 0 || CPU_COUNT(&set) < 2)
        return 0;   /* one CPU: halves would only take turns */
    if (!h->t.scratch) {
        h->t.r = r;
        h->t.cpu = -1;
        h->t.scratch = malloc((size_t)r->cfg.max_cluster_pages * r->page_size);
        if (!h->t.scratch)
            return lm_fail("malloc(fill helper scratch)", ENOMEM);
    }
    h->t.scratch_canon = 0;
    pthread_mutex_init(&h->lock, NULL);
    pthread_cond_init(&h->cond, NULL);
    h->state = 0;
    atomic_store(&h->busy, 0);
    int err = lm_thread_start(&h->tid, NULL, helper_main, r);
    if (err) {
        pthread_cond_destroy(&h->cond);
        pthread_mutex_destroy(&h->lock);
        return lm_fail("pthread_create(fill helper)", err);
    }
    h->started = true;
    return 0;
}

/* After the serving threads are joined: nobody can post a job any more. */
static void helper_stop(struct lm_region *r)
{
    struct lm_fill_helper *h = &r->helper;
    if (!h->started)
        return;
    pthread_mutex_lock(&h->lock);
    h->state = 3;
    pthread_cond_broadcast(&h->cond);
    pthread_mutex_unlock(&h->lock);
    pthread_join(h->tid, NULL);
    pthread_cond_destroy(&h->cond);
    pthread_mutex_destroy(&h->lock);
    h->started = false;
}

/* The faulting page `page` and its readahead neighbours are filled: record, count, wake. */
static void served(struct lm_serve_thread *t, size_t page, size_t run, bool write,
                   struct lm_stream *stream, uint32_t want, uint64_t t0)
{
    struct lm_region *r = t->r;
    if (write)
        lm_meta_set_data(r, page, false);   /* about to be changed by the program */
    lm_mark_present(r, page, 1, write ? LM_F_WRITE_FAULT : 0, 1);
    if (run > 1) {
        lm_mark_present(r, page + 1, run - 1, LM_F_READAHEAD, run - 1);
        atomic_fetch_add_explicit(&r->st_readahead, run - 1, memory_order_relaxed);
    }
    if (stream) {
        atomic_store_explicit(&stream->next, page + run, memory_order_relaxed);
        atomic_store_explicit(&stream->cluster, want, memory_order_relaxed);
    }
    atomic_fetch_add_explicit(&r->st_faults, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&t->served, 1, memory_order_relaxed);
    lm_hist_add(&r->lat, lm_now_ns() - t0);
    int rc = lm_uffd_wake(r->uffd, r->base + page * r->page_size, run * r->page_size);
    if (rc < 0 && rc != -ENOENT)
        lm_record_error(r, rc);
}

/* A fault on a page whose record says it is there (PRESENT, or PINNED by a reader): another
   path filled it after this fault was raised, or the program dropped it behind our back
   (madvise(MADV_DONTNEED)), and anonymous memory then reads as zero. A present page is held
   while the zero page is mapped, so that defer_fill() cannot drop it and record new contents
   in between; a pinned one is held by its reader already (who must not wait for us). */
static void serve_spurious(struct lm_serve_thread *t, size_t page, bool pinned, bool minor,
                           uint64_t t0)
{
    struct lm_region *r = t->r;
    atomic_fetch_add_explicit(&r->st_faults, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&r->st_faults_spurious, 1, memory_order_relaxed);
    /* In a shared region a dropped page reads as the pool's page when the pool holds one (a
       MINOR fault): what a private file mapping gives back after MADV_DONTNEED. */
    char *addr = r->base + page * r->page_size;
    /* If dropped, the page now reads as zero (or as the pool's page) without a store: no
       write-protect bit tells, so dirty tracking is told here (dirty.c). Not for a page still
       recorded as the pool's unwritten page (SHARED: the sync finds every store as a private
       copy): it reads the same pool page again, which nobody changes (a pool's completion
       drops every process's mappings of its pages when it makes them huge: fill.c). */
    if (!(minor && (r->meta[page].flags & LM_F_SHARED)))
        lm_dirty_mark(r, page, 1);
    int rc;
    if (minor) {
        rc = lm_uffd_continue(r->uffd, addr, r->page_size, true, NULL);
    } else if (r->pool_fd >= 0 && r->meta[page].cls == LM_CLS_SNAPSHOT) {
        /* A shared region's snapshot page that the pool does not hold although the record
           says present: a private copy (PRIVATE_FILL) the program dropped, or a page lost
           from the pool (a hole punched into the memfd by another process of this user:
           F_SEAL_SHRINK does not forbid that). A private file mapping reads the file's page
           there, so this reads the snapshot's: from the store, published again. Never zeros;
           what cannot be served is poisoned. */
        size_t filled = 0;
        unsigned char in_pool = 0;
        rc = lm_pool_holes(r, page, 1, &in_pool);
        if (rc == 0 && (in_pool & 1)) {
            /* The usual spurious fault: filled (published and mapped) by another path after
               this fault was raised; EEXIST. Mapped from the pool should it not be. */
            rc = lm_uffd_continue(r->uffd, addr, r->page_size, true, NULL);
            filled = rc == 0;
        } else if (rc == 0) {
            rc = lm_fill_run(r, t, page, 1, true, false, &filled);
        }
        if (rc < 0 && !filled && !pinned) {
            lm_poison_page(r, page, rc);   /* held: marked POISONED, the faulter woken */
            lm_hist_add(&r->lat, lm_now_ns() - t0);
            return;
        }
        if (rc < 0 && filled)
            rc = 0;
        if (rc < 0)   /* pinned: its reader holds it; the faulter retries once it lets go */
            lm_uffd_wake(r->uffd, addr, r->page_size);
    } else {
        rc = lm_uffd_zeropage(r->uffd, addr, r->page_size, true, NULL);
    }
    if (!pinned)
        lm_release(r, page, LM_PRESENT);
    if (rc == -ENOENT)   /* raised against a mapping replaced since (a kernel-served chunk
                            block now): the faulter retries, and the kernel serves it */
        lm_uffd_wake(r->uffd, addr, r->page_size);
    else if (rc < 0)
        lm_record_error(r, rc);
    lm_hist_add(&r->lat, lm_now_ns() - t0);   /* includes any wait for the page's filler */
}

/* Service time is taken before the wake-up: on the faulter's CPU the woken thread preempts us,
   and its run until the next fault is not ours to count. */
static void serve_fault(struct lm_serve_thread *t, uint64_t addr, bool write, bool minor,
                        uint64_t t0)
{
    struct lm_region *r = t->r;
    uint8_t old[LM_MAX_CLUSTER], ok[LM_MAX_CLUSTER];
    if (addr < (uintptr_t)r->base || addr >= (uintptr_t)r->base + r->nbytes) {
        (void)lm_freeze_stray(r, addr);   /* a background checkpoint's staging, or nothing */
        return;   /* not ours: cannot happen with one uffd per region */
    }
    size_t page = (size_t)(addr - (uintptr_t)r->base) >> r->page_shift;
    struct lm_page_meta *m = &r->meta[page];
    /* A background checkpoint moved the page away at its pause: it comes back from staging
       (freeze.c). Before anything reads the record, which says PRESENT for such a page. */
    if (lm_freeze_fault(r, page))
        return;

    uint8_t s;
    unsigned spins = 0;
    for (;;) {
        s = lm_claim(r, page);
        if (s == LM_BUSY) {
            lm_wait_held(r, &spins);   /* another path is filling it: its copy wakes our faulter */
            continue;
        }
        if (s == LM_PINNED) {
            serve_spurious(t, page, true, minor, t0);
            return;
        }
        if (s == LM_PRESENT) {
            if (!lm_claim_present(r, page))
                continue;
            serve_spurious(t, page, false, minor, t0);
            return;
        }
        if (s == LM_POISONED) {
            uint8_t h = lm_try_hold(r, page);
            if (h != LM_POISONED) {   /* it changed meanwhile (a deferral): look again */
                if (h != LM_BUSY)
                    lm_unhold(r, page, h);
                continue;
            }
            atomic_fetch_add_explicit(&r->st_faults, 1, memory_order_relaxed);
            lm_poison_again(r, page);
            return;
        }
        break;   /* claimed: serve it below */
    }

    if (lm_kernel_page(r, page)) {
        /* Raised against the mapping a deferral has replaced since with a kernel-served chunk
           block (checked while the page is held: a take-over holds every page of the block):
           not ours to fill. The faulter retries and the kernel serves it. Or the block is
           registered although its flag says kernel-served (a take-over that failed after it
           registered the block, and could not undo that): then the retry would fault here
           again, forever. Mapping the chunk's page settles both: CONTINUE fails on the
           unregistered mapping (the kernel serves the retry) and maps the template's page on
           the registered one, which is what the record says the page holds. */
        lm_release(r, page, s);
        atomic_fetch_add_explicit(&r->st_faults_spurious, 1, memory_order_relaxed);
        size_t done = 0;
        (void)lm_uffd_continue(r->uffd, r->base + page * r->page_size, r->page_size, false,
                               &done);
        lm_uffd_wake(r->uffd, r->base + page * r->page_size, r->page_size);
        return;
    }

    if (s == LM_EMPTY && r->remote_empty_unknown) {
        /* Its contents were the page server's, and the server is gone (remote.c). */
        atomic_fetch_add_explicit(&r->st_faults, 1, memory_order_relaxed);
        lm_poison_page(r, page, -EHOSTDOWN);
        return;
    }
    old[0] = s;
    struct lm_stream *stream;
    uint32_t want = cluster_for(r, page, &stream);
    size_t run = lm_claim_run(r, page, want, old);
    count_fault(r, m, s, write);

    /* Fill without waking, record, then wake: whoever the wake-up releases must already
       see the page PRESENT in meta and counted in the statistics. */
    int rc;
    if (write && !lm_needs_copy(m) && run > 1 && r->cfg.zero_write == LM_ZW_COPY) {
        /* Only the stored-to page gets memory; its neighbours share the zero page. */
        size_t filled = 0;
        rc = lm_fill_run(r, t, page, 1, false, true, &filled);
        ok[0] = rc == 0 || filled;
        if (rc == 0) {
            rc = lm_fill_run(r, t, page + 1, run - 1, false, false, &filled);
            for (size_t i = 1; i < run; i++)
                ok[i] = rc == 0 || i - 1 < filled;
        } else {
            memset(ok + 1, 0, run - 1);
        }
    } else {
        rc = fill_split(r, t, page, run, write, ok);
    }
    if (rc == 0) {
        served(t, page, run, write, stream, want, t0);
        return;
    }
    /* Something failed. Neighbours that were filled are present (their records must say so);
       the others are given back. The faulting page, if it was not filled, is tried alone (a
       readahead page may be the bad one: unreadable, or failed verification); if that fails
       too, it is poisoned: the faulter gets SIGBUS, never a wait that does not end. */
    bool gone = rc == -ENOENT || rc == -ESRCH;   /* the range or the process is going away */
    for (size_t i = 1; i < run; i++) {
        if (ok[i])
            lm_mark_present(r, page + i, 1, LM_F_READAHEAD, 0);
        else
            lm_release(r, page + i, old[i]);
    }
    if (!ok[0] && !gone) {
        size_t filled = 0;
        rc = lm_fill_run(r, t, page, 1, false, write, &filled);
        ok[0] = rc == 0 || filled;
        gone = rc == -ENOENT || rc == -ESRCH;
    }
    if (ok[0]) {
        served(t, page, 1, write, stream, want, t0);
        if (run > 1)
            lm_uffd_wake(r->uffd, r->base + (page + 1) * r->page_size,
                         (run - 1) * r->page_size);
        return;
    }
    atomic_fetch_add_explicit(&r->st_faults, 1, memory_order_relaxed);
    if (gone) {
        /* The range is not registered (any more): the region is going away, or a deferral
           remapped the block to a kernel-served chunk under us (it records the page again).
           The faulter, if any, retries. */
        lm_release(r, page, old[0]);
        lm_uffd_wake(r->uffd, r->base + page * r->page_size, r->page_size);
        return;
    }
    lm_poison_page(r, page, rc);   /* still claimed by us */
}

static void *serve_main(void *arg)
{
    struct lm_serve_thread *t = arg;
    struct lm_region *r = t->r;
    struct pollfd pfd[2] = {{.fd = r->uffd, .events = POLLIN}, {.fd = r->stop_fd, .events = POLLIN}};
    struct uffd_msg msgs[MSG_BATCH];
    for (;;) {
        if (poll(pfd, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            lm_record_error(r, -errno);
            break;
        }
        if (pfd[1].revents)
            break;
        if (pfd[0].revents & (POLLERR | POLLHUP | POLLNVAL)) {
            lm_record_error(r, -EBADF);
            break;
        }
        ssize_t got = read(r->uffd, msgs, sizeof(msgs));
        if (got < 0) {
            if (errno == EAGAIN || errno == EINTR) {
                /* another serving thread took the message */
                atomic_fetch_add_explicit(&r->st_empty_wakeups, 1, memory_order_relaxed);
                continue;
            }
            lm_record_error(r, -errno);
            break;
        }
        for (size_t i = 0; i < (size_t)got / sizeof(msgs[0]); i++) {
            if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
                continue;   /* no other events are requested */
            uint64_t flags = msgs[i].arg.pagefault.flags;
            serve_fault(t, msgs[i].arg.pagefault.address & ~(uint64_t)(r->page_size - 1),
                        flags & UFFD_PAGEFAULT_FLAG_WRITE, flags & UFFD_PAGEFAULT_FLAG_MINOR,
                        lm_now_ns());
        }
    }
    return NULL;
}

int lm_serve_start(struct lm_region *r)
{
    int rc = 0;
    pthread_mutex_lock(&r->serve_lock);
    if (atomic_load(&r->serving))
        goto out;
    rc = helper_start(r);
    for (int i = 0; rc == 0 && i < r->nthreads; i++) {
        struct lm_serve_thread *t = &r->threads[i];
        t->r = r;
        t->cpu = r->cpus[i];
        if (!t->scratch) {
            t->scratch = malloc((size_t)r->cfg.max_cluster_pages * r->page_size);
            if (!t->scratch) {
                rc = lm_fail("malloc(scratch)", ENOMEM);
                break;
            }
        }
        t->scratch_canon = 0;
        /* Pinned from birth: the first fault must already find its server on its CPU. */
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        if (t->cpu >= 0) {
            cpu_set_t set;
            CPU_ZERO(&set);
            CPU_SET(t->cpu, &set);
            int perr = pthread_attr_setaffinity_np(&attr, sizeof(set), &set);
            if (perr) {
                pthread_attr_destroy(&attr);
                rc = lm_fail("pthread_attr_setaffinity_np(serving thread)", perr);
                break;
            }
        }
        int err = lm_thread_start(&t->tid, &attr, serve_main, t);
        pthread_attr_destroy(&attr);
        if (err) {
            rc = lm_fail(t->cpu >= 0 ? "pthread_create(pinned serving thread)" : "pthread_create",
                         err);
            break;
        }
        t->started = true;
        atomic_fetch_add(&r->serving, 1);
    }
out:
    pthread_mutex_unlock(&r->serve_lock);
    if (rc < 0)
        lm_serve_stop(r);
    return rc;
}

int lm_serve_stop(struct lm_region *r)
{
    pthread_mutex_lock(&r->serve_lock);
    uint64_t one = 1;
    bool any = false;
    for (int i = 0; i < r->nthreads; i++)
        any |= r->threads[i].started;
    if (any) {
        if (write(r->stop_fd, &one, sizeof(one)) < 0) {
            /* cannot happen for an eventfd below its maximum */
        }
        for (int i = 0; i < r->nthreads; i++) {
            if (!r->threads[i].started)
                continue;
            pthread_join(r->threads[i].tid, NULL);
            r->threads[i].started = false;
        }
        uint64_t drain;
        if (read(r->stop_fd, &drain, sizeof(drain)) < 0) {
            /* nothing to drain */
        }
    }
    helper_stop(r);
    atomic_store(&r->serving, 0);
    pthread_mutex_unlock(&r->serve_lock);
    return 0;
}

int lm_region_start(struct lm_region *r) { return lm_serve_start(r); }
int lm_region_stop(struct lm_region *r) { return lm_serve_stop(r); }
int lm_region_serving(struct lm_region *r) { return atomic_load(&r->serving); }
