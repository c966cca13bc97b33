"""KVzip (Kim et al. 2025, arXiv 2505.23416): query-agnostic KV scores from context reconstruction.

A cache compressed for one question loses what the next question needs. KVzip asks instead which KV
entries the model needs to *repeat its context*: after the context, the model reads "Repeat the
previous context exactly." followed by the context itself, and each cached entry of the context is
scored by the most attention any query of that repetition pays it (maximum over the repetition's
queries and the query heads of the entry's KV group). Entries nobody looks at while reconstructing
are the ones no question will need. The budget is then allocated over every layer and KV head at
once: the lowest scores of the whole model are dropped, so layers and heads keep different counts
(a ragged :class:`~kvpolicy.interfaces.PerHead` cache; the memory is freed, where kvpress masks).

How it runs here. The reconstruction is a *scoring suffix* the engine appends to the prompt
(:meth:`~kvpolicy.interfaces.CachePolicy.scoring_suffix`), one segment per chunk: each segment runs
through every layer with the prompt, its queries attending to the whole prompt and causally to
themselves (never to another chunk's segment), numbered from position ``L`` on, which is what
kvpress's one pass per chunk over the full cache computes; its KV is never cached, decoding
continues from the prompt's last token, and its tokens count as prefill work (``tokens_per_layer``,
as GemFilter's filter pass). The prompt and every chunk's pass are one forward. Each
layer's :meth:`KVzip.select` records that layer's scores; :meth:`KVzip.finish_prefill` allocates the
budget once every layer has run (the engine holds the layers' full KV until then: peak memory is a
full cache's, as in kvpress and the official code).

Reference and defaults: kvpress 0.5.5's ``KVzipPress`` (github.com/NVIDIA/kvpress,
``kvpress/presses/kvzip_press.py``), itself following the official github.com/snu-mllab/KVzip:

* the repetition prompt ``"\\n\\nRepeat the previous context exactly."``, then the chat template's
  end of the user turn and assistant header (``"\\n"`` without a template), then the context after
  the template's prefix (the system prompt and user header are not repeated; they score 0 unless
  they are sinks);
* chunks of ``chunk_size = 2048`` context tokens; a later chunk's prompt is ``"\\n\\nRepeat the part
  of the previous context exactly, starting with"`` and the previous chunk's last ``8`` tokens;
* scores are the softmax over the sinks, the chunk's own context keys and the repetition's keys
  (causal), maximum over queries and the KV group; the first ``sinks = 4`` entries start at 1.0;
* ``layerwise = False``: one bottom-``k`` over all layers and heads, ``int(numel * ratio)`` entries
  dropped (kvpress's count; ``ratio = 1 - budget``), then per layer the bottom of its heads;
  ``layerwise = True``: each layer drops ``int(H_kv * L * ratio)``;
* ``kvzip_plus_normalization`` (KVzip+) is not implemented (kvpress's default is off).

Where this differs, and why:

* every KV head keeps at least its best entry (kvpress may mask a head entirely at extreme ratios;
  the same number of entries is dropped, the next lowest instead);
* the template's prefix is skipped only when the prompt starts with its ids (kvpress skips
  ``prefix_length`` tokens blindly);
* without a tokenizer (:meth:`KVzip.with_tokenizer` not called: :func:`kvpolicy.prefill` on raw ids,
  the GPU bench on random weights) the repetition is the context alone, with no prompt around it;
* sliding-window, chunked-attention and recurrent layers, and propagation cuts, are refused (the
  suffix would be cached or carried into decoding); kvpress refuses Gemma 3 likewise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field, PrivateAttr

from kvpolicy.config import Budget, resolve_budget
from kvpolicy.interfaces import (
    CachePolicy,
    LayerView,
    PerHead,
    Policy,
    PropagationPolicy,
    Selection,
)
from kvpolicy.policies.full import AllTokens
from kvpolicy.presets import Preset
from kvpolicy.state import RequestState

#: kvpress's repetition prompts (``KVzipPress.prepare``): the first chunk's, and every later chunk's.
FIRST_PROMPT = "\n\nRepeat the previous context exactly."
NEXT_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"
#: Query rows of the repetition scored at once (bounds the ``(H_q, rows, keys)`` score block).
QUERY_BLOCK = 512


class RepeatTokens(tuple):
    """Token ids KVzip's repetition is made of, from one tokenizer: ``(first, next, suffix, prefix)``:
    the first chunk's prompt, a later chunk's, the chat template's end of turn and assistant header,
    and the template's prefix (system prompt, user header) that is not repeated."""

    @property
    def first(self) -> tuple[int, ...]:
        return self[0]

    @property
    def next(self) -> tuple[int, ...]:
        return self[1]

    @property
    def suffix(self) -> tuple[int, ...]:
        return self[2]

    @property
    def prefix(self) -> tuple[int, ...]:
        return self[3]


