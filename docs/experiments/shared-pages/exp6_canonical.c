/* exp6: "1 GiB of copies of one 4 KiB template" as one shared memfd chunk mapped MAP_PRIVATE per
   chunk over a region that was registered MISSING: does MAP_FIXED drop the registration, what does
   re-registering MINOR cost per first touch, and the whole against filling 1 GiB eagerly. */
#include "exp.h"
#include <sys/eventfd.h>

#define N (1UL << 30)
#define NP (N / PS)
static int uffd, stopfd;
static char *base;
static volatile long nfaults;
static int copy_mode;
static char tplg[PS];

static void *handler(void *a)
{
    pin(0);
    for (;;) {
        struct pollfd p[2] = {{uffd, POLLIN, 0}, {stopfd, POLLIN, 0}};
        poll(p, 2, -1);
        if (p[1].revents)
            return NULL;
        struct uffd_msg m;
        if (read(uffd, &m, sizeof m) != sizeof m || m.event != UFFD_EVENT_PAGEFAULT)
            continue;
        nfaults++;
        int err;
        uintptr_t a0 = m.arg.pagefault.address & ~(PS - 1);
        if (copy_mode)
            uffd_copy(uffd, (void *)a0, tplg, PS, 0, &err);
        else if (m.arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_MINOR)
            uffd_continue(uffd, (void *)a0, PS, 0, &err);
        else
            uffd_zeropage(uffd, (void *)a0, PS, &err);
    }
}

static long count_vmas(void)
{
    FILE *f = fopen("/proc/self/maps", "r");
    long n = 0;
    int c;
    while ((c = fgetc(f)) != EOF)
        n += c == '\n';
    fclose(f);
    return n;
}

int main(int argc, char **argv)
{
    int reps = argc > 1 ? atoi(argv[1]) : 3;
    char tpl[PS];
    for (int i = 0; i < (int)PS; i++)
        tpl[i] = i * 7 + 1;
    size_t nt = NP / 100, *idx = malloc(nt * sizeof *idx);
    uint64_t x = 3;
    for (size_t i = 0; i < nt; i++) {
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        idx[i] = (x >> 17) % NP;
    }
    pin(0);
    for (int rep = 0; rep < reps; rep++)
        for (size_t chunk = 2UL << 20; chunk <= (2UL << 20); chunk *= 16)
            for (int minor = 0; minor < 3; minor++) {
                base = mmap(0, N, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
                uffd = uffd_new(UFFD_FEATURE_MINOR_SHMEM, NULL);
                uffd_reg(uffd, base, N, UFFDIO_REGISTER_MODE_MISSING, NULL);
                stopfd = eventfd(0, 0);
                nfaults = 0;
                pthread_t t;
                pthread_create(&t, 0, handler, 0);
                long v0 = count_vmas();
                double t0 = now();
                int fd = memfd_create("canon", 0);
                ftruncate(fd, chunk);
                char *w = mmap(0, chunk, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
                for (size_t o = 0; o < chunk; o += PS)
                    memcpy(w + o, tpl, PS);
                munmap(w, chunk);
                copy_mode = minor == 2;
                memcpy(tplg, tpl, PS);
                for (size_t o = 0; o < N && !copy_mode; o += chunk)
                    if (mmap(base + o, chunk, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, fd, 0) == MAP_FAILED)
                        DIE("mmap");
                if (minor == 1 && uffd_reg(uffd, base, N, UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR, NULL))
                    DIE("re-register");
                madvise(base, N, MADV_DONTFORK);
                double t1 = now();
                volatile long s = 0;
                for (size_t i = 0; i < nt; i++)
                    s += ((volatile char *)base)[idx[i] * PS + 7];
                if (s != 131050) printf("bad sum %ld\n", (long)s);
                double t2 = now();
                for (size_t i = 0; i < nt; i += 10)
                    base[idx[i] * PS + 9] = 1;
                double t3 = now();
                long vmas = count_vmas() - v0;
                printf("rep %d chunk %2zu MiB %-22s: map %.2f ms (+%ld VMAs), 1%% random reads %.2f ms "
                       "(%.2f us/page, faults to us %ld), 0.1%% writes %.2f ms\n",
                       rep, chunk >> 20, minor == 2 ? "today: MISSING + COPY" : minor ? "re-registered MINOR" : "unregistered (kernel)", (t1 - t0) * 1e3,
                       vmas, (t2 - t1) * 1e3, (t2 - t1) / nt * 1e6, nfaults, (t3 - t2) * 1e3);
                uint64_t one = 1;
                write(stopfd, &one, 8);
                pthread_join(t, 0);
                munmap(base, N);
                close(uffd);
                close(fd);
                close(stopfd);
            }
    /* the eager baseline, numpy-like: fill 1 GiB (THP) then the same reads */
    for (int rep = 0; rep < reps; rep++) {
        double t0 = now();
        char *e = mmap(0, N, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        madvise(e, N, MADV_HUGEPAGE);
        for (size_t o = 0; o < N; o += PS)
            memcpy(e + o, tpl, PS);
        volatile long s = 0;
        for (size_t i = 0; i < nt; i++)
            s += ((volatile char *)e)[idx[i] * PS + 7];
        printf("rep %d eager fill 1 GiB (THP) + 1%% reads: %.0f ms (%ld)\n", rep, (now() - t0) * 1e3, (long)s);
        munmap(e, N);
    }
    return 0;
}
