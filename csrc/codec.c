/*
 * codec.c: compressing and decompressing snapshot store entries (docs/snapshot-format.md,
 * version 3, "Entry index"). A page is compressed on its own (zstd frame or LZ4 block), so
 * that any one page can be served without reading its neighbours; a page that does not shrink
 * is stored raw. Every entry is described by one u32: its length in bits 0..27, its codec in
 * bits 28..31.
 *
 * Decompression is the part a hostile file reaches: an entry is decoded only into a buffer of
 * exactly one page, its declared length and codec are checked first, and a result that is not
 * exactly one page is an error (a "bomb" cannot write past the page, a short frame cannot
 * leave stale bytes that would pass for contents).
 *
 * Pure functions of their arguments (no region); util.c only.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <lz4.h>
#include <zstd.h>

#include "lm_internal.h"

/*
 * The default zstd level, measured on the project's 2-vCPU VM (4 KiB pages, one thread,
 * lm_pack_pages over the state of `python -m pylazymem.bench compress`; load ~1.4):
 *
 *   level        text (stdlib .py, 64 MiB)   sparse f32 (2% set)   MLP weights (f64)
 *   1            0.323 of raw, 277 MB/s      0.042, 794 MB/s       0.965, 449 MB/s
 *   3            0.314,        224 MB/s      0.042, 773 MB/s       0.965, 389 MB/s
 *   6            0.299,         93 MB/s      0.039, 322 MB/s       0.965, 246 MB/s
 *   (LZ4         0.458,        591 MB/s      0.049, 3421 MB/s      1.000, 3270 MB/s)
 *
 * A 4 KiB frame gives the matcher little history, so levels above 1 buy 3% (level 3) or 7%
 * (level 6) smaller text for 20% or 3x more time; decompression speed does not depend on the
 * level. Level 1 keeps a checkpoint of compressible state near disk speed on two cores.
 */
#define LM_ZSTD_DEFAULT_LEVEL 1

int lm_codec_available(int codec)
{
    return codec == LM_CODEC_RAW || codec == LM_CODEC_ZSTD || codec == LM_CODEC_LZ4;
}

int lm_codec_default_level(int codec)
{
    return codec == LM_CODEC_ZSTD ? LM_ZSTD_DEFAULT_LEVEL : 0;
}

/* ---- decompression --------------------------------------------------------------------- */

/* One zstd decompression context per thread (serving threads, prefetch, the background fill
   each decode pages concurrently), made on first use and freed when the thread ends. */
static pthread_key_t dctx_key;
static pthread_once_t dctx_once = PTHREAD_ONCE_INIT;
static int dctx_key_ok;

static void dctx_free(void *p)
{
    ZSTD_freeDCtx(p);
}

static void dctx_key_make(void)
{
    dctx_key_ok = pthread_key_create(&dctx_key, dctx_free) == 0;
}

static ZSTD_DCtx *thread_dctx(void)
{
    pthread_once(&dctx_once, dctx_key_make);
    if (!dctx_key_ok)
        return NULL;
    ZSTD_DCtx *d = pthread_getspecific(dctx_key);
    if (!d) {
        d = ZSTD_createDCtx();
        if (d && pthread_setspecific(dctx_key, d) != 0) {
            ZSTD_freeDCtx(d);
            d = NULL;
        }
    }
    return d;
}

int lm_entry_check(uint32_t entry, size_t page_size)
{
    uint32_t len = LM_ENTRY_LEN(entry), codec = LM_ENTRY_CODEC(entry);
    if (codec == LM_CODEC_RAW)
        return len == page_size ? 0 : lm_fail("store entry: a raw entry's length is not one page",
                                              EBADMSG);
    if (codec != LM_CODEC_ZSTD && codec != LM_CODEC_LZ4)
        return lm_fail("store entry: unknown codec", EBADMSG);
    if (len == 0 || len >= page_size)
        return lm_fail("store entry: a compressed entry's length is not 1 to page size - 1",
                       EBADMSG);
    return 0;
}

int lm_unpack_entry(const void *src, size_t len, uint32_t entry, size_t page_size, void *dst)
{
    int rc = lm_entry_check(entry, page_size);
    if (rc < 0)
        return rc;
    if (len != LM_ENTRY_LEN(entry))
        return lm_fail("store entry: length differs from the index", EBADMSG);
    switch (LM_ENTRY_CODEC(entry)) {
    case LM_CODEC_RAW:
        memmove(dst, src, page_size);   /* callers may decode in place (store.c) */
        return 0;
    case LM_CODEC_ZSTD: {
        /* Exactly one frame: ZSTD_decompress would go on to a second one (or skip skippable
           frames), so a page could be assembled from pieces the format does not allow. */
        size_t fsz = ZSTD_findFrameCompressedSize(src, len);
        if (ZSTD_isError(fsz) || fsz != len)
            return lm_fail("store entry: not exactly one zstd frame (corrupt compressed entry)",
                           EBADMSG);
        ZSTD_DCtx *d = thread_dctx();
        if (!d)
            return lm_fail("ZSTD_createDCtx", ENOMEM);
        /* Decodes into dst and nowhere else: a frame that would make more than page_size
           bytes fails with dstSize_tooSmall, a short one returns fewer bytes. */
        size_t got = ZSTD_decompressDCtx(d, dst, page_size, src, len);
        if (ZSTD_isError(got) || got != page_size)
            return lm_fail("store entry: zstd frame does not decompress to one page (corrupt "
                           "compressed entry)", EBADMSG);
        return 0;
    }
    default: {   /* LZ4 (lm_entry_check let nothing else through) */
        if (page_size > INT32_MAX)
            return lm_fail("store entry: page too large for LZ4", EINVAL);
        int got = LZ4_decompress_safe(src, dst, (int)len, (int)page_size);
        if (got != (int)page_size)
            return lm_fail("store entry: LZ4 block does not decompress to one page (corrupt "
                           "compressed entry)", EBADMSG);
        return 0;
    }
    }
}

