"""Adapter for the Llama family: Llama 2/3/3.1/3.2, SmolLM2, Mistral and Ministral.

These share one decoder layout (pre-norm, q/k/v/o projections, RoPE, gated MLP), so the generic
loop of :class:`~kvpolicy.adapters.base.DecoderAdapter` serves them unchanged.
"""

from __future__ import annotations

from torch import nn

from kvpolicy.adapters.base import DecoderAdapter


class LlamaAdapter(DecoderAdapter):
    """``LlamaForCausalLM`` and ``MistralForCausalLM`` without a sliding window (a Mistral v0.1 with
    one is served by the generic adapter, which runs sliding-window layers)."""

    name = "llama"
    architectures = ("LlamaForCausalLM", "MistralForCausalLM")

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        window = getattr(model.config, "sliding_window", None)
        return super().supports(model) and not (isinstance(window, int) and window > 0)
