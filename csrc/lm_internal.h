/*
 * lm_internal.h: structures shared by the C core's files; never seen by the bindings.
 *
 * The core is built in layers: a file calls only functions defined in files of lower layers
 * (its own static functions aside), so there are no cycles between files and one file
 * (meta.c) owns the page record. tests/test_layering.py checks the compiled objects against
 * this list (it reads the block below; docs/design.md, "Layers", mirrors it). Files on one
 * line form one layer and may not call each other.
 *
 * LAYERS BEGIN (bottom first)
 *   util.c        errors (lm_fail), clock, page size, hashing, thread start, latency histogram
 *   codec.c       compressing store entries (zstd, LZ4) and decoding one into a page, checked
 *   objstore.c    store entries in an S3 object store: chunk fetch (libcurl, SigV4), the
 *                 per-machine chunk cache, every chunk checked against its content id
 *   uffd.c        acquiring a userfaultfd, probe, the uffd ioctls and their EEXIST/EAGAIN policy
 *   server.c      the page server for other processes (util and uffd only)
 *   dirty.c       dirty tracking: the write-protect harvest (PAGEMAP_SCAN), dirty bitmaps
 *   meta.c        THE page record: claims, releases, every state transition, lazy records
 *   wstrack.c     the working-set window (reads records' first-touch order)
 *   store.c pool.c  content stores (canonical pages and their shared chunks, the snapshot
 *                 source file; page_read, restore); the shared-pages pool object (create,
 *                 attach and its checks, info)
 *   pooldir.c     finding one another's pools (abstract sockets, SCM_RIGHTS), the pool thread
 *   fill.c        filling claimed pages: assemble from the stores, COPY/ZEROPAGE/CONTINUE, poison
 *   freeze.c      a background checkpoint's pause (staging by mremap), serving staged pages,
 *                 the region as it was at the pause (views), bringing pages back
 *   serve.c       serving threads: fault messages, readahead streams, split-fill helper
 *   prefetch.c    restore's working-set prefetch pipeline and the background fill
 *   checkpoint.c  signatures, checkpoint plan / compare / write
 *   remote.c      served by a page server in another process: watcher, sync_present
 *   region.c      create / destroy / forget, defer_fill (incl. mapping canonical chunks and
 *                 their VMA budget), stats, timeline
 * LAYERS END
 */
#ifndef LM_INTERNAL_H
#define LM_INTERNAL_H

#include <linux/userfaultfd.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <sys/types.h>
#include <time.h>

#include "lazymem.h"

/* Newer than the kernel headers some distributions ship; the values are ABI. */
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#define UFFD_FEATURE_WP_ASYNC_BIT ((uint64_t)1 << 15)
#ifndef UFFDIO_COPY_MODE_WP
#define UFFDIO_COPY_MODE_WP ((__u64)1 << 1)
#endif

#ifndef UFFDIO_POISON
struct uffdio_poison {
    struct uffdio_range range;
    __u64 mode;
    __s64 updated;
};
#define UFFDIO_POISON _IOWR(UFFDIO, 0x08, struct uffdio_poison)
#endif
#ifndef UFFDIO_POISON_MODE_DONTWAKE
#define UFFDIO_POISON_MODE_DONTWAKE ((__u64)1 << 0)
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif

#define LM_MAX_THREADS LM_MAX_SERVE_THREADS   /* lazymem.h */
#define LM_DEFAULT_CLUSTER 512u  /* 2 MiB of 4 KiB pages: the measured per-page floor */
#define LM_MAX_CLUSTER 4096
#define LM_BG_THREADS 2          /* background fill threads: a reader and an installer */
#define LM_STREAMS 4             /* sequential streams tracked for readahead */
#define LM_MAX_RANGES 64
#define LM_RANGE_MIN_PAGES 64   /* smaller deferrals just write their records */
#define LM_MAX_WATCH 4
/* The snapshot format's limits (docs/snapshot-format.md; pylazymem/_snapfile.py has the same):
   page-map entries are 32-bit, STORED + store index. */
#define LM_SNAP_MAX_PAGES ((uint64_t)1 << 40)
#define LM_SNAP_MAX_STORED ((uint64_t)UINT32_MAX + 1 - LM_SNAP_STORED)

/* Bit i of a bitmap of 64-bit words (page or block bitmaps throughout the core). */
static inline bool lm_bit(const uint64_t *bits, size_t i)
{
    return (bits[i >> 6] >> (i & 63)) & 1;
}

#ifndef F_SEAL_FUTURE_WRITE
#define F_SEAL_FUTURE_WRITE 0x0010   /* Linux 5.1; the value is ABI (fcntl.h may lack it) */
#endif

/* ==== util.c ============================================================================ */

/* Every failure path records the operation it was doing, per thread. */
int lm_fail(const char *op, int err);   /* records op, returns -err */
#define LM_FAIL(op) lm_fail((op), errno)
uint64_t lm_now_ns(void);
/* XXH3-128 of data: out[0] the low half, out[1] the high (util.c, as lm_xxh3) */
void lm_xxh3_128(const void *data, size_t len, uint64_t out[2]);
/* pthread_create with every signal blocked in the new thread: our native threads must never
   run a signal handler (Python's run in its main thread). 0 or an errno value. */
int lm_thread_start(pthread_t *tid, const pthread_attr_t *attr, void *(*fn)(void *), void *arg);
/* mmap(len, prot, flags | MAP_FIXED, fd, off) at a 2 MiB-aligned address when len >= 2 MiB
   (a block there can be mapped by one PMD); MAP_FAILED with errno on failure. */
void *lm_map_aligned(size_t len, int prot, int flags, int fd, uint64_t off);
/* Turn each whole 2 MiB block of the shmem mapping [addr, addr + len) into one huge folio in
   the page cache (MADV_COLLAPSE), so that mappings of it read through PMDs. Holes become
   pages of zeros: the caller collapses only blocks whose every page holds its final bytes,
   or will write them. Best effort: returns how many blocks are huge now (0 where the kernel
   cannot: before Linux 6.1, THP "deny", a block without any page). */
