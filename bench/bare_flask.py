"""A bare Flask app answering the service's discovery JSON: the framework's floor for ``hook_latency.py``.

Served by gunicorn with the service's worker settings (gthread, keep-alive), it does nothing but return the
same bytes as ``GET /cds-services``: the ratio of the service's discovery to this is what the service adds.
"""
from __future__ import annotations

from flask import Flask, jsonify

from cds_hooks_service.config import Settings
from cds_hooks_service.rulebook import load_rulebook
from cds_hooks_service.services import SERVICES

app = Flask(__name__)
_settings = Settings()
_prefetch = load_rulebook(_settings.rules_dir, _settings.cards_dir).prefetch  # the same templates the service sends
DISCOVERY = {"services": [s.discovery(_prefetch) for s in SERVICES.values()]}


@app.get("/cds-services")
def discovery():
    return jsonify(DISCOVERY)


@app.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})
