"""CriticalKV (Feng et al. 2025, arXiv 2502.03805): a key scorer refined by what each entry does to the output.

An attention head's output is ``Σ_i a_i · W_o v_i``: an entry with large attention but a value that
the output projection maps to almost nothing barely changes the output, and the reverse. CriticalKV
bounds the output perturbation of evicting entry ``i`` by ``a_i · ‖W_o v_i‖₁`` and selects in two
stages:

1. each KV head keeps its top ``int(first_stage_ratio * budget)`` entries by the inner scores alone
   (attention is the more reliable signal, so half the budget trusts it);
2. the rest of the budget goes to the best remaining entries by ``(score + epsilon) · ‖W_o v‖₁``,
   the norm averaged over the query heads of each KV group (``W_o`` the slice of the layer's output
   projection that reads that query head's output).

:class:`CriticalKV` wraps any cache policy that scores keys (:class:`~kvpolicy.interfaces.ScoresKeys`,
e.g. SnapKV or Expected Attention, given as object, ``to_dict()`` form or kind name) and spends that
policy's budget. ``adaptive=True`` is CriticalAdaKV: each layer's ``budget * H_kv`` entries are first
allocated over the KV heads by Ada-KV (:func:`~kvpolicy.policies.adakv.adaptive_allocation` on the
inner scores, each head keeping ``floor`` of the budget), then each head runs the two stages within
its own count. The selection is a ragged :class:`~kvpolicy.interfaces.PerHead`: memory is freed.

Reference: NVIDIA kvpress 0.5.5 (github.com/NVIDIA/kvpress), ``kvpress/presses/criticalkv_press.py``,
``CriticalKVPress`` and ``CriticalAdaKVPress``. Defaults are kvpress's: ``epsilon = 1e-4``,
``first_stage_ratio = 0.5``, ``alpha_safeguard`` (here ``floor``) ``= 0.2``, the L1 norm of
``W_o v`` (``vwl1norm``), averaged over each KV group. kvpress's evaluation registry
(``evaluation/evaluate_registry.py``) runs ``critical_snapkv = CriticalKVPress(SnapKVPress())`` and
``critical_adakv_snapkv = CriticalAdaKVPress(SnapKVPress())`` (and the same around
``ExpectedAttentionPress(use_vnorm=False)``): SnapKV is the default inner policy here too, with
kvpolicy's SnapKV defaults (window 8, kernel 7, max pooling: FastKV's reference) as ``ada-snapkv``.
With Expected Attention inside, give it ``use_vnorm=False`` as kvpress advises (otherwise the value
norm counts twice).

Where kvpolicy differs from kvpress, and why:

* The budget is the inner policy's (tokens or fraction kept, with its floors), not
  ``int(k_len * (1 - compression_ratio))``; stage 1 keeps ``int(first_stage_ratio * budget)``.
* kvpress marks chosen entries with ``finfo.max``; here they are ranked first with ``+inf`` and the
  inner policy's ``+inf`` entries (its window or sinks) stay ``+inf`` after weighting (kvpress's
  finite ``max + 1`` window scores are kept the same way in practice). A zero value norm cannot turn
  ``inf · 0`` into NaN here.
* CriticalAdaKV: kvpress boosts each head's top ``int(alpha * n_kept)`` (possibly none) before both
  stages; the boosted entries are thereby kept, so a head keeps its top
  ``max(n_safe, int(first_stage_ratio * count))`` by the inner scores, then fills its count by the
  weighted scores, which is what is computed here, with Ada-KV's floor of at least one entry
  (:func:`~kvpolicy.policies.adakv.floor_count`). Head counts are per sequence (kvpress sums them
  over the batch). ``floor = 0`` is allowed here (one entry per head: the official DefensiveKV's
  allocation has no safeguard).
* ``‖W_o v‖₁`` is computed per KV group and token chunk (one matmul per group, bounded memory) in the
  value's dtype, summed in float32; kvpress loops over query heads over the whole sequence.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, field_serializer, field_validator

from kvpolicy.interfaces import CachePolicy, LayerView, PerHead, Policy, PropagationPolicy, ScoresKeys
from kvpolicy.policies.adakv import adaptive_allocation, floor_count
from kvpolicy.policies.full import AllTokens
from kvpolicy.policies.presets import _SnapKVSettings
from kvpolicy.policies.snapkv import SnapKV
from kvpolicy.state import RequestState

#: Elements of one temporary ``W_o v`` block (bounds the memory of :func:`value_output_norm`).
_CHUNK_ELEMENTS = 1 << 24


# -- shared by the wrappers of this issue (CriticalKV, DefensiveKV, ChunkKV) -------------------------
def scorer_from(value: Any, who: str) -> CachePolicy:
    """The inner policy of a wrapper, from an object, a ``to_dict()`` form or a kind name; a
    ``ValueError`` naming ``inner=`` unless it is a cache policy that scores keys."""
    from kvpolicy.registry import component_from_dict

    inner = value
    if isinstance(value, str):
        inner = component_from_dict({"kind": value})
    elif isinstance(value, dict):
        inner = component_from_dict(value)
    if not isinstance(inner, CachePolicy):
        raise ValueError(f"inner={value!r} is not a cache policy; give one that scores keys, e.g. 'snapkv'")
    if not isinstance(inner, ScoresKeys):
        raise ValueError(
            f"inner={inner!r}: {type(inner).__name__} ({inner.kind!r}) does not score keys "
            "(no key_scores/resolved_budget, see kvpolicy.interfaces.ScoresKeys); "
            f"{who} refines a scoring policy, e.g. 'snapkv' or 'expected_attention'"
        )
    return inner


class ScorerWrapper(CachePolicy):
    """Base of a cache policy around an inner key scorer: validation, JSON form, budget, checks."""

    inner: CachePolicy = Field(default_factory=SnapKV)

    @field_validator("inner", mode="before")
    @classmethod
    def _check_inner(cls, value: Any) -> Any:
        return scorer_from(value, cls.__name__)

    @field_serializer("inner")
    def _dump_inner(self, inner: CachePolicy) -> dict[str, Any]:
        return inner.to_dict()  # tagged with its kind, so that it can be rebuilt

    @property
    def scorer(self) -> ScoresKeys:
        return self.inner  # type: ignore[return-value]  # validated

    def resolved_budget(self, prompt_len: int) -> int:
        """Entries per KV head (on average, for head-adaptive selections): the inner policy's budget."""
        return self.scorer.resolved_budget(prompt_len)

    def check_model(self, num_layers: int) -> None:
        self.inner.check_model(num_layers)

    def check_composition(self, propagation: PropagationPolicy) -> None:
        self.inner.check_composition(propagation)


