"""Score-refining wrappers of any key scorer (issue 29): CriticalKV / CriticalAdaKV, DefensiveKV, ChunkKV.

Each selection equals a plain-loop reference on small tensors (CriticalAdaKV against a transcription of
kvpress's ``CriticalAdaKVPress.compress``), each policy passes the conformance suite (keep-all == full,
budgets, composition with every propagation policy, graph decode == eager), a batch equals its prompts
one at a time, and the presets take ``kv_budget``.
"""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite("kvpolicy.testing")  # before importing it: detailed assertion messages
pytest_plugins = ["kvpolicy.testing"]

import math  # noqa: E402

import torch  # noqa: E402

import kvpolicy  # noqa: E402
from kvpolicy.interfaces import LayerView, PerHead, ScoresKeys  # noqa: E402
from kvpolicy.policies import TSP, AdaKV, ExpectedAttention, SnapKV  # noqa: E402
from kvpolicy.policies.chunkkv import ChunkKV, ChunkKVPreset, chunk_keep  # noqa: E402
from kvpolicy.policies.criticalkv import (  # noqa: E402
    CriticalAdaKVPreset,
    CriticalKV,
    CriticalKVPreset,
    value_output_norm,
)
from kvpolicy.policies.defensivekv import (  # noqa: E402
    DefensiveKV,
    DefensiveKVPreset,
    defensive_aggregate,
    snapkv_observation_scores,
)
from kvpolicy.registry import PolicyConfigError, get_policy, validate_settings  # noqa: E402
from kvpolicy.state import RequestState  # noqa: E402
from kvpolicy.testing import CachePolicyConformance, ConformanceCase  # noqa: E402

D_MODEL = 16


def _view(t: int = 40, seed: int = 0, kv_heads: int = 2, n_rep: int = 3, d: int = 8) -> LayerView:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, h, t, d, generator=g) for h in (n_rep * kv_heads, kv_heads, kv_heads))
    return LayerView(
        layer=0,
        num_layers=4,
        prompt_len=t,
        positions=torch.arange(t)[None],
        query=q,
        key=k,
        value=v * torch.rand(1, kv_heads, t, 1, generator=g) * 3,  # values of different norms
        scaling=d**-0.5,
        out_proj=torch.randn(D_MODEL, n_rep * kv_heads * d, generator=g),
    )


def _state(t: int = 40) -> RequestState:
    return RequestState(t, 4, None)  # type: ignore[arg-type]


def kept_sets(sel: PerHead | torch.Tensor) -> list[list[set[int]]]:
    if isinstance(sel, torch.Tensor):
        return [[set(row.tolist()) for row in head] for head in sel]
    b, h, _ = sel.indices.shape
    return [[set(sel.indices[i, j, : int(sel.counts[i, j])].tolist()) for j in range(h)] for i in range(b)]


