"""The terminology (value sets, RxNorm roll-up, drug names) of a rules folder is read once per run per content.

About 130 tests load a whole rulebook from an edited copy of the shipped rules (one bad card, one bad rule
field each) and most never touch the value sets or terminology files, whose parsing is a third of a load.
Terminology.load is a pure function of those files, so a load whose files hold the same bytes as an earlier
one gets the same (read-only) Terminology. The key is the content of every entry of ``valuesets/`` and
``terminology/``, read through the service's own reader (regular files only, size cap, never blocking); a
folder holding anything else (a FIFO, a directory, an unreadable or oversized file) is loaded for real, so
every test about a refused file still sees the real loader's error.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

_MAX_KEPT = 8  # distinct contents kept (the shipped files, and a few edited copies)


def _content_key(rules_dir: Path) -> tuple | None:
    from cds_hooks_service.rulefiles import RuleFileError, read_rule_text

    key = []
    for sub in ("valuesets", "terminology"):
        folder = Path(rules_dir) / sub
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except FileNotFoundError:
            key.append((sub, None))
            continue
        except OSError:
            return None
        for entry in entries:
            if entry.is_dir():
                return None
            try:
                key.append((sub, entry.name, read_rule_text(entry.path)))
            except (OSError, RuleFileError, UnicodeDecodeError):
                return None
    return tuple(key)


@pytest.fixture(scope="session", autouse=True)
def _terminology_by_content():
    from cds_hooks_service.terminology import Terminology

    real_load = Terminology.load.__func__
    kept: dict[tuple, Terminology] = {}

    def load(cls, rules_dir):
        key = _content_key(rules_dir)
        if key is None:
            return real_load(cls, rules_dir)
        if key not in kept:
            terminology = real_load(cls, rules_dir)  # a TerminologyError is raised each time, never kept
            if len(kept) >= _MAX_KEPT:
                kept.pop(next(iter(kept)))
            kept[key] = terminology
        return kept[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Terminology, "load", classmethod(load))
        yield
