/*
 * lazymem.h: the contract between pylazymem's C core and its bindings.
 *
 * This is the only header the cffi build reads: everything between the CDEF markers is
 * handed to ffi.cdef() after preprocessor lines are dropped, so the declarations below must
 * stay plain C that cffi can parse (no macros with arguments, enum values as literals).
 * Internal structures live in lm_internal.h and are never seen by Python.
 *
 * Conventions:
 *  - every function that can fail returns 0 (or a non-negative value) on success and -errno
 *    on failure; lm_last_op() then names the failing system call or check of the calling
 *    thread ("ioctl(UFFDIO_REGISTER)"), so the bindings can say what failed and how to fix it.
 *  - lengths and offsets are in pages unless the name says bytes.
 *  - the fault path (serving threads) is pure C and never calls back into the bindings.
 */
#ifndef LAZYMEM_H
#define LAZYMEM_H

#include <stddef.h>
#include <stdint.h>

/* CDEF BEGIN */

/* Bumped whenever a declaration below changes; the Python package checks it at import. */
enum { LM_ABI_VERSION = 18 };

/* Page states: the only record of where a page is in its life (see docs/design.md). */
enum lm_state {
    LM_EMPTY = 0,      /* never given contents (class NONE): reads as zero, like fresh
                          anonymous memory; an all-zero record is an EMPTY page */
    LM_DEFERRED = 1,   /* not present; its contents are described by cls/canon */
    LM_BUSY = 2,       /* claimed by one thread for a transition; others wait */
    LM_PRESENT = 3,    /* mapped in the region */
    LM_POISONED = 4,   /* could not be served (a failed fill, a verification mismatch, a lost
                          page server): an access raises SIGBUS (SIGSEGV on kernels without
                          UFFDIO_POISON); readers report it; a deferral gives new contents */
    LM_PINNED = 5      /* present, held by one reader (signatures, checkpoint, page_read)
                          while it reads the contents: transitions wait */
};

/* Known content classes. */
enum lm_class {
    LM_CLS_NONE = 0,       /* no contents recorded (EMPTY pages) */
    LM_CLS_ZERO = 1,       /* all zero: served by the kernel's shared zero page */
    LM_CLS_CANONICAL = 2,  /* a copy of canonical page `canon` */
    LM_CLS_DATA = 3,       /* program data: contents known only by signature */
    LM_CLS_SNAPSHOT = 4    /* served from a snapshot store (checkpoint/restore) */
};

/* Page flags. */
enum lm_flag {
    LM_F_NEEDS_UPDATE = 1,   /* an update is recorded and must be carried out before access */
    LM_F_READAHEAD = 2,      /* made present by readahead around another page's fault */
    LM_F_WRITE_FAULT = 4,    /* first touch was a store */
    LM_F_MATERIALIZED = 8,   /* made present by lm_materialize(), not by a touch */
    LM_F_POISONED = 16,      /* has been poisoned (state LM_POISONED; stats.errors says why) */
    LM_F_PREFETCHED = 32,    /* made present by a prefetch (restore's working set) */
    LM_F_BACKGROUND = 64,    /* made present by the background fill */
    LM_F_SHARED = 128,       /* maps a shared page (a pool page of a shared restore) that this
                                process has not written, as far as the last sync saw
                                (docs/shared-pages.md, "Metadata truth") */
    LM_F_PRIVATE_FILL = 256, /* a snapshot page of a shared region served by a private copy
                                (prefetch of scattered pages, or publishing failed) */
    LM_F_COPY_FALLBACK = 512 /* a page of a canonical deferral that would have mapped a shared
                                chunk but is copied: the VMA budget was spent (region.c) */
};

/* One record per page; 32 bytes, lives in a memfd so another process can map it. */
struct lm_page_meta {
    uint64_t signature;   /* XXH3-64 of the contents, 0 = unknown */
    uint64_t order;       /* first-touch sequence number, 0 = never touched */
    uint32_t canon;       /* canonical page id (LM_CLS_CANONICAL), 0 = none */
    uint32_t aux;         /* class-specific (snapshot store index) */
    uint8_t state;        /* enum lm_state */
    uint8_t cls;          /* enum lm_class */
    uint16_t flags;       /* enum lm_flag */
    uint32_t reserved;
};

/* How the userfaultfd was (or could not be) had. */
enum lm_mode { LM_MODE_UNAVAILABLE = 0, LM_MODE_FULL = 1, LM_MODE_USER_ONLY = 2 };
enum lm_source { LM_SRC_NONE = 0, LM_SRC_DEV = 1, LM_SRC_SYSCALL = 2 };

/* Which acquisition paths lm_probe()/lm_region_create() may try (PYLAZYMEM_UFFD). */
enum lm_acquire {
    LM_ACQ_AUTO = 0,        /* /dev/userfaultfd, then syscall, then syscall user-mode-only */
    LM_ACQ_DEV = 1,         /* /dev/userfaultfd only */
    LM_ACQ_SYSCALL = 2,     /* syscall only (full mode) */
    LM_ACQ_USER_ONLY = 3    /* syscall with UFFD_USER_MODE_ONLY only */
};

/* Kernel feature bits (UFFD_FEATURE_*), mirrored so the bindings need no kernel header. */
enum lm_uffd_feature {
    LM_UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1,
    LM_UFFD_FEATURE_EVENT_FORK = 2,
    LM_UFFD_FEATURE_EVENT_REMAP = 4,
    LM_UFFD_FEATURE_EVENT_REMOVE = 8,
    LM_UFFD_FEATURE_MISSING_SHMEM = 32,
    LM_UFFD_FEATURE_EVENT_UNMAP = 64,
    LM_UFFD_FEATURE_THREAD_ID = 256,
    LM_UFFD_FEATURE_MINOR_SHMEM = 1024,
    LM_UFFD_FEATURE_POISON = 16384,
    LM_UFFD_FEATURE_WP_ASYNC = 32768,
    LM_UFFD_FEATURE_MOVE = 65536
};