/* ---- compression ----------------------------------------------------------------------- */

struct pack_job {
    const char *src;
    size_t first, n, ps;
    int codec, level;
    char *out;          /* page i's result goes to out + i * ps (compacted afterwards) */
    uint32_t *index;
    int rc;
    const char *op;
};

/* Compress pages [first, first + n) of the job, each into its own page-sized slot; a page
   that does not come out strictly shorter than a page is copied raw. */
static void *pack_range(void *arg)
{
    struct pack_job *j = arg;
    size_t ps = j->ps;
    ZSTD_CCtx *c = NULL;
    if (j->codec == LM_CODEC_ZSTD) {
        if (!(c = ZSTD_createCCtx())) {
            j->rc = lm_fail("ZSTD_createCCtx", ENOMEM);
            j->op = lm_last_op();
            return NULL;
        }
        /* The page size is the content size: the frame records it (a reader can tell a frame
           of another size at once), and no checksum (the signature checks contents). */
        ZSTD_CCtx_setParameter(c, ZSTD_c_compressionLevel, j->level);
        ZSTD_CCtx_setParameter(c, ZSTD_c_contentSizeFlag, 1);
        ZSTD_CCtx_setParameter(c, ZSTD_c_checksumFlag, 0);
    }
    for (size_t i = j->first; i < j->first + j->n; i++) {
        const char *page = j->src + i * ps;
        char *slot = j->out + i * ps;
        size_t len = 0;
        if (j->codec == LM_CODEC_ZSTD) {
            /* Capacity ps - 1: a frame that does not fit has not shrunk (dstSize_tooSmall). */
            size_t k = ZSTD_compress2(c, slot, ps - 1, page, ps);
            len = ZSTD_isError(k) ? 0 : k;
        } else if (j->codec == LM_CODEC_LZ4) {
            int k = LZ4_compress_default(page, slot, (int)ps, (int)(ps - 1));
            len = k > 0 ? (size_t)k : 0;   /* 0: it did not fit in ps - 1 bytes */
        }
        if (len == 0 || len >= ps) {
            memcpy(slot, page, ps);
            j->index[i] = LM_ENTRY(ps, LM_CODEC_RAW);
        } else {
            j->index[i] = LM_ENTRY(len, j->codec);
        }
    }
    ZSTD_freeCCtx(c);
    return NULL;
}

/* Pages per thread below which a second thread costs more than it saves (a thread start is
   ~20-50 us here; zstd level 1 does a 4 KiB page in ~10 us). */
#define PACK_MIN_PER_THREAD 64

int lm_pack_pages(const void *src, size_t n, size_t page_size, int codec, int level,
                  int threads, void *out, uint32_t *index, uint64_t *out_bytes)
{
    if (codec != LM_CODEC_RAW && codec != LM_CODEC_ZSTD && codec != LM_CODEC_LZ4)
        return lm_fail("pack: unknown codec", EINVAL);
    if (page_size < 4096 || page_size > ((size_t)1 << 21) || (page_size & (page_size - 1)))
        return lm_fail("pack: page size must be a power of two from 4096 to 2 MiB", EINVAL);
    if (n && (char *)out < (const char *)src + n * page_size &&
        (const char *)src < (char *)out + n * page_size)
        return lm_fail("pack: the output overlaps the pages", EINVAL);
    if (codec == LM_CODEC_ZSTD && level == 0)
        level = LM_ZSTD_DEFAULT_LEVEL;
    if (codec == LM_CODEC_ZSTD && (level < ZSTD_minCLevel() || level > ZSTD_maxCLevel()))
        return lm_fail("pack: zstd level out of range", EINVAL);
    if (threads <= 0) {   /* as many as the CPUs we may run on, at most 8 */
        cpu_set_t set;
        threads = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 1;
    }
    if (threads > 8)
        threads = 8;
    if ((size_t)threads > n / PACK_MIN_PER_THREAD)
        threads = n / PACK_MIN_PER_THREAD ? (int)(n / PACK_MIN_PER_THREAD) : 1;
    struct pack_job jobs[8];
    pthread_t tids[8];
    bool started[8] = {false};
    size_t per = n / (size_t)threads, at = 0;
    for (int t = 0; t < threads; t++) {
        size_t k = t == threads - 1 ? n - at : per;
        jobs[t] = (struct pack_job){src, at, k, page_size, codec, level, out, index, 0, NULL};
        at += k;
    }
    /* Thread 0's share is done by the caller; a thread that cannot be had is done here too. */
    for (int t = 1; t < threads; t++)
        started[t] = lm_thread_start(&tids[t], NULL, pack_range, &jobs[t]) == 0;
    pack_range(&jobs[0]);
    for (int t = 1; t < threads; t++) {
        if (started[t])
            pthread_join(tids[t], NULL);
        else
            pack_range(&jobs[t]);
    }
    for (int t = 0; t < threads; t++)
        if (jobs[t].rc < 0)
            return lm_fail(jobs[t].op, -jobs[t].rc);
    /* Compact the slots into one run of entries: entry i moves down to the sum of the lengths
       before it, which is never past its slot (every length is at most a page). */
    uint64_t o = 0;
    for (size_t i = 0; i < n; i++) {
        size_t len = LM_ENTRY_LEN(index[i]);
        if (o != (uint64_t)i * page_size)
            memmove((char *)out + o, (char *)out + i * page_size, len);
        o += len;
    }
    *out_bytes = o;
    return 0;
}
