/*
 * store.c: the content stores a lazy page's contents come from, and reading them without
 * faulting: the canonical store (moved from region.c, unchanged) and the snapshot source file
 * (moved from snapshot.c), or a raw file served as a region's image (a .npy, .npz or
 * .safetensors file, docs/foreign-formats.md), the restore's table checks, lm_page_read, and
 * lm_meta_sync (the store's signatures first, then meta.c's sync of every lazy record).
 * The file format is in docs/snapshot-format.md; the Python side reads and checks the header
 * and hands the tables over.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "lm_internal.h"

#define SRC_CHECK_NS 10000000u   /* how often the store file is checked for changes (10 ms) */

_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "snapshot tables are little-endian");
_Static_assert(sizeof(struct lm_snap_page) == 4, "snapshot page-map entry is 4 bytes");

/* ---- canonical pages ----------------------------------------------------------------- */

const char *lm_canon_page(struct lm_region *r, uint32_t id)
{
    return r->canon_base + (size_t)(id - 1) * r->page_size;
}

int lm_canon_signature(struct lm_region *r, uint32_t id, uint64_t *sig)
{
    if (id == 0 || id > atomic_load_explicit(&r->canon_count, memory_order_acquire))
        return lm_fail("canonical id does not belong to this region", EINVAL);
    *sig = r->canon_sig[id - 1];
    return 0;
}

static int canon_index_insert(struct lm_region *r, uint64_t sig, uint32_t id)
{
    if ((size_t)(atomic_load(&r->canon_count) + 1) * 2 > r->canon_index_cap) {
        size_t cap = r->canon_index_cap * 2;
        uint32_t *idx = calloc(cap, sizeof(uint32_t));
        if (!idx)
            return lm_fail("calloc(canonical index)", ENOMEM);
        for (size_t i = 0; i < r->canon_index_cap; i++) {
            uint32_t old = r->canon_index[i];
            if (!old)
                continue;
            size_t h = r->canon_sig[old - 1] & (cap - 1);
            while (idx[h])
                h = (h + 1) & (cap - 1);
            idx[h] = old;
        }
        free(r->canon_index);
        r->canon_index = idx;
        r->canon_index_cap = cap;
    }
    size_t h = sig & (r->canon_index_cap - 1);
    while (r->canon_index[h])
        h = (h + 1) & (r->canon_index_cap - 1);
    r->canon_index[h] = id;
    return 0;
}

int lm_canonical(struct lm_region *r, const void *caller_page, uint32_t *id_out,
                 uint64_t *sig_out)
{
    /* The caller's buffer may change while we work (the GIL is released, and it may be a
       page of a region another thread stores to): one copy is taken, and that copy is what
       is hashed, compared and stored, so the stored bytes always have the recorded
       signature. Taken outside the lock: reading the buffer may fault. */
    char *page = malloc(r->page_size);
    if (!page)
        return lm_fail("malloc(canonical page)", ENOMEM);
    memcpy(page, caller_page, r->page_size);
    uint64_t sig = lm_xxh3(page, r->page_size);
    int rc = 0;
    pthread_mutex_lock(&r->canon_lock);
    size_t mask = r->canon_index_cap - 1;
    for (size_t h = sig & mask; r->canon_index[h]; h = (h + 1) & mask) {
        uint32_t id = r->canon_index[h];
        if (r->canon_sig[id - 1] == sig &&
            memcmp(lm_canon_page(r, id), page, r->page_size) == 0) {
            *id_out = id;
            goto out;
        }
    }
    uint32_t n = atomic_load(&r->canon_count);
    if (n >= r->canon_cap) {
        rc = lm_fail("canonical store full (one canonical page per region page)", ENOSPC);
        goto out;
    }
    uint32_t id = n + 1;
    memcpy((char *)lm_canon_page(r, id), page, r->page_size);
    r->canon_sig[id - 1] = sig;
    if ((rc = canon_index_insert(r, sig, id)) < 0)
        goto out;
    /* Publish: the fault path may read page `id` once a deferral names it. */
    atomic_store_explicit(&r->canon_count, id, memory_order_release);
    *id_out = id;
out:
    pthread_mutex_unlock(&r->canon_lock);
    free(page);
    if (rc == 0)
        *sig_out = sig;
    return rc;
}

/*
 * Canonical chunks (docs/shared-pages.md 3): a memfd holding `bytes` of copies of one
 * canonical page, which defer_fill maps MAP_PRIVATE over each whole 2 MiB block of a canonical
 * range, so that every page read there is the one shared page-cache page of the chunk, and a
 * store copies it (the chunk never changes). Filled with pwrite before anyone maps it (so no
 * reader can see it half-written), then sealed against writes and size changes: immutable, and
 * always complete (UFFDIO_CONTINUE never meets a hole). One per id, kept until the region ends.
 */
static int chunk_create(struct lm_region *r, uint32_t id, size_t bytes)
{
    size_t ps = r->page_size;
    const char *page = lm_canon_page(r, id);
    int fd = memfd_create("pylazymem-chunk", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0)
        return LM_FAIL("memfd_create(canonical chunk)");
    int rc = 0;
    char *map = MAP_FAILED;
    if (ftruncate(fd, (off_t)bytes) < 0) {
        rc = LM_FAIL("ftruncate(canonical chunk)");
        goto fail;
    }
    /* One page first, then the chunk made one huge folio (MADV_COLLAPSE refuses a range
       with no page), then the rest written into it through a shared mapping: a block mapped
       from the chunk is read through one PMD at its first read (a 1% random read of a 1 GiB
       template: 0.7 ms of faults instead of 4.8), and the chunk costs one copy (0.2 ms,
       against 1.1 for 512 small pages written and then collapsed). Without huge folios the
       same writes allocate small pages. */
    for (;;) {
        ssize_t k = pwrite(fd, page, ps, 0);
        if (k == (ssize_t)ps)
            break;
        if (k < 0 && errno == EINTR)
            continue;
        rc = k < 0 ? LM_FAIL("pwrite(canonical chunk)")
                   : lm_fail("pwrite(canonical chunk): short write", EIO);
        goto fail;
    }
    map = lm_map_aligned(bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) {
        rc = LM_FAIL("mmap(canonical chunk)");
        goto fail;
    }
    madvise(map, bytes, MADV_DONTFORK);
    lm_collapse(map, bytes);
    for (size_t o = ps; o < bytes; o += ps)
        memcpy(map + o, page, ps);
    munmap(map, bytes);   /* F_SEAL_WRITE needs no writable shared mapping left */
    if (fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE) < 0) {
        rc = LM_FAIL("fcntl(F_ADD_SEALS, canonical chunk)");
        goto fail;
    }
    return fd;
fail:
    close(fd);
    return rc;
}

