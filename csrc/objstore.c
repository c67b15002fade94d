/*
 * objstore.c: the store entries of a snapshot kept in an S3 object store (issue 13,
 * docs/object-store.md), read natively so that the fault path never waits for Python.
 *
 * A pushed snapshot's entries live in content-addressed chunk objects
 * (<bucket>/.plm/chunks/<XXH3-128, 32 hex digits>). A read of entries [e, e + count) finds
 * each entry's chunk, takes the chunk from the per-machine cache directory or fetches it
 * (libcurl, AWS Signature Version 4), and copies the entries' bytes out.
 *
 * Nothing unchecked is served: a chunk is checked against its id when it is fetched (a bad
 * one is fetched once more, then refused: -EBADMSG, the pages are poisoned); what is read
 * from the cache is checked entry by entry against the snapshot's page signatures by
 * store.c (XXH3-64 of each page, ~0.2 us, once decoded; on the prefetch pipeline's copier
 * threads), which has an entry that fails read again from the bucket (lm_objs_reread: the
 * cache file is removed). A torn cache file (a wrong size) is removed when opened. Hashing only what is read, not
 * each whole chunk at its first use, is what keeps a warm restore near a local file's speed.
 * Cache files are written to a temporary and renamed, so other processes see a whole chunk
 * or none; they are never written in place. Network failures are retried a bounded
 * number of times with growing pauses, then fail the read (-EIO, or -EACCES / -ENOENT for a
 * refused or missing object, which no retry mends).
 */
#define _GNU_SOURCE
#include <curl/curl.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "lm_internal.h"

/* Per chunk: its cache file is known to be there (fetched, or opened) here; or the bucket's
   copy was refused (corrupt twice) or is not there (404): every later read fails at once,
   instead of fetching it again per page. */
enum { C_UNKNOWN = 0, C_CHECKED = 1, C_REFUSED = 2, C_GONE = 3 };
/* Per chunk: whether an entry that failed its check has had the bucket's copy fetched in
   place of the cache file (lm_objs_reread): once per chunk and object, not once per entry. */
enum { R_NONE = 0, R_FETCHING = 1, R_DONE = 2 };
/* A chunk whose fetch failed after its retries (the network, the server, credentials) is not
   asked for again within this long: a fault on a run of pages retries each page alone, and
   readers that waited on the failed fetch each tried again, so one outage cost the whole
   retry cycle (up to retries x timeout) once per page. Later reads try again. */
#define FAILED_HOLD_NS 2000000000ull

/* The calling thread's requests: a flag that cancels them once nonzero (the background fill
   points it at its stop flag, the fetcher threads at their object's: a close does not wait
   for a stalled gateway's retry cycles), and whether its failures are its own to report
   (`quiet`: the background fill and read-ahead leave pages lazy, nothing to report; the
   first reader that a chunk's failure then fails counts it, once). */
static __thread const _Atomic int *cancel_flag;
static __thread bool quiet;
/* The calling thread's last read that failed for a reason that may pass (the network after
   its retries, refused credentials, a cancelled request, no memory): its -errno, else 0.
   Never set for a chunk the bucket refuses (corrupt) or lacks: those are bad for good. */
static __thread int transient_rc;

void lm_objs_thread_setup(const _Atomic int *cancel, bool quiet_failures)
{
    cancel_flag = cancel;
    quiet = quiet_failures;
}

int lm_objs_transient_take(void)
{
    int rc = transient_rc;
    transient_rc = 0;
    return rc;
}

static bool cancelled(void)
{
    return cancel_flag && atomic_load_explicit(cancel_flag, memory_order_relaxed);
}

struct lm_objs {
    char *url_base;                  /* endpoint/bucket/.plm/chunks/ */
    char *sigv4;                     /* "aws:amz:REGION:s3" */
    char *user, *secret, *token_hdr; /* token_hdr: "x-amz-security-token: ..." or NULL */
    char *cache;                     /* cache directory (this endpoint and bucket's), or NULL */
    uint64_t cache_max;
    uint32_t retries, timeout_ms;
    struct lm_objs_chunk *chunks;
    size_t nchunks;
    struct lm_objs_entry *entries;
    size_t nentries;
    _Atomic uint8_t *state;          /* per chunk */
    _Atomic uint8_t *refreshed;      /* per chunk: R_* (lm_objs_reread), under fetch_mu to wait */
    _Atomic uint64_t *failed_ns;     /* per chunk: when a fetch of it last failed, or 0 */
    _Atomic uint8_t *unreported;     /* per chunk: its last failure was a quiet thread's */
    _Atomic int cancel;              /* lm_objs_free: the fetchers' requests end now */
    pthread_mutex_t fetch_mu;        /* one fetch of a chunk at a time in this process */
    pthread_cond_t fetch_cv;
    uint8_t *fetching;               /* per chunk, under fetch_mu */
    /* Easy handles (each with its kept-alive connection) not in use: a request takes one and
       gives it back, so that a thread that outlives the object (the caller's, which prefetch
       and faults also run on) holds none of its handles or sockets after lm_objs_free. */
    pthread_mutex_t curl_mu;
    CURL **idle;
    size_t nidle, idle_cap;
    _Atomic int *fds;                /* per chunk: its cache file kept open, or -1 */
    /* Read-ahead (lm_objs_willneed): chunks queued for the fetcher threads, which bring them
       into the cache while the caller works on earlier ones. Each chunk is queued once. */
    pthread_mutex_t q_mu;
    pthread_cond_t q_cv;
    uint32_t *queue;
    size_t q_head, q_tail;
    uint8_t *queued;
    pthread_t fetchers[LM_OBJS_FETCHERS];
    int nfetchers;
    bool stop;
    _Atomic uint64_t inserted;       /* cache bytes written since the last eviction scan */
    _Atomic bool wrote;              /* this reader has written to the cache (and so evicted) */
    _Atomic uint64_t st[LM_OBJS_NSTATS];
};