size_t lm_collapse(void *addr, size_t len);
/* lm_collapse of the 2 MiB-aligned range [off, off + len) of shmem file fd, through a
   read-only mapping of its own. */
size_t lm_shmem_collapse(int fd, uint64_t off, size_t len);

/* Service-time histogram and its totals (log-linear buckets, lm_hist_bucket_upper()). */
struct lm_latency {
    _Atomic uint64_t hist[LM_HIST_BUCKETS];
    _Atomic uint64_t ns_total, ns_max;
};
void lm_hist_add(struct lm_latency *l, uint64_t ns);

/* ==== codec.c =========================================================================== */

/* A store entry of the version 3 entry index (docs/snapshot-format.md): bits 0..27 its length
   in bytes, bits 28..31 its codec (enum lm_codec). */
#define LM_ENTRY_LEN(e) ((uint32_t)(e) & 0x0FFFFFFFu)
#define LM_ENTRY_CODEC(e) ((uint32_t)(e) >> 28)
#define LM_ENTRY(len, codec) ((uint32_t)(len) | ((uint32_t)(codec) << 28))
/* 0 when an index entry is well-formed for this page size (raw: one page; zstd, LZ4: 1 to
   page_size - 1 bytes), else -EBADMSG. */
int lm_entry_check(uint32_t entry, size_t page_size);

/* ==== uffd.c ============================================================================ */

int lm_uffd_open(int acquire, int *mode, int *source, struct lm_features *why);
int lm_uffd_api(int fd, uint64_t want, uint64_t *features, uint64_t *ioctls);
int lm_uffd_register(int fd, void *addr, size_t len, uint64_t mode);
int lm_uffd_unregister(int fd, void *addr, size_t len);
/* Fill missing pages (EEXIST: already there, skipped; EAGAIN retried). 0, or -errno with
   *done (may be NULL) = bytes from dst filled (or already there) before the failure. */
int lm_uffd_copy(int fd, void *dst, const void *src, size_t len, bool wake, size_t *done);
/* lm_uffd_copy, the pages write-protected (the range must be registered MODE_WP). */
int lm_uffd_copy_wp(int fd, void *dst, const void *src, size_t len, bool wake, size_t *done);
int lm_uffd_zeropage(int fd, void *dst, size_t len, bool wake, size_t *done);
/* lm_uffd_copy without waking, also saying in *fresh how many bytes this call copied (not
   found there already): publishing into a pool counts what it published. */
int lm_uffd_copy_counted(int fd, void *dst, const void *src, size_t len, size_t *done,
                         size_t *fresh);
/* Map pages the shared memory behind a MINOR registration holds (EEXIST: already mapped here,
   skipped); -EFAULT at a hole, with *done = bytes mapped before it. */
int lm_uffd_continue(int fd, void *dst, size_t len, bool wake, size_t *done);
/* Copy from src (NULL: map zero pages) and wake, returning -EAGAIN instead of retrying it:
   for the page server, which must read the pending event itself (server.c). */
int lm_uffd_fill_or_eagain(int fd, void *dst, const void *src, size_t len);
int lm_uffd_wake(int fd, void *addr, size_t len);
int lm_uffd_poison(int fd, void *addr, size_t len);

/* ==== the region ======================================================================== */

/* chunk_of[b] with this bit: block b maps chunk (chunk_of[b] & ~LM_CHUNK_KERNEL) and is not
   registered on the uffd: the kernel serves its first touches, no fault reaches us. Its pages'
   records are DEFERRED, CANONICAL, SHARED (or PRESENT DATA once a sync found them written):
   the contents are the template's wherever the page tables do not hold a private page.
   The rule for such a block (docs/shared-pages.md 3): whoever reads a page of it holds the
   page and may read its memory (no uffd fault can come of it); whoever must fill a page of it
   first converts the whole block to a registered chunk block (lm_chunk_take_over, store.c);
   whoever changes its mapping or registration holds every page of the block. */
#define LM_CHUNK_KERNEL 0x80000000u

/* One layer of a snapshot source (store.c). Entry e of the layer (global id first + e) is
   page_size bytes at store_off + e * page_size (index NULL), or index[e]'s length at
   store_off + offset of e: chk[e / LM_SRC_CHK] plus the lengths of the entries from that
   checkpoint to e (a few additions instead of 8 bytes of offset per entry). */
#define LM_SRC_CHK 64
struct lm_src_file {
    int fd;
    uint64_t first, nstored;
    uint64_t store_off, store_bytes;
    uint32_t *index;              /* NULL: fixed-size entries */
    struct lm_objs *objs;         /* the store is in an object store (fd: the rest) */
    uint64_t *chk;
    bool raw;                     /* lm_source_attach_raw: a file that is the region's image */
    uint64_t raw_bytes;
    uint64_t sigs_off, sigs_xxh3;
    off_t size;
    struct timespec mtime;
    _Atomic uint64_t checked_ns;
    _Atomic int broken;           /* -errno once the file changed under us */
    _Atomic bool no_dontcache;    /* its file system refused RWF_DONTCACHE: plain reads */
};

/* A deferral recorded once for a range of pages (lm_meta_defer's fast path). */
struct lm_range {
    size_t first, n;
    uint8_t cls;
    uint16_t flags;       /* the records' flags (NEEDS_UPDATE; SHARED for a chunk span) */
    uint32_t canon;
    uint64_t signature;
};

/* A stream the fault path is following: where the next sequential fault would land. */
struct lm_stream {
    _Atomic size_t next;      /* page index expected next */
    _Atomic uint32_t cluster; /* pages resolved for that next fault */
};

/* A thread that fills pages (serving thread, fill helper, background fill, materialize). */
struct lm_serve_thread {
    struct lm_region *r;
    pthread_t tid;
    int cpu;          /* -1: unpinned */
    bool started;
    char *scratch;    /* max_cluster pages, to assemble copies */
    uint32_t scratch_canon;  /* the canonical page scratch holds scratch_pages copies of */
    uint32_t scratch_pages;
    _Atomic uint64_t served;
    size_t bad_page;  /* set by lm_fill_run on a verification failure */
    bool read_once;   /* its reads pass LM_SRC_ONCE: a bulk fill, not a fault */
    /* scratch already holds the contents of pages [pre_first, pre_first + pre_n)
       (lm_fill_assemble): the next lm_fill_run of exactly that run installs them as they
       are. pre_n == 0: nothing assembled ahead. */
    size_t pre_first, pre_n;
};

