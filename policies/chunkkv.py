"""ChunkKV (Liu et al. 2025, arXiv 2502.00299): keep whole chunks of consecutive tokens, not single tokens.

Token-level selection keeps a subject and drops its verb; a chunk of consecutive tokens carries the
meaning together. ChunkKV splits the tokens present into chunks of ``chunk_length`` (the last one
shorter when the length does not divide), scores each chunk by the mean over its tokens of the inner
policy's key scores summed over the KV heads, and keeps the best chunks whole. Every KV head keeps
the same tokens.

:class:`ChunkKV` wraps any cache policy that scores keys (:class:`~kvpolicy.interfaces.ScoresKeys`,
e.g. SnapKV, given as object, ``to_dict()`` form or kind name) and keeps that policy's budget.

Reference: NVIDIA kvpress 0.5.5 (github.com/NVIDIA/kvpress), ``kvpress/presses/chunkkv_press.py``,
``ChunkKVPress``: ``chunk_length = 20``, chunk score = ``scores.sum(dim=1)`` (over KV heads) averaged
within each chunk, the trailing partial chunk scored as its own chunk, the top chunks kept for all
heads. kvpress's evaluation registry runs ``chunkkv = ChunkKVPress(press=SnapKVPress(),
chunk_length=20)`` (also on its leaderboard, ``evaluation/leaderboard.sh``): SnapKV is the default inner
policy here, with kvpolicy's SnapKV defaults (window 8, kernel 7, max pooling: FastKV's reference).

Where kvpolicy differs from kvpress, and why:

* The budget is exact: the inner policy's ``budget`` tokens per KV head (the conformance contract
  every cache policy keeps), where kvpress keeps ``max(1, int(n_chunks * (1 - compression_ratio)))``
  whole chunks (up to a chunk fewer tokens than the ratio asks, or a partial chunk's length more).
  Here chunks are taken whole in order of their score; the last one taken may be cut, keeping its
  best tokens (by the head-summed inner score), so the count is exact.
* The inner policy's ``+inf`` entries (SnapKV's window, Expected Attention's sinks) make their chunk
  score ``+inf``: those chunks come first, the entries themselves always kept. kvpress's SnapKV pads
  the window with a finite ``max + 1``, so its window chunk competes on its mean.
* Tokens of chunks with equal scores are taken in order of their own (head-summed) scores, then
  of position.
* The paper's layer-wise index reuse (sharing one layer's kept indices with the next) is not
  implemented: kvpress has it neither, and it is a propagation-like decision across layers.
"""

from __future__ import annotations

import torch
from pydantic import Field

from kvpolicy.interfaces import LayerView, Policy
from kvpolicy.policies.criticalkv import ScorerWrapper
from kvpolicy.policies.full import AllTokens
from kvpolicy.policies.presets import _SnapKVSettings
from kvpolicy.state import RequestState


def chunk_scores(token_scores: torch.Tensor, chunk_length: int) -> torch.Tensor:
    """Each token's chunk score: the mean of ``token_scores`` over its chunk.

    Args:
        token_scores: ``(B, T)`` float scores (``+inf`` allowed).
        chunk_length: tokens per chunk; the last chunk holds ``T % chunk_length`` when that is not 0.

    Returns:
        ``(B, T)`` float32, constant within each chunk.
    """
    b, t = token_scores.shape
    chunk = torch.arange(t, device=token_scores.device) // chunk_length  # (T,)
    n_chunks = (t + chunk_length - 1) // chunk_length
    sums = token_scores.new_zeros(b, n_chunks, dtype=torch.float32).index_add_(1, chunk, token_scores.float())
    sizes = torch.bincount(chunk, minlength=n_chunks).to(torch.float32)
    return (sums / sizes)[:, chunk]


def chunk_keep(scores: torch.Tensor, budget: int, chunk_length: int) -> torch.Tensor:
    """ChunkKV's selection: ``budget`` tokens, whole chunks in order of their score.

    Args:
        scores: ``(B, H, T)`` the inner policy's key scores, ``+inf`` on entries always kept.
        budget: tokens kept, ``<= T``.
        chunk_length: tokens per chunk.

    Returns:
        ``(B, H, budget)`` long sorted indices, the same for every head. Tensor ops only.
    """
    b, h, _ = scores.shape
    token = scores.float().sum(dim=1)  # (B, T) summed over the KV heads, as kvpress
    by_token = token.argsort(dim=-1, descending=True, stable=True)
    chunk_of_sorted = chunk_scores(token, chunk_length).gather(1, by_token)
    # Stable: within a chunk score (one chunk, or tied chunks), tokens stay in order of their own score.
    order = by_token.gather(1, chunk_of_sorted.argsort(dim=-1, descending=True, stable=True))
    kept = order[:, :budget].sort(dim=-1).values
    return kept[:, None].expand(b, h, budget).contiguous()


class ChunkKV(ScorerWrapper):
    """Whole chunks of consecutive tokens, ranked by the inner policy's mean score (ChunkKV).

    Attributes:
        inner: a cache policy that scores keys (:class:`~kvpolicy.interfaces.ScoresKeys`), e.g.
            ``SnapKV(budget=256)``, its ``to_dict()`` form or its kind (default ``"snapkv"``). Its budget
            is the tokens kept per KV head (the same tokens on every head).
        chunk_length: tokens per chunk (kvpress: 20).
    """

    kind = "chunk"

    chunk_length: int = Field(20, ge=1)

    def select(self, view: LayerView, state: RequestState) -> torch.Tensor | None:
        budget = self.resolved_budget(view.prompt_len)
        if view.num_tokens <= budget:
            return None
        return chunk_keep(self.scorer.key_scores(view, state), budget, self.chunk_length)


class ChunkKVPreset(_SnapKVSettings):
    """ChunkKV: SnapKV's scores averaged over chunks of consecutive tokens, whole chunks kept, full
    prefill. Fields: SnapKV's (``kv_budget`` its budget) and ``chunk_length`` (kvpress: 20)."""

    kind = "chunkkv"
    description = "ChunkKV: keep whole chunks of tokens ranked by SnapKV scores (Liu et al. 2025)"

    chunk_length: int = Field(20, ge=1)

    def build(self) -> Policy:
        return Policy(AllTokens(), ChunkKV(inner=self.cache(), chunk_length=self.chunk_length))


__all__ = ["ChunkKV", "ChunkKVPreset", "chunk_keep", "chunk_scores"]
