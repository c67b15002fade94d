/*
 * exp03_live: a background checkpoint of 1 GiB while a thread stores to random pages.
 *
 *   exp03_live MECH SAVER [nopause] [file]
 *     MECH  remap  pause = mremap(MREMAP_DONTUNMAP) of the region to a staging address on a
 *                  uffd with WP_ASYNC | MOVE | EVENT_REMAP (the region keeps its MISSING|WP
 *                  registration and is now empty: every first access faults, the handler
 *                  serves the page from staging with UFFDIO_COPY, write-protected for a read
 *                  fault so async dirty tracking goes on);
 *           wp     pause = UFFDIO_WRITEPROTECT of the whole region on a sync-WP uffd; the
 *                  handler copies a page to a side buffer before un-protecting it.
 *     SAVER direct remap: pwrite a staging run, then UFFDIO_MOVE it back (no copy, no memory);
 *                  wp: pwrite a run from the (protected, so stable) region, then un-protect it.
 *           copy   remap: UFFDIO_COPY_MODE_WP every run back first (fast release, +1 GiB
 *                  transient), then write the file from staging, dropping it behind;
 *           cmove  remap only: memcpy a staging run to a side buffer, UFFDIO_MOVE it back
 *                  (faster release; a moved page loses its uffd-wp bit), file from the side;
 *                  wp: memcpy every run to the side buffer and un-protect, then write the file.
 *     nopause      apply MECH while the writer runs (no stop): is the image still point-in-time?
 *
 * Every page has a state (0 untouched, 1 claimed, 2 saved): the handler and the saver claim a
 * page with a compare-and-swap before they copy or move it; the loser waits for 2 and wakes.
 *
 * Verification: the writer stores its sequence number s (1, 2, ...) to a random 8-byte slot of
 * a random page and logs the slot. The file must equal the initial pattern with stores 1..S
 * replayed, S the last store before the pause, for some S (found as the file's largest value).
 * With a pause, the file is also compared with a reference copy taken while the writer waits
 * (memcpy, not timed as the pause). The async dirty bits after the checkpoint are compared with
 * the pages the log says were written after the pause.
 */
#include "exp.h"
#include <sys/uio.h>

#define LEN GIB
#define NP (LEN / PS)
#define RUN 512UL   /* pages per saver run: 2 MiB */
#define WIN_MS 10

static int mech_remap, saver_copy, saver_cmove, nopause;
static char *region, *stage, *side, *ref;
static int ufd, pm, outfd;
static _Atomic uint8_t *st;   /* per page: 0 untouched, 1 claimed, 2 saved */
static atomic_int stop_handlers, ckpt_active;
static atomic_long n_faults, n_waits;

/* writer */
static uint32_t *wlog;
#define LOGCAP (1UL << 28)
static _Atomic uint64_t wseq;   /* stores done */
static atomic_int pause_req, paused, stop_writer;
static uint64_t seq_at_pause;

static void *writer(void *arg)
{
    (void)arg;
    uint64_t x = 0x9E3779B97F4A7C15ULL, s = 0;
    uint64_t *w = (uint64_t *)region;
    while (!atomic_load_explicit(&stop_writer, memory_order_relaxed) && s + 1 < LOGCAP) {
        if (atomic_load_explicit(&pause_req, memory_order_relaxed)) {
            seq_at_pause = s;
            atomic_store(&paused, 1);
            while (atomic_load(&pause_req))
                ;
            atomic_store(&paused, 0);
        }
        uint32_t slot = (uint32_t)(xorshift(&x) & (LEN / 8 - 1));
        s++;
        wlog[s] = slot;
        w[slot] = s;
        atomic_store_explicit(&wseq, s, memory_order_relaxed);
    }
    return NULL;
}

