"""Prometheus metrics, served at ``GET /metrics`` (text exposition format).

Every label has a bounded set of values: service ids of this service (``unknown`` for any other),
rule ids and indicators of the loaded rules, prefetch keys, exception kinds, Flask endpoint names (never
the raw path: it holds a client-chosen service id) and HTTP status codes. No URL, token or patient id.

Processes: the metrics are defined once, at import (several ``create_app()`` in one process share them).
Under gunicorn, gunicorn.conf.py points ``PROMETHEUS_MULTIPROC_DIR`` at a private directory before the
workers start; prometheus_client then keeps each worker's values in files there and ``/metrics``
(answered by any worker) adds up all workers, including those that have exited. Elsewhere (tests,
``flask run``) ``/metrics`` shows this process's registry.

Access: with ``CDS_METRICS_TOKEN`` set, ``Authorization: Bearer <token>``. Without it, only a service that
listens on loopback alone answers, and only to a loopback client whose request came through no proxy
(no ``Forwarded``/``X-Forwarded-For``): everyone else gets 403 naming the setting. Never the CDS Hooks JWT.
"""
from __future__ import annotations

import hmac
import os
import time

from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import (REGISTRY, CollectorRegistry, Counter, Histogram, disable_created_metrics, multiprocess,
                               values)
from prometheus_client.exposition import choose_encoder

from .config import is_loopback_host
from .errors import error_response
from .hook_call import SHADOW
from .services import SERVICES

