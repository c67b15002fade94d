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

#include "lm_internal.h"

/* ---- signatures ---------------------------------------------------------------------- */

/*
 * Every page is held while it is read (a present page pinned, a lazy one claimed), so that a
 * deferral cannot slip in between the hash and the record. A poisoned page has no signature:
 * 0 in out, and -EHWPOISON once the others are done (the caller names them from the records).
 */
int lm_signatures(struct lm_region *r, size_t first, size_t n, uint64_t *out)
{
    int rc = lm_check_range(r, first, n);
    if (rc < 0)
        return rc;
    if ((rc = lm_meta_sync(r)) < 0)
        return rc;
    bool poisoned = false;
    for (size_t i = first; i < first + n; i++) {
        uint8_t s = lm_hold(r, i);
        uint64_t sig;
        if (s == LM_PRESENT) {
            sig = lm_xxh3(r->base + i * r->page_size, r->page_size);
            lm_meta_note_signature(r, i, sig);
        } else if (s == LM_EMPTY) {
            sig = r->zero_sig;    /* fresh anonymous memory reads as zero */
        } else if (s == LM_POISONED) {
            sig = 0;
            poisoned = true;
        } else {
            sig = r->meta[i].signature;   /* pending contents: known when recorded */
        }
        lm_unhold(r, i, s);
        if (out)
            out[i - first] = sig;
    }
    return poisoned ? lm_fail("signatures: poisoned pages in the range", EHWPOISON) : 0;
}

/* ---- checkpoint ---------------------------------------------------------------------- */

/* A held page's contents (its view, freeze.c): in the region (pinned) or in staging, in the
   canonical store, or read into buf (a snapshot page). Never faults a page in. */
static int view_bytes(struct lm_region *r, size_t p, const struct lm_view *v, char *buf,
                      const char **out)
{
    if (v->s == LM_PRESENT) {
        *out = v->mem;
        return 0;
    }
    if (v->s == LM_DEFERRED && v->m->cls == LM_CLS_CANONICAL) {
        *out = lm_canon_page(r, v->m->canon);
        return 0;
    }
    *out = buf;
    return lm_view_read(r, p, v, buf);
}

/* Compare the contents of pages a and b byte by byte, without faulting either. Each is held
   while it is read; a is never held while this waits for b (the holder of b may be waiting
   for a: a deferral claims pages in order). */
static int pages_equal(struct lm_region *r, size_t a, size_t b, char *buf_a, char *buf_b,
                       bool *equal)
{
    size_t ps = r->page_size;
    const char *pa, *pb;
    struct lm_view va, vb;
    lm_view_hold(r, a, true, &va);
    int rc = view_bytes(r, a, &va, buf_a, &pa);
    bool a_held = true;
    uint8_t sb = rc < 0 ? LM_BUSY : lm_view_hold(r, b, false, &vb);
    if (rc == 0 && sb == LM_BUSY) {
        if (pa != buf_a) {
            memcpy(buf_a, pa, ps);
            pa = buf_a;
        }
        lm_view_unhold(r, a, &va);
        a_held = false;
        lm_view_hold(r, b, true, &vb);
        sb = vb.s;
    }
    if (rc == 0) {
        rc = view_bytes(r, b, &vb, buf_b, &pb);
        if (rc == 0)
            *equal = memcmp(pa, pb, ps) == 0;
        lm_view_unhold(r, b, &vb);
    }
    if (a_held)
        lm_view_unhold(r, a, &va);
    return rc;
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
    uint64_t sig;
    uint8_t cls;      /* enum lm_snap_class, or PLAN_PARENT */
    bool placed;      /* has its store entry (working-set pages are placed first) */
};

/* A page an incremental checkpoint leaves to its parent (map entry LM_SNAP_PARENT). */
enum { PLAN_PARENT = 0xFE };

/* The parent of an incremental checkpoint, as the plan sees it: per page the class the parent
   records (LM_SNAP_UNTOUCHED / ZERO / STORED, or LM_PARENT_UNKNOWN) and, for a stored page, its
   signature; `clean` marks pages known unchanged since the parent was taken (dirty tracking). */
struct plan_parent {
    const uint8_t *cls;
    const uint64_t *sigs;
    const uint64_t *clean;   /* ceil(npages / 64) words, or NULL */
};

/* A page by its bytes: ZERO, or STORED with their signature. */
static void classify_bytes(struct lm_region *r, const char *mem, struct plan_page *e)
{
    if (is_zero(mem, r->page_size)) {
        e->cls = LM_SNAP_ZERO;
        e->sig = r->zero_sig;
    } else {
        e->cls = LM_SNAP_STORED;
        e->sig = lm_xxh3(mem, r->page_size);
    }
}