def repeat_tokens(tokenizer: Any) -> RepeatTokens:
    """The repetition's token ids for ``tokenizer``, as kvpress derives them (``KVzipPress.__call__``:
    the chat template rendered around a dummy user message gives the prefix and the suffix)."""

    def ids(text: str) -> tuple[int, ...]:
        return tuple(int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"])

    prefix_text, suffix_text = "", "\n"
    if getattr(tokenizer, "chat_template", None):
        dummy = "dummy context"
        separator = "\n" + "#" * len(dummy)
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": dummy + separator}],
            add_generation_prompt=True,
            tokenize=False,
            enable_thinking=False,
        )
        head, _, suffix_text = rendered.partition(separator)
        prefix_text = head.split(dummy)[0]
    return RepeatTokens((ids(FIRST_PROMPT), ids(NEXT_PROMPT), ids(suffix_text), ids(prefix_text)))


def reconstruction_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    start: int,
    end: int,
    rows: tuple[int, int],
    sinks: int,
) -> torch.Tensor:
    """KVzip's scores of one chunk of context entries, from its repetition's queries.

    Args:
        query: ``(H_q, T, d)`` the layer's queries (after RoPE), prompt and suffix.
        key: ``(H_kv, T, d)`` its keys.
        scaling: softmax scale.
        start: the chunk's first context token.
        end: one past its last: the chunk is ``[start, end)``.
        rows: ``(lo, hi)``: the repetition's tokens in ``[0, T)`` (its queries and keys).
        sinks: the first ``min(sinks, start)`` keys join the softmax (attention sinks).

    Returns:
        ``(H_kv, end - start)`` float32: for each entry of the chunk the largest softmax weight any
        repetition query of its KV group gives it, the softmax taken over the sinks, the chunk's keys
        and the repetition's keys (causal among them), as kvpress's ``score_kvzip``.
    """
    h_kv, d = key.shape[0], key.shape[-1]
    group = query.shape[0] // h_kv
    lo, hi = rows
    sink = min(sinks, start)
    keys = torch.cat([key[:, :sink], key[:, start:end], key[:, lo:hi]], dim=1).float()  # (H_kv, K, d)
    ctx, reps = end - start, hi - lo
    best = torch.zeros(h_kv, ctx, dtype=torch.float32, device=key.device)
    for a in range(0, reps, QUERY_BLOCK):
        b = min(a + QUERY_BLOCK, reps)
        q = query[:, lo + a : lo + b].float().view(h_kv, group, b - a, d)
        logits = torch.einsum("hgqd,hkd->hgqk", q, keys) * scaling
        # Query r of the repetition sees repetition keys 0..r only.
        r = torch.arange(a, b, device=key.device)[:, None]
        c = torch.arange(reps, device=key.device)[None, :]
        logits[..., sink + ctx :] = logits[..., sink + ctx :].masked_fill(c > r, float("-inf"))
        probs = logits.softmax(dim=-1)[..., sink : sink + ctx]
        best = torch.maximum(best, probs.amax(dim=(1, 2)))
    return best


