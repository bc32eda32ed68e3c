#!/usr/bin/env bash
# Install the built wheel with the locked runtime dependencies into a new virtual environment.
#   scripts/install-service.sh VENV WHEEL
# The Dockerfile and tests/test_wheel.py run exactly this. PYTHON picks the interpreter (default python3);
# PIP_* variables apply (the image sets PIP_NO_CACHE_DIR=1).
set -euo pipefail
venv=$1
wheel=$2
lock="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/requirements/runtime.txt"
"${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -c "$lock" "$wheel"
