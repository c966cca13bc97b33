"""TOVA and CAKE cache policies: scoring against naive references, budgets, decode-time eviction,
batches, compositions, settings, and kvpolicy's conformance suite (tiny random Llama)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama
from torch.overrides import TorchFunctionMode

import kvpolicy
import kvpolicy.generation
from kvpolicy.adapters.base import decode_view
from kvpolicy.cache import PagedLayer, paged_attention
from kvpolicy.interfaces import CachePolicy, Evict, LayerView
from kvpolicy.policies import TSP, FullCache
from kvpolicy.policies.cake import (
    CAKE,
    CAKEPreset,
    cake_layer_budget,
    cake_preference,
    cake_scores,
    window_attention_rows,
)
from kvpolicy.policies.tova import TOVA, TOVAPreset, tova_last_query_attention, tova_scores
from kvpolicy.registry import PolicyConfigError, get_registry, validate_settings
from kvpolicy.state import RequestState

pytest.register_assert_rewrite("kvpolicy.testing")  # before importing it: detailed assertion messages
pytest_plugins = ["kvpolicy.testing"]
pytestmark = pytest.mark.usefixtures("single_thread")

from kvpolicy.testing import (  # noqa: E402
    BUDGETS,
    CachePolicyConformance,
    ConformanceCase,
    _check_layer,
    _num_layers,
    _tokens,
)


def make_view(t=40, layer=0, num_layers=4, seed=0, prompt_len=None, heads=(6, 2), d=8) -> LayerView:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads[0], t, d, generator=g)
    k = torch.randn(1, heads[1], t, d, generator=g)
    return LayerView(
        layer=layer,
        num_layers=num_layers,
        prompt_len=prompt_len or t,
        positions=torch.arange(t)[None],
        query=q,
        key=k,
        value=k.clone(),
        scaling=d**-0.5,
    )


def naive_probs(q: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
    """Full causal attention ``(B, H_q, T, T)`` in float64, keys repeated to every query head."""
    kr = k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    t = q.shape[2]
    s = (q.double() @ kr.transpose(-1, -2)) * scaling
    return s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)


def held_positions(lc: PagedLayer, head: int, b: int = 0) -> list[int]:
    n = int(lc.lengths[b, head])
    return sorted(lc.dense(lc.pos_pool)[b, head, :n].tolist())


def prompts(lengths=(90, 40, 120, 7)) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 128, (n,), generator=g).tolist() for n in lengths]


class NoHostSync(TorchFunctionMode):
    """Fails on any call that reads a tensor's values back to the host (as tests/test_engine.py)."""

    SYNCING = frozenset({"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.SYNCING:
            raise AssertionError(f"host sync in a decode step: Tensor.{func.__name__}")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def captured(monkeypatch):
    """The :class:`~kvpolicy.generation.Prefill` of each ``kvpolicy.generate`` call (its batch and
    cache after the decode loop ran), to look at the cache ``generate`` decoded with."""
    seen: list[Any] = []
    original = kvpolicy.generation._prefill

    def spy(*args, **kwargs):
        pre = original(*args, **kwargs)
        seen.append(pre)
        return pre

    monkeypatch.setattr(kvpolicy.generation, "_prefill", spy)
    return seen


# == TOVA: scoring ==================================================================================
def naive_tova_scores(q: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
    """The official ``TOVACache.reduce``: the last query's attention, averaged over all query heads."""
    return naive_probs(q, k, scaling)[:, :, -1, :].mean(dim=1)  # (B, T)


def test_tova_scores_match_naive_head_average():
    view = make_view(t=30)
    mine = tova_scores(tova_last_query_attention(view.query, view.key, view.scaling))
    assert mine.shape == (1, 30) and mine.dtype == torch.float32
    torch.testing.assert_close(mine.double(), naive_tova_scores(view.query, view.key, view.scaling))
    # the view's shared window-1 attention is the same input
    torch.testing.assert_close(tova_scores(view.window_attention(1)), mine)


def test_tova_select_is_one_shared_top_k_on_every_kv_head():
    view = make_view(t=30, seed=4)
    idx = TOVA(budget=12).select(view, RequestState(30, 4))
    naive = naive_tova_scores(view.query, view.key, view.scaling)[0]
    want = sorted(naive.argsort(descending=True)[:12].tolist())
    assert idx.shape == (1, 2, 12)
    assert idx[0, 0].tolist() == idx[0, 1].tolist() == want
    assert TOVA(budget=30).select(view, RequestState(30, 4)) is None  # budget >= tokens: keep all


def paged_decode(policy, state, view, idx, steps, seed=0, block_size=4):
    """Drive ``policy.on_decode`` over a real paged cache the way the engine does (append, attend,
    view, evict in place). Yields ``(step, q, k, layer)`` after each step."""
    g = torch.Generator().manual_seed(seed)
    keys = view.key.gather(2, idx[..., None].expand(-1, -1, -1, view.key.shape[-1]))
    pos = view.positions[:, None, :].expand(-1, view.num_kv_heads, -1).gather(2, idx)
    lc = PagedLayer(block_size)
    lc.store([(keys[0], keys[0], pos[0], None)], reserve=2)
    for step in range(steps):
        q = torch.randn(1, view.query.shape[1], 1, keys.shape[-1], generator=g)
        k = torch.randn(1, view.num_kv_heads, 1, keys.shape[-1], generator=g)
        lc.append(k, k, torch.tensor([view.prompt_len + step]))
        _, probs = paged_attention(q, lc, view.scaling, want_probs=True)
        dv = decode_view(lc, 0, view.layer, view.num_layers, view.prompt_len, step, q, probs, view.scaling)
        decision = policy.on_decode(dv, state)
        if decision is not None:
            assert isinstance(decision, Evict)
            lc.evict(decision.slots)
        yield step, q, k, lc


def test_tova_decode_eviction_matches_naive_multi_state():
    view = make_view(t=30, seed=5)
    policy, state = TOVA(budget=12), RequestState(30, 4)
    idx = policy.select(view, state)
    rep = view.query.shape[1] // view.num_kv_heads
    keys = {p: view.key[0, :, p] for p in range(30)}  # position -> (H_kv, d)
    held = idx[0, 0].tolist()
    for step, q, k, lc in paged_decode(policy, state, view, idx, 25, seed=5):
        keys[30 + step] = k[0, :, 0]
        held.append(30 + step)
        # naive: each query head's softmax over the held keys of its KV head, averaged over all heads
        score = torch.zeros(len(held), dtype=torch.float64)
        for j in range(q.shape[1]):
            kh = torch.stack([keys[p][j // rep] for p in held]).double()
            score += (q[0, j, 0].double() @ kh.T * view.scaling).softmax(-1)
        if len(held) > 12:
            del held[int(score.argmin())]
        for h in range(view.num_kv_heads):
            assert held_positions(lc, h) == sorted(held), f"step {step}, KV head {h}"


def test_tova_may_evict_the_newest_entry_as_the_official_reduce_does():
    """The official ``reduce`` ranks every key, the just-appended one included."""
    view = make_view(t=20, seed=1)
    policy, state = TOVA(budget=8), RequestState(20, 4)
    idx = policy.select(view, state)
    g = torch.Generator().manual_seed(0)
    lc = PagedLayer(4)
    keys = view.key.gather(2, idx[..., None].expand(-1, -1, -1, 8))
    lc.store([(keys[0], keys[0], idx[0], None)], reserve=2)
    q = torch.randn(1, 6, 1, 8, generator=g)
    k = -10 * q.view(1, 2, 3, 8).sum(2, keepdim=True)  # (1, H_kv, 1, d): against its group's queries
    lc.append(k, k, torch.tensor([20]))
    _, probs = paged_attention(q, lc, view.scaling, want_probs=True)
    dv = decode_view(lc, 0, 0, 4, 20, 0, q, probs, view.scaling)
    decision = policy.on_decode(dv, state)
    assert decision.slots[0, :, 0].tolist() == [8, 8]  # the new entry's slot, on both heads


# == TOVA: on the tiny model ========================================================================
@pytest.mark.parametrize(("budget", "kept"), [(24, 24), (0.5, 50), (0.1, 16), (100, 100), (300, 100)])
def test_tova_prefill_holds_the_budget_on_every_head(model, ids, budget, kept):
    pre = kvpolicy.prefill(model, ids, kvpolicy.compose(cache=TOVA(budget=budget)))
    assert pre.cache.kv_head_lengths() == [[kept, kept]] * 4
    for layer in pre.cache.layers:
        assert layer.positions[0, 0].tolist() == layer.positions[0, 1].tolist()  # one shared selection


def test_tova_generate_keeps_the_cache_at_budget(model, ids, captured):
    policy = kvpolicy.compose(cache=TOVA(budget=24))
    out = kvpolicy.generate(model, None, input_ids=ids, policy=policy, max_new_tokens=12)
    assert len(out.token_ids) == 12
    assert out.stats.kv_tokens_per_layer == [24] * 4  # after prefill
    (pre,) = captured
    assert pre.cache.kv_head_lengths() == [[24, 24]] * 4  # after 11 decode steps, each adding one
    assert pre.cache.get_seq_length() == 100 + 11
    for layer in pre.cache.layers:
        assert layer.positions[0, 0].tolist() == layer.positions[0, 1].tolist()


def test_tova_stays_at_budget_every_decode_step(model, ids):
    policy = kvpolicy.compose(cache=TOVA(budget=24))
    pre = kvpolicy.prefill(model, ids, policy, reserve=30)
    adapter = kvpolicy.get_adapter(model)
    token = pre.next_token
    for step in range(30):
        token = adapter.decode_step(token, policy, pre.batch, step).argmax(dim=-1, keepdim=True)
        assert pre.cache.kv_head_lengths() == [[24, 24]] * 4
    pre.batch.raise_deferred(policy.cache)


def test_tova_grows_to_its_budget_then_stays(model, ids, captured):
    """A prompt shorter than the budget is kept whole; the multi-state then fills up to the budget."""
    out = kvpolicy.generate(
        model, None, input_ids=ids[:, :20], policy=kvpolicy.compose(cache=TOVA(budget=25))
    )
    assert out.stats.kv_tokens_per_layer == [20] * 4
    assert captured[0].cache.kv_head_lengths() == [[25, 25]] * 4


def test_tova_without_decode_eviction_grows_by_one_a_step(model, ids, captured):
    kvpolicy.generate(
        model,
        None,
        input_ids=ids,
        policy=kvpolicy.compose(cache=TOVA(budget=24, evict_during_decode=False)),
        max_new_tokens=12,
    )
    assert captured[0].cache.kv_head_lengths() == [[24 + 11, 24 + 11]] * 4
    assert not TOVA(evict_during_decode=False).evicts_during_decode and TOVA().evicts_during_decode


def test_tova_decode_step_never_syncs_with_the_host(model):
    policy = kvpolicy.compose(cache=TOVA(budget=0.3))  # a fraction: each row's own budget
    batch = [torch.tensor(p) for p in prompts((90, 40))]
    pre = kvpolicy.prefill(model, batch, policy, reserve=20)
    adapter = kvpolicy.get_adapter(model)
    token = pre.logits.argmax(dim=-1, keepdim=True)
    with NoHostSync():
        for step in range(20):
            token = adapter.decode_step(token, policy, pre.batch, step).argmax(dim=-1, keepdim=True)
    pre.batch.raise_deferred(policy.cache)
    assert pre.cache.kv_head_lengths(0) == [[27, 27]] * 4  # int(90 * 0.3)
    assert pre.cache.kv_head_lengths(1) == [[16, 16]] * 4  # int(40 * 0.3) = 12, floored at 16


def test_tova_compiled_decode_equals_eager(monkeypatch):
    """The decode step with TOVA's eviction compiles whole (fullgraph) and is reused across steps."""
    from torch._dynamo.utils import counters

    from kvpolicy.generation import compiled_decode_step

    monkeypatch.setattr(kvpolicy.generation, "COMPILE_BACKEND", "eager")  # graph capture, no codegen
    torch._dynamo.reset()
    try:
        model = tiny_llama()  # a fresh adapter: its compiled step starts empty
        ids = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(1))
        policy = kvpolicy.compose(cache=TOVA(budget=20))
        eager = kvpolicy.generate(model, None, input_ids=ids, policy=policy, max_new_tokens=30)
        compiled = kvpolicy.generate(
            model, None, input_ids=ids, policy=policy, max_new_tokens=30, compile=True
        )
        assert compiled.token_ids == eager.token_ids
        before = counters["frames"]["ok"]
        pre = kvpolicy.prefill(model, ids, policy, reserve=30)
        step_fn, token = compiled_decode_step(kvpolicy.get_adapter(model)), pre.next_token
        for step in range(30):
            token = step_fn(token, policy, pre.batch, step).argmax(-1, keepdim=True)
        assert counters["frames"]["ok"] == before
        assert pre.cache.kv_head_lengths() == [[20, 20]] * 4
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize(
    "cache",
    [
        TOVA(budget=20),
        TOVA(budget=0.3),
        TOVA(budget=20, evict_during_decode=False),
        CAKE(budget=20, window=8),
    ],
    ids=["tova-20", "tova-0.3", "tova-prefill-only", "cake-20"],
)
def test_batch_equals_each_prompt_alone(model, cache):
    policy = kvpolicy.compose(cache=cache)
    batch = prompts()
    alone = [kvpolicy.generate(model, None, input_ids=p, policy=policy, max_new_tokens=12) for p in batch]
    together = kvpolicy.generate(model, None, input_ids=batch, policy=policy, max_new_tokens=12)
    for a, b in zip(alone, together, strict=True):
        assert b.token_ids == a.token_ids
        assert b.stats.kv_tokens_per_layer == a.stats.kv_tokens_per_layer
        assert b.stats.kv_bytes_per_layer == a.stats.kv_bytes_per_layer


def test_tova_batch_caches_equal_each_prompt_alone(model, captured):
    policy = kvpolicy.compose(cache=TOVA(budget=0.3))
    batch = prompts()
    for p in batch:
        kvpolicy.generate(model, None, input_ids=p, policy=policy, max_new_tokens=12)
    kvpolicy.generate(model, None, input_ids=batch, policy=policy, max_new_tokens=12)
    together = captured[-1]
    order = sorted(range(len(batch)), key=lambda i: -len(batch[i]))  # generate groups by length
    for row, i in enumerate(order):
        alone = captured[i].cache
        assert together.cache.kv_head_lengths(row) == alone.kv_head_lengths()
        for la, lb in zip(alone.layers, together.cache.layers, strict=True):
            n = la.lengths[0, 0]
            pa = sorted(la.dense(la.pos_pool)[0, 0, :n].tolist())
            pb = sorted(lb.dense(lb.pos_pool)[row, 0, :n].tolist())
            assert pa == pb


# == both: keep-all, TSP ============================================================================
@pytest.mark.parametrize(
    "cache",
    [
        TOVA(budget=1.0, evict_during_decode=False),
        TOVA(budget=100, evict_during_decode=False),
        TOVA(budget=200),  # above prompt plus output: never evicts while decoding either
        CAKE(budget=1.0),
        CAKE(budget=100, window=8),
    ],
    ids=["tova-1.0", "tova-100", "tova-200-evicting", "cake-1.0", "cake-100"],
)
def test_keep_all_settings_reproduce_full_kv(model, ids, cache):
    full = kvpolicy.generate(model, None, input_ids=ids, policy=kvpolicy.compose(), max_new_tokens=20)
    ours = kvpolicy.generate(
        model, None, input_ids=ids, policy=kvpolicy.compose(cache=cache), max_new_tokens=20
    )
    assert ours.token_ids == full.token_ids
    assert ours.stats.kv_tokens_per_layer == [100] * 4


def test_tova_composes_with_tsp(model, ids, captured):
    tsp = TSP(layer=1, rate=0.5)
    out = kvpolicy.generate(
        model, None, input_ids=ids, policy=kvpolicy.compose(tsp, TOVA(budget=24)), max_new_tokens=12
    )
    assert out.stats.tokens_per_layer == [100, 100, 50, 50]
    assert out.stats.kv_tokens_per_layer == [24] * 4
    assert captured[-1].cache.kv_head_lengths() == [[24, 24]] * 4
    # a budget between the propagated count and the prompt: layers the cut reached keep all of theirs
    out = kvpolicy.generate(
        model, None, input_ids=ids, policy=kvpolicy.compose(tsp, TOVA(budget=60)), max_new_tokens=4
    )
    assert out.stats.kv_tokens_per_layer == [60, 60, 50, 50]
    keep_all = TOVA(budget=1.0, evict_during_decode=False)
    assert _tokens(model, ids, kvpolicy.compose(tsp, keep_all), 12) == _tokens(
        model, ids, kvpolicy.compose(tsp, FullCache()), 12
    )


def test_cake_composes_with_tsp(model, ids):
    tsp = TSP(layer=1, rate=0.5)
    policy = kvpolicy.compose(tsp, CAKE(budget=24, window=8))
    pre = kvpolicy.prefill(model, ids, policy)
    kept = [heads[0] for heads in pre.cache.kv_head_lengths()]
    assert all(len(set(heads)) == 1 for heads in pre.cache.kv_head_lengths())
    assert kept == oracle_cake_counts(model, ids, CAKE(budget=24, window=8), tsp)
    assert all(8 <= n <= seen for n, seen in zip(kept, [100, 100, 50, 50], strict=True))
    assert len(_tokens(model, ids, policy, 4)) == 4
    keep_all = CAKE(budget=1.0, window=8)
    assert _tokens(model, ids, kvpolicy.compose(tsp, keep_all), 12) == _tokens(
        model, ids, kvpolicy.compose(tsp, FullCache()), 12
    )


# == CAKE: scoring ==================================================================================
def naive_cake(q: torch.Tensor, k: torch.Tensor, scaling: float, window: int, tau1, tau2, gamma, kernel=5):
    """The official ``llama_attn_forward_cake`` transcribed (keys repeated, full causal matrix, float64),
    one sequence at a time: the preference score and the eviction indicator ``(H_kv, T - w)``."""
    probs = naive_probs(q, k, scaling)[:, :, -window:, :]  # (B, H_q, w, T)
    prefs, scores = [], []
    for b in range(q.shape[0]):
        attn = probs[b : b + 1]
        prefix = attn[..., :-window]
        disp = -torch.sum(prefix * torch.log(prefix + 1e-10))
        var = torch.var(prefix, dim=-2).sum()
        prefs.append(disp ** (1 / tau1) * var ** (1 / tau2))
        cache = (attn.mean(dim=-2) + gamma * attn.var(dim=-2))[..., :-window]
        cache = F.avg_pool1d(cache, kernel_size=kernel, padding=kernel // 2, stride=1)
        scores.append(cache.reshape(1, k.shape[1], q.shape[1] // k.shape[1], -1).mean(dim=-2)[0])
    return torch.stack(prefs), torch.stack(scores)


@pytest.mark.parametrize("window", [2, 4, 8])
def test_cake_scores_and_preference_match_the_reference(window):
    g = torch.Generator().manual_seed(window)
    q, k = torch.randn(2, 6, 40, 16, generator=g), torch.randn(2, 2, 40, 16, generator=g)
    attn = window_attention_rows(q, k, window, 0.25)
    assert attn.shape == (2, 2, 3, window, 40)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 2, 3, window))
    pref, ref_scores = naive_cake(q, k, 0.25, window, 1.6, 0.4, 200.0)
    torch.testing.assert_close(cake_preference(attn, window, 1.6, 0.4), pref, rtol=1e-4, atol=0)
    mine = cake_scores(attn, window, 200.0, 5)
    assert mine.shape == (2, 2, 40 - window)
    torch.testing.assert_close(mine.double(), ref_scores, rtol=1e-4, atol=1e-6)


def test_cake_one_query_window_has_no_temporal_shift():
    q, k = torch.randn(1, 4, 10, 8), torch.randn(1, 2, 10, 8)
    attn = window_attention_rows(q, k, 1, 0.3)
    assert cake_preference(attn, 1, 1.0, 1.0).tolist() == [0.0]
    torch.testing.assert_close(cake_scores(attn, 1, 200.0, 1), attn[..., 0, :9].mean(2))


def test_cake_layer_budget_worked_examples():
    # preferences 1, 3, 1, 1 over 40 entries: 40/4; then 30 * 3/7; then 18 * 1/(1 + 5/3); the rest
    prefs, spent, got = [1.0, 3.0, 1.0, 1.0], 0, []
    for layer in range(4):
        b = cake_layer_budget(prefs[: layer + 1], spent, 40, 4, 100)
        got.append(b)
        spent += b
    assert got == [10, 12, 6, 12]
    # a layer asking for more than it can hold is capped, the rest goes on
    prefs, spent, got = [1.0, 100.0, 1.0], 0, []
    for layer in range(3):
        b = cake_layer_budget(prefs[: layer + 1], spent, 30, 3, 12)
        got.append(b)
        spent += b
    assert got == [10, 12, 8]
    # the later layers must still be able to hold the rest: a low preference cannot leave too much
    assert cake_layer_budget([1.0, 0.0], 12, 30, 3, 12) == 6  # 18 left, the last layer holds 12
    assert cake_layer_budget([0.0], 0, 30, 3, 12) == 10  # no dispersion anywhere: an even split


@pytest.mark.parametrize("seed", range(20))
def test_cake_layer_budgets_sum_to_the_total(seed):
    g = torch.Generator().manual_seed(seed)
    layers = int(torch.randint(1, 12, (1,), generator=g))
    cap = int(torch.randint(1, 60, (1,), generator=g))
    total = int(torch.randint(0, layers * cap + 1, (1,), generator=g))
    prefs = (torch.rand(layers, generator=g, dtype=torch.float64) ** 4 * 1e3).tolist()
    spent, got = 0, []
    for layer in range(layers):
        b = cake_layer_budget(prefs[: layer + 1], spent, total, layers, cap)
        assert 0 <= b <= cap
        got.append(b)
        spent += b
    assert sum(got) == total
    if len(set(prefs)) == 1 or layers == 1:
        assert max(got) - min(got) <= 1


def test_cake_equal_preferences_give_every_layer_the_average():
    prefs, spent = [2.5] * 8, 0
    for layer in range(8):
        b = cake_layer_budget(prefs[: layer + 1], spent, 8 * 56, 8, 500)
        assert b == 56
        spent += b


def test_cake_select_matches_naive_layer_by_layer():
    policy, state = CAKE(budget=16, window=4, tau1=1.6, tau2=0.4, gamma=200.0), RequestState(40, 4)
    prefs, spent, total = [], 0, 4 * (16 - 4)
    kept = 0
    for layer in range(4):
        view = make_view(t=40, layer=layer, seed=10 + layer)
        idx = policy.select(view, state)
        pref, scores = naive_cake(view.query, view.key, view.scaling, 4, 1.6, 0.4, 200.0)
        prefs.append(float(pref[0]))
        b = cake_layer_budget(prefs, spent, total, 4, 40 - 4)
        spent += b
        assert idx.shape == (1, 2, b + 4)
        for h in range(2):
            want = [*sorted(scores[0, h].argsort(descending=True)[:b].tolist()), 36, 37, 38, 39]
            assert idx[0, h].tolist() == want, f"layer {layer}, KV head {h}"
        kept += idx.shape[-1]
    assert kept == 4 * 16
    # a new request (layer 0 again) starts afresh
    again = policy.select(make_view(t=40, layer=0, seed=10), state)
    assert again.shape[-1] == 16 - 4 + 4  # layer 0 always gets the average (no other layer seen)


# == CAKE: on the tiny model ========================================================================
class _Record(CachePolicy):
    """Test policy: keeps everything and records each layer's view (in the request's scratch)."""

    kind = "record_views_test"

    def select(self, view: LayerView, state: RequestState) -> None:
        state.scratch(self)[view.layer] = view
        return None


def oracle_cake_counts(model, ids, policy: CAKE, propagation=None) -> list[int]:
    """Entries per KV head each layer should keep: the layers' views under ``propagation`` recorded
    with a keep-everything policy, scored the reference's way (:func:`naive_cake`), budgets from
    :func:`cake_layer_budget` allocated against the prompt length, each layer capped at its tokens."""
    recorder = _Record()
    composed = kvpolicy.compose(propagation, recorder) if propagation else kvpolicy.compose(cache=recorder)
    pre = kvpolicy.prefill(model, ids, composed)
    views = pre.state.scratch(recorder)
    length, layers = ids.shape[-1], len(views)
    average = policy.resolved_budget(length)
    if length <= average:
        return [views[i].num_tokens for i in range(layers)]
    prefs, spent, counts = [], 0, []
    for i in range(layers):
        view = views[i]
        window = min(policy.window, view.num_tokens)
        pref, _ = naive_cake(
            view.query, view.key, view.scaling, window, policy.tau1, policy.tau2, policy.gamma
        )
        prefs.append(float(pref[0]) if window < view.num_tokens else 0.0)
        b = cake_layer_budget(
            prefs, spent, layers * (average - policy.window), layers, length - policy.window
        )
        spent += b
        counts.append(min(b + window, view.num_tokens))
    return counts


@pytest.mark.parametrize("budget", [24, 40, 0.3, 60])
def test_cake_prefill_budgets_sum_to_the_total(model, ids, budget):
    policy = CAKE(budget=budget, window=8)
    pre = kvpolicy.prefill(model, ids, kvpolicy.compose(cache=policy))
    heads = pre.cache.kv_head_lengths()
    kept = [h[0] for h in heads]
    assert all(len(set(h)) == 1 for h in heads)  # per-layer budgets, the same on each KV head
    assert sum(kept) == 4 * policy.resolved_budget(100)
    assert kept == oracle_cake_counts(model, ids, policy)
    for layer in pre.cache.layers:  # the window is always kept
        for h in range(2):
            assert set(range(92, 100)) <= set(layer.positions[0, h].tolist())


def test_cake_budgets_follow_layer_preferences(model, ids):
    """A layer with a higher preference than the running mean gets more than the average, and the
    default temperatures and window resolve against the prompt (fraction floored at 2 x 32)."""
    pre = kvpolicy.prefill(model, ids, kvpolicy.compose(cache=CAKE(budget=0.3, window=8, tau1=0.2)))
    kept = [h[0] for h in pre.cache.kv_head_lengths()]
    assert sum(kept) == 4 * 30 and len(set(kept)) > 1
    default = kvpolicy.prefill(model, ids, kvpolicy.compose(cache=CAKE()))
    assert sum(h[0] for h in default.cache.kv_head_lengths()) == 4 * 64


def test_cake_composes_with_a_restart(model, ids):
    """GemFilter reruns the model on the tokens it kept: CAKE allocates over the second pass."""
    from kvpolicy.policies import GemFilter

    policy = kvpolicy.compose(GemFilter(keep=60, layer=1), CAKE(budget=24, window=8))
    pre = kvpolicy.prefill(model, ids, policy)
    kept = [h[0] for h in pre.cache.kv_head_lengths()]
    assert sum(kept) == 4 * 24 and all(n <= 60 for n in kept)


# == settings ==========================================================================================
@pytest.mark.parametrize(
    ("cls", "values", "words"),
    [
        (TOVA, {"budget": 0}, ["budget=0"]),
        (TOVA, {"budget": 1.5}, ["budget=1.5"]),
        (TOVA, {"budget": True}, ["budget=True"]),
        (TOVA, {"evict_during_decode": "sometimes"}, ["evict_during_decode='sometimes'"]),
        (CAKE, {"window": 1}, ["window=1"]),
        (CAKE, {"kernel": 4}, ["kernel must be odd", "4"]),
        (CAKE, {"tau1": 0.0}, ["tau1=0.0"]),
        (CAKE, {"tau2": -1.0}, ["tau2=-1.0"]),
        (CAKE, {"gamma": -2.0}, ["gamma=-2.0"]),
        (CAKE, {"budget": 16}, ["window (32)", "budget (16)"]),
        (CAKE, {"budget": 0.0}, ["budget=0.0"]),
        (TOVAPreset, {"kv_budget": 0}, ["kv_budget=0"]),
        (CAKEPreset, {"tau1": -1.0}, ["tau1=-1.0"]),
    ],
)
def test_bad_settings_name_the_value(cls, values, words):
    with pytest.raises(PolicyConfigError) as err:
        validate_settings(cls, values)
    for word in words:
        assert word in str(err.value), str(err.value)


def test_cake_preset_refuses_a_budget_below_its_window():
    preset = CAKEPreset(kv_budget=16, window=32)
    with pytest.raises(ValueError, match=r"window \(32\) is larger than the budget \(16\)"):
        preset.build()


def test_presets_build_their_policies():
    tova = TOVAPreset(kv_budget=64).build()
    assert tova.cache == TOVA(budget=64) and tova.cache.evict_during_decode
    cake = CAKEPreset(kv_budget=256, tau1=1.6, tau2=0.4).build()
    assert cake.cache == CAKE(budget=256, tau1=1.6, tau2=0.4)
    assert (cake.cache.window, cake.cache.kernel, cake.cache.gamma) == (32, 5, 200.0)  # the reference's


def test_tova_and_cake_are_registered():
    """Fails until policies/__init__.py registers the components and presets."""
    registry = get_registry()
    for kind, component, preset in (("tova", TOVA, TOVAPreset), ("cake", CAKE, CAKEPreset)):
        assert registry.components[kind].obj is component
        assert registry.presets[kind].obj is preset


# == the conformance suite ==========================================================================
class TestTOVAConformance(CachePolicyConformance):
    kvpolicy_cases = (
        ConformanceCase(
            TOVA,
            # decode eviction keeps the cache at a budget the prompt plus its output outgrows
            keep_all=TOVA(budget=1.0, evict_during_decode=False),
            invalid=[{"budget": 0}, {"budget": 1.5}, {"budget": True}, {"evict_during_decode": "sometimes"}],
            examples=[TOVA(budget=64, evict_during_decode=False), TOVA(budget=0.25)],
        ),
        ConformanceCase(
            TOVA,
            id="tova-prefill-only",
            budgeted=lambda budget: TOVA(budget=budget, evict_during_decode=False),
            keep_all=TOVA(budget=1.0, evict_during_decode=False),
        ),
    )


class TestCAKEConformance(CachePolicyConformance):
    """CAKE's per-layer budgets depend on the attention, so the two budget checks compare against
    :func:`oracle_cake_counts` (the reference's scores on the same views) instead of a schedule."""

    kvpolicy_cases = (
        ConformanceCase(
            CAKE,
            budgeted=lambda budget: CAKE(budget=budget, window=8),
            invalid=[
                {"budget": 0},
                {"budget": 1.5},
                {"window": 1},
                {"kernel": 4},
                {"tau1": 0},
                {"tau2": -0.5},
                {"gamma": -1},
                {"budget": 8, "window": 32},
            ],
            examples=[CAKE(), CAKE(budget=1024, window=32, tau1=1.6, tau2=0.4, gamma=100.0, kernel=7)],
        ),
    )

    @pytest.mark.parametrize("budget", BUDGETS, ids=[f"budget={b}" for b in BUDGETS])
    def test_budget_per_layer_and_kv_head(self, kvpolicy_case, kvpolicy_model, kvpolicy_prompt, budget):
        policy = kvpolicy_case.make_budgeted(budget)
        composed = kvpolicy.compose(cache=policy)
        length = kvpolicy_prompt.shape[1]
        pre = kvpolicy.prefill(kvpolicy_model, kvpolicy_prompt, composed, reserve=4)
        kv_heads = kvpolicy_model.config.num_key_value_heads
        want = oracle_cake_counts(kvpolicy_model, kvpolicy_prompt, policy)
        kept = [
            _check_layer(layer, i, kv_heads, length, repr(policy)) for i, layer in enumerate(pre.cache.layers)
        ]
        assert kept == want, f"{policy!r} keeps {kept} entries per layer, expected {want}"
        assert sum(kept) == len(kept) * min(length, policy.resolved_budget(length))
        adapter = kvpolicy.get_adapter(kvpolicy_model)
        token = pre.next_token
        for step in range(3):
            token = adapter.decode_step(token, composed, pre.state, step).argmax(dim=-1, keepdim=True)
        assert pre.cache.get_seq_length() == length + 3
        assert pre.cache.kv_lengths == [n + 3 for n in kept]

    def test_composes_with_propagation(
        self, kvpolicy_case, kvpolicy_propagation, kvpolicy_model, kvpolicy_prompt
    ):
        prop_cls = get_registry().components[kvpolicy_propagation].obj
        settings = dict(kvpolicy_case.propagation_settings.get(kvpolicy_propagation, {}))
        try:
            prop = prop_cls(**settings)
            prop.check_model(_num_layers(kvpolicy_model))
        except ValueError as exc:
            pytest.skip(f"propagation {kvpolicy_propagation!r} does not build with its defaults ({exc})")
        keep_all = kvpolicy_case.make_keep_all()
        full = _tokens(kvpolicy_model, kvpolicy_prompt, kvpolicy.compose(prop, FullCache()))
        assert _tokens(kvpolicy_model, kvpolicy_prompt, kvpolicy.compose(prop, keep_all)) == full
        policy = kvpolicy_case.make_budgeted(24)
        composed = kvpolicy.compose(prop, policy)
        pre = kvpolicy.prefill(kvpolicy_model, kvpolicy_prompt, composed)
        kv_heads = kvpolicy_model.config.num_key_value_heads
        want = oracle_cake_counts(kvpolicy_model, kvpolicy_prompt, policy, prop)
        for i, layer in enumerate(pre.cache.layers):
            seen = pre.state.tokens_per_layer[i]
            n = _check_layer(layer, i, kv_heads, seen, f"{policy!r} after {prop!r}")
            assert n == want[i], f"{policy!r} after {prop!r}: layer {i} keeps {n}, expected {want[i]}"
        assert sum(want) <= len(want) * 24
        assert _tokens(kvpolicy_model, kvpolicy_prompt, composed, new_tokens=4)


def test_fraction_budgets_resolve_with_their_floors():
    """``int(L * r)``, but never below TOVA's 16 entries or CAKE's ``2 * window``, never above ``L``."""
    assert TOVA(budget=0.1).resolved_budget(35) == 16 and TOVA(budget=0.1).resolved_budget(12) == 12
    assert TOVA(budget=0.25).resolved_budget(1000) == 250
    assert CAKE(budget=0.1).resolved_budget(1000) == 100 and CAKE(budget=0.1).resolved_budget(300) == 64