struct lm_features {
    int mode;               /* enum lm_mode */
    int source;             /* enum lm_source */
    uint64_t api_features;  /* what UFFDIO_API reported as supported */
    uint64_t ioctls;        /* UFFDIO_API's ioctl bitmask */
    int dev_errno;          /* why /dev/userfaultfd failed (0 if not tried or it worked) */
    int syscall_errno;      /* why the full-mode syscall failed */
    int user_only_errno;    /* why the user-mode-only syscall failed */
    int api_errno;          /* why UFFDIO_API failed */
};

enum lm_zero_write {
    LM_ZW_DEFAULT = 0,
    LM_ZW_COPY = 1,      /* UFFDIO_COPY of zeros: one fault, the page is allocated at once */
    LM_ZW_ZEROPAGE = 2   /* UFFDIO_ZEROPAGE: the kernel then takes a copy-on-write fault */
};

/* At most this many serving threads (and CPUs in lm_config.cpus). */
enum { LM_MAX_SERVE_THREADS = 64 };

/* Serving configuration. Zero/NULL fields take the defaults documented in docs/tunables.md. */
struct lm_config {
    int acquire;                 /* enum lm_acquire */
    int nthreads;                /* unpinned serving threads when ncpus == 0 (default: 1) */
    const int *cpus;             /* pin one serving thread to each of these CPUs */
    int ncpus;
    uint32_t max_cluster_pages;  /* readahead bound per fault (default 512 = 2 MiB) */
    int zero_write;              /* enum lm_zero_write: how a store to a zero page is served */
    int test_fail_fills;         /* test hook: 1 = every fill fails with EIO (a broken page
                                    source, which must make accesses fail loudly, never hang or
                                    read 0); N > 1 = every Nth fill attempt fails (injected
                                    failures for stress tests); 0 = off */
    int timeline;                /* record when and how each page was first made present */
    int test_no_poison;          /* test hook: act as a kernel without UFFDIO_POISON (< 6.6) */
    int share_canonical;         /* enum lm_share_canonical: canonical deferrals map a shared
                                    chunk of the template (docs/shared-pages.md, section 3) */
    int shared_first_touch;      /* enum lm_first_touch: who serves first touches of a chunk
                                    block (docs/shared-pages.md, section 3 item 3) */
    int test_no_dirty;           /* test hook: dirty tracking as on a kernel without
                                    WP_ASYNC and PAGEMAP_SCAN (LM_DIRTY_NONE) */
    int test_fail_publish;       /* test hook: every publication into a shared pool fails
                                    with ENOMEM (a memory cgroup's limit reached) */
    int test_fail_copyback;      /* test hook: the first N copies that bring a background
                                    checkpoint's staged pages back fail with ENOMEM */
    int verify_shared;           /* a shared restore: pages another process published into
                                    the pool are checked against their signatures before they
                                    are mapped; one that differs is served by a private copy
                                    from the store (restore(share=True, verify=True)) */
};

/* Region config share_canonical. AUTO (0, the default): map chunks where the kernel can
   (UFFD_FEATURE_MINOR_SHMEM) and within the VMA budget; OFF: copy at each first touch; ON: as
   AUTO, but creating the region fails with -EOPNOTSUPP where the kernel cannot. */
enum lm_share_canonical { LM_SC_AUTO = 0, LM_SC_OFF = 1, LM_SC_ON = 2 };

/* Region config shared_first_touch: chunk blocks (never pool pages) are either registered
   MISSING | MINOR, every first touch a uffd round trip served with UFFDIO_CONTINUE and stamped
   in the working set (SEEN), or left unregistered, first touches served by the kernel itself
   (fault-around, no round trip) and invisible to the working set (KERNEL). DEFAULT is KERNEL:
   benchmark 3 decided it (docs/shared-pages.md, section 3). */
enum lm_first_touch { LM_FT_DEFAULT = 0, LM_FT_SEEN = 1, LM_FT_KERNEL = 2 };

/* How a page was first made present (the fault timeline). */
enum lm_path {
    LM_PATH_NONE = 0, LM_PATH_DEMAND = 1, LM_PATH_READAHEAD = 2, LM_PATH_PREFETCH = 3,
    LM_PATH_BACKGROUND = 4, LM_PATH_MATERIALIZE = 5
};

enum { LM_HIST_BUCKETS = 256 };

struct lm_stats {
    uint64_t faults;              /* page-fault messages served */
    uint64_t faults_zero;         /* ... by class of the faulting page */
    uint64_t faults_canonical;
    uint64_t faults_empty;
    uint64_t faults_snapshot;
    uint64_t faults_spurious;     /* page was already present (another path filled it) */
    uint64_t faults_write;
    uint64_t readahead_pages;     /* pages made present around a faulting page */
    uint64_t pages_present;
    uint64_t bytes_materialized;  /* bytes made present by faults and lm_materialize() */
    uint64_t materialized_pages;  /* pages made present by lm_materialize() */
    uint64_t errors;              /* ioctl failures on the fault path */
    int last_error;               /* -errno of the last fault-path failure */
    int serving_threads;
    uint64_t service_ns_max;
    uint64_t service_ns_total;
    uint64_t hist[256];           /* service time histogram, see lm_hist_bucket_upper() */
    uint64_t served_by_thread[64];  /* faults served by each serving thread (placement) */
    uint64_t wakeups_empty;       /* serving threads woken with nothing to read */
    uint64_t prefetched_pages;    /* made present by lm_prefetch() */
    uint64_t background_pages;    /* made present by the background fill */
    uint64_t source_bytes_read;   /* read from the snapshot store */
    uint64_t verify_failures;     /* pages whose contents did not match their signature */
    int background_running;
    int remote;                   /* enum lm_remote */
    uint64_t pages_poisoned;      /* pages in state LM_POISONED now */
    int shared;                   /* the region maps a shared pool (lm_region_share) */
    uint64_t pages_shared_mapped; /* pages mapped from the pool (UFFDIO_CONTINUE) */
    uint64_t pages_published;     /* pages this region put into the pool */
    uint64_t pool_fallback_pages; /* snapshot pages of a shared region served by private copies */
    uint64_t canonical_shared_pages;  /* canonical pages mapped from a shared chunk (CONTINUE) */
    uint64_t canonical_copied_pages;  /* canonical pages copied because the VMA budget was spent */
    uint64_t map_budget_fallbacks;    /* defer_fill calls that found the VMA budget spent */
    int share_canonical;          /* canonical deferrals may map shared chunks here */
    int shared_first_touch;       /* 1: chunk blocks registered (first touches reach us); 0:
                                     served by the kernel (config.shared_first_touch) */
    uint64_t canonical_kernel_pages;  /* pages of kernel-served chunk blocks now */
    uint64_t pool_kernel_pages;   /* pages of a complete pool the kernel serves now (restore
                                     with shared_first_touch=False; docs/shared-pages.md) */
};

