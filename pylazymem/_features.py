"""What this machine and build can do: probed once, exposed as data, what tests skip on."""
import dataclasses
import errno
import functools
import os
from typing import Optional

from ._binding import ffi, lib
from ._errors import SECCOMP_BLOCKED, remedy, seccomp_filtered

MODES = {lib.LM_MODE_UNAVAILABLE: "unavailable", lib.LM_MODE_FULL: "full",
         lib.LM_MODE_USER_ONLY: "user-mode-only"}
SOURCES = {lib.LM_SRC_NONE: None, lib.LM_SRC_DEV: "/dev/userfaultfd", lib.LM_SRC_SYSCALL: "syscall"}
ACQUIRE = {"auto": lib.LM_ACQ_AUTO, "dev": lib.LM_ACQ_DEV, "syscall": lib.LM_ACQ_SYSCALL,
           "user-mode-only": lib.LM_ACQ_USER_ONLY}


@dataclasses.dataclass(frozen=True)
class Features:
    mode: str                 # "full" | "user-mode-only" | "unavailable"
    source: Optional[str]     # "/dev/userfaultfd" | "syscall" | None
    api_features: int
    has_wp: bool
    has_wp_async: bool
    has_minor_shmem: bool
    has_poison: bool
    has_move: bool
    reason: str               # why degraded, and the fix ("" in full mode)


def acquire_mode():
    """How to get a userfaultfd, from PYLAZYMEM_UFFD (auto | dev | syscall | user-mode-only)."""
    name = os.environ.get("PYLAZYMEM_UFFD", "auto")
    if name not in ACQUIRE:
        raise ValueError("PYLAZYMEM_UFFD=%r: expected one of %s" % (name, ", ".join(ACQUIRE)))
    return ACQUIRE[name]


def _reason(f, mode):
    tried = [("/dev/userfaultfd", f.dev_errno), ("userfaultfd()", f.syscall_errno),
             ("userfaultfd(UFFD_USER_MODE_ONLY)", f.user_only_errno)]
    failures = ["%s: %s" % (name, os.strerror(err)) for name, err in tried if err]
    if mode == "full":
        return ""
    if mode == "user-mode-only":
        why = ("; ".join(failures) + "; for full mode: " + remedy(f.dev_errno or f.syscall_errno)
               if failures else "requested with PYLAZYMEM_UFFD=user-mode-only")
        return ("user-mode-only userfaultfd: kernel accesses to missing pages (read() or "
                "readinto() into a region, os.write() from one, KVM) fail with EFAULT; call "
                "Region.materialize() on such buffers first (%s)" % why)
    if f.api_errno:
        return "UFFDIO_API failed: %s" % os.strerror(f.api_errno)
    if f.user_only_errno == errno.EPERM and seccomp_filtered():
        return "%s (%s)" % (SECCOMP_BLOCKED, "; ".join(failures))
    errs = [err for _, err in tried if err]
    main = next((e for e in errs if e in (1, 13)), errs[-1] if errs else 38)
    return "userfaultfd unavailable (%s): %s" % ("; ".join(failures), remedy(main))


@functools.lru_cache(maxsize=None)
def _probe(acquire):
    f = ffi.new("struct lm_features *")
    lib.lm_probe(acquire, f)
    mode = MODES[f.mode]
    feats = f.api_features if mode != "unavailable" else 0
    return Features(
        mode=mode,
        source=SOURCES[f.source],
        api_features=feats,
        has_wp=bool(feats & lib.LM_UFFD_FEATURE_PAGEFAULT_FLAG_WP),
        has_wp_async=bool(feats & lib.LM_UFFD_FEATURE_WP_ASYNC),
        has_minor_shmem=bool(feats & lib.LM_UFFD_FEATURE_MINOR_SHMEM),
        has_poison=bool(feats & lib.LM_UFFD_FEATURE_POISON),
        has_move=bool(feats & lib.LM_UFFD_FEATURE_MOVE),
        reason=_reason(f, mode),
    )


def features() -> Features:
    """Probe (once per acquisition setting) what userfaultfd offers this process."""
    return _probe(acquire_mode())
