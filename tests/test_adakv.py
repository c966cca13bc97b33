"""Ada-KV: head-adaptive budgets over a scoring policy (policies/adakv.py).

The allocation equals a plain-Python reference, keeps the layer's total and every head's floor and
window, is SnapKV itself at ``floor = 1``, frees real memory (ragged per-head counts, same total as
SnapKV), composes with TSP, and passes the conformance suite.
"""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite("kvpolicy.testing")  # before importing it: detailed assertion messages
pytest_plugins = ["kvpolicy.testing"]

import torch  # noqa: E402
from test_engine import NoHostSync  # noqa: E402
from test_scoring import assert_valid_top, naive_window_scores  # noqa: E402

import kvpolicy  # noqa: E402
from kvpolicy.interfaces import LayerView, PerHead, ScoresKeys  # noqa: E402
from kvpolicy.policies import H2O, TSP, PyramidKV, SnapKV, StreamingLLM  # noqa: E402
from kvpolicy.policies.adakv import AdaKV, AdaSnapKVPreset, adaptive_allocation, floor_count  # noqa: E402
from kvpolicy.registry import PolicyConfigError, validate_settings  # noqa: E402
from kvpolicy.state import RequestState  # noqa: E402
from kvpolicy.testing import CachePolicyConformance, ConformanceCase  # noqa: E402

BUDGET = 24
WINDOW = 8


def ada(budget: int | float = BUDGET, floor: float = 0.2, **snapkv: object) -> AdaKV:
    return AdaKV(inner=SnapKV(budget=budget, **snapkv), floor=floor)  # type: ignore[arg-type]


def _view(t: int = 40, seed: int = 0, kv_heads: int = 2) -> LayerView:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, h, t, 8, generator=g) for h in (3 * kv_heads, kv_heads, kv_heads))
    return LayerView(
        layer=0,
        num_layers=4,
        prompt_len=t,
        positions=torch.arange(t)[None],
        query=q,
        key=k,
        value=v,
        scaling=8**-0.5,
    )


def _state(t: int = 40) -> RequestState:
    return RequestState(t, 4, None)  # type: ignore[arg-type]


def kept_sets(sel: PerHead) -> list[list[set[int]]]:
    """Each (row, head)'s kept entries: its first ``counts`` indices."""
    b, h, _ = sel.indices.shape
    return [[set(sel.indices[i, j, : int(sel.counts[i, j])].tolist()) for j in range(h)] for i in range(b)]


# -- (a) the allocation equals a plain-Python reference --------------------------------------------
def naive_allocation(scores: torch.Tensor, budget: int, floor: float) -> list[list[set[int]]]:
    """Ada-KV as the paper states it, with loops: each head's own top ``int(floor * budget)`` (at
    least one), then the best remaining entries over all heads until the layer holds ``H * budget``."""
    _, h, t = scores.shape
    out = []
    for row in scores.tolist():
        if budget >= t:
            out.append([set(range(t)) for _ in range(h)])
            continue
        base = min(budget, max(1, int(floor * budget)))
        kept = [set(sorted(range(t), key=lambda i, s=s: -s[i])[:base]) for s in row]
        rest = sorted(
            ((row[j][i], j, i) for j in range(h) for i in range(t) if i not in kept[j]), key=lambda e: -e[0]
        )
        for _score, j, i in rest[: h * budget - h * base]:
            kept[j].add(i)
        out.append(kept)
    return out


