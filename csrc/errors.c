/*
 * errors.c: the failing operation of the calling thread.
 *
 * C functions return -errno; the name of what failed ("ioctl(UFFDIO_COPY)") is kept here so
 * the bindings can turn both into one message in one place.
 */
#include <errno.h>

#include "lm_internal.h"

static __thread const char *last_op = "";

int lm_fail(const char *op, int err)
{
    last_op = op;
    return -(err ? err : EIO);
}

const char *lm_last_op(void)
{
    return last_op;
}

unsigned lm_abi_version(void)
{
    return LM_ABI_VERSION;
}
