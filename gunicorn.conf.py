"""gunicorn settings for production (Procfile) and `python -m cds_hooks_service serve`.

gthread workers keep HTTP connections alive (EHRs reuse connections; the sync worker closes them).
On a 2-core machine: 2 worker processes x 4 threads (bench/load.py: as fast as 2 x 2 since the store
fixes, and threads wait out FHIR fallback reads). Override with WEB_CONCURRENCY / GUNICORN_THREADS.

Rule changes (safe reload) — SIGHUP DOES NOT RESTART THE WORKERS HERE:
- Stock gunicorn answers SIGHUP to the master by reloading its config and replacing every worker with a
  new process that loads the rules from scratch; with a rule file that does not validate the new workers
  fail to boot and gunicorn halts the whole server. This file replaces that: the master forwards SIGHUP to
  every worker, and each worker reloads the rules in-process (Runtime.reload_rules): valid rules are
  swapped in atomically, invalid ones are refused with a logged error and the worker keeps serving its
  previous rules. No worker restarts, no moment without rules.
- Every worker also polls the rule files (rules, cards, value sets, CDS_RULES_LOCAL_DIR) every
  CDS_RULES_POLL_SECONDS (default 2; 0 = SIGHUP only) and reloads the same way on a change.
- The master keeps the last rules that validated (checked before each fork and on SIGHUP); a worker
  started while the files on disk are invalid (after a crash, a timeout, max_requests) serves those
  instead of failing to boot.
- Consequence: SIGHUP no longer reloads gunicorn.conf.py or the Python code. To deploy new code or
  settings, restart the service (or USR2 + QUIT the old master for a zero-downtime binary upgrade).
- Log lines from the service (cds_hooks_service.*, INFO and up) go to gunicorn's error log, with pids.
  CDS_LOG_FORMAT=json (default): every line of the error log (the service's and gunicorn's own, from the
  first hook on) is one JSON object with hookInstance/requestId (cds_hooks_service/logs.py); text: gunicorn's format.
- Metrics (/metrics): each worker keeps its values in files under PROMETHEUS_MULTIPROC_DIR (a private
  temporary directory made by the master unless the operator sets one, whose values are wiped at start), so
  /metrics adds up all workers whichever one answers. The master removes its directory on exit, and at start
  those of killed masters (no process holds their lock any more).
"""
import logging
import gc
import os
import signal

bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", "4"))
keepalive = 15
# gunicorn 27 opens a control socket under ~/.gunicorn shared by every instance on the host; not used here.
control_socket_disable = True
# Each worker listens on its own SO_REUSEPORT socket and the kernel spreads new connections over them. With one
# shared socket, a worker accepts whatever arrives while it is awake and keeps it (keep-alive): measured with
# wrk opening 32 connections at once, one worker held 32 and the other 0, and throughput halved.
reuse_port = True
timeout = 30
graceful_timeout = 20
accesslog = None  # access logs carry URLs only; off by default (set GUNICORN_CMD_ARGS=--access-logfile=- to enable)
errorlog = "-"


def _rule_settings():
    from cds_hooks_service.config import Settings

    return Settings.from_env()


def _send_app_logs_to_gunicorn(server) -> None:
    from cds_hooks_service import logs

    app_log = logging.getLogger("cds_hooks_service")
    if app_log.handlers or logging.getLogger().handlers:
        return  # logging is configured elsewhere: leave it alone
    logs.configure_handlers(server.log.error_log.handlers)  # CDS_LOG_FORMAT; correlation ids on every line
    for handler in server.log.error_log.handlers:
        app_log.addHandler(handler)
    app_log.setLevel(logging.INFO)
    app_log.propagate = False


_own_metrics_dir = None
_own_metrics_lock = None  # fd, flock'ed while this master or any of its workers lives


