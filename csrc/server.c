/*
 * server.c: serving another process's userfaultfd (the page server's native path).
 *
 * A client (a VMM such as Firecracker, or a pylazymem Region) creates a userfaultfd, registers
 * its memory and passes the fd to us with a description of the ranges. One native thread per
 * client then reads its fault messages and fills the pages from a source file: a raw memory
 * file (the range's bytes at `offset`), or a snapshot's store through a per-page table. The
 * faulting process is another process, so nothing here could deadlock on its GIL; the thread
 * is native anyway so that the server's own Python code never delays a fault.
 *
 * Non-cooperative events: while a REMOVE/UNMAP/REMAP event is unread, the kernel refuses fills
 * with EAGAIN. The thread that gets EAGAIN is the one that must read the event, so a fill
 * never spins on EAGAIN: it returns, the pending messages are read and handled, and the fill
 * is retried.
 *
 * A sharing client (docs/shared-pages.md 5.3) mapped the server's pool over its memory,
 * MAP_PRIVATE, registered MISSING | MINOR: a minor fault (the pool holds the page) is served with
 * UFFDIO_CONTINUE on the client's uffd, which maps the pool's page into the client (the ioctls
 * act on the mm the uffd belongs to); a missing fault on a source page first publishes the
 * page into the pool through the server's own view, then continues it. The server is the
 * pool's only filler.
 *
 * Otherwise only MISSING faults are served. A write-protect or minor fault cannot be resolved by a copy
 * (the page is there: UFFDIO_COPY says EEXIST, the thread is woken, faults again, forever), so
 * it ends the serving loudly. Whenever the thread ends from an error it does not leave the
 * client waiting: it poisons the client's missing pages (or, for a client that watches the
 * server, shuts the connection so that the client takes over) and records the error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "lm_internal.h"

#define SRV_READ 64        /* messages per read() */
#define SRV_QUEUE_MIN 256
#define SPIN_NS 100000     /* look for the next fault this long before sleeping */
#define SRV_MAX_MAPS 64

/* A snapshot's page table, shared by the clients of one server (lazymem.h). A layered table
   (a compressed store, a chain of files) also says per page which file (layer, an index into
   fds, which the table owns) and which entry word (length and codec, codec.c); its pages are
   read by table_read(). A plain one's pages are page_size bytes of the client's src_fd. */
struct lm_srv_table {
    _Atomic uint64_t refs;
    uint64_t len;
    uint32_t *codes;    /* NULL: plain */
    uint8_t *layer;
    uint64_t *sigs;     /* checked after decoding a compressed entry */
    int *fds;
    int nfds;
    int64_t entries[];
};

static _Atomic uint64_t table_bytes_live;

/* A server's pool (lazymem.h): the memfd, the server's view of it and the uffd that view is
   registered on (only ever an ioctl target: nothing reads its messages, since a CPU access to
   a PROT_NONE view is SIGSEGV before it could fault to us). */
struct lm_srv_pool {
    _Atomic uint64_t refs;
    int fd, uffd;
    char *view;
    uint64_t npages, ps;
    _Atomic uint64_t published;
    _Atomic uint64_t unzapped;   /* pages published since the view's entries were dropped */
    _Atomic int complete;        /* every non-zero page of the table is in the pool */
};

#define POOL_ZAP_PAGES 512u

struct srv_map {
    uint64_t base, size, offset;
    uint64_t *removed;   /* one bit per page: removed by the client, faults back as zeros */
    uint64_t *dead;      /* one bit per page: no longer this map's page (an mremap moved
                            other memory there, or moved part of the map away): poisoned */
};

struct lm_srv {
    int uffd, pidfd, stop_fd, src_fd;
    uint64_t ps;
    int shift;
    struct srv_map maps[SRV_MAX_MAPS];
    int nmaps;
    struct lm_srv_table *table;   /* snapshot mode: file offset per source page, -1 = zero */
    struct lm_srv_pool *pool;     /* a sharing client: the pool it maps (NULL: none) */
    unsigned flags;
    uint32_t max_cluster;
    char *scratch;
    pthread_t tid;
    bool started;

    /* Fault messages read but not yet served: a ring that grows. It must never stop us from
       reading: while a REMOVE is unread every fill fails with EAGAIN and the client's madvise
       waits for us, and fault messages are not bounded by pages (each faulting thread queues
       one, and again when it retries). */
    struct uffd_msg *queue;
    size_t qcap, qhead, qlen;
    _Atomic uint64_t test_queue_cap;   /* test hook: growth past this fails (0: none) */
    _Atomic uint64_t test_fail_after;  /* test hook: fail with EIO after this many faults */

    /* Adaptive readahead: one sequential stream per client. */
    uint64_t next_addr;
    uint32_t cluster;
    uint64_t last_served_ns;