struct lm_region;

unsigned lm_abi_version(void);
const char *lm_last_op(void);
long lm_page_size(void);

/* Open a userfaultfd the way a region would, ask the kernel what it supports, close it. */
int lm_probe(int acquire, struct lm_features *out);

/* Map `nbytes` (a multiple of the page size) of private anonymous memory, register it with a
   new userfaultfd and create the metadata memfd. Serving threads are not started. */
int lm_region_create(size_t nbytes, const struct lm_config *cfg, struct lm_region **out);
void *lm_region_addr(struct lm_region *r);
size_t lm_region_npages(struct lm_region *r);
int lm_region_meta_fd(struct lm_region *r);
int lm_region_mode(struct lm_region *r);
/* Can a region share pages here: a userfaultfd with UFFD_FEATURE_MINOR_SHMEM (5.14), a
   memfd, and a MISSING | MINOR registration of a private mapping of it offering CONTINUE?
   0, or -errno with lm_last_op() naming what failed. */
int lm_probe_shared(int acquire);
/* Can shared pages be huge here: a 2 MiB block of a memfd made one huge folio
   (MADV_COLLAPSE, Linux 6.1, THP not "deny"), which a mapping then reads through one PMD?
   Canonical chunks and complete pools are made so where it works (docs/shared-pages.md,
   "Huge shared pages"). 0, or -errno with lm_last_op() naming what failed. */
int lm_probe_huge_shared(void);
/* Make a fresh region (serving not started, nothing restored or deferred yet) a shared one:
   its memory becomes a private mapping of `pool_fd` (a memfd of at least the region's size,
   duplicated; page p at offset p * page_size): pages the pool holds are mapped from it
   (reads share them, a store copies), pages it does not hold are published into it when
   filled (docs/shared-pages.md). A read-only pool fd (O_RDONLY: a page server's pool,
   section 5.3) is mapped but never published into: the region's own fills map the pages the
   pool holds and serve its holes by private copies (stats.pool_fallback_pages). */
int lm_region_share(struct lm_region *r, int pool_fd);
/* Where the region's pages are, from the page tables (PAGEMAP_SCAN, Linux 6.7): counts[0]
   mapped from shared memory (a pool), [1] private (copies, written pages), [2] the kernel's
   zero page, [3] not mapped. Costs a page-table walk (~15-40 ms per mapped GiB). */
int lm_page_counts(struct lm_region *r, uint64_t *counts);
/* Test hook: the process-wide budget of VMAs that canonical chunks may create (n >= 0), or
   back to the default (n < 0: vm.max_map_count / 2 minus the mappings there were when first
   needed). Returns the budget now in force (VMAs in use are not counted off). */
long lm_test_map_budget(long n);
/* Test hook: change config.test_fail_fills of a live region. */
void lm_region_test_fail_fills(struct lm_region *r, int n);

int lm_region_start(struct lm_region *r);     /* start the serving threads */
int lm_region_stop(struct lm_region *r);      /* stop and join them; idempotent */
int lm_region_serving(struct lm_region *r);   /* number of running serving threads */

/* Free everything. The data mapping is left alone when unmap_data is 0: the caller has taken
   ownership of the address range (the Python buffer object unmaps it once no view is left). */
void lm_region_destroy(struct lm_region *r, int unmap_data);

/* In a child after fork(): free bookkeeping without touching the parent's threads. */
void lm_region_forget(struct lm_region *r);

/* Canonical pages: identical contents give the same id (hash, then memcmp). */
int lm_canonical(struct lm_region *r, const void *page, uint32_t *id_out, uint64_t *sig_out);
int lm_canonical_read(struct lm_region *r, uint32_t id, void *out);
uint32_t lm_canonical_count(struct lm_region *r);

/* Record an update for pages [first, first+n): cls is LM_CLS_ZERO or LM_CLS_CANONICAL (then
   canon is the id). Present pages are discarded; nothing is written until first access.
   A canonical deferral maps each whole 2 MiB block of the range (counted from the region's
   start) from one shared chunk of the template where config.share_canonical allows: first
   touches map the chunk's page (UFFDIO_CONTINUE), stores copy it (docs/shared-pages.md 3). */
int lm_defer_fill(struct lm_region *r, size_t first, size_t n, int cls, uint32_t canon);

/* Carry out pending updates now: every page in the range becomes present. */
int lm_materialize(struct lm_region *r, size_t first, size_t n);

/* Signatures of pages [first, first+n) into meta and out (may be NULL): present pages are
   hashed; lazy pages take the signature of their pending contents without being touched. */
int lm_signatures(struct lm_region *r, size_t first, size_t n, uint64_t *out);

int lm_stats(struct lm_region *r, struct lm_stats *out);
/* The fault timeline (config.timeline): per page, microseconds after the region was created
   (+1; 0 = never present) and the enum lm_path that made it present. -ENOENT when off. */
