/*
 * pooldir.c: how processes of one uid find one another's pool (docs/shared-pages.md, 2.3 and
 * 2.7), and this process's table of pools.
 *
 * A pool is answered for on abstract Unix sockets named
 *     \0pylazymem-pool/<euid>/<pool id, 16 hex>/<slot>      slot 0..3
 * by the processes that hold it: one native pool thread per process accepts, checks that the
 * caller is of our uid and sends one line plus the memfd (SCM_RIGHTS). Abstract names and fds
 * belong to processes, so a pool and its names vanish with the last process that holds them:
 * the kernel is the garbage collector, and nothing is named in a filesystem to leak after a
 * crash. What can be stale is a listener that does not answer (stopped, hung): a joiner waits
 * at most the answer timeout per slot and goes on, so a stale slot costs time, never
 * correctness. The abstract namespace has no permissions: anyone can bind any name, so a
 * listener of another uid is never trusted, and whatever fd arrives is checked (pool.c) before
 * it is used.
 *
 * Locks: open_mu makes lm_pool_open one at a time in a process (it can wait on sockets for a
 * while; the same pool opened twice must be found in the table, not created twice). dir_mu
 * guards the table and the thread's state and is only held for short, non-blocking work, so
 * that the pool thread keeps answering while an open waits. The pool thread is not on any
 * fault path and never takes the GIL (it is C only).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "lm_internal.h"

#define POOL_BACKLOG 16
#define ACCEPTS_PER_WAKE 16   /* then the others pools' sockets get their turn */
#define LINE_MAX_LEN 192
#define BIND_TRIES 5          /* per slot, while a bound slot refuses connections */

static pthread_mutex_t open_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t dir_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t dir_cv = PTHREAD_COND_INITIALIZER;
static struct lm_pool *table;        /* this process's live pools (dir_mu) */
static int wake_fd = -1;             /* eventfd: the set of listening sockets changed */
static bool thread_running;          /* the pool thread is running (dir_mu) */
static uint64_t gen, seen_gen;       /* changes of the set, and the last one the thread polls */
static _Atomic int timeout_ms = LM_POOL_TIMEOUT_MS;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static int atfork_err;

void lm_pool_test_timeout(int ms)
{
    atomic_store(&timeout_ms, ms < 0 ? LM_POOL_TIMEOUT_MS : ms);
}

/* ---- names and messages ------------------------------------------------------------------ */

static socklen_t slot_addr(struct sockaddr_un *a, uint64_t id, int slot)
{
    /* The uid is part of the name so that users do not even meet; it is not a protection
       (anyone can bind it): SO_PEERCRED is. */
    memset(a, 0, sizeof *a);
    a->sun_family = AF_UNIX;
    int n = snprintf(a->sun_path + 1, sizeof a->sun_path - 1, LM_POOL_NAME "/%u/%016llx/%d",
                     (unsigned)geteuid(), (unsigned long long)id, slot);
    return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + (size_t)n);
}

/* The one line an answer carries with the fd: it says which pool the fd claims to be, so that
   a joiner refuses an answer for something else before looking at the fd. */
static int answer_line(char *buf, size_t len, const struct lm_pool *p)
{
    return snprintf(buf, len, "{\"pool\": 1, \"id\": \"%016llx\", \"npages\": %llu, "
                    "\"page_size\": %llu}\n", (unsigned long long)p->id,
                    (unsigned long long)p->npages, (unsigned long long)p->page_size);
}

/* The abstract namespace has no permissions: the only thing we trust about a peer is the uid
   the kernel recorded for it (the effective uid at connect()/listen()). */
static bool peer_is_us(int s)
{
    struct ucred cr;
    socklen_t len = sizeof cr;
    return getsockopt(s, SOL_SOCKET, SO_PEERCRED, &cr, &len) == 0 && len == sizeof cr &&
           cr.uid == geteuid();
}

/* ---- joining ------------------------------------------------------------------------------ */

/* Ask slot `slot` for the pool `want` describes: 1 and *out when a process of ours answered
   with that pool, 0 when there was no pool to be had there (nobody listening, a foreign
   listener, no answer within the timeout, a wrong answer or fd; *refused, if given, says
   whether connect() was refused: nobody listens there, or not yet), -errno when we could not
   even ask. */
