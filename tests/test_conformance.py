"""The conformance suite (kvpolicy.testing) on the built-in cache policies.

Third-party packages run the same suite on theirs: see docs/authoring/conformance.md and
contrib/kvpolicy-keynorm/tests.
"""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite("kvpolicy.testing")  # before importing it: detailed assertion messages
pytest_plugins = ["kvpolicy.testing", "pytester"]

from kvpolicy.policies import H2O, FullCache, PyramidInferSqueeze, PyramidKV, SnapKV, StreamingLLM  # noqa: E402
from kvpolicy.testing import CachePolicyConformance, ConformanceCase  # noqa: E402


class TestBuiltinCachePolicies(CachePolicyConformance):
    kvpolicy_cases = (
        ConformanceCase(FullCache),
        ConformanceCase(
            SnapKV,
            invalid=[
                {"budget": 0},
                {"budget": 1.5},
                {"budget": True},
                {"window": 0},
                {"kernel": 4},
                {"budget": 4, "window": 8},
                {"pooling": "median"},
            ],
            examples=[SnapKV(budget=64, window=16, kernel=5, pooling="avg")],
        ),
        ConformanceCase(
            SnapKV,
            id="snapkv-small-window",
            budgeted=lambda budget: SnapKV(budget=budget, window=2, kernel=3, pooling="avg"),
            # A fraction is floored at 2 * window (4 here), above the default's window-only floor.
            expected_kv=lambda p, length, layer, n: min(length, p.resolved_budget(length)),
        ),
        ConformanceCase(
            StreamingLLM,
            invalid=[{"budget": 0}],
            # A fraction is floored at sinks + 8 recent entries.
            expected_kv=lambda p, length, layer, n: min(length, p.resolved_budget(length)),
        ),
        ConformanceCase(H2O, invalid=[{"budget": -1}]),
        # Decode-time eviction (StreamingLLM rolling, H2O evict_during_decode) keeps the cache at a
        # budget that a short prompt plus its generation outgrows, so "budget >= prompt keeps all"
        # does not hold for it; tests/test_baselines.py checks those modes.
        ConformanceCase(
            PyramidKV,
            invalid=[{"budget": 0}],
            # A pyramid of budgets: each layer keeps its own share of the schedule.
            expected_kv=lambda p, length, layer, n: min(length, p.layer_budget(layer, n, length)),
        ),
        ConformanceCase(PyramidInferSqueeze),
    )


# -- the plugin itself, as a policy author uses it (in a throwaway project) -----------------------

AUTHOR_CONFTEST = """
import torch
from kvpolicy.config import Budget, resolve_budget
from kvpolicy.interfaces import CachePolicy
from kvpolicy.policies import SnapKV
from kvpolicy.testing import ConformanceCase

pytest_plugins = ["kvpolicy.testing"]


class OffByOne(CachePolicy):
    kind = "offbyone"
    budget: Budget = 0.5

    def select(self, view, state):
        keep = resolve_budget(self.budget, view.prompt_len)
        if view.num_tokens <= keep:
            return None
        keep = max(1, keep - 1)  # the bug the suite must catch
        return torch.arange(keep).expand(view.key.shape[0], view.num_kv_heads, keep)


def pytest_kvpolicy_cases():
    return [ConformanceCase(OffByOne, registered=False), ConformanceCase(SnapKV, invalid=[{"budget": 0}])]
"""

AUTHOR_TESTS = """
from kvpolicy.testing import CachePolicyConformance


class TestMine(CachePolicyConformance):
    pass
"""


def test_plugin_runs_the_suite_on_an_authors_cases(pytester):
    pytester.makeconftest(AUTHOR_CONFTEST)
    pytester.makepyfile(test_mine=AUTHOR_TESTS)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-k", "budget_per_layer or validate")
    result.assert_outcomes(passed=5, failed=3)  # 3 budgets x 2 cases + 2 validation tests
    result.stdout.fnmatch_lines(
        [
            "*OffByOne(budget=24): layer 0 keeps 23 entries per KV head, expected 24*",
            "*FAILED*test_budget_per_layer_and_kv_head[[]offbyone-budget=24[]]*",
        ]
    )


def test_plugin_says_when_no_cases_are_declared(pytester):
    pytester.makeconftest('pytest_plugins = ["kvpolicy.testing"]')
    pytester.makepyfile(test_mine=AUTHOR_TESTS)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*no kvpolicy conformance cases: implement pytest_kvpolicy_cases()*"])
