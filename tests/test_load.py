"""A short version of benchmarks/load.py against the session's real servers: under concurrent mixed load,
no good request fails, every bad one gets its 4xx, and the servers' memory stays flat."""

import importlib.util
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.e2e
CONCURRENCY = 8
DURATION_S = 10.0
# Over 10 s a server's allocator may still settle a little; the benchmark's 60 s run holds it to 10 %.
SHORT_RUN_GROWTH_LIMIT = 0.25


def _load_module():
    spec = importlib.util.spec_from_file_location("load", REPO / "benchmarks" / "load.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_short_mixed_load_has_no_errors_and_flat_memory(scoring_server, ui_server, dataset):
    """Under 10 s of concurrent mixed load no good request fails, every bad one gets its 4xx, and neither server's
    memory grows."""
    load = _load_module()
    (scoring, scoring_url), (ui, ui_url) = scoring_server, ui_server
    result = load.run_load(scoring_url, ui_url, dataset, CONCURRENCY, DURATION_S,
                           {"scoring": scoring.pid, "ui": ui.pid})
    print(load.report(result))
    for target, tally in result["tallies"].items():
        assert tally.good > 20 and tally.bad > 5, target
        assert tally.good_errors == 0 and tally.bad_wrong == 0, (target, tally.examples)
        assert load.memory_growth(result, target) < SHORT_RUN_GROWTH_LIMIT, (target, result["memory"][target])


def test_the_heaviest_allowed_requests_are_bounded_and_leave_good_ones_answered(scoring_server, ui_server, dataset):
    """8 clients sending the most decoding one request may ask for get 200 or 429 (the worker's decoding
    budget), never an error, while 4 clients' single-image requests all succeed and memory stays flat."""
    load = _load_module()
    (scoring, scoring_url), (_, ui_url) = scoring_server, ui_server
    result = load.run_load(scoring_url, ui_url, dataset, 4, DURATION_S, {"scoring": scoring.pid}, worst_case=True)
    print(load.report(result))
    good, heavy = result["tallies"]["scoring"], result["tallies"]["heavy"]
    assert good.good > 20 and good.good_errors == 0, good.examples
    assert heavy.good_errors == 0 and set(heavy.statuses) == {200, 429}, heavy.statuses
    assert load.memory_growth(result, "scoring") < SHORT_RUN_GROWTH_LIMIT, result["memory"]
