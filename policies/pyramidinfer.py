"""PyramidInfer (Yang et al. 2024, arXiv 2405.12532): prune the context layer by layer during prefill.

Prefill (:class:`PyramidInfer`, a propagation policy). After layer ``l`` the tokens split into the
*recent* ones, the last ``R = 1 + int(L · recent_ratio)``, which always go on, and the *context*
before them. The context is ranked by the attention the recent queries pay it (softmax, causal,
averaged over all query heads, each query row weighted by ``linspace(1, distance_weight, R)`` so
later queries count more, then averaged over rows); the first ``sinks`` positions are always kept.
The layer keeps the top ``int(C_l · s(l))`` of its ``C_l`` context tokens, with the cosine schedule

    s(l) = (1 - decay) · (cos(π l / N) + 1) / 2 + decay,

so pruning is cumulative: the context shrinks by ``s(l)`` at each layer, starting at ``s(0) = 1``.
Pruned tokens stop there (every cache policy still sees each layer's tokens); survivors keep their
original positions. As in the reference, a layer whose pruned context would not exceed
``min(min_context, L - R)`` tokens prunes nothing (so neither do the ones after it).

Decode (:class:`PyramidInferSqueeze`, a cache policy; the prefill cache is kept whole). The last
``R`` cache entries are the recent window; whenever ``interval`` entries have left it since the last
squeeze, those ``interval`` entries are squeezed to the ``max(1, int(interval · ratio · g(l)))`` (14
of 16 by default) that the last ``R`` queries (the recent prompt queries, then the generated ones)
attend to most, weighted as above; ``g`` is the cosine schedule with the decode ``decay``.

Defaults are the FastKV reference's (github.com/dongwonjo/FastKV, ``baselines/pyramidinfer``, from
github.com/mutonix/pyramidinfer): 4 sinks, distance weight 1.2,
minimum context 64, squeeze every 16 entries with ratio 0.9; its 35 % configuration (recent 0.01,
decay 0.01) is the component default, and :data:`CONFIGS` holds its 35/50/60 % ones. The mean KV
retention over layers that a (recent_ratio, decay) pair gives is :func:`mean_retention`;
:func:`settings_for_retention` solves for the pair that gives another target.

Where the reference is wrong, this does the right thing:

* its decode trigger compares the *logical* sequence length (``seen_tokens``: prompt + generated)
  with each layer's *compressed* cache length, so every layer that pruned at prefill squeezes at
  every decode step and its cache shrinks instead of growing; here each layer counts the entries
  that left its own recent window since its last squeeze;
* it stores the recent queries' attention over the whole context of every layer (``R × L`` floats per
  layer); here only the columns that can still be squeezed, the recent window's (``R × (R + 16)``);
* the reference's linear decay schedule is overwritten by its ``if``/``if``-``else`` chain (only the
  cosine one, used by every configuration, works); only the cosine schedule is offered here.

The decode decay defaults to 1 (every layer keeps 14 of 16, as in the FastKV reference); the original
PyramidInfer configurations decay it to 0.1 over depth (``PyramidInferSqueeze(decay=0.1)``, the
preset's ``decode_decay``). The squeeze state is ``R × (R + interval)`` floats per layer: small for the
35 % configuration (``R`` is 1 % of the prompt), but quadratic in the prompt for the 60 % one.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from kvpolicy.config import Budget, resolve_budget
from kvpolicy.interfaces import (
    EAGER_STEP,
    CachePolicy,
    DecodeView,
    Evict,
    LayerView,
    Propagate,
    PropagationDecision,
    PropagationPolicy,
)
from kvpolicy.policies.attention import recent_query_attention
from kvpolicy.state import Batch, RequestState

#: The reference's configurations for Llama-3.1-8B, by mean KV retention: (recent_ratio, decay).
CONFIGS: dict[str, tuple[float, float]] = {"35": (0.01, 0.01), "50": (0.2, 0.3), "60": (0.2, 0.7)}


def _continue(columns: torch.Tensor, width: int) -> torch.Tensor:
    """``columns`` ``(B, C)`` (ascending positions) extended to ``width`` by the positions after each row's last."""
    extra = width - columns.shape[-1]
    return torch.cat([columns, columns[:, -1:] + 1 + torch.arange(extra, device=columns.device)], dim=-1)


