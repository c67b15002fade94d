/*
 * remote.c: a region served by a page server in another process (the client side).
 *
 * The region's userfaultfd is handed to the server; our own serving threads stay stopped.
 * A native watcher thread waits on descriptors that become readable when the server is gone
 * (its pidfd, and our connection to it, which it closes when it stops serving us). Then the
 * region is served here: pages we have a source for (a restore's snapshot) are taken over and
 * served from it; pages whose contents only the server knew fail loudly (poisoned: SIGBUS),
 * never as silent zeros and never as a wait that does not end.
 *
 * The watcher is native for the same reason the serving threads are: the thread that faults
 * may hold the GIL, so nothing that rescues it may need the GIL.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "lm_internal.h"

int lm_region_uffd(struct lm_region *r)
{
    return r->uffd;
}

/*
 * The server is gone and the pages it never sent are lost: poison them now, so that every
 * reader (materialize, checkpoint, signatures, a fault) sees POISONED and fails loudly,
 * instead of each having to know that an EMPTY page of this region is not zero. The pages it
 * did send are in our page tables: recorded as program data first. O(pages) records written:
 * a failure path.
 */
static int poison_lost(struct lm_region *r)
{
    int rc = lm_region_sync_present(r);
    enum { MAX_RUN = 1 << 16 };
    for (size_t p = 0; p < r->npages;) {
        if (lm_state_load(&r->meta[p]) != LM_EMPTY) {
            p++;
            continue;
        }
        uint8_t s = lm_claim(r, p);
        if (s != LM_EMPTY) {
            if (s == LM_DEFERRED)
                lm_release(r, p, s);   /* has contents here after all */
            p++;
            continue;
        }
        size_t run = 1;
        while (run < MAX_RUN && p + run < r->npages &&
               lm_state_load(&r->meta[p + run]) == LM_EMPTY) {
            uint8_t t = lm_claim(r, p + run);
            if (t != LM_EMPTY) {
                if (t == LM_DEFERRED)
                    lm_release(r, p + run, t);
                break;
            }
            run++;
        }
        lm_poison_run(r, p, run, -EHOSTDOWN);
        p += run;
    }
    return rc;
}

