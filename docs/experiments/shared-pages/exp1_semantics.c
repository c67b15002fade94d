/* exp1: what the kernel allows for a restored region that is a MAP_PRIVATE mapping of a pool
   memfd, and for the per-process MAP_SHARED "view" of the pool used to fill it. Prints facts. */
#include "exp.h"

static int pm_fd;
static uint64_t pagemap(void *a)
{
    uint64_t e = 0;
    pread(pm_fd, &e, 8, ((uintptr_t)a / PS) * 8);
    return e;
}
static void scan(const char *what, char *a, size_t n)
{
    struct pm_page_region v[16];
    struct pm_scan_arg s = {.size = sizeof s, .start = (uintptr_t)a, .end = (uintptr_t)a + n * PS,
                            .vec = (uintptr_t)v, .vec_len = 16,
                            .category_anyof_mask = PAGE_IS_PRESENT | PAGE_IS_FILE | PAGE_IS_PFNZERO |
                                                   PAGE_IS_SWAPPED,
                            .return_mask = PAGE_IS_PRESENT | PAGE_IS_FILE | PAGE_IS_PFNZERO |
                                           PAGE_IS_WRITTEN | PAGE_IS_WPALLOWED};
    long k = ioctl(pm_fd, PAGEMAP_SCAN_IOC, &s);
    printf("  PAGEMAP_SCAN %s: %ld regions:", what, k);
    for (long i = 0; i < k; i++)
        printf(" [pg %lu-%lu cat 0x%llx]", (v[i].start - (uintptr_t)a) / PS,
               (v[i].end - (uintptr_t)a) / PS - 1, (unsigned long long)v[i].categories);
    printf("\n");
}

