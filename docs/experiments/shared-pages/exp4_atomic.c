/* exp4: can another process ever see a half-filled pool page?
   copy:   a filler process fills a 256 MiB pool with UFFDIO_COPY through its MAP_SHARED view and is
           SIGKILLed at a random moment; an observer process checks every page that has become
           resident (mincore) while it runs and after the kill.
   pwrite: the same with pwrite() into the memfd, while a thread in the filler keeps dropping the
           source buffer's pages (MADV_DONTNEED of a MAP_PRIVATE file mapping: a short copy). */
#include "exp.h"

#define NPG 65536UL
#define RUN 64

static void pattern(uint64_t *w, size_t pg)
{
    for (size_t k = 0; k < PS / 8; k++)
        w[k] = pg * 1000003ULL + k + 1;
}
/* 0 = complete, 1 = all zero, 2 = torn */
static int check(const uint64_t *w, size_t pg)
{
    size_t ok = 0, zero = 0;
    for (size_t k = 0; k < PS / 8; k++) {
        ok += w[k] == pg * 1000003ULL + k + 1;
        zero += w[k] == 0;
    }
    return ok == PS / 8 ? 0 : zero == PS / 8 ? 1 : 2;
}

static volatile int stop_racer;
static char *srcmap;
static void *racer(void *a)
{
    while (!stop_racer)
        madvise(srcmap, RUN * PS, MADV_DONTNEED);
    return NULL;
}

static void filler(int mfd, int use_pwrite, int srcfd)
{
    uint64_t *src = aligned_alloc(PS, RUN * PS);
    char *view = NULL;
    int u = -1;
    if (!use_pwrite) {
        view = mmap(0, NPG * PS, PROT_NONE, MAP_SHARED, mfd, 0);
        u = uffd_new(0, NULL);
        if (uffd_reg(u, view, NPG * PS, UFFDIO_REGISTER_MODE_MISSING, NULL))
            DIE("reg view");
    } else {
        srcmap = mmap(0, NPG * PS, PROT_READ, MAP_PRIVATE, srcfd, 0); /* the pattern, from a file */
        pthread_t t;
        pthread_create(&t, 0, racer, 0);
    }
    for (size_t first = 0; first < NPG; first += RUN) {
        if (!use_pwrite) {
            for (size_t i = 0; i < RUN; i++)
                pattern(src + i * PS / 8, first + i);
            int err;
            uffd_copy(u, view + first * PS, src, RUN * PS, 1, &err);
        } else {
            /* srcmap is the whole pattern file: the source for `first` is at the same offset */
            pwrite(mfd, srcmap + first * PS, RUN * PS, first * PS);
        }
    }
    stop_racer = 1;
    _exit(0);
}

int main(int argc, char **argv)
{
    int use_pwrite = argc > 1 && !strcmp(argv[1], "pwrite");
    int rounds = argc > 2 ? atoi(argv[2]) : 20;
    int srcfd = -1;
    if (use_pwrite) {   /* a file holding the pattern of every page */
        srcfd = open("/tmp/design11_pattern.bin", O_RDWR | O_CREAT | O_TRUNC, 0600);
        uint64_t *b = aligned_alloc(PS, PS);
        for (size_t p = 0; p < NPG; p++) {
            pattern(b, p);
            pwrite(srcfd, b, PS, p * PS);
        }
    }
    uint64_t *buf = aligned_alloc(PS, PS);
    long torn = 0, zero = 0, checked = 0;
    srand(getpid());
    for (int r = 0; r < rounds; r++) {
        int mfd = memfd_create("pool", 0);
        ftruncate(mfd, NPG * PS);
        char *obs = mmap(0, NPG * PS, PROT_NONE, MAP_SHARED, mfd, 0);
        unsigned char *mc = malloc(NPG), *seen = calloc(NPG, 1);
        pid_t f = fork();
        if (f == 0)
            filler(mfd, use_pwrite, srcfd);
        useconds_t kill_at = use_pwrite ? 100000 + rand() % 1500000 : 20000 + rand() % 150000;
        double t0 = now();
        int killed = 0, alive = 1;
        while (alive) {
            if (!killed && (now() - t0) * 1e6 > kill_at) {
                kill(f, SIGKILL);
                killed = 1;
            }
            if (waitpid(f, 0, WNOHANG) == f)
                alive = 0;
            mincore(obs, NPG * PS, mc);
            for (size_t p = 0; p < NPG; p++) {
                if (!(mc[p] & 1) || seen[p] == 2)
                    continue;
                pread(mfd, buf, PS, p * PS);
                int c = check(buf, p);
                checked++;
                if (c == 0)
                    seen[p] = 2;
                else if (c == 1 && !seen[p])
                    zero++, seen[p] = 1;
                else if (c == 2)
                    torn++;
            }
        }
        /* after the filler died: every resident page must be complete */
        size_t resident = 0, bad = 0;
        mincore(obs, NPG * PS, mc);
        for (size_t p = 0; p < NPG; p++)
            if (mc[p] & 1) {
                resident++;
                pread(mfd, buf, PS, p * PS);
                bad += check(buf, p) != 0;
            }
        printf("round %2d (%s%s): resident after death %6zu pages, incomplete among them %zu\n", r,
               use_pwrite ? "pwrite" : "UFFDIO_COPY", killed ? ", SIGKILLed" : ", finished", resident, bad);
        munmap(obs, NPG * PS);
        close(mfd);
        free(mc);
        free(seen);
    }
    printf("observer: %ld page checks while filling; seen all-zero (then later filled or not) %ld, torn %ld\n",
           checked, zero, torn);
    if (use_pwrite)
        unlink("/tmp/design11_pattern.bin");
    return 0;
}
