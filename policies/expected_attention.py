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
the *average* rotation the module's own rotary embedding applies over those positions,
``R̄ = mean_p R(p)`` with ``R(p) = diag(cos p) + diag(sin p)·P`` from ``module.rotary_emb`` whatever
its rope type: ``μ' = R̄μ``, ``Σ' = R̄ΣR̄ᵀ`` (one Gaussian with the averaged rotation; kvpress notes
that a mixture over the positions estimated better but scored lower end to end). A
:class:`~kvpolicy.interfaces.LayerView` holds queries *after* RoPE, so each post-RoPE query is first
rotated back to pre-RoPE at its original position, then the kvpress computation runs, with the future
positions ``prompt_len .. prompt_len + n_future_positions - 1`` (where decoding continues, whatever a
propagation cut left at this layer). The rotation comes from, in this order (default
``rope_theta="model"``):

* plain RoPE (the adapter reports the model's base, ``LayerView.rope_theta``, when its rotary
  embedding is plain RoPE: HF's half-rotation layout, no rope scaling, no partial rotation, one kind
  for every layer; or a number given as ``rope_theta`` by hand): the tables computed here from the
  base, as transformers computes them (RoPE is orthogonal: ``q_pre = R(p)ᵀ q_post``; the mean
  rotation averaged in float64). A wrong theta silently gives wrong statistics, hence the base comes
  from the model's config, never from a guess.
* any other rotary embedding (``LayerView.rotary``: the model's own rotary module for this layer, which
  the adapters pass for every rope type but ``dynamic``, e.g. Llama 3.1's ``llama3`` scaling,
  ``linear``, ``yarn``, ``longrope``, partial rotation, and Gemma 3's local and global rotaries, each
  layer its own): its ``(cos, sin)`` at the queries' positions undo the rotation
  (``q_pre = (q·cos - P q·sin) / (cos² + sin²)``, which also removes the ``attention_scaling`` some
  rope types fold into the tables), and its tables at the future positions, averaged in float64,
  give ``R̄`` (so the ``attention_scaling`` is in ``R̄`` as in kvpress's). Where the tables cover
  only the first ``d_rot < d`` dimensions (partial rotation) ``R̄`` is the identity on the rest, as
  the model passes them through; kvpress's square ``R`` assumes ``d_rot = d`` (its broadcast fails
  otherwise), so that case is an extension, not a copy. The tables are float32 here, where kvpress
  takes them in the model's dtype (bf16 on a GPU): differences of rounding only.
* neither (``rope_theta=None``; or a model without a rotary embedding the adapter can offer: learned
  or no positions; ``dynamic`` RoPE, whose module changes its frequencies when called at new
  positions; latent attention (MLA), whose rotated part is last; an attention that applies its tables
  other than in the half-rotation layout, as the adapter's probe finds for Cohere, GLM, Helium and
  ERNIE 4.5 (interleaved pairs) and Phi (its attention splits the rotated part off before the
  helper)): statistics of the post-RoPE queries of the
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
from collections.abc import Callable
from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator

from kvpolicy.config import Budget, Settings, resolve_budget
from kvpolicy.interfaces import CachePolicy, LayerView
from kvpolicy.policies.presets import CachePreset
from kvpolicy.scoring import SelectsTopScores
from kvpolicy.state import RequestState

#: Entries chosen by score that a fractional budget leaves besides the sinks (SnapKV's default window).
MIN_SCORED = 8

#: Elements (``B · H · rows · d``) of one fp32 temporary: bounds the memory of statistics and scores.
_CHUNK_ELEMENTS = 1 << 24


#: ``LayerView.rotary``: ``(B, n)`` long positions to ``(cos, sin)``, each ``(B, n, d_rot)``.
Rotary = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


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
    return (torch.diag(cos) + torch.diag(sin) @ _rotate_half_matrix(cos.shape[0], device)).float()


