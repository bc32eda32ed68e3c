"""Issue 10 items 1 and 5: the service contacts only the FHIR servers it was told to trust, at the address it
checked, and the FHIR token goes nowhere else.

Real loopback servers stand in for the EHR's FHIR server, an "internal" server an attacker names, a proxy and
a foreign host a next link points to (tests/plugins/fault_server.py). DNS answers are the one thing a loopback
test cannot produce, so those tests inject a resolver function.
"""
from __future__ import annotations

import ipaddress
import json
import time
import uuid

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from cds_hooks_service.config import Settings
from cds_hooks_service.fhir_client import FhirBadResponse, FhirClient, FhirRefused
from cds_hooks_service.fhir_servers import (FhirServerRefused, address_allowed, check_allowlist_entry,
                                            normalise_base_url, parse_server_list, parse_target, pick_address)
from tests.plugins import fault_server as fs
from tests.sandbox_client import mint_jwt
from tests.helpers import OPIOID_FOR_MIGRAINE, PATIENT, SIGN, TOKEN, hook_body

INTERNAL_SECRET = "HIV antiretroviral therapy; pregnancy test positive"


def _internal_server(make):
    """An 'internal' FHIR server with sensitive data the attacker would like echoed into cards."""
    server = make()
    server.default = fs.bundle_of({"Condition": [{"resourceType": "Condition", "id": "c1",
                                                  "code": {"text": INTERNAL_SECRET},
                                                  "subject": {"reference": f"Patient/{PATIENT}"}}]})
    return server


def _post(client, body, headers=None):
    return client.post(SIGN, data=json.dumps(body), content_type="application/json", headers=headers or {})


def _assert_not_trusted_412(r):
    assert r.status_code == 412, r.get_data(as_text=True)
    outcome = r.get_json()
    text = json.dumps(outcome)
    assert outcome["resourceType"] == "OperationOutcome"
    assert "not trusted for this client" in outcome["issue"][0]["details"]["text"]
    assert outcome["issue"][0]["expression"] == ["fhirServer"]
    for secret in (INTERNAL_SECRET, TOKEN, "Error", "127.0.0.1"):
        assert secret not in text


# ---------------------------------------------------------------- open mode: CDS_FHIR_SERVERS

def test_open_mode_server_not_listed_gets_no_connection_and_a_412(make_app, make_fault_server):
    internal = _internal_server(make_fault_server)
    trusted = make_fault_server()
    client = make_app(fhir_servers=(trusted.base_url,)).test_client()
    _assert_not_trusted_412(_post(client, hook_body(internal.base_url)))
    assert internal.requests == [], "the untrusted server was contacted"


def test_open_mode_listed_server_is_read(make_app, make_fault_server):
    trusted = _internal_server(make_fault_server)
    client = make_app(fhir_servers=(trusted.base_url,)).test_client()
    r = _post(client, hook_body(trusted.base_url + "/"))  # a trailing slash names the same base
    assert r.status_code == 200 and trusted.requests
    assert {x.authorization for x in trusted.requests} == {f"Bearer {TOKEN}"}


def test_nothing_is_listed_by_default(make_app, make_fault_server):
    server = _internal_server(make_fault_server)
    _assert_not_trusted_412(_post(make_app(fhir_servers=()).test_client(), hook_body(server.base_url)))
    assert server.requests == []


def test_untrusted_server_is_not_asked_when_the_prefetch_has_everything(make_app, make_fault_server):
    """No connection is needed: the answer is the ordinary one (the server is never contacted either way)."""
    server = _internal_server(make_fault_server)
    empty = fs.searchset([])
    prefetch = {k: empty for k in ("conditions", "medicationRequests", "medicationAdministrations",
                                   "medicationStatements")}
    r = _post(make_app(fhir_servers=()).test_client(), hook_body(server.base_url, drafts=(OPIOID_FOR_MIGRAINE,),
                                                                 prefetch=prefetch))
    assert r.status_code == 200 and [c["source"]["topic"]["code"] for c in r.get_json()["cards"]] == \
        ["opioid-in-migraine"]
    assert server.requests == []