/* A second filler for large runs (serve.c): a sequential stream's clusters are copied by two
   CPUs while the faulting thread waits, instead of one. */
struct lm_fill_helper {
    pthread_t tid;
    bool started;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int state;                 /* 0 idle, 1 job posted, 2 job done, 3 exit */
    size_t first, n;           /* the job: claimed pages to fill */
    int rc;
    size_t filled;             /* pages of the job filled when rc < 0 */
    struct lm_serve_thread t;  /* its scratch */
    _Atomic int busy;          /* a serving thread owns the helper for one run */
};

/* One struct; its fields are grouped by the layer (file) that owns them: only that file
   writes them after lm_region_create() (region.c) has set them up. */
struct lm_region {
    /* region.c: the mapping, the uffd and the configuration (read by everyone). */
    char *base;
    size_t nbytes;
    size_t npages;
    size_t page_size;
    int page_shift;
    int uffd;
    int mode;
    int source;
    struct lm_config cfg;
    int cpus[LM_MAX_THREADS];
    int nthreads;
    const char *zero_src;         /* max_cluster pages that read as zero: copy source */
    uint64_t zero_sig;            /* never-written anonymous memory: reads as zero */
    bool used;                    /* defer_fill or materialize has run (restore refuses) */
    bool has_poison;              /* UFFDIO_POISON works here (6.6+); else pages that cannot
                                     be served are made inaccessible (fill.c, lm_poison_page) */
    uint64_t api_features;        /* what this region's UFFDIO_API handshake enabled */
    /* A shared region (lm_region_share, docs/shared-pages.md): the region is a MAP_PRIVATE
       mapping of the pool memfd (page p at pool offset p), registered MISSING | MINOR; pages
       are published into the pool through `pool_view`, a MAP_SHARED PROT_NONE mapping of it
       registered MISSING on the same uffd (UFFDIO_COPY needs a registered destination). */
    int pool_fd;                  /* -1: not shared */
    char *pool_view;              /* MAP_FAILED when not shared */
    /* Which pages the pool must hold to be complete: the snapshot's stored (non-zero) pages,
       one bit each, from the restore's page map (lm_restore_table), kept after the map is
       gone. NULL before a shared restore. (docs/shared-pages.md 2.5) */
    uint64_t *pool_want;
    /* The 2 MiB blocks of a shared region that the kernel serves (bit b of pool_kernel_map):
       the pool was complete and sealed at the restore, the program asked for kernel-served
       first touches (config.shared_first_touch false), and the pool holds every page of the
       block (no hole: an unregistered read of a hole would plant a page of zeros in the
       pool). Not registered: the kernel maps the pool's pages (huge folios: one PMD per
       block) and no fault reaches us. Their records are DEFERRED SHARED without NEEDS_UPDATE
       (class SNAPSHOT, or ZERO for zero and untouched pages), like a kernel-served chunk
       block's, and the same rules apply (LM_CHUNK_KERNEL). pool_kernel_blocks counts them;
       0 means none (the map is not read then): the region leaves this state all at once,
       every page of those blocks held (lm_pool_take_over). */
    uint64_t *pool_kernel_map;
    _Atomic size_t pool_kernel_blocks;
    /* 2 MiB block boundaries may be VMA boundaries (canonical chunks were mapped, or pool
       blocks were left to the kernel): one UFFDIO_COPY / ZEROPAGE / CONTINUE acts inside one
       VMA (across one it fails with ENOENT), so runs stop there (lm_vma_blocks). Sticky. */
    _Atomic bool vma_blocks;
    /* Canonical chunks (docs/shared-pages.md 3): per 2 MiB block of the region (block b =
       pages [b * blk_pages, (b + 1) * blk_pages)), the canonical id whose chunk is mapped there,
       0 = the region's normal backing (anonymous memory, or the pool). A flat table rather than
       a sorted span list: one lookup per block, 4 bytes per 2 MiB. Allocated at the first
       chunk mapping; written by lm_defer_fill and lm_chunk_take_over (store.c) under
       chunk_lock; read without it by the working-set scan (a stale read there costs one page's
       write record, nothing else) and by lm_kernel_page. */
    bool share_canonical;         /* chunks may be mapped (config and kernel allow) */
    bool kernel_first_touch;      /* whole chunk blocks are left unregistered: the kernel
                                     serves their first touches (config.shared_first_touch) */
    size_t blk_pages;             /* pages per 2 MiB block */
    size_t nblocks;
    _Atomic(uint32_t *) chunk_of;
    _Atomic size_t chunk_vmas;    /* blocks mapped from a chunk now: VMAs held in the budget */
    _Atomic size_t kernel_blocks; /* of those, blocks served by the kernel (LM_CHUNK_KERNEL) */
    pthread_mutex_t chunk_lock;

    /* meta.c: the metadata array in a memfd, the single record of page state. */
    int meta_fd;
    struct lm_page_meta *meta;
    /* Lazily filled page records (meta.c): range deferrals, newest last, and a restore's page
       table; base_done has one bit per page whose record is authoritative. */
    _Atomic(const struct lm_snap_page *) base_table;
    _Atomic uint64_t *base_done;
    struct lm_range ranges[LM_MAX_RANGES];
    _Atomic unsigned nranges;
    _Atomic int lazy_records;     /* some record may still come from a range or the table */
    pthread_mutex_t records_lock; /* writers of ranges; lm_meta_sync */
    /* A background checkpoint's freeze (note_lazy in meta.c): while armed, the first claim of
       a lazy page keeps its record in stash (stash_bits: which are kept); deferrals in
       progress are counted so that arming can wait for them. */
    _Atomic int freeze_armed;
    struct lm_page_meta *stash;
    _Atomic uint64_t *stash_bits;
    _Atomic int defers_active;
    _Atomic unsigned applying;    /* claimers filling a record from the ranges right now */
    _Atomic uint64_t touch_seq;   /* next first-touch order */
    /* Fault timeline (config.timeline), written by lm_mark_present: see lm_timeline(). */
    uint32_t *tl_us;
    uint8_t *tl_path;
    uint64_t tl_t0;

