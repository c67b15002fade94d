/* exp5: filling a 1 GiB pool; fallocate's effect on MINOR/COPY; a pool larger than RAM. */
#include "exp.h"

#define N (1UL << 30)

static double fill(int how, size_t chunk, char *src)
{
    int mfd = memfd_create("pool", 0);
    ftruncate(mfd, N);
    char *v = NULL;
    int u = -1;
    if (how == 1 || how == 4) {
        v = how == 1 ? mmap(0, N, PROT_NONE, MAP_SHARED | MAP_NORESERVE, mfd, 0)
                     : mmap(0, N, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (how == 4)
            madvise(v, N, MADV_NOHUGEPAGE);
        u = uffd_new(0, NULL);
        if (uffd_reg(u, v, N, UFFDIO_REGISTER_MODE_MISSING, NULL))
            DIE("reg");
    } else if (how == 2) {
        v = mmap(0, N, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    }
    double t0 = now();
    for (size_t o = 0; o < N; o += chunk) {
        int err;
        if (how == 0)
            pwrite(mfd, src, chunk, o);
        else if (how == 2)
            memcpy(v + o, src, chunk);
        else
            uffd_copy(u, v + o, src, chunk, 1, &err);
    }
    double dt = now() - t0;
    if (v)
        munmap(v, N);
    if (u >= 0)
        close(u);
    close(mfd);
    return dt;
}

int main(void)
{
    char *src = aligned_alloc(PS, 2 << 20);
    for (size_t i = 0; i < (2 << 20); i++)
        src[i] = rand();
    const char *names[] = {"pwrite 2 MiB chunks into the memfd", "UFFDIO_COPY 2 MiB into a PROT_NONE MAP_SHARED view",
                           "memcpy into a MAP_SHARED RW mapping (kernel allocates)", "UFFDIO_COPY 64 KiB into the view",
                           "(ref) UFFDIO_COPY 2 MiB into private anonymous memory"};
    for (int rep = 0; rep < 3; rep++)
        for (int how = 0; how < 5; how++) {
            double dt = how == 3 ? fill(1, 64 << 10, src) : fill(how, 2 << 20, src);
            printf("rep %d  fill 1 GiB: %-56s %6.0f ms  %.2f GB/s\n", rep, names[how], dt * 1e3, N / dt / 1e9);
        }

    /* fallocate: a preallocated page counts as present for MINOR/CONTINUE and refuses COPY */
    int mfd = memfd_create("pool", 0);
    ftruncate(mfd, 4 * PS);
    fallocate(mfd, 0, 0, PS);
    char *reg = mmap(0, 4 * PS, PROT_READ | PROT_WRITE, MAP_PRIVATE, mfd, 0);
    char *view = mmap(0, 4 * PS, PROT_NONE, MAP_SHARED, mfd, 0);
    int u = uffd_new(UFFD_FEATURE_MINOR_SHMEM, NULL), err;
    uffd_reg(u, reg, 4 * PS, UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR, NULL);
    uffd_reg(u, view, 4 * PS, UFFDIO_REGISTER_MODE_MISSING, NULL);
    uffd_copy(u, view, src, PS, 1, &err);
    printf("fallocated pool page: UFFDIO_COPY into it: %s; ", err ? strerror(-err) : "ok");
    uffd_continue(u, reg, PS, 1, &err);
    printf("CONTINUE of it: %s, region reads %d (zeros served as data)\n", err ? strerror(-err) : "ok", reg[0]);

    /* a pool larger than RAM (24 GiB here): 64 GiB */
    size_t big = 64UL << 30;
    int bfd = memfd_create("big", 0);
    printf("memfd ftruncate 64 GiB: %s\n", ftruncate(bfd, big) ? strerror(errno) : "ok");
    char *p1 = mmap(0, big, PROT_READ | PROT_WRITE, MAP_PRIVATE, bfd, 0);
    printf("MAP_PRIVATE RW 64 GiB without MAP_NORESERVE (overcommit heuristic): %s\n",
           p1 == MAP_FAILED ? strerror(errno) : "ok");
    char *p2 = mmap(0, big, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, bfd, 0);
    char *p3 = mmap(0, big, PROT_NONE, MAP_SHARED | MAP_NORESERVE, bfd, 0);
    printf("MAP_PRIVATE|MAP_NORESERVE 64 GiB: %s; MAP_SHARED view 64 GiB: %s\n",
           p2 == MAP_FAILED ? strerror(errno) : "ok", p3 == MAP_FAILED ? strerror(errno) : "ok");
    char *p4 = mmap(0, big, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    printf("(ref) anonymous 64 GiB without MAP_NORESERVE: %s\n", p4 == MAP_FAILED ? strerror(errno) : "ok");
    return 0;
}
