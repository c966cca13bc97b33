"""A small cost model: what a policy's settings can at best save, to print beside the measurement.

Prefill is compute-bound at long contexts, so its cost is counted in FLOPs per layer, with the token
count each layer actually processes (TSP, PyramidInfer and GemFilter change it). Decode reads every
weight and every cached KV entry once per token, so its cost is counted in bytes read. The ratio of
full-KV cost to the policy's cost is the speed-up bound. Divided by what the machine measured
(:mod:`kvpolicy.bench.machine`), the same counts give absolute bounds in seconds. Prefill memory is
counted term by term in :func:`prefill_peak_bytes`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelShape:
    """The dimensions the cost model needs (read from a transformers config)."""

    hidden: int
    intermediate: int
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool = False

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            layers=config.num_hidden_layers,
            q_heads=config.num_attention_heads,
            kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            vocab=config.vocab_size,
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )

    @property
    def layer_params(self) -> int:
        d = self.head_dim
        proj = self.hidden * d * (2 * self.q_heads + 2 * self.kv_heads)
        return proj + 3 * self.hidden * self.intermediate + 2 * self.hidden


def layer_prefill_flops(shape: ModelShape, tokens: int) -> float:
    """FLOPs of one decoder layer over ``tokens`` tokens: projections, causal attention, MLP."""
    d, t = shape.head_dim, tokens
    proj = 2 * t * shape.hidden * d * (2 * shape.q_heads + 2 * shape.kv_heads)
    mlp = 2 * t * 3 * shape.hidden * shape.intermediate
    attn = 2 * shape.q_heads * d * t * (t + 1)  # QK^T and AV over the causal triangle
    return float(proj + mlp + attn)


def prefill_flops(shape: ModelShape, tokens_per_layer: Sequence[int]) -> float:
    """Prefill FLOPs for the given per-layer token counts (every layer pass, restarts included),
    plus the last-position LM head."""
    return sum(layer_prefill_flops(shape, t) for t in tokens_per_layer) + 2.0 * shape.hidden * shape.vocab


def decode_bytes_per_token(
    shape: ModelShape,
    kv_tokens_per_layer: Sequence[int],
    bytes_per_elem: int,
    generated: int = 0,
    batch: int = 1,
    kv_bytes_per_elem: float | None = None,
    kv_fixed_bytes: float = 0,
) -> float:
    """Bytes one decode step reads: all layer weights and the LM head, plus each layer's KV cache
    (``generated / 2`` tokens appended on average over a run of ``generated`` steps), plus
    ``kv_fixed_bytes`` per sequence whatever its length (KIVI's full-precision residual,
    :func:`kv_residual_bytes`).

    For a batch of ``batch`` sequences the weights are read once per step and the KV of every
    sequence once; ``kv_tokens_per_layer`` is one sequence's (the bench repeats one prompt, so every
    sequence keeps the same counts). ``kv_bytes_per_elem``: bytes a stored KV element takes when the
    cache is quantized (codes plus scales, :func:`kv_element_bytes`), else the model's ``bytes_per_elem``."""
    weights = (shape.layers * shape.layer_params + shape.hidden * shape.vocab) * bytes_per_elem
    per_entry = 2 * shape.kv_heads * shape.head_dim * (kv_bytes_per_elem or bytes_per_elem)
    kv = sum(c + generated / 2 for c in kv_tokens_per_layer) * per_entry + kv_fixed_bytes
    return float(weights + batch * kv)


def kv_element_bytes(storage: Any, shape: ModelShape, bytes_per_elem: int) -> float:
    """Bytes one stored key or value element takes under ``storage`` (a
    :class:`~kvpolicy.storage.KVStorage`, its dict, a policy's ``to_dict()`` or ``None``): its code and its
    share of the group's scales when quantized, else the model's ``bytes_per_elem``."""
    if isinstance(storage, dict) and "cache" in storage:  # a policy's to_dict(): its storage, if any
        storage = storage.get("storage")
    if storage is None:
        return float(bytes_per_elem)
    from kvpolicy.storage import KVStorage

    parsed = KVStorage.parse(storage)
    return parsed.bytes_per_element(shape.head_dim) if parsed.quantized else float(bytes_per_elem)


