"""gunicorn settings for production (Procfile) and `python -m cds_hooks_service serve`.

gthread workers keep HTTP connections alive (EHRs reuse connections; the sync worker closes them).
On a 2-core machine: 2 worker processes x 4 threads. Override with WEB_CONCURRENCY / GUNICORN_THREADS.
"""
import os

bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", "4"))
keepalive = 15
timeout = 30
graceful_timeout = 20
accesslog = None  # access logs carry URLs only; off by default (set GUNICORN_CMD_ARGS=--access-logfile=- to enable)
errorlog = "-"