# Multiprocess mode is chosen by prometheus_client when it is imported (PROMETHEUS_MULTIPROC_DIR set).
MULTIPROCESS_DIR = ((os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir"))
                    if values.ValueClass is not values.MutexValue else None)
disable_created_metrics()  # no *_created series: they add nothing a scraper needs

# p50 of a hook call is ~3-5 ms; the FHIR fallback has a 1.5 s budget (CDS_TIME_BUDGET)
HOOK_BUCKETS = (.002, .005, .01, .025, .05, .1, .25, .5, 1.0, 1.5, 2.5, 5.0)

HOOK_DURATION = Histogram("cds_hook_duration_seconds", "Time to answer a hook call (any status), per CDS service",
                          ["service"], buckets=HOOK_BUCKETS)
HTTP_RESPONSES = Counter("cds_http_responses", "HTTP responses by Flask endpoint name and status code",
                         ["endpoint", "status"])
CARDS = Counter("cds_cards", "Cards sent, by rule id (card.source.topic.code; data-unavailable and cards-not-shown: "
                "the service's own info cards) and indicator", ["rule", "indicator"])
CHECKS_NOT_COMPLETED = Counter("cds_checks_not_completed", "Rules that could not be completed because patient data "
                               "could not be read (an info card was sent instead)", ["rule"])
SHADOW_FINDINGS = Counter("cds_shadow_findings", "Findings of rules in shadow mode (counted, no card shown)", ["rule"])
FHIR_QUERIES = Counter("cds_fhir_queries", "FHIR-server fallback queries, one per prefetch key read", ["key"])
FHIR_FAILURES = Counter("cds_fhir_failures", "FHIR-server fallback queries that failed, by prefetch key and kind "
                        "(unavailable: down, timeout, budget, 5xx/429; unauthorized: 401/403; bad_response; refused: the server's "
                        "address is not allowed, see CDS_FHIR_PRIVATE_NETWORKS)",
                        ["key", "reason_class"])
FEEDBACK_STORED = Counter("cds_feedback_items", "Feedback items recorded (the answer's \"stored\"; an item sent again "
                          "is counted again, kept once in the database)", ["service"])
STORE_ERRORS = Counter("cds_store_errors", "Feedback-store failures by operation (issue_cards: a hook call's cards were "
                       "answered but not recorded; feedback, admin: a request answered 503, nothing stored)", ["operation"])
TEMPLATE_FALLBACKS = Counter("cds_card_template_fallbacks", "Card renders that failed or went over a render limit "
                             "and were sent with the rule's plain text instead", ["rule"])

_hook_duration = {sid: HOOK_DURATION.labels(sid) for sid in [*SERVICES, "unknown"]}  # resolved once; shown from 0

bp = Blueprint("metrics", __name__)


def service_label(service_id: object) -> str:
    return service_id if service_id in SERVICES else "unknown"


# -- hook calls -------------------------------------------------------------------------------------------
def hook_result(result) -> None:
    """Count one answered hook call: its cards, the checks it could not complete, its FHIR fallback queries.
    (Its log line is call_log's.)"""
    for card in result.response["cards"]:
        CARDS.labels(card["source"]["topic"]["code"], card["indicator"]).inc()  # rule id or service's own card
    for rule_id in result.not_completed:
        CHECKS_NOT_COMPLETED.labels(rule_id).inc()
    for finding in result.with_outcome(SHADOW):
        SHADOW_FINDINGS.labels(finding.rule.id).inc()
    if result.data is not None:
        for key in (*result.data.fetched, *result.data.errors):
            FHIR_QUERIES.labels(key).inc()
        for key, error in result.data.errors.items():
            FHIR_FAILURES.labels(key, _reason_class(error)).inc()


def feedback_stored(service_id: str, stored: int) -> None:
    if stored:
        FEEDBACK_STORED.labels(service_label(service_id)).inc(stored)


def store_error(operation: str) -> None:
    STORE_ERRORS.labels(operation).inc()


def template_fallback(rule_id: str) -> None:
    TEMPLATE_FALLBACKS.labels(rule_id).inc()


def _reason_class(error) -> str:
    from .fhir_client import FhirBadResponse, FhirRefused, FhirUnauthorized, FhirUnavailable

    for cls, name in ((FhirRefused, "refused"), (FhirUnavailable, "unavailable"), (FhirUnauthorized, "unauthorized"),
                      (FhirBadResponse, "bad_response")):
        if isinstance(error, cls):
            return name
    return "error"


# -- per request ------------------------------------------------------------------------------------------
def _start():
    g.cds_started = time.perf_counter()


def _count_response(response):
    endpoint = request.endpoint or "unmatched"  # 404/405 before routing: no endpoint
    HTTP_RESPONSES.labels(endpoint, str(response.status_code)).inc()
    if endpoint == "cds.hook":
        elapsed = time.perf_counter() - g.get("cds_started", time.perf_counter())
        service = service_label((request.view_args or {}).get("service_id"))
        _hook_duration[service].observe(elapsed)
    return response


@bp.get("/metrics")
def metrics():
    settings = current_app.extensions["cds"].settings
    token = settings.metrics_token
    if token:
        scheme, _, presented = (request.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), token.encode()):
            return error_response(401, "metrics credentials required: 'Authorization: Bearer <CDS_METRICS_TOKEN>'",
                                  "login")
    elif not _local_request(settings):
        return error_response(403, "/metrics is answered to loopback clients only; set CDS_METRICS_TOKEN to "
                                   "scrape it from elsewhere", "forbidden")
    if MULTIPROCESS_DIR:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=MULTIPROCESS_DIR)
    else:
        registry = REGISTRY
    encoder, content_type = choose_encoder(request.headers.get("Accept"))  # text format; OpenMetrics if asked
    response = Response(encoder(registry), content_type=content_type)
    response.headers["Cache-Control"] = "no-store"
    return response


def _local_request(settings) -> bool:
    """A loopback client of a service that listens on loopback only, not relayed by a proxy."""
    if not settings.loopback_only or request.headers.get("Forwarded") or request.headers.get("X-Forwarded-For"):
        return False
    return is_loopback_host(request.remote_addr or "")


def init_app(app: Flask) -> None:
    app.before_request(_start)
    app.after_request(_count_response)
    app.register_blueprint(bp)

