#!/usr/bin/env bash
# The test suite against the C core built with AddressSanitizer + UndefinedBehaviorSanitizer
# (issue 5: valgrind cannot run userfaultfd code; ASan can). Zero reports allowed.
#
#   bash scripts/sanitize.sh [pytest args...]     e.g. -x, -k stress, tests/test_region.py
#
# The core is built (PYLAZYMEM_SANITIZE=1, see pylazymem/_build.py) in a temporary copy of the
# repository, so the editable install in this checkout is left alone; the tests run from that
# copy with the venv's Python, with gcc's libasan and libubsan preloaded (Python itself is not
# instrumented, so the runtime must come first). Every process of the run, subprocesses too,
# writes its ASan reports to $WORK/reports/; the script fails if pytest fails or if any
# report ("ERROR: AddressSanitizer", "runtime error:") appears there or in the output.
# UBSan's reports go to stderr whatever its log_path says (gcc's combined runtime: measured),
# so pytest captures only at the Python level (--capture=sys): a report written just before
# an abort would otherwise die with pytest's capture of the test's file descriptors.
#
# Options for the sanitizers:
#   detect_leaks=0     Python's own allocations are not ours to judge (leaks are checked by
#                      tests/test_reliability_leaks.py)
#   handle_segv=0, handle_sigbus=0
#                      tests expect real SIGSEGV / SIGBUS (poisoned pages, stale views)
#   abort_on_error=1, halt_on_error=1
#                      the first report stops the process (a test then fails as well)
# PYLAZYMEM_UNDER_ASAN=1 tells the tests: tests that cannot run under ASan (RLIMIT_AS: the
# shadow memory reserves terabytes of address space) skip themselves on it.
#
# Env: KEEP=1 keeps the build directory on success too; PYTHON=... another interpreter.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PY" ] || { echo "sanitize.sh: no Python at $PY (run bash scripts/setup.sh first)" >&2; exit 2; }

libpath() {
    local f
    f="$(gcc -print-file-name="$1")"
    if [ "$f" = "$1" ] || [ ! -e "$f" ]; then
        echo "sanitize.sh: gcc has no $1 (install libasan/libubsan for gcc $(gcc -dumpversion))" >&2
        exit 2
    fi
    readlink -f "$f"
}
LIBASAN="$(libpath libasan.so)"
LIBUBSAN="$(libpath libubsan.so)"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/pylazymem-sanitize.XXXXXX")"
status=1
cleanup() {
    if [ "$status" = 0 ] && [ "${KEEP:-0}" != 1 ]; then
        rm -rf "$WORK"
    else
        echo "sanitize.sh: build, logs and reports kept in $WORK" >&2
    fi
}
trap cleanup EXIT

echo "== copying the repository to $WORK/src"
mkdir -p "$WORK/src" "$WORK/reports"
(cd "$REPO" && tar -c --exclude=./.venv --exclude=./.git --exclude=./build \
     --exclude='*.so' --exclude=__pycache__ --exclude='*.egg-info' --exclude=./.pytest_cache .) \
    | tar -x -C "$WORK/src"

echo "== building the core with -fsanitize=address,undefined"
t0=$(date +%s)
if ! (cd "$WORK/src" && PYLAZYMEM_SANITIZE=1 "$PY" setup.py build_ext --inplace \
        >"$WORK/build.log" 2>&1); then
    tail -40 "$WORK/build.log" >&2
    echo "sanitize.sh: the sanitizer build failed (log: $WORK/build.log)" >&2
    exit 1
fi
SO="$(ls "$WORK"/src/pylazymem/_lazymem*.so)"
nm -D "$SO" >"$WORK/symbols.txt"
if ! grep -q '__asan_' "$WORK/symbols.txt" || ! grep -q '__ubsan_' "$WORK/symbols.txt"; then
    echo "sanitize.sh: $SO is not instrumented (no __asan_/__ubsan_ symbols)" >&2
    exit 1
fi
echo "   built in $(( $(date +%s) - t0 )) s: $SO"

export LD_PRELOAD="$LIBASAN $LIBUBSAN${LD_PRELOAD:+ $LD_PRELOAD}"
# allocator_may_return_null: a request the allocator cannot meet returns NULL, as it does
# without ASan, so that the core's handling of it (Region() of 16 TiB: OutOfMemoryError) is
# what runs, instead of an abort.
export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:abort_on_error=1:handle_segv=0:handle_sigbus=0:halt_on_error=1:log_path=$WORK/reports/asan"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:abort_on_error=1:log_path=$WORK/reports/ubsan"
export PYLAZYMEM_UNDER_ASAN=1
export PYTHONPATH="$WORK/src${PYTHONPATH:+:$PYTHONPATH}"

# The copy, not the editable install, must be what the tests import.
where="$(cd "$WORK/src" && "$PY" -c 'import pylazymem._binding as b, pylazymem; print(pylazymem.__file__); print(b.lib.lm_abi_version())')"
case "$where" in
    "$WORK/src/"*) ;;
    *) echo "sanitize.sh: the tests would import $where, not the sanitized copy" >&2; exit 1 ;;
esac
echo "   tests import $(echo "$where" | head -1)"

echo "== running the test suite under ASan + UBSan"
t0=$(date +%s)
set +e
(cd "$WORK/src" && "$PY" -m pytest -q -p no:cacheprovider --capture=sys -rs "$@") 2>&1 \
    | tee "$WORK/pytest.log"
rc=${PIPESTATUS[0]}
set -e
secs=$(( $(date +%s) - t0 ))

nreports=0
if ls "$WORK"/reports/* >/dev/null 2>&1; then
    nreports=$(grep -l -E 'ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer|SUMMARY: (Address|UndefinedBehavior)Sanitizer' \
               "$WORK"/reports/* 2>/dev/null | wc -l)
fi
inlog=$(grep -c -E 'ERROR: AddressSanitizer|runtime error:' "$WORK/pytest.log" || true)
if [ "$nreports" -gt 0 ] || [ "$inlog" -gt 0 ]; then
    echo "== SANITIZER REPORTS: $nreports report file(s), $inlog line(s) in the pytest output" >&2
    for f in "$WORK"/reports/*; do
        [ -s "$f" ] || continue
        echo "--- $f" >&2
        head -60 "$f" >&2
    done
    grep -n -E -A20 'ERROR: AddressSanitizer|runtime error:' "$WORK/pytest.log" | head -80 >&2 || true
    exit 1
fi
if [ "$rc" != 0 ]; then
    echo "sanitize.sh: pytest failed (exit $rc) under the sanitizers, no sanitizer report ($secs s)" >&2
    exit "$rc"
fi
echo "== sanitize.sh: test suite passed under ASan + UBSan in $secs s, zero sanitizer reports"
status=0