def top(values: list[float], n: int) -> list[int]:
    """Indices of the ``n`` largest values, ties to the lower index."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[:n]


# -- naive references --------------------------------------------------------------------------------
def naive_value_norm(view: LayerView) -> list[list[list[float]]]:
    """``mean_r sum_D |W_o[:, head r] v|`` with loops."""
    _, h_kv, t, d_v = view.value.shape
    n_rep = view.query.shape[1] // h_kv
    w = view.out_proj
    out = []
    for g in range(h_kv):
        row = []
        for i in range(t):
            v = view.value[0, g, i]
            total = 0.0
            for r in range(n_rep):
                head = g * n_rep + r
                projected = [float(w[o, head * d_v : (head + 1) * d_v] @ v) for o in range(w.shape[0])]
                total += sum(abs(x) for x in projected)
            row.append(total / n_rep)
        out.append(row)
    return [out]


def naive_critical(scores: list[float], norms: list[float], count: int, first: int, eps: float) -> set[int]:
    forced = set(top(scores, first)) | {i for i, s in enumerate(scores) if s == math.inf}
    weighted = [
        math.inf if i in forced else (s + eps) * n for i, (s, n) in enumerate(zip(scores, norms, strict=True))
    ]
    return set(top(weighted, count))


def kvpress_critical_ada(
    scores: torch.Tensor, norms: torch.Tensor, n_kept: int, alpha: float, ratio: float, eps: float
) -> list[set[int]]:
    """kvpress 0.5.5 ``CriticalAdaKVPress.compress`` step by step (one sequence), returning each head's
    kept entries; ``n_safe`` at least one as kvpolicy's Ada-KV floor."""
    scores = scores.clone().float()
    _, h, t = scores.shape
    big = torch.finfo(scores.dtype).max
    n_safe = max(1, int(n_kept * alpha))
    top_indices = torch.topk(scores, n_safe, dim=-1).indices
    scores.scatter_(-1, top_indices, big)
    budget_scores = scores.reshape(1, -1)
    picked = torch.topk(budget_scores, n_kept * h, dim=-1).indices
    head_budgets = torch.zeros(h, dtype=torch.int64).scatter_add_(
        0, (picked // t).flatten(), torch.ones(n_kept * h, dtype=torch.int64)
    )
    first = (head_budgets * ratio).to(torch.int64).tolist()
    for j in range(h):
        order = top(scores[0, j].tolist(), first[j])
        scores[0, j, order] = big
    scores = (scores + eps) * norms
    kept = []
    for j in range(h):
        kept.append(set(top(scores[0, j].tolist(), int(head_budgets[j]))))
    return kept


def naive_observations(
    view: LayerView, window: int, kernel: int, pooling: str
) -> list[list[list[list[float]]]]:
    """SnapKV's per-observation scores with loops (one sequence): softmax of each window query, the prefix
    pooled with zero padding, rescaled to its mass, +inf on the window."""
    _, h_q, t, _ = view.query.shape
    h_kv = view.key.shape[1]
    n_rep = h_q // h_kv
    w = min(window, t)
    out = []
    for g in range(h_kv):
        rows = []
        for r in range(n_rep):
            for i in range(t - w, t):
                q = view.query[0, g * n_rep + r, i]
                logits = [
                    float(q @ view.key[0, g, j]) * view.scaling if j <= i else -math.inf for j in range(t)
                ]
                top_logit = max(logits)
                e = [math.exp(x - top_logit) for x in logits]
                p = [x / sum(e) for x in e][: t - w]
                pooled = []
                for j in range(t - w):
                    near = [
                        p[m] if 0 <= m < t - w else 0.0 for m in range(j - kernel // 2, j + kernel // 2 + 1)
                    ]
                    pooled.append(max(near) if pooling == "max" else sum(near) / kernel)
                scale = sum(p) / sum(pooled)
                rows.append([x * scale for x in pooled] + [math.inf] * w)
        out.append(rows)
    return [out]


def naive_defensive(obs: list[list[list[float]]]) -> list[list[float]]:
    """Per head: the max over observations, clamped at its mean over the finite entries."""
    out = []
    for rows in obs:
        worst = [max(col) for col in zip(*rows, strict=True)]
        finite = [x for x in worst if math.isfinite(x)]
        mean = sum(finite) / max(1, len(finite))
        out.append([max(x, mean) for x in worst])
    return out


def naive_chunks(scores: torch.Tensor, budget: int, length: int) -> set[int]:
    """ChunkKV: head-summed scores, chunk means (the tail its own chunk), whole chunks best first, the
    last one cut to its best tokens."""
    token = scores[0].float().sum(dim=0).tolist()
    t = len(token)
    means = {}
    for c in range(0, t, length):
        part = token[c : c + length]
        means[c // length] = sum(part) / len(part)
    order = sorted(range(t), key=lambda i: (-means[i // length], -token[i], i))
    return set(order[:budget])


# -- (a) naive references ----------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_value_output_norm_equals_loops(seed):
    view = _view(t=12, seed=seed)
    got = value_output_norm(view.value, view.out_proj, 3)
    torch.testing.assert_close(got, torch.tensor(naive_value_norm(view)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("budget", "ratio"), [(16, 0.5), (20, 0.0), (12, 1.0), (30, 0.3)])
def test_critical_selection_equals_naive(seed, budget, ratio):
    view, state = _view(seed=seed), _state()
    inner = SnapKV(budget=budget, pooling="avg")
    policy = CriticalKV(inner=inner, first_stage_ratio=ratio)
    sel = policy.select(view, state)
    assert sel.shape == (1, 2, budget) and bool((sel.diff(dim=-1) > 0).all())
    scores = inner.key_scores(view, state)
    norms = naive_value_norm(view)[0]
    want = [
        naive_critical(scores[0, h].tolist(), norms[h], budget, int(ratio * budget), 1e-4) for h in range(2)
    ]
    assert kept_sets(sel)[0] == want
    assert set(range(32, 40)) <= set(sel[0, 0].tolist()), "the window is kept"
    # key_scores is kvpress's CriticalKVPress.score: its top budget is the selection
    ranked = policy.key_scores(view, state).topk(budget, dim=-1).indices
    assert kept_sets(ranked) == kept_sets(sel)
    if ratio == 1.0:
        assert torch.equal(sel, inner.select(view, state))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    ("budget", "floor", "ratio"), [(10, 0.2, 0.5), (16, 0.5, 0.5), (8, 0.2, 0.0), (12, 0.0, 0.7)]
)
def test_critical_ada_equals_kvpress_transcription(seed, budget, floor, ratio):
    view, state = _view(t=40, seed=seed, kv_heads=4, n_rep=2), _state()
    inner = SnapKV(budget=budget, window=4, pooling="avg")
    policy = CriticalKV(inner=inner, adaptive=True, floor=floor, first_stage_ratio=ratio)
    sel = policy.select(view, state)
    assert isinstance(sel, PerHead)
    assert int(sel.counts.sum()) == 4 * budget
    want = kvpress_critical_ada(
        inner.key_scores(view, state),
        value_output_norm(view.value, view.out_proj, 2),
        budget,
        floor,
        ratio,
        1e-4,
    )
    assert kept_sets(sel)[0] == want


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(("window", "kernel", "pooling"), [(4, 5, "avg"), (8, 7, "max"), (3, 1, "max")])
def test_defensive_scores_equal_naive(seed, window, kernel, pooling):
    view, state = _view(t=24, seed=seed), _state(24)
    obs = snapkv_observation_scores(view, window, kernel, pooling)
    assert obs.shape == (1, 2, 3 * window, 24)
    want_obs = torch.tensor(naive_observations(view, window, kernel, pooling))
    torch.testing.assert_close(obs, want_obs, rtol=1e-5, atol=1e-7)
    policy = DefensiveKV(inner=SnapKV(budget=12, window=window, kernel=kernel, pooling=pooling))
    scores = policy.key_scores(view, state)
    torch.testing.assert_close(
        scores, torch.tensor([naive_defensive(o) for o in want_obs.tolist()]), rtol=1e-5, atol=1e-7
    )
    sel = policy.select(view, state)
    assert kept_sets(sel)[0] == [set(top(scores[0, h].tolist(), 12)) for h in range(2)]
    assert set(range(24 - window, 24)) <= set(sel[0, 1].tolist())


def test_defensive_aggregation_is_worst_case_with_a_floor_at_the_mean():
    obs = torch.tensor([[[[1.0, 0.0, 0.0, 5.0, math.inf], [0.0, 3.0, 0.0, 0.0, math.inf]]]])
    # maxima (1, 3, 0, 5) mean 2.25: 1 and 0 rise to it, the window stays +inf
    assert defensive_aggregate(obs).tolist() == [[[2.25, 3.0, 2.25, 5.0, math.inf]]]
    assert defensive_aggregate(torch.full((1, 1, 2, 3), math.inf)).tolist() == [[[math.inf] * 3]]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("t", "budget", "length"), [(40, 12, 5), (43, 20, 20), (37, 9, 4), (40, 20, 1)])
def test_chunk_selection_equals_naive(seed, t, budget, length):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(1, 3, t, generator=g)
    scores[..., -3:] = math.inf
    sel = chunk_keep(scores, budget, length)
    want = naive_chunks(scores, budget, length)
    assert sel.shape == (1, 3, budget) and all(s == want for s in kept_sets(sel)[0])
    assert set(range(t - 3, t)) <= want


def test_chunks_are_kept_whole():
    scores = torch.rand(1, 2, 60, generator=torch.Generator().manual_seed(3))
    sel = chunk_keep(scores, 20, 5)  # four whole chunks of five
    kept = sorted(set(sel[0, 0].tolist()))
    chunks = {i // 5 for i in kept}
    assert len(chunks) == 4 and all(set(range(5 * c, 5 * c + 5)) <= set(kept) for c in chunks)
    means = scores.sum(dim=1)[0].view(12, 5).mean(dim=-1)
    assert chunks == set(means.topk(4).indices.tolist())  # kvpress: the top chunks by mean score
    view, state = _view(t=60), _state(60)
    policy = ChunkKV(inner=SnapKV(budget=20, window=5, pooling="avg"), chunk_length=5)
    sel = policy.select(view, state)
    kept = sel[0, 0].tolist()
    chunks = {i // 5 for i in kept}
    assert torch.equal(sel[0, 0], sel[0, 1]), "every head keeps the same tokens"
    assert len(chunks) == 4 and 11 in chunks, "four whole chunks, the window's among them"
    assert all(set(range(5 * c, 5 * c + 5)) <= set(kept) for c in chunks)


# -- (b) wrapping, errors ------------------------------------------------------------------------------
def test_wrappers_take_any_scorer_and_compose():
    view, state = _view(), _state()
    for inner in (
        "snapkv",
        {"kind": "expected_attention", "budget": 16, "use_vnorm": False},
        ExpectedAttention(budget=16),
    ):
        for policy in (CriticalKV(inner=inner), CriticalKV(inner=inner, adaptive=True), ChunkKV(inner=inner)):
            assert policy.select(view, state) is not None
    # the wrappers that score keys are scorers in turn
    assert isinstance(CriticalKV(), ScoresKeys) and isinstance(DefensiveKV(), ScoresKeys)
    nested = CriticalKV(inner=DefensiveKV(inner=SnapKV(budget=16)), adaptive=True, floor=0.0)
    assert nested.select(view, state).counts.sum() == 32
    assert AdaKV(inner=CriticalKV(inner=SnapKV(budget=16))).select(view, state).counts.sum() == 32
    assert ChunkKV(inner=CriticalKV(inner=SnapKV(budget=16)), chunk_length=4).select(view, state).shape == (
        1,
        2,
        16,
    )
    with pytest.raises(ValueError, match="adaptive=True"):
        CriticalKV(adaptive=True).key_scores(view, state)


def test_missing_out_proj_is_a_clear_error():
    view = _view()
    view.out_proj = None
    with pytest.raises(ValueError, match=r"out_proj.*adapter|adapter.*out_proj"):
        CriticalKV(inner=SnapKV(budget=16)).select(view, _state())


@pytest.mark.parametrize(
    ("cls", "values", "names"),
    [
        (CriticalKV, {"epsilon": -1.0}, ["epsilon"]),
        (CriticalKV, {"first_stage_ratio": 1.5}, ["first_stage_ratio"]),
        (CriticalKV, {"floor": 2}, ["floor"]),
        (CriticalKV, {"inner": "h2o"}, ["inner=", "'h2o'", "key_scores"]),
        (CriticalKV, {"inner": "tsp"}, ["inner='tsp'", "not a cache policy"]),
        (CriticalKV, {"inner": {"kind": "snapkv", "budget": 0}}, ["inner=", "budget=0"]),
        (DefensiveKV, {"inner": "expected_attention"}, ["inner=", "observation_scores"]),
        (DefensiveKV, {"inner": "streamingllm"}, ["inner=", "key_scores"]),
        (ChunkKV, {"chunk_length": 0}, ["chunk_length=0"]),
        (ChunkKV, {"budget": 16}, ["unknown setting 'budget'"]),
    ],
)
def test_bad_settings_name_the_value(cls, values, names):
    with pytest.raises(PolicyConfigError) as err:
        validate_settings(cls, values)
    for name in names:
        assert name in str(err.value), str(err.value)
    with pytest.raises(ValueError):
        cls(**values)


# -- (c) presets ---------------------------------------------------------------------------------------
def test_presets_take_kv_budget():
    snap = SnapKV(budget=0.5)
    assert get_policy("criticalkv", kv_budget=0.5).cache == CriticalKV(inner=snap)
    assert get_policy("criticaladakv", kv_budget=0.5).cache == CriticalKV(inner=snap, adaptive=True)
    assert get_policy("chunkkv", kv_budget=0.5).cache == ChunkKV(inner=snap)
    defensive = get_policy("defensivekv", kv_budget=64).cache
    assert defensive == CriticalKV(
        inner=DefensiveKV(inner=SnapKV(budget=64, window=32, kernel=5, pooling="avg")),
        adaptive=True,
        floor=0.0,
    )
    for preset in (CriticalKVPreset, CriticalAdaKVPreset, DefensiveKVPreset, ChunkKVPreset):
        made = preset(kv_budget=0.3)
        assert preset(**{k: v for k, v in made.to_dict().items() if k != "kind"}) == made
    with pytest.raises(PolicyConfigError, match="chunk_length=0"):
        validate_settings(ChunkKVPreset, {"chunk_length": 0})


def test_presets_run_and_batch_equals_one_at_a_time(model, ids):
    prompts = [ids[0, :n].tolist() for n in (100, 57, 30)]
    policies = [get_policy(n, kv_budget=0.3) for n in ("criticalkv", "criticaladakv", "chunkkv")]
    policies.append(get_policy("defensivekv", kv_budget=0.3, window=4))
    for policy in policies:
        alone = [
            kvpolicy.generate(model, None, input_ids=p, policy=policy, max_new_tokens=5) for p in prompts
        ]
        together = kvpolicy.generate(model, None, input_ids=prompts, policy=policy, max_new_tokens=5)
        assert [o.token_ids for o in together] == [o.token_ids for o in alone], policy.name
        assert [o.stats.kv_bytes_per_layer for o in together] == [o.stats.kv_bytes_per_layer for o in alone]


def test_critical_ada_frees_memory_like_adakv(model, ids):
    ours = kvpolicy.compose(cache=CriticalKV(inner=SnapKV(budget=24), adaptive=True))
    pre = kvpolicy.prefill(model, ids, ours)
    heads = pre.cache.kv_head_lengths(0)
    assert [sum(h) for h in heads] == [2 * 24] * 4
    assert any(len(set(h)) > 1 for h in heads), heads
    out = kvpolicy.generate(model, None, input_ids=ids, policy=ours, max_new_tokens=4)
    assert out.stats.kv_tokens_per_layer == [24] * 4


def test_composes_with_tsp(model, ids):
    for cache in (
        CriticalKV(inner=SnapKV(budget=24), adaptive=True),
        ChunkKV(inner=SnapKV(budget=24)),
        DefensiveKV(inner=SnapKV(budget=24)),
    ):
        policy = kvpolicy.compose(propagation=TSP(layer=1, rate=0.5), cache=cache)
        out = kvpolicy.generate(model, None, input_ids=ids, policy=policy, max_new_tokens=4)
        assert out.stats.tokens_per_layer == [100, 100, 50, 50] and len(out.token_ids) == 4


# -- (d) the conformance suite -------------------------------------------------------------------------
class TestWrappersConformance(CachePolicyConformance):
    kvpolicy_cases = (
        ConformanceCase(
            CriticalKV,
            budgeted=lambda b: CriticalKV(inner=SnapKV(budget=b)),
            invalid=[{"epsilon": -1.0}, {"first_stage_ratio": 2.0}, {"inner": "h2o"}],
            examples=[CriticalKV(inner=ExpectedAttention(budget=32, use_vnorm=False), epsilon=0.0)],
        ),
        ConformanceCase(
            CriticalKV,
            id="critical-ada",
            budgeted=lambda b: CriticalKV(inner=SnapKV(budget=b), adaptive=True),
            invalid=[{"floor": -0.1}],
            examples=[CriticalKV(inner="snapkv", adaptive=True, floor=0.0)],
            ragged=True,
        ),
        ConformanceCase(
            DefensiveKV,
            budgeted=lambda b: DefensiveKV(inner=SnapKV(budget=b, pooling="avg")),
            invalid=[{"inner": "expected_attention"}],
        ),
        ConformanceCase(
            ChunkKV,
            budgeted=lambda b: ChunkKV(inner=SnapKV(budget=b), chunk_length=6),
            invalid=[{"chunk_length": 0}, {"inner": "pyramidkv"}],
            examples=[ChunkKV(inner=ExpectedAttention(budget=0.2))],
        ),
    )