int lm_canon_chunk_fd(struct lm_region *r, uint32_t id, size_t bytes)
{
    uint64_t sig;
    int rc = lm_canon_signature(r, id, &sig);   /* the id is this region's */
    if (rc < 0)
        return rc;
    if (bytes == 0 || bytes % r->page_size)
        return lm_fail("canonical chunk: size not a positive multiple of the page size", EINVAL);
    pthread_mutex_lock(&r->canon_lock);
    for (size_t i = 0; i < r->nchunks; i++) {
        if (r->chunks[i].canon == id) {
            rc = r->chunks[i].fd;
            goto out;
        }
    }
    if (r->nchunks == r->chunks_cap) {
        size_t cap = r->chunks_cap ? 2 * r->chunks_cap : 8;
        struct lm_chunk *c = realloc(r->chunks, cap * sizeof(*c));
        if (!c) {
            rc = lm_fail("realloc(canonical chunks)", ENOMEM);
            goto out;
        }
        r->chunks = c;
        r->chunks_cap = cap;
    }
    if ((rc = chunk_create(r, id, bytes)) >= 0)
        r->chunks[r->nchunks++] = (struct lm_chunk){id, rc};
out:
    pthread_mutex_unlock(&r->canon_lock);
    return rc;
}

/* The mappings keep a chunk's memory alive as long as they exist; the fds go with the region. */
void lm_canon_chunks_close(struct lm_region *r)
{
    for (size_t i = 0; i < r->nchunks; i++)
        close(r->chunks[i].fd);
    free(r->chunks);
    r->chunks = NULL;
    r->nchunks = r->chunks_cap = 0;
}

/*
 * A kernel-served chunk block becomes a registered one (docs/shared-pages.md 3, the rule in
 * lm_internal.h at LM_CHUNK_KERNEL): the one way any of our fill paths gets to act on one of
 * its pages (materialize, prefetch, a deferral of other contents over part of it). Every page
 * of the block is held (readers of it read its memory, and must not be reading when faults
 * start reaching us), the block registered MISSING | MINOR on the region's uffd (re-registering
 * an unregistered VMA of the same process: its pages stay mapped, a private copy keeps the
 * program's bytes), then the records made true from the page tables: a page the kernel mapped
 * is PRESENT (SHARED, or DATA when a store copied it), so no DEFERRED page of a registered
 * block is mapped; the others stay DEFERRED and their first touch is a MINOR fault now.
 */
static int take_over_block(struct lm_region *r, uint32_t *chunk_of, size_t b)
{
    size_t bp = r->blk_pages, first = b * bp;
    uint8_t old[LM_MAX_CLUSTER];
    uint64_t pm[LM_MAX_CLUSTER];
    if (bp > LM_MAX_CLUSTER)
        return lm_fail("chunk block larger than a cluster", EINVAL);
    for (size_t i = 0; i < bp; i++)
        old[i] = lm_claim_wait(r, first + i);
    int rc = lm_uffd_register(r->uffd, r->base + first * r->page_size, bp * r->page_size,
                              UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR);
    bool registered = rc == 0;
    if (rc == 0)
        rc = lm_ws_pagemap(r, first, bp, pm);
    if (rc < 0) {
        /* Left kernel-served, records unchanged: a block registered here is unregistered
           again. Should that fail too, a fault on its unmapped pages maps the chunk's page
           (serve.c: the fault path of a page whose block says kernel-served). */
        if (registered)
            (void)lm_uffd_unregister(r->uffd, r->base + first * r->page_size,
                                     bp * r->page_size);
        lm_unclaim(r, first, bp, old);
        return rc;
    }
    __atomic_store_n(&chunk_of[b], chunk_of[b] & ~LM_CHUNK_KERNEL, __ATOMIC_RELEASE);
    atomic_fetch_sub(&r->kernel_blocks, 1);
    lm_meta_release_registered(r, first, bp, old, pm);
    return 0;
}

/* Each run of kernel-served pool blocks (pool_kernel_map) registered MISSING | MINOR (reg)
   or unregistered; 0 or the first failure's -errno (the runs before it are done). */
static int pool_kernel_runs(struct lm_region *r, bool reg)
{
    size_t bp = r->blk_pages, ps = r->page_size;
    for (size_t b = 0; b < r->nblocks;) {
        if (!lm_bit(r->pool_kernel_map, b)) {
            b++;
            continue;
        }
        size_t e = b;
        while (e < r->nblocks && lm_bit(r->pool_kernel_map, e))
            e++;
        char *at = r->base + b * bp * ps;
        size_t len = (e - b) * bp * ps;
        int rc = reg ? lm_uffd_register(r->uffd, at, len,
                                        UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR)
                     : lm_uffd_unregister(r->uffd, at, len);
        if (rc < 0)
            return rc;
        b = e;
    }
    return 0;
}

/*
 * The kernel-served pool blocks (pool_kernel_map) become registered, all at once: every page
 * of those blocks held (readers read the memory of kernel-served pages), the blocks
 * registered MISSING | MINOR (pages the kernel mapped stay mapped), their page tables read,
 * then the records made true as for a chunk block (lm_meta_release_registered): mapped pages
 * PRESENT (SHARED, or DATA where a store copied it); the others back to ordinary lazy records
 * (a snapshot page NEEDS_UPDATE, a zero page nothing), served by the fault path from now on.
 * Only those blocks' pages are held: no fault of theirs can reach us before the registration
 * (so waiting for one never waits for a serving thread), while a page of a registered block
 * may be held by a reader whose copy faults (a dropped page) behind a serving thread that
 * waits for a page we would hold: a deadlock (found by review). A failure before any record
 * changes leaves the blocks kernel-served. Rare (a deferral, materialize or prefetch of such a
 * region): a pass over the pages of those blocks.
 */
int lm_pool_take_over(struct lm_region *r)
{
    size_t nk = atomic_load(&r->pool_kernel_blocks), bp = r->blk_pages, k;
    if (!nk)
        return 0;
    if (bp > LM_MAX_CLUSTER)
        return lm_fail("pool block larger than a cluster", EINVAL);
    uint64_t pm[LM_MAX_CLUSTER];
    /* per page of the k-th kernel-served block, at [k * bp]: its state before the hold, and
       what the page tables say (bit 0 mapped, bit 1 a file page): read before anything
       changes, one byte a page rather than the pagemap's eight */
    uint8_t *old = malloc(nk * bp), *pt = malloc(nk * bp);
    if (!old || !pt) {
        free(old);
        free(pt);
        return lm_fail("malloc(pool take-over)", ENOMEM);
    }
    k = 0;
    for (size_t b = 0; b < r->nblocks && k < nk; b++)
        if (lm_bit(r->pool_kernel_map, b)) {
            for (size_t i = 0; i < bp; i++)
                old[k * bp + i] = lm_claim_wait(r, b * bp + i);
            k++;
        }
    int rc = pool_kernel_runs(r, true);
    k = 0;
    for (size_t b = 0; b < r->nblocks && k < nk && rc == 0; b++)
        if (lm_bit(r->pool_kernel_map, b)) {
            if ((rc = lm_ws_pagemap(r, b * bp, bp, pm)) < 0)
                break;
            for (size_t i = 0; i < bp; i++)
                pt[k * bp + i] = (uint8_t)(((pm[i] & (LM_PM_PRESENT | LM_PM_SWAPPED)) ? 1 : 0) |
                                           ((pm[i] & LM_PM_FILE) ? 2 : 0));
            k++;
        }
    if (rc < 0) {
        (void)pool_kernel_runs(r, false);   /* still kernel-served, records unchanged */
        k = 0;
        for (size_t b = 0; b < r->nblocks && k < nk; b++)
            if (lm_bit(r->pool_kernel_map, b)) {
                lm_unclaim(r, b * bp, bp, old + k * bp);
                k++;
            }
        free(old);
        free(pt);
        return rc;
    }
    atomic_store_explicit(&r->pool_kernel_blocks, 0, memory_order_release);
    k = 0;
    for (size_t b = 0; b < r->nblocks && k < nk; b++) {
        if (!lm_bit(r->pool_kernel_map, b))
            continue;
        for (size_t i = 0; i < bp; i++) {
            struct lm_page_meta *m = &r->meta[b * bp + i];
            uint8_t t = pt[k * bp + i];
            pm[i] = (t & 1 ? LM_PM_PRESENT : 0) | (t & 2 ? LM_PM_FILE : 0);
            if (old[k * bp + i] == LM_DEFERRED && (m->flags & LM_F_SHARED) && !(t & 1))
                m->flags = m->cls == LM_CLS_SNAPSHOT ? LM_F_NEEDS_UPDATE : 0;
        }
        lm_meta_release_registered(r, b * bp, bp, old + k * bp, pm);
        k++;
    }
    free(old);
    free(pt);
    return 0;
}