@pytest.mark.parametrize("variant", [
    "{base}/../other",  # a path outside the listed base (urllib3 normalises the dots away)
    "{base}X",
    "{base}/sub",
    "{origin}/",
    "http://user@{hostport}/fhir",
    "http://{hostport}\\@127.0.0.2/fhir",
    "{base}?_format=json",
    "http://[::1",  # was a 500
    "https://{hostport}/fhir",
])
def test_lookalike_urls_are_not_the_listed_server(make_app, make_fault_server, variant):
    server = _internal_server(make_fault_server)
    listed = make_fault_server()
    client = make_app(fhir_servers=(listed.base_url,)).test_client()
    url = variant.format(base=listed.base_url, origin=listed.origin, hostport=listed.origin.split("//")[1])
    r = _post(client, hook_body(url))
    assert r.status_code in (400, 412), r.get_data(as_text=True)  # 400: the schema refuses it as a URL
    assert server.requests == [] and listed.requests == []


def test_listed_server_matches_in_canonical_form(make_app, make_fault_server):
    server = make_fault_server()
    server.default = fs.bundle_of({})
    port = server.port
    client = make_app(fhir_servers=(f"HTTP://127.0.0.1:{port}/fhir/",)).test_client()
    for url in (f"http://127.0.0.1:{port}/fhir", f"http://127.0.0.1:{port}/fhir/"):
        assert _post(client, hook_body(url)).status_code == 200
    assert server.requests


def test_cds_fhir_servers_from_the_environment(monkeypatch):
    monkeypatch.setenv("CDS_FHIR_SERVERS", "https://ehr.example.org/fhir/, http://127.0.0.1:8080/r4\n"
                                           "  https://EHR2.example.org:443/R4")
    assert Settings.from_env().fhir_servers == ("https://ehr.example.org/fhir", "http://127.0.0.1:8080/r4",
                                                "https://ehr2.example.org/R4")


@pytest.mark.parametrize("value, message", [
    ("http://ehr.example.org/fhir", "must use https"),
    ("https://u:p@ehr.example.org/fhir", "user info"),
    ("ehr.example.org/fhir", "http"),
    ("https://ehr.example.org/fhir#x", "no query or fragment"),
])
def test_bad_cds_fhir_servers_fail_at_start_with_one_line(monkeypatch, value, message):
    monkeypatch.setenv("CDS_FHIR_SERVERS", value)
    with pytest.raises(ValueError, match=message) as info:
        Settings.from_env()
    assert "\n" not in str(info.value)


def test_ca_bundle_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("CDS_FHIR_CA_BUNDLE", str(tmp_path / "missing.pem"))
    with pytest.raises(ValueError, match="CDS_FHIR_CA_BUNDLE"):
        Settings.from_env()
    (tmp_path / "ca.pem").write_text("x")
    monkeypatch.setenv("CDS_FHIR_CA_BUNDLE", str(tmp_path / "ca.pem"))
    assert Settings.from_env().fhir_ca_bundle == str(tmp_path / "ca.pem")


def test_private_networks_setting(monkeypatch):
    monkeypatch.setenv("CDS_FHIR_PRIVATE_NETWORKS", "10.20.0.0/16, fd00::/8")
    assert [str(n) for n in Settings.from_env().fhir_private_networks] == ["10.20.0.0/16", "fd00::/8"]
    monkeypatch.setenv("CDS_FHIR_PRIVATE_NETWORKS", "10.20.0.0/33")
    with pytest.raises(ValueError, match="CDS_FHIR_PRIVATE_NETWORKS"):
        Settings.from_env()


# ---------------------------------------------------------------- JWT mode: fhirServers per issuer

def _ec_issuer(iss: str, kid: str):
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    return key, {"iss": iss, "jwks": {"keys": [{**jwk, "kid": kid, "use": "sig", "alg": "ES256"}]}}


