"""TOVA cache (Oren et al. 2024, "Transformers are Multi-State RNNs", arXiv 2401.06104).

Token Omission Via Attention: the cache is a fixed-size multi-state. Whenever a layer holds more
than ``budget`` entries it drops those the *current* query attends to least: at prefill the last
prompt token's attention over the prompt picks the ``budget`` entries kept, and while decoding each
new token's attention picks the one entry to evict, so the cache stays at its budget every step.

Scores follow the official code (github.com/schwartz-lab-NLP/TOVA, ``src/tova_cache.py``,
``TOVACache.reduce``: ``torch.mean(attn_weights[:, :, -1, :], dim=1)`` then ``topk``) and kvpress's
``TOVAPress`` (``attn_weights.mean(1)`` repeated to every KV head): the softmax attention of the
last query, **averaged over all query heads of the layer** (not per KV group), is one score per
token, and the same entries are kept on every KV head (the paper's head-averaged TOVA). The paper evicts at every step
(``evict_during_decode=True``). The reference's cache size is a token count; ``budget`` here is a
token count or a fraction of the prompt, default 0.1 as the other FastKV baselines.

How this relates to the references:

* the newest entry competes like any other, as in the official ``reduce`` (which ranks every key,
  the just-appended one included); kvpress pads the last prompt token with the maximum score so it
  is always kept at prefill, calling that "a very slight difference from TOVA";
* one selection for the whole layer, applied to every KV head, as the official ``reduce`` does (its
  cache holds KV heads too, and it expands the same indices over them): every KV head here holds the
  same entries, slot for slot, which is what lets a decode step score slots by the head average;
* a *fractional* budget never resolves below :data:`MIN_FRACTION_BUDGET` entries (capped at the
  prompt), the floor SnapKV and H2O get from their default window (2 x 8): ten percent of a
  35-token chat prompt is 3 entries, and a fraction is a long-context default, not a request to
  keep nothing. A *token* budget is kept exactly.
"""

from __future__ import annotations

import torch

from kvpolicy.config import Budget, budgets_per_row, resolve_budget
from kvpolicy.interfaces import CachePolicy, DecodeView, Evict, LayerView, Policy
from kvpolicy.policies.full import AllTokens
from kvpolicy.presets import Preset
from kvpolicy.scoring import window_attention
from kvpolicy.state import Batch, RequestState

#: The fewest entries a fractional budget resolves to (SnapKV's and H2O's floor, 2 x window 8).
MIN_FRACTION_BUDGET = 16


def tova_scores(last_attention: torch.Tensor) -> torch.Tensor:
    """TOVA's per-token score: the last query's attention averaged over every query head.

    Args:
        last_attention: ``(B, H_kv, n_rep, T)`` float32 softmax attention of the last query per query
            head (grouped layout: query head ``h * n_rep + r`` at ``[:, h, r]``), e.g.
            :meth:`LayerView.window_attention` with window 1 or a decode step's slot attention.

    Returns:
        ``(B, T)`` float32: the mean over all ``H_q = H_kv * n_rep`` query heads of the layer.
    """
    return last_attention.float().mean(dim=(1, 2))


