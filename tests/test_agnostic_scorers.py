"""Query-agnostic scorers that need no attention weights (KeyDiff, LagKV, Compactor with its parts
leverage and non-causal attention) and the seeded random baseline.

Naive float64 references (plain loops) against the vectorised scores; the ScoresKeys contract and
Ada-KV around each; pre-RoPE keys recovered from the view (the tiny model's own ``k_proj`` output, and
a hand-made scaled and partial rotary embedding); the random draw's determinism (seed and layer only,
not torch's global RNG); batch equals each prompt alone; presets and settings errors; the conformance
suite (keep-all equals full KV, budgets, every propagation policy, graph-replayed decode equals eager).
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

pytest.register_assert_rewrite("kvpolicy.testing")  # before importing it: detailed assertion messages
pytest_plugins = ["kvpolicy.testing"]
pytestmark = pytest.mark.usefixtures("single_thread")

import kvpolicy  # noqa: E402
from kvpolicy.interfaces import CachePolicy, LayerView, ScoresKeys  # noqa: E402
from kvpolicy.policies import AdaKV  # noqa: E402
from kvpolicy.policies.compactor import (  # noqa: E402
    Compactor,
    Leverage,
    NonCausalAttention,
    gaussian_sketch,
    pre_rope_keys,
)
from kvpolicy.policies.expected_attention import rotate_half  # noqa: E402
from kvpolicy.policies.keydiff import KeyDiff  # noqa: E402
from kvpolicy.policies.lagkv import LagKV  # noqa: E402
from kvpolicy.policies.random import Random, layer_generator  # noqa: E402
from kvpolicy.registry import PolicyConfigError, component_from_dict  # noqa: E402
from kvpolicy.state import RequestState  # noqa: E402
from kvpolicy.testing import CachePolicyConformance, ConformanceCase  # noqa: E402


def make_view(t=40, h_q=6, h_kv=2, d=8, seed=0, layer=0, positions=None, prompt_len=None):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, h, t, d, generator=g) for h in (h_q, h_kv, h_kv))
    return LayerView(
        layer=layer,
        num_layers=4,
        prompt_len=prompt_len or t,
        positions=torch.arange(t)[None] if positions is None else positions,
        query=q,
        key=k,
        value=v,
        scaling=d**-0.5,
    )


def new_state(prompt_len=40):
    return RequestState(prompt_len, 4)


def assert_scores(ours, want):
    assert ours.dtype == torch.float32 and ours.shape == want.shape
    assert torch.equal(torch.isinf(ours), torch.isinf(want))
    finite = ~torch.isinf(want)
    torch.testing.assert_close(ours[finite].double(), want[finite], rtol=1e-4, atol=1e-5)


def zscore_naive(x):
    flat = x.flatten()
    mean = sum(flat.tolist()) / flat.numel()
    var = sum((v - mean) ** 2 for v in flat.tolist()) / (flat.numel() - 1)
    return (x - mean) / max(math.sqrt(var), 1e-6)


# -- naive references -------------------------------------------------------------------------------
def naive_keydiff(view):
    k = view.key.double()[0]
    h, t, _ = k.shape
    out = torch.zeros(h, t, dtype=torch.float64)
    for g in range(h):
        anchor = sum(k[g, j] / k[g, j].norm() for j in range(t)) / t
        for j in range(t):
            out[g, j] = -float(k[g, j] @ anchor) / float(k[g, j].norm() * anchor.norm())
    return out[None]


def naive_lagkv(view, n_sink, lag, cross):
    k, v = view.key.double()[0], view.value.double()[0]
    h, t, _ = k.shape
    out = torch.zeros(h, t, dtype=torch.float64)
    out[:, :n_sink] = math.inf
    rest = t - n_sink
    if t < n_sink + 2 * lag:
        for j in range(n_sink, t):
            out[:, j] = (j - n_sink) / rest
        return out[None]
    parts = rest // lag
    tail = t - n_sink - (parts - 1) * lag
    for g in range(h):
        for p in range(parts - 1):
            lo = n_sink + p * lag
            total = torch.zeros(lag, dtype=torch.float64)
            for states in (k, v):
                ref = states[g, lo + lag : lo + 2 * lag]
                low, high = ref.min(dim=0).values, ref.max(dim=0).values
                stds = [float(((states[g, lo + i] - low) / (high - low)).std()) for i in range(lag)]
                top = max(stds)
                e = [math.exp(s - top) for s in stds]
                total += torch.tensor([x / sum(e) for x in e]) / 2
            if cross:
                out[g, lo : lo + lag] = total
            else:
                ranks = [sum(1 for y in total.tolist() if y < x) for x in total.tolist()]
                out[g, lo : lo + lag] = torch.tensor(ranks, dtype=torch.float64) / lag
        for i in range(tail):
            out[g, t - tail + i] = 1 + (i + 1) / tail
    return out[None]


def naive_leverage(key, sketch):
    """Per head: centred keys, sketched, ``x_iᵀ (G + 0.01 I)⁻¹ x_i`` by an explicit solve."""
    k = key.double()[0]
    h, s, _ = k.shape
    out = torch.zeros(h, s, dtype=torch.float64)
    for g in range(h):
        x = (k[g] - k[g].mean(dim=0)) @ sketch[g].double()
        gram = x.T @ x + 0.01 * torch.eye(x.shape[1], dtype=torch.float64)
        for i in range(s):
            out[g, i] = max(0.0, float(x[i] @ torch.linalg.solve(gram, x[i])))
    return out[None]


def naive_noncausal(q, k, v, chunk):
    """Per query head and chunk: softmax of raw ``q·k`` over the chunk's keys, summed over its
    queries; mean over the group; times ``‖v‖``; 3-wide zero-padded average."""
    q, k, v = (x.double()[0] for x in (q, k, v))
    h_q, s, _ = q.shape
    h_kv = k.shape[0]
    n_rep = h_q // h_kv
    att = torch.zeros(h_kv, s, dtype=torch.float64)
    for hq in range(h_q):
        g = hq // n_rep
        for lo in range(0, s, chunk):
            hi = min(s, lo + chunk)
            for i in range(lo, hi):
                logits = [float(q[hq, i] @ k[g, j]) for j in range(lo, hi)]
                top = max(logits)
                e = [math.exp(z - top) for z in logits]
                for j in range(lo, hi):
                    att[g, j] += e[j - lo] / sum(e) / n_rep
    weighted = att * v.norm(dim=-1)
    pooled = torch.zeros_like(weighted)
    for j in range(s):
        pooled[:, j] = sum(weighted[:, i] for i in (j - 1, j, j + 1) if 0 <= i < s) / 3
    return pooled[None]


def naive_compactor(view, policy, lev_key):
    t = view.num_tokens
    start = int((view.positions[0] < policy.sink_size_start).sum())
    end = min(policy.sink_size_end, t - start)
    out = torch.full((1, view.num_kv_heads, t), math.inf, dtype=torch.float64)
    mid = slice(start, t - end)
    sketch = gaussian_sketch(policy.seed, view.layer, view.num_kv_heads, view.key.shape[-1], 48)
    lev = zscore_naive(naive_leverage(lev_key[:, :, mid], sketch))
    att = zscore_naive(
        naive_noncausal(view.query[:, :, mid], view.key[:, :, mid], view.value[:, :, mid], policy.chunk_size)
    )
    out[..., mid] = policy.resolved_blending(view.prompt_len) * lev + att
    return out


# -- scores equal the naive references --------------------------------------------------------------
def test_keydiff_equals_the_naive_reference():
    view = make_view(t=30)
    assert_scores(KeyDiff(budget=8).key_scores(view, new_state()), naive_keydiff(view))


@pytest.mark.parametrize(
    ("t", "n_sink", "lag", "cross"),
    [(40, 4, 8, False), (43, 4, 8, True), (37, 2, 5, False), (40, 4, 128, False), (20, 0, 4, True)],
)
def test_lagkv_equals_the_naive_reference(t, n_sink, lag, cross):
    view = make_view(t=t, seed=t)
    policy = LagKV(budget=12, n_sink=n_sink, lag_size=lag, cross_scoring=cross)
    assert_scores(policy.key_scores(view, new_state(t)), naive_lagkv(view, n_sink, lag, cross))


def test_lagkv_sinks_are_original_positions():
    """After a propagation cut that dropped positions 1 and 3, two sinks reach the layer, and the
    partitions start right after them."""
    positions = torch.tensor([[0, 2, *range(4, 42)]])
    view = make_view(t=40, positions=positions, prompt_len=42)
    scores = LagKV(budget=12, lag_size=8).key_scores(view, new_state(42))
    assert torch.isinf(scores[..., :2]).all() and torch.isfinite(scores[..., 2:]).all()
    assert_scores(scores, naive_lagkv(view, 2, 8, False))


@pytest.mark.parametrize("t", [40, 33])
def test_leverage_equals_the_naive_reference(t):
    view = make_view(t=t, d=16, seed=2, layer=3)
    policy = Leverage(budget=8, sketch_dimension=6, seed=5, pre_rope_keys=False)
    sketch = gaussian_sketch(5, 3, 2, 16, 6)
    assert_scores(policy.key_scores(view, new_state(t)), zscore_naive(naive_leverage(view.key, sketch)))


@pytest.mark.parametrize(("t", "chunk"), [(40, 8), (37, 16), (10, 256)])
def test_noncausal_attention_equals_the_naive_reference(t, chunk):
    view = make_view(t=t, seed=4)
    ours = NonCausalAttention(budget=8, chunk_size=chunk).key_scores(view, new_state(t))
    assert_scores(ours, zscore_naive(naive_noncausal(view.query, view.key, view.value, chunk)))


@pytest.mark.parametrize(
    "settings",
    [{}, {"blending": 0.35, "chunk_size": 8}, {"sink_size_start": 2, "sink_size_end": 0, "chunk_size": 16}],
    ids=["defaults", "blending", "ends"],
)
def test_compactor_equals_the_naive_reference(settings):
    view = make_view(t=45, d=8, seed=6, layer=1)
    policy = Compactor(budget=0.25, pre_rope_keys=False, **settings)
    assert policy.resolved_blending(45) == settings.get("blending", 0.75)
    assert_scores(policy.key_scores(view, new_state(45)), naive_compactor(view, policy, view.key))
    # a propagation cut: 3 of the 8 start sinks reached the layer
    cut = make_view(t=40, seed=7, positions=torch.tensor([[0, 3, 7, *range(9, 46)]]), prompt_len=46)
    ours = policy.key_scores(cut, new_state(46))
    sinks = int((cut.positions < policy.sink_size_start).sum())
    assert sinks == (3 if policy.sink_size_start == 8 else 1)
    assert torch.isinf(ours[..., :sinks]).all() and torch.isfinite(ours[..., sinks]).all()
    assert_scores(ours, naive_compactor(cut, policy, cut.key))


def test_compactor_blending_follows_the_budget():
    assert Compactor(budget=0.3).resolved_blending(1000) == pytest.approx(0.7)  # kvpress: the ratio
    assert Compactor(budget=250).resolved_blending(1000) == pytest.approx(0.75)
    assert Compactor(budget=250).resolved_blending(100) == 0.0
    assert Compactor(budget=250, blending=0.35).resolved_blending(1000) == 0.35


# -- pre-RoPE keys ------------------------------------------------------------------------------------
class Record(CachePolicy):
    kind = "record-views"

    def select(self, view, state):
        state.scratch(self)[view.layer] = view
        return None


def test_pre_rope_keys_are_the_models_k_proj_output(model, ids):
    seen = {}
    attn = model.model.layers[1].self_attn
    hook = attn.k_proj.register_forward_hook(lambda mod, args, out: seen.setdefault("k", out))
    try:
        recorder = Record()
        pre = kvpolicy.prefill(model, ids, kvpolicy.compose(cache=recorder))
    finally:
        hook.remove()
    view = pre.state.scratch(recorder)[1]
    k_pre = seen["k"].view(1, ids.shape[1], -1, attn.head_dim).transpose(1, 2)
    assert view.rope_theta is not None or view.rotary is not None
    torch.testing.assert_close(pre_rope_keys(view), k_pre.float(), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(view.key.float(), k_pre.float(), atol=1e-2), "post-RoPE keys differ"
    no_rope = replace(view, rope_theta=None, rotary=None)
    assert torch.equal(pre_rope_keys(no_rope), view.key.float())


def test_pre_rope_keys_through_a_scaled_partial_rotary():
    """``LayerView.rotary`` route: tables scaled by an attention factor, rotating 8 of 16 channels."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary = LlamaRotaryEmbedding(LlamaConfig(hidden_size=32, num_attention_heads=4, rope_theta=500.0))
    factor = 1.3

    def tables(positions):
        cos, sin = rotary(torch.zeros(1), positions)
        return cos * factor, sin * factor

    positions = torch.tensor([[0, 1, 5, 9, 30, 77]])
    k_pre = torch.randn(1, 2, 6, 16)
    cos, sin = (x[:, None] for x in tables(positions))
    rot = k_pre[..., :8]
    k_post = torch.cat((rot * cos + rotate_half(rot) * sin, k_pre[..., 8:]), dim=-1)
    view = LayerView(0, 1, 78, positions, torch.randn(1, 4, 6, 16), k_post, k_post, 0.25, rotary=tables)
    torch.testing.assert_close(pre_rope_keys(view), k_pre, rtol=1e-5, atol=1e-5)