int lm_timeline(struct lm_region *r, uint32_t *us, uint8_t *path);
uint64_t lm_hist_bucket_upper(int bucket);
uint64_t lm_xxh3(const void *data, size_t len);
const char *lm_xxh3_impl(void);

/* ---- snapshots (docs/snapshot-format.md) --------------------------------------------- */

/* One page-map entry of a snapshot file (4 bytes, little-endian on disk): LM_SNAP_UNTOUCHED,
   LM_SNAP_ZERO, LM_SNAP_STORED + i for the contents of store entry i, or (version 3 files with
   a parent only) LM_SNAP_PARENT: whatever the parent snapshot's page of the same index holds. */
enum lm_snap_class { LM_SNAP_UNTOUCHED = 0, LM_SNAP_ZERO = 1, LM_SNAP_STORED = 2 };
enum { LM_SNAP_PARENT = 0xFFFFFFFF };
/* A parent page class the checkpoint plan must not rely on (lm_ckpt_plan_parent). */
enum { LM_PARENT_UNKNOWN = 255 };
struct lm_snap_page {
    uint32_t entry;
};

/* Codecs of store entries (snapshot format version 3, the entry index): an index entry is a
   u32, the entry's stored length in bits 0..27 and its codec in bits 28..31. */
enum lm_codec { LM_CODEC_RAW = 0, LM_CODEC_ZSTD = 1, LM_CODEC_LZ4 = 2 };
/* 1 when this build can write and read entries of that codec, else 0. */
int lm_codec_available(int codec);
/* The level used when 0 is asked for (zstd: measured, codec.c says why; 0 for the others). */
int lm_codec_default_level(int codec);
/* Compress n pages at src (n * page_size bytes) one by one with `codec` (level 0: the
   default), using up to `threads` threads (0: one per CPU we may run on): out (capacity
   n * page_size bytes, not overlapping src) receives the entries one after the other, a page
   that does not shrink stored raw; index[i] is entry i's index word; *out_bytes the bytes
   written to out (the sum of the lengths). */
int lm_pack_pages(const void *src, size_t n, size_t page_size, int codec, int level,
                  int threads, void *out, uint32_t *index, uint64_t *out_bytes);
/* Decode one entry (`len` bytes at src, index word `entry`) into dst, exactly page_size
   bytes: a length or codec the index does not allow, or contents that do not decode to
   exactly one page, are -EBADMSG (nothing is written past dst + page_size). */
int lm_unpack_entry(const void *src, size_t len, uint32_t entry, size_t page_size, void *dst);

/* One file of a source of several layers (lm_source_attach_layers): `nstored` store entries
   at store_offset (store_bytes bytes), either of page_size bytes each (index NULL) or
   described by an entry index of nstored words (copied); their signatures, nstored u64 with
   XXH3-64 sigs_xxh3, at sigs_offset. */
struct lm_src_layer {
    int fd;
    uint64_t store_offset;
    uint64_t store_bytes;
    uint64_t nstored;
    const uint32_t *index;
    uint64_t sigs_offset;
    uint64_t sigs_xxh3;
};
/* Serve SNAPSHOT pages from several files: the store entries of layer 0 are global ids
   [0, n0), layer 1's [n0, n0 + n1), and so on (at most LM_SNAP_MAX_STORED in all); the page
   map handed to lm_restore_table and the signatures use these ids. Each fd is duplicated and
   watched for changes; a compressed entry is decoded when read (a failure poisons the page
   on the fault path). 1 to 64 layers; every layer checked (offsets inside the file, index
   entries well-formed and summing to store_bytes). verify as lm_source_attach. */
int lm_source_attach_layers(struct lm_region *r, const struct lm_src_layer *layers, size_t n,
                            int verify);

/* Serve SNAPSHOT pages from `fd` (duplicated): store entry i is page_size bytes at
   store_offset + i * page_size; the store's signatures (one u64 per entry, XXH3-64 sigs_xxh3
   over them) are at sigs_offset and are read when first needed (lm_source_signatures). With
   verify they are read now and every page is checked against its signature as it is served;
   a mismatch poisons the page (access raises SIGBUS). */
int lm_source_attach(struct lm_region *r, int fd, uint64_t store_offset, uint64_t nstored,
                     uint64_t sigs_offset, uint64_t sigs_xxh3, int verify);
/* Serve SNAPSHOT pages from a raw file (a .npy, .npz or .safetensors file restored as the
   region's image, docs/foreign-formats.md): `fd` (duplicated, a regular file of exactly
   `nbytes` bytes now: -ESTALE otherwise) has ceil(nbytes / page_size) store entries, entry i
   being the file's bytes [i * page_size, (i + 1) * page_size) and the bytes past the end of
   the file reading as zero. Size and modification time are watched as for a snapshot. There is
   no signature section: lm_source_signatures() hashes the file's pages when signatures are
   first needed (verify: now, one read of the whole file). */
int lm_source_attach_raw(struct lm_region *r, int fd, uint64_t nbytes, int verify);
/* ---- snapshots in an S3 object store (objstore.c, docs/object-store.md) ---------------- */
/* Where the chunks are and how to ask for them. Strings are copied. */
struct lm_objs_config {
    const char *endpoint;       /* http(s)://host[:port] */
    const char *region;         /* SigV4's region */
    const char *bucket;
    const char *access_key;
    const char *secret_key;
    const char *session_token;  /* NULL or "": none */
    const char *cache_dir;      /* the per-machine chunk cache for this endpoint and bucket
                                   (created 0700); NULL or "": no cache */
    uint64_t cache_max_bytes;   /* evict the least recently used chunks above it; 0: no bound */
    uint32_t retries;           /* attempts after the first on network or server failures (<= 10) */
    uint32_t timeout_ms;        /* per request; 0: 30 s */
};
/* A chunk object <bucket>/.plm/chunks/<id as 32 hex digits, high word first>: length bytes
   whose XXH3-128 is id (low, high). */
