/*
 * pool.c: the pool object (docs/shared-pages.md, section 2). A pool is one memfd per snapshot
 * content that every process restoring that content maps: page p of the region at offset
 * p * page_size, one header page at the end. This file makes a pool (create), checks one that
 * another process handed us (attach), and answers questions about it; how processes find one
 * another's pool is pooldir.c's business, which also owns the process's table of pools and
 * therefore the release of the last reference.
 *
 * What a pool never is: a file with a name (nothing to leak after a crash: the kernel frees
 * the memfd with its last fd or mapping, it is the garbage collector), or a place with a
 * second record of which pages are filled (the page cache is the only "filled" record, so
 * nothing here writes pool pages, fallocates or truncates: only the header page is written,
 * once, before anyone else can hold the fd).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "lm_internal.h"

/* The seals every pool has from its creation: nobody can truncate a pool under its users'
   mappings (that would SIGBUS every one of them) or grow it. F_SEAL_SEAL is deliberately
   not set: the fill that completes a pool adds F_SEAL_FUTURE_WRITE later (section 2.5). */
#define POOL_SEALS (F_SEAL_SHRINK | F_SEAL_GROW)

uint64_t lm_pool_id(uint64_t header_xxh3, uint64_t npages, uint64_t page_size)
{
    /* Little-endian u64s after a tag: the tag's version changes with the pool layout, so an
       incompatible layout has other ids and never meets this one. */
    unsigned char buf[LM_POOL_TAG_LEN + 3 * 8];
    uint64_t v[3] = {header_xxh3, page_size, npages};
    memcpy(buf, LM_POOL_TAG, LM_POOL_TAG_LEN);
    for (int i = 0; i < 3; i++)
        for (int b = 0; b < 8; b++)
            buf[LM_POOL_TAG_LEN + 8 * i + b] = (unsigned char)(v[i] >> (8 * b));
    return lm_xxh3(buf, sizeof buf);
}

int lm_pool_check_args(uint64_t npages, uint64_t page_size, uint64_t *bytes)
{
    /* Pool offsets are region offsets, so a pool is only usable by regions of this machine's
       page size; the size must be representable as an off_t for ftruncate and fstat. */
    if (page_size != (uint64_t)lm_page_size())
        return lm_fail("pool: page_size is not this machine's page size", EINVAL);
    if (npages == 0 || npages > LM_SNAP_MAX_PAGES)
        return lm_fail("pool: npages out of range", EINVAL);
    if (npages + 1 > (uint64_t)INT64_MAX / page_size)
        return lm_fail("pool: (npages + 1) * page_size overflows", EINVAL);
    *bytes = (npages + 1) * page_size;
    return 0;
}

static void header_for(struct lm_pool_header *h, uint64_t id, uint64_t header_xxh3,
                       uint64_t npages, uint64_t page_size)
{
    memset(h, 0, sizeof *h);
    memcpy(h->magic, LM_POOL_MAGIC, sizeof h->magic);
    h->version = LM_POOL_LAYOUT;
    h->page_size = page_size;
    h->npages = npages;
    h->pool_id = id;
    h->header_xxh3 = header_xxh3;
}

static struct lm_pool *pool_new(int fd, uint64_t id, uint64_t header_xxh3, uint64_t npages,
                                uint64_t page_size)
{
    struct lm_pool *p = calloc(1, sizeof *p);
    if (!p)
        return NULL;
    atomic_init(&p->refs, 1);
    p->fd = fd;
    p->listen_fd = -1;
    p->slot = -1;
    p->id = id;
    p->header_xxh3 = header_xxh3;
    p->npages = npages;
    p->page_size = page_size;
    return p;
}