def kv_residual_bytes(storage: Any, shape: ModelShape, bytes_per_elem: int) -> int:
    """Bytes of one sequence's full-precision residual under ``storage`` (as :func:`kv_element_bytes`
    reads it): KIVI's layout keeps ``residual`` recent keys and values per layer and KV head at the
    model's ``bytes_per_elem``; other layouts none."""
    if isinstance(storage, dict) and "cache" in storage:
        storage = storage.get("storage")
    if storage is None:
        return 0
    from kvpolicy.storage import KVStorage

    per_row = KVStorage.parse(storage).residual_bytes(shape.head_dim, shape.head_dim, bytes_per_elem)
    return shape.layers * shape.kv_heads * per_row


def weight_bytes(shape: ModelShape, bytes_per_elem: int) -> int:
    """Bytes of all parameters: decoder layers, final norm, embedding and (unless tied) LM head."""
    tables = shape.hidden * shape.vocab * (1 if shape.tied_embeddings else 2)
    return (shape.layers * shape.layer_params + shape.hidden + tables) * bytes_per_elem


def prefill_peak_bytes(
    shape: ModelShape,
    length: int,
    batch: int,
    bytes_per_elem: int,
    kept_kv_tokens_per_layer: Sequence[int],
    mlp_chunk_tokens: int = 4096,
    include_weights: bool = True,
) -> int:
    """The least memory a prefill of ``batch`` prompts of ``length`` tokens must hold at its peak
    (in the last layer, when every earlier layer's kept KV exists and the layer's activations are
    full-length). Terms, all in the model dtype unless noted:

    * weights (:func:`weight_bytes`), unless ``include_weights=False``: the bench's measured peak is
      the growth above what was allocated before the run (CUDA allocator peak minus the allocation at
      the start; on a CPU, peak-RSS growth), which excludes the model, so it compares with the bound
      without weights;
    * the kept KV of all layers: ``sum(kept_kv_tokens_per_layer) x 2 (K, V) x kv_heads x head_dim``
      per sequence (pass the counts after decode, kept + generated, for a run whose cache reserves
      room for its decode tokens);
    * one layer's full-length projections: q, k and v, ``(q_heads + 2 kv_heads) x head_dim`` per
      token;
    * the hidden states: the residual stream and its normed copy, ``2 x hidden`` per token;
    * one MLP chunk: ``min(mlp_chunk_tokens, batch x length)`` token rows of gate, up and their
      product, ``3 x intermediate`` per row (the engine runs the MLP in chunks of that many rows);
    * the attention workspace of a fused SDPA kernel (flash / memory-efficient): its output,
      ``q_heads x head_dim`` per token, and the per-row log-sum-exp, ``q_heads`` fp32 per token (the
      math fallback would materialise ``q_heads x length^2`` scores; not counted: it is avoidable);
    * the last position's logits, ``vocab`` per sequence.

    Everything per token is times ``batch x length``. Allocator slack, fragmentation and temporaries
    a fused implementation would avoid are not counted: a lower bound, not a prediction."""
    e, rows = bytes_per_elem, batch * length
    weights = weight_bytes(shape, e) if include_weights else 0
    kv = batch * sum(kept_kv_tokens_per_layer) * 2 * shape.kv_heads * shape.head_dim * e
    qkv = rows * (shape.q_heads + 2 * shape.kv_heads) * shape.head_dim * e
    hidden = rows * 2 * shape.hidden * e
    mlp = min(mlp_chunk_tokens, rows) * 3 * shape.intermediate * e
    attn = rows * shape.q_heads * (shape.head_dim * e + 4)
    logits = batch * shape.vocab * e
    return int(weights + kv + qkv + hidden + mlp + attn + logits)


@dataclass(frozen=True)
class Bound:
    prefill_speedup: float
    decode_speedup: float


