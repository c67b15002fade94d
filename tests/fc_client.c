/* fc_client: a stand-in for the Firecracker VMM's side of the userfaultfd page-fault-handler
 * protocol, to test a page server against the protocol rather than against our own client.
 *
 * Standalone on purpose (libc + linux/userfaultfd.h, no pylazymem code): it must behave as
 * Firecracker does, not as pylazymem thinks a client does. Each step below names the Firecracker
 * code it mirrors (src/vmm/src/persist.rs guest_memory_from_uffd(), create_guest_memory(),
 * send_uffd_handshake(); src/vmm/src/vstate/memory.rs; the `userfaultfd` 0.9 and `vmm-sys-util`
 * 0.15 crates); docs/page-server.md ("Firecracker protocol") has the details and versions.
 *
 *   1. guest memory: one mapping per region, 2 MiB-aligned,
 *      MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE;
 *   2. the uffd: /dev/userfaultfd + USERFAULTFD_IOC_NEW(O_CLOEXEC|O_NONBLOCK), syscall fallback,
 *      never UFFD_USER_MODE_ONLY; UFFDIO_API with UFFD_FEATURE_EVENT_REMOVE only;
 *   3. UFFDIO_REGISTER_MODE_MISSING of each whole region;
 *   4. the JSON mappings exactly as serde_json::to_string writes them;
 *   5. connect, ONE sendmsg(MSG_NOSIGNAL) with the JSON and the uffd (SCM_RIGHTS);
 *      the connection stays open until exit (Firecracker >= 1.12 forgets the socket);
 * then, as a guest would: a fault storm from several threads (user-mode reads, writes, and
 * kernel-mode accesses through write() to a pipe, like KVM's), every byte checked against the
 * memory file, and optionally balloon-style madvise(MADV_DONTNEED) of ranges (UFFD_EVENT_REMOVE)
 * that must read back as zeros.
 *
 * Exit status: 0 verified (one summary line on stdout), 1 usage or setup error, 2 wrong contents,
 * 3 deadline exceeded (a hang: the server did not serve a fault or did not read an event).
 * Build: gcc -O2 -Wall -Wextra -pthread -o fc_client fc_client.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_REGIONS 8
#define GUEST_MEMORY_ALIGNMENT (2UL << 20) /* memory.rs: regions start on 2 MiB host addresses */

struct region {
    uint8_t *base;   /* host address (base_host_virt_addr) */
    size_t size;     /* bytes */
    uint64_t offset; /* in the memory file: running sum of the previous sizes, as in HEAD */
};

static struct {
    const char *socket_path, *memory_file, *order, *format;
    size_t region_sizes[MAX_REGIONS];
    int nregions;
    int threads;
    long pages;        /* pages to touch in the storm; <0: all */
    int kernel_every;  /* every k-th touch of a thread is a kernel-mode access (0: never) */
    int write_every;   /* every k-th touch is a write access (0: never) */
    long remove_pages; /* pages per balloon range (0: no balloon phase) */
    long remove_cycles; /* balloon passes over its ranges: at most this many, none after the
                           storm ended (0: as many as the storm lasts) */
    int timeout;
    int close_after_send;
    int thp; /* huge_pages "Transparent" (Firecracker main after 1.16): MADV_HUGEPAGE */
    long delay_us; /* pause after each touch: a slow guest, so that the storm outlasts events */
    int print_json;
    uint64_t seed;
} opt = {
    .order = "random", .format = "head", .threads = 4, .pages = -1, .kernel_every = 7,
    .write_every = 3, .remove_pages = 0, .remove_cycles = 1, .timeout = 60, .seed = 1,
};

static size_t PS;
static struct region regions[MAX_REGIONS];
static int nregions;
static const uint8_t *file_map; /* the memory file, read-only: the expected contents */
static size_t file_size;

/* What the watchdog reports when the deadline fires. */
static _Atomic(const char *) stage = "start";
static atomic_long touched;
static atomic_int storm_running; /* storm threads not finished yet */