/* Cache files kept open, by every object of the process together: at most a quarter of the
   descriptor limit (read once), so that several restores at once leave the process, its
   sockets and Python's own files the rest. */
static _Atomic int kept_fds;
static int kept_fds_max(void)
{
    static _Atomic int max;
    int m = atomic_load_explicit(&max, memory_order_relaxed);
    if (!m) {
        struct rlimit rl;
        m = getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY
            ? (int)(rl.rlim_cur / 4) : 256;
        atomic_store_explicit(&max, m > 0 ? m : 1, memory_order_relaxed);
    }
    return m;
}

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static CURLcode curl_init_rc;

static void curl_init(void)
{
    curl_init_rc = curl_global_init(CURL_GLOBAL_DEFAULT);
}

static void count(struct lm_objs *o, int which, uint64_t n)
{
    atomic_fetch_add_explicit(&o->st[which], n, memory_order_relaxed);
}

static CURL *handle_take(struct lm_objs *o)
{
    pthread_mutex_lock(&o->curl_mu);
    CURL *h = o->nidle ? o->idle[--o->nidle] : NULL;
    pthread_mutex_unlock(&o->curl_mu);
    return h ? h : curl_easy_init();
}

static void handle_give_back(struct lm_objs *o, CURL *h)
{
    pthread_mutex_lock(&o->curl_mu);
    if (o->nidle == o->idle_cap) {
        size_t cap = o->idle_cap ? 2 * o->idle_cap : 8;
        CURL **g = realloc(o->idle, cap * sizeof(*g));
        if (g) {
            o->idle = g;
            o->idle_cap = cap;
        }
    }
    if (o->nidle < o->idle_cap) {
        o->idle[o->nidle++] = h;
        h = NULL;
    }
    pthread_mutex_unlock(&o->curl_mu);
    if (h)
        curl_easy_cleanup(h);   /* no room to keep it: only its connection is lost */
}

static char *dup_or_null(const char *s, int *bad)
{
    if (!s)
        return NULL;
    char *d = strdup(s);
    if (!d)
        *bad = 1;
    return d;
}

void lm_objs_forget(struct lm_objs *o)
{
    /* In a fork child: the fetcher threads are the parent's (joining them crashed the child),
       a mutex may have been held by one of them at the fork, and the curl handles' connections
       are the parent's sockets (a cleanup could end the parent's TLS session). Only the kept
       chunk descriptors are this process's own to close; the rest is leaked. */
    if (!o)
        return;
    for (size_t i = 0; o->fds && i < o->nchunks; i++)
        if (o->fds[i] >= 0) {
            close(o->fds[i]);
            atomic_fetch_sub(&kept_fds, 1);
        }
}

void lm_objs_free(struct lm_objs *o)
{
    if (!o)
        return;
    atomic_store(&o->cancel, 1);
    pthread_mutex_lock(&o->q_mu);
    o->stop = true;
    pthread_cond_broadcast(&o->q_cv);
    pthread_mutex_unlock(&o->q_mu);
    for (int i = 0; i < o->nfetchers; i++)
        pthread_join(o->fetchers[i], NULL);
    for (size_t i = 0; o->fds && i < o->nchunks; i++)
        if (o->fds[i] >= 0) {
            close(o->fds[i]);
            atomic_fetch_sub(&kept_fds, 1);
        }
    pthread_mutex_destroy(&o->q_mu);
    pthread_cond_destroy(&o->q_cv);
    free((void *)o->fds);
    free(o->queue);
    free(o->queued);
    for (size_t i = 0; i < o->nidle; i++)   /* every request is over: all handles idle */
        curl_easy_cleanup(o->idle[i]);
    free(o->idle);
    pthread_mutex_destroy(&o->curl_mu);
    pthread_mutex_destroy(&o->fetch_mu);
    pthread_cond_destroy(&o->fetch_cv);
    free(o->url_base);
    free(o->sigv4);
    free(o->user);
    free(o->secret);
    free(o->token_hdr);
    free(o->cache);
    free(o->chunks);
    free(o->entries);
    free((void *)o->state);
    free((void *)o->refreshed);
    free((void *)o->failed_ns);
    free((void *)o->unreported);
    free(o->fetching);
    free(o);
}

/* A name component from outside (region, bucket): no separators or control characters. */
static bool plain(const char *s, bool dots)
{
    if (!s || !*s || strlen(s) > 255)
        return false;
    for (const char *c = s; *c; c++)
        if (*c <= ' ' || *c == '/' || *c == '\\' || *c == '?' || *c == '#' || *c == ':' ||
            *c == '%' || *c == 0x7f || (!dots && *c == '.'))
            return false;
    return true;
}

