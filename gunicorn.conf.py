"""gunicorn settings for the Procfile and `python -m cds_hooks_service serve`: settings only.

What the service does as a process (start-up checks, gevent, the body deadline, logging, metrics across
workers, rule reload on SIGHUP without restarts) lives in cds_hooks_service/serving.py; the hooks below only
bind gunicorn's hook names to it.

gevent workers: one greenlet per connection, so clients that send their headers or body slowly hold a
greenlet, not one of a handful of threads (see serving.py and the README). A request's headers must arrive
within `keepalive` seconds, its body within CDS_BODY_TIMEOUT. GUNICORN_WORKER_CLASS=gthread is still
possible, without that protection.
"""
import os

worker_class = os.environ.get("GUNICORN_WORKER_CLASS", "cds_hooks_service.gevent_worker.GeventWorker")
if "gevent" in worker_class.lower():
    # First, before anything imports urllib3 (the service does, via requests): see serving.patch_for_gevent.
    from gevent import monkey

    monkey.patch_all(os=False, signal=False, subprocess=False)

from cds_hooks_service import serving  # noqa: E402

bind = f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_connections = int(os.environ.get("GUNICORN_WORKER_CONNECTIONS", "1000"))  # per worker (gevent)
threads = int(os.environ.get("GUNICORN_THREADS", "4"))  # gthread only
keepalive = 5  # seconds: idle kept-alive connections; also the time a request's headers may take (gevent)
# Two servers on one port split the requests silently with SO_REUSEPORT: only when asked.
reuse_port = os.environ.get("GUNICORN_REUSE_PORT", "") == "1"
control_socket_disable = True  # gunicorn 27's control socket under ~/.gunicorn: not used
timeout = 30
graceful_timeout = 20
accesslog = None  # access logs carry URLs only; off by default (GUNICORN_CMD_ARGS=--access-logfile=- to enable)
errorlog = "-"

on_starting = serving.on_starting
when_ready = serving.when_ready
pre_fork = serving.pre_fork
post_fork = serving.post_fork
post_worker_init = serving.post_worker_init
pre_request = serving.pre_request
child_exit = serving.child_exit
on_exit = serving.on_exit
worker_exit = serving.worker_exit
