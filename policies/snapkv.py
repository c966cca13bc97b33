"""SnapKV cache compression (Li et al. 2024, arXiv 2404.14469), as FastKV's reference runs it.

Each layer scores its keys by the softmax attention of the last ``window`` queries (the observation
window), pools the scores along the key axis, sums the query heads of each KV group, and keeps the
top ``budget - window`` prefix keys per KV head plus the window itself.

Defaults are the FastKV reference code's (github.com/dongwonjo/FastKV):
window 8, kernel 7, max-pooling, retention 0.1 of the prompt. Unlike the reference's SnapKV baseline,
the cache holds KV heads, never keys repeated to every query head (4x less memory at equal budget).

A *fractional* budget never resolves below ``2 * window`` entries (capped at the prompt): at least
as many selected entries as window entries. The reference's ``int(L * r)`` gives 3 entries on a
35-token chat prompt at ``r = 0.1``, fewer than the window it always keeps, and the answer is
garbage; ten percent is a long-context default, not a request to keep nothing. A *token* budget
is kept exactly (it must hold the window).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from kvpolicy.config import Budget, OddKernel, resolve_budget
from kvpolicy.interfaces import CachePolicy, LayerView
from kvpolicy.scoring import keep_top_and_window, snapkv_scores
from kvpolicy.state import RequestState


def budget_floor(window: int) -> int:
    """The fewest entries a fractional budget resolves to for a window-keeping policy.

    Twice the window: the window itself, which is always kept, plus as many entries chosen by score,
    so the policy still selects something on a short prompt (SnapKV, PyramidKV, H2O).
    """
    return 2 * window


def check_window_fits(budget: int | float, window: int) -> None:
    """A token budget must hold the observation window, which is always kept."""
    if isinstance(budget, int) and budget < window:
        raise ValueError(f"window ({window}) is larger than the budget ({budget}); the window is always kept")


def snapkv_prefix_scores(view: LayerView, window: int, kernel: int, pooling: str) -> torch.Tensor:
    """``(B, H_kv, T - w)`` float32 SnapKV scores of the keys before the window (``w = min(window, T)``)."""
    window = min(window, view.num_tokens)
    return snapkv_scores(view.window_attention(window), window, kernel, pooling)  # type: ignore[arg-type]


def snapkv_key_scores(view: LayerView, window: int, kernel: int, pooling: str) -> torch.Tensor:
    """``(B, H_kv, T)`` float32 SnapKV scores of every key present, ``+inf`` on the window.

    The :class:`~kvpolicy.interfaces.ScoresKeys` form of :func:`snapkv_prefix_scores`: the window
    is always kept, so it ranks above every prefix key. Scores are *means* over the window's queries
    and the KV group's query heads (the prefix scores are sums; a constant factor per layer, so no
    ranking or allocation changes): kvpress's scale, which wrappers that add a constant to the scores
    rely on (CriticalKV's ``epsilon``: 1e-4 next to a mean, as kvpress has it, not next to a sum
    hundreds of times larger).
    """
    window = min(window, view.num_tokens)
    group = view.query.shape[1] // view.key.shape[1]
    prefix = snapkv_prefix_scores(view, window, kernel, pooling) / (window * group)
    tail = prefix.new_full((*prefix.shape[:-1], view.num_tokens - prefix.shape[-1]), float("inf"))
    return torch.cat([prefix, tail], dim=-1)


def snapkv_keep(view: LayerView, keep: int, window: int, kernel: int, pooling: str) -> torch.Tensor | None:
    """Per-KV-head indices ``(B, H_kv, keep)`` of the SnapKV selection, or ``None`` if all fit."""
    tokens = view.num_tokens
    if tokens <= keep:
        return None
    window = min(window, tokens)
    keep = max(keep, window)
    # The prefix part of SnapKV.key_scores, ranked on its own (topk breaks ties as it always has).
    scores = snapkv_prefix_scores(view, window, kernel, pooling)
    return keep_top_and_window(scores, keep, window)


class SnapKV(CachePolicy):
    """Keep each layer's most-attended KV entries per KV head, window always kept.

    Attributes:
        budget: entries kept per layer and KV head, window included: tokens (int, kept exactly) or
            a fraction of the prompt (float, ``int(L * r)`` but at least ``2 * window``, at most
            ``L``: see :func:`budget_floor`).
        window: observation window (last queries scored against all keys).
        kernel: pooling kernel along the key axis (odd).
        pooling: ``"max"`` (current reference scripts) or ``"avg"`` (earlier ones).
    """

    kind = "snapkv"

    budget: Budget = 0.1
    window: int = Field(8, ge=1)
    kernel: OddKernel = 7
    pooling: Literal["max", "avg"] = "max"

    @model_validator(mode="after")
    def _check(self) -> SnapKV:
        check_window_fits(self.budget, self.window)
        return self

    def resolved_budget(self, prompt_len: int) -> int:
        """Entries to keep for a prompt of ``prompt_len`` tokens (a fraction floored at ``2 * window``)."""
        return resolve_budget(self.budget, prompt_len, floor=budget_floor(self.window))

    def key_scores(self, view: LayerView, state: RequestState) -> torch.Tensor:
        """``(B, H_kv, T)`` float32: pooled window attention summed over each KV group, ``+inf`` on
        the window (:class:`~kvpolicy.interfaces.ScoresKeys`; :meth:`select` keeps the top of these)."""
        return snapkv_key_scores(view, self.window, self.kernel, self.pooling)

    def select(self, view: LayerView, state: RequestState) -> torch.Tensor | None:
        keep = self.resolved_budget(view.prompt_len)
        return snapkv_keep(view, keep, self.window, self.kernel, self.pooling)