    int fatal;           /* an error found while reading events: the thread must stop */
    _Atomic int running;
    _Atomic uint64_t st_faults, st_zero, st_copied, st_removed_faults, st_remove, st_unmap,
        st_remap, st_errors, st_ns_total, st_ns_max, st_poisoned, st_unsupported,
        st_redelivered, st_published, st_shared_mapped, st_pool_fallback;
    _Atomic int st_last_error, st_died;
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void srv_error(struct lm_srv *s, int rc)
{
    atomic_fetch_add_explicit(&s->st_errors, 1, memory_order_relaxed);
    atomic_store_explicit(&s->st_last_error, rc, memory_order_relaxed);
}

static bool bit(const uint64_t *bits, uint64_t page)
{
    return bits && (bits[page / 64] >> (page % 64) & 1);
}

static bool removed(const struct srv_map *m, uint64_t page)
{
    return bit(m->removed, page);
}

static bool dead(const struct srv_map *m, uint64_t page)
{
    return bit(m->dead, page);
}

/* The map that serves `addr`: a map's dead pages are not its own (after a whole map moved
   over part of another, the moved one is found there). NULL: none, the fault is poisoned. */
static struct srv_map *find_map(struct lm_srv *s, uint64_t addr)
{
    for (int i = 0; i < s->nmaps; i++) {
        struct srv_map *m = &s->maps[i];
        if (addr >= m->base && addr - m->base < m->size && !dead(m, (addr - m->base) >> s->shift))
            return m;
    }
    return NULL;
}

/* Set (or clear) the bits of [start, end) of the client's address space in one bitmap of
   every map it overlaps but `skip`: the dead pages' (dead_bits) or the removed pages'. */
static void mark(struct lm_srv *s, uint64_t start, uint64_t end, bool dead_bits, bool set,
                 const struct srv_map *skip)
{
    for (int i = 0; i < s->nmaps; i++) {
        struct srv_map *m = &s->maps[i];
        uint64_t lo = start > m->base ? start : m->base;
        uint64_t hi = end - m->base < m->size ? end : m->base + m->size;
        if (m == skip || end <= m->base || lo >= hi)
            continue;
        uint64_t **bits = dead_bits ? &m->dead : &m->removed;
        if (!*bits && !set)
            continue;
        uint64_t npages = m->size >> s->shift;
        if (!*bits && !(*bits = calloc((npages + 63) / 64, 8))) {
            /* Without the bitmap those pages would be served from the source again, where
               the client expects zeros or another range's bytes: stop serving instead
               (srv_main sees `fatal`; the client's missing pages are poisoned). */
            s->fatal = -ENOMEM;
            continue;
        }
        for (uint64_t p = (lo - m->base) >> s->shift; p < (hi - m->base + s->ps - 1) >> s->shift;
             p++) {
            if (set)
                (*bits)[p / 64] |= (uint64_t)1 << (p % 64);
            else
                (*bits)[p / 64] &= ~((uint64_t)1 << (p % 64));
        }
    }
}

/* Mark [start, end) removed in every map it overlaps: faults there get zeros, the kernel's
   semantics of a dropped anonymous page, also where an mremap had left pages dead. */
static void mark_removed(struct lm_srv *s, uint64_t start, uint64_t end)
{
    mark(s, start, end, false, true, NULL);
    mark(s, start, end, true, false, NULL);
}

/* A client may move a registered range with mremap(). Whatever was at the destination is
   gone (mremap replaced it): its pages are dead in every map but the one moved there, so a
   fault there is never served with another range's bytes. A whole map moved is followed
   (it now lies at `to`); a partial move is not: the part moved away is dead in its map too,
   and faults on the moved pages are poisoned (loudly), never served wrongly. */
static void remap(struct lm_srv *s, uint64_t from, uint64_t to, uint64_t len)
{
    struct srv_map *m = find_map(s, from);
    bool whole = m && m->base == from && m->size == len;
    if (whole) {
        m->base = to;   /* its removed and dead pages move with it */
    } else {
        srv_error(s, -ENOTSUP);
        mark(s, from, from + len, true, true, NULL);
    }
    mark(s, to, to + len, true, true, whole ? m : NULL);
}

/* Poison every page of the client's maps still missing in a forked child, through the
   child's uffd `ufd` (as refused clients are poisoned), before it is closed: the poison
   markers outlive the registration, so the child's access fails with SIGBUS instead of
   reading zeros. Present pages (copied at fork) are stepped over (EEXIST). The child may run
   already: an event of its own (a REMOVE) makes POISON fail with EAGAIN until it is read;
   its messages are read and dropped (a fault's thread is woken by the poisoning of its page,
   or by the close), a grandchild's uffd poisoned the same way. Bounded: best effort. */
static void poison_child(struct lm_srv *s, int ufd, int depth)
{
    int fl = fcntl(ufd, F_GETFL);
    if (fl < 0 || fcntl(ufd, F_SETFL, fl | O_NONBLOCK) < 0)
        return;   /* reading it below must never block the serving thread */
    for (int i = 0; i < s->nmaps; i++) {
        uint64_t a = s->maps[i].base, end = a + s->maps[i].size;
        for (int tries = 0; a < end && tries < 1000;) {
            struct uffdio_poison p = {.range = {.start = a, .len = end - a}};
            if (ioctl(ufd, UFFDIO_POISON, &p) == 0)
                break;
            int err = errno;
            if (p.updated > 0)
                a += (uint64_t)p.updated;
            if (err == EEXIST) {
                a += s->ps;
                continue;
            }
            if (err != EAGAIN)
                break;   /* ENOENT: not mapped in the child; ESRCH: the child is gone */
            tries++;
            struct uffd_msg buf[SRV_READ];
            ssize_t got = read(ufd, buf, sizeof(buf));
            for (ssize_t k = 0; k < got / (ssize_t)sizeof(buf[0]); k++) {
                if (buf[k].event != UFFD_EVENT_FORK)
                    continue;
                if (depth < 4)
                    poison_child(s, (int)buf[k].arg.fork.ufd, depth + 1);
                close((int)buf[k].arg.fork.ufd);
            }
            if (got <= 0)
                sched_yield();   /* its event is read; its madvise has not finished yet */
        }
    }
}

static void handle_event(struct lm_srv *s, const struct uffd_msg *msg)
{
    switch (msg->event) {
    case UFFD_EVENT_REMOVE:
        atomic_fetch_add_explicit(&s->st_remove, 1, memory_order_relaxed);
        mark_removed(s, msg->arg.remove.start, msg->arg.remove.end);
        break;
    case UFFD_EVENT_UNMAP:
        /* No fault can come from an unmapped range; a later mapping at the same address is
           not registered with this uffd, so marking it removed is only bookkeeping. */
        atomic_fetch_add_explicit(&s->st_unmap, 1, memory_order_relaxed);
        mark_removed(s, msg->arg.remove.start, msg->arg.remove.end);
        break;
    case UFFD_EVENT_REMAP:
        atomic_fetch_add_explicit(&s->st_remap, 1, memory_order_relaxed);
        remap(s, msg->arg.remap.from, msg->arg.remap.to, msg->arg.remap.len);
        break;
    case UFFD_EVENT_FORK:
        /* The kernel installed a uffd for the child in our process. Forked children are not
           served; closing it alone would leave the child's registered ranges plain memory,
           its missing pages read as zeros. Poisoned first: the child fails loudly there. */
        poison_child(s, (int)msg->arg.fork.ufd, 0);
        close((int)msg->arg.fork.ufd);
        srv_error(s, -ENOTSUP);
        break;
    default:
        break;
    }
}

static int push(struct lm_srv *s, const struct uffd_msg *msg)
{
    uint64_t test_cap = atomic_load_explicit(&s->test_queue_cap, memory_order_relaxed);
    if (test_cap && s->qlen >= test_cap)
        return -ENOMEM;   /* the test hook: as if the queue could not grow */
    if (s->qlen == s->qcap) {
        size_t cap = s->qcap ? s->qcap * 2 : SRV_QUEUE_MIN;
        struct uffd_msg *q = malloc(cap * sizeof(*q));
        if (!q)
            return -ENOMEM;
        for (size_t i = 0; i < s->qlen; i++)   /* unwrap the ring into the new array */
            q[i] = s->queue[(s->qhead + i) % s->qcap];
        free(s->queue);
        s->queue = q;
        s->qcap = cap;
        s->qhead = 0;
    }
    s->queue[(s->qhead + s->qlen++) % s->qcap] = *msg;
    return 0;
}

/* A fault message we cannot keep (the queue cannot grow): the kernel delivers a message
   once, so dropping it would leave its thread waiting forever. Wake the thread instead: it
   retries its access, faults again and the kernel queues a new message for the same fault,
   which we read once the queue has room. */
static void redeliver(struct lm_srv *s, const struct uffd_msg *msg)
{
    atomic_fetch_add_explicit(&s->st_redelivered, 1, memory_order_relaxed);
    struct uffdio_range r = {.start = msg->arg.pagefault.address & ~(s->ps - 1), .len = s->ps};
    if (ioctl(s->uffd, UFFDIO_WAKE, &r) < 0 && errno != ENOENT && errno != ESRCH)
        srv_error(s, -errno);
}

/* Read everything the uffd holds now (never blocks); events are handled at once, faults
   queued. Returns the number of messages read, or -errno for a dead uffd. When the queue
   cannot take a fault, that fault is redelivered and reading stops after this batch (its
   events handled): reading on would only read the retried fault again before the queue
   drains; the caller serves the queue and reads again. */
static int drain(struct lm_srv *s)
{
    int total = 0;
    bool full = false;
    while (!full) {
        struct uffd_msg buf[SRV_READ];
        ssize_t got = read(s->uffd, buf, sizeof(buf));
        if (got < 0)
            return errno == EAGAIN || errno == EINTR ? total : -errno;
        for (size_t i = 0; i < (size_t)got / sizeof(buf[0]); i++, total++) {
            if (buf[i].event != UFFD_EVENT_PAGEFAULT)
                handle_event(s, &buf[i]);
            else if (push(s, &buf[i]) < 0) {
                redeliver(s, &buf[i]);
                full = true;
            }
        }
    }
    return total;
}

/* Where the source page at byte `o` of the source comes from: file offset, or -1 (zero), or
   -2 (outside the source: cannot be served). */
static int64_t source_of(struct lm_srv *s, uint64_t o)
{
    if (!s->table)
        return (int64_t)o;
    uint64_t i = o >> s->shift;
    return i < s->table->len ? s->table->entries[i] : -2;
}

static bool layered(const struct lm_srv_table *t)
{
    return t && t->codes;
}

static int pread_full(int fd, char *buf, size_t len, int64_t off)
{
    ssize_t got = pread(fd, buf, len, off);
    if (got == (ssize_t)len)
        return 0;
    return got < 0 ? -errno : -ENODATA;   /* past the end of the file */
}

/*
 * Source pages [i, i + n) of a layered table, every one stored (entries >= 0), into buf:
 * raw entries that follow one another in one file are read together; a compressed entry is
 * read into tmp (page_size bytes), decoded (lm_unpack_entry: lengths and codec checked,
 * exactly one page) and checked against its signature. -EBADMSG for an entry that does not
 * decode to its page (a damaged or hostile file): the caller poisons, never serves it.
 */
static int table_read(const struct lm_srv_table *t, uint64_t ps, uint64_t i, uint64_t n,
                      char *buf, char *tmp)
{
    for (uint64_t a = 0; a < n;) {
        uint64_t p = i + a;
        int64_t off = t->entries[p];
        int fd = t->fds[t->layer[p]];
        uint32_t code = t->codes[p];
        int rc;
        if (LM_ENTRY_CODEC(code) == LM_CODEC_RAW) {
            uint64_t b = a + 1;
            while (b < n && t->layer[i + b] == t->layer[p] &&
                   LM_ENTRY_CODEC(t->codes[i + b]) == LM_CODEC_RAW &&
                   t->entries[i + b] == off + (int64_t)((b - a) * ps))
                b++;
            if ((rc = pread_full(fd, buf + a * ps, (b - a) * ps, off)) < 0)
                return rc;
            a = b;
            continue;
        }
        uint32_t len = LM_ENTRY_LEN(code);
        if ((rc = pread_full(fd, tmp, len, off)) < 0)
            return rc;
        if (lm_unpack_entry(tmp, len, code, ps, buf + a * ps) < 0 ||
            (t->sigs && lm_xxh3(buf + a * ps, ps) != t->sigs[p]))
            return -EBADMSG;
        a++;
    }
    return 0;
}

static void poison(struct lm_srv *s, uint64_t addr, int rc)
{
    srv_error(s, rc);
    atomic_fetch_add_explicit(&s->st_poisoned, 1, memory_order_relaxed);
    struct uffdio_poison p = {.range = {.start = addr, .len = s->ps}};
    if (ioctl(s->uffd, UFFDIO_POISON, &p) < 0 && errno != EEXIST) {
        /* Without UFFDIO_POISON (kernel < 6.6) the faulter cannot be failed from here;
           the error count says why it waits. */
    }
}

/* ---- the pool (docs/shared-pages.md 5.3) ------------------------------------------------ */

/* The view holds an (inaccessible) page-table entry per published page, counted in the
   server's Rss: drop them every 2 MiB of publications. The pool's page cache keeps the pages. */
static void pool_published(struct lm_srv_pool *p, uint64_t n)
{
    atomic_fetch_add_explicit(&p->published, n, memory_order_relaxed);
    if (atomic_fetch_add_explicit(&p->unzapped, n, memory_order_relaxed) + n >= POOL_ZAP_PAGES &&
        atomic_exchange_explicit(&p->unzapped, 0, memory_order_relaxed) >= POOL_ZAP_PAGES)
        madvise(p->view, p->npages * p->ps, MADV_DONTNEED);
}

/* Publish n pages from buf at pool page `first`: UFFDIO_COPY into the view, the one atomic
   way (a page becomes visible complete or not at all; never pwrite, never fallocate). Pages
   already there (EEXIST: published by another client's thread) are stepped over. */
static int pool_publish(struct lm_srv_pool *p, uint64_t first, uint64_t n, const char *buf,
                        uint64_t *published, uint64_t *fresh_out)
{
    size_t done = 0, fresh = 0;
    int rc = lm_uffd_copy_counted(p->uffd, p->view + first * p->ps, buf, n * p->ps, &done,
                                  &fresh);
    /* *published: pages now in the pool from here (the caller continues them); the pool's
       count only those this call put there: two clients' threads may race on one page. */
    *published = done / p->ps;
    if (fresh_out)
        *fresh_out = fresh / p->ps;
    if (fresh)
        pool_published(p, fresh / p->ps);
    return rc;
}

/* Which of pool pages [first, first + n) the pool holds (vec[i] & 1): its page cache is the
   only record of what is filled. */
static int pool_holes(struct lm_srv_pool *p, uint64_t first, uint64_t n, unsigned char *vec)
{
    if (mincore(p->view + first * p->ps, n * p->ps, vec) < 0)
        return LM_FAIL("mincore(pool view)");
    return 0;
}

int lm_srv_pool_new(uint64_t npages, uint64_t page_size, int acquire, struct lm_srv_pool **out)
{
    if (!out)
        return lm_fail("page server pool: out is NULL", EINVAL);
    *out = NULL;
    if (!page_size || page_size != (uint64_t)lm_page_size())
        return lm_fail("page server pool: page_size differs from this machine's", EINVAL);
    if (!npages || npages > LM_SNAP_MAX_PAGES)
        return lm_fail("page server pool: 1 to 2**40 pages", EINVAL);
    struct lm_srv_pool *p = calloc(1, sizeof(*p));
    if (!p)
        return lm_fail("calloc(pool)", ENOMEM);
    atomic_init(&p->refs, 1);
    p->fd = p->uffd = -1;
    p->view = MAP_FAILED;
    p->npages = npages;
    p->ps = page_size;
    uint64_t len = npages * page_size;
    struct lm_features why = {0};
    int mode, source, rc;
    uint64_t features, ioctls;
    /* One page more than the snapshot: the header page of the pool layout (2.2), left a hole
       here (this pool is never found by discovery, only handed out by the server). */
    if ((p->fd = memfd_create("pylazymem-pool", MFD_CLOEXEC | MFD_ALLOW_SEALING)) < 0) {
        rc = LM_FAIL("memfd_create(pylazymem-pool)");
        goto fail;
    }
    if (ftruncate(p->fd, (off_t)(len + page_size)) < 0) {
        rc = LM_FAIL("ftruncate(pool)");
        goto fail;
    }
    /* Nobody may ever truncate it under its users' mappings (SIGBUS in every client). */
    if (fcntl(p->fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) < 0) {
        rc = LM_FAIL("fcntl(pool, F_ADD_SEALS, SHRINK | GROW)");
        goto fail;
    }
    if ((p->uffd = lm_uffd_open(acquire, &mode, &source, &why)) < 0) {
        rc = p->uffd;
        goto fail;
    }
    if ((rc = lm_uffd_api(p->uffd, 0, &features, &ioctls)) < 0)
        goto fail;
    p->view = mmap(NULL, len, PROT_NONE, MAP_SHARED | MAP_NORESERVE, p->fd, 0);
    if (p->view == MAP_FAILED) {
        rc = LM_FAIL("mmap(pool view)");
        goto fail;
    }
    madvise(p->view, len, MADV_DONTFORK);
    if ((rc = lm_uffd_register(p->uffd, p->view, len, UFFDIO_REGISTER_MODE_MISSING)) < 0)
        goto fail;
    /* Only now: from here on no write(), no new writable shared mapping and no new MISSING
       registration of a view, by anyone holding the fd; our registered view keeps
       publishing into holes with UFFDIO_COPY (measured, exp1 G; tests/test_server_share.py). */
    if (fcntl(p->fd, F_ADD_SEALS, F_SEAL_FUTURE_WRITE) < 0) {
        rc = LM_FAIL("fcntl(pool, F_ADD_SEALS, FUTURE_WRITE)");
        goto fail;
    }
    *out = p;
    return 0;
fail:
    lm_srv_pool_release(p);
    return rc;
}

void lm_srv_pool_release(struct lm_srv_pool *p)
{
    if (!p || atomic_fetch_sub(&p->refs, 1) != 1)
        return;
    if (p->view != MAP_FAILED)
        munmap(p->view, p->npages * p->ps);
    if (p->uffd >= 0)
        close(p->uffd);
    if (p->fd >= 0)
        close(p->fd);   /* the pool lives on while clients map it */
    free(p);
}

int lm_srv_pool_fd(struct lm_srv_pool *p)
{
    return p ? p->fd : -1;
}

uint64_t lm_srv_pool_bytes(struct lm_srv_pool *p)
{
    struct stat st;
    if (!p || fstat(p->fd, &st) < 0)
        return 0;
    return (uint64_t)st.st_blocks * 512;
}

uint64_t lm_srv_pool_published(struct lm_srv_pool *p)
{
    return p ? atomic_load(&p->published) : 0;
}

static int pool_check_table(struct lm_srv_pool *p, struct lm_srv_table *t)
{
    if (!p || !t)
        return lm_fail("page server pool: pool and table needed", EINVAL);
    if (t->len > p->npages)
        return lm_fail("page server pool: the table has more pages than the pool", EINVAL);
    return 0;
}

int lm_srv_pool_complete(struct lm_srv_pool *p, struct lm_srv_table *t)
{
    int rc = pool_check_table(p, t);
    if (rc < 0)
        return rc;
    if (atomic_load(&p->complete))
        return 1;   /* pages never leave the pool (sealed, never punched) */
    enum { CHUNK = 4096 };
    unsigned char vec[CHUNK];
    for (uint64_t i = 0; i < t->len; i += CHUNK) {
        uint64_t n = t->len - i < CHUNK ? t->len - i : CHUNK;
        if ((rc = pool_holes(p, i, n, vec)) < 0)
            return rc;
        for (uint64_t q = 0; q < n; q++)
            if (t->entries[i + q] >= 0 && !(vec[q] & 1))
                return 0;
    }
    atomic_store(&p->complete, 1);
    return 1;
}

int lm_srv_pool_fill(struct lm_srv_pool *p, struct lm_srv_table *t, int src_fd,
                     uint64_t *published)
{
    int rc = pool_check_table(p, t);
    if (published)
        *published = 0;
    if (rc < 0)
        return rc;
    enum { CHUNK = 512 };   /* 2 MiB of 4 KiB pages per read and copy */
    unsigned char vec[CHUNK];
    char *buf = malloc((CHUNK + 1) * p->ps);   /* and a page for a compressed entry */
    if (!buf)
        return lm_fail("malloc(pool fill)", ENOMEM);
    for (uint64_t i = 0; i < t->len && rc == 0; i += CHUNK) {
        uint64_t n = t->len - i < CHUNK ? t->len - i : CHUNK;
        if ((rc = pool_holes(p, i, n, vec)) < 0)
            break;
        /* runs of holes with consecutive file offsets: one pread and one copy each */
        for (uint64_t a = 0; a < n && rc == 0;) {
            int64_t src = t->entries[i + a];
            if (src < 0 || (vec[a] & 1)) {
                a++;
                continue;
            }
            uint64_t b = a + 1;
            if (layered(t)) {   /* any stored pages: table_read takes them as they come */
                while (b < n && !(vec[b] & 1) && t->entries[i + b] >= 0)
                    b++;
                if ((rc = table_read(t, p->ps, i + a, b - a, buf, buf + CHUNK * p->ps)) < 0) {
                    rc = lm_fail(rc == -EBADMSG ? "pool fill: a store entry does not decode "
                                                  "to its page (damaged snapshot)"
                                                : "pread(snapshot)", -rc);
                    break;
                }
            } else {
                while (b < n && !(vec[b] & 1) &&
                       t->entries[i + b] == src + (int64_t)((b - a) * p->ps))
                    b++;
                ssize_t got = pread(src_fd, buf, (b - a) * p->ps, src);
                if (got != (ssize_t)((b - a) * p->ps)) {
                    rc = got < 0 ? LM_FAIL("pread(snapshot)")
                                 : lm_fail("pread(snapshot): past the end of the file", ENODATA);
                    break;
                }
            }
            uint64_t pub = 0, fresh = 0;
            rc = pool_publish(p, i + a, b - a, buf, &pub, &fresh);
            if (published)
                *published += fresh;
            a = b;
        }
    }
    free(buf);
    if (rc == 0 && p->npages)
        madvise(p->view, p->npages * p->ps, MADV_DONTNEED);   /* the view's entries, not the pool */
    return rc;
}

/* UFFDIO_CONTINUE of [addr, addr + len) on the client's uffd, waking the faulter. A page the
   client has mapped already (EEXIST) is stepped over. The kernel stops at a hole of the pool
   with EAGAIN after mapping what precedes it, and the retry at the hole says EFAULT, which is
   returned; EAGAIN with nothing mapped means an event is pending: returned for the caller to
   read it (a client whose events we must read never blocks on our spinning). */
static int client_continue(struct lm_srv *s, uint64_t addr, uint64_t len, uint64_t *mapped)
{
    uint64_t done = 0, nskipped = 0;
    bool skipped = false;
    int rc = 0;
    while (done < len) {
        struct uffdio_continue c = {.range = {.start = addr + done, .len = len - done}};
        if (ioctl(s->uffd, UFFDIO_CONTINUE, &c) == 0) {
            done = len;
            break;
        }
        int err = errno;
        if (c.mapped > 0)
            done += (uint64_t)c.mapped;
        if (err == EEXIST) {
            done += s->ps;
            nskipped++;
            skipped = true;
        } else if (err != EAGAIN || c.mapped <= 0) {
            rc = -err;
            break;
        }
    }
    /* mapped here now: pages the client had already (a refault raced with us) not counted */
    *mapped = (done > len ? len : done) - nskipped * s->ps;
    if (skipped && rc == 0) {
        struct uffdio_range r = {.start = addr, .len = len};
        if (ioctl(s->uffd, UFFDIO_WAKE, &r) < 0 && errno != ENOENT && errno != ESRCH)
            rc = -errno;
    }
    return rc;
}

/* A sharing client's run of n source pages at `addr` (consecutive in the file from `src`):
   publish the ones the pool lacks, and map the run from the pool, segment by segment (a page
   served by a private copy because publishing failed is never CONTINUE'd: over a pool hole
   CONTINUE is EFAULT whatever the client has mapped). Returns 0, -EAGAIN (an event first) or
   -errno. */
static int serve_shared(struct lm_srv *s, uint64_t addr, uint64_t pool_page, int64_t src,
                        uint64_t n)
{
    struct lm_srv_pool *p = s->pool;
    unsigned char vec[LM_MAX_CLUSTER];
    int rc = pool_holes(p, pool_page, n, vec);
    for (uint64_t a = 0; a < n && rc == 0;) {
        bool in_pool = vec[a] & 1;
        uint64_t b = a + 1;
        while (b < n && (bool)(vec[b] & 1) == in_pool)
            b++;
        uint64_t len = (b - a) * s->ps, pub = b - a, at = addr + a * s->ps;
        int prc = 0;
        if (!in_pool) {
            if (layered(s->table)) {
                int trc = table_read(s->table, s->ps, pool_page + a, b - a, s->scratch,
                                     s->scratch + (size_t)s->max_cluster * s->ps);
                if (trc < 0)
                    return trc;
            } else {
                ssize_t got = pread(s->src_fd, s->scratch, len, src + (int64_t)(a * s->ps));
                if (got != (ssize_t)len)
                    return got < 0 ? -errno : -ENODATA;
            }
            uint64_t fresh = 0;
            prc = pool_publish(p, pool_page + a, b - a, s->scratch, &pub, &fresh);
            atomic_fetch_add_explicit(&s->st_published, fresh, memory_order_relaxed);
        }
        if (pub) {
            uint64_t mapped = 0;
            rc = client_continue(s, at, pub * s->ps, &mapped);
            atomic_fetch_add_explicit(&s->st_shared_mapped, mapped / s->ps,
                                      memory_order_relaxed);
        }
        if (rc == 0 && (prc == -ENOMEM || prc == -ENOSPC)) {
            /* Out of memory for the pool (a memcg limit): the rest of the segment by a
               private copy into the client; sharing is lost, data is not. */
            rc = lm_uffd_fill_or_eagain(s->uffd, (void *)(uintptr_t)(at + pub * s->ps),
                                        s->scratch + pub * s->ps, len - pub * s->ps);
            if (rc == 0)
                atomic_fetch_add_explicit(&s->st_pool_fallback, b - a - pub,
                                          memory_order_relaxed);
        } else if (rc == 0 && prc < 0) {
            rc = prc;
        }
        a = b;
    }
    return rc;
}

/*
 * Serve one fault: the faulting page plus, for a sequential stream, following pages of the
 * same kind (zero, or consecutive in the file) inside the same map and not removed.
 * Returns 0, or -EAGAIN when events must be read first.
 */
static int serve(struct lm_srv *s, uint64_t addr)
{
    struct srv_map *m = find_map(s, addr);
    if (!m) {
        poison(s, addr, -EFAULT);   /* not a range we were given: never leave it waiting */
        return 0;
    }
    uint64_t page = (addr - m->base) >> s->shift;
    if (removed(m, page)) {
        int rc = lm_uffd_fill_or_eagain(s->uffd, (void *)(uintptr_t)addr, NULL, s->ps);
        if (rc == 0)
            atomic_fetch_add_explicit(&s->st_removed_faults, 1, memory_order_relaxed);
        return rc;
    }
    int64_t src = source_of(s, m->offset + (addr - m->base));
    if (src == -2) {
        poison(s, addr, -ERANGE);
        return 0;
    }
    uint32_t want = 1;
    if (addr == s->next_addr)
        want = s->cluster * 2 < s->max_cluster ? s->cluster * 2 : s->max_cluster;
    uint64_t n = 1;
    uint64_t left = (m->size >> s->shift) - page;
    bool lay = layered(s->table);
    while (n < want && n < left && !removed(m, page + n) && !dead(m, page + n)) {
        int64_t nx = source_of(s, m->offset + (addr - m->base) + n * s->ps);
        /* a layered table's stored pages need not follow one another (table_read) */
        if (src == -1 ? nx != -1 : lay ? nx < 0 : nx != src + (int64_t)(n * s->ps))
            break;
        n++;
    }
    int rc;
    if (src == -1) {
        rc = lm_uffd_fill_or_eagain(s->uffd, (void *)(uintptr_t)addr, NULL, n * s->ps);
        if (rc == 0)
            atomic_fetch_add_explicit(&s->st_zero, n, memory_order_relaxed);
    } else if (s->pool) {
        /* -ENODATA: past the end of the file; -EFAULT: the pool lost a published page
           (impossible while it is sealed against shrinking): poisoned below, loudly */
        rc = serve_shared(s, addr, (m->offset + (addr - m->base)) >> s->shift, src, n);
    } else if (lay) {
        rc = table_read(s->table, s->ps, (m->offset + (addr - m->base)) >> s->shift, n,
                        s->scratch, s->scratch + (size_t)s->max_cluster * s->ps);
        if (rc == 0)
            rc = lm_uffd_fill_or_eagain(s->uffd, (void *)(uintptr_t)addr, s->scratch,
                                        n * s->ps);
        if (rc == 0)
            atomic_fetch_add_explicit(&s->st_copied, n, memory_order_relaxed);
    } else {
        ssize_t got = pread(s->src_fd, s->scratch, n * s->ps, src);
        if (got < (ssize_t)s->ps) {
            poison(s, addr, got < 0 ? -errno : -ENODATA);   /* past the end of the file */
            return 0;
        }
        n = (uint64_t)got >> s->shift;   /* a short read: serve what is there */
        rc = lm_uffd_fill_or_eagain(s->uffd, (void *)(uintptr_t)addr, s->scratch, n * s->ps);
        if (rc == 0)
            atomic_fetch_add_explicit(&s->st_copied, n, memory_order_relaxed);
    }
    if (rc == 0) {
        s->next_addr = addr + n * s->ps;
        s->cluster = want;
    } else if (rc != -EAGAIN && rc != -ENOENT && rc != -ESRCH) {
        poison(s, addr, rc);
        rc = 0;
    }
    return rc == -EAGAIN ? rc : 0;
}

static void poison_missing(struct lm_srv *s);

/* The serving thread ends from an error (`rc`): the client must not be left waiting on the
   faults nobody will serve. A client that watches us gets its connection shut down (it sees
   the server gone and serves itself); any other has its missing pages poisoned, as stop()
   does, so that its accesses fail loudly (SIGBUS). */
static void srv_die(struct lm_srv *s, int rc)
{
    srv_error(s, rc);
    atomic_store(&s->st_died, rc);
    if (s->flags & LM_SRV_WATCHED) {
        if (shutdown(s->pidfd, SHUT_RDWR) < 0) {
            /* not a socket or already closed: the client's watcher sees the same later */
        }
    } else {
        poison_missing(s);
    }
}

static void *srv_main(void *arg)
{
    struct lm_srv *s = arg;
    struct pollfd pfd[3] = {{.fd = s->uffd, .events = POLLIN},
                            {.fd = s->stop_fd, .events = POLLIN},
                            {.fd = s->pidfd, .events = POLLIN}};
    int npfd = s->pidfd >= 0 ? 3 : 2;
    int rc = 0;
    for (;;) {
        if (s->fatal) {
            rc = s->fatal;
            goto out;
        }
        while (s->qlen && !s->fatal) {
            struct uffd_msg *msg = &s->queue[s->qhead];
            uint64_t ff = msg->arg.pagefault.flags;
            if ((ff & UFFD_PAGEFAULT_FLAG_WP) || ((ff & UFFD_PAGEFAULT_FLAG_MINOR) && !s->pool)) {
                /* The client registered WP or MINOR with this uffd: those pages are present
                   (a COPY gets EEXIST and the thread faults again, forever) and only the
                   client knows what it wanted. Not served: stop, loudly. (A sharing client's
                   minor faults are served: CONTINUE maps the pool's page.) */
                atomic_fetch_add_explicit(&s->st_unsupported, 1, memory_order_relaxed);
                rc = -EOPNOTSUPP;
                goto out;
            }
            uint64_t t0 = now_ns();
            rc = serve(s, msg->arg.pagefault.address & ~(s->ps - 1));
            if (rc == -EAGAIN) {
                int got = drain(s);   /* read the event that blocks the fill, then retry */
                if (got < 0) {
                    rc = got;
                    goto out;
                }
                rc = 0;
                if (got == 0)
                    sched_yield();   /* event read, its madvise/munmap not finished yet */
                continue;
            }
            s->qhead = (s->qhead + 1) % s->qcap;
            s->qlen--;
            uint64_t ns = now_ns() - t0;
            uint64_t n = atomic_fetch_add_explicit(&s->st_faults, 1, memory_order_relaxed) + 1;
            atomic_fetch_add_explicit(&s->st_ns_total, ns, memory_order_relaxed);
            if (ns > atomic_load_explicit(&s->st_ns_max, memory_order_relaxed))
                atomic_store_explicit(&s->st_ns_max, ns, memory_order_relaxed);
            s->last_served_ns = now_ns();
            uint64_t fail_after = atomic_load_explicit(&s->test_fail_after, memory_order_relaxed);
            if (fail_after && n >= fail_after) {
                rc = -EIO;   /* the test hook: an unexpected error */
                goto out;
            }
        }
        /* During a fault storm the next fault comes a few microseconds after we wake the
           last one: look for it for a short while before sleeping. Being woken from poll()
           on another CPU costs ~40 us per fault here; the spin is bounded by SPIN_NS after
           the last fault served, so an idle client costs nothing. */
        if (now_ns() - s->last_served_ns < SPIN_NS) {
            int got = drain(s);
            if (got < 0) {
                rc = got;
                goto out;
            }
            if (got == 0)
                sched_yield();
            continue;
        }
        if (poll(pfd, npfd, -1) < 0) {
            if (errno == EINTR)
                continue;
            rc = -errno;
            goto out;
        }
        if (pfd[1].revents)
            break;   /* lm_srv_destroy */
        if (pfd[0].revents & POLLIN) {
            rc = drain(s);
            if (rc < 0)
                goto out;
            rc = 0;
            continue;   /* serve what was read before looking at the client's liveness */
        }
        if (pfd[0].revents & (POLLERR | POLLHUP | POLLNVAL)) {
            rc = -EBADF;
            goto out;
        }
        if (npfd == 3 && pfd[2].revents)
            break;   /* the client process has exited: nothing will fault again */
    }
out:
    if (rc < 0)
        srv_die(s, rc);
    atomic_store(&s->running, 0);
    return NULL;
}

static uint64_t table_bytes(const struct lm_srv_table *t)
{
    return t->len * (sizeof(int64_t) + (t->codes ? sizeof(uint32_t) + 1 + sizeof(uint64_t) : 0));
}

static void table_free(struct lm_srv_table *t)
{
    for (int k = 0; k < t->nfds; k++)
        if (t->fds[k] >= 0)
            close(t->fds[k]);
    free(t->fds);
    free(t->codes);
    free(t->layer);
    free(t->sigs);
    free(t);
}

static void table_release(struct lm_srv_table *t)
{
    if (t && atomic_fetch_sub(&t->refs, 1) == 1) {
        atomic_fetch_sub(&table_bytes_live, table_bytes(t));
        table_free(t);
    }
}

int lm_srv_table_new(const int64_t *entries, uint64_t len, struct lm_srv_table **out)
{
    if (!out)
        return lm_fail("page server table: out is NULL", EINVAL);
    *out = NULL;
    if (len && !entries)
        return lm_fail("page server table: entries NULL with len > 0", EINVAL);
    if (len > (SIZE_MAX - sizeof(struct lm_srv_table)) / sizeof(int64_t))
        return lm_fail("page server table: len too large", EINVAL);
    for (uint64_t i = 0; i < len; i++)
        if (entries[i] < -1)
            return lm_fail("page server table: an entry is below -1 (zero page)", EINVAL);
    struct lm_srv_table *t = calloc(1, sizeof(*t) + len * sizeof(int64_t));
    if (!t)
        return lm_fail("malloc(page table)", ENOMEM);
    atomic_init(&t->refs, 1);
    t->len = len;
    if (len)
        memcpy(t->entries, entries, len * sizeof(int64_t));
    atomic_fetch_add(&table_bytes_live, table_bytes(t));
    *out = t;
    return 0;
}

int lm_srv_table_new_layered(const int64_t *entries, const uint32_t *codes,
                             const uint8_t *layers, const uint64_t *sigs, uint64_t len,
                             const int *fds, int nfds, struct lm_srv_table **out)
{
    if (!out)
        return lm_fail("page server table: out is NULL", EINVAL);
    *out = NULL;
    if (len && (!entries || !codes || !layers || !sigs))
        return lm_fail("page server table: entries, codes, layers and sigs are needed", EINVAL);
    if (!fds || nfds < 1 || nfds > 256)
        return lm_fail("page server table: 1 to 256 files", EINVAL);
    if (len > (SIZE_MAX - sizeof(struct lm_srv_table)) / 32)
        return lm_fail("page server table: len too large", EINVAL);
    size_t ps = (size_t)lm_page_size();
    /* Checked where they enter: a code or layer the reader does not expect would read past
       a buffer or an array. */
    for (uint64_t i = 0; i < len; i++) {
        if (entries[i] < -1)
            return lm_fail("page server table: an entry is below -1 (zero page)", EINVAL);
        if (entries[i] >= 0 && (layers[i] >= nfds || lm_entry_check(codes[i], ps) < 0))
            return lm_fail("page server table: a page's file or entry word is out of range",
                           EINVAL);
    }
    int rc = lm_srv_table_new(entries, len, out);
    if (rc < 0)
        return rc;
    struct lm_srv_table *t = *out;
    atomic_fetch_sub(&table_bytes_live, table_bytes(t));
    t->codes = malloc(len * sizeof(uint32_t) + 1);
    t->layer = malloc(len + 1);
    t->sigs = malloc(len * sizeof(uint64_t) + 1);
    t->fds = malloc((size_t)nfds * sizeof(int));
    if (!t->codes || !t->layer || !t->sigs || !t->fds) {
        table_free(t);
        *out = NULL;
        return lm_fail("malloc(page table)", ENOMEM);
    }
    memcpy(t->codes, codes, len * sizeof(uint32_t));
    memcpy(t->layer, layers, len);
    memcpy(t->sigs, sigs, len * sizeof(uint64_t));
    for (int k = 0; k < nfds; k++)
        t->fds[k] = -1;
    t->nfds = nfds;
    for (int k = 0; k < nfds; k++) {
        if ((t->fds[k] = fcntl(fds[k], F_DUPFD_CLOEXEC, 0)) < 0) {
            rc = LM_FAIL("fcntl(F_DUPFD_CLOEXEC) of a snapshot file");
            table_free(t);
            *out = NULL;
            return rc;
        }
    }
    atomic_fetch_add(&table_bytes_live, table_bytes(t));
    return 0;
}

void lm_srv_table_release(struct lm_srv_table *t)
{
    table_release(t);
}

uint64_t lm_srv_table_refs(struct lm_srv_table *t)
{
    return t ? atomic_load(&t->refs) : 0;
}

uint64_t lm_srv_table_bytes_live(void)
{
    return atomic_load(&table_bytes_live);
}

int lm_srv_start(int uffd, int peer_pidfd, unsigned flags, const struct lm_srv_map *maps,
                 int nmaps, uint64_t page_size, int src_fd, struct lm_srv_table *table,
                 struct lm_srv_pool *pool, uint32_t max_cluster, struct lm_srv **out)
{
    /* Checked here, not only by the Python caller: a bad map would make the thread fill
       pages of the client's address space it never registered or read the table past its
       end. */
    if (!out)
        return lm_fail("page server: out is NULL", EINVAL);
    *out = NULL;
    if (!maps || nmaps < 1 || nmaps > SRV_MAX_MAPS)
        return lm_fail("page server: 1 to 64 memory ranges per client", EINVAL);
    if (!page_size || page_size & (page_size - 1) || page_size != (uint64_t)lm_page_size())
        return lm_fail("page server: page_size differs from this machine's", EINVAL);
    if (uffd < 0 || src_fd < 0 || peer_pidfd < -1)
        return lm_fail("page server: uffd and src_fd must be fds, peer_pidfd an fd or -1",
                       EINVAL);
    if (flags & ~(unsigned)LM_SRV_WATCHED)
        return lm_fail("page server: unknown flags", EINVAL);
    if (max_cluster > LM_MAX_CLUSTER)
        return lm_fail("page server: max_cluster above 4096 pages", EINVAL);
    if (pool && (!table || table->len > pool->npages || pool->ps != page_size))
        return lm_fail("page server: a pool needs a snapshot table of at most its pages",
                       EINVAL);
    for (int i = 0; i < nmaps; i++) {
        const struct lm_srv_map *m = &maps[i];
        if ((m->base | m->size | m->offset) & (page_size - 1) || !m->size)
            return lm_fail("page server: range not page aligned or empty", EINVAL);
        if (m->base + m->size < m->base || m->offset + m->size < m->offset)
            return lm_fail("page server: range wraps around (base or offset + size)", EINVAL);
        if (table && (m->offset + m->size) / page_size > table->len)
            return lm_fail("page server: range past the end of the page table", EINVAL);
        for (int j = 0; j < i; j++)
            if (m->base < maps[j].base + maps[j].size && maps[j].base < m->base + m->size)
                return lm_fail("page server: ranges overlap", EINVAL);
    }
    if (max_cluster == 0)
        max_cluster = LM_DEFAULT_CLUSTER;

