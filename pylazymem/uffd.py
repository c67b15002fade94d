"""userfaultfd in pure Python (ctypes, os, fcntl, select): no compiler, no cffi core.

This is pylazymem's low-level binding of Linux userfaultfd(2): acquiring a userfaultfd, the
UFFDIO_API handshake, registering ranges (MISSING, WP, MINOR), resolving faults (COPY,
ZEROPAGE, CONTINUE, POISON, MOVE, WRITEPROTECT, WAKE) and reading events (PAGEFAULT, FORK,
REMAP, REMOVE, UNMAP). Constants and structure layouts follow <linux/userfaultfd.h>; the test
suite checks them against the C header (tests/test_uffd_binding.py).

It imports nothing from the compiled core, so it works where the cffi extension cannot be built.

The GIL rule
------------
Python code can never serve faults of memory that the *same process* touches while holding
the GIL: the faulting thread blocks in the kernel with the GIL held, and the serving thread
needs the GIL to run. Use this binding to

- serve **another process**: that process creates the userfaultfd, registers its memory and
  passes the fd over a Unix socket (``socket.send_fds``, SCM_RIGHTS); every operation here
  acts on the memory of the process that created the userfaultfd (COPY reads its source from
  the calling process), which is how out-of-process page servers (Firecracker's) work;
  the exception is MOVE, which the kernel allows only in the process that owns the memory;
- fill your own registered memory **before** touching it (COPY, ZEROPAGE, CONTINUE, POISON,
  MOVE on a page nobody has faulted yet: the page is present when it is first touched).

Example: serve a child's faults::

    from pylazymem import uffd
    u = uffd.Userfaultfd(fd_received_from_child)      # the child did api() and register()
    for ev in u.read_events(max=16, timeout=1.0):
        if isinstance(ev, uffd.PageFault):
            u.copy(ev.address & ~(uffd.PAGE_SIZE - 1), page_bytes, uffd.PAGE_SIZE)

Semantics shared by the filling operations (copy, zeropage, continue_, poison, move):

- a page that is already present (``EEXIST``: someone else filled it) is not an error: it is
  skipped and the operation goes on after it; the return value counts only the bytes this
  call installed, and the whole range is woken at the end when a page was skipped;
- a partial operation (``EAGAIN`` after progress) is continued at once from where the kernel
  stopped; ``EAGAIN`` without progress means the address space is changing (a fork, mremap,
  madvise(MADV_DONTNEED/REMOVE) or munmap event of a non-cooperative userfaultfd is waiting to
  be read): the call retries with a short backoff for up to ``Userfaultfd.eagain_timeout``
  seconds, then raises ``UffdError(EAGAIN)``. A single-threaded server should read events
  before it retries (set ``eagain_timeout = 0`` to get the error at once);
- a failure raises UffdError naming the ioctl and the likely cause; its ``done`` attribute
  holds the bytes the call had installed before it failed.

Only machines with the generic ioctl encoding and a known syscall number are supported
(x86_64, aarch64, riscv64, loongarch64, 64-bit processes); elsewhere acquisition raises
UnavailableError.
"""
from __future__ import annotations

import ctypes
import dataclasses
import enum
import errno as _errno
import fcntl
import os
import operator
import platform
import select
import struct
import time
from typing import Callable, Dict, List, Optional, Tuple, Union

from ._uffd_errors import InvalidRangeError, LazyMemError, UffdError, UnavailableError, remedy

__all__ = [
    # acquisition and the fd object
    "open_userfaultfd", "probe", "Probe", "Userfaultfd", "ApiInfo", "ACQUIRE_MODES",
    "acquire_mode", "syscall_number", "SYS_userfaultfd", "PAGE_SIZE", "address_of",
    # events
    "PageFault", "Fork", "Remap", "Remove", "Unmap", "UnknownEvent", "Event", "parse_message",
    # flags
    "Feature", "Ioctl",
    # errors
    "LazyMemError", "UffdError", "UnavailableError", "InvalidRangeError",
]

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# ---------------------------------------------------------------------------------------------
# ioctl number encoding: the generic <asm-generic/ioctl.h> layout (x86, arm64, riscv,
# loongarch, s390). powerpc, mips, sparc and alpha use another layout and are not supported.
# ---------------------------------------------------------------------------------------------
_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    if not (0 <= nr < 1 << _IOC_NRBITS and 0 <= type_ < 1 << _IOC_TYPEBITS
            and 0 <= size < 1 << _IOC_SIZEBITS):
        raise ValueError("ioctl field out of range")
    return ((direction << _IOC_DIRSHIFT) | (type_ << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT)
            | (size << _IOC_SIZESHIFT))


def _IO(type_: int, nr: int) -> int:
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, ctype) -> int:
    return _IOC(_IOC_READ, type_, nr, ctypes.sizeof(ctype))


def _IOWR(type_: int, nr: int, ctype) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, ctypes.sizeof(ctype))


# The userfaultfd syscall number, per machine (64-bit processes). Generic syscall table
# (<asm-generic/unistd.h>): 282; x86_64 (<asm/unistd_64.h>): 323.
_SYSCALL_NUMBERS = {"x86_64": 323, "amd64": 323, "aarch64": 282, "arm64": 282,
                    "riscv64": 282, "loongarch64": 282}


def syscall_number(machine: Optional[str] = None) -> Optional[int]:
    """SYS_userfaultfd for `machine` (default: this one, by platform.machine()); None if unknown.

    A 32-bit process (other syscall table) on a 64-bit machine has no number here.
    """
    if machine is None:
        if struct.calcsize("P") != 8:
            return None
        machine = platform.machine()
    return _SYSCALL_NUMBERS.get(machine.lower())


SYS_userfaultfd = syscall_number()

# ---------------------------------------------------------------------------------------------
# Constants of <linux/userfaultfd.h>. Everything up to Linux 6.1 is checked against the
# installed header by the tests; the later additions (WP_UNPOPULATED 6.4, POISON 6.6,
# WP_ASYNC 6.7, MOVE 6.8, CONTINUE_MODE_WP 6.5) are the values of include/uapi/linux/
# userfaultfd.h in the kernel tree (Linux >= 6.8), also checked by the tests.
# ---------------------------------------------------------------------------------------------
USERFAULTFD_IOC = 0xAA
USERFAULTFD_IOC_NEW = _IO(USERFAULTFD_IOC, 0x00)   # ioctl on /dev/userfaultfd: a new uffd