/* Goes into a request header (the token) or its signature: no control characters, which
   could end a header line and start another. */
static bool header_safe(const char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s < ' ' || *s == 0x7f)
            return false;
    return true;
}

int lm_objs_new(const struct lm_objs_config *cfg, const struct lm_objs_chunk *chunks,
                size_t nchunks, const struct lm_objs_entry *entries, size_t nentries,
                struct lm_objs **out)
{
    *out = NULL;
    pthread_once(&curl_once, curl_init);
    if (curl_init_rc != CURLE_OK)
        return lm_fail("curl_global_init", EIO);
    if (!cfg || !cfg->endpoint || !cfg->access_key || !cfg->secret_key ||
        (strncasecmp(cfg->endpoint, "http://", 7) && strncasecmp(cfg->endpoint, "https://", 8)) ||
        strlen(cfg->endpoint) > 1024 || !plain(cfg->region, true) || !plain(cfg->bucket, true) ||
        strchr(cfg->access_key, ':') || !header_safe(cfg->access_key) ||
        !header_safe(cfg->secret_key) || (cfg->session_token && !header_safe(cfg->session_token)))
        return lm_fail("object store: endpoint (http(s)://...), region, bucket and "
                       "credentials are required", EINVAL);
    if (nchunks > UINT32_MAX || nentries > LM_SNAP_MAX_STORED || (nentries && !entries) ||
        (nchunks && !chunks))
        return lm_fail("object store: chunk or entry count out of range", EINVAL);
    struct lm_objs *o = calloc(1, sizeof(*o));
    if (!o)
        return lm_fail("calloc(object store)", ENOMEM);
    pthread_mutex_init(&o->fetch_mu, NULL);
    pthread_cond_init(&o->fetch_cv, NULL);
    pthread_mutex_init(&o->q_mu, NULL);
    pthread_cond_init(&o->q_cv, NULL);
    pthread_mutex_init(&o->curl_mu, NULL);
    int bad = 0;
    size_t elen = strlen(cfg->endpoint);
    while (elen && cfg->endpoint[elen - 1] == '/')
        elen--;
    if (asprintf(&o->url_base, "%.*s/%s/.plm/chunks/", (int)elen, cfg->endpoint,
                 cfg->bucket) < 0 ||
        asprintf(&o->sigv4, "aws:amz:%s:s3", cfg->region) < 0 ||
        (cfg->session_token && *cfg->session_token &&
         asprintf(&o->token_hdr, "x-amz-security-token: %s", cfg->session_token) < 0))
        bad = 1;
    o->user = dup_or_null(cfg->access_key, &bad);
    o->secret = dup_or_null(cfg->secret_key, &bad);
    if (cfg->cache_dir && *cfg->cache_dir)
        o->cache = dup_or_null(cfg->cache_dir, &bad);
    o->cache_max = cfg->cache_max_bytes;
    o->retries = cfg->retries > 10 ? 10 : cfg->retries;
    o->timeout_ms = cfg->timeout_ms ? cfg->timeout_ms : 30000;
    o->chunks = malloc((nchunks ? nchunks : 1) * sizeof(*chunks));
    o->entries = malloc((nentries ? nentries : 1) * sizeof(*entries));
    o->state = calloc(nchunks ? nchunks : 1, 1);
    o->refreshed = calloc(nchunks ? nchunks : 1, 1);
    o->failed_ns = calloc(nchunks ? nchunks : 1, sizeof(*o->failed_ns));
    o->unreported = calloc(nchunks ? nchunks : 1, 1);
    o->fetching = calloc(nchunks ? nchunks : 1, 1);
    o->fds = malloc((nchunks ? nchunks : 1) * sizeof(*o->fds));
    o->queue = malloc((nchunks ? nchunks : 1) * sizeof(*o->queue));
    o->queued = calloc(nchunks ? nchunks : 1, 1);
    for (size_t i = 0; o->fds && i < nchunks; i++)
        o->fds[i] = -1;
    if (bad || !o->chunks || !o->entries || !o->state || !o->refreshed || !o->failed_ns ||
        !o->unreported ||
        !o->fetching || !o->fds || !o->queue || !o->queued) {
        lm_objs_free(o);
        return lm_fail("malloc(object store)", ENOMEM);
    }
    /* Copied before anything is read of them: the caller's tables may lie at any address
       (views of a manifest's bytes), ours are aligned. */
    if (nchunks)
        memcpy(o->chunks, chunks, nchunks * sizeof(*chunks));
    if (nentries)
        memcpy(o->entries, entries, nentries * sizeof(*entries));
    o->nchunks = nchunks;
    o->nentries = nentries;
    /* Inputs from a manifest (checked in Python too): every entry inside its chunk. */
    const char *bad_table = NULL;
    for (size_t c = 0; c < nchunks && !bad_table; c++)
        if (o->chunks[c].length == 0 || o->chunks[c].length > LM_OBJS_MAX_CHUNK)
            bad_table = "object store: a chunk of 0 bytes or over 64 MiB";
    for (size_t e = 0; e < nentries && !bad_table; e++)
        if (o->entries[e].chunk >= nchunks ||
            o->entries[e].offset >= o->chunks[o->entries[e].chunk].length)
            bad_table = "object store: an entry outside its chunk";
    if (bad_table) {
        lm_objs_free(o);
        return lm_fail(bad_table, EINVAL);
    }
    /* A cache directory that cannot be made or written costs only the caching (as a full
       one does): every read fetches its chunk. */
    if (o->cache && ((mkdir(o->cache, 0700) < 0 && errno != EEXIST) ||
                     access(o->cache, W_OK | X_OK) < 0)) {
        free(o->cache);
        o->cache = NULL;
    }
    *out = o;
    return 0;
}

