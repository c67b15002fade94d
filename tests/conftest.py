"""Fixtures and markers for the pylazymem test suite.

Markers: every test declares what it needs, and is skipped (with the reason) where this run
does not offer it; skips are on *declared needs*, never on a bare try/except. Declare them with
`pytestmark = ...` right after a module's imports when every test of the module has the need,
with a decorator on each test that has it when a module mixes, or with `marks=` on a
pytest.param. The needs (NEEDS below; a new one is one more entry):
  core       the compiled core: in-process lazy regions (Region, make_region), checkpoint,
             restore, Canonical, Handler, the C serving engine, the cffi module, `pylazymem
             demo|bench`, also when only a subprocess uses them. Skipped under the ctypes
             backend (PYLAZYMEM_BACKEND=ctypes); scripts/test.sh runs the suite once per
             backend, so every test without it runs under both. `core(reason="...")` adds to
             the skip reason. A test that needs the core and lacks the marker FAILS under
             ctypes (the stand-ins raise UnavailableError; a refusal the test swallows, or that
             a run_py child died of, fails it too): it is never skipped or passed by accident.
  uffd_full  kernel accesses to missing pages are served: skipped unless features().mode ==
             "full"
  uffd       userfaultfd: skipped when features().mode == "unavailable"
  cc         a C toolchain (gcc, nm): the test compiles csrc/ itself (tests/test_layering.py);
             it does not need the compiled core, so it runs under both backends
  huge_shared  features().huge_shared_pages: shared pages become huge folios (MADV_COLLAPSE)
  dontcache  preadv2(RWF_DONTCACHE) works in the temporary directory (Linux 6.14+)
  source     the source tree beside tests/ (csrc/, docs/): skipped where the suite runs
             against an installed package without it (the container matrix)
The run ends with how many tests each need skipped (pytest -rs shows each reason).

Timeouts: pytest-timeout (configured in pyproject) bounds every test; tests that touch lazy
memory also carry an explicit @pytest.mark.timeout. If pytest-timeout is not installed, an
autouse faulthandler guard takes its place, so a hang never blocks the run forever. Anything
where a hang is plausible (GIL, fork, concurrency, close while faulting) runs in a subprocess
through `run_py`, which kills the whole process group and fails the test on timeout.
"""

import faulthandler
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import zlib
from typing import NamedTuple

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pylazymem as plm  # noqa: E402

from _helpers import REPO_DIR, TESTS_DIR  # noqa: E402

# Imports every subprocess script starts with (prepended by run_py unless prelude=False).
PRELUDE = """\
import json, os, sys, threading, time, traceback
import numpy as np
import pylazymem as plm
from _helpers import PAGE_SIZE, pages, random_page, rss_anon, first_bad_pages
PS = PAGE_SIZE
"""


class PyResult(NamedTuple):
    returncode: int
    stdout: str
    stderr: str

    def describe(self):
        return (f"returncode={self.returncode}\n--- stdout ---\n{self.stdout}"
                f"\n--- stderr ---\n{self.stderr}")