int lm_chunk_take_over(struct lm_region *r, size_t first, size_t n, bool locked)
{
    if (atomic_load(&r->pool_kernel_blocks) &&
        first < r->npages / r->blk_pages * r->blk_pages) {
        if (!locked)
            pthread_mutex_lock(&r->chunk_lock);
        int rc = lm_pool_take_over(r);
        if (!locked)
            pthread_mutex_unlock(&r->chunk_lock);
        if (rc < 0)
            return rc;
    }
    uint32_t *chunk_of = atomic_load(&r->chunk_of);
    if (!chunk_of || !atomic_load(&r->kernel_blocks))
        return 0;
    int rc = 0;
    if (!locked)
        pthread_mutex_lock(&r->chunk_lock);
    size_t b1 = (first + n + r->blk_pages - 1) / r->blk_pages;
    for (size_t b = first / r->blk_pages; b < b1 && b < r->nblocks && rc == 0; b++)
        if (chunk_of[b] & LM_CHUNK_KERNEL)
            rc = take_over_block(r, chunk_of, b);
    if (!locked)
        pthread_mutex_unlock(&r->chunk_lock);
    return rc;
}

int lm_canonical_read(struct lm_region *r, uint32_t id, void *out)
{
    if (id == 0 || id > atomic_load_explicit(&r->canon_count, memory_order_acquire))
        return lm_fail("canonical id out of range", EINVAL);
    memcpy(out, lm_canon_page(r, id), r->page_size);
    return 0;
}

uint32_t lm_canonical_count(struct lm_region *r)
{
    return atomic_load(&r->canon_count);
}

/* ---- the snapshot source: one or more files (layers) ---------------------------------- */

#define LM_MAX_LAYERS 64

static void layer_free(struct lm_src_file *f)
{
    if (f->fd >= 0)
        close(f->fd);
    f->fd = -1;
    free(f->index);
    free(f->chk);
    lm_objs_free(f->objs);
    f->index = NULL;
    f->chk = NULL;
    f->objs = NULL;
}

void lm_source_forget_remote(struct lm_region *r)
{
    for (size_t i = 0; i < r->src_nlayers; i++) {
        lm_objs_forget(r->src_layers[i].objs);
        r->src_layers[i].objs = NULL;
    }
}

void lm_source_close(struct lm_region *r)
{
    for (size_t i = 0; i < r->src_nlayers; i++)
        layer_free(&r->src_layers[i]);
    free(r->src_layers);
    r->src_layers = NULL;
    r->src_nlayers = 0;
    r->src_nstored = 0;
    free(atomic_exchange(&r->src_sigs, NULL));
}

/* Take a layer's file: a duplicate of fd and what fstat said of it (the reference that
   source_still_valid compares against while pages are served). */
static int layer_take(struct lm_src_file *f, int fd, const struct stat *st)
{
    int dup = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (dup < 0)
        return LM_FAIL("fcntl(F_DUPFD_CLOEXEC)");
    f->fd = dup;
    f->size = st->st_size;
    f->mtime = st->st_mtim;
    atomic_store(&f->checked_ns, lm_now_ns());
    return 0;
}

/* A compressed layer's entry index, copied and checked: every word well-formed (codec known,
   length allowed for it), the lengths adding up to the store's size. The offset of every
   LM_SRC_CHK-th entry is kept (chk) so that any entry's offset is a few additions away. */
static int layer_index(struct lm_src_file *f, const uint32_t *index, size_t ps)
{
    uint64_t n = f->nstored;
    f->index = malloc((n ? n : 1) * sizeof(uint32_t));
    f->chk = malloc((n / LM_SRC_CHK + 1) * sizeof(uint64_t));
    if (!f->index || !f->chk)
        return lm_fail("malloc(snapshot entry index)", ENOMEM);
    memcpy(f->index, index, n * sizeof(uint32_t));
    uint64_t o = 0;
    for (uint64_t e = 0; e < n; e++) {
        if (e % LM_SRC_CHK == 0)
            f->chk[e / LM_SRC_CHK] = o;
        int rc = lm_entry_check(f->index[e], ps);
        if (rc < 0)
            return lm_fail("snapshot entry index: an entry's codec or length is not allowed",
                           EINVAL);
        o += LM_ENTRY_LEN(f->index[e]);
    }
    if (n % LM_SRC_CHK == 0)
        f->chk[n / LM_SRC_CHK] = o;
    if (o != f->store_bytes)
        return lm_fail("snapshot entry index: the lengths do not add up to the store's size",
                       EINVAL);
    return 0;
}

/* Publish the layers (the region owns them from here), then read the signatures now when
   pages are to be verified against them: every page with verify, and every page of a
   compressed layer always (layer_read says why). */
static int source_publish(struct lm_region *r, struct lm_src_file *files, size_t n,
                          uint64_t total, int verify)
{
    r->src_layers = files;
    r->src_nlayers = n;
    r->src_nstored = total;
    r->src_verify = verify != 0;
    bool compressed = false;
    for (size_t i = 0; i < n; i++)
        compressed |= files[i].index != NULL;
    int rc = verify || compressed ? lm_source_signatures(r) : 0;
    if (rc < 0)
        lm_source_close(r);
    return rc;
}

