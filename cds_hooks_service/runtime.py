"""What one running service holds: settings, the compiled rules, the feedback store, the JWT verifier.

The rulebook is swapped whole (never edited in place), so a request always sees one consistent set
of rules, and a reload that fails validation leaves the previous rules serving.

Safe reload: ``Runtime.start_watching(interval)`` starts one daemon thread per process that polls a
cheap signature of the rule files (path, mtime, size, inode of every file under the rules, cards and
site-override directories) and reloads when it changes; ``install_sighup_handler()`` makes SIGHUP
request a reload (the handler only sets a flag and an Event; the reload runs on the watcher thread).
Nothing starts by itself: gunicorn.conf.py starts both in every worker; tests call the methods.

Last good rules: a process that loads the rules from scratch while the files on disk do not validate
(a gunicorn worker respawned after a crash, a timeout or max_requests) would fail to boot, and gunicorn
halts the whole server when a worker fails to boot. So the gunicorn master keeps the last rules that
validated (``remember_last_good_rules``, refreshed before every fork and on SIGHUP) and a worker, a fork
of the master, starts with those when the files on disk are refused.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

from flask import current_app

from . import fhir_transport
from .auth import JwtVerifier, check_public_url
from .config import Settings
from .request_validation import load_validators
from .rulebook import Rulebook, RulebookError, load_rulebook
from .rulefiles import call_with_deadline
from .store import FeedbackStore

log = logging.getLogger(__name__)


def _rule_dirs(settings: Settings) -> tuple[Path, ...]:
    return tuple(Path(d) for d in (settings.rules_dir, settings.cards_dir, settings.rules_local_dir) if d)


def rule_files_signature(settings: Settings) -> tuple:
    """(path, mtime_ns, size, inode) of every file under the rule directories: stat calls only.

    Files are stat'ed through symlinks (a Kubernetes ConfigMap mount swaps a symlink); directories are
    entered only when they are real directories (no symlink loops). A missing directory is one entry.
    """
    out: list[tuple] = []

    def walk(directory: str) -> None:
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            walk(entry.path)
                        else:
                            st = entry.stat()
                            out.append((entry.path, st.st_mtime_ns, st.st_size, st.st_ino))
                    except OSError:  # vanished or dangling while we looked
                        out.append((entry.path, -1, -1, -1))
        except OSError:
            out.append((directory, -2, -2, -2))

    for d in _rule_dirs(settings):
        walk(str(d))
    out.sort()
    return tuple(out)


# The last rules that validated in this process: (directories, signature of their files, rulebook).
# Kept by the gunicorn master (see the module docstring); the workers inherit it through fork.
_last_good: tuple[tuple[Path, ...], tuple, Rulebook] | None = None


def remember_last_good_rules(settings: Settings, *, force: bool = False) -> bool:
    """Load the rules into this process's last-good slot if the files changed since (or ``force``).

    When the files do not validate the previous rules stay (logged error). Returns True when the slot
    holds rules for these directories afterwards.
    """
    global _last_good
    dirs = _rule_dirs(settings)
    signature = rule_files_signature(settings)
    current = _last_good if _last_good is not None and _last_good[0] == dirs else None
    if current is not None and current[1] == signature and not force:
        return True
    try:  # with a deadline (CDS_RULES_LOAD_TIMEOUT): the master must go on forking workers whatever the files hold
        rulebook = call_with_deadline(settings.rules_load_timeout, load_rulebook, settings.rules_dir,
                                      settings.cards_dir, settings.rules_local_dir)
    except Exception as exc:  # noqa: BLE001 - any failure (LoadTimeout included): keep what we have
        log.error("rule files refused (pid %d); %s:\n%s", os.getpid(),
                  "the last good rules stay for new workers" if current else "there are no earlier rules", exc)
        if current is not None:  # remember these files were seen: do not load them again before each fork
            _last_good = (dirs, signature, current[2])
        return current is not None
    _last_good = (dirs, signature, rulebook)
    return True


def last_good_rules(settings: Settings) -> Rulebook | None:
    if _last_good is not None and _last_good[0] == _rule_dirs(settings):
        return _last_good[2]
    return None


class Runtime:
    SETTLE_SECONDS = 0.3  # a change must hold still this long before it is loaded (editors write in steps)

    def __init__(self, settings: Settings, *, rulebook: Rulebook | None = None, store: FeedbackStore | None = None):
        self.settings = settings
        self.validators = load_validators()
        self._reload_lock = threading.Lock()
        # Watcher state. The signature is taken before loading, so a change made during the load is seen.
        self._signature = rule_files_signature(settings)
        self._wakeup = threading.Event()
        self._requests = 0  # reload requests (SIGHUP); the watcher compares with _requests_seen
        self._requests_seen = 0
        self._stopping = False
        self._poll_interval: float | None = None
        self._watcher: threading.Thread | None = None
        self._watcher_lock = threading.Lock()
        # How a reload runs the (CPU-bound, ~0.5 s) rule loading: here, or on a native thread so that a gevent
        # worker keeps serving meanwhile (serving.start_worker sets it).
        self.run_blocking = lambda fn, *args: fn(*args)
        # How the /admin views run (admin.off_loop): here, or on a small pool of native threads of their own
        # (serving.start_worker), so that the hook calls are served meanwhile and the hub's threadpool, which
        # gevent also resolves host names on, stays free.
        self.run_admin = self.run_blocking
        if rulebook is None:
            try:
                rulebook = load_rulebook(settings.rules_dir, settings.cards_dir, settings.rules_local_dir)
            except Exception as exc:
                rulebook = last_good_rules(settings)
                if rulebook is None:
                    raise
                log.error("rule files refused at start (pid %d); this process serves the last good rules "
                          "(kept by the gunicorn master):\n%s", os.getpid(), exc)
        self._rulebook = rulebook
        if store is None:
            if settings.database_url.startswith("sqlite:///"):
                Path(settings.database_url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
            store = FeedbackStore(settings.database_url)
        self.store = store
        self.verifier = None
        fhir_transport.configure(settings.fhir_max_concurrency)
        if settings.jwt_issuers_file:
            check_public_url(settings.public_url)
            self.verifier = JwtVerifier.from_file(settings.jwt_issuers_file, replay_check=store.use_jti,
                                                  max_lifetime=settings.jwt_max_lifetime)
        else:
            log.warning("CDS_JWT_ISSUERS is not set: the service runs in OPEN MODE and accepts calls without a JWT. "
                        "Do not expose it like this outside development.")

    @property
    def rulebook(self) -> Rulebook:
        return self._rulebook

    def reload_rules(self) -> tuple[bool, str]:
        """Load the rule files again; keep the current rules if the new ones do not validate."""
        with self._reload_lock:
            try:
                new = self.run_blocking(load_rulebook, self.settings.rules_dir, self.settings.cards_dir,
                                        self.settings.rules_local_dir)
            except RulebookError as exc:
                log.error("rule reload refused (pid %d), previous rules keep serving:\n%s", os.getpid(), exc)
                return False, str(exc)
            except Exception as exc:  # noqa: BLE001 - e.g. a file removed mid-load: refuse the same way
                log.exception("rule reload refused (pid %d), previous rules keep serving: %s", os.getpid(), exc)
                return False, f"{type(exc).__name__}: {exc}"
            self._rulebook = new
            log.info("rules reloaded (pid %d): %d rules", os.getpid(), len(new.rules))
            return True, f"{len(new.rules)} rules loaded"

    # --- picking up changes: file watch and SIGHUP ---------------------------------------------------

    def request_reload(self) -> None:
        """Reload on the watcher thread now, whether or not the files look changed (what SIGHUP does).
        Safe to call from a signal handler: it only bumps a counter and sets an Event."""
        self._requests += 1
        self._wakeup.set()

    def start_watching(self, interval: float) -> None:
        """Reload when the rule files change, checking every ``interval`` seconds (0: no polling; the
        thread then only serves ``request_reload``/SIGHUP). One thread per process: calling again only
        changes the interval."""
        self._poll_interval = float(interval) if interval and interval > 0 else None
        self._ensure_watcher()
        self._wakeup.set()  # apply a new interval now (a wake-up without a request reloads only on change)

    def install_sighup_handler(self) -> None:
        """Make SIGHUP request a reload (the reload runs on the watcher thread). Main thread only."""
        signal.signal(signal.SIGHUP, lambda signum, frame: self.request_reload())
        self._ensure_watcher()

    def stop_watching(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._wakeup.set()
        thread = self._watcher
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def watching(self) -> bool:
        return self._watcher is not None and self._watcher.is_alive()

    def _ensure_watcher(self) -> None:
        with self._watcher_lock:
            # is_alive() is False in a forked child for a thread started in the parent.
            if self._watcher is not None and self._watcher.is_alive():
                return
            self._stopping = False
            self._watcher = threading.Thread(target=self._watch_loop, name="cds-rules-watcher", daemon=True)
            self._watcher.start()

    def _watch_loop(self) -> None:
        while True:
            self._wakeup.wait(self._poll_interval)
            self._wakeup.clear()
            if self._stopping:
                return
            try:
                self._check_once()
            except Exception:  # noqa: BLE001 - the watcher must survive anything
                log.exception("rule watcher: unexpected error; the current rules keep serving")

    def _check_once(self) -> None:
        requests = self._requests
        requested = requests != self._requests_seen
        self._requests_seen = requests
        signature = rule_files_signature(self.settings)
        if not requested:
            if self._poll_interval is None or signature == self._signature:
                return
            # Changed: wait until the files hold still (an editor or a copy may be half way through).
            for _ in range(20):
                time.sleep(min(self.SETTLE_SECONDS, self._poll_interval))
                if self._stopping:
                    return
                again = rule_files_signature(self.settings)
                if again == signature:
                    break
                signature = again
            log.info("rule files changed (pid %d), reloading", os.getpid())
        else:
            log.info("rule reload requested (pid %d)", os.getpid())
        self.reload_rules()
        # Refused files are remembered too: they are not tried again until they change (or SIGHUP).
        self._signature = signature


def runtime() -> Runtime:
    return current_app.extensions["cds"]