def _token(key, iss, kid, path=SIGN):
    now = int(time.time())
    claims = {"iss": iss, "aud": "http://localhost" + path, "iat": now, "exp": now + 120, "jti": str(uuid.uuid4())}
    return {"Authorization": f"Bearer {mint_jwt(key, 'ES256', kid, claims)}"}


def test_jwt_mode_each_issuer_reads_only_its_own_servers(make_app, make_fault_server, tmp_path):
    a_server, b_server = _internal_server(make_fault_server), _internal_server(make_fault_server)
    key_a, entry_a = _ec_issuer("https://ehr-a.example.org", "a1")
    key_b, entry_b = _ec_issuer("https://ehr-b.example.org", "b1")
    entry_a["fhirServers"] = [a_server.base_url]
    entry_b["fhirServers"] = [b_server.base_url]
    issuers = tmp_path / "issuers.json"
    issuers.write_text(json.dumps([entry_a, entry_b]))
    # the open-mode list must not widen what an issuer may read
    client = make_app(jwt_issuers_file=issuers, fhir_servers=(a_server.base_url, b_server.base_url)).test_client()

    r = _post(client, hook_body(a_server.base_url), _token(key_a, entry_a["iss"], "a1"))
    assert r.status_code == 200 and len(a_server.requests) > 0
    seen = len(a_server.requests)
    _assert_not_trusted_412(_post(client, hook_body(a_server.base_url), _token(key_b, entry_b["iss"], "b1")))
    _assert_not_trusted_412(_post(client, hook_body(b_server.base_url), _token(key_a, entry_a["iss"], "a1")))
    assert len(a_server.requests) == seen and b_server.requests == []


def test_jwt_issuer_without_fhir_servers_reads_none(make_app, make_fault_server, tmp_path):
    server = _internal_server(make_fault_server)
    key, entry = _ec_issuer("https://ehr-c.example.org", "c1")
    issuers = tmp_path / "issuers.json"
    issuers.write_text(json.dumps([entry]))
    client = make_app(jwt_issuers_file=issuers, fhir_servers=(server.base_url,)).test_client()
    _assert_not_trusted_412(_post(client, hook_body(server.base_url), _token(key, entry["iss"], "c1")))
    assert server.requests == []


# ---------------------------------------------------------------- addresses (DNS answers injected)

def _resolver(*answers):
    calls = []

    def resolve(host, port):
        calls.append((host, port))
        return list(answers)
    resolve.calls = calls
    return resolve


@pytest.mark.parametrize("answer", ["169.254.169.254", "10.0.0.5", "192.168.1.10", "172.16.0.1", "127.0.0.1",
                                    "::1", "fe80::1", "fd00::1", "::ffff:10.0.0.5", "0.0.0.0", "100.64.0.1",
                                    # 6to4 addresses that embed internal IPv4 ones, and IPv6 site-local
                                    "2002:a9fe:a9fe::1", "2002:a00:5::1", "2002:7f00:1::", "fec0::1"])
def test_a_trusted_name_resolving_to_an_internal_address_is_refused(answer):
    target = parse_target("https://fhir.example.org/r4")
    with pytest.raises(FhirServerRefused, match="not allowed"):
        pick_address(target, (), _resolver(answer))


def test_public_answers_pass_and_the_first_allowed_is_used():
    target = parse_target("https://fhir.example.org/r4")
    assert pick_address(target, (), _resolver("10.0.0.5", "93.184.216.34")) == "93.184.216.34"
    assert pick_address(target, (), _resolver("2002:a00:5::1", "2002:5db8:d822::1")) == "2002:5db8:d822::1"