static void chunk_hex(const struct lm_objs_chunk *c, char out[33])
{
    snprintf(out, 33, "%016" PRIx64 "%016" PRIx64, c->id[1], c->id[0]);
}

static bool chunk_ok(const struct lm_objs_chunk *c, const void *data, size_t len)
{
    if (len != c->length)
        return false;
    uint64_t h[2];
    lm_xxh3_128(data, len, h);
    return h[0] == c->id[0] && h[1] == c->id[1];
}

/* ---- the cache directory ------------------------------------------------------------- */

/* A temporary this old is a dead writer's (a live one renames its file within a request's
   time): removed by the next eviction scan. */
#define STALE_TMP_SEC 600

/* Oldest first, then size: what eviction removes first. */
struct cached { struct timespec t; off_t size; char name[40]; };

static int by_age(const void *a, const void *b)
{
    const struct cached *x = a, *y = b;
    if (x->t.tv_sec != y->t.tv_sec)
        return x->t.tv_sec < y->t.tv_sec ? -1 : 1;
    return (x->t.tv_nsec > y->t.tv_nsec) - (x->t.tv_nsec < y->t.tv_nsec);
}

/* Keep the cache under its bound: the least recently used chunks and kept manifests go
   (a chunk's mtime is touched at each process's first use, unless touched within the last
   minute); temporaries of dead writers go too. Run by a reader at its first write to the
   cache and after each sixteenth of the bound it writes. One process evicts
   at a time (flock); a chunk removed while another process reads it stays readable through
   its open descriptor, and a later reader that finds it gone fetches it again. */
static void evict(struct lm_objs *o)
{
    char lock[4096];
    snprintf(lock, sizeof(lock), "%s/.lock", o->cache);
    int lfd = open(lock, O_RDWR | O_CREAT | O_CLOEXEC | O_NONBLOCK | O_NOFOLLOW, 0600);
    if (lfd < 0)
        return;
    struct stat lst;
    if (fstat(lfd, &lst) < 0 || !S_ISREG(lst.st_mode)) {   /* a FIFO planted there */
        close(lfd);
        return;
    }
    if (flock(lfd, LOCK_EX | LOCK_NB) < 0) {   /* someone else is at it */
        close(lfd);
        return;
    }
    DIR *d = opendir(o->cache);
    struct cached *list = NULL;
    size_t n = 0, cap = 0;
    uint64_t total = 0;
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    for (struct dirent *de; d && (de = readdir(d));) {
        struct stat st;
        const char *nm = de->d_name;
        size_t len = strlen(nm);
        bool tmp = strncmp(nm, ".tmp.", 5) == 0 ||
                   (strncmp(nm, "m-", 2) == 0 && len > 4 && strcmp(nm + len - 4, ".tmp") == 0);
        /* chunks (32 hex digits) and kept manifests (m-<16 hex digits>) count and go by age;
           temporaries left by dead writers go once old; the lock and anything else stay */
        bool counted = len == 32 || (len == 18 && strncmp(nm, "m-", 2) == 0);
        if ((!tmp && !counted) || fstatat(dirfd(d), nm, &st, AT_SYMLINK_NOFOLLOW) < 0 ||
            !S_ISREG(st.st_mode))
            continue;
        if (tmp) {
            if (now.tv_sec - st.st_mtim.tv_sec > STALE_TMP_SEC)
                unlinkat(dirfd(d), nm, 0);
            continue;
        }
        if (n == cap) {
            cap = cap ? 2 * cap : 256;
            struct cached *g = realloc(list, cap * sizeof(*list));
            if (!g)
                break;
            list = g;
        }
        list[n].t = st.st_mtim;
        list[n].size = st.st_size;
        memcpy(list[n].name, nm, len + 1);
        total += (uint64_t)st.st_size;
        n++;
    }
    if (total > o->cache_max && list) {
        qsort(list, n, sizeof(*list), by_age);
        uint64_t goal = o->cache_max - o->cache_max / 10;   /* some room: not at every insert */
        for (size_t i = 0; i < n && total > goal; i++)
            if (unlinkat(dirfd(d), list[i].name, 0) == 0) {
                total -= (uint64_t)list[i].size;
                count(o, LM_OBJS_EVICTED, 1);
            }
    }
    free(list);
    if (d)
        closedir(d);
    flock(lfd, LOCK_UN);
    close(lfd);
}