    /* Background fill: started and stopped by prefetch.c; its threads' ids, lock and flags
       are here so that a waiter in meta.c (lm_wait_held) can lift them without
       calling up. Thread 0 claims and reads runs, thread 1 (where there is a second CPU)
       installs them: struct lm_bgfill, prefetch.c's own. */
    pthread_t bg_tid[LM_BG_THREADS];
    unsigned bg_nthreads;         /* started (bg_tid[0..n) valid while bg_started) */
    bool bg_started;
    _Atomic int bg_stop;
    _Atomic int bg_running;       /* the fill's threads still running (0: done) */
    struct lm_bgfill *bgf;        /* the pipeline's slots, while bg_started */
    _Atomic unsigned bg_boosted;  /* bit i: a serving thread lifted thread i out of SCHED_IDLE */
    pthread_mutex_t bg_lock;      /* bg_tid is valid while held and bg_started */

    /* freeze.c: the background checkpoint in progress (NULL: none), and the fault-path
       threads reading it right now (lm_freeze_end waits for them before freeing it). */
    _Atomic(struct lm_freeze *) freeze;
    _Atomic int freeze_users;

    /* wstrack.c: the working-set window. */
    uint64_t ws_mark_seq;
    /* dirty.c: write-protect tracking and dirty pages (one bit per page, atomic words). */
    bool wp_async;                /* registered for async write-protect tracking (region.c
                                     clears it for a shared region: never registered WP) */
    int pagemap_fd;
    _Atomic uint64_t *dirty;      /* may have changed since lm_dirty_reset */
    _Atomic uint64_t *ws_written; /* written since lm_ws_mark (wstrack.c reads it) */
    pthread_mutex_t harvest_lock; /* one harvest (protecting scan) at a time */
    bool harvest_lock_ok;

    /* store.c: canonical store, page i (1-based id) at canon_base + (i-1)*page_size, in a
       memfd so that a handler in another process could map it; ids are published by
       canon_count. */
    int canon_fd;
    char *canon_base;
    size_t canon_cap;
    _Atomic uint32_t canon_count;
    uint64_t *canon_sig;          /* signature per id, index id-1 */
    uint32_t *canon_index;        /* open-addressing hash -> id, 0 = empty */
    size_t canon_index_cap;
    pthread_mutex_t canon_lock;   /* writers only; the fault path reads without it */
    /* store.c: per canonical id, the sealed 2 MiB memfd of copies of it (lm_canon_chunk_fd),
       created on first use under canon_lock, closed with the region. */
    struct lm_chunk { uint32_t canon; int fd; } *chunks;
    size_t nchunks, chunks_cap;
    /* store.c: the snapshot source: one or more layers (files), whose store entries are
       numbered one after the other (global ids; lm_source_attach_layers). src_nstored is the
       sum. A raw source (lm_source_attach_raw) is one layer of src_raw_bytes whose page i is
       entry i, the last one zero-filled past the end; it has no signature section (hashed
       when first needed). */
    struct lm_src_file *src_layers;
    size_t src_nlayers;           /* 0: no source */
    uint64_t src_nstored;
    bool src_verify;
    _Atomic(uint64_t *) src_sigs; /* read when first needed (lm_source_signatures), else NULL */

    /* fill.c */
    _Atomic uint64_t fill_attempts;   /* for config.test_fail_fills > 1 */
    _Atomic uint64_t view_unzapped;   /* pages published since the view's PTEs were dropped */
    _Atomic int cfg_test_fail_fills;  /* config.test_fail_fills, changeable while serving */

    /* serve.c: serving threads, the fill helper and readahead streams. */
    struct lm_serve_thread threads[LM_MAX_THREADS];
    int stop_fd;                  /* eventfd: wakes serving threads to exit */
    pthread_mutex_t serve_lock;   /* start/stop */
    _Atomic int serving;
    struct lm_fill_helper helper;
    struct lm_stream streams[LM_STREAMS];
    _Atomic unsigned stream_rr;

    /* remote.c: served by a page server in another process. */
    _Atomic int remote;           /* enum lm_remote */
    bool remote_empty_unknown;    /* EMPTY pages hold the server's contents, not zeros */
    pthread_t watch_tid;
    bool watch_started;
    int watch_fds[LM_MAX_WATCH];
    int nwatch;
    int watch_stop_fd;

    /* Statistics: relaxed atomics, added to by every layer, read as a whole by lm_stats(). */
    _Atomic uint64_t st_faults, st_faults_zero, st_faults_canonical, st_faults_empty,
        st_faults_snapshot, st_faults_spurious, st_faults_write, st_readahead,
        st_bytes, st_materialized, st_errors, st_empty_wakeups,
        st_prefetched, st_background, st_src_bytes, st_verify_fail,
        st_shared_mapped, st_published, st_pool_fallback,
        st_canon_shared, st_canon_copied, st_budget_fallbacks;
    _Atomic int64_t st_present, st_poisoned;
    _Atomic int st_last_error;
    struct lm_latency lat;
};

/* ==== dirty.c =========================================================================== */

