"""Server plumbing: what the running service does as a process, whichever WSGI server runs it.

gunicorn.conf.py holds settings only and binds gunicorn's hooks to the functions at the end of this module.
Under another WSGI server, call ``configure_logging()`` once, set ``CDS_LISTEN_HOSTS`` to the addresses it
listens on, and call ``start_worker(app)`` in each process after ``create_app()`` (the body deadline, the
start-up checks and the probes are part of the app itself).

* Start-up checks (master, before binding): the configuration (``Settings.startup_problem``: open mode off
  loopback, JWT required, CORS ``*``, token lengths) and the listen address (a port already in use; with
  ``GUNICORN_REUSE_PORT=1`` several servers may share a port on purpose). A problem stops the start with
  one line; the hosts listened on are passed to the workers as ``CDS_LISTEN_HOSTS``.
* Slow clients: gevent workers (one greenlet per connection: a client that trickles its headers or body
  holds a greenlet, not one of a few threads). gunicorn bounds the time to read a request's headers by
  ``keepalive``; ``BodyDeadline`` bounds the time to read its body (``CDS_BODY_TIMEOUT``, then 408).
  gunicorn.conf.py patches gevent into the master first, before anything imports urllib3/requests, so
  FHIR and JWKS reads over TLS are cooperative too (urllib3 keeps the ``ssl.SSLContext`` it was imported
  with; ``patch_for_gevent`` checks). ``serve`` execs gunicorn for the same reason. psycopg 3 (>= 3.1.14)
  cooperates with gevent by itself; SQLite calls are short and block.
* Logging: the service's log lines go to the server's error log; ``CDS_LOG_FORMAT`` = ``auto`` (default:
  human-readable text on a terminal, JSON lines otherwise), ``json`` or ``text`` (see logs.py).
* Metrics: the master points ``PROMETHEUS_MULTIPROC_DIR`` at a private directory before the workers start
  (or wipes the operator's), so /metrics adds up every worker (see metrics.py); removed at exit.
* Rule reload without restarts: the master keeps the last rules that validated (refreshed before each
  fork and on SIGHUP) and forwards SIGHUP to the workers; each worker reloads in-process (runtime.py) on
  SIGHUP and when the files change (``CDS_RULES_POLL_SECONDS``). SIGHUP does not reload the gunicorn
  settings or the code: restart for that.
"""
from __future__ import annotations

import errno
import gc
import logging
import os
import signal
import socket
import sys
import time

from .config import ConfigError, Settings

log = logging.getLogger(__name__)
APP_LOGGER = "cds_hooks_service"


# -- start-up checks -------------------------------------------------------------------------------------
class StartupError(RuntimeError):
    """The service must not start; the message is one line."""


def listen_hosts(addresses) -> tuple[str, ...]:
    """The hosts of gunicorn-style addresses ((host, port) tuples; a unix socket path counts as its path)."""
    return tuple(str(a[0]) if isinstance(a, tuple) else f"unix:{a}" for a in addresses)


def port_in_use(host: str, port: int) -> bool:
    """Whether binding ``host:port`` fails with "address in use" (bound like gunicorn: SO_REUSEADDR only)."""
    if not port:
        return False
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return False  # the server reports an unknown host itself
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def startup_check(addresses, *, reuse_port: bool = False, inherited_sockets: bool = False) -> Settings:
    """The settings the workers will read, after checking them and the listen addresses; StartupError else.

    Exports ``CDS_LISTEN_HOSTS`` (the hosts actually listened on) for the workers' ``Settings.from_env``."""
    hosts = listen_hosts(addresses)
    os.environ["CDS_LISTEN_HOSTS"] = ",".join(hosts)
    try:
        settings = Settings.from_env()
        settings.check()
    except ConfigError as exc:
        raise StartupError(str(exc)) from None
    except ValueError as exc:  # a malformed value (a number, a date)
        raise StartupError(str(exc).splitlines()[0]) from None
    if not reuse_port and not inherited_sockets:
        for address in addresses:
            if isinstance(address, tuple) and port_in_use(address[0], address[1]):
                raise StartupError(f"{address[0]}:{address[1]} is already in use (another service, or this one "
                                   f"started twice); stop it or choose another PORT")
    return settings


def startup_line(urls: list[str], settings: Settings, rules: int | None, workers: str) -> str:
    mode = "JWT mode (issuers: %s)" % settings.jwt_issuers_file if not settings.open_mode else \
        "OPEN MODE (no JWT required)"
    loaded = f"{rules} rules loaded" if rules is not None else "rules NOT loaded (see the errors above)"
    return f"cds-hooks-service listening on {', '.join(urls)}: {loaded}, {mode}, {workers}"


