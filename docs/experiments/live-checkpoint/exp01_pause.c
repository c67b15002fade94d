/*
 * exp01_pause: what each candidate "pause" costs on 1 GiB of present 4 KiB pages.
 *
 *   wp-sync      UFFDIO_WRITEPROTECT of the whole range on a sync-WP uffd (and the unprotect)
 *   wp-async     PAGEMAP_SCAN(WP_MATCHING) of the whole range on a WP_ASYNC uffd (the mark today)
 *   unreg-wp     UFFDIO_UNREGISTER of a MISSING|WP async registration with every page protected
 *                (the kernel clears the uffd-wp bits: a page-table walk?), then REGISTER on a
 *                sync-WP uffd: option (b) without its final WRITEPROTECT
 *   unreg-miss   UFFDIO_UNREGISTER of a MISSING-only registration
 *   mremap-*     mremap(MREMAP_MAYMOVE|FIXED|DONTUNMAP) of the whole range to a staging address:
 *                unregistered; registered (async WP uffd) without EVENT_REMAP; with EVENT_REMAP
 *                (a thread reads the event, as a serving thread would); 1 GiB-aligned source and
 *                target (a PUD can move) and only 2 MiB-aligned (PMDs can move)
 *   fork         fork() with the region MADV_DOFORK (registered, async WP, no EVENT_FORK), the
 *                child exits at once; against fork() with the region MADV_DONTFORK
 *
 * Usage: exp01_pause [reps]   (default 5; medians and all values are printed)
 */
#include "exp.h"

#define LEN GIB
static int reps = 5;

static atomic_int reader_stop;
static atomic_long remap_events;

static void *event_reader(void *arg)
{
    int fd = *(int *)arg;
    struct uffd_msg m[16];
    while (!atomic_load(&reader_stop)) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, 10) <= 0)
            continue;
        ssize_t k = read(fd, m, sizeof m);
        for (ssize_t i = 0; i < k / (ssize_t)sizeof m[0]; i++)
            if (m[i].event == UFFD_EVENT_REMAP)
                atomic_fetch_add(&remap_events, 1);
    }
    return NULL;
}

static char *populated(size_t skew)
{
    char *r = map_aligned(LEN, GIB, skew);
    fill_pattern(r, LEN, 7);
    return r;
}

static size_t present_pages(int pm, char *a, size_t len)
{
    struct page_region vec[256];
    uint64_t start = (uintptr_t)a, end = start + len;
    size_t n = 0;
    while (start < end) {
        struct pm_scan_arg s = {.size = sizeof s, .start = start, .end = end, .vec = (uintptr_t)vec,
                                .vec_len = 256, .category_mask = PAGE_IS_PRESENT,
                                .return_mask = PAGE_IS_PRESENT};
        long k = ioctl(pm, PAGEMAP_SCAN_X, &s);
        if (k < 0)
            DIE("PAGEMAP_SCAN");
        for (long i = 0; i < k; i++)
            n += (vec[i].end - vec[i].start) / PS;
        start = s.walk_end;
    }
    return n;
}

static void report(const char *name, double *v, int n)
{
    double c[64];
    memcpy(c, v, n * sizeof(double));
    printf("%-52s median %8.3f ms  [", name, median(c, n) * 1e3);
    for (int i = 0; i < n; i++)
        printf("%s%.3f", i ? " " : "", v[i] * 1e3);
    printf("]\n");
    fflush(stdout);
}