struct lm_objs_chunk {
    uint64_t id[2];
    uint32_t length;
    uint32_t reserved;
};
/* Where one store entry is: its chunk (an index into the chunk table) and byte offset. */
struct lm_objs_entry {
    uint32_t chunk;
    uint32_t offset;
};
enum { LM_OBJS_MAX_CHUNK = 64 << 20 };
/* Counters of lm_source_objs_stats, in this order. */
enum lm_objs_stat {
    LM_OBJS_REQUESTS = 0,       /* GETs sent */
    LM_OBJS_FETCHES = 1,        /* chunks fetched and checked */
    LM_OBJS_FETCH_BYTES = 2,    /* bytes received */
    LM_OBJS_RETRIES = 3,        /* attempts repeated (network, server, corrupt body) */
    LM_OBJS_FAILURES = 4,       /* chunks that could not be had: their pages were poisoned */
    LM_OBJS_CORRUPT = 5,        /* bodies that differed from their chunk's id */
    LM_OBJS_CACHE_HITS = 6,     /* reads served from the cache directory */
    LM_OBJS_CACHE_WRITES = 7,   /* chunks written into it */
    LM_OBJS_CACHE_WRITE_ERRORS = 8, /* chunks that could not be (a full directory): served anyway */
    LM_OBJS_CACHE_BAD = 9,      /* cache files that failed their check: removed, fetched again */
    LM_OBJS_EVICTED = 10,       /* cache files removed to stay under cache_max_bytes */
    LM_OBJS_NSTATS = 11
};
struct lm_objs;
/* The chunk table and one entry per store entry (both copied; every entry must start inside
   its chunk). */
int lm_objs_new(const struct lm_objs_config *cfg, const struct lm_objs_chunk *chunks,
                size_t nchunks, const struct lm_objs_entry *entries, size_t nentries,
                struct lm_objs **out);
void lm_objs_free(struct lm_objs *o);
/* In a child after fork(): close what the child owns (cache descriptors), leak the rest. */
void lm_objs_forget(struct lm_objs *o);
/* Serve SNAPSHOT pages from an object store: `layer` as for lm_source_attach_layers, its fd a
   file that holds everything of the snapshot but the store (the signatures are read from it),
   its store read through `o` (entry i = o's entry i). On success the source owns o. */
int lm_source_attach_remote(struct lm_region *r, const struct lm_src_layer *layer,
                            struct lm_objs *o, int verify);
/* The object store's counters (LM_OBJS_NSTATS of them); -ENOENT if the region's source is not
   an object store. */
int lm_source_objs_stats(struct lm_region *r, uint64_t *out);

/* Read and check the source's signatures if that has not been done yet (idempotent); lazy
   page records filled before then get theirs (a raw source's are computed by hashing its
   pages). 0 when the region has no snapshot source. */
int lm_source_signatures(struct lm_region *r);
/* Check a snapshot's page map and working set: entries name store entries in range, every
   store entry is used, working-set pages are in range and listed once. counts[3] receives
   the number of untouched, zero and stored pages. */
int lm_snap_check(const struct lm_snap_page *map, size_t npages, uint64_t nstored,
                  const uint64_t *ws, size_t nws, uint64_t *counts);
/* Make a fresh region hold the snapshot: its pages become deferred updates. The map is
   not copied: the caller keeps it alive until lm_meta_pending() is 0 or the region ends
   (records are filled from it as pages are first claimed; lm_meta_sync() fills the rest). */
int lm_restore_table(struct lm_region *r, const struct lm_snap_page *map, size_t npages,
                     uint64_t nstored);
int lm_meta_sync(struct lm_region *r);
int lm_meta_pending(struct lm_region *r);
/* Carry out the pending updates of the listed pages now (working-set prefetch). */
int lm_prefetch(struct lm_region *r, const uint64_t *pages, size_t n);
/* Background fill of every page that still needs an update, yielding to demand faults. */
int lm_background_start(struct lm_region *r);
int lm_background_stop(struct lm_region *r);

/* A page's contents without faulting it in: lazy pages are read from where their update
   comes from (canonical store, snapshot store, zero). */
int lm_page_read(struct lm_region *r, size_t page, void *out);

/* Checkpoint, step 1: classify and hash every page, deduplicate contents and lay out the
   store: working-set pages first, in the order given, then the rest in address order. Fills
   map[npages], and per store entry its signature (sigs[]) and the page whose contents it holds
   (store_pages[]); returns the number of store entries in *nstored. Pages with equal
   signatures share an entry; with `compare` their contents are compared as they are placed (a
   hash collision gets its own entry), without it lm_ckpt_compare() must check them after. */
int lm_ckpt_plan(struct lm_region *r, const uint64_t *ws, size_t nws,
                 struct lm_snap_page *map, uint64_t *sigs, uint64_t *store_pages,
                 uint64_t *nstored, int compare);
/* An incremental checkpoint's plan: as lm_ckpt_plan, against a parent snapshot described per
   page by parent_cls (LM_SNAP_UNTOUCHED, LM_SNAP_ZERO, LM_SNAP_STORED or LM_PARENT_UNKNOWN) and
   parent_sigs (the signature of a stored page). Pages set in `clean` (ceil(npages / 64) words,
   bit p % 64 of word p / 64; NULL: none) are known unchanged since the parent was taken and are
   not read: a stored one maps to LM_SNAP_PARENT, the others keep the parent's class. Every
   other page is classified, and a stored page with its parent page's signature maps to
   LM_SNAP_PARENT (the caller compares those pages' contents with the parent's). */
int lm_ckpt_plan_parent(struct lm_region *r, const uint64_t *ws, size_t nws,
                        struct lm_snap_page *map, uint64_t *sigs, uint64_t *store_pages,
                        uint64_t *nstored, int compare, const uint8_t *parent_cls,
                        const uint64_t *parent_sigs, const uint64_t *clean);