# -- gevent ----------------------------------------------------------------------------------------------
def patch_for_gevent(log_warning=None) -> None:
    """The master of gevent workers: the standard library patched for gevent, and a warning if that came
    too late. gunicorn.conf.py patches first thing (what this checks); gunicorn itself patches in each
    worker after the fork, by when the master has imported requests/urllib3 (rule loading, JWT), and urllib3
    keeps the unpatched ssl.SSLContext it was imported with: TLS reads to FHIR servers and JWKS hosts would
    then block the whole worker. os, signal and subprocess stay unpatched in the master (gevent's child
    watcher would reap the workers before gunicorn's SIGCHLD handler sees them); each worker patches those."""
    from gevent import monkey

    if not monkey.is_module_patched("socket"):
        monkey.patch_all(os=False, signal=False, subprocess=False)
    ssl_module = sys.modules.get("urllib3.util.ssl_")
    if ssl_module is not None and log_warning is not None:
        import ssl

        if getattr(ssl_module, "SSLContext", None) not in (None, ssl.SSLContext):
            log_warning("urllib3 was imported before gevent patched ssl: TLS reads (FHIR servers, JWKS) block "
                        "the worker; start gunicorn with --config gunicorn.conf.py, which patches first")


def gevent_active() -> bool:
    if "gevent" not in sys.modules:
        return False
    from gevent import monkey

    return monkey.is_module_patched("socket")


# -- body deadline ---------------------------------------------------------------------------------------
def body_timeout_error(seconds: float):
    from werkzeug.exceptions import RequestTimeout

    class BodyTimeout(RequestTimeout):
        description = f"the request body did not arrive within {seconds:g} s (CDS_BODY_TIMEOUT)"

    return BodyTimeout


class _DeadlineInput:
    """``wsgi.input`` whose reads end at a deadline: under gevent a read blocked past it is interrupted;
    elsewhere the deadline is checked before each read."""

    def __init__(self, stream, deadline: float, error, interrupt: bool):
        self._stream, self._deadline, self._error, self._interrupt = stream, deadline, error, interrupt

    def _bounded(self, method, *args):
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise self._error()
        if not self._interrupt:
            return method(*args)
        import gevent

        with gevent.Timeout(remaining, self._error):
            return method(*args)

    def read(self, *args):
        return self._bounded(self._stream.read, *args)

    def readline(self, *args):
        return self._bounded(self._stream.readline, *args)

    def readlines(self, *args):
        return self._bounded(self._stream.readlines, *args)

    def __iter__(self):
        while line := self.readline():
            yield line

    def close(self):
        close = getattr(self._stream, "close", None)
        if close:
            close()


class BodyDeadline:
    """WSGI middleware: the request body must arrive within ``seconds`` of the request's start (else the
    read raises a 408 HTTPException). Requests without a body are passed through untouched."""

    def __init__(self, app, seconds: float):
        self.app = app
        self.seconds = seconds
        self.error = body_timeout_error(seconds)
        self.interrupt = gevent_active()

    def __call__(self, environ, start_response):
        if environ.get("CONTENT_LENGTH", "") not in ("", "0") or "chunked" in environ.get("HTTP_TRANSFER_ENCODING", ""):
            environ["wsgi.input"] = _DeadlineInput(environ["wsgi.input"], time.monotonic() + self.seconds,
                                                   self.error, self.interrupt)
        return self.app(environ, start_response)


# -- logging ---------------------------------------------------------------------------------------------
def configure_logging(handlers=None, fmt: str | None = None) -> None:
    """The service's log lines (INFO and up) to these handlers (default: one to stderr), in CDS_LOG_FORMAT.
    A no-op when logging was configured elsewhere (handlers on the root or the service's logger)."""
    from . import logs

    app_log = logging.getLogger(APP_LOGGER)
    if app_log.handlers or logging.getLogger().handlers:
        return
    if handlers is None:
        handlers = [logging.StreamHandler(sys.stderr)]
        for handler in handlers:
            handler.setFormatter(logging.Formatter("%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"))
    logs.configure_handlers(handlers, fmt)
    for handler in handlers:
        app_log.addHandler(handler)
    app_log.setLevel(logging.INFO)
    app_log.propagate = False


# -- metrics directory -----------------------------------------------------------------------------------
_own_metrics_dir: str | None = None
_own_metrics_lock: int | None = None  # fd, flock'ed while this master or any of its workers lives


