"""PyramidKV cache (Cai et al. 2024, arXiv 2406.02069): SnapKV scoring with a pyramid of budgets.

Lower layers, whose attention is spread wide, keep more entries; higher layers, whose attention
concentrates on few tokens, keep fewer. The per-layer budgets decrease linearly with depth and
average the requested budget. Selection inside a layer is SnapKV's
(:func:`kvpolicy.policies.snapkv.snapkv_keep`: window-attention scores, pooling, GQA sum, top per KV
head plus the window).

The schedule is KVCache-Factory's (github.com/Zefan-Cai/KVCache-Factory,
``pyramidkv/pyramidkv_utils.py``, ``PyramidKVCluster.update_kv``), with ``C`` the budget (window
included), ``w`` the window, ``T`` the prompt length and ``N`` the layers:

* ``T <= C``: keep everything;
* ``T < 2 (C - w)``: too short for a pyramid, every layer keeps ``C`` (plain SnapKV);
* otherwise ``min = (C - w) // beta``, ``max = 2 (C - w) - min``; if ``max >= T - w`` then
  ``max = T - w`` and ``min = 2 (C - w) - max``; ``step = (max - min) // (N - 1)``; layer ``l``
  keeps ``max - l · step`` prefix entries plus the window.

Because ``step`` rounds down, the mean over layers can exceed ``C`` by up to ``(N - 1) / 2`` entries,
exactly as in the reference. The reference has no propagation cut, so its ``T`` is both the prompt
and the tokens a layer sees; here the schedule uses the prompt length, and a layer left fewer tokens
than its budget by a propagation policy keeps them all. Defaults are KVCache-Factory's: window 8, kernel 7, max-pooling,
``beta`` 20; the retention 0.1 matches the other FastKV baselines.

A *fractional* ``C`` never resolves below ``2 w`` (capped at the prompt), as in
:class:`~kvpolicy.policies.snapkv.SnapKV`: ``int(L * r)`` on a short prompt would be smaller than
the window, leaving nothing to select. The floor applies to the average ``C`` the schedule starts
from; the deepest layers of a pyramid still keep less. A token ``C`` is used exactly.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from kvpolicy.config import Budget, OddKernel, resolve_budget
from kvpolicy.interfaces import CachePolicy, LayerView
from kvpolicy.policies.snapkv import budget_floor, check_window_fits, snapkv_keep
from kvpolicy.state import RequestState


def pyramid_budget(layer: int, num_layers: int, budget: int, window: int, tokens: int, beta: int) -> int:
    """Entries layer ``layer`` keeps (window included) under the KVCache-Factory schedule.

    Args:
        layer: 0-based layer index.
        num_layers: ``N``.
        budget: the average budget ``C`` per layer, window included.
        window: the observation window ``w``.
        tokens: tokens present at this layer ``T``.
        beta: ratio of the average to the smallest prefix budget.
    """
    if tokens <= budget or tokens < 2 * (budget - window) or num_layers < 2:
        return budget
    prefix = budget - window
    low = prefix // beta
    high = 2 * prefix - low
    if high >= tokens - window:
        high = tokens - window
        low = 2 * prefix - high
    step = (high - low) // (num_layers - 1)
    return high - layer * step + window


class PyramidKV(CachePolicy):
    """SnapKV selection with per-layer budgets decreasing linearly with depth.

    Attributes:
        budget: average entries kept per layer and KV head, window included: tokens (int, used
            exactly) or a fraction of the prompt (float, ``int(L * r)`` but at least
            ``2 * window``, at most ``L``).
        window: observation window (always kept).
        kernel: pooling kernel along the key axis (odd).
        pooling: ``"max"`` or ``"avg"``.
        beta: the shallowest-to-deepest spread: the deepest layer keeps about ``(C - w) / beta``
            prefix entries.
    """

    kind = "pyramidkv"

    budget: Budget = 0.1
    window: int = Field(8, ge=1)
    kernel: OddKernel = 7
    pooling: Literal["max", "avg"] = "max"
    beta: int = Field(20, ge=1)

    @model_validator(mode="after")
    def _check(self) -> PyramidKV:
        check_window_fits(self.budget, self.window)
        return self

    def layer_budget(self, layer: int, num_layers: int, prompt_len: int) -> int:
        """Entries layer ``layer`` may keep for a prompt of ``prompt_len`` tokens (window included).

        The schedule is computed for the whole prompt, so it does not change when a propagation
        policy (TSP, PyramidInfer) leaves a layer fewer tokens; a layer holding fewer tokens than its
        budget keeps them all.
        """
        # A token budget is at least the window (validated); a fraction is floored at 2 * window.
        budget = resolve_budget(self.budget, prompt_len, floor=budget_floor(self.window))
        return pyramid_budget(layer, num_layers, budget, min(self.window, budget), prompt_len, self.beta)

    def select(self, view: LayerView, state: RequestState) -> torch.Tensor | None:
        keep = self.layer_budget(view.layer, view.num_layers, view.prompt_len)
        return snapkv_keep(view, keep, self.window, self.kernel, self.pooling)