/* Serve one fault at page p (region address a). */
static void serve(char *a, uint64_t flags)
{
    if (a < region || a >= region + LEN) {
        fprintf(stderr, "fault outside the region at %p\n", (void *)a);
        exit(3);
    }
    size_t p = (a - region) / PS;
    uint8_t zero = 0;
    if (atomic_compare_exchange_strong(&st[p], &zero, 1)) {
        if (mech_remap)
            uffd_copy(ufd, a, stage + p * PS, PS,
                      (flags & UFFD_PAGEFAULT_FLAG_WRITE) ? 0 : UFFDIO_COPY_MODE_WP);
        else {
            memcpy(side + p * PS, a, PS);
        }
        atomic_store(&st[p], 2);
        if (!mech_remap)
            uffd_wp(ufd, a, PS, false, true);
        atomic_fetch_add(&n_faults, 1);
        return;
    }
    /* The saver has it (or had it): once saved, the page is present / un-protected; wake the
       faulter in case the saver's own wake-up came before this fault was queued. */
    while (atomic_load(&st[p]) != 2)
        sched_yield();
    uffd_wake(ufd, a, PS);
    atomic_fetch_add(&n_waits, 1);
}

static void *handler(void *arg)
{
    pin((int)(intptr_t)arg);
    struct uffd_msg m[16];
    while (!atomic_load(&stop_handlers)) {
        struct pollfd pf = {.fd = ufd, .events = POLLIN};
        if (poll(&pf, 1, 5) <= 0)
            continue;
        ssize_t k = read(ufd, m, sizeof m);
        for (ssize_t i = 0; i < k / (ssize_t)sizeof m[0]; i++)
            if (m[i].event == UFFD_EVENT_PAGEFAULT)
                serve((char *)(uintptr_t)(m[i].arg.pagefault.address & ~(PS - 1)),
                      m[i].arg.pagefault.flags);
            /* UFFD_EVENT_REMAP (the pause's own mremap): reading it lets mremap return */
    }
    return NULL;
}

/* Claim the untouched pages of [p0, p0+n): claimed[i] says which this caller got. */
static void claim_run(size_t p0, size_t n, bool *claimed)
{
    for (size_t i = 0; i < n; i++) {
        uint8_t zero = 0;
        claimed[i] = atomic_compare_exchange_strong(&st[p0 + i], &zero, 1);
    }
}

/* Apply op to each maximal sub-run of claimed pages. */
static void for_claimed(size_t p0, size_t n, bool *claimed, void (*op)(size_t, size_t))
{
    for (size_t i = 0; i < n;) {
        if (!claimed[i]) {
            i++;
            continue;
        }
        size_t j = i;
        while (j < n && claimed[j])
            j++;
        op(p0 + i, j - i);
        i = j;
    }
}

static void op_move(size_t p, size_t n) { uffd_move(ufd, region + p * PS, stage + p * PS, n * PS, 0); }
static void op_copy(size_t p, size_t n) { uffd_copy(ufd, region + p * PS, stage + p * PS, n * PS, UFFDIO_COPY_MODE_WP); }
static uint8_t *cm_from_side;
static void op_cmove(size_t p, size_t n)
{
    memcpy(side + p * PS, stage + p * PS, n * PS);
    memset(cm_from_side + p, 1, n);
    uffd_move(ufd, region + p * PS, stage + p * PS, n * PS, 0);
}
static void op_side(size_t p, size_t n) { memcpy(side + p * PS, region + p * PS, n * PS); }

static void write_all(const char *src, size_t off, size_t len)
{
    while (len) {
        ssize_t k = pwrite(outfd, src, len, off);
        if (k <= 0)
            DIE("pwrite");
        src += k;
        off += k;
        len -= k;
    }
}

static void mark_saved(size_t p0, size_t n, bool *claimed)
{
    for (size_t i = 0; i < n; i++)
        if (claimed[i])
            atomic_store(&st[p0 + i], 2);
}

static double t_saver_release, t_saver_done;

