"""Pure attention-probability helpers for policies that need more than the SnapKV window block.

H2O needs column sums of the *whole* causal attention matrix, PyramidInfer the attention of a
recent block of queries, and both the new token's attention during decoding. All of it is computed
here in the grouped-query layout (queries reshaped to ``(H_kv, n_rep, ...)``, keys never repeated) and
in query chunks, so memory stays ``O(chunk · T)`` per layer and no ``T × T`` matrix is ever formed
(Design notes: "Scores without attention weights"). Everything is float32, as the reference's softmaxes are.

Shapes: ``B`` batch, ``H_q``/``H_kv`` query/KV heads, ``n_rep = H_q / H_kv``, ``T`` keys, ``d`` head dim.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

#: Query rows per chunk, at most.
CHUNK = 4096
#: Attention probabilities materialised at once on a CPU (64 Mi float32, 256 MiB).
MAX_CHUNK_ELEMENTS = 1 << 26
#: On a GPU: this share of the free device memory, at most 4 GiB of float32 probabilities.
GPU_FREE_SHARE = 0.125


def rows_per_chunk(num_query_heads: int, num_keys: int, device: torch.device | None = None) -> int:
    """Query rows per chunk, sized from memory: ``rows · H_q · T`` float32 probabilities (and their
    softmax temporaries) fit :data:`MAX_CHUNK_ELEMENTS` on a CPU, or :data:`GPU_FREE_SHARE` of the
    free memory on a GPU (read once per layer at prefill, never while decoding). At 128K keys and 32
    query heads that is ~16 rows per 256 MiB, hundreds on a GPU with room, instead of a fixed count."""
    budget = MAX_CHUNK_ELEMENTS
    if device is not None and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = max(budget, min(int(free * GPU_FREE_SHARE) // 16, 1 << 30))  # ~4 float32 copies live
    return max(1, min(CHUNK, budget // max(1, num_query_heads * num_keys)))


def grouped_attention_probs(
    query: torch.Tensor, key: torch.Tensor, scaling: float, offset: int | None
) -> torch.Tensor:
    """Softmax attention probabilities of some queries over keys, per query head, grouped.

    Args:
        query: ``(B, H_q, q, d)``.
        key: ``(B, H_kv, T, d)``; ``H_q`` a multiple of ``H_kv``.
        scaling: softmax scale.
        offset: query ``i`` sits at key index ``offset + i`` and sees only keys up to it (causal);
            ``None`` means every query sees every key (a decode query after all cached keys).

    Returns:
        ``(B, H_kv, n_rep, q, T)`` float32, rows summing to one.
    """
    b, h_q, t_q, d = query.shape
    h_kv, t_k = key.shape[1], key.shape[2]
    n_rep = h_q // h_kv
    q = query.to(key.dtype).reshape(b, h_kv, n_rep * t_q, d)  # model dtype in, fp32 scores out
    scores = torch.matmul(q, key.transpose(-1, -2)).float().mul_(scaling).view(b, h_kv, n_rep, t_q, t_k)
    if offset is not None:
        q_idx = torch.arange(offset, offset + t_q, device=key.device).view(t_q, 1)
        k_idx = torch.arange(t_k, device=key.device).view(1, t_k)
        scores = scores.masked_fill_(k_idx > q_idx, float("-inf"))
    return scores.softmax(dim=-1)


def causal_column_sums(
    query: torch.Tensor, key: torch.Tensor, scaling: float, chunk: int | None = None
) -> torch.Tensor:
    """H2O's heavy-hitter scores: column sums of the full causal attention of every query.

    Query ``i`` attends to keys ``0..i``; each key's score is the attention it receives from all
    queries, summed over the ``n_rep`` query heads of its KV group. Computed ``chunk`` queries at a
    time (a chunk only meets the keys it can see), so memory is ``O(H_q · chunk · T)``.

    Args:
        query: ``(B, H_q, T, d)`` after RoPE.
        key: ``(B, H_kv, T, d)`` after RoPE.
        scaling: softmax scale.
        chunk: queries per step (>= 1); ``None`` sizes it by :func:`rows_per_chunk`.

    Returns:
        ``(B, H_kv, T)`` float32.
    """
    b, h_q, t, _ = query.shape
    chunk = chunk or rows_per_chunk(h_q, t, key.device)
    out = key.new_zeros((b, key.shape[1], t), dtype=torch.float32)
    for start in range(0, t, chunk):
        end = min(start + chunk, t)
        probs = grouped_attention_probs(query[:, :, start:end], key[:, :, :end], scaling, start)
        out[..., :end] += probs.sum(dim=(2, 3))
    return out


def recent_query_attention(
    query: torch.Tensor, key: torch.Tensor, scaling: float, recent: int, chunk: int | None = None
) -> Iterator[tuple[int, torch.Tensor]]:
    """Head-averaged causal attention of the last ``recent`` queries, ``chunk`` rows at a time.

    PyramidInfer's view of a layer (the reference averages the attention weights over all query
    heads before using them). Yields ``(first_row, probs)`` with ``probs`` ``(B, c, T)`` float32: the
    attention of queries ``T - recent + first_row ...`` over all ``T`` keys, causal. ``chunk`` as in
    :func:`causal_column_sums`.
    """
    t = query.shape[2]
    chunk = chunk or rows_per_chunk(query.shape[1], t, key.device)
    first = t - recent
    for start in range(first, t, chunk):
        end = min(start + chunk, t)
        probs = grouped_attention_probs(query[:, :, start:end], key, scaling, start)
        yield start - first, probs.mean(dim=(1, 2))


def decode_attention(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention of one new decode query over all cached keys (it comes after all of them).

    Args:
        query: ``(B, H_q, 1, d)``.
        key: ``(B, H_kv, n, d)``.

    Returns:
        ``(B, H_kv, n_rep, n)`` float32.
    """
    return grouped_attention_probs(query, key, scaling, None).squeeze(-2)
