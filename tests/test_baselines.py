"""The FastKV paper's baselines (StreamingLLM, H2O, PyramidKV, GemFilter, PyramidInfer) as policies.

Tiny random Llama for composition, equivalence, naive-reference and decode-eviction checks; the real
embedded model (``slow``) for keep-everything equivalence on a 1.5K-token needle prompt.
"""

from __future__ import annotations

import contextlib
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama
from test_scoring import assert_valid_top, naive_keep, naive_window_scores

import kvpolicy
import kvpolicy.adapters
from kvpolicy.interfaces import CachePolicy, LayerView, Propagate, Restart
from kvpolicy.policies import (
    CAKE,
    H2O,
    TOVA,
    TSP,
    AdaKV,
    AllTokens,
    DuoAttention,
    ExpectedAttention,
    FullCache,
    GemFilter,
    PyramidInfer,
    PyramidInferSqueeze,
    PyramidKV,
    SnapKV,
    StreamingLLM,
)
from kvpolicy.policies.attention import causal_column_sums
from kvpolicy.policies.pyramidinfer import (
    CONFIGS,
    cosine_schedule,
    mean_retention,
    recent_count,
    settings_for_retention,
)
from kvpolicy.policies.pyramidkv import pyramid_budget
from kvpolicy.state import RequestState
from kvpolicy.testing import one_thread

NEW_PRESETS = ["streamingllm", "h2o", "pyramidkv", "gemfilter", "pyramidinfer"]


def run(model, ids, policy, n=20):
    return kvpolicy.generate(model, None, input_ids=ids, policy=policy, max_new_tokens=n)


def make_view(t=40, layer=0, prompt_len=None, positions=None, seed=0, num_layers=4):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, h, t, 8, generator=g) for h in (6, 2, 2))
    return LayerView(
        layer=layer,
        num_layers=num_layers,
        prompt_len=prompt_len or t,
        positions=torch.arange(t)[None] if positions is None else positions,
        query=q,
        key=k,
        value=v,
        scaling=8**-0.5,
    )


def new_state(prompt_len=40, layers=4):
    return RequestState(prompt_len, layers, None)  # type: ignore[arg-type]


def naive_probs(q, k, scaling):
    """Full causal attention ``(B, H_q, T, T)`` the obvious way: keys repeated, whole matrix."""
    kr = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    t = q.shape[2]
    s = (q.float() @ kr.float().transpose(-1, -2)) * scaling
    return s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)


# -- the full matrix ------------------------------------------------------------------------------
PROPAGATIONS = {
    "all": AllTokens(),
    "tsp": TSP(layer=1, rate=0.5),
    "gemfilter": GemFilter(keep=40, layer=1),
    "pyramidinfer": PyramidInfer(recent_ratio=0.2, decay=0.3, min_context=8),
}
CACHES = {
    "full": FullCache(),
    "snapkv": SnapKV(budget=24),
    "streamingllm": StreamingLLM(budget=24, rolling=True),
    "h2o": H2O(budget=24, evict_during_decode=True),
    "pyramidkv": PyramidKV(budget=24),
    "pyramidinfer_squeeze": PyramidInferSqueeze(recent_ratio=0.2),
}