static void die(int code, const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    if (n > (int)sizeof buf - 2)
        n = sizeof buf - 2;
    buf[n++] = '\n';
    /* One write so lines from several threads do not interleave; _exit because other threads
     * may be blocked in faults that will never be served. */
    if (write(2, buf, n) < 0) {
    }
    _exit(code);
}

#define SYSFAIL(what)                                                                              \
    die(1, "fc_client: %s: %s (stage: %s)", what, strerror(errno), atomic_load(&stage))

/* ---- deadline ----------------------------------------------------------------------------------
 * alarm() delivers SIGALRM to the process; every thread but this one blocks it, so it is never
 * left pending on a thread stuck in an uninterruptible wait (madvise waiting for its REMOVE event
 * to be read waits killably). _exit() then kills every thread, wherever it waits. */
static void *watchdog(void *arg)
{
    sigset_t *set = arg;
    int sig;
    while (sigwait(set, &sig) != 0) {
    }
    die(3, "fc_client: DEADLINE: %d s exceeded at stage '%s' after %ld touches; the server did not "
           "serve a fault or did not read an event (hang)",
        opt.timeout, atomic_load(&stage), atomic_load(&touched));
    return NULL;
}

static void start_watchdog(void)
{
    static sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGALRM);
    if (pthread_sigmask(SIG_BLOCK, &set, NULL) != 0) /* inherited by every later thread */
        die(1, "fc_client: pthread_sigmask failed");
    pthread_t t;
    if (pthread_create(&t, NULL, watchdog, &set) != 0)
        die(1, "fc_client: cannot start the watchdog thread");
    alarm(opt.timeout);
}