int lm_source_attach_layers(struct lm_region *r, const struct lm_src_layer *layers, size_t n,
                            int verify)
{
    if (r->src_nlayers)
        return lm_fail("region already has a snapshot source", EBUSY);
    if (n == 0 || n > LM_MAX_LAYERS || !layers)
        return lm_fail("snapshot source: 1 to 64 layers", EINVAL);
    struct lm_src_file *files = calloc(n, sizeof(*files));
    if (!files)
        return lm_fail("calloc(snapshot layers)", ENOMEM);
    for (size_t i = 0; i < n; i++)
        files[i].fd = -1;
    uint64_t total = 0, ps = r->page_size;
    int rc = 0;
    for (size_t i = 0; i < n && rc == 0; i++) {
        const struct lm_src_layer *l = &layers[i];
        struct lm_src_file *f = &files[i];
        struct stat st;
        if (fstat(l->fd, &st) < 0) {
            rc = LM_FAIL("fstat(snapshot)");
            break;
        }
        /* Sizes from a file, checked here as well as in Python: nothing below may wrap. */
        uint64_t size = (uint64_t)st.st_size, store_end, sigs_end, fixed;
        if (l->store_offset % ps || l->nstored > LM_SNAP_MAX_STORED ||
            __builtin_add_overflow(l->store_offset, l->store_bytes, &store_end) ||
            store_end > size || __builtin_mul_overflow(l->nstored, (uint64_t)8, &sigs_end) ||
            __builtin_add_overflow(sigs_end, l->sigs_offset, &sigs_end) || sigs_end > size) {
            rc = lm_fail("snapshot store or signatures outside the file", EINVAL);
            break;
        }
        if (__builtin_add_overflow(total, l->nstored, &total) || total > LM_SNAP_MAX_STORED) {
            rc = lm_fail("snapshot layers: more store entries than a page map can name", EINVAL);
            break;
        }
        if (!l->index && (__builtin_mul_overflow(l->nstored, ps, &fixed) ||
                          fixed != l->store_bytes)) {
            rc = lm_fail("snapshot store: size is not its entries times the page size", EINVAL);
            break;
        }
        f->first = total - l->nstored;
        f->nstored = l->nstored;
        f->store_off = l->store_offset;
        f->store_bytes = l->store_bytes;
        f->sigs_off = l->sigs_offset;
        f->sigs_xxh3 = l->sigs_xxh3;
        if (l->index && (rc = layer_index(f, l->index, ps)) < 0)
            break;
        rc = layer_take(f, l->fd, &st);
    }
    if (rc < 0) {
        for (size_t i = 0; i < n; i++)
            layer_free(&files[i]);
        free(files);
        return rc;
    }
    return source_publish(r, files, n, total, verify);
}

int lm_source_attach_remote(struct lm_region *r, const struct lm_src_layer *layer,
                            struct lm_objs *o, int verify)
{
    if (!o || !layer)
        return lm_fail("object store source: no store given", EINVAL);
    /* o's entries are the layer's, one for one (lm_objs_new checked each against its chunk) */
    if (lm_objs_nentries(o) != layer->nstored)
        return lm_fail("object store source: entry count differs from the snapshot's", EINVAL);
    int rc = lm_source_attach_layers(r, layer, 1, verify);
    if (rc < 0)
        return rc;
    r->src_layers[0].objs = o;   /* nothing reads the store before lm_restore_table */
    /* The signatures check what the chunk cache gives back (layer_decode): read now. */
    rc = lm_source_signatures(r);
    if (rc < 0) {
        r->src_layers[0].objs = NULL;   /* the caller still owns o */
        lm_source_close(r);
        return rc;
    }
    return 0;
}

int lm_source_objs_stats(struct lm_region *r, uint64_t *out)
{
    if (!r->src_nlayers || !r->src_layers[0].objs)
        return -ENOENT;
    lm_objs_stats(r->src_layers[0].objs, out);
    return 0;
}

int lm_source_attach(struct lm_region *r, int fd, uint64_t store_offset, uint64_t nstored,
                     uint64_t sigs_offset, uint64_t sigs_xxh3, int verify)
{
    uint64_t bytes;
    if (__builtin_mul_overflow(nstored, (uint64_t)r->page_size, &bytes))
        return lm_fail("snapshot store or signatures outside the file", EINVAL);
    struct lm_src_layer l = {fd, store_offset, bytes, nstored, NULL, sigs_offset, sigs_xxh3};
    return lm_source_attach_layers(r, &l, 1, verify);
}

int lm_source_attach_raw(struct lm_region *r, int fd, uint64_t nbytes, int verify)
{
    if (r->src_nlayers)
        return lm_fail("region already has a snapshot source", EBUSY);
    struct stat st;
    if (fstat(fd, &st) < 0)
        return LM_FAIL("fstat(raw source)");
    if (!S_ISREG(st.st_mode))
        return lm_fail("raw source: not a regular file", EINVAL);
    /* The caller parsed the file at this size: a different size now means it changed. */
    if ((uint64_t)st.st_size != nbytes)
        return lm_fail("raw source: the file's size differs from the size it was read at "
                       "(changed since)", ESTALE);
    uint64_t ps = r->page_size, entries = nbytes / ps + (nbytes % ps != 0);
    if (nbytes == 0 || entries > LM_SNAP_MAX_STORED || entries > r->npages)
        return lm_fail("raw source: empty, or more pages than the region or a page map holds",
                       EINVAL);
    struct lm_src_file *f = calloc(1, sizeof(*f));
    if (!f)
        return lm_fail("calloc(snapshot layers)", ENOMEM);
    f->fd = -1;
    f->raw = true;
    f->raw_bytes = nbytes;
    f->store_off = 0;   /* entry i is the file's page i: the region is the file's image */
    f->nstored = entries;
    f->store_bytes = entries * ps;
    int rc = layer_take(f, fd, &st);
    if (rc < 0) {
        free(f);
        return rc;
    }
    return source_publish(r, f, 1, entries, verify);
}

static int src_pread(struct lm_src_file *f, void *dst, size_t len, uint64_t off,
                     unsigned how);

static int layer_read(struct lm_region *r, struct lm_src_file *f, uint64_t e, size_t count,
                      char *dst, uint8_t *bad, size_t *got);

/* A raw source has no signature section: hash its pages (one sequential read of the whole
   file, 4 MiB at a time). Never made up: a page whose contents cannot be read fails here. */
static int raw_signatures(struct lm_region *r, struct lm_src_file *f, uint64_t *sigs)
{
    size_t ps = r->page_size, chunk = (4u << 20) / ps ? (4u << 20) / ps : 1;
    char *buf = malloc(chunk * ps);
    if (!buf)
        return lm_fail("malloc(raw source signatures)", ENOMEM);
    int rc = 0;
    for (uint64_t i = 0; i < f->nstored && rc == 0;) {
        size_t k = f->nstored - i < chunk ? (size_t)(f->nstored - i) : chunk, got;
        rc = layer_read(r, f, i, k, buf, NULL, &got);
        for (size_t j = 0; rc == 0 && j < k; j++)
            sigs[i + j] = lm_xxh3(buf + j * ps, ps);
        i += k;
    }
    free(buf);
    return rc;
}

/*
 * The store's signatures are needed only to verify pages, to checkpoint a restored region
 * again (deduplication and the new file's signatures without reading the store) and to show
 * lazy pages' signatures (Region.meta, signatures()), so restore() does not read them. A
 * source of several layers has its layers' signature sections one after the other (global
 * ids), each checked against its own checksum.
 */