static void *saver(void *arg)
{
    double t0 = *(double *)arg;
    bool claimed[RUN];
    if (mech_remap && !saver_copy) {
        for (size_t p = 0; p < NP; p += RUN) {
            write_all(stage + p * PS, p * PS, RUN * PS);   /* staging never changes */
            claim_run(p, RUN, claimed);
            for_claimed(p, RUN, claimed, op_move);
            mark_saved(p, RUN, claimed);
        }
        t_saver_release = t_saver_done = now() - t0;
    } else if (mech_remap && saver_cmove) {
        for (size_t p = 0; p < NP; p += RUN) {
            claim_run(p, RUN, claimed);
            for_claimed(p, RUN, claimed, op_cmove);
            mark_saved(p, RUN, claimed);
        }
        t_saver_release = now() - t0;
        struct iovec iov[RUN];
        for (size_t p = 0; p < NP; p += RUN) {
            /* moved back by the saver: its copy is in side; served by a fault: staging has it */
            for (size_t i = 0; i < RUN; i++) {
                while (atomic_load(&st[p + i]) != 2)
                    sched_yield();
                iov[i].iov_base = (cm_from_side[p + i] ? side : stage) + (p + i) * PS;
                iov[i].iov_len = PS;
            }
            if (pwritev(outfd, iov, RUN, p * PS) != (ssize_t)(RUN * PS))
                DIE("pwritev");
            madvise(side + p * PS, RUN * PS, MADV_DONTNEED);
            madvise(stage + p * PS, RUN * PS, MADV_DONTNEED);
        }
        t_saver_done = now() - t0;
    } else if (mech_remap) {
        for (size_t p = 0; p < NP; p += RUN) {
            claim_run(p, RUN, claimed);
            for_claimed(p, RUN, claimed, op_copy);
            mark_saved(p, RUN, claimed);
        }
        t_saver_release = now() - t0;
        for (size_t p = 0; p < NP; p += RUN) {
            write_all(stage + p * PS, p * PS, RUN * PS);
            for (size_t i = 0; i < RUN; i++)   /* a handler may still copy from staging */
                while (atomic_load(&st[p + i]) != 2)
                    sched_yield();
            madvise(stage + p * PS, RUN * PS, MADV_DONTNEED);   /* every page is back */
        }
        t_saver_done = now() - t0;
    } else if (!saver_copy) {
        struct iovec iov[RUN];
        for (size_t p = 0; p < NP; p += RUN) {
            claim_run(p, RUN, claimed);
            for (size_t i = 0; i < RUN; i++) {
                if (!claimed[i])
                    while (atomic_load(&st[p + i]) != 2)   /* the handler is copying it */
                        sched_yield();
                iov[i].iov_base = (claimed[i] ? region : side) + (p + i) * PS;
                iov[i].iov_len = PS;
            }
            ssize_t k = pwritev(outfd, iov, RUN, p * PS);
            if (k != (ssize_t)(RUN * PS))
                DIE("pwritev");
            mark_saved(p, RUN, claimed);
            uffd_wp(ufd, region + p * PS, RUN * PS, false, true);
        }
        t_saver_release = t_saver_done = now() - t0;
    } else {
        for (size_t p = 0; p < NP; p += RUN) {
            claim_run(p, RUN, claimed);
            for_claimed(p, RUN, claimed, op_side);
            mark_saved(p, RUN, claimed);
            uffd_wp(ufd, region + p * PS, RUN * PS, false, true);
        }
        t_saver_release = now() - t0;
        for (size_t p = 0; p < NP; p += RUN) {
            for (size_t i = 0; i < RUN; i++)   /* a page the handler still copies */
                while (atomic_load(&st[p + i]) != 2)
                    sched_yield();
            write_all(side + p * PS, p * PS, RUN * PS);
            madvise(side + p * PS, RUN * PS, MADV_DONTNEED);
        }
        t_saver_done = now() - t0;
    }
    atomic_store(&ckpt_active, 0);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s remap|wp direct|copy|cmove [nopause] [file]\n", argv[0]);
        return 2;
    }
    mech_remap = !strcmp(argv[1], "remap");
    saver_copy = !strcmp(argv[2], "copy") || !strcmp(argv[2], "cmove");
    saver_cmove = !strcmp(argv[2], "cmove");
    cm_from_side = calloc(NP, 1);
    const char *path = "/tmp/exp03_image";
    for (int i = 3; i < argc; i++) {
        if (!strcmp(argv[i], "nopause"))
            nopause = 1;
        else
            path = argv[i];
    }
    pm = open("/proc/self/pagemap", O_RDONLY);
    region = map_aligned(LEN, GIB, 0);
    fill_pattern(region, LEN, 11);
    wlog = mmap(NULL, LOGCAP * 4, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    side = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    st = calloc(NP, 1);
    if (mech_remap) {
        ufd = uffd_new(F_WP_ASYNC | F_MOVE | UFFD_FEATURE_EVENT_REMAP);
        uffd_reg(ufd, region, LEN, UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP);
        scan_wp(pm, region, LEN);   /* a working-set mark: dirty tracking is on */
        stage = reserve_aligned(LEN, GIB, 0);
    } else {
        ufd = uffd_new(0);
        uffd_reg(ufd, region, LEN, UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP);
    }
    outfd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (outfd < 0 || ftruncate(outfd, LEN))
        DIE("open %s", path);
    pthread_t wt, ht[2], svt;
    for (int c = 0; c < 2; c++)
        pthread_create(&ht[c], NULL, handler, (void *)(intptr_t)c);   /* one per CPU, pinned */
    pthread_create(&wt, NULL, writer, NULL);

    /* Sample the writer's progress in 10 ms windows: 1 s before, then the checkpoint. */
    enum { MAXW = 4000 };
    static double rate[MAXW];
    static int phase[MAXW];   /* 0 before, 1 during, 2 after */
    int nw = 0;
    uint64_t last = atomic_load(&wseq);
    double tl = now();
    for (int i = 0; i < 100; i++) {
        usleep(WIN_MS * 1000);
        uint64_t c = atomic_load(&wseq);
        double t = now();
        rate[nw] = (c - last) / (t - tl);
        phase[nw++] = 0;
        last = c;
        tl = t;
    }

    /* The pause. */
    double t_req = now(), t_ack = t_req, t_mech0, t_mech1;
    uint64_t s_pause = 0;
    if (!nopause) {
        atomic_store(&pause_req, 1);
        while (!atomic_load(&paused))
            ;
        t_ack = now();
        ref = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        memcpy(ref, region, LEN);   /* verification only: not part of the pause */
        s_pause = seq_at_pause;
    }
    atomic_store(&ckpt_active, 1);
    t_mech0 = now();
    if (mech_remap) {
        if (mremap(region, LEN, LEN, MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP, stage) == MAP_FAILED)
            DIE("mremap");
    } else
        uffd_wp(ufd, region, LEN, true, false);
    t_mech1 = now();
    atomic_store(&pause_req, 0);
    uint64_t s_after_mech = atomic_load(&wseq);
    double t0 = now();
    pthread_create(&svt, NULL, saver, &t0);
    /* Off the pause path: which pages were written since the mark (an incremental checkpoint
       would take those), read from the immutable staging copy. */
    size_t dirty_at_pause = mech_remap ? scan_written(pm, stage, LEN) : 0;

    last = atomic_load(&wseq);
    tl = now();
    int first_during = nw;
    while (atomic_load(&ckpt_active) && nw < MAXW) {
        usleep(WIN_MS * 1000);
        uint64_t c = atomic_load(&wseq);
        double t = now();
        rate[nw] = (c - last) / (t - tl);
        phase[nw++] = 1;
        last = c;
        tl = t;
    }
    int end_during = nw;
    pthread_join(svt, NULL);
    double t_total = now() - t0;
    uint64_t stores_during = atomic_load(&wseq) - s_after_mech;
    for (int i = 0; i < 50 && nw < MAXW; i++) {
        usleep(WIN_MS * 1000);
        uint64_t c = atomic_load(&wseq);
        double t = now();
        rate[nw] = (c - last) / (t - tl);
        phase[nw++] = 2;
        last = c;
        tl = t;
    }
    atomic_store(&stop_writer, 1);
    pthread_join(wt, NULL);
    uint64_t s_end = atomic_load(&wseq);
    double tf = now();
    fsync(outfd);
    double t_fsync = now() - tf;

    /* Dirty tracking after the checkpoint: pages written after the pause (from the log) must all
       read as written; how many more read so (moved back without their uffd-wp bit)? */
    size_t miss = 0, extra = 0, truth = 0;
    if (mech_remap) {
        uint8_t *wr = calloc(NP, 1);
        uint64_t from = nopause ? s_after_mech : s_pause;
        for (uint64_t s = from + 1; s <= s_end; s++)
            wr[wlog[s] / (PS / 8)] = 1;
        uint8_t *seen = calloc(NP, 1);
        struct page_region vec[256];
        uint64_t a = (uintptr_t)region, e = a + LEN;
        while (a < e) {
            struct pm_scan_arg sa = {.size = sizeof sa, .start = a, .end = e, .vec = (uintptr_t)vec,
                                     .vec_len = 256, .category_mask = PAGE_IS_WRITTEN | PAGE_IS_PRESENT,
                                     .return_mask = PAGE_IS_WRITTEN | PAGE_IS_PRESENT};
            long k = ioctl(pm, PAGEMAP_SCAN_X, &sa);
            if (k < 0)
                DIE("PAGEMAP_SCAN");
            for (long i = 0; i < k; i++)
                for (uint64_t q = vec[i].start; q < vec[i].end; q += PS)
                    seen[(q - (uintptr_t)region) / PS] = 1;
            a = sa.walk_end;
        }
        for (size_t p = 0; p < NP; p++) {
            truth += wr[p];
            miss += wr[p] && !seen[p];
            extra += seen[p] && !wr[p];
        }
    }

    /* Verify the file. */
    char *img = mmap(NULL, LEN, PROT_READ, MAP_SHARED, outfd, 0);
    const uint64_t *iw = (const uint64_t *)img;
    /* The cut S: the largest sequence number in the file (a word differing from the initial
       pattern holds a store's number). A wrong S cannot reproduce the file in the replay. */
    char *shadow = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    fill_pattern(shadow, LEN, 11);
    uint64_t smax = 0;
    for (size_t i = 0; i < LEN / 8; i++)
        if (iw[i] != ((uint64_t *)shadow)[i] && iw[i] > smax)
            smax = iw[i];
    uint64_t S = nopause ? smax : s_pause;
    for (uint64_t s = 1; s <= S; s++)
        ((uint64_t *)shadow)[wlog[s]] = s;
    size_t bad_replay = 0, bad_ref = 0;
    for (size_t p = 0; p < NP; p++) {
        bad_replay += memcmp(img + p * PS, shadow + p * PS, PS) != 0;
        if (ref)
            bad_ref += memcmp(img + p * PS, ref + p * PS, PS) != 0;
    }

    double before[MAXW], during[MAXW];
    int nb = 0, nd = 0;
    for (int i = 0; i < nw; i++) {
        if (phase[i] == 0)
            before[nb++] = rate[i];
        else if (phase[i] == 1 && i >= first_during && i < end_during)
            during[nd++] = rate[i];
    }
    double rb = median(before, nb), rd = nd ? median(during, nd) : 0;
    double mean_during = stores_during / t_total;
    printf("%s/%s%s: pause %.3f ms (mremap/WP call %.3f ms, writer ack %.3f ms)%s\n", argv[1], argv[2],
           nopause ? " nopause" : "", (t_mech1 - t_mech0 + t_ack - t_req) * 1e3, (t_mech1 - t_mech0) * 1e3,
           (t_ack - t_req) * 1e3, nopause ? " [writer never stopped]" : "");
    printf("  checkpoint %.0f ms (pages all released at %.0f ms), fsync after %.0f ms\n",
           t_total * 1e3, t_saver_release * 1e3, t_fsync * 1e3);
    printf("  writer stores/s: before median %.3g; during median %.3g (%.2fx), mean %.3g (%.2fx); "
           "%d windows\n", rb, rd, rd / rb, mean_during, mean_during / rb, nd);
    printf("  faults served %ld, waits on the saver %ld; dirty pages at the pause (since mark) %zu\n",
           atomic_load(&n_faults), atomic_load(&n_waits), dirty_at_pause);
    if (mech_remap)
        printf("  dirty tracking after: %zu pages written after the pause, %zu of them NOT seen "
               "(must be 0), %zu extra pages read as written\n", truth, miss, extra);
    printf("  VERIFY: file vs replay of stores 1..%llu: %zu pages differ; vs reference copy: %s%zu "
           "differ  => %s\n", (unsigned long long)S, bad_replay, ref ? "" : "(none) ", bad_ref,
           bad_replay == 0 && bad_ref == 0 ? "OK" : "FAIL");
    atomic_store(&stop_handlers, 1);
    for (int c = 0; c < 2; c++)
        pthread_join(ht[c], NULL);
    unlink(path);
    return bad_replay || bad_ref;
}
