"""Run kvpolicy's conformance suite on KeyNorm: enable the plugin, declare the cases."""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite("kvpolicy.testing")  # before importing it: detailed assertion messages
pytest_plugins = ["kvpolicy.testing"]

from kvpolicy.testing import ConformanceCase  # noqa: E402

from kvpolicy_keynorm import KeyNorm  # noqa: E402


def pytest_kvpolicy_cases():
    return [
        ConformanceCase(
            KeyNorm,
            invalid=[{"budget": 0}, {"budget": 1.5}, {"window": -1}, {"budget": 4, "window": 8}],
            examples=[KeyNorm(budget=256, window=16)],
        ),
        ConformanceCase(
            KeyNorm,
            id="keynorm-window",
            budgeted=lambda budget: KeyNorm(budget=budget, window=8),
        ),
    ]