int main(int argc, char **argv)
{
    if (argc > 1)
        reps = atoi(argv[1]);
    int pm = open("/proc/self/pagemap", O_RDONLY);
    double t_wp[64], t_unwp[64], t_scan[64], t_unreg[64], t_reg[64], t_unreg_m[64];

    for (int i = 0; i < reps; i++) {
        /* wp-sync */
        char *r = populated(0);
        int fd = uffd_new(0);
        uffd_reg(fd, r, LEN, UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP);
        double t0 = now();
        uffd_wp(fd, r, LEN, true, false);
        t_wp[i] = now() - t0;
        t0 = now();
        uffd_wp(fd, r, LEN, false, true);
        t_unwp[i] = now() - t0;
        close(fd);
        munmap(r, LEN);

        /* wp-async mark, then option (b): unregister, register sync */
        r = populated(0);
        fd = uffd_new(F_WP_ASYNC);
        uffd_reg(fd, r, LEN, UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP);
        t0 = now();
        scan_wp(pm, r, LEN);
        t_scan[i] = now() - t0;
        size_t w = scan_written(pm, r, LEN);
        t0 = now();
        uffd_unreg(fd, r, LEN);
        t_unreg[i] = now() - t0;
        int fd2 = uffd_new(0);
        t0 = now();
        uffd_reg(fd2, r, LEN, UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP);
        t_reg[i] = now() - t0;
        /* After the unregister, are the pages still write-protected? A write would tell (a
           sync WP fault nobody serves would hang), so ask PAGEMAP_SCAN instead. */
        size_t w2 = scan_written(pm, r, LEN);
        if (i == 0)
            printf("async mark: %zu pages written after mark (expect 0); after UNREGISTER + "
                   "REGISTER(sync): %zu written (262144 = bits cleared)\n", w, w2);
        close(fd2);
        close(fd);
        munmap(r, LEN);

        /* unregister MISSING-only */
        r = populated(0);
        fd = uffd_new(0);
        uffd_reg(fd, r, LEN, UFFDIO_REGISTER_MODE_MISSING);
        t0 = now();
        uffd_unreg(fd, r, LEN);
        t_unreg_m[i] = now() - t0;
        close(fd);
        munmap(r, LEN);
    }
    report("wp-sync: UFFDIO_WRITEPROTECT 1 GiB", t_wp, reps);
    report("wp-sync: un-protect 1 GiB", t_unwp, reps);
    report("wp-async: PAGEMAP_SCAN WP_MATCHING 1 GiB", t_scan, reps);
    report("unreg-wp: UNREGISTER async MISSING|WP", t_unreg, reps);
    report("unreg-wp: REGISTER sync MISSING|WP", t_reg, reps);
    report("unreg-miss: UNREGISTER MISSING-only", t_unreg_m, reps);

    /* mremap DONTUNMAP variants: kind 0 unregistered, 1 async uffd without EVENT_REMAP,
       2 async uffd with EVENT_REMAP; skew 0 = 1 GiB-aligned, 2 MiB = PMD-aligned only. */
    const char *kinds[] = {"unregistered", "uffd, no EVENT_REMAP", "uffd + EVENT_REMAP"};
    size_t skews[] = {0, 2UL << 20};
    for (int s = 0; s < 2; s++)
        for (int k = 0; k < 3; k++) {
            double t[64];
            for (int i = 0; i < reps; i++) {
                char *r = populated(skews[s]);
                char *stage = reserve_aligned(LEN, GIB, skews[s]);
                int fd = -1;
                pthread_t th;
                if (k) {
                    fd = uffd_new(F_WP_ASYNC | F_MOVE | (k == 2 ? UFFD_FEATURE_EVENT_REMAP : 0));
                    uffd_reg(fd, r, LEN, UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP);
                    scan_wp(pm, r, LEN);
                }
                if (k == 2) {
                    atomic_store(&reader_stop, 0);
                    pthread_create(&th, NULL, event_reader, &fd);
                }
                double t0 = now();
                void *q = mremap(r, LEN, LEN, MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP, stage);
                t[i] = now() - t0;
                if (q == MAP_FAILED)
                    DIE("mremap");
                size_t left = present_pages(pm, r, LEN), moved = present_pages(pm, stage, LEN);
                size_t wstage = scan_written(pm, stage, LEN);
                int ok = *(uint64_t *)(stage + 12345 * PS) == 12345 * 1000003ULL + 7;
                if (i == 0)   /* remap events: cumulative over the runs so far */
                    printf("  mremap %-22s skew %4zu KiB: region present %zu, staging present %zu "
                           "(uffd-wp clear on %zu), contents %s, remap events %ld\n",
                           kinds[k], skews[s] >> 10, left, moved, wstage, ok ? "ok" : "WRONG",
                           atomic_load(&remap_events));
                if (k == 2) {
                    atomic_store(&reader_stop, 1);
                    pthread_join(th, NULL);
                }
                if (fd >= 0)
                    close(fd);
                munmap(r, LEN);
                munmap(stage, LEN);
            }
            char name[96];
            snprintf(name, sizeof name, "mremap DONTUNMAP, %s, %s", kinds[k],
                     s ? "2M-aligned" : "1G-aligned");
            report(name, t, reps);
        }

    /* fork: page tables of the region copied (and write-protected for COW) */
    for (int dofork = 0; dofork < 2; dofork++) {
        double t[64];
        for (int i = 0; i < reps; i++) {
            char *r = populated(0);
            int fd = uffd_new(F_WP_ASYNC);
            uffd_reg(fd, r, LEN, UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP);
            scan_wp(pm, r, LEN);
            madvise(r, LEN, dofork ? MADV_DOFORK : MADV_DONTFORK);
            double t0 = now();
            pid_t pid = fork();
            if (pid == 0)
                _exit(0);
            t[i] = now() - t0;
            waitpid(pid, NULL, 0);
            close(fd);
            munmap(r, LEN);
        }
        report(dofork ? "fork, region MADV_DOFORK (1 GiB copied PTEs)" : "fork, region MADV_DONTFORK",
               t, reps);
    }
    return 0;
}
