"""The service's answer to a shipped example or scenario, computed once per run (per xdist worker) and read by
every test that checks something of that same answer.

Two test files check every example request (``test_examples``: the cards fire as expected.json says;
``test_sources``: the cards link only to primary sources) and two check every rule scenario
(``test_sources``: primary links; ``test_prefetch``: the same cards with the record the prefetch templates
fetch). Each answer cost a hook call per test; now the second test reads the first one's answer. The answers
are computed with the shipped rules, which no test changes (tests that change rules load an edited copy), and
each reader gets its own copy of the response, so no test can change what another reads.

``pytest_collection_modifyitems`` keeps the tests that read the same example answer next to each other (in
order of the request file, each file's readers in their collection order), so that pytest-xdist, which hands
each worker runs of consecutive tests, sends both readers of an answer to the same worker.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

URL = {"order-select": "/cds-services/migraine-med-safety-select", "order-sign": "/cds-services/migraine-med-safety-sign"}


@dataclass(frozen=True)
class ExampleAnswer:
    status: int
    text: str  # the response body
    body_text: str  # the request as sent

    @property
    def request(self) -> dict:
        return json.loads(self.body_text)

    def json(self) -> dict:
        return json.loads(self.text)


@pytest.fixture(scope="session")
def example_answer(shared_app):
    """``example_answer(path)``: the answer to the example request file ``path`` (fhir_examples/<rule>/*.order-*.json)
    as `examples send` sends it: every time shifted by (now - the example's clock), posted with the real clock
    (the app's fixed_now is None), as in production. One post per file per run."""
    from cds_hooks_service.examples import examples
    from tests.helpers import REPO

    client = shared_app(fixed_now=None).test_client()
    files = {p.resolve(): (ex, kind) for ex in examples(REPO / "fhir_examples") for kind, p in ex.files.items()}
    kept: dict[Path, ExampleAnswer] = {}

    def answer(path: Path) -> ExampleAnswer:
        path = Path(path).resolve()
        if path not in kept:
            example, hook = files[path]  # a KeyError: not a request file listed in an expected.json
            body = example.load(hook)
            r = client.post(URL[hook], json=body)
            kept[path] = ExampleAnswer(r.status_code, r.get_data(as_text=True), json.dumps(body))
        return kept[path]

    return answer


@pytest.fixture(scope="session")
def scenario_answers(rulebook, tmp_path_factory):
    """``scenario_answers()``: every scenario of every shipped rule, for each hook it runs on, with its whole
    record prefetched: a list of (rule, scenario, hook, response), the response being call_service's (no store,
    the scenario's clock, the test settings). Computed once per run; each call returns fresh copies."""
    from cds_hooks_service.hook_call import call_service
    from cds_hooks_service.scenarios import load_scenarios, scenario_file
    from cds_hooks_service.services import SERVICE_FOR_HOOK
    from tests.helpers import app_settings

    kept: list[tuple] = []

    def answers() -> list[tuple]:
        if not kept:
            settings = app_settings(tmp_path_factory.mktemp("scenario-answers"))
            for rule in rulebook.rules:
                for sc in load_scenarios(scenario_file(rule), rule.id):
                    for hook in ([sc.hook] if sc.hook else sorted(rule.hooks)):
                        settings.fixed_now = sc.now
                        result = call_service(SERVICE_FOR_HOOK[hook], sc.request(hook), rulebook=rulebook,
                                              store=None, settings=settings)
                        kept.append((rule, sc, hook, json.dumps(result.response)))
        return [(rule, sc, hook, json.loads(text)) for rule, sc, hook, text in kept]

    return answers


def _example_request_file(item) -> str | None:
    """The example request file an example_answer test reads, from its parameters (a path, or an example and
    a hook)."""
    if "example_answer" not in getattr(item, "fixturenames", ()):
        return None
    params = getattr(getattr(item, "callspec", None), "params", {})
    if "path" in params:
        return str(Path(params["path"]).resolve())
    if "example" in params and "hook" in params:
        return str(Path(params["example"].files[params["hook"]]).resolve())
    return None


def _scenario_reader(item) -> bool:
    return "scenario_answers" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(config, items):
    """Readers of the same answers next to each other: the example readers as one block, ordered by request file,
    where the first of them was; the scenario readers together where the first of them was. Every other test
    keeps its place and order."""
    groups: dict[str, list] = {"example": [], "scenario": []}
    first: dict[str, int] = {}
    rest = []
    for i, item in enumerate(items):
        request_file = _example_request_file(item)
        kind = "example" if request_file is not None else "scenario" if _scenario_reader(item) else None
        if kind is None:
            rest.append(item)
            continue
        first.setdefault(kind, len(rest))
        groups[kind].append((request_file or "", i, item))
    if not first:
        return
    groups["example"].sort(key=lambda entry: entry[:2])  # by request file, then collection order
    for kind in sorted(first, key=lambda k: first[k], reverse=True):  # insert from the back: earlier indexes hold
        rest[first[kind]:first[kind]] = [item for _, _, item in groups[kind]]
    items[:] = rest