UFFD_API = 0xAA
UFFD_USER_MODE_ONLY = 1     # userfaultfd(2) flag: only faults raised in user mode

# Feature bits (struct uffdio_api.features)
UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
UFFD_FEATURE_EVENT_FORK = 1 << 1
UFFD_FEATURE_EVENT_REMAP = 1 << 2
UFFD_FEATURE_EVENT_REMOVE = 1 << 3
UFFD_FEATURE_MISSING_HUGETLBFS = 1 << 4
UFFD_FEATURE_MISSING_SHMEM = 1 << 5
UFFD_FEATURE_EVENT_UNMAP = 1 << 6
UFFD_FEATURE_SIGBUS = 1 << 7
UFFD_FEATURE_THREAD_ID = 1 << 8
UFFD_FEATURE_MINOR_HUGETLBFS = 1 << 9
UFFD_FEATURE_MINOR_SHMEM = 1 << 10
UFFD_FEATURE_EXACT_ADDRESS = 1 << 11
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13     # Linux 6.4
UFFD_FEATURE_POISON = 1 << 14             # Linux 6.6
UFFD_FEATURE_WP_ASYNC = 1 << 15           # Linux 6.7
UFFD_FEATURE_MOVE = 1 << 16               # Linux 6.8

# ioctl command numbers (bit positions in the ioctls masks)
_UFFDIO_REGISTER = 0x00
_UFFDIO_UNREGISTER = 0x01
_UFFDIO_WAKE = 0x02
_UFFDIO_COPY = 0x03
_UFFDIO_ZEROPAGE = 0x04
_UFFDIO_MOVE = 0x05                       # Linux 6.8
_UFFDIO_WRITEPROTECT = 0x06
_UFFDIO_CONTINUE = 0x07
_UFFDIO_POISON = 0x08                     # Linux 6.6
_UFFDIO_API = 0x3F
UFFDIO = 0xAA

# Register modes
UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_REGISTER_MODE_MINOR = 1 << 2

# Operation modes
UFFDIO_COPY_MODE_DONTWAKE = 1 << 0
UFFDIO_COPY_MODE_WP = 1 << 1
UFFDIO_ZEROPAGE_MODE_DONTWAKE = 1 << 0
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
UFFDIO_WRITEPROTECT_MODE_DONTWAKE = 1 << 1
UFFDIO_CONTINUE_MODE_DONTWAKE = 1 << 0
UFFDIO_CONTINUE_MODE_WP = 1 << 1          # Linux 6.5
UFFDIO_POISON_MODE_DONTWAKE = 1 << 0      # Linux 6.6
UFFDIO_MOVE_MODE_DONTWAKE = 1 << 0        # Linux 6.8
UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES = 1 << 1

# Events (struct uffd_msg.event) and page-fault flags
UFFD_EVENT_PAGEFAULT = 0x12
UFFD_EVENT_FORK = 0x13
UFFD_EVENT_REMAP = 0x14
UFFD_EVENT_REMOVE = 0x15
UFFD_EVENT_UNMAP = 0x16
UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0
UFFD_PAGEFAULT_FLAG_WP = 1 << 1
UFFD_PAGEFAULT_FLAG_MINOR = 1 << 2


class Feature(enum.IntFlag):
    """UFFD_FEATURE_* bits: what api() asks for and what the kernel reports."""
    PAGEFAULT_FLAG_WP = UFFD_FEATURE_PAGEFAULT_FLAG_WP
    EVENT_FORK = UFFD_FEATURE_EVENT_FORK
    EVENT_REMAP = UFFD_FEATURE_EVENT_REMAP
    EVENT_REMOVE = UFFD_FEATURE_EVENT_REMOVE
    MISSING_HUGETLBFS = UFFD_FEATURE_MISSING_HUGETLBFS
    MISSING_SHMEM = UFFD_FEATURE_MISSING_SHMEM
    EVENT_UNMAP = UFFD_FEATURE_EVENT_UNMAP
    SIGBUS = UFFD_FEATURE_SIGBUS
    THREAD_ID = UFFD_FEATURE_THREAD_ID
    MINOR_HUGETLBFS = UFFD_FEATURE_MINOR_HUGETLBFS
    MINOR_SHMEM = UFFD_FEATURE_MINOR_SHMEM
    EXACT_ADDRESS = UFFD_FEATURE_EXACT_ADDRESS
    WP_HUGETLBFS_SHMEM = UFFD_FEATURE_WP_HUGETLBFS_SHMEM
    WP_UNPOPULATED = UFFD_FEATURE_WP_UNPOPULATED
    POISON = UFFD_FEATURE_POISON
    WP_ASYNC = UFFD_FEATURE_WP_ASYNC
    MOVE = UFFD_FEATURE_MOVE


class Ioctl(enum.IntFlag):
    """Bits of the ioctl masks that UFFDIO_API and UFFDIO_REGISTER report (1 << _UFFDIO_*)."""
    REGISTER = 1 << _UFFDIO_REGISTER
    UNREGISTER = 1 << _UFFDIO_UNREGISTER
    WAKE = 1 << _UFFDIO_WAKE
    COPY = 1 << _UFFDIO_COPY
    ZEROPAGE = 1 << _UFFDIO_ZEROPAGE
    MOVE = 1 << _UFFDIO_MOVE
    WRITEPROTECT = 1 << _UFFDIO_WRITEPROTECT
    CONTINUE = 1 << _UFFDIO_CONTINUE
    POISON = 1 << _UFFDIO_POISON
    API = 1 << _UFFDIO_API


# ---------------------------------------------------------------------------------------------
# Structure layouts. uffd_msg is __packed in C; every member is naturally aligned, so the
# natural ctypes layout is the same (size and offsets are checked; only alignof differs).
# Field names are the C names (remap.from included), so the tests can check them mechanically.
# ---------------------------------------------------------------------------------------------
_u64 = ctypes.c_uint64
_s64 = ctypes.c_int64


class UffdioApi(ctypes.Structure):
    _fields_ = [("api", _u64), ("features", _u64), ("ioctls", _u64)]


