"""Qwen2 and Qwen3 through kvpolicy: tiny random models, exact equivalence with transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

import kvpolicy
from kvpolicy.adapters import Qwen2Adapter, Qwen3Adapter


def tiny_qwen(family: str, attn: str = "sdpa", seed: int = 0, **overrides: object):
    torch.manual_seed(seed)
    common = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        attn_implementation=attn,
    )
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, **overrides))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=16, **overrides))
    model = model.eval()
    # Random init leaves the biases and q/k norms at their trivial values: perturb them so the test
    # would notice a projection that skipped them.
    with torch.no_grad():
        for layer in model.model.layers:
            attn_mod = layer.self_attn
            for name in ("q_proj", "k_proj", "v_proj"):
                bias = getattr(attn_mod, name).bias
                if bias is not None:
                    bias.normal_(0, 0.5)
            for name in ("q_norm", "k_norm"):
                if hasattr(attn_mod, name):
                    getattr(attn_mod, name).weight.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(1))


def hf_greedy(model, ids, n):
    mask = torch.ones_like(ids)  # otherwise generate masks every id equal to pad_token_id
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
    )
    return out[0, ids.shape[1] :].tolist()


def run(model, ids, policy, n=20):
    return kvpolicy.generate(model, None, input_ids=ids, policy=policy, max_new_tokens=n).token_ids


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_fullkv_equals_plain_transformers(family, attn, ids):
    model = tiny_qwen(family, attn)
    assert run(model, ids, "fullkv") == hf_greedy(model, ids, 20)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_adapter_keys_equal_the_models_own_cache(family, ids):
    model = tiny_qwen(family)
    adapter = kvpolicy.get_adapter(model)
    assert type(adapter) is (Qwen2Adapter if family == "qwen2" else Qwen3Adapter)
    out = model(ids, use_cache=True)
    ref = out.cache if "cache" in out else out.past_key_values  # renamed in transformers 5.24
    pre = kvpolicy.prefill(model, ids, "fullkv")
    for i, layer in enumerate(pre.cache.layers):
        torch.testing.assert_close(layer.keys, ref.layers[i].keys)  # q/k norm, bias and RoPE included
        torch.testing.assert_close(layer.values, ref.layers[i].values)


@pytest.mark.parametrize(
    "policy",
    [
        kvpolicy.get_policy("snapkv", kv_budget=100),
        kvpolicy.get_policy("snapkv", kv_budget=1.0),
        kvpolicy.get_policy("fastkv", tsp_layer=1, tsp_rate=1.0, kv_budget=100),
        kvpolicy.get_policy("pyramidkv", kv_budget=100),
        kvpolicy.get_policy("gemfilter", kv_budget=1.0),
    ],
    ids=["snapkv-tokens", "snapkv-fraction", "fastkv", "pyramidkv", "gemfilter"],
)
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_keep_everything_equals_full(family, policy, ids):
    model = tiny_qwen(family)
    assert run(model, ids, policy) == run(model, ids, "fullkv")


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_compressing_policies_run(family, ids):
    model = tiny_qwen(family)
    for name, overrides in [
        ("fastkv", {"tsp_layer": 1, "tsp_rate": 0.5, "kv_budget": 24}),
        ("h2o", {"kv_budget": 24}),
    ]:
        pre = kvpolicy.prefill(model, ids, kvpolicy.get_policy(name, **overrides))
        assert pre.cache.kv_lengths == [24] * 4
        assert pre.cache.layers[0].keys.shape == (1, 2, 24, 16)


def test_sliding_window_layers_go_to_the_generic_adapter(ids):
    model = tiny_qwen("qwen2", use_sliding_window=True, sliding_window=64, max_window_layers=0)
    assert kvpolicy.get_adapter(model).name == "generic"  # it runs sliding-window layers
    plain = tiny_qwen("qwen2")  # sliding_window is set by default but unused: the family adapter
    assert kvpolicy.get_adapter(plain).name == "qwen2"
