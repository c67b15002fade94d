/* exp12: REAP's prefetch of a scattered working set (10% random pages of 1 GiB, one ioctl per
   page as address-adjacent runs are rare): today's private UFFDIO_COPY per page, against the
   shared path's publish (UFFDIO_COPY into the view) + UFFDIO_CONTINUE per page, and CONTINUE
   alone (a later process: the pool already holds them). Source bytes from memory. */
#include "exp.h"
#define N (1UL << 30)
#define NP (N / PS)

static int cmp(const void *a, const void *b)
{
    size_t x = *(const size_t *)a, y = *(const size_t *)b;
    return x < y ? -1 : x > y;
}

int main(void)
{
    size_t nws = NP / 10, *ws = malloc(nws * sizeof *ws);
    uint64_t x = 99;
    char *seen = calloc(NP, 1);
    for (size_t i = 0; i < nws;) {
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        size_t p = (x >> 20) % NP;
        if (!seen[p])
            seen[p] = 1, ws[i++] = p;
    }
    qsort(ws, nws, sizeof *ws, cmp);   /* prefetch goes in store order; address order is the best case */
    char *src = aligned_alloc(PS, PS);
    memset(src, 7, PS);
    pin(0);
    for (int rep = 0; rep < 3; rep++) {
        int err;
        /* today: private copy into anonymous memory */
        char *a = mmap(0, N, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        madvise(a, N, MADV_NOHUGEPAGE);
        int u = uffd_new(UFFD_FEATURE_MINOR_SHMEM, NULL);
        uffd_reg(u, a, N, UFFDIO_REGISTER_MODE_MISSING, NULL);
        double t0 = now();
        for (size_t i = 0; i < nws; i++)
            uffd_copy(u, a + ws[i] * PS, src, PS, 1, &err);
        double t_priv = now() - t0;
        munmap(a, N);
        close(u);
        /* shared, first process: publish into the view + continue into the region */
        int mfd = memfd_create("pool", 0);
        ftruncate(mfd, N);
        char *r = mmap(0, N, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, mfd, 0);
        char *v = mmap(0, N, PROT_NONE, MAP_SHARED | MAP_NORESERVE, mfd, 0);
        u = uffd_new(UFFD_FEATURE_MINOR_SHMEM, NULL);
        uffd_reg(u, r, N, UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR, NULL);
        uffd_reg(u, v, N, UFFDIO_REGISTER_MODE_MISSING, NULL);
        t0 = now();
        for (size_t i = 0; i < nws; i++)
            uffd_copy(u, v + ws[i] * PS, src, PS, 1, &err);
        double t_pub = now() - t0;
        t0 = now();
        for (size_t i = 0; i < nws; i++)
            uffd_continue(u, r + ws[i] * PS, PS, 1, &err);
        double t_cont = now() - t0;
        /* a later process: CONTINUE only */
        char *r2 = mmap(0, N, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, mfd, 0);
        uffd_reg(u, r2, N, UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR, NULL);
        t0 = now();
        for (size_t i = 0; i < nws; i++)
            uffd_continue(u, r2 + ws[i] * PS, PS, 1, &err);
        double t_cont2 = now() - t0;
        printf("rep %d, %zu scattered pages: private COPY %.0f ms (%.2f us/page) | shared first: publish %.0f ms + "
               "CONTINUE %.0f ms = %.0f ms (%.2fx) | later process: CONTINUE %.0f ms (%.2f us/page)\n",
               rep, nws, t_priv * 1e3, t_priv / nws * 1e6, t_pub * 1e3, t_cont * 1e3, (t_pub + t_cont) * 1e3,
               (t_pub + t_cont) / t_priv, t_cont2 * 1e3, t_cont2 / nws * 1e6);
        munmap(r, N);
        munmap(r2, N);
        munmap(v, N);
        close(u);
        close(mfd);
    }
    return 0;
}