/* Write a checked chunk into the cache: a temporary, then rename (whole or absent). A full
   or unwritable directory only costs the caching: the read goes on from memory. */
static void cache_put(struct lm_objs *o, const struct lm_objs_chunk *c, const char *data)
{
    char hex[33], path[4096], tmp[4096];
    chunk_hex(c, hex);
    snprintf(path, sizeof(path), "%s/%s", o->cache, hex);
    /* A name no other writer can pick: processes in different PID namespaces share pids
       (and thread addresses), and two writers of one temporary would tear it. */
    uint64_t nonce;
    if (getrandom(&nonce, sizeof(nonce), GRND_NONBLOCK) != (ssize_t)sizeof(nonce))
        nonce = (uint64_t)lm_now_ns() ^ ((uint64_t)getpid() << 32) ^ (uintptr_t)&nonce;
    snprintf(tmp, sizeof(tmp), "%s/.tmp.%s.%016llx", o->cache, hex, (unsigned long long)nonce);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    bool ok = fd >= 0;
    for (size_t done = 0; ok && done < c->length;) {
        ssize_t w = write(fd, data + done, c->length - done);
        if (w < 0 && errno == EINTR)
            continue;
        ok = w > 0;
        done += ok ? (size_t)w : 0;
    }
    if (fd >= 0)
        close(fd);
    if (ok && rename(tmp, path) == 0) {
        count(o, LM_OBJS_CACHE_WRITES, 1);
        uint64_t since = atomic_fetch_add(&o->inserted, c->length) + c->length;
        /* at this reader's first write too: many short restores that each write less than a
           sixteenth of the bound would otherwise never evict, and the directory grow */
        bool first = !atomic_exchange(&o->wrote, true);
        if (o->cache_max && (first || since > o->cache_max / 16)) {
            atomic_store(&o->inserted, 0);
            evict(o);
        }
        return;
    }
    unlink(tmp);
    count(o, LM_OBJS_CACHE_WRITE_ERRORS, 1);
}

/* A cache file that failed its check: never read again (by anyone: removed). */
static void cache_drop(struct lm_objs *o, size_t i)
{
    char hex[33], path[4096];
    chunk_hex(&o->chunks[i], hex);
    snprintf(path, sizeof(path), "%s/%s", o->cache, hex);
    unlink(path);
    int fd = atomic_exchange(&o->fds[i], -1);
    if (fd >= 0) {
        close(fd);
        atomic_fetch_sub(&kept_fds, 1);
    }
    uint8_t c = C_CHECKED;
    atomic_compare_exchange_strong(&o->state[i], &c, C_UNKNOWN);
    count(o, LM_OBJS_CACHE_BAD, 1);
}

/* Read [off, off + len) of chunk i from the cache into dst. 1 done, 0 not (or no longer) in
   the cache. The caller checks what it got (check_run). The file stays open once found (up
   to the process's budget, kept_fds_max), so later reads are one pread. */
static int cache_read(struct lm_objs *o, size_t i, uint32_t off, uint32_t len, char *dst)
{
    if (!o->cache)
        return 0;
    int kept = atomic_load_explicit(&o->fds[i], memory_order_acquire);
    if (kept >= 0 && pread(kept, dst, len, off) == (ssize_t)len) {
        count(o, LM_OBJS_CACHE_HITS, 1);
        return 1;
    }
    char hex[33], path[4096];
    chunk_hex(&o->chunks[i], hex);
    snprintf(path, sizeof(path), "%s/%s", o->cache, hex);
    /* Not blocking, not following a link: a FIFO (or device) under a chunk's name would
       block the open or the read for good; anything but a regular file is a miss, removed
       (the fetched chunk is renamed over its name). */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOFOLLOW);
    if (fd < 0) {
        if (errno == ELOOP)
            cache_drop(o, i);   /* a symbolic link */
        return 0;
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        close(fd);
        return 0;
    }
    bool stat_ok = true;
    if (!S_ISREG(st.st_mode) || st.st_size != (off_t)o->chunks[i].length) {
        close(fd);   /* torn (a size no chunk of this id has), or not a file */
        cache_drop(o, i);
        return 0;
    }
    if (pread(fd, dst, len, off) != (ssize_t)len) {
        close(fd);   /* replaced or cut under us (never by us): fetch it */
        return 0;
    }
    count(o, LM_OBJS_CACHE_HITS, 1);
    if (atomic_load_explicit(&o->state[i], memory_order_acquire) == C_UNKNOWN) {
        /* recently used: the last to be evicted. A minute's precision is plenty for that, and
           a warm restore that finds its chunks touched moments ago skips a metadata write
           per chunk. */
        struct timespec now;
        if (!stat_ok || clock_gettime(CLOCK_REALTIME, &now) < 0 ||
            now.tv_sec - st.st_mtim.tv_sec > 60 || now.tv_sec < st.st_mtim.tv_sec)
            futimens(fd, NULL);
        uint8_t u = C_UNKNOWN;
        atomic_compare_exchange_strong(&o->state[i], &u, C_CHECKED);
    }
    int none = -1;
    if (atomic_fetch_add(&kept_fds, 1) < kept_fds_max() &&
        atomic_compare_exchange_strong(&o->fds[i], &none, fd))
        return 1;   /* kept */
    atomic_fetch_sub(&kept_fds, 1);
    close(fd);
    return 1;
}

