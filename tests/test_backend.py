"""Backend selection (PYLAZYMEM_BACKEND), the ctypes backend without the compiled core, and the
two backends agreeing (docs/backends.md).

Selection happens once, at import, so every case runs in a fresh interpreter. "Without the
compiled core" is made real there with a sys.meta_path finder that makes pylazymem._lazymem
and pylazymem._buffer unimportable, as on a machine where they were never built. Tests that
start a cffi-backend interpreter need the core on disk and carry the `core` marker.
"""
import dataclasses
import json
import os
import sys

import numpy as np
import pytest

import pylazymem as plm
from _helpers import PAGE_SIZE, REPO_DIR
from test_snapshot_format import UNTOUCHED, ZERO, SnapFile, stored

# pytester: the check that a forgotten `core` marker fails (end of this file)
pytest_plugins = ["pytester"]

# Most tests here run under both backends (many check what the ctypes backend refuses, in a
# subprocess); the ones that need the core say so with NEEDS_CORE or their own core marker.
pytestmark = [pytest.mark.timeout(120)]

NEEDS_CORE = pytest.mark.core(reason="starts an interpreter with the cffi backend")

# Makes the compiled modules unimportable, as where they were never built.
HIDE_CORE = '''
import importlib.abc, sys
class _NoCore(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in ("pylazymem._lazymem", "pylazymem._buffer"):
            raise ModuleNotFoundError("No module named %r (hidden by the test)" % name, name=name)
sys.meta_path.insert(0, _NoCore())
'''

# A core built for another version of the package (lm_abi_version() disagrees).
STALE_CORE = '''
import sys, types
_fake = types.ModuleType("pylazymem._lazymem")
_fake.ffi = object()
_fake.lib = types.SimpleNamespace(lm_abi_version=lambda: 999)
sys.modules["pylazymem._lazymem"] = _fake
'''

# What an interpreter reports about its backend, as JSON on the last line of stdout. Every name
# of CORE_API is called; the refusal (or the object) is reported.
REPORT = '''
import dataclasses, json, sys
import pylazymem as plm
out = {"backend": plm.backend, "features_backend": dataclasses.asdict(plm.backend_features),
       "features": dataclasses.asdict(plm.features()),
       "compiled": sorted(m for m in ("pylazymem._lazymem", "pylazymem._buffer", "_cffi_backend")
                          if sys.modules.get(m) is not None),
       "refused": {}}
for name in plm._backend.CORE_API:
    try:
        getattr(plm, name)(PAGE_SIZE)
    except plm.UnavailableError as e:
        assert isinstance(e, OSError) and isinstance(e, plm.LazyMemError)
        out["refused"][name] = str(e)
    except Exception as e:
        out["refused"][name] = None
    else:
        out["refused"][name] = None
try:
    import pylazymem.region
    out["region_import"] = None
except ImportError as e:
    out["region_import"] = str(e)
print(json.dumps(out))
'''


def interpreter(run_py, code, backend, hide=None, uffd=None, args=()):
    """Run `code` in a fresh interpreter with PYLAZYMEM_BACKEND=backend (None: unset), the core
    hidden ("missing"), stale ("stale") or as built (None); the PyResult."""
    prefix = {None: "", "missing": HIDE_CORE, "stale": STALE_CORE}[hide]
    env = {"PYLAZYMEM_BACKEND": backend, "PYLAZYMEM_UFFD": uffd}
    return run_py(prefix + "PAGE_SIZE = %d\n" % PAGE_SIZE + code, prelude=False, env=env,
                  timeout=60, args=args)


def report(run_py, backend, hide=None, uffd=None):
    res = interpreter(run_py, REPORT, backend, hide, uffd)
    assert res.returncode == 0, res.describe()
    return json.loads(res.stdout.strip().splitlines()[-1])


