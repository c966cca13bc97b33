"""Depth and length defaults that must equal the FastKV reference's (github.com/dongwonjo/FastKV)."""

from __future__ import annotations

import pytest

import kvpolicy
from kvpolicy.policies import TSP, GemFilter
from kvpolicy.policies.gemfilter import default_filter_layer


@pytest.mark.parametrize(
    ("layers", "filter_layer"),
    [(32, 13), (36, 17), (40, 19)],
    ids=["llama-3.1-8b", "ministral-8b", "mistral-nemo"],
)
def test_gemfilter_default_layer_is_the_reference_table(layers, filter_layer):
    assert GemFilter().resolved_layer(layers) == filter_layer


def test_gemfilter_default_layer_between_and_outside_the_table():
    assert default_filter_layer(30) == 12  # SmolLM2-135M: 13/32 of its depth
    assert default_filter_layer(34) == 15  # between 13 of 32 and 17 of 36
    assert default_filter_layer(38) == 18  # between 17 of 36 and 19 of 40
    assert default_filter_layer(80) == 38  # 19/40 of the depth
    assert default_filter_layer(4) == 2  # the tiny test model
    assert default_filter_layer(2) == 0  # a layer must follow the filter
    layers = [default_filter_layer(n) for n in range(2, 129)]
    assert layers == sorted(layers)  # deeper models never filter earlier
    assert all(0 <= default_filter_layer(n) <= n - 2 for n in range(2, 129))


def tsp_of(**overrides) -> TSP:
    tsp = kvpolicy.get_policy("fastkv", **overrides).propagation
    assert isinstance(tsp, TSP)
    return tsp


def test_fastkv_token_budget_uses_the_constant_tsp_length():
    tsp = tsp_of(kv_budget=512)
    assert tsp.length == 2048  # the reference's tsp_len, not 0.2 of the prompt
    assert tsp.tokens_kept(128_000) == 2048
    assert tsp.min_keep == 512
    assert tsp_of(kv_budget=4096).tokens_kept(128_000) == 4096  # never fewer than the token budget


def test_fastkv_explicit_tsp_rate_or_length_is_respected():
    assert tsp_of(kv_budget=512, tsp_rate=0.2).length is None  # given, even at the default value
    assert tsp_of(kv_budget=512, tsp_rate=0.3).tokens_kept(10_000) == 3000
    assert tsp_of(kv_budget=512, tsp_length=1024).length == 1024
    assert tsp_of(kv_budget=512, tsp_length=1024, tsp_rate=0.3).length == 1024


def test_fastkv_fractional_budget_keeps_the_proportional_rate():
    for overrides in ({}, {"kv_budget": 0.1}, {"kv_budget": 0.3, "tsp_rate": 0.2}):
        tsp = tsp_of(**overrides)
        assert tsp.length is None and tsp.rate == 0.2
        assert tsp.tokens_kept(10_000) == 2000


def test_fastkv_constant_mode_round_trips_through_json():
    policy = kvpolicy.get_policy("fastkv", kv_budget=512)
    assert kvpolicy.policy_from_dict(policy.to_dict()).propagation.length == 2048
