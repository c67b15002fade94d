"""Exceptions, and the one place where a C status (-errno plus the failing operation) becomes one."""
import errno as _errno
import os

# The classes a kernel call can raise live in _uffd_errors, which the pure-Python binding
# (pylazymem.uffd) shares: one class of each, whichever backend raised it.
from ._uffd_errors import (  # noqa: E402,F401
    _REMEDY,
    SECCOMP_BLOCKED,
    InvalidRangeError,
    LazyMemError,
    UffdError,
    UnavailableError,
    remedy,
    seccomp_filtered,
)


class InvalidArgumentError(LazyMemError, ValueError, TypeError):
    """A size, type or value that cannot be used (both a ValueError and a TypeError)."""


class RegionClosedError(LazyMemError, ValueError):
    """The region was closed (or belongs to the parent process after fork())."""


def check(rc, what=""):
    """Turn a C return value into an exception; returns rc when it is not an error."""
    if rc >= 0:
        return rc
    # Only the cffi backend produces C statuses; importing here keeps the exception classes
    # importable without the compiled core (the ctypes backend), at no cost on success.
    from ._binding import ffi, lib

    err = -rc
    op = ffi.string(lib.lm_last_op()).decode()
    where = "%s: %s" % (what, op) if what else op
    if op == "userfaultfd":
        from ._features import features   # the probe (cached) knows why, not just the errno
        f = features()
        why = f.reason if f.mode == "unavailable" and f.reason else remedy(err)
        raise UnavailableError(err, "%s: %s" % (where, why))
    if err == _errno.ERANGE:
        raise InvalidRangeError(where)
    if err == _errno.EINVAL and not op.startswith("ioctl"):
        raise InvalidArgumentError(where)
    raise UffdError(err, "%s: %s" % (where, os.strerror(err)))
