"""Package surface: version, features() probe, enums, exception hierarchy, acquisition modes."""

import dataclasses
import json
import os

import pytest

import pylazymem as plm

# UFFD_FEATURE_* bits of the kernel ABI (linux/userfaultfd.h).
UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
UFFD_FEATURE_MINOR_SHMEM = 1 << 10
UFFD_FEATURE_POISON = 1 << 14
UFFD_FEATURE_WP_ASYNC = 1 << 15
UFFD_FEATURE_MOVE = 1 << 16


def test_version():
    assert plm.__version__ == "0.1.0"


def test_features_is_frozen_cached_dataclass():
    f = plm.features()
    assert dataclasses.is_dataclass(f)
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.mode = "full"
    assert plm.features() == f


def test_features_fields_consistent():
    f = plm.features()
    assert f.mode in ("full", "user-mode-only", "unavailable")
    assert isinstance(f.reason, str)
    assert isinstance(f.api_features, int)
    for name in ("has_wp", "has_wp_async", "has_minor_shmem", "has_poison", "has_move"):
        assert isinstance(getattr(f, name), bool), name
    if f.mode == "unavailable":
        assert f.source is None
        assert f.reason, "an unavailable userfaultfd must say why and how to fix it"
    else:
        assert f.source in ("/dev/userfaultfd", "syscall")
        assert f.api_features != 0
    if f.mode == "full":
        assert f.reason == ""
    if f.mode == "user-mode-only":
        assert "EFAULT" in f.reason, f.reason


def test_features_flags_match_kernel_bits():
    f = plm.features()
    if f.mode == "unavailable":
        pytest.skip("no userfaultfd: no feature bits")
    api = f.api_features
    assert f.has_minor_shmem == bool(api & UFFD_FEATURE_MINOR_SHMEM)
    assert f.has_poison == bool(api & UFFD_FEATURE_POISON)
    assert f.has_wp_async == bool(api & UFFD_FEATURE_WP_ASYNC)
    assert f.has_move == bool(api & UFFD_FEATURE_MOVE)
    if f.has_wp:
        assert api & UFFD_FEATURE_PAGEFAULT_FLAG_WP


@pytest.mark.timeout(120)
def test_dev_userfaultfd_is_tried_first(probe_mode):
    mode, source, reason = probe_mode("auto")
    if mode == "unavailable" or not os.access("/dev/userfaultfd", os.R_OK | os.W_OK):
        pytest.skip("/dev/userfaultfd not usable here")
    assert (mode, source) == ("full", "/dev/userfaultfd"), reason


@pytest.mark.timeout(120)
@pytest.mark.parametrize("acquire,source", [("dev", "/dev/userfaultfd"), ("syscall", "syscall")])
def test_forced_full_acquisition(probe_mode, acquire, source):
    mode, got_source, reason = probe_mode(acquire)
    if mode == "unavailable":
        assert reason, f"PYLAZYMEM_UFFD={acquire}: unavailable without a reason"
        pytest.skip(f"PYLAZYMEM_UFFD={acquire} unavailable here: {reason}")
    assert (mode, got_source) == ("full", source)


@pytest.mark.timeout(120)
def test_forced_user_mode_only(probe_mode):
    mode, source, reason = probe_mode("user-mode-only")
    if mode == "unavailable":
        assert reason
        pytest.skip(f"user-mode-only unavailable here: {reason}")
    assert mode == "user-mode-only"
    assert source in ("/dev/userfaultfd", "syscall")
    assert "EFAULT" in reason, f"reason must say kernel accesses fail with EFAULT: {reason!r}"


def test_enums():
    assert [(m.name, int(m)) for m in plm.PageState] == [
        ("EMPTY", 0), ("DEFERRED", 1), ("BUSY", 2), ("PRESENT", 3), ("POISONED", 4),
        ("PINNED", 5)]
    assert [(m.name, int(m)) for m in plm.PageClass] == [
        ("NONE", 0), ("ZERO", 1), ("CANONICAL", 2), ("DATA", 3), ("SNAPSHOT", 4)]
    F = plm.PageFlag
    assert (int(F.NEEDS_UPDATE), int(F.READAHEAD), int(F.WRITE_FAULT), int(F.MATERIALIZED)) == (
        1, 2, 4, 8)
    assert int(F.NEEDS_UPDATE | F.MATERIALIZED) == 9
    assert plm.ZERO is plm.PageClass.ZERO


