"""ExpectedAttention (kvpress's ExpectedAttentionPress, Devoto et al. 2025) as a cache policy.

A naive float64 reference (plain loops over heads, statistics tokens, future positions and keys)
against the vectorised scores on both routes (post-RoPE statistics, and queries rotated back with a
given ``rope_theta``); the RoPE helpers against transformers' own tables and the tiny model's own
pre-RoPE queries; query-agnosticism; sinks and budgets per layer and KV head; keep-everything
equivalence; composition with TSP; the conformance suite; settings errors.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.register_assert_rewrite("kvpolicy.testing")  # before importing it: detailed assertion messages
pytest_plugins = ["kvpolicy.testing"]
pytestmark = pytest.mark.usefixtures("single_thread")

import kvpolicy  # noqa: E402
from kvpolicy.interfaces import CachePolicy, LayerView, ScoresKeys  # noqa: E402
from kvpolicy.policies import TSP, FullCache  # noqa: E402
from kvpolicy.policies.expected_attention import (  # noqa: E402
    ExpectedAttention,
    expected_attention_scores,
    mean_rope_rotation,
    mean_rotary_rotation,
    rope_inverse_frequencies,
    unrotate,
    unrotate_with_tables,
)
from kvpolicy.registry import PolicyConfigError, component_from_dict  # noqa: E402
from kvpolicy.state import RequestState  # noqa: E402
from kvpolicy.testing import CachePolicyConformance, ConformanceCase  # noqa: E402


def make_view(t=40, h_q=6, h_kv=2, d=8, prompt_len=None, positions=None, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, h, t, d, generator=g).to(dtype) for h in (h_q, h_kv, h_kv))
    return LayerView(
        layer=0,
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


# -- the naive reference --------------------------------------------------------------------------
def naive_rotation(position: int, theta: float, d: int) -> torch.Tensor:
    """RoPE at ``position`` as an explicit matrix: a 2x2 rotation of each pair ``(i, i + d/2)``."""
    r = torch.zeros(d, d, dtype=torch.float64)
    half = d // 2
    for i in range(half):
        angle = position / theta ** (2 * i / d)
        c, s = math.cos(angle), math.sin(angle)
        r[i, i], r[i, i + half], r[i + half, i], r[i + half, i + half] = c, -s, s, c
    return r


def naive_rotation_freqs(position: int, freqs: list[float], d: int, scale: float = 1.0) -> torch.Tensor:
    """A rotary embedding at ``position`` as an explicit matrix, from its frequencies one by one: a 2x2
    rotation of each pair ``(i, i + len(freqs))`` by ``position * freqs[i]`` (times ``scale``), the
    identity on the dimensions past ``2 * len(freqs)`` (partial rotation)."""
    r = torch.eye(d, dtype=torch.float64)
    half = len(freqs)
    for i, freq in enumerate(freqs):
        angle = position * freq
        c, s = math.cos(angle) * scale, math.sin(angle) * scale
        r[i, i], r[i, i + half], r[i + half, i], r[i + half, i + half] = c, -s, s, c
    return r


def naive_scores(view, policy: ExpectedAttention, freqs: list[float] | None = None) -> torch.Tensor:
    """Expected Attention the obvious way, float64, one head, one token, one key at a time.
    ``freqs``: the frequencies of the view's rotary embedding (its ``rotary`` route), given by hand."""
    q, k, v = (x.double()[0] for x in (view.query, view.key, view.value))
    positions = view.positions[0].tolist()
    h_q, t, d = q.shape
    h_kv = k.shape[0]
    n_rep = h_q // h_kv
    s = view.scaling
    theta = policy.theta_for(view)
    if freqs is not None:
        assert theta is None and policy.rotary_for(view) is not None
        rotate = lambda p: naive_rotation_freqs(p, freqs, d)  # noqa: E731
    elif theta is not None:
        rotate = lambda p: naive_rotation(p, theta, d)  # noqa: E731
    else:
        rotate = None
    window = policy.statistics_window(t, theta, freqs is not None)
    if rotate is not None:
        rotations = [rotate(p) for p in range(view.prompt_len, view.prompt_len + policy.n_future_positions)]
        r_mean = sum(rotations) / len(rotations)
    out = torch.zeros(h_kv, t, dtype=torch.float64)
    for h in range(h_q):
        samples = []
        for i in range(t - window, t):
            if positions[i] >= policy.n_sink:
                x = q[h, i]
                if rotate is not None:
                    x = rotate(positions[i]).T @ x  # back to pre-RoPE
                samples.append(x)
        mu = sum(samples) / len(samples)
        cov = sum(torch.outer(x - mu, x - mu) for x in samples) / len(samples)
        if rotate is not None:
            mu, cov = r_mean @ mu, r_mean @ cov @ r_mean.T
        if not policy.use_covariance:
            cov = torch.zeros(d, d, dtype=torch.float64)
        g = h // n_rep
        logits = {}
        for j in range(t):
            if positions[j] >= policy.n_sink:
                logits[j] = s * float(mu @ k[g, j]) + s * s / 2 * float(k[g, j] @ cov @ k[g, j])
        top = max(logits.values())
        total = sum(math.exp(z - top) for z in logits.values())
        for j, z in logits.items():
            out[g, j] += math.exp(z - top) / total / n_rep
    for g in range(h_kv):
        for j in range(t):
            if positions[j] < policy.n_sink:
                out[g, j] = math.inf
            elif policy.use_vnorm:
                out[g, j] = (out[g, j] + policy.epsilon) * float(v[g, j].norm())
    return out[None]