int lm_source_signatures(struct lm_region *r)
{
    if (!r->src_nlayers || atomic_load(&r->src_sigs))
        return 0;
    size_t n = r->src_nstored;
    uint64_t *sigs = malloc((n ? n : 1) * sizeof(uint64_t));
    if (!sigs)
        return lm_fail("malloc(snapshot signatures)", ENOMEM);
    int rc = 0;
    for (size_t i = 0; i < r->src_nlayers && rc == 0; i++) {
        struct lm_src_file *f = &r->src_layers[i];
        if (f->raw) {
            rc = raw_signatures(r, f, sigs + f->first);
        } else {
            rc = src_pread(f, sigs + f->first, f->nstored * sizeof(uint64_t), f->sigs_off, 0);
            if (rc == 0 &&
                lm_xxh3(sigs + f->first, f->nstored * sizeof(uint64_t)) != f->sigs_xxh3)
                rc = lm_fail("snapshot signatures: checksum mismatch (corrupt signature "
                             "section)", EBADMSG);
        }
    }
    if (rc < 0) {
        free(sigs);
        return rc;
    }
    uint64_t *none = NULL;
    if (!atomic_compare_exchange_strong(&r->src_sigs, &none, sigs)) {
        free(sigs);   /* another thread read them first */
        return 0;
    }
    lm_meta_fill_signatures(r, sigs);   /* records filled before now have signature 0 */
    return 0;
}

/* A store that changes under a running restore must fail loudly, not serve mixed data. */
static int source_still_valid(struct lm_src_file *f)
{
    int broken = atomic_load_explicit(&f->broken, memory_order_relaxed);
    if (broken)
        return broken;
    uint64_t now = lm_now_ns();
    uint64_t last = atomic_load_explicit(&f->checked_ns, memory_order_relaxed);
    if (now - last < SRC_CHECK_NS)
        return 0;
    atomic_store_explicit(&f->checked_ns, now, memory_order_relaxed);
    struct stat st;
    if (fstat(f->fd, &st) < 0)
        broken = -errno;
    else if (st.st_size != f->size || st.st_mtim.tv_sec != f->mtime.tv_sec ||
             st.st_mtim.tv_nsec != f->mtime.tv_nsec)
        broken = -ESTALE;
    if (broken)
        atomic_store(&f->broken, broken);
    return broken;
}

/* Byte offset of entry e (e <= nstored) in a compressed layer's store. */
static uint64_t entry_off(const struct lm_src_file *f, uint64_t e)
{
    uint64_t o = f->chk[e / LM_SRC_CHK];
    for (uint64_t k = e - e % LM_SRC_CHK; k < e; k++)
        o += LM_ENTRY_LEN(f->index[k]);
    return o;
}

/*
 * Entries [e, e + count) of one layer into dst (count pages); *got = bytes read from the file.
 * A raw source's last entry is the file's tail: the bytes past its end read as zero (the file
 * is not a whole number of pages), which is not truncation; the file's size is still watched.
 * A compressed run is one pread of its entries' bytes, into the tail of dst (they take at
 * most count pages), then each entry is decoded into its page from the first on: entry j's
 * input starts at or after page j (the entries after it take at most a page each), so
 * decoding it never overwrites an input not yet decoded; only its own input may overlap its
 * page, and is then copied aside first. An entry that does not decode is an error (bad ==
 * NULL) or marked in bad[] (its page in dst is then not to be used).
 * Every page of a compressed layer is checked against its signature once decoded, with or
 * without verify: an LZ4 block has no checksum of its own (nor a zstd frame written without
 * one), so a flipped byte in a literal would otherwise decode to a page of wrong bytes. The
 * hash costs ~0.2 us a page beside ~2-10 us of decoding; the signatures are read when the
 * layer is attached (source_publish).
 */
/* Bytes that entries [e, e + count) of a layer take in its store (count pages without an
   index): what a read packs at the end of its destination. */
static size_t packed_len(const struct lm_region *r, const struct lm_src_file *f, uint64_t e,
                         size_t count)
{
    if (!f->index)
        return count * r->page_size;
    size_t n = 0;
    for (size_t j = 0; j < count; j++)
        n += LM_ENTRY_LEN(f->index[e + j]);
    return n;
}

static int layer_fetch(struct lm_region *r, struct lm_src_file *f, uint64_t e, size_t count,
                       char *dst, size_t *got, unsigned how)
{
    size_t ps = r->page_size, len = count * ps;
    if (f->objs) {   /* in an object store: raw entries in place, compressed ones packed last */
        size_t clen = packed_len(r, f, e, count);
        int rc = lm_objs_gather(f->objs, e, count, f->index, ps, dst + len - clen);
        if (rc == 0)
            *got = clen;
        return rc;
    }
    if (!f->index) {
        uint64_t off = f->store_off + e * ps;
        size_t avail = len;
        if (f->raw)
            avail = off >= f->raw_bytes ? 0
                    : f->raw_bytes - off < len ? (size_t)(f->raw_bytes - off) : len;
        int rc = src_pread(f, dst, avail, off, how);
        if (rc < 0)
            return rc;
        memset(dst + avail, 0, len - avail);
        *got = avail;
        return 0;
    }
    size_t clen = packed_len(r, f, e, count);   /* <= count pages: each entry is at most one */
    int rc = src_pread(f, dst + len - clen, clen, f->store_off + entry_off(f, e), how);
    if (rc == 0)
        *got = clen;
    return rc;
}

/* The second half of a read: decode what layer_fetch left packed at the tail of dst. */
static int objs_decode(struct lm_region *r, struct lm_src_file *f, uint64_t e, size_t count,
                       char *dst, uint8_t *bad);

static int layer_decode(struct lm_region *r, struct lm_src_file *f, uint64_t e, size_t count,
                        char *dst, uint8_t *bad)
{
    if (bad)
        memset(bad, 0, count);
    if (f->objs)
        return objs_decode(r, f, e, count, dst, bad);
    if (!f->index)
        return 0;   /* raw entries were read in place */
    size_t ps = r->page_size, clen = packed_len(r, f, e, count);
    const char *in = dst + count * ps - clen;
    const uint64_t *sigs = atomic_load_explicit(&r->src_sigs, memory_order_acquire);
    char small[4096], *aside = NULL;
    int rc = 0;
    for (size_t j = 0, at = 0; j < count; j++) {
        uint32_t w = f->index[e + j];
        size_t elen = LM_ENTRY_LEN(w);
        const char *src = in + at;
        char *out = dst + j * ps;
        at += elen;
        if (LM_ENTRY_CODEC(w) != LM_CODEC_RAW && src < out + ps) {
            if (!aside)
                aside = ps <= sizeof(small) ? small : malloc(ps);
            if (!aside)
                return lm_fail("malloc(decompression buffer)", ENOMEM);
            memcpy(aside, src, elen);
            src = aside;
        }
        rc = lm_unpack_entry(src, elen, w, ps, out);
        if (rc == 0 && (!sigs || lm_xxh3(out, ps) != sigs[f->first + e + j]))
            rc = lm_fail(sigs ? "snapshot store: a decoded page differs from its signature "
                                "(corrupt compressed entry)"
                              : "snapshot store: compressed entries without signatures",
                         EBADMSG);
        if (rc < 0) {
            if (!bad)
                break;
            bad[j] = 1;
            rc = 0;
        }
    }
    if (aside && aside != small)
        free(aside);
    return rc;
}

