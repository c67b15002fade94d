"""What this machine and build can do: probed once, exposed as data, what tests skip on.

Both backends answer the same question the same way: the cffi backend asks the compiled core
(lm_probe), the ctypes backend asks pylazymem.uffd.probe(); the fields and the reason text are
built by the same code here, so the answers agree (tests/test_backend.py compares them).
"""
import dataclasses
import errno
import functools
import os
from typing import Optional

from . import _backend
from ._errors import SECCOMP_BLOCKED, remedy, seccomp_filtered

# Values of enum lm_mode, lm_source, lm_acquire and lm_uffd_feature in csrc/lazymem.h, written
# out so that this module needs no compiled core; tests/test_backend.py checks them against it.
MODES = {0: "unavailable", 1: "full", 2: "user-mode-only"}            # LM_MODE_*
SOURCES = {0: None, 1: "/dev/userfaultfd", 2: "syscall"}              # LM_SRC_*
ACQUIRE = {"auto": 0, "dev": 1, "syscall": 2, "user-mode-only": 3}    # LM_ACQ_*
UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0                               # LM_UFFD_FEATURE_*
UFFD_FEATURE_MINOR_SHMEM = 1 << 10
UFFD_FEATURE_POISON = 1 << 14
UFFD_FEATURE_WP_ASYNC = 1 << 15
UFFD_FEATURE_MOVE = 1 << 16
UFFD_FEATURE_EVENT_REMAP = 1 << 1


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
    # restore(share=True) can map snapshot pages from a pool shared between processes
    # (docs/shared-pages.md); if not, why and the fix
    shared_pages: bool = False
    shared_pages_reason: str = ""
    # Shared pages are huge folios, read through one page-table entry per 2 MiB: canonical
    # chunks always, a pool once it is complete (MADV_COLLAPSE, Linux 6.1; needs the compiled
    # core). Without it they are shared all the same, 4 KiB at a time; why, when False.
    huge_shared_pages: bool = False
    huge_shared_pages_reason: str = "needs the compiled core (the cffi backend)"
    # How Region.dirty_pages() knows which pages changed since a checkpoint or restore:
    # "wp-async" (async write-protect + PAGEMAP_SCAN) or "none" (every page not lazy is
    # reported; the caller compares signatures); why, when "none". A shared restore's region
    # says "page-tables" (Region.dirty_tracking, docs/design.md "Dirty tracking").
    dirty_tracking: str = "none"
    dirty_tracking_reason: str = ""
    # Codecs this build writes and reads compressed snapshots with (checkpoint(compress=),
    # docs/snapshot-format.md, version 3): "zstd", "lz4"; empty without the compiled core
    # (which links libzstd and liblz4).
    codecs: tuple = ()
    # checkpoint(background=True) (docs/design.md, "Background checkpoints"): the pause moves
    # page tables whole (UFFD_FEATURE_EVENT_REMAP) and pages are tracked with async
    # write-protect and PAGEMAP_SCAN (6.7); needs the compiled core. Why not, when False.
    background_checkpoint: bool = False
    background_checkpoint_reason: str = "needs the compiled core (the cffi backend)"
    # Which XXH3 the core hashes pages and chunks with (csrc/util.c): "xxh3-dispatch" (the
    # system libxxhash's run-time choice of AVX2 / AVX-512 kernel), "xxh3" (its plain,
    # baseline entry points: a library built without its dispatcher, or another CPU), or ""
    # without the compiled core.
    hashing: str = ""

    @property
    def unservable_fault(self):
        """How an access to a page that cannot be served fails: "SIGBUS" (the page is
        poisoned with UFFDIO_POISON, Linux 6.6+) or "SIGSEGV" (older kernels: the page is made
        inaccessible). Never a wait that does not end, never zeros."""
        return "SIGBUS" if self.has_poison else "SIGSEGV"


def _acquire_name():
    """PYLAZYMEM_UFFD (auto | dev | syscall | user-mode-only), checked."""
    name = os.environ.get("PYLAZYMEM_UFFD", "auto")
    if name not in ACQUIRE:
        raise ValueError("PYLAZYMEM_UFFD=%r: expected one of %s" % (name, ", ".join(ACQUIRE)))
    return name


def acquire_mode():
    """How to get a userfaultfd, from PYLAZYMEM_UFFD, as the core's enum lm_acquire value."""
    return ACQUIRE[_acquire_name()]