ROUTES = [
    {},
    {"rope_theta": None},
    {"rope_theta": 10000.0},
    {"rope_theta": 500.0, "n_future_positions": 7, "stats_window": 12, "n_sink": 2},
    {"use_covariance": False, "use_vnorm": False},
    {"epsilon": 0.05, "stats_window": 5, "n_sink": 0},
    {"use_vnorm": False, "rope_theta": 10000.0, "n_future_positions": 64},
]


@pytest.mark.parametrize(
    "settings", ROUTES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "defaults"
)
def test_scores_equal_the_naive_reference(settings):
    policy = ExpectedAttention(budget=12, **settings)
    for view in (
        make_view(t=40, seed=0),
        # a propagation cut: some original positions gone (sink 1 among them), decoding goes on at 90
        make_view(t=32, seed=1, prompt_len=90, positions=torch.tensor([[0, 2, 3, *range(5, 90, 3)]])),
    ):
        ours = policy.key_scores(view, new_state(view.prompt_len))
        want = naive_scores(view, policy)
        assert ours.shape == (1, 2, view.num_tokens) and ours.dtype == torch.float32
        assert torch.equal(torch.isinf(ours), torch.isinf(want))
        finite = ~torch.isinf(want)
        torch.testing.assert_close(ours[finite].double(), want[finite], rtol=1e-4, atol=1e-7)


def test_pure_function_on_a_batch_equals_the_naive_reference_per_row():
    """``expected_attention_scores`` called directly: each row of a batch is scored on its own."""
    policy = ExpectedAttention(budget=12, n_sink=0, rope_theta=10000.0, n_future_positions=16)
    views = [make_view(t=24, seed=s) for s in (3, 4)]
    q, k, v = (torch.cat([getattr(view, name) for view in views]) for name in ("query", "key", "value"))
    positions = torch.arange(24).expand(2, 24)
    scores = expected_attention_scores(
        q,
        k,
        v,
        scaling=views[0].scaling,
        inv_freq=rope_inverse_frequencies(10000.0, 8),
        query_positions=positions,
        future_start=24,
        n_future_positions=16,
    )
    assert scores.shape == (2, 2, 24)
    for row, view in enumerate(views):
        torch.testing.assert_close(
            scores[row : row + 1].double(), naive_scores(view, policy), rtol=1e-4, atol=1e-7
        )


def test_scoring_contract_for_head_adaptive_wrappers():
    """``ScoresKeys``: ``key_scores`` ``(B, H_kv, T)``, ``+inf`` exactly on the sinks, and
    ``resolved_budget``; ``select`` keeps the top ``resolved_budget`` of those scores."""
    policy = ExpectedAttention(budget=12)
    assert isinstance(policy, ScoresKeys)
    view = make_view(t=40)
    scores = policy.key_scores(view, new_state())
    assert scores.shape == (1, 2, 40)
    assert torch.isinf(scores[..., :4]).all() and torch.isfinite(scores[..., 4:]).all()
    top = scores.topk(policy.resolved_budget(40), dim=-1).indices.sort(dim=-1).values
    assert torch.equal(policy.select(view, new_state()), top)