/* Compare every page sharing a store entry with the entry's page, byte by byte: 0 if all are
   equal, 1 if some page differs (a hash collision: plan again with compare), or -errno. It
   can run while lm_ckpt_write() writes the store. */
int lm_ckpt_compare(struct lm_region *r, const struct lm_snap_page *map,
                    const uint64_t *store_pages, uint64_t nstored);
/* Checkpoint, step 2: write the contents of store_pages[0..n) to fd at offset. */
int lm_ckpt_write(struct lm_region *r, int fd, uint64_t offset, const uint64_t *store_pages,
                  size_t n);
/* Checkpoint, step 2 of a compressed store: the contents of store_pages[0..n) compressed page
   by page with `codec` (lm_pack_pages: level 0 the default, every CPU we may run on; a page
   that does not shrink stored raw), written one after the other to fd from offset; index[i]
   is entry i's index word, *written the bytes written. */
int lm_ckpt_write_packed(struct lm_region *r, int fd, uint64_t offset,
                         const uint64_t *store_pages, size_t n, int codec, int level,
                         uint32_t *index, uint64_t *written);

/* Background checkpoints (freeze.c, docs/design.md "Background checkpoints"). A freeze
   captures the region as it is at one instant, the pause, without stopping the program for
   longer than that: lm_freeze_begin moves the present pages to a staging range in one mremap
   (page tables move whole), after which the program's first touch of a page is served from
   staging, and the lm_ckpt_* calls read every page as it was at the pause. Needs a private
   region registered for async write-protect (6.7+), not served by a page server, with no
   canonical chunk blocks, and UFFD_FEATURE_EVENT_REMAP. One freeze at a time per region;
   deferrals are refused (EBUSY) until it ends. */
struct lm_freeze;
struct lm_freeze_stats {
    uint64_t arm_ns;            /* waiting for deferrals and claims in flight (program runs) */
    uint64_t pause_ns;          /* the pause: the mremap that moves the pages */
    uint64_t begin_ns;          /* lm_freeze_begin, whole */
    uint64_t staged;            /* pages present at the pause (known after lm_freeze_scan) */
    uint64_t copied_back;       /* staged pages brought back by lm_freeze_copy_back */
    uint64_t fault_served;      /* staged pages brought back by a fault (the program touched
                                   them first) */
    uint64_t written;           /* pages written by lm_ckpt_write* while frozen */
    uint64_t stray;             /* faults in the staging range served zeros (never expected) */
};
/* test_copy: NULL, or nbytes where the region's bytes are copied inside the pause (tests: a
   copy independent of everything the checkpoint reads; pages lazy at the pause read zero). */
int lm_freeze_begin(struct lm_region *r, void *test_copy, struct lm_freeze **out);
/* Which pages were present at the pause, and the dirty-tracking epoch that ended there. Returns
   once they are known; the copier goes on bringing staged pages back meanwhile. */
int lm_freeze_scan(struct lm_freeze *fz);
/* Bring every staged page back into the region (its bytes stay in staging for the
   checkpoint). Needs lm_freeze_scan first. */
int lm_freeze_copy_back(struct lm_freeze *fz);
/* The pages that may have changed in the epoch that ended at the pause (words as
   lm_dirty_bitmap's); needs lm_freeze_scan first. */
int lm_freeze_old_dirty(struct lm_freeze *fz, uint64_t *words);
/* Page `page` as it was at the pause. */
int lm_freeze_page_read(struct lm_freeze *fz, size_t page, void *out);
void lm_freeze_stats(struct lm_freeze *fz, struct lm_freeze_stats *out);
/* End the freeze: staged pages not yet back are brought back, staging is unmapped, the
   records' stash dropped. failed: the checkpoint did not complete, so the epoch that ended at
   the pause is merged back into the current one. 0 (fz freed) or -errno (still frozen: call
   again, or close the region). */
int lm_freeze_end(struct lm_freeze *fz, int failed);

/* Working-set window: pages first touched since the mark (in touch order), plus present pages
   written since the mark (write-protect tracking, where the kernel has WP_ASYNC). */
int lm_ws_mark(struct lm_region *r);
/* Up to cap pages into out; returns the count (or -errno). */
long lm_ws_collect(struct lm_region *r, uint64_t *out, size_t cap);
int lm_ws_tracks_writes(struct lm_region *r);

/* Dirty tracking (dirty.c, docs/design.md "Dirty tracking"): which pages may differ from what
   they held when the epoch began (region creation, or the last lm_dirty_reset: a checkpoint
   calls it before it reads the pages, a restore once the table is set). Never a false
   negative; the false positives each mode keeps are listed in the design. */
enum lm_dirty_mode {
    LM_DIRTY_NONE = 0,        /* no page-table tracking (a kernel without WP_ASYNC and
                                 PAGEMAP_SCAN, 6.7): every page that is not lazy as the epoch
                                 or a deferral since left it is reported */
    LM_DIRTY_WP_ASYNC = 1,    /* async write-protect, harvested with PAGEMAP_SCAN */
    LM_DIRTY_PAGE_TABLES = 2  /* a shared region (not registered for WP): a page is dirty
                                 when it holds a private copy, in every epoch since */
};
int lm_dirty_mode(struct lm_region *r);
/* End the epoch and start a new one, in one step: words (NULL, or ceil(npages / 64) words as
   lm_dirty_bitmap's) receive the pages that may have changed in the epoch that ends; a change
   goes to that epoch or to the new one, never to neither. Afterwards nothing is dirty but
   pages the mode cannot vouch for (LM_DIRTY_PAGE_TABLES: private copies). On failure every
   page counts as changed, in both epochs. */
int lm_dirty_reset(struct lm_region *r, uint64_t *words);
/* ceil(npages / 64) words: bit p (word p / 64, bit p % 64) set = page p may have changed. */
int lm_dirty_bitmap(struct lm_region *r, uint64_t *words);
/* Put back an epoch a failed checkpoint ended with lm_dirty_reset: words (as it filled them)
   are ORed into the current epoch, so that its changes are not lost with the file. */
