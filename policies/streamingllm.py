"""StreamingLLM cache (Xiao et al. 2024, arXiv 2309.17453): attention sinks plus a recent window.

Each layer keeps the first ``sinks`` tokens of the prompt (the attention sinks) and the most recent
``budget - sinks`` tokens. Defaults are the FastKV reference's (github.com/dongwonjo/FastKV, its
StreamingLLM baseline; ``../shared/reference/methods.md``): 4 sinks, retention 0.1 of the prompt, and
compression at prefill only; ``rolling=True`` keeps rolling while generating, as the StreamingLLM
paper does, so the cache stays at its budget.

Selection goes by each entry's *original position*, not its index among the tokens present: after a
propagation cut (TSP) a token at index 2 may sit at position 900, and it is no sink. An entry is a
sink when its position is below ``sinks``; the rest are ranked by position, newest first.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from kvpolicy.config import Budget, resolve_budget
from kvpolicy.interfaces import CachePolicy, DecodeView, LayerView
from kvpolicy.state import RequestState


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
        budget: entries kept per layer and KV head, sinks included: tokens (int) or a fraction of
            the prompt (float).
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

    def select(self, view: LayerView, state: RequestState) -> torch.Tensor | None:
        keep = resolve_budget(self.budget, view.prompt_len)
        if view.num_tokens <= keep:
            return None
        idx = sink_recent_keep(view.positions, keep, self.sinks)  # (B, keep), shared by all heads
        return idx[:, None, :].expand(-1, view.num_kv_heads, -1)

    def on_decode(self, view: DecodeView, state: RequestState) -> torch.Tensor | None:
        keep = resolve_budget(self.budget, view.prompt_len)
        if not self.rolling or view.positions.shape[-1] <= keep:
            return None
        return sink_recent_keep(view.positions, keep, self.sinks)