def test_select_is_the_top_budget_per_kv_head():
    policy = ExpectedAttention(budget=12)
    view = make_view(t=40)
    keep = policy.select(view, new_state())
    assert keep.shape == (1, 2, 12)
    assert torch.equal(keep, keep.sort(dim=-1).values), "indices ascending"
    want = naive_scores(view, policy).topk(12, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(keep, want)
    assert all(set(range(4)) <= set(row.tolist()) for row in keep[0]), "sinks kept"
    assert policy.select(make_view(t=12), new_state(12)) is None, "everything fits: keep all"


def test_scores_are_float32_for_half_precision_views():
    policy = ExpectedAttention(budget=12, rope_theta=10000.0)
    scores = policy.key_scores(make_view(dtype=torch.bfloat16), new_state())
    assert scores.dtype == torch.float32
    assert torch.isfinite(scores[..., 4:]).all() and (scores[..., 4:] >= 0).all()


# -- RoPE -----------------------------------------------------------------------------------------
def test_rope_helpers_match_transformers():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=10000.0)
    rotary = LlamaRotaryEmbedding(config)
    positions = torch.tensor([[0, 1, 5, 17, 300, 4096]])
    x = torch.randn(1, 3, 6, 16)
    cos, sin = rotary(x, positions)
    rotated, _ = apply_rotary_pos_emb(x, x, cos, sin)
    inv_freq = rope_inverse_frequencies(10000.0, 16)
    torch.testing.assert_close(inv_freq, rotary.inv_freq)
    torch.testing.assert_close(unrotate(rotated, positions, inv_freq), x, rtol=1e-5, atol=1e-5)
    # the naive matrices are the same rotation (to transformers' float32 angles, ~1e-4 rad at position
    # 4096), and the mean rotation is their mean
    for i, p in enumerate(positions[0].tolist()):
        naive = x[0, :, i].double() @ naive_rotation(p, 10000.0, 16).T
        torch.testing.assert_close(rotated[0, :, i].double(), naive, rtol=0, atol=1e-3)
    mean = sum(naive_rotation(p, 10000.0, 16) for p in range(100, 140)) / 40
    torch.testing.assert_close(mean_rope_rotation(100, 40, inv_freq).double(), mean, rtol=1e-5, atol=1e-6)


def test_unrotate_recovers_the_models_pre_rope_queries(model, ids):
    """With the model's theta, the view's post-RoPE queries go back to exactly what ``q_proj`` made."""

    class Record(CachePolicy):
        kind = "record-queries"

        def select(self, view, state):
            if view.layer == 0:
                state.scratch(self)["view"] = view
            return None

    seen = {}
    attn = model.model.layers[0].self_attn
    hook = attn.q_proj.register_forward_hook(lambda mod, args, out: seen.setdefault("q", out))
    try:
        recorder = Record()
        pre = kvpolicy.prefill(model, ids, kvpolicy.compose(cache=recorder))
    finally:
        hook.remove()
    view = pre.state.scratch(recorder)["view"]
    d = attn.head_dim
    q_pre = seen["q"].view(1, ids.shape[1], -1, d).transpose(1, 2)
    theta = getattr(model.config, "rope_theta", None) or model.config.rope_parameters["rope_theta"]
    back = unrotate(view.query, view.positions, rope_inverse_frequencies(theta, d))
    torch.testing.assert_close(back, q_pre.float(), rtol=1e-4, atol=1e-4)


# -- any rotary embedding: the model's own (LayerView.rotary) -------------------------------------
#: Llama 3.1's scaling, with a short original context so that a tiny head has all three bands.
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
    "rope_theta": 10000.0,
}


