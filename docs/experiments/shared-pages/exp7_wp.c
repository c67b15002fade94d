/* exp7: the working-set write tracker (async write-protect + PAGEMAP_SCAN) on a shared restore:
   region = MAP_PRIVATE memfd registered MISSING|MINOR|WP with UFFD_FEATURE_WP_ASYNC. */
#include "exp.h"

#define NPG 8
static int u;
static char *reg;
static volatile uint64_t flags_seen[NPG];

static void *handler(void *a)
{
    for (;;) {
        struct pollfd p = {u, POLLIN, 0};
        poll(&p, 1, -1);
        struct uffd_msg m;
        if (read(u, &m, sizeof m) != sizeof m || m.event != UFFD_EVENT_PAGEFAULT)
            continue;
        size_t pg = (m.arg.pagefault.address - (uintptr_t)reg) / PS;
        flags_seen[pg] = m.arg.pagefault.flags | 0x100;
        int err;
        uffd_continue(u, reg + pg * PS, PS, 0, &err);
        if (err)
            printf("continue %zu: %s\n", pg, strerror(-err));
    }
}

static void scan(int pm, uint64_t flags, uint64_t req, const char *what)
{
    struct pm_page_region v[16];
    struct pm_scan_arg s = {.size = sizeof s, .flags = flags, .start = (uintptr_t)reg,
                            .end = (uintptr_t)reg + NPG * PS, .vec = (uintptr_t)v, .vec_len = 16,
                            .category_mask = req, .return_mask = PAGE_IS_WRITTEN | PAGE_IS_FILE | PAGE_IS_PRESENT | PAGE_IS_PFNZERO};
    long k = ioctl(pm, PAGEMAP_SCAN_IOC, &s);
    printf("  %s: %ld", what, k);
    if (k < 0)
        printf(" (%s)", strerror(errno));
    for (long i = 0; i < k; i++)
        printf(" [pg %lu-%lu cat 0x%llx]", (v[i].start - (uintptr_t)reg) / PS, (v[i].end - (uintptr_t)reg) / PS - 1,
               (unsigned long long)v[i].categories);
    printf("\n");
}

int main(void)
{
    int pm = open("/proc/self/pagemap", O_RDONLY);
    int mfd = memfd_create("pool", 0);
    ftruncate(mfd, NPG * PS);
    char b[PS];
    for (int p = 0; p < NPG; p++) {
        memset(b, 'a' + p, PS);
        pwrite(mfd, b, PS, p * PS);
    }
    u = uffd_new(UFFD_FEATURE_MINOR_SHMEM | UFFD_FEATURE_WP_HUGETLBFS_SHMEM | (1ULL << 15) |
                 (1ULL << 13), NULL);
    reg = mmap(0, NPG * PS, PROT_READ | PROT_WRITE, MAP_PRIVATE, mfd, 0);
    int rc = uffd_reg(u, reg, NPG * PS, UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR | UFFDIO_REGISTER_MODE_WP, NULL);
    printf("register MISSING|MINOR|WP with WP_ASYNC: %s\n", rc ? strerror(-rc) : "ok");
    pthread_t t;
    pthread_create(&t, 0, handler, 0);
    volatile char c;
    for (int p = 0; p < 4; p++)
        c = reg[p * PS];          /* MINOR + CONTINUE */
    reg[1 * PS] = 'X';            /* COW before the window */
    printf("before mark: faults seen flags: ");
    for (int p = 0; p < NPG; p++)
        printf("%llx ", (unsigned long long)flags_seen[p]);
    printf("\n");
    scan(pm, 0, 0, "categories before mark");
    /* mark_working_set(): write-protect everything (WP_MATCHING over pages in any state) */
    scan(pm, 1 /* PM_SCAN_WP_MATCHING */ | 2 /* CHECK_WPASYNC */, PAGE_IS_WRITTEN, "WP_MATCHING (was written)");
    reg[1 * PS + 1] = 'Y';        /* already private, written again */
    reg[2 * PS] = 'Z';            /* shared page written: COW under WP */
    c = reg[5 * PS];              /* untouched page read: MINOR fault must still reach us */
    reg[6 * PS] = 'W';            /* untouched page written */
    printf("after mark: page 5 fault flags %llx, page 6 %llx (0x4 = MINOR, 0x1 = WRITE)\n",
           (unsigned long long)flags_seen[5], (unsigned long long)flags_seen[6]);
    scan(pm, 0, PAGE_IS_WRITTEN, "written since mark");
    scan(pm, 0, 0, "categories now");
    char pc;
    pread(mfd, &pc, 1, 2 * PS);
    printf("pool page 2 still '%c'; region page 2 '%c'\n", pc, reg[2 * PS]);
    return 0;
}
