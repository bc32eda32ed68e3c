"""Secure defaults (issue 10, finding 10): what the service refuses to start with, and what it refuses to serve.

Open mode only on loopback (or CDS_ALLOW_OPEN_MODE=1); JWT required under the Procfile; CORS origins from
CDS_CORS_ORIGINS (default: the Sandbox), "*" in open mode only; /metrics without CDS_METRICS_TOKEN for
loopback clients only; tokens of at least 32 characters; failed admin logins limited per address;
`stats` escapes control characters; a malformed fhirServer is a 400, not a 500.
"""
from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timezone

import pytest

from cds_hooks_service.cli import main
from cds_hooks_service.config import SANDBOX_ORIGIN, ConfigError, Settings
from cds_hooks_service.ratelimit import FailureLimiter
from tests.helpers import REPO
from tests.plugins.gunicorn_service import GunicornService, cleaned_env, free_port, procfile_command
from tests.helpers import SIGN, post, request_body

ISSUERS = REPO / "tests/fixtures/sandbox/issuers-sandbox.json"
TOKEN = "t" * 32


# -- open mode ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hosts", [("0.0.0.0",), ("::",), ("127.0.0.1", "192.0.2.7"), ()])
def test_open_mode_is_refused_off_loopback(make_app, hosts):
    with pytest.raises(ConfigError, match="open mode .* loopback only.*CDS_ALLOW_OPEN_MODE=1") as caught:
        make_app(listen_hosts=hosts)
    assert "\n" not in str(caught.value)
    make_app(listen_hosts=hosts, allow_open_mode=True)  # the operator said so
    make_app(listen_hosts=hosts, jwt_issuers_file=ISSUERS)  # JWT mode listens anywhere


@pytest.mark.parametrize("hosts", [("127.0.0.1",), ("::1",), ("[::1]",), ("localhost",), ("127.0.0.2", "::1")])
def test_open_mode_on_loopback(make_app, hosts):
    assert make_app(listen_hosts=hosts).extensions["cds"].verifier is None