def assert_ctypes_refusals(rep, planted=()):
    assert rep["backend"] == "ctypes"
    loaded = [m for m in rep["compiled"] if m not in planted]
    assert loaded == [], "the ctypes backend loaded compiled code: %s" % loaded
    fb = rep["features_backend"]
    assert fb["name"] == "ctypes" and not fb["regions"] and not fb["checkpoint_restore"]
    assert fb["inspect"] and fb["uffd_binding"]
    assert "GIL" in fb["reason"] and "pip install -e ." in fb["reason"]
    for name, msg in rep["refused"].items():
        assert msg is not None, "%s was not refused with UnavailableError" % name
        assert "ctypes backend" in msg and "deadlock on the GIL" in msg, msg
        assert "pip install -e ." in msg and "PYLAZYMEM_BACKEND" in msg, msg
    assert set(rep["refused"]) == set(plm._backend.CORE_API)
    # pylazymem.region cannot be had either: refused by the backend, or (a stale core already
    # loaded) by the ABI check
    assert rep["region_import"] and ("ctypes backend" in rep["region_import"]
                                     or "rebuild" in rep["region_import"]), rep["region_import"]


# ---- selection ------------------------------------------------------------------------------

@pytest.mark.parametrize("value,expected", [
    pytest.param(None, "cffi", marks=NEEDS_CORE, id="unset"),
    pytest.param("", "cffi", marks=NEEDS_CORE, id="empty"),
    pytest.param("auto", "cffi", marks=NEEDS_CORE, id="auto"),
    pytest.param("cffi", "cffi", marks=NEEDS_CORE, id="cffi"),
    pytest.param(" CFFI ", "cffi", marks=NEEDS_CORE, id="cffi-spelling"),
    pytest.param("ctypes", "ctypes", id="ctypes"),
    pytest.param("Ctypes", "ctypes", id="ctypes-spelling"),
])
def test_selection_by_env_var(run_py, value, expected):
    rep = report(run_py, value)
    assert rep["backend"] == rep["features_backend"]["name"] == expected
    if expected == "cffi":
        fb = rep["features_backend"]
        assert fb["regions"] and fb["checkpoint_restore"] and fb["inspect"], fb
        assert "pylazymem._lazymem" in rep["compiled"]
        if rep["features"]["mode"] == "unavailable":
            # the kernel refuses userfaultfd here (a container's default seccomp profile):
            # Region fails for that reason, never as a refusal of the backend
            assert rep["refused"]["Region"] and "userfaultfd" in rep["refused"]["Region"]
            assert not any(m and "ctypes backend" in m for m in rep["refused"].values())
        else:
            assert rep["refused"] == dict.fromkeys(plm._backend.CORE_API), rep["refused"]
        assert rep["region_import"] is None
    else:
        # the core is built (it is, when this runs next to a cffi run), and still not loaded:
        # an explicit choice holds
        assert_ctypes_refusals(rep)
        assert "PYLAZYMEM_BACKEND=ctypes was requested" in rep["features_backend"]["reason"]


@pytest.mark.parametrize("value", ["cuda", "cffi,ctypes", "ctype", "1"])
def test_invalid_value_is_a_clear_error(run_py, value):
    res = interpreter(run_py, "import pylazymem", value)
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: pylazymem: PYLAZYMEM_BACKEND="), res.describe()
    assert repr(value.strip().lower()) in last and "auto, cffi, ctypes" in last, last


def test_explicit_cffi_without_core_names_the_fix(run_py):
    res = interpreter(run_py, "import pylazymem", "cffi", hide="missing")
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: pylazymem: PYLAZYMEM_BACKEND=cffi, but the compiled "
                           "core cannot be used"), res.describe()
    assert "No module named 'pylazymem._lazymem'" in last
    assert "pip install -e ." in last and "PYLAZYMEM_BACKEND=ctypes" in last, last


def test_explicit_cffi_with_stale_core_names_the_fix(run_py):
    res = interpreter(run_py, "import pylazymem", "cffi", hide="stale")
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert "PYLAZYMEM_BACKEND=cffi" in last and "ABI 999" in last and "rebuild" in last, last