def _private_metrics_dir() -> str:
    """A fresh 0700 temporary directory, removed in on_exit. Directories left by a master that was killed
    (SIGKILL: no on_exit) are removed here: their .lock is no longer held by any process."""
    import fcntl
    import glob
    import shutil
    import tempfile

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
    global _own_metrics_lock
    path = tempfile.mkdtemp(prefix="cds-metrics-")
    _own_metrics_lock = os.open(os.path.join(path, ".lock.new"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(_own_metrics_lock, fcntl.LOCK_EX)
    os.rename(os.path.join(path, ".lock.new"), os.path.join(path, ".lock"))  # appears only once locked
    return path


def on_starting(server):
    """Master, first hook, before the workers exist: log format; the directory of the workers' metrics."""
    global _own_metrics_dir
    import sys

    _send_app_logs_to_gunicorn(server)  # from here on (again a no-op in when_ready)
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
            server.log.warning("prometheus_client was loaded before PROMETHEUS_MULTIPROC_DIR was set: "
                               "/metrics shows the answering worker's values only")


def child_exit(server, worker):
    """Master, a worker exited: its counters stay in the sum; multiprocess bookkeeping for its pid ends."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid, path)


def on_exit(server):
    if _own_metrics_dir:
        import shutil

        shutil.rmtree(_own_metrics_dir, ignore_errors=True)


def when_ready(server):
    """Master: keep the last good rules; make SIGHUP reload the rules in the workers instead of restarting them."""
    from cds_hooks_service import runtime

    _send_app_logs_to_gunicorn(server)
    try:
        runtime.remember_last_good_rules(_rule_settings())
    except Exception:  # noqa: BLE001 - the workers report their own start problems
        server.log.exception("could not load the rules in the master (no last-good rules for new workers)")

    def handle_hup():
        server.log.info("Hang up: reloading the rules in every worker (workers keep running; "
                        "gunicorn config and code are NOT reloaded)")
        try:
            runtime.remember_last_good_rules(_rule_settings(), force=True)
        except Exception:  # noqa: BLE001
            server.log.exception("master: could not refresh the last-good rules")
        for pid in list(server.WORKERS):
            server.kill_worker(pid, signal.SIGHUP)
        if getattr(server, "dirty_arbiter_pid", 0):  # keep stock behaviour for gunicorn's dirty arbiter
            server.kill_dirty_arbiter(signal.SIGHUP)

    server.handle_hup = handle_hup  # the arbiter looks up handle_<signame> on the instance per signal


def pre_fork(server, worker):
    """Master, before each fork: refresh the last good rules if the files changed (loads only on change)."""
    from cds_hooks_service import runtime

    try:
        runtime.remember_last_good_rules(_rule_settings())
    except Exception:  # noqa: BLE001
        server.log.exception("master: could not refresh the last-good rules")


def post_fork(server, worker):
    """Worker, before gunicorn resets its signals: hold SIGHUP back until the reload handler is installed.

    A SIGHUP forwarded while the worker is still booting stays pending (it would otherwise kill the
    booting worker: gunicorn sets SIGHUP to its default action in workers) and is delivered in
    post_worker_init.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})


def pre_request(worker, req):
    """Worker: a body over the app's size limit is answered 413 without being read; close that connection.

    (gunicorn drains at most 64 KiB of an unread body and otherwise drops the connection it announced as
    keep-alive; forcing the close makes the 413 say "Connection: close", so the client knows.)"""
    limit = worker.wsgi.config.get("MAX_CONTENT_LENGTH")
    length = next((value for name, value in req.headers if name == "CONTENT-LENGTH"), None)
    if limit and length and length.isdigit() and int(length) > limit:
        req.force_close()


def post_worker_init(worker):
    """Worker, app loaded: SIGHUP reloads the rules in-process; a thread watches the rule files."""
    try:
        rt = worker.wsgi.extensions["cds"]
        rt.install_sighup_handler()
        rt.start_watching(rt.settings.rules_poll_seconds)
    except Exception:  # noqa: BLE001 - never let SIGHUP kill a serving worker
        worker.log.exception("rule reload is not available in this worker; SIGHUP is ignored")
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    # The rules, value sets and templates live as long as the worker: move them out of the garbage
    # collector's sight, so full collections stop walking them (measured: large-request p99 56 -> 9 ms).
    gc.collect()
    gc.freeze()