static void *watch_main(void *arg)
{
    struct lm_region *r = arg;
    struct pollfd pfd[LM_MAX_WATCH + 1];
    int n = r->nwatch;
    for (int i = 0; i < n; i++)
        pfd[i] = (struct pollfd){.fd = r->watch_fds[i], .events = POLLIN};
    pfd[n] = (struct pollfd){.fd = r->watch_stop_fd, .events = POLLIN};
    for (;;) {
        if (poll(pfd, (nfds_t)n + 1, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;   /* cannot watch: treat as lost, serving here is always safe */
        }
        if (pfd[n].revents)
            return NULL;   /* the region is closing */
        bool gone = false;
        for (int i = 0; i < n; i++)
            gone |= pfd[i].revents != 0;
        if (gone)
            break;
    }
    /* Take over: serve here, then wake every thread waiting on a fault. A fault message the
       server had read but not answered is not delivered again; its thread retries the access
       when woken and raises a new fault, which our threads now read. */
    atomic_store(&r->remote, LM_REMOTE_LOST);
    int rc = r->remote_empty_unknown ? poison_lost(r) : 0;
    if (rc < 0)
        lm_record_error(r, rc);
    rc = lm_serve_start(r);
    if (rc < 0) {
        atomic_fetch_add(&r->st_errors, 1);
        atomic_store(&r->st_last_error, rc);
    }
    lm_uffd_wake(r->uffd, r->base, r->nbytes);
    return NULL;
}

int lm_region_watch_server(struct lm_region *r, const int *fds, int nfds, int empty_unknown)
{
    if (nfds < 1 || nfds > LM_MAX_WATCH)
        return lm_fail("lm_region_watch_server: 1 to 4 descriptors", EINVAL);
    if (r->watch_started || atomic_load(&r->serving))
        return lm_fail("lm_region_watch_server: the region is already served", EBUSY);
    for (int i = 0; i < nfds; i++) {
        if ((r->watch_fds[i] = fcntl(fds[i], F_DUPFD_CLOEXEC, 0)) < 0) {
            int rc = LM_FAIL("fcntl(F_DUPFD_CLOEXEC)");
            while (i-- > 0)
                close(r->watch_fds[i]);
            return rc;
        }
    }
    r->nwatch = nfds;
    if ((r->watch_stop_fd = eventfd(0, EFD_CLOEXEC)) < 0) {
        int rc = LM_FAIL("eventfd");
        for (int i = 0; i < nfds; i++)
            close(r->watch_fds[i]);
        r->nwatch = 0;
        return rc;
    }
    /* EMPTY pages hold the server's contents, which we do not have: a fault on one after
       the server is gone is poisoned, and readahead must not fill neighbours with zeros. */
    r->remote_empty_unknown = empty_unknown != 0;
    if (r->remote_empty_unknown)
        r->cfg.max_cluster_pages = 1;
    atomic_store(&r->remote, LM_REMOTE_SERVED);
    int err = lm_thread_start(&r->watch_tid, NULL, watch_main, r);
    if (err) {
        atomic_store(&r->remote, LM_REMOTE_NONE);
        lm_remote_close(r);
        return lm_fail("pthread_create(server watcher)", err);
    }
    r->watch_started = true;
    return 0;
}

void lm_remote_close(struct lm_region *r)
{
    if (r->watch_started) {
        uint64_t one = 1;
        if (write(r->watch_stop_fd, &one, sizeof(one)) < 0) {
            /* an eventfd below its maximum always takes it */
        }
        pthread_join(r->watch_tid, NULL);
        r->watch_started = false;
    }
    for (int i = 0; i < r->nwatch; i++)
        close(r->watch_fds[i]);
    r->nwatch = 0;
    if (r->watch_stop_fd >= 0)
        close(r->watch_stop_fd);
    r->watch_stop_fd = -1;
}

int lm_region_remote(struct lm_region *r)
{
    return atomic_load(&r->remote);
}

/*
 * Pages the server filled are present in our page tables but not in our records. Before the
 * records are trusted (a checkpoint takes lazy pages from the snapshot store, and the program
 * may have changed a page since the server filled it), mark every page that is present or
 * swapped out as program data. /proc/self/pagemap: bit 63 present, bit 62 swapped.
 */
int lm_region_sync_present(struct lm_region *r)
{
    int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return LM_FAIL("open(/proc/self/pagemap)");
    enum { CHUNK = 4096 };
    uint64_t *ent = malloc(CHUNK * sizeof(uint64_t));
    if (!ent) {
        close(fd);
        return lm_fail("malloc", ENOMEM);
    }
    int rc = 0;
    size_t first_vpn = (uintptr_t)r->base >> r->page_shift;
    for (size_t p0 = 0; p0 < r->npages; p0 += CHUNK) {
        size_t n = r->npages - p0 < CHUNK ? r->npages - p0 : CHUNK;
        ssize_t got = pread(fd, ent, n * 8, (off_t)((first_vpn + p0) * 8));
        if (got != (ssize_t)(n * 8)) {
            rc = got < 0 ? LM_FAIL("pread(/proc/self/pagemap)")
                         : lm_fail("pread(/proc/self/pagemap): short read", EIO);
            break;
        }
        for (size_t i = 0; i < n; i++) {
            if (!(ent[i] >> 62))
                continue;
            size_t p = p0 + i;
            if (lm_state_load(&r->meta[p]) == LM_PRESENT)
                continue;
            uint8_t s = lm_claim_wait(r, p);
            if (s != LM_EMPTY && s != LM_DEFERRED) {
                /* present already, or poisoned (pagemap shows the poison marker as a swap
                   entry): not a page the server filled */
                lm_release(r, p, s);
                continue;
            }
            /* whatever the server put there, possibly changed since */
            lm_meta_set_data(r, p, true);
            lm_mark_present(r, p, 1, 0, 0);
        }
    }
    free(ent);
    close(fd);
    return rc;
}