def test_private_addresses_pass_when_listed():
    nets = (ipaddress.ip_network("10.20.0.0/16"),)
    target = parse_target("https://fhir.hospital.internal/r4")
    assert pick_address(target, nets, _resolver("10.20.3.4")) == "10.20.3.4"
    with pytest.raises(FhirServerRefused):
        pick_address(target, nets, _resolver("10.21.3.4"))
    # an IP literal in the allowlist entry is explicit: that address (only) is allowed
    assert pick_address(parse_target("https://10.9.8.7/fhir"), (), _resolver()) == "10.9.8.7"
    assert address_allowed(ipaddress.ip_address("127.0.0.1"), parse_target("http://localhost:8080/fhir"))
    assert not address_allowed(ipaddress.ip_address("10.0.0.1"), parse_target("http://localhost:8080/fhir"))


def test_fhir_client_refuses_without_connecting(make_fault_server):
    """The listed name now resolves to loopback (DNS rebinding): nothing is sent, not even to loopback."""
    server = make_fault_server()
    client = FhirClient(f"http://fhir.example.org:{server.port}/fhir", TOKEN, resolver=_resolver("127.0.0.1"))
    out = client.fetch_all({"conditions": "Condition?patient=x", "patient": "Patient/x"}, budget=1)
    assert all(isinstance(v, FhirRefused) for v in out.values()), out
    assert server.requests == []


def test_dns_is_asked_once_and_the_checked_address_is_used(make_fault_server):
    """Several reads and pages of one hook call: one lookup; every request goes to the address checked, with
    the server's name in Host. A second answer (rebinding to another address) is never asked for."""
    server = make_fault_server()
    hosts = []

    def paged(h):
        hosts.append(h.headers.get("Host"))
        h.reply_json(fs.searchset([], next_url=None if "page=2" in h.path else f"{h.rtype}?page=2"))
    server.default = paged
    resolve = _resolver("127.0.0.1")
    client = FhirClient(f"http://fhir.example.org:{server.port}/fhir", TOKEN, resolver=resolve,
                        private_networks=(ipaddress.ip_network("127.0.0.0/8"),))
    out = client.fetch_all({"a": "Condition?patient=x&page=1", "b": "Observation?patient=x&page=1"}, budget=2)
    assert all(v.pages == 2 for v in out.values()), out
    assert resolve.calls == [("fhir.example.org", server.port)]
    assert set(hosts) == {f"fhir.example.org:{server.port}"} and len(hosts) == 4


# ---------------------------------------------------------------- next links and token leaks (item 5)

def test_backslash_next_link_does_not_reach_the_other_host(make_fault_server):
    """``http://OTHER\\@SAME/...``: urllib.parse reads host SAME, urllib3 connects to OTHER. The link is
    refused and OTHER gets nothing (no token)."""
    same, other = make_fault_server(), make_fault_server()
    other.default = fs.bundle_of({})
    same_hostport = same.origin.split("//")[1]
    other_hostport = other.origin.split("//")[1]
    same.default = fs.json_reply(fs.searchset([], next_url=f"http://{other_hostport}\\@{same_hostport}/fhir/Condition?page=2"))
    client = FhirClient(same.base_url, TOKEN)
    with pytest.raises(FhirBadResponse, match="different server"):
        client.search("c", "Condition?patient=x", deadline=time.monotonic() + 2)
    assert other.requests == []


@pytest.mark.parametrize("link", ["{origin}/admin/Condition?page=2", "{origin}/fhir/../admin?page=2",
                                  "{origin}/fhirX/Condition?page=2", "http://user:pw@{hostport}/fhir/Condition?page=2",
                                  # requests decodes %2e to "." before sending: the wire says /fhir/../admin
                                  "{origin}/fhir/%2e%2e/admin?page=2", "/fhir/%2E%2E/admin/Condition?page=2",
                                  "{origin}/fhir/Condition/%2e%2e/%2e%2e/admin?page=2"])
