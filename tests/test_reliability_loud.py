"""Reliability: failure is loud (issue 5). Region(n, _test_broken_source=True) is a test hook
whose every fill fails with EIO (a broken page source). An access to a page that needs a fill
must kill the process with SIGBUS (never hang, never read zeros), whichever thread touches it
and whatever the page was (fresh, deferred zero, deferred canonical; read or write); a kernel
access fails with EFAULT; materialize() raises UffdError naming the hook; prefetch() and the
background fill poison the pages they could not fill and count the errors in stats()."""

import json
import signal

import pytest

pytestmark = [pytest.mark.core, pytest.mark.uffd, pytest.mark.timeout(120)]

SETUP = """
r = plm.Region(16 * PS, _test_broken_source=True)
v = pages(r)
c = r.canonical(bytes(range(256)) * (PS // 256))
r.defer_fill(4 * PS, 4 * PS, c)          # pages 4..7: canonical
r.defer_fill(8 * PS, 4 * PS, plm.ZERO)   # pages 8..11: zero; 0..3 and 12..15 fresh
print("touching", flush=True)
"""

ACCESS = {
    "read-fresh": "x = int(v[1].sum())",
    "read-canonical": "x = int(v[5].sum())",
    "read-zero": "x = int(v[9].sum())",
    "write-fresh": "v[2, 100] = 1; x = int(v[2, 100])",
    "write-canonical": "v[6, 0] = 9; x = int(v[6, 0])",
}


def assert_sigbus(res):
    assert res.returncode == -signal.SIGBUS, (
        "expected death by SIGBUS (-7)\n" + res.describe())
    assert "touching" in res.stdout, res.describe()
    assert "RETURNED" not in res.stdout, "the access returned: " + res.describe()


@pytest.mark.parametrize("access", list(ACCESS))
def test_access_kills_with_sigbus(run_py, access):
    res = run_py(SETUP + ACCESS[access] + "\nprint('RETURNED', x, flush=True)\n", timeout=30)
    assert_sigbus(res)
    assert "Bus error" in res.stderr, res.describe()     # faulthandler names it


@pytest.mark.parametrize("access", ["read-canonical", "write-fresh"])
def test_access_from_another_thread_kills_with_sigbus(run_py, access):
    res = run_py(SETUP + """
def touch():
    print("thread", threading.get_ident() != threading.main_thread().ident, flush=True)
    """ + ACCESS[access] + """
    print('RETURNED', x, flush=True)
t = threading.Thread(target=touch)
t.start()
t.join(20)
print("RETURNED join", flush=True)
""", timeout=30)
    assert_sigbus(res)
    assert "thread True" in res.stdout, res.describe()


def test_many_threads_fault_at_once(run_py):
    """Eight threads on eight different broken pages: the process dies, nothing hangs."""
    res = run_py(SETUP + """
b = threading.Barrier(8)
def touch(p):
    b.wait()
    x = int(v[p].sum())
    print('RETURNED', x, flush=True)
ts = [threading.Thread(target=touch, args=(p,)) for p in (0, 3, 4, 7, 8, 11, 12, 15)]
for t in ts: t.start()
for t in ts: t.join(20)
""", timeout=30)
    assert_sigbus(res)


@pytest.mark.uffd_full
def test_kernel_access_fails_with_efault(run_py_ok):
    out = run_py_ok(SETUP + """
import errno
res = {}
rfd, wfd = os.pipe()
for name, page in (("fresh", 1), ("canonical", 5)):
    try:
        os.write(wfd, memoryview(r)[page * PS:(page + 1) * PS])
        res[name] = "ok"
    except OSError as e:
        res[name] = errno.errorcode.get(e.errno, e.errno)
st = r.stats()
print(json.dumps(dict(res=res, errors=st["errors"])))
""", timeout=30)
    m = json.loads(out.strip().splitlines()[-1])
    assert m["res"] == {"fresh": "EFAULT", "canonical": "EFAULT"}, m
    assert m["errors"] >= 2, m


