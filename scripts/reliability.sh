#!/usr/bin/env bash
# The reliability suite of issue 5 (stress, fuzzing, crash safety, leaks, loud failures):
#
#   bash scripts/reliability.sh [--long] [pytest args...]
#
# Default: the bounded CI run (10^6 faults, 20,000 fuzzed files, 8 kills; ~1.5 min on 2 cores).
# --long:  PYLAZYMEM_LONG=1: 10^7 faults, 10^6 fuzzed files, 60 kills, 60 restore rounds.
# The numbers each test measured (fault counts, fuzz counts, timings) are printed at the end.
# The same tests under ASan/UBSan: bash scripts/sanitize.sh tests/test_reliability_*.py
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
if [ "${1:-}" = "--long" ]; then
    export PYLAZYMEM_LONG=1
    shift
fi
REPORT="$(mktemp "${TMPDIR:-/tmp}/pylazymem-reliability.XXXXXX.jsonl")"
export PYLAZYMEM_RELIABILITY_REPORT="$REPORT"
t0=$(date +%s)
set +e
"$PY" -m pytest -q -p no:cacheprovider tests/test_reliability_*.py "$@"
rc=$?
set -e
echo "== reliability suite: $(( $(date +%s) - t0 )) s, mode: $([ -n "${PYLAZYMEM_LONG:-}" ] && echo long || echo default)"
"$PY" - "$REPORT" <<'PYEOF'
import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    name = m.pop("test")
    for k in ("long", "under_asan"):
        m.pop(k, None)
    if name == "fuzz":
        m.pop("top_reasons", None)
    print("%-16s %s" % (name, json.dumps(m)))
PYEOF
echo "(numbers as JSON lines: $REPORT)"
exit $rc
