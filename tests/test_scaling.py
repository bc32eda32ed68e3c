"""The cost of a hook call grows linearly with the record and the drafts, never with their product.

Each step doubles the record (500 -> 1,000 -> 2,000 -> 4,000 resources, a tenth of them triptan doses that
conflict with every DHE draft) and the drafts (10 -> 20 -> 40 -> 80 DHE orders). Linear work doubles per step;
work in drafts x record quadruples. Two measures of the same run, in-process (store None, no HTTP):

* operations: the Python function calls of one evaluation (cProfile's count: deterministic, not a timing);
* time: the median of several in-process calls, compared as a ratio between sizes (robust to a loaded
  machine: all sizes are measured in the same run, interleaved, and the bound is generous).
"""
from __future__ import annotations

import cProfile
import pstats
import statistics
import time

import pytest

from cds_hooks_service.config import Settings
from cds_hooks_service.hook_call import call_service
from cds_hooks_service.limits import Limits
from cds_hooks_service.services import SERVICE_FOR_HOOK
from tests.helpers import NOW, large_body

pytestmark = pytest.mark.slow
STEPS = [(10, 500), (20, 1000), (40, 2000), (80, 4000)]  # (drafts, record resources)
SIGN = SERVICE_FOR_HOOK["order-sign"]


@pytest.fixture(scope="module")
def bodies():
    return {step: large_body(step[0], step[1], triptans=step[1] // 10) for step in STEPS}


def _settings():
    # the deadline is not what is measured here (it has its own test): let every call evaluate everything
    return Settings(suppression_secret=b"scaling", fixed_now=NOW, limits=Limits(eval_deadline=120))


def _call(body, rulebook, settings):
    return call_service(SIGN, body, rulebook=rulebook, store=None, settings=settings)


def test_operations_grow_linearly_with_record_and_drafts(rulebook, bodies):
    settings = _settings()
    ops = {}
    for step, body in bodies.items():
        result = _call(body, rulebook, settings)  # warm: compiled templates, cached rule concepts
        assert result.with_outcome("fired"), step  # every step fires (each DHE draft conflicts)
        profile = cProfile.Profile()
        profile.enable()
        _call(body, rulebook, settings)
        profile.disable()
        ops[step] = pstats.Stats(profile).total_calls
    ratios = [ops[b] / ops[a] for a, b in zip(STEPS, STEPS[1:])]
    # linear: about 2 per doubling of both; drafts x record would be about 4
    assert all(r <= 2.4 for r in ratios), (ops, ratios)
    assert ops[STEPS[-1]] / ops[STEPS[0]] <= 2.4 ** 3, (ops, ratios)


def test_time_grows_linearly_with_record_and_drafts(rulebook, bodies):
    settings = _settings()
    for body in bodies.values():
        _call(body, rulebook, settings)
    samples: dict[tuple, list[float]] = {step: [] for step in STEPS}
    for _ in range(5):  # interleaved: a burst of load on the machine hits every size alike
        for step, body in bodies.items():
            t0 = time.perf_counter()
            _call(body, rulebook, settings)
            samples[step].append(time.perf_counter() - t0)
    median = {step: statistics.median(s) for step, s in samples.items()}
    overall = median[STEPS[-1]] / median[STEPS[0]]
    # 8x the input: linear is about 8 (less, with fixed costs); drafts x record would be about 64
    assert overall <= 24, {f"{d} drafts x {n}": f"{t * 1000:.1f} ms" for (d, n), t in median.items()}