def descending_ranks(scores: torch.Tensor) -> torch.Tensor:
    """``(..., T)`` long: each entry's rank in its row, 0 for the highest score (ties: lower index
    first)."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    return ranks.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))


def kept_first(kept: torch.Tensor, width: int) -> torch.Tensor:
    """``(B, H, width)`` long: each row's kept entries first in position order, then dropped ones."""
    t = kept.shape[-1]
    positions = torch.arange(t, device=kept.device)
    order = torch.where(kept, positions, positions + t)
    return order.topk(width, dim=-1, largest=False, sorted=True).values % t


# -- CriticalKV --------------------------------------------------------------------------------------
def value_output_norm(value: torch.Tensor, out_proj: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``‖W_o^h v‖₁`` of every value, averaged over the query heads ``h`` of each KV group.

    Args:
        value: ``(B, H_kv, T, d_v)``.
        out_proj: ``(D, H_q * d_v)`` the attention's output projection weight (``o_proj.weight``);
            columns ``h * d_v .. (h + 1) * d_v - 1`` read query head ``h``'s output.
        n_rep: query heads per KV head, ``H_q / H_kv``.

    Returns:
        ``(B, H_kv, T)`` float32 (kvpress's ``CriticalKVPress.vwl1norm``).
    """
    b, h_kv, t, d_v = value.shape
    dim, width = out_proj.shape
    if width != h_kv * n_rep * d_v:
        raise ValueError(
            f"out_proj has shape {tuple(out_proj.shape)}, expected (D, H_q * d_v) = (D, {h_kv * n_rep * d_v}) "
            f"for {h_kv * n_rep} query heads of value width {d_v}: the cached values are not what the "
            "output projection reads (latent attention caches a compressed latent), so output-error-aware "
            "scoring does not apply to this model"
        )
    # (D, H_kv, n_rep, d_v) -> (H_kv, d_v, n_rep * D): one matmul per KV group gives its n_rep outputs.
    w = (
        out_proj.to(value.dtype)
        .view(dim, h_kv, n_rep, d_v)
        .permute(1, 3, 2, 0)
        .reshape(h_kv, d_v, n_rep * dim)
    )
    out = torch.empty(b, h_kv, t, dtype=torch.float32, device=value.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, b * n_rep * dim))
    for g in range(h_kv):
        for lo in range(0, t, step):
            projected = value[:, g, lo : lo + step] @ w[g]  # (B, c, n_rep * D)
            norms = torch.linalg.vector_norm(
                projected.view(b, -1, n_rep, dim), ord=1, dim=-1, dtype=torch.float32
            )
            out[:, g, lo : lo + step] = norms.mean(dim=-1)
    return out


def view_output_norm(view: LayerView) -> torch.Tensor:
    """:func:`value_output_norm` of a layer view; a clear error when the adapter gave no ``out_proj``."""
    if view.out_proj is None:
        raise ValueError(
            f"CriticalKV weighs values by the attention output projection, but layer {view.layer}'s view "
            "has none (LayerView.out_proj is None): the model adapter found no o_proj/out_proj/dense/"
            "c_proj weight on this model's attention. Use the inner policy alone on this model, or an "
            "adapter that sets LayerView.out_proj"
        )
    return value_output_norm(view.value, view.out_proj, view.query.shape[1] // view.key.shape[1])


def two_stage_keep(
    scores: torch.Tensor,
    norms: torch.Tensor,
    counts: torch.Tensor,
    first_counts: torch.Tensor,
    epsilon: float,
) -> torch.Tensor:
    """CriticalKV's two-stage selection, per row.

    Stage 1 keeps each row's top ``first_counts`` entries by ``scores``; stage 2 fills the row to
    ``counts`` entries by ``(scores + epsilon) * norms``. Entries scoring ``+inf`` stay first.

    Args:
        scores: ``(B, H, T)`` the inner policy's scores.
        norms: ``(B, H, T)`` float32 value-output norms (:func:`value_output_norm`).
        counts: ``(B, H)`` long, entries each row keeps.
        first_counts: ``(B, H)`` long, of which chosen by ``scores`` alone (``<= counts``).
        epsilon: added to the scores before weighting.

    Returns:
        ``(B, H, T)`` bool, ``counts`` entries per row. Tensor ops only (no host sync).
    """
    scores = scores.float()
    forced = descending_ranks(scores) < first_counts[..., None]
    forced = forced | torch.isposinf(scores)
    weighted = torch.where(forced, torch.full_like(scores, float("inf")), (scores + epsilon) * norms)
    return descending_ranks(weighted) < counts[..., None]


class CriticalKV(ScorerWrapper):
    """The inner policy's scores refined by ``‖W_o v‖₁``, selected in two stages (CriticalKV), with
    ``adaptive=True`` allocated over each layer's KV heads first (CriticalAdaKV).

    Attributes:
        inner: a cache policy that scores keys (:class:`~kvpolicy.interfaces.ScoresKeys`), e.g.
            ``SnapKV(budget=256)``, its ``to_dict()`` form or its kind (default ``"snapkv"``). Its
            budget is what this policy keeps (per KV head; on average with ``adaptive``).
        epsilon: added to the scores before the value-norm weighting (kvpress: 1e-4).
        first_stage_ratio: fraction of each head's budget chosen by the inner scores alone, in
            ``[0, 1]`` (kvpress: 0.5); ``1`` is the inner policy's selection.
        adaptive: ``False`` (kind ``critical``): every KV head keeps the budget (kvpress's
            ``CriticalKVPress``). ``True``: Ada-KV's allocation first (``CriticalAdaKVPress``), a ragged
            selection whose layer total is ``budget * H_kv``.
        floor: with ``adaptive``, fraction of the budget every head keeps of its own best entries, in
            ``[0, 1]`` (kvpress's ``alpha_safeguard``: 0.2; at least one entry).
    """

    kind = "critical"

    epsilon: float = Field(1e-4, ge=0.0, allow_inf_nan=False)
    first_stage_ratio: float = Field(0.5, ge=0.0, le=1.0)
    adaptive: bool = False
    floor: float = Field(0.2, ge=0.0, le=1.0)

    def key_scores(self, view: LayerView, state: RequestState) -> torch.Tensor:
        """``(B, H_kv, T)`` float32: kvpress's ``CriticalKVPress.score``, the weighted scores with the
        stage-1 entries (and the inner ``+inf`` ones) at ``+inf``; the top ``budget`` of these is
        :meth:`select`'s uniform selection. Not defined with ``adaptive`` (it allocates itself)."""
        if self.adaptive:
            raise ValueError(
                "CriticalKV(adaptive=True) allocates its own budget over the heads and has no key scores "
                "to wrap; wrap CriticalKV(adaptive=False) instead"
            )
        scores = self.scorer.key_scores(view, state).float()
        first = int(self.first_stage_ratio * self.resolved_budget(view.prompt_len))
        forced = (descending_ranks(scores) < first) | torch.isposinf(scores)
        weighted = (scores + self.epsilon) * view_output_norm(view)
        return torch.where(forced, torch.full_like(weighted, float("inf")), weighted)

    def select(self, view: LayerView, state: RequestState) -> PerHead | torch.Tensor | None:
        budget = self.resolved_budget(view.prompt_len)
        if view.num_tokens <= budget:
            return None
        scores = self.scorer.key_scores(view, state)
        b, h, _ = scores.shape
        if self.adaptive:
            counts = adaptive_allocation(scores, budget, self.floor).counts
            base = floor_count(budget, self.floor)
            first = (counts * self.first_stage_ratio).long().clamp_min(base).minimum(counts)
        else:
            counts = torch.full((b, h), budget, dtype=torch.long, device=scores.device)
            first = torch.full_like(counts, int(self.first_stage_ratio * budget))
        kept = two_stage_keep(scores, view_output_norm(view), counts, first, self.epsilon)
        if not self.adaptive:
            return kept_first(kept, budget)
        # Prefill only: one sync per layer trims the indices to the longest head (as AdaKV).
        width = int(counts.max())
        return PerHead(kept_first(kept, width), counts)


class CriticalKVPreset(_SnapKVSettings):
    """CriticalKV: SnapKV's scores refined by the value-output norm, two-stage selection, full prefill.

    Fields: SnapKV's (``kv_budget`` its budget) and CriticalKV's (kvpress's defaults).
    """

    kind = "criticalkv"
    description = "CriticalKV: SnapKV scores weighted by ||W_o v||, two-stage selection (Feng et al. 2025)"

    epsilon: float = Field(1e-4, ge=0.0, allow_inf_nan=False)
    first_stage_ratio: float = Field(0.5, ge=0.0, le=1.0)

    def build(self) -> Policy:
        return Policy(
            AllTokens(),
            CriticalKV(inner=self.cache(), epsilon=self.epsilon, first_stage_ratio=self.first_stage_ratio),
        )


class CriticalAdaKVPreset(CriticalKVPreset):
    """CriticalAdaKV: CriticalKV within head-adaptive (Ada-KV) budgets around SnapKV, full prefill."""

    kind = "criticaladakv"
    description = "CriticalAdaKV: CriticalKV with head-adaptive budgets (Feng et al. 2025)"

    floor: float = Field(0.2, ge=0.0, le=1.0)

    def build(self) -> Policy:
        cache = CriticalKV(
            inner=self.cache(),
            epsilon=self.epsilon,
            first_stage_ratio=self.first_stage_ratio,
            adaptive=True,
            floor=self.floor,
        )
        return Policy(AllTokens(), cache)


__all__ = [
    "CriticalAdaKVPreset",
    "CriticalKV",
    "CriticalKVPreset",
    "ScorerWrapper",
    "scorer_from",
    "two_stage_keep",
    "value_output_norm",
]