def speedup_bound(
    shape: ModelShape,
    full_tokens: Sequence[int],
    full_kv: Sequence[int],
    policy_tokens: Sequence[int],
    policy_kv: Sequence[int],
    bytes_per_elem: int,
    generated: int = 0,
    batch: int = 1,
    policy_kv_bytes_per_elem: float | None = None,
    policy_kv_fixed_bytes: float = 0,
) -> Bound:
    """The speed-ups over full KV this cost model allows for the policy's schedule (for ``batch``
    sequences: prefill FLOPs scale with the batch and cancel; decode reads the weights once), full KV
    stored in the model's dtype and the policy's as ``policy_kv_bytes_per_elem`` says (quantized)."""
    policy_bytes = decode_bytes_per_token(
        shape, policy_kv, bytes_per_elem, generated, batch, policy_kv_bytes_per_elem, policy_kv_fixed_bytes
    )
    return Bound(
        prefill_speedup=prefill_flops(shape, full_tokens) / prefill_flops(shape, policy_tokens),
        decode_speedup=decode_bytes_per_token(shape, full_kv, bytes_per_elem, generated, batch)
        / policy_bytes,
    )


# -- memory of a decode batch: how many sequences fit --------------------------------------------------

#: Bytes of one stored position (``PagedLayer.pos_pool`` keeps an int64 per slot).
POSITION_BYTES = 8
#: Safety factor on :func:`prefill_peak_bytes`'s activation terms when sizing a batch: that bound is a
#: lower bound (allocator slack and short-lived temporaries are not in it; measured peaks on an H200
#: came within 1-25 % of it), and a batch that does not fit costs a retry at half the size.
PREFILL_SLACK = 1.5
#: Share of the memory budget kept free when sizing a batch (allocator fragmentation, CUDA graph
#: pools, policy scratch the cost model does not count).
MARGIN = 0.05


def slot_bytes(
    shape: ModelShape, bytes_per_elem: int, positions: bool = True, kv_bytes_per_elem: float | None = None
) -> int:
    """Bytes of one cache slot of one KV head: its key and value (``kv_bytes_per_elem`` each element
    when quantized, :func:`kv_element_bytes`), and (``positions``) its stored position."""
    kv = math.ceil(2 * shape.head_dim * (kv_bytes_per_elem or bytes_per_elem))
    return kv + (POSITION_BYTES if positions else 0)


