"""DefensiveKV (Feng et al. 2025, arXiv 2510.13334): worst-case (defensive) aggregation of key scores.

Score-then-evict methods aggregate each entry's importance over several observations (the window
queries and the query heads of a KV group) with a mean, trusting that the entries important now stay
important. DefensiveKV replaces the mean by a two-step, linear-time *defensive* aggregation that
bounds the worst case:

1. take the **maximum** over the observations (an entry any observation needs is not evicted on
   average grounds);
2. **clamp** the maxima from below at their mean over the layer's keys, so that every entry no
   observation singles out scores the same (the ranking among them carries no signal worth trusting;
   a later refinement, e.g. CriticalKV's value norms, decides among them).

:class:`DefensiveKV` (kind ``defensive``) wraps a cache policy that scores keys and can show its
per-observation scores, and is itself a key scorer (:class:`~kvpolicy.interfaces.ScoresKeys`), so
:class:`~kvpolicy.policies.criticalkv.CriticalKV` and :class:`~kvpolicy.policies.adakv.AdaKV` wrap it
in turn. Alone it keeps each KV head's top ``budget`` defensive scores (the inner policy's budget).

Per-observation scores come from the inner policy's ``observation_scores(view, state)`` method
(``(B, H_kv, N, T)``, ``+inf`` on entries always kept: :class:`ScoresObservations`) or, for
:class:`~kvpolicy.policies.snapkv.SnapKV`, which has none, from :func:`snapkv_observation_scores`
here: its window attention before the sum over the window queries and the group's query heads. An
inner scorer with neither is refused when the policy is built: a single, already aggregated score per
key leaves nothing to take the worst case over.

Reference: kvpress 0.5.5 has no DefensiveKV; this follows the paper's official code,
github.com/FFY0/DefensiveKV (a kvpress fork), ``kvpress/presses/efficient_defensivekv_press.py``
(``EfficientDefensiveKVPress.score``, "Defensive Mechanism": ``max_scores =
scores.max(dim=2).values.max(dim=-2).values``, ``scores = max_scores.clamp(min=max_scores.mean(dim=-1,
keepdim=True))``), with its SnapKV observation scores: softmax attention of each window query and
query head over the keys before the window, average-pooled along the keys (kernel 5), each row
rescaled to keep its attention mass (``pooled / pooled.sum() * unpooled.sum()``); window 32. The
window keys are then always kept. The official press then applies a CriticalKV-style two-stage
selection with head-adaptive (Ada-KV) budgets, which the ``defensivekv`` preset composes from
:class:`~kvpolicy.policies.criticalkv.CriticalKV` (``adaptive=True``, ``floor=0``: no safeguard, as
the official allocation).

Where kvpolicy differs from the official code, and why:

* The official stage 1 keeps, per head, the fewest entries holding ``0.9 - window_bias`` of the
  head's (unpooled, group- and window-averaged) prefix attention, capped at the budget minus the
  window; the preset uses CriticalKV's stage 1 as kvpress has it (``first_stage_ratio = 0.5`` of each
  head's count), since the composition only sees the scores the defensive scorer hands on (and the
  official ``window_bias`` is read from the last ``window`` *prefix* keys, after the window was cut).
* The official stage 2 weighs by ``‖W_o v‖₁`` divided by its sum over the layer's KV heads, per
  token; the preset uses kvpress's CriticalKV weighting ``(score + 1e-4) · ‖W_o v‖₁``.
* The mean of step 2 is over the keys that are not always kept (the official code's prefix keys, as
  here for SnapKV); ``+inf`` entries stay ``+inf``.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

import torch
from pydantic import Field, field_validator

from kvpolicy.config import Budget
from kvpolicy.interfaces import CachePolicy, LayerView, Policy
from kvpolicy.policies.criticalkv import CriticalKV, ScorerWrapper, descending_ranks, kept_first
from kvpolicy.policies.full import AllTokens
from kvpolicy.policies.presets import _SnapKVSettings
from kvpolicy.policies.snapkv import SnapKV
from kvpolicy.scoring import pool_scores
from kvpolicy.state import RequestState


@runtime_checkable
class ScoresObservations(Protocol):
    """A key scorer that shows its scores before aggregating them over observations."""

    def observation_scores(self, view: LayerView, state: RequestState) -> torch.Tensor:
        """``(B, H_kv, N, T)`` float importance of every key present for each of ``N`` observations
        (e.g. window queries x query heads of the KV group); ``+inf`` on entries always kept."""
        ...


def snapkv_observation_scores(view: LayerView, window: int, kernel: int, pooling: str) -> torch.Tensor:
    """SnapKV's per-observation scores: one row per window query and query head of each KV group.

    Each of the last ``w = min(window, T)`` queries attends (softmax over all keys present, causal
    inside the window, float32); the keys before the window are pooled along the key axis (``kernel``,
    ``pooling`` as SnapKV) and each row rescaled to the attention mass it had before pooling (the
    official DefensiveKV code); the window keys score ``+inf``.

    Returns:
        ``(B, H_kv, n_rep * w, T)`` float32.
    """
    q, k = view.query, view.key
    b, h_q, t, d = q.shape
    h_kv = k.shape[1]
    n_rep = h_q // h_kv
    w = min(window, t)
    queries = q[:, :, t - w :].to(k.dtype).reshape(b, h_kv, n_rep * w, d)
    logits = (queries @ k.transpose(-1, -2)).float() * view.scaling  # (B, H_kv, n_rep * w, T)
    q_pos = torch.arange(t - w, t, device=k.device).repeat(n_rep).view(n_rep * w, 1)
    logits = logits.masked_fill(torch.arange(t, device=k.device).view(1, t) > q_pos, float("-inf"))
    prefix = logits.softmax(dim=-1)[..., : t - w]
    pooled = pool_scores(prefix, kernel, pooling)  # type: ignore[arg-type]
    mass = pooled.sum(dim=-1, keepdim=True)
    pooled = pooled * (prefix.sum(dim=-1, keepdim=True) / mass.clamp_min(torch.finfo(mass.dtype).tiny))
    return torch.cat([pooled, pooled.new_full((b, h_kv, n_rep * w, w), float("inf"))], dim=-1)


def defensive_aggregate(observations: torch.Tensor) -> torch.Tensor:
    """DefensiveKV's aggregation: the maximum over observations, clamped from below at its mean.

    Args:
        observations: ``(B, H, N, T)`` scores, ``+inf`` on entries always kept.

    Returns:
        ``(B, H, T)`` float32: ``max(m, mean(m))`` with ``m`` the maximum over the ``N`` observations and
        the mean over the finite entries of each row; ``+inf`` entries stay ``+inf``.
    """
    worst = observations.float().amax(dim=2)
    finite = torch.isfinite(worst)
    mean = torch.where(finite, worst, 0.0).sum(dim=-1, keepdim=True) / finite.sum(
        dim=-1, keepdim=True
    ).clamp_min(1)
    return torch.maximum(worst, mean)


class DefensiveKV(ScorerWrapper):
    """The inner policy's per-observation scores, aggregated defensively (worst case, then a floor at
    the mean); each KV head keeps its top ``budget`` (the inner policy's).

    Attributes:
        inner: a key scorer with per-observation scores (:class:`ScoresObservations`) or a
            :class:`~kvpolicy.policies.snapkv.SnapKV` (its window queries and query heads are the
            observations), as object, ``to_dict()`` form or kind (default ``"snapkv"``).
    """

    kind = "defensive"

    @field_validator("inner")
    @classmethod
    def _check_observations(cls, inner: CachePolicy) -> CachePolicy:
        if not isinstance(inner, SnapKV | ScoresObservations):
            raise ValueError(
                f"inner={inner!r}: {type(inner).__name__} ({inner.kind!r}) gives one aggregated score per "
                "key, with no per-observation scores (observation_scores) to take the worst case over; "
                "DefensiveKV wraps 'snapkv' or a scorer with observation_scores"
            )
        return inner

    def observation_scores(self, view: LayerView, state: RequestState) -> torch.Tensor:
        """``(B, H_kv, N, T)``: the inner policy's per-observation scores."""
        inner = self.inner
        if isinstance(inner, ScoresObservations):
            return inner.observation_scores(view, state)
        assert isinstance(inner, SnapKV)
        return snapkv_observation_scores(view, inner.window, inner.kernel, inner.pooling)

    def key_scores(self, view: LayerView, state: RequestState) -> torch.Tensor:
        """``(B, H_kv, T)`` float32 defensive scores (:func:`defensive_aggregate`), ``+inf`` on the
        entries the inner policy always keeps."""
        return defensive_aggregate(self.observation_scores(view, state))

    def select(self, view: LayerView, state: RequestState) -> torch.Tensor | None:
        budget = self.resolved_budget(view.prompt_len)
        if view.num_tokens <= budget:
            return None
        # Many entries tie at the mean: the stable ranking keeps the earliest of them.
        return kept_first(descending_ranks(self.key_scores(view, state)) < budget, budget)


class DefensiveKVPreset(_SnapKVSettings):
    """DefensiveKV: defensive aggregation of SnapKV's window attention, refined by CriticalAdaKV.

    The official composition (github.com/FFY0/DefensiveKV): SnapKV's observation scores (window 32,
    average pooling with kernel 5), defensive aggregation, CriticalKV's two-stage selection with
    head-adaptive budgets and no per-head safeguard (``floor = 0``: one entry).

    Attributes:
        kv_budget: entries kept per layer and KV head on average, window included: tokens (int) or a
            fraction of the prompt (float, at least ``2 * window``).
        window: observation window of SnapKV's scores (the official code's 32).
        kernel: pooling kernel along the key axis (odd; official 5).
        pooling: ``"avg"`` (official) or ``"max"``.
    """

    kind = "defensivekv"
    description = "DefensiveKV: worst-case aggregated SnapKV scores + CriticalAdaKV (Feng et al. 2025)"

    kv_budget: Budget = 0.1
    window: int = Field(32, ge=1)
    kernel: int = Field(5, ge=1)
    pooling: Literal["max", "avg"] = "avg"
    epsilon: float = Field(1e-4, ge=0.0, allow_inf_nan=False)
    first_stage_ratio: float = Field(0.5, ge=0.0, le=1.0)
    floor: float = Field(0.0, ge=0.0, le=1.0)

    def build(self) -> Policy:
        cache = CriticalKV(
            inner=DefensiveKV(inner=self.cache()),
            epsilon=self.epsilon,
            first_stage_ratio=self.first_stage_ratio,
            adaptive=True,
            floor=self.floor,
        )
        return Policy(AllTokens(), cache)


__all__ = [
    "DefensiveKV",
    "DefensiveKVPreset",
    "ScoresObservations",
    "defensive_aggregate",
    "snapkv_observation_scores",
]