int lm_dirty_putback(struct lm_region *r, const uint64_t *words);

/* ---- page server (server.c, docs/page-server.md) -------------------------------------- */

/* One range of a client's memory, as the client describes it (Firecracker's
   GuestRegionUffdMapping): `size` bytes at the client's address `base`, whose contents are the
   source's bytes from `offset`. */
struct lm_srv_map {
    uint64_t base;
    uint64_t size;
    uint64_t offset;
};

struct lm_srv_stats {
    uint64_t faults;            /* fault messages served */
    uint64_t pages_copied;      /* pages filled from the source (UFFDIO_COPY), readahead included */
    uint64_t pages_zero;        /* pages filled with zeros (UFFDIO_ZEROPAGE) */
    uint64_t removed_faults;    /* faults on ranges the client removed: served as zeros */
    uint64_t events_remove;
    uint64_t events_unmap;
    uint64_t events_remap;
    uint64_t poisoned;          /* pages that could not be served: the access raises SIGBUS */
    uint64_t errors;
    int last_error;             /* -errno */
    int running;                /* 0 once the client has exited or its uffd failed */
    uint64_t service_ns_total;
    uint64_t service_ns_max;
    uint64_t unsupported_faults; /* write-protect or minor faults: not ours to serve (they end
                                    the serving, see `died`) */
    uint64_t redelivered;       /* fault messages handed back to the kernel (the thread woken to
                                   fault again) because the fault queue could not grow */
    int died;                   /* -errno that ended the serving thread by an error (0: it
                                   runs, or ended because the client exited or was stopped) */
    uint64_t pages_published;   /* sharing client: pages this client's faults put into the pool */
    uint64_t pages_shared_mapped; /* sharing client: pages mapped from the pool (UFFDIO_CONTINUE) */
    uint64_t pool_fallback_pages; /* sharing client: snapshot pages served by private copies
                                     because publishing failed (out of memory) */
};

struct lm_srv;
/* A snapshot's page table, shared by every client of one server: source page i's contents
   are at file offset entries[i], or -1 for a zero page. Reference counted: the server that
   made it holds one reference, each lm_srv_start() takes one, lm_srv_destroy() drops it. */
struct lm_srv_table;

/* Copy `len` entries into a new table (one reference, the caller's). Entries must be -1 or
   file offsets (>= 0). */
int lm_srv_table_new(const int64_t *entries, uint64_t len, struct lm_srv_table **out);
/* A layered table: a compressed store or a chain of files (docs/snapshot-format.md). Page
   i, when entries[i] >= 0, is the store entry at file offset entries[i] of fds[layers[i]]
   (the table keeps its own duplicates of fds), with entry word codes[i] (length and codec, as
   the version 3 entry index; a raw page: page_size | LM_CODEC_RAW << 28) and signature
   sigs[i], which a decoded entry must match (else the page is poisoned, never served).
   Every word and layer is checked here. */
int lm_srv_table_new_layered(const int64_t *entries, const uint32_t *codes,
                             const uint8_t *layers, const uint64_t *sigs, uint64_t len,
                             const int *fds, int nfds, struct lm_srv_table **out);
void lm_srv_table_release(struct lm_srv_table *t);
uint64_t lm_srv_table_refs(struct lm_srv_table *t);
/* Bytes held by every table alive in this process (what sharing saves is visible here). */
uint64_t lm_srv_table_bytes_live(void);

/* A page server's shared pool (docs/shared-pages.md 5.3): a memfd "pylazymem-pool" of
   (npages + 1) pages holding source page i at offset i, sealed against shrinking and growing,
   and a view of it (MAP_SHARED, PROT_NONE) registered MISSING on a userfaultfd of the
   server's own, through which the server publishes pages with UFFDIO_COPY (the one atomic
   way: another process sees a hole or the whole page); then sealed F_SEAL_FUTURE_WRITE, so
   that nobody can get a writable mapping or write() it, while the view keeps publishing.
   The server is the pool's only filler; its sharing clients map it read-only. Reference
   counted like the table: lm_srv_pool_new gives the caller one, each lm_srv_start with it
   takes one. `acquire` as lm_config.acquire (how to get a userfaultfd). */
struct lm_srv_pool;
int lm_srv_pool_new(uint64_t npages, uint64_t page_size, int acquire, struct lm_srv_pool **out);
void lm_srv_pool_release(struct lm_srv_pool *p);
int lm_srv_pool_fd(struct lm_srv_pool *p);   /* the pool memfd (the server's; reopen it
                                                O_RDONLY to hand it out) */
/* Publish every page of the table that is not a zero page and not in the pool yet (pread of
   src_fd, UFFDIO_COPY into the view). 0 or -errno; *published = pages it published. */
int lm_srv_pool_fill(struct lm_srv_pool *p, struct lm_srv_table *t, int src_fd,
                     uint64_t *published);
/* 1 when every non-zero page of the table is in the pool (it stays so: pages are never
   removed), 0 when some is a hole, or -errno. */
int lm_srv_pool_complete(struct lm_srv_pool *p, struct lm_srv_table *t);
/* Bytes the pool holds (its resident pages), and pages published by anyone. */
uint64_t lm_srv_pool_bytes(struct lm_srv_pool *p);
uint64_t lm_srv_pool_published(struct lm_srv_pool *p);

/* flags of lm_srv_start */
enum {
    /* peer_pidfd is the client's connection, not a pidfd: the client watches the server and
       takes over when it closes. When the serving thread dies from an error it shuts that
       connection down (the client takes over at once) instead of poisoning the client's
       missing pages, which it does for other clients so that they fail loudly. */
    LM_SRV_WATCHED = 1
};

