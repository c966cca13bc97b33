"""R-KV cache (Cai et al. 2025, "R-KV: Redundancy-aware KV Cache Compression for Reasoning Models",
arXiv 2505.24133): decode-time compression for long generated outputs.

A reasoning model's chain of thought repeats itself, and so do its keys. R-KV keeps a layer's cache at
``budget`` entries per KV head while generating: new entries pile up in a buffer, and every
``buffer`` generated tokens the cache (budget plus buffer) is squeezed back to ``budget``. Each entry
outside the observation window (the ``window`` newest entries, always kept) gets

    Z = λ · importance - (1 - λ) · redundancy

and the top ``budget - window`` stay, per KV head:

* **importance**: the attention the last ``window`` queries pay the entry. Per KV head, the logits of
  each query are pooled over the head's query group by their maximum, softmaxed over the entries
  outside the window, averaged over the queries, then max-pooled (kernel 7) along the entries in
  position order (SnapKV's smoothing);
* **redundancy**: the key's mean cosine similarity to every cached key (the diagonal zeroed), after
  sparing one neighbour: for each key ``i``, the most recent key ``j`` with similarity above
  ``threshold`` does not count ``i`` against it (``sim[i, j] = 0``), so of near-duplicates the newest
  survives and the older ones are redundant; the per-key means are softmaxed over the cache.

At prefill the prompt is compressed to the same budget with the same score (the last ``window``
prompt queries observe), as the official code does on its first forward (there only for the first
request of a process: its ``compression`` flag is ``None`` before the first forward only, after which a
prompt is compressed only if the previous request's last step happened to set the flag).

Defaults are the official code's (github.com/Zefan-Cai/R-KV, ``rkv/compression/r1_kv.py`` ``R1KV``,
``rkv/utils.py`` ``compute_attention_scores`` / ``cal_similarity``, ``run_math.py``,
``scripts/run.sh``): budget 128 (``--kv_budget 128``), window 8 (``window_size``, the README's α),
buffer 128 (``--divide_method step_length --divide_length 128``, the README's ``B_buffer``), kernel 7
(``kernel_size``, max pooling), λ = 0.07 (``mix_lambda``, the code's default; the README's table says
0.1), similarity threshold 0.5 and ``retain_direction="last"`` (``cal_similarity``), max pooling of the
logits over the query group (``compute_attention_scores(pooling="max")``). kvpress has no R-KV (its
``DecodingPress`` compresses every ``compression_interval`` steps with a scorer, none redundancy-aware).

How this relates to the official code (deliberate differences):

* **compression schedule**: the reference compresses when the *absolute* sequence length (prompt plus
  generated, a counter kept on the model) is a multiple of 128, so the first decode-time compression
  comes after 1 to 128 tokens depending on the prompt length; here every ``buffer`` generated tokens
  from the start of generation (the same steps for every sequence of a batch, so one recorded
  graph per variant serves the whole batch). The cache holds at most ``budget + buffer`` entries either way;
* the reference compresses at the start of the step (the step's token attends to the compressed
  cache); here after the step's attention, as every decode-time policy of kvpolicy does;
* after its first compression the reference's cache is in top-k *score* order (``topk`` indices
  are not sorted), so its max pooling and its "most recent similar key" follow that order; here both
  follow the entries' original positions, as they do in the reference before its first compression;
* a key with no neighbour above the threshold spares nobody; the reference's ``max`` over a
  zero-filled index tensor then zeroes its similarity to cache entry 0;
* the reference's similarity reads the first sequence of the batch only (``key_states[0]``); here
  each sequence its own; scores are float32 (the reference's are in the model's dtype); the mean
  over keys counts the entries present;
* redundancy is computed in row chunks (``O(chunk · S)`` memory, not ``S x S``).

``budget`` is a token count as in the reference, or a fraction of the prompt (``int(L * r)``, floored
at ``2 * window``). ``on_decode`` runs once per sequence (not ``decodes_batched``): a compression reads
the cache's keys (:attr:`~kvpolicy.interfaces.DecodeView.key`), which the engine gathers per sequence;
the steps in between only write the new query into a ring of the last ``window`` queries.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from kvpolicy.config import Budget, OddKernel, resolve_budget
from kvpolicy.interfaces import CachePolicy, DecodeView, Evict, LayerView, Policy
from kvpolicy.policies.full import AllTokens
from kvpolicy.presets import Preset
from kvpolicy.state import Batch, RequestState

#: Rows of the key-similarity matrix computed at once (memory ``chunk x S`` per KV head).
SIMILARITY_CHUNK = 512


def check_budget_holds_window(budget: int | float, window: int) -> None:
    """A token budget must exceed the observation window, as the reference asserts
    (``budget - window_size > 0``)."""
    if isinstance(budget, int) and budget <= window:
        raise ValueError(
            f"budget ({budget}) must be larger than the window ({window}): the window is always kept"
        )


def observation_window(positions: torch.Tensor, window: int) -> torch.Tensor:
    """``(B, H, S)`` bool: each head's ``window`` entries of highest position (all of them if fewer).

    Args:
        positions: ``(B, H, S)`` original position of each slot's entry, ``-1`` on empty slots;
            distinct per head.
    """
    kth = positions.topk(min(window, positions.shape[-1]), dim=-1).values[..., -1:]
    return (positions >= 0) & (positions >= kth)


def rkv_importance(
    queries: torch.Tensor,
    keys: torch.Tensor,
    candidates: torch.Tensor,
    positions: torch.Tensor,
    scaling: float,
    kernel: int,
    query_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """R-KV's importance: pooled attention of the observation queries to each candidate entry.

    Args:
        queries: ``(B, H_q, w, d)`` the last ``w`` queries (after RoPE), in any order.
        keys: ``(B, H_kv, S, d)`` the cached keys by slot.
        candidates: ``(B, H_kv, S)`` bool: the entries that compete (present, outside the window).
        positions: ``(B, H_kv, S)`` original positions (pooling neighbours follow them).
        scaling: softmax scale.
        kernel: max-pooling width along the candidates in position order (odd).
        query_valid: optional ``(B, w)`` bool: which query rows hold a query.

    Returns:
        ``(B, H_kv, S)`` float32; meaningful on candidates only. Per KV head: the query group's
        maximum logit, softmax over the candidates, mean over the queries, max-pooled.
    """
    b, h_q, w, d = queries.shape
    h_kv, s = keys.shape[1], keys.shape[2]
    grouped = queries.float().view(b, h_kv, h_q // h_kv, w, d)
    logits = (grouped @ keys.float()[:, :, None].transpose(-1, -2)).amax(dim=2) * scaling  # (B, H, w, S)
    lowest = torch.finfo(logits.dtype).min
    probs = logits.masked_fill(~candidates[:, :, None, :], lowest).softmax(dim=-1)
    if query_valid is None:
        attn = probs.mean(dim=2)
    else:
        weights = query_valid.float() / query_valid.sum(dim=-1, keepdim=True).clamp_min(1)
        attn = (probs * weights[:, None, :, None]).sum(dim=2)  # (B, H, S)
    if kernel == 1:
        return attn
    # pool along the candidates in position order; the rest sort last and never contribute
    never = torch.iinfo(positions.dtype).max
    order = positions.masked_fill(~candidates, never).argsort(dim=-1)
    ordered = attn.masked_fill(~candidates, float("-inf")).gather(-1, order)
    pooled = F.max_pool1d(ordered.view(b * h_kv, 1, s), kernel, stride=1, padding=kernel // 2)
    return torch.empty_like(attn).scatter_(-1, order, pooled.view(b, h_kv, s))


def rkv_redundancy(
    keys: torch.Tensor, positions: torch.Tensor, threshold: float, chunk: int = SIMILARITY_CHUNK
) -> torch.Tensor:
    """R-KV's redundancy of each cached key (``cal_similarity`` with ``retain_direction="last"``).

    Cosine similarity between the keys of each KV head, diagonal zeroed; for each key ``i`` the most
    recent (highest position) key ``j`` with similarity above ``threshold`` gets ``sim[i, j] = 0``;
    the mean of each column over the entries present, softmaxed over them.

    Args:
        keys: ``(B, H_kv, S, d)`` by slot.
        positions: ``(B, H_kv, S)`` original positions, ``-1`` on empty slots.
        threshold: cosine similarity above which two keys are near-duplicates.
        chunk: rows of the similarity matrix computed at once.

    Returns:
        ``(B, H_kv, S)`` float32 (a distribution over the entries present; zero on empty slots).
    """
    valid = positions >= 0
    k = keys.float()
    unit = (k / (k.norm(dim=-1, keepdim=True) + 1e-8)).masked_fill(~valid[..., None], 0.0)
    s = k.shape[2]
    pos = positions.to(torch.int32)[:, :, None, :]  # (B, H, 1, S)
    columns = torch.arange(s, device=k.device)
    total = unit.new_zeros(valid.shape)
    for start in range(0, s, chunk):
        rows = unit[:, :, start : start + chunk]  # (B, H, c, d)
        sim = rows @ unit.transpose(-1, -2)  # (B, H, c, S); zero where either entry is empty
        own = columns[None, :] == torch.arange(start, start + rows.shape[2], device=k.device)[:, None]
        sim = sim.masked_fill(own, 0.0)
        similar = (sim > threshold) & valid[:, :, None, :]
        newest = torch.where(similar, pos, -1).argmax(dim=-1, keepdim=True)  # (B, H, c, 1)
        spare = similar.any(dim=-1, keepdim=True)
        sim = sim.scatter(-1, newest, torch.where(spare, 0.0, sim.gather(-1, newest)))
        total += sim.sum(dim=2)
    mean = total / valid.sum(dim=-1, keepdim=True).clamp_min(1)
    lowest = torch.finfo(mean.dtype).min
    return mean.masked_fill(~valid, lowest).softmax(dim=-1).masked_fill(~valid, 0.0)


def rkv_scores(
    queries: torch.Tensor,
    keys: torch.Tensor,
    positions: torch.Tensor,
    scaling: float,
    window: int,
    mix_lambda: float,
    kernel: int,
    threshold: float,
    query_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """R-KV's score ``λ · importance - (1 - λ) · redundancy`` of each cached entry, higher kept first.

    Args:
        queries: ``(B, H_q, w, d)`` the observation queries (after RoPE).
        keys: ``(B, H_kv, S, d)`` by slot (at prefill, slot = token).
        positions: ``(B, H_kv, S)`` original positions, ``-1`` on empty slots.
        scaling: softmax scale.
        window: recent queries scored (as :class:`RKV`).
        mix_lambda: importance weight (as :class:`RKV`).
        kernel: pooling kernel (as :class:`RKV`).
        threshold: similarity above which a newer key spares an older one (as :class:`RKV`).
        query_valid: optional ``(B, w)`` bool: which query rows hold a query.

    Returns:
        ``(B, H_kv, S)`` float32: the score on the entries outside the window, ``+inf`` on the window
        (always kept) and on empty slots (never evicted: they hold nothing).
    """
    in_window = observation_window(positions, window)
    candidates = (positions >= 0) & ~in_window
    importance = rkv_importance(queries, keys, candidates, positions, scaling, kernel, query_valid)
    redundancy = rkv_redundancy(keys, positions, threshold)
    score = mix_lambda * importance - (1.0 - mix_lambda) * redundancy
    return score.masked_fill(~candidates, float("inf"))


def rkv_evict(scores: torch.Tensor, lengths: torch.Tensor, keep: int | torch.Tensor, k: int) -> torch.Tensor:
    """Slots to free so each head holds ``keep`` entries: its ``lengths - keep`` lowest-scored ones.

    Args:
        scores: ``(B, H, S)`` from :func:`rkv_scores` (``+inf`` on entries never evicted).
        lengths: ``(B, H)`` entries per head.
        keep: entries to keep (at least the window), an int or ``(B, 1)``.
        k: the most entries freed at once (``<= S``; a static width).

    Returns:
        ``(B, H, k)`` int64 slots, ``-1`` past each head's excess. Tensor ops only.
    """
    excess = (lengths - keep).clamp(0, k)
    lowest = scores.topk(k, dim=-1, largest=False).indices
    rank = torch.arange(k, device=scores.device)
    return torch.where(rank < excess[..., None], lowest, -1)


class RKV(CachePolicy):
    """Keep what the recent queries attend to and is not a near-duplicate, compressing while decoding.

    Attributes:
        budget: entries kept per layer and KV head, window included, at prefill and after each
            decode-time compression: tokens (int, larger than ``window``) or a fraction of the
            prompt (float, ``int(L * r)``, at least ``2 * window``, at most ``L``).
        window: the newest entries, always kept; their queries observe (the reference's
            ``window_size``, α).
        buffer: generated tokens between compressions (the reference's ``divide_length``,
            ``B_buffer``): the cache grows to ``budget + buffer`` entries, then is squeezed back.
        mix_lambda: λ, the weight of importance against redundancy
            (``Z = λ · importance - (1 - λ) · redundancy``).
        kernel: max-pooling width of the importance along neighbouring positions (odd).
        threshold: cosine similarity above which two keys count as near-duplicates.
    """

    kind = "rkv"

    budget: Budget = 128
    window: int = Field(8, ge=1)
    buffer: int = Field(128, ge=1)
    mix_lambda: float = Field(0.07, ge=0.0, le=1.0)
    kernel: OddKernel = 7
    threshold: float = Field(0.5, gt=-1.0, lt=1.0)

    @model_validator(mode="after")
    def _check(self) -> RKV:
        check_budget_holds_window(self.budget, self.window)
        return self

    def resolved_budget(self, prompt_len: int) -> int:
        """Entries to keep for a prompt of ``prompt_len`` tokens (a fraction floored at ``2 * window``)."""
        return resolve_budget(self.budget, prompt_len, floor=2 * self.window)

    def _scores(self, view: LayerView) -> torch.Tensor:
        window = min(self.window, view.num_tokens)
        positions = view.positions[:, None, :].expand(-1, view.num_kv_heads, -1)
        return rkv_scores(
            view.query[:, :, -window:],
            view.key,
            positions,
            view.scaling,
            self.window,
            self.mix_lambda,
            self.kernel,
            self.threshold,
        )

    def key_scores(self, view: LayerView, state: RequestState) -> torch.Tensor:
        """``(B, H_kv, T)`` float32 R-KV scores of the prompt's keys (the last ``window`` queries
        observe), ``+inf`` on the window (:class:`~kvpolicy.interfaces.ScoresKeys`)."""
        return self._scores(view)

    def select(self, view: LayerView, state: RequestState) -> torch.Tensor | None:
        """Keep the prompt's ``budget`` best entries per KV head; remember the last ``window``
        queries, which observe at the first decode-time compression."""
        w = self.window
        queries = view.query[:, :, -w:]
        ring = queries.new_zeros((*queries.shape[:2], w, queries.shape[-1]))
        ring[:, :, w - queries.shape[2] :] = queries  # oldest first; a short prompt leaves rows empty
        valid = torch.zeros((queries.shape[0], w), dtype=torch.bool, device=queries.device)
        valid[:, w - queries.shape[2] :] = True
        state.scratch(self)[view.layer] = {"queries": ring, "query_valid": valid}
        keep = self.resolved_budget(view.prompt_len)
        if view.num_tokens <= keep:
            return None
        return self._scores(view).topk(keep, dim=-1).indices.sort(dim=-1).values

    def decode_variant(self, step: int, batch: Batch) -> Hashable:
        """Compression steps (every ``buffer``-th generated token) and appending steps run different
        code: one recorded graph each."""
        return self.compresses_at(step)

    def compresses_at(self, step: int) -> bool:
        """Whether decode step ``step`` (0 for the first) ends with a compression."""
        return (step + 1) % self.buffer == 0

    def on_decode(self, view: DecodeView, state: RequestState) -> Evict | None:
        """Write the new query into the ring of the last ``window``; every ``buffer`` steps evict each
        KV head's lowest-scored entries down to the budget, in place (tensor ops only)."""
        st: dict[str, Any] | None = state.scratch(self).get(view.layer)
        if st is None:
            return None
        ring, valid = st["queries"], st["query_valid"]
        step = view.step_tensor if view.step_tensor is not None else torch.tensor(view.step)
        row = (step.to(ring.device) % self.window).view(1)  # the oldest query's row
        ring.index_copy_(2, row, view.query.to(ring.dtype))
        valid.index_fill_(1, row, True)
        if not self.compresses_at(view.step):  # the same test as decode_variant: host-side
            return None
        keys = view.key
        if keys.shape[-1] != ring.shape[-1]:
            raise ValueError(
                f"R-KV scores the cached keys against the queries, but layer {view.layer} caches vectors "
                f"of size {keys.shape[-1]} for queries of size {ring.shape[-1]}"
            )
        scores = rkv_scores(
            ring,
            keys,
            view.positions,
            view.scaling,
            self.window,
            self.mix_lambda,
            self.kernel,
            self.threshold,
            query_valid=valid,
        )
        keep = max(self.resolved_budget(view.prompt_len), self.window)
        return Evict(rkv_evict(scores, view.lengths, keep, min(self.buffer, view.num_slots)))


class RKVPreset(Preset):
    """R-KV: importance minus redundancy, the cache squeezed back to its budget every ``buffer`` tokens."""

    kind = "rkv"
    description = (
        "R-KV: keep attended, non-redundant keys; compress every 128 generated tokens (Cai et al. 2025)"
    )

    kv_budget: Budget = 128
    window: int = Field(8, ge=1)
    buffer: int = Field(128, ge=1)
    mix_lambda: float = Field(0.07, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _check(self) -> RKVPreset:
        check_budget_holds_window(self.kv_budget, self.window)
        return self

    def build(self) -> Policy:
        cache = RKV(budget=self.kv_budget, window=self.window, buffer=self.buffer, mix_lambda=self.mix_lambda)
        return Policy(AllTokens(), cache)
