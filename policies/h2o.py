"""H2O cache (Zhang et al. 2023, arXiv 2306.14048): heavy hitters plus a recent window.

Each layer scores its keys by the attention they receive from *every* query (column sums of the
causal attention matrix, summed over the query heads of each KV group) and keeps, per KV head, the
top ``budget - window`` keys outside the last ``window`` plus that window. Defaults are the FastKV
reference code's (github.com/dongwonjo/FastKV): window 8, retention
0.1, compression at prefill only; ``evict_during_decode=True`` keeps evicting while generating, as
the H2O paper does: each new token's attention is added to per-request running scores and the
lowest-scoring entry outside the window leaves, so the cache stays at its budget.

Where the reference is wrong, this does the right thing:

* the reference's scores are not causal outside the last window (queries attend to later keys);
  here every query sees only keys up to itself;
* the reference materialises the ``L × L`` attention matrix; here it is computed in query chunks
  (:func:`kvpolicy.policies.attention.causal_column_sums`), ``O(chunk · L)`` memory;
* the reference caches KV repeated to every query head; here the cache holds KV heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from kvpolicy.cache import evict_rows
from kvpolicy.config import Budget, budgets_per_row, resolve_budget
from kvpolicy.interfaces import CachePolicy, DecodeView, Evict, LayerView
from kvpolicy.policies.attention import causal_column_sums
from kvpolicy.policies.snapkv import check_window_fits
from kvpolicy.scoring import keep_top_and_window
from kvpolicy.state import Batch, RequestState


def h2o_keep(scores: torch.Tensor, keep: int, window: int) -> torch.Tensor | None:
    """Per-KV-head heavy hitters plus the window, from running scores ``(B, H_kv, n)``.

    Returns ``(B, H_kv, keep)`` ascending indices, or ``None`` when all ``n`` entries fit.
    """
    n = scores.shape[-1]
    if n <= keep:
        return None
    window = min(window, n)
    keep = max(keep, window)
    return keep_top_and_window(scores[..., : n - window], keep, window)


class H2O(CachePolicy):
    """Keep each layer's heavy hitters (most attended keys over all queries) and the recent window.

    Attributes:
        budget: entries kept per layer and KV head, window included: tokens (int) or a fraction of
            the prompt (float).
        window: most recent entries always kept.
        evict_during_decode: keep evicting while generating so the cache stays at its budget
            (running scores live in the request state). The reference compresses at prefill only.
    """

    kind = "h2o"

    budget: Budget = 0.1
    window: int = Field(8, ge=1)
    evict_during_decode: bool = False

    @model_validator(mode="after")
    def _check(self) -> H2O:
        check_window_fits(self.budget, self.window)
        return self

    @property
    def evicts_during_decode(self) -> bool:
        return self.evict_during_decode

    def select(self, view: LayerView, state: RequestState) -> torch.Tensor | None:
        keep = resolve_budget(self.budget, view.prompt_len, floor=2 * self.window)  # SnapKV's budget_floor
        if view.num_tokens <= keep and not self.evict_during_decode:
            return None  # nothing to drop and no running scores to keep
        scores = causal_column_sums(view.query, view.key, view.scaling)  # (B, H_kv, T)
        idx = h2o_keep(scores, keep, self.window)
        if self.evict_during_decode:
            state.scratch(self)[view.layer] = scores if idx is None else scores.gather(-1, idx)
        return idx

    decodes_batched = True

    def on_decode(self, view: DecodeView, state: RequestState | Batch) -> Evict | None:
        """Add the new token's attention to the running scores; past the budget, evict each head's
        lowest-scoring entry outside the recent window, in place (tensor ops only: no host sync).

        One call per layer for the whole batch (``decodes_batched``): running scores are kept per
        cache *slot* (``(B, H_kv, S)``, the batch's scratch), built at the first step from each
        request's prefill scores, and follow the cache's in-place moves
        (:func:`kvpolicy.cache.evict_rows`)."""
        if not self.evict_during_decode:
            return None
        running = state.scratch(self)
        key = ("decode", view.layer)
        scores = running.get(key)
        slots = view.num_slots
        if scores is None:  # first step: each request's prefill scores, by slot
            requests = getattr(state, "states", None) or [state]
            parts = [r.scratch(self).pop(view.layer) for r in requests]
            scores = running[key] = torch.cat([F.pad(p, (0, slots - p.shape[-1])) for p in parts])
        elif scores.shape[-1] != slots:  # the cache grew: widen to its slots
            scores = running[key] = F.pad(scores, (0, slots - scores.shape[-1]))
        # in place from here on: a recorded (graph-replayed) step reads and writes the same tensor
        newest = view.lengths[..., None] - 1  # the new entry's slot starts from zero
        scores.scatter_(-1, newest, 0.0)
        scores += view.attention.sum(dim=2)
        keep = budgets_per_row(
            running,
            view.prompt_lens,
            lambda n: resolve_budget(self.budget, n, floor=2 * self.window),
            view.lengths.device,
        )
        pos = view.positions
        recent = pos > pos.amax(dim=-1, keepdim=True) - self.window
        candidates = scores.masked_fill(recent | ~view.valid, float("inf"))
        evict = torch.where(view.lengths > keep, candidates.argmin(dim=-1), -1)[..., None]
        evict_rows(scores[..., None], evict, view.lengths)
        return Evict(evict)