@pytest.mark.parametrize("name,builtin", [
    ("InvalidArgumentError", ValueError),
    ("InvalidRangeError", ValueError),
    ("RegionClosedError", ValueError),
    ("UnavailableError", OSError),
    ("UffdError", OSError),
])
def test_exception_hierarchy(name, builtin):
    cls = getattr(plm, name)
    assert issubclass(cls, plm.LazyMemError)
    assert issubclass(cls, builtin)
    assert issubclass(plm.LazyMemError, Exception)


def test_public_names():
    for name in ("Region", "Canonical", "features", "ZERO", "PageState", "PageClass", "PageFlag",
                 "LazyMemError"):
        assert hasattr(plm, name), name


DROP_PRIVILEGES = """
    np.random.default_rng(0)              # lazy imports first: files may be unreadable later
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)                      # nobody: no /dev/userfaultfd, no CAP_SYS_PTRACE
"""


def _unprivileged_sysctl():
    try:
        with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
            return int(f.read())
    except OSError:
        return None


@pytest.mark.core
@pytest.mark.timeout(120)
def test_unprivileged_auto_mode(run_py_ok):
    """Without privilege, auto acquisition degrades as documented and says why."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop privileges")
    out = run_py_ok(DROP_PRIVILEGES + """
    f = plm.features()
    res = {"mode": f.mode, "source": f.source, "reason": f.reason}
    if f.mode != "unavailable":
        page = random_page(np.random.default_rng(1))
        with plm.Region(8 * PS) as r:
            r.defer_fill(0, r.nbytes, r.canonical(page.tobytes()))
            res["ok"] = bool((pages(r) == page).all())
    print(json.dumps(res))
    """, timeout=60)
    res = json.loads(out.strip().splitlines()[-1])
    if _unprivileged_sysctl() == 1:
        assert (res["mode"], res["source"]) == ("full", "syscall"), res
    elif res["mode"] == "unavailable":             # kernel without UFFD_USER_MODE_ONLY
        assert "/dev/userfaultfd" in res["reason"], res
    else:
        assert res["mode"] == "user-mode-only", res
        assert "EFAULT" in res["reason"] and "/dev/userfaultfd" in res["reason"], res
    if res["mode"] != "unavailable":
        assert res["ok"] is True, res


@pytest.mark.core
@pytest.mark.timeout(120)
def test_unavailable_raises_unavailable_error(run_py_ok):
    """PYLAZYMEM_UFFD=dev without access to the device: Region() raises UnavailableError
    (an OSError) whose message names the device and the fix."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop privileges")
    out = run_py_ok(DROP_PRIVILEGES + """
    f = plm.features()
    assert f.mode == "unavailable" and f.source is None, f
    assert "/dev/userfaultfd" in f.reason, f.reason
    try:
        plm.Region(1 << 20)
    except plm.UnavailableError as e:
        assert isinstance(e, OSError) and isinstance(e, plm.LazyMemError)
        assert "/dev/userfaultfd" in str(e), str(e)
        print("OK")
    """, env={"PYLAZYMEM_UFFD": "dev"}, timeout=60)
    assert out.strip().endswith("OK"), out


def test_user_mode_only_reason_gives_the_fix_for_each_way_to_full_mode():
    # With no device (ENOENT) and the syscall refused (EPERM), the advice was the device's
    # alone: the fix for the refused syscall (CAP_SYS_PTRACE, the sysctl) was missing.
    import errno
    from types import SimpleNamespace
    from pylazymem import _features
    f = SimpleNamespace(dev_errno=errno.ENOENT, syscall_errno=errno.EPERM, user_only_errno=0,
                        api_errno=0)
    why = _features._reason(f, "user-mode-only")
    assert "does not exist" in why and "vm.unprivileged_userfaultfd" in why, why
