/* exp10: the peer protocol end to end, minus the product's metadata. NPROC processes start at
   once; each looks for the pool at an abstract socket, creates it (and answers on the socket) if
   nobody has, or receives the memfd by SCM_RIGHTS; each maps it MAP_PRIVATE, registered
   MISSING|MINOR, plus a PROT_NONE MAP_SHARED view registered MISSING; faults are served by
   publishing (pread the "store", UFFDIO_COPY into the view, EEXIST = someone else did) then
   UFFDIO_CONTINUE. Every process reads every page in its own random order, checks every byte,
   writes 1% of pages. Then: CONTINUE on a uffd received from another process.
   ./exp10 FILE (>= 256 MiB) */
#include "exp.h"
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <stddef.h>

#define N (256UL << 20)
#define NP (N / PS)
#define NPROC 4
static const char *sockname = "\0pylazymem-exp10-pool";
static int uffd, stopfd, filefd, mfd;
static char *region, *view;
static long n_minor, n_missing, n_pub, n_eexist;

static void send_fd(int s, int fd)
{
    char c = 'P';
    struct iovec io = {&c, 1};
    char cbuf[CMSG_SPACE(sizeof(int))];
    struct msghdr m = {.msg_iov = &io, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf};
    struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cm), &fd, sizeof fd);
    sendmsg(s, &m, MSG_NOSIGNAL);
}
static int recv_fd(int s)
{
    char c;
    struct iovec io = {&c, 1};
    char cbuf[CMSG_SPACE(sizeof(int))];
    struct msghdr m = {.msg_iov = &io, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf};
    if (recvmsg(s, &m, MSG_CMSG_CLOEXEC) <= 0 || (m.msg_flags & MSG_CTRUNC))
        return -1;
    struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
    if (!cm || cm->cmsg_type != SCM_RIGHTS)
        return -1;
    int fd;
    memcpy(&fd, CMSG_DATA(cm), sizeof fd);
    return fd;
}
static socklen_t addr(struct sockaddr_un *a)
{
    memset(a, 0, sizeof *a);
    a->sun_family = AF_UNIX;
    size_t n = 1 + strlen(sockname + 1);
    memcpy(a->sun_path, sockname, n);
    return offsetof(struct sockaddr_un, sun_path) + n;
}
static void *listener(void *arg)
{
    int ls = (int)(intptr_t)arg;
    for (;;) {
        int c = accept4(ls, 0, 0, SOCK_CLOEXEC);
        if (c < 0)
            continue;
        struct ucred cr;
        socklen_t l = sizeof cr;
        getsockopt(c, SOL_SOCKET, SO_PEERCRED, &cr, &l);
        if (cr.uid == getuid())
            send_fd(c, mfd);
        close(c);
    }
}

static void *handler(void *a)
{
    char *buf = aligned_alloc(PS, 16 * PS);
    unsigned char mc[16];
    for (;;) {
        struct pollfd p[2] = {{uffd, POLLIN, 0}, {stopfd, POLLIN, 0}};
        poll(p, 2, -1);
        if (p[1].revents)
            return NULL;
        struct uffd_msg m;
        if (read(uffd, &m, sizeof m) != sizeof m || m.event != UFFD_EVENT_PAGEFAULT)
            continue;
        size_t pg = (m.arg.pagefault.address - (uintptr_t)region) / PS;
        size_t n = 1;   /* random access: one page per fault */
        int err;
        if (m.arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_MINOR) {
            n_minor++;
        } else {
            n_missing++;
            mincore(view + pg * PS, n * PS, mc);
            if (!(mc[0] & 1)) {
                pread(filefd, buf, n * PS, pg * PS);
                uffd_copy(uffd, view + pg * PS, buf, n * PS, 1, &err);
                if (err == -EEXIST)
                    n_eexist++;
                else if (err)
                    fprintf(stderr, "publish: %s\n", strerror(-err));
                else
                    n_pub++;
            }
        }
        uffd_continue(uffd, region + pg * PS, n * PS, 0, &err);
        if (err && err != -EEXIST)
            fprintf(stderr, "continue %zu: %s\n", pg, strerror(-err));
    }
}