def cosine_schedule(layer: int, num_layers: int, decay: float) -> float:
    """``s(l) = (1 - decay) (cos(π l / N) + 1) / 2 + decay``: 1 at layer 0, falling towards ``decay``."""
    return (1.0 - decay) * (math.cos(math.pi * layer / num_layers) + 1.0) / 2.0 + decay


def recent_count(prompt_len: int, recent_ratio: float) -> int:
    """``R = 1 + int(L · recent_ratio)``: the last prompt token plus the recent window."""
    return 1 + int(prompt_len * recent_ratio)


def mean_retention(recent_ratio: float, decay: float, num_layers: int) -> float:
    """Mean over layers of the fraction of the prompt each layer caches (long-prompt limit).

    Layer ``l`` holds the recent fraction ``r`` plus the context that survived the layers before it,
    ``(1 - r) · s(0) ⋯ s(l - 1)``. The ``min_context`` floor and integer rounding are ignored. The
    reference's configurations give 0.34 (35 %), 0.50 and 0.60 on 32 layers.
    """
    kept, total = 1.0, 0.0
    for layer in range(num_layers):
        total += recent_ratio + (1.0 - recent_ratio) * kept
        kept *= cosine_schedule(layer, num_layers, decay)
    return total / num_layers


def settings_for_retention(
    target: float, num_layers: int = 32, recent_ratio: float | None = None
) -> tuple[float, float]:
    """``(recent_ratio, decay)`` whose :func:`mean_retention` is ``target``.

    ``recent_ratio`` defaults to the reference's pairing: 0.2 for targets of at least 0.5, else 0.01.
    ``decay`` is solved by bisection. Targets below what ``decay = 0`` reaches (about 0.34 on 32
    layers: PyramidInfer cannot compress further) give ``decay = 0``; targets of 1 or more give 1.
    """
    if not target > 0:
        raise ValueError(f"target retention must be > 0, got {target}")
    if recent_ratio is None:
        recent_ratio = 0.2 if target >= 0.5 else 0.01
    return recent_ratio, _solve_decay(round(target, 6), num_layers, recent_ratio)


@lru_cache(maxsize=256)
def _solve_decay(target: float, num_layers: int, recent_ratio: float) -> float:
    if target >= 1.0:
        return 1.0
    if target <= mean_retention(recent_ratio, 0.0, num_layers):
        return 0.0
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if mean_retention(recent_ratio, mid, num_layers) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def pyramidinfer_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    recent: int,
    distance_weight: float,
    block: torch.Tensor | None = None,
) -> torch.Tensor:
    """Context scores: attention of the last ``recent`` queries, head-averaged, distance-weighted.

    Args:
        query: ``(B, H_q, T, d)`` after RoPE.
        key: ``(B, H_kv, T, d)`` after RoPE.
        scaling: softmax scale.
        recent: ``R``, the trailing queries that score (``1 <= R < T``).
        distance_weight: weight of the last query row; row ``i`` of ``R`` gets
            ``linspace(1, distance_weight, R)[i]``.
        block: optional ``(B, R, C)`` float32 to fill, in the same pass, with the recent queries'
            attention over the ``C`` keys from the recent window on (what the decode squeeze keeps),
            so the two PyramidInfer policies compute the recent attention once per layer.

    Returns:
        ``(B, T - R)`` float32: the weighted mean over the ``R`` rows of their attention to each
        context token (the keys before the recent ones).
    """
    t = key.shape[2]
    boundary = t - recent
    weights = torch.linspace(1.0, distance_weight, recent, device=key.device)
    out = key.new_zeros((key.shape[0], t), dtype=torch.float32)
    for first, probs in recent_query_attention(query, key, scaling, recent):
        rows = weights[first : first + probs.shape[1], None]
        out += (probs * rows).sum(dim=1)
        if block is not None:
            reach = min(block.shape[2], t - boundary)
            block[:, first : first + probs.shape[1], :reach] = probs[..., boundary : boundary + reach]
    return out[:, :boundary] / recent


def _shared_key(recent: int, distance_weight: float) -> tuple[str, int, float]:
    return ("pyramidinfer", recent, distance_weight)


