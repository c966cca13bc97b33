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
    """``Qwen2ForCausalLM`` (Qwen2, Qwen2.5) without sliding-window layers (with
    ``use_sliding_window`` the generic adapter serves it: it runs sliding-window layers)."""

    name = "qwen2"
    architectures = ("Qwen2ForCausalLM",)

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        layer_types = getattr(model.config, "layer_types", None) or []
        return super().supports(model) and "sliding_attention" not in layer_types


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
