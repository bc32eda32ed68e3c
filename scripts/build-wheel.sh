#!/usr/bin/env bash
# Build the service's wheel into OUTDIR (default dist/): the rules and cards of the checkout go in as package data.
# Used by the Dockerfile, `make wheel` and tests/test_wheel.py.
set -euo pipefail
out=${1:-dist}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=${PYTHON:-python3}
"$python" -m pip wheel --quiet --disable-pip-version-check --no-deps --wheel-dir "$out" .