/* ---- fetching ------------------------------------------------------------------------ */

struct sink { char *buf; size_t cap, len; bool overflow; };

static size_t sink_write(char *data, size_t size, size_t n, void *arg)
{
    struct sink *s = arg;
    size_t k = size * n;
    if (k > s->cap - s->len) {   /* longer than the chunk: not what we asked for */
        s->overflow = true;
        return 0;
    }
    memcpy(s->buf + s->len, data, k);
    s->len += k;
    return k;
}

static int get_with(struct lm_objs *o, CURL *h, const struct lm_objs_chunk *c, char *buf);

/* libcurl calls this during a transfer (at least once a second, stalled or not): a
   cancelled thread's request ends there. */
static int xfer_progress(void *arg, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal,
                         curl_off_t ulnow)
{
    (void)arg, (void)dltotal, (void)dlnow, (void)ultotal, (void)ulnow;
    return cancelled();
}

/* One GET of chunk c into buf (c->length bytes). 0, or -errno: -EAGAIN for what a retry may
   mend (network, 5xx, 429, a wrong body), -EACCES / -ENOENT / -EIO for a refusal. */
static int get_once(struct lm_objs *o, const struct lm_objs_chunk *c, char *buf)
{
    CURL *h = handle_take(o);
    if (!h)
        return lm_fail("curl_easy_init", ENOMEM);
    int rc = get_with(o, h, c, buf);
    handle_give_back(o, h);
    return rc;
}

static int get_with(struct lm_objs *o, CURL *h, const struct lm_objs_chunk *c, char *buf)
{
    char hex[33], url[2048];
    chunk_hex(c, hex);
    snprintf(url, sizeof(url), "%s%s", o->url_base, hex);
    struct curl_slist *hdr = curl_slist_append(NULL, "x-amz-content-sha256: "
                                               "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934c"
                                               "a495991b7852b855");
    if (hdr && o->token_hdr)
        hdr = curl_slist_append(hdr, o->token_hdr);
    if (!hdr)
        return lm_fail("curl_slist_append", ENOMEM);
    struct sink s = {buf, c->length, 0, false};
    curl_easy_reset(h);
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdr);
    curl_easy_setopt(h, CURLOPT_AWS_SIGV4, o->sigv4);
    curl_easy_setopt(h, CURLOPT_USERNAME, o->user);
    curl_easy_setopt(h, CURLOPT_PASSWORD, o->secret);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, sink_write);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &s);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);   /* threads: no SIGALRM for timeouts */
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, (long)o->timeout_ms);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, (long)(o->timeout_ms < 5000 ? o->timeout_ms
                                                                                : 5000));
    curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
    if (cancel_flag) {
        curl_easy_setopt(h, CURLOPT_XFERINFOFUNCTION, xfer_progress);
        curl_easy_setopt(h, CURLOPT_NOPROGRESS, 0L);
    }
    CURLcode cc = curl_easy_perform(h);
    long status = 0;
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
    curl_slist_free_all(hdr);
    count(o, LM_OBJS_REQUESTS, 1);
    if (cc == CURLE_ABORTED_BY_CALLBACK || cancelled())
        return lm_fail("object store: GET of a chunk cancelled (the reader is stopping)",
                       ECANCELED);
    if (cc != CURLE_OK && !(cc == CURLE_WRITE_ERROR && s.overflow))
        return lm_fail("object store: GET of a chunk failed (network)", EAGAIN);
    if (status == 403 || status == 401)
        return lm_fail("object store: GET of a chunk refused (credentials)", EACCES);
    if (status == 404)
        return lm_fail("object store: a chunk is missing from the bucket", ENOENT);
    if (status >= 500 || status == 429 || status == 408)
        return lm_fail("object store: GET of a chunk failed (server busy or failing)", EAGAIN);
    if (status != 200)
        return lm_fail("object store: GET of a chunk: unexpected HTTP status", EIO);
    count(o, LM_OBJS_FETCH_BYTES, s.len);
    if (s.overflow || !chunk_ok(c, buf, s.len)) {
        count(o, LM_OBJS_CORRUPT, 1);
        return lm_fail("object store: a fetched chunk differs from its id (corrupt chunk)",
                       EBADMSG);
    }
    return 0;
}

/* Fetch chunk i (checked) into buf, with bounded retries: up to `retries` more attempts after
   network failures, pausing 50 ms, 100 ms, 200 ms...; a corrupt body is fetched once more. */