def naive_llama3_frequencies(d: int, cfg: dict = LLAMA3) -> list[float]:
    """Llama 3.1's scaled RoPE frequencies one by one (Meta's ``apply_scaling``, llama-models): kept
    above the high-frequency wavelength, divided by ``factor`` below the low one, blended between."""
    old, low, high = cfg["original_max_position_embeddings"], cfg["low_freq_factor"], cfg["high_freq_factor"]
    out = []
    for i in range(d // 2):
        freq = 1.0 / cfg["rope_theta"] ** (2 * i / d)
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(freq)
        elif wavelen > old / low:
            out.append(freq / cfg["factor"])
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append((1 - smooth) * freq / cfg["factor"] + smooth * freq)
    return out


def llama_rotary(head_dim: int, rope_parameters: dict):
    """A ``LayerView.rotary`` from transformers' own Llama rotary embedding."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, rope_parameters=rope_parameters)
    module = LlamaRotaryEmbedding(config)
    return module, lambda positions: module(torch.zeros(1), positions)


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"n_future_positions": 7, "stats_window": 12, "n_sink": 2},
        {"use_covariance": False, "epsilon": 0.05},
    ],
    ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "defaults",
)
def test_llama3_scaled_rope_scores_equal_the_naive_reference(settings):
    """A view without plain RoPE but with the model's rotary embedding (Llama 3.1's ``llama3``
    scaling): queries are rotated back and the statistics moved with that embedding's own rotation,
    exactly as the naive reference does with explicit per-position matrices of the scaled frequencies."""
    from dataclasses import replace

    module, rotary = llama_rotary(8, LLAMA3)
    freqs = naive_llama3_frequencies(8)
    torch.testing.assert_close(module.inv_freq.double(), torch.tensor(freqs, dtype=torch.float64))
    unscaled = naive_llama3_frequencies(8, {**LLAMA3, "factor": 1.0})
    ratios = [round(f / g, 6) for f, g in zip(freqs, unscaled, strict=True)]
    assert ratios[0] == 1.0 and ratios[-1] == 0.125 and 0.125 < ratios[1] < 1.0  # all three bands
    policy = ExpectedAttention(budget=12, **settings)
    for view in (
        make_view(t=40, seed=0),
        make_view(t=32, seed=1, prompt_len=90, positions=torch.tensor([[0, 2, 3, *range(5, 90, 3)]])),
    ):
        view = replace(view, rotary=rotary)
        assert policy.rotary_for(view) is rotary
        ours = policy.key_scores(view, new_state(view.prompt_len))
        want = naive_scores(view, policy, freqs=freqs)
        assert torch.equal(torch.isinf(ours), torch.isinf(want))
        finite = ~torch.isinf(want)
        torch.testing.assert_close(ours[finite].double(), want[finite], rtol=1e-4, atol=1e-7)
        # the scaling matters: plain RoPE with the same base scores otherwise
        plain = ExpectedAttention(budget=12, rope_theta=10000.0, **settings).key_scores(view)
        assert not torch.allclose(plain[finite], ours[finite], rtol=1e-3)
    # a number or None still means plain RoPE or post-RoPE statistics, whatever the view offers
    assert ExpectedAttention(budget=12, rope_theta=None).rotary_for(view) is None
    assert ExpectedAttention(budget=12, rope_theta=1e4).rotary_for(view) is None


def test_partial_rotation_and_scaled_tables():
    """Tables narrower than the head rotate the first ``d_rot`` dimensions and pass the rest through
    (GPT-NeoX, Phi); a scale folded into the tables (YaRN's ``attention_scaling``) is divided out when
    undoing and kept in the mean rotation, as kvpress's ``R = mean(cos·I + sin·P)`` keeps it."""
    from dataclasses import replace

    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    # partial: 4 of 8 dimensions rotate, with base 100
    freqs = [100.0 ** (-2 * i / 4) for i in range(2)]
    inv_freq = torch.tensor(freqs, dtype=torch.float32)

    def partial(positions):
        angles = positions.float()[..., None] * inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos(), angles.sin()

    view = replace(make_view(t=40, seed=2), rotary=partial)
    policy = ExpectedAttention(budget=12, n_future_positions=32)
    ours = policy.key_scores(view, new_state())
    want = naive_scores(view, policy, freqs=freqs)
    finite = ~torch.isinf(want)
    torch.testing.assert_close(ours[finite].double(), want[finite], rtol=1e-4, atol=1e-7)
    rotation = mean_rotary_rotation(partial, 40, 32, 8).double()
    torch.testing.assert_close(rotation[4:, 4:], torch.eye(4, dtype=torch.float64))
    assert (rotation[:4, 4:] == 0).all() and (rotation[4:, :4] == 0).all()

    # YaRN: transformers folds attention_scaling into cos and sin
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0}
    module, rotary = llama_rotary(8, yarn)
    scale = module.attention_scaling
    assert scale != 1.0
    positions = torch.tensor([[0, 3, 40, 300]])
    x = torch.randn(1, 2, 4, 8, generator=torch.Generator().manual_seed(0))
    cos, sin = rotary(positions)
    rotated, _ = apply_rotary_pos_emb(x, x, cos, sin)
    torch.testing.assert_close(unrotate_with_tables(rotated, cos, sin), x, rtol=1e-5, atol=1e-5)
    freqs = module.inv_freq.double().tolist()
    mean = sum(naive_rotation_freqs(p, freqs, 8, scale) for p in range(50, 60)) / 10
    torch.testing.assert_close(mean_rotary_rotation(rotary, 50, 10, 8).double(), mean, rtol=1e-5, atol=1e-6)


