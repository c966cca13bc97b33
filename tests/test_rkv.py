"""R-KV (decode-time redundancy-aware compression): its score against a transcription of the official
code, decode-time compression on a paged cache against a naive simulation, the cache bound and graph
replay over a long generation on the tiny model, batches, settings, and the conformance suite."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import kvpolicy
from kvpolicy.adapters.base import decode_view
from kvpolicy.cache import PagedLayer, paged_attention
from kvpolicy.graphs import graph_decode_step
from kvpolicy.interfaces import Evict, LayerView, ScoresKeys
from kvpolicy.policies.rkv import RKV, RKVPreset, rkv_evict, rkv_redundancy, rkv_scores
from kvpolicy.registry import get_registry
from kvpolicy.state import RequestState

pytest.register_assert_rewrite("kvpolicy.testing")  # before importing it: detailed assertion messages
pytest_plugins = ["kvpolicy.testing"]
pytestmark = pytest.mark.usefixtures("single_thread")

from kvpolicy.testing import CachePolicyConformance, ConformanceCase  # noqa: E402


# == a transcription of the official code ===========================================================
def reference_final_score(
    q: torch.Tensor,
    k: torch.Tensor,
    window: int,
    kernel: int = 7,
    mix_lambda: float = 0.07,
    threshold: float = 0.5,
    quirk: bool = True,
) -> torch.Tensor:
    """``R1KV.update_kv``'s ``final_score`` ``(H_kv, T - w)`` (github.com/Zefan-Cai/R-KV,
    ``rkv/compression/r1_kv.py`` with ``rkv/utils.py``), float64, one sequence whose cache is in
    position order (as it is before the reference's first compression).

    ``q``: ``(1, H_q, T, d)``, of which the last ``window`` rows observe (the reference's query cache);
    ``k``: ``(1, H_kv, T, d)``. ``quirk=False`` leaves a key with no similar neighbour alone instead of
    zeroing its similarity to entry 0 (the reference's ``max`` over a zero-filled index tensor)."""
    qw, kk = q[:, :, -window:].double(), k.double()
    b, h_q, w, d = qw.shape
    h_kv, t = kk.shape[1], kk.shape[2]
    # compute_attention_scores(pooling="max"): raw logits, max over the query group
    logits = qw.view(b, h_kv, h_q // h_kv, w, d) @ kk.unsqueeze(2).transpose(3, 4) / math.sqrt(d)
    logits = logits.max(dim=2).values
    attn = F.softmax(logits[:, :, -window:, :-window], dim=-1).mean(dim=-2)
    attn = F.max_pool1d(attn, kernel_size=kernel, padding=kernel // 2, stride=1)
    # cal_similarity(retain_direction="last")
    key = kk[0]
    unit = key / (key.norm(dim=-1, keepdim=True) + 1e-8)
    sim = unit @ unit.transpose(-1, -2)
    for h in range(h_kv):
        sim[h].fill_diagonal_(0.0)
    mask = sim > threshold
    idx = torch.where(mask, torch.arange(t), torch.zeros_like(mask, dtype=torch.long))
    retain = idx.max(dim=-1).values
    for h in range(h_kv):
        for i in range(t):
            if quirk or mask[h, i].any():
                sim[h, i, retain[h, i]] = 0.0
    redundancy = sim.mean(dim=1).softmax(dim=-1)[:, :-window]
    return (attn[0] * mix_lambda - redundancy * (1 - mix_lambda)).float()


def reference_keep(q, k, budget, window, **kw) -> list[list[int]]:
    """Per KV head, the sorted token indices the reference keeps: top ``budget - window`` plus the window."""
    final = reference_final_score(q, k, window, **kw)
    t = k.shape[2]
    return [
        sorted(final[h].topk(budget - window).indices.tolist() + list(range(t - window, t)))
        for h in range(k.shape[1])
    ]


def make_view(t=40, seed=0, heads=(6, 2), d=8, keys=None) -> LayerView:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads[0], t, d, generator=g)
    k = torch.randn(1, heads[1], t, d, generator=g) if keys is None else keys
    return LayerView(
        layer=0,
        num_layers=4,
        prompt_len=t,
        positions=torch.arange(t)[None],
        query=q,
        key=k,
        value=k.clone(),
        scaling=d**-0.5,
    )


def clustered_keys(t=40, h=2, d=8, seed=0) -> torch.Tensor:
    """Keys in near-duplicate groups of 2-4 (every key has a neighbour above 0.5, so the reference's
    fallback never fires), in shuffled order."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(h, t // 3 + 1, d, generator=g)
    group = torch.randint(0, base.shape[1], (h, t), generator=g)
    group[:, : base.shape[1]] = torch.arange(base.shape[1])  # every group used ...
    group[:, base.shape[1] : 2 * base.shape[1]] = torch.arange(base.shape[1])  # ... at least twice
    group = group[:, torch.randperm(t, generator=g)]
    keys = base.gather(1, group[..., None].expand(-1, -1, d)) + 0.05 * torch.randn(h, t, d, generator=g)
    return keys[None]


# == scoring ========================================================================================
@pytest.mark.parametrize("window", [4, 8])
def test_scores_match_the_official_final_score(window):
    view = make_view(t=40, seed=window, keys=clustered_keys(seed=window))
    mine = rkv_scores(
        view.query[:, :, -window:],
        view.key,
        view.positions[:, None].expand(-1, 2, -1),
        view.scaling,
        window,
        0.07,
        7,
        0.5,
    )
    assert mine.shape == (1, 2, 40) and mine.dtype == torch.float32
    assert torch.isinf(mine[..., -window:]).all()
    ref = reference_final_score(view.query, view.key, window)  # the literal reference, quirk included
    torch.testing.assert_close(mine[0, :, :-window], ref, rtol=1e-4, atol=1e-6)


def test_scores_match_the_reference_on_random_keys_without_its_fallback():
    """Random keys: some have no neighbour above the threshold, where R-KV here spares nobody."""
    view = make_view(t=50, seed=7)
    mine = RKV(budget=20).key_scores(view, RequestState(50, 4))
    ref = reference_final_score(view.query, view.key, 8, quirk=False)
    torch.testing.assert_close(mine[0, :, :-8], ref, rtol=1e-4, atol=1e-6)
    # the fallback does fire here: the literal reference differs
    assert not torch.allclose(mine[0, :, :-8], reference_final_score(view.query, view.key, 8), atol=1e-7)


@pytest.mark.parametrize(("budget", "window", "mix_lambda"), [(20, 8, 0.07), (12, 4, 0.5), (30, 8, 0.3)])
def test_prefill_keeps_what_the_reference_keeps(budget, window, mix_lambda):
    view = make_view(t=48, seed=budget, keys=clustered_keys(t=48, seed=budget))
    idx = RKV(budget=budget, window=window, mix_lambda=mix_lambda).select(view, RequestState(48, 4))
    assert idx.shape == (1, 2, budget)
    assert idx[0].tolist() == reference_keep(view.query, view.key, budget, window, mix_lambda=mix_lambda)
    assert RKV(budget=48).select(view, RequestState(48, 4)) is None  # the prompt fits: keep it whole


def test_redundancy_spares_the_newest_of_near_duplicates():
    """Three copies of one key (positions 1 < 4 < 6) among orthogonal keys: the oldest copy is the most
    redundant, the newest not at all (each copy spares its most recent duplicate)."""
    g = torch.Generator().manual_seed(0)
    keys = torch.linalg.qr(torch.randn(8, 8, generator=g)).Q.T[None, None]  # 8 orthonormal keys
    keys[0, 0, 4] = keys[0, 0, 6] = keys[0, 0, 1]
    red = rkv_redundancy(keys, torch.arange(8)[None, None], 0.5)[0, 0]
    assert red[1] > red[4] > red[6]
    torch.testing.assert_close(red[6], red[0])  # the newest copy counts as a distinct key
    torch.testing.assert_close(red.sum(), torch.tensor(1.0))


def test_redundancy_in_row_chunks_equals_one_pass():
    keys, pos = clustered_keys(t=37)[:, :, :, :], torch.arange(37)[None, None].expand(1, 2, -1)
    torch.testing.assert_close(rkv_redundancy(keys, pos, 0.5, chunk=5), rkv_redundancy(keys, pos, 0.5))


def test_scores_follow_entries_not_slots():
    """Decode-time slots are in no particular order and may be empty: permuting the slots permutes the
    scores, and empty slots change nothing (pooling and "most recent" follow positions)."""
    view = make_view(t=30, seed=3, keys=clustered_keys(t=30, seed=3))
    pos = view.positions[:, None].expand(-1, 2, -1)
    args = (view.scaling, 8, 0.07, 7, 0.5)
    q = view.query[:, :, -8:]
    base = rkv_scores(q, view.key, pos, *args)
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(1))
    keys = torch.cat([view.key[:, :, perm], torch.randn(1, 2, 5, 8)], dim=2)  # 5 empty slots at the end
    positions = torch.cat([pos[..., perm], torch.full((1, 2, 5), -1)], dim=-1)
    shuffled = rkv_scores(q, keys, positions, *args)
    torch.testing.assert_close(shuffled[..., :30], base[..., perm])
    assert torch.isinf(shuffled[..., 30:]).all()


def test_evict_frees_each_heads_excess_lowest_first():
    scores = torch.tensor([[[0.3, 0.1, float("inf"), 0.2, 0.5], [0.1, 0.2, 0.3, 0.4, float("inf")]]])
    slots = rkv_evict(scores, torch.tensor([[5, 3]]), 2, 3)
    assert slots.tolist() == [[[1, 3, 0], [0, -1, -1]]]
    assert rkv_evict(scores, torch.tensor([[5, 3]]), torch.tensor([[9]]), 3).eq(-1).all()


def test_is_a_key_scorer():
    policy = RKV(budget=20)
    assert isinstance(policy, ScoresKeys)
    assert policy.resolved_budget(1000) == 20
    assert policy.resolved_budget(10) == 20  # a token budget is exact (a prompt below it is kept whole)
    assert RKV(budget=0.1).resolved_budget(1000) == 100 and RKV(budget=0.1).resolved_budget(50) == 16


# == decode-time compression on a paged cache =======================================================
def naive_decode(view, budget, window, buffer, steps, seed, mix_lambda=0.07):
    """The R-KV decode loop over plain tensors: held positions per KV head in position order, every
    ``buffer`` steps the reference's score over the held entries and the last ``window`` queries
    (no fallback), keeping the top ``budget - window`` plus the window. Also drives the policy over a
    real paged cache the way the engine does and yields both after every step."""
    g = torch.Generator().manual_seed(seed)
    policy, state = (
        RKV(budget=budget, window=window, buffer=buffer, mix_lambda=mix_lambda),
        RequestState(view.prompt_len, 4),
    )
    idx = policy.select(view, state)
    if idx is None:  # the prompt fits: kept whole
        idx = torch.arange(view.num_tokens).expand(1, view.num_kv_heads, -1)
    keys = {p: view.key[0, :, p] for p in range(view.num_tokens)}  # position -> (H_kv, d)
    queries = [view.query[0, :, p] for p in range(view.num_tokens)]  # (H_q, d) each
    held = [sorted(idx[0, h].tolist()) for h in range(view.num_kv_heads)]
    lc = PagedLayer(4)
    kept = view.key.gather(2, idx[..., None].expand(-1, -1, -1, view.key.shape[-1]))
    lc.store([(kept[0], kept[0], idx[0], None)], reserve=buffer)
    d = view.key.shape[-1]
    for step in range(steps):
        q = torch.randn(1, view.query.shape[1], 1, d, generator=g)
        k = torch.randn(1, view.num_kv_heads, 1, d, generator=g)
        pos = view.prompt_len + step
        keys[pos], queries = k[0, :, 0], [*queries, q[0, :, 0]]
        lc.append(k, k, torch.tensor([pos]))
        _, probs = paged_attention(q, lc, view.scaling, want_probs=True)
        dv = decode_view(lc, 0, 0, 4, view.prompt_len, step, q, probs, view.scaling)
        decision = policy.on_decode(dv, state)
        if decision is not None:
            assert isinstance(decision, Evict)
            lc.evict(decision.slots)
        for h in range(view.num_kv_heads):
            held[h].append(pos)
            if (step + 1) % buffer == 0 and len(held[h]) > budget:
                kh = torch.stack([keys[p][h] for p in held[h]])[None, None]
                group = view.query.shape[1] // view.num_kv_heads
                qh = torch.stack(queries[-window:], dim=1)[h * group : (h + 1) * group][None]
                final = reference_final_score(qh, kh, window, mix_lambda=mix_lambda, quirk=False)[0]
                top = final.topk(budget - window).indices.tolist()
                held[h] = sorted([held[h][i] for i in top] + held[h][-window:])
        yield step, held, lc


@pytest.mark.parametrize(("budget", "window", "buffer"), [(12, 4, 5), (16, 8, 8), (10, 4, 1)])
def test_decode_compression_matches_naive_simulation(budget, window, buffer):
    view = make_view(t=30, seed=budget)
    for step, held, lc in naive_decode(view, budget, window, buffer, 3 * buffer + 4, seed=budget):
        for h in range(2):
            n = int(lc.lengths[0, h])
            mine = sorted(lc.dense(lc.pos_pool)[0, h, :n].tolist())
            assert mine == held[h], f"step {step}, KV head {h}"
        compressed = (step + 1) % buffer == 0
        assert lc.lengths.tolist() == [[budget + (0 if compressed else (step + 1) % buffer)] * 2]


def test_a_prompt_shorter_than_the_window_fills_the_query_ring():
    view = make_view(t=3, seed=2)
    for step, held, lc in naive_decode(view, 10, 4, 6, 20, seed=2):
        for h in range(2):
            n = int(lc.lengths[0, h])
            assert sorted(lc.dense(lc.pos_pool)[0, h, :n].tolist()) == held[h], f"step {step}"


# == on the tiny model ==============================================================================
def decode_lengths(model, ids, policy, steps, graphs=False):
    """Greedy tokens and each step's entries per layer and KV head, over ``steps`` decode steps."""
    pre = kvpolicy.prefill(model, ids, policy, reserve=steps)
    adapter = kvpolicy.get_adapter(model)
    step_fn = graph_decode_step(adapter) if graphs else adapter.decode_step
    token, tokens, lengths = pre.next_token, [], []
    for step in range(steps):
        token = step_fn(token, policy, pre.batch, step).argmax(dim=-1, keepdim=True)
        tokens.append(int(token))
        lengths.append(pre.cache.kv_head_lengths())
    pre.batch.raise_deferred(policy.cache)
    return tokens, lengths, pre


def test_long_generation_stays_within_budget_plus_buffer(model, ids):
    """Prefill keeps the budget; each step adds one entry; every ``buffer`` steps the cache is squeezed
    back to the budget: 300 tokens generated into a 24-entry cache (plus a 16-entry buffer)."""
    policy = kvpolicy.compose(cache=RKV(budget=24, buffer=16))
    pre = kvpolicy.prefill(model, ids, policy)
    assert pre.cache.kv_head_lengths() == [[24, 24]] * 4
    _, lengths, pre = decode_lengths(model, ids, policy, 300)
    for step, per_layer in enumerate(lengths):
        want = 24 + (step + 1) % 16
        assert per_layer == [[want, want]] * 4, f"step {step}"
    assert pre.cache.get_seq_length() == 100 + 300
    for layer in pre.cache.layers:  # the window (the 8 newest tokens) is always there
        assert set(range(392, 400)) <= set(layer.positions[0, 0].tolist())


def test_long_generation_replays_the_compression_step(model, ids):
    """Graph-replayed decode equals eager token for token over a long generation whose compression
    steps are recorded once and replayed (two variants: appending and compressing)."""
    policy = kvpolicy.compose(cache=RKV(budget=20, buffer=6))
    eager, eager_lengths, _ = decode_lengths(model, ids, policy, 60)
    replayed, lengths, pre = decode_lengths(model, ids, policy, 60, graphs=True)
    assert replayed == eager and lengths == eager_lengths
    # each variant runs eagerly at its first occurrence, is recorded at its second, replayed after:
    # eight of the ten compressions are replays
    assert pre.batch.graphs.stats() == {"eager_steps": 2, "recordings": 2, "replays": 60 - 4}


class NoHostSync(TorchFunctionMode):
    """Fails on any call that reads a tensor's values back to the host."""

    SYNCING = frozenset({"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.SYNCING:
            raise AssertionError(f"host sync in a decode step: Tensor.{func.__name__}")
        return func(*args, **(kwargs or {}))


def test_decode_steps_never_sync_with_the_host(model):
    policy = kvpolicy.compose(cache=RKV(budget=0.3, buffer=4))
    batch = [torch.tensor(p) for p in prompts((90, 40))]
    pre = kvpolicy.prefill(model, batch, policy, reserve=12)
    adapter = kvpolicy.get_adapter(model)
    token = pre.logits.argmax(dim=-1, keepdim=True)
    with NoHostSync():
        for step in range(12):  # three compressions
            token = adapter.decode_step(token, policy, pre.batch, step).argmax(dim=-1, keepdim=True)
    pre.batch.raise_deferred(policy.cache)
    assert pre.cache.kv_head_lengths(0) == [[27, 27]] * 4  # int(90 * 0.3)
    assert pre.cache.kv_head_lengths(1) == [[16, 16]] * 4  # int(40 * 0.3) = 12, floored at 2 * 8


def prompts(lengths=(90, 40, 120, 7)) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 128, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize(
    "cache",
    [RKV(budget=20, buffer=8), RKV(budget=0.3, window=4, buffer=5)],
    ids=["tokens", "fraction"],
)
def test_batch_equals_each_prompt_alone(model, cache):
    policy = kvpolicy.compose(cache=cache)
    batch = prompts()
    alone = [kvpolicy.generate(model, None, input_ids=p, policy=policy, max_new_tokens=30) for p in batch]
    together = kvpolicy.generate(model, None, input_ids=batch, policy=policy, max_new_tokens=30)
    for a, b in zip(alone, together, strict=True):
        assert b.token_ids == a.token_ids
        assert b.stats.kv_tokens_per_layer == a.stats.kv_tokens_per_layer
    if cache.budget == 20:  # graph-replayed, the per-sequence evictions of a batch (compressions 2 and 3)
        replayed = kvpolicy.generate(
            model, None, input_ids=batch, policy=policy, max_new_tokens=30, graphs=True
        )
        assert [o.token_ids for o in replayed] == [o.token_ids for o in together]


def test_preset_builds_the_reference_defaults():
    policy = kvpolicy.get_policy("rkv")
    assert policy.cache == RKV()
    assert (RKV().budget, RKV().window, RKV().buffer, RKV().mix_lambda, RKV().kernel, RKV().threshold) == (
        128,
        8,
        128,
        0.07,
        7,
        0.5,
    )
    assert kvpolicy.get_policy("rkv", kv_budget=64, buffer=32).cache == RKV(budget=64, buffer=32)
    assert get_registry().presets["rkv"].obj is RKVPreset
    with pytest.raises(ValueError, match=r"budget \(8\) must be larger than the window \(8\)"):
        RKVPreset(kv_budget=8)


def test_generates_with_the_preset(model, ids):
    out = kvpolicy.generate(
        model, None, input_ids=ids, policy=kvpolicy.get_policy("rkv", kv_budget=24, buffer=8)
    )
    assert out.stats.kv_tokens_per_layer == [24] * 4


# == the conformance suite ==========================================================================
class TestRKVConformance(CachePolicyConformance):
    kvpolicy_cases = (
        ConformanceCase(
            RKV,
            # a small buffer: the 24 graph-replayed steps compress three times (eager, recorded, replayed)
            budgeted=lambda budget: RKV(budget=budget, buffer=8),
            keep_all=RKV(budget=10_000),  # above prompt plus output: never compresses
            invalid=[
                {"budget": 0},
                {"budget": 1.5},
                {"budget": True},
                {"window": 0},
                {"buffer": 0},
                {"kernel": 4},
                {"mix_lambda": 1.5},
                {"threshold": 1.0},
                {"budget": 8, "window": 8},
            ],
            examples=[RKV(), RKV(budget=0.2, window=4, buffer=64, mix_lambda=0.1, kernel=5, threshold=0.7)],
        ),
    )
