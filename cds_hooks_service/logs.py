"""Structured logs: one JSON object per line, correlated by ``hookInstance`` and ``requestId``.

Correlation: ``init_app`` starts every request with a ``requestId`` (the caller's ``X-Request-Id`` when it
is a short safe token, else a uuid4; echoed in the response header) held in a context variable; the hook
view adds the request's ``hookInstance`` once the body is read (``set_hook_instance``) and the views name
the CDS service (``set_service``). ``CorrelationFilter``, attached to the *handlers*, copies them onto every
record, so a line logged by any module (hook_call, cards, store, auth, ...) while a request is handled
carries them without passing them around. Before the body is read, and for feedback calls (whose body
has no hookInstance), ``hookInstance`` is the ``requestId``. Lines outside a request carry null.

Caveat: context variables do not follow work handed to a thread pool (fhir_client's fetch threads);
those threads do not log today.

Format: ``CDS_LOG_FORMAT=auto`` (default: ``text`` when the handler writes to a terminal, ``json`` otherwise),
``json`` or ``text``, applied by serving.py to the server's error log handlers (see ``configure_handlers``);
text keeps the server's own human-readable format. JSON fields: time (ISO 8601, UTC), level, logger, message,
hookInstance, requestId, service, pid, plus any ``extra=`` fields of the call. Never log patient data or
tokens: ids of the request (hookInstance, requestId), codes, counts and the service's own reasons only.
"""
from __future__ import annotations

import logging
import os
import re
import uuid
from contextvars import ContextVar
from dataclasses import dataclass

from flask import Flask, request

REQUEST_ID_HEADER = "X-Request-Id"
LOG_FORMATS = ("auto", "json", "text")
JSON_FIELDS = ["levelname", "name", "message", "hookInstance", "requestId", "service", "process"]
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,99}")  # a caller's id we repeat in logs and headers


@dataclass(slots=True)
class _Correlation:
    request_id: str
    hook_instance: str | None = None
    service: str | None = None


_current: ContextVar[_Correlation | None] = ContextVar("cds_log_correlation", default=None)


def safe_id(value: object) -> str | None:
    """The value if it is a short token safe to put in a log line or a header, else None."""
    return value if isinstance(value, str) and _SAFE_ID.fullmatch(value) else None


def begin_request(request_id: str | None = None) -> str:
    corr = _Correlation(safe_id(request_id) or str(uuid.uuid4()))
    _current.set(corr)
    return corr.request_id


def end_request() -> None:
    _current.set(None)


def set_hook_instance(value: object) -> None:
    corr = _current.get()
    if corr is not None:
        # CDS Hooks says a UUID; anything else (a schema-valid string of up to 200 characters) is not repeated
        corr.hook_instance = safe_id(value) or "invalid"


def set_service(service_id: str) -> None:
    corr = _current.get()
    if corr is not None:
        corr.service = service_id


def current_request_id() -> str | None:
    corr = _current.get()
    return corr.request_id if corr else None


def correlation() -> dict[str, str | None]:
    """hookInstance, requestId and service of the request being handled (None outside requests): what
    :class:`CorrelationFilter` adds to a record, for a line logged once the request is over."""
    corr = _current.get()
    if corr is None:
        return {"hookInstance": None, "requestId": None, "service": None}
    return {"hookInstance": corr.hook_instance or corr.request_id, "requestId": corr.request_id,
            "service": corr.service}


class CorrelationFilter(logging.Filter):
    """Adds hookInstance, requestId and service of the request being handled (None outside requests), unless
    the record carries them already (``extra=correlation()``, taken while the request was handled)."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = record.__dict__
        for key, value in correlation().items():
            fields.setdefault(key, value)
        return True


def json_formatter() -> logging.Formatter:
    from pythonjsonlogger.orjson import OrjsonFormatter  # the same JSON as json.dumps, compact, a third faster

    # defaults={"time": None} only reserves the first position for the timestamp, filled in last.
    return OrjsonFormatter(JSON_FIELDS, rename_fields={"levelname": "level", "name": "logger", "process": "pid"},
                         timestamp="time", defaults={"time": None})


def log_format(stream=None) -> str:
    """``json`` or ``text`` for a handler writing to ``stream``: CDS_LOG_FORMAT, where ``auto`` (the default)
    means text on a terminal and JSON otherwise (files, pipes, container log collectors)."""
    value = (os.environ.get("CDS_LOG_FORMAT") or "auto").strip().lower()
    if value not in LOG_FORMATS:
        raise ValueError(f"CDS_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, got {value!r}")
    if value == "auto":
        try:
            return "text" if stream is not None and stream.isatty() else "json"
        except (AttributeError, ValueError):  # no isatty, or closed
            return "json"
    return value


def configure_handlers(handlers, fmt: str | None = None) -> None:
    """Correlation fields on every record these handlers emit; in json format, one JSON object per line."""
    for handler in handlers:
        if not any(isinstance(f, CorrelationFilter) for f in handler.filters):
            handler.addFilter(CorrelationFilter())
        if (fmt or log_format(getattr(handler, "stream", None))) == "json":
            handler.setFormatter(json_formatter())


def init_app(app: Flask) -> None:
    @app.before_request
    def _begin_request():
        begin_request(request.headers.get(REQUEST_ID_HEADER))

    @app.after_request
    def _echo_request_id(response):
        request_id = current_request_id()
        if request_id:
            response.headers[REQUEST_ID_HEADER] = request_id
        return response

    @app.teardown_request
    def _end_request(_exc):
        end_request()
