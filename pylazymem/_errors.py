"""Exceptions, and the one place where a C status (-errno plus the failing operation) becomes one."""
import errno as _errno
import os

from ._binding import ffi, lib


class LazyMemError(Exception):
    """Base class of every pylazymem error."""


class InvalidArgumentError(LazyMemError, ValueError, TypeError):
    """A size, type or value that cannot be used (both a ValueError and a TypeError)."""


class InvalidRangeError(LazyMemError, ValueError):
    """An offset or length that is unaligned, negative, empty or outside the region."""


class RegionClosedError(LazyMemError, ValueError):
    """The region was closed (or belongs to the parent process after fork())."""


class UnavailableError(LazyMemError, OSError):
    """userfaultfd cannot be had here; the message says why and what fixes it."""


class UffdError(LazyMemError, OSError):
    """A kernel call on the fault path or region failed."""


# What to do about a failure to get a userfaultfd, by errno.
_REMEDY = {
    _errno.EPERM: (
        "not permitted: run as root (CAP_SYS_PTRACE), or make /dev/userfaultfd accessible "
        "(e.g. 'chmod 0666 /dev/userfaultfd' or a udev rule; in a container: "
        "--device /dev/userfaultfd), or allow the syscall with "
        "'sysctl -w vm.unprivileged_userfaultfd=1'. In Docker the default seccomp profile "
        "blocks userfaultfd: pass --device /dev/userfaultfd or a seccomp profile that allows it"
    ),
    _errno.EACCES: (
        "permission denied on /dev/userfaultfd: grant access to the device (chmod/ACL or a "
        "udev rule; in a container: --device /dev/userfaultfd), or run as root "
        "(CAP_SYS_PTRACE), or allow the syscall with 'sysctl -w vm.unprivileged_userfaultfd=1'"
    ),
    _errno.ENOENT: "/dev/userfaultfd does not exist (Linux < 6.1, or not in this container)",
    _errno.ENOSYS: "the kernel has no userfaultfd (CONFIG_USERFAULTFD=n) or a seccomp filter hides it",
    _errno.ENOMEM: "out of memory",
    _errno.ENFILE: "too many open files",
    _errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
}


def remedy(err):
    return _REMEDY.get(err, os.strerror(err))


def check(rc, what=""):
    """Turn a C return value into an exception; returns rc when it is not an error."""
    if rc >= 0:
        return rc
    err = -rc
    op = ffi.string(lib.lm_last_op()).decode()
    where = "%s: %s" % (what, op) if what else op
    if op == "userfaultfd":
        raise UnavailableError(err, "%s: %s" % (where, remedy(err)))
    if err == _errno.ERANGE:
        raise InvalidRangeError(where)
    if err == _errno.EINVAL and not op.startswith("ioctl"):
        raise InvalidArgumentError(where)
    raise UffdError(err, "%s: %s" % (where, os.strerror(err)))