def drop_lowest(scores: torch.Tensor, dropped: int) -> torch.Tensor:
    """``(..., H, T)`` bool: which entries stay after dropping the ``dropped`` lowest of ``scores``
    ``(..., H, T)`` over its last two axes together (kvpress: ``topk(-scores.reshape(-1), n)``)."""
    flat = scores.reshape(-1)
    kept = torch.ones_like(flat, dtype=torch.bool)
    if dropped > 0:
        kept[torch.topk(-flat, dropped).indices] = False
    return kept.view(scores.shape)


def protect_best(scores: torch.Tensor) -> torch.Tensor:
    """``scores`` ``(..., H, T)`` with each head's best entry raised to ``+inf``: no head is ever left
    empty (a cache head holds at least one entry). The bottom-``k`` then differs from kvpress's only
    where kvpress would drop every entry of a head; the count dropped stays the same."""
    best = scores.argmax(dim=-1, keepdim=True)
    return scores.scatter(-1, best, float("inf"))


def kept_per_head(kept: torch.Tensor) -> PerHead:
    """A :class:`PerHead` selection ``(1, H, C)`` of a ``(H, T)`` keep mask (no head empty), each
    head's entries in position order."""
    t = kept.shape[-1]
    counts = kept.sum(dim=-1)
    positions = torch.arange(t, device=kept.device)
    order = torch.where(kept, positions, positions + t)
    width = int(counts.max())
    indices = order.topk(width, dim=-1, largest=False, sorted=True).values % t
    return PerHead(indices[None], counts[None])


