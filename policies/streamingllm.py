"""StreamingLLM cache (Xiao et al. 2024, arXiv 2309.17453): attention sinks plus a recent window.

Each layer keeps the first ``sinks`` tokens of the prompt (the attention sinks) and the most recent
``budget - sinks`` tokens. Defaults are the FastKV reference's (github.com/dongwonjo/FastKV, its
StreamingLLM baseline): 4 sinks, retention 0.1 of the prompt, and
compression at prefill only; ``rolling=True`` keeps rolling while generating, as the StreamingLLM
paper does, so the cache stays at its budget.

Selection goes by each entry's *original position*, not its index among the tokens present: after a
propagation cut (TSP) a token at index 2 may sit at position 900, and it is no sink. An entry is a
sink when its position is below ``sinks``; the rest are ranked by position, newest first.

A *fractional* budget never resolves below ``sinks + 8`` entries (:data:`MIN_RECENT`; capped at the
prompt): the reference's ``int(L * r)`` is 3 on a 35-token chat prompt, which keeps only sinks, so
the recent tokens, the last prompt token among them, vanish and the answer is garbage. A *token*
budget is kept exactly (it must exceed ``sinks``).
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from kvpolicy.config import Budget, budgets_per_row, resolve_budget
from kvpolicy.interfaces import CachePolicy, DecodeView, Evict, LayerView
from kvpolicy.state import Batch, RequestState

#: Recent entries a fractional budget always leaves besides the sinks.
MIN_RECENT = 8


def sink_recent_keep(positions: torch.Tensor, keep: int, sinks: int) -> torch.Tensor:
    """Indices of the sink entries plus the most recent ones, ``keep`` in all, ascending.

    Args:
        positions: ``(..., n)`` original position of each entry.
        keep: entries to keep, ``1 <= keep <= n``.
        sinks: entries at positions ``< sinks`` are kept first.

    Returns:
        ``(..., keep)`` int64 indices into the ``n`` entries, ascending.
    """
    priority = positions.to(torch.float64).masked_fill(positions < sinks, float("inf"))
    return priority.topk(keep, dim=-1).indices.sort(dim=-1).values


class StreamingLLM(CachePolicy):
    """Keep the attention sinks and the most recent tokens.

    Attributes:
        budget: entries kept per layer and KV head, sinks included: tokens (int, kept exactly) or a
            fraction of the prompt (float, ``int(L * r)`` but at least ``sinks + 8`` recent-window
            entries, at most ``L``).
        sinks: number of initial prompt positions kept as attention sinks.
        rolling: keep evicting during decoding (sinks + the last ``budget - sinks`` entries), so the
            cache never exceeds its budget. The reference compresses at prefill only (``False``).
    """

    kind = "streamingllm"

    budget: Budget = 0.1
    sinks: int = Field(4, ge=0)
    rolling: bool = False

    @model_validator(mode="after")
    def _check(self) -> StreamingLLM:
        if isinstance(self.budget, int) and self.budget <= self.sinks:
            raise ValueError(
                f"budget ({self.budget}) must exceed sinks ({self.sinks}) to leave room for recent tokens"
            )
        return self

    @property
    def evicts_during_decode(self) -> bool:
        return self.rolling

    def resolved_budget(self, prompt_len: int) -> int:
        """Entries kept for a prompt of ``prompt_len`` tokens: a fraction leaves ``MIN_RECENT`` recent ones."""
        return resolve_budget(self.budget, prompt_len, floor=self.sinks + MIN_RECENT)

    def select(self, view: LayerView, state: RequestState) -> torch.Tensor | None:
        keep = self.resolved_budget(view.prompt_len)
        if view.num_tokens <= keep:
            return None
        idx = sink_recent_keep(view.positions, keep, self.sinks)  # (B, keep), shared by all heads
        return idx[:, None, :].expand(-1, view.num_kv_heads, -1)

    decodes_batched = True

    def on_decode(self, view: DecodeView, state: RequestState | Batch) -> Evict | None:
        """Rolling: once a head holds more than the budget, evict its oldest non-sink entry in place.

        Tensor ops only (no host sync): the decision per head is a ``torch.where`` on its length. One
        call per layer for the whole batch (``decodes_batched``; each row's budget from its prompt)."""
        if not self.rolling:
            return None
        keep = budgets_per_row(
            state.scratch(self), view.prompt_lens, self.resolved_budget, view.lengths.device
        )
        pos = view.positions
        never = torch.iinfo(pos.dtype).max
        priority = pos.masked_fill((pos < self.sinks) | ~view.valid, never)  # sinks and empty slots stay
        oldest = priority.argmin(dim=-1)  # (B, H_kv)
        return Evict(torch.where(view.lengths > keep, oldest, -1)[..., None])