/*
 * A page whose source signature is the zero page's is zero only if its bytes are: the
 * signature comes from the file, which a damaged or hostile file (or a collision) can make
 * lie, and a page classed ZERO is never read again, so its contents would be lost. Such pages
 * are rare (a checkpoint stores a zero page as ZERO, never with a signature), so reading
 * each one costs little. A non-zero page gets the signature of its bytes.
 */
static int zero_claimed(struct lm_region *r, size_t p, const struct lm_view *v,
                        struct plan_page *e)
{
    char *buf = malloc(r->page_size);
    if (!buf)
        return lm_fail("checkpoint: out of memory", ENOMEM);
    int rc = lm_view_read(r, p, v, buf);
    if (rc == 0)
        classify_bytes(r, buf, e);
    free(buf);
    return rc;
}

/* Classify one page: its class and signature. The page is held while its record and contents
   are read (a fault, a deferral or a poisoning cannot change them meanwhile). */
static int classify(struct lm_region *r, size_t p, struct plan_page *e)
{
    struct lm_view v;
    uint8_t s = lm_view_hold(r, p, true, &v);
    const struct lm_page_meta *m = v.m;
    int rc = 0;
    memset(e, 0, sizeof(*e));
    if (s == LM_EMPTY) {
        e->cls = LM_SNAP_UNTOUCHED;
    } else if (s == LM_DEFERRED) {
        if (m->cls == LM_CLS_CANONICAL) {
            e->sig = m->signature;
            e->cls = is_zero(lm_canon_page(r, m->canon), r->page_size) ? LM_SNAP_ZERO
                                                                       : LM_SNAP_STORED;
        } else if (m->cls == LM_CLS_SNAPSHOT) {
            /* Taken from the source store, not faulted in; its signature from the source's
               signature section (lm_ckpt_plan has read it). */
            const uint64_t *sigs = atomic_load(&r->src_sigs);
            if (!sigs)
                rc = lm_fail("checkpoint: the source snapshot's signatures are not available",
                             ENODATA);
            else
                e->sig = sigs[m->aux];
            e->cls = LM_SNAP_STORED;
            if (rc == 0 && e->sig == r->zero_sig)
                rc = zero_claimed(r, p, &v, e);
        } else {
            e->cls = LM_SNAP_ZERO;
        }
        if (e->cls == LM_SNAP_ZERO)
            e->sig = r->zero_sig;
    } else if (s == LM_PRESENT && (m->flags & LM_F_SHARED) && m->cls == LM_CLS_SNAPSHOT &&
               atomic_load(&r->src_sigs)) {
        /* Maps the pool's page, unwritten (lm_meta_sync just looked): the source's signature,
           no hashing. A shared restore never publishes a zero page (zero pages are holes). */
        e->sig = atomic_load(&r->src_sigs)[m->aux];
        e->cls = LM_SNAP_STORED;
        if (e->sig == r->zero_sig)
            rc = zero_claimed(r, p, &v, e);
    } else if (s == LM_PRESENT && (m->flags & LM_F_SHARED) && m->cls == LM_CLS_CANONICAL &&
               lm_canon_signature(r, m->canon, &e->sig) == 0) {
        /* Maps its chunk's page, unwritten (lm_meta_sync just looked: a written one is DATA
           now): the canonical page's signature, no hashing. */
        e->cls = is_zero(lm_canon_page(r, m->canon), r->page_size) ? LM_SNAP_ZERO
                                                                   : LM_SNAP_STORED;
        if (e->cls == LM_SNAP_ZERO)
            e->sig = r->zero_sig;
    } else if (s == LM_PRESENT) {   /* pinned (or staged): hash what is there */
        classify_bytes(r, v.mem, e);
        if (!v.frozen)   /* the page's contents now, not the pause's */
            lm_meta_note_signature(r, p, e->sig);
    } else {   /* LM_POISONED: its contents are lost; a checkpoint must not pretend */
        rc = lm_fail("checkpoint: poisoned pages (their contents could not be served)",
                     EHWPOISON);
    }
    lm_view_unhold(r, p, &v);
    return rc;
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
            int rc = pages_equal(r, p, store_pages[idx], buf, buf + r->page_size, &eq);
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
    const struct plan_parent *parent;
    size_t lo, hi;
    int rc;
    const char *op;       /* lm_last_op() of a failure, from the thread that failed */
};

/*
 * Against a parent, a page known clean is not read at all: what the parent records is what it
 * holds (a stored page becomes PARENT, a zero or untouched one keeps its class, which costs no
 * store entry either way). Any other page is classified, and a stored page whose signature is
 * the parent's stored page's becomes PARENT too (the caller compares such pages' contents:
 * they are the only ones a hash collision could make wrong).
 */