def _private_metrics_dir() -> str:
    """A fresh 0700 temporary directory, removed by ``remove_metrics_dir``. Directories left by a master
    that was killed (SIGKILL) are removed here: their .lock is no longer held by any process."""
    import fcntl
    import glob
    import shutil
    import tempfile

    global _own_metrics_lock
    for stale in glob.glob(os.path.join(tempfile.gettempdir(), "cds-metrics-*", ".lock")):
        try:
            fd = os.open(stale, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # held: its service is running
        finally:
            os.close(fd)
        shutil.rmtree(os.path.dirname(stale), ignore_errors=True)
    path = tempfile.mkdtemp(prefix="cds-metrics-")
    _own_metrics_lock = os.open(os.path.join(path, ".lock.new"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(_own_metrics_lock, fcntl.LOCK_EX)
    os.rename(os.path.join(path, ".lock.new"), os.path.join(path, ".lock"))  # appears only once locked
    return path


def prepare_metrics_dir() -> str | None:
    """Before the workers exist: the directory of the workers' metrics (the operator's, wiped, or a private
    one). Returns a warning when prometheus_client was imported too early to use it."""
    global _own_metrics_dir
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:  # the operator's: drop a previous run's values
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(path):
            if name.endswith(".db"):
                os.remove(os.path.join(path, name))
    else:
        path = _own_metrics_dir = _private_metrics_dir()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    if "prometheus_client" in sys.modules:  # e.g. --preload: the metrics were made before the directory was set
        from prometheus_client import values
        if values.ValueClass is values.MutexValue:
            return ("prometheus_client was loaded before PROMETHEUS_MULTIPROC_DIR was set: "
                    "/metrics shows the answering worker's values only")
    return None


def worker_exited(pid: int) -> None:
    """A worker exited: its counters stay in the sum; multiprocess bookkeeping for its pid ends."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, path)


def remove_metrics_dir() -> None:
    if _own_metrics_dir:
        import shutil

        shutil.rmtree(_own_metrics_dir, ignore_errors=True)


# -- rules -----------------------------------------------------------------------------------------------
def remember_rules() -> int | None:
    """Master: load the rules if their files changed (kept for workers started while the files on disk do
    not validate). Returns the number of rules held, None when there are none."""
    from . import runtime

    settings = Settings.from_env()
    if not runtime.remember_last_good_rules(settings):
        return None
    rulebook = runtime.last_good_rules(settings)
    return len(rulebook.rules) if rulebook else None


def reload_everywhere(worker_pids, send_signal) -> None:
    """Master, SIGHUP: forward SIGHUP to every worker (they reload at once, in parallel), then refresh the
    master's last good rules (only workers started later use those)."""
    from . import runtime

    for pid in worker_pids:
        send_signal(pid, signal.SIGHUP)
    try:
        runtime.remember_last_good_rules(Settings.from_env(), force=True)
    except Exception:  # noqa: BLE001
        log.exception("master: could not refresh the last-good rules")


HELD_SIGNALS = {signal.SIGHUP, signal.SIGTERM}


def hold_signals() -> None:
    """Worker, right after the fork: SIGHUP and SIGTERM sent while the worker boots stay pending until
    ``start_worker`` runs, when the worker's own handlers are installed. A SIGHUP would otherwise kill the
    booting worker; a SIGTERM (the master stopping) would reach the master's inherited handler and be
    lost, and the master would wait its whole graceful_timeout for a worker that never heard it."""
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)


GC_GEN0_THRESHOLD = 10_000  # young-generation threshold in the workers (Python's default: 700)
ADMIN_THREADS = 2  # native threads per gevent worker for the /admin views; more views wait their turn


def start_worker(app) -> None:
    """Worker, app loaded: SIGHUP reloads the rules in-process; a thread watches the rule files; the
    long-lived rule objects leave the garbage collector's sight."""
    try:
        rt = app.extensions["cds"]
        if gevent_active():  # a reload's CPU-bound loading on a native thread: the greenlets keep being served
            import gevent

            rt.run_blocking = _on_native_thread(gevent.get_hub().threadpool)
            # Not the hub's pool: gevent resolves host names there (the FHIR and JWKS connections), and ten
            # admin views at once held all of its threads.
            from gevent.threadpool import ThreadPool

            rt.run_admin = _on_native_thread(ThreadPool(ADMIN_THREADS))
        if hasattr(signal, "SIGHUP") and _main_thread():
            rt.install_sighup_handler()
        rt.start_watching(rt.settings.rules_poll_seconds)
    except Exception:  # noqa: BLE001 - never let SIGHUP kill a serving worker
        log.exception("rule reload is not available in this worker; SIGHUP is ignored")
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)
    # measured: large-request p99 56 -> 9 ms once full collections stop walking the rules and templates
    gc.collect()
    gc.freeze()
    # A 121 KB request parses into ~10,000 containers that live for the call: at Python's default of 700
    # they set off ~3 young collections per call (0.1 ms of CPU); at GC_GEN0_THRESHOLD, none. The call's
    # objects are freed by reference counting when it ends, so the young generation stays small.
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])


