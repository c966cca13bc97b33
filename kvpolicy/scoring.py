"""Pure scoring functions on tensors, shared by the built-in policies.

Nothing here keeps state or knows a policy by name. Costs are O(window · T) per layer: keys are
never repeated to query heads (queries are reshaped to the grouped-query layout instead) and no
T × T matrix is formed (Design notes: "Scores without attention weights").
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

Pooling = Literal["max", "avg"]


def window_attention(query: torch.Tensor, key: torch.Tensor, window: int, scaling: float) -> torch.Tensor:
    """Softmax attention of the last ``window`` queries over all keys, summed over those queries.

    Steps 1-3 of the SnapKV scoring in FastKV's reference: scores ``Q_win · Kᵀ · scaling`` per query
    head, causal mask inside the ``window × window`` block only (prefix keys all precede the window),
    softmax over keys in float32, sum over the window queries.

    Args:
        query: ``(B, H_q, T, d)`` after RoPE.
        key: ``(B, H_kv, T, d)`` after RoPE; ``H_q`` must be a multiple of ``H_kv``.
        window: number of trailing queries, ``1 <= window <= T``.
        scaling: softmax scale.

    Returns:
        ``(B, H_kv, n_rep, T)`` float32, ``n_rep = H_q / H_kv``.
    """
    b, h_q, t, d = query.shape
    h_kv = key.shape[1]
    n_rep = h_q // h_kv
    # Matmul in the model's dtype (fp32 accumulation inside), fp32 only for the small score tensor:
    # never an fp32 copy of the layer's keys.
    q = query[:, :, t - window :, :].to(key.dtype).reshape(b, h_kv, n_rep * window, d)
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * scaling  # (B, H_kv, n_rep*w, T)
    scores = scores.view(b, h_kv, n_rep, window, t)
    # Query i of the window sits at index t - window + i and may not see keys after it.
    q_idx = torch.arange(t - window, t, device=key.device).view(window, 1)
    k_idx = torch.arange(t, device=key.device).view(1, t)
    scores = scores.masked_fill(k_idx > q_idx, float("-inf"))
    return scores.softmax(dim=-1).sum(dim=-2)


def pool_scores(scores: torch.Tensor, kernel: int, pooling: Pooling) -> torch.Tensor:
    """1-D pooling along the last (key) axis, stride 1, padding ``kernel // 2`` (length kept).

    Step 4 of the SnapKV scoring: smooths scores so neighbours of salient tokens survive together.
    ``kernel`` must be odd. Average pooling counts padding as zeros, as ``F.avg_pool1d`` and the
    reference do. Shape ``(..., P)`` in and out.
    """
    if kernel <= 1 or scores.shape[-1] == 0:
        return scores
    shape = scores.shape
    flat = scores.reshape(-1, 1, shape[-1])
    if pooling == "max":
        out = F.max_pool1d(flat, kernel_size=kernel, stride=1, padding=kernel // 2)
    else:
        out = F.avg_pool1d(flat, kernel_size=kernel, stride=1, padding=kernel // 2)
    return out.view(shape)


def snapkv_scores(window_attn: torch.Tensor, window: int, kernel: int, pooling: Pooling) -> torch.Tensor:
    """Per-KV-head importance of the prefix keys (steps 3-5 of the SnapKV scoring).

    Drops the window keys (always kept), pools each query head's scores, then sums the ``n_rep`` query
    heads of each KV group, in the reference's order (pool, then GQA sum).

    Args:
        window_attn: ``(B, H_kv, n_rep, T)`` from :func:`window_attention`.
        window: the observation window ``w``; the last ``w`` keys are excluded.
        kernel: pooling kernel (odd).
        pooling: ``"max"`` or ``"avg"``.

    Returns:
        ``(B, H_kv, T - w)`` float32.
    """
    prefix = window_attn[..., : window_attn.shape[-1] - window]
    return pool_scores(prefix, kernel, pooling).sum(dim=2)


def keep_top_and_window(scores: torch.Tensor, keep: int, window: int) -> torch.Tensor:
    """Indices of the ``keep - window`` best prefix entries plus the ``window`` last ones, sorted.

    Step 6 of the SnapKV scoring, and the TSP ranking when ``scores`` has been summed over heads.

    Args:
        scores: ``(..., P)`` scores of the prefix (the ``P`` entries before the window).
        keep: total entries to keep, window included; ``window <= keep <= P + window``.
        window: number of trailing entries always kept.

    Returns:
        ``(..., keep)`` int64 indices into the ``P + window`` entries, ascending.
    """
    prefix_len = scores.shape[-1]
    top = scores.topk(keep - window, dim=-1).indices
    tail = torch.arange(prefix_len, prefix_len + window, device=scores.device)
    tail = tail.expand(*scores.shape[:-1], window)
    return torch.cat([top, tail], dim=-1).sort(dim=-1).values


def top_scores(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """``(..., keep)`` indices of the ``keep`` highest of ``scores`` ``(..., T)``, in position order."""
    return scores.topk(keep, dim=-1).indices.sort(dim=-1).values


class SelectsTopScores:
    """``select`` for a cache policy that keeps, per KV head, the ``resolved_budget`` entries of its
    highest ``key_scores`` (:class:`~kvpolicy.interfaces.ScoresKeys`), or everything when the layer
    holds no more. Entries a policy always keeps score ``+inf``; its budget must exceed their count
    (each policy's budget floor sees to it), so they are always among the top.

    Why: most query-agnostic scorers (KeyDiff, LagKV, Compactor, Q-Filters, ExpectedAttention, the
    random baseline) differ only in their scores; the selection is written once. Put it before
    :class:`~kvpolicy.interfaces.CachePolicy` in the bases."""

    def select(self, view: Any, state: Any) -> torch.Tensor | None:
        keep = self.resolved_budget(view.prompt_len)  # type: ignore[attr-defined]
        if view.num_tokens <= keep:
            return None
        return top_scores(self.key_scores(view, state), keep)  # type: ignore[attr-defined]