static int classify_against(struct lm_region *r, size_t p, const struct plan_parent *par,
                            struct plan_page *e)
{
    uint8_t pc = par->cls[p];
    if (pc != LM_PARENT_UNKNOWN && par->clean && (par->clean[p / 64] >> (p % 64) & 1)) {
        memset(e, 0, sizeof(*e));
        e->cls = pc == LM_SNAP_STORED ? PLAN_PARENT : pc;
        e->sig = pc == LM_SNAP_STORED ? par->sigs[p] : pc == LM_SNAP_ZERO ? r->zero_sig : 0;
        return 0;
    }
    int rc = classify(r, p, e);
    if (rc == 0 && e->cls == LM_SNAP_STORED && pc == LM_SNAP_STORED && e->sig == par->sigs[p])
        e->cls = PLAN_PARENT;
    return rc;
}

static void *plan_part_main(void *arg)
{
    struct plan_part *a = arg;
    for (size_t p = a->lo; p < a->hi && a->rc == 0; p++)
        a->rc = a->parent ? classify_against(a->r, p, a->parent, &a->pp[p])
                          : classify(a->r, p, &a->pp[p]);
    if (a->rc < 0)
        a->op = lm_last_op();
    return NULL;
}

static int classify_all(struct lm_region *r, struct plan_page *pp,
                        const struct plan_parent *parent)
{
    size_t n = r->npages;
    struct plan_part part[2] = {{.r = r, .pp = pp, .parent = parent, .lo = 0, .hi = n / 2},
                                {.r = r, .pp = pp, .parent = parent, .lo = n / 2, .hi = n}};
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
    for (size_t p = 0; p < n; p++)   /* stored pages get their entry below */
        map[p].entry = pp[p].cls == PLAN_PARENT ? LM_SNAP_PARENT : pp[p].cls;
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

static int plan(struct lm_region *r, const uint64_t *ws, size_t nws, struct lm_snap_page *map,
                uint64_t *sigs, uint64_t *store_pages, uint64_t *nstored, int compare,
                const struct plan_parent *parent)
{
    size_t n = r->npages;
    if (n > UINT32_MAX - LM_SNAP_STORED - 1)
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
    if ((rc = classify_all(r, pp, parent)) == 0)
        rc = plan_place(r, pp, ws, nws, map, sigs, store_pages, nstored, compare != 0);
    free(pp);
    return rc;
}

int lm_ckpt_plan(struct lm_region *r, const uint64_t *ws, size_t nws,
                 struct lm_snap_page *map, uint64_t *sigs, uint64_t *store_pages,
                 uint64_t *nstored, int compare)
{
    return plan(r, ws, nws, map, sigs, store_pages, nstored, compare, NULL);
}

int lm_ckpt_plan_parent(struct lm_region *r, const uint64_t *ws, size_t nws,
                        struct lm_snap_page *map, uint64_t *sigs, uint64_t *store_pages,
                        uint64_t *nstored, int compare, const uint8_t *parent_cls,
                        const uint64_t *parent_sigs, const uint64_t *clean)
{
    if (!parent_cls || !parent_sigs)
        return lm_fail("checkpoint: a parent needs its classes and signatures", EINVAL);
    /* Checked where they enter: a class the plan does not know would become a map entry. */
    for (size_t p = 0; p < r->npages; p++)
        if (parent_cls[p] > LM_SNAP_STORED && parent_cls[p] != LM_PARENT_UNKNOWN)
            return lm_fail("checkpoint: parent page class out of range", EINVAL);
    struct plan_parent par = {parent_cls, parent_sigs, clean};
    return plan(r, ws, nws, map, sigs, store_pages, nstored, compare, &par);
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
        if (e < LM_SNAP_STORED || e == LM_SNAP_PARENT)
            continue;
        if (e - LM_SNAP_STORED >= nstored || store_pages[e - LM_SNAP_STORED] >= r->npages) {
            rc = lm_fail("checkpoint: page map and store disagree", EINVAL);
            break;
        }
        size_t owner = store_pages[e - LM_SNAP_STORED];
        if (owner == p)
            continue;
        bool eq;
        if ((rc = pages_equal(r, p, owner, buf, buf + r->page_size, &eq)) == 0 && !eq)
            rc = 1;   /* same signature, other contents */
    }
    free(buf);
    return rc;
}

/*
 * Write the contents of store_pages[0..n) to fd at offset. Present pages are written straight
 * from the region (pinned until their write is done), lazy ones are read from their source
 * (never faulted in); adjacent pages coalesce. While pages are pinned, no other page is waited
 * for: a page someone else holds ends the batch, which is written and unpinned first.
 */
