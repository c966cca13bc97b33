"""Expected Attention cache compression (Devoto et al. 2025, arXiv 2510.00636), as NVIDIA kvpress runs it.

Attention scores of queries that do not exist yet cannot be observed, but their distribution can be
estimated: model a future query as Gaussian, ``q ~ N(μ, Σ)``, with the mean and covariance of the
layer's queries. The expected unnormalised attention a key ``k`` then receives has a closed form,

    E[exp(s · qᵀk)] = exp(s · μᵀk + s² · kᵀΣk / 2),        s = the softmax scale (1/√d for Llama),

which is the kvpress formula ``exp(μᵀk/√d + kᵀΣk/(2d))``. Each layer scores its keys by that expected
attention, softmax-normalised over the keys per query head and averaged over the query heads of each
KV group, times the value's L2 norm (``(p + epsilon) · ‖v‖₂``: a key that is attended but carries a
tiny value adds little to the output), always keeps the first ``n_sink`` positions (the attention
sinks) and keeps the best ``budget`` entries per KV head. The question is never needed: the method is
query-agnostic, it reads the prompt's own queries, and only through their mean and covariance.

Defaults are kvpress's (``kvpress/presses/expected_attention_press.py``, ``ExpectedAttentionPress``,
github.com/NVIDIA/kvpress): ``n_future_positions=512``, ``n_sink=4``, ``use_covariance=True``,
``use_vnorm=True``, ``epsilon=0.0``, query statistics over every query past the sinks, softmax per
query head, *mean* over each KV group, sinks excluded from the softmax and always kept. kvpress's
``compression_ratio`` (fraction removed, default 0.0 = compress nothing, which is
:class:`~kvpolicy.policies.full.FullCache` here) becomes ``budget`` (fraction or count *kept*,
``1 - compression_ratio``), default 0.1 like every other compressing policy of kvpolicy.

**Pre- or post-RoPE statistics.** kvpress computes μ and Σ of the queries *before* RoPE (it projects
the hidden states with ``q_proj``), then moves them to the next ``n_future_positions`` positions with
the *average* RoPE rotation over those positions, ``R̄ = mean_p R(p)``: ``μ' = R̄μ``,
``Σ' = R̄ΣR̄ᵀ`` (one Gaussian with the averaged rotation; kvpress notes that a mixture over the
positions estimated better but scored lower end to end). A :class:`~kvpolicy.interfaces.LayerView`
holds queries *after* RoPE and no rotary tables, so the two routes here are:

* a RoPE base (the default ``rope_theta="model"`` takes the model's own from its config, through the
  adapter, when its rotary embedding is plain RoPE: HF's half-rotation layout, no rope scaling, no
  partial rotation, one kind for every layer; a number sets it by hand): each post-RoPE query is
  rotated back to pre-RoPE with the inverse rotation at its original position (RoPE is orthogonal:
  ``q_pre = R(p)ᵀ q_post``), then the kvpress computation runs exactly, with the future positions
  ``prompt_len .. prompt_len + n_future_positions - 1`` (where decoding continues, whatever a
  propagation cut left at this layer). A wrong theta silently gives wrong statistics, hence the base
  comes from the model's config, never from a guess.
* no plain RoPE (``rope_theta=None``, or ``"model"`` on a model with scaled, partial or per-layer RoPE;
  any rope type): statistics of the post-RoPE queries of the
  last ``n_future_positions`` tokens (past the sinks), used as they are, in the keys' frame. Under
  kvpress's own model (pre-RoPE queries i.i.d.) their mean is ``R̄_past μ``, the rotation averaged over
  the *last* ``n`` positions, where kvpress uses the next ``n``: RoPE rotations commute, so
  ``R̄_future = R(n) R̄_past``, the same average shifted by ``n`` positions (irrelevant for the
  frequencies whose period is much shorter than ``n``, which average out in both, and small for
  those much longer). Their covariance is the mixture covariance (it includes the spread of the
  rotated mean), kvpress's commented-out alternative. The last ``n`` rather than every query because
  post-RoPE statistics over a whole long prompt would estimate a query at a random prompt position,
  not a coming one.

Query-agnostic, concretely: the scores depend on the queries only through the mean and covariance of
the statistics window (``stats_window``; default as above), so queries before that window, and the
order of those inside it, do not matter (tested). A question at the end of the prompt enters only as
some of the window's queries; none of this needs an observation window of attention scores.

A *fractional* budget never resolves below ``n_sink + 8`` entries (capped at the prompt): the sinks
plus as many entries chosen by score as SnapKV's default window, so a short chat prompt keeps more
than its sinks (the same reasoning as SnapKV's and StreamingLLM's floors). A *token* budget is kept
exactly and must exceed ``n_sink``.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator

from kvpolicy.config import Budget, Settings, resolve_budget
from kvpolicy.interfaces import CachePolicy, LayerView, Policy
from kvpolicy.policies.full import AllTokens
from kvpolicy.presets import Preset
from kvpolicy.state import RequestState

#: Entries chosen by score that a fractional budget leaves besides the sinks (SnapKV's default window).
MIN_SCORED = 8

#: Elements (``B · H · rows · d``) of one fp32 temporary: bounds the memory of statistics and scores.
_CHUNK_ELEMENTS = 1 << 24


def _rows_per_chunk(b: int, h: int, d: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, b * h * d))


# -- RoPE, HF's default (half-rotation) layout --------------------------------------------------------
def rope_inverse_frequencies(
    theta: float, head_dim: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """``(d/2,)`` float32 inverse frequencies of plain RoPE, computed as transformers computes them
    (``1 / theta ** (2i / d)`` in float32), so that :func:`unrotate` inverts the model's own tables."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta**exponents)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``P x`` for the half-rotation layout: pair ``i`` is dimensions ``(i, i + d/2)``."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def unrotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Undo RoPE: ``R(p)ᵀ x`` for each token, in float32.

    Args:
        x: ``(B, H, W, d)`` vectors after RoPE.
        positions: ``(B, W)`` the position each was rotated to.
        inv_freq: ``(d/2,)`` from :func:`rope_inverse_frequencies`.

    Returns:
        ``(B, H, W, d)`` float32 vectors before RoPE. The angles are float32 products, as transformers
        forms them, so the inverse matches the model's rotation to rounding.
    """
    angles = positions.float()[..., None] * inv_freq.to(x.device)  # (B, W, d/2)
    angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, W, d)
    x = x.float()
    # R(p) = C + S·P with P² = -I, so R(p)ᵀ = C - S·P.
    return x * angles.cos() - rotate_half(x) * angles.sin()


def mean_rope_rotation(start: int, count: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """``(d, d)`` float32: the RoPE rotation averaged over positions ``start .. start + count - 1``.

    ``R(p) = diag(cos pω) + diag(sin pω) · P`` (``P`` the matrix of :func:`rotate_half`), so the mean
    is ``diag(mean cos) + diag(mean sin) · P``. Averaged in float64: positions reach 10⁵ and more.
    """
    device = inv_freq.device
    positions = torch.arange(start, start + count, dtype=torch.float64, device=device)
    angles = positions[:, None] * inv_freq.to(torch.float64)[None]  # (count, d/2)
    cos, sin = angles.cos().mean(dim=0), angles.sin().mean(dim=0)
    cos, sin = torch.cat((cos, cos)), torch.cat((sin, sin))
    d = cos.shape[0]
    eye = torch.eye(d // 2, dtype=torch.float64, device=device)
    p = torch.zeros(d, d, dtype=torch.float64, device=device)
    p[d // 2 :, : d // 2] = eye
    p[: d // 2, d // 2 :] = -eye
    return (torch.diag(cos) + torch.diag(sin) @ p).float()


# -- statistics and scores ------------------------------------------------------------------------
def query_statistics(
    query: torch.Tensor,
    mask: torch.Tensor | None = None,
    use_covariance: bool = True,
    positions: torch.Tensor | None = None,
    inv_freq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean and (population) covariance of the queries each head, over the tokens of ``mask``.

    Two passes over token chunks (mean, then centred outer products): no fp32 copy of the whole
    window, and no cancellation from ``E[qqᵀ] - μμᵀ``.

    Args:
        query: ``(B, H, W, d)``.
        mask: ``(B, W)`` bool, which tokens count (default all); rows with none give zeros.
        use_covariance: ``False`` skips the covariance (returned as ``None``).
        positions: ``(B, W)`` query positions, needed with ``inv_freq``.
        inv_freq: ``(d/2,)``: undo RoPE first (:func:`unrotate`).

    Returns:
        ``μ (B, H, d)`` and ``Σ (B, H, d, d)`` (or ``None``), float32.
    """
    b, h, w, d = query.shape
    if mask is None:
        mask = torch.ones(b, w, dtype=torch.bool, device=query.device)
    weights = mask.to(torch.float32)
    count = weights.sum(dim=-1).clamp_min(1.0)[:, None]  # (B, 1)
    step = _rows_per_chunk(b, h, d)

    def chunk(lo: int) -> tuple[torch.Tensor, torch.Tensor]:
        q = query[:, :, lo : lo + step]
        if inv_freq is not None:
            assert positions is not None
            q = unrotate(q, positions[:, lo : lo + step], inv_freq)
        return q.float(), weights[:, None, lo : lo + step, None]  # (B, H, c, d), (B, 1, c, 1)

    total = torch.zeros(b, h, d, dtype=torch.float32, device=query.device)
    for lo in range(0, w, step):
        q, m = chunk(lo)
        total += (q * m).sum(dim=2)
    mean = total / count[..., None]
    if not use_covariance:
        return mean, None
    cov = torch.zeros(b, h, d, d, dtype=torch.float32, device=query.device)
    for lo in range(0, w, step):
        q, m = chunk(lo)
        centred = (q - mean[:, :, None]) * m
        cov += centred.transpose(-1, -2) @ centred
    return mean, cov / count[..., None, None]