/* ---- step 1: guest memory (memory.rs RawGuestRegionMmap::allocate_protected/allocate) -------- */
static uint8_t *allocate_region(size_t size)
{
    size_t alloc = size + GUEST_MEMORY_ALIGNMENT - PS;
    uint8_t *p = mmap(NULL, alloc, PROT_NONE, MAP_PRIVATE | MAP_NORESERVE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        SYSFAIL("mmap (reserve)");
    uintptr_t aligned = ((uintptr_t)p + GUEST_MEMORY_ALIGNMENT - 1) & ~(GUEST_MEMORY_ALIGNMENT - 1);
    size_t head = aligned - (uintptr_t)p, tail = alloc - head - size;
    if (head && munmap(p, head) != 0)
        SYSFAIL("munmap (head)");
    if (tail && munmap((uint8_t *)aligned + size, tail) != 0)
        SYSFAIL("munmap (tail)");
    void *q = mmap((void *)aligned, size, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
    if (q == MAP_FAILED)
        SYSFAIL("mmap (guest memory)");
    return q;
}

static void create_guest_memory(void)
{
    uint64_t offset = 0;
    for (int i = 0; i < opt.nregions; i++) {
        regions[i].size = opt.region_sizes[i];
        regions[i].base = allocate_region(regions[i].size);
        regions[i].offset = offset;
        offset += regions[i].size;
        /* memory.rs create(): madvise(huge_pages.madvise_flags()) right after the mapping */
        if (opt.thp && madvise(regions[i].base, regions[i].size, MADV_HUGEPAGE) != 0)
            SYSFAIL("madvise(MADV_HUGEPAGE)");
        /* Not Firecracker: a PROT_NONE spacer so that consecutive regions are never adjacent in
         * the host address space (Firecracker's separate mmaps make no promise either way), so a
         * server that finds a fault's region by anything but base/size is caught. */
        if (i + 1 < opt.nregions &&
            mmap(NULL, 2 * GUEST_MEMORY_ALIGNMENT, PROT_NONE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0) == MAP_FAILED)
            SYSFAIL("mmap (spacer)");
    }
    nregions = opt.nregions;
}

/* ---- step 2 and 3: the uffd (userfaultfd 0.9 UffdBuilder::create, Uffd::register) ------------ */
static int create_uffd(void)
{
    /* close_on_exec(true), non_blocking(true), user_mode_only(false) */
    int flags = O_CLOEXEC | O_NONBLOCK;
    int uffd;
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev >= 0) {
        uffd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
        if (uffd < 0)
            SYSFAIL("ioctl(/dev/userfaultfd, USERFAULTFD_IOC_NEW)");
        close(dev);
    } else if (errno == ENOENT) {
        uffd = (int)syscall(SYS_userfaultfd, flags);
        if (uffd < 0)
            SYSFAIL("userfaultfd(2)");
    } else {
        SYSFAIL("open /dev/userfaultfd");
    }
    struct uffdio_api api = {.api = UFFD_API, .features = UFFD_FEATURE_EVENT_REMOVE};
    if (ioctl(uffd, UFFDIO_API, &api) != 0)
        SYSFAIL("UFFDIO_API(UFFD_FEATURE_EVENT_REMOVE)");
    for (int i = 0; i < nregions; i++) {
        struct uffdio_register reg = {
            .range = {.start = (uintptr_t)regions[i].base, .len = regions[i].size},
            .mode = UFFDIO_REGISTER_MODE_MISSING,
        };
        if (ioctl(uffd, UFFDIO_REGISTER, &reg) != 0)
            SYSFAIL("UFFDIO_REGISTER(MISSING)");
    }
    return uffd;
}

/* ---- step 4: serde_json::to_string(&Vec<GuestRegionUffdMapping>) -------------------------------
 * Compact, fields in declaration order, integers in decimal. Formats by Firecracker version:
 * head (v1.12+): page_size and the deprecated page_size_kib (also bytes); v1.7: page_size_kib only
 * (v1.7..v1.11); v1.1: no page size (v1.1..v1.6). */
static size_t serialize(char *out, size_t cap)
{
    size_t n = 0;
#define PUT(...)                                                                                   \
    do {                                                                                           \
        int w = snprintf(out + n, cap - n, __VA_ARGS__);                                           \
        if (w < 0 || (size_t)w >= cap - n)                                                         \
            die(1, "fc_client: JSON buffer too small");                                            \
        n += (size_t)w;                                                                            \
    } while (0)
    PUT("[");
    for (int i = 0; i < nregions; i++) {
        PUT("%s{\"base_host_virt_addr\":%" PRIu64 ",\"size\":%zu,\"offset\":%" PRIu64, i ? "," : "",
            (uint64_t)(uintptr_t)regions[i].base, regions[i].size, regions[i].offset);
        if (!strcmp(opt.format, "head"))
            PUT(",\"page_size\":%zu,\"page_size_kib\":%zu", PS, PS);
        else if (!strcmp(opt.format, "v1.7"))
            PUT(",\"page_size_kib\":%zu", PS);
        PUT("}");
    }
    PUT("]");
#undef PUT
    return n;
}

/* ---- step 5: send_uffd_handshake (vmm-sys-util raw_sendmsg) ---------------------------------- */
static int send_handshake(int uffd)
{
    char json[4096];
    size_t len = serialize(json, sizeof json);
    if (opt.print_json)
        fprintf(stderr, "fc_client: json %.*s\n", (int)len, json);

    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0); /* std UnixStream::connect */
    if (sock < 0)
        SYSFAIL("socket");
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(opt.socket_path) >= sizeof sa.sun_path)
        die(1, "fc_client: socket path too long");
    strcpy(sa.sun_path, opt.socket_path);
    if (connect(sock, (struct sockaddr *)&sa, sizeof sa) != 0)
        SYSFAIL("connect");

    struct iovec iov = {.iov_base = json, .iov_len = len};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } ctl;
    memset(&ctl, 0, sizeof ctl);
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf,
                         .msg_controllen = CMSG_SPACE(sizeof(int))};
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &uffd, sizeof(int));
    ssize_t sent = sendmsg(sock, &msg, MSG_NOSIGNAL);
    if (sent < 0)
        SYSFAIL("sendmsg");
    /* Firecracker does not check for a short send either; a short send here would make this
     * client unlike Firecracker, so say so rather than carry on. */
    if ((size_t)sent != len)
        die(1, "fc_client: short sendmsg (%zd of %zu bytes)", sent, len);
    if (opt.close_after_send) /* Firecracker < 1.12 dropped the socket right after sending */
        close(sock);
    return sock;
}

