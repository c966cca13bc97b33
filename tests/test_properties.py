"""Properties over random prompt lengths, mixes and settings (hypothesis), on the tiny random Llama.

(a) a batch gives every prompt what it gets alone; (b) settings that keep everything equal full KV;
(c) token budgets hold exactly, per layer and KV head, after prefill and (when the policy evicts while
decoding) after decoding. Prompts are 8-80 tokens, 3-5 new tokens: the whole module takes well under
a minute on two cores.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_OPTIONS, tiny_policy
from hypothesis import given, settings
from hypothesis import strategies as st

import kvpolicy
from kvpolicy.testing import one_thread

#: No example database: nothing written into the checkout; a failure prints its example (and blob).
SETTINGS = {"deadline": None, "database": None, "print_blob": True}

LENGTHS = st.integers(min_value=8, max_value=80)
NEW_TOKENS = st.integers(min_value=3, max_value=5)
SEEDS = st.integers(min_value=0, max_value=2**31 - 1)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():  # a tiny model: intra-op threads only add overhead
        yield


def prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (length,), generator=torch.Generator().manual_seed(seed))


def generate(model, ids, policy, new_tokens):
    return kvpolicy.generate(model, None, input_ids=ids, policy=policy, max_new_tokens=new_tokens)


# -- (a) a batch equals each prompt alone ---------------------------------------------------------
#: Presets as the tiny tests run them, plus the batched decode-time evictions with fractional budgets
#: (rows of different prompt lengths evict at different budgets in one call).
BATCH_PRESETS = {
    **TINY_OPTIONS,
    "h2o-evicting": {"kv_budget": 0.5, "evict_during_decode": True},
    "streamingllm-rolling": {"kv_budget": 0.5, "rolling": True},
}


@settings(max_examples=40, **SETTINGS)
@given(
    lengths=st.lists(LENGTHS, min_size=2, max_size=4),
    preset=st.sampled_from(sorted(BATCH_PRESETS)),
    seed=SEEDS,
    new_tokens=NEW_TOKENS,
)
def test_batch_equals_each_prompt_alone(tiny_model, lengths, preset, seed, new_tokens):
    policy = tiny_policy(preset, BATCH_PRESETS[preset])
    prompts = [prompt(n, seed + i) for i, n in enumerate(lengths)]
    alone = [generate(tiny_model, p, policy, new_tokens) for p in prompts]
    batch = generate(tiny_model, prompts, policy, new_tokens)
    assert len(batch) == len(prompts)
    for i, (a, b) in enumerate(zip(alone, batch, strict=True)):
        assert b.token_ids == a.token_ids, f"prompt {i}"
        assert b.stats.tokens_per_layer == a.stats.tokens_per_layer, f"prompt {i}"
        assert b.stats.kv_tokens_per_layer == a.stats.kv_tokens_per_layer, f"prompt {i}"
        assert b.stats.kv_bytes_per_layer == a.stats.kv_bytes_per_layer, f"prompt {i}"
    # The batch's cache holds, per sequence and KV head, the entries (by position) it holds alone.
    pre = kvpolicy.prefill(tiny_model, prompts, policy)
    for i, p in enumerate(prompts):
        one = kvpolicy.prefill(tiny_model, p, policy)
        assert pre.cache.kv_head_lengths(i) == one.cache.kv_head_lengths(0), f"prompt {i}"
        for layer, (mine, ref) in enumerate(zip(pre.cache.layers, one.cache.layers, strict=True)):
            n = ref.positions.shape[-1]
            assert mine.positions[i, :, :n].tolist() == ref.positions[0].tolist(), (
                f"prompt {i}, layer {layer}"
            )


# -- (b) keeping everything equals full KV --------------------------------------------------------
@st.composite
def keep_all_settings(draw: st.DrawFn, length: int, new_tokens: int) -> tuple[str, dict[str, object]]:
    """A preset with settings that keep every entry of a ``length``-token prompt and its generation."""
    name = draw(st.sampled_from(["snapkv", "h2o", "streamingllm", "pyramidkv", "fastkv"]))
    evicts = {"h2o": "evict_during_decode", "streamingllm": "rolling"}.get(name)
    options: dict[str, object] = {}
    if evicts and draw(st.booleans()):
        # Evicting while decoding: the budget must also hold the generated tokens.
        options[evicts] = True
        options["kv_budget"] = draw(st.integers(length + new_tokens, 200))
    else:
        options["kv_budget"] = draw(st.one_of(st.just(1.0), st.integers(length, 200)))
    if name == "fastkv":
        options.update(tsp_layer=draw(st.integers(0, 2)), tsp_rate=1.0)
    return name, options


@settings(max_examples=40, **SETTINGS)
@given(data=st.data(), length=LENGTHS, seed=SEEDS, new_tokens=NEW_TOKENS)
def test_keep_everything_equals_full(tiny_model, data, length, seed, new_tokens):
    name, options = data.draw(keep_all_settings(length, new_tokens), label="settings")
    ids = prompt(length, seed)
    full = generate(tiny_model, ids, "fullkv", new_tokens)
    out = generate(tiny_model, ids, kvpolicy.get_policy(name, **options), new_tokens)
    assert out.token_ids == full.token_ids
    assert out.stats.tokens_per_layer == [length] * 4
    assert out.stats.kv_tokens_per_layer == [length] * 4
    assert out.stats.kv_bytes_per_layer == full.stats.kv_bytes_per_layer


# -- (c) token budgets hold per layer and KV head -------------------------------------------------
@settings(max_examples=60, **SETTINGS)
@given(
    name=st.sampled_from(["snapkv", "h2o", "streamingllm"]),
    budget=st.integers(8, 100),
    evicts=st.booleans(),
    length=LENGTHS,
    seed=SEEDS,
    new_tokens=NEW_TOKENS,
)
def test_token_budgets_hold_per_kv_head(tiny_model, name, budget, evicts, length, seed, new_tokens):
    options: dict[str, object] = {"kv_budget": budget}
    evicts = evicts and name != "snapkv"
    if evicts:
        options["evict_during_decode" if name == "h2o" else "rolling"] = True
    policy = kvpolicy.get_policy(name, **options)
    pre = kvpolicy.prefill(tiny_model, prompt(length, seed), policy, reserve=new_tokens)
    kept = min(budget, length)
    assert pre.cache.kv_head_lengths() == [[kept, kept]] * 4
    for i, layer in enumerate(pre.cache.layers):
        pos = layer.positions[0]
        for head in pos.tolist():
            assert len(set(head)) == kept and min(head) >= 0 and max(head) == length - 1, f"layer {i}"
        if name == "streamingllm":  # 4 sinks and the most recent tokens
            want = (
                list(range(length)) if length <= budget else [0, 1, 2, 3, *range(length - budget + 4, length)]
            )
            assert pos.tolist() == [want] * 2, f"layer {i}"
        else:  # the last 8 queries' window is always kept
            assert pos[:, -8:].tolist() == [list(range(length - 8, length))] * 2, f"layer {i}"
    adapter = kvpolicy.get_adapter(tiny_model)
    token = pre.next_token
    for step in range(new_tokens):
        token = adapter.decode_step(token, policy, pre.batch, step).argmax(dim=-1, keepdim=True)
    total = length + new_tokens
    held = min(budget, total) if evicts else kept + new_tokens
    assert pre.cache.kv_head_lengths() == [[held, held]] * 4
    # The newest entries stay: all the generated ones (rolling StreamingLLM: as many as its recent part holds).
    recent = min(new_tokens, budget - 4) if evicts and name == "streamingllm" else new_tokens
    for i, layer in enumerate(pre.cache.layers):
        pos = layer.positions[0]
        assert pos[:, -recent:].tolist() == [list(range(total - recent, total))] * 2, f"layer {i}"
        if evicts and name == "streamingllm":
            want = list(range(total)) if total <= budget else [0, 1, 2, 3, *range(total - budget + 4, total)]
            assert pos.tolist() == [want] * 2, f"layer {i}"
