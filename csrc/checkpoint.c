/*
 * checkpoint.c: what a checkpoint needs from a region: every page's signature, and the two
 * checkpoint steps (plan: classify, deduplicate and place every page; write the store) plus
 * the collision check. Moved from snapshot.c (lm_signatures from region.c), unchanged but for
 * signature writes (lm_meta_note_signature, meta.c). The file format is in
 * docs/snapshot-format.md.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>
#include <xxhash.h>

#include "lm_internal.h"

/* ---- signatures ---------------------------------------------------------------------- */

int lm_signatures(struct lm_region *r, size_t first, size_t n, uint64_t *out)
{
    int rc = lm_check_range(r, first, n);
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
            lm_meta_note_signature(r, i, sig);
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
    lm_meta_note_signature(r, p, e->sig);
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