def expected_tokens(prop: str, length: int = 100, layers: int = 4) -> list[int]:
    if prop == "tsp":
        return [length, length, length // 2, length // 2]
    if prop == "gemfilter":
        return [40] * layers
    if prop == "pyramidinfer":
        return pyramidinfer_counts(length, layers, recent_ratio=0.2, decay=0.3, min_context=8)
    return [length] * layers


def pyramidinfer_counts(length, layers, recent_ratio, decay, min_context):
    """The reference's prefill recurrence: each layer keeps int(context * s(l)) of its context."""
    recent = recent_count(length, recent_ratio)
    context, floor, counts = length - recent, min(min_context, length - recent), [length]
    for layer in range(layers - 1):
        s = cosine_schedule(layer, layers, decay)
        if s < 1 and context > floor and int(context * s) > floor:
            context = int(context * s)
        counts.append(context + recent)
    return counts


def expected_cache(cache: str, tokens: list[int]) -> list[int]:
    n = len(tokens)
    if cache in ("full", "pyramidinfer_squeeze"):
        return tokens
    if cache == "pyramidkv":
        return [min(t, pyramid_budget(i, n, 24, 8, 100, 20)) for i, t in enumerate(tokens)]
    return [min(24, t) for t in tokens]


def expected_after_decode(cache: str, kv: list[int], steps: int) -> list[int]:
    """Entries per KV head after ``steps`` decode appends: the evicting caches (StreamingLLM rolling, H2O
    evict_during_decode) grow to their budget and stay there, PyramidInfer squeezes ``interval`` entries
    to ``squeezed_to`` every ``interval`` steps, the others grow by one entry a step."""
    if cache in ("streamingllm", "h2o"):
        return [min(24, n + steps) for n in kv]
    if cache == "pyramidinfer_squeeze":
        squeeze = CACHES[cache]
        dropped = [
            (steps // squeeze.interval) * (squeeze.interval - squeeze.squeezed_to(i, len(kv)))
            for i in range(len(kv))
        ]
        return [n + steps - d for n, d in zip(kv, dropped, strict=True)]
    return [n + steps for n in kv]


@pytest.mark.parametrize("cache", list(CACHES))
@pytest.mark.parametrize("prop", list(PROPAGATIONS))
def test_every_propagation_composes_with_every_cache(tiny_model, prompt_ids, prop, cache):
    with one_thread():  # a tiny model: intra-op threads only add overhead
        _check_composition(tiny_model, prompt_ids, prop, cache)


def _check_composition(tiny_model, prompt_ids, prop, cache):
    policy = kvpolicy.compose(PROPAGATIONS[prop], CACHES[cache])
    out = run(tiny_model, prompt_ids, policy)
    tokens = expected_tokens(prop)
    kv = expected_cache(cache, tokens)
    assert out.stats.tokens_per_layer == tokens
    assert out.stats.kv_tokens_per_layer == kv
    assert out.stats.kv_bytes_per_layer == [n * 2 * 2 * 16 * 4 for n in kv]  # (K+V) x heads x dim x fp32
    # The same engine step by step gives the same 20 tokens; afterwards every KV head of every layer
    # holds what the cache policy promises, newest entries at the positions decoding continued at
    # (the prompt length, or the filtered length after a GemFilter restart).
    pre = kvpolicy.prefill(tiny_model, prompt_ids, policy, reserve=20)
    assert pre.cache.kv_head_lengths() == [[n, n] for n in kv]
    adapter = kvpolicy.get_adapter(tiny_model)
    token, ids = pre.next_token, [pre.next_token.item()]
    for step in range(19):
        token = adapter.decode_step(token, policy, pre.batch, step).argmax(dim=-1, keepdim=True)
        ids.append(token.item())
    assert ids == out.token_ids
    assert pre.cache.kv_head_lengths() == [[n, n] for n in expected_after_decode(cache, kv, 19)]
    start = 40 if prop == "gemfilter" else 100
    assert pre.cache.get_seq_length() == start + 19
    recent = 8 if cache == "h2o" else 19  # H2O keeps its recent window; the others, every new entry
    for i, layer in enumerate(pre.cache.layers):
        assert (
            layer.positions[0, :, -recent:].tolist() == [list(range(start + 19 - recent, start + 19))] * 2
        ), i


# -- keep everything == full ----------------------------------------------------------------------
KEEP_ALL = [
    ("streamingllm", {"kv_budget": 100}),
    ("streamingllm", {"kv_budget": 1.0}),
    ("streamingllm", {"kv_budget": 120, "rolling": True}),
    ("h2o", {"kv_budget": 100}),
    ("h2o", {"kv_budget": 120, "evict_during_decode": True}),
    ("pyramidkv", {"kv_budget": 100}),
    ("pyramidkv", {"kv_budget": 1.0}),
    ("gemfilter", {"kv_budget": 100}),
    ("gemfilter", {"kv_budget": 1.0}),
    ("pyramidinfer", {"kv_budget": 1.0, "squeeze": False}),
    ("pyramidinfer", {"kv_budget": 1.0, "decode_ratio": 1.0}),
    ("pyramidinfer", {"decay": 1.0, "decode_ratio": 1.0}),
]


@pytest.mark.parametrize(("name", "overrides"), KEEP_ALL, ids=[f"{n}-{o}" for n, o in KEEP_ALL])
def test_keep_everything_equals_fullkv(tiny_model, prompt_ids, name, overrides):
    out = run(tiny_model, prompt_ids, kvpolicy.get_policy(name, **overrides))
    assert out.token_ids == run(tiny_model, prompt_ids, "fullkv").token_ids
    assert out.stats.tokens_per_layer == [100] * 4


@pytest.mark.parametrize("name", NEW_PRESETS)
def test_presets_compress_and_round_trip_through_json(tiny_model, prompt_ids, name):
    policy = kvpolicy.get_policy(name, kv_budget=30)
    assert policy.name == name
    rebuilt = kvpolicy.policy_from_dict(policy.to_dict())
    assert rebuilt.propagation == policy.propagation and rebuilt.cache == policy.cache
    expect = pytest.warns(UserWarning, match="below the lowest")
    with expect if name == "pyramidinfer" else contextlib.nullcontext():
        out = run(tiny_model, prompt_ids, policy)
    if name != "pyramidinfer":  # PyramidInfer cannot compress to 30 %: it warns and does what it can
        assert max(out.stats.kv_tokens_per_layer) < 100


# -- naive references -----------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_h2o_chunked_column_sums_equal_full_causal_matrix(chunk):
    view = make_view()
    naive = naive_probs(view.query, view.key, view.scaling).sum(2)  # (B, H_q, T): column sums
    naive = naive.view(1, 2, 3, 40).sum(2)  # GQA: sum the query heads of each KV group
    mine = causal_column_sums(view.query, view.key, view.scaling, chunk=chunk)
    torch.testing.assert_close(mine, naive, rtol=1e-5, atol=1e-5)
    # Causal: the first key collects attention from every query, the last from the last query only.
    assert bool((mine[..., 0] > mine[..., -1]).all())


def test_h2o_select_matches_naive_heavy_hitters():
    view = make_view()
    naive = naive_probs(view.query, view.key, view.scaling).sum(2).view(1, 2, 3, 40).sum(2)
    idx = H2O(budget=16).select(view, new_state())
    assert idx is not None and idx.shape == (1, 2, 16)
    assert torch.equal(idx, naive_keep(naive[..., :32], 16, 8))


def decode_on_paged(policy, state, view, idx, steps, seed=0, block_size=4):
    """Drive ``policy.on_decode`` over a real paged cache (small pages: rows span several) the way
    the engine does: append, attend, view, evict in place. Yields ``(step, q, layer)`` after each."""
    from kvpolicy.adapters.base import decode_view
    from kvpolicy.cache import PagedLayer, paged_attention
    from kvpolicy.interfaces import Evict

    g = torch.Generator().manual_seed(seed)
    keys = view.key.gather(2, idx[..., None].expand(-1, -1, -1, view.key.shape[-1]))
    pos = view.positions[:, None, :].expand(-1, view.num_kv_heads, -1).gather(2, idx)
    lc = PagedLayer(block_size)
    lc.store([(keys[0], keys[0], pos[0], None)], reserve=2)
    h_q = view.query.shape[1]
    for step in range(steps):
        q = torch.randn(1, h_q, 1, keys.shape[-1], generator=g)
        k = torch.randn(1, view.num_kv_heads, 1, keys.shape[-1], generator=g)
        lc.append(k, k, torch.tensor([view.prompt_len + step]))
        _, probs = paged_attention(q, lc, view.scaling, want_probs=True)
        dv = decode_view(lc, 0, view.layer, view.num_layers, view.prompt_len, step, q, probs, view.scaling)
        held = (dv.key.clone(), dv.positions.clone())  # what the cache held before this step's eviction
        decision = policy.on_decode(dv, state)
        if decision is not None:
            assert isinstance(decision, Evict)
            lc.evict(decision.slots)
        yield step, q, lc, held


def held_positions(lc, head):
    n = int(lc.lengths[0, head])
    return sorted(lc.dense(lc.pos_pool)[0, head, :n].tolist())


def test_h2o_decode_eviction_matches_naive_running_scores():
    torch.manual_seed(3)
    view = make_view(t=30)
    policy, state = H2O(budget=12, window=4, evict_during_decode=True), new_state(30)
    idx = policy.select(view, state)
    # naive: per KV head, a dict entry -> running score, built from the full causal matrix
    cols = naive_probs(view.query, view.key, view.scaling).sum(2).view(1, 2, 3, 30).sum(2)[0]
    naive = [{int(p): float(cols[h, p]) for p in idx[0, h]} for h in range(2)]
    for step, q, lc, (keys, pos) in decode_on_paged(policy, state, view, idx, 25, seed=3):
        for h in range(2):
            live = pos[0, h] >= 0
            kr = keys[0, h][live]
            probs = (q[0, 3 * h : 3 * h + 3, 0] @ kr.T * view.scaling).softmax(-1).sum(0)
            naive[h][30 + step] = 0.0
            for j, p in enumerate(pos[0, h][live].tolist()):
                naive[h][p] += float(probs[j])
            if len(naive[h]) > 12:
                old = sorted(naive[h])[:-4]
                del naive[h][min(old, key=lambda p: naive[h][p])]
        assert int(lc.lengths.max()) == int(lc.lengths.min()) == min(12, 13 + step)
        for h in range(2):
            assert held_positions(lc, h) == sorted(naive[h])


def test_streamingllm_keeps_sinks_and_recent_by_original_position():
    # After a propagation cut the tokens present sit at scattered positions; position 2 is gone.
    positions = torch.tensor([[0, 1, 3, 5, 9, 20, 21, 30, 31, 32, 33, 34]])
    view = make_view(t=12, prompt_len=40, positions=positions)
    idx = StreamingLLM(budget=7).select(view, new_state())
    kept = positions[0, idx[0, 0]].tolist()
    assert kept == [0, 1, 3, 31, 32, 33, 34]  # sinks are positions < 4, not the first 4 present
    assert torch.equal(idx[0, 0], idx[0, 1])


def test_pyramidkv_schedule_matches_kvcache_factory_and_averages_the_budget():
    def reference(layer, n, cap, w, q_len, beta=20):  # KVCache-Factory PyramidKVCluster.update_kv
        if q_len < cap:
            return q_len
        if q_len < (cap - w) * 2:
            return cap
        min_num = (cap - w) // beta
        max_num = (cap - w) * 2 - min_num
        if max_num >= q_len - w:
            max_num = q_len - w
            min_num = (cap - w) * 2 - max_num
        steps = (max_num - min_num) // (n - 1)
        return max_num - layer * steps + w

    for cap, q_len in [(128, 1000), (128, 200), (128, 260), (512, 600), (64, 4000)]:
        budgets = [PyramidKV(budget=cap).layer_budget(i, 32, q_len) for i in range(32)]
        assert [min(b, q_len) for b in budgets] == [reference(i, 32, cap, 8, q_len) for i in range(32)]
        if q_len >= 2 * (cap - 8):
            assert all(a >= b for a, b in itertools.pairwise(budgets))
            assert cap <= sum(budgets) / 32 <= cap + 31 / 2


def test_pyramidkv_select_is_snapkv_with_the_layer_budget():
    view = make_view(t=60, layer=2)
    keep = PyramidKV(budget=20, pooling="avg").layer_budget(2, 4, 60)
    assert keep == pyramid_budget(2, 4, 20, 8, 60, 20) and keep != 20
    idx = PyramidKV(budget=20, pooling="avg").select(view, new_state(60))
    assert torch.equal(
        idx, naive_keep(naive_window_scores(view.query, view.key, 8, view.scaling, 7, "avg"), keep, 8)
    )
    idx = PyramidKV(budget=20).select(view, new_state(60))  # max-pooling ties: any valid top set
    assert_valid_top(idx, naive_window_scores(view.query, view.key, 8, view.scaling, 7, "max"), keep, 8)


def naive_gemfilter(q, k, keep, kernel=5):
    kr = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    inner = (q[:, :, -1:, :] @ kr.transpose(-1, -2))[:, :, 0, :]  # (B, H_q, T), raw, no softmax
    pooled = F.avg_pool1d(inner.sum(1, keepdim=True), kernel, 1, kernel // 2)[:, 0]
    t = q.shape[2]
    return sorted([*pooled[0, :-1].topk(keep - 1).indices.tolist(), t - 1])


def test_gemfilter_selection_matches_naive_and_keeps_last_token():
    view = make_view(t=50, layer=1)
    decision = GemFilter(keep=12, layer=1).propagate(view, new_state(50))
    assert isinstance(decision, Restart)
    assert decision.indices[0].tolist() == naive_gemfilter(view.query, view.key, 12)
    assert decision.indices[0, -1].item() == 49
    assert GemFilter(keep=12, layer=2).propagate(view, new_state(50)) is None  # not its layer
    assert GemFilter(keep=50, layer=1).propagate(view, new_state(50)) is None  # nothing to filter
    assert GemFilter().resolved_layer(32) == 13  # the reference's Llama-3.1-8B filter layer


def test_pyramidinfer_selection_matches_naive():
    view = make_view(t=60, layer=1)
    policy = PyramidInfer(recent_ratio=0.1, decay=0.2, min_context=4)
    decision = policy.propagate(view, new_state(60))
    assert isinstance(decision, Propagate)
    recent, context = 7, 53
    probs = naive_probs(view.query, view.key, view.scaling).mean(1)  # average over query heads
    rows = probs[:, -recent:, :context] * torch.linspace(1, 1.2, recent)[None, :, None]
    scores = rows.mean(1)
    scores[:, :4] = float("inf")  # sinks
    keep = int(context * cosine_schedule(1, 4, 0.2))
    expected = sorted(scores[0].topk(keep).indices.tolist()) + list(range(context, 60))
    assert decision.indices[0].tolist() == expected
    assert decision.indices[0, :4].tolist() == [0, 1, 2, 3]
    assert policy.propagate(make_view(t=60, layer=0), new_state(60)) is None  # s(0) = 1


def test_pyramidinfer_squeeze_matches_naive_decode_simulation():
    view = make_view(t=12, seed=4)
    policy = PyramidInferSqueeze(recent_ratio=0.25, interval=3, ratio=0.67)  # R = 4, keeps 2 of 3
    state = new_state(12)
    state.max_new_tokens = 5  # decoding past the reserve must still squeeze right (columns grow)
    assert policy.select(view, state) is None and policy.squeezed_to(0, 4) == 2
    entries = list(range(12))
    # naive: every query's attention row as issued (head-averaged), entries by id (= position)
    full = naive_probs(view.query, view.key, view.scaling).mean(1)[0]
    rows = {i: {e: float(full[i, e]) for e in range(i + 1)} for i in range(12)}
    done = set(range(8))  # the context before the recent window at prefill is final
    squeezes = 0
    everything = torch.arange(12).expand(1, 2, -1)
    for step, q, lc, (keys, pos) in decode_on_paged(policy, state, view, everything, 20, seed=4):
        live = pos[0, 0] >= 0
        held = pos[0, 0][live].tolist()
        kr = keys[0][:, live].repeat_interleave(3, dim=0)  # (H_q, n, d)
        probs = (q[0, :, :, :] @ kr.transpose(-1, -2) * view.scaling).softmax(-1).mean(0)[0]
        entries.append(12 + step)
        assert sorted(held) == entries
        rows[12 + step] = dict(zip(held, probs.tolist(), strict=True))
        candidates = [e for e in entries[:-4] if e not in done]
        if len(candidates) >= 3:
            zone, recent_rows = candidates[:3], sorted(rows)[-4:]
            w = torch.linspace(1, 1.2, 4).tolist()
            score = {
                e: sum(wi * rows[r].get(e, 0.0) for wi, r in zip(w, recent_rows, strict=True)) for e in zone
            }
            kept = sorted(zone, key=lambda e: -score[e])[:2]
            entries = [e for e in entries if e not in zone or e in kept]
            done |= set(kept)
            squeezes += 1
        assert held_positions(lc, 0) == held_positions(lc, 1) == entries
    assert squeezes == 6 and len(entries) == 32 - 6


def test_pyramidinfer_counts_follow_schedule():
    model = tiny_llama(layers=8)
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(2))
    for config in CONFIGS:
        recent, decay = CONFIGS[config]
        pre = kvpolicy.prefill(model, ids, kvpolicy.get_policy("pyramidinfer", config=config, min_context=16))
        expected = pyramidinfer_counts(300, 8, recent, decay, 16)
        assert pre.state.tokens_per_layer == expected
        assert pre.cache.kv_lengths == expected  # the squeeze keeps the prefill cache whole
        assert expected[-1] < expected[0]
        kept = pre.cache.layers[-1].positions[0, 0]
        assert kept[:4].tolist() == [0, 1, 2, 3] and kept[-1].item() == 299  # sinks and recent survive


def test_pyramidinfer_retention_configs_and_solver():
    # The reference's configurations reach their nominal mean retention on Llama-3.1-8B's 32 layers.
    assert mean_retention(*CONFIGS["35"], 32) == pytest.approx(0.34, abs=0.01)
    assert mean_retention(*CONFIGS["50"], 32) == pytest.approx(0.50, abs=0.01)
    assert mean_retention(*CONFIGS["60"], 32) == pytest.approx(0.60, abs=0.01)
    recent, decay = settings_for_retention(0.6, 32)
    assert recent == 0.2 and decay == pytest.approx(0.7, abs=0.02)
    for target in (0.4, 0.45, 0.55, 0.7, 0.9):
        recent, decay = settings_for_retention(target, 30)
        assert mean_retention(recent, decay, 30) == pytest.approx(target, abs=1e-4)
    assert settings_for_retention(0.1, 32) == (0.01, 0.0)  # below reach: the most it compresses
    assert settings_for_retention(1.0, 32)[1] == 1.0


def test_pyramidinfer_target_solves_decay_per_prompt():
    policy = PyramidInfer(target=0.6, decay=None, recent_ratio=0.2)
    assert policy.resolved_decay(1000, 32) == pytest.approx(settings_for_retention(0.6, 32)[1])
    assert PyramidInfer(target=600, decay=None, recent_ratio=0.2).resolved_decay(1000, 32) == pytest.approx(
        policy.resolved_decay(1000, 32)
    )


# -- decode-time eviction -------------------------------------------------------------------------
def decode(model, ids, policy, steps=100):
    """Prefill, then ``steps`` greedy decode steps; returns the state after each, and the Prefill that
    holds their cache (a request holds its batch weakly: the cache lives as long as the Prefill)."""
    adapter = kvpolicy.get_adapter(model)
    pre = kvpolicy.prefill(model, ids, policy, reserve=steps)
    token = pre.next_token

    def steps_of():
        nonlocal token
        for step in range(steps):
            logits = adapter.decode_step(token, policy, pre.state, step)
            token = logits.argmax(-1, keepdim=True)
            yield step, pre.state

    return pre, steps_of()


@pytest.mark.parametrize(
    "policy",
    [
        kvpolicy.get_policy("streamingllm", kv_budget=24, rolling=True),
        kvpolicy.get_policy("h2o", kv_budget=24, evict_during_decode=True),
        kvpolicy.compose(TSP(layer=1, rate=0.5), StreamingLLM(budget=24, rolling=True)),
    ],
    ids=["streamingllm", "h2o", "tsp+streamingllm"],
)
def test_decode_eviction_keeps_cache_at_budget(tiny_model, prompt_ids, policy):
    _pre, steps = decode(tiny_model, prompt_ids, policy)
    for step, state in steps:
        assert state.cache.kv_lengths == [24] * 4
        for layer in state.cache.layers:
            pos = layer.positions[0]
            assert pos[:, -1].tolist() == [100 + step] * 2  # the newest token is always kept
            if isinstance(policy.cache, StreamingLLM):
                sinks = [p for p in pos[0].tolist() if p < 4]
                if isinstance(policy.propagation, AllTokens):
                    assert sinks == [0, 1, 2, 3]
                if step >= 20:  # the prompt has rolled out: sinks plus the newest tokens
                    assert pos[0].tolist() == [*sinks, *range(101 + step - 24 + len(sinks), 101 + step)]
            else:
                assert pos[:, -8:].tolist() == [list(range(93 + step, 101 + step))] * 2
    assert state.cache.layers[0].next_position == 200


def test_pyramidinfer_squeeze_bounds_cache_growth(tiny_model, prompt_ids):
    policy = kvpolicy.get_policy("pyramidinfer", min_context=8)  # 35 % config: R = 2
    prefill_lengths = kvpolicy.prefill(tiny_model, prompt_ids, policy).cache.kv_lengths
    _pre, steps = decode(tiny_model, prompt_ids, policy)
    for step, state in steps:
        appended = step + 1
        want = [n + appended - 2 * (appended // 16) for n in prefill_lengths]  # 16 -> 14 at every layer
        assert state.cache.kv_lengths == want
        for layer in state.cache.layers:
            assert layer.positions[0, 0, -2:].tolist() == [99 + appended - 1, 99 + appended]  # recent kept
    assert state.cache.kv_lengths == [n + 100 - 12 for n in prefill_lengths]


def test_pyramidinfer_computes_its_recent_attention_once_per_layer(tiny_model, prompt_ids, monkeypatch):
    """The squeeze (cache policy, asked first) and the pruning (propagation) share one pass over the
    recent queries; the pruning alone (with another cache policy) still computes its own, identically."""
    import kvpolicy.policies.pyramidinfer as pi

    calls = []
    real = pi.recent_query_attention

    def counting(*args, **kwargs):
        calls.append(1)
        yield from real(*args, **kwargs)

    monkeypatch.setattr(pi, "recent_query_attention", counting)
    policy = kvpolicy.get_policy("pyramidinfer", min_context=8, recent_ratio=0.1)  # R = 11: one chunk
    both = kvpolicy.prefill(tiny_model, prompt_ids, policy)
    assert len(calls) == 4  # the squeeze's pass on each of the 4 layers; the pruning reuses it
    calls.clear()
    alone = kvpolicy.compose(policy.propagation, kvpolicy.get_policy("fullkv").cache)
    pruned_alone = kvpolicy.prefill(tiny_model, prompt_ids, alone)
    assert len(calls) == 2  # its own pass where it prunes: layers 1 and 2 (s(0) = 1; the last never)
    assert pruned_alone.state.tokens_per_layer == both.state.tokens_per_layer


# -- GemFilter's second pass ----------------------------------------------------------------------
class CountingCache(CachePolicy):
    """Full cache that counts how often it is asked (to see the filter pass build no cache)."""

    kind = "test-counting"

    def select(self, view, state):
        state.scratch(self).setdefault("layers", []).append((view.layer, view.num_tokens))
        return None


def test_gemfilter_second_pass_uses_fresh_positions(tiny_model, prompt_ids):
    cache = CountingCache()
    policy = kvpolicy.compose(GemFilter(keep=30, layer=1), cache)
    pre = kvpolicy.prefill(tiny_model, prompt_ids, policy)
    assert pre.state.tokens_per_layer == [30] * 4
    for layer in pre.cache.layers:
        assert layer.positions[0].tolist() == [list(range(30))] * 2
        assert layer.next_position == 30  # decoding continues at k, not at the prompt length
    # The filter pass (layers 0..1 on 100 tokens) built no cache: only the second pass asked.
    assert pre.state.scratch(cache)["layers"] == [(i, 30) for i in range(4)]
    # The second pass is the model run on the selected tokens alone.
    selected = GemFilter(keep=30, layer=1)
    out = run(tiny_model, prompt_ids, kvpolicy.compose(selected))
    kept = torch.tensor(naive_gemfilter_for_model(tiny_model, prompt_ids, 30, 1))
    assert out.token_ids == run(tiny_model, prompt_ids[:, kept], "fullkv").token_ids


def naive_gemfilter_for_model(model, ids, keep, layer):
    captured = {}

    class Capture(GemFilter):
        def propagate(self, view, state):
            if view.layer == layer:
                captured["q"], captured["k"] = view.query, view.key
            return super().propagate(view, state)

    kvpolicy.prefill(model, ids, kvpolicy.compose(Capture(keep=keep, layer=layer)))
    return naive_gemfilter(captured["q"], captured["k"], keep)


def test_skipping_the_cache_without_restarting_is_an_error(tiny_model, prompt_ids):
    class SkipsCache(AllTokens):
        def needs_cache(self, view, state):
            return view.layer != 1

    with pytest.raises(
        kvpolicy.adapters.AdapterError, match=r"layers \[1\] need no cache .* did not restart"
    ):
        kvpolicy.prefill(tiny_model, prompt_ids, kvpolicy.compose(SkipsCache()))


def test_gemfilter_layer_outside_model_is_refused(tiny_model, prompt_ids):
    with pytest.raises(ValueError, match="GemFilter layer 3 leaves no layer after it"):
        kvpolicy.prefill(tiny_model, prompt_ids, kvpolicy.get_policy("gemfilter", filter_layer=3))


# -- settings validation --------------------------------------------------------------------------
INVALID = [
    ("streamingllm", {"kv_budget": 0}, ["kv_budget=0"]),
    ("streamingllm", {"sinks": -1}, ["sinks=-1"]),
    ("streamingllm", {"kv_budget": 4}, ["budget (4)", "sinks (4)"]),
    ("streamingllm", {"rolling": "sometimes"}, ["rolling='sometimes'"]),
    ("h2o", {"window": 0}, ["window=0"]),
    ("h2o", {"kv_budget": 1.5}, ["kv_budget=1.5"]),
    ("h2o", {"kv_budget": 4}, ["window (8)", "budget (4)"]),
    ("pyramidkv", {"beta": 0}, ["beta=0"]),
    ("pyramidkv", {"kernel": 4}, ["kernel", "4"]),
    ("pyramidkv", {"pooling": "median"}, ["pooling='median'"]),
    ("gemfilter", {"filter_layer": -1}, ["filter_layer=-1"]),
    ("gemfilter", {"kernel": 6}, ["kernel", "6"]),
    ("gemfilter", {"kv_budget": 0.0}, ["kv_budget=0.0"]),
    ("pyramidinfer", {"config": "40"}, ["config='40'"]),
    ("pyramidinfer", {"decay": 1.5}, ["decay=1.5"]),
    ("pyramidinfer", {"recent_ratio": 1.0}, ["recent_ratio=1.0"]),
    ("pyramidinfer", {"decode_interval": 0}, ["decode_interval=0"]),
    ("pyramidinfer", {"kv_budget": 0.5, "decay": 0.3}, ["kv_budget (0.5)", "decay (0.3)"]),
]


@pytest.mark.parametrize(("name", "overrides", "words"), INVALID, ids=[f"{n}-{o}" for n, o, _ in INVALID])
def test_invalid_settings_name_field_and_value(name, overrides, words):
    with pytest.raises(kvpolicy.PolicyConfigError, match=f"invalid settings for {name}") as err:
        kvpolicy.get_policy(name, **overrides)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("name", NEW_PRESETS)
def test_unknown_setting_is_named(name):
    with pytest.raises(kvpolicy.PolicyConfigError, match="unknown setting 'budgett'"):
        kvpolicy.get_policy(name, budgett=3)


def test_components_are_registered_by_kind():
    registry = kvpolicy.get_registry(refresh=True)
    assert set(NEW_PRESETS) <= set(registry.presets)
    kinds = {"gemfilter", "pyramidinfer", "streamingllm", "h2o", "pyramidkv", "pyramidinfer_squeeze"}
    assert kinds <= set(registry.components)
    assert registry.components["pyramidinfer"].category == "propagation"
    assert registry.components["h2o"].category == "cache"


def test_component_invalid_combination_is_a_pydantic_error():
    with pytest.raises(ValueError, match="exactly one of decay"):
        PyramidInfer(target=0.5)  # decay keeps its default: both given
    assert math.isclose(PyramidInfer(target=0.5, decay=None).recent_ratio, 0.01)


# -- the real model -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def needle_sample(real_model, haystack):
    from kvpolicy.eval import needle

    _, tokenizer = real_model
    return needle.build_sample(tokenizer, 1500, 0.5, haystack)


REAL_KEEP_ALL = [
    ("streamingllm", {"kv_budget": 2048, "rolling": True}),
    ("h2o", {"kv_budget": 2048}),
    ("pyramidkv", {"kv_budget": 2048}),
    ("gemfilter", {"kv_budget": 2048}),
    ("pyramidinfer", {"kv_budget": 1.0, "decode_ratio": 1.0}),
]


@pytest.fixture(scope="module")
def needle_full(real_model, needle_sample):
    model, tokenizer = real_model
    ids = needle_sample.input_ids
    return kvpolicy.generate(model, tokenizer, input_ids=ids, policy="fullkv", max_new_tokens=32).token_ids


@pytest.mark.slow
@pytest.mark.parametrize(("name", "overrides"), REAL_KEEP_ALL, ids=[n for n, _ in REAL_KEEP_ALL])
def test_real_model_keep_everything_equals_fullkv(real_model, needle_sample, needle_full, name, overrides):
    model, tokenizer = real_model
    ids = needle_sample.input_ids
    out = kvpolicy.generate(
        model, tokenizer, input_ids=ids, policy=kvpolicy.get_policy(name, **overrides), max_new_tokens=32
    )
    assert len(needle_full) >= 16
    assert out.token_ids == needle_full
    assert out.stats.tokens_per_layer == [len(ids)] * 30


#: The issue-14 caches: head-adaptive (AdaKV around SnapKV and ExpectedAttention), query-agnostic
#: (ExpectedAttention), decode-evicting (TOVA) and layer-adaptive (CAKE) budgets.
NEW_CACHES = {
    "ada-snapkv": AdaKV(inner=SnapKV(budget=24)),
    "ada-expected_attention": AdaKV(inner=ExpectedAttention(budget=24)),
    "expected_attention": ExpectedAttention(budget=24),
    "tova": TOVA(budget=24),
    "cake": CAKE(budget=24, window=8),
    # one retrieval head per layer (keeps all), one streaming head (4 sinks + 20 recent)
    "duoattention": DuoAttention(head_map=[[1.0, 0.0]] * 4, sink=4, recent=20),
}


@pytest.mark.parametrize("cache", list(NEW_CACHES))
@pytest.mark.parametrize("prop", list(PROPAGATIONS))
def test_every_propagation_composes_with_the_newer_caches(tiny_model, prompt_ids, prop, cache):
    """Each sits behind every propagation policy (FastKV's point: token selection for prefill and the
    cache's selection are independent): the propagation's token counts are untouched, the cache holds
    its total budget (per-head or per-layer allocation moves entries, it does not add any), and 20
    tokens decode."""
    with one_thread():
        out = run(tiny_model, prompt_ids, kvpolicy.compose(PROPAGATIONS[prop], NEW_CACHES[cache]))
    tokens = expected_tokens(prop)
    assert out.stats.tokens_per_layer == tokens
    assert len(out.token_ids) == 20
    kv = out.stats.kv_tokens_per_layer  # after prefill, mean over KV heads
    if cache == "cake":  # CAKE moves budget between layers: the total holds
        assert sum(kv) <= 24 * len(kv)
    elif cache == "duoattention":  # the retrieval head keeps what the layer saw, the streaming head 24
        assert kv == [(t + min(t, 24)) / 2 for t in tokens]
    else:  # per layer, on average over its KV heads (AdaKV moves entries between heads)
        assert all(k <= min(t, 24) for k, t in zip(kv, tokens, strict=True))