class KVzip(CachePolicy):
    """Context-reconstruction scores, one budget over all layers and KV heads (see the module).

    Attributes:
        budget: entries kept: a fraction of the cache (``1 - ratio``: kvpress's compression ratio is
            the fraction removed) or tokens per layer and KV head on average (``budget * H_kv *
            layers`` in all).
        layerwise: every layer keeps the same share (its heads still share it adaptively); default
            ``False``, one allocation over the whole model (kvpress's and the paper's default).
        sinks: the first entries scored 1.0 (kept first) and joined to every softmax (kvpress
            ``n_sink = 4``).
        chunk_size: context tokens reconstructed per chunk (kvpress 2048).
        overlap: tokens of the previous chunk repeated in a later chunk's prompt (kvpress 8).
    """

    kind = "kvzip"

    budget: Budget = 0.1
    layerwise: bool = False
    sinks: int = Field(4, ge=0)
    chunk_size: int = Field(2048, ge=1)
    overlap: int = Field(8, ge=0)
    _tokens: RepeatTokens | None = PrivateAttr(None)

    def check_composition(self, propagation: PropagationPolicy) -> None:
        if not isinstance(propagation, AllTokens):
            raise ValueError(
                f"kvzip reconstructs the whole context at every layer; propagation {propagation.kind!r} "
                "would cut the tokens it scores (compose it with propagation 'all')"
            )

    def with_tokenizer(self, tokenizer: Any) -> KVzip:
        """A copy that knows the repetition's token ids for ``tokenizer`` (see :func:`repeat_tokens`)."""
        if tokenizer is None or not callable(tokenizer):
            return self
        bound = self.model_copy()
        bound._tokens = repeat_tokens(tokenizer)
        return bound

    def resolved_budget(self, prompt_len: int) -> int:
        """Average entries per layer and KV head for a prompt of ``prompt_len`` tokens."""
        return resolve_budget(self.budget, prompt_len)

    def scoring_suffix(self, prompt: torch.Tensor, state: RequestState) -> list[torch.Tensor] | None:
        n = int(prompt.shape[0])
        if self.resolved_budget(n) >= n:
            return None  # nothing to drop: no reconstruction pass
        tokens = self._tokens or RepeatTokens(((), (), (), ()))
        skip = len(tokens.prefix)
        if skip >= n or prompt[:skip].tolist() != list(tokens.prefix):
            skip = 0
        pieces, spans, start, offset = [], [], skip, n
        chunks = list(prompt[skip:].split(self.chunk_size))
        for i, chunk in enumerate(chunks):
            head = list(tokens.first if i == 0 else tokens.next)
            if i and self.overlap:
                head += chunks[i - 1][-self.overlap :].tolist()
            lead = torch.tensor(head + list(tokens.suffix), dtype=prompt.dtype, device=prompt.device)
            piece = torch.cat([lead, chunk])
            spans.append((start, start + chunk.shape[0], offset, offset + piece.shape[0]))
            pieces.append(piece)
            start += chunk.shape[0]
            offset += piece.shape[0]
        scratch = state.scratch(self)
        scratch["spans"], scratch["scores"] = spans, {}
        return pieces

    def select(self, view: LayerView, state: RequestState) -> Selection:
        scratch = state.scratch(self)
        spans = scratch.get("spans")
        if not spans:
            return None
        tokens = view.num_tokens - state.scoring_tokens
        scores = view.key.new_zeros((view.num_kv_heads, tokens), dtype=torch.float32)
        scores[:, : self.sinks] = 1.0
        for start, end, lo, hi in spans:
            scores[:, start:end] = reconstruction_scores(
                view.query[0], view.key[0], view.scaling, start, end, (lo, hi), self.sinks
            )
        scratch["scores"][view.layer] = scores
        return None  # every prompt entry is held until finish_prefill allocates the budget

    def finish_prefill(self, state: RequestState) -> Mapping[int, Selection] | None:
        scratch = state.scratch(self)
        by_layer: dict[int, torch.Tensor] = scratch.pop("scores", None) or {}
        scratch.pop("spans", None)
        if not by_layer:
            return None
        layers = sorted(by_layer)
        scores = protect_best(torch.stack([by_layer[i] for i in layers]))  # (layers, H, T)
        n_layers, heads, tokens = scores.shape
        if isinstance(self.budget, float):
            ratio = round(1.0 - self.budget, 12)  # 1 - 0.9 is 0.09999999999999998
            dropped_total, dropped_layer = int(scores.numel() * ratio), int(heads * tokens * ratio)
        else:
            keep = min(self.budget, tokens)
            dropped_total, dropped_layer = scores.numel() - keep * heads * n_layers, (tokens - keep) * heads
        dropped_total = min(dropped_total, scores.numel() - heads * n_layers)
        dropped_layer = min(dropped_layer, heads * (tokens - 1))
        if self.layerwise:
            kept = torch.stack([drop_lowest(s, dropped_layer) for s in scores])
        else:
            # How many each layer drops comes from the whole model's bottom entries; each layer then
            # drops its own bottom that many (kvpress: bincount of the global bottom-k, then per layer).
            lowest = torch.topk(-scores.reshape(-1), dropped_total).indices if dropped_total else None
            per_layer = (
                torch.bincount(lowest // (heads * tokens), minlength=n_layers).tolist()
                if lowest is not None
                else [0] * n_layers
            )
            kept = torch.stack([drop_lowest(s, int(k)) for s, k in zip(scores, per_layer, strict=True)])
        return {i: kept_per_head(kept[j]) for j, i in enumerate(layers)}


class KVzipPreset(Preset):
    """KVzip: context-reconstruction scores, budget allocated over all layers and KV heads."""

    kind = "kvzip"
    description = "KVzip: query-agnostic scores from context reconstruction (Kim et al. 2025)"

    kv_budget: Budget = 0.1
    layerwise: bool = False
    sinks: int = Field(4, ge=0)
    chunk_size: int = Field(2048, ge=1)

    def build(self) -> Policy:
        cache = KVzip(
            budget=self.kv_budget, layerwise=self.layerwise, sinks=self.sinks, chunk_size=self.chunk_size
        )
        return Policy(AllTokens(), cache)


__all__ = ["KVzip", "KVzipPreset", "reconstruction_scores", "repeat_tokens"]
