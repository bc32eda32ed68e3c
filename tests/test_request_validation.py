"""The hook request's compiled schema check (fastjsonschema) never accepts what jsonschema refuses.

The compiled check answers valid requests (~10 us instead of jsonschema's ~200 us); a request it refuses
is worded by jsonschema. So the one thing that must never happen is the compiled check accepting a request
jsonschema refuses: these tests compare both on mutated requests (hypothesis), on the known bad bodies, and
check that a schema keyword the compiled check cannot read the same way turns the fast path off."""
from __future__ import annotations

import copy

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from cds_hooks_service.errors import BadRequest
from cds_hooks_service.request_validation import fast_check, load_validators, validate_request
from cds_hooks_service.services import SERVICE_FOR_HOOK
from tests.helpers import request_body

VALIDATORS = load_validators()
SIGN = SERVICE_FOR_HOOK["order-sign"]
SELECT = SERVICE_FOR_HOOK["order-select"]

JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False, width=16)
                    | st.text(max_size=6) | st.sampled_from(["Bundle", "Bearer", "http://x", "http://a b", "a\n",
                                                             "Patient/1", "1.0", "", "x" * 65, "Practitioner/x"]),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                        st.sampled_from(["resourceType", "entry", "resource", "hook", "x"]), inner, max_size=3),
                    max_leaves=6)
PATHS = [(), ("hook",), ("hookInstance",), ("fhirServer",), ("fhirAuthorization",),
         ("fhirAuthorization", "token_type"), ("fhirAuthorization", "expires_in"), ("fhirAuthorization", "scope"),
         ("context",), ("prefetch",), ("prefetch", "conditions"), ("extension",),
         ("context", "userId"), ("context", "patientId"), ("context", "encounterId"), ("context", "selections"),
         ("context", "selections", 0), ("context", "draftOrders"), ("context", "draftOrders", "resourceType"),
         ("context", "draftOrders", "entry"), ("context", "draftOrders", "entry", 0),
         ("context", "draftOrders", "entry", 0, "resource"),
         ("context", "draftOrders", "entry", 0, "resource", "resourceType")]


def _mutate(body: dict, path: tuple, value, delete: bool) -> dict:
    body = copy.deepcopy(body)
    node = body
    for key in path[:-1]:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return body
    if not path:
        return value if isinstance(value, dict) else body
    try:
        if delete:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    except (KeyError, IndexError, TypeError):
        pass
    return body


def _authority(validator, instance) -> bool:
    return next(iter(validator.iter_errors(instance)), None) is None


@pytest.mark.slow  # ~10 s of hypothesis examples: in the full suite, not in the fast loop
@pytest.mark.parametrize("hook", ["order-sign", "order-select"])
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(PATHS), value=JSON, delete=st.booleans(),
       with_auth=st.booleans())
def test_the_compiled_check_accepts_only_what_jsonschema_accepts(hook, path, value, delete, with_auth):
    body = request_body(hook)
    if with_auth:
        body["fhirServer"] = "http://127.0.0.1:1/fhir"
        body["fhirAuthorization"] = {"access_token": "t", "token_type": "Bearer", "expires_in": 300,
                                     "scope": "patient/*.read", "subject": "s"}
    body = _mutate(body, path, value, delete)
    fast = VALIDATORS["fast"]
    if fast["request"](body):
        assert _authority(VALIDATORS["request"], body), body
    context = body.get("context")
    if fast[hook](context):
        assert _authority(VALIDATORS[hook], context), context


def test_every_hook_schema_has_a_compiled_check():
    assert all(VALIDATORS["fast"][name] is not None for name in ("request", "order-sign", "order-select"))


@pytest.mark.parametrize("mutation, field", [
    (lambda b: b.pop("hookInstance"), "hookInstance"),
    (lambda b: b.update(hookInstance=""), "hookInstance"),
    (lambda b: b.update(fhirServer="ftp://x"), "fhirServer"),
    (lambda b: b.update(fhirAuthorization={"access_token": "t", "token_type": "Bearer", "expires_in": 1,
                                           "scope": "s", "subject": "s"}), "fhirServer"),
    (lambda b: b["context"].update(patientId="a/b"), "context.patientId"),
    (lambda b: b["context"]["draftOrders"].update(resourceType="Patient"), "context.draftOrders.resourceType"),
    (lambda b: b["context"]["draftOrders"]["entry"][0]["resource"].pop("resourceType"),
     "context.draftOrders.entry.0.resource.resourceType"),
    (lambda b: b.update(prefetch={"conditions": 3}), "prefetch.conditions"),
])
def test_a_refused_request_is_still_worded_by_jsonschema(mutation, field):
    body = request_body()
    mutation(body)
    with pytest.raises(BadRequest) as exc:
        validate_request(body, SIGN, VALIDATORS)
    assert exc.value.field == field, exc.value


def test_a_value_only_python_regex_accepts_is_still_accepted():
    """fastjsonschema reads "$" as end of text; jsonschema (Python re.search) also before a final newline.
    jsonschema stays the authority: such a request is accepted as before."""
    body = request_body()
    body["context"]["patientId"] = "example-patient\n"
    assert not VALIDATORS["fast"]["order-sign"](body["context"])
    assert validate_request(body, SIGN, VALIDATORS) is body


@pytest.mark.parametrize("schema", [
    {"type": "object", "patternProperties": {"^x": {"type": "string"}}},  # not in FAST_KEYWORDS
    {"type": "object", "properties": {"a": {"$ref": "#/$defs/a"}}},  # a $ref left
    {"const": 1},  # 1 == True in Python
    {"enum": ["a", 2]},
    {"type": "array", "prefixItems": [{"type": "string"}]},
])
def test_a_keyword_the_compiled_check_cannot_read_alike_turns_it_off(schema):
    assert fast_check(schema) is None


def test_the_compiled_check_refuses_what_it_must():
    check = fast_check({"type": "object", "required": ["a"], "dependentRequired": {"b": ["c"]},
                        "properties": {"a": {"type": "string", "pattern": "^x+$", "maxLength": 3}}})
    assert check({"a": "xx"}) and not check({}) and not check({"a": "y"}) and not check({"a": "xxxx"})
    assert not check({"a": "x", "b": 1}) and check({"a": "x", "b": 1, "c": 2})
