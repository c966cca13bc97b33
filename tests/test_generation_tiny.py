"""Generation on a tiny random Llama: exact equivalences, shapes, positions, model.generate parity."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

import kvpolicy
from kvpolicy.interfaces import Propagate, PropagationPolicy, Restart
from kvpolicy.policies import TSP


def hf_greedy(model, ids, n):
    # An explicit mask: otherwise generate masks every id equal to pad_token_id as padding.
    mask = torch.ones_like(ids)
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
    )
    return out[0, ids.shape[1] :].tolist()


def run(model, ids, policy, n=20):
    return kvpolicy.generate(model, None, input_ids=ids, policy=policy, max_new_tokens=n)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_fullkv_equals_plain_transformers(attn, prompt_ids):
    model = tiny_llama(attn=attn)
    assert run(model, prompt_ids, "fullkv").token_ids == hf_greedy(model, prompt_ids, 20)


@pytest.mark.parametrize(
    "policy",
    [
        kvpolicy.get_policy("snapkv", kv_budget=100),
        kvpolicy.get_policy("snapkv", kv_budget=1.0),
        kvpolicy.get_policy("fastkv", tsp_layer=1, tsp_rate=1.0, kv_budget=100),
        kvpolicy.compose(TSP(layer=0, length=100)),
    ],
    ids=["snapkv-tokens", "snapkv-fraction", "fastkv", "tsp-length"],
)
def test_keep_everything_equals_full(tiny_model, prompt_ids, policy):
    assert run(tiny_model, prompt_ids, policy).token_ids == run(tiny_model, prompt_ids, "fullkv").token_ids


def test_cache_holds_budget_per_layer_and_kv_head(tiny_model, prompt_ids):
    pre = kvpolicy.prefill(tiny_model, prompt_ids, kvpolicy.get_policy("snapkv", kv_budget=24))
    for layer in pre.cache.layers:
        assert layer.keys.shape == (1, 2, 24, 16)
        assert layer.positions.shape == (1, 2, 24)
        # window always kept; each head keeps its own, ascending positions
        assert layer.positions[0, :, -8:].tolist() == [list(range(92, 100))] * 2
        assert bool((layer.positions.diff(dim=-1) > 0).all())


def test_tsp_counts_and_positions(tiny_model, prompt_ids):
    policy = kvpolicy.get_policy("fastkv", tsp_layer=1, tsp_rate=0.3, kv_budget=1.0)
    pre = kvpolicy.prefill(tiny_model, prompt_ids, policy)
    assert pre.state.tokens_per_layer == [100, 100, 30, 30]
    kept = pre.cache.layers[2].positions[0, 0]
    assert kept.tolist() == pre.cache.layers[3].positions[0, 1].tolist()  # no cache cut: all 30
    assert kept[-8:].tolist() == list(range(92, 100))
    # Propagated tokens keep their original positions: recomputing layer 2's keys from the model at
    # those positions reproduces the cache.
    assert pre.cache.layers[0].next_position == 100


def test_propagated_tokens_keep_original_positions():
    """A propagation that keeps a prefix of tokens equals running the model on that prefix alone
    for the kept tokens' keys, which is only true if positions are the originals."""

    class KeepFirst(PropagationPolicy):
        kind = "test-keep-first"

        def propagate(self, view, state):
            if view.layer == 0:
                return Propagate(torch.arange(60)[None])
            return None

    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(5))
    pre = kvpolicy.prefill(model, ids, kvpolicy.compose(KeepFirst()))
    ref = kvpolicy.prefill(model, ids[:, :60], "fullkv")
    torch.testing.assert_close(pre.cache.layers[3].keys, ref.cache.layers[3].keys)
    assert pre.cache.layers[0].next_position == 100  # decode continues at the original length


def test_restart_reruns_on_selected_tokens_with_fresh_positions():
    class RestartOnOdd(PropagationPolicy):
        kind = "test-restart"

        def propagate(self, view, state):
            return Restart(torch.arange(1, 100, 2)[None]) if view.layer == 1 else None

    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(6))
    out = run(model, ids, kvpolicy.compose(RestartOnOdd()))
    assert out.token_ids == run(model, ids[:, 1::2], "fullkv").token_ids
    assert out.stats.tokens_per_layer == [50, 50, 50, 50]
    assert out.stats.discarded_tokens_per_layer == [100, 100]  # the pass before the restart


