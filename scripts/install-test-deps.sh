#!/usr/bin/env bash
# Install system packages the test suite needs (idempotent; safe to re-run).
# Debian/Ubuntu. Run as root (e.g. in CI or a dev container).
set -euo pipefail

# --- PostgreSQL ---
# tests/plugins/postgres.py starts a throwaway cluster with initdb/pg_ctl.
have_postgres() {
    local d
    for d in /usr/lib/postgresql/*/bin; do
        [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && return 0
    done
    return 1
}

if have_postgres; then
    echo "PostgreSQL server binaries already present: $(ls -d /usr/lib/postgresql/*/bin | tr '\n' ' ')"
elif [ "$(id -u)" -eq 0 ]; then
    echo "Installing PostgreSQL server..."
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends postgresql
    have_postgres || { echo "PostgreSQL install finished but initdb was not found" >&2; exit 1; }
else
    echo "PostgreSQL server binaries (initdb, pg_ctl) are missing." >&2
    echo "Install them as root:  apt-get update && apt-get install -y --no-install-recommends postgresql" >&2
    exit 1
fi

# --- FHIR test server (sekmet-fhir) ---
# Real FHIR R4 server used by tests/plugins/fhir_server.py. It lives in its own venv because its
# dependencies clash with ours. Idempotent: does nothing when .venv-sekmet/bin/sekmet already exists.
SEKMET_VENV="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv-sekmet"
if [ ! -x "$SEKMET_VENV/bin/sekmet" ]; then
  echo "Creating $SEKMET_VENV (sekmet-fhir==0.1.1)"
  python3 -m venv "$SEKMET_VENV"
  "$SEKMET_VENV/bin/python" -m pip install --quiet --disable-pip-version-check "sekmet-fhir==0.1.1"
fi
# --- end FHIR test server (sekmet-fhir) ---

# --- Chromium (admin page browser test) ---
# tests/test_admin.py drives Debian's chromium with Python Playwright (never `playwright install`).
# Optional: without it the browser test skips (it fails only when CI=true).
if [ -x /usr/bin/chromium ]; then
    echo "Chromium already present: $(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium)"
elif [ "$(id -u)" -eq 0 ]; then
    echo "Installing Chromium..."
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update && apt-get install -y --no-install-recommends chromium; }; then
        echo "Chromium could not be installed; the admin page browser test will skip." >&2
    fi
else
    echo "Chromium (/usr/bin/chromium) is missing; the admin page browser test will skip." >&2
    echo "Install it as root:  apt-get update && apt-get install -y --no-install-recommends chromium" >&2
fi
# --- end Chromium (admin page browser test) ---

# --- wrk (load test) ---
# tests/test_load.py and bench/load.py drive the service with Debian's wrk.
# Optional: without it the load test skips (it fails only when CI=true).
if command -v wrk >/dev/null 2>&1; then
    echo "wrk already present: $(command -v wrk)"
elif [ "$(id -u)" -eq 0 ]; then
    echo "Installing wrk..."
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update && apt-get install -y --no-install-recommends wrk; }; then
        echo "wrk could not be installed; the load test will skip." >&2
    fi
else
    echo "wrk is missing; the load test will skip." >&2
    echo "Install it as root:  apt-get update && apt-get install -y --no-install-recommends wrk" >&2
fi
# --- end wrk (load test) ---