# -- the ScoresKeys contract, Ada-KV ----------------------------------------------------------------
SCORERS = [
    KeyDiff(budget=12),
    LagKV(budget=12, lag_size=8),
    Leverage(budget=12),
    NonCausalAttention(budget=12, chunk_size=16),
    Compactor(budget=20, chunk_size=16),
    Random(budget=12),
]


@pytest.mark.parametrize("policy", SCORERS, ids=lambda p: p.kind)
def test_scores_keys_contract(policy):
    assert isinstance(policy, ScoresKeys)
    view = make_view(t=40)
    scores = policy.key_scores(view, new_state())
    assert scores.shape == (1, 2, 40) and scores.dtype == torch.float32
    assert not torch.isnan(scores).any()
    keep = policy.resolved_budget(40)
    want = scores.topk(keep, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(policy.select(view, new_state()), want)
    protected = {"lagkv": 4, "compactor": 8}.get(policy.kind, 0)
    assert torch.isinf(scores[..., :protected]).all()
    assert int(torch.isinf(scores).sum()) == 2 * protected + (8 if policy.kind == "compactor" else 0)


@pytest.mark.parametrize("policy", SCORERS, ids=lambda p: p.kind)
def test_ada_kv_wraps_each_scorer(model, ids, policy):
    ada = AdaKV(inner=policy)
    pre = kvpolicy.prefill(model, ids, kvpolicy.compose(cache=ada))
    budget = policy.resolved_budget(100)
    for layer in pre.cache.layers:
        counts = layer.lengths[0].tolist()
        assert sum(counts) == 2 * budget and min(counts) >= 1
    assert AdaKV(inner=policy.kind).inner == type(policy)()  # by kind: its defaults


# -- random ---------------------------------------------------------------------------------------
def test_random_depends_on_seed_and_layer_only():
    policy = Random(budget=8, seed=3)
    a = policy.key_scores(make_view(seed=0, layer=2))
    torch.manual_seed(123)
    torch.rand(5)  # the global RNG moved: nothing changes
    b = policy.key_scores(make_view(seed=9, layer=2))  # other content, same layer and length
    assert torch.equal(a, b)
    assert not torch.equal(a, policy.key_scores(make_view(layer=1)))
    assert not torch.equal(a, Random(budget=8, seed=4).key_scores(make_view(layer=2)))
    g1, g2 = layer_generator(3, 2), layer_generator(3, 2)
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))
    assert not torch.equal(torch.rand(4, generator=layer_generator(3, 2, 1)), torch.rand(4, generator=g1))