def tova_last_query_attention(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """``(B, H_kv, n_rep, T)`` float32 softmax attention of the last query over all keys (the
    prefill input of :func:`tova_scores`, from raw ``(B, H_q, T, d)`` / ``(B, H_kv, T, d)`` tensors)."""
    return window_attention(query, key, 1, scaling)


def tova_keep(scores: torch.Tensor, keep: int, num_kv_heads: int) -> torch.Tensor | None:
    """The ``keep`` best-scored tokens, the same on every KV head, or ``None`` when all fit.

    Args:
        scores: ``(B, T)`` from :func:`tova_scores`.
        keep: entries to keep, ``>= 1``.
        num_kv_heads: ``H_kv``.

    Returns:
        ``(B, H_kv, keep)`` int64 indices into the ``T`` tokens, ascending, or ``None`` if ``T <= keep``.
    """
    if scores.shape[-1] <= keep:
        return None
    idx = scores.topk(keep, dim=-1).indices.sort(dim=-1).values  # (B, keep)
    return idx[:, None, :].expand(-1, num_kv_heads, -1)


def tova_evict(
    attention: torch.Tensor, valid: torch.Tensor, lengths: torch.Tensor, keep: int | torch.Tensor
) -> torch.Tensor:
    """Each row's lowest-scored slot where the row holds more than ``keep`` entries, else ``-1``.

    Tensor ops only (no host sync). Every KV head of a row holds the same entries in the same slots
    (one shared selection at prefill, one shared eviction per step, each moving the same entry), so
    the head average over slots is the head average over tokens, and the slot evicted is the same on
    every head.

    Args:
        attention: ``(B, H_kv, n_rep, S)`` the new query's attention over the slots (zero on empty ones).
        valid: ``(B, H_kv, S)`` which slots hold an entry.
        lengths: ``(B, H_kv)`` entries per row (the new one included).
        keep: the budget, an int or ``(B, 1)`` per row.

    Returns:
        ``(B, H_kv, 1)`` int64 slots to free (``-1``: none).
    """
    scores = tova_scores(attention).masked_fill(~valid[:, 0], float("inf"))  # (B, S)
    lowest = scores.argmin(dim=-1, keepdim=True)  # (B, 1)
    return torch.where(lengths > keep, lowest, -1)[..., None]


class TOVA(CachePolicy):
    """Keep the entries the current query attends to most (head average over the layer).

    Attributes:
        budget: entries kept per layer and KV head: tokens (int, kept exactly) or a fraction of the
            prompt (float, ``int(L * r)`` but at least :data:`MIN_FRACTION_BUDGET`, at most ``L``).
        evict_during_decode: keep the cache at its budget while generating, evicting at every step
            the entry the new token attends to least (the paper's method). ``False`` compresses at
            prefill only and the cache grows by one entry per generated token.
    """

    kind = "tova"

    budget: Budget = 0.1
    evict_during_decode: bool = True

    @property
    def evicts_during_decode(self) -> bool:
        return self.evict_during_decode

    def resolved_budget(self, prompt_len: int) -> int:
        """Entries to keep for a prompt of ``prompt_len`` tokens (a fraction floored at 16)."""
        return resolve_budget(self.budget, prompt_len, floor=MIN_FRACTION_BUDGET)

    def select(self, view: LayerView, state: RequestState) -> torch.Tensor | None:
        keep = self.resolved_budget(view.prompt_len)
        if view.num_tokens <= keep:
            return None
        scores = tova_scores(view.window_attention(1))  # the last query's attention, per query head
        return tova_keep(scores, keep, view.num_kv_heads)

    decodes_batched = True

    def on_decode(self, view: DecodeView, state: RequestState | Batch) -> Evict | None:
        """Past the budget, evict the entry the new token attends to least (head average), in place.

        One call per layer for the whole batch; each row's budget comes from its own prompt length
        (:func:`kvpolicy.config.budgets_per_row`: an int, or a ``(B, 1)`` tensor made once). No
        state is carried between steps: TOVA scores with the current query only.
        """
        if not self.evict_during_decode:
            return None
        keep = budgets_per_row(
            state.scratch(self), view.prompt_lens, self.resolved_budget, view.lengths.device
        )
        return Evict(tova_evict(view.attention, view.valid, view.lengths, keep))


class TOVAPreset(Preset):
    """TOVA: keep what the current query attends to most (head average), evicting every decode step."""

    kind = "tova"
    description = "TOVA: evict what the current token attends to least, every step (Oren et al. 2024)"

    kv_budget: Budget = 0.1
    evict_during_decode: bool = True

    def build(self) -> Policy:
        return Policy(AllTokens(), TOVA(budget=self.kv_budget, evict_during_decode=self.evict_during_decode))