class UffdioRange(ctypes.Structure):
    _fields_ = [("start", _u64), ("len", _u64)]


class UffdioRegister(ctypes.Structure):
    _fields_ = [("range", UffdioRange), ("mode", _u64), ("ioctls", _u64)]


class UffdioCopy(ctypes.Structure):
    _fields_ = [("dst", _u64), ("src", _u64), ("len", _u64), ("mode", _u64), ("copy", _s64)]


class UffdioZeropage(ctypes.Structure):
    _fields_ = [("range", UffdioRange), ("mode", _u64), ("zeropage", _s64)]


class UffdioWriteprotect(ctypes.Structure):
    _fields_ = [("range", UffdioRange), ("mode", _u64)]


class UffdioContinue(ctypes.Structure):
    _fields_ = [("range", UffdioRange), ("mode", _u64), ("mapped", _s64)]


class UffdioPoison(ctypes.Structure):
    _fields_ = [("range", UffdioRange), ("mode", _u64), ("updated", _s64)]


class UffdioMove(ctypes.Structure):
    _fields_ = [("dst", _u64), ("src", _u64), ("len", _u64), ("mode", _u64), ("move", _s64)]


class _PagefaultFeat(ctypes.Union):
    _fields_ = [("ptid", ctypes.c_uint32)]


class _MsgPagefault(ctypes.Structure):
    _fields_ = [("flags", _u64), ("address", _u64), ("feat", _PagefaultFeat)]


class _MsgFork(ctypes.Structure):
    _fields_ = [("ufd", ctypes.c_uint32)]


class _MsgRemap(ctypes.Structure):
    _fields_ = [("from", _u64), ("to", _u64), ("len", _u64)]


class _MsgRemove(ctypes.Structure):
    _fields_ = [("start", _u64), ("end", _u64)]


class _MsgReserved(ctypes.Structure):
    _fields_ = [("reserved1", _u64), ("reserved2", _u64), ("reserved3", _u64)]


class _MsgArg(ctypes.Union):
    _fields_ = [("pagefault", _MsgPagefault), ("fork", _MsgFork), ("remap", _MsgRemap),
                ("remove", _MsgRemove), ("reserved", _MsgReserved)]


class UffdMsg(ctypes.Structure):
    _fields_ = [("event", ctypes.c_uint8), ("reserved1", ctypes.c_uint8),
                ("reserved2", ctypes.c_uint16), ("reserved3", ctypes.c_uint32),
                ("arg", _MsgArg)]


MSG_SIZE = ctypes.sizeof(UffdMsg)   # 32

# C struct name -> layout, for the header check.
STRUCTS = {
    "uffdio_api": UffdioApi, "uffdio_range": UffdioRange, "uffdio_register": UffdioRegister,
    "uffdio_copy": UffdioCopy, "uffdio_zeropage": UffdioZeropage,
    "uffdio_writeprotect": UffdioWriteprotect, "uffdio_continue": UffdioContinue,
    "uffdio_poison": UffdioPoison, "uffdio_move": UffdioMove, "uffd_msg": UffdMsg,
}

UFFDIO_API = _IOWR(UFFDIO, _UFFDIO_API, UffdioApi)
UFFDIO_REGISTER = _IOWR(UFFDIO, _UFFDIO_REGISTER, UffdioRegister)
UFFDIO_UNREGISTER = _IOR(UFFDIO, _UFFDIO_UNREGISTER, UffdioRange)
UFFDIO_WAKE = _IOR(UFFDIO, _UFFDIO_WAKE, UffdioRange)
UFFDIO_COPY = _IOWR(UFFDIO, _UFFDIO_COPY, UffdioCopy)
UFFDIO_ZEROPAGE = _IOWR(UFFDIO, _UFFDIO_ZEROPAGE, UffdioZeropage)
UFFDIO_MOVE = _IOWR(UFFDIO, _UFFDIO_MOVE, UffdioMove)
UFFDIO_WRITEPROTECT = _IOWR(UFFDIO, _UFFDIO_WRITEPROTECT, UffdioWriteprotect)
UFFDIO_CONTINUE = _IOWR(UFFDIO, _UFFDIO_CONTINUE, UffdioContinue)
UFFDIO_POISON = _IOWR(UFFDIO, _UFFDIO_POISON, UffdioPoison)

# ---------------------------------------------------------------------------------------------
# libc access. ctypes releases the GIL around foreign calls, so a blocking ioctl in one thread
# never stalls the others.
# ---------------------------------------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)
_c_ioctl = _libc.ioctl
_c_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_c_ioctl.restype = ctypes.c_int
_c_syscall = _libc.syscall
_c_syscall.argtypes = [ctypes.c_long, ctypes.c_long]
_c_syscall.restype = ctypes.c_long

DEFAULT_FLAGS = os.O_CLOEXEC | os.O_NONBLOCK
ACQUIRE_MODES = ("auto", "dev", "syscall", "user-mode-only")


def acquire_mode() -> str:
    """How to get a userfaultfd, from PYLAZYMEM_UFFD (auto | dev | syscall | user-mode-only)."""
    name = os.environ.get("PYLAZYMEM_UFFD", "auto")
    if name not in ACQUIRE_MODES:
        raise ValueError("PYLAZYMEM_UFFD=%r: expected one of %s" % (name, ", ".join(ACQUIRE_MODES)))
    return name


def _unsupported_machine() -> UnavailableError:
    return UnavailableError(
        _errno.ENOSYS,
        "userfaultfd: the ctypes binding does not know the syscall number and ioctl encoding "
        "of this machine (platform.machine()=%r, %d-bit process): use the cffi backend"
        % (platform.machine(), 8 * struct.calcsize("P")))


def _open_dev(flags: int) -> int:
    """A new userfaultfd from /dev/userfaultfd (Linux 6.1): fd, or -errno."""
    try:
        dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return -e.errno
    try:
        # The argument is the flags themselves, passed by value.
        rc = _c_ioctl(dev, USERFAULTFD_IOC_NEW, flags)
        return rc if rc >= 0 else -ctypes.get_errno()
    finally:
        os.close(dev)