def test_random_keeps_about_uniformly(model, ids):
    pre = kvpolicy.prefill(model, ids, kvpolicy.get_policy("random", kv_budget=50))
    kept = torch.cat([layer.positions[0, :, :50].flatten() for layer in pre.cache.layers])
    assert 0.3 < float((kept < 50).float().mean()) < 0.7  # no bias towards either half


def test_stdlib_random_is_not_shadowed():
    import importlib
    import random as stdlib_random

    import kvpolicy.policies.random as ours

    assert ours.__name__ == "kvpolicy.policies.random" and stdlib_random is not ours
    assert hasattr(stdlib_random, "Random") and hasattr(stdlib_random, "shuffle")
    assert importlib.import_module("kvpolicy.eval.ruler").random is stdlib_random


# -- batch equals each prompt alone -----------------------------------------------------------------
PRESETS = {
    "keydiff": {"kv_budget": 20},
    "lagkv": {"kv_budget": 20, "lag_size": 8},
    "compactor": {"kv_budget": 24, "chunk_size": 16},
    "random": {"kv_budget": 20, "seed": 7},
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_batch_equals_each_prompt_alone(model, name):
    policy = kvpolicy.get_policy(name, **PRESETS[name])
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (90, 40, 7)]
    alone = [kvpolicy.generate(model, None, input_ids=p, policy=policy, max_new_tokens=5) for p in prompts]
    batch = kvpolicy.generate(model, None, input_ids=prompts, policy=policy, max_new_tokens=5)
    for a, b in zip(alone, batch, strict=True):
        assert b.token_ids == a.token_ids
        assert b.stats.kv_tokens_per_layer == a.stats.kv_tokens_per_layer
    again = kvpolicy.prefill(model, torch.tensor([prompts[0]]), policy)
    first = kvpolicy.prefill(model, torch.tensor([prompts[0]]), policy)
    for x, y in zip(again.cache.layers, first.cache.layers, strict=True):
        assert torch.equal(x.positions, y.positions), "the same prompt keeps the same entries"


