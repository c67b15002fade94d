/* exp13: does publishing through the PROT_NONE view leave the pages mapped in the view (Rss, page
   tables), and does MADV_DONTNEED of the view drop them without touching the pool? */
#include "exp.h"
#define NPG 4096
static long view_rss_kb(void *v)
{
    FILE *f = fopen("/proc/self/smaps", "r");
    char line[256];
    int in = 0;
    long rss = -1;
    while (fgets(line, sizeof line, f)) {
        unsigned long lo, hi;
        if (sscanf(line, "%lx-%lx", &lo, &hi) == 2 && strchr(line, '-') == line + strcspn(line, "-"))
            in = lo == (uintptr_t)v;
        else if (in && sscanf(line, "Rss: %ld kB", &rss) == 1)
            break;
    }
    fclose(f);
    return rss;
}
int main(void)
{
    int mfd = memfd_create("pool", 0);
    ftruncate(mfd, NPG * PS);
    char *v = mmap(0, NPG * PS, PROT_NONE, MAP_SHARED, mfd, 0);
    int u = uffd_new(0, NULL), err;
    uffd_reg(u, v, NPG * PS, UFFDIO_REGISTER_MODE_MISSING, NULL);
    char *src = aligned_alloc(PS, PS);
    memset(src, 3, PS);
    for (int p = 0; p < NPG; p += 2)
        uffd_copy(u, v + p * PS, src, PS, 1, &err);
    printf("published %d pages through the PROT_NONE view: view Rss %ld kB\n", NPG / 2, view_rss_kb(v));
    madvise(v, NPG * PS, MADV_DONTNEED);
    unsigned char mc[NPG];
    mincore(v, NPG * PS, mc);
    int res = 0;
    for (int p = 0; p < NPG; p++)
        res += mc[p] & 1;
    printf("after MADV_DONTNEED of the view: view Rss %ld kB, pool pages still resident %d\n", view_rss_kb(v), res);
    return 0;
}