def run_py(code, timeout=60, env=None, prelude=True, args=()):
    """Run a Python snippet in a fresh interpreter (sys.executable); return PyResult.

    `env` entries override the inherited environment (a value of None removes the variable).
    On timeout the test FAILS: the child gets SIGABRT first (PYTHONFAULTHANDLER makes it dump
    every thread's stack), then its whole process group (forked grandchildren too) is killed.
    """
    src = (PRELUDE if prelude else "") + textwrap.dedent(code)
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (TESTS_DIR, full_env.get("PYTHONPATH")) if p)
    full_env["PYTHONFAULTHANDLER"] = "1"
    full_env["PYTHONUNBUFFERED"] = "1"
    for k, v in (env or {}).items():
        if v is None:
            full_env.pop(k, None)
        else:
            full_env[k] = str(v)
    proc = subprocess.Popen([sys.executable, "-c", src, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=full_env, cwd=REPO_DIR,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.kill(proc.pid, signal.SIGABRT)    # faulthandler: dump every thread's stack
            proc.wait(timeout=3)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # and forked grandchildren
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
        res = PyResult(proc.returncode, out, err)
        pytest.fail(f"subprocess timed out after {timeout}s (hang?)\n{res.describe()}",
                    pytrace=False)
    _note_child_refusals(err)
    return PyResult(proc.returncode, out, err)


def run_py_ok(code, timeout=60, env=None, prelude=True, args=()):
    """run_py, asserting exit status 0; returns stdout."""
    res = run_py(code, timeout=timeout, env=env, prelude=prelude, args=args)
    assert res.returncode == 0, res.describe()
    return res.stdout


@pytest.fixture(name="run_py")
def run_py_fixture():
    return run_py


@pytest.fixture(name="run_py_ok")
def run_py_ok_fixture():
    return run_py_ok


# Acquisition modes probed in fresh interpreters (PYLAZYMEM_UFFD is read at probe time).
_probe_cache = {}


def probe_mode(acquire):
    """(mode, source, reason) that plm.features() reports with PYLAZYMEM_UFFD=acquire."""
    if acquire not in _probe_cache:
        out = run_py_ok("f = plm.features(); print(json.dumps([f.mode, f.source, f.reason]))",
                        timeout=60, env={"PYLAZYMEM_UFFD": acquire})
        _probe_cache[acquire] = tuple(json.loads(out.strip().splitlines()[-1]))
    return _probe_cache[acquire]


@pytest.fixture(name="probe_mode")
def probe_mode_fixture():
    return probe_mode


@pytest.fixture
def features():
    return plm.features()


@pytest.fixture
def make_region():
    """Factory for regions that are closed at teardown: make_region(nbytes, **kwargs)."""
    made = []

    def make(nbytes, **kwargs):
        r = plm.Region(nbytes, **kwargs)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


@pytest.fixture
def rng(request):
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


# ---- markers: what a test needs -------------------------------------------------------------
#
# Every test declares what it needs: `pytestmark = pytest.mark.core` (or a list with uffd,
# uffd_full, timeout) right after a module's imports when all its tests need it, a decorator
# (`@pytest.mark.core`) on the tests that do when a module mixes, or `marks=` on the pytest.param
# of a parametrised case that does. Nothing guesses it from the test's code.
#
# A need is a marker and a check: the check returns None when this run offers it, else the
# reason the test is skipped. The first unmet need (in this order) is the skip reason and the
# one it is counted under. A new need (say, a C compiler) is one more entry.

class Need(NamedTuple):
    marker: str          # the marker's name
    doc: str             # its registration line (`pytest --markers`)
    missing: object      # () -> None when this run offers it, else the skip reason


def _core_missing():
    if plm.backend == "cffi":
        return None
    return "needs the compiled core; this run's backend is %s" % plm.backend


def _uffd_full_missing():
    f = plm.features()
    return None if f.mode == "full" else (
        "needs full-mode userfaultfd; features().mode=%r: %s" % (f.mode, f.reason))


def _uffd_missing():
    f = plm.features()
    return None if f.mode != "unavailable" else "userfaultfd unavailable: %s" % f.reason


def _cc_missing():
    missing = [t for t in ("gcc", "nm") if shutil.which(t) is None]
    return "needs a C toolchain: %s not on PATH" % " and ".join(missing) if missing else None


def _source_missing():
    missing = [d for d in ("csrc", "docs") if not os.path.isdir(os.path.join(REPO_DIR, d))]
    return ("needs the source tree (%s beside tests/); this run uses an installed package"
            % " and ".join(missing)) if missing else None


def _shared_pages_missing():
    f = plm.features()
    return None if f.shared_pages else "needs shared pages: %s" % f.shared_pages_reason


def _huge_shared_missing():
    f = plm.features()
    return None if f.huge_shared_pages else (
        "needs huge shared pages: %s" % f.huge_shared_pages_reason)


def _background_checkpoint_missing():
    f = plm.features()
    return None if f.background_checkpoint else (
        "needs background checkpoints: %s" % f.background_checkpoint_reason)


def _s3_missing():
    why = os.environ.get("PLM_S3_UNAVAILABLE")
    if why:
        return "needs an S3 gateway: %s" % why
    if not os.environ.get("AWS_ENDPOINT_URL"):
        return ("needs an S3 gateway: AWS_ENDPOINT_URL is not set (bash scripts/s3-server.sh "
                "start; eval \"$(bash scripts/s3-server.sh env)\"; scripts/test.sh does both)")
    return None


def _uffd_fork_missing():
    """Whether a userfaultfd may ask for fork events here: the kernel grants
    UFFD_FEATURE_EVENT_FORK only with CAP_SYS_PTRACE (a container without it refuses)."""
    from pylazymem import uffd as U
    try:
        u = U.open_userfaultfd()
    except Exception as e:
        return "needs a userfaultfd: %s" % e
    try:
        u.api(U.Feature.EVENT_FORK)
    except Exception as e:
        return "needs UFFD_FEATURE_EVENT_FORK (CAP_SYS_PTRACE): %s" % e
    finally:
        u.close()
    return None


def _dontcache_missing():
    """Whether reads here can leave no page behind in the page cache (RWF_DONTCACHE, Linux
    6.14, and a file system that has it), tried on a file in the temporary directory."""
    import tempfile
    if not hasattr(os, "preadv"):
        return "needs os.preadv"
    with tempfile.NamedTemporaryFile() as f:
        f.write(b"x" * 4096)
        f.flush()
        try:
            os.preadv(f.fileno(), [bytearray(4096)], 0, 0x80)   # RWF_DONTCACHE
        except OSError as e:
            return "needs RWF_DONTCACHE reads in %s: %s" % (tempfile.gettempdir(), e)
    return None


def _netns_missing():
    from pylazymem.bench._machines import unavailable
    why = unavailable()
    return "needs network namespaces: %s" % why if why else None


def _package_missing(mark=None):
    """package("name", ...): the optional Python packages a test uses (pyarrow, torch, ...)."""
    names = mark.args if mark is not None else ()
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    return ("needs the Python package%s %s (pip install %s)"
            % ("s" if len(missing) > 1 else "", ", ".join(missing), " ".join(missing))
            if missing else None)


NEEDS = [
    Need("core", "core(reason=None): needs the compiled core (in-process lazy regions, "
                 "checkpoint, restore, the C serving engine, the cffi module); skipped under "
                 "PYLAZYMEM_BACKEND=ctypes", _core_missing),
    Need("uffd_full", "uffd_full: needs features().mode == 'full' (kernel accesses to missing "
                      "pages are served)", _uffd_full_missing),
    Need("uffd", "uffd: needs userfaultfd (features().mode != 'unavailable')", _uffd_missing),
    Need("shared_pages", "shared_pages: needs features().shared_pages (restore(share=True): "
                         "MINOR userfaultfd on shmem, memfd)", _shared_pages_missing),
    Need("huge_shared", "huge_shared: needs features().huge_shared_pages (shared pages made "
                        "huge folios with MADV_COLLAPSE, read through PMDs)",
         _huge_shared_missing),
    Need("background_checkpoint", "background_checkpoint: needs features()."
                                  "background_checkpoint (checkpoint(background=True))",
         _background_checkpoint_missing),
    Need("s3", "s3: needs the S3 gateway of scripts/s3-server.sh (a Ceph RADOS Gateway; "
               "scripts/test.sh starts it); skipped only where Ceph's packages are not to be "
               "had (PLM_S3_UNAVAILABLE says why)", _s3_missing),
    Need("uffd_fork", "uffd_fork: a userfaultfd with fork events (UFFD_FEATURE_EVENT_FORK "
                      "needs CAP_SYS_PTRACE)", _uffd_fork_missing),
    Need("dontcache", "dontcache: reads that leave the page cache as they found it "
                      "(RWF_DONTCACHE: Linux 6.14 and a file system with it)", _dontcache_missing),
    Need("netns", "netns: starts processes in network namespaces of their own (several "
                  "machines on one: root and iproute2)", _netns_missing),
    Need("cc", "cc: compiles csrc/ itself; skipped without gcc and nm", _cc_missing),
    Need("package", "package(name, ...): needs optional Python packages (pyarrow, torch, "
                    "safetensors, scikit-learn, ml_dtypes: the interop extra); skipped where one "
                    "is not installed", _package_missing),
    Need("source", "source: reads csrc/ and docs/ of the source tree; skipped where the suite "
                   "runs against an installed package", _source_missing),
]

_skipped_for = {n.marker: 0 for n in NEEDS}


def pytest_configure(config):
    for need in NEEDS:
        config.addinivalue_line("markers", need.doc)
    if not config.pluginmanager.hasplugin("timeout"):
        config.addinivalue_line("markers", "timeout(seconds): per-test timeout (pytest-timeout)")
    _record_refusals()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    del _refused[:]
    for need in NEEDS:
        mark = item.get_closest_marker(need.marker)
        if mark is None:
            continue
        # package(...) names what it needs in the marker's arguments; the others need nothing
        why = need.missing(mark) if need.marker == "package" else need.missing()
        if why is not None:
            _skipped_for[need.marker] += 1
            # which need skipped it, for docker/matrix_checks.py (a container with full
            # userfaultfd must skip nothing for uffd, while a missing package is fine)
            item.user_properties.append(("skipped_for", need.marker))
            extra = mark.kwargs.get("reason") or (
                mark.args[0] if mark.args and need.marker != "package" else None)
            pytest.skip("%s (%s)" % (why, extra) if extra else why)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = len(terminalreporter.stats.get("skipped", ()))
    declared = sum(_skipped_for.values())
    terminalreporter.write_line(
        "pylazymem backend %s: %d tests skipped as needing the compiled core (marker 'core'), "
        "%d for other declared needs (%s), %d for other reasons; every other test ran."
        % (plm.backend, _skipped_for["core"], declared - _skipped_for["core"],
           ", ".join("%s: %d" % (m, n) for m, n in _skipped_for.items() if m != "core"),
           skipped - declared))


# ---- a forgotten `core` marker fails loudly ---------------------------------------------------
#
# Under the ctypes backend the core's API (Region, checkpoint, restore, ...: _backend.CORE_API)
# is made of stand-ins that raise UnavailableError, so a test that needs the core and forgot the
# marker fails in the ctypes run. That holds even where the test would not notice the error (a
# pytest.raises(OSError) around plm.Region, a subprocess expected to fail): every refusal made
# during a test, in this process or in a run_py child (its traceback on stderr), is recorded,
# and a test not marked `core` that was refused something FAILS, saying to mark it.

_refused = []          # what the ctypes backend refused during the current test
_CHILD_REFUSAL = re.compile(r"^\S*(?:UnavailableError|CoreNotLoaded): .*"
                            r"(?:is not offered by|is not loaded under) the ctypes backend",
                            re.MULTILINE)
_MARK_IT = ("it needs the compiled core: mark it @pytest.mark.core, or its module "
            "`pytestmark = pytest.mark.core` (docs/backends.md, 'Tests: once per backend')")


def _record_refusals():
    """Under the ctypes backend, wrap _backend.unavailable (which every stand-in calls, at
    call time) so that refusals are recorded."""
    if plm.backend == "cffi" or getattr(plm._backend.unavailable, "_records", False):
        return
    unavailable = plm._backend.unavailable

    def recording(what):
        _refused.append(what)
        return unavailable(what)

    recording._records = True
    plm._backend.unavailable = recording


def _note_child_refusals(stderr):
    """A run_py child refused by the ctypes backend (an uncaught UnavailableError or
    CoreNotLoaded in its stderr) counts as a refusal of the test that ran it."""
    for m in _CHILD_REFUSAL.finditer(stderr or ""):
        _refused.append("a run_py subprocess: " + m.group(0)[:200])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if not _refused or item.get_closest_marker("core") is not None or rep.when == "teardown":
        return
    what = "; ".join(dict.fromkeys(_refused))
    if rep.failed:
        rep.sections.append(("pylazymem backend %s" % plm.backend,
                             "this test was refused %s: %s" % (what, _MARK_IT)))
    elif rep.when == "call":
        # passed, or skipped, although the core's API was refused: the test did not do what
        # it says; fail it rather than let the ctypes run pass by not testing
        rep.outcome = "failed"
        rep.longrepr = ("%s is not marked core, but under the %s backend it was refused %s "
                        "(UnavailableError) and still %s; %s"
                        % (item.nodeid, plm.backend, what,
                           "passed" if call.excinfo is None else "skipped", _MARK_IT))


@pytest.fixture(autouse=True)
def _hang_guard(request):
    """Fallback timeout when pytest-timeout is missing: dump stacks and exit instead of hanging."""
    if request.config.pluginmanager.hasplugin("timeout"):
        yield
        return
    m = request.node.get_closest_marker("timeout")
    secs = (m.args[0] if m and m.args else 300) + 30
    faulthandler.dump_traceback_later(secs, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