def test_materialize_raises_uffd_error_naming_the_hook(run_py_ok):
    out = run_py_ok(SETUP + """
res = {}
for name, (off, n) in (("fresh", (0, 4)), ("canonical", (4, 4)), ("zero", (8, 4)),
                       ("all", (0, 16))):
    try:
        r.materialize(off * PS, n * PS)
        res[name] = None
    except Exception as e:
        res[name] = [type(e).__name__, isinstance(e, plm.UffdError), isinstance(e, OSError),
                     e.errno if isinstance(e, OSError) else None, str(e)]
m = r.meta
res["states"] = m["state"].tolist()
print(json.dumps(res))
""", timeout=30)
    m = json.loads(out.strip().splitlines()[-1])
    for name in ("fresh", "canonical", "zero", "all"):
        got = m[name]
        assert got is not None, "materialize(%s) succeeded on a broken source: %s" % (name, m)
        cls, is_uffd, is_os, err, msg = got
        assert is_uffd and is_os and err == 5, (name, got)
        assert "materialize" in msg and "test hook" in msg and "broken" in msg, (name, got)
    # nothing became present behind the failure
    assert 3 not in m["states"], m["states"]


def test_materialize_failure_leaves_pages_loud(run_py):
    """After a failed materialize(), the pages still fault and still fail: SIGBUS, not zeros."""
    res = run_py(SETUP + """
for off in (0, 4, 8):
    try:
        r.materialize(off * PS, 4 * PS)
    except plm.UffdError:
        pass
x = int(v[5].sum())
print('RETURNED', x, flush=True)
""", timeout=30)
    assert_sigbus(res)


def test_prefetch_and_background_poison_and_count(run_py):
    """prefetch() and the background fill cannot raise into the faulting thread later: the
    pages they could not fill are poisoned and counted in stats()["errors"]; touching one
    then raises SIGBUS."""
    res = run_py(SETUP + """
out = {}
try:
    r.prefetch([4, 5, 9])
    out["prefetch"] = "returned"
except plm.UffdError as e:
    out["prefetch"] = "UffdError: " + str(e)
st = r.stats()
out["after_prefetch"] = [st["errors"], st["last_error"]]
r.background_start()
deadline = time.monotonic() + 20
while r.stats()["background_running"] and time.monotonic() < deadline:
    time.sleep(0.01)
st = r.stats()
out["after_background"] = [st["errors"], st["last_error"], st["background_running"]]
POISONED = int(plm.PageFlag.POISONED)
out["poisoned"] = sorted(int(p) for p in np.nonzero(r.meta["flags"] & POISONED)[0])
print(json.dumps(out), flush=True)
x = int(v[6].sum())
print('RETURNED', x, flush=True)
""", timeout=30)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    assert lines, res.describe()
    m = json.loads(lines[-1])
    errors, last_error = m["after_prefetch"]
    if m["prefetch"] == "returned":
        assert errors >= 2 and last_error == 5, m       # pages 4 and 5 (9 needs no fill)
        assert {4, 5} <= set(m["poisoned"]), m
    else:
        assert "test hook" in m["prefetch"], m
    errors_bg, last_bg, running = m["after_background"]
    assert not running, m
    assert errors_bg > errors and last_bg == 5, m       # pages 6 and 7
    assert {6, 7} <= set(m["poisoned"]), m
    assert_sigbus(res)


# ---- issue 10: poisoned is a state every reader handles ----------------------------------

