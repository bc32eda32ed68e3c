"""The test suite's own speed-ups (tests/plugins/) keep the tests meaning what they meant: the temporary root
in memory only where it is a tmpfs with room, URL builders shared only between routes of the same shape, the
shared answers handed out as copies and their readers reordered without losing or duplicating a test."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from werkzeug.routing import Map, Rule

from tests.plugins import shared_answers
from tests.plugins.app_parts import cached_url_builders
from tests.plugins.temp_root import memory_temp_root


# --- temp_root -------------------------------------------------------------------------------------------
def _mounts(tmp_path, line: str):
    path = tmp_path / "mounts"
    path.write_text("proc /proc proc rw 0 0\n" + line + "\n")
    return str(path)


def test_the_memory_root_is_used_only_on_a_writable_tmpfs(tmp_path):
    folder = tmp_path / "shm"
    folder.mkdir()
    assert memory_temp_root(str(folder), _mounts(tmp_path, f"tmpfs {folder} tmpfs rw 0 0")) == str(folder)
    assert memory_temp_root(str(folder), _mounts(tmp_path, f"/dev/vda {folder} ext4 rw 0 0")) is None
    assert memory_temp_root(str(folder), _mounts(tmp_path, f"tmpfs {folder}/other tmpfs rw 0 0")) is None
    assert memory_temp_root(str(tmp_path / "missing"), _mounts(tmp_path, f"tmpfs {tmp_path}/missing tmpfs rw 0 0")) is None
    assert memory_temp_root(str(folder), str(tmp_path / "no-such-mounts-file")) is None


def test_the_memory_root_needs_room(tmp_path, monkeypatch):
    from tests.plugins import temp_root

    folder = tmp_path / "shm"
    folder.mkdir()
    monkeypatch.setattr(temp_root, "MIN_FREE_BYTES", 1 << 62)  # more than any disk
    assert memory_temp_root(str(folder), _mounts(tmp_path, f"tmpfs {folder} tmpfs rw 0 0")) is None


# --- app_parts: URL builders -----------------------------------------------------------------------------
def _builds(rules, calls):
    adapter = Map(rules).bind("localhost")
    return [adapter.build(endpoint, values) for endpoint, values in calls]


def test_shared_url_builders_build_what_werkzeug_builds(monkeypatch):
    def rules():
        return [Rule("/cds-services/<service_id>", endpoint="hook"), Rule("/a/<int:n>/b", endpoint="ab"),
                Rule("/page/", defaults={"n": 1}, endpoint="page"), Rule("/page/<int:n>", endpoint="page"),
                Rule("/files/<path:name>", endpoint="files")]

    calls = [("hook", {"service_id": "migraine-med-safety-sign"}), ("hook", {"service_id": "a b", "x": "1"}),
             ("ab", {"n": 7}), ("page", {"n": 1}), ("page", {"n": 3}), ("files", {"name": "a/b c.txt"})]
    plain = ["/cds-services/migraine-med-safety-sign", "/cds-services/a%20b?x=1", "/a/7/b", "/page/", "/page/3",
             "/files/a/b%20c.txt"]  # what werkzeug builds without the plugin
    seen = []
    real = Rule._compile_builder

    def counting(self, append_unknown=True):
        seen.append((self.rule, append_unknown))
        return real(self, append_unknown)

    monkeypatch.setattr(Rule, "_compile_builder", cached_url_builders(counting))
    assert _builds(rules(), calls) == plain
    compiled = len(seen)
    assert compiled == len(set(seen)) > 0  # each (rule, append_unknown) compiled once ...
    assert _builds(rules(), calls) == plain  # ... and the next map's equal rules use the kept builders
    assert len(seen) == compiled
    assert _builds([Rule("/cds-services/<int:service_id>", endpoint="hook")], [("hook", {"service_id": 5})]) \
        == ["/cds-services/5"]  # another converter: another builder
    assert len(seen) > compiled


# --- shared_answers --------------------------------------------------------------------------------------
def test_an_example_answer_is_a_fresh_copy_for_each_reader():
    answer = shared_answers.ExampleAnswer(200, '{"cards": [{"summary": "x"}]}', '{"hook": "order-sign"}')
    first = answer.json()
    first["cards"].clear()
    assert answer.json() == {"cards": [{"summary": "x"}]}
    body = answer.request
    body["hook"] = "changed"
    assert answer.request == {"hook": "order-sign"}


def _item(name, fixtures=(), **params):
    return SimpleNamespace(name=name, fixturenames=list(fixtures),
                           callspec=SimpleNamespace(params=params) if params else None)


def test_readers_of_the_same_answer_are_put_next_to_each_other_and_no_test_is_lost(tmp_path):
    a, b = tmp_path / "a.order-sign.json", tmp_path / "b.order-sign.json"
    example = SimpleNamespace(files={"order-sign": b})
    items = [_item("first"), _item("examples[b]", ["example_answer"], example=example, hook="order-sign"),
             _item("middle"), _item("scenario-1", ["scenario_answers"]), _item("other"),
             _item("sources[a]", ["example_answer"], path=a), _item("sources[b]", ["example_answer"], path=b),
             _item("scenario-2", ["scenario_answers"]), _item("last")]
    before = list(items)
    shared_answers.pytest_collection_modifyitems(None, items)
    assert sorted(map(id, items)) == sorted(map(id, before))
    assert [i.name for i in items] == ["first", "sources[a]", "examples[b]", "sources[b]", "middle",
                                       "scenario-1", "scenario-2", "other", "last"]


def test_without_readers_the_order_is_unchanged():
    items = [_item("x"), _item("y", ["tmp_path"]), _item("z")]
    before = list(items)
    shared_answers.pytest_collection_modifyitems(None, items)
    assert items == before


@pytest.mark.parametrize("fixtures", [["example_answer"], []])
def test_an_example_reader_without_a_request_file_parameter_keeps_its_place(fixtures):
    items = [_item("x"), _item("y", fixtures), _item("z")]
    before = list(items)
    shared_answers.pytest_collection_modifyitems(None, items)
    assert items == before