int lm_pool_create(uint64_t header_xxh3, uint64_t npages, uint64_t page_size,
                   struct lm_pool **out)
{
    uint64_t bytes;
    int rc = lm_pool_check_args(npages, page_size, &bytes);
    if (rc)
        return rc;
    uint64_t id = lm_pool_id(header_xxh3, npages, page_size);
    /* O_RDWR (memfd_create's only mode): regions map it MAP_PRIVATE, and the view through
       which pages are published is a MAP_SHARED mapping. */
    int fd = memfd_create(LM_POOL_NAME, MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0)
        return LM_FAIL("memfd_create(pylazymem-pool)");
    /* ftruncate allocates nothing: every page but the header stays a hole until a fault or
       the fill publishes it. */
    if (ftruncate(fd, (off_t)bytes) < 0) {
        rc = LM_FAIL("ftruncate(pool)");
        goto fail;
    }
    /* The header page is the only pwrite a pool ever sees: nobody else can have the fd yet,
       so there is no reader to see it half written. A whole page, so that the page that holds
       it is entirely ours and never looks like region data. */
    char *page = calloc(1, page_size);
    if (!page) {
        rc = lm_fail("pool: header page", ENOMEM);
        goto fail;
    }
    struct lm_pool_header h;
    header_for(&h, id, header_xxh3, npages, page_size);
    h.creator_pid = (uint64_t)getpid();
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    h.created_ns = (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec;
    memcpy(page, &h, sizeof h);
    ssize_t w = pwrite(fd, page, page_size, (off_t)(npages * page_size));
    int err = errno;
    free(page);
    if (w != (ssize_t)page_size) {
        rc = lm_fail("pwrite(pool header page)", w < 0 ? err : EIO);
        goto fail;
    }
    if (fcntl(fd, F_ADD_SEALS, POOL_SEALS) < 0) {
        rc = LM_FAIL("fcntl(pool, F_ADD_SEALS)");
        goto fail;
    }
    struct lm_pool *p = pool_new(fd, id, header_xxh3, npages, page_size);
    if (!p) {
        rc = lm_fail("pool: malloc", ENOMEM);
        goto fail;
    }
    *out = p;
    return 0;
fail:
    close(fd);
    return rc;
}

/* Is fd's link in /proc/self/fd our memfd's name ("/memfd:pylazymem-pool (deleted)")? Not a
   security boundary (a process of our uid can name a memfd anything), but it rejects every fd
   that is not a memfd made for this purpose: a regular file, a socket, another memfd. */
static bool named_like_a_pool(int fd)
{
    char path[64], link[128];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(path, link, sizeof link - 1);
    if (n < 0)
        return false;
    link[n] = 0;
    static const char want[] = "/memfd:" LM_POOL_NAME;
    size_t len = sizeof want - 1;
    return strncmp(link, want, len) == 0 && (link[len] == 0 || link[len] == ' ');
}

int lm_pool_attach(int fd, uint64_t header_xxh3, uint64_t npages, uint64_t page_size,
                   struct lm_pool **out)
{
    /* Everything here is about an fd another process sent: any mismatch is a refusal
       (-EBADMSG), and the fd is closed whatever happens but success. */
    uint64_t bytes;
    int rc = lm_pool_check_args(npages, page_size, &bytes);
    if (rc)
        goto fail;
    uint64_t id = lm_pool_id(header_xxh3, npages, page_size);
    if (!named_like_a_pool(fd)) {
        rc = lm_fail("pool: the received fd is not a pylazymem-pool memfd", EBADMSG);
        goto fail;
    }
    /* Regions publish pages through a shared mapping of it: a read-only fd cannot serve. */
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || (fl & O_ACCMODE) != O_RDWR) {
        rc = lm_fail("pool: the received fd is not open O_RDWR", EBADMSG);
        goto fail;
    }
    /* Without these seals a holder could truncate it under every mapping (SIGBUS). */
    int seals = fcntl(fd, F_GET_SEALS);
    if (seals < 0 || (seals & POOL_SEALS) != POOL_SEALS) {
        rc = lm_fail("pool: the received memfd lacks F_SEAL_SHRINK | F_SEAL_GROW", EBADMSG);
        goto fail;
    }
    struct stat st;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || (uint64_t)st.st_size != bytes) {
        rc = lm_fail("pool: the received memfd has the wrong size", EBADMSG);
        goto fail;
    }
    /* The header page names the content: a pool of another snapshot (or page size, or page
       count) never passes, whatever name the socket had. Creator pid and time are not
       compared: they say who made it, not what it holds. */
    struct lm_pool_header got, want;
    ssize_t r = pread(fd, &got, sizeof got, (off_t)(npages * page_size));
    header_for(&want, id, header_xxh3, npages, page_size);
    want.creator_pid = got.creator_pid;
    want.created_ns = got.created_ns;
    if (r != (ssize_t)sizeof got || memcmp(&got, &want, sizeof got) != 0) {
        rc = lm_fail("pool: the received memfd's header page does not match", EBADMSG);
        goto fail;
    }
    struct lm_pool *p = pool_new(fd, id, header_xxh3, npages, page_size);
    if (!p) {
        rc = lm_fail("pool: malloc", ENOMEM);
        goto fail;
    }
    *out = p;
    return 0;
fail:
    close(fd);
    return rc;
}

void lm_pool_ref(struct lm_pool *p)
{
    /* The caller holds a reference, so the count cannot reach zero meanwhile: no lock. */
    atomic_fetch_add_explicit(&p->refs, 1, memory_order_relaxed);
}

int lm_pool_fd(const struct lm_pool *p)
{
    return p->dead ? -1 : p->fd;
}

void lm_pool_orphan(struct lm_pool *p)
{
    /* A fork child's copy: the memfd descriptor is closed (the child has no region of the
       parent, and keeping it would keep the parent's pool alive with the child); the struct
       stays for whoever still holds a reference, which then only frees memory. */
    if (p->fd >= 0)
        close(p->fd);
    p->fd = -1;
    p->dead = true;
}

void lm_pool_free(struct lm_pool *p)
{
    if (!p->dead && p->fd >= 0)
        close(p->fd);
    free(p);
}

int lm_pool_info(struct lm_pool *p, struct lm_pool_info *out)
{
    if (!p || !out)
        return lm_fail("lm_pool_info: NULL argument", EINVAL);
    if (p->dead)
        return lm_fail("pool: inherited across fork(); the child has its own pools", ESTALE);
    struct stat st;
    if (fstat(p->fd, &st) < 0)
        return LM_FAIL("fstat(pool)");
    int seals = fcntl(p->fd, F_GET_SEALS);
    if (seals < 0)
        return LM_FAIL("fcntl(pool, F_GET_SEALS)");
    memset(out, 0, sizeof *out);
    out->id = p->id;
    out->npages = p->npages;
    out->page_size = p->page_size;
    out->role = p->role;
    out->slot = p->slot;
    out->sealed = (seals & F_SEAL_FUTURE_WRITE) != 0;
    out->fd = p->fd;
    /* Resident bytes: shmem counts the pages in its page cache in st_blocks, so this is what
       the pool costs in memory whoever maps it (cheap: no walk). */
    out->bytes = (uint64_t)st.st_blocks * 512u;
    out->inode = (uint64_t)st.st_ino;
    return 0;
}
