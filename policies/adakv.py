"""Ada-KV (Feng et al. 2024, arXiv 2407.11550): one layer budget shared adaptively by its KV heads.

A uniform budget gives every KV head the same number of entries, although some heads concentrate
their attention on a few keys and others spread it wide. Ada-KV keeps a layer's total,
``budget * H_kv`` entries, and lets the scores decide how it splits: each head first keeps a
floor of its own best entries, then the rest of the layer's budget goes to the best remaining
entries over all heads together. The same memory is spent where attention actually is.

:class:`AdaKV` wraps any cache policy that scores keys (:class:`~kvpolicy.interfaces.ScoresKeys`,
e.g. :class:`~kvpolicy.policies.snapkv.SnapKV`: Ada-SnapKV) and allocates that policy's budget.
The selection is a ragged :class:`~kvpolicy.interfaces.PerHead`: the paged cache stores exactly
each head's count, so memory is really freed, not masked.

Defaults and where kvpolicy follows which reference:

* ``floor = 0.2``: kvpress's ``AdaKVPress.alpha_safeguard = 0.20`` (github.com/NVIDIA/kvpress,
  ``kvpress/presses/adakv_press.py``) and the official code's ``floor_alpha`` (github.com/FFY0/AdaKV,
  ``adaptive_snapkv/monkeypatch/snapkv_utils.py``, ``AdaptiveSnapKVCluster``), which
  ``experiments/LongBench/GQA_eval_longbench.sh`` sets to 0.2 ("we suggest setting floor_alpha to
  0.2 while using gqa"; its earlier multi-head runs used 0.5).
* The allocation is kvpress's: each head's top ``int(floor * budget)`` entries are kept, then the
  global top ``H_kv * budget`` over all heads of what remains (kvpress sets the floor entries to the
  score maximum and prunes the bottom of the flattened scores; here the budget counts the window,
  whose scores are ``+inf``, as kvpress's ``n_kept`` does). The official code instead counts the
  joint top-k per head, ``n_h``, and keeps ``round(n_h * (1 - floor) + floor * (budget - window))``
  prefix entries plus the window; both keep each head's own top entries, and for ``floor = 1`` both
  are plain SnapKV. The official ``normalize`` and ``skip`` (uniform first layers) options are not
  implemented.
* Scores are the inner policy's own (SnapKV: window attention summed over the window queries and
  the query heads of each KV group; the official code averages, a common factor that cannot change a
  ranking).

The budget is the inner policy's: ``AdaKV(inner=SnapKV(budget=256))`` keeps on average 256 entries
per KV head and layer, and exactly ``256 * H_kv`` per layer. ``floor = 1`` is the inner policy
itself (every head its own top ``budget``), and :meth:`AdaKV.select` then returns the inner
selection unchanged, so ties break as the inner policy breaks them. The inner policy's decode-time
hooks do not run (Ada-KV allocates at prefill).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, field_serializer, field_validator

from kvpolicy.interfaces import CachePolicy, LayerView, PerHead, Policy, PropagationPolicy, ScoresKeys
from kvpolicy.policies.full import AllTokens
from kvpolicy.policies.presets import _SnapKVSettings
from kvpolicy.policies.snapkv import SnapKV
from kvpolicy.state import RequestState


def floor_count(budget_per_head: int, floor: float) -> int:
    """Entries every head keeps of its own best: ``int(floor * budget)``, in ``[1, budget]``.

    At least one, so no head of the cache is ever empty (a :class:`PerHead` count is ``>= 1``).
    """
    return min(budget_per_head, max(1, int(floor * budget_per_head)))


def adaptive_allocation(scores: torch.Tensor, budget_per_head: int, floor: float) -> PerHead:
    """Ada-KV's allocation of ``H * budget_per_head`` entries over the heads of a layer.

    Each head keeps its top ``f = floor_count(budget_per_head, floor)`` entries, then the
    ``H * (budget_per_head - f)`` best entries left over all heads together are kept wherever they
    are. Every head's kept set is therefore its own top ``counts[b, h]`` entries (up to ties); only
    the counts adapt. Entries scoring ``+inf`` (a policy's observation window) are always kept,
    provided a head has at most ``budget_per_head`` of them. Pure tensor ops, no host sync (the
    index width is a static bound).

    Args:
        scores: ``(B, H, T)`` float scores, higher is kept first.
        budget_per_head: the average entries per head, ``>= 1``; ``>= T`` keeps everything.
        floor: fraction of ``budget_per_head`` every head keeps of its own best, in ``(0, 1]``.

    Returns:
        :class:`PerHead` with ``indices`` ``(B, H, C)`` int64, each head's kept entries first in
        ascending order (then dropped ones, ignored), width
        ``C = min(T, H * budget_per_head - (H - 1) * f)``, the most one head can get; ``counts`` ``(B, H)`` int64, summing to ``H * budget_per_head``
        per row (``H * T`` when nothing is dropped).
    """
    b, h, t = scores.shape
    positions = torch.arange(t, device=scores.device)
    if budget_per_head >= t:
        indices = positions.expand(b, h, t).clone()
        return PerHead(indices, torch.full((b, h), t, dtype=torch.long, device=scores.device))
    base = floor_count(budget_per_head, floor)
    # The floor: each head's own best, raised above every score so the joint step takes them first.
    own = scores.topk(base, dim=-1).indices
    ranked = scores.float().scatter(-1, own, float("inf"))
    picked = ranked.reshape(b, h * t).topk(h * budget_per_head, dim=-1).indices  # (B, H * budget)
    kept = torch.zeros(b, h * t, dtype=torch.bool, device=scores.device)
    kept = kept.scatter(1, picked, True).view(b, h, t)
    counts = kept.sum(dim=-1)
    # Kept entries first in position order, then the dropped ones (sort key: p if kept, else T + p).
    width = min(t, h * budget_per_head - (h - 1) * base)
    order = torch.where(kept, positions, positions + t)
    indices = order.topk(width, dim=-1, largest=False, sorted=True).values % t
    return PerHead(indices, counts)


def _inner_from(value: Any) -> Any:
    """A kind name or a ``to_dict()`` form of a cache policy, built through the registry."""
    from kvpolicy.registry import component_from_dict

    if isinstance(value, str):
        return component_from_dict({"kind": value})
    if isinstance(value, dict):
        return component_from_dict(value)
    return value


class AdaKV(CachePolicy):
    """The inner policy's scores and budget, allocated adaptively over each layer's KV heads.

    Attributes:
        inner: a cache policy that scores keys (:class:`~kvpolicy.interfaces.ScoresKeys`: it has
            ``key_scores`` and ``resolved_budget``), e.g. ``SnapKV(budget=256)``; also given as its
            ``to_dict()`` form or its kind (``"snapkv"``: its defaults). Its budget is the average
            entries per KV head (a layer keeps ``budget * H_kv``), its window is kept on every head.
        floor: fraction of the budget every KV head keeps of its own best entries, in ``(0, 1]``
            (kvpress's ``alpha_safeguard``, the official ``floor_alpha``: 0.2). ``1`` is the inner
            policy unchanged.
    """

    kind = "ada"

    inner: CachePolicy = Field(default_factory=SnapKV)
    floor: float = Field(0.2, gt=0.0, le=1.0)

    @field_validator("inner", mode="before")
    @classmethod
    def _check_inner(cls, value: Any) -> Any:
        inner = _inner_from(value)
        if not isinstance(inner, CachePolicy):
            raise ValueError(
                f"inner={value!r} is not a cache policy; give one that scores keys, e.g. 'snapkv'"
            )
        if not isinstance(inner, ScoresKeys):
            raise ValueError(
                f"inner={inner!r}: {type(inner).__name__} ({inner.kind!r}) does not score keys "
                "(no key_scores/resolved_budget, see kvpolicy.interfaces.ScoresKeys); "
                "Ada-KV allocates a scoring policy's budget, e.g. 'snapkv'"
            )
        return inner

    @field_serializer("inner")
    def _dump_inner(self, inner: CachePolicy) -> dict[str, Any]:
        return inner.to_dict()  # tagged with its kind, so that it can be rebuilt

    @property
    def scorer(self) -> ScoresKeys:
        return self.inner  # type: ignore[return-value]  # validated

    def resolved_budget(self, prompt_len: int) -> int:
        """Average entries per KV head (the inner policy's budget, with its floors)."""
        return self.scorer.resolved_budget(prompt_len)

    def check_model(self, num_layers: int) -> None:
        self.inner.check_model(num_layers)

    def check_composition(self, propagation: PropagationPolicy) -> None:
        self.inner.check_composition(propagation)

    def select(self, view: LayerView, state: RequestState) -> PerHead | torch.Tensor | None:
        budget = self.resolved_budget(view.prompt_len)
        if view.num_tokens <= budget:
            return None
        if self.floor >= 1.0:
            return self.inner.select(view, state)  # every head its own top budget: the inner policy
        kept = adaptive_allocation(self.scorer.key_scores(view, state), budget, self.floor)
        # Prefill only: one sync per layer trims the indices to the longest head (the engine's
        # index check reads them anyway), so the gather before caching is no wider than needed.
        width = int(kept.counts.max())
        return PerHead(kept.indices[..., :width], kept.counts)


class AdaSnapKVPreset(_SnapKVSettings):
    """Ada-SnapKV: SnapKV's scores with each layer's budget allocated adaptively over its KV heads."""

    kind = "ada-snapkv"
    description = "Ada-SnapKV: SnapKV with head-adaptive budgets (Feng et al. 2024)"

    floor: float = Field(0.2, gt=0.0, le=1.0)

    def build(self) -> Policy:
        return Policy(AllTokens(), AdaKV(inner=self.cache(), floor=self.floor))


__all__ = ["AdaKV", "AdaSnapKVPreset", "adaptive_allocation", "floor_count"]
