/* exp3: PSS of 8 processes that each map one 1 GiB pool MAP_PRIVATE (MINOR + CONTINUE), read
   every page and write 1% of them; side by side with a file mmap'ed MAP_SHARED (np.load
   mmap_mode="r") and MAP_PRIVATE with the same 1% writes (mmap_mode="c").  ./exp3 FILE */
#include "exp.h"
#include <sys/eventfd.h>

#define N (1UL << 30)
#define NP (N / PS)
#define NPROC 8
static int uffd, stopfd;
static char *region;

static void *handler(void *arg)
{
    size_t next = (size_t)-1, cl = 1;
    for (;;) {
        struct pollfd p[2] = {{uffd, POLLIN, 0}, {stopfd, POLLIN, 0}};
        poll(p, 2, -1);
        if (p[1].revents)
            return NULL;
        struct uffd_msg m;
        if (read(uffd, &m, sizeof m) != sizeof m || m.event != UFFD_EVENT_PAGEFAULT)
            continue;
        size_t pg = (m.arg.pagefault.address - (uintptr_t)region) / PS;
        cl = pg == next ? (cl * 2 > 512 ? 512 : cl * 2) : 1;
        if (pg + cl > NP)
            cl = NP - pg;
        next = pg + cl;
        int err;
        uffd_continue(uffd, region + pg * PS, cl * PS, 0, &err);
        if (err && err != -EEXIST)
            fprintf(stderr, "continue: %s\n", strerror(-err));
    }
}

/* kind 0: pool MAP_PRIVATE + MINOR; 1: file MAP_SHARED read only; 2: file MAP_PRIVATE + writes */
static void child(int kind, int fd, int id, int go_fd, int done_fd)
{
    pthread_t t;
    if (kind == 0) {
        region = mmap(0, N, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, fd, 0);
        uffd = uffd_new(UFFD_FEATURE_MINOR_SHMEM, NULL);
        if (uffd_reg(uffd, region, N, UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR, NULL))
            DIE("reg");
        stopfd = eventfd(0, 0);
        pthread_create(&t, 0, handler, 0);
    } else {
        region = mmap(0, N, kind == 1 ? PROT_READ : PROT_READ | PROT_WRITE,
                      kind == 1 ? MAP_SHARED : MAP_PRIVATE, fd, 0);
    }
    double t0 = now();
    uint64_t s = 0;
    for (size_t p = 0; p < NP; p++)
        s += ((volatile uint64_t *)(region + p * PS))[0];
    double dt = now() - t0;
    if (kind != 1)
        for (size_t p = id; p < NP; p += 100)
            region[p * PS + 8] ^= 1;   /* 1% of the pages, different in each process */
    uint64_t one = 1;
    write(done_fd, &dt, sizeof dt);
    read(go_fd, &one, 8);   /* parent measured PSS; exit */
    _exit(s == 42);
}

int main(int argc, char **argv)
{
    int ffd = open(argv[1], O_RDONLY);
    int mfd = memfd_create("pool", 0);
    ftruncate(mfd, N);
    char *buf = malloc(1 << 21);
    double t0 = now();
    for (size_t o = 0; o < N; o += 1 << 21) {
        pread(ffd, buf, 1 << 21, o);
        pwrite(mfd, buf, 1 << 21, o);
    }
    printf("pool filled (pread + pwrite 2 MiB chunks): %.0f ms\n", (now() - t0) * 1e3);
    const char *kn[] = {"pool MAP_PRIVATE, MINOR+CONTINUE, 1% writes", "file MAP_SHARED (mmap_mode=r), reads",
                        "file MAP_PRIVATE (mmap_mode=c), 1% writes"};
    for (int kind = 0; kind < 3; kind++) {
        int go[2], done[2];
        pipe(go);
        pipe(done);
        pid_t pids[NPROC];
        for (int i = 0; i < NPROC; i++) {
            if ((pids[i] = fork()) == 0)
                child(kind, kind ? ffd : mfd, i, go[0], done[1]);
        }
        double tsum = 0, tmax = 0;
        for (int i = 0; i < NPROC; i++) {
            double dt;
            read(done[0], &dt, sizeof dt);
            tsum += dt;
            if (dt > tmax)
                tmax = dt;
        }
        long tot = 0;
        for (int i = 0; i < NPROC; i++)
            tot += pss_kb(pids[i]);
        printf("%-48s total PSS of %d: %6.0f MiB (read pass: mean %.0f ms, max %.0f ms per process)\n", kn[kind],
               NPROC, tot / 1024.0, tsum / NPROC * 1e3, tmax * 1e3);
        for (int i = 0; i < NPROC; i++) {
            uint64_t one = 1;
            write(go[1], &one, 8);
        }
        for (int i = 0; i < NPROC; i++)
            waitpid(pids[i], 0, 0);
    }
    return 0;
}