def test_serve_refuses_open_mode_on_all_interfaces_in_one_line(tmp_path):
    env = cleaned_env() | {"CDS_INSTANCE_DIR": str(tmp_path), "DATABASE_URL": f"sqlite:///{tmp_path / 's.db'}"}
    done = subprocess.run([sys.executable, "-m", "cds_hooks_service", "serve", "--host", "0.0.0.0",
                           "--port", str(free_port())], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "open mode" in done.stderr and "CDS_ALLOW_OPEN_MODE=1" in done.stderr


# -- the Procfile ------------------------------------------------------------------------------------------
def test_the_procfile_refuses_to_start_without_issuers(tmp_path):
    procfile_env, argv = procfile_command()
    env = cleaned_env() | procfile_env | {"CDS_INSTANCE_DIR": str(tmp_path), "PORT": str(free_port()),
                                          "DATABASE_URL": f"sqlite:///{tmp_path / 's.db'}"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode != 0
    [line] = [line for line in done.stderr.splitlines() if "cannot start" in line]
    assert "CDS_JWT_ISSUERS is required" in line
    assert "Booting worker" not in done.stderr and "Traceback" not in done.stderr


def test_the_procfile_listens_on_loopback_unless_told_and_requires_jwt(tmp_path):
    procfile_env, argv = procfile_command()
    assert procfile_env == {"CDS_REQUIRE_JWT": "1"}
    service = GunicornService(tmp_path, dict(CDS_JWT_ISSUERS=str(ISSUERS)), workers=1, drop_env=("HOST",))
    del service.env["HOST"]  # the Procfile's default
    service.env["CDS_PUBLIC_URL"] = service.base_url
    service.env.update(procfile_env)
    service.cmd = argv
    with service:
        line = next(line for line in service.log().splitlines() if "listening on" in line)
        assert f"http://127.0.0.1:{service.port}" in line and "JWT mode" in line


# -- CORS --------------------------------------------------------------------------------------------------
def preflight(client, origin: str):
    return client.options(SIGN, headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                         "Access-Control-Request-Headers": "authorization,content-type"})


def test_cors_allows_the_sandbox_by_default_and_no_other_origin(make_app):
    client = make_app(jwt_issuers_file=ISSUERS).test_client()
    assert preflight(client, SANDBOX_ORIGIN).headers["Access-Control-Allow-Origin"] == SANDBOX_ORIGIN
    assert "Access-Control-Allow-Origin" not in preflight(client, "https://evil.example").headers
    assert Settings.from_env().cors_origins == SANDBOX_ORIGIN


def test_cors_origins_are_configurable(make_app, monkeypatch):
    monkeypatch.setenv("CDS_CORS_ORIGINS", "http://localhost:8080, https://ehr.example.org")
    origins = Settings.from_env().cors_origins
    client = make_app(jwt_issuers_file=ISSUERS, cors_origins=origins).test_client()
    for origin in ("http://localhost:8080", "https://ehr.example.org"):
        assert preflight(client, origin).headers["Access-Control-Allow-Origin"] == origin
    assert "Access-Control-Allow-Origin" not in preflight(client, SANDBOX_ORIGIN).headers


def test_cors_star_only_in_open_mode(make_app):
    with pytest.raises(ConfigError, match=r"CDS_CORS_ORIGINS='\*' is allowed in open mode only"):
        make_app(jwt_issuers_file=ISSUERS, cors_origins="*")
    client = make_app(cors_origins="*").test_client()
    assert preflight(client, "https://anything.example").headers["Access-Control-Allow-Origin"] in ("*", "https://anything.example")


# -- /metrics ----------------------------------------------------------------------------------------------
def test_metrics_without_a_token_answer_loopback_clients_of_a_loopback_service_only(make_app):
    local = make_app().test_client()
    assert local.get("/metrics").status_code == 200
    remote = local.get("/metrics", environ_base={"REMOTE_ADDR": "192.0.2.10"})
    assert remote.status_code == 403 and "CDS_METRICS_TOKEN" in remote.get_json()["issue"][0]["details"]["text"]
    assert local.get("/metrics", headers={"X-Forwarded-For": "192.0.2.10"}).status_code == 403  # via a proxy
    assert local.get("/metrics", headers={"Forwarded": "for=192.0.2.10"}).status_code == 403
    exposed = make_app(listen_hosts=("0.0.0.0",), jwt_issuers_file=ISSUERS).test_client()
    assert exposed.get("/metrics").status_code == 403  # the service listens on every interface


def test_metrics_with_a_token_answer_anyone_who_has_it(make_app):
    exposed = make_app(listen_hosts=("0.0.0.0",), jwt_issuers_file=ISSUERS, metrics_token=TOKEN).test_client()
    remote = {"REMOTE_ADDR": "192.0.2.10"}
    assert exposed.get("/metrics", environ_base=remote).status_code == 401
    assert exposed.get("/metrics", environ_base=remote, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


# -- tokens ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, field", [("CDS_ADMIN_TOKEN", "admin_token"), ("CDS_METRICS_TOKEN", "metrics_token")])
def test_short_tokens_are_refused_at_start(make_app, name, field):
    with pytest.raises(ConfigError, match=f"{name} is 31 characters long; use at least 32"):
        make_app(**{field: "x" * 31})
    make_app(**{field: "x" * 32})
    with pytest.raises(ConfigError, match=f"{name} is 1 characters"):
        make_app(**{field: "x"})


def test_gunicorn_refuses_a_short_admin_token_in_one_line(tmp_path):
    service = GunicornService(tmp_path, dict(CDS_ADMIN_TOKEN="admin"), workers=1)
    done = subprocess.run(service.cmd, env=service.env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    [line] = [line for line in done.stderr.splitlines() if "cannot start" in line]
    assert "CDS_ADMIN_TOKEN is 5 characters long" in line and "Traceback" not in done.stderr


# -- failed admin logins -------------------------------------------------------------------------------------
def test_failed_admin_logins_are_limited_per_address(make_app):
    app = make_app(admin_token=TOKEN)
    clock = [1000.0]
    app.extensions["cds.admin_failures"] = FailureLimiter(10, 60.0, clock=lambda: clock[0])
    client = app.test_client()
    wrong, right = {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {TOKEN}"}
    for _ in range(10):
        assert client.get("/admin/stats.json", headers=wrong).status_code == 401
        clock[0] += 1
    limited = client.get("/admin/stats.json", headers=right)  # the right token too, from this address
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "50"
    assert limited.get_json()["issue"][0]["code"] == "throttled"
    other = {"REMOTE_ADDR": "127.0.0.9"}
    assert client.get("/admin/stats.json", headers=right, environ_base=other).status_code == 200
    clock[0] += 50  # the oldest failure is a minute old
    assert client.get("/admin/stats.json", headers=right).status_code == 200


def test_the_limiter_keeps_a_bounded_number_of_addresses():
    limiter = FailureLimiter(2, 60.0, max_keys=3, clock=lambda: 5.0)
    for address in ("a", "b", "c", "d"):
        limiter.failed(address)
        limiter.failed(address)
    assert limiter.blocked("a") == 0 and limiter.blocked("d") == 60.0
    assert len(limiter._failures) == 3


# -- stats ---------------------------------------------------------------------------------------------------
def test_stats_escapes_control_characters_from_stored_text(tmp_path, monkeypatch, capsys):
    from cds_hooks_service.store import FeedbackStore, IssuedCard

    url = f"sqlite:///{tmp_path / 's.sqlite3'}"
    store = FeedbackStore(url)
    now = datetime.now(timezone.utc)
    store.record_cards([IssuedCard("c1", "opioid-in-migraine", "svc", "h1", "warning", "active", "k1", now)])
    hostile = "\x1b]0;pwned\x07\x1b[2J\rRefractory\u202e"
    store.record_feedback("svc", [{"card": "c1", "outcome": "overridden", "outcomeTimestamp": now.isoformat(),
                                   "overrideReason": {"reason": {"system": "s", "code": "x", "display": hostile}}}])
    monkeypatch.setenv("DATABASE_URL", url)
    assert main(["stats"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out and "\u202e" not in out
    assert r"\x1b]0;pwned\x07\x1b[2J\rRefractory\u202e" in out


# -- fhirServer ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("server", ["http://[::1", "http://", "ftp://127.0.0.1/fhir", "http://127.0.0.1:99999/fhir",
                                    "http://127.0.0.1:port/fhir", "not a url"])
def test_a_malformed_fhir_server_is_a_400(client, server):
    body = request_body()
    body["fhirServer"] = server
    r = post(client, SIGN, body)
    assert r.status_code == 400, r.get_data(as_text=True)
    issue = r.get_json()["issue"][0]
    assert issue["expression"] == ["fhirServer"] and "fhirServer" in issue["details"]["text"]