# -- presets and settings -------------------------------------------------------------------------
def test_presets_build_their_components_with_kvpress_defaults():
    assert kvpolicy.get_policy("keydiff", kv_budget=64).cache == KeyDiff(budget=64)
    assert kvpolicy.get_policy("lagkv", kv_budget=64, lag_size=16).cache == LagKV(budget=64, lag_size=16)
    assert kvpolicy.get_policy("random", seed=2).cache == Random(seed=2)
    compactor = kvpolicy.get_policy("compactor", kv_budget=0.2, blending=0.5).cache
    assert compactor == Compactor(budget=0.2, blending=0.5)
    lag = LagKV()
    assert (lag.budget, lag.n_sink, lag.lag_size, lag.cross_scoring) == (0.1, 4, 128, False)
    c = Compactor()
    assert (c.sink_size_start, c.sink_size_end, c.chunk_size, c.sketch_dimension) == (8, 4, 256, 48)
    assert (c.blending, c.seed, c.budget) == (None, 0, 0.1)
    assert (Leverage().sketch_dimension, NonCausalAttention().chunk_size) == (48, 256)
    assert Random().seed == 0 and KeyDiff().budget == 0.1
    assert LagKV().resolved_budget(35) == 12 and Compactor().resolved_budget(35) == 20
    assert KeyDiff().resolved_budget(35) == 8 and Random(budget=5).resolved_budget(4000) == 5