@pytest.mark.parametrize("hide", ["missing", "stale"])
def test_auto_falls_back_to_ctypes_and_says_why(run_py, hide):
    rep = report(run_py, "auto", hide=hide)
    # the stale core's fake module is the test's own, put in sys.modules before the import
    assert_ctypes_refusals(rep, planted=["pylazymem._lazymem"] if hide == "stale" else [])
    why = "No module named 'pylazymem._lazymem'" if hide == "missing" else "ABI 999"
    assert why in rep["features_backend"]["reason"]
    assert all(why in msg for msg in rep["refused"].values()), rep["refused"]


# ---- the ctypes backend without the core ------------------------------------------------------

def test_ctypes_import_without_core(run_py, tmp_path):
    """Everything that needs no in-process region works with the core absent: the package,
    features(), exceptions, enums, dtypes, inspect() and the uffd binding."""
    path = str(tmp_path / "s.plm")
    write_snapshot(path)
    res = interpreter(run_py, '''
        import json, sys
        import numpy as np
        import pylazymem as plm
        from pylazymem import uffd
        assert plm.backend == "ctypes"
        f = plm.features()
        p = uffd.probe()
        assert (f.mode, f.source, f.api_features) == (p.mode, p.source, int(p.features))
        assert issubclass(plm.InvalidRangeError, ValueError)
        assert issubclass(plm.UnavailableError, OSError)
        assert plm.ZERO is plm.PageClass.ZERO and plm.META_DTYPE.itemsize == 32
        assert int(plm.PageFlag.BACKGROUND) == 64
        info = plm.inspect(sys.argv[1])
        try:
            plm.inspect(sys.argv[1] + ".missing")
        except plm.SnapshotError as e:
            missing = str(e)
        assert not [m for m in ("pylazymem._lazymem", "pylazymem._buffer", "_cffi_backend",
                                "pylazymem._binding") if sys.modules.get(m) is not None]
        print(json.dumps({"pbc": info.pages_by_class, "ws": info.working_set.tolist(),
                          "mode": f.mode, "missing": missing}))
    '''.replace("\n        ", "\n"), "ctypes", hide="missing", args=(path,))
    assert res.returncode == 0, res.describe()
    got = json.loads(res.stdout.strip().splitlines()[-1])
    info = plm.inspect(path)
    assert got["pbc"] == info.pages_by_class == {"zero": 2, "untouched": 1, "unique": 2,
                                                 "duplicate": 1}
    assert got["ws"] == info.working_set.tolist() == [3, 0]
    assert got["mode"] == plm.features().mode
    assert "no such snapshot file" in got["missing"]


def test_ctypes_refusals_without_core(run_py):
    assert_ctypes_refusals(report(run_py, "ctypes", hide="missing"))


CLI = '''
import runpy, sys
sys.argv = ["pylazymem"] + sys.argv[1:]
try:
    runpy.run_module("pylazymem", run_name="__main__", alter_sys=True)
except SystemExit as e:
    print("EXIT", e.code)
'''