def expected_attention_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scaling: float,
    query_mask: torch.Tensor | None = None,
    always_keep: torch.Tensor | None = None,
    inv_freq: torch.Tensor | None = None,
    query_positions: torch.Tensor | None = None,
    future_start: int = 0,
    n_future_positions: int = 512,
    use_covariance: bool = True,
    use_vnorm: bool = True,
    epsilon: float = 0.0,
) -> torch.Tensor:
    """Per-KV-head Expected Attention importance of every key (higher: keep).

    Statistics of ``query`` (over ``query_mask``) give a Gaussian future query per query head; each
    key's logit is ``s · μᵀk + s² · kᵀΣk / 2`` (the log of its expected unnormalised attention), the
    logits are softmax-normalised over the keys not in ``always_keep``, averaged over the ``n_rep``
    query heads of each KV group (kvpress's mean) and, with ``use_vnorm``, rescaled to
    ``(p + epsilon) · ‖v‖₂``. Entries of ``always_keep`` score ``+inf``. Keys are never repeated per
    query head, and the quadratic term is computed in key chunks.

    Args:
        query: ``(B, H_q, W, d)`` the queries to take statistics of: post-RoPE (``inv_freq=None``:
            used in the keys' frame as they are) or, with ``inv_freq``, post-RoPE queries that are
            rotated back to pre-RoPE, whose statistics are then moved by the RoPE rotation averaged
            over positions ``future_start .. future_start + n_future_positions - 1`` (kvpress).
        key: ``(B, H_kv, T, d)`` after RoPE; ``H_q`` a multiple of ``H_kv``.
        value: ``(B, H_kv, T, d_v)``.
        scaling: the attention's softmax scale ``s``.
        query_mask: ``(B, W)`` bool, the queries that count (default all).
        always_keep: ``(B, T)`` bool, entries always kept (sinks): out of the softmax, score ``+inf``.
        inv_freq: ``(d/2,)`` plain-RoPE inverse frequencies (:func:`rope_inverse_frequencies`), or
            ``None`` for post-RoPE statistics.
        query_positions: ``(B, W)`` positions of the queries (needed with ``inv_freq``).
        future_start: the first future position the rotation is averaged over.
        n_future_positions: how many future positions it is averaged over.
        use_covariance: include the ``kᵀΣk`` term.
        use_vnorm: rescale by the value norms.
        epsilon: added to the probabilities before the value-norm rescaling.

    Returns:
        ``(B, H_kv, T)`` float32.
    """
    b, h_q, _, d = query.shape
    h_kv, t = key.shape[1], key.shape[2]
    n_rep = h_q // h_kv
    if inv_freq is not None and query_positions is None:
        raise ValueError("query_positions are needed to undo RoPE (inv_freq given)")
    mean, cov = query_statistics(query, query_mask, use_covariance, query_positions, inv_freq)
    if inv_freq is not None:
        rotation = mean_rope_rotation(future_start, n_future_positions, inv_freq.to(query.device))
        mean = mean @ rotation.T
        if cov is not None:
            cov = rotation @ cov @ rotation.T
    mean = mean.view(b, h_kv, n_rep, d)
    cov = None if cov is None else cov.view(b, h_kv, n_rep, d, d)

    logits = torch.empty(b, h_kv, n_rep, t, dtype=torch.float32, device=key.device)
    step = _rows_per_chunk(b, h_q, d)
    for lo in range(0, t, step):
        k = key[:, :, lo : lo + step].float()  # (B, H_kv, c, d)
        part = torch.einsum("bgrd,bgcd->bgrc", mean, k) * scaling
        if cov is not None:
            k_cov = torch.einsum("bgcd,bgrde->bgrce", k, cov)  # (B, H_kv, n_rep, c, d)
            part = part + (k_cov * k[:, :, None]).sum(dim=-1) * (scaling * scaling / 2)
        logits[..., lo : lo + step] = part
    if always_keep is not None:
        logits = logits.masked_fill(always_keep[:, None, None, :], float("-inf"))
    scores = logits.softmax(dim=-1).mean(dim=2)  # (B, H_kv, T)
    if use_vnorm:
        scores = (scores + epsilon) * torch.linalg.vector_norm(value, dim=-1, dtype=torch.float32)
    if always_keep is not None:
        # A row of only sinks softmaxes to NaN; they are all kept anyway.
        scores = scores.masked_fill(always_keep[:, None, :], math.inf)
    return scores


