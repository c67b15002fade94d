#!/usr/bin/env bash
# The README's demo command: set up everything, then run the main demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/suspend_resume.py "$@"