static int join_slot(const struct lm_pool *want, int slot, struct lm_pool **out, bool *refused)
{
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (s < 0)
        return LM_FAIL("socket(AF_UNIX)");
    struct sockaddr_un a;
    socklen_t alen = slot_addr(&a, want->id, slot);
    /* Non-blocking: a stopped listener whose backlog is full gives EAGAIN, i.e. no answer. */
    if (connect(s, (struct sockaddr *)&a, alen) < 0) {
        if (refused)
            *refused = errno == ECONNREFUSED;
        close(s);
        return 0;
    }
    if (!peer_is_us(s)) {
        close(s);
        return 0;
    }
    char buf[LINE_MAX_LEN + 1];
    size_t len = 0;
    int fd = -1, nfds = 0;
    bool bad = false;
    uint64_t deadline = lm_now_ns() + (uint64_t)atomic_load(&timeout_ms) * 1000000u;
    while (!bad && !memchr(buf, '\n', len)) {
        if (len == LINE_MAX_LEN) {
            bad = true;    /* no line of ours is this long */
            break;
        }
        uint64_t now = lm_now_ns();
        if (now >= deadline) {
            bad = true;    /* a stopped or hung listener: skipped, never waited for */
            break;
        }
        struct pollfd pfd = {.fd = s, .events = POLLIN};
        int pr = poll(&pfd, 1, (int)((deadline - now + 999999) / 1000000));
        if (pr < 0 && errno == EINTR)
            continue;
        if (pr <= 0) {
            bad = true;
            break;
        }
        union {
            struct cmsghdr h;
            char b[CMSG_SPACE(4 * sizeof(int))];
        } cb;
        memset(&cb, 0, sizeof cb);
        struct iovec iov = {.iov_base = buf + len, .iov_len = LINE_MAX_LEN - len};
        struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cb.b,
                           .msg_controllen = sizeof cb.b};
        ssize_t n = recvmsg(s, &m, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
        if (n < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        /* Every fd that arrived is ours to close: keep the first, count the rest. */
        for (struct cmsghdr *h = CMSG_FIRSTHDR(&m); h; h = CMSG_NXTHDR(&m, h)) {
            if (h->cmsg_level != SOL_SOCKET || h->cmsg_type != SCM_RIGHTS)
                continue;
            size_t k = (h->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            for (size_t i = 0; i < k; i++) {
                int got;
                memcpy(&got, CMSG_DATA(h) + i * sizeof(int), sizeof got);
                if (fd < 0)
                    fd = got;
                else
                    close(got);
                nfds++;
            }
        }
        /* Truncated control data: the kernel dropped fds we were sent; not a proper answer. */
        if (m.msg_flags & MSG_CTRUNC)
            bad = true;
        if (n <= 0) {
            bad = true;    /* closed (or failed) before a whole line */
            break;
        }
        len += (size_t)n;
    }
    close(s);
    buf[len] = 0;
    char line[LINE_MAX_LEN];
    answer_line(line, sizeof line, want);
    /* An answer is exactly one line and exactly one fd: anything else is not one of ours. */
    if (bad || nfds != 1 || strcmp(buf, line) != 0) {
        if (fd >= 0)
            close(fd);
        return 0;
    }
    int rc = lm_pool_attach(fd, want->header_xxh3, want->npages, want->page_size, out);
    if (rc == -EBADMSG)
        return 0;         /* not the pool it claims to be (pool.c says why in lm_last_op) */
    return rc ? rc : 1;
}

/* ---- answering: the pool thread ---------------------------------------------------------- */

static void wake_thread(void)
{
    uint64_t one = 1;
    if (wake_fd >= 0 && write(wake_fd, &one, sizeof one) < 0) {
        /* EAGAIN only when the counter is full, which wakes the thread anyway */
    }
}

static void send_pool(int c, const struct lm_pool *p)
{
    char line[LINE_MAX_LEN];
    int n = answer_line(line, sizeof line, p);
    union {
        struct cmsghdr h;
        char b[CMSG_SPACE(sizeof(int))];
    } cb;
    memset(&cb, 0, sizeof cb);
    struct iovec iov = {.iov_base = line, .iov_len = (size_t)n};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cb.b,
                       .msg_controllen = sizeof cb.b};
    struct cmsghdr *h = CMSG_FIRSTHDR(&m);
    h->cmsg_level = SOL_SOCKET;
    h->cmsg_type = SCM_RIGHTS;
    h->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(h), &p->fd, sizeof(int));
    /* A fresh connection's buffer is empty: this does not block. A peer that has gone
       (timed out) makes it fail, which is its business: MSG_NOSIGNAL, no SIGPIPE. */
    if (sendmsg(c, &m, MSG_NOSIGNAL | MSG_DONTWAIT) < 0) {
        /* nothing to do: the joiner times out or goes on */
    }
}