class PyramidInfer(PropagationPolicy):
    """Cumulatively prune the context after every layer, keeping what the recent queries attend to.

    Attributes:
        recent_ratio: the recent window, ``R = 1 + int(L · recent_ratio)`` tokens never pruned.
        decay: the schedule's floor ``d`` in ``s(l)``; 1 prunes nothing. Exclusive with ``target``.
        target: instead of ``decay``, the mean KV retention over layers to reach (a fraction of the
            prompt, or tokens): ``decay`` is solved per prompt (:func:`settings_for_retention`). A
            target below what PyramidInfer can reach uses ``decay = 0`` and warns.
        sinks: prompt positions below this are always kept (attention sinks).
        distance_weight: weight of the newest recent query relative to the oldest (1.2).
        min_context: a layer whose pruned context would not exceed this many tokens prunes nothing.
    """

    kind = "pyramidinfer"

    recent_ratio: float = Field(0.01, ge=0.0, lt=1.0)
    decay: float | None = Field(0.01, ge=0.0, le=1.0)
    target: Budget | None = None
    sinks: int = Field(4, ge=0)
    distance_weight: float = Field(1.2, gt=0.0)
    min_context: int = Field(64, ge=0)

    @model_validator(mode="after")
    def _check(self) -> PyramidInfer:
        if (self.decay is None) == (self.target is None):
            raise ValueError(
                "give exactly one of decay (the schedule's floor) or target (the mean KV retention to "
                f"solve decay for); got decay={self.decay}, target={self.target}"
            )
        return self

    def resolved_decay(self, prompt_len: int, num_layers: int) -> float:
        """The schedule's ``decay`` for this prompt (solved from ``target`` if that is set)."""
        if self.decay is not None:
            return self.decay
        assert self.target is not None
        want = resolve_budget(self.target, prompt_len) / prompt_len
        decay = _solve_decay(round(want, 6), num_layers, self.recent_ratio)
        if decay == 0.0 and want < 1.0:
            floor = mean_retention(self.recent_ratio, 0.0, num_layers)
            if want < floor - 1e-3:
                warnings.warn(
                    f"PyramidInfer target {self.target} ({want:.3f} of a {prompt_len}-token prompt) is below "
                    f"the lowest mean retention it reaches on {num_layers} layers ({floor:.3f}); using decay=0",
                    stacklevel=2,
                )
        return decay

    def propagate(self, view: LayerView, state: RequestState) -> PropagationDecision:
        cached = state.scratch(self)
        if "decay" not in cached:
            cached["decay"] = self.resolved_decay(view.prompt_len, view.num_layers)
        fraction = cosine_schedule(view.layer, view.num_layers, cached["decay"])
        tokens = view.num_tokens
        recent = min(tokens, recent_count(view.prompt_len, self.recent_ratio))
        context = tokens - recent
        floor = min(self.min_context, view.prompt_len - recent)
        keep = int(context * fraction)
        if fraction >= 1.0 or context <= floor or keep <= floor:
            return None
        scores = view.shared.get(_shared_key(recent, self.distance_weight))  # the squeeze's pass
        if scores is None:
            scores = pyramidinfer_scores(view.query, view.key, view.scaling, recent, self.distance_weight)
        scores = scores.masked_fill(view.positions[:, :context] < self.sinks, float("inf"))
        top = scores.topk(keep, dim=-1).indices.sort(dim=-1).values
        tail = torch.arange(context, tokens, device=top.device).expand(top.shape[0], recent)
        return Propagate(torch.cat([top, tail], dim=-1))


