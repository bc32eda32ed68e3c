"""CDS Hooks 2.0 medication-order safety service for migraine care.

``create_app()`` is the application factory (Flask's own pattern): configuration comes from
environment variables (see the README) or from a ``Settings`` passed in by tests.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .config import Settings
from .errors import ServiceError, error_response, store_failure

if TYPE_CHECKING:
    from flask import Flask

__all__ = ["create_app", "Settings"]
log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, **runtime_parts) -> Flask:
    # imported here, not at the top: keeps prometheus_client (metrics) out of gunicorn's master, and Flask out of
    # the pharmacists' commands (which import the clinical core, e.g. hook_call, from this package)
    from flask import Flask, request
    from flask_cors import CORS
    from werkzeug.exceptions import ClientDisconnected, HTTPException, RequestTimeout

    from . import call_log, logs, metrics, serving
    from .admin import bp as admin_bp
    from .api import bp
    from .openapi import bp as openapi_bp
    from .runtime import Runtime

    settings = (settings or Settings.from_env()).check()  # ConfigError: one line naming the fix
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.wsgi_app = serving.BodyDeadline(app.wsgi_app, settings.body_timeout)  # 408 for a body that trickles
    app.json.sort_keys = False
    app.extensions["cds"] = Runtime(settings, **runtime_parts)
    # Browser clients (the CDS Hooks Sandbox) preflight every call; the preflight carries no JWT.
    # CDS_CORS_ORIGINS (default: the public Sandbox's origin); "*" is refused outside open mode (config.py).
    CORS(app, resources={r"/cds-services*": {"origins": settings.cors_origin_list()}},
         allow_headers=["Authorization", "Content-Type"], methods=["GET", "POST", "OPTIONS"], max_age=600)
    logs.init_app(app)  # first: its before_request starts the request's correlation ids
    metrics.init_app(app)  # GET /metrics
    call_log.init_app(app)  # the one log line per hook call
    app.register_blueprint(bp)
    app.register_blueprint(admin_bp)
    app.register_blueprint(openapi_bp)  # GET /openapi.json

    @app.after_request
    def _drain_unread_body(response):
        # An answer given before the body was read (401, 404, 405, 415, ...) must not break the client's
        # kept-alive connection: gunicorn drains at most 64 KiB of an unread body after the response and
        # otherwise closes the connection it announced as keep-alive. Read the rest here (the stream is
        # bounded by MAX_CONTENT_LENGTH; a body over the limit is answered 413 and its connection closed
        # by serving.pre_request). The drain ends at the body deadline (serving.BodyDeadline,
        # CDS_BODY_TIMEOUT): a client that trickles its body gets its answer then, and gunicorn closes.
        if request.content_length and request.content_length <= settings.max_body_bytes:
            stream = request.stream
            try:  # the whole body read already (every hook call): no 64 KiB read buffer for nothing
                if stream.tell() >= request.content_length:
                    return response
            except (AttributeError, OSError):  # a stream that cannot tell: drain as below
                pass
            try:
                while stream.read(1 << 16):
                    pass
            except (ClientDisconnected, RequestTimeout):  # gone, or too slow: nothing to keep alive
                pass
        return response

    @app.errorhandler(ServiceError)
    def _service_error(exc: ServiceError):
        return error_response(exc.status, exc.message, exc.code, exc.field)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        messages = {404: "no such endpoint; CDS Services are listed at GET /cds-services",
                    405: f"method {getattr(exc, 'valid_methods', None) and 'not allowed; allowed: ' + ', '.join(exc.valid_methods) or 'not allowed'}",
                    413: f"request body larger than the limit of {settings.max_body_bytes} bytes"}
        code = {404: "not-found", 405: "not-supported", 408: "timeout", 413: "too-costly"}.get(exc.code, "invalid")
        response = error_response(exc.code or 500, messages.get(exc.code, exc.description or exc.name), code)
        if exc.code == 405 and getattr(exc, "valid_methods", None):
            response.headers["Allow"] = ", ".join(exc.valid_methods)
        return response

    from sqlalchemy.exc import SQLAlchemyError

    @app.errorhandler(SQLAlchemyError)
    def _store_unavailable(exc: SQLAlchemyError):
        # The database cannot be reached (down, dropped, locked past its timeout): 503 with Retry-After, not 500.
        # The transaction was not committed, so nothing of the request is kept and the client may send it again.
        # Logged by type and SQLSTATE only (store_failure). A hook call never gets here: its cards are answered
        # even when they cannot be recorded (hook_call._issue).
        operation = "feedback" if request.endpoint == "cds.feedback" else (request.blueprint or "other")
        log.error("store failed on %s (%s): answered 503, nothing stored", operation, store_failure(exc))
        metrics.store_error(operation)
        return error_response(503, "the service's database cannot be reached; nothing of this request was stored. "
                              "Send it again later", "transient")

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unexpected error while handling a request")
        return error_response(500, "internal error; the service could not process this request", "exception")

    return app