/* PAGEMAP_SCAN (linux/fs.h, 6.7); spelled out for older headers. */
struct lm_pm_scan_arg {
    uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
    uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
struct lm_page_region {
    uint64_t start, end, categories;
};
#define LM_PAGEMAP_SCAN _IOWR('f', 16, struct lm_pm_scan_arg)
#define LM_PAGE_IS_WRITTEN (1u << 1)
#define LM_PAGE_IS_FILE (1u << 2)
#define LM_PAGE_IS_PRESENT (1u << 3)
#define LM_PAGE_IS_SWAPPED (1u << 4)
#define LM_PAGE_IS_PFNZERO (1u << 5)

/* Opens the pagemap fd where the kernel has WP_ASYNC (then wp_async), allocates the bitmaps. */
int lm_dirty_init(struct lm_region *r, uint64_t api_features);
void lm_dirty_close(struct lm_region *r);
/* Pages [first, first+n) may have changed (a deferral, poisoning, a refault of a dropped
   page): call it after the change is recorded, so that a reset in between cannot lose it. */
void lm_dirty_mark(struct lm_region *r, size_t first, size_t n);
/* Collect the stores since the last harvest (re-protecting those pages) into both bitmaps;
   with LM_HARVEST_RESET_WS, ws_written is cleared first and gets none of them (lm_ws_mark). */
#define LM_HARVEST_RESET_WS 1
int lm_dirty_harvest(struct lm_region *r, int reset);
/* Take the epoch's bitmap into words and run pause(arg), under the harvest lock (a failed
   pause puts the bitmap back); lm_dirty_merge ORs an epoch's words back into the current. */
int lm_dirty_freeze(struct lm_region *r, uint64_t *words, int (*pause)(void *), void *arg);
void lm_dirty_merge(struct lm_region *r, const uint64_t *words);

/* ==== meta.c: the page record and its transitions (state machine: top of meta.c) ========= */

/* Reading a state needs no claim; only meta.c stores one. */
static inline uint8_t lm_state_load(const struct lm_page_meta *m)
{
    return __atomic_load_n(&m->state, __ATOMIC_ACQUIRE);
}
/* Claim a lazy page (EMPTY or DEFERRED -> BUSY). Returns the state it was in (after its
   record was filled from a range deferral or a restore's base table), or LM_BUSY/LM_PRESENT
   when the page is not claimable; never waits. */
uint8_t lm_claim(struct lm_region *r, size_t page);
/* Claim any page, waiting while another thread holds it BUSY. Returns the old state. */
uint8_t lm_claim_wait(struct lm_region *r, size_t page);
/* Claim a PRESENT page (PRESENT -> BUSY); false when it is in any other state. */
bool lm_claim_present(struct lm_region *r, size_t page);
/* Hold a page to read it: a PRESENT page is pinned (PRESENT -> PINNED: transitions wait, and
   a fault on it is served without its record), any other page is claimed (-> BUSY, its record
   filled if it was lazy). Waits while the page is BUSY or PINNED. Returns the state the page
   is in (PRESENT for a pinned page); give it back with lm_unhold(r, page, that state). A
   reader holds at most one page while it waits for another (lm_try_hold otherwise). */
uint8_t lm_hold(struct lm_region *r, size_t page);
/* lm_hold without waiting: LM_BUSY when the page is held by someone else. */
uint8_t lm_try_hold(struct lm_region *r, size_t page);
void lm_unhold(struct lm_region *r, size_t page, uint8_t state);
/* Claim the lazy pages after `first` (claimed, old state old[0]) that fill together with it. */
size_t lm_claim_run(struct lm_region *r, size_t first, size_t max, uint8_t *old);
/* Back off while a page is BUSY (yield, then sleep briefly). */
void lm_wait_busy(unsigned *spins);
/* lm_wait_busy for a page of r, lifting the idle-class background fill (which may hold it)
   to normal priority after a few waits and again now and then. */
void lm_wait_held(struct lm_region *r, unsigned *spins);
/* BUSY -> state: give a claimed page back (the state it was claimed from, or the state the
   claimer's work left it in). */
void lm_release(struct lm_region *r, size_t page, uint8_t state);
/* Give claimed pages back in the states they were claimed from. */
void lm_unclaim(struct lm_region *r, size_t first, size_t n, const uint8_t *old);
/* BUSY -> PRESENT for claimed pages whose contents are in place. The first `ordered` pages
   were touched (in that order). */
void lm_mark_present(struct lm_region *r, size_t first, size_t n, uint16_t flags,
                     size_t ordered);
/* BUSY -> POISONED: the page could not be served and was poisoned (fill.c). */
void lm_mark_poisoned(struct lm_region *r, size_t page);
/* A claimed page about to hold the program's own data (write fault; page server's pages). */
void lm_meta_set_data(struct lm_region *r, size_t page, bool forget_canon);
/* A page of a shared region found holding private memory (lm_ws_scan_private): if its record
   says it maps the pool or a chunk (LM_F_SHARED), it was written since: program data now. A
   DEFERRED page of a kernel-served chunk block (the kernel mapped it and a store copied it,
   neither told us) becomes PRESENT DATA. */
void lm_meta_note_private(struct lm_region *r, size_t page);
/* A held page's signature, just computed from its contents (the caller holds the page). */
void lm_meta_note_signature(struct lm_region *r, size_t page, uint64_t sig);
bool lm_needs_copy(const struct lm_page_meta *m);
/* A caller's page range: inside the region, not empty (0 or -ERANGE). */
int lm_check_range(struct lm_region *r, size_t first, size_t n);
/* Record a deferral of [first, first+n) (checked by the caller): a range record or per-page
   records, present pages dropped (MADV_DONTNEED). */
int lm_meta_defer(struct lm_region *r, size_t first, size_t n, int cls, uint32_t canon,
                  uint64_t sig, uint16_t flags);
/* A deferral that also changes the memory behind [first, first+n) (whole blocks: canonical
   chunks). Per block: the pages whose record is authoritative (and every page of a
   kernel-served block) are held, remap(r, block's first page, block's pages, arg) replaces the
   block's mapping (discarding the old contents), their records are written and they are given
   back DEFERRED. Then one range record is published for the pages never claimed, and pages
   claimed meanwhile (a fill in flight from before the remap) are held and recorded one by one
   (meta.c says why that is race-free). remap's first error is returned, with *failed_at = the
   first page of the block that failed (the rest are left alone: the caller records them);
   else *failed_at = first + n. */
int lm_meta_defer_remap(struct lm_region *r, size_t first, size_t n, int cls, uint32_t canon,
                        uint64_t sig, uint16_t flags,
                        int (*remap)(struct lm_region *, size_t, size_t, void *), void *arg,
                        size_t *failed_at);
/* Pages per block when 2 MiB block boundaries may be VMA boundaries (runs stop there), else 0. */
static inline size_t lm_vma_blocks(struct lm_region *r)
{
    return atomic_load_explicit(&r->chunk_of, memory_order_relaxed) ||
                   atomic_load_explicit(&r->vma_blocks, memory_order_relaxed)
               ? r->blk_pages
               : 0;
}
/* Is page p in a block of a complete pool that the kernel serves (pool_kernel_map)? */
static inline bool lm_pool_kernel_block(struct lm_region *r, size_t p)
{
    size_t b = p / r->blk_pages;
    return atomic_load_explicit(&r->pool_kernel_blocks, memory_order_acquire) &&
           b < r->nblocks && lm_bit(r->pool_kernel_map, b);
}
/* Is page p in a kernel-served chunk block (LM_CHUNK_KERNEL) or kernel-served pool block? While p is held it can only
   turn true (a deferral remapping the block onto a kernel-served chunk holds only pages
   claimed before it looked; it records this one again afterwards), never false (leaving the
   kernel-served state holds every page of the block): true means "no fault here reaches us". */
static inline bool lm_kernel_page(struct lm_region *r, size_t p)
{
    if (lm_pool_kernel_block(r, p))
        return true;
    const uint32_t *co = atomic_load_explicit(&r->chunk_of, memory_order_acquire);
    size_t b = p / r->blk_pages;
    return co && b < r->nblocks &&
           (__atomic_load_n(&co[b], __ATOMIC_ACQUIRE) & LM_CHUNK_KERNEL);
}
/* Make the records of a block that is becoming registered true (lm_chunk_take_over): pages
   [first, first+n) are held by the caller; pm[i] is page i's /proc/self/pagemap entry. Present
   file pages become PRESENT SHARED, private ones PRESENT DATA, the rest stay as they were; each
   page is given back. */
void lm_meta_release_registered(struct lm_region *r, size_t first, size_t n, const uint8_t *old,
                                const uint64_t *pm);
/* Lazy records. lm_meta_sync_locked fills every pending one; call it between
   lm_records_lock() and lm_records_unlock() (lm_meta_sync in store.c does). */
void lm_records_lock(struct lm_region *r);
void lm_records_unlock(struct lm_region *r);
void lm_meta_sync_locked(struct lm_region *r);
/* A restore's page table: may one be installed (no table, no range record yet)? Install it. */
bool lm_meta_pristine(struct lm_region *r);
void lm_meta_install_base(struct lm_region *r, const struct lm_snap_page *map);
/* The snapshot's signatures were just published in r->src_sigs: give the records filled
   from the base table before then (signature 0) theirs. */
void lm_meta_fill_signatures(struct lm_region *r, const uint64_t *sigs);

/* Freezing for a background checkpoint (freeze.c; note_lazy in meta.c says how). Arming
   waits for deferrals and for claims of lazy pages taken before it; 0 or -errno. */
int lm_meta_freeze_arm(struct lm_region *r);
void lm_meta_freeze_disarm(struct lm_region *r);
void lm_meta_freeze_free(struct lm_region *r);
/* The record page p had when first claimed since arming (its state in ->state), or NULL. */
const struct lm_page_meta *lm_meta_stashed(struct lm_region *r, size_t p);

/* ==== wstrack.c ========================================================================= */

/* lm_dirty_init / lm_dirty_close, and the window's start. */
int lm_ws_init(struct lm_region *r, uint64_t api_features);
void lm_ws_close(struct lm_region *r);
/* Shared regions: call fn(r, page) for every page that holds private (anonymous) memory. */
int lm_ws_scan_private(struct lm_region *r, void (*fn)(struct lm_region *, size_t));
/* The raw /proc/self/pagemap entries of pages [first, first+n) (LM_PM_* bits). */
int lm_ws_pagemap(struct lm_region *r, size_t first, size_t n, uint64_t *out);
#define LM_PM_PRESENT ((uint64_t)1 << 63)
#define LM_PM_SWAPPED ((uint64_t)1 << 62)
#define LM_PM_FILE ((uint64_t)1 << 61)

/* ==== store.c =========================================================================== */

const char *lm_canon_page(struct lm_region *r, uint32_t id);
/* The sealed memfd of `bytes` (a multiple of the page size) of copies of canonical page `id`,
   created on first use; owned by the region (do not close). -errno on failure. */
int lm_canon_chunk_fd(struct lm_region *r, uint32_t id, size_t bytes);
void lm_canon_chunks_close(struct lm_region *r);
/* Convert the kernel-served chunk blocks that overlap pages [first, first+n) to registered
   ones (MISSING | MINOR on the same uffd; present pages stay, private ones keep the program's
   bytes), their records made true from the page tables. The caller holds no page. With
   `locked`, the caller holds chunk_lock. 0 or -errno. */
int lm_chunk_take_over(struct lm_region *r, size_t first, size_t n, bool locked);
/* The kernel-served pool blocks (pool_kernel_map) made registered, all of them (also done by
   lm_chunk_take_over for a range that overlaps one). The caller holds chunk_lock and no page.
   0 (also when there is none) or -errno. */
int lm_pool_take_over(struct lm_region *r);
/* Does the pool hold every page of r->pool_want (docs/shared-pages.md 2.5)? 1 yes, 0 no (or
   no restore table), -errno. With `holey` (a bitmap of r->nblocks bits, zeroed by the caller),
   the blocks that contain a hole get their bit set. One walk over the pool's holes. */
int lm_pool_complete(struct lm_region *r, uint64_t *holey);
/* The contents of page p, held by the caller (lm_hold) in state s, without faulting it in;
   -EHWPOISON for a poisoned page. */
int lm_read_held(struct lm_region *r, size_t p, uint8_t s, void *out);
/* lm_read_held with the record given (a background checkpoint's stash, freeze.c). */
int lm_read_record(struct lm_region *r, size_t p, const struct lm_page_meta *m, uint8_t s,
                   void *out);
/* The signature of canonical page `id`, checking that the id is this region's. */
int lm_canon_signature(struct lm_region *r, uint32_t id, uint64_t *sig);
/* Store entries [index, index + count) (global ids, across layers) into dst, count pages:
   compressed entries decoded. An entry that does not decode (a corrupt or hostile file) fails
   the read with -EBADMSG; the fault path then poisons its page. `how`: 0, or LM_SRC_ONCE. */
int lm_src_read(struct lm_region *r, uint64_t index, size_t count, void *dst, unsigned how);
/* The caller keeps the only copy of these entries it will need (the background fill and
   materialize copy every page into private memory): pages of the file that the read brings
   into the page cache are dropped once read (RWF_DONTCACHE, Linux 6.14; pages that were
   cached before stay). Otherwise a private restore holds the snapshot twice, and a VM whose
   free memory goes back to its host (virtio-balloon free page reporting) pays a host fault
   for each fresh page: a cold 3.2 GiB read took 3.2-5.9 s into the page cache, 1.4-1.6 s
   without keeping it (measured here). A file system without it: plain reads. */
#define LM_SRC_ONCE 1u
/* lm_src_read, but an entry that does not decode does not fail the read: bad[i] is 1 for it
   (its page in dst is not to be used), 0 for the others. -errno only when the file cannot be
   read. */
int lm_src_read_each(struct lm_region *r, uint64_t index, size_t count, void *dst,
                     uint8_t *bad);
/* Entries [e, e + count) of an object store into out, one after another (each
   LM_ENTRY_LEN(index[i]) bytes, or page_size without an index). 0 or -errno. */
int lm_objs_gather(struct lm_objs *o, uint64_t e, size_t count, const uint32_t *index,
                   size_t page_size, char *out);
void lm_objs_stats(struct lm_objs *o, uint64_t *out);
size_t lm_objs_nentries(const struct lm_objs *o);
/* Entry e (len bytes) read again from the bucket into out, its chunk's cache file removed:
   for an entry that failed its check after a read from the cache. 0 or -errno. */
int lm_objs_reread(struct lm_objs *o, uint64_t e, size_t len, char *out);
/* A hint: entries [e, e + n) will be read soon; their chunks are fetched into the cache by
   LM_OBJS_FETCHERS threads meanwhile (nothing without a cache). */
#define LM_OBJS_FETCHERS 4
void lm_objs_willneed(struct lm_objs *o, uint64_t e, size_t n);
/* lm_src_read_each in two halves, for callers that read on one thread and decode on another:
   lm_src_fetch reads the entries (raw ones in place, compressed ones packed at the end of
   dst), then lm_src_decode(same index, count, dst) decodes them into their pages. */
int lm_src_fetch(struct lm_region *r, uint64_t index, size_t count, void *dst);
int lm_src_decode(struct lm_region *r, uint64_t index, size_t count, void *dst, uint8_t *bad);
/* A hint only (posix_fadvise WILLNEED: the kernel starts reading, nobody waits): store
   entries [index, index+count) will be read soon. */
void lm_src_willneed(struct lm_region *r, uint64_t index, size_t count);
/* Whether the source's own readahead follows a sequential reader (local files: the kernel's),
   so that a hint is worth its cost only where the reads jump. */
bool lm_src_follows_streams(const struct lm_region *r);
void lm_source_close(struct lm_region *r);
void lm_source_forget_remote(struct lm_region *r);   /* fork child: lm_objs_forget */

/* ==== pool.c: the pool object (docs/shared-pages.md, section 2) ========================== */

#define LM_POOL_NAME "pylazymem-pool"     /* the memfd's name, and the sockets' prefix */
#define LM_POOL_TAG "plm-pool-1"          /* pool id = XXH3-64(tag, header_xxh3, ps, npages) */
#define LM_POOL_TAG_LEN 10
#define LM_POOL_MAGIC "PLMPOOL"           /* with its NUL: 8 bytes */
#define LM_POOL_LAYOUT 1u
#define LM_POOL_SLOTS 4                   /* abstract-socket slots per pool id */
#define LM_POOL_TIMEOUT_MS 100            /* default answer timeout when joining */

/* The pool's last page (offset npages * page_size), written once by its creator; integers in
   the machine's byte order (pools never leave the machine). */
struct lm_pool_header {
    char magic[8];           /* "PLMPOOL\0" */
    uint32_t version;        /* LM_POOL_LAYOUT */
    uint32_t reserved;       /* 0 */
    uint64_t page_size, npages, pool_id, header_xxh3;
    uint64_t creator_pid;    /* informative: not compared when joining */
    uint64_t created_ns;     /* CLOCK_REALTIME; informative */
};

struct lm_pool {
    _Atomic uint64_t refs;   /* holders in this process; the last release closes it (pooldir.c) */
    int fd;                  /* the memfd, O_RDWR; -1 once orphaned */
    int listen_fd;           /* our listening socket for it (pooldir.c), -1: none */
    int slot;                /* that socket's slot, -1: none */
    int role;                /* enum lm_pool_role */
    bool dead;               /* inherited across fork(): fds closed, only the memory is left */
    uint64_t id, header_xxh3, npages, page_size;
    struct lm_pool *next;    /* pooldir.c's table of this process's pools */
};

uint64_t lm_pool_id(uint64_t header_xxh3, uint64_t npages, uint64_t page_size);
/* page_size must be this machine's, npages in 1..LM_SNAP_MAX_PAGES, the size an off_t: sets
   *bytes = (npages + 1) * page_size, else -EINVAL. */
int lm_pool_check_args(uint64_t npages, uint64_t page_size, uint64_t *bytes);
/* A new pool (memfd, size, header page, seals), one reference, role and slot unset. */
int lm_pool_create(uint64_t header_xxh3, uint64_t npages, uint64_t page_size,
                   struct lm_pool **out);
/* Check an fd received from another process (name, O_RDWR, seals, size, header page) and
   wrap it; -EBADMSG when it is not that pool. Takes the fd: closed unless it succeeds. */
int lm_pool_attach(int fd, uint64_t header_xxh3, uint64_t npages, uint64_t page_size,
                   struct lm_pool **out);
void lm_pool_ref(struct lm_pool *p);
/* The memfd, O_RDWR, owned by the pool (do not close); -1 for a pool inherited across fork(). */
int lm_pool_fd(const struct lm_pool *p);
/* After fork(), in the child: close the memfd, mark the pool dead. */
void lm_pool_orphan(struct lm_pool *p);
/* Close the memfd (unless dead) and free; the listening socket is pooldir.c's to close. */
void lm_pool_free(struct lm_pool *p);

/* ==== pooldir.c: finding one another's pools, the pool thread =========================== */

/* pthread_atfork child handler (registered with the first lm_pool_open): the child has no
   pool thread and no pools; inherited listening sockets and memfds are closed. */
void lm_pool_after_fork(void);

/* ==== fill.c ============================================================================ */

/* Fill claimed pages [first, first+n) that share one content kind (not marked present).
   0, or -errno with *filled (may be NULL) = how many pages from `first` were filled before
   the failure: their page-table entries are present, so the caller must mark them present. */
int lm_fill_run(struct lm_region *r, struct lm_serve_thread *t, size_t first, size_t n,
                bool wake, bool write, size_t *filled);
/* Read claimed run [first, first+n) into t->scratch ahead of its lm_fill_run (which then
   only installs it): 0, 1 when the run is not one that is read into scratch (the fill does
   all of it), or -errno (the fill reads it again itself). */
int lm_fill_assemble(struct lm_region *r, struct lm_serve_thread *t, size_t first, size_t n);
/* Shared regions: which of pages [first, first+n) the pool holds (vec[i] & 1, mincore), and
   publishing pages into it from src (*done = pages published or found there before a failure). */
int lm_pool_holes(struct lm_region *r, size_t first, size_t n, unsigned char *vec);
int lm_pool_publish(struct lm_region *r, size_t first, size_t n, const char *src, size_t *done);
/* A complete pool (lm_pool_complete) made huge folios, block by block (lm_shmem_collapse),
   and sealed F_SEAL_FUTURE_WRITE: the mark by which a process that joins it knows it
   complete. Stops early, unsealed, once *stop (may be NULL) is set. 1 sealed (by this call
   or before), 0 not complete or stopped, -errno. Not on a fault path: a collapse copies. */
int lm_pool_finish(struct lm_region *r, const _Atomic int *stop);
/* With config.verify_shared, the pages vec says the pool holds are read from it and checked
   (against `want`'s bytes, else their signatures; buf: one page of room): one that differs
   becomes LM_POOL_BAD in vec, served by a private copy from the store, never mapped. */
#define LM_POOL_BAD 2
void lm_pool_check(struct lm_region *r, size_t first, size_t n, unsigned char *vec,
                   const char *want, char *buf);
/* Test hook (config.test_fail_fills): -EIO when this fill attempt is to fail, else 0. */
int lm_fill_hook(struct lm_region *r);
/* Pages we cannot serve: poison them (SIGBUS on access; SIGSEGV without UFFDIO_POISON),
   record POISONED and wake their faulters. Claimed (BUSY) by the caller; rc says why. */
void lm_poison_run(struct lm_region *r, size_t first, size_t n, int rc);
void lm_poison_page(struct lm_region *r, size_t page, int rc);
/* A page held from POISONED that faulted again: poison it again, give it back, wake. */
void lm_poison_again(struct lm_region *r, size_t page);
/* Fill claimed pages, one at a time when the run fails (a bad page is poisoned), mark them
   present and wake; returns how many were filled. */
size_t lm_fill_or_poison(struct lm_region *r, struct lm_serve_thread *t, size_t first, size_t n,
                         const uint8_t *old, uint16_t flag);
void lm_record_error(struct lm_region *r, int rc);
/* The -errno for which lm_fill_or_poison, called by the background fill, left pages lazy
   (an object-store failure that may pass: network, credentials, a cancelled request), else
   0; per thread. */
extern __thread int lm_fill_kept_lazy;

/* objstore.c, for the threads that read from an object store: the calling thread's requests
   end once *cancel is nonzero, and its failures are reported by the reader they later fail
   (quiet_failures); lm_objs_transient_take: its last failure that may pass (the network after
   its retries, refused credentials, a cancel), taken and cleared; 0 if none. */
void lm_objs_thread_setup(const _Atomic int *cancel, bool quiet_failures);
int lm_objs_transient_take(void);

/* ==== freeze.c ========================================================================== */

/* A page as a checkpoint reads it: the region's now, or, while a background checkpoint's
   freeze is in place, as it was at the pause. The page is held between lm_view_hold and
   lm_view_unhold (as lm_hold does); `s` is the state to act on (PRESENT: the bytes are at
   `mem`; others: the record `m` describes them, lm_view_read). */
struct lm_view {
    uint8_t held;                 /* what lm_hold returned (given back by lm_view_unhold) */
    uint8_t s;
    bool frozen;
    const struct lm_page_meta *m;
    const char *mem;
};
/* lm_hold (wait) or lm_try_hold (!wait: LM_BUSY when held elsewhere), then the view. */
uint8_t lm_view_hold(struct lm_region *r, size_t p, bool wait, struct lm_view *v);
void lm_view_unhold(struct lm_region *r, size_t p, const struct lm_view *v);
/* The page's bytes into out (any state; -EHWPOISON for a poisoned page). */
int lm_view_read(struct lm_region *r, size_t p, const struct lm_view *v, void *out);
/* Checkpoint progress while frozen: pages written. */
void lm_freeze_count_written(struct lm_region *r, size_t n);
/* The fault path's part (serve.c): true when the fault at page p was handled here (served
   from staging, or to be retried); a fault at `addr` outside the region that falls in a
   staging range is served zeros (lm_freeze_stray: true when it did). */
bool lm_freeze_fault(struct lm_region *r, size_t p);
bool lm_freeze_stray(struct lm_region *r, uint64_t addr);
/* A region torn down while frozen (region.c): staging unmapped, stash freed. */
void lm_freeze_abandon(struct lm_region *r);

/* ==== serve.c =========================================================================== */

int lm_serve_start(struct lm_region *r);
int lm_serve_stop(struct lm_region *r);

/* ==== prefetch.c, checkpoint.c: public API only (lazymem.h) ============================= */

/* ==== remote.c ========================================================================== */

void lm_remote_close(struct lm_region *r);

#endif
