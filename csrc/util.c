/*
 * util.c: the bottom layer. The failing operation of the calling thread, the clock, the page
 * size, hashing, thread start and the service-time histogram. Calls nothing above it.
 *
 * C functions return -errno; the name of what failed ("ioctl(UFFDIO_COPY)") is kept here so
 * the bindings can turn both into one message in one place.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>
#ifdef LM_XXH_DISPATCH
/* the library's run-time dispatcher, called by name (pylazymem/_build.py defines
   LM_XXH_DISPATCH when a probe links against it) */
#define XXH_DISPATCH_DISABLE_REPLACE
#include <xxh_x86dispatch.h>
#endif

#include "lm_internal.h"

/* ---- errors (moved from errors.c, unchanged) ----------------------------------------- */

static __thread const char *last_op = "";

int lm_fail(const char *op, int err)
{
    last_op = op;
    return -(err ? err : EIO);
}

const char *lm_last_op(void)
{
    return last_op;
}

unsigned lm_abi_version(void)
{
    return LM_ABI_VERSION;
}

/* ---- huge folios for shared memory ---------------------------------------------------- */

#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25   /* Linux 6.1; the value is ABI */
#endif
#define HUGE_BYTES ((size_t)2 << 20)

void *lm_map_aligned(size_t len, int prot, int flags, int fd, uint64_t off)
{
    /* Reserve one block more, map at the aligned address inside, give the slack back. */
    size_t slack = len >= HUGE_BYTES ? HUGE_BYTES : 0;
    char *area = mmap(NULL, len + slack, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                      -1, 0);
    if (area == MAP_FAILED)
        return MAP_FAILED;
    char *at = (char *)(((uintptr_t)area + slack - (slack ? 1 : 0)) &
                        ~(uintptr_t)(slack ? HUGE_BYTES - 1 : 0));
    if (mmap(at, len, prot, flags | MAP_FIXED, fd, (off_t)off) == MAP_FAILED) {
        int e = errno;
        munmap(area, len + slack);
        errno = e;
        return MAP_FAILED;
    }
    size_t head = (size_t)(at - area);
    if (head)
        munmap(area, head);
    if (slack - head)
        munmap(at + len, slack - head);
    return at;
}

/* Why: a 4 KiB page-cache page is mapped by one PTE per page, so reading 1 GiB of a shmem
   file costs ~90 ms of faults however they are taken (fault-around, UFFDIO_CONTINUE
   clusters, MADV_POPULATE_READ: docs/experiments/shared-pages/exp14_floor.c), against ~5 ms
   for huge folios mapped by 512 PMDs (exp15_collapse.c). shmem allocates huge folios only
   where shmem_enabled allows (`never` by default), but MADV_COLLAPSE ignores that setting
   (it honours only `deny`), and a fault maps an existing huge folio through a PMD whatever
   the setting. A range with no page at all is refused (EINVAL): the caller has one there. */
size_t lm_collapse(void *addr, size_t len)
{
    size_t done = 0;
    if ((uintptr_t)addr % HUGE_BYTES)
        return 0;
    for (size_t o = 0; o + HUGE_BYTES <= len; o += HUGE_BYTES) {
        if (madvise((char *)addr + o, HUGE_BYTES, MADV_COLLAPSE) == 0)
            done++;
        else if (errno == EINVAL && done == 0 && o == 0)
            break;   /* no MADV_COLLAPSE here (before 6.1, THP "deny"): none will work */
    }
    return done;
}

size_t lm_shmem_collapse(int fd, uint64_t off, size_t len)
{
    if (len < HUGE_BYTES || off % HUGE_BYTES || len % HUGE_BYTES)
        return 0;
    /* read-only and private to this call: the caller's own mappings keep their flags */
    char *at = lm_map_aligned(len, PROT_READ, MAP_SHARED | MAP_NORESERVE, fd, off);
    if (at == MAP_FAILED)
        return 0;
    madvise(at, len, MADV_DONTFORK);
    size_t done = lm_collapse(at, len);
    munmap(at, len);
    return done;
}

/* ---- clock, page size, hash (moved from wstrack.c and region.c, unchanged) ------------ */

uint64_t lm_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