/* ---- expected contents and diagnostics ------------------------------------------------------- */
struct page {
    int region;
    size_t index; /* page index within the region */
};

static inline uint8_t *page_addr(struct page p) { return regions[p.region].base + p.index * PS; }
static inline const uint8_t *page_expected(struct page p)
{
    return file_map + regions[p.region].offset + p.index * PS;
}

static int is_zero(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i])
            return 0;
    return 1;
}

static pthread_mutex_t report_lock = PTHREAD_MUTEX_INITIALIZER;

static void mismatch(struct page p, const uint8_t *got, const uint8_t *want, const char *how)
{
    pthread_mutex_lock(&report_lock); /* first mismatch only: die() never returns */
    size_t at = 0;
    while (at < PS && got[at] == want[at])
        at++;
    char extra[160] = "";
    if (is_zero(got, PS))
        snprintf(extra, sizeof extra, "; got a zero page");
    else
        for (size_t off = 0; off + PS <= file_size; off += PS)
            if (!memcmp(got, file_map + off, PS)) {
                snprintf(extra, sizeof extra, "; got the memory file's page at offset %zu", off);
                break;
            }
    die(2,
        "fc_client: MISMATCH (%s) region %d (base 0x%" PRIxPTR ", file offset %" PRIu64
        ") page %zu (address 0x%" PRIxPTR ", expected file offset %" PRIu64
        "): byte %zu is 0x%02x, expected 0x%02x%s",
        how, p.region, (uintptr_t)regions[p.region].base, regions[p.region].offset, p.index,
        (uintptr_t)page_addr(p), regions[p.region].offset + p.index * PS, at, got[at], want[at],
        extra);
}

static void check_page(struct page p, const uint8_t *got, const char *how)
{
    const uint8_t *want = page_expected(p);
    if (memcmp(got, want, PS) != 0)
        mismatch(p, got, want, how);
}

static void check_zero(struct page p, const char *how)
{
    const uint8_t *got = page_addr(p);
    if (!is_zero(got, PS)) {
        pthread_mutex_lock(&report_lock);
        size_t at = 0;
        while (got[at] == 0)
            at++;
        char extra[160] = "";
        for (size_t off = 0; off + PS <= file_size; off += PS)
            if (!memcmp(got, file_map + off, PS)) {
                snprintf(extra, sizeof extra, " (the memory file's page at offset %zu)", off);
                break;
            }
        die(2,
            "fc_client: MISMATCH (%s) region %d page %zu (address 0x%" PRIxPTR
            ") was removed (MADV_DONTNEED, UFFD_EVENT_REMOVE) and must read as zeros; byte %zu is "
            "0x%02x%s",
            how, p.region, p.index, (uintptr_t)got, at, got[at], extra);
    }
}

/* ---- the fault storm ------------------------------------------------------------------------- */
static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

struct worker {
    pthread_t thread;
    int id;
    struct page *list;
    size_t n;
    pthread_barrier_t *go;
    uint8_t *buf;
    int pipe[2];
    long kernel_touches, write_touches;
    double lat_sum, lat_max;
};