    struct lm_srv *s = calloc(1, sizeof(*s));
    if (!s)
        return lm_fail("calloc", ENOMEM);
    s->uffd = s->pidfd = s->stop_fd = s->src_fd = -1;
    s->ps = page_size;
    s->shift = __builtin_ctzll(page_size);
    s->max_cluster = max_cluster;
    s->cluster = 1;
    s->next_addr = UINT64_MAX;
    int rc;
    for (int i = 0; i < nmaps; i++) {
        s->maps[i].base = maps[i].base;
        s->maps[i].size = maps[i].size;
        s->maps[i].offset = maps[i].offset;
    }
    s->nmaps = nmaps;
    s->flags = flags;
    if (table) {
        atomic_fetch_add(&table->refs, 1);   /* shared, never copied */
        s->table = table;
    }
    if (pool) {
        atomic_fetch_add(&pool->refs, 1);
        s->pool = pool;
    }
    /* and one page more: a compressed entry's bytes before decoding (table_read) */
    if (!(s->scratch = malloc(((size_t)max_cluster + 1) * page_size))) {
        rc = lm_fail("malloc(scratch)", ENOMEM);
        goto fail;
    }
    if ((s->stop_fd = eventfd(0, EFD_CLOEXEC)) < 0) {
        rc = LM_FAIL("eventfd");
        goto fail;
    }
    if ((s->src_fd = fcntl(src_fd, F_DUPFD_CLOEXEC, 0)) < 0) {
        rc = LM_FAIL("fcntl(F_DUPFD_CLOEXEC, source)");
        goto fail;
    }
    /* poll() on a blocking uffd reports POLLERR: the client may have made it blocking. The
       flag lives in the shared file description; the client does not read from it. */
    int fl = fcntl(uffd, F_GETFL);
    if (fl < 0 || fcntl(uffd, F_SETFL, fl | O_NONBLOCK) < 0) {
        rc = LM_FAIL("fcntl(uffd, O_NONBLOCK)");
        goto fail;
    }
    s->uffd = uffd;
    s->pidfd = peer_pidfd;
    atomic_store(&s->running, 1);
    int err = lm_thread_start(&s->tid, NULL, srv_main, s);
    if (err) {
        s->uffd = s->pidfd = -1;   /* ownership passes only on success */
        rc = lm_fail("pthread_create(page server)", err);
        goto fail;
    }
    s->started = true;
    *out = s;
    return 0;
fail:
    lm_srv_destroy(s, 0);
    return rc;
}

int lm_srv_running(struct lm_srv *s)
{
    return atomic_load(&s->running);
}

void lm_srv_stats(struct lm_srv *s, struct lm_srv_stats *out)
{
    memset(out, 0, sizeof(*out));
    out->faults = atomic_load(&s->st_faults);
    out->pages_copied = atomic_load(&s->st_copied);
    out->pages_zero = atomic_load(&s->st_zero);
    out->removed_faults = atomic_load(&s->st_removed_faults);
    out->events_remove = atomic_load(&s->st_remove);
    out->events_unmap = atomic_load(&s->st_unmap);
    out->events_remap = atomic_load(&s->st_remap);
    out->poisoned = atomic_load(&s->st_poisoned);
    out->errors = atomic_load(&s->st_errors);
    out->last_error = atomic_load(&s->st_last_error);
    out->service_ns_total = atomic_load(&s->st_ns_total);
    out->service_ns_max = atomic_load(&s->st_ns_max);
    out->running = atomic_load(&s->running);
    out->unsupported_faults = atomic_load(&s->st_unsupported);
    out->redelivered = atomic_load(&s->st_redelivered);
    out->died = atomic_load(&s->st_died);
    out->pages_published = atomic_load(&s->st_published);
    out->pages_shared_mapped = atomic_load(&s->st_shared_mapped);
    out->pool_fallback_pages = atomic_load(&s->st_pool_fallback);
}

/* Poison every page of the maps that is still missing: EEXIST marks a present page, which
   is stepped over. Stops early once the client's memory is gone. */
static void poison_missing(struct lm_srv *s)
{
    for (int i = 0; i < s->nmaps; i++) {
        uint64_t a = s->maps[i].base, end = a + s->maps[i].size;
        while (a < end) {
            struct uffdio_poison p = {.range = {.start = a, .len = end - a}};
            if (ioctl(s->uffd, UFFDIO_POISON, &p) == 0)
                break;
            int err = errno;
            if (p.updated > 0)
                a += (uint64_t)p.updated;
            if (err == EEXIST)
                a += s->ps;
            else if (err != EAGAIN)
                return;   /* ENOENT/ESRCH: the client has gone; anything else: nothing to do */
            else {
                s->qlen = 0;   /* queued faults: their pages get poisoned here, which wakes them */
                drain(s);      /* read the pending event, then go on */
            }
        }
    }
}

void lm_srv_destroy(struct lm_srv *s, int poison)
{
    if (!s)
        return;
    if (s->started) {
        uint64_t one = 1;
        if (write(s->stop_fd, &one, sizeof(one)) < 0) {
            /* an eventfd below its maximum always takes it */
        }
        pthread_join(s->tid, NULL);
        if (poison && s->uffd >= 0)
            poison_missing(s);
    }
    for (int i = 0; i < s->nmaps; i++) {
        free(s->maps[i].removed);
        free(s->maps[i].dead);
    }
    if (s->uffd >= 0)
        close(s->uffd);
    if (s->pidfd >= 0)
        close(s->pidfd);
    if (s->stop_fd >= 0)
        close(s->stop_fd);
    if (s->src_fd >= 0)
        close(s->src_fd);
    table_release(s->table);
    lm_srv_pool_release(s->pool);
    free(s->scratch);
    free(s->queue);
    free(s);
}

int lm_srv_test_inject(struct lm_srv *s, int what, uint64_t n)
{
    if (!s)
        return lm_fail("page server test hook: no server", EINVAL);
    if (what == LM_SRV_TEST_FAIL_AFTER)
        atomic_store(&s->test_fail_after, n);
    else if (what == LM_SRV_TEST_QUEUE_CAP)
        atomic_store(&s->test_queue_cap, n);
    else
        return lm_fail("page server test hook: unknown hook", EINVAL);
    return 0;
}
