"""The run's temporary directories (tmp_path, tmp_path_factory) live in memory when the machine offers it.

About 130 tests copy the shipped rules folder (80 files, 3.6 MB) to edit it, and every app a test makes starts
from a copy of an empty SQLite store and writes to it (each commit an fsync). On the development machine's ext4
disk one copy of the rules took 25 to 50 ms of CPU and the fsyncs added seconds of waiting per run; on tmpfs a
copy takes 7 ms and an fsync nothing. So, unless the person running the tests chose where temporary files go
(``--basetemp``, ``PYTEST_DEBUG_TEMPROOT`` or ``TMPDIR``), the temporary root is ``/dev/shm`` when that is a
writable tmpfs with room to spare; otherwise pytest's default (the system's temporary directory).
pyproject.toml sets ``tmp_path_retention_policy = "failed"``: a passing test's directory is removed when it
ends, so the files in memory stay small (a failing test's directory is kept for inspection).
"""
from __future__ import annotations

import os

MEMORY_ROOT = "/dev/shm"
MIN_FREE_BYTES = 2 * 1024**3  # the full suite writes a few hundred MB at most; leave the machine room


def memory_temp_root(path: str = MEMORY_ROOT, mounts: str = "/proc/mounts") -> str | None:
    """``path`` when it is a directory we may write to on a tmpfs with at least MIN_FREE_BYTES free, else None."""
    try:
        with open(mounts, encoding="utf-8") as f:
            on_tmpfs = any(fields[1] == path and fields[2] == "tmpfs"
                           for fields in (line.split() for line in f) if len(fields) > 2)
        if not (on_tmpfs and os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)):
            return None
        st = os.statvfs(path)
        return path if st.f_bavail * st.f_frsize >= MIN_FREE_BYTES else None
    except OSError:
        return None


def pytest_configure(config):
    if config.option.basetemp or os.environ.get("PYTEST_DEBUG_TEMPROOT") or os.environ.get("TMPDIR"):
        return  # the caller chose
    if hasattr(config, "workerinput"):
        return  # an xdist worker: its --basetemp comes from the controller, which made this choice
    root = memory_temp_root()
    if root is not None:
        os.environ["PYTEST_DEBUG_TEMPROOT"] = root  # read by pytest when it first makes the run's base directory
