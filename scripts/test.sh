#!/usr/bin/env bash
# Run pyvmm's tests: set up first (Debian packages, .venv, the guest kit; quick when done),
# then pytest with any arguments given (e.g. scripts/test.sh tests/unit -x).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$repo/scripts/setup.sh"
cd "$repo"
exec .venv/bin/python -m pytest -ra --durations=25 "$@"