def test_next_link_must_stay_below_the_base_url(make_fault_server, link):
    server = make_fault_server()
    url = link.format(origin=server.origin, hostport=server.origin.split("//")[1])
    server.default = lambda h: h.reply_json(fs.searchset([], next_url=url)) if "page=2" not in h.path \
        else h.reply_json(fs.searchset([]))
    with pytest.raises(FhirBadResponse):
        FhirClient(server.base_url, TOKEN).search("c", "Condition?patient=x", deadline=time.monotonic() + 2)
    assert all("page=2" not in r.path for r in server.requests)


def test_netrc_never_replaces_the_token_nor_goes_anywhere(make_fault_server, tmp_path, monkeypatch):
    server = make_fault_server()
    server.default = fs.bundle_of({})
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login netrc-user password netrc-secret\n"
                     "default login default-user password default-secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    FhirClient(server.base_url, TOKEN).search("c", "Condition?patient=x", deadline=time.monotonic() + 2)
    FhirClient(server.base_url).search("c", "Condition?patient=x", deadline=time.monotonic() + 2)
    assert [r.authorization for r in server.requests] == [f"Bearer {TOKEN}", None]


def test_proxy_variables_are_ignored(make_fault_server, monkeypatch):
    server, proxy = make_fault_server(), make_fault_server()
    server.default = fs.bundle_of({})
    proxy.default = fs.bundle_of({})
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, proxy.origin)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    FhirClient(server.base_url, TOKEN).search("c", "Condition?patient=x", deadline=time.monotonic() + 2)
    assert len(server.requests) == 1 and proxy.requests == [], "the request (and the token) went to the proxy"


def test_helpers_normalise_and_refuse():
    assert normalise_base_url("HTTPS://Ehr.Example.org:443/fhir/") == "https://ehr.example.org/fhir"
    assert normalise_base_url("http://[::1]:8080/r4") == "http://[::1]:8080/r4"
    assert check_allowlist_entry("http://localhost:9/fhir") == "http://localhost:9/fhir"
    assert parse_server_list(" a ,, ".replace("a", "https://x.example/f")) == ("https://x.example/f",)
    for bad in ("http://[::1", "", None, "https://x.example/\x00", "javascript:alert(1)"):
        with pytest.raises(ValueError):
            normalise_base_url(bad)


# ---------------------------------------------------------------- https: the pinned address keeps SNI and the name check

@pytest.fixture
def tls_fault_server(make_fault_server, tmp_path):
    return fs.tls_server(make_fault_server, tmp_path, "fhir.test")


def test_https_to_the_pinned_address_keeps_sni_host_and_certificate_check(tls_fault_server):
    server = tls_fault_server
    hosts = []
    server.default = lambda h: (hosts.append(h.headers.get("Host")), h.reply_json(fs.searchset([])))
    resolve = _resolver("127.0.0.1")
    client = FhirClient(f"https://fhir.test:{server.port}/fhir", TOKEN, resolver=resolve,
                        ca_bundle=str(server.ca),  # CDS_FHIR_CA_BUNDLE: the test's CA
                        private_networks=(ipaddress.ip_network("127.0.0.0/8"),))
    result = client.search("c", "Condition?patient=x", deadline=time.monotonic() + 3)
    assert result.pages == 1
    assert server.sni == ["fhir.test"] and hosts == [f"fhir.test:{server.port}"]
    assert server.requests[0].authorization == f"Bearer {TOKEN}"
    assert resolve.calls == [("fhir.test", server.port)]


def test_https_certificate_for_another_name_is_refused(tls_fault_server):
    import requests

    server = tls_fault_server
    server.default = fs.bundle_of({})
    session = requests.Session()
    session.verify = str(server.ca)
    client = FhirClient(f"https://other.test:{server.port}/fhir", TOKEN, session=session,
                        resolver=_resolver("127.0.0.1"), private_networks=(ipaddress.ip_network("127.0.0.0/8"),))
    out = client.fetch_all({"c": "Condition?patient=x"}, budget=2)
    assert "SSLError" in out["c"].reason  # the technical reason (for the log)
    from cds_hooks_service.fhir_client import plain_reason
    assert plain_reason(out["c"]) == "the FHIR server could not be reached"
    assert server.requests == []  # the token never went out