BAD = [
    ("keydiff", {"budget": 0}, "budget"),
    ("lagkv", {"budget": 4}, "budget (4) must exceed n_sink (4)"),
    ("lagkv", {"lag_size": 0}, "lag_size"),
    ("lagkv", {"n_sink": -1}, "n_sink"),
    ("compactor", {"budget": 12}, "budget (12) must exceed sink_size_start + sink_size_end (12)"),
    ("compactor", {"chunk_size": 0}, "chunk_size"),
    ("compactor", {"sketch_dimension": 0}, "sketch_dimension"),
    ("compactor", {"blending": -0.5}, "blending"),
    ("compactor", {"seed": -1}, "seed"),
    ("leverage", {"sketch_dimension": 0}, "sketch_dimension"),
    ("noncausal_attention", {"chunk_size": 0}, "chunk_size"),
    ("random", {"seed": -1}, "seed"),
    ("random", {"budget": 1.5}, "budget"),
]


@pytest.mark.parametrize(("kind", "bad", "named"), BAD, ids=[f"{k}-{b}" for k, b, _ in BAD])
def test_bad_settings_name_the_value(kind, bad, named):
    with pytest.raises(PolicyConfigError) as err:
        component_from_dict({"kind": kind, **bad})
    assert named in str(err.value)
    if kind in PRESETS:
        preset = {("kv_budget" if k == "budget" else k): v for k, v in bad.items()}
        with pytest.raises(PolicyConfigError, match=kind):
            kvpolicy.get_policy(kind, **preset)


# -- the conformance suite ------------------------------------------------------------------------
class TestAgnosticScorersConformance(CachePolicyConformance):
    kvpolicy_cases = (
        ConformanceCase(KeyDiff, invalid=[{"budget": 0}, {"budget": 1.5}]),
        ConformanceCase(
            LagKV,
            budgeted=lambda budget: LagKV(budget=budget, lag_size=8),
            invalid=[{"budget": 4}, {"lag_size": 0}, {"n_sink": -1}],
            examples=[LagKV(budget=64, n_sink=2, lag_size=32, cross_scoring=True)],
        ),
        ConformanceCase(
            Leverage,
            invalid=[{"sketch_dimension": 0}, {"seed": -1}],
            examples=[Leverage(budget=32, sketch_dimension=8, seed=3, pre_rope_keys=False)],
        ),
        ConformanceCase(
            NonCausalAttention,
            budgeted=lambda budget: NonCausalAttention(budget=budget, chunk_size=32),
            invalid=[{"chunk_size": 0}],
        ),
        ConformanceCase(
            Compactor,
            budgeted=lambda budget: Compactor(budget=budget, chunk_size=32),
            invalid=[{"budget": 12}, {"blending": -1.0}, {"sink_size_end": -1}, {"sketch_dimension": 0}],
            examples=[Compactor(budget=0.3, blending=0.35, seed=1, sink_size_start=4, pre_rope_keys=False)],
        ),
        ConformanceCase(Random, invalid=[{"seed": -1}, {"budget": 0}], examples=[Random(budget=9, seed=11)]),
    )