def _open_syscall(flags: int) -> int:
    """A new userfaultfd from userfaultfd(2): fd, or -errno."""
    if SYS_userfaultfd is None:
        return -_errno.ENOSYS
    rc = _c_syscall(SYS_userfaultfd, flags)
    return int(rc) if rc >= 0 else -ctypes.get_errno()


# name of an acquisition path as the messages say it
_PATH_NAMES = {"dev": "/dev/userfaultfd", "syscall": "userfaultfd()",
               "user-mode-only": "userfaultfd(UFFD_USER_MODE_ONLY)"}


def _acquire(flags: int, acquire: str) -> Tuple[int, Optional[str], Optional[str], Dict[str, int]]:
    """Try the acquisition paths in order; (fd or -errno, mode, source, errno per path tried)."""
    tried: Dict[str, int] = {}
    if acquire in ("auto", "dev"):
        fd = _open_dev(flags)
        if fd >= 0:
            return fd, "full", "/dev/userfaultfd", tried
        tried["dev"] = -fd
    if acquire in ("auto", "syscall"):
        fd = _open_syscall(flags)
        if fd >= 0:
            return fd, "full", "syscall", tried
        tried["syscall"] = -fd
    if acquire in ("auto", "user-mode-only"):
        fd = _open_syscall(flags | UFFD_USER_MODE_ONLY)
        if fd >= 0:
            return fd, "user-mode-only", "syscall", tried
        tried["user-mode-only"] = -fd
    # The most telling error: a permission problem on the device beats "not built in".
    err = tried.get("user-mode-only") or tried.get("syscall") or tried.get("dev") or _errno.ENOSYS
    if tried.get("dev") in (_errno.EACCES, _errno.EPERM):
        err = tried["dev"]
    return -err, None, None, tried


def _tried_text(tried: Dict[str, int]) -> str:
    return "; ".join("%s: %s" % (_PATH_NAMES[k], os.strerror(v)) for k, v in tried.items())


def open_userfaultfd(flags: int = DEFAULT_FLAGS, acquire: Optional[str] = None) -> "Userfaultfd":
    """Acquire a new userfaultfd (without the UFFDIO_API handshake: call api() next).

    `acquire` picks the paths tried, in this order (default: PYLAZYMEM_UFFD, else "auto"):
      "dev"            /dev/userfaultfd + USERFAULTFD_IOC_NEW (Linux 6.1; needs access to the
                       device): full mode;
      "syscall"        userfaultfd(2): full mode for privileged callers (CAP_SYS_PTRACE) or
                       with vm.unprivileged_userfaultfd=1;
      "user-mode-only" userfaultfd(UFFD_USER_MODE_ONLY) (Linux 5.11, unprivileged): faults
                       raised by the kernel itself (read() into the range, KVM) fail with
                       EFAULT instead of being reported;
      "auto"           all three in that order.
    `flags` may hold O_CLOEXEC and O_NONBLOCK (default: both). The result's `mode` ("full" or
    "user-mode-only") and `source` ("/dev/userfaultfd" or "syscall") say what was had.
    Raises UnavailableError with what was tried and what would fix it.
    """
    if acquire is None:
        acquire = acquire_mode()
    if acquire not in ACQUIRE_MODES:
        raise ValueError("acquire=%r: expected one of %s" % (acquire, ", ".join(ACQUIRE_MODES)))
    if flags & ~(os.O_CLOEXEC | os.O_NONBLOCK):
        raise ValueError("flags=%#x: only O_CLOEXEC and O_NONBLOCK are allowed" % flags)
    if SYS_userfaultfd is None:
        raise _unsupported_machine()
    fd, mode, source, tried = _acquire(flags, acquire)
    if fd < 0:
        raise UnavailableError(-fd, "userfaultfd: %s (tried %s)"
                               % (remedy(-fd), _tried_text(tried)))
    u = Userfaultfd(fd, mode=mode, source=source)
    u.attempts = tuple(tried.items())
    return u


@dataclasses.dataclass(frozen=True)
class ApiInfo:
    """The answer to the UFFDIO_API handshake."""
    features: Feature   # everything this kernel supports (not only what was asked for)
    ioctls: Ioctl       # ioctls valid on the fd itself (API, REGISTER, UNREGISTER)
    enabled: Feature    # the features asked for, now in force on this userfaultfd


@dataclasses.dataclass(frozen=True)
class Probe:
    """What userfaultfd offers this process, found without the compiled core."""
    mode: str                 # "full" | "user-mode-only" | "unavailable"
    source: Optional[str]     # "/dev/userfaultfd" | "syscall" | None
    features: Feature         # supported by the kernel (0 when unavailable)
    ioctls: Ioctl
    dev_errno: int            # why /dev/userfaultfd failed (0: not tried or it worked)
    syscall_errno: int        # why userfaultfd() failed
    user_only_errno: int      # why userfaultfd(UFFD_USER_MODE_ONLY) failed
    api_errno: int            # why UFFDIO_API failed
    reason: str               # why degraded or unavailable, and the fix ("" in full mode)


def probe(acquire: Optional[str] = None) -> Probe:
    """Open a userfaultfd as open_userfaultfd(acquire=...) would, ask the kernel what it supports,
    close it. "Unavailable" is an answer here, not an exception."""
    if acquire is None:
        acquire = acquire_mode()
    if acquire not in ACQUIRE_MODES:
        raise ValueError("acquire=%r: expected one of %s" % (acquire, ", ".join(ACQUIRE_MODES)))
    if SYS_userfaultfd is None:
        return Probe("unavailable", None, Feature(0), Ioctl(0), 0, _errno.ENOSYS, 0, 0,
                     str(_unsupported_machine().strerror))
    fd, mode, source, tried = _acquire(DEFAULT_FLAGS, acquire)
    errs = dict(dev_errno=tried.get("dev", 0), syscall_errno=tried.get("syscall", 0),
                user_only_errno=tried.get("user-mode-only", 0))
    if fd < 0:
        return Probe("unavailable", None, Feature(0), Ioctl(0), api_errno=0,
                     reason="userfaultfd unavailable (%s): %s" % (_tried_text(tried), remedy(-fd)),
                     **errs)
    with Userfaultfd(fd, mode=mode, source=source) as u:
        try:
            info = u.api(0)
        except UffdError as e:
            return Probe("unavailable", None, Feature(0), Ioctl(0), api_errno=e.errno,
                         reason="UFFDIO_API failed: %s" % os.strerror(e.errno), **errs)
    reason = ""
    if mode == "user-mode-only":
        why = (_tried_text(tried) + "; for full mode: "
               + remedy(tried.get("dev") or tried.get("syscall") or _errno.EPERM)
               if tried else "requested with acquire='user-mode-only'")
        reason = ("user-mode-only userfaultfd: kernel accesses to missing pages (read() into "
                  "registered memory, os.write() from it, KVM) fail with EFAULT (%s)" % why)
    return Probe(mode, source, info.features, info.ioctls, api_errno=0, reason=reason, **errs)


