"""Generation on a tiny random Llama: exact equivalences, shapes, positions, model.generate parity."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import tiny_llama
from transformers import DynamicCache

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


@torch.no_grad()
def reference_keys(model, ids, keep_after, keep):
    """Every layer's keys ``(1, H_kv, n, d)`` and the last-token logits, computed by transformers' own
    decoder layers and ``DynamicCache`` (not by kvpolicy's adapter): all tokens through layers
    ``0..keep_after``, then only the tokens ``keep`` (sorted indices) at their *original* positions,
    causal among themselves (an explicit 4D mask)."""
    base = model.model
    h = base.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None]
    cache = DynamicCache(config=model.config)
    # the decoder layer's cache keyword: `cache` from transformers 5.24, `past_key_values` before
    key = "cache" if "cache" in inspect.signature(base.layers[0].forward).parameters else "past_key_values"
    for i, layer in enumerate(base.layers):
        t = h.shape[1]
        mask = torch.full((t, t), torch.finfo(h.dtype).min).triu(1)[None, None]
        h = layer(
            h,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            **{key: cache},
            position_embeddings=base.rotary_emb(h, pos),
        )
        if i == keep_after:
            h, pos = h[:, keep], pos[:, keep]
    logits = model.lm_head(base.norm(h[:, -1]))
    return [layer.keys for layer in cache.layers], logits


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
    assert kept.tolist() != list(range(30))  # TSP picked more than a prefix, or this proves nothing
    # Propagated tokens keep their original positions: recomputing layer 2's (and 3's) keys from the
    # model, every token through layers 0-1 then the kept ones at those positions, reproduces the cache.
    ref, logits = reference_keys(tiny_model, prompt_ids, keep_after=1, keep=kept)
    for i, layer in enumerate(pre.cache.layers):
        torch.testing.assert_close(layer.keys, ref[i], msg=lambda m, i=i: f"layer {i}: {m}")
    torch.testing.assert_close(pre.logits, logits)
    # Decode continues at the logical length (the prompt's), in every layer.
    assert [layer.next_position for layer in pre.cache.layers] == [100] * 4
    assert pre.cache.get_seq_length() == 100 and pre.batch.next_positions.tolist() == [100]


#: A scattered, sorted selection that ends at the last prompt token and is no prefix (position 0 is
#: dropped): renumbering the kept tokens 0..k-1 would give every one of them another position.
SCATTERED = torch.cat([torch.arange(2, 60, 3), torch.arange(61, 100, 2)])


def test_propagated_tokens_keep_original_positions():
    """Tokens that propagate past layer 0 keep their original positions: their keys at later layers
    equal transformers' own layers run on those tokens at those positions (and differ from what
    positions renumbered 0..k-1 would give)."""

    class KeepScattered(PropagationPolicy):
        kind = "test-keep-scattered"

        def propagate(self, view, state):
            if view.layer == 0:
                return Propagate(SCATTERED[None])
            return None

    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(5))
    pre = kvpolicy.prefill(model, ids, kvpolicy.compose(KeepScattered()))
    assert pre.state.tokens_per_layer == [100, 40, 40, 40]
    ref, logits = reference_keys(model, ids, keep_after=0, keep=SCATTERED)
    for i, layer in enumerate(pre.cache.layers):
        want = torch.arange(100) if i == 0 else SCATTERED
        assert layer.positions[0].tolist() == [want.tolist()] * 2, f"layer {i}"
        torch.testing.assert_close(layer.keys, ref[i], msg=lambda m, i=i: f"layer {i}: {m}")
    torch.testing.assert_close(pre.logits, logits)
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
    [
        "fullkv",
        kvpolicy.get_policy("snapkv", kv_budget=20),
        kvpolicy.get_policy("fastkv", tsp_layer=1),
        kvpolicy.get_policy("snapkv", kv_budget=20, kv_bits="int4"),
        kvpolicy.get_policy("snapkv", kv_budget=20, kv_bits="kivi4"),
    ],
    ids=["fullkv", "snapkv", "fastkv", "snapkv-int4", "snapkv-kivi4"],
)
def test_model_generate_continues_from_prefill_cache(tiny_model, prompt_ids, policy):
    """``model.generate`` continues from the prefilled cache (a quantized one shows transformers its
    dequantized entries, and stores what it appends quantized) with ``kvpolicy.generate``'s tokens."""
    ours = run(tiny_model, prompt_ids, policy, n=16).token_ids
    pre = kvpolicy.prefill(tiny_model, prompt_ids, policy, reserve=16)
    ids = torch.cat([prompt_ids, pre.next_token], dim=-1)
    theirs = tiny_model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=15,
        min_new_tokens=15,
        do_sample=False,
        pad_token_id=0,
        **pre.generate_kwargs(tiny_model),
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
    policy = kvpolicy.get_policy("fastkv", tsp_layer=1, tsp_rate=0.2, kv_budget=20)
    pre = kvpolicy.prefill(model, prompt_ids, policy, reserve=5)
    assert pre.cache.layers[0].keys.dtype == torch.bfloat16
    assert bool(torch.isfinite(pre.logits).all()), "prefill logits"
    adapter = kvpolicy.get_adapter(model)
    token, tokens = pre.next_token, [pre.next_token.item()]
    for step in range(4):
        logits = adapter.decode_step(token, policy, pre.batch, step)
        assert bool(torch.isfinite(logits).all()), f"decode step {step}"
        assert float(logits.float().std()) > 0, f"decode step {step}: constant logits"
        token = logits.argmax(dim=-1, keepdim=True)
        tokens.append(token.item())
    assert tokens == run(model, prompt_ids, policy, n=5).token_ids
