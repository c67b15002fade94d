"""Every examples/*.py runs to completion (exit 0) in a fresh interpreter, under a timeout."""

import glob
import os

import pytest

from _helpers import REPO_DIR

EXAMPLES = sorted(glob.glob(os.path.join(REPO_DIR, "examples", "*.py")))

pytestmark = [pytest.mark.core, pytest.mark.uffd, pytest.mark.timeout(200)]

# Smaller than their defaults, so the suite stays quick; the defaults run in the README's demo.
EXAMPLE_ARGS = {
    "suspend_resume.py": ["--size", "48", "--requests", "30", "--warmup", "30", "--quiet"],
    "deferred_pages.py": ["--size", "128"],
}


# Examples whose kernel accesses (np.save, file writes) read lazy pages: full mode only.
FULL_MODE_ONLY = set()


def _param(path):
    marks = [pytest.mark.uffd_full] if os.path.basename(path) in FULL_MODE_ONLY else []
    return pytest.param(path, marks=marks, id=os.path.basename(path))


@pytest.mark.parametrize("path", [_param(p) for p in EXAMPLES] or [pytest.param(
    None, marks=pytest.mark.skip(reason="no examples/*.py yet"), id="none")])
def test_example_runs(run_py, path):
    res = run_py("import os, runpy, sys\n"
                 "sys.argv = sys.argv[1:]\n"
                 "sys.path.insert(0, os.path.dirname(sys.argv[0]))\n"
                 "runpy.run_path(sys.argv[0], run_name='__main__')\n",
                 timeout=180, prelude=False,
                 args=(path, *EXAMPLE_ARGS.get(os.path.basename(path), [])))
    assert res.returncode == 0, f"{os.path.relpath(path, REPO_DIR)} failed\n{res.describe()}"