static int fetch(struct lm_objs *o, size_t i, char *buf)
{
    int rc = 0, corrupt = 0;
    for (uint32_t attempt = 0;; attempt++) {
        rc = get_once(o, &o->chunks[i], buf);
        if (rc == 0) {
            count(o, LM_OBJS_FETCHES, 1);
            return 0;
        }
        if (rc == -ECANCELED)
            return rc;
        bool again = (rc == -EAGAIN && attempt < o->retries) ||
                     (rc == -EBADMSG && corrupt++ == 0);
        if (!again)
            break;
        count(o, LM_OBJS_RETRIES, 1);
        /* the pause in slices: a cancelled thread (a close) does not sit it out */
        uint64_t end = lm_now_ns() + (50000000ull << (attempt < 4 ? attempt : 4));
        for (uint64_t now; !cancelled() && (now = lm_now_ns()) < end;) {
            uint64_t left = end - now < 10000000ull ? end - now : 10000000ull;
            struct timespec ts = {0, (long)left};
            nanosleep(&ts, NULL);
        }
        if (cancelled())
            return lm_fail("object store: GET of a chunk cancelled (the reader is stopping)",
                           ECANCELED);
    }
    /* A chunk the bucket refuses or lacks fails every reader (its pages are poisoned, by
       the background fill too): counted now. A failure that may pass, met by a quiet thread
       (which leaves its pages lazy), is counted by the first reader it fails (chunk_read). */
    if (quiet && rc != -EBADMSG && rc != -ENOENT)
        atomic_store(&o->unreported[i], 1);
    else
        count(o, LM_OBJS_FAILURES, 1);
    if (rc == -EAGAIN)   /* out of retries: the page cannot be served */
        rc = lm_fail(lm_last_op(), EIO);
    return rc;
}

/* The bytes [off, off + len) of chunk i: from the cache (unless `fresh`), else fetched (one
   fetch of a chunk at a time in this process: a second reader waits for the first, then
   finds it cached). 1: from the cache (to be checked), 0: fetched and checked, or -errno. */
static int chunk_read(struct lm_objs *o, size_t i, uint32_t off, uint32_t len, char *dst,
                      bool fresh)
{
    for (;;) {
        uint8_t st = atomic_load_explicit(&o->state[i], memory_order_acquire);
        if (st == C_REFUSED)
            return lm_fail("object store: a chunk in the bucket differs from its id (corrupt "
                           "chunk)", EBADMSG);
        if (st == C_GONE)
            return lm_fail("object store: a chunk is missing from the bucket", ENOENT);
        int rc = fresh ? 0 : cache_read(o, i, off, len, dst);
        if (rc != 0)
            return rc;
        uint64_t failed = atomic_load_explicit(&o->failed_ns[i], memory_order_acquire);
        if (failed && lm_now_ns() - failed < FAILED_HOLD_NS) {
            if (!quiet && atomic_exchange(&o->unreported[i], 0))
                count(o, LM_OBJS_FAILURES, 1);   /* a quiet thread's failure fails us */
            transient_rc = -EIO;
            return lm_fail("object store: GET of a chunk failed moments ago (network, server "
                           "or credentials); not asked again yet", EIO);
        }
        pthread_mutex_lock(&o->fetch_mu);
        if (o->fetching[i]) {
            /* another thread is fetching it: wait, then look again from the top (the state:
               the bucket may have refused it meanwhile; the cache, which has it now; else,
               without a cache or for a fresh read, fetch it ourselves) */
            while (o->fetching[i])
                pthread_cond_wait(&o->fetch_cv, &o->fetch_mu);
            pthread_mutex_unlock(&o->fetch_mu);
            continue;
        }
        o->fetching[i] = 1;
        pthread_mutex_unlock(&o->fetch_mu);
        char *buf = malloc(o->chunks[i].length);
        rc = buf ? fetch(o, i, buf) : lm_fail("malloc(chunk)", ENOMEM);
        if (rc == 0) {
            atomic_store(&o->unreported[i], 0);
            memcpy(dst, buf + off, len);
            if (o->cache)
                cache_put(o, &o->chunks[i], buf);
        } else if (rc == -EBADMSG) {
            atomic_store_explicit(&o->state[i], C_REFUSED, memory_order_release);
        } else if (rc == -ENOENT) {
            /* chunks are content-addressed and never rewritten: one that is not there (a
               removed snapshot's, or named by a manifest that points elsewhere) is not asked
               for again by every page that needs it */
            atomic_store_explicit(&o->state[i], C_GONE, memory_order_release);
        }
        /* a cancelled fetch says nothing of the gateway: no hold for the readers after */
        if (rc != -ECANCELED)
            atomic_store_explicit(&o->failed_ns[i], rc < 0 ? lm_now_ns() : 0,
                                  memory_order_release);
        if (rc < 0 && rc != -EBADMSG && rc != -ENOENT)
            transient_rc = rc;
        free(buf);
        pthread_mutex_lock(&o->fetch_mu);
        o->fetching[i] = 0;
        pthread_cond_broadcast(&o->fetch_cv);
        pthread_mutex_unlock(&o->fetch_mu);
        return rc;
    }
}

/* ---- read-ahead -------------------------------------------------------------------- */

/* Whether chunk i still needs bringing in (not checked or refused here, not in flight). */
static bool wanted(struct lm_objs *o, size_t i)
{
    return atomic_load_explicit(&o->state[i], memory_order_acquire) == C_UNKNOWN;
}

