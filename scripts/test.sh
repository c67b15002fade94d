#!/usr/bin/env bash
# The README's test command: set up everything, then run the whole test suite once per backend
# (docs/backends.md):
#   1. PYLAZYMEM_BACKEND=cffi, the compiled core: every test. Explicit, so that a core that
#      fails to load is an error here instead of a quiet fall-back to ctypes;
#   2. PYLAZYMEM_BACKEND=ctypes, pure Python: every test that applies. Tests that need the core
#      declare it (marker `core`: `pytestmark` of their module, or a decorator) and are skipped
#      with the reason, counted in the run's summary line; every other test runs and must pass.
#      A test that uses the core without the marker fails here (UnavailableError), it is never
#      skipped or passed by accident (tests/conftest.py).
# Both runs always happen; the script fails if either fails. Arguments go to both pytest runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
status=0
echo "== test.sh: backend cffi (the compiled core)"
PYLAZYMEM_BACKEND=cffi .venv/bin/python -m pytest -q "$@" || status=1
echo "== test.sh: backend ctypes (pure Python; tests that need the core are skipped)"
PYLAZYMEM_BACKEND=ctypes .venv/bin/python -m pytest -q "$@" || status=1
if [ "$status" -eq 0 ]; then
    echo "== test.sh: both backends passed"
else
    echo "== test.sh: FAILED (see above)" >&2
fi
exit "$status"