def test_cli_features_and_inspect_without_core(run_py, tmp_path):
    path = str(tmp_path / "s.plm")
    write_snapshot(path)
    res = interpreter(run_py, CLI, "ctypes", hide="missing", args=("features", "--json"))
    # `features` exits 1 where userfaultfd is unavailable (a blocked container), as with cffi
    code = "EXIT 1" if plm.features().mode == "unavailable" else "EXIT 0"
    assert res.returncode == 0 and res.stdout.strip().endswith(code), res.describe()
    assert json.loads(res.stdout.rsplit("EXIT", 1)[0])["mode"] == plm.features().mode
    res = interpreter(run_py, CLI, "ctypes", hide="missing", args=("inspect", path, "--json"))
    assert res.stdout.strip().endswith("EXIT 0"), res.describe()
    d = json.loads(res.stdout.rsplit("EXIT", 1)[0])
    assert d["pages_by_class"] == plm.inspect(path).pages_by_class
    pytest.importorskip("matplotlib")
    png = str(tmp_path / "map.png")
    res = interpreter(run_py, CLI, "ctypes", hide="missing", args=("inspect", path, "--plot", png))
    assert res.stdout.strip().endswith("EXIT 0"), res.describe()
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_page_server_claim_holds_without_core(run_py):
    """backend_features.page_server is true only where the server imports under ctypes."""
    res = interpreter(run_py, '''
import json, sys
import pylazymem as plm
try:
    import pylazymem.server
    err = None
except ImportError as e:
    err = str(e)
print(json.dumps([plm.backend_features.page_server, err]))
''', "ctypes", hide="missing")
    assert res.returncode == 0, res.describe()
    claimed, err = json.loads(res.stdout.strip().splitlines()[-1])
    assert claimed == (err is None), (claimed, err)


# ---- this process's backend --------------------------------------------------------------------

def test_backend_features_describe_this_backend():
    fb = plm.backend_features
    assert isinstance(fb, plm.BackendFeatures) and dataclasses.is_dataclass(fb)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fb.regions = True
    assert fb.name == plm.backend in ("cffi", "ctypes")
    assert fb.regions == fb.checkpoint_restore == (plm.backend == "cffi")
    assert fb.inspect is True
    assert isinstance(fb.page_server, bool) and isinstance(fb.uffd_binding, bool)
    everything = fb.regions and fb.page_server and fb.uffd_binding
    assert (fb.reason == "") == everything, fb
    env = os.environ.get("PYLAZYMEM_BACKEND", "").strip().lower() or "auto"
    assert env == "auto" or env == plm.backend


def test_inspect_agrees_with_independent_reader(tmp_path):
    """inspect() under whichever backend runs this: against the file as written by hand."""
    path = str(tmp_path / "s.plm")
    write_snapshot(path)
    info = plm.inspect(path)
    assert info.pages_by_class == {"zero": 2, "untouched": 1, "unique": 2, "duplicate": 1}
    assert info.npages == 6 and info.page_size == PAGE_SIZE
    assert info.working_set.tolist() == [3, 0]
    assert info.stored_bytes == 2 * PAGE_SIZE
    with pytest.raises(plm.SnapshotError):
        plm.inspect(str(tmp_path / "missing.plm"))


# ---- the two backends agree --------------------------------------------------------------------

@NEEDS_CORE
@pytest.mark.parametrize("uffd", ["auto", "dev", "syscall", "user-mode-only"])
def test_features_agree_between_backends(run_py, uffd):
    """features() asks the core (cffi) or pylazymem.uffd (ctypes): same mode, source, feature
    bits and reason text, for every acquisition setting."""
    a = report(run_py, "cffi", uffd=uffd)
    b = report(run_py, "ctypes", uffd=uffd)
    assert (a["backend"], b["backend"]) == ("cffi", "ctypes")
    # Shared pages need the core: only the cffi backend can offer them.
    shared = [f.pop("shared_pages") for f in (a["features"], b["features"])]
    why = [f.pop("shared_pages_reason") for f in (a["features"], b["features"])]
    # Compressed snapshots are read and written by the core: only the cffi backend has codecs.
    codecs = [f.pop("codecs") for f in (a["features"], b["features"])]
    # So are background checkpoints (freeze.c).
    bg = [f.pop("background_checkpoint") for f in (a["features"], b["features"])]
    bg_why = [f.pop("background_checkpoint_reason") for f in (a["features"], b["features"])]
    assert bg[1] is False and "cffi" in bg_why[1] and bg[0] == (not bg_why[0])
    assert sorted(codecs[0]) == ["lz4", "zstd"] and codecs[1] in ([], ())
    # So is hashing (csrc/util.c): the ctypes backend hashes nothing natively.
    hashing = [f.pop("hashing") for f in (a["features"], b["features"])]
    assert hashing[0] in ("xxh3", "xxh3-dispatch") and hashing[1] == ""
    # So are huge shared pages (a probe of the core's, whatever userfaultfd offers).
    huge = [f.pop("huge_shared_pages") for f in (a["features"], b["features"])]
    huge_why = [f.pop("huge_shared_pages_reason") for f in (a["features"], b["features"])]
    assert huge[1] is False and "cffi" in huge_why[1] and huge[0] == (not huge_why[0])
    assert a["features"] == b["features"]
    assert shared[1] is False and "cffi" in why[1]
    assert shared[0] == (not why[0])
    if a["features"]["mode"] == "unavailable":
        assert shared[0] is False
    elif a["features"]["has_minor_shmem"] != shared[0]:
        assert "memfd" in why[0] or "REGISTER" in why[0], why[0]   # the feature alone is not all