def record_views(model, ids, policy=None):
    """Every view the cache policy is shown in a prefill of ``ids`` (with ``policy``'s selection)."""

    class Record(CachePolicy):
        kind = "record-views"

        def select(self, view, state):
            state.scratch(self).setdefault("views", {})[view.layer] = view
            return None if policy is None else policy.select(view, state)

    recorder = Record()
    pre = kvpolicy.prefill(model, ids, kvpolicy.compose(cache=recorder))
    return pre.state.scratch(recorder)["views"]


def test_llama3_model_views_carry_its_rotary_embedding(ids):
    """On a tiny Llama with ``llama3`` scaling the adapter reports no plain RoPE but passes the model's
    own rotary embedding: undone with it, the view's queries are what ``q_proj`` made, and the scores
    equal the naive reference with explicit matrices of the scaled frequencies."""
    from conftest import tiny_llama

    model = tiny_llama(layers=2, rope_parameters=dict(LLAMA3))
    attn = model.model.layers[0].self_attn
    seen = {}
    hook = attn.q_proj.register_forward_hook(lambda mod, args, out: seen.setdefault("q", out))
    try:
        views = record_views(model, ids)
    finally:
        hook.remove()
    view = views[0]
    assert view.rope_theta is None and view.rotary is not None
    d = attn.head_dim
    q_pre = seen["q"].view(1, ids.shape[1], -1, d).transpose(1, 2)
    back = unrotate_with_tables(view.query, *view.rotary(view.positions))
    torch.testing.assert_close(back, q_pre.float(), rtol=1e-4, atol=1e-4)
    cos, sin = view.rotary(torch.arange(5)[None])
    want_cos, want_sin = model.model.rotary_emb(torch.zeros(1), torch.arange(5)[None])
    assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
    policy = ExpectedAttention(budget=24, n_future_positions=64)
    ours = policy.key_scores(view)
    want = naive_scores(view, policy, freqs=naive_llama3_frequencies(d))
    finite = ~torch.isinf(want)
    torch.testing.assert_close(ours[finite].double(), want[finite], rtol=1e-4, atol=1e-7)
    # and it compresses: the budget per layer and KV head, sinks kept
    pre = kvpolicy.prefill(model, ids, kvpolicy.compose(cache=ExpectedAttention(budget=24)))
    assert pre.cache.kv_head_lengths() == [[24, 24]] * 2


def test_plain_rope_keeps_its_own_tables(model, ids):
    """A plain-RoPE model's views carry both its base and its rotary embedding: the base's tables are
    used, as before the rotary embedding was passed (identical scores), and the module's tables give
    the same rotation to float32 rounding."""
    from dataclasses import replace

    view = record_views(model, ids)[1]
    assert view.rope_theta is not None and view.rotary is not None
    policy = ExpectedAttention(budget=24)
    ours = policy.key_scores(view)
    assert torch.equal(ours, policy.key_scores(replace(view, rotary=None)))
    assert torch.equal(ours, ExpectedAttention(budget=24, rope_theta=view.rope_theta).key_scores(view))
    by_module = policy.key_scores(replace(view, rope_theta=None))
    finite = torch.isfinite(ours)
    torch.testing.assert_close(by_module[finite], ours[finite], rtol=1e-4, atol=1e-7)