def random_scores(b: int, h: int, t: int, window: int, seed: int) -> torch.Tensor:
    """Random scores with a different spread per head (so counts adapt), ``+inf`` on the window."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.rand(b, h, 1, generator=g) * 4
    scores = (torch.randn(b, h, t, generator=g) * spread).softmax(-1)
    if window:
        scores[..., t - window :] = float("inf")
    return scores


CASES = [(1, 2, 30, 12, 4), (2, 4, 50, 16, 8), (1, 8, 17, 5, 2), (3, 3, 40, 39, 0), (1, 2, 20, 25, 4)]


@pytest.mark.parametrize("floor", [0.01, 0.2, 0.5, 0.9, 1.0])
@pytest.mark.parametrize(("b", "h", "t", "budget", "window"), CASES)
def test_allocation_equals_naive_reference(b, h, t, budget, window, floor):
    for seed in range(3):
        scores = random_scores(b, h, t, window, seed)
        sel = adaptive_allocation(scores, budget, floor)
        assert kept_sets(sel) == naive_allocation(scores, budget, floor)


# -- (b) totals, floors, window, layout ------------------------------------------------------------
@pytest.mark.parametrize("floor", [0.05, 0.2, 0.5])
@pytest.mark.parametrize(("b", "h", "t", "budget", "window"), CASES[:4])
def test_allocation_invariants(b, h, t, budget, window, floor):
    scores = random_scores(b, h, t, window, seed=7)
    sel = adaptive_allocation(scores, budget, floor)
    base = floor_count(budget, floor)
    assert sel.indices.dtype == torch.long and sel.counts.shape == (b, h)
    assert sel.indices.shape[-1] == min(t, h * budget - (h - 1) * base)  # the most one head can get
    assert sel.counts.sum(-1).tolist() == [h * budget] * b  # the layer's total is the uniform one
    assert int(sel.counts.min()) >= max(base, window)  # every head: its floor and its window
    for i in range(b):
        for j in range(h):
            n = int(sel.counts[i, j])
            kept = sel.indices[i, j, :n]
            assert bool((kept.diff() > 0).all()), "kept entries in position order, no repeats"
            assert set(range(t - window, t)) <= set(kept.tolist()), "the window is kept on every head"
            # a head keeps its own top n: nothing dropped scores above anything kept
            dropped = torch.ones(t, dtype=torch.bool).index_fill(0, kept, False)
            if bool(dropped.any()):
                assert float(scores[i, j, kept].min()) >= float(scores[i, j, dropped].max())


def test_allocation_adapts_to_concentration():
    # Head 0 concentrates on 3 keys, head 1 spreads evenly: head 1 gets the shared budget.
    scores = torch.full((1, 2, 40), 0.01)
    scores[0, 0, :3] = 1.0
    scores[0, 1] = torch.linspace(0.5, 0.4, 40)
    sel = adaptive_allocation(scores, 10, 0.2)
    assert sel.counts.tolist() == [[3, 17]]
    assert kept_sets(sel)[0][0] == {0, 1, 2}


def test_allocation_keeps_everything_when_the_budget_covers_the_tokens():
    sel = adaptive_allocation(torch.rand(2, 3, 10), 10, 0.2)
    assert sel.counts.tolist() == [[10] * 3] * 2
    assert sel.indices.tolist() == [[list(range(10))] * 3] * 2


def test_allocation_never_syncs_with_the_host():
    scores = random_scores(2, 4, 64, 8, seed=0)
    with NoHostSync():
        sel = adaptive_allocation(scores, 16, 0.2)
    assert int(sel.counts.sum()) == 2 * 4 * 16


def test_prefill_cache_holds_the_allocation(model, ids):
    policy = kvpolicy.compose(cache=ada())
    pre = kvpolicy.prefill(model, ids, policy)
    heads = model.config.num_key_value_heads
    for layer in pre.cache.layers:
        counts = layer.row_lengths(0)
        assert sum(counts) == heads * BUDGET and min(counts) >= WINDOW, counts
        pos = layer.positions[0]
        for h, n in enumerate(counts):
            assert set(range(100 - WINDOW, 100)) <= set(pos[h, :n].tolist())


# -- (c) floor = 1 is SnapKV -----------------------------------------------------------------------
@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_floor_one_is_snapkv_token_for_token(model, ids, pooling):
    snap = kvpolicy.compose(cache=SnapKV(budget=BUDGET, pooling=pooling))
    ours = kvpolicy.compose(cache=ada(floor=1.0, pooling=pooling))
    want = kvpolicy.generate(model, None, input_ids=ids, policy=snap, max_new_tokens=12)
    got = kvpolicy.generate(model, None, input_ids=ids, policy=ours, max_new_tokens=12)
    assert got.token_ids == want.token_ids
    a, b = kvpolicy.prefill(model, ids, snap), kvpolicy.prefill(model, ids, ours)
    for la, lb in zip(a.cache.layers, b.cache.layers, strict=True):
        assert la.row_lengths(0) == lb.row_lengths(0) == [BUDGET] * 2
        assert torch.equal(la.positions, lb.positions)


def test_floor_one_allocation_keeps_snapkvs_entries():
    """The allocation itself (not the floor-1 shortcut in select) on SnapKV's scores: each head keeps
    its own top budget, SnapKV's selection (exactly under avg pooling; max pooling ties neighbours,
    so there any equally-scored top set is right)."""
    for seed in range(4):
        view, state = _view(seed=seed), _state()
        for pooling in ("avg", "max"):
            snap = SnapKV(budget=16, pooling=pooling)
            sel = adaptive_allocation(snap.key_scores(view, state), 16, 1.0)
            assert sel.counts.tolist() == [[16, 16]]
            idx = sel.indices[..., :16]
            if pooling == "avg":
                assert torch.equal(idx, snap.select(view, state))
            else:
                ref = naive_window_scores(view.query, view.key, 8, view.scaling, 7, "max")
                assert_valid_top(idx, ref, 16, 8)


def test_snapkv_key_scores_are_its_selection_scores():
    view, state = _view(), _state()
    scores = SnapKV(pooling="avg").key_scores(view, state)
    assert scores.shape == (1, 2, 40)
    assert bool(torch.isinf(scores[..., -8:]).all()) and bool(torch.isfinite(scores[..., :-8]).all())
    ref = naive_window_scores(view.query, view.key, 8, view.scaling, 7, "avg")
    group = view.query.shape[1] // view.key.shape[1]
    # Means over the window's 8 queries and the group's query heads (kvpress's scale): the sums / 8g.
    torch.testing.assert_close(scores[..., :-8], ref / (8 * group), rtol=1e-5, atol=1e-6)
    short = SnapKV().key_scores(_view(t=5), _state(5))  # shorter than the window: all always kept
    assert short.shape == (1, 2, 5) and bool(torch.isinf(short).all())


def test_scoring_protocol():
    assert isinstance(SnapKV(), ScoresKeys)
    for other in (H2O(), StreamingLLM(), PyramidKV(), ada()):
        assert not isinstance(other, ScoresKeys), other


# -- memory: the same total as SnapKV, split differently ------------------------------------------
def test_same_kv_memory_as_snapkv_distributed_differently(model, ids):
    snap = kvpolicy.compose(cache=SnapKV(budget=BUDGET))
    ours = kvpolicy.compose(cache=ada())
    a = kvpolicy.generate(model, None, input_ids=ids, policy=snap, max_new_tokens=4).stats
    b = kvpolicy.generate(model, None, input_ids=ids, policy=ours, max_new_tokens=4).stats
    assert b.kv_bytes_per_layer == a.kv_bytes_per_layer  # same entries per layer: same bytes
    assert b.kv_tokens_per_layer == a.kv_tokens_per_layer == [BUDGET] * 4  # the mean over heads
    heads_a = kvpolicy.prefill(model, ids, snap).cache.kv_head_lengths(0)
    heads_b = kvpolicy.prefill(model, ids, ours).cache.kv_head_lengths(0)
    assert [sum(h) for h in heads_b] == [sum(h) for h in heads_a] == [2 * BUDGET] * 4
    assert all(len(set(h)) == 1 for h in heads_a)
    assert any(len(set(h)) > 1 for h in heads_b), f"the heads should keep different counts: {heads_b}"


def test_batch_equals_each_prompt_alone(model, ids):
    policy = kvpolicy.compose(cache=ada(budget=0.3))
    prompts = [ids[0, :n].tolist() for n in (100, 57, 30)]
    alone = [kvpolicy.generate(model, None, input_ids=p, policy=policy, max_new_tokens=6) for p in prompts]
    together = kvpolicy.generate(model, None, input_ids=prompts, policy=policy, max_new_tokens=6)
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert [o.stats.kv_bytes_per_layer for o in together] == [o.stats.kv_bytes_per_layer for o in alone]


# -- (d) composition with TSP ----------------------------------------------------------------------
def test_composes_with_tsp(model, ids):
    policy = kvpolicy.compose(propagation=TSP(layer=1, rate=0.5), cache=ada())
    out = kvpolicy.generate(model, None, input_ids=ids, policy=policy, max_new_tokens=8)
    assert len(out.token_ids) == 8
    assert out.stats.tokens_per_layer == [100, 100, 50, 50]
    pre = kvpolicy.prefill(model, ids, policy)
    for layer in pre.cache.layers:
        counts = layer.row_lengths(0)
        assert sum(counts) == 2 * BUDGET and min(counts) >= WINDOW
        assert int(layer.positions.max()) < 100
    # the preset's policy behaves the same
    preset = AdaSnapKVPreset(kv_budget=BUDGET).build()
    assert preset.cache == ada()
    assert kvpolicy.generate(model, None, input_ids=ids, policy=preset, max_new_tokens=4).token_ids


# -- (f) bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("values", "names"),
    [
        ({"floor": 0}, ["floor=0"]),
        ({"floor": 0.0}, ["floor=0.0"]),
        ({"floor": 1.5}, ["floor=1.5"]),
        ({"floor": -0.2}, ["floor=-0.2"]),
        ({"inner": H2O()}, ["inner=", "H2O", "'h2o'", "key_scores"]),
        ({"inner": "h2o"}, ["inner=", "'h2o'", "key_scores"]),
        ({"inner": {"kind": "pyramidkv"}}, ["inner=", "PyramidKV", "key_scores"]),
        ({"inner": "tsp"}, ["inner='tsp'", "not a cache policy"]),
        ({"inner": "nope"}, ["inner=", "'nope'"]),
        ({"inner": {"kind": "snapkv", "budget": 0}}, ["inner=", "budget=0"]),
        ({"inner": SnapKV(), "budget": 16}, ["unknown setting 'budget'"]),
    ],
)
def test_bad_settings_name_the_value(values, names):
    with pytest.raises(PolicyConfigError) as err:
        validate_settings(AdaKV, values)
    for name in names:
        assert name in str(err.value), str(err.value)
    with pytest.raises(ValueError):
        AdaKV(**values)


def test_preset_settings_validate_and_round_trip():
    with pytest.raises(PolicyConfigError, match="floor=2"):
        validate_settings(AdaSnapKVPreset, {"floor": 2})
    preset = AdaSnapKVPreset(kv_budget=0.2, window=4, kernel=5, pooling="avg", floor=0.5)
    assert preset.build().cache == AdaKV(
        inner=SnapKV(budget=0.2, window=4, kernel=5, pooling="avg"), floor=0.5
    )
    assert AdaSnapKVPreset(**{k: v for k, v in preset.to_dict().items() if k != "kind"}) == preset


def test_inner_given_by_kind_or_dict():
    assert AdaKV(inner="snapkv") == AdaKV() == AdaKV(inner={"kind": "snapkv"})
    policy = ada(budget=0.3, floor=0.4)
    data = policy.to_dict()
    assert data == {"kind": "ada", "inner": SnapKV(budget=0.3).to_dict(), "floor": 0.4}
    assert AdaKV(**{k: v for k, v in data.items() if k != "kind"}) == policy


# -- (e) the conformance suite ---------------------------------------------------------------------
def _expected(policy: AdaKV, length: int, layer: int, num_layers: int) -> int:
    """The inner budget on average per KV head (ragged: the suite compares the mean over heads)."""
    return min(length, policy.resolved_budget(length))


class TestAdaKVConformance(CachePolicyConformance):
    kvpolicy_cases = (
        ConformanceCase(
            AdaKV,
            budgeted=lambda budget: ada(budget),
            invalid=[
                {"floor": 0},
                {"floor": 1.5},
                {"inner": "h2o"},
                {"inner": {"kind": "snapkv", "budget": 0}},
            ],
            examples=[ada(64, floor=0.5, window=16, kernel=5, pooling="avg"), AdaKV()],
            expected_kv=_expected,
            ragged=True,
        ),
        ConformanceCase(
            AdaKV,
            id="ada-floor1",
            budgeted=lambda budget: ada(budget, floor=1.0),
            expected_kv=_expected,
        ),
    )