long lm_page_size(void)
{
    static long ps;
    if (!ps)
        ps = sysconf(_SC_PAGESIZE);
    return ps;
}

/* Hashing: every page signature (XXH3-64) and object-store chunk id (XXH3-128) of the core is
   computed here. The plain entry points of a distribution's libxxhash are compiled for the
   baseline x86-64 (SSE2); where the library carries its x86 dispatcher (Debian's does), the
   AVX2 / AVX-512 kernel it picks at run time hashes a cache-hot 4 KiB page 2.8x faster
   (51 vs 18 GB/s here; a warm restore from the chunk cache hashes every page it reads).
   That kernel returns with the upper halves of the vector registers dirty (libxxhash 0.8.1
   has no vzeroupper on that path): every legacy-SSE instruction the process runs after it,
   ours or any library's, then pays a false dependency (SSE2 XXH3 itself: 18 -> 5.4 GB/s,
   measured). So each dispatched call is followed by vzeroupper, on CPUs that have AVX (the
   only ones where the dispatcher picks a vector kernel wider than SSE2). */
#ifdef LM_XXH_DISPATCH
static bool cpu_has_avx(void)
{
    static int avx = -1;   /* racy first use is harmless: every thread computes the same */
    if (avx < 0) {
        __builtin_cpu_init();
        avx = __builtin_cpu_supports("avx") ? 1 : 0;
    }
    return avx;
}

static inline void vector_state_clean(void)
{
    if (cpu_has_avx())
        __asm__ volatile("vzeroupper" ::: "memory");
}
#endif

uint64_t lm_xxh3(const void *data, size_t len)
{
#ifdef LM_XXH_DISPATCH
    uint64_t h = XXH3_64bits_dispatch(data, len);
    vector_state_clean();
    return h;
#else
    return XXH3_64bits(data, len);
#endif
}

void lm_xxh3_128(const void *data, size_t len, uint64_t out[2])
{
#ifdef LM_XXH_DISPATCH
    XXH128_hash_t h = XXH3_128bits_dispatch(data, len);
    vector_state_clean();
#else
    XXH128_hash_t h = XXH3_128bits(data, len);
#endif
    out[0] = h.low64;
    out[1] = h.high64;
}

/* Which XXH3 entry points lm_xxh3 calls, as features().hashing says it: "xxh3-dispatch" (the
   library's run-time choice of kernel) or "xxh3" (the plain ones). */
const char *lm_xxh3_impl(void)
{
#ifdef LM_XXH_DISPATCH
    return "xxh3-dispatch";
#else
    return "xxh3";
#endif
}

/* ---- threads (moved from handler.c, unchanged) ----------------------------------------- */

int lm_thread_start(pthread_t *tid, const pthread_attr_t *attr, void *(*fn)(void *), void *arg)
{
    sigset_t all, saved;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &saved);   /* the new thread inherits this mask */
    int err = pthread_create(tid, attr, fn, arg);
    pthread_sigmask(SIG_SETMASK, &saved, NULL);
    return err;
}

/* ---- service-time histogram (moved from handler.c; takes the counters, not the region) - */

/* Log-linear buckets: exact below 16 ns, then 8 buckets per power of two. */
static int hist_bucket(uint64_t ns)
{
    if (ns < 16)
        return (int)ns;
    int e = 63 - __builtin_clzll(ns);
    int b = 16 + (e - 4) * 8 + (int)((ns >> (e - 3)) & 7);
    return b < LM_HIST_BUCKETS ? b : LM_HIST_BUCKETS - 1;
}

uint64_t lm_hist_bucket_upper(int b)
{
    if (b < 16)
        return (uint64_t)b + 1;
    int e = (b - 16) / 8 + 4, sub = (b - 16) % 8;
    return (uint64_t)(9 + sub) << (e - 3);
}

void lm_hist_add(struct lm_latency *l, uint64_t ns)
{
    atomic_fetch_add_explicit(&l->hist[hist_bucket(ns)], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&l->ns_total, ns, memory_order_relaxed);
    uint64_t max = atomic_load_explicit(&l->ns_max, memory_order_relaxed);
    while (ns > max && !atomic_compare_exchange_weak_explicit(&l->ns_max, &max, ns,
                                                              memory_order_relaxed,
                                                              memory_order_relaxed))
        ;
}