@pytest.mark.core(reason="reads the compiled header through the cffi module")
def test_header_constants_match_the_core():
    """The enums, constants and dtypes written out in Python (so the ctypes backend has them)
    equal csrc/lazymem.h, and every constant of the header's families is mirrored."""
    from pylazymem import _features, _meta
    from pylazymem._binding import ffi, lib

    def family(prefix):
        return {n[len(prefix):]: getattr(lib, n) for n in dir(lib) if n.startswith(prefix)}

    assert family("LM_CLS_") == {m.name: m.value for m in _meta.PageClass}
    assert family("LM_F_") == {m.name: m.value for m in _meta.PageFlag}
    assert {n: v for n, v in family("LM_").items()
            if n in ("EMPTY", "DEFERRED", "BUSY", "PRESENT", "POISONED", "PINNED")} == {
        m.name: m.value for m in _meta.PageState}
    paths = family("LM_PATH_")
    assert paths.pop("NONE") == 0
    assert {v: n.lower() for n, v in paths.items()} == _meta.PATHS
    assert family("LM_SNAP_") == {"UNTOUCHED": _meta.SNAP_UNTOUCHED, "ZERO": _meta.SNAP_ZERO,
                                  "STORED": _meta.SNAP_STORED, "PARENT": _meta.SNAP_PARENT}
    names = {"UNAVAILABLE": "unavailable", "FULL": "full", "USER_ONLY": "user-mode-only"}
    assert {v: names[n] for n, v in family("LM_MODE_").items()} == _features.MODES
    srcs = {"NONE": None, "DEV": "/dev/userfaultfd", "SYSCALL": "syscall"}
    assert {v: srcs[n] for n, v in family("LM_SRC_").items()} == _features.SOURCES
    acq = {"AUTO": "auto", "DEV": "dev", "SYSCALL": "syscall", "USER_ONLY": "user-mode-only"}
    assert {acq[n]: v for n, v in family("LM_ACQ_").items()} == _features.ACQUIRE
    feats = family("LM_UFFD_FEATURE_")
    for n in ("PAGEFAULT_FLAG_WP", "MINOR_SHMEM", "POISON", "WP_ASYNC", "MOVE"):
        assert getattr(_features, "UFFD_FEATURE_" + n) == feats[n], n

    def struct_dtype(name):
        ctype = ffi.typeof(name)
        types = {"uint64_t": "<u8", "uint32_t": "<u4", "uint16_t": "<u2", "uint8_t": "u1"}
        fields = ctype.fields
        return np.dtype({"names": [n for n, _ in fields],
                         "formats": [types[f.type.cname] for _, f in fields],
                         "offsets": [f.offset for _, f in fields], "itemsize": ffi.sizeof(ctype)})

    assert _meta.META_DTYPE == struct_dtype("struct lm_page_meta")
    assert _meta.META_DTYPE.names == struct_dtype("struct lm_page_meta").names
    assert _meta.SNAP_PAGE_DTYPE == struct_dtype("struct lm_snap_page")
    assert _meta.SNAP_PAGE_DTYPE.names == struct_dtype("struct lm_snap_page").names