def test_gemma3_layers_get_their_own_rotary_embedding():
    """Gemma 3 (generic adapter): sliding layers rotate with the local base, full-attention layers with
    the global one; each view carries its own layer type's rotary embedding."""
    from test_generic_adapter import SLIDING, tiny_model

    model = tiny_model("gemma3_text", SLIDING["gemma3_text"])
    adapter = kvpolicy.get_adapter(model)
    assert adapter.plain_rope_theta is None  # per layer type: not one RoPE
    positions = torch.arange(0, 400, 7)[None]
    tables = {}
    for i, rotary in enumerate(adapter.view_rotaries):
        kind = adapter.layer_types[i]
        want = model.model.rotary_emb(torch.zeros(1), positions, kind)
        got = rotary(positions)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        tables[kind] = got[0]
    assert set(tables) == {"sliding_attention", "full_attention"}
    assert not torch.allclose(tables["sliding_attention"], tables["full_attention"])
    ids = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(3))
    views = record_views(model, ids, ExpectedAttention(budget=12))
    full = [i for i, w in enumerate(adapter.windows) if w is None]
    assert full and set(full) <= set(views)
    for i, view in views.items():
        want = model.model.rotary_emb(torch.zeros(1), positions, adapter.layer_types[i])[0]
        assert torch.equal(view.rotary(positions)[0], want)


# -- query-agnostic -------------------------------------------------------------------------------
@pytest.mark.parametrize("rope_theta", [None, 10000.0])
def test_scores_depend_on_the_queries_only_through_the_window_statistics(rope_theta):
    """What "query-agnostic" means here: no question and no attention window is needed, and the
    queries enter only through the mean and covariance of the statistics window. Queries before the
    window do not matter; inside it, any set with the same mean and covariance gives the same scores."""
    policy = ExpectedAttention(budget=12, stats_window=16, rope_theta=rope_theta)
    view = make_view(t=40)
    base = policy.key_scores(view, new_state())

    earlier = view.query.clone()
    earlier[:, :, :24] = torch.randn(1, 6, 24, 8) * 5  # everything before the 16-token window
    torch.testing.assert_close(policy.key_scores(_with_query(view, earlier), new_state()), base)

    # Same statistics, different queries: for post-RoPE statistics, a reflection H of the window
    # (orthogonal, H1 = 1) keeps the mean and covariance; rotated back, the positions move with the
    # queries, so a permutation (queries and positions together) is the test.
    window = view.query[:, :, 24:]
    if rope_theta is None:
        v = torch.randn(16, dtype=torch.float64)
        v -= v.mean()
        v /= v.norm()
        h = torch.eye(16, dtype=torch.float64) - 2 * torch.outer(v, v)
        mean = window.double().mean(dim=2, keepdim=True)
        mixed = (torch.einsum("uw,bhwd->bhud", h, window.double() - mean) + mean).float()
        assert not torch.allclose(mixed, window, atol=1e-2)
        other = _with_query(view, torch.cat([view.query[:, :, :24], mixed], dim=2))
    else:
        perm = torch.randperm(16, generator=torch.Generator().manual_seed(0)) + 24
        order = torch.cat([torch.arange(24), perm])
        other = _with_query(view, view.query[:, :, order], positions=view.positions[:, order])
    torch.testing.assert_close(policy.key_scores(other, new_state()), base, rtol=1e-4, atol=1e-6)


def _with_query(view, query, positions=None):
    return LayerView(
        layer=view.layer,
        num_layers=view.num_layers,
        prompt_len=view.prompt_len,
        positions=view.positions if positions is None else positions,
        query=query,
        key=view.key,
        value=view.value,
        scaling=view.scaling,
    )


