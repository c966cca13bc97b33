"""Adapters for the Qwen2 / Qwen2.5 and Qwen3 families.

Both share the Llama decoder layout (pre-norm, q/k/v/o projections, RoPE, gated MLP), so the layer
loop of :class:`~kvpolicy.adapters.base.DecoderAdapter` serves them. Qwen2's q/k/v projections carry
biases, which the projection modules already apply. Qwen3 normalises each query and key head
(``q_norm``/``k_norm``, RMSNorm over the head dim) *before* RoPE, as ``Qwen3Attention.forward`` does
in transformers' ``modeling_qwen3.py``; that is the one thing :class:`Qwen3Adapter` overrides.
"""

from __future__ import annotations

import torch
from torch import nn

from kvpolicy.adapters.base import DecoderAdapter


class Qwen2Adapter(DecoderAdapter):
    """``Qwen2ForCausalLM`` (Qwen2, Qwen2.5)."""

    name = "qwen2"
    architectures = ("Qwen2ForCausalLM",)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        layer_types = getattr(self.config, "layer_types", None) or []
        window = getattr(self.config, "sliding_window", None)
        # Sliding-window layers (use_sliding_window=True) are not implemented by the shared loop:
        # refuse prompts longer than the window instead of silently attending past it.
        sliding = "sliding_attention" in layer_types and isinstance(window, int) and window > 0
        self.sliding_window: int | None = window if sliding else None

    def check_prompt_length(self, length: int) -> None:
        super().check_prompt_length(length)
        if self.sliding_window is not None and length > self.sliding_window:
            raise ValueError(
                f"prompt of {length} tokens exceeds this model's sliding window ({self.sliding_window}); "
                f"kvpolicy's Qwen adapter does not implement sliding-window attention"
            )


class Qwen3Adapter(Qwen2Adapter):
    """``Qwen3ForCausalLM``: per-head RMSNorm of queries and keys before RoPE."""

    name = "qwen3"
    architectures = ("Qwen3ForCausalLM",)

    def project_qkv(
        self, attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        shape = (b, t, -1, attn.head_dim)
        q = attn.q_norm(attn.q_proj(x).view(shape)).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(x).view(shape)).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        q, k = self._apply_rotary(q, k, cos, sin)
        return q, k, v