# ---- the suite's split between backends: a forgotten `core` marker fails ---------------------
#
# Tests declare that they need the compiled core (docs/backends.md); nothing checks the
# declarations by reading test code. What keeps them honest is that a test needing the core and
# not marked fails under the ctypes backend, whatever the test does with the refusal. Shown on a
# small suite run by pytest in a subprocess with this suite's own conftest.py: under ctypes the
# unmarked tests that use the core fail and say to mark them, the marked ones are skipped with
# the reason and counted; under cffi (the control: the same tests are right) all of them pass.

FORGETFUL = """
import os
import pytest
import pylazymem as plm

PS = os.sysconf("SC_PAGE_SIZE")


def test_forgot_the_marker():
    plm.Region(PS).close()


def test_forgot_the_marker_and_swallowed_the_refusal():
    try:
        plm.Region(PS).close()
    except OSError:
        pass


def test_forgot_the_marker_child_must_succeed(run_py):
    res = run_py("plm.Region(PS).close()")
    assert res.returncode == 0, res.describe()


def test_forgot_the_marker_child_must_fail(run_py):
    res = run_py("plm.restore('/nonexistent/x.snap')")
    assert res.returncode != 0


def test_needs_nothing():
    assert plm.features().mode in ("full", "user-mode-only", "unavailable")


@pytest.mark.core
def test_marked():
    plm.Region(PS).close()


@pytest.mark.core(reason="the C engine")
def test_marked_with_reason():
    plm.Region(PS).close()
"""

MARKED_MODULE = """
import os
import pytest
import pylazymem as plm

pytestmark = [pytest.mark.core, pytest.mark.uffd]


def test_in_a_marked_module():
    plm.Region(os.sysconf("SC_PAGE_SIZE")).close()
"""


@pytest.mark.parametrize("backend", [
    pytest.param("cffi", marks=[pytest.mark.core(reason="the control run"), pytest.mark.uffd]),
    "ctypes"])
def test_forgotten_core_marker_fails_under_ctypes(pytester, monkeypatch, backend):
    with open(os.path.join(REPO_DIR, "tests", "conftest.py")) as f:
        pytester.makeconftest(f.read())
    pytester.makepyfile(test_forgetful=FORGETFUL, test_marked_module=MARKED_MODULE)
    monkeypatch.setenv("PYLAZYMEM_BACKEND", backend)
    monkeypatch.setenv("PYTHONPATH", os.path.join(REPO_DIR, "tests"))   # _helpers
    res = pytester.runpytest_subprocess("-rfs", "-p", "no:cacheprovider", "-o", "timeout=60",
                                        timeout=100)
    out = res.stdout.str()
    if backend == "cffi":
        res.assert_outcomes(passed=8)
        assert "backend cffi: 0 tests skipped as needing the compiled core" in out, out
        return
    res.assert_outcomes(passed=1, failed=4, skipped=3)
    # what each unmarked test that uses the core is told
    res.stdout.fnmatch_lines([
        # the refusal raised through the test
        "*_ test_forgot_the_marker _*",
        "*UnavailableError*pylazymem.Region is not offered by the ctypes backend*",
        "*- pylazymem backend ctypes -*",
        "this test was refused pylazymem.Region: it needs the compiled core: mark it "
        "@pytest.mark.core*",
        # the refusal swallowed by the test: failed, not passed
        "*_ test_forgot_the_marker_and_swallowed_the_refusal _*",
        "test_forgetful.py::test_forgot_the_marker_and_swallowed_the_refusal is not marked "
        "core, but under the ctypes backend it was refused pylazymem.Region (UnavailableError) "
        "and still passed; it needs the compiled core: mark it @pytest.mark.core*",
        # a run_py child that died of the refusal: the test's own assertion, and the advice
        "*_ test_forgot_the_marker_child_must_succeed _*",
        "*UnavailableError: *pylazymem.Region is not offered by the ctypes backend*",
        "*- pylazymem backend ctypes -*",
        "this test was refused a run_py subprocess: *UnavailableError: *pylazymem.Region is "
        "not offered by the ctypes backend*mark it @pytest.mark.core*",
        # a child expected to fail, failing for the wrong reason: failed, not passed
        "*_ test_forgot_the_marker_child_must_fail _*",
        "test_forgetful.py::test_forgot_the_marker_child_must_fail is not marked core, but "
        "under the ctypes backend it was refused a run_py subprocess: *pylazymem.restore() is "
        "not offered by the ctypes backend*and still passed; *mark it @pytest.mark.core*",
    ])
    # the marked ones: skipped with the reason, and counted
    res.stdout.fnmatch_lines_random([
        "SKIPPED [[]2[]] conftest.py:*: needs the compiled core; this run's backend is ctypes",
        "SKIPPED [[]1[]] conftest.py:*: needs the compiled core; this run's backend is ctypes "
        "(the C engine)",
        "pylazymem backend ctypes: 3 tests skipped as needing the compiled core (marker "
        "'core'), 0 for other declared needs (*), 0 for other reasons; every other test ran.",
        "FAILED test_forgetful.py::test_forgot_the_marker - pylazymem*",
    ])