# -- on the tiny model ----------------------------------------------------------------------------
@pytest.mark.parametrize("rope_theta", [None, 10000.0])
@pytest.mark.parametrize("budget", [24, 0.25])
def test_sinks_kept_and_budget_per_layer_and_kv_head(model, ids, budget, rope_theta):
    policy = ExpectedAttention(budget=budget, rope_theta=rope_theta)
    pre = kvpolicy.prefill(model, ids, kvpolicy.compose(cache=policy))
    want = policy.resolved_budget(100)
    assert want == (24 if budget == 24 else 25)
    assert pre.cache.kv_head_lengths() == [[want, want]] * 4
    for layer in pre.cache.layers:
        for head in range(2):
            kept = layer.positions[0, head, :want].tolist()
            assert len(set(kept)) == want and {0, 1, 2, 3} <= set(kept)
    # the two heads of a layer choose differently: the selection is per KV head
    assert any(
        set(layer.positions[0, 0, :want].tolist()) != set(layer.positions[0, 1, :want].tolist())
        for layer in pre.cache.layers
    )


def test_fraction_floor_and_token_budget():
    policy = ExpectedAttention()
    assert policy.resolved_budget(35) == 12  # 0.1 of 35 is 3: floored at 4 sinks + 8
    assert policy.resolved_budget(10) == 10  # never more than the prompt
    assert policy.resolved_budget(4000) == 400
    assert ExpectedAttention(budget=5).resolved_budget(4000) == 5  # tokens: exact
    assert ExpectedAttention(n_sink=0, budget=0.1).resolved_budget(35) == 8


@pytest.mark.parametrize("budget", [200, 1.0])
def test_budget_at_least_the_prompt_is_full_kv(model, ids, budget):
    ids = ids[:, :60]
    full = kvpolicy.generate(
        model, None, input_ids=ids, policy=kvpolicy.compose(cache=FullCache()), max_new_tokens=8
    )
    policy = kvpolicy.compose(cache=ExpectedAttention(budget=budget))
    ours = kvpolicy.generate(model, None, input_ids=ids, policy=policy, max_new_tokens=8)
    assert ours.token_ids == full.token_ids
    assert kvpolicy.prefill(model, ids, policy).cache.kv_lengths == [60] * 4


def test_composes_with_tsp(model, ids):
    cache = ExpectedAttention(budget=24)
    policy = kvpolicy.compose(propagation=TSP(layer=1, rate=0.5), cache=cache)
    pre = kvpolicy.prefill(model, ids, policy)
    assert pre.state.tokens_per_layer == [100, 100, 50, 50]
    assert pre.cache.kv_head_lengths() == [[24, 24]] * 4
    sinks = []
    for layer in pre.cache.layers:
        positions = layer.positions[0, :, :24]
        assert int(positions.max()) < 100
        assert all(len(set(row.tolist())) == 24 for row in positions)
        sinks.append([sorted(p for p in row.tolist() if p < 4) for row in positions])
    # every sink that reaches a layer is kept: layers 0-1 see all four, layers 2-3 the same TSP subset
    assert sinks[0] == sinks[1] == [[0, 1, 2, 3]] * 2
    assert sinks[2] == sinks[3] and sinks[2][0] == sinks[2][1]
    # a budget above what reaches a layer keeps all of it there
    roomy = kvpolicy.prefill(
        model, ids, kvpolicy.compose(TSP(layer=1, rate=0.5), ExpectedAttention(budget=60))
    )
    assert roomy.cache.kv_head_lengths() == [[60, 60], [60, 60], [50, 50], [50, 50]]
    out = kvpolicy.generate(model, None, input_ids=ids, policy=policy, max_new_tokens=8)
    assert len(out.token_ids) == 8


def test_batch_equals_each_prompt_alone(model):
    policy = kvpolicy.get_policy("expected_attention", kv_budget=20)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (90, 40, 7)]
    alone = [kvpolicy.generate(model, None, input_ids=p, policy=policy, max_new_tokens=6) for p in prompts]
    batch = kvpolicy.generate(model, None, input_ids=prompts, policy=policy, max_new_tokens=6)
    for a, b in zip(alone, batch, strict=True):
        assert b.token_ids == a.token_ids
        assert b.stats.kv_tokens_per_layer == a.stats.kv_tokens_per_layer


# -- settings -------------------------------------------------------------------------------------
def test_preset_builds_the_component():
    policy = kvpolicy.get_policy("expected_attention", kv_budget=64, n_sink=2, rope_theta=1e4)
    assert policy.cache == ExpectedAttention(budget=64, n_sink=2, rope_theta=1e4)
    assert type(policy.propagation).__name__ == "AllTokens"
    default = ExpectedAttention()
    assert (default.budget, default.n_future_positions, default.n_sink) == (0.1, 512, 4)
    assert (default.use_covariance, default.use_vnorm, default.epsilon) == (True, True, 0.0)


