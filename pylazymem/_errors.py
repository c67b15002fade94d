"""Exceptions, and the one place where a C status (-errno plus the failing operation) becomes one.

A leaf: it imports nothing of the package but the exception classes the pure-Python binding
shares (_uffd_errors). The compiled core's `check()` (pylazymem._binding) calls status_error().
"""
import errno as _errno
import os

# The classes a kernel call can raise live in _uffd_errors, which the pure-Python binding
# (pylazymem.uffd) shares: one class of each, whichever backend raised it.
from ._uffd_errors import (  # noqa: E402,F401
    _REMEDY,
    SECCOMP_BLOCKED,
    InvalidRangeError,
    LazyMemError,
    SnapshotError,
    UffdError,
    UnavailableError,
    remedy,
    seccomp_filtered,
)


class InvalidArgumentError(LazyMemError, ValueError, TypeError):
    """A size, type or value that cannot be used (both a ValueError and a TypeError)."""


# Linux's "memory page has hardware error" (asm-generic/errno.h); Python's errno module does
# not name it on every version.
EHWPOISON = getattr(_errno, "EHWPOISON", 133)


class PoisonedPageError(LazyMemError, OSError):
    """Pages whose contents could not be served (a failed fill, a verification mismatch, a
    lost page server) were asked for: `pages` lists them (indices into the region). Their
    contents are lost; defer_fill() can give them new ones."""

    def __init__(self, message, pages=()):
        super().__init__(EHWPOISON, message)
        self.pages = list(pages)


class SharingUnavailableError(UnavailableError):
    """restore(share=True) cannot share pages here (the kernel, the privilege mode, the page
    server or a bound says why); share="auto" restores privately instead."""


class CoreNotLoaded(ImportError):
    """The compiled core was asked for under the ctypes backend (pylazymem._backend)."""


class BusyError(LazyMemError, OSError):
    """The region is in the middle of something that excludes this call: a background
    checkpoint (wait() for its handle first)."""


class ObjectStoreError(LazyMemError, OSError):
    """An object store refused or failed a request, or pages of a region restored from one
    could not be fetched: `status` (HTTP, 0 when the endpoint could not be reached), `code`
    (S3's error code, such as NoSuchKey or AccessDenied), `what` (the request)."""

    def __init__(self, message, status=0, code="", what=""):
        super().__init__(message)
        self.status, self.code, self.what = status, code, what


class RegionClosedError(LazyMemError, ValueError):
    """The region was closed (or belongs to the parent process after fork())."""


class OutOfMemoryError(UffdError, MemoryError):
    """The core could not allocate memory (ENOMEM): a MemoryError, and the UffdError it was
    before (except clauses written for that still catch it)."""


# UffdError first: OSError's constructor sets errno (SnapshotError's would not).
class SnapshotDataError(UffdError, SnapshotError):
    """A page's bytes from a snapshot (a store entry, or a page checked with verify=True) do
    not match what the snapshot records for them: the file was changed or damaged after it
    was written. A SnapshotError, and the UffdError(EBADMSG) it was before (except clauses
    written for that still catch it)."""


def status_error(err, op, what="", why_unavailable=None):
    """The exception for a failed C call: errno `err` from the operation `op` (lm_last_op()),
    called for `what`. `why_unavailable`, if given, is called for the reason when the failing
    operation was acquiring a userfaultfd (the feature probe knows why, not just the errno)."""
    where = "%s: %s" % (what, op) if what else op
    if op == "userfaultfd":
        why = (why_unavailable() if why_unavailable else None) or remedy(err)
        return UnavailableError(err, "%s: %s" % (where, why))
    if err == _errno.ERANGE:
        return InvalidRangeError(where)
    if err == EHWPOISON:
        return PoisonedPageError("%s: poisoned pages (their contents could not be served)" % where)
    if err == _errno.EBUSY and not op.startswith("ioctl"):
        return BusyError(err, where)
    if err == _errno.EOPNOTSUPP and op.startswith("background checkpoint"):
        return UnavailableError(err, where)
    if err == _errno.EINVAL and not op.startswith("ioctl"):
        return InvalidArgumentError(where)
    if op.startswith("object store:"):   # objstore.c: a chunk could not be had
        return ObjectStoreError("%s: %s" % (where, os.strerror(err)), what=what)
    if err == _errno.EBADMSG and not op.startswith("pool:"):   # pool.c: a memfd, not a file
        if op.startswith("verify:"):
            why = ("the snapshot file was changed or damaged after it was written "
                   "(restore(verify=True) checks every page it serves); that page cannot be "
                   "served")
        else:
            why = "the snapshot's data is damaged (changed after it was written, or corrupt)"
        return SnapshotDataError(err, "%s: %s" % (where, why))
    if err == _errno.ENOMEM:
        return OutOfMemoryError(err, "%s: out of memory" % where)
    return UffdError(err, "%s: %s" % (where, os.strerror(err)))
