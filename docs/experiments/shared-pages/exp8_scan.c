/* exp8: cost of counting a 1 GiB shared restore's shared vs private pages (stats(), checkpoint):
   PAGEMAP_SCAN with categories vs reading /proc/self/pagemap. */
#include "exp.h"
#define N (1UL << 30)
#define NP (N / PS)
int main(void)
{
    int mfd = memfd_create("pool", 0);
    ftruncate(mfd, N);
    char *b = malloc(1 << 21);
    memset(b, 1, 1 << 21);
    for (size_t o = 0; o < N; o += 1 << 21)
        pwrite(mfd, b, 1 << 21, o);
    char *reg = mmap(0, N, PROT_READ | PROT_WRITE, MAP_PRIVATE, mfd, 0);
    madvise(reg, N, MADV_POPULATE_READ);
    for (size_t p = 0; p < NP; p += 100)
        reg[p * PS] = 2;   /* 1% COWed */
    int pm = open("/proc/self/pagemap", O_RDONLY);
    size_t cap = NP;
    struct pm_page_region *v = malloc(cap * sizeof *v);
    uint64_t *e = malloc(NP * 8);
    for (int rep = 0; rep < 5; rep++) {
        double t0 = now();
        struct pm_scan_arg s = {.size = sizeof s, .start = (uintptr_t)reg, .end = (uintptr_t)reg + N,
                                .vec = (uintptr_t)v, .vec_len = cap,
                                .category_inverted = PAGE_IS_FILE | PAGE_IS_PFNZERO,
                                .category_mask = PAGE_IS_PRESENT | PAGE_IS_FILE | PAGE_IS_PFNZERO,
                                .return_mask = PAGE_IS_PRESENT};
        long k = ioctl(pm, PAGEMAP_SCAN_IOC, &s);
        size_t priv = 0;
        for (long i = 0; i < k; i++)
            priv += (v[i].end - v[i].start) / PS;
        double t1 = now();
        pread(pm, e, NP * 8, ((uintptr_t)reg / PS) * 8);
        size_t anon = 0;
        for (size_t p = 0; p < NP; p++)
            anon += (e[p] >> 63 & 1) && !(e[p] >> 61 & 1);
        double t2 = now();
        printf("rep %d: PAGEMAP_SCAN private (present, !file, !zero) pages %zu in %.2f ms; pagemap read: %zu in %.2f ms\n",
               rep, priv, (t1 - t0) * 1e3, anon, (t2 - t1) * 1e3);
    }
    return 0;
}