# Every 2nd fill attempt fails (the counter starts with a failure), so a prefetch of pages
# 0..7 one by one (max_cluster_pages=1: one fill each) poisons 0, 2, 4, 6 and fills the rest.
POISON_SETUP = """
import errno, xxhash
r = plm.Region(16 * PS, _test_broken_source=2, max_cluster_pages=1)
canon = (bytes(range(256)) * (PS // 256))
c = r.canonical(canon)
r.defer_fill(0, 8 * PS, c)
r.prefetch(list(range(8)))
m = r.meta
POISONED = sorted(int(p) for p in np.nonzero(m["state"] == int(plm.PageState.POISONED))[0])
print("poisoned", POISONED, flush=True)
assert POISONED == [0, 2, 4, 6], (POISONED, m["state"].tolist(), m["flags"].tolist())
assert (m["flags"][POISONED] & int(plm.PageFlag.POISONED)).all()
r._test_fail_fills(0)                        # the source works again from here on
"""


def _last_json(res):
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    assert lines, res.describe()
    return json.loads(lines[-1])


def test_poisoned_pages_are_a_state_every_reader_handles(run_py, tmp_path):
    """Issue 10, case 2: signatures(), checkpoint() and materialize() used to read a poisoned
    page as present and die with SIGBUS (from a helper thread with every signal blocked, the
    kernel kills the process). Each now raises PoisonedPageError naming the pages, and does
    the rest of its work; the file checkpoint() was writing is not left behind."""
    snap = str(tmp_path / "s.plm")
    res = run_py(POISON_SETUP + f"""
out = {{}}
def attempt(name, fn):
    try:
        fn()
        out[name] = None
    except plm.PoisonedPageError as e:
        out[name] = [sorted(int(p) for p in e.pages), isinstance(e, plm.LazyMemError),
                     isinstance(e, OSError) and e.errno == getattr(errno, 'EHWPOISON', 133), str(e)]
attempt("signatures", lambda: r.signatures())
attempt("signatures_clean", lambda: r.signatures(PS, PS))
out["sig1"] = int(r.signatures(PS, PS)[0]) == xxhash.xxh3_64_intdigest(canon)
attempt("checkpoint", lambda: plm.checkpoint(r, {snap!r}))
out["files"] = sorted(os.listdir(os.path.dirname({snap!r})))
attempt("materialize", lambda: r.materialize())
out["states"] = r.meta["state"].tolist()
print(json.dumps(out), flush=True)
""", timeout=60)
    assert res.returncode == 0, res.describe()
    m = _last_json(res)
    for name in ("signatures", "checkpoint", "materialize"):
        pages_, is_lm, is_hw, msg = m[name]
        assert pages_ == [0, 2, 4, 6] and is_lm and is_hw, (name, m[name])
        assert "poisoned" in msg and "0, 2, 4, 6" in msg, (name, msg)
    assert m["signatures_clean"] is None and m["sig1"], m
    assert m["files"] == [], m
    S = {int(s): s.name for s in __import__("pylazymem").PageState}
    # materialize() did everything else; the poisoned pages stay poisoned
    assert [S[s] for s in m["states"][:8]] == ["POISONED", "PRESENT"] * 4, m["states"]
    assert all(S[s] == "PRESENT" for s in m["states"][8:]), m["states"]


@pytest.mark.uffd_full
def test_poisoned_page_fails_loudly_after_being_dropped(run_py):
    """A poisoned page dropped behind pylazymem's back (madvise(MADV_DONTNEED) clears the
    kernel's poison marker) is poisoned again on its next fault: never zeros."""
    res = run_py(POISON_SETUP + """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
assert libc.madvise(ctypes.c_void_p(r.address + 2 * PS), PS, 4) == 0   # MADV_DONTNEED
fd = os.memfd_create("probe")
try:
    os.pwrite(fd, memoryview(r)[2 * PS:3 * PS], 0)
    print("READ", os.pread(fd, 8, 0), flush=True)
except OSError as e:
    print("EFAULT" if e.errno == errno.EFAULT else e, flush=True)
print(json.dumps({"state": int(r.meta["state"][2])}), flush=True)
""", timeout=60)
    assert res.returncode == 0, res.describe()
    assert "READ" not in res.stdout and "EFAULT" in res.stdout, res.describe()
    assert _last_json(res)["state"] == 4, res.describe()   # still POISONED


