"""Key-norm cache compression (Devoto et al. 2024, arXiv 2406.11430).

"A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression" observes that keys with a
*low* L2 norm tend to receive *high* attention. So each layer can choose what to keep without any
attention scores: per KV head, keep the ``budget`` keys with the lowest norm. The paper reports no
accuracy loss at 50 % compression on language modelling and needle-in-a-haystack, hence the default
budget of 0.5.

Scoring needs only the keys, so it works with any attention backend and costs ``O(T · d)`` per layer.
RoPE rotates pairs of key dimensions, which leaves the norm unchanged: scoring the keys after RoPE,
as :class:`kvpolicy.LayerView` hands them over, gives the same ranking as before it.

``window`` optionally keeps the most recent keys whatever their norm (0, the paper's setting, keeps
none specially).
"""

# --8<-- [start:imports]
from __future__ import annotations

import torch
from kvpolicy.config import Budget, resolve_budget
from kvpolicy.interfaces import CachePolicy, LayerView
from kvpolicy.scoring import keep_top_and_window
from kvpolicy.state import RequestState
from pydantic import Field, model_validator

# --8<-- [end:imports]


# --8<-- [start:scoring]
def keynorm_scores(key: torch.Tensor) -> torch.Tensor:
    """L2 norm of every key, per KV head: the lower, the more it is expected to be attended.

    Args:
        key: ``(B, H_kv, T, d)`` keys of one layer (before or after RoPE: the norm is the same).

    Returns:
        ``(B, H_kv, T)`` float32 norms.
    """
    return key.float().norm(dim=-1)


def keynorm_keep(key: torch.Tensor, keep: int, window: int) -> torch.Tensor | None:
    """Which entries to keep: the ``window`` last ones plus the lowest-norm others, ``keep`` in all.

    Args:
        key: ``(B, H_kv, T, d)`` keys of one layer.
        keep: entries to keep per KV head, window included (``>= 1``).
        window: trailing entries always kept (``>= 0``); a window longer than ``keep`` is kept whole.

    Returns:
        ``(B, H_kv, C)`` int64 indices into the ``T`` entries, ascending, with
        ``C = max(keep, min(window, T))``; ``None`` when that is every entry.
    """
    tokens = key.shape[-2]
    window = min(window, tokens)
    keep = max(keep, window)
    if keep >= tokens:
        return None
    prefix = key[..., : tokens - window, :]
    # keep_top_and_window keeps the *highest* scores: negate so that low norms win.
    return keep_top_and_window(-keynorm_scores(prefix), keep, window)


# --8<-- [end:scoring]


# --8<-- [start:policy]
class KeyNorm(CachePolicy):
    """Keep each layer's lowest-norm keys per KV head (Devoto et al. 2024).

    Attributes:
        budget: entries kept per layer and KV head, window included: tokens (int) or a fraction of
            the prompt (float). A budget at or above the prompt length keeps everything.
        window: the most recent entries, always kept (0: none, as in the paper). A token budget
            must hold it; a fraction too small to hold it keeps the window.
    """

    kind = "keynorm"

    budget: Budget = 0.5
    window: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _window_fits(self) -> KeyNorm:
        if isinstance(self.budget, int) and self.budget < self.window:
            raise ValueError(
                f"window ({self.window}) is larger than the budget ({self.budget}); the window is always kept"
            )
        return self

    def select(self, view: LayerView, state: RequestState) -> torch.Tensor | None:
        keep = resolve_budget(self.budget, view.prompt_len)
        return keynorm_keep(view.key, keep, self.window)


# --8<-- [end:policy]