static void *fetcher_main(void *arg)
{
    struct lm_objs *o = arg;
    char one;
    lm_objs_thread_setup(&o->cancel, true);
    for (;;) {
        pthread_mutex_lock(&o->q_mu);
        while (!o->stop && o->q_head == o->q_tail)
            pthread_cond_wait(&o->q_cv, &o->q_mu);
        if (o->stop) {
            pthread_mutex_unlock(&o->q_mu);
            return NULL;
        }
        size_t i = o->queue[o->q_head++];
        pthread_mutex_unlock(&o->q_mu);
        /* a read of one byte brings it in as a demand read would: the cache, or a fetch
           (with its retries) into the cache; failures are the demand path's to report
           (quiet: counted by the first reader the failure fails) */
        if (wanted(o, i))
            (void)chunk_read(o, i, 0, 1, &one, false);
    }
}

void lm_objs_willneed(struct lm_objs *o, uint64_t e, size_t n)
{
    if (!o->cache || e >= o->nentries)
        return;   /* without a cache, a chunk fetched ahead would have nowhere to wait */
    if (n > o->nentries - e)
        n = o->nentries - e;
    pthread_mutex_lock(&o->q_mu);
    size_t added = 0;
    for (size_t j = 0; j < n; j++) {
        uint32_t c = o->entries[e + j].chunk;
        if (o->queued[c] || !wanted(o, c))
            continue;
        o->queued[c] = 1;
        o->queue[o->q_tail++] = c;   /* each chunk at most once: the queue cannot overflow */
        added++;
    }
    /* started at the first hint: a restore that never reads ahead starts no thread */
    while (added && o->nfetchers < LM_OBJS_FETCHERS &&
           lm_thread_start(&o->fetchers[o->nfetchers], NULL, fetcher_main, o) == 0)
        o->nfetchers++;
    if (added)
        pthread_cond_broadcast(&o->q_cv);
    pthread_mutex_unlock(&o->q_mu);
}

int lm_objs_gather(struct lm_objs *o, uint64_t e, size_t count_, const uint32_t *lengths_word,
                   size_t page_size, char *out)
{
    if (e > o->nentries || count_ > o->nentries - e)
        return lm_fail("object store: entry out of range", ERANGE);
    size_t at = 0;
    for (size_t j = 0; j < count_;) {
        const struct lm_objs_entry *x = &o->entries[e + j];
        size_t len = lengths_word ? LM_ENTRY_LEN(lengths_word[e + j]) : page_size;
        /* entries that follow one another in one chunk: one read */
        size_t k = 1, run = len;
        while (j + k < count_) {
            const struct lm_objs_entry *y = &o->entries[e + j + k];
            size_t l2 = lengths_word ? LM_ENTRY_LEN(lengths_word[e + j + k]) : page_size;
            if (y->chunk != x->chunk || y->offset != x->offset + run)
                break;
            run += l2;
            k++;
        }
        if ((uint64_t)x->offset + run > o->chunks[x->chunk].length)
            return lm_fail("object store: an entry outside its chunk", EBADMSG);
        /* what the cache gave is checked by the caller, entry by entry (store.c decodes and
           checks on the copier threads), which calls lm_objs_reread for one that fails */
        int rc = chunk_read(o, x->chunk, x->offset, (uint32_t)run, out + at, false);
        if (rc < 0)
            return rc;
        at += run;
        j += k;
    }
    return 0;
}

int lm_objs_reread(struct lm_objs *o, uint64_t e, size_t len, char *out)
{
    if (e >= o->nentries)
        return lm_fail("object store: entry out of range", ERANGE);
    const struct lm_objs_entry *x = &o->entries[e];
    if ((uint64_t)x->offset + len > o->chunks[x->chunk].length)
        return lm_fail("object store: an entry outside its chunk", EBADMSG);
    /* A damaged cache file: the first entry of the chunk to fail its check drops the file and
       fetches the bucket's copy (checked against the chunk's id, and cached); the chunk's
       other entries that fail wait for that, then read it, instead of fetching the chunk
       again each (a zero-filled cache file of 128 entries cost 128 downloads). Whoever
       still finds an entry wrong in the bucket's copy refuses it. */
    size_t c = x->chunk;
    uint8_t none = R_NONE;
    if (atomic_compare_exchange_strong(&o->refreshed[c], &none, R_FETCHING)) {
        if (o->cache)
            cache_drop(o, c);
        int rc = chunk_read(o, c, x->offset, (uint32_t)len, out, true);
        pthread_mutex_lock(&o->fetch_mu);
        atomic_store(&o->refreshed[c], R_DONE);
        pthread_cond_broadcast(&o->fetch_cv);
        pthread_mutex_unlock(&o->fetch_mu);
        return rc < 0 ? rc : 0;
    }
    pthread_mutex_lock(&o->fetch_mu);
    while (atomic_load(&o->refreshed[c]) == R_FETCHING)
        pthread_cond_wait(&o->fetch_cv, &o->fetch_mu);
    pthread_mutex_unlock(&o->fetch_mu);
    /* the cache has the bucket's copy now (or, where it could not keep it, a fetch) */
    int rc = chunk_read(o, c, x->offset, (uint32_t)len, out, false);
    return rc < 0 ? rc : 0;
}

void lm_objs_stats(struct lm_objs *o, uint64_t *out)
{
    for (int i = 0; i < LM_OBJS_NSTATS; i++)
        out[i] = atomic_load_explicit(&o->st[i], memory_order_relaxed);
}

size_t lm_objs_nentries(const struct lm_objs *o)
{
    return o->nentries;
}
