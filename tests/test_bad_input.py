"""Bad input gets a clear error naming the value, before anything runs."""

from __future__ import annotations

import pytest
import torch
from transformers import BloomConfig, BloomForCausalLM

import kvpolicy
from kvpolicy import PolicyConfigError, RegistryError
from kvpolicy.policies import TSP, SnapKV


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"kv_budget": 0}, "kv_budget=0"),
        ({"kv_budget": -5}, "kv_budget=-5"),
        ({"kv_budget": 1.5}, "kv_budget=1.5"),
        ({"tsp_rate": 0.0}, "tsp_rate=0.0"),
        ({"tsp_rate": 1.2}, "tsp_rate=1.2"),
        ({"tsp_layer": -1}, "tsp_layer=-1"),
        ({"kv_budget": 4}, "window (8) is larger than the budget (4)"),
        ({"kernel": 4}, "kernel must be odd"),
        ({"kv_budget": "lots"}, "kv_budget='lots': a budget is a token count (an int >= 1) or a fraction"),
        ({"kv_budget": 0}, "kv_budget=0: a token budget must be at least 1, got 0"),
        (
            {"kv_budget": 256.0},
            "a fractional budget must lie in (0, 1], got 256.0 (for 256 tokens write the int 256)",
        ),
        ({"bogus": 1}, "unknown setting 'bogus'"),
        ({"kv_budgt": 1}, "unknown setting 'kv_budgt' (did you mean 'kv_budget'?)"),
    ],
)
def test_invalid_preset_settings_name_the_value(kwargs, needle):
    with pytest.raises(PolicyConfigError, match="invalid settings for fastkv") as err:
        kvpolicy.get_policy("fastkv", **kwargs)
    assert needle in str(err.value)


def test_component_settings_validate():
    with pytest.raises(ValueError, match="rate"):
        TSP(rate=0)
    with pytest.raises(ValueError, match="window"):
        SnapKV(budget=4, window=8)
    with pytest.raises(ValueError):
        SnapKV(budget=True)  # a bool is not a token count


def test_settings_are_immutable_and_round_trip_json():
    policy = kvpolicy.get_policy("fastkv", tsp_layer=3, tsp_rate=0.25, kv_budget=0.3)
    with pytest.raises(ValueError):
        policy.cache.budget = 5  # type: ignore[misc]
    again = kvpolicy.policy_from_dict(policy.to_dict())
    assert again == policy
    import json

    assert kvpolicy.policy_from_dict(json.loads(json.dumps(policy.to_dict()))) == policy


def test_unknown_policy_lists_known_ones():
    with pytest.raises(
        RegistryError,
        match=r"unknown policy 'fastkvv' \(did you mean 'fastkv'\?\); known: .*fastkv, fullkv, .*snapkv",
    ):
        kvpolicy.get_policy("fastkvv")
    with pytest.raises(RegistryError, match=r"unknown policy 'nothing-like-it'; known: "):
        kvpolicy.get_policy("nothing-like-it")  # no close name: no guess


def test_tsp_layer_outside_the_model(tiny_model, prompt_ids):
    with pytest.raises(ValueError, match=r"TSP layer 9 is outside the model: it has 4 layers \(0..3\)"):
        kvpolicy.prefill(tiny_model, prompt_ids, kvpolicy.get_policy("fastkv", tsp_layer=9))


def test_unsupported_architecture_lists_supported():
    model = BloomForCausalLM(BloomConfig(n_layer=1, hidden_size=16, n_head=2, vocab_size=50))
    with pytest.raises(
        RegistryError,
        match=r"unsupported model class BloomForCausalLM \(generic: .*AttentionInterface.*\); supported.*LlamaForCausalLM",
    ):
        kvpolicy.generate(model, None, input_ids=[1, 2, 3], max_new_tokens=2)