class PyramidInferSqueeze(CachePolicy):
    """PyramidInfer's decode-time compression: squeeze each ``interval`` entries leaving the recent window.

    The prefill cache is kept whole (PyramidInfer's prefill pruning is its propagation policy).

    Attributes:
        recent_ratio: the recent window, the last ``1 + int(L · recent_ratio)`` entries; use the
            propagation policy's value.
        interval: entries that must leave the recent window before a squeeze (16).
        ratio: fraction of them kept before the depth decay (0.9: 16 -> 14).
        decay: depth decay of the kept count, the cosine schedule's floor; 1 keeps the same count at
            every layer.
        distance_weight: weight of the newest recent query relative to the oldest.
    """

    kind = "pyramidinfer_squeeze"

    recent_ratio: float = Field(0.01, ge=0.0, lt=1.0)
    interval: int = Field(16, ge=1)
    ratio: float = Field(0.9, gt=0.0, le=1.0)
    decay: float = Field(1.0, ge=0.0, le=1.0)
    distance_weight: float = Field(1.2, gt=0.0)

    def check_composition(self, propagation: PropagationPolicy) -> None:
        """After PyramidInfer's prefill pruning the recent window is the one it never pruned: the two
        ``recent_ratio`` settings must agree (a hand-made ``compose()`` could silently mismatch them)."""
        if isinstance(propagation, PyramidInfer) and propagation.recent_ratio != self.recent_ratio:
            raise ValueError(
                f"PyramidInferSqueeze(recent_ratio={self.recent_ratio}) does not match "
                f"PyramidInfer(recent_ratio={propagation.recent_ratio}); give both the same recent_ratio"
            )

    def squeezed_to(self, layer: int, num_layers: int) -> int:
        """Entries each squeeze keeps of ``interval`` at this layer."""
        return max(1, int(self.interval * self.ratio * cosine_schedule(layer, num_layers, self.decay)))

    def select(self, view: LayerView, state: RequestState) -> torch.Tensor | None:
        """Keep the prefill cache whole; record the recent queries' attention to what can be squeezed.

        Only the columns a squeeze can still reach are stored: the entries from the recent window on,
        at most ``recent + max_new_tokens`` and no more than the squeezes that fit in
        ``max_new_tokens`` take (``R x C`` floats, ``C <= R + max_new_tokens``), never the context."""
        tokens = view.num_tokens
        recent = min(tokens, recent_count(view.prompt_len, self.recent_ratio))
        boundary = tokens - recent
        max_new = max(state.max_new_tokens, 1)
        columns = min(recent + max_new, (max_new // self.interval + 1) * self.interval)
        rows = view.key.new_zeros((1, recent, columns), dtype=torch.float32)
        reach = min(recent, columns)
        # One pass over the recent queries fills the squeeze's rows and PyramidInfer's context
        # scores, which its propagation policy (asked after this) takes from `view.shared`.
        scores = pyramidinfer_scores(
            view.query, view.key, view.scaling, recent, self.distance_weight, block=rows
        )
        if recent < tokens:
            view.shared[_shared_key(recent, self.distance_weight)] = scores
        prompt_part = view.positions[:, boundary : boundary + reach]
        generated = view.positions[:, -1:] + 1 + torch.arange(columns - reach, device=prompt_part.device)
        zpos = torch.cat([prompt_part, generated], dim=-1)  # (1, C) position of each column, ascending
        state.scratch(self)[view.layer] = {
            "rows": rows,  # ring of the last R queries' head-mean attention over the columns
            "columns": zpos,
            "zone_start": zpos[:, :1].expand(view.num_kv_heads, -1).T.contiguous(),  # (1, H_kv)
            "reach": reach,  # columns of prompt entries
        }
        return None

    decodes_batched = True

    def decode_variant(self, step: int, batch: Batch) -> Hashable:
        """Squeeze steps and recording steps run different code (one graph each); a step that must
        widen the recorded columns (decoding past the reserve) runs eagerly."""
        built = batch.scratch(self)  # the batch's decode state once made, else the requests' prefill state
        states = list(built.values()) or [st for r in batch.states for st in r.scratch(self).values()]
        if any(st["reach"] + step + 1 > st["rows"].shape[-1] for st in states):
            return EAGER_STEP
        return (step + 1) % self.interval == 0

    def _batched(self, view: DecodeView, batch: Batch | RequestState) -> dict[str, Any]:
        """The layer's decode state for the whole batch, made at its first decode step from each
        request's prefill state (rows padded to the longest ring and the widest columns; a row's extra
        columns continue its positions), and widened when decoding passes the reserve. Later steps
        update it in place."""
        store = batch.scratch(self)
        key = ("decode", view.layer)
        st = store.get(key)
        if st is None:
            requests = getattr(batch, "states", None) or [batch]  # a batch, or one request's own state
            parts = [request.scratch(self)[view.layer] for request in requests]
            recent = max(p["rows"].shape[1] for p in parts)
            columns = max(p["rows"].shape[2] for p in parts)
            rows = torch.cat(
                [
                    F.pad(p["rows"], (0, columns - p["rows"].shape[2], 0, recent - p["rows"].shape[1]))
                    for p in parts
                ]
            )
            zpos = torch.cat([_continue(p["columns"], columns) for p in parts])
            counts = [p["rows"].shape[1] for p in parts]
            weights = torch.zeros((len(parts), recent), device=rows.device)  # each row's distance weights
            for b, n in enumerate(counts):
                weights[b, :n] = torch.linspace(1.0, self.distance_weight, n, device=rows.device)
            st = store[key] = {
                "rows": rows,  # (B, R, C) ring of each row's last R_b queries' attention over its columns
                "columns": zpos,  # (B, C) position of each column, ascending per row
                "zone_start": torch.cat([p["zone_start"] for p in parts]).clone(),  # (B, H_kv)
                "recent": torch.tensor(counts, device=rows.device)[:, None],  # (B, 1) R_b
                "weights": weights,
                "reach": max(p["reach"] for p in parts),  # host: the most prompt columns of any row
            }
        if st["reach"] + view.step + 1 > st["rows"].shape[-1]:  # past the reserve (an eager step)
            extra = max(self.interval, st["rows"].shape[-1])
            st["columns"] = _continue(st["columns"], st["columns"].shape[-1] + extra)
            st["rows"] = F.pad(st["rows"], (0, extra))
        return st

    def on_decode(self, view: DecodeView, state: Batch | RequestState) -> Evict | None:  # type: ignore[override]
        """Record the new query's attention; every ``interval`` steps squeeze the oldest ``interval``
        squeezable entries to :meth:`squeezed_to`, evicting the rest in place.

        One call per layer for the whole batch (``decodes_batched``). The schedule is host-side
        arithmetic on ``step`` (:meth:`decode_variant`: one entry leaves the recent window per step);
        the scores are tensor ops on state updated in place, indexed by the device step counter: no
        host sync, and a recorded step replays right."""
        st = self._batched(view, state)
        rows, zpos, recent = st["rows"], st["columns"], st["recent"]
        ring_len, columns = rows.shape[1], rows.shape[2]
        step = view.step_tensor if view.step_tensor is not None else torch.tensor(view.step)
        # The new query's head-mean attention, slot -> column by position.
        attn = view.attention.mean(dim=(1, 2))  # (B, S)
        pos = view.positions[:, 0]  # heads agree on positions here (the cache was kept whole)
        col = torch.searchsorted(zpos, pos.clamp_min(0)).clamp_max(columns - 1)
        hit = (zpos.gather(-1, col) == pos) & (pos >= 0)
        row = attn.new_zeros((attn.shape[0], columns + 1)).scatter_add_(
            -1, torch.where(hit, col, columns), attn
        )
        # Ring of rows: the prompt's recent queries fill 0..R_b-1; decode step s overwrites row s % R_b
        # (the oldest), so the oldest row after it is (s + 1) % R_b. Derived from the step counter: no
        # state to guard on when compiled, current when replayed.
        ring = step.to(rows.device) % recent  # (B, 1)
        rows.scatter_(1, ring[..., None].expand(-1, 1, columns), row[:, None, :columns])
        if (view.step + 1) % self.interval:  # the same test as decode_variant: host-side
            return None
        # Squeeze: the `interval` lowest positions at or after the zone start, per KV head.
        never = torch.iinfo(view.positions.dtype).max
        zone = view.positions.masked_fill((view.positions < st["zone_start"][..., None]) | ~view.valid, never)
        zone_pos, zone_slots = zone.topk(self.interval, dim=-1, largest=False)  # (B, H, interval)
        # ring index j holds the row of age rank (j - oldest) mod R_b (a roll by a device shift per row)
        j = torch.arange(ring_len, device=rows.device)[None, :]
        rank = torch.where(j < recent, (j - ring - 1) % recent, j)  # padding rings read weight 0
        weights = st["weights"].gather(1, rank)
        col_scores = (rows * weights[:, :, None]).sum(dim=1) / recent  # (B, C)
        last = zpos[:, -1:, None]
        zone_cols = torch.searchsorted(zpos, zone_pos.clamp_max(last).flatten(1)).clamp_max(columns - 1)
        scores = col_scores.gather(-1, zone_cols).view_as(zone_pos)
        kept = self.squeezed_to(view.layer, view.num_layers)
        dropped = scores.topk(self.interval - kept, dim=-1, largest=False).indices
        st["zone_start"].copy_(zone_pos.amax(dim=-1) + 1)
        return Evict(zone_slots.gather(-1, dropped))
