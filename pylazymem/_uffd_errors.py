"""Exceptions of the pure-Python userfaultfd binding (pylazymem.uffd), with no compiled code.

This module must import without the cffi core: pylazymem.uffd is the backend that works
without a compiler. pylazymem._errors re-exports these classes, so there is one class of each
and both backends raise the same exception with the same words.
"""
import errno as _errno
import os


class LazyMemError(Exception):
    """Base class of every pylazymem error."""


class InvalidRangeError(LazyMemError, ValueError):
    """An offset or length that is unaligned, negative, empty or outside the region."""


class UnavailableError(LazyMemError, OSError):
    """userfaultfd cannot be had here; the message says why and what fixes it."""


class SnapshotError(LazyMemError, ValueError):
    """A snapshot file that cannot be used: truncated, corrupt, hostile or from elsewhere.
    (Defined in this leaf, with the other errors, so that the error module can derive from it
    without importing the file reader; pylazymem._snapfile re-exports it.)"""


class UffdError(LazyMemError, OSError):
    """A kernel call on the fault path or region failed."""


# What to do about a failure to get a userfaultfd, by errno (same words as pylazymem._errors).
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


# userfaultfd(UFFD_USER_MODE_ONLY) needs no privilege (Linux >= 5.11): EPERM from it under a
# seccomp filter means the filter refused the system call (Docker's and Podman's defaults do).
SECCOMP_BLOCKED = (
    "userfaultfd is blocked by seccomp: this process runs under a seccomp filter that refuses "
    "the userfaultfd() system call (Docker's and Podman's default profiles do), and "
    "/dev/userfaultfd is not usable here. Fix it in the container's run flags: pass the "
    "device, which works under the default profile and gives full mode: "
    "'docker run --device /dev/userfaultfd ...' (Podman: 'podman run --device "
    "/dev/userfaultfd ...'); or allow the system call with a seccomp profile: "
    "'docker run --security-opt seccomp=/path/to/profile.json ...' (pylazymem's "
    "docker/seccomp-userfaultfd.json; user-mode-only without CAP_SYS_PTRACE). "
    "Kubernetes: see docs/containers.md"
)


def seccomp_filtered():
    """Whether this process runs under a seccomp filter (Seccomp: 2 in /proc/self/status)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Seccomp:"):
                    return line.split()[1] == "2"
    except (OSError, IndexError):
        pass
    return False


def remedy(err):
    """What to do about failing to get a userfaultfd with errno `err`."""
    return _REMEDY.get(err, os.strerror(err))