/* One access to a page, of one of the three kinds a guest produces. */
static void touch(struct worker *w, struct page p, size_t k)
{
    uint8_t *a = page_addr(p);
    const uint8_t *got = a;
    const char *how;
    double t0 = now();
    if (opt.kernel_every && k % (size_t)opt.kernel_every == (size_t)opt.kernel_every - 1) {
        /* Kernel-mode access (copy_from_user in pipe_write), as KVM's accesses to guest memory
         * are: served only because the uffd is not UFFD_USER_MODE_ONLY. */
        ssize_t n = write(w->pipe[1], a, PS);
        if (n != (ssize_t)PS)
            die(2,
                "fc_client: kernel-mode access to region %d page %zu: write() returned %zd (%s); "
                   "a fault in a kernel access was not served",
                p.region, p.index, n, n < 0 ? strerror(errno) : "short");
        if (read(w->pipe[0], w->buf, PS) != (ssize_t)PS)
            SYSFAIL("read(pipe)");
        w->kernel_touches++;
        got = w->buf;
        how = "kernel-mode read (write() from the page to a pipe)";
    } else if (opt.write_every && k % (size_t)opt.write_every == 0) {
        /* A write fault (UFFD_PAGEFAULT_FLAG_WRITE) that leaves the value unchanged. */
        __atomic_fetch_add((uint64_t *)(a + ((p.index * 64) % PS & ~7UL)), 0, __ATOMIC_RELAXED);
        w->write_touches++;
        how = "write fault";
    } else {
        (void)*(volatile uint8_t *)(a + (p.index * 97) % PS);
        how = "read fault";
    }
    double dt = now() - t0;
    w->lat_sum += dt;
    if (dt > w->lat_max)
        w->lat_max = dt;
    atomic_fetch_add(&touched, 1);
    check_page(p, got, how);
}

static void *storm(void *arg)
{
    struct worker *w = arg;
    pthread_barrier_wait(w->go);
    for (size_t k = 0; k < w->n; k++) {
        touch(w, w->list[k], k);
        if (opt.delay_us)
            usleep((useconds_t)opt.delay_us);
    }
    atomic_fetch_sub(&storm_running, 1);
    return NULL;
}

/* Balloon: madvise(MADV_DONTNEED) ranges while the storm runs, as Firecracker's
 * discard_range() does for an inflating balloon. Each madvise waits until the server has read
 * the REMOVE event; meanwhile the server's UFFDIO_COPYs get EAGAIN. */
struct balloon {
    pthread_t thread;
    struct page *starts;
    int nranges;
    pthread_barrier_t *go;
    long removes; /* madvise calls, each one UFFD_EVENT_REMOVE */
};

static void *balloon(void *arg)
{
    struct balloon *b = arg;
    pthread_barrier_wait(b->go);
    /* Removing a removed range again is another REMOVE event (the balloon inflating over
     * pages the guest freed twice); repeating keeps REMOVEs arriving for as long as faults
     * do, so that a server's handling of a REMOVE amid pending faults is exercised. */
    for (long cycle = 0; cycle < opt.remove_cycles || opt.remove_cycles == 0; cycle++) {
        if (cycle > 0 && atomic_load(&storm_running) == 0)
            break;
        for (int i = 0; i < b->nranges; i++) {
            if (madvise(page_addr(b->starts[i]), opt.remove_pages * PS, MADV_DONTNEED) != 0)
                SYSFAIL("madvise(MADV_DONTNEED)");
            b->removes++;
        }
    }
    return NULL;
}

/* ---- arguments ------------------------------------------------------------------------------- */
static void usage(void)
{
    die(1,
        "usage: fc_client --socket PATH --memory-file FILE [--regions SIZE[,SIZE...]]\n"
        "         [--threads N] [--pages N] [--order random|seq|reverse|interleave|same]\n"
        "         [--seed N]"
        " [--kernel-every K] [--write-every K] [--remove PAGES [--remove-cycles N]]\n"
        "         [--format head|v1.7|v1.1] [--close-after-send] [--thp] [--print-json]\n"
        "         [--delay-us MICROSECONDS] [--timeout SECONDS]\n"
        "  SIZE: bytes, K/M/G suffixes allowed; regions are laid out in the memory file one after\n"
        "  the other from offset 0 (default: two regions, 3/4 and 1/4 of the file's pages).");
}

static size_t parse_size(const char *s)
{
    char *end;
    unsigned long long v = strtoull(s, &end, 10);
    switch (*end) {
    case 'G': v <<= 10; /* fall through */
    case 'M': v <<= 10; /* fall through */
    case 'K': v <<= 10; end++; break;
    }
    if (*end || end == s)
        usage();
    return (size_t)v;
}