/* Accept and answer what is pending on p's socket (dir_mu held: all of it non-blocking).
   Returns false when accept failed for lack of resources (EMFILE...): the caller backs off
   rather than spin on a socket that stays readable. */
static bool answer(struct lm_pool *p)
{
    for (int k = 0; k < ACCEPTS_PER_WAKE; k++) {
        int c = accept4(p->listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (c < 0)
            return errno == EAGAIN || errno == EWOULDBLOCK || errno == ECONNABORTED ||
                   errno == EINTR || errno == EPROTO;
        if (peer_is_us(c))
            send_pool(c, p);
        close(c);
    }
    return true;
}

static void *pool_thread(void *arg)
{
    (void)arg;
    struct pollfd *pfd = NULL;
    struct lm_pool **who = NULL;
    size_t cap = 0;
    pthread_mutex_lock(&dir_mu);
    for (;;) {
        size_t n = 1;
        for (struct lm_pool *p = table; p; p = p->next)
            n += p->listen_fd >= 0;
        if (n == 1)
            break;    /* nothing to answer for: the next pool starts a thread again */
        int timeout = -1;
        if (n > cap) {
            struct pollfd *np = realloc(pfd, n * sizeof *pfd);
            if (np)
                pfd = np;
            struct lm_pool **nw = np ? realloc(who, n * sizeof *who) : NULL;
            if (nw) {
                who = nw;
                cap = n;
            }
        }
        size_t m = 1;
        if (n <= cap) {
            for (struct lm_pool *p = table; p; p = p->next)
                if (p->listen_fd >= 0) {
                    pfd[m] = (struct pollfd){.fd = p->listen_fd, .events = POLLIN};
                    who[m++] = p;
                }
        } else {
            timeout = 100;   /* out of memory: only the wake fd now, try again soon */
        }
        struct pollfd wake = {.fd = wake_fd, .events = POLLIN};
        struct pollfd *set = m > 1 ? pfd : &wake;
        set[0] = wake;
        /* From here on, every socket in the set stays open until we come back: a release
           waits for seen_gen to pass its change before it closes its socket. */
        uint64_t mine = seen_gen = gen;
        pthread_cond_broadcast(&dir_cv);
        pthread_mutex_unlock(&dir_mu);
        int pr = poll(set, m, timeout);
        pthread_mutex_lock(&dir_mu);
        if (pr <= 0)
            continue;
        if (set[0].revents) {
            uint64_t v;
            if (read(wake_fd, &v, sizeof v) < 0) {
                /* EAGAIN: another wake already drained it */
            }
        }
        if (gen != mine)
            continue;      /* the set changed: some sockets of ours may be closed by now */
        bool ok = true;
        for (size_t j = 1; j < m; j++)
            if (pfd[j].revents & POLLIN)
                ok &= answer(who[j]);
        if (!ok) {
            pthread_mutex_unlock(&dir_mu);
            usleep(10000);
            pthread_mutex_lock(&dir_mu);
        }
    }
    thread_running = false;
    pthread_cond_broadcast(&dir_cv);
    pthread_mutex_unlock(&dir_mu);
    free(pfd);
    free(who);
    return NULL;
}

/* Put p in the table and have it answered for (dir_mu held). When the thread cannot be had,
   p is kept but not answered for: still a correct pool, just not found by others. */
static void dir_add(struct lm_pool *p)
{
    p->next = table;
    table = p;
    gen++;
    if (p->listen_fd < 0)
        return;
    if (thread_running) {
        wake_thread();
        return;
    }
    if (wake_fd < 0)
        wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    pthread_t tid;
    pthread_attr_t attr;
    int err = wake_fd < 0 ? errno : pthread_attr_init(&attr);
    if (!err) {
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        err = lm_thread_start(&tid, &attr, pool_thread, NULL);
        pthread_attr_destroy(&attr);
    }
    if (!err) {
        thread_running = true;
        return;
    }
    close(p->listen_fd);
    p->listen_fd = -1;
    p->slot = -1;
    if (p->role == LM_POOL_CREATED)
        p->role = LM_POOL_UNSHARED;
}

void lm_pool_release(struct lm_pool *p)
{
    if (!p)
        return;
    if (p->dead) {
        /* inherited across fork(): its fds are closed, the table is not its any more */
        if (atomic_fetch_sub_explicit(&p->refs, 1, memory_order_acq_rel) == 1)
            lm_pool_free(p);
        return;
    }
    pthread_mutex_lock(&dir_mu);
    if (atomic_fetch_sub_explicit(&p->refs, 1, memory_order_acq_rel) != 1) {
        pthread_mutex_unlock(&dir_mu);
        return;
    }
    for (struct lm_pool **pp = &table; *pp; pp = &(*pp)->next)
        if (*pp == p) {
            *pp = p->next;
            break;
        }
    if (p->listen_fd >= 0) {
        /* The thread may be polling this socket: closing it under its feet could let the fd
           number be reused and polled for something else. Wait until it has taken the new set
           (it holds dir_mu only briefly), then close: the name is free when we return. */
        uint64_t g = ++gen;
        wake_thread();
        while (thread_running && seen_gen < g)
            pthread_cond_wait(&dir_cv, &dir_mu);
        close(p->listen_fd);
        p->listen_fd = -1;
    }
    pthread_mutex_unlock(&dir_mu);
    lm_pool_free(p);
}

/* ---- fork ---------------------------------------------------------------------------------- */

static void before_fork(void)
{
    /* No open half done and no table half changed in the child. */
    pthread_mutex_lock(&open_mu);
    pthread_mutex_lock(&dir_mu);
}

static void after_fork_parent(void)
{
    pthread_mutex_unlock(&dir_mu);
    pthread_mutex_unlock(&open_mu);
}

void lm_pool_after_fork(void)
{
    /* The child has no region of the parent (regions and views are MADV_DONTFORK) and no pool
       thread. Inherited listening sockets would keep answering for the parent's pools from a
       process that never accepts (a stale listener) and inherited memfds would keep the
       parent's pools alive with the child: close both. Structs still referenced by the child
       are marked dead, so that their release only frees memory. */
    for (struct lm_pool *p = table, *next; p; p = next) {
        next = p->next;
        p->next = NULL;
        if (p->listen_fd >= 0)
            close(p->listen_fd);
        p->listen_fd = -1;
        p->slot = -1;
        lm_pool_orphan(p);
    }
    table = NULL;
    thread_running = false;
    gen = seen_gen = 0;
    if (wake_fd >= 0)
        close(wake_fd);       /* shared with the parent's thread: a wake here would wake it */
    wake_fd = -1;
    pthread_cond_init(&dir_cv, NULL);   /* its waiters were threads of the parent */
    pthread_mutex_unlock(&dir_mu);
    pthread_mutex_unlock(&open_mu);
}

static void register_atfork(void)
{
    atfork_err = pthread_atfork(before_fork, after_fork_parent, lm_pool_after_fork);
}

/* ---- opening ------------------------------------------------------------------------------ */

static int bind_slot(uint64_t id, int slot)
{
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (s < 0)
        return LM_FAIL("socket(AF_UNIX)");
    struct sockaddr_un a;
    socklen_t alen = slot_addr(&a, id, slot);
    if (bind(s, (struct sockaddr *)&a, alen) < 0 || listen(s, POOL_BACKLOG) < 0) {
        int err = errno;
        close(s);
        return lm_fail("bind(pool slot)", err);
    }
    return s;
}

/* A joiner answers too, on the first free slot among 1..3 (slot 0 is the creators'), so the
   pool stays findable after its creator exits. None free: it just does not answer. */
static void bind_as_joiner(struct lm_pool *p)
{
    for (int slot = 1; slot < LM_POOL_SLOTS; slot++) {
        int s = bind_slot(p->id, slot);
        if (s >= 0) {
            p->listen_fd = s;
            p->slot = slot;
            return;
        }
    }
}

static struct lm_pool *table_find(uint64_t id, uint64_t header_xxh3, uint64_t npages,
                                  uint64_t page_size)
{
    for (struct lm_pool *p = table; p; p = p->next)
        if (p->id == id && p->header_xxh3 == header_xxh3 && p->npages == npages &&
            p->page_size == page_size)
            return p;
    return NULL;
}

int lm_pool_open(uint64_t header_xxh3, uint64_t npages, uint64_t page_size, uint64_t max_bytes,
                 struct lm_pool **out)
{
    if (!out)
        return lm_fail("lm_pool_open: out is NULL", EINVAL);
    uint64_t bytes;
    int rc = lm_pool_check_args(npages, page_size, &bytes);
    if (rc)
        return rc;
    pthread_once(&atfork_once, register_atfork);
    if (atfork_err)
        return lm_fail("pthread_atfork(pool)", atfork_err);
    /* What we look for, as a struct: the fields join_slot compares. */
    struct lm_pool want = {.id = lm_pool_id(header_xxh3, npages, page_size),
                           .header_xxh3 = header_xxh3, .npages = npages,
                           .page_size = page_size};
    struct lm_pool *p = NULL;

    pthread_mutex_lock(&open_mu);
    pthread_mutex_lock(&dir_mu);
    p = table_find(want.id, header_xxh3, npages, page_size);
    if (p)
        lm_pool_ref(p);    /* in the table, so at least one reference: it cannot go meanwhile */
    pthread_mutex_unlock(&dir_mu);
    if (p)
        goto done;

    /* Another process of ours may hold it: ask every slot. */
    for (int slot = 0; slot < LM_POOL_SLOTS && !p; slot++) {
        rc = join_slot(&want, slot, &p, NULL);
        if (rc < 0)
            goto done;
    }
    if (p) {
        p->role = LM_POOL_JOINED;
        bind_as_joiner(p);
    } else {
        /* The bound is on memory this process would bring into being; joining costs none. */
        if (max_bytes && bytes > max_bytes) {
            rc = lm_fail("pool: larger than its bound (PYLAZYMEM_POOL_MAX_BYTES)", EFBIG);
            goto done;
        }
        rc = lm_pool_create(header_xxh3, npages, page_size, &p);
        if (rc)
            goto done;
        p->role = LM_POOL_UNSHARED;    /* until a slot is ours */
        for (int slot = 0; slot < LM_POOL_SLOTS && p->role == LM_POOL_UNSHARED; slot++) {
            for (int tries = 0; tries < BIND_TRIES; tries++) {
                int s = bind_slot(want.id, slot);
                if (s >= 0) {
                    p->listen_fd = s;
                    p->slot = slot;
                    p->role = LM_POOL_CREATED;
                    break;
                }
                if (s != -EADDRINUSE)
                    break;
                /* Taken: another process may have created the pool since we asked. Its pool
                   is the one to use (ours has no user yet); a slot that does not answer is a
                   stale listener, passed over. */
                struct lm_pool *q = NULL;
                bool refused = false;
                rc = join_slot(&want, slot, &q, &refused);
                if (rc < 0) {
                    lm_pool_free(p);
                    p = NULL;
                    goto done;
                }
                if (rc == 1) {
                    lm_pool_free(p);
                    p = q;
                    p->role = LM_POOL_JOINED;
                    bind_as_joiner(p);
                    break;
                }
                if (!refused)
                    break;
                /* Bound but refusing: its owner is between bind() and listen(), or closing
                   it. Either way it is worth asking again in a moment, not passing over: a
                   creator caught in that window would otherwise get a twin pool. */
                usleep(1000);
            }
        }
    }
    rc = 0;
    pthread_mutex_lock(&dir_mu);
    dir_add(p);
    pthread_mutex_unlock(&dir_mu);
done:
    pthread_mutex_unlock(&open_mu);
    if (!rc)
        *out = p;
    return rc;
}