def _reason(f, mode):
    """Why the mode is degraded and the fix; `f` has dev/syscall/user_only/api_errno (the
    core's struct lm_features and uffd.Probe both do)."""
    tried = [("/dev/userfaultfd", f.dev_errno), ("userfaultfd()", f.syscall_errno),
             ("userfaultfd(UFFD_USER_MODE_ONLY)", f.user_only_errno)]
    failures = ["%s: %s" % (name, os.strerror(err)) for name, err in tried if err]
    if mode == "full":
        return ""
    if mode == "user-mode-only":
        # Both ways to full mode, each with its fix: the device's alone (a missing device,
        # ENOENT) hid the fix for a refused syscall (CAP_SYS_PTRACE, the sysctl).
        fixes = []
        for err in (f.dev_errno, f.syscall_errno):
            if err and remedy(err) not in fixes:
                fixes.append(remedy(err))
        why = ("; ".join(failures) + "; for full mode: " + " Or: ".join(fixes)
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


def _dirty(mode, feats):
    """Dirty tracking's mode here, and why not better (the kernel decides; same words under
    both backends)."""
    if mode == "unavailable":
        return "none", "no userfaultfd"
    if feats & UFFD_FEATURE_WP_ASYNC:
        return "wp-async", ""
    return "none", ("the kernel has no UFFD_FEATURE_WP_ASYNC and PAGEMAP_SCAN (Linux 6.7): "
                    "every page that is present or not lazy is reported dirty; soft-dirty "
                    "bits are not used (clearing them is process-wide)")


def _features(mode, source, feats, reason):
    feats = feats if mode != "unavailable" else 0
    dirty, dirty_reason = _dirty(mode, feats)
    return Features(
        mode=mode,
        source=source,
        api_features=feats,
        has_wp=bool(feats & UFFD_FEATURE_PAGEFAULT_FLAG_WP),
        has_wp_async=bool(feats & UFFD_FEATURE_WP_ASYNC),
        has_minor_shmem=bool(feats & UFFD_FEATURE_MINOR_SHMEM),
        has_poison=bool(feats & UFFD_FEATURE_POISON),
        has_move=bool(feats & UFFD_FEATURE_MOVE),
        reason=reason,
        dirty_tracking=dirty,
        dirty_tracking_reason=dirty_reason,
    )


def _probe_cffi(acquire):
    from ._binding import ffi, lib

    f = ffi.new("struct lm_features *")
    lib.lm_probe(ACQUIRE[acquire], f)
    mode = MODES[f.mode]
    out = _features(mode, SOURCES[f.source], f.api_features, _reason(f, mode))
    if mode == "unavailable":
        why = "no userfaultfd: " + out.reason
    else:
        rc = lib.lm_probe_shared(ACQUIRE[acquire])
        why = "" if rc == 0 else "%s: %s" % (ffi.string(lib.lm_last_op()).decode(),
                                             os.strerror(-rc))
    codecs = tuple(name for name, c in (("zstd", lib.LM_CODEC_ZSTD), ("lz4", lib.LM_CODEC_LZ4))
                   if lib.lm_codec_available(c))
    bg_why = _background_reason(mode, out.api_features)
    rc = lib.lm_probe_huge_shared()
    huge_why = "" if rc == 0 else "%s: %s" % (ffi.string(lib.lm_last_op()).decode(),
                                               os.strerror(-rc))
    return dataclasses.replace(out, shared_pages=not why, shared_pages_reason=why,
                               huge_shared_pages=not huge_why,
                               huge_shared_pages_reason=huge_why,
                               codecs=codecs, background_checkpoint=not bg_why,
                               background_checkpoint_reason=bg_why,
                               hashing=ffi.string(lib.lm_xxh3_impl()).decode())


def _background_reason(mode, feats):
    if mode == "unavailable":
        return "no userfaultfd"
    if not feats & UFFD_FEATURE_EVENT_REMAP:
        return "the kernel has no UFFD_FEATURE_EVENT_REMAP"
    if not feats & UFFD_FEATURE_WP_ASYNC:
        return ("the kernel has no UFFD_FEATURE_WP_ASYNC and PAGEMAP_SCAN (Linux 6.7): the "
                "pause could not find and keep the pages written before it")
    return ""


def _probe_ctypes(acquire):
    from . import uffd

    p = uffd.probe(acquire)
    # Same words as the core's probe, except where only the binding knows why (a machine
    # whose syscall number or ioctl layout it does not know).
    reason = p.reason if uffd.SYS_userfaultfd is None else _reason(p, p.mode)
    return dataclasses.replace(
        _features(p.mode, p.source, int(p.features), reason),
        shared_pages_reason="shared pages need the compiled core (the cffi backend)")


@functools.lru_cache(maxsize=None)
def _probe(acquire, backend):
    return _probe_cffi(acquire) if backend == "cffi" else _probe_ctypes(acquire)


def features() -> Features:
    """Probe (once per acquisition setting) what userfaultfd offers this process."""
    return _probe(_acquire_name(), _backend.NAME)