static void parse_args(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
#define VAL() (i + 1 < argc ? argv[++i] : (usage(), ""))
        if (!strcmp(a, "--socket"))
            opt.socket_path = VAL();
        else if (!strcmp(a, "--memory-file"))
            opt.memory_file = VAL();
        else if (!strcmp(a, "--regions")) {
            char *s = strdup(VAL()), *save = NULL;
            for (char *t = strtok_r(s, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
                if (opt.nregions == MAX_REGIONS)
                    usage();
                opt.region_sizes[opt.nregions++] = parse_size(t);
            }
        } else if (!strcmp(a, "--threads"))
            opt.threads = atoi(VAL());
        else if (!strcmp(a, "--pages"))
            opt.pages = atol(VAL());
        else if (!strcmp(a, "--order"))
            opt.order = VAL();
        else if (!strcmp(a, "--seed"))
            opt.seed = strtoull(VAL(), NULL, 10);
        else if (!strcmp(a, "--kernel-every"))
            opt.kernel_every = atoi(VAL());
        else if (!strcmp(a, "--write-every"))
            opt.write_every = atoi(VAL());
        else if (!strcmp(a, "--remove"))
            opt.remove_pages = atol(VAL());
        else if (!strcmp(a, "--remove-cycles"))
            opt.remove_cycles = atol(VAL());
        else if (!strcmp(a, "--format"))
            opt.format = VAL();
        else if (!strcmp(a, "--timeout"))
            opt.timeout = atoi(VAL());
        else if (!strcmp(a, "--close-after-send"))
            opt.close_after_send = 1;
        else if (!strcmp(a, "--thp"))
            opt.thp = 1;
        else if (!strcmp(a, "--delay-us"))
            opt.delay_us = atol(VAL());
        else if (!strcmp(a, "--print-json"))
            opt.print_json = 1;
        else
            usage();
#undef VAL
    }
    if (!opt.socket_path || !opt.memory_file || opt.threads < 1 || opt.threads > 256 ||
        opt.timeout < 1 || opt.kernel_every < 0 || opt.write_every < 0 || opt.remove_pages < 0 ||
        opt.remove_cycles < 0 || opt.delay_us < 0 || opt.delay_us > 1000000)
        usage();
    if (strcmp(opt.format, "head") && strcmp(opt.format, "v1.7") && strcmp(opt.format, "v1.1"))
        usage();
    if (strcmp(opt.order, "random") && strcmp(opt.order, "seq") && strcmp(opt.order, "reverse") &&
        strcmp(opt.order, "interleave") && strcmp(opt.order, "same"))
        usage();
}

