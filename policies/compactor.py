"""Compactor (Chari & Van Durme 2025, arXiv 2507.08143) and its two parts, as NVIDIA kvpress runs them.

Query-agnostic cache compression from two signals that need no attention weights from the model:

* **Leverage** (:class:`Leverage`, kind ``leverage``; kvpress ``LeverageScorePress``): how much of an
  outlier a key is in the geometry of the layer's keys. The statistical leverage of key ``i`` is
  ``x_iᵀ (XᵀX)⁻¹ x_i`` for the sequence-centred key matrix ``X``; it is approximated on a right
  Gaussian sketch ``XΦ`` (``Φ`` ``d × k``, entries ``N(0, 1/k)``, ``k = sketch_dimension``) with a
  Cholesky solve of ``(XΦ)ᵀ(XΦ) + jitter·I``, on the keys *before* RoPE, then z-scored.
* **Non-causal attention** (:class:`NonCausalAttention`, kind ``noncausal_attention``; kvpress
  ``NonCausalAttnPress``): the prompt is cut into chunks of ``chunk_size``; inside each chunk every
  query attends every key (both directions), the softmax attention each key receives is summed over
  the chunk's queries and averaged over the query heads of its KV group, multiplied by the value's
  L2 norm, smoothed by a 3-wide average along the sequence, then z-scored.
* **Compactor** (:class:`Compactor`, kind ``compactor``; kvpress ``CompactorPress``): the first
  ``sink_size_start`` and the last ``sink_size_end`` entries are always kept; the entries between are
  scored ``blending · leverage + non-causal attention`` (both z-scored over that middle part), with
  ``blending`` the compression ratio by default (kvpress's heuristic: the harder the compression, the
  more the geometry counts).

Defaults are kvpress's (github.com/NVIDIA/kvpress 0.5.5, ``kvpress/presses/compactor_press.py``,
``leverage_press.py``, ``non_causal_attention_press.py``): ``sink_size_start=8``,
``sink_size_end=4``, ``chunk_size=256``, ``sketch_dimension=48``, ``blending=None`` (= the compression
ratio, ``1 - budget``), a first Cholesky jitter of ``1e-2`` raised tenfold on failure (5 tries), z-scores
with the unbiased standard deviation clamped at ``1e-6`` over all heads and tokens of a request,
softmax of the raw ``q·k`` (kvpress scales by neither ``1/√d`` nor the model's scale: kept, it is the
reference's choice). kvpress's ``compression_ratio`` (fraction removed, default 0.0 = compress
nothing) becomes ``budget`` (fraction or count kept), default 0.1 like every other compressing policy
of kvpolicy.

**The sketch is seeded.** kvpress draws ``Φ`` with ``torch.randn`` from torch's *global* RNG, on the
keys' device and dtype, a fresh ``(B, H_kv, d, k)`` at every layer and call: the choice changes with
whatever else drew from that RNG (reproducible only by seeding the whole process), and a prompt in a
batch draws other numbers than alone. Here ``Φ`` is ``(H_kv, d, k)`` float32 drawn on the CPU from a
generator seeded from ``(seed, layer)`` (:func:`~kvpolicy.policies.random.layer_generator`, stream 1),
the same for every row and every device, then scaled by ``1/√k`` as kvpress's: the same distribution,
deterministic given ``seed`` (default 0) and the layer.

**Pre-RoPE keys without the hidden states.** kvpress recomputes the layer's keys from the hidden states
(``k_proj``, and ``k_norm`` where the model has one). A :class:`~kvpolicy.interfaces.LayerView` holds the
keys after RoPE, so they are rotated back: with the model's own rotary embedding when the adapter gives
it (``LayerView.rotary``; HF's half-rotation layout on the first ``d_rot`` channels, scaled tables
divided back out), else with the plain-RoPE base (``LayerView.rope_theta``), else (a model without
either) the post-RoPE keys are used as they are. ``pre_rope_keys=False`` uses post-RoPE keys always.
Non-causal attention reads the post-RoPE queries and keys, which is what kvpress computes too (it
re-applies RoPE to the pre-RoPE queries at their positions).

Other deviations, and why:

* kvpress pads the last chunk with zero queries and keys and masks them with a fill value of
  ``-1e-9`` (not ``-1e9``): its padded keys keep softmax weight ``exp(0)`` and its padded queries add
  near-uniform attention to the last chunk's keys, which are the prompt's most recent entries (where a
  question sits). Here the last chunk is a chunk of its real tokens only: padded keys get no weight,
  padded queries add nothing.
* Compactor's protected entries score ``+inf`` (the :class:`~kvpolicy.interfaces.ScoresKeys` contract;
  kvpress pads them with the largest middle score, so ``topk``'s tie order may drop one for the best
  scored entry). The start sinks are the first ``sink_size_start`` *original* positions (kvpress: the
  first entries present), so a propagation cut cannot make a later token a sink; the end entries are the
  last ``sink_size_end`` present (the most recent).
* ``blending=None`` with a *token* budget uses ``1 - budget / prompt_len`` (at least 0), the compression
  ratio that budget means for the request; with a fraction it is kvpress's ``1 - budget`` exactly.
* Leverage and attention are computed in float32 with the sketch in float32 (kvpress sketches in the
  keys' dtype, bfloat16 on a GPU, then converts); z-scores are per request (kvpress's are over the whole
  batch tensor: equal at batch 1, and kvpolicy scores one request at a time). A standard deviation that
  is undefined (a single entry) counts as 1 instead of giving NaN scores.
* The chunks are processed in groups (bounded memory: kvpress materialises every chunk's attention at
  once, ``H_q · L · chunk_size`` floats).

A *fractional* budget never resolves below the protected entries plus 8 (capped at the prompt); a token
budget is kept exactly and must exceed the protected entries.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from kvpolicy.config import Budget, Settings, resolve_budget
from kvpolicy.interfaces import CachePolicy, LayerView
from kvpolicy.policies.expected_attention import rope_inverse_frequencies, rotate_half, unrotate
from kvpolicy.policies.presets import CachePreset
from kvpolicy.policies.random import layer_generator
from kvpolicy.scoring import SelectsTopScores
from kvpolicy.state import RequestState

#: Entries chosen by score that a fractional budget leaves besides the protected ones.
MIN_SCORED = 8

#: The generator stream of the leverage sketch (0 is :class:`~kvpolicy.policies.random.Random`'s).
SKETCH_STREAM = 1

#: Elements of one fp32 attention temporary: bounds the memory of the chunked attention.
_CHUNK_ELEMENTS = 1 << 24


# -- pure scoring functions -------------------------------------------------------------------------
def zscore(scores: torch.Tensor) -> torch.Tensor:
    """``(B, H, S)`` scores z-normalised per batch row over all its heads and entries, as kvpress
    (``(x - mean) / std.clamp_min(1e-6)``, unbiased std; an undefined std counts as 1)."""
    flat = scores.flatten(1)
    mean = flat.mean(dim=1)
    std = flat.std(dim=1) if flat.shape[1] > 1 else torch.ones_like(mean)
    std = torch.nan_to_num(std, nan=1.0).clamp_min(1e-6)
    return (scores - mean[:, None, None]) / std[:, None, None]


def gaussian_sketch(seed: int, layer: int, heads: int, head_dim: int, sketch_dimension: int) -> torch.Tensor:
    """``(heads, head_dim, sketch_dimension)`` float32 CPU right sketch ``Φ``, entries ``N(0, 1/k)``,
    from :func:`~kvpolicy.policies.random.layer_generator` ``(seed, layer, SKETCH_STREAM)``."""
    generator = layer_generator(seed, layer, SKETCH_STREAM)
    phi = torch.randn(heads, head_dim, sketch_dimension, generator=generator, dtype=torch.float32)
    return phi / math.sqrt(sketch_dimension)


def cholesky_with_jitter(gram: torch.Tensor, jitter: float = 1e-2, max_tries: int = 5) -> torch.Tensor:
    """Lower Cholesky factor of ``gram + jitter·I``, the jitter raised tenfold until it succeeds
    (kvpress's ``chol_with_jitter(G, jitter=1e-2, max_tries=5)``)."""
    identity = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    current = float(jitter)
    for _ in range(max_tries):
        factor, info = torch.linalg.cholesky_ex(gram + current * identity, upper=False)
        if bool((info == 0).all()):  # prefill only: one sync per try
            return factor
        current = max(1e-8, 1e-2 if current == 0.0 else 10.0 * current)
    raise RuntimeError(f"Cholesky failed after {max_tries} tries (last jitter {current:g})")


def leverage_scores(key: torch.Tensor, sketch: torch.Tensor) -> torch.Tensor:
    """Approximate statistical leverage of every key, on a right Gaussian sketch (not z-scored).

    ``X = (K - mean_seq K) Φ``, ``G = XᵀX`` (symmetrised), ``L Lᵀ = G + jitter·I``, score ``i`` is
    ``x_iᵀ G⁻¹ x_i`` (the diagonal of ``X G⁻¹ Xᵀ``, never formed), clamped at 0.

    Args:
        key: ``(B, H, S, d)`` keys (kvpress: before RoPE).
        sketch: ``(H, d, k)`` or ``(B, H, d, k)`` right sketch ``Φ``.

    Returns:
        ``(B, H, S)`` float32.
    """
    key = key.float()
    x = (key - key.mean(dim=-2, keepdim=True)) @ sketch.to(device=key.device, dtype=torch.float32)
    xt = x.transpose(-2, -1)  # (B, H, k, S)
    gram = xt @ x
    factor = cholesky_with_jitter(0.5 * (gram + gram.transpose(-2, -1)))
    solved = torch.cholesky_solve(xt, factor, upper=False)  # G⁻¹ Xᵀ: (B, H, k, S)
    return (x * solved.transpose(-2, -1)).sum(dim=-1).clamp_min(0)


def noncausal_chunk_attention(query: torch.Tensor, key: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Non-causal attention within chunks, summed over each chunk's queries, per KV head.

    Args:
        query: ``(B, H_q, S, d)``; ``H_q`` a multiple of ``H_kv``.
        key: ``(B, H_kv, S, d)``.
        chunk_size: chunk length; chunk ``c`` is entries ``c·chunk_size ..``, the last one shorter.

    Returns:
        ``(B, H_kv, S)`` float32: for each key, the softmax attention (of the raw ``q·k``, over the
        keys of its chunk) that its chunk's queries give it, summed over those queries and averaged
        over the query heads of its KV group.
    """
    b, h_q, s, d = query.shape
    h_kv = key.shape[1]
    n_rep = h_q // h_kv
    chunks = math.ceil(s / chunk_size)
    padded = chunks * chunk_size
    pad = padded - s
    q = F.pad(query.float(), (0, 0, 0, pad)).view(b, h_kv, n_rep, chunks, chunk_size, d)
    k = F.pad(key.float(), (0, 0, 0, pad)).view(b, h_kv, 1, chunks, chunk_size, d)
    real = torch.arange(padded, device=key.device).view(chunks, chunk_size) < s  # (chunks, C)
    out = torch.empty(b, h_kv, n_rep, chunks, chunk_size, dtype=torch.float32, device=key.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, b * h_q * chunk_size * chunk_size))
    for lo in range(0, chunks, step):
        hi = min(chunks, lo + step)
        dots = q[:, :, :, lo:hi] @ k[:, :, :, lo:hi].transpose(-1, -2)  # (B, H_kv, n_rep, c, C, C)
        mask = real[lo:hi]
        dots = dots.masked_fill(~mask[:, None, :], -math.inf)  # padded keys: no weight
        attn = dots.softmax(dim=-1) * mask[:, :, None]  # padded queries: nothing
        out[:, :, :, lo:hi] = attn.sum(dim=-2)
    return out.view(b, h_kv, n_rep, padded)[..., :s].mean(dim=2)


def noncausal_attention_scores(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """kvpress ``NonCausalAttnPress`` scores before the z-score: :func:`noncausal_chunk_attention`
    times the value norms, averaged over a 3-wide window along the sequence (zero padded, ``/3`` at
    the ends too, as ``avg_pool1d(kernel_size=3, padding=1)``).

    Args:
        query: ``(B, H_q, S, d)`` after RoPE.
        key: ``(B, H_kv, S, d)`` after RoPE.
        value: ``(B, H_kv, S, d_v)``.
        chunk_size: chunk length.

    Returns:
        ``(B, H_kv, S)`` float32.
    """
    scores = noncausal_chunk_attention(query, key, chunk_size)
    scores = scores * torch.linalg.vector_norm(value, dim=-1, dtype=torch.float32)
    return F.avg_pool1d(scores, kernel_size=3, stride=1, padding=1)


def compactor_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    leverage_key: torch.Tensor,
    sketch: torch.Tensor,
    *,
    start: int,
    end: int,
    chunk_size: int,
    blending: float,
) -> torch.Tensor:
    """Compactor's importance of every entry (higher: keep).

    Args:
        query: ``(B, H_q, T, d)`` after RoPE.
        key: ``(B, H_kv, T, d)`` after RoPE.
        value: ``(B, H_kv, T, d_v)``.
        leverage_key: ``(B, H_kv, T, d)`` the keys leverage is computed on (kvpress: before RoPE).
        sketch: ``(H_kv, d, k)`` right sketch (:func:`gaussian_sketch`).
        start: leading entries always kept.
        end: trailing entries always kept (after the leading ones).
        chunk_size: non-causal attention chunk length.
        blending: weight of the leverage z-scores.

    Returns:
        ``(B, H_kv, T)`` float32: ``+inf`` on the protected entries, ``blending · z(leverage) +
        z(non-causal attention)`` over the middle ``start .. T - end``.
    """
    t = key.shape[2]
    start = min(start, t)
    end = min(end, t - start)
    out = torch.full(key.shape[:3], math.inf, dtype=torch.float32, device=key.device)
    hi = t - end
    if hi <= start:
        return out
    lev = zscore(leverage_scores(leverage_key[:, :, start:hi], sketch))
    attn = noncausal_attention_scores(
        query[:, :, start:hi], key[:, :, start:hi], value[:, :, start:hi], chunk_size
    )
    out[..., start:hi] = blending * lev + zscore(attn)
    return out


def pre_rope_keys(view: LayerView) -> torch.Tensor:
    """``(B, H_kv, T, d)`` the view's keys rotated back to before RoPE, float32: with the model's own
    rotary embedding (``view.rotary``; HF half-rotation layout on its first ``d_rot`` channels, any
    scaling of the tables divided out), else the plain-RoPE base (``view.rope_theta``), else the keys
    as they are (no RoPE that kvpolicy can undo)."""
    key = view.key.float()
    if view.rotary is not None:
        cos, sin = view.rotary(view.positions)
        cos, sin = cos.float()[:, None], sin.float()[:, None]  # (B, 1, T, d_rot)
        rot = cos.shape[-1]
        part = key[..., :rot]
        # k_post = c·k + s·P k with c² + s² = a² per pair (a: the tables' scaling): (c - s·P) / a².
        back = (part * cos - rotate_half(part) * sin) / (cos * cos + sin * sin)
        return torch.cat((back, key[..., rot:]), dim=-1)
    if view.rope_theta is not None:
        inv_freq = rope_inverse_frequencies(view.rope_theta, key.shape[-1], key.device)
        return unrotate(key, view.positions, inv_freq)
    return key


def _blending_for(blending: float | None, budget: int | float, prompt_len: int) -> float:
    if blending is not None:
        return blending
    if isinstance(budget, float):
        return 1.0 - budget
    return max(0.0, 1.0 - budget / max(prompt_len, 1))


# -- the two parts ----------------------------------------------------------------------------------
class Leverage(SelectsTopScores, CachePolicy):
    """Keep each layer's keys of highest approximate leverage (geometric outliers), per KV head.

    kvpress ``LeverageScorePress``: every entry scored, none protected.

    Attributes:
        budget: entries kept per layer and KV head: tokens (int, kept exactly) or a fraction of the
            prompt (float, ``int(L * r)`` but at least 8, at most ``L``).
        sketch_dimension: columns ``k`` of the Gaussian sketch (kvpress: 48).
        seed: what the sketch derives from, with the layer (kvpress: torch's global RNG).
        pre_rope_keys: score keys rotated back to before RoPE (kvpress's; see the module docstring).
    """

    kind = "leverage"

    budget: Budget = 0.1
    sketch_dimension: int = Field(48, ge=1)
    seed: int = Field(0, ge=0)
    pre_rope_keys: bool = True

    def resolved_budget(self, prompt_len: int) -> int:
        """Entries kept per KV head for a prompt of ``prompt_len`` tokens (a fraction floored at 8)."""
        return resolve_budget(self.budget, prompt_len, floor=MIN_SCORED)

    def key_scores(self, view: LayerView, state: RequestState | None = None) -> torch.Tensor:
        """``(B, H_kv, T)`` float32 z-scored leverage (none ``+inf``); :class:`~kvpolicy.interfaces.ScoresKeys`."""
        key = pre_rope_keys(view) if self.pre_rope_keys else view.key
        h, d = key.shape[1], key.shape[-1]
        sketch = gaussian_sketch(self.seed, view.layer, h, d, self.sketch_dimension)
        return zscore(leverage_scores(key, sketch))


class NonCausalAttention(SelectsTopScores, CachePolicy):
    """Keep each layer's entries most attended within their chunk, both directions, per KV head.

    kvpress ``NonCausalAttnPress``: every entry scored, none protected.

    Attributes:
        budget: entries kept per layer and KV head: tokens (int, kept exactly) or a fraction of the
            prompt (float, ``int(L * r)`` but at least 8, at most ``L``).
        chunk_size: chunk length of the non-causal attention (kvpress: 256).
    """

    kind = "noncausal_attention"

    budget: Budget = 0.1
    chunk_size: int = Field(256, ge=1)

    def resolved_budget(self, prompt_len: int) -> int:
        """Entries kept per KV head for a prompt of ``prompt_len`` tokens (a fraction floored at 8)."""
        return resolve_budget(self.budget, prompt_len, floor=MIN_SCORED)

    def key_scores(self, view: LayerView, state: RequestState | None = None) -> torch.Tensor:
        """``(B, H_kv, T)`` float32 z-scored non-causal attention (none ``+inf``);
        :class:`~kvpolicy.interfaces.ScoresKeys`."""
        return zscore(noncausal_attention_scores(view.query, view.key, view.value, self.chunk_size))


# -- Compactor --------------------------------------------------------------------------------------
class CompactorSettings(Settings):
    """The scoring settings :class:`Compactor` and its preset share; see :class:`Compactor`."""

    sink_size_start: int = Field(8, ge=0)
    sink_size_end: int = Field(4, ge=0)
    chunk_size: int = Field(256, ge=1)
    sketch_dimension: int = Field(48, ge=1)
    blending: float | None = Field(None, ge=0.0, allow_inf_nan=False)
    seed: int = Field(0, ge=0)
    pre_rope_keys: bool = True


class Compactor(CompactorSettings, SelectsTopScores, CachePolicy):
    """Keep the protected ends plus each layer's entries of highest blended leverage and non-causal
    attention, per KV head.

    Attributes:
        budget: entries kept per layer and KV head, protected ones included: tokens (int, kept
            exactly, more than ``sink_size_start + sink_size_end``) or a fraction of the prompt (float,
            ``int(L * r)`` but at least the protected entries plus 8, at most ``L``). kvpress's
            ``compression_ratio`` is ``1 - budget``.
        sink_size_start: first prompt positions always kept (kvpress: 8).
        sink_size_end: most recent entries always kept (kvpress: 4).
        chunk_size: chunk length of the non-causal attention (kvpress: 256).
        sketch_dimension: columns of the leverage sketch (kvpress: 48).
        blending: weight of the leverage z-scores against the attention z-scores; ``None`` (kvpress's
            default) is the compression ratio, ``1 - budget`` (see the module docstring for token
            budgets).
        seed: what the leverage sketch derives from, with the layer (kvpress: torch's global RNG).
        pre_rope_keys: leverage on keys rotated back to before RoPE (kvpress's).
    """

    kind = "compactor"

    budget: Budget = 0.1

    @model_validator(mode="after")
    def _check(self) -> Compactor:
        protected = self.sink_size_start + self.sink_size_end
        if isinstance(self.budget, int) and self.budget <= protected:
            raise ValueError(
                f"budget ({self.budget}) must exceed sink_size_start + sink_size_end ({protected}) "
                "to leave room for scored entries"
            )
        return self

    def resolved_budget(self, prompt_len: int) -> int:
        """Entries kept per KV head for a prompt of ``prompt_len`` tokens (a fraction floored at the
        protected entries plus 8)."""
        floor = self.sink_size_start + self.sink_size_end + MIN_SCORED
        return resolve_budget(self.budget, prompt_len, floor=floor)

    def resolved_blending(self, prompt_len: int) -> float:
        """The leverage weight for a prompt of ``prompt_len`` tokens."""
        return _blending_for(self.blending, self.budget, prompt_len)

    def key_scores(self, view: LayerView, state: RequestState | None = None) -> torch.Tensor:
        """``(B, H_kv, T)`` float32 :func:`compactor_scores`, ``+inf`` on the protected entries; the
        :class:`~kvpolicy.interfaces.ScoresKeys` contract."""
        lev_key = pre_rope_keys(view) if self.pre_rope_keys else view.key
        h, d = lev_key.shape[1], lev_key.shape[-1]
        sketch = gaussian_sketch(self.seed, view.layer, h, d, self.sketch_dimension)
        blending = self.resolved_blending(view.prompt_len)
        starts = (view.positions < self.sink_size_start).sum(dim=-1).tolist()  # prefill: one sync
        rows = []
        for b, start in enumerate(starts):
            row = slice(b, b + 1)
            rows.append(
                compactor_scores(
                    view.query[row],
                    view.key[row],
                    view.value[row],
                    lev_key[row],
                    sketch,
                    start=start,
                    end=self.sink_size_end,
                    chunk_size=self.chunk_size,
                    blending=blending,
                )
            )
        return torch.cat(rows)


class CompactorPreset(CompactorSettings, CachePreset):
    """Compactor: query-agnostic cache compression at every layer, full prefill.

    Fields mirror :class:`Compactor` (``kv_budget`` is its ``budget``).
    """

    kind = "compactor"
    description = "Compactor: leverage scores + non-causal chunked attention (Chari & Van Durme 2025)"

    policy_class = Compactor
    settings_class = CompactorSettings

    kv_budget: Budget = 0.1


__all__ = [
    "Compactor",
    "CompactorPreset",
    "Leverage",
    "NonCausalAttention",
    "compactor_scores",
    "gaussian_sketch",
    "leverage_scores",
    "noncausal_attention_scores",
    "noncausal_chunk_attention",
    "pre_rope_keys",
    "zscore",
]
