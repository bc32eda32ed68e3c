#!/usr/bin/env bash
# Install system packages the test suite needs (idempotent; safe to re-run).
# Debian/Ubuntu. As root (CI, a container) it installs what is missing; as another user it installs only what
# needs no root (the FHIR test server) and says in one line which tests will skip for the rest (pytest skips
# them; with CI=true they fail instead).
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
elif [ "${CI:-}" = "true" ]; then
    echo "PostgreSQL server binaries (initdb, pg_ctl) are missing and CI cannot install them without root." >&2
    exit 1
else
    echo "PostgreSQL is missing (not root: not installed); its tests will skip. As root: apt-get install postgresql" >&2
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

# --- Optional Debian packages: without them their tests skip (they fail only when CI=true) ---
# install_optional PROGRAM PACKAGE WHAT-SKIPS
install_optional() {
    local program=$1 package=$2 skips=$3
    if command -v "$program" >/dev/null 2>&1; then
        echo "$package already present: $(command -v "$program")"
    elif [ "$(id -u)" -eq 0 ]; then
        echo "Installing $package..."
        export DEBIAN_FRONTEND=noninteractive
        if ! { apt-get update && apt-get install -y --no-install-recommends "$package"; }; then
            echo "$package could not be installed; $skips will skip." >&2
        fi
    else
        echo "$program is missing; $skips will skip." >&2
        echo "Install it as root:  apt-get update && apt-get install -y --no-install-recommends $package" >&2
    fi
}

# tests/test_admin.py drives Debian's chromium with Python Playwright (never `playwright install`).
install_optional /usr/bin/chromium chromium "the admin page browser test"
# tests/test_load.py and bench/load.py drive the service with Debian's wrk.
install_optional wrk wrk "the load test"
