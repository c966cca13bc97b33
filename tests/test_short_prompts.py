"""Fractional budgets on short prompts: a floor keeps what each method needs to mean anything.

10 % of a 35-token chat prompt is 3 entries: fewer than SnapKV's 8-token window (so nothing is
selected, and the answer was garbage), and for StreamingLLM only its 4 sinks (the recent tokens,
the last prompt token among them, vanished). A fraction now resolves to ``min(L, max(int(L r),
floor))`` with the method's floor; a token budget stays exact.
"""

from __future__ import annotations

import pytest
import torch

import kvpolicy
from kvpolicy.config import resolve_budget
from kvpolicy.policies import H2O, TSP, PyramidKV, SnapKV, StreamingLLM
from kvpolicy.policies.streamingllm import MIN_RECENT

#: The length of a short chat prompt (a one-line question in a chat template).
SHORT = 35


@pytest.fixture(scope="module")
def short_ids() -> torch.Tensor:
    return torch.randint(0, 128, (1, SHORT), generator=torch.Generator().manual_seed(35))


def kept_positions(model, ids: torch.Tensor, policy) -> list[torch.Tensor]:
    """Each layer's kept positions ``(H_kv, n)`` after prefill under ``policy``."""
    pre = kvpolicy.prefill(model, ids, policy)
    return [layer.positions[0] for layer in pre.cache.layers]


def test_resolve_budget_floor_applies_to_fractions_only():
    assert resolve_budget(0.1, SHORT) == 3  # the reference's int(L * r), no floor
    assert resolve_budget(0.1, SHORT, floor=16) == 16
    assert resolve_budget(0.1, 12, floor=16) == 12  # capped at the prompt
    assert resolve_budget(0.1, 4000, floor=16) == 400  # long prompts: the fraction as before
    assert resolve_budget(0.001, 10, floor=0) == 1  # never below one token
    assert resolve_budget(4, SHORT, floor=16) == 4  # a token count is exact
    assert resolve_budget(500, SHORT, floor=16) == 500  # ... even above the prompt (a no-op budget)


def test_default_snapkv_keeps_window_plus_as_many_selected_and_the_last_token(tiny_model, short_ids):
    policy = kvpolicy.get_policy("snapkv")  # budget 0.1, window 8
    floor = 2 * 8
    for positions in kept_positions(tiny_model, short_ids, policy):
        assert positions.shape[-1] == floor  # not int(35 * 0.1) = 3
        for head in positions.tolist():
            assert head[-8:] == list(range(SHORT - 8, SHORT))  # the window, the last token included
    out = kvpolicy.generate(tiny_model, None, input_ids=short_ids, policy=policy, max_new_tokens=3)
    assert out.stats.kv_tokens_per_layer == [floor] * 4


def test_default_streamingllm_keeps_sinks_recent_window_and_last_token(tiny_model, short_ids):
    policy = kvpolicy.get_policy("streamingllm")  # budget 0.1, 4 sinks
    floor = 4 + MIN_RECENT
    want = [0, 1, 2, 3, *range(SHORT - MIN_RECENT, SHORT)]
    for positions in kept_positions(tiny_model, short_ids, policy):
        assert positions.shape[-1] == floor  # not 3 (sinks only)
        assert positions.tolist() == [want] * positions.shape[0]


@pytest.mark.parametrize(
    "cache",
    [SnapKV(budget=0.1), H2O(budget=0.1), StreamingLLM(budget=0.1), PyramidKV(budget=0.1)],
    ids=["snapkv", "h2o", "streamingllm", "pyramidkv"],
)
def test_short_prompt_keeps_the_last_token(tiny_model, short_ids, cache):
    for positions in kept_positions(tiny_model, short_ids, kvpolicy.compose(cache=cache)):
        assert bool((positions[:, -1] == SHORT - 1).all())


def test_h2o_fraction_is_floored_at_twice_the_window(tiny_model, short_ids):
    for positions in kept_positions(tiny_model, short_ids, kvpolicy.get_policy("h2o")):
        assert positions.shape[-1] == 16
        assert positions[:, -8:].tolist() == [list(range(SHORT - 8, SHORT))] * positions.shape[0]


def test_pyramidkv_average_budget_is_floored():
    policy = PyramidKV(budget=0.1)
    budgets = [policy.layer_budget(layer, 4, SHORT) for layer in range(4)]
    # The pyramid starts from C = 16 (not 3): every layer keeps its window, the top ones more.
    assert min(budgets) >= 8 and budgets == sorted(budgets, reverse=True)
    assert sum(budgets) / 4 >= 16
    assert PyramidKV(budget=0.1).layer_budget(0, 4, 4000) == PyramidKV(budget=400).layer_budget(0, 4, 4000)


def test_tsp_rate_is_floored_but_length_is_exact():
    assert TSP(rate=0.2).tokens_kept(SHORT) == 16  # not int(35 * 0.2) = 7, under the window
    assert TSP(rate=0.2).tokens_kept(10) == 10  # capped at the prompt: no cut
    assert TSP(rate=0.2).tokens_kept(4000) == 800
    assert TSP(length=9).tokens_kept(SHORT) == 9


@pytest.mark.parametrize(
    "policy",
    [
        SnapKV(budget=8),
        SnapKV(budget=10),
        StreamingLLM(budget=6),
        H2O(budget=9),
    ],
    ids=["snapkv-8", "snapkv-10", "streamingllm-6", "h2o-9"],
)
def test_token_budgets_stay_exact(tiny_model, short_ids, policy):
    for positions in kept_positions(tiny_model, short_ids, kvpolicy.compose(cache=policy)):
        assert positions.shape[-1] == policy.budget


def test_long_prompts_resolve_fractions_as_before(tiny_model, prompt_ids):
    """At 100 tokens 0.25 is 25 entries, above every floor: the floor changes nothing there."""
    for cache, n in [(SnapKV(budget=0.25), 25), (StreamingLLM(budget=0.25), 25), (H2O(budget=0.25), 25)]:
        for positions in kept_positions(tiny_model, prompt_ids, kvpolicy.compose(cache=cache)):
            assert positions.shape[-1] == n
