"""A small cost model: what a policy's settings can at best save, to print beside the measurement.

Prefill is compute-bound at long contexts, so its cost is counted in FLOPs per layer, with the token
count each layer actually processes (TSP, PyramidInfer and GemFilter change it). Decode reads every
weight and every cached KV entry once per token, so its cost is counted in bytes read. The ratio of
full-KV cost to the policy's cost is the speed-up bound. Divided by what the machine measured
(:mod:`kvpolicy.bench.machine`), the same counts give absolute bounds in seconds. Prefill memory is
counted term by term in :func:`prefill_peak_bytes`.
"""

from __future__ import annotations

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
) -> float:
    """Bytes one decode step reads: all layer weights and the LM head, plus each layer's KV cache
    (``generated / 2`` tokens appended on average over a run of ``generated`` steps).

    For a batch of ``batch`` sequences the weights are read once per step and the KV of every
    sequence once; ``kv_tokens_per_layer`` is one sequence's (the bench repeats one prompt, so every
    sequence keeps the same counts)."""
    weights = (shape.layers * shape.layer_params + shape.hidden * shape.vocab) * bytes_per_elem
    per_entry = 2 * shape.kv_heads * shape.head_dim * bytes_per_elem
    kv = sum(c + generated / 2 for c in kv_tokens_per_layer) * per_entry
    return float(weights + batch * kv)


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
) -> Bound:
    """The speed-ups over full KV this cost model allows for the policy's schedule (for ``batch``
    sequences: prefill FLOPs scale with the batch and cancel; decode reads the weights once)."""
    return Bound(
        prefill_speedup=prefill_flops(shape, full_tokens) / prefill_flops(shape, policy_tokens),
        decode_speedup=decode_bytes_per_token(shape, full_kv, bytes_per_elem, generated, batch)
        / decode_bytes_per_token(shape, policy_kv, bytes_per_elem, generated, batch),
    )
