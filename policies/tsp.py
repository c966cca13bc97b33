"""Token-Selective Propagation, FastKV's prefill cut (Jo et al. 2025, arXiv 2502.01068).

Layers up to the TSP layer see the whole prompt. After the TSP layer, the tokens its observation
window attends to most (SnapKV-style scores, summed over all KV heads into one ranking) go on to
the later layers, with the window itself; everything else stops there. The propagated hidden states
are the TSP layer's outputs and keep their original positions.

Defaults are the FastKV reference code's (github.com/dongwonjo/FastKV): TSP
layer ``N/2 - 1`` (15 of 32 for Llama-3.1-8B), rate 0.2 (``int(L * rate)`` tokens propagate), window
8, kernel 7, max-pooling. These do not transfer to every model: on SmolLM2-135M layer 14 loses a
needle that layer 20 keeps, so measure (``kvpolicy calibrate``) before trusting them.

With ``rate`` (a fraction), never fewer than ``2 * window`` tokens propagate (capped at the prompt),
as with the fractional cache budgets (:func:`kvpolicy.policies.snapkv.budget_floor`): 20 % of a
35-token prompt is 7 tokens, less than the window itself. A constant ``length`` is used exactly.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kvpolicy.config import Budget, OddKernel, resolve_budget
from kvpolicy.interfaces import LayerView, Propagate, PropagationDecision, PropagationPolicy
from kvpolicy.policies.snapkv import budget_floor
from kvpolicy.scoring import keep_top_and_window, snapkv_scores
from kvpolicy.state import RequestState


def default_tsp_layer(num_layers: int) -> int:
    """The reference's mid-depth rule, ``N/2 - 1``."""
    return max(0, num_layers // 2 - 1)


class TSP(PropagationPolicy):
    """Propagate only the most-attended tokens past one layer.

    Attributes:
        layer: the TSP layer (0-based); ``None`` means ``N/2 - 1`` for an ``N``-layer model.
        rate: fraction of the prompt that propagates, ``T = int(L * rate)``, in (0, 1], but at
            least ``2 * window`` tokens (at most ``L``) so a short prompt keeps something to select.
        length: a constant token count instead of ``rate`` (the reference's ``tsp_len``), used
            exactly.
        min_keep: never propagate fewer tokens than this (tokens or fraction of the prompt). The
            ``fastkv`` preset sets it to a token KV budget: later layers cannot cache more tokens
            than they see, and a prompt shorter than the budget is then not cut at all. The
            reference has no floor and, with a budget above ``L * rate``, caches fewer entries
            than asked.
        window: observation window, always propagated (so the last prompt token always survives).
        kernel: pooling kernel (odd).
        pooling: ``"max"`` or ``"avg"``.
    """

    kind = "tsp"

    layer: int | None = Field(None, ge=0)
    rate: float = Field(0.2, gt=0.0, le=1.0)
    length: int | None = Field(None, ge=1)
    min_keep: Budget | None = None
    window: int = Field(8, ge=1)
    kernel: OddKernel = 7
    pooling: Literal["max", "avg"] = "max"

    @model_validator(mode="after")
    def _check(self) -> TSP:
        if self.length is not None and self.length < self.window:
            raise ValueError(f"window ({self.window}) is larger than the TSP length ({self.length})")
        return self

    def resolved_layer(self, num_layers: int) -> int:
        return default_tsp_layer(num_layers) if self.layer is None else self.layer

    def check_model(self, num_layers: int) -> None:
        if self.layer is not None and self.layer >= num_layers:
            raise ValueError(
                f"TSP layer {self.layer} is outside the model: it has {num_layers} layers (0..{num_layers - 1})"
            )

    def decision_layers(self, num_layers: int) -> set[int]:
        return {self.resolved_layer(num_layers)}

    def tokens_kept(self, prompt_len: int) -> int:
        """How many tokens propagate past the TSP layer for a prompt of ``prompt_len`` tokens."""
        if self.length is not None:
            count = self.length
        else:
            count = resolve_budget(self.rate, prompt_len, floor=budget_floor(self.window))
        if self.min_keep is not None:
            count = max(count, resolve_budget(self.min_keep, prompt_len))
        return max(count, min(self.window, prompt_len))

    def propagate(self, view: LayerView, state: RequestState) -> PropagationDecision:
        if view.layer != self.resolved_layer(view.num_layers):
            return None
        keep = self.tokens_kept(view.prompt_len)
        if view.num_tokens <= keep:
            return None
        window = min(self.window, keep)
        scores = snapkv_scores(view.window_attention(window), window, self.kernel, self.pooling)
        return Propagate(keep_top_and_window(scores.sum(dim=1), keep, window))
