"""The one log line per hook call: service, HTTP status, duration and cards by indicator.

It holds no patient data, no token and no client-chosen text: the service id is one of this service's
(``unknown`` otherwise), the rest are numbers. Made when the response is built, written on the API's logger once
the answer is sent (when the WSGI server closes the response).
"""
from __future__ import annotations

import logging
import time
from functools import partial

from flask import Flask, g, request

from . import logs
from .services import SERVICES

log = logging.getLogger("cds_hooks_service.api")  # the one line per hook call belongs to the API's log


def hook_result(result) -> None:
    """Keep the answered call's cards per indicator for its log line."""
    cards: dict[str, int] = {}
    for card in result.response["cards"]:
        cards[card["indicator"]] = cards.get(card["indicator"], 0) + 1
    g.cds_cards = cards


def _start() -> None:
    g.cds_call_started = time.perf_counter()


def _log_hook_call(response):
    """The call's line, made now (its duration ends here) and written once the answer is sent: the WSGI server
    closes the response after writing its body (gunicorn, werkzeug), so the client does not wait for the log."""
    if request.endpoint != "cds.hook" or not log.isEnabledFor(logging.INFO):
        return response
    elapsed = time.perf_counter() - g.get("cds_call_started", time.perf_counter())
    service_id = (request.view_args or {}).get("service_id")
    service = service_id if service_id in SERVICES else "unknown"
    cards = g.get("cds_cards", {})
    by_indicator = " (" + ", ".join(f"{k} {v}" for k, v in sorted(cards.items())) + ")" if cards else ""
    response.call_on_close(partial(
        log.info, "hook %s answered %d in %.1f ms: %d card(s)%s", service, response.status_code, elapsed * 1000,
        sum(cards.values()), by_indicator, extra={"status": response.status_code, "cards": cards,
                                                  "duration_ms": round(elapsed * 1000, 2), **logs.correlation()}))
    return response


def init_app(app: Flask) -> None:
    app.before_request(_start)
    app.after_request(_log_hook_call)