# ---------------------------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PageFault:
    """UFFD_EVENT_PAGEFAULT: a thread touched a registered page and waits to be woken."""
    address: int     # page-aligned unless UFFD_FEATURE_EXACT_ADDRESS
    flags: int       # UFFD_PAGEFAULT_FLAG_*
    write: bool      # a store (UFFD_PAGEFAULT_FLAG_WRITE)
    wp: bool         # a store to a write-protected page (resolve with writeprotect(wp=False))
    minor: bool      # the page is in the page cache but not mapped (resolve with continue_())
    thread_id: int   # the faulting thread's id (with UFFD_FEATURE_THREAD_ID, else 0)


@dataclasses.dataclass(frozen=True)
class Fork:
    """UFFD_EVENT_FORK: the process forked; `ufd` is a new userfaultfd (now open in *this*
    process, owned by the caller) that receives the child's faults."""
    ufd: int


@dataclasses.dataclass(frozen=True)
class Remap:
    """UFFD_EVENT_REMAP: mremap() moved registered memory from `from_` to `to`."""
    from_: int
    to: int
    len: int


@dataclasses.dataclass(frozen=True)
class Remove:
    """UFFD_EVENT_REMOVE: madvise(MADV_DONTNEED/MADV_REMOVE) dropped [start, end); those
    pages fault again on the next access."""
    start: int
    end: int


@dataclasses.dataclass(frozen=True)
class Unmap:
    """UFFD_EVENT_UNMAP: munmap() (or mremap shrinking) removed [start, end)."""
    start: int
    end: int


@dataclasses.dataclass(frozen=True)
class UnknownEvent:
    """An event this binding does not know (a newer kernel): the raw 32-byte uffd_msg."""
    event: int
    raw: bytes


Event = Union[PageFault, Fork, Remap, Remove, Unmap, UnknownEvent]


def parse_message(data: bytes) -> Event:
    """One struct uffd_msg (32 bytes) as a typed event."""
    if len(data) != MSG_SIZE:
        raise ValueError("a uffd_msg has %d bytes, got %d" % (MSG_SIZE, len(data)))
    m = UffdMsg.from_buffer_copy(data)
    ev = m.event
    if ev == UFFD_EVENT_PAGEFAULT:
        pf = m.arg.pagefault
        flags = int(pf.flags)
        return PageFault(address=int(pf.address), flags=flags,
                         write=bool(flags & UFFD_PAGEFAULT_FLAG_WRITE),
                         wp=bool(flags & UFFD_PAGEFAULT_FLAG_WP),
                         minor=bool(flags & UFFD_PAGEFAULT_FLAG_MINOR),
                         thread_id=int(pf.feat.ptid))
    if ev == UFFD_EVENT_FORK:
        return Fork(ufd=int(m.arg.fork.ufd))
    if ev == UFFD_EVENT_REMAP:
        r = m.arg.remap
        return Remap(from_=int(getattr(r, "from")), to=int(r.to), len=int(r.len))
    if ev == UFFD_EVENT_REMOVE:
        return Remove(start=int(m.arg.remove.start), end=int(m.arg.remove.end))
    if ev == UFFD_EVENT_UNMAP:
        return Unmap(start=int(m.arg.remove.start), end=int(m.arg.remove.end))
    return UnknownEvent(event=int(ev), raw=bytes(data))


# ---------------------------------------------------------------------------------------------
# Errors: every message names the failing call, then what usually causes it.
# ---------------------------------------------------------------------------------------------
_HINTS = {
    ("*", _errno.ESRCH): "the process that owns the registered memory has exited",
    ("*", _errno.ENOENT): "the range is not registered with this userfaultfd, or not mapped",
    ("*", _errno.EINVAL): ("unaligned or out-of-range address or length, a mode the range was "
                           "not registered for, or an operation this memory or kernel does "
                           "not support"),
    ("*", _errno.EAGAIN): ("the address space is changing: a fork/mremap/madvise/munmap event "
                           "is waiting to be read; call read_events() and retry"),
    ("UFFDIO_REGISTER", _errno.EBUSY): "the range is registered with another userfaultfd",
    ("UFFDIO_REGISTER", _errno.EINVAL): (
        "unaligned range, a mode this memory does not support (MINOR needs shmem or "
        "hugetlbfs, WP needs UFFD_FEATURE_PAGEFAULT_FLAG_WP), or no UFFDIO_API handshake yet"),
    ("UFFDIO_REGISTER", _errno.EPERM): "the range is not writable",
    ("UFFDIO_CONTINUE", _errno.EFAULT): (
        "the page is not in the page cache: write it through another mapping first"),
    ("UFFDIO_MOVE", _errno.ENOENT): ("a source page is missing (pass allow_src_holes=True to "
                                     "skip holes), or the range is not registered"),
    ("UFFDIO_MOVE", _errno.EINVAL): (
        "MOVE works only in the process that owns the registered memory (the kernel refuses "
        "cross-process moves), between private anonymous ranges of equal protection, with "
        "the destination registered with this userfaultfd and page-aligned, non-overlapping "
        "ranges"),
    ("UFFDIO_MOVE", _errno.EBUSY): ("a source page is shared (after fork, KSM) or pinned: MOVE "
                                    "needs exclusive anonymous pages"),
    ("UFFDIO_API", _errno.EPERM): "UFFD_FEATURE_EVENT_FORK needs CAP_SYS_PTRACE",
}


def _hint(op: str, err: int) -> str:
    return _HINTS.get((op, err)) or _HINTS.get(("*", err), "")