BAD = [
    ({"budget": 0}, "budget"),
    ({"budget": 1.5}, "budget"),
    ({"budget": True}, "budget"),
    ({"budget": 4}, "budget (4) must exceed n_sink (4)"),
    ({"budget": 8, "n_sink": 10}, "budget (8) must exceed n_sink (10)"),
    ({"n_future_positions": 0}, "n_future_positions"),
    ({"n_sink": -1}, "n_sink"),
    ({"epsilon": -0.1}, "epsilon"),
    ({"epsilon": float("nan")}, "epsilon"),
    ({"stats_window": 0}, "stats_window"),
    ({"rope_theta": 0.0}, "rope_theta"),
    ({"use_covariance": "maybe"}, "use_covariance"),
]


@pytest.mark.parametrize(("bad", "named"), BAD, ids=[str(b) for b, _ in BAD])
def test_bad_settings_name_the_value(bad, named):
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace(")", r"\)")):
        ExpectedAttention(**bad)
    with pytest.raises(PolicyConfigError) as err:
        component_from_dict({"kind": "expected_attention", **bad})
    field, value = next(iter(bad.items()))
    assert field in str(err.value) and str(value) in str(err.value)
    preset = {("kv_budget" if k == "budget" else k): v for k, v in bad.items()}
    with pytest.raises(PolicyConfigError, match="expected_attention"):
        kvpolicy.get_policy("expected_attention", **preset)


def test_odd_head_dim_with_rope_theta_is_refused():
    view = make_view(d=7)
    with pytest.raises(ValueError, match="even head dimension, got 7"):
        ExpectedAttention(budget=12, rope_theta=1e4).key_scores(view, new_state())


# -- the conformance suite ------------------------------------------------------------------------
class TestExpectedAttentionConformance(CachePolicyConformance):
    kvpolicy_cases = (
        ConformanceCase(
            ExpectedAttention,
            invalid=[
                {"budget": 0},
                {"budget": 1.5},
                {"budget": 4},
                {"n_future_positions": 0},
                {"n_sink": -1},
                {"epsilon": -1.0},
                {"stats_window": 0},
                {"rope_theta": -1.0},
            ],
            examples=[
                ExpectedAttention(budget=64, n_future_positions=128, n_sink=2, use_covariance=False),
                ExpectedAttention(budget=0.3, use_vnorm=False, epsilon=0.01, stats_window=32, rope_theta=1e4),
            ],
        ),
        ConformanceCase(
            ExpectedAttention,
            id="expected_attention-rope",
            budgeted=lambda budget: ExpectedAttention(budget=budget, rope_theta=10000.0),
        ),
    )


def test_rope_base_comes_from_the_model_by_default(tiny_model):
    """The default ``rope_theta="model"`` takes the base the adapter reports (plain RoPE only): the
    same scores as giving that base by hand; without one (scaled or per-layer RoPE), the post-RoPE
    statistics of ``rope_theta=None``."""
    from dataclasses import replace

    import kvpolicy

    theta = kvpolicy.get_adapter(tiny_model).plain_rope_theta
    assert theta == tiny_model.config.rope_parameters["rope_theta"]
    view = make_view(t=40, seed=0)
    by_model = ExpectedAttention(budget=12).key_scores(replace(view, rope_theta=theta))
    by_hand = ExpectedAttention(budget=12, rope_theta=theta).key_scores(view)
    assert torch.equal(by_model, by_hand)
    no_plain = ExpectedAttention(budget=12).key_scores(view)  # the view reports no plain RoPE
    assert torch.equal(no_plain, ExpectedAttention(budget=12, rope_theta=None).key_scores(view))
    assert not torch.equal(no_plain, by_hand)


def test_scaled_rope_is_not_plain():
    from conftest import tiny_llama

    import kvpolicy

    scaled = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    assert kvpolicy.get_adapter(tiny_llama(layers=1, rope_parameters=scaled)).plain_rope_theta is None