int lm_ckpt_write(struct lm_region *r, int fd, uint64_t offset, const uint64_t *store_pages,
                  size_t n)
{
    enum { IOV = 1024,     /* IOV_MAX: fewer, larger writes */
           BATCH = 4096 }; /* pages per write (adjacent ones coalesce into one iovec) */
    struct iovec iov[IOV];
    size_t *pinned = malloc(BATCH * sizeof(size_t));
    uint8_t *pin_held = malloc(BATCH);
    char *bufs = malloc((size_t)IOV * r->page_size);
    int rc = 0;
    if (!bufs || !pinned || !pin_held)
        rc = lm_fail("malloc(checkpoint buffer)", ENOMEM);
    size_t ps = r->page_size;
    if (rc == 0 && __builtin_mul_overflow(n, ps, &(size_t){0}))
        rc = lm_fail("checkpoint: store larger than the address space", EINVAL);
    for (size_t i = 0; i < n && rc == 0;) {
        int k = 0;
        size_t bytes = 0, start = i, npinned = 0;
        while (i < n && k < IOV && i - start < BATCH) {
            size_t p = store_pages[i];
            if (p >= r->npages) {
                rc = lm_fail("checkpoint: store page outside the region", ERANGE);
                break;
            }
            struct lm_view v;
            if (lm_view_hold(r, p, npinned == 0, &v) == LM_BUSY)
                break;   /* held elsewhere: write what we have first */
            const char *src;
            if (v.s == LM_PRESENT) {
                pin_held[npinned] = v.held;
                pinned[npinned++] = p;
                src = v.mem;
            } else {
                rc = lm_view_read(r, p, &v, bufs + (size_t)k * ps);
                lm_view_unhold(r, p, &v);
                if (rc < 0)
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
        off_t off = (off_t)(offset + start * ps);
        size_t written = 0;
        int first = 0;
        while (rc == 0 && written < bytes) {
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
        for (size_t q = 0; q < npinned; q++)
            lm_unhold(r, pinned[q], pin_held[q]);
        if (rc == 0)
            lm_freeze_count_written(r, i - start);
    }
    free(bufs);
    free(pinned);
    free(pin_held);
    return rc;
}

/*
 * Checkpoint, step 2 for a compressed store (snapshot format version 3): the pages are copied
 * out in batches (each held only while it is copied, as lm_page_read does), each batch is
 * compressed page by page on every CPU we may run on (lm_pack_pages), and its entries are
 * written one after the other from `offset`. The compression runs with the pages given back:
 * a page is never held for longer than a copy.
 */
int lm_ckpt_write_packed(struct lm_region *r, int fd, uint64_t offset,
                         const uint64_t *store_pages, size_t n, int codec, int level,
                         uint32_t *index, uint64_t *written)
{
    enum { BATCH = 2048 };   /* pages per compression batch: 8 MiB of 4 KiB pages */
    size_t ps = r->page_size;
    char *in = malloc((size_t)BATCH * ps), *out = malloc((size_t)BATCH * ps);
    int rc = 0;
    uint64_t total = 0;
    if (!in || !out)
        rc = lm_fail("malloc(checkpoint compression buffers)", ENOMEM);
    for (size_t i = 0; i < n && rc == 0;) {
        size_t k = n - i < BATCH ? n - i : BATCH;
        for (size_t j = 0; j < k && rc == 0; j++) {
            size_t p = store_pages[i + j];
            if (p >= r->npages) {
                rc = lm_fail("checkpoint: store page outside the region", ERANGE);
                break;
            }
            struct lm_view v;
            lm_view_hold(r, p, true, &v);
            rc = lm_view_read(r, p, &v, in + j * ps);
            lm_view_unhold(r, p, &v);
        }
        uint64_t bytes = 0;
        if (rc == 0)
            rc = lm_pack_pages(in, k, ps, codec, level, 0, out, index + i, &bytes);
        for (uint64_t done = 0; rc == 0 && done < bytes;) {
            ssize_t w = pwrite(fd, out + done, bytes - done, (off_t)(offset + total + done));
            if (w < 0 && errno == EINTR)
                continue;
            if (w <= 0) {
                rc = w < 0 ? LM_FAIL("pwrite(snapshot)") : lm_fail("pwrite(snapshot): no "
                                                                   "progress", EIO);
                break;
            }
            done += (uint64_t)w;
        }
        total += bytes;
        i += k;
        if (rc == 0)
            lm_freeze_count_written(r, k);
    }
    free(in);
    free(out);
    *written = total;
    return rc;
}
