"""Adapter for the Llama family: Llama 2/3/3.1/3.2, SmolLM2, Mistral and Ministral.

These share one decoder layout (pre-norm, q/k/v/o projections, RoPE, gated MLP), so the generic
loop of :class:`~kvpolicy.adapters.base.DecoderAdapter` serves them unchanged.
"""

from __future__ import annotations

from torch import nn

from kvpolicy.adapters.base import DecoderAdapter


class LlamaAdapter(DecoderAdapter):
    """``LlamaForCausalLM`` and ``MistralForCausalLM``."""

    name = "llama"
    architectures = ("LlamaForCausalLM", "MistralForCausalLM")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        window = getattr(self.config, "sliding_window", None)
        # Mistral v0.1 uses sliding-window attention, which this loop does not apply: refuse prompts
        # longer than the window instead of silently attending past it (see check_prompt_length).
        self.sliding_window: int | None = window if isinstance(window, int) and window > 0 else None

    def check_prompt_length(self, length: int) -> None:
        super().check_prompt_length(length)
        if self.sliding_window is not None and length > self.sliding_window:
            raise ValueError(
                f"prompt of {length} tokens exceeds this Mistral model's sliding window "
                f"({self.sliding_window}); kvpolicy's Llama adapter does not implement sliding-window attention"
            )