def test_service_reads_a_trusted_https_server_with_the_configured_ca(make_app, make_fault_server, tmp_path):
    """End to end, no injected DNS: a hook call reads https://localhost:PORT/fhir (listed), verifying its
    certificate against CDS_FHIR_CA_BUNDLE; SNI and Host are the name."""
    server = fs.tls_server(make_fault_server, tmp_path, "localhost")
    server.default = fs.bundle_of({"Condition": [{"resourceType": "Condition", "id": "m",
                                                  "subject": {"reference": f"Patient/{PATIENT}"},
                                                  "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm",
                                                                       "code": "G43.909"}]},
                                                  "clinicalStatus": {"coding": [{"code": "active"}]}}]})
    base = f"https://localhost:{server.port}/fhir"
    client = make_app(fhir_servers=(base,), fhir_ca_bundle=str(server.ca)).test_client()
    r = _post(client, hook_body(base))
    assert r.status_code == 200, r.get_data(as_text=True)
    assert [c["source"]["topic"]["code"] for c in r.get_json()["cards"]] == ["opioid-in-migraine"]
    assert set(server.sni) == {"localhost"}
    assert {x.authorization for x in server.requests} == {f"Bearer {TOKEN}"}
    # without the CA the certificate is not trusted: the check is reported, not silently passed
    r = _post(make_app(fhir_servers=(base,)).test_client(), hook_body(base))
    card = r.get_json()["cards"][0]
    assert r.status_code == 200 and card["summary"].startswith("Check not completed")
    assert "the FHIR server could not be reached" in card["detail"] and "SSL" not in card["detail"]


def test_a_refused_address_is_counted_by_kind_and_logged_without_secrets(make_app, make_fault_server, caplog,
                                                                         monkeypatch):
    """A listed https server whose name now resolves to the cloud metadata address: not contacted; the card
    says "could not be reached"; the log says why; /metrics counts it as reason_class="refused"."""
    from prometheus_client import REGISTRY

    from cds_hooks_service import fhir_servers

    def count():
        return REGISTRY.get_sample_value("cds_fhir_failures_total",
                                         {"key": "conditions", "reason_class": "refused"}) or 0

    monkeypatch.setattr(fhir_servers, "system_resolver", _resolver("169.254.169.254"))  # the DNS answer
    before = count()
    client = make_app(fhir_servers=("https://fhir.example.org/fhir",)).test_client()
    r = _post(client, hook_body("https://fhir.example.org/fhir"))
    card = r.get_json()["cards"][0]
    assert r.status_code == 200 and "the FHIR server could not be reached" in card["detail"]
    assert "169.254" not in json.dumps(r.get_json())
    assert "address not allowed (169.254.169.254" in caplog.text
    assert TOKEN not in caplog.text and PATIENT not in caplog.text
    assert count() == before + 1


def test_service_hook_call_ignores_netrc_and_proxy_variables(make_app, make_fault_server, tmp_path, monkeypatch):
    """The whole hook call, with a .netrc (NETRC) and proxy variables in the service's environment: the FHIR
    server gets exactly the fhirAuthorization token, directly; the proxy gets nothing."""
    server, proxy = make_fault_server(), make_fault_server()
    server.default = fs.bundle_of({})
    proxy.default = fs.bundle_of({})
    netrc = tmp_path / "netrc"
    netrc.write_text("default login default-user password default-secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, proxy.origin)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    client = make_app(fhir_servers=(server.base_url,)).test_client()
    assert _post(client, hook_body(server.base_url)).status_code == 200
    assert server.requests and {r.authorization for r in server.requests} == {f"Bearer {TOKEN}"}
    body = hook_body(server.base_url, token=None)  # an open FHIR server: no Authorization at all
    before = len(server.requests)
    assert _post(client, body).status_code == 200
    assert {r.authorization for r in server.requests[before:]} == {None}
    assert proxy.requests == []
