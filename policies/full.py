"""Full KV: every token propagates and every KV entry is cached (the baseline of every comparison)."""

from __future__ import annotations

import torch

from kvpolicy.interfaces import CachePolicy, LayerView, PropagationDecision, PropagationPolicy
from kvpolicy.state import RequestState


class AllTokens(PropagationPolicy):
    """Every token goes on to the next layer (no prefill cut)."""

    kind = "all"

    def propagate(self, view: LayerView, state: RequestState) -> PropagationDecision:
        return None


class FullCache(CachePolicy):
    """Every layer caches every token it processed."""

    kind = "full"

    def select(self, view: LayerView, state: RequestState) -> torch.Tensor | None:
        return None
