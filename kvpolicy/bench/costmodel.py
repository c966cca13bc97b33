"""A small cost model: what a policy's settings can at best save, to print beside the measurement.

Prefill is compute-bound at long contexts, so its cost is counted in FLOPs per layer, with the token
count each layer actually processes (TSP, PyramidInfer and GemFilter change it). Decode reads every
weight and every cached KV entry once per token, so its cost is counted in bytes read. The ratio of
full-KV cost to the policy's cost is the speed-up bound.
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
    shape: ModelShape, kv_tokens_per_layer: Sequence[int], bytes_per_elem: int, generated: int = 0
) -> float:
    """Bytes one decode step reads: all layer weights and the LM head, plus each layer's KV cache
    (``generated / 2`` tokens appended on average over a run of ``generated`` steps)."""
    weights = (shape.layers * shape.layer_params + shape.hidden * shape.vocab) * bytes_per_elem
    per_entry = 2 * shape.kv_heads * shape.head_dim * bytes_per_elem
    kv = sum(c + generated / 2 for c in kv_tokens_per_layer) * per_entry
    return float(weights + kv)


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
) -> Bound:
    """The speed-ups over full KV this cost model allows for the policy's schedule."""
    return Bound(
        prefill_speedup=prefill_flops(shape, full_tokens) / prefill_flops(shape, policy_tokens),
        decode_speedup=decode_bytes_per_token(shape, full_kv, bytes_per_elem, generated)
        / decode_bytes_per_token(shape, policy_kv, bytes_per_elem, generated),
    )