def _uffd_error(op: str, err: int, hint: Optional[str] = None, done: int = 0) -> UffdError:
    call = op if op.startswith("read") else "ioctl(%s)" % op
    if hint is None:
        hint = _hint(op, err)
    msg = "%s: %s" % (call, os.strerror(err))
    if hint:
        msg += " (%s)" % hint
    e = UffdError(err, msg)
    e.done = done   # bytes the operation installed before it failed
    return e


def _buffer_address(src, length: int):
    """(address, keep-alive object) of a bytes-like source of at least `length` bytes."""
    if isinstance(src, int):
        if not 0 <= src or src + length > 1 << 64:   # (ctypes would truncate it)
            raise InvalidRangeError("source address %#x + %d bytes is not in the address space"
                                    % (src, length))
        return src, None
    mv = memoryview(src)
    if not mv.c_contiguous:
        raise ValueError("the source buffer must be C-contiguous")
    if mv.nbytes < length:
        raise ValueError("the source buffer has %d bytes, %d are needed" % (mv.nbytes, length))
    if isinstance(src, bytes):
        keep = ctypes.c_char_p(src)      # points into the bytes object, no copy
        return ctypes.cast(keep, ctypes.c_void_p).value, (keep, src)
    if mv.readonly:
        keep = (ctypes.c_char * length).from_buffer_copy(mv.cast("B")[:length])
    else:
        keep = (ctypes.c_char * mv.nbytes).from_buffer(mv.cast("B"))
    return ctypes.addressof(keep), keep


def address_of(buf) -> int:
    """The address of a writable, C-contiguous buffer (mmap, bytearray, numpy array, ...).

    The caller must keep `buf` alive (and not resize it) while the address is in use.
    """
    mv = memoryview(buf)
    if mv.readonly or not mv.c_contiguous:
        raise TypeError("address_of() needs a writable, C-contiguous buffer")
    if mv.nbytes == 0:
        raise ValueError("address_of() of an empty buffer")
    return ctypes.addressof(ctypes.c_char.from_buffer(mv.cast("B")))