@pytest.mark.parametrize(
    "policy",
    ["fullkv", kvpolicy.get_policy("snapkv", kv_budget=20), kvpolicy.get_policy("fastkv", tsp_layer=1)],
    ids=["fullkv", "snapkv", "fastkv"],
)
def test_model_generate_continues_from_prefill_cache(tiny_model, prompt_ids, policy):
    ours = run(tiny_model, prompt_ids, policy, n=16).token_ids
    pre = kvpolicy.prefill(tiny_model, prompt_ids, policy, reserve=16)
    ids = torch.cat([prompt_ids, pre.next_token], dim=-1)
    theirs = tiny_model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        past_key_values=pre.cache,
        max_new_tokens=15,
        min_new_tokens=15,
        do_sample=False,
        pad_token_id=0,
    )
    assert theirs[0, prompt_ids.shape[1] :].tolist() == ours


def test_model_is_unchanged_after_use(prompt_ids):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = hf_greedy(model, prompt_ids, 10)
    run(model, prompt_ids, kvpolicy.get_policy("fastkv", tsp_layer=1, tsp_rate=0.2, kv_budget=16))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert hf_greedy(model, prompt_ids, 10) == ref
    assert type(model.model.layers[0].self_attn).forward is type(model.model.layers[0].self_attn).forward


def test_cache_appends_without_copying_and_grows_geometrically(tiny_model, prompt_ids):
    pre = kvpolicy.prefill(tiny_model, prompt_ids, "fullkv", reserve=4, block_size=8)
    layer = pre.cache.layers[0]
    assert layer.capacity == 104  # 100 entries + 4 reserved, in pages of 8
    ptr = layer.k_pool.data_ptr()
    for _ in range(4):
        layer.update(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16))
    assert layer.k_pool.data_ptr() == ptr and layer.row_lengths() == [104, 104]
    assert layer.get_seq_length() == 104
    layer.update(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16))
    assert layer.capacity == 208 and layer.positions[0, 0, -1].item() == 104
    assert layer.positions[0, 0].tolist() == list(range(105))  # nothing lost in the growth


def test_sampling_is_reproducible_with_seed(tiny_model, prompt_ids):
    a = kvpolicy.generate(
        tiny_model, None, input_ids=prompt_ids, do_sample=True, top_p=0.9, seed=3, max_new_tokens=12
    )
    b = kvpolicy.generate(
        tiny_model, None, input_ids=prompt_ids, do_sample=True, top_p=0.9, seed=3, max_new_tokens=12
    )
    assert a.token_ids == b.token_ids


def test_stops_at_eos(tiny_model, prompt_ids):
    first = run(tiny_model, prompt_ids, "fullkv", n=5).token_ids
    tiny_model.generation_config.eos_token_id = first[0]
    try:
        out = run(tiny_model, prompt_ids, "fullkv", n=5)
        assert out.token_ids == first[:1] and out.stats.decode_steps == 0
    finally:
        tiny_model.generation_config.eos_token_id = None


def test_stats_report_per_layer_costs(tiny_model, prompt_ids):
    out = run(tiny_model, prompt_ids, kvpolicy.get_policy("fastkv", tsp_layer=1, tsp_rate=0.5, kv_budget=20))
    s = out.stats
    assert s.prompt_tokens == 100 and s.new_tokens == 20 and s.decode_steps == 19
    assert s.tokens_per_layer == [100, 100, 50, 50]
    assert s.kv_tokens_per_layer == [20, 20, 20, 20]
    assert s.kv_bytes_per_layer == [20 * 2 * 2 * 16 * 4] * 4  # entries x (K+V) x heads x dim x fp32
    assert s.prefill_seconds > 0 and s.decode_seconds > 0


def test_bfloat16_runs_without_nan(prompt_ids):
    model = tiny_llama().to(torch.bfloat16)
    # tsp_rate given: with a token budget alone fastkv propagates a constant 2048 tokens (no cut here).
    out = run(model, prompt_ids, kvpolicy.get_policy("fastkv", tsp_layer=1, tsp_rate=0.2, kv_budget=20), n=5)
    assert len(out.token_ids) == 5