def _rotate_half_matrix(d: int, device: torch.device | str | None) -> torch.Tensor:
    """``(d, d)`` float64 ``P`` with ``P x = rotate_half(x)``."""
    eye = torch.eye(d // 2, dtype=torch.float64, device=device)
    p = torch.zeros(d, d, dtype=torch.float64, device=device)
    p[d // 2 :, : d // 2] = eye
    p[: d // 2, d // 2 :] = -eye
    return p


# -- any rotary embedding, from the model's own tables (LayerView.rotary) ----------------------------
def _check_tables(cos: torch.Tensor, head_dim: int) -> int:
    width = cos.shape[-1]
    if width % 2 or width > head_dim:
        raise ValueError(
            f"the rotary tables are {width} wide for a head dimension of {head_dim}: expected an even "
            "width no larger than the head (the half-rotation layout on the first d_rot dimensions)"
        )
    return width


def unrotate_with_tables(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo a rotary embedding from its own tables, in float32.

    Args:
        x: ``(B, H, W, d)`` vectors after the rotation ``x·cos + rotate_half(x)·sin`` on the first
            ``d_rot`` dimensions (the rest passed through).
        cos: ``(B, W, d_rot)`` the cosine table each was rotated with (HF's half-rotation layout).
        sin: ``(B, W, d_rot)`` the sine table.

    Returns:
        ``(B, H, W, d)`` float32 vectors before it: ``(x·cos - rotate_half(x)·sin) / (cos² + sin²)``
        on the rotated part (the division removes a scale folded into the tables, e.g. YaRN's).
    """
    width = _check_tables(cos, x.shape[-1])
    x = x.float()
    cos, sin = cos.float()[:, None], sin.float()[:, None]  # (B, 1, W, d_rot)
    rot = x[..., :width]
    back = (rot * cos - rotate_half(rot) * sin) / (cos * cos + sin * sin)
    return back if width == x.shape[-1] else torch.cat((back, x[..., width:]), dim=-1)


def mean_rotary_rotation(
    rotary: Rotary, start: int, count: int, head_dim: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """``(d, d)`` float32: the rotation ``rotary`` applies, averaged over positions
    ``start .. start + count - 1`` (kvpress's ``apply_avg_rope``: ``mean_p diag(cos p) + diag(sin p)·P``),
    the identity on dimensions past the tables' width. Averaged in float64."""
    positions = torch.arange(start, start + count, device=device)[None]
    cos, sin = rotary(positions)
    width = _check_tables(cos, head_dim)
    cos, sin = cos[0].double().mean(dim=0), sin[0].double().mean(dim=0)  # (d_rot,)
    rotation = torch.eye(head_dim, dtype=torch.float64, device=cos.device)
    rotation[:width, :width] = torch.diag(cos) + torch.diag(sin) @ _rotate_half_matrix(width, cos.device)
    return rotation.float()


# -- statistics and scores ------------------------------------------------------------------------
def query_statistics(
    query: torch.Tensor,
    mask: torch.Tensor | None = None,
    use_covariance: bool = True,
    positions: torch.Tensor | None = None,
    inv_freq: torch.Tensor | None = None,
    rotary: Rotary | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean and (population) covariance of the queries each head, over the tokens of ``mask``.

    Two passes over token chunks (mean, then centred outer products): no fp32 copy of the whole
    window, and no cancellation from ``E[qqᵀ] - μμᵀ``.

    Args:
        query: ``(B, H, W, d)``.
        mask: ``(B, W)`` bool, which tokens count (default all); rows with none give zeros.
        use_covariance: ``False`` skips the covariance (returned as ``None``).
        positions: ``(B, W)`` query positions, needed with ``inv_freq`` or ``rotary``.
        inv_freq: ``(d/2,)``: undo plain RoPE first (:func:`unrotate`).
        rotary: the model's rotary embedding (``LayerView.rotary``): undo it first
            (:func:`unrotate_with_tables`).

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
        elif rotary is not None:
            assert positions is not None
            q = unrotate_with_tables(q, *rotary(positions[:, lo : lo + step]))
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
    rotary: Rotary | None = None,
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
        query: ``(B, H_q, W, d)`` the queries to take statistics of: post-RoPE (``inv_freq`` and
            ``rotary`` ``None``: used in the keys' frame as they are) or, with ``inv_freq`` or
            ``rotary``, post-RoPE queries that are rotated back to pre-RoPE, whose statistics are then
            moved by the rotation averaged over positions
            ``future_start .. future_start + n_future_positions - 1`` (kvpress).
        key: ``(B, H_kv, T, d)`` after RoPE; ``H_q`` a multiple of ``H_kv``.
        value: ``(B, H_kv, T, d_v)``.
        scaling: the attention's softmax scale ``s``.
        query_mask: ``(B, W)`` bool, the queries that count (default all).
        always_keep: ``(B, T)`` bool, entries always kept (sinks): out of the softmax, score ``+inf``.
        inv_freq: ``(d/2,)`` plain-RoPE inverse frequencies (:func:`rope_inverse_frequencies`), or
            ``None``.
        rotary: instead of ``inv_freq``, the model's own rotary embedding (``LayerView.rotary``), any
            rope type (:func:`unrotate_with_tables`, :func:`mean_rotary_rotation`).
        query_positions: ``(B, W)`` positions of the queries (needed with ``inv_freq`` or ``rotary``).
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
    if inv_freq is not None and rotary is not None:
        raise ValueError("give inv_freq (plain RoPE) or rotary (the model's own tables), not both")
    if (inv_freq is not None or rotary is not None) and query_positions is None:
        raise ValueError("query_positions are needed to undo RoPE (inv_freq or rotary given)")
    mean, cov = query_statistics(query, query_mask, use_covariance, query_positions, inv_freq, rotary)
    rotation = None
    if inv_freq is not None:
        rotation = mean_rope_rotation(future_start, n_future_positions, inv_freq.to(query.device))
    elif rotary is not None:
        rotation = mean_rotary_rotation(rotary, future_start, n_future_positions, d, query.device)
    if rotation is not None:
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


class ExpectedAttention(ExpectedAttentionSettings, SelectsTopScores, CachePolicy):
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
            every query past the sinks with pre-RoPE statistics (kvpress), the last
            ``n_future_positions`` with post-RoPE ones (see the module docstring for why).
        rope_theta: ``"model"`` (default): the model's own rotation: plain RoPE from its base when the
            adapter reports one (``LayerView.rope_theta``), else the model's own rotary embedding
            (``LayerView.rotary``: scaled, partial or per-layer RoPE); queries are rotated back and
            kvpress's pre-RoPE computation runs; post-RoPE statistics where the view has neither. A
            number: plain RoPE with that base. ``None``: post-RoPE statistics, for any model.
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

    def rotary_for(self, view: LayerView) -> Rotary | None:
        """The model's own rotary embedding this policy undoes on ``view`` where no plain-RoPE base
        applies (``rope_theta="model"`` on a model with another rotary embedding), else ``None``."""
        if self.rope_theta != "model" or view.rope_theta is not None:
            return None
        return view.rotary

    def statistics_window(self, num_tokens: int, theta: float | None = None, rotary: bool = False) -> int:
        """How many of the last tokens present the query statistics read (sinks among them excluded);
        ``theta``: the RoPE base in use (:meth:`theta_for`); ``rotary``: whether the model's own rotary
        embedding is undone instead (:meth:`rotary_for`)."""
        if self.stats_window is not None:
            window = self.stats_window
        elif theta is not None or rotary:
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
        rotary = None if theta is not None else self.rotary_for(view)
        lo = t - self.statistics_window(t, theta, rotary is not None)
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
            rotary=rotary,
            query_positions=positions,
            future_start=view.prompt_len,
            n_future_positions=self.n_future_positions,
            use_covariance=self.use_covariance,
            use_vnorm=self.use_vnorm,
            epsilon=self.epsilon,
        )


class ExpectedAttentionPreset(ExpectedAttentionSettings, CachePreset):
    """Expected Attention: query-agnostic cache compression at every layer, full prefill.

    Fields mirror :class:`ExpectedAttention` (``kv_budget`` is its ``budget``).
    """

    kind = "expected_attention"
    description = "Expected Attention: keys future queries are expected to attend (Devoto et al. 2025)"

    policy_class = ExpectedAttention
    settings_class = ExpectedAttentionSettings

    kv_budget: Budget = 0.1
