"""The generic adapter: any decoder-only transformers model whose attention goes through the registry.

Why (issue 13): a hand-written adapter per family re-expresses its projections, norms and MLP. This
one calls each decoder layer *whole*, so a family needs no code of ours. kvpolicy still owns the layer
loop (the token subset and original positions each layer sees: TSP, PyramidInfer, GemFilter), and sees
each layer's post-RoPE queries, keys and values through transformers' public attention-function
registry (``AttentionInterface``): while kvpolicy runs the model (:meth:`GenericAdapter.routing`), the
config names kvpolicy's attention function, which

* at prefill records ``(q, k, v)`` for the policies and computes the attention with the backend the
  model was loaded with (causal, per sequence where lengths differ), and
* at decode writes ``k, v`` into kvpolicy's paged cache and attends over it.

The layer is called with a per-call context object in its keyword arguments (transformers passes a
layer's ``**kwargs`` through to the attention function); a call without it (plain transformers
running the same model meanwhile) goes straight to the original backend. The config is restored when
kvpolicy's call returns: the model is unchanged after use.

Family differences are data, read from the model (:class:`Traits`): an embedding multiplier (Granite),
a logit divisor (Granite) or soft-cap (Gemma 2), rotary tables per layer type (Gemma 3).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from kvpolicy.adapters.base import DecoderAdapter
from kvpolicy.cache import PagedLayer, paged_attention

#: The attention implementation kvpolicy registers (under this name) and routes through.
ROUTED = "kvpolicy"


@dataclass
class _LayerCall:
    """What one layer call hands kvpolicy's attention function (and what it hands back)."""

    adapter: GenericAdapter
    counts: list[int] | None = None  # prefill: real tokens per (left-padded) sequence
    cache: PagedLayer | None = None  # decode: the layer's cache
    positions: torch.Tensor | None = None  # decode: (B,) position of the new token
    want_probs: bool = False
    qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    probs: torch.Tensor | None = None


def _routed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *args: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """kvpolicy's attention function (registered as :data:`ROUTED`)."""
    call: _LayerCall | None = kwargs.pop("kvpolicy", None)
    if call is None:  # someone else runs the model meanwhile: the backend it was loaded with
        return _ORIGINAL[id(module.config)](module, query, key, value, attention_mask, *args, **kwargs)
    adapter = call.adapter
    if call.cache is None:  # prefill
        call.qkv = (query, key, value)
        return adapter._attend_prefill(module, query, key, value, call.counts or []), None
    call.cache.write(key, value, call.positions)
    call.qkv = (query, key, value)
    out, call.probs = paged_attention(query, call.cache, module.scaling, want_probs=call.want_probs)
    return out.to(query.dtype), None


#: The backend function each routed config had before kvpolicy routed it, by ``id(config)``.
_ORIGINAL: dict[int, Any] = {}
#: ... and its name.
_ORIGINAL_NAME: dict[int, str] = {}


def _register() -> None:
    from transformers import AttentionInterface

    if ROUTED not in AttentionInterface._global_mapping:
        AttentionInterface.register(ROUTED, _routed_attention)


@dataclass(frozen=True)
class Traits:
    """What a family does around its layers, read from the model: the loop applies these."""

    embedding_multiplier: float | None = None
    logits_divisor: float | None = None
    final_softcap: float | None = None
    rotary_per_layer_type: bool = False