/*
 * An object store's entries as gathered (raw ones in place, compressed ones packed last, as
 * layer_fetch leaves a file's): every entry is checked against its signature once decoded,
 * raw ones too, because the chunk cache on disk is not trusted (objstore.c); one that fails
 * is read again from the bucket (its cache file removed) and checked again, and only then
 * counts as bad. Compressed entries are first moved to a buffer of their own (decoding in
 * place would overwrite inputs the retry may still need).
 */
static int objs_decode(struct lm_region *r, struct lm_src_file *f, uint64_t e, size_t count,
                       char *dst, uint8_t *bad)
{
    size_t ps = r->page_size, clen = 0;
    const uint64_t *sigs = atomic_load_explicit(&r->src_sigs, memory_order_acquire);
    if (!sigs)
        return lm_fail("object store source without signatures", EBADMSG);
    char *packed = NULL;
    if (f->index) {
        clen = packed_len(r, f, e, count);
        packed = malloc(clen ? clen : 1);
        if (!packed)
            return lm_fail("malloc(decompression input)", ENOMEM);
        memcpy(packed, dst + count * ps - clen, clen);
    }
    char again[4096], *aside = ps <= sizeof(again) ? again : malloc(ps);
    int rc = aside ? 0 : lm_fail("malloc(object store entry)", ENOMEM);
    for (size_t j = 0, at = 0; j < count && rc == 0; j++) {
        uint32_t w = f->index ? f->index[e + j] : (uint32_t)ps;
        size_t elen = f->index ? LM_ENTRY_LEN(w) : ps;
        char *out = dst + j * ps;
        const char *src = f->index ? packed + at : out;
        at += elen;
        int ok = 0;
        for (int attempt = 0; attempt < 2 && !ok; attempt++) {
            if (attempt) {   /* once more, from the bucket */
                int rr = lm_objs_reread(f->objs, e + j, elen, aside);
                if (rr < 0) {
                    /* A chunk the bucket refuses (corrupt, EBADMSG) or lacks (ENOENT): the
                       entry is bad for good. Anything else (the network after its retries,
                       refused credentials, no memory) may pass: the whole read fails, so
                       that its pages stay lazy and the caller raises, instead of poisoning
                       pages the bucket holds intact. */
                    if (!bad || (rr != -EBADMSG && rr != -ENOENT))
                        rc = rr;
                    break;
                }
                src = aside;
            }
            int dr = f->index ? lm_unpack_entry(src, elen, w, ps, out)
                              : (src != out ? (memcpy(out, src, ps), 0) : 0);
            ok = dr == 0 && lm_xxh3(out, ps) == sigs[f->first + e + j];
        }
        if (!ok && rc == 0) {
            if (bad)
                bad[j] = 1;
            else
                /* "object store:": Python raises ObjectStoreError for it (_errors.py) */
                rc = lm_fail("object store: an entry differs from its signature in the bucket "
                             "too (a corrupt chunk, or a manifest that points elsewhere)",
                             EBADMSG);
        }
    }
    if (aside != again)
        free(aside);
    free(packed);
    return rc;
}

static int layer_read(struct lm_region *r, struct lm_src_file *f, uint64_t e, size_t count,
                      char *dst, uint8_t *bad, size_t *got)
{
    int rc = layer_fetch(r, f, e, count, dst, got, 0);
    return rc ? rc : layer_decode(r, f, e, count, dst, bad);
}

/* The layer holding global entry id `index` (the layers' ids are ascending). */
static struct lm_src_file *layer_of(struct lm_region *r, uint64_t index)
{
    size_t lo = 0, hi = r->src_nlayers;
    while (hi - lo > 1) {
        size_t mid = (lo + hi) / 2;
        if (r->src_layers[mid].first <= index)
            lo = mid;
        else
            hi = mid;
    }
    return &r->src_layers[lo];
}

/* Walks the layers that entries [index, index + count) span: fetch (decode == false) or
   decode each layer's part of dst. The split lets the prefetch pipeline read on one thread
   and decode on the others: decoding, not the disk, bounds a compressed prefetch. */
static int src_walk(struct lm_region *r, uint64_t index, size_t count, void *dst, uint8_t *bad,
                    bool decode, unsigned how)
{
    if (!r->src_nlayers)
        return lm_fail("snapshot page without a snapshot source", ENOENT);
    if (index > r->src_nstored || count > r->src_nstored - index)
        return lm_fail("snapshot store index out of range", ERANGE);
    size_t total = 0, done = 0;
    int rc = 0;
    while (done < count && rc == 0) {
        struct lm_src_file *f = layer_of(r, index + done);
        uint64_t e = index + done - f->first;
        size_t k = count - done, got = 0;
        if (k > f->nstored - e)
            k = (size_t)(f->nstored - e);   /* the rest comes from the next layer */
        char *part = (char *)dst + done * r->page_size;
        if (decode)
            rc = layer_decode(r, f, e, k, part, bad ? bad + done : NULL);
        else
            rc = layer_fetch(r, f, e, k, part, &got, how);
        total += got;
        done += k;
    }
    if (!decode)
        atomic_fetch_add_explicit(&r->st_src_bytes, total, memory_order_relaxed);
    return rc;
}

int lm_src_fetch(struct lm_region *r, uint64_t index, size_t count, void *dst)
{
    return src_walk(r, index, count, dst, NULL, false, 0);
}

int lm_src_decode(struct lm_region *r, uint64_t index, size_t count, void *dst, uint8_t *bad)
{
    return src_walk(r, index, count, dst, bad, true, 0);
}

static int src_read(struct lm_region *r, uint64_t index, size_t count, void *dst, uint8_t *bad,
                    unsigned how)
{
    int rc = src_walk(r, index, count, dst, NULL, false, how);
    return rc ? rc : src_walk(r, index, count, dst, bad, true, 0);
}

int lm_src_read_each(struct lm_region *r, uint64_t index, size_t count, void *dst,
                     uint8_t *bad)
{
    return src_read(r, index, count, dst, bad, 0);
}

int lm_src_read(struct lm_region *r, uint64_t index, size_t count, void *dst, unsigned how)
{
    return src_read(r, index, count, dst, NULL, how);
}

/*
 * Reading ahead of the copies. A fill reads its store entries with pread and then copies them;
 * while it copies, the disk would idle (the kernel's own readahead window is small next to a
 * 1-4 MiB read). Telling the kernel what comes next keeps the disk reading during the copy:
 * the background fill and the prefetch pipeline hint the next chunk before they copy this one.
 */
bool lm_src_follows_streams(const struct lm_region *r)
{
    return r->src_nlayers && !r->src_layers[0].objs;   /* files: the kernel reads ahead */
}

