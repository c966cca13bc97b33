"""KeyDiff cache compression (Park et al. 2025, arXiv 2504.15364), as NVIDIA kvpress runs it.

Query-agnostic and attention-free: keys that point where most keys point carry little that the
others do not, so each layer keeps, per KV head, the keys *least* similar to the head's mean key
direction. The anchor is the mean of the L2-normalised keys present (``ā = mean_j k_j / ‖k_j‖``) and
a key scores ``-cos(k, ā)``: the more distinctive the key, the higher its score. Nothing else is read
(no queries, no values, no attention weights), so it runs with any attention kernel.

Defaults and reference: kvpress ``kvpress/presses/keydiff_press.py`` (``KeyDiffPress``,
github.com/NVIDIA/kvpress, 0.5.5): the cosine against the mean of the normalised post-RoPE keys of the
layer, no sinks, no window. kvpress's ``compression_ratio`` (fraction removed, default 0.0 = compress
nothing, which is :class:`~kvpolicy.policies.full.FullCache` here) becomes ``budget`` (fraction or
count *kept*), default 0.1 like every other compressing policy of kvpolicy.

Deviations: the paper evicts block-wise while the prompt streams in (kvpress: ``BlockPress`` around
``KeyDiffPress``); kvpolicy scores each layer's whole prompt at once, as ``KeyDiffPress`` alone does.
Scores are float32 whatever the model's dtype (kvpress: the keys' dtype). A *fractional* budget never
resolves below 8 entries (capped at the prompt), so a short prompt is not gutted; a token budget is
kept exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvpolicy.config import Budget, resolve_budget
from kvpolicy.interfaces import CachePolicy, LayerView, Policy
from kvpolicy.policies.full import AllTokens
from kvpolicy.presets import Preset
from kvpolicy.scoring import SelectsTopScores
from kvpolicy.state import RequestState

#: The fewest entries a fractional budget resolves to (SnapKV's default window's worth).
MIN_KEPT = 8


def keydiff_scores(key: torch.Tensor) -> torch.Tensor:
    """KeyDiff importance of every key: minus its cosine similarity to the mean normalised key.

    Args:
        key: ``(B, H_kv, T, d)`` keys (after RoPE, as the cache holds them).

    Returns:
        ``(B, H_kv, T)`` float32 in ``[-1, 1]``, higher is kept first.
    """
    key = key.float()
    anchor = F.normalize(key, p=2, dim=-1).mean(dim=2, keepdim=True)  # (B, H_kv, 1, d)
    return -F.cosine_similarity(key, anchor, dim=-1)


class KeyDiff(SelectsTopScores, CachePolicy):
    """Keep each layer's most distinctive keys (least similar to the mean key), per KV head.

    Attributes:
        budget: entries kept per layer and KV head: tokens (int, kept exactly) or a fraction of the
            prompt (float, ``int(L * r)`` but at least 8, at most ``L``). kvpress's
            ``compression_ratio`` is ``1 - budget``.
    """

    kind = "keydiff"

    budget: Budget = 0.1

    def resolved_budget(self, prompt_len: int) -> int:
        """Entries kept per KV head for a prompt of ``prompt_len`` tokens (a fraction floored at 8)."""
        return resolve_budget(self.budget, prompt_len, floor=MIN_KEPT)

    def key_scores(self, view: LayerView, state: RequestState | None = None) -> torch.Tensor:
        """``(B, H_kv, T)`` float32 :func:`keydiff_scores` (no entry is always kept: none is ``+inf``);
        the :class:`~kvpolicy.interfaces.ScoresKeys` contract."""
        return keydiff_scores(view.key)


class KeyDiffPreset(Preset):
    """KeyDiff: query-agnostic cache compression at every layer, full prefill."""

    kind = "keydiff"
    description = "KeyDiff: keys least similar to the mean key (Park et al. 2025)"

    kv_budget: Budget = 0.1

    def cache(self) -> KeyDiff:
        return KeyDiff(budget=self.kv_budget)

    def build(self) -> Policy:
        return Policy(AllTokens(), self.cache())


__all__ = ["KeyDiff", "KeyDiffPreset", "keydiff_scores"]
