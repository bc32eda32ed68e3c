"""The locks (requirements/runtime.txt, requirements/test.txt, from `make lock`) match pyproject.toml: every
dependency is pinned to a version its specifier allows, the test lock pins the runtime packages to the same
versions, and the runtime lock holds no test tool (`make run` and the container install the runtime only)."""
from __future__ import annotations

import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.helpers import REPO


def pins(name: str) -> dict[str, str]:
    out = {}
    for line in (REPO / "requirements" / name).read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-\[\]]+)==([^\s;]+)", line)
        if m:
            out[canonicalize_name(m.group(1).split("[")[0])] = m.group(2)
    return out


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _check(requirements: list[str], locked: dict[str, str]) -> list[str]:
    problems = []
    for text in requirements:
        req = Requirement(text)
        version = locked.get(canonicalize_name(req.name))
        if version is None:
            problems.append(f"{req.name} is not in the lock")
        elif not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req.name}=={version} does not satisfy {req.specifier}")
    return problems


def test_runtime_lock_pins_every_runtime_dependency():
    assert _check(project()["dependencies"], pins("runtime.txt")) == [], "run `make lock`"


def test_test_lock_pins_everything_and_agrees_with_the_runtime_lock():
    test_lock = pins("test.txt")
    assert _check(project()["dependencies"] + project()["optional-dependencies"]["test"], test_lock) == [], \
        "run `make lock`"
    runtime = pins("runtime.txt")
    assert {k: test_lock.get(k) for k in runtime} == runtime


def test_the_runtime_lock_holds_no_test_tool():
    runtime = pins("runtime.txt")
    tools = {canonicalize_name(Requirement(t).name) for t in project()["optional-dependencies"]["test"]}
    assert tools & set(runtime) == set()


def test_make_run_installs_the_runtime_lock_only_and_make_test_the_test_lock():
    makefile = (REPO / "Makefile").read_text()
    runtime_rule = makefile.split("$(VENV)/.runtime:", 1)[1].split("\n\n", 1)[0]
    test_rule = makefile.split("$(VENV)/.test:", 1)[1].split("\n\n", 1)[0]
    assert "-c requirements/runtime.txt -e ." in runtime_rule and "[test]" not in runtime_rule
    assert "-c requirements/test.txt -e '.[test]'" in test_rule
    run_rule = makefile.split("\nrun:", 1)[1].split("\n", 1)[0]
    assert run_rule.split() == ["install"]
    assert "install: $(VENV)/.runtime" in makefile