# ---------------------------------------------------------------------------------------------
# The userfaultfd object
# ---------------------------------------------------------------------------------------------
class Userfaultfd:
    """A userfaultfd: handshake, registration, fault resolution and events.

    Wrap an fd you received from another process with ``Userfaultfd(fd)`` (its creator has
    done the handshake); get a new one with ``open_userfaultfd()``. Usable as a context
    manager; ``close()`` is idempotent. All addresses are in the address space of the process
    that created the userfaultfd, except COPY's source, which is read from the calling process.

    Attributes: `mode`, `source` (how it was had, None for a wrapped fd), `features` (what the
    kernel supports, after api()), `enabled` (the features asked for), `eagain_timeout`
    (seconds an operation retries EAGAIN without progress; None: forever, 0: not at all),
    `eagain_retries` (how many such retries happened: diagnostic).
    """

    def __init__(self, fd: int, *, mode: Optional[str] = None, source: Optional[str] = None,
                 owned: bool = True, page_size: int = PAGE_SIZE):
        if not isinstance(fd, int) or isinstance(fd, bool) or not 0 <= fd < 2 ** 31:
            # (ctypes would truncate a larger one: the ioctls would go to another fd)
            raise ValueError("fd must be a file descriptor (0 to 2**31 - 1), got %r" % (fd,))
        self._fd = fd
        self._owned = owned
        self.mode = mode
        self.source = source
        self.page_size = page_size
        self.features: Optional[Feature] = None
        self.enabled: Optional[Feature] = None
        self.attempts: Tuple[Tuple[str, int], ...] = ()
        self.eagain_timeout: Optional[float] = 1.0
        self.eagain_retries = 0

    # -- lifetime ---------------------------------------------------------------------------
    @classmethod
    def open(cls, flags: int = DEFAULT_FLAGS, acquire: Optional[str] = None) -> "Userfaultfd":
        """Same as open_userfaultfd()."""
        return open_userfaultfd(flags, acquire)

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("I/O operation on a closed userfaultfd")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Close the fd (if this object owns it). Registered ranges of the creating process
        are unregistered by the kernel when the last fd referring to the userfaultfd closes,
        and threads waiting on faults are woken (their accesses then behave as unregistered)."""
        fd, self._fd = self._fd, -1
        if fd >= 0 and self._owned:
            os.close(fd)

    def detach(self) -> int:
        """Give up ownership: return the fd, which this object no longer closes."""
        fd = self.fileno()
        self._fd = -1
        return fd

    def __enter__(self) -> "Userfaultfd":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "closed" if self._fd < 0 else "fd=%d" % self._fd
        return "<Userfaultfd %s mode=%s source=%s>" % (state, self.mode, self.source)

    # -- plumbing ---------------------------------------------------------------------------
    def _ioctl(self, request: int, arg) -> int:
        """ioctl with a pointer to `arg`: 0, or the errno."""
        rc = _c_ioctl(self.fileno(), request, ctypes.addressof(arg))
        return 0 if rc >= 0 else ctypes.get_errno()

    def _check_range(self, op: str, what: str, addr: int, length: int) -> None:
        ps = self.page_size
        try:   # (numpy integers too: what addresses computed with numpy are)
            if isinstance(addr, bool) or isinstance(length, bool):
                raise TypeError
            addr, length = operator.index(addr), operator.index(length)
        except TypeError:
            raise TypeError("%s: %s and length must be ints" % (op, what)) from None
        if length <= 0:
            raise InvalidRangeError("%s: length %d is not positive" % (op, length))
        if addr < 0 or addr % ps:
            raise InvalidRangeError("%s: %s %#x is not a multiple of the page size (%d)"
                                    % (op, what, addr, ps))
        if length % ps:
            raise InvalidRangeError("%s: length %d is not a multiple of the page size (%d)"
                                    % (op, length, ps))
        if addr + length > 1 << 64:
            # ctypes truncates to 64 bits: the operation landed on another address, or
            # reported a length it never did
            raise InvalidRangeError("%s: %s %#x + length %d is past the end of the address "
                                    "space" % (op, what, addr, length))

    def _eagain_wait(self, op: str, state: list, done: int) -> None:
        """Back off after EAGAIN without progress; raise when eagain_timeout is used up.
        state = [start time or None, delay]."""
        now = time.monotonic()
        if state[0] is None:
            state[0], state[1] = now, 50e-6
        limit = self.eagain_timeout
        if limit is not None and now - state[0] >= limit:
            raise _uffd_error(op, _errno.EAGAIN, done=done)
        time.sleep(state[1])
        state[1] = min(state[1] * 2, 0.01)
        self.eagain_retries += 1

    def _fill(self, op: str, request: int, arg: ctypes.Structure,
              setup: Callable[[ctypes.Structure, int, int], None], result: str, dst: int,
              length: int, wake: bool) -> int:
        """The COPY/ZEROPAGE/CONTINUE/POISON/MOVE loop: skip present pages (EEXIST), continue
        partial progress, retry EAGAIN; returns the bytes this call installed."""
        done = installed = 0
        skipped = False
        backoff = [None, 0.0]
        while done < length:
            setup(arg, done, length - done)
            setattr(arg, result, 0)
            err = self._ioctl(request, arg)
            n = getattr(arg, result)
            if n > 0:
                done += n
                installed += n
            if err == 0:
                break
            if err == _errno.EAGAIN:
                if n > 0:
                    backoff[0] = None
                else:
                    self._eagain_wait(op, backoff, installed)
                continue
            if err == _errno.EEXIST:
                done += self.page_size   # this page is already there: not ours to fill
                skipped = True
                continue
            raise _uffd_error(op, err, done=installed)
        # The kernel woke only what this call filled; someone may wait on a skipped page.
        if skipped and wake:
            self.wake(dst, length)
        return installed

    # -- handshake and registration ---------------------------------------------------------
    def api(self, features: int = 0) -> ApiInfo:
        """UFFDIO_API: enable `features` (Feature bits) on this userfaultfd; done once, before
        anything else. Returns everything the kernel supports and the fd's ioctls."""
        features = int(features)
        a = UffdioApi(api=UFFD_API, features=features)
        err = self._ioctl(UFFDIO_API, a)
        if err:
            hint = None
            if err == _errno.EINVAL:
                # Either unknown features, or a second handshake (received fds have had theirs).
                unsupported = 0 if self.features is not None else features & ~_supported_features()
                hint = ("features this kernel does not support: %s"
                        % _flag_names(Feature, unsupported) if unsupported
                        else "the handshake was already done on this userfaultfd")
            raise _uffd_error("UFFDIO_API", err, hint)
        self.features = Feature(a.features)
        self.enabled = Feature(features)
        return ApiInfo(features=self.features, ioctls=Ioctl(a.ioctls), enabled=self.enabled)

    def register(self, addr: int, length: int, missing: bool = True, wp: bool = False,
                 minor: bool = False) -> Ioctl:
        """UFFDIO_REGISTER [addr, addr+length) for MISSING (pages with no entry), WP
        (write-protected pages: needs UFFD_FEATURE_PAGEFAULT_FLAG_WP) and/or MINOR (shmem or
        hugetlbfs pages in the page cache but not mapped). Returns the ioctls valid on it."""
        self._check_range("UFFDIO_REGISTER", "address", addr, length)
        mode = ((UFFDIO_REGISTER_MODE_MISSING if missing else 0)
                | (UFFDIO_REGISTER_MODE_WP if wp else 0)
                | (UFFDIO_REGISTER_MODE_MINOR if minor else 0))
        if not mode:
            raise ValueError("register: choose at least one of missing, wp, minor")
        r = UffdioRegister(range=UffdioRange(addr, length), mode=mode)
        err = self._ioctl(UFFDIO_REGISTER, r)
        if err:
            raise _uffd_error("UFFDIO_REGISTER", err)
        return Ioctl(r.ioctls)

    def unregister(self, addr: int, length: int) -> None:
        """UFFDIO_UNREGISTER: stop tracking the range; threads waiting on it are woken."""
        self._check_range("UFFDIO_UNREGISTER", "address", addr, length)
        err = self._ioctl(UFFDIO_UNREGISTER, UffdioRange(addr, length))
        if err:
            raise _uffd_error("UFFDIO_UNREGISTER", err)

    # -- resolving faults -------------------------------------------------------------------
    def copy(self, dst: int, src, length: int, wake: bool = True, wp: bool = False) -> int:
        """UFFDIO_COPY: fill missing pages at `dst` with `length` bytes from `src` (an address
        in *this* process, or a bytes-like object). With wp=True the pages are mapped
        write-protected. Returns the bytes copied (present pages are skipped, see module doc)."""
        self._check_range("UFFDIO_COPY", "destination", dst, length)
        src_addr, keep = _buffer_address(src, length)
        mode = (0 if wake else UFFDIO_COPY_MODE_DONTWAKE) | (UFFDIO_COPY_MODE_WP if wp else 0)

        def setup(c, off, rest):
            c.dst, c.src, c.len, c.mode = dst + off, src_addr + off, rest, mode

        try:
            return self._fill("UFFDIO_COPY", UFFDIO_COPY, UffdioCopy(), setup, "copy",
                              dst, length, wake)
        finally:
            del keep

    def zeropage(self, dst: int, length: int, wake: bool = True) -> int:
        """UFFDIO_ZEROPAGE: map the shared zero page at missing pages (anonymous memory; a
        later store takes an ordinary copy-on-write fault). Returns the bytes mapped."""
        self._check_range("UFFDIO_ZEROPAGE", "destination", dst, length)
        mode = 0 if wake else UFFDIO_ZEROPAGE_MODE_DONTWAKE

        def setup(z, off, rest):
            z.range.start, z.range.len, z.mode = dst + off, rest, mode

        return self._fill("UFFDIO_ZEROPAGE", UFFDIO_ZEROPAGE, UffdioZeropage(), setup,
                          "zeropage", dst, length, wake)

    def continue_(self, addr: int, length: int, wake: bool = True, wp: bool = False) -> int:
        """UFFDIO_CONTINUE: map the pages that are already in the page cache (resolves MINOR
        faults; the contents were written through another mapping). Returns bytes mapped."""
        self._check_range("UFFDIO_CONTINUE", "address", addr, length)
        mode = ((0 if wake else UFFDIO_CONTINUE_MODE_DONTWAKE)
                | (UFFDIO_CONTINUE_MODE_WP if wp else 0))

        def setup(c, off, rest):
            c.range.start, c.range.len, c.mode = addr + off, rest, mode

        return self._fill("UFFDIO_CONTINUE", UFFDIO_CONTINUE, UffdioContinue(), setup,
                          "mapped", addr, length, wake)

    def poison(self, addr: int, length: int, wake: bool = True) -> int:
        """UFFDIO_POISON (Linux 6.6): mark missing pages poisoned, so that an access raises
        SIGBUS: how a fault that cannot be served fails loudly. Returns the bytes marked.
        The marker is not sticky: a later COPY (or ZEROPAGE) to the page replaces it."""
        self._check_range("UFFDIO_POISON", "address", addr, length)
        mode = 0 if wake else UFFDIO_POISON_MODE_DONTWAKE

        def setup(p, off, rest):
            p.range.start, p.range.len, p.mode = addr + off, rest, mode

        return self._fill("UFFDIO_POISON", UFFDIO_POISON, UffdioPoison(), setup, "updated",
                          addr, length, wake)

    def move(self, dst: int, src: int, length: int, wake: bool = True,
             allow_src_holes: bool = False) -> int:
        """UFFDIO_MOVE (Linux 6.8): move the pages at `src` (anonymous, private, exclusive to
        the process) to missing pages at `dst` without copying; `src` is left empty. The
        kernel allows it only when the caller *is* the process that registered the memory
        (cross-process moves fail with EINVAL): a page server in another process uses copy().
        With allow_src_holes, missing source pages are skipped instead of failing with ENOENT.
        Returns the bytes moved (holes included, as the kernel counts them)."""
        self._check_range("UFFDIO_MOVE", "destination", dst, length)
        self._check_range("UFFDIO_MOVE", "source", src, length)
        mode = ((0 if wake else UFFDIO_MOVE_MODE_DONTWAKE)
                | (UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES if allow_src_holes else 0))

        def setup(m, off, rest):
            m.dst, m.src, m.len, m.mode = dst + off, src + off, rest, mode

        return self._fill("UFFDIO_MOVE", UFFDIO_MOVE, UffdioMove(), setup, "move",
                          dst, length, wake)

    def writeprotect(self, addr: int, length: int, wp: bool = True, wake: bool = True) -> None:
        """UFFDIO_WRITEPROTECT: write-protect the range (wp=True) or lift the protection
        (wp=False), which resolves WP faults and wakes their threads unless wake=False."""
        self._check_range("UFFDIO_WRITEPROTECT", "address", addr, length)
        w = UffdioWriteprotect(range=UffdioRange(addr, length),
                               mode=(UFFDIO_WRITEPROTECT_MODE_WP if wp else 0)
                               | (0 if wake else UFFDIO_WRITEPROTECT_MODE_DONTWAKE))
        backoff = [None, 0.0]
        while True:
            err = self._ioctl(UFFDIO_WRITEPROTECT, w)
            if not err:
                return
            if err != _errno.EAGAIN:
                raise _uffd_error("UFFDIO_WRITEPROTECT", err)
            self._eagain_wait("UFFDIO_WRITEPROTECT", backoff, 0)

    def wake(self, addr: int, length: int) -> None:
        """UFFDIO_WAKE: wake the threads waiting on faults in the range (after operations
        done with wake=False)."""
        self._check_range("UFFDIO_WAKE", "address", addr, length)
        err = self._ioctl(UFFDIO_WAKE, UffdioRange(addr, length))
        if err:
            raise _uffd_error("UFFDIO_WAKE", err)

    # -- events -----------------------------------------------------------------------------
    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait until an event can be read (None: no limit); False on timeout.

        Needs an O_NONBLOCK userfaultfd: the kernel answers poll() on a blocking one with
        POLLERR at once ("poll() never guarantees that read won't block"). True is also
        returned for POLLERR (no handshake yet): the next read says why."""
        fd = self.fileno()
        if not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK:
            raise ValueError("waiting for events needs an O_NONBLOCK userfaultfd: the kernel "
                             "answers poll() on a blocking one with POLLERR")
        p = select.poll()
        p.register(fd, select.POLLIN)
        if timeout is not None and timeout != timeout:
            raise ValueError("timeout must be a number of seconds or None, not NaN")
        # poll() takes an int of milliseconds: an infinite or huge timeout is no limit
        ms = -1 if timeout is None or not timeout * 1000 < 2 ** 31 - 1 else \
            max(0, int(timeout * 1000 + 0.999))
        return bool(p.poll(ms))

    def read_events(self, max: int = 16, timeout: Optional[float] = None) -> List[Event]:
        """Read up to `max` messages (one read()). With `timeout`, wait for one first (up to
        that many seconds; needs an O_NONBLOCK fd, see wait()); without, a non-blocking fd
        returns [] at once when nothing is pending and a blocking fd waits for an event.
        A Fork event's `ufd` is a new fd owned by the caller."""
        # (the kernel returns at most what is pending: a bound on one read's buffer, not on
        # the queue; 10**12 asked for a terabyte of buffer and raised MemoryError)
        max = operator.index(max)
        if not 1 <= max <= 1 << 16:
            raise ValueError("max must be from 1 to 65536, not %d" % max)
        if timeout is not None and not self.wait(timeout):
            return []
        try:
            data = os.read(self.fileno(), max * MSG_SIZE)
        except BlockingIOError:
            return []
        except OSError as e:
            raise _uffd_error("read(userfaultfd)", e.errno,
                              "no UFFDIO_API handshake yet" if e.errno == _errno.EINVAL else "")
        return [parse_message(data[i:i + MSG_SIZE]) for i in range(0, len(data), MSG_SIZE)]


def _flag_names(cls, value: int) -> str:
    names = [m.name for m in cls if value & m.value]
    rest = value & ~sum(m.value for m in cls)
    if rest:
        names.append("%#x" % rest)
    return "|".join(names)


_supported_cache: Dict[str, int] = {}


def _supported_features() -> int:
    """Features this kernel supports (probed once with a throwaway userfaultfd), for messages."""
    if "f" not in _supported_cache:
        try:
            _supported_cache["f"] = int(probe("auto").features)
        except Exception:
            return 0
    return _supported_cache["f"]
