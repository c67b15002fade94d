"""Fixtures and markers for the pylazymem test suite.

Markers (skips are on *declared features*, never on a bare try/except):
  uffd       the test needs userfaultfd: skipped when plm.features().mode == "unavailable"
  uffd_full  the test needs kernel accesses to be served: skipped unless mode == "full"
  core       the test needs the compiled core (in-process lazy regions, checkpoint, restore):
             skipped under the ctypes backend (PYLAZYMEM_BACKEND=ctypes). Applied automatically
             (see _CoreScan below) to every test whose code names the core's API; may also be
             written by hand for what that cannot see. Every other test runs under both
             backends: scripts/test.sh runs the suite once per backend.
  any_backend  the test names the core's API but runs under both backends (it checks what the
             ctypes backend does with it): no automatic `core` marker.
  cc         the test compiles csrc/ itself (gcc, nm): skipped when either is missing; it does
             not need the compiled core, so it runs under both backends.

Timeouts: pytest-timeout (configured in pyproject) bounds every test; tests that touch lazy
memory also carry an explicit @pytest.mark.timeout. If pytest-timeout is not installed, an
autouse faulthandler guard takes its place, so a hang never blocks the run forever. Anything
where a hang is plausible (GIL, fork, concurrency, close while faulting) runs in a subprocess
through `run_py`, which kills the whole process group and fails the test on timeout.
"""

import faulthandler
import importlib
import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import types
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


# ---- backends: which tests need the compiled core -------------------------------------------
#
# A test needs the core when the code it runs names the core's API. "The code it runs" is the
# test function, the fixtures it uses, the helper functions and classes of tests/ they call
# (followed through their globals, transitively), the Python scripts they hand to subprocesses
# (string constants, module-level script strings, helper functions those scripts call, .py
# files given as parameters) and pylazymem command lines. "The core's API" is
# pylazymem._backend.CORE_API (Region, Canonical, Handler, checkpoint, restore: the names the
# ctypes backend refuses), the compiled modules and the CLI commands of CORE_COMMANDS.
# The detection errs towards running: a test it misses fails loudly under ctypes (the
# stand-ins raise UnavailableError), it is never silently skipped; what it finds is written
# into the skip reason, so `pytest -rs` shows why each test did not run.

_CORE_NAMES = frozenset(plm._backend.CORE_API)
_CORE_MODULE_NAMES = frozenset({"_binding", "_lazymem", "_buffer", "pylazymem._binding",
                                "pylazymem._lazymem", "pylazymem._buffer", "pylazymem.region"})
# In scripts: a use of the API (an attribute, an import, the fixture), not a quoted module
# name (a script that blocks "pylazymem._lazymem" does not need it).
_CORE_TEXT = re.compile(
    r"(?<![\"'])\b(?:plm|pylazymem)\.(?:%s|_binding|_lazymem|_buffer|region)\b"
    r"|\b(?:import|from)\s+pylazymem\.(?:_binding|_lazymem|_buffer|region)\b"
    r"|\bfrom\s+pylazymem\s+import\s[^\n]*\b(?:%s|_binding|region)\b"
    r"|\bmake_region\b" % ("|".join(_CORE_NAMES), "|".join(_CORE_NAMES)))
_HELPER_REF = re.compile(r"\b(_\w+)\.(\w*)")


def _in_tests(obj):
    try:
        return os.path.dirname(os.path.abspath(inspect.getfile(obj))) == TESTS_DIR
    except TypeError:
        return False