def test_defer_fill_recovers_poisoned_pages(run_py):
    """defer_fill() over poisoned pages gives them new contents (it drops the poison
    marker): afterwards they read the new contents, with no SIGBUS."""
    res = run_py(POISON_SETUP + """
r.defer_fill(0, 8 * PS, c)
v = pages(r)
ok = all(bytes(v[p]) == canon for p in range(8))
print(json.dumps({"ok": ok, "states": r.meta["state"][:8].tolist()}), flush=True)
""", timeout=60)
    assert res.returncode == 0, res.describe()
    m = _last_json(res)
    assert m["ok"] and m["states"] == [3] * 8, m


@pytest.mark.parametrize("access", ["read-canonical", "write-fresh"])
def test_without_uffdio_poison_an_unservable_fault_is_loud(run_py, access):
    """Issue 10, case 6: on kernels without UFFDIO_POISON (before 6.6) an unservable fault
    waited forever. Now the page is made inaccessible and the faulter woken: the retried
    access dies with SIGSEGV (simulated here with a test hook that makes the ioctl fail as an
    old kernel's does). features() says how unservable faults fail."""
    res = run_py("""
r = plm.Region(16 * PS, _test_broken_source=True, _test_no_poison=True)
v = pages(r)
c = r.canonical(bytes(range(256)) * (PS // 256))
r.defer_fill(4 * PS, 4 * PS, c)
print("touching", flush=True)
""" + ACCESS[access] + "\nprint('RETURNED', x, flush=True)\n", timeout=30)
    assert res.returncode in (-signal.SIGSEGV, -signal.SIGBUS), res.describe()
    assert "touching" in res.stdout and "RETURNED" not in res.stdout, res.describe()


def test_features_say_how_unservable_faults_fail(features):
    assert features.unservable_fault == ("SIGBUS" if features.has_poison else "SIGSEGV")


@pytest.mark.uffd_full
def test_split_run_failure_keeps_records_true(run_py):
    """Issue 10, case 7: when one half of a split run (>= 128 pages, filled by two threads)
    failed, the pages the other half had filled were handed back as lazy although their
    page-table entries were present: a later write to one was invisible to checkpoint().
    Invariant checked after a sequential stream with injected fill failures: a page whose PTE
    is present is PRESENT in its record, a lazy record has no PTE (every 3rd fill fails)."""
    res = run_py("""
import errno
N = 4096
# shared_first_touch=True: chunk blocks registered, so that every first touch is a fault we
# fill (kernel-served blocks, the default, would never reach the fill path)
r = plm.Region(N * PS, _test_broken_source=3, shared_first_touch=True)
c = r.canonical(bytes(range(256)) * (PS // 256))
r.defer_fill(0, r.nbytes, c)
fd = os.memfd_create("probe")
mv = memoryview(r)
for p in range(N):                     # a sequential stream: clusters grow to 512 pages
    try:
        os.pwrite(fd, mv[p * PS:p * PS + 8], 0)
    except OSError as e:
        assert e.errno == errno.EFAULT, e
with open("/proc/self/pagemap", "rb") as f:
    f.seek((r.address // PS) * 8)
    ent = np.frombuffer(f.read(N * 8), np.uint64)
present = (ent >> np.uint64(63)) & np.uint64(1)
st = r.meta["state"]
lazy = (st == int(plm.PageState.DEFERRED)) | (st == int(plm.PageState.EMPTY))
bad = np.nonzero(lazy & (present == 1))[0]
print(json.dumps({"bad": bad[:10].tolist(), "nbad": int(bad.size),
                  "poisoned": int((st == int(plm.PageState.POISONED)).sum()),
                  "readahead": r.stats()["readahead_pages"]}), flush=True)
""", timeout=90)
    assert res.returncode == 0, res.describe()
    m = _last_json(res)
    assert m["readahead"] > 0, m     # runs were filled (and some failed part-way)
    assert m["nbad"] == 0, m
