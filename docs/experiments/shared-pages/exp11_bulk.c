/* exp11: a second process that maps the whole filled pool at restore (prefetch="all": bulk
   UFFDIO_CONTINUE of 2 MiB runs, no faults) and then reads it, against np.load(mmap_mode="r")-like
   reading of the file; both: one word per page, and every byte. ./exp11 FILE (1 GiB) */
#include "exp.h"
#define N (1UL << 30)
#define NP (N / PS)

static double touch(const char *m, int all, uint64_t *sum)
{
    double t0 = now();
    uint64_t s = 0;
    if (all)
        for (size_t i = 0; i < N / 8; i++)
            s += ((const volatile uint64_t *)m)[i];
    else
        for (size_t p = 0; p < NP; p++)
            s += ((const volatile uint64_t *)(m + p * PS))[0];
    *sum = s;
    return now() - t0;
}

int main(int argc, char **argv)
{
    int ffd = open(argv[1], O_RDONLY);
    int mfd = memfd_create("pool", 0);
    ftruncate(mfd, N);
    char *b = malloc(2 << 20);
    for (size_t o = 0; o < N; o += 2 << 20) {
        pread(ffd, b, 2 << 20, o);
        pwrite(mfd, b, 2 << 20, o);
    }
    uint64_t s1, s2;
    for (int rep = 0; rep < 3; rep++)
        for (int all = 0; all < 2; all++) {
            char *r = mmap(0, N, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, mfd, 0);
            int u = uffd_new(UFFD_FEATURE_MINOR_SHMEM, NULL);
            uffd_reg(u, r, N, UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR, NULL);
            double t0 = now();
            int err;
            for (size_t o = 0; o < N; o += 2 << 20)
                uffd_continue(u, r + o, 2 << 20, 1, &err);
            double tc = now() - t0;
            double tr = touch(r, all, &s1);
            char *f = mmap(0, N, PROT_READ, MAP_SHARED, ffd, 0);
            double tf = touch(f, all, &s2);
            printf("rep %d read %-14s pool: bulk CONTINUE %.0f ms + read %.0f ms = %.0f ms | file mmap: %.0f ms | "
                   "ratio %.2f %s\n", rep, all ? "every byte" : "a word a page", tc * 1e3, tr * 1e3,
                   (tc + tr) * 1e3, tf * 1e3, (tc + tr) / tf, s1 == s2 ? "" : "(SUMS DIFFER)");
            munmap(f, N);
            munmap(r, N);
            close(u);
        }
    return 0;
}