static void child(int rank, int barrier_fd, int go_fd)
{
    struct sockaddr_un a;
    socklen_t al = addr(&a);
    const char *role = "joined";
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (connect(s, (struct sockaddr *)&a, al) == 0) {
        struct ucred cr;
        socklen_t l = sizeof cr;
        getsockopt(s, SOL_SOCKET, SO_PEERCRED, &cr, &l);
        mfd = cr.uid == getuid() ? recv_fd(s) : -1;
    } else
        mfd = -1;
    close(s);
    if (mfd < 0) {
        mfd = memfd_create("pylazymem-pool", MFD_CLOEXEC | MFD_ALLOW_SEALING);
        ftruncate(mfd, N);
        fcntl(mfd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW);
        int ls = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (bind(ls, (struct sockaddr *)&a, al) == 0 && listen(ls, 16) == 0) {
            pthread_t t;
            pthread_create(&t, 0, listener, (void *)(intptr_t)ls);
            role = "created";
        } else {
            role = "lost the race: unshared";   /* the design would connect again; counted here */
        }
    }
    region = mmap(0, N, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, mfd, 0);
    view = mmap(0, N, PROT_NONE, MAP_SHARED | MAP_NORESERVE, mfd, 0);
    uffd = uffd_new(UFFD_FEATURE_MINOR_SHMEM, NULL);
    if (uffd_reg(uffd, region, N, UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR, NULL) ||
        uffd_reg(uffd, view, N, UFFDIO_REGISTER_MODE_MISSING, NULL))
        DIE("register");
    stopfd = eventfd(0, 0);
    pthread_t t;
    pthread_create(&t, 0, handler, 0);
    size_t *order = malloc(NP * sizeof *order);
    for (size_t i = 0; i < NP; i++)
        order[i] = i;
    uint64_t x = 1234567 + rank;
    for (size_t i = NP - 1; i > 0; i--) {
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        size_t j = (x >> 20) % (i + 1), tmp = order[i];
        order[i] = order[j];
        order[j] = tmp;
    }
    char *want = aligned_alloc(PS, PS);
    size_t bad = 0;
    double t0 = now();
    for (size_t i = 0; i < NP; i++) {
        size_t p = order[i];
        pread(filefd, want, PS, p * PS);
        if (memcmp(region + p * PS, want, PS))
            bad++;
    }
    double dt = now() - t0;
    for (size_t p = rank; p < NP; p += 100)
        region[p * PS + 5] ^= 0x5a;  /* 1%, different pages per process */
    size_t bad2 = 0;   /* the pool is unchanged by our writes */
    for (size_t p = rank; p < NP; p += 100) {
        char c;
        pread(mfd, &c, 1, p * PS + 5);
        pread(filefd, want, 1, p * PS + 5);
        bad2 += c != want[0];
    }
    printf("proc %d (%s): read+check %.0f ms, bad pages %zu, pool pages changed by our writes %zu, "
           "faults: MISSING %ld (published %ld, EEXIST %ld) MINOR %ld\n",
           rank, role, dt * 1e3, bad, bad2, n_missing, n_pub, n_eexist, n_minor);
    fflush(stdout);
    char c = 1;
    write(barrier_fd, &c, 1);
    read(go_fd, &c, 1);
    _exit(0);
}

int main(int argc, char **argv)
{
    filefd = open(argv[1], O_RDONLY);
    int bar[2], go[2];
    pipe(bar);
    pipe(go);
    pid_t pids[NPROC];
    for (int i = 0; i < NPROC; i++)
        if ((pids[i] = fork()) == 0)
            child(i, bar[1], go[0]);
    for (int i = 0; i < NPROC; i++) {
        char c;
        read(bar[0], &c, 1);
    }
    long tot = 0;
    for (int i = 0; i < NPROC; i++)
        tot += pss_kb(pids[i]);
    printf("total PSS of %d processes (256 MiB each, 1%% written): %ld MiB\n", NPROC, tot / 1024);
    for (int i = 0; i < NPROC; i++)
        write(go[1], "g", 1);
    for (int i = 0; i < NPROC; i++)
        waitpid(pids[i], 0, 0);

    fflush(stdout);
    /* CONTINUE on a uffd received from another process (the page server's case) */
    int sp[2];
    socketpair(AF_UNIX, SOCK_STREAM, 0, sp);
    int pm = memfd_create("pool2", 0);
    ftruncate(pm, 4 * PS);
    char b[PS];
    memset(b, 'S', PS);
    pwrite(pm, b, PS, 0);
    pid_t c = fork();
    if (c == 0) {
        char *r = mmap(0, 4 * PS, PROT_READ | PROT_WRITE, MAP_PRIVATE, pm, 0);
        int u = uffd_new(UFFD_FEATURE_MINOR_SHMEM, NULL);
        uffd_reg(u, r, 4 * PS, UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR, NULL);
        write(sp[1], &r, sizeof r);
        send_fd(sp[1], u);
        char ok;
        read(sp[1], &ok, 1);   /* the other process has run CONTINUE on our uffd */
        unsigned char mc;
        mincore(r, PS, &mc);
        printf("CONTINUE by another process on our uffd: page mapped=%d reads '%c' (no fault: nobody serves us)\n",
               mc & 1, r[0]);
        fflush(stdout);
        _exit(0);
    }
    char *raddr;
    read(sp[0], &raddr, sizeof raddr);
    int u = recv_fd(sp[0]);
    int err;
    uffd_continue(u, raddr, PS, 0, &err);
    printf("server side: CONTINUE on the received uffd: %s\n", err ? strerror(-err) : "ok");
    fflush(stdout);
    write(sp[0], "k", 1);
    waitpid(c, 0, 0);
    return 0;
}
