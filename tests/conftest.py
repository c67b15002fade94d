"""Fixtures and markers for the pylazymem test suite.

Markers (skips are on *declared features*, never on a bare try/except):
  uffd       the test needs userfaultfd: skipped when plm.features().mode == "unavailable"
  uffd_full  the test needs kernel accesses to be served: skipped unless mode == "full"

Timeouts: pytest-timeout (configured in pyproject) bounds every test; tests that touch lazy
memory also carry an explicit @pytest.mark.timeout. If pytest-timeout is not installed, an
autouse faulthandler guard takes its place, so a hang never blocks the run forever. Anything
where a hang is plausible (GIL, fork, concurrency, close while faulting) runs in a subprocess
through `run_py`, which kills the whole process group and fails the test on timeout.
"""

import faulthandler
import json
import os
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


def pytest_configure(config):
    config.addinivalue_line("markers", "uffd: needs userfaultfd (features().mode != 'unavailable')")
    config.addinivalue_line("markers", "uffd_full: needs features().mode == 'full' "
                                       "(kernel accesses to missing pages are served)")
    if not config.pluginmanager.hasplugin("timeout"):
        config.addinivalue_line("markers", "timeout(seconds): per-test timeout (pytest-timeout)")


def pytest_runtest_setup(item):
    f = plm.features()
    if item.get_closest_marker("uffd_full") is not None and f.mode != "full":
        pytest.skip(f"needs full-mode userfaultfd; features().mode={f.mode!r}: {f.reason}")
    if item.get_closest_marker("uffd") is not None and f.mode == "unavailable":
        pytest.skip(f"userfaultfd unavailable: {f.reason}")


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
