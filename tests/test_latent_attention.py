"""Latent attention (MLA, issue 22): the cache holds each token's compressed latent and shared RoPE key
(one KV head per layer), the policies score with the absorbed queries, and decode attends over the
latents; from tiny random configs built offline (:func:`kvpolicy.coverage.tiny_config`).

Keep-all equal to transformers is the coverage check's (``tests/test_coverage.py``); here: what is held,
that the absorbed logits are the model's, batches, graph-replayed decode and decode-time eviction.
"""

from __future__ import annotations

import pytest
import torch

import kvpolicy
from kvpolicy.coverage import MLA, _build


def _prompts(*lengths: int) -> list[torch.Tensor]:
    return [torch.randint(1, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in lengths]


@pytest.fixture(scope="module")
def deepseek():
    return _build("deepseek_v3")


def test_the_cache_holds_the_latent_one_key_per_token_for_all_heads(deepseek):
    adapter = kvpolicy.get_adapter(deepseek)
    assert adapter.latent
    pre = kvpolicy.prefill(deepseek, _prompts(40)[0][None], kvpolicy.get_policy("snapkv", kv_budget=12))
    width, rank = MLA["kv_lora_rank"] + MLA["qk_rope_head_dim"], MLA["kv_lora_rank"]
    for layer in pre.cache.layers:
        assert layer.num_heads == 1
        assert layer.k_pool.shape[-1] == width and layer.v_pool.shape[-1] == rank
        assert (
            layer.v_pool.data_ptr() == layer.k_pool.data_ptr()
        )  # the value is the key's latent: stored once
    assert pre.cache.kv_lengths == [12] * 4
    assert pre.cache.kv_bytes == [12 * width * 4] * 4  # fp32 latent + RoPE key, not heads x (d_k + d_v)


def test_absorbed_queries_give_the_models_attention_logits(deepseek):
    """``q_nope W_uk . latent + q_rope . k_rope`` equals the expanded ``q . k`` the layer attends with."""
    from kvpolicy.adapters.generic import _LayerCall

    adapter = kvpolicy.get_adapter(deepseek)
    ids = _prompts(20)[0][None]
    positions = torch.arange(20)[None]
    call = _LayerCall(adapter, counts=[20], token_positions=positions)
    states = adapter._layer_cache()
    with torch.no_grad(), adapter.routing():
        h = adapter._embed(ids, positions)
        adapter._call_layer(0, adapter.layers[0], h, adapter._rotary(h, positions), positions, call, states)
    query, key, _ = call.qkv
    latent, rotated = call.latent
    expanded = query @ key.transpose(-1, -2)
    absorbed = adapter._absorb_query(adapter.attention(adapter.layers[0]), query) @ torch.cat(
        [latent, rotated], dim=-1
    ).transpose(-1, -2)
    torch.testing.assert_close(absorbed, expanded, rtol=1e-4, atol=1e-4)


def test_a_batch_equals_each_prompt_alone_and_graph_decode_equals_eager(deepseek):
    policy = kvpolicy.get_policy("fastkv", kv_budget=12, tsp_layer=1, tsp_rate=0.5)
    prompts = _prompts(40, 23, 31)
    alone = [kvpolicy.generate(deepseek, None, input_ids=p, policy=policy, max_new_tokens=8) for p in prompts]
    batch = kvpolicy.generate(deepseek, None, input_ids=prompts, policy=policy, max_new_tokens=8)
    assert [b.token_ids for b in batch] == [a.token_ids for a in alone]
    graphs = kvpolicy.generate(
        deepseek, None, input_ids=prompts[0], policy=policy, max_new_tokens=8, graphs=True
    )
    assert graphs.token_ids == alone[0].token_ids


def test_decode_time_eviction_holds_its_budget_on_the_latent(deepseek):
    """H2O scores the latent slots with the absorbed decode queries and evicts to its budget."""
    out = kvpolicy.generate(
        deepseek,
        None,
        input_ids=_prompts(40)[0],
        policy=kvpolicy.get_policy("h2o", kv_budget=12),
        max_new_tokens=10,
    )
    assert len(out.token_ids) == 10
    assert out.stats.kv_tokens_per_layer == [12] * 4