def paged_kv_bytes(
    head_lengths: Sequence[Sequence[int]], reserve: int, block_size: int, bytes_per_slot: int
) -> int:
    """Bytes one sequence's rows of the paged cache allocate: every ``(layer, KV head)`` row owns
    ``max(1, ceil((kept + reserve) / block_size))`` pages of ``block_size`` slots (what
    ``PagedLayer.store`` allocates), so the count includes the decode reserve and each row's page slack,
    not just the kept entries. ``head_lengths`` are the kept entries per layer and KV head (ragged for
    head-adaptive policies such as AdaKV)."""
    room = max(reserve, 0)
    pages = sum(max(1, -(-(n + room) // block_size)) for layer in head_lengths for n in layer)
    return pages * block_size * bytes_per_slot


def decode_workspace_bytes(shape: ModelShape, slots_per_layer: int, bytes_per_elem: int) -> int:
    """Per-sequence allowance for a decode step's temporaries: the torch paged attention of the largest
    layer (``slots_per_layer`` allocated slots of one sequence over its KV heads: float32 scores, their
    masked copy, the exponentials, and the gathered per-slot probabilities decode-time policies score
    with, for each of the ``q_heads / kv_heads`` query heads sharing a slot) and the step's logits (model
    dtype and a float32 copy). One layer's attention is live at a time, so this is not per layer."""
    n_rep = max(1, shape.q_heads // shape.kv_heads)
    return slots_per_layer * n_rep * 4 * 6 + shape.vocab * (bytes_per_elem + 4)


@dataclass(frozen=True)
class BatchFit:
    """What the cost model says about a decode batch of one policy at one prompt length.

    Attributes:
        budget: memory the run may use, weights included (bytes).
        weights: :func:`weight_bytes`.
        kv_per_sequence: the paged cache of one sequence (:func:`paged_kv_bytes`: kept entries,
            decode reserve and page slack; keys, values and positions).
        workspace_per_sequence: the larger of what joining sub-batch caches into one batch holds for a
            moment (with ``prefill_batch``: two copies of the largest layer, padded to its longest KV
            head, as ``PagedLayer.store`` concatenates and selects; copies of one prefill are tiled
            straight into the new pools) and a decode step's temporaries
            (:func:`decode_workspace_bytes`); the two never coexist.
        prefill: activations of one prefill sub-batch (:func:`prefill_peak_bytes` without KV or
            weights, times :data:`PREFILL_SLACK`).
        prefill_alongside: whether the batch's kept KV is already held while a sub-batch prefills (every
            sequence prefilled in turn), or the prefill runs before the batch exists (copies of one
            prefill).
        fixed: bytes not per sequence: :data:`MARGIN` of the budget and each layer's null page.
        max_batch: the largest batch for which all of that fits (0: not even one sequence).
    """

    budget: int
    weights: int
    kv_per_sequence: int
    workspace_per_sequence: int
    prefill: int
    prefill_alongside: bool
    fixed: int
    max_batch: int

    def bytes_for(self, batch: int) -> int:
        """Memory a decode batch of ``batch`` sequences needs by this model (weights included)."""
        decode = batch * (self.kv_per_sequence + self.workspace_per_sequence)
        prefill = (batch if self.prefill_alongside else 1) * self.kv_per_sequence + self.prefill
        return self.weights + self.fixed + max(decode, prefill)


def fit_batch(
    shape: ModelShape,
    bytes_per_elem: int,
    head_lengths: Sequence[Sequence[int]],
    reserve: int,
    block_size: int,
    length: int,
    budget: int,
    prefill_batch: int | None = None,
    kv_bytes_per_elem: float | None = None,
    kv_fixed_bytes: int = 0,
) -> BatchFit:
    """The largest decode batch of sequences keeping ``head_lengths`` (one sequence's kept entries per
    layer and KV head, e.g. from a prefill of one prompt) that fits in ``budget`` bytes, weights included.

    ``prefill_batch`` ``None``: the batch's caches are copies of one prefilled sequence, so the prefill's
    activations come and go before the batch exists; else every sequence is prefilled ``prefill_batch``
    at a time while the sequences already prefilled hold their KV. Decode needs every sequence's KV and
    a per-sequence workspace; joining sub-batches' caches needs the same KV and a moment's copy of one
    layer. Returns the terms and the largest batch (see :class:`BatchFit`). ``kv_bytes_per_elem``: a
    quantized cache's bytes per stored element (:func:`kv_element_bytes`); its pages shrink accordingly,
    and a decode step's workspace holds one layer's pages dequantized (the torch path);
    ``kv_fixed_bytes`` per sequence beside its pages (KIVI's residual, :func:`kv_residual_bytes`)."""
    if budget <= 0:
        raise ValueError(f"memory budget must be > 0 bytes, got {budget}")
    stored = slot_bytes(shape, bytes_per_elem, kv_bytes_per_elem=kv_bytes_per_elem)
    kv = paged_kv_bytes(head_lengths, reserve, block_size, stored) + kv_fixed_bytes
    widest = max(len(layer) * max(layer, default=0) for layer in head_lengths) if head_lengths else 0
    join = 0 if prefill_batch is None else 2 * widest * slot_bytes(shape, bytes_per_elem)
    room = max(reserve, 0)
    slots = max(
        (sum(max(1, -(-(n + room) // block_size)) * block_size for n in layer) for layer in head_lengths),
        default=0,
    )
    dequantized = slots * slot_bytes(shape, bytes_per_elem, positions=False) if kv_bytes_per_elem else 0
    workspace = max(join, decode_workspace_bytes(shape, slots, bytes_per_elem) + dequantized)
    sub = 1 if prefill_batch is None else max(1, prefill_batch)
    activations = prefill_peak_bytes(
        shape, length, sub, bytes_per_elem, [0] * shape.layers, include_weights=False
    )
    prefill = int(activations * PREFILL_SLACK)
    weights = weight_bytes(shape, bytes_per_elem)
    fixed = int(budget * MARGIN) + shape.layers * block_size * stored
    free = budget - weights - fixed
    alongside = prefill_batch is not None
    if free < kv + prefill or free < kv + workspace:
        best = 0
    else:
        best = free // (kv + workspace)
        if alongside:
            best = min(best, (free - prefill) // kv)
    return BatchFit(budget, weights, kv, workspace, prefill, alongside, fixed, int(best))
