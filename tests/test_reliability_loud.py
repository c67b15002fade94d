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
