/*
 * exp02_faults: what the writer pays per first store during a checkpoint, and what the saver
 * pays per page, on 1 GiB of present 4 KiB pages.
 *
 * Per first store to a random page (N distinct pages, ns per store):
 *   plain      no protection (a store to a present page: the baseline)
 *   async      async WP (the kernel resolves the fault: today's dirty tracking)
 *   wp         sync WP, the handler un-protects the page (option (a): dirty tracking by sync faults)
 *   wp-save    sync WP, the handler copies the page to a side buffer, then un-protects it
 *              (a background checkpoint's fault)
 *   copy       after mremap(DONTUNMAP) to staging: MISSING fault, UFFDIO_COPY from staging
 *   copy-wp    the same with UFFDIO_COPY_MODE_WP (the installed copy stays tracked by async WP)
 *   move       after mremap(DONTUNMAP): MISSING fault, UFFDIO_MOVE from staging (no copy)
 * each with the handler on the writer's CPU (same) and on the other CPU (other).
 *
 * Per page of a whole 1 GiB pass, in 2 MiB runs (the saver's work):
 *   memcpy, memcpy + un-protect (WP saver, copy mode), UFFDIO_MOVE back, UFFDIO_COPY,
 *   UFFDIO_COPY_MODE_WP, pwrite to a file on /tmp (ext4, page cache), fsync of it.
 *
 * Usage: exp02_faults [reps] [N]
 */
#include "exp.h"

#define LEN GIB
enum { M_PLAIN, M_ASYNC, M_WP, M_WPSAVE, M_COPY, M_COPYWP, M_MOVE, M_N };
static const char *mname[] = {"plain", "async", "wp", "wp-save", "copy", "copy-wp", "move"};

static int g_fd, g_mode;
static char *g_region, *g_stage, *g_side;
static atomic_int g_stop;

static void *handler(void *arg)
{
    pin(*(int *)arg);
    struct uffd_msg m[16];
    while (!atomic_load(&g_stop)) {
        struct pollfd p = {.fd = g_fd, .events = POLLIN};
        if (poll(&p, 1, 5) <= 0)
            continue;
        ssize_t k = read(g_fd, m, sizeof m);
        for (ssize_t i = 0; i < k / (ssize_t)sizeof m[0]; i++) {
            if (m[i].event != UFFD_EVENT_PAGEFAULT)
                continue;
            char *a = (char *)(uintptr_t)(m[i].arg.pagefault.address & ~(PS - 1));
            size_t off = a - g_region;
            switch (g_mode) {
            case M_WP:
                uffd_wp(g_fd, a, PS, false, true);
                break;
            case M_WPSAVE:
                memcpy(g_side + off, a, PS);
                uffd_wp(g_fd, a, PS, false, true);
                break;
            case M_COPY:
                uffd_copy(g_fd, a, g_stage + off, PS, 0);
                break;
            case M_COPYWP:
                uffd_copy(g_fd, a, g_stage + off, PS,
                          (m[i].arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WRITE) ? 0 : UFFDIO_COPY_MODE_WP);
                break;
            case M_MOVE:
                uffd_move(g_fd, a, g_stage + off, PS, 0);
                break;
            }
        }
    }
    return NULL;
}

static double run_faults(int mode, int hcpu, int pm, size_t n, size_t *pages)
{
    g_mode = mode;
    g_region = map_aligned(LEN, GIB, 0);
    fill_pattern(g_region, LEN, 3);
    g_fd = -1;
    pthread_t th;
    if (mode != M_PLAIN) {
        uint64_t f = mode == M_ASYNC ? F_WP_ASYNC : F_MOVE | UFFD_FEATURE_EVENT_REMAP;
        g_fd = uffd_new(f);
        uffd_reg(g_fd, g_region, LEN, UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP);
        if (mode == M_ASYNC)
            scan_wp(pm, g_region, LEN);
        else if (mode == M_WP || mode == M_WPSAVE)
            uffd_wp(g_fd, g_region, LEN, true, false);
        atomic_store(&g_stop, 0);
        pthread_create(&th, NULL, handler, &hcpu);   /* it also reads the REMAP event */
        if (mode >= M_COPY) {
            g_stage = reserve_aligned(LEN, GIB, 0);
            if (mremap(g_region, LEN, LEN, MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP,
                       g_stage) == MAP_FAILED)
                DIE("mremap");
        }
    }
    pin(0);
    usleep(2000);
    double t0 = now();
    for (size_t i = 0; i < n; i++)
        *(volatile uint64_t *)(g_region + pages[i] * PS + 8) = i;
    double t = (now() - t0) / n;
    /* the stores landed, and the untouched words kept the pre-checkpoint contents */
    for (size_t i = 0; i < n; i += 97) {
        uint64_t *w = (uint64_t *)(g_region + pages[i] * PS);
        if (w[1] != i || w[0] != pages[i] * 1000003ULL + 3)
            fprintf(stderr, "WRONG contents at page %zu (mode %s)\n", pages[i], mname[mode]);
    }
    if (mode != M_PLAIN) {
        atomic_store(&g_stop, 1);
        pthread_join(th, NULL);
        close(g_fd);
    }
    if (mode >= M_COPY)
        munmap(g_stage, LEN);
    munmap(g_region, LEN);
    return t;
}