class _CoreScan:
    """Finds the core's API in the code a test runs; results memoised per code object."""

    def __init__(self):
        self.memo = {}

    def code(self, code, glb, where):
        key = id(code)
        if key in self.memo:
            return self.memo[key][1]
        self.memo[key] = (code, [])          # in progress: a cycle adds nothing
        found = []
        names = set(code.co_names)
        for n in sorted(names & _CORE_NAMES):
            found.append("%s names %s" % (where, n))
        for n in sorted(names & _CORE_MODULE_NAMES):
            found.append("%s imports %s" % (where, n))
        for c in code.co_consts:
            if isinstance(c, types.CodeType):
                found += self.code(c, glb, where)
            elif isinstance(c, str):
                found += self.text(c, where)
        for n in sorted(names):
            obj = glb.get(n)
            if obj is None and os.path.isfile(os.path.join(TESTS_DIR, n + ".py")):
                obj = importlib.import_module(n)   # imported in the function: `from n import x`
            if isinstance(obj, str) and n.isupper():           # a module-level script
                found += self.text(obj, "%s (script %s)" % (where, n))
            elif obj is not None:
                found += self.obj(obj, names)
        self.memo[key] = (code, found)
        return found

    def obj(self, obj, names=()):
        """A helper of tests/: a function, a class (its methods) or a module (the attributes
        of it that the calling code names)."""
        if isinstance(obj, types.FunctionType) and _in_tests(obj):
            return self.code(obj.__code__, obj.__globals__, obj.__qualname__)
        if isinstance(obj, type) and _in_tests(obj):
            out = []
            for v in vars(obj).values():
                v = getattr(v, "__func__", v)
                if isinstance(v, types.FunctionType):
                    out += self.obj(v)
            return out
        if isinstance(obj, types.ModuleType) and _in_tests(obj):
            out = []
            for n in names:
                v = getattr(obj, n, None)
                if isinstance(v, (types.FunctionType, type)):
                    out += self.obj(v)
            return out
        return []

    def text(self, s, where):
        """A script or a command line: core names, helper calls, core CLI commands."""
        found = []
        if s in plm._backend.CORE_COMMANDS:
            found.append("%s runs 'pylazymem %s'" % (where, s))
        m = _CORE_TEXT.search(s)
        if m:
            found.append("%s runs %r" % (where, m.group(0)))
        for mod_name, attr in _HELPER_REF.findall(s):
            if not os.path.isfile(os.path.join(TESTS_DIR, mod_name + ".py")):
                continue
            mod = importlib.import_module(mod_name)   # tests/ helpers are on sys.path
            if attr and isinstance(getattr(mod, attr, None), types.FunctionType):
                found += self.obj(getattr(mod, attr))
            else:                             # a name built at run time: any of the module's
                found += [f for v in vars(mod).values() if isinstance(v, types.FunctionType)
                          and _in_tests(v) for f in self.obj(v)]
        return found

    def item(self, item):
        fn = getattr(item, "function", None)
        if fn is None:
            return []
        found = self.obj(fn) if _in_tests(fn) else []
        defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        for name in item.fixturenames:
            for fd in defs.get(name, ()):
                f = getattr(fd, "func", None)
                if isinstance(f, types.FunctionType) and _in_tests(f):
                    found += ["fixture %s: %s" % (name, x) for x in self.obj(f)]
        callspec = getattr(item, "callspec", None)
        for v in (callspec.params.values() if callspec else ()):
            if isinstance(v, str) and v.endswith(".py") and os.path.isfile(v):
                with open(v) as f:
                    found += self.text(f.read(), os.path.relpath(v, REPO_DIR))
        return found


def pytest_collection_modifyitems(session, config, items):
    scan = _CoreScan()
    for item in items:
        if item.get_closest_marker("core") or item.get_closest_marker("any_backend"):
            continue
        found = scan.item(item)
        if found:
            item.add_marker(pytest.mark.core(reason="; ".join(dict.fromkeys(found))))


_core_skips = []


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if plm.backend != "cffi":
        skipped = len(terminalreporter.stats.get("skipped", ()))
        terminalreporter.write_line(
            "pylazymem backend %s: %d tests skipped as needing the compiled core (marker "
            "'core'; pytest -rs shows what each uses), %d skipped for other declared reasons; "
            "every other test ran." % (plm.backend, len(_core_skips), skipped - len(_core_skips)))


def pytest_configure(config):
    config.addinivalue_line("markers", "uffd: needs userfaultfd (features().mode != 'unavailable')")
    config.addinivalue_line("markers", "core(reason): needs the compiled core (in-process lazy "
                                       "regions); skipped under PYLAZYMEM_BACKEND=ctypes")
    config.addinivalue_line("markers", "any_backend: names the core's API, runs under both "
                                       "backends (no automatic core marker)")
    config.addinivalue_line("markers", "cc: compiles csrc/ itself; skipped without gcc and nm")
    config.addinivalue_line("markers", "uffd_full: needs features().mode == 'full' "
                                       "(kernel accesses to missing pages are served)")
    if not config.pluginmanager.hasplugin("timeout"):
        config.addinivalue_line("markers", "timeout(seconds): per-test timeout (pytest-timeout)")


def pytest_runtest_setup(item):
    core = item.get_closest_marker("core")
    if core is not None and plm.backend != "cffi":
        _core_skips.append(item.nodeid)
        pytest.skip("needs the compiled core (%s); backend is %s"
                    % (core.kwargs.get("reason", "marked core"), plm.backend))
    if item.get_closest_marker("cc") is not None:
        missing = [t for t in ("gcc", "nm") if shutil.which(t) is None]
        if missing:
            pytest.skip("needs a C toolchain: %s not on PATH" % " and ".join(missing))
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
