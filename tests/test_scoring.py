"""The vectorised scoring equals a naive reference computation on small tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kvpolicy
from kvpolicy.interfaces import LayerView
from kvpolicy.policies import TSP, SnapKV
from kvpolicy.scoring import keep_top_and_window, snapkv_scores, window_attention
from kvpolicy.state import RequestState


def naive_window_scores(q, k, window, scaling, kernel, pooling):
    """Methods.md steps 1-5 done the obvious way: repeat keys, full causal matrix, loops."""
    b, hq, t, _d = q.shape
    hkv = k.shape[1]
    rep = hq // hkv
    kr = k.repeat_interleave(rep, dim=1)
    full = (q.float() @ kr.float().transpose(-1, -2)) * scaling  # (B, Hq, T, T)
    full = full.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    probs = full.softmax(-1)[:, :, t - window :, :]  # last window queries
    summed = probs.sum(2)[..., : t - window]  # (B, Hq, P)
    pool = F.max_pool1d if pooling == "max" else F.avg_pool1d
    pooled = pool(summed.reshape(b * hq, 1, -1), kernel, 1, kernel // 2).view(b, hq, -1)
    out = torch.zeros(b, hkv, t - window)
    for h in range(hq):
        out[:, h // rep] += pooled[:, h]
    return out


def naive_keep(scores, keep, window):
    p = scores.shape[-1]
    rows = []
    for row in scores.reshape(-1, p):
        top = sorted(row.argsort(descending=True)[: keep - window].tolist())
        rows.append(top + list(range(p, p + window)))
    return torch.tensor(rows).view(*scores.shape[:-1], keep)


@pytest.mark.parametrize("pooling", ["max", "avg"])
@pytest.mark.parametrize("window", [1, 4, 8])
def test_window_scores_match_naive(pooling, window):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 6, 40, 16, generator=g), torch.randn(2, 2, 40, 16, generator=g)
    attn = window_attention(q, k, window, 0.25)
    assert attn.shape == (2, 2, 3, 40)
    mine = snapkv_scores(attn, window, 7, pooling)
    ref = naive_window_scores(q, k, window, 0.25, 7, pooling)
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-6)


def test_window_attention_is_causal_inside_window():
    q, k = torch.randn(1, 2, 10, 4), torch.randn(1, 2, 10, 4)
    attn = window_attention(q, k, 4, 1.0)
    # Only the last query sees the last key; each query's probabilities sum to one.
    last_key = attn[..., -1]
    single = (q[:, :, -1:] @ k.transpose(-1, -2)).softmax(-1)[..., -1]
    torch.testing.assert_close(last_key, single.view(1, 2, 1))
    torch.testing.assert_close(attn.sum(-1), torch.full((1, 2, 1), 4.0))


def test_keep_top_and_window_matches_naive():
    scores = torch.rand(2, 3, 30, generator=torch.Generator().manual_seed(3))
    idx = keep_top_and_window(scores, 12, 4)
    assert torch.equal(idx, naive_keep(scores, 12, 4))
    assert bool((idx.diff(dim=-1) > 0).all())


def _view(t=40, layer=0, prompt_len=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, h, t, 8, generator=g) for h in (6, 2, 2))
    return LayerView(
        layer=layer,
        num_layers=4,
        prompt_len=prompt_len or t,
        positions=torch.arange(t)[None],
        query=q,
        key=k,
        value=v,
        scaling=8**-0.5,
    )


def assert_valid_top(idx, scores, keep, window):
    """``idx`` keeps the window and a top-(keep - window) set of ``scores`` (ties in any order)."""
    p = scores.shape[-1]
    assert idx.shape[-1] == keep
    assert idx[..., -window:].tolist() == torch.arange(p, p + window).expand(*idx.shape[:-1], window).tolist()
    chosen = scores.gather(-1, idx[..., :-window])
    mask = torch.ones_like(scores, dtype=torch.bool).scatter(-1, idx[..., :-window], False)
    worst_chosen = chosen.min(-1).values
    best_left = scores.masked_fill(~mask, float("-inf")).max(-1).values
    assert bool((worst_chosen >= best_left - 1e-6).all())


def test_snapkv_select_matches_naive_per_kv_head():
    view = _view()
    state = RequestState(40, 4, None)  # type: ignore[arg-type]
    idx = SnapKV(budget=16, pooling="avg").select(view, state)
    ref = naive_keep(naive_window_scores(view.query, view.key, 8, view.scaling, 7, "avg"), 16, 8)
    assert idx is not None and idx.shape == (1, 2, 16)
    assert torch.equal(idx, ref)
    # Max-pooling creates ties between neighbours: any top set is right.
    idx = SnapKV(budget=16).select(view, state)
    assert_valid_top(idx, naive_window_scores(view.query, view.key, 8, view.scaling, 7, "max"), 16, 8)


def test_tsp_ranking_sums_kv_heads_and_keeps_window():
    view = _view(layer=1)
    decision = TSP(layer=1, rate=0.5, pooling="avg").propagate(view, RequestState(40, 4, None))  # type: ignore[arg-type]
    scores = naive_window_scores(view.query, view.key, 8, view.scaling, 7, "avg").sum(1)
    assert decision is not None
    assert torch.equal(decision.indices, naive_keep(scores, 20, 8))
    assert decision.indices[0, -1].item() == 39  # the last prompt token always survives


def test_tsp_only_fires_at_its_layer_and_default_layer():
    state = RequestState(40, 4, None)  # type: ignore[arg-type]
    assert TSP(layer=2).propagate(_view(layer=1), state) is None
    assert TSP().resolved_layer(32) == 15  # reference: layer 15 of 32 for Llama-3.1-8B
    assert TSP().resolved_layer(30) == 14


def test_budget_fraction_resolves_against_prompt_length_not_tokens_present():
    # After TSP only 30 of 80 prompt tokens are present; a 0.25 budget keeps int(80 * 0.25) = 20
    # (above the 2 * window floor of 16; int(30 * 0.25) would be 7, floored to 16).
    view = _view(t=30, prompt_len=80)
    idx = SnapKV(budget=0.25).select(view, RequestState(80, 4, None))  # type: ignore[arg-type]
    assert idx is not None and idx.shape[-1] == 20


def test_short_input_is_not_compressed():
    state = RequestState(40, 4, None)  # type: ignore[arg-type]
    assert SnapKV(budget=64).select(_view(t=40), state) is None
    assert SnapKV(budget=8).select(_view(t=5), state) is None  # shorter than the window
    assert TSP(layer=0, length=64).propagate(_view(t=40), state) is None


def test_tsp_floor_keeps_at_least_min_keep():
    state = RequestState(40, 4, None)  # type: ignore[arg-type]
    decision = TSP(layer=0, rate=0.1, min_keep=16).propagate(_view(t=40), state)
    assert decision is not None and decision.indices.shape == (1, 16)
    assert TSP(layer=0, rate=0.1, min_keep=64).propagate(_view(t=40), state) is None
    # fastkv: a token KV budget is the floor, a fractional one is not.
    assert kvpolicy.get_policy("fastkv", kv_budget=512).propagation.min_keep == 512
    assert kvpolicy.get_policy("fastkv", kv_budget=0.5).propagation.min_keep is None
