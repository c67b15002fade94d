/*
 * exp04_tracking: what the remap checkpoint does to async dirty tracking (uffd-wp bits).
 *
 * A 64 MiB region on a WP_ASYNC | MOVE | EVENT_REMAP uffd, every page present, marked
 * (PAGEMAP_SCAN WP_MATCHING), then 1000 chosen pages written. Then:
 *   1. mremap(DONTUNMAP) to staging: does staging keep the bits (written = the 1000)?
 *   2. pages brought back with UFFDIO_MOVE: do they keep the bit (unwritten read unwritten)?
 *   3. with UFFDIO_COPY_MODE_WP: unwritten? with plain UFFDIO_COPY: written?
 *   4. a write after (3) to a COPY_MODE_WP page: seen (async fault resolved by the kernel)?
 *   5. the same without EVENT_REMAP: staging unregistered, bits cleared (written = all)?
 * A thread reads the uffd so the REMAP event lets mremap return.
 */
#include "exp.h"

#define LEN (64UL << 20)
#define NP (LEN / PS)
static atomic_int stop;
static void *reader(void *arg)
{
    int fd = *(int *)arg;
    struct uffd_msg m[16];
    while (!atomic_load(&stop)) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, 5) > 0 && read(fd, m, sizeof m) < 0 && errno != EAGAIN)
            DIE("read");
    }
    return NULL;
}

int main(void)
{
    int pm = open("/proc/self/pagemap", O_RDONLY);
    for (int remap_ev = 1; remap_ev >= 0; remap_ev--) {
        char *r = map_aligned(LEN, 2UL << 20, 0);
        fill_pattern(r, LEN, 1);
        int fd = uffd_new(F_WP_ASYNC | F_MOVE | (remap_ev ? UFFD_FEATURE_EVENT_REMAP : 0));
        uffd_reg(fd, r, LEN, UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP);
        pthread_t th;
        atomic_store(&stop, 0);
        pthread_create(&th, NULL, reader, &fd);
        scan_wp(pm, r, LEN);
        for (size_t i = 0; i < 1000; i++)
            r[(i * 13) * PS + 64] = 1;   /* pages 0, 13, 26, ... */
        printf("%s EVENT_REMAP: after mark + 1000 writes: region written %zu\n",
               remap_ev ? "with" : "without", scan_written(pm, r, LEN));
        char *stage = reserve_aligned(LEN, 2UL << 20, 0);
        if (mremap(r, LEN, LEN, MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP, stage) == MAP_FAILED)
            DIE("mremap");
        printf("  1. staging written %zu of %lu (1000 = bits kept)\n", scan_written(pm, stage, LEN), NP);
        /* first third back by MOVE, second by COPY_MODE_WP, last by plain COPY */
        size_t third = (NP / 3) * PS;
        size_t mv = uffd_move(fd, r, stage, third, 0);
        uffd_copy(fd, r + third, stage + third, third, UFFDIO_COPY_MODE_WP);
        uffd_copy(fd, r + 2 * third, stage + 2 * third, LEN - 2 * third, 0);
        size_t w1 = scan_written(pm, r, third), w2 = scan_written(pm, r + third, third),
               w3 = scan_written(pm, r + 2 * third, LEN - 2 * third);
        size_t before[3] = {0, 0, 0};   /* pages written before the pause, per third */
        for (size_t i = 0; i < 1000; i++) {
            size_t t = i * 13 * PS / third;
            before[t > 2 ? 2 : t]++;
        }
        printf("  2. UFFDIO_MOVE (%zu pages moved): written %zu (%zu were written before the pause)\n",
               mv / PS, w1, before[0]);
        printf("  3. COPY_MODE_WP: written %zu (%zu before the pause); plain COPY: written %zu of %lu\n",
               w2, before[1], w3, (LEN - 2 * third) / PS);
        r[third + 5 * PS + 128] = 2;   /* a store to a COPY_MODE_WP page (not word 0) */
        printf("  4. one store to a COPY_MODE_WP page: written %zu (+1 expected)\n",
               scan_written(pm, r + third, third));
        int ok = 1;
        for (size_t p = 0; p < NP; p++)
            if (*(uint64_t *)(r + p * PS) != p * 1000003ULL + 1)
                ok = 0;
        printf("  contents after the round trip: %s\n", ok ? "ok" : "WRONG");
        atomic_store(&stop, 1);
        pthread_join(th, NULL);
        close(fd);
        munmap(r, LEN);
        munmap(stage, LEN);
    }
    return 0;
}