void lm_src_willneed(struct lm_region *r, uint64_t index, size_t count)
{
    if (!r->src_nlayers || index >= r->src_nstored)
        return;
    if (r->src_layers[0].objs) {   /* one layer: its chunks fetched ahead */
        lm_objs_willneed(r->src_layers[0].objs, index, count);
        return;
    }
    if (count > r->src_nstored - index)
        count = r->src_nstored - index;
    while (count) {
        struct lm_src_file *f = layer_of(r, index);
        uint64_t e = index - f->first, k = count;
        if (k > f->nstored - e)
            k = f->nstored - e;
        uint64_t a = f->index ? entry_off(f, e) : e * r->page_size;
        uint64_t b = f->index ? entry_off(f, e + k) : (e + k) * r->page_size;
        (void)posix_fadvise(f->fd, (off_t)(f->store_off + a), (off_t)(b - a),
                            POSIX_FADV_WILLNEED);
        index += k;
        count -= k;
    }
}

#ifndef RWF_DONTCACHE
#define RWF_DONTCACHE 0x00000080   /* linux/fs.h of Linux 6.14 */
#endif

/* pread, or with LM_SRC_ONCE a read that leaves no page of its own in the page cache where
   the file system can (see LM_SRC_ONCE); a refusal is remembered per file. */
static ssize_t pread_how(struct lm_src_file *f, void *dst, size_t len, off_t off, unsigned how)
{
    if ((how & LM_SRC_ONCE) && !atomic_load_explicit(&f->no_dontcache, memory_order_relaxed)) {
        struct iovec iov = {.iov_base = dst, .iov_len = len};
        ssize_t got = preadv2(f->fd, &iov, 1, off, RWF_DONTCACHE);
        if (got >= 0 || errno == EINTR)
            return got;
        /* the flag is advice: whatever refused it (an old kernel or file system, a seccomp
           filter: EOPNOTSUPP, ENOSYS, EPERM), a plain read may work, and says what is wrong
           if not */
        atomic_store_explicit(&f->no_dontcache, true, memory_order_relaxed);
    }
    return pread(f->fd, dst, len, off);
}

static int src_pread(struct lm_src_file *f, void *dst, size_t len, uint64_t offset, unsigned how)
{
    int broken = source_still_valid(f);
    if (broken)
        return lm_fail("snapshot file changed or vanished under a running restore", -broken);
    size_t done = 0;
    off_t off = (off_t)offset;
    while (done < len) {
        ssize_t got = pread_how(f, (char *)dst + done, len - done, off + (off_t)done, how);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            return LM_FAIL("pread(snapshot)");
        }
        if (got == 0) {
            atomic_store(&f->broken, -ENODATA);
            return lm_fail("pread(snapshot): file truncated under a running restore", ENODATA);
        }
        done += (size_t)got;
    }
    return 0;
}

/* ---- restore ------------------------------------------------------------------------- */

int lm_snap_check(const struct lm_snap_page *map, size_t npages, uint64_t nstored,
                  const uint64_t *ws, size_t nws, uint64_t *counts)
{
    /* Sizes from a file: bounded here too, before they size anything (the format's limits,
       as pylazymem/_snapfile.py checks them). */
    if (npages == 0 || npages > LM_SNAP_MAX_PAGES || nstored > npages ||
        nstored > LM_SNAP_MAX_STORED || nws > npages)
        return lm_fail("snapshot check: page, store or working-set count out of range", EINVAL);
    int rc = 0;
    uint64_t *used = calloc((nstored + 63) / 64 + 1, sizeof(uint64_t));
    uint64_t *in_ws = calloc((npages + 63) / 64 + 1, sizeof(uint64_t));
    if (!used || !in_ws) {
        rc = lm_fail("snapshot check: out of memory", ENOMEM);
        goto out;
    }
    for (size_t i = 0; i < nws; i++) {
        if (ws[i] >= npages) {
            rc = lm_fail("working set names a page outside the region", EINVAL);
            goto out;
        }
        if (in_ws[ws[i] >> 6] & ((uint64_t)1 << (ws[i] & 63))) {
            rc = lm_fail("working set lists a page twice", EINVAL);
            goto out;
        }
        in_ws[ws[i] >> 6] |= (uint64_t)1 << (ws[i] & 63);
    }
    /* Branch-free: the classes of neighbouring pages are as good as random. */
    uint64_t c[LM_SNAP_STORED] = {0, 0}, top = 0;
    for (size_t i = 0; i < npages; i++) {
        uint64_t e = map[i].entry;
        top = e > top ? e : top;
        c[0] += e == LM_SNAP_UNTOUCHED;
        c[1] += e == LM_SNAP_ZERO;
        uint64_t k = e - LM_SNAP_STORED;   /* wraps for the two classes that are not stored */
        used[(k < nstored ? k : nstored + 63) >> 6] |= (uint64_t)(k < nstored) << (k & 63);
    }
    if (top >= nstored + LM_SNAP_STORED) {
        rc = lm_fail("page map points past the end of the store", EINVAL);
        goto out;
    }
    for (uint64_t w = 0; w < nstored / 64; w++)
        if (used[w] != ~(uint64_t)0) {
            rc = lm_fail("store has entries no page uses", EINVAL);
            goto out;
        }
    if (nstored % 64 && used[nstored / 64] != ((uint64_t)1 << (nstored % 64)) - 1) {
        rc = lm_fail("store has entries no page uses", EINVAL);
        goto out;
    }
    if (counts) {
        counts[0] = c[0];
        counts[1] = c[1];
        counts[2] = npages - c[0] - c[1];
    }
out:
    free(used);
    free(in_ws);
    return rc;
}

/* One walk over the pool's holes below its header page (SEEK_HOLE / SEEK_DATA: the page cache
   is the record of what is filled, 2.4). Linear in the holes: a SEEK_HOLE from every block's
   start would walk the rest of the pool each time. */
int lm_pool_complete(struct lm_region *r, uint64_t *holey)
{
    if (!r->pool_want || r->pool_fd < 0)
        return 0;
    off_t ps = (off_t)r->page_size, end = (off_t)r->npages * ps, pos = 0;
    size_t bp = r->blk_pages;
    while (pos < end) {
        off_t h = lseek(r->pool_fd, pos, SEEK_HOLE);
        if (h < 0)
            return LM_FAIL("lseek(pool, SEEK_HOLE)");
        if (h >= end)
            break;
        off_t d = lseek(r->pool_fd, h, SEEK_DATA);
        if (d < 0 && errno != ENXIO)
            return LM_FAIL("lseek(pool, SEEK_DATA)");
        if (d < 0 || d > end)
            d = end;
        size_t q0 = (size_t)(h / ps), q1 = (size_t)((d + ps - 1) / ps);
        for (size_t q = q0; q < q1; q++)
            if (lm_bit(r->pool_want, q))
                return 0;
        for (size_t blk = q0 / bp; holey && blk <= (q1 - 1) / bp; blk++)
            holey[blk >> 6] |= (uint64_t)1 << (blk & 63);
        pos = d > h ? d : h + ps;
    }
    return 1;
}

/* At most this many runs of kernel-served blocks in a region (each a VMA of its own, and one
   for the registered run after it): a pool with more holey blocks than that is served
   registered, within any vm.max_map_count. */
#define POOL_KERNEL_MAX_RUNS 64