def test_empty_and_malformed_prompts(tiny_model):
    with pytest.raises(ValueError, match="empty prompt"):
        kvpolicy.generate(tiny_model, None, input_ids=[], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 128\)"):
        kvpolicy.generate(tiny_model, None, input_ids=[1, 500], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0, got -1"):
        kvpolicy.generate(tiny_model, None, input_ids=[1, 2], max_new_tokens=-1)
    with pytest.raises(ValueError, match="exactly one of prompt"):
        kvpolicy.generate(tiny_model, None, max_new_tokens=2)


def test_prompt_longer_than_positions(tiny_model):
    ids = torch.zeros(1, 600, dtype=torch.long)
    with pytest.raises(ValueError, match="needs 604 positions but the model supports 512"):
        kvpolicy.generate(tiny_model, None, input_ids=ids, max_new_tokens=4)


@pytest.mark.parametrize("length", [1, 2, 8])
def test_tiny_prompts_are_not_compressed_and_match_full(tiny_model, length):
    ids = torch.arange(1, length + 1)[None]
    policy = kvpolicy.get_policy("fastkv", tsp_layer=1, tsp_rate=0.1, kv_budget=8)
    out = kvpolicy.generate(tiny_model, None, input_ids=ids, policy=policy, max_new_tokens=4)
    full = kvpolicy.generate(tiny_model, None, input_ids=ids, policy="fullkv", max_new_tokens=4)
    assert out.token_ids == full.token_ids
    assert out.stats.tokens_per_layer == [length] * 4


def test_policy_that_raises_names_itself_and_layer(tiny_model, prompt_ids):
    from kvpolicy.adapters import AdapterError
    from kvpolicy.interfaces import CachePolicy

    class Broken(CachePolicy):
        kind = "broken"

        def select(self, view, state):
            raise RuntimeError("boom")

    with pytest.raises(
        AdapterError, match=r"policy Broken \('broken'\) failed in select\(\) at layer 0: RuntimeError: boom"
    ):
        kvpolicy.generate(tiny_model, None, input_ids=prompt_ids, policy=kvpolicy.compose(cache=Broken()))
    # The model is still usable afterwards.
    assert len(kvpolicy.generate(tiny_model, None, input_ids=prompt_ids, max_new_tokens=3).token_ids) == 3


def test_compose_rejects_wrong_types():
    with pytest.raises(TypeError, match="propagation must be a PropagationPolicy, got SnapKV"):
        kvpolicy.compose(propagation=SnapKV())  # type: ignore[arg-type]


def test_policy_returning_bad_indices_names_itself(tiny_model, prompt_ids):
    from kvpolicy.adapters import AdapterError
    from kvpolicy.interfaces import CachePolicy

    class WrongShape(CachePolicy):
        kind = "wrong-shape"

        def select(self, view, state):
            return torch.arange(5)  # missing the (B, H_kv) dimensions

    with pytest.raises(
        AdapterError,
        match=r"WrongShape \('wrong-shape'\) select\(\) at layer 0: indices must have shape \(1, 2, n\)",
    ):
        kvpolicy.generate(tiny_model, None, input_ids=prompt_ids, policy=kvpolicy.compose(cache=WrongShape()))


@pytest.mark.parametrize("preset", ["snapkv", "h2o", "streamingllm", "pyramidkv"])
def test_budget_larger_than_the_prompt_keeps_everything(tiny_model, prompt_ids, preset):
    """A budget at or above the prompt length is a no-op (never an error, never a truncation)."""
    policy = kvpolicy.get_policy(preset, kv_budget=500)
    out = kvpolicy.generate(tiny_model, None, input_ids=prompt_ids, policy=policy, max_new_tokens=4)
    full = kvpolicy.generate(tiny_model, None, input_ids=prompt_ids, policy="fullkv", max_new_tokens=4)
    assert out.token_ids == full.token_ids
    assert out.stats.kv_tokens_per_layer == [prompt_ids.shape[1]] * 4