static uint64_t rng_state;
static uint64_t rnd(void) /* splitmix64: reproducible orders from --seed */
{
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

int main(int argc, char **argv)
{
    PS = (size_t)sysconf(_SC_PAGESIZE);
    parse_args(argc, argv);
    start_watchdog();
    rng_state = opt.seed;

    int fd = open(opt.memory_file, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        SYSFAIL("open memory file");
    struct stat st;
    if (fstat(fd, &st) != 0)
        SYSFAIL("fstat memory file");
    file_size = (size_t)st.st_size;
    if (file_size < PS || file_size % PS)
        die(1, "fc_client: memory file size %zu is not a positive multiple of %zu", file_size, PS);
    file_map = mmap(NULL, file_size, PROT_READ, MAP_SHARED, fd, 0);
    if (file_map == MAP_FAILED)
        SYSFAIL("mmap memory file");
    if (opt.nregions == 0) {
        size_t np = file_size / PS;
        opt.region_sizes[opt.nregions++] = (np > 1 ? np - np / 4 : np) * PS;
        if (np > 1)
            opt.region_sizes[opt.nregions++] = (np / 4) * PS;
    }
    size_t total = 0;
    for (int i = 0; i < opt.nregions; i++) {
        if (opt.region_sizes[i] == 0 || opt.region_sizes[i] % PS)
            die(1, "fc_client: region size %zu is not a positive multiple of %zu",
                opt.region_sizes[i], PS);
        total += opt.region_sizes[i];
    }
    if (total > file_size)
        die(1, "fc_client: regions (%zu bytes) exceed the memory file (%zu bytes)", total,
            file_size);

    atomic_store(&stage, "guest memory and uffd");
    create_guest_memory();
    int uffd = create_uffd();
    atomic_store(&stage, "handshake");
    int sock = send_handshake(uffd);
    (void)sock; /* kept open (Firecracker forgets it): EOF reaches the server only when we exit */

    /* Pages: every page of every region, in file order. */
    size_t npages = total / PS, nlist = 0, nremove = 0;
    struct page *all = calloc(npages, sizeof *all), *list = calloc(npages, sizeof *list);
    unsigned char *removed = calloc(npages, 1); /* 1: removed during the storm */
    size_t *first_of = calloc(nregions + 1, sizeof *first_of);
    if (!all || !list || !removed || !first_of)
        die(1, "fc_client: out of memory");
    for (int r = 0, k = 0; r < nregions; r++) {
        first_of[r] = k;
        for (size_t i = 0; i < regions[r].size / PS; i++)
            all[k++] = (struct page){r, i};
        first_of[r + 1] = k;
    }

    /* Balloon ranges, per region: A in the middle, served before the storm; B at the end,
     * never touched before its removal. Both are left out of the storm: a fault racing with its
     * own page's removal has no defined result (Firecracker's example handler says as much). */
    struct page starts[2 * MAX_REGIONS];
    int nranges = 0;
    if (opt.remove_pages > 0) {
        for (int r = 0; r < nregions; r++) {
            size_t rp = regions[r].size / PS;
            if ((size_t)opt.remove_pages * 4 > rp)
                die(1, "fc_client: --remove %ld needs regions of at least %ld pages",
                    opt.remove_pages, opt.remove_pages * 4);
            size_t a = rp / 2 - (size_t)opt.remove_pages / 2, b = rp - (size_t)opt.remove_pages;
            starts[nranges++] = (struct page){r, a};
            starts[nranges++] = (struct page){r, b};
            for (long j = 0; j < opt.remove_pages; j++)
                removed[first_of[r] + a + j] = removed[first_of[r] + b + j] = 1;
        }
        atomic_store(&stage, "balloon warm-up (serving range A before its removal)");
        for (int i = 0; i < nranges; i += 2)
            for (long j = 0; j < opt.remove_pages; j++) {
                struct page p = {starts[i].region, starts[i].index + j};
                check_page(p, page_addr(p), "read fault before removal");
            }
    }
    for (size_t k = 0; k < npages; k++)
        if (!removed[k])
            list[nlist++] = all[k];
        else
            nremove++;

    if (!strcmp(opt.order, "reverse"))
        for (size_t i = 0; i < nlist / 2; i++) {
            struct page t = list[i];
            list[i] = list[nlist - 1 - i];
            list[nlist - 1 - i] = t;
        }
    else if (!strcmp(opt.order, "random"))
        for (size_t i = nlist; i > 1; i--) {
            size_t j = rnd() % i;
            struct page t = list[i - 1];
            list[i - 1] = list[j];
            list[j] = t;
        }
    if (opt.pages >= 0 && (size_t)opt.pages < nlist)
        nlist = (size_t)opt.pages;

    /* Split the list among the threads: contiguous slices (seq/reverse/random), round-robin
     * (interleave: neighbouring pages fault at the same time), or the whole list for everyone
     * (same: every page faults in several threads at once). */
    int T = opt.threads;
    struct worker *ws = calloc(T, sizeof *ws);
    pthread_barrier_t go;
    pthread_barrier_init(&go, NULL, T + 1 + (nranges > 0));
    for (int t = 0; t < T; t++) {
        struct worker *w = &ws[t];
        w->id = t;
        w->go = &go;
        w->buf = malloc(PS);
        if (pipe2(w->pipe, O_CLOEXEC) != 0)
            SYSFAIL("pipe2");
        if (!strcmp(opt.order, "same")) {
            w->list = list;
            w->n = nlist;
        } else if (!strcmp(opt.order, "interleave")) {
            w->list = calloc(nlist / T + 1, sizeof *w->list);
            for (size_t i = t; i < nlist; i += T)
                w->list[w->n++] = list[i];
        } else {
            size_t lo = nlist * t / T, hi = nlist * (t + 1) / T;
            w->list = list + lo;
            w->n = hi - lo;
        }
    }
    struct balloon b = {.starts = starts, .nranges = nranges, .go = &go};

    atomic_store(&stage, "fault storm");
    atomic_store(&storm_running, T);
    for (int t = 0; t < T; t++)
        if (pthread_create(&ws[t].thread, NULL, storm, &ws[t]) != 0)
            die(1, "fc_client: pthread_create failed");
    if (nranges && pthread_create(&b.thread, NULL, balloon, &b) != 0)
        die(1, "fc_client: pthread_create failed");
    double t0 = now();
    pthread_barrier_wait(&go);
    for (int t = 0; t < T; t++)
        pthread_join(ws[t].thread, NULL);
    double wall = now() - t0;
    if (nranges)
        pthread_join(b.thread, NULL);

    /* Every page: the storm's untouched ones fault now (single thread), removed ones are zero. */
    atomic_store(&stage, "verify all pages");
    size_t verified = 0;
    for (size_t k = 0; k < npages; k++) {
        if (removed[k])
            check_zero(all[k], "read after balloon removal");
        else
            check_page(all[k], page_addr(all[k]), "read (verification pass)");
        verified++;
    }

    /* A second balloon cycle over the same ranges (deflate, guest uses the pages, inflate):
     * removing zero-filled pages again must leave them zero, and they must work as memory. */
    if (nranges) {
        atomic_store(&stage, "second balloon cycle");
        for (int i = 0; i < nranges; i++) {
            uint8_t *a = page_addr(starts[i]);
            memset(a, 0xA5, PS); /* the guest writes into a deflated page */
            if (a[PS - 1] != 0xA5)
                die(2, "fc_client: a page written after removal does not read back");
            if (madvise(a, opt.remove_pages * PS, MADV_DONTNEED) != 0)
                SYSFAIL("madvise(MADV_DONTNEED), second cycle");
            for (long j = 0; j < opt.remove_pages; j++)
                check_zero((struct page){starts[i].region, starts[i].index + j},
                           "read after a second removal");
        }
    }

    long ktouch = 0, wtouch = 0;
    double lat_sum = 0, lat_max = 0;
    for (int t = 0; t < T; t++) {
        ktouch += ws[t].kernel_touches;
        wtouch += ws[t].write_touches;
        lat_sum += ws[t].lat_sum;
        if (ws[t].lat_max > lat_max)
            lat_max = ws[t].lat_max;
    }
    long n = atomic_load(&touched);
    size_t storm_pages = nlist; /* distinct pages ("same": each touched by every thread) */
    printf("fc_client: OK format=%s regions=%d pages=%zu storm_pages=%zu threads=%d order=%s "
           "touches=%ld kernel_touches=%ld write_touches=%ld removed_pages=%zu remove_events=%ld "
           "verified_pages=%zu "
           "wall_ms=%.3f per_fault_us=%.3f mean_touch_us=%.3f max_touch_us=%.3f\n",
           opt.format, nregions, npages, storm_pages, T, opt.order, n, ktouch, wtouch, nremove,
           b.removes + nranges, verified, wall * 1e3, storm_pages ? wall * 1e6 / storm_pages : 0.0,
           n > 0 ? lat_sum * 1e6 / n : 0.0, lat_max * 1e6);
    fflush(stdout);
    _exit(0); /* the socket and the uffd close with the process, as a VMM's do */
}