int main(void)
{
    pm_fd = open("/proc/self/pagemap", O_RDONLY);
    uint64_t feats;
    int u0 = uffd_new(0, &feats);
    close(u0);
    printf("kernel UFFDIO_API features: 0x%llx  MINOR_SHMEM=%d MISSING_SHMEM=%d WP_HUGETLBFS_SHMEM=%d "
           "WP_ASYNC=%d POISON=%d MOVE=%d\n", (unsigned long long)feats,
           !!(feats & UFFD_FEATURE_MINOR_SHMEM), !!(feats & UFFD_FEATURE_MISSING_SHMEM),
           !!(feats & UFFD_FEATURE_WP_HUGETLBFS_SHMEM), !!(feats & (1ULL << 15)),
           !!(feats & (1ULL << 14)), !!(feats & (1ULL << 16)));

    size_t n = 16;
    int mfd = memfd_create("pool", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    ftruncate(mfd, n * PS);
    char src[PS];

    /* A: region = MAP_PRIVATE of pool, MISSING|MINOR, with only MINOR_SHMEM requested */
    int u = uffd_new(UFFD_FEATURE_MINOR_SHMEM, NULL);
    char *reg = mmap(0, n * PS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, mfd, 0);
    uint64_t io;
    int rc = uffd_reg(u, reg, n * PS, UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR, &io);
    printf("A register MISSING|MINOR on MAP_PRIVATE memfd (features=MINOR_SHMEM only): %s ioctls=0x%llx "
           "(COPY %d ZEROPAGE %d CONTINUE %d POISON %d WP %d)\n", rc ? strerror(-rc) : "ok",
           (unsigned long long)io, !!(io & (1 << _UFFDIO_COPY)), !!(io & (1 << _UFFDIO_ZEROPAGE)),
           !!(io & (1 << _UFFDIO_CONTINUE)), !!(io & (1ULL << 8)), !!(io & (1 << _UFFDIO_WRITEPROTECT)));

    /* B: with WP too (needs WP_HUGETLBFS_SHMEM + WP_ASYNC for the working-set tracker) */
    int uw = uffd_new(UFFD_FEATURE_MINOR_SHMEM | UFFD_FEATURE_WP_HUGETLBFS_SHMEM | (1ULL << 15), NULL);
    char *reg2 = mmap(0, n * PS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, mfd, 0);
    rc = uffd_reg(uw, reg2, n * PS,
                  UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR | UFFDIO_REGISTER_MODE_WP, &io);
    printf("B register MISSING|MINOR|WP (WP_HUGETLBFS_SHMEM|WP_ASYNC) on MAP_PRIVATE memfd: %s\n",
           rc ? strerror(-rc) : "ok");

    /* C: the pool view, MAP_SHARED, registered MISSING, filled with UFFDIO_COPY */
    const char *protn[] = {"PROT_NONE", "PROT_READ", "PROT_READ|WRITE"};
    int prots[] = {PROT_NONE, PROT_READ, PROT_READ | PROT_WRITE};
    char *view = NULL;
    for (int k = 0; k < 3; k++) {
        char *v = mmap(0, n * PS, prots[k], MAP_SHARED | MAP_NORESERVE, mfd, 0);
        rc = uffd_reg(u, v, n * PS, UFFDIO_REGISTER_MODE_MISSING, &io);
        int err = 0;
        memset(src, 'A' + k, PS);
        long done = rc ? 0 : uffd_copy(u, v + k * PS, src, PS, 1, &err);
        printf("C view MAP_SHARED %-15s register MISSING: %-22s COPY into it: %s (copied %ld)\n", protn[k],
               rc ? strerror(-rc) : "ok", rc ? "-" : err ? strerror(-err) : "ok", done);
        if (k == 0 && !rc && !err)
            view = v;
    }
    /* page 3..15: fill via the view (if PROT_NONE worked) or pwrite */
    for (size_t p = 3; p < n; p++) {
        memset(src, 'a' + p, PS);
        int err;
        if (p == 5 || p == 9)
            continue; /* holes: 5 = snapshot page not filled yet, 9 = zero page */
        uffd_copy(u, view + p * PS, src, PS, 1, &err);
        if (err)
            printf("  fill page %zu: %s\n", p, strerror(-err));
    }
    off_t hole = lseek(mfd, 0, SEEK_HOLE), data = lseek(mfd, 6 * PS, SEEK_DATA);
    printf("  pool holes visible to SEEK_HOLE/SEEK_DATA: first hole at page %ld, data after 5 at page %ld\n",
           (long)hole / (long)PS, (long)data / (long)PS);
    unsigned char mc[16];
    mincore(view, n * PS, mc);
    printf("  mincore(view, PROT_NONE): ");
    for (size_t p = 0; p < n; p++)
        printf("%d", mc[p] & 1);
    printf("\n");

    /* D: CONTINUE a range with a hole at page 5 */
    int err;
    long m = uffd_continue(u, reg + 3 * PS, 4 * PS, 1, &err);
    printf("D CONTINUE pages 3..6 (hole at 5): rc=%s mapped=%ld\n", err ? strerror(-err) : "ok", m);
    m = uffd_continue(u, reg + 5 * PS, PS, 1, &err);
    printf("  CONTINUE of the hole alone: rc=%s mapped=%ld\n", err ? strerror(-err) : "ok", m);
    m = uffd_continue(u, reg + 3 * PS, PS, 1, &err);
    printf("  CONTINUE of an already-mapped page: rc=%s mapped=%ld\n", err ? strerror(-err) : "ok", m);

    /* E: ZEROPAGE and a private COPY on the private shmem mapping */
    m = uffd_zeropage(u, reg + 9 * PS, PS, &err);
    printf("E ZEROPAGE on MAP_PRIVATE memfd (hole): rc=%s\n", err ? strerror(-err) : "ok");
    memset(src, 'P', PS);
    m = uffd_copy(u, reg + 10 * PS, src, PS, 1, &err);
    printf("  COPY (private) on MAP_PRIVATE memfd page 10 whose pool page exists: rc=%s -> reads '%c', "
           "pool page stays '%c'\n", err ? strerror(-err) : "ok", reg[10 * PS], ({ char c; pread(mfd, &c, 1, 10 * PS); c; }));
    uffd_continue(u, reg + 11 * PS, 2 * PS, 1, &err);
    reg[12 * PS] = 'W'; /* COW */
    char pc;
    pread(mfd, &pc, 1, 12 * PS);
    printf("  page 12 after CONTINUE + store: region '%c', pool '%c' (COW)\n", reg[12 * PS], pc);

    /* F: pagemap / PAGEMAP_SCAN: 3,4 = CONTINUE (shared), 9 = zero page, 10 = private COPY,
       11 = CONTINUE, 12 = COWed, others none */
    printf("F /proc/self/pagemap (bit63 present, bit61 file/shared-anon, bit56 exclusive):\n");
    int idx[] = {3, 4, 9, 10, 11, 12, 13};
    const char *what[] = {"CONTINUE", "CONTINUE", "ZEROPAGE", "private COPY", "CONTINUE", "COWed", "none"};
    for (int k = 0; k < 7; k++) {
        uint64_t e = pagemap(reg + idx[k] * PS);
        printf("  page %2d %-12s present=%d file=%d exclusive=%d\n", idx[k], what[k], (int)(e >> 63 & 1),
               (int)(e >> 61 & 1), (int)(e >> 56 & 1));
    }
    scan("region", reg, n);

    /* G: seals. SHRINK|GROW: truncation refused; FUTURE_WRITE: can a new view still register? */
    rc = fcntl(mfd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW);
    printf("G seal SHRINK|GROW: %s; ftruncate(0) then: %s\n", rc ? strerror(errno) : "ok",
           ftruncate(mfd, 0) ? strerror(errno) : "ok (!)");
    rc = fcntl(mfd, F_ADD_SEALS, F_SEAL_FUTURE_WRITE);
    char *v2 = mmap(0, n * PS, PROT_READ, MAP_SHARED, mfd, 0);
    int r2 = uffd_reg(u, v2, n * PS, UFFDIO_REGISTER_MODE_MISSING, NULL);
    printf("  seal FUTURE_WRITE: %s; new MAP_SHARED PROT_READ view registers MISSING: %s; existing view COPY "
           "into hole 5: ", rc ? strerror(errno) : "ok", r2 ? strerror(-r2) : "ok");
    memset(src, 'f', PS);
    uffd_copy(u, view + 5 * PS, src, PS, 1, &err);
    printf("%s\n", err ? strerror(-err) : "ok");
    char *v3 = mmap(0, n * PS, PROT_READ | PROT_WRITE, MAP_PRIVATE, mfd, 0);
    r2 = uffd_reg(u, v3, n * PS, UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR, NULL);
    printf("  after FUTURE_WRITE, new MAP_PRIVATE region mapping registers MISSING|MINOR: %s\n",
           r2 ? strerror(-r2) : "ok");

    /* H: a read-only fd (as a server would hand out): MAP_PRIVATE + MINOR ok? */
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", mfd);
    int ro = open(path, O_RDONLY);
    char *v4 = mmap(0, n * PS, PROT_READ | PROT_WRITE, MAP_PRIVATE, ro, 0);
    r2 = uffd_reg(u, v4, n * PS, UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR, NULL);
    m = r2 ? 0 : uffd_continue(u, v4 + 3 * PS, PS, 1, &err);
    printf("H O_RDONLY reopen of the memfd: MAP_PRIVATE RW mmap %s, register MISSING|MINOR %s, CONTINUE %s, "
           "store -> COW %s\n", v4 == MAP_FAILED ? strerror(errno) : "ok", r2 ? strerror(-r2) : "ok",
           err ? strerror(-err) : "ok", (v4[3 * PS] = 'q', v4[3 * PS] == 'q') ? "ok" : "?");
    char *v5 = mmap(0, n * PS, PROT_READ, MAP_SHARED, ro, 0);
    r2 = v5 == MAP_FAILED ? -errno : uffd_reg(u, v5, n * PS, UFFDIO_REGISTER_MODE_MISSING, NULL);
    printf("  O_RDONLY fd: MAP_SHARED view registers MISSING (could fill the pool): %s\n", r2 ? strerror(-r2) : "ok (!)");

    /* I: MADV_DONTNEED on the private mapping: COWed page reverts to the pool's contents */
    madvise(reg + 12 * PS, PS, MADV_DONTNEED);
    uffd_continue(u, reg + 12 * PS, PS, 1, &err);
    printf("I after MADV_DONTNEED of COWed page 12 + CONTINUE: reads '%c' (pool '%c')\n", reg[12 * PS], pc);

    /* J: POISON on the private shmem mapping */
    struct { struct uffdio_range range; uint64_t mode; int64_t updated; } po = {{(uintptr_t)(reg + 13 * PS), PS}, 0, 0};
    rc = ioctl(u, _IOWR(UFFDIO, 0x08, po), &po);
    printf("J POISON on MAP_PRIVATE memfd page: %s\n", rc ? strerror(errno) : "ok");
    return 0;
}
