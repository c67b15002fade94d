/* exp9: (a) does a MINOR-registered mapping still get the kernel's fault-around? (count faults for
   256 sequential reads, single-page CONTINUE); (b) a hole read in a mapping registered MINOR only
   (no MISSING): does the kernel put a zero page into the shared page cache? */
#include "exp.h"
#define NPG 256
static int u;
static char *reg;
static volatile int nf;
static void *handler(void *a)
{
    for (;;) {
        struct pollfd p = {u, POLLIN, 0};
        poll(&p, 1, -1);
        struct uffd_msg m;
        if (read(u, &m, sizeof m) != sizeof m || m.event != UFFD_EVENT_PAGEFAULT)
            continue;
        nf++;
        int err;
        uffd_continue(u, (void *)(m.arg.pagefault.address & ~(PS - 1)), PS, 0, &err);
    }
}
int main(void)
{
    int mfd = memfd_create("pool", 0);
    ftruncate(mfd, (NPG + 16) * PS);
    char b[PS];
    memset(b, 'x', PS);
    for (int p = 0; p < NPG; p++)
        pwrite(mfd, b, PS, p * PS);
    u = uffd_new(UFFD_FEATURE_MINOR_SHMEM, NULL);
    reg = mmap(0, (NPG + 16) * PS, PROT_READ | PROT_WRITE, MAP_PRIVATE, mfd, 0);
    uffd_reg(u, reg, NPG * PS, UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR, NULL);
    pthread_t t;
    pthread_create(&t, 0, handler, 0);
    volatile char c;
    for (int p = 0; p < NPG; p++)
        c = reg[p * PS];
    printf("(a) %d sequential first reads of pool pages, MINOR registered, 1-page CONTINUE: %d faults "
           "(no fault-around if equal)\n", NPG, nf);
    /* (b) pages NPG..NPG+15 are holes; register MINOR only on NPG..NPG+7, leave +8..+15 unregistered */
    int rc = uffd_reg(u, reg + NPG * PS, 8 * PS, UFFDIO_REGISTER_MODE_MINOR, NULL);
    c = reg[NPG * PS];
    c = reg[(NPG + 8) * PS];
    unsigned char mc[16];
    char *view = mmap(0, 16 * PS, PROT_NONE, MAP_SHARED, mfd, NPG * PS);
    mincore(view, 16 * PS, mc);
    printf("(b) MINOR-only register %s; hole read in MINOR-only range -> pool page now in page cache: %d "
           "(faults %d); hole read in unregistered private mapping -> in page cache: %d\n",
           rc ? strerror(-rc) : "ok", mc[0] & 1, nf, mc[8] & 1);
    return 0;
}