class ExpectedAttentionSettings(Settings):
    """The scoring settings :class:`ExpectedAttention` and its preset share (one declaration, one set
    of defaults); see :class:`ExpectedAttention` for what each means."""

    n_future_positions: int = Field(512, ge=1)
    n_sink: int = Field(4, ge=0)
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = Field(0.0, ge=0.0, allow_inf_nan=False)
    stats_window: int | None = Field(None, ge=1)
    rope_theta: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] | Literal["model"] | None = "model"


class ExpectedAttention(ExpectedAttentionSettings, CachePolicy):
    """Keep each layer's entries with the highest expected attention from future queries, per KV head.

    Attributes:
        budget: entries kept per layer and KV head, sinks included: tokens (int, kept exactly, more
            than ``n_sink``) or a fraction of the prompt (float, ``int(L * r)`` but at least
            ``n_sink + 8``, at most ``L``). kvpress's ``compression_ratio`` is ``1 - budget``.
        n_future_positions: future positions the query distribution is averaged over (kvpress: 512);
            also the default statistics window of post-RoPE statistics.
        n_sink: first prompt positions always kept, whose queries are left out of the statistics
            (kvpress: 4). By original position, so a propagation cut cannot make a later token a sink.
        use_covariance: include the query covariance (kvpress: ``True``); ``False`` uses the mean only.
        use_vnorm: rescale by the value norms (kvpress: ``True``).
        epsilon: added to the probabilities before the value-norm rescaling (kvpress: 0.0).
        stats_window: the most recent queries the statistics are taken over (sinks excluded). ``None``:
            every query past the sinks with ``rope_theta`` (kvpress), the last ``n_future_positions``
            without (see the module docstring for why).
        rope_theta: ``"model"`` (default): the model's own plain-RoPE base, from its config, when its
            rotary embedding is plain RoPE (the adapter reports it: ``LayerView.rope_theta``); then
            queries are rotated back and kvpress's pre-RoPE computation runs exactly; a model with
            scaled, partial or per-layer RoPE gets the post-RoPE statistics. A number: that base.
            ``None``: post-RoPE statistics, for any model.
    """

    kind = "expected_attention"

    budget: Budget = 0.1

    @model_validator(mode="after")
    def _check(self) -> ExpectedAttention:
        if isinstance(self.budget, int) and self.budget <= self.n_sink:
            raise ValueError(
                f"budget ({self.budget}) must exceed n_sink ({self.n_sink}) to leave room for scored entries"
            )
        return self

    def resolved_budget(self, prompt_len: int) -> int:
        """Entries kept per KV head for a prompt of ``prompt_len`` tokens (a fraction floored at
        ``n_sink + 8``)."""
        return resolve_budget(self.budget, prompt_len, floor=self.n_sink + MIN_SCORED)

    def theta_for(self, view: LayerView) -> float | None:
        """The RoPE base this policy undoes on ``view`` (``None``: post-RoPE statistics)."""
        return view.rope_theta if self.rope_theta == "model" else self.rope_theta  # type: ignore[return-value]

    def statistics_window(self, num_tokens: int, theta: float | None = None) -> int:
        """How many of the last tokens present the query statistics read (sinks among them excluded);
        ``theta``: the RoPE base in use (:meth:`theta_for`)."""
        if self.stats_window is not None:
            window = self.stats_window
        elif theta is not None:
            window = num_tokens
        else:
            window = self.n_future_positions
        return min(window, num_tokens)

    def key_scores(self, view: LayerView, state: RequestState | None = None) -> torch.Tensor:
        """``(B, H_kv, T)`` float32 importance of every entry present; sinks score ``+inf``.

        The :class:`~kvpolicy.interfaces.ScoresKeys` contract head-adaptive wrappers (AdaKV) build on,
        with :meth:`resolved_budget`.
        """
        t = view.num_tokens
        theta = self.theta_for(view)
        lo = t - self.statistics_window(t, theta)
        positions = view.positions[:, lo:]
        inv_freq = None
        if theta is not None:
            inv_freq = rope_inverse_frequencies(theta, view.query.shape[-1], view.query.device)
        return expected_attention_scores(
            view.query[:, :, lo:],
            view.key,
            view.value,
            scaling=view.scaling,
            query_mask=positions >= self.n_sink,
            always_keep=view.positions < self.n_sink,
            inv_freq=inv_freq,
            query_positions=positions,
            future_start=view.prompt_len,
            n_future_positions=self.n_future_positions,
            use_covariance=self.use_covariance,
            use_vnorm=self.use_vnorm,
            epsilon=self.epsilon,
        )

    def select(self, view: LayerView, state: RequestState) -> torch.Tensor | None:
        keep = self.resolved_budget(view.prompt_len)
        if view.num_tokens <= keep:
            return None
        # keep > n_sink >= the sinks present, so every +inf sink is among the top entries.
        return self.key_scores(view, state).topk(keep, dim=-1).indices.sort(dim=-1).values


class ExpectedAttentionPreset(ExpectedAttentionSettings, Preset):
    """Expected Attention: query-agnostic cache compression at every layer, full prefill.

    Fields mirror :class:`ExpectedAttention` (``kv_budget`` is its ``budget``).
    """

    kind = "expected_attention"
    description = "Expected Attention: keys future queries are expected to attend (Devoto et al. 2025)"

    kv_budget: Budget = 0.1

    def cache(self) -> ExpectedAttention:
        shared = self.model_dump(include=set(ExpectedAttentionSettings.model_fields))
        return ExpectedAttention(budget=self.kv_budget, **shared)

    def build(self) -> Policy:
        return Policy(AllTokens(), self.cache())