def why_unsupported(model: nn.Module) -> str | None:
    """Why the generic adapter cannot drive ``model`` (``None``: it can)."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return f"{name} is not a decoder-only model"
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if base is None or layers is None or getattr(model, "lm_head", None) is None:
        return f"{name} has no model.layers / lm_head (not a decoder-only *ForCausalLM of the usual shape)"
    attn = getattr(layers[0], "self_attn", None)
    if attn is None or not hasattr(attn, "layer_idx"):
        return f"{name}'s layers have no self_attn with a layer_idx (not standard attention)"
    if getattr(attn, "kv_lora_rank", None) or "Mla" in type(attn).__name__:
        return f"{name} uses latent (MLA) attention, whose cache is not per-head keys and values"
    if any(getattr(layer, "self_attn", None) is None for layer in layers):
        return f"{name} mixes attention with recurrent or state-space layers"
    can_route = getattr(model, "_can_set_attn_implementation", None)
    if can_route is not None and not can_route():
        return f"{name}'s attention does not go through transformers' AttentionInterface"
    if getattr(config, "attn_logit_softcapping", None):
        return (
            f"{name} soft-caps attention logits, which kvpolicy's paged decode attention does not apply yet"
        )
    if getattr(attn, "sinks", None) is not None:
        return f"{name} uses attention sinks (learned logits), which kvpolicy's paged attention does not apply yet"
    if not hasattr(base, "rotary_emb"):
        return f"{name} has no shared rotary embedding (model.rotary_emb)"
    return None


class GenericAdapter(DecoderAdapter):
    """Any decoder-only ``*ForCausalLM`` whose layers attend through ``AttentionInterface``."""

    name = "generic"
    architectures: ClassVar[tuple[str, ...]] = ()

    #: what ``kvpolicy list`` shows for this adapter's coverage.
    covers: ClassVar[str] = (
        "any decoder-only *ForCausalLM whose layers attend through transformers' AttentionInterface "
        "(tested: see docs/adapters.md)"
    )

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return why_unsupported(model) is None

    @classmethod
    def why_not(cls, model: nn.Module) -> str | None:
        """Why this adapter cannot drive ``model`` (``None``: it can); ``get_adapter`` reports it."""
        return why_unsupported(model)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        if self._attn_impl == ROUTED:  # built while kvpolicy runs this model: the backend underneath
            self._attn_impl = _ORIGINAL_NAME[id(model.config)]
            self._attn_fn = _ORIGINAL[id(model.config)]
        _register()
        config = self.config
        rotary = self.base.rotary_emb
        self.layer_types: list[str] | None = getattr(config, "layer_types", None)
        self.traits = Traits(
            embedding_multiplier=getattr(config, "embedding_multiplier", None),
            logits_divisor=getattr(config, "logits_scaling", None),
            final_softcap=getattr(config, "final_logit_softcapping", None),
            rotary_per_layer_type=bool(self.layer_types)
            and "layer_type" in inspect.signature(rotary.forward).parameters,
        )
        self._layer_kwargs = inspect.signature(type(self.layers[0]).forward).parameters
        self._probe()
        window = getattr(config, "sliding_window", None)
        sliding = any(getattr(layer.self_attn, "sliding_window", None) for layer in self.layers)
        self.sliding_window: int | None = window if sliding and isinstance(window, int) else None

    def _probe(self) -> None:
        """Run two tokens through the first layer: its attention must come through kvpolicy's routed
        function (a layer that does not pass its keyword arguments on cannot be driven), and the
        model must be left as it was. Raises ``ValueError`` naming the class otherwise."""
        layer = self.layers[0]
        device = next(layer.parameters()).device
        ids = torch.zeros((1, 2), dtype=torch.long, device=device)
        positions = torch.arange(2, device=device)[None]
        with torch.no_grad(), self.routing():
            h = self._embed(ids)
            call = _LayerCall(self, counts=[2])
            self._call_layer(0, layer, h, self._rotary(h, positions), positions, call)
        if call.qkv is None:
            raise ValueError(
                f"{type(self.model).__name__}: its decoder layers do not pass keyword arguments to the "
                f"attention function, so kvpolicy cannot see their queries and keys (generic adapter)"
            )

    def check_prompt_length(self, length: int) -> None:
        super().check_prompt_length(length)
        if self.sliding_window is not None and length > self.sliding_window:
            raise ValueError(
                f"prompt of {length} tokens exceeds {type(self.model).__name__}'s sliding window "
                f"({self.sliding_window}); the generic adapter does not run sliding-window layers yet"
            )

    @contextlib.contextmanager
    def routing(self) -> Iterator[None]:
        config = self.config
        original = config._attn_implementation
        if original == ROUTED:  # nested (prefill inside generate): already routed
            yield
            return
        _ORIGINAL[id(config)] = self._attn_fn
        _ORIGINAL_NAME[id(config)] = original
        config._attn_implementation = ROUTED
        try:
            yield
        finally:
            config._attn_implementation = original

    # -- the pieces of the loop ------------------------------------------------------------------
    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.base.embed_tokens(ids)
        if self.traits.embedding_multiplier is not None:
            h = h * self.traits.embedding_multiplier
        return h

    def _rotary(self, h: torch.Tensor, positions: torch.Tensor) -> Any:
        if not self.traits.rotary_per_layer_type:
            return self.base.rotary_emb(h, positions)
        return {t: self.base.rotary_emb(h, positions, t) for t in sorted(set(self.layer_types or []))}

    def _call_layer(
        self,
        i: int,
        layer: nn.Module,
        h: torch.Tensor,
        cos_sin: Any,
        positions: torch.Tensor,
        call: _LayerCall,
    ) -> torch.Tensor:
        tables = cos_sin[self.layer_types[i]] if isinstance(cos_sin, dict) and self.layer_types else cos_sin
        out = layer(h, attention_mask=None, position_ids=positions, position_embeddings=tables, kvpolicy=call)
        return out[0] if isinstance(out, tuple) else out

    def _prefill_layer(
        self,
        i: int,
        layer: nn.Module,
        h: torch.Tensor,
        cos_sin: Any,
        positions: torch.Tensor,
        counts: list[int],
    ) -> tuple[torch.Tensor, Any, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        call = _LayerCall(self, counts=counts)
        h = self._call_layer(i, layer, h, cos_sin, positions, call)
        if call.qkv is None:
            raise RuntimeError(
                f"{type(layer).__name__} did not call its attention through kvpolicy's routed function "
                f"(its layer does not pass keyword arguments to the attention function)"
            )
        return h, cos_sin, positions, call.qkv

    def _decode_layer(
        self,
        i: int,
        layer: nn.Module,
        h: torch.Tensor,
        cos_sin: Any,
        positions: torch.Tensor,
        lc: PagedLayer,
        want_probs: bool,
    ) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor | None]:
        call = _LayerCall(self, cache=lc, positions=positions, want_probs=want_probs)
        h = self._call_layer(i, layer, h, cos_sin, positions[:, None], call)
        assert call.qkv is not None
        return h, cos_sin, call.qkv[0], call.probs

    def _logits(self, h_last: torch.Tensor) -> torch.Tensor:
        logits = super()._logits(h_last)
        if self.traits.logits_divisor is not None:
            logits = logits / self.traits.logits_divisor
        if self.traits.final_softcap is not None:
            cap = self.traits.final_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits
