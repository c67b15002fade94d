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
# The object-store tests (marker s3) run against a real S3 endpoint: a Ceph RADOS Gateway on
# loopback (scripts/s3-server.sh). Not starting is a failure; only a machine without Debian's
# Ceph packages skips those tests, with the script's reason (PLM_S3_UNAVAILABLE) and a count.
s3rc=0
was_up=0
stop_s3=0
cache_made=""
# On exit: the gateway stopped if this run started it, the chunk cache removed if it made it.
cleanup() {
    [ "$stop_s3" -eq 0 ] || bash scripts/s3-server.sh stop >/dev/null 2>&1 || true
    [ -z "$cache_made" ] || rm -rf "$cache_made"
}
trap cleanup EXIT
bash scripts/s3-server.sh status >/dev/null 2>&1 && was_up=1
{ bash scripts/s3-server.sh install && bash scripts/s3-server.sh start; } 2>/tmp/pylazymem-s3-start.$$ || s3rc=$?
if [ "$s3rc" -eq 0 ]; then
    eval "$(bash scripts/s3-server.sh env)"
    # stopped at the end if this run started it
    [ "$was_up" -eq 1 ] || stop_s3=1
elif [ "$s3rc" -eq 3 ]; then
    export PLM_S3_UNAVAILABLE="$(tail -n 1 /tmp/pylazymem-s3-start.$$)"
    echo "== test.sh: no S3 gateway: $PLM_S3_UNAVAILABLE (tests marked s3 skip)"
else
    cat /tmp/pylazymem-s3-start.$$ >&2
    rm -f /tmp/pylazymem-s3-start.$$
    echo "== test.sh: FAILED: the S3 gateway did not start (scripts/s3-server.sh start)" >&2
    exit 1
fi
rm -f /tmp/pylazymem-s3-start.$$
# every test run gets its own chunk cache (the per-machine default is the user's ~/.cache)
if [ -z "${PYLAZYMEM_CACHE_DIR:-}" ]; then
    cache_made="$(mktemp -d /tmp/pylazymem-chunk-cache.XXXXXX)"
    export PYLAZYMEM_CACHE_DIR="$cache_made"
fi
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