# ---- helpers ----------------------------------------------------------------------------------

def write_snapshot(path):
    """A 6-page snapshot by the independent writer of test_snapshot_format (no core needed):
    pages 0 and 4 share contents A, page 2 holds B, pages 1 and 3 are zero, page 5 untouched;
    working set [3, 0]."""
    ps = PAGE_SIZE
    a = bytes([7]) * ps
    b = bytes(range(256)) * (ps // 256)
    sf = SnapFile.new(ps, 6, store=a + b, ws=[3, 0],
                      pmap=[stored(0), ZERO, stored(1), ZERO, stored(0), UNTOUCHED])
    with open(path, "wb") as f:
        f.write(sf.build())
    return path


@pytest.mark.timeout(300)
def test_build_without_the_core_runs_ctypes(tmp_path):
    """setup.py with PYLAZYMEM_BUILD_CORE=0 (what a machine with no compiler gets) builds
    no compiled module; the result imports, selects the ctypes backend and offers the page
    server."""
    import shutil
    import subprocess
    import sys
    if not os.path.isfile(os.path.join(REPO_DIR, "setup.py")):
        pytest.skip("needs the source tree (setup.py); this run uses an installed package")
    src = tmp_path / "src"
    shutil.copytree(REPO_DIR, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.so", "__pycache__", "docker", "*.egg-info"))
    env = dict(os.environ, PYLAZYMEM_BUILD_CORE="0")
    env.pop("PYLAZYMEM_BACKEND", None)
    res = subprocess.run([sys.executable, "setup.py", "-q", "build", "--build-base",
                          str(tmp_path / "b")], cwd=str(src), env=env, capture_output=True,
                         text=True, timeout=240)
    assert res.returncode == 0, res.stderr
    lib = tmp_path / "b" / "lib"
    built = sorted(p.name for p in (lib / "pylazymem").iterdir())
    assert "server.py" in built and not [n for n in built if n.endswith(".so")], built
    # The development venv's editable install adds a finder that would map pylazymem's
    # submodules (the compiled core too) back to this checkout: take it out.
    code = ("import sys\n"
            "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]\n"
            "import pylazymem as plm, json\n"
            "assert plm.__file__.startswith(%r), plm.__file__\n"
            "print(json.dumps([plm.backend, plm.backend_features.page_server,\n"
            "                  plm.backend_features.regions, plm.PageServer.__name__]))\n"
            % str(lib))
    res = subprocess.run([sys.executable, "-c", code], env=dict(env, PYTHONPATH=str(lib)),
                         cwd=str(tmp_path), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == ["ctypes", True, False, "PageServer"]
