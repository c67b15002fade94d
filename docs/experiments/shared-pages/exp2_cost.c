/* exp2: cost of serving a page of a shared pool vs copying it.
   ./exp2 FILE (1 GiB, warm).  Faulter and handler pinned to CPU 0 (the design's placement). */
#include "exp.h"
#include <sys/eventfd.h>

#define N (1UL << 30)
#define NP (N / PS)
#define MAXC 512

enum { ANON_COPY, MINOR_CONT, MISSING_FILL, KERNEL_SHMEM, FILE_MMAP };
static const char *names[] = {"anon MISSING + pread + COPY (private restore today)",
                              "memfd MAP_PRIVATE, MINOR + CONTINUE (pool filled)",
                              "memfd MAP_PRIVATE, MISSING -> pread + COPY to view + CONTINUE (first user)",
                              "memfd MAP_PRIVATE, no uffd (kernel fault-around)",
                              "file mmap MAP_SHARED (np.load mmap_mode=r)"};
static int mode, uffd, filefd, stopfd;
static char *region, *view;
static char *scratch;
static volatile int adaptive;
static uint64_t nfaults;

static void *handler(void *arg)
{
    pin(0);
    size_t next = (size_t)-1, cl = 1;
    for (;;) {
        struct pollfd p[2] = {{uffd, POLLIN, 0}, {stopfd, POLLIN, 0}};
        poll(p, 2, -1);
        if (p[1].revents)
            return NULL;
        struct uffd_msg m;
        if (read(uffd, &m, sizeof m) != sizeof m)
            continue;
        if (m.event != UFFD_EVENT_PAGEFAULT)
            continue;
        nfaults++;
        size_t pg = (m.arg.pagefault.address - (uintptr_t)region) / PS;
        if (adaptive) {
            cl = (pg == next) ? (cl * 2 > MAXC ? MAXC : cl * 2) : 1;
        } else
            cl = 1;
        if (pg + cl > NP)
            cl = NP - pg;
        next = pg + cl;
        char *dst = region + pg * PS;
        int err;
        if (mode == ANON_COPY) {
            pread(filefd, scratch, cl * PS, pg * PS);
            uffd_copy(uffd, dst, scratch, cl * PS, 0, &err);
        } else if (mode == MINOR_CONT) {
            uffd_continue(uffd, dst, cl * PS, 0, &err);
        } else {
            pread(filefd, scratch, cl * PS, pg * PS);
            uffd_copy(uffd, view + pg * PS, scratch, cl * PS, 1, &err);
            uffd_continue(uffd, dst, cl * PS, 0, &err);
        }
        if (err && err != -EEXIST)
            fprintf(stderr, "fill err %s at %zu\n", strerror(-err), pg);
    }
}

static size_t *rnd;
static void run(int md, const char *file, int seq, int nrand)
{
    mode = md;
    filefd = open(file, O_RDONLY);
    int mfd = -1;
    pthread_t t;
    if (md == FILE_MMAP) {
        region = mmap(0, N, PROT_READ, MAP_SHARED, filefd, 0);
    } else if (md == ANON_COPY) {
        region = mmap(0, N, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        madvise(region, N, MADV_NOHUGEPAGE);
    } else {
        mfd = memfd_create("pool", MFD_CLOEXEC);
        ftruncate(mfd, N);
        if (md != MISSING_FILL) {  /* pool already filled (by "another process") */
            for (size_t o = 0; o < N; o += 1 << 21) {
                pread(filefd, scratch, 1 << 21, o);
                pwrite(mfd, scratch, 1 << 21, o);
            }
        }
        region = mmap(0, N, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, mfd, 0);
        view = mmap(0, N, PROT_NONE, MAP_SHARED | MAP_NORESERVE, mfd, 0);
    }
    if (md <= MISSING_FILL) {
        uffd = uffd_new(md == ANON_COPY ? 0 : UFFD_FEATURE_MINOR_SHMEM, NULL);
        uint64_t modes = md == ANON_COPY ? UFFDIO_REGISTER_MODE_MISSING
                                         : UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR;
        if (uffd_reg(uffd, region, N, modes, NULL))
            DIE("reg");
        if (md == MISSING_FILL && uffd_reg(uffd, view, N, UFFDIO_REGISTER_MODE_MISSING, NULL))
            DIE("reg view");
        stopfd = eventfd(0, 0);
        adaptive = seq;
        nfaults = 0;
        pthread_create(&t, 0, handler, 0);
    }
    pin(0);
    volatile char s = 0;
    double t0 = now();
    if (seq) {
        for (size_t p = 0; p < NP; p++)
            s += region[p * PS];
    } else {
        for (int i = 0; i < nrand; i++)
            s += region[rnd[i] * PS];
    }
    double dt = now() - t0;
    if (seq)
        printf("  seq 1 GiB   %-78s %6.0f ms  %5.2f GB/s  faults %lu\n", names[md], dt * 1e3, N / dt / 1e9,
               (unsigned long)nfaults);
    else
        printf("  random 4K   %-78s %6.2f us/page (faults %lu)\n", names[md], dt / nrand * 1e6,
               (unsigned long)nfaults);
    if (md <= MISSING_FILL) {
        uint64_t one = 1;
        write(stopfd, &one, 8);
        pthread_join(t, 0);
        close(uffd);
        close(stopfd);
    }
    munmap(region, N);
    if (view)
        munmap(view, N), view = NULL;
    if (mfd >= 0)
        close(mfd);
    close(filefd);
}

#include <sys/eventfd.h>
int main(int argc, char **argv)
{
    scratch = aligned_alloc(PS, MAXC * PS);
    memset(scratch, 1, MAXC * PS);
    int nrand = 8192;
    rnd = malloc(nrand * sizeof *rnd);
    uint64_t x = 7;
    for (int i = 0; i < nrand; i++) {
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        rnd[i] = (x >> 20) % NP;
    }
    for (int rep = 0; rep < 3; rep++) {
        printf("rep %d\n", rep);
        for (int md = 0; md <= FILE_MMAP; md++)
            run(md, argv[1], 0, nrand);
        for (int md = 0; md <= FILE_MMAP; md++)
            run(md, argv[1], 1, 0);
    }
    return 0;
}