def _on_native_thread(pool):
    """``run(fn, *args)``: fn(*args) on a thread of gevent's pool, its exception re-raised here (the pool
    itself would also print it as an unhandled error)."""
    def run(fn, *args):
        def call():
            try:
                return True, fn(*args)
            except Exception as exc:  # noqa: BLE001 - handed back to the caller
                return False, exc

        ok, value = pool.apply(call)
        if ok:
            return value
        raise value

    return run


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# -- gunicorn hooks (bound by gunicorn.conf.py) -------------------------------------------------------------
def _is_gevent_worker(cfg) -> bool:
    try:
        from gunicorn.workers.ggevent import GeventWorker
    except (ImportError, RuntimeError):
        return False
    return isinstance(cfg.worker_class, type) and issubclass(cfg.worker_class, GeventWorker)


def on_starting(server):
    """Master, first hook, before binding: gevent patch; log format; configuration and port checks;
    the directory of the workers' metrics."""
    configure_logging(server.log.error_log.handlers)
    if _is_gevent_worker(server.cfg):
        patch_for_gevent(server.log.warning)
    inherited = bool(os.environ.get("GUNICORN_FD") or os.environ.get("LISTEN_FDS"))
    try:
        startup_check(server.cfg.address, reuse_port=server.cfg.reuse_port, inherited_sockets=inherited)
    except StartupError as exc:
        server.log.error("cds-hooks-service cannot start: %s", exc)
        sys.exit(1)
    warning = prepare_metrics_dir()
    if warning:
        server.log.warning(warning)


def when_ready(server):
    """Master, bound: keep the last good rules; the start-up line; SIGHUP reloads rules in the workers."""
    try:
        rules = remember_rules()
    except Exception:  # noqa: BLE001 - the workers report their own start problems
        server.log.exception("could not load the rules in the master (no last-good rules for new workers)")
        rules = None
    urls = [str(listener) for listener in server.LISTENERS] or \
        [f"http://{h}:{p}" if isinstance(h, str) else str(h) for h, p in
         (a if isinstance(a, tuple) else (f"unix:{a}", None) for a in server.cfg.address)]
    workers = f"{server.cfg.workers} worker(s) ({server.cfg.worker_class_str})"
    server.log.info("%s", startup_line(urls, Settings.from_env(), rules, workers))

    def handle_hup():
        server.log.info("Hang up: reloading the rules in every worker (workers keep running; "
                        "gunicorn config and code are NOT reloaded)")
        reload_everywhere(list(server.WORKERS), server.kill_worker)
        if getattr(server, "dirty_arbiter_pid", 0):  # keep stock behaviour for gunicorn's dirty arbiter
            server.kill_dirty_arbiter(signal.SIGHUP)

    server.handle_hup = handle_hup  # the arbiter looks up handle_<signame> on the instance per signal


def pre_fork(server, worker):
    try:
        remember_rules()
    except Exception:  # noqa: BLE001
        server.log.exception("master: could not refresh the last-good rules")


def post_fork(server, worker):
    hold_signals()


def post_worker_init(worker):
    start_worker(worker.wsgi)


def pre_request(worker, req):
    """A body over the app's size limit is answered 413 without being read: close that connection (the 413
    then says "Connection: close"; gunicorn drains at most 64 KiB and would drop it anyway)."""
    limit = worker.wsgi.config.get("MAX_CONTENT_LENGTH")
    length = next((value for name, value in req.headers if name == "CONTENT-LENGTH"), None)
    if limit and length and length.isdigit() and int(length) > limit:
        req.force_close()


def child_exit(server, worker):
    worker_exited(worker.pid)


def on_exit(server):
    remove_metrics_dir()


def worker_exit(server, worker):
    """Worker, exiting: flush and close the log handlers and forget them now, while the interpreter is whole.
    (Left to the interpreter's teardown, a handler dying after gevent's thread module is half gone prints
    "Exception ignored in _removeHandlerRef". Collecting the frozen heap here instead costs seconds.)"""
    logging.shutdown()
    logging._handlerList.clear()  # noqa: SLF001 - the weak references whose callbacks fail at teardown