/*
 * A shared restore's table (docs/shared-pages.md 2.5, 2.8): which pages the pool must hold to
 * be complete (r->pool_want, kept for lm_pool_finish after the table is gone), and which of the
 * region's blocks the kernel serves from the start. That takes a pool complete and sealed
 * (sealed by lm_pool_finish, and complete by this region's own table: a pool sealed by anyone
 * else before it was complete is not), a program that asked for it (config.shared_first_touch
 * false: its first touches are not seen, so no working set), no verify= (pages are mapped
 * without a check), a pool we may write (not a page server's, which serves the faults), and,
 * per 2 MiB block, no hole in the pool (lm_pool_finish fills the zero pages of blocks that
 * hold data; a block of zeros only stays a hole, registered, served with the zero page).
 * Those blocks are unregistered before any page is touched; their records come from the
 * table as DEFERRED SHARED (meta.c, apply_table).
 */
static int pool_table(struct lm_region *r, const struct lm_snap_page *map)
{
    size_t words = (r->npages + 63) / 64;
    uint64_t *want = calloc(words ? words : 1, sizeof(uint64_t));
    if (!want)
        return lm_fail("calloc(pool bitmap)", ENOMEM);
    for (size_t p = 0; p < r->npages; p++)
        if (map[p].entry >= LM_SNAP_STORED)
            want[p >> 6] |= (uint64_t)1 << (p & 63);
    free(r->pool_want);
    r->pool_want = want;
    size_t whole = r->blk_pages > 1 ? r->npages / r->blk_pages : 0;
    int acc = fcntl(r->pool_fd, F_GETFL), seals = fcntl(r->pool_fd, F_GET_SEALS);
    if (r->cfg.shared_first_touch != LM_FT_KERNEL || r->cfg.verify_shared || !whole ||
        acc < 0 || (acc & O_ACCMODE) == O_RDONLY || seals < 0 || !(seals & F_SEAL_FUTURE_WRITE))
        return 0;
    size_t nw = (r->nblocks + 63) / 64 + 1;
    uint64_t *kmap = calloc(nw, sizeof(uint64_t)), *holey = calloc(nw, sizeof(uint64_t));
    if (!kmap || !holey || lm_pool_complete(r, holey) != 1) {
        free(kmap);   /* incomplete, or no memory: served registered (correct, only slower) */
        free(holey);
        return 0;
    }
    /* the blocks without a hole */
    size_t nk = 0, runs = 0;
    for (size_t b = 0; b < whole; b++) {
        if (lm_bit(holey, b))
            continue;
        kmap[b >> 6] |= (uint64_t)1 << (b & 63);
        runs += !nk || !lm_bit(kmap, b - 1);
        nk++;
    }
    free(holey);
    free(r->pool_kernel_map);
    r->pool_kernel_map = kmap;
    if (!nk || runs > POOL_KERNEL_MAX_RUNS)
        return 0;
    atomic_store(&r->vma_blocks, true);   /* before any VMA is split: runs stop at blocks */
    if (pool_kernel_runs(r, false) < 0) {
        (void)pool_kernel_runs(r, true);   /* a partial unregistration undone */
        return 0;
    }
    atomic_store_explicit(&r->pool_kernel_blocks, nk, memory_order_release);
    return 0;
}

int lm_restore_table(struct lm_region *r, const struct lm_snap_page *map, size_t npages,
                     uint64_t nstored)
{
    if (npages != r->npages)
        return lm_fail("snapshot page count differs from the region's", EINVAL);
    if (nstored > r->src_nstored || nstored > LM_SNAP_MAX_STORED)
        return lm_fail("page map names more store entries than the source has", EINVAL);
    /* Every store index the fault path will read must be in range (a vectorised max). */
    uint32_t top = 0;
    for (size_t i = 0; i < npages; i++)
        top = map[i].entry > top ? map[i].entry : top;
    if ((uint64_t)top >= nstored + LM_SNAP_STORED)
        return lm_fail("page map: store index out of range", EINVAL);
    /* "Unused" and the install under the records lock: a deferral cannot slip in between. */
    int rc = 0;
    lm_records_lock(r);
    if (!lm_meta_pristine(r) || r->used || atomic_load(&r->st_faults) ||
        atomic_load(&r->st_present))
        rc = lm_fail("restore into a region that is already in use", EBUSY);
    else if (r->pool_fd >= 0 && (rc = pool_table(r, map)) < 0)
        ;
    else
        lm_meta_install_base(r, map);   /* the caller keeps `map` alive (lazymem.h) */
    lm_records_unlock(r);
    return rc;
}

/* ---- syncing every record ------------------------------------------------------------ */

int lm_meta_sync(struct lm_region *r)
{
    /* Records of restored pages carry signatures only once the snapshot's signature section
       has been read: whoever reads every record needs them. A failure to read them (a corrupt
       section) leaves those signatures 0 (unknown) and is returned. Under the records lock,
       so that a second caller waits until the first has given lazy records their signatures.
       (Moved from region.c: checkpoint.c, above this layer, calls it.) */
    lm_records_lock(r);
    int rc = lm_source_signatures(r);
    lm_meta_sync_locked(r);
    /* A shared region's pages mapped from the pool, and canonical pages mapped from a chunk
       (region.c), may have been written (copied by the kernel, unseen by us): the page
       tables say which. */
    bool chunks = atomic_load(&r->chunk_vmas) > 0;
    int src = r->pool_fd >= 0 || chunks ? lm_ws_scan_private(r, lm_meta_note_private) : 0;
    lm_records_unlock(r);
    return rc < 0 ? rc : src < 0 ? src : 0;
}

/* ---- reading contents without faulting ----------------------------------------------- */

/* The contents of page p, held by the caller (lm_hold) in state s, without faulting it in. */
int lm_read_held(struct lm_region *r, size_t p, uint8_t s, void *out)
{
    return lm_read_record(r, p, &r->meta[p], s, out);
}

int lm_read_record(struct lm_region *r, size_t p, const struct lm_page_meta *m, uint8_t s,
                   void *out)
{
    if (s == LM_PRESENT) {   /* pinned: a fault here is served without waiting for us */
        memcpy(out, r->base + p * r->page_size, r->page_size);
        return 0;
    }
    if (s == LM_POISONED)
        return lm_fail("page_read: the page is poisoned (its contents could not be served)",
                       EHWPOISON);
    if ((m->flags & LM_F_SHARED) && lm_kernel_page(r, p)) {
        /* Kernel-served: the page tables are the truth (the template or the pool's page, or
           what a store since the last sync wrote), and reading the memory raises no fault
           that reaches us. */
        memcpy(out, r->base + p * r->page_size, r->page_size);
        return 0;
    }
    if (m->cls == LM_CLS_CANONICAL)
        memcpy(out, lm_canon_page(r, m->canon), r->page_size);
    else if (m->cls == LM_CLS_SNAPSHOT)
        return lm_src_read(r, m->aux, 1, out, 0);
    else
        memset(out, 0, r->page_size);
    return 0;
}

int lm_page_read(struct lm_region *r, size_t page, void *out)
{
    if (page >= r->npages)
        return lm_fail("page index outside the region", ERANGE);
    /* Held, so that it cannot change (a deferral, a fill, a poisoning) while it is read. */
    uint8_t s = lm_hold(r, page);
    int rc = lm_read_held(r, page, s, out);
    lm_unhold(r, page, s);
    return rc;
}