int main(int argc, char **argv)
{
    int reps = argc > 1 ? atoi(argv[1]) : 5;
    size_t n = argc > 2 ? strtoul(argv[2], NULL, 0) : 20000;
    int pm = open("/proc/self/pagemap", O_RDONLY);
    size_t np = LEN / PS;
    size_t *perm = malloc(np * sizeof(size_t));
    uint64_t seed = 88172645463325252ULL;
    for (size_t i = 0; i < np; i++)
        perm[i] = i;
    for (size_t i = np - 1; i > 0; i--) {
        size_t j = xorshift(&seed) % (i + 1), t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
    g_side = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);

    printf("first store to %zu distinct random pages of 1 GiB, ns per store (median of %d)\n", n, reps);
    for (int mode = 0; mode < M_N; mode++)
        for (int hcpu = 0; hcpu < 2; hcpu++) {
            if ((mode == M_PLAIN || mode == M_ASYNC) && hcpu)
                continue;
            double t[64];
            for (int i = 0; i < reps; i++)
                t[i] = run_faults(mode, hcpu, pm, n, perm);
            double c[64];
            memcpy(c, t, sizeof t);
            printf("  %-8s handler %-5s %9.0f ns  [", mname[mode],
                   mode <= M_ASYNC ? "-" : hcpu ? "other" : "same", median(c, reps) * 1e9);
            for (int i = 0; i < reps; i++)
                printf("%s%.0f", i ? " " : "", t[i] * 1e9);
            printf("]\n");
            fflush(stdout);
        }

    /* Saver passes over 1 GiB in 2 MiB runs. */
    const size_t RUN = 2UL << 20;
    const char *pname[] = {"memcpy to side buffer", "memcpy + un-protect (sync WP)",
                           "UFFDIO_MOVE staging -> region", "UFFDIO_COPY staging -> region",
                           "UFFDIO_COPY_MODE_WP staging -> region", "pwrite to /tmp file",
                           "fsync of that file (whole)"};
    double pt[7][64];
    for (int i = 0; i < reps; i++) {
        for (int p = 0; p < 5; p++) {
            char *r = map_aligned(LEN, GIB, 0);
            fill_pattern(r, LEN, 5);
            int fd = uffd_new(F_WP_ASYNC | F_MOVE);
            char *st = NULL;
            if (p == 1) {
                close(fd);
                fd = uffd_new(0);
            }
            uffd_reg(fd, r, LEN, UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP);
            if (p == 1)
                uffd_wp(fd, r, LEN, true, false);
            if (p >= 2) {   /* contents to staging; the region is empty */
                st = reserve_aligned(LEN, GIB, 0);
                if (mremap(r, LEN, LEN, MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP, st) == MAP_FAILED)
                    DIE("mremap");
            }
            double t0 = now();
            for (size_t off = 0; off < LEN; off += RUN) {
                if (p == 0)
                    memcpy(g_side + off, r + off, RUN);
                else if (p == 1) {
                    memcpy(g_side + off, r + off, RUN);
                    uffd_wp(fd, r + off, RUN, false, true);
                } else if (p == 2)
                    uffd_move(fd, r + off, st + off, RUN, 0);
                else
                    uffd_copy(fd, r + off, st + off, RUN, p == 4 ? UFFDIO_COPY_MODE_WP : 0);
            }
            pt[p][i] = (now() - t0) / (LEN / PS);
            if (*(uint64_t *)(r + 777 * PS) != 777 * 1000003ULL + 5)
                fprintf(stderr, "WRONG pass %d\n", p);
            close(fd);
            munmap(r, LEN);
            if (st)
                munmap(st, LEN);
        }
        int f = open("/tmp/exp02_file", O_WRONLY | O_CREAT | O_TRUNC, 0600);
        double t0 = now();
        for (size_t off = 0; off < LEN; off += RUN)
            if (pwrite(f, g_side + off, RUN, off) != (ssize_t)RUN)
                DIE("pwrite");
        pt[5][i] = (now() - t0) / (LEN / PS);
        t0 = now();
        fsync(f);
        pt[6][i] = (now() - t0) / (LEN / PS);
        close(f);
        unlink("/tmp/exp02_file");
    }
    printf("1 GiB pass in 2 MiB runs, ns per page (median of %d); x 262144 = per GiB\n", reps);
    for (int p = 0; p < 7; p++) {
        double c[64];
        memcpy(c, pt[p], sizeof c);
        double m = median(c, reps);
        printf("  %-40s %7.0f ns/page  %7.1f ms/GiB  [", pname[p], m * 1e9, m * 262144 * 1e3);
        for (int i = 0; i < reps; i++)
            printf("%s%.0f", i ? " " : "", pt[p][i] * 1e9);
        printf("]\n");
    }
    return 0;
}