/* Serve the faults of a client's userfaultfd on a native thread. Source page at byte `o` of
   the source: table == NULL: src_fd's bytes at offset o (a raw memory file; past its end the
   page is poisoned); else table's entry o / page_size (every map's source bytes must lie
   within the table). The table gains a reference, src_fd is duplicated. Arguments are
   checked (-EINVAL with the reason in lm_last_op): 1 to 64 page-aligned, non-empty,
   non-overlapping maps that do not wrap around (address or source offset), the machine's
   page size, max_cluster <= 4096 pages (0: the default). On success the server owns `uffd`
   and `peer_pidfd` (-1: none; when it becomes readable the client has exited and the thread
   ends); on failure the caller keeps them. Only MISSING faults are served (and minor ones of
   a sharing client, below): a write-protect or other minor fault ends the serving with
   -EOPNOTSUPP. When the serving thread dies from an error
   it poisons the client's missing pages (see LM_SRV_WATCHED) and records the error in
   stats.died.
   pool (NULL: none) makes the client a sharing one (it mapped `pool`'s memfd MAP_PRIVATE over
   its maps and registered them MISSING | MINOR; needs a table, and each map's source offset
   is its pool offset): a minor fault (the pool holds the page) is served with UFFDIO_CONTINUE
   on the client's uffd; a missing fault on a source page by publishing it into the pool
   (read from src_fd, UFFDIO_COPY into the pool's view; EEXIST: someone was first) and then
   UFFDIO_CONTINUE; zero pages with UFFDIO_ZEROPAGE. The pool gains a reference. */
int lm_srv_start(int uffd, int peer_pidfd, unsigned flags, const struct lm_srv_map *maps,
                 int nmaps, uint64_t page_size, int src_fd, struct lm_srv_table *table,
                 struct lm_srv_pool *pool, uint32_t max_cluster, struct lm_srv **out);
int lm_srv_running(struct lm_srv *s);
void lm_srv_stats(struct lm_srv *s, struct lm_srv_stats *out);
/* Stop the thread and close everything. With poison, pages the client has not received yet
   are poisoned first, so that a client that keeps running after we are gone fails loudly
   (SIGBUS) instead of waiting forever or, once the last uffd is closed, reading zeros. */
void lm_srv_destroy(struct lm_srv *s, int poison);
/* Test hooks (tests/test_server.py), set right after lm_srv_start:
   LM_SRV_TEST_FAIL_AFTER: the thread fails with -EIO once n faults are served;
   LM_SRV_TEST_QUEUE_CAP: the fault queue cannot grow past n messages (as if malloc failed). */
enum { LM_SRV_TEST_FAIL_AFTER = 1, LM_SRV_TEST_QUEUE_CAP = 2 };
int lm_srv_test_inject(struct lm_srv *s, int what, uint64_t n);

/* ---- a region served by a page server (remote.c) ------------------------------------ */

enum lm_remote {
    LM_REMOTE_NONE = 0,     /* served by our own threads */
    LM_REMOTE_SERVED = 1,   /* served by a page server in another process */
    LM_REMOTE_LOST = 2      /* the server is gone: served here again (pages only it knew of
                               are poisoned) */
};

/* The region's userfaultfd, to hand to a page server (the region keeps its own copy). */
int lm_region_uffd(struct lm_region *r);
/* Have the region served by a server: our serving threads must be stopped. A native thread
   watches `fds` (duplicated; e.g. the server's pidfd and the connection to it): once any is
   readable the server is gone, and the region is served here from then on. With
   empty_unknown, pages never given contents here (EMPTY) hold the server's contents: a fault
   on one after the server is gone is poisoned (SIGBUS) rather than served as zeros. */
int lm_region_watch_server(struct lm_region *r, const int *fds, int nfds, int empty_unknown);
int lm_region_remote(struct lm_region *r);   /* enum lm_remote */
/* Record every page that is present (or swapped) in the page tables as present program data:
   what a server filled, our records do not know of. */
int lm_region_sync_present(struct lm_region *r);

/* ---- shared pages: the pool (pool.c, pooldir.c; docs/shared-pages.md, section 2) ---- */

struct lm_pool;
enum lm_pool_role {
    LM_POOL_CREATED = 1,    /* made here, answered for here */
    LM_POOL_JOINED = 2,     /* received from another process of ours (same uid) */
    LM_POOL_UNSHARED = 3    /* made here, but no slot was free to answer on: nobody finds it */
};
struct lm_pool_info {
    uint64_t id;          /* pool id: XXH3-64 of ("plm-pool-1", header_xxh3, page_size, npages) */
    uint64_t npages;      /* region pages; the pool file is (npages + 1) * page_size bytes */
    uint64_t page_size;
    int role;             /* enum lm_pool_role */
    int slot;             /* abstract-socket slot this process answers on, -1: none */
    int sealed;           /* F_SEAL_FUTURE_WRITE present (the pool is complete) */
    int fd;               /* the memfd (owned by the pool; do not close) */
    uint64_t bytes;       /* resident bytes of the pool: fstat st_blocks * 512 */
    uint64_t inode;       /* st_ino of the memfd (tests compare pools across processes) */
};
/* Find this uid's live pool for a snapshot's content (header_xxh3, npages, page_size) among
   processes on this machine (abstract Unix sockets, SCM_RIGHTS), or create one and answer
   for it; max_bytes (0: no bound) refuses creating a larger pool (-EFBIG). One reference,
   the caller's. The same pool opened twice in one process is one object. */
int lm_pool_open(uint64_t header_xxh3, uint64_t npages, uint64_t page_size, uint64_t max_bytes,
                 struct lm_pool **out);
/* Drop a reference; the last one closes the pool's socket (its name is free when this
   returns) and its memfd. */
void lm_pool_release(struct lm_pool *p);
/* -ESTALE for a pool inherited across fork(). */
int lm_pool_info(struct lm_pool *p, struct lm_pool_info *out);
/* Test hook: the answer timeout in ms for joining (default 100; negative: the default). */
void lm_pool_test_timeout(int ms);

/* CDEF END */

#endif
