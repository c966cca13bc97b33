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
import functools
import inspect
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import (
    DYNAMIC_LAYER_TYPE_MAPPING,
    Cache,
    CacheLayerMixin,
    DynamicCache,
    LinearAttentionCacheLayerMixin,
    LinearAttentionLayer,
)

from kvpolicy.adapters.base import AdapterError, DecoderAdapter
from kvpolicy.cache import KVPolicyCache, PagedLayer
from kvpolicy.interfaces import LayerView
from kvpolicy.state import RequestState
from kvpolicy.storage import KVStorage

#: The attention implementation kvpolicy registers (under this name) and routes through.
ROUTED = "kvpolicy"


@dataclass
class _LayerCall:
    """What one layer call hands kvpolicy's attention function (and what it hands back)."""

    adapter: GenericAdapter
    counts: list[int] | None = None  # prefill: real tokens per (left-padded) sequence
    token_positions: torch.Tensor | None = None  # prefill: (B, T) original positions
    cache: PagedLayer | None = None  # decode: the layer's cache
    positions: torch.Tensor | None = None  # decode: (B,) position of the new token
    want_probs: bool = False
    qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    probs: torch.Tensor | None = None
    calls: int = 0  # attention-function calls in this layer call: kvpolicy caches one k/v per layer
    #: latent attention (MLA): the compressed latent ``(B, 1, T, r)`` and rotated shared key ``(B, 1, T,
    #: d_rope)`` the layer handed its cache (:class:`_Latent`), before expanding them per head
    latent: tuple[torch.Tensor, torch.Tensor] | None = None


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
    out = _attend_routed(module, query, key, value, call, kwargs.get("softcap"))
    # the interface's contract: (B, T, H, d), whatever the caller flattens it to (GPT-2 keeps the shape)
    return out.reshape(query.shape[0], query.shape[2], query.shape[1], -1), None


def _attend_routed(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    call: _LayerCall,
    softcap: float | None,
) -> torch.Tensor:
    """Prefill: record ``(q, k, v)`` for the policies and attend; decode: write the new entries
    into the layer's paged cache and attend over it. Returns ``(B, T, H * d)``."""
    call.calls += 1
    if call.calls > 1:
        raise _Unsupported(_TWICE.format(name=type(module).__name__))
    adapter = call.adapter
    extra = {"softcap": softcap} if softcap is not None else {}  # Gemma 2's attention-logit soft-capping
    if call.latent is not None and call.cache is not None:  # MLA decode: attend over the cached latent
        return adapter._decode_latent(module, query, call)
    if call.cache is None:  # prefill
        call.qkv = (query, key, value)
        window = adapter.windows[module.layer_idx]
        if window and call.token_positions is not None and query.shape[2] > 1:
            return adapter._attend_window(module, query, key, value, call, int(window), extra)
        chunk = adapter.chunks[module.layer_idx]
        if chunk and call.token_positions is not None and query.shape[2] > 1:
            return adapter._attend_window(module, query, key, value, call, int(chunk), extra, chunked=True)
        return adapter._attend_prefill(module, query, key, value, call.counts or [], extra)
    call.cache.write(key, value, call.positions)
    call.qkv = (query, key, value)
    out, call.probs = adapter._decode_attention(query.device)(
        query,
        call.cache,
        module.scaling,
        want_probs=call.want_probs,
        softcap=softcap,
        sinks=getattr(module, "sinks", None),  # GPT-OSS: a learned logit per head in the softmax
    )
    return out.to(query.dtype)


class _Unsupported(RuntimeError):
    """Found while running a layer: the family does something kvpolicy cannot drive."""


_TWICE = (
    "{name} calls the attention function more than once per layer (differential attention, as in "
    "DiffLlama): kvpolicy's cache holds one set of keys and values per layer"
)

#: The backend function each routed config had before kvpolicy routed it, by ``id(config)``.
_ORIGINAL: dict[int, Any] = {}
#: ... and its name.
_ORIGINAL_NAME: dict[int, str] = {}
#: Decoder layer classes seen passing their keyword arguments to the attention function.
_PROBED: set[type] = set()


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
    embedding_norm: str | None = None


#: What a family does that its config does not say, by ``model_type``: read by :class:`Traits`.
#: NanoChat normalises the embeddings with the final norm before the first layer.
FAMILY_TRAITS: dict[str, dict[str, Any]] = {
    "nanochat": {"embedding_norm": "norm"},
}


@dataclass(frozen=True)
class Layout:
    """Where a family keeps its pieces, relative to the ``*ForCausalLM`` (data, not code): the Llama
    shape is the default; GPT-2-style families keep their layers elsewhere and may add learned
    absolute positions to the token embeddings (which then travel with each token: a token TSP keeps
    still carries its original position)."""

    #: dotted path of the module holding the decoder layers (and the rotary embedding, final norm)
    base: str = "model"
    #: that module's list of decoder layers
    layers: str = "layers"
    #: each layer's attention module
    attn: str = "self_attn"
    #: the base's learned absolute position embedding, added to the token embeddings (``None``: RoPE)
    positions: str | None = None
    #: the base's norm after the last layer (``None``: ``norm`` or ``final_layernorm``)
    final_norm: str | None = None
    #: projections around the layers when the embedding width differs (OPT-350m)
    project_in: str | None = None
    project_out: str | None = None
    #: the base's shared rotary embedding
    rotary: str = "rotary_emb"


#: Families that keep their pieces elsewhere than the Llama shape, by ``model_type``. Each family's attention goes
#: through transformers' AttentionInterface; its token embedding and output projection are found
#: through ``get_input_embeddings`` / ``get_output_embeddings``.
LAYOUTS: dict[str, Layout] = {
    "gpt2": Layout("transformer", "h", "attn", positions="wpe", final_norm="ln_f"),
    "gpt_bigcode": Layout("transformer", "h", "attn", positions="wpe", final_norm="ln_f"),
    "gptj": Layout("transformer", "h", "attn", final_norm="ln_f"),
    "codegen": Layout("transformer", "h", "attn", final_norm="ln_f"),
    "falcon": Layout("transformer", "h", "self_attention", final_norm="ln_f"),
    "gpt_neox": Layout("gpt_neox", "layers", "attention", final_norm="final_layer_norm"),
    "opt": Layout(
        "model.decoder",
        "layers",
        "self_attn",
        positions="embed_positions",
        final_norm="final_layer_norm",
        project_in="project_in",
        project_out="project_out",
    ),
    "biogpt": Layout("biogpt", "layers", "self_attn", positions="embed_positions", final_norm="layer_norm"),
    "lfm2": Layout(final_norm="embedding_norm"),  # LFM2 names its final norm so
    "lfm2_moe": Layout(final_norm="embedding_norm", rotary="pos_emb"),
    "lfm3": Layout(final_norm="embedding_norm"),
    # every layer's token mixer is its ``mixer``: Mamba 2, attention or (``mlp`` layers) an MLP
    "nemotron_h": Layout(attn="mixer", final_norm="norm_f"),
    # ALiBi families: located, so that the refusal names what is missing (their attention does not
    # go through the AttentionInterface, where kvpolicy sees queries and keys)
    "bloom": Layout("transformer", "h", "self_attention", final_norm="ln_f"),
    "mpt": Layout("transformer", "blocks", "attn", final_norm="norm_f"),
}


def layout_of(model: nn.Module) -> Layout:
    return LAYOUTS.get(getattr(getattr(model, "config", None), "model_type", ""), Layout())


def _located(model: nn.Module, layout: Layout) -> tuple[nn.Module | None, Any]:
    """The base module and its decoder layers as ``layout`` says (``None`` where missing)."""
    base: Any = model
    for part in layout.base.split("."):
        base = getattr(base, part, None)
    return base, getattr(base, layout.layers, None) if base is not None else None


#: The attention layer types kvpolicy runs (``config.layer_types``); recurrent, linear-attention and
#: convolution types are run as transformers' cache knows them (:func:`layer_kinds`), others refused by name.
LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention"})
#: Layer types of layers that run an MLP only (no token mixer, nothing cached).
MLP_ONLY = frozenset({"moe", "mlp"})
#: What a layer keeps between tokens: keys and values (``attention``), a fixed-size recurrent or
#: convolution state (``state``), both (Falcon-H1 runs Mamba beside attention in each layer) or
#: nothing (``none``: an MLP-only layer).
ATTENTION, STATE, BOTH, NONE = "attention", "state", "both", "none"


def layer_kinds(config: Any) -> list[str] | None:
    """What each layer of a model keeps (:data:`ATTENTION`, :data:`STATE`, :data:`BOTH`, :data:`NONE`),
    read from transformers' own cache layer for each ``config.layer_types`` entry: the model's
    cache is the authority on which layers carry a recurrent state. ``None`` when a layer type is one
    transformers' cache does not know, or shares another layer's keys and values."""
    types = list(getattr(config, "layer_types", None) or [])
    if set(types) <= LAYER_TYPES:  # attention only (``[]``: the config does not say; every layer attends)
        return [ATTENTION] * len(types)
    if getattr(config, "kv_sharing_modes", None):
        return None
    kinds = []
    for t in types:
        if t == "hybrid_sliding":  # Inkling: its attention reads its window's offsets from the cache
            return None
        if t in MLP_ONLY:
            kinds.append(NONE)
            continue
        if t in LAYER_TYPES:
            kinds.append(ATTENTION)
            continue
        cls = DYNAMIC_LAYER_TYPE_MAPPING.get(t)
        if cls is None or not issubclass(cls, LinearAttentionCacheLayerMixin):  # e.g. indexed attention
            return None
        kinds.append(BOTH if issubclass(cls, CacheLayerMixin) else STATE)
    return kinds


def _own_cache_class(model: nn.Module) -> str | None:
    """The name of a ``Cache`` subclass the family's modeling module defines for itself (MiniMax keeps
    its linear-attention state in one), which kvpolicy's state cache cannot stand in for."""
    family = sys.modules.get(type(model).__module__)
    for name, obj in vars(family or object()).items():
        if isinstance(obj, type) and issubclass(obj, Cache) and obj.__module__ == type(model).__module__:
            return name
    return None


#: Module class names that mark recurrent, state-space or convolution mixers inside a decoder layer,
#: whose state is not keys and values (Falcon-H1 runs Mamba beside attention in every layer).
_STATEFUL = ("Mamba", "Mixer", "Conv", "LinearAttention", "DeltaNet", "Rwkv", "Recurrent", "Lightning")


def why_unsupported(model: nn.Module) -> str | None:
    """Why the generic adapter cannot drive ``model`` (``None``: it can)."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return f"{name} is not a decoder-only model"
    layout = layout_of(model)
    base, layers = _located(model, layout)
    where = f"{layout.base}.{layout.layers}"
    if base is None or layers is None or model.get_output_embeddings() is None:
        return (
            f"{name} has no {where} / output embeddings (not a decoder-only *ForCausalLM of a known layout)"
        )
    kinds = layer_kinds(config)
    other = sorted(set(getattr(config, "layer_types", None) or []) - LAYER_TYPES - MLP_ONLY)
    if other and kinds is None:
        return (
            f"{name} has {', '.join(other)} layers (kvpolicy runs full, sliding-window and chunked attention "
            f"layers, and the recurrent, linear-attention and convolution layers transformers' cache knows)"
        )
    kinds = kinds or [ATTENTION] * len(layers)
    if len(kinds) < len(layers):
        return f"{name} has {len(layers)} layers but config.layer_types names {len(kinds)}"
    attending = [layer for layer, kind in zip(layers, kinds, strict=True) if kind in (ATTENTION, BOTH)]
    if not attending:
        return f"{name} has no attention layers: it keeps no KV cache to compress"
    attn = getattr(attending[0], layout.attn, None)
    if attn is None or not hasattr(attn, "layer_idx"):
        return f"{name}'s layers have no {layout.attn} with a layer_idx (not standard attention)"
    if any(getattr(layer, layout.attn, None) is None for layer in attending):
        return f"{name} mixes attention with recurrent or state-space layers that config.layer_types does not name"
    if STATE in kinds or BOTH in kinds:
        own = _own_cache_class(model)
        if own is not None:
            return (
                f"{name} keeps its recurrent state in its own cache class ({own}), not in transformers' "
                f"linear-attention cache layers that kvpolicy carries"
            )
    else:
        for child in layers[0].children():
            kind = type(child).__name__
            if any(mark in kind for mark in _STATEFUL):
                return (
                    f"{name}'s layers run {kind} beside attention, and config.layer_types does not say so: "
                    f"recurrent or convolution state that kvpolicy cannot carry"
                )
    can_route = getattr(model, "_can_set_attn_implementation", None)
    if can_route is not None and not can_route():
        return f"{name}'s attention does not go through transformers' AttentionInterface"
    if not hasattr(base, layout.rotary) and layout.positions is None and _takes_positions(attn):
        # (a ``rotary_emb`` of ``None`` is the family's own choice of no positions: Granite's "nope")
        return f"{name} has neither a shared rotary embedding ({layout.base}.{layout.rotary}) nor learned positions"
    return None


def _takes_positions(attn: nn.Module) -> bool:
    """Whether an attention module takes rotary tables or position ids (one that takes neither uses no
    positions at all: Jamba's and Nemotron-H's attention layers)."""
    params = inspect.signature(attn.forward).parameters
    return "position_embeddings" in params or "position_ids" in params


@functools.cache
def _parameters(layer_class: type) -> frozenset[str]:
    """The keyword parameters a decoder layer class's ``forward`` names."""
    return frozenset(inspect.signature(layer_class.forward).parameters)


class _PassThrough(CacheLayerMixin):
    """An attention layer's slot in a hybrid model's state cache: kvpolicy's paged cache holds that
    layer's keys and values, so ``update`` hands back what it is given and keeps nothing."""

    is_sliding = False
    is_compileable = True

    def lazy_initialization(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to allocate."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return key_states, value_states

    def get_mask_sizes(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        return 0, 0

    def get_seq_length(self, *args: Any) -> int:
        return 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self, *args: Any) -> int:
        return -1


class _Latent(_PassThrough):
    """A latent-attention (MLA) layer's slot in the layer cache: transformers' MLA layers hand their
    cache the compressed latent and the rotated shared key before expanding them per head; this
    records them on the layer call (kvpolicy caches them, not the per-head expansion) and hands them
    back unchanged. ``call`` is set by the adapter before each call of the layer."""

    call: _LayerCall | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.call is not None:
            self.call.latent = (key_states, value_states)
        return key_states, value_states


class _StateBesideAttention(LinearAttentionLayer):
    """A layer that runs a recurrent mixer beside attention (Falcon-H1): transformers' state for the
    mixer, a pass-through for the attention's keys and values (kvpolicy's paged cache holds them)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return key_states, value_states


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
        self.layout = layout_of(model)
        super().__init__(model)
        self._token_embed = model.get_input_embeddings()
        part = self.layout
        self._positions_embed = getattr(self.base, part.positions) if part.positions else None
        self._project_in = getattr(self.base, part.project_in, None) if part.project_in else None
        norm = getattr(self.base, part.final_norm) if part.final_norm else super()._final_norm
        out = getattr(self.base, part.project_out, None) if part.project_out else None
        tail = [m for m in (norm, out) if m is not None]
        #: what runs between the last layer and the output projection (OPT may have no final norm)
        self._final: nn.Module = tail[0] if len(tail) == 1 else nn.Sequential(*tail)
        if self._attn_impl == ROUTED:  # built while kvpolicy runs this model: the backend underneath
            self._attn_impl = _ORIGINAL_NAME[id(model.config)]
            self._attn_fn = _ORIGINAL[id(model.config)]
        elif self._attn_impl == "eager":  # the family's own eager function (Gemma 2 soft-caps, GPT-OSS sinks)
            family = sys.modules[type(self.attention(self.layers[0])).__module__]
            self._attn_fn = getattr(family, "eager_attention_forward", self._attn_fn)
        _register()
        config = self.config
        rotary = getattr(self.base, self.layout.rotary, None)
        self.layer_types: list[str] | None = getattr(config, "layer_types", None)
        self.traits = Traits(
            embedding_multiplier=getattr(config, "embedding_multiplier", None),
            logits_divisor=getattr(config, "logits_scaling", None),
            final_softcap=getattr(config, "final_logit_softcapping", None),
            rotary_per_layer_type=bool(self.layer_types)
            and rotary is not None
            and "layer_type" in inspect.signature(rotary.forward).parameters,
            **FAMILY_TRAITS.get(getattr(config, "model_type", ""), {}),
        )
        #: each layer's sliding window (``None``: full attention): ``config.layer_types`` says which
        #: layers slide (Gemma 3, Cohere 2, Qwen2 with ``use_sliding_window``, ...); without it a set
        #: ``config.sliding_window`` applies to every layer (Mistral v0.1, Phi-3, Starcoder2).
        window = getattr(config, "sliding_window", None)
        window = int(window) if isinstance(window, int) and window > 0 else None
        types = self.layer_types or ["sliding_attention" if window else "full_attention"] * self.num_layers
        self.windows: list[int | None] = [window if t == "sliding_attention" else None for t in types]
        #: each layer's attention chunk (``None``: not chunked): Llama 4's chunked layers attend within
        #: fixed chunks of ``config.attention_chunk_size`` positions
        chunk = getattr(config, "attention_chunk_size", None)
        self.chunks: list[int | None] = [chunk if t == "chunked_attention" else None for t in types]
        self._probe()

    def check_prompt_length(self, length: int) -> None:
        """Also refuse what the layers would compute wrong without transformers' cache: Llama 4's
        layers without RoPE scale their queries by a position they read from that cache's length
        (``attn_temperature_tuning``); kvpolicy calls layers without it, which reads position 0,
        and the scale is 1 either way only below ``floor_scale`` positions."""
        super().check_prompt_length(length)
        config = self.config
        nope = 0 in (getattr(config, "no_rope_layers", None) or [1])
        limit = getattr(config, "floor_scale", None)
        if (
            getattr(config, "attn_temperature_tuning", False)
            and nope
            and isinstance(limit, int)
            and length >= limit
        ):
            raise ValueError(
                f"prompt plus generation needs {length} positions, but {type(self.model).__name__}'s layers "
                f"without RoPE scale their queries by the position in transformers' cache "
                f"(attn_temperature_tuning), which kvpolicy does not use: it serves up to {limit - 1} positions "
                f"(config.floor_scale - 1); shorten the prompt or max_new_tokens"
            )

    def _probe(self) -> None:
        """Run two tokens through the first layer: its attention must come through kvpolicy's routed
        function (a layer that does not pass its keyword arguments on cannot be driven). Raises
        ``ValueError`` naming the class otherwise. Once per layer class: ``get_adapter`` builds an
        adapter per call, and the answer depends only on the class's code."""
        first = self.attends.index(True)
        layer = self.layers[first]
        if type(layer) in _PROBED:
            return
        device = next(layer.parameters()).device
        ids = torch.zeros((1, 2), dtype=torch.long, device=device)
        positions = torch.arange(2, device=device)[None]
        call = _LayerCall(self, counts=[2])
        try:
            with torch.no_grad(), self.routing():
                h = self._embed(ids, positions)
                self._call_layer(first, layer, h, self._rotary(h, positions), positions, call)
        except _Unsupported as exc:
            raise ValueError(f"{type(self.model).__name__}: {exc} (generic adapter)") from None
        except Exception as exc:
            raise ValueError(
                f"{type(self.model).__name__}: its decoder layer cannot be called as transformers' standard "
                f"layers are (generic adapter): {type(exc).__name__}: {exc}"
            ) from exc
        if call.qkv is None:
            raise ValueError(
                f"{type(self.model).__name__}: its decoder layers do not pass keyword arguments to the "
                f"attention function, so kvpolicy cannot see their queries and keys (generic adapter)"
            )
        _PROBED.add(type(layer))

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
    def _locate(self, model: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
        base, layers = _located(model, self.layout)
        assert base is not None and layers is not None  # why_unsupported said so first
        return base, list(layers)

    def attention(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.layout.attn)

    def _attending(self) -> list[bool]:
        #: what each layer keeps (:func:`layer_kinds`): attention, recurrent state, both or nothing
        self.kinds: list[str] = (layer_kinds(self.config) or [ATTENTION] * len(self.layers))[
            : len(self.layers)
        ]
        return [kind in (ATTENTION, BOTH) for kind in self.kinds]

    @functools.cached_property
    def latent(self) -> bool:
        """Whether the attention layers are latent attention (MLA) that hand their cache the compressed
        latent (the families with ``expand_kv``): kvpolicy then caches the latent, one
        ``kv_lora_rank + qk_rope_head_dim`` key per token shared by all heads (its first ``kv_lora_rank``
        columns are the value), instead of per-head keys and values. A family that expands before
        caching is cached as it attends, per head."""
        attn = self.attention(self.layers[self.attends.index(True)])
        proj = getattr(attn, "kv_b_proj", None)
        return (
            callable(getattr(attn, "expand_kv", None))
            and isinstance(proj, nn.Linear)
            and proj.bias is None
            and all(
                isinstance(getattr(attn, n, None), int)
                for n in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim")
            )
        )

    def _new_cache(self, block: int, storage: KVStorage | None = None) -> KVPolicyCache:
        """A paged layer per attention layer and, on a hybrid or latent-attention model, the cache
        object its layers are called with (:meth:`_layer_cache`)."""
        without = [i for i, kind in enumerate(self.kinds) if kind in (STATE, NONE)]
        stateful = any(kind in (STATE, BOTH) for kind in self.kinds)
        states = self._layer_cache() if stateful or self.latent else None
        shared = self.attention(self.layers[self.attends.index(True)]).kv_lora_rank if self.latent else None
        return KVPolicyCache(
            self.num_layers,
            block,
            self._attn_impl,
            without_kv=without,
            states=states,
            shared_values=shared,
            storage=storage,
        )

    def _layer_cache(self) -> Cache:
        """transformers' own cache for this model (``DynamicCache(config=...)``: its linear-attention
        layers hold each recurrent, linear-attention or convolution layer's state, updated in place by the
        layer), with every attention layer's slot a pass-through (:class:`_Latent` on MLA models, which
        records the latent): kvpolicy's paged cache holds those entries, under the policies."""
        cache = DynamicCache(config=self.config)
        for i, kind in enumerate(self.kinds):
            if kind == ATTENTION:
                cache.layers[i] = _Latent() if self.latent else _PassThrough()
            elif kind == BOTH:
                cache.layers[i] = _StateBesideAttention(number_of_states=cache.layers[i].number_of_states)
        return cache

    def _state_kwargs(
        self,
        i: int,
        layer: nn.Module,
        states: Cache,
        counts: list[int] | None,
        width: int,
        device: torch.device,
    ) -> dict[str, Any]:
        """What a layer of a hybrid model is called with besides the usual: the state cache, and (at a
        prefill of prompts of different lengths) the 2D padding mask its recurrent mixer zeroes the left
        padding with, so that padding never enters a recurrent state (as transformers'
        ``create_recurrent_attention_mask`` gives it)."""
        params = _parameters(type(layer))
        out: dict[str, Any] = {"cache" if "cache" in params else "past_key_values": states}
        if "use_cache" in params:
            out["use_cache"] = True
        kind = self.kinds[i]
        if counts is None or kind not in (STATE, BOTH) or all(c == width for c in counts):
            return out
        start = torch.tensor([width - c for c in counts], device=device)
        mask = (torch.arange(width, device=device)[None, :] >= start[:, None]).long()
        if "mamba_attention_mask" in params:  # Falcon-H1: one mask for its Mamba, another for attention
            out["mamba_attention_mask"] = mask
        elif kind == STATE:
            out["attention_mask"] = mask
        else:
            raise ValueError(
                f"{type(layer).__name__} runs a recurrent mixer beside attention with one attention mask for both, "
                f"so a batch of prompts of different lengths cannot be padded for it; run them one at a time"
            )
        return out

    def _embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self._token_embed(ids)
        if self._project_in is not None:
            h = self._project_in(h)
        if self._positions_embed is not None:  # learned absolute positions (OPT's start at an offset)
            table = self._positions_embed
            h = h + F.embedding(positions + getattr(table, "offset", 0), table.weight).to(h.dtype)
        if self.traits.embedding_multiplier is not None:
            h = h * self.traits.embedding_multiplier
        if self.traits.embedding_norm is not None:
            h = getattr(self.base, self.traits.embedding_norm)(h)
        return h

    def _rotary(self, h: torch.Tensor, positions: torch.Tensor) -> Any:
        if self._positions_embed is not None:
            return None  # learned positions went in with the embeddings
        rotary = getattr(self.base, self.layout.rotary, None)
        if rotary is None:  # no positional encoding (Jamba, Nemotron-H, Granite's "nope")
            return None
        if getattr(rotary, "mrope_section", None) is not None:  # multimodal RoPE (Qwen3.5): a text token
            positions = positions[None].expand(3, -1, -1)  # has its position on every section
        if not self.traits.rotary_per_layer_type:
            return rotary(h, positions)
        types = {t for t, attends in zip(self.layer_types or [], self.attends, strict=False) if attends}
        return {t: rotary(h, positions, t) for t in sorted(types)}  # (a recurrent layer takes none)

    def _call_layer(
        self,
        i: int,
        layer: nn.Module,
        h: torch.Tensor,
        cos_sin: Any,
        positions: torch.Tensor,
        call: _LayerCall,
        states: Cache | None = None,
    ) -> torch.Tensor:
        tables = (
            cos_sin.get(self.layer_types[i]) if isinstance(cos_sin, dict) and self.layer_types else cos_sin
        )
        kwargs: dict[str, Any] = {
            "attention_mask": None,
            "position_ids": positions,
            "position_embeddings": tables,
            "kvpolicy": call,
        }
        if states is not None:
            kwargs.update(self._state_kwargs(i, layer, states, call.counts, h.shape[1], h.device))
            slot = states.layers[i]
            if isinstance(slot, _Latent):
                slot.call = call
        out = layer(h, **kwargs)
        if states is not None and isinstance(states.layers[i], _Latent):
            states.layers[i].call = None  # the call's tensors are not kept past it
        return out[0] if isinstance(out, tuple) else out

    def _attend_window(
        self,
        module: nn.Module,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        call: _LayerCall,
        window: int,
        extra: dict[str, Any] | None = None,
        chunked: bool = False,
    ) -> torch.Tensor:
        """Sliding-window attention over *original* positions (after TSP a token at index 2 may sit at
        position 900): query ``p`` sees keys at positions ``(p - window, p]``, as transformers' sliding
        mask does; ``chunked``: keys at or before ``p`` in its chunk of ``window`` positions (``p //
        window`` equal), as the chunked mask does. Per sequence, over its real tokens."""
        width = q.shape[2]
        out = q.new_zeros((q.shape[0], width, q.shape[1] * v.shape[-1]))
        assert call.token_positions is not None
        for b, c in enumerate(call.counts or [width] * q.shape[0]):
            lo = width - c
            pos = call.token_positions[b, lo:].to(q.device)
            gap = pos[:, None] - pos[None, :]
            near = (pos[:, None] // window == pos[None, :] // window) if chunked else gap < window
            allowed = (gap >= 0) & near
            mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device)
            mask = mask.masked_fill(~allowed, torch.finfo(q.dtype).min)[None, None]
            out[b : b + 1, lo:] = self._attend(
                module, q[b : b + 1, :, lo:], k[b : b + 1, :, lo:], v[b : b + 1, :, lo:], False, mask, extra
            )
        return out

    # -- latent attention (MLA) -------------------------------------------------------------------
    @staticmethod
    def _mla_weights(attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """``kv_b_proj`` split per head into its key part ``(H, d_nope, r)`` and value part ``(H, d_v, r)``
        (``expand_kv`` computes ``kv_b_proj(latent)`` viewed as ``(..., H, d_nope + d_v)``)."""
        weight = attn.kv_b_proj.weight
        per_head = weight.view(-1, attn.qk_nope_head_dim + attn.v_head_dim, weight.shape[-1])
        return per_head[:, : attn.qk_nope_head_dim], per_head[:, attn.qk_nope_head_dim :]

    def _absorb_query(self, attn: nn.Module, query: torch.Tensor) -> torch.Tensor:
        """The query ``(B, H, T, d_nope + d_rope)`` in latent space, ``(B, H, T, r + d_rope)``: its
        unrotated part through each head's key projection (``q_nope W_uk``), so that its product with
        the cached ``[latent, rotated key]`` is exactly the model's attention logit
        (``q_nope . W_uk latent + q_rope . k_rope``): the policies score, and decode attends, on what
        is cached."""
        w_key, _ = self._mla_weights(attn)
        nope = attn.qk_nope_head_dim
        absorbed = torch.einsum("bhtn,hnr->bhtr", query[..., :nope], w_key.to(query.dtype))
        return torch.cat([absorbed, query[..., nope:]], dim=-1)

    def _decode_latent(self, attn: nn.Module, query: torch.Tensor, call: _LayerCall) -> torch.Tensor:
        """An MLA layer's decode step over its cached latents: append the new token's ``[latent, rotated
        key]`` (and the latent as its value), attend with the absorbed query (one KV head shared by all
        query heads, as MQA), then take each head's latent output through its value projection
        (``W_uv``). Returns ``(B, 1, H * d_v)``."""
        assert call.latent is not None and call.cache is not None
        latent, rotated = call.latent
        call.cache.write(torch.cat([latent, rotated], dim=-1), latent, call.positions)
        absorbed = self._absorb_query(attn, query)
        call.qkv = (absorbed, latent, latent)
        out, call.probs = self._decode_attention(query.device)(
            absorbed, call.cache, attn.scaling, want_probs=call.want_probs
        )
        _, w_value = self._mla_weights(attn)
        b, heads = query.shape[0], query.shape[1]
        out = torch.einsum(
            "bthr,hvr->bthv", out.view(b, 1, heads, -1).to(query.dtype), w_value.to(query.dtype)
        )
        return out.reshape(b, 1, -1)

    def _keep(
        self, i: int, policy: Any, view: LayerView, state: RequestState
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Sliding-window layers keep exactly the entries the next token can see (the last
        ``window - 1`` positions); the cache policy compresses the full-attention layers only."""
        window = self.windows[i]
        chunk = self.chunks[i]
        if state.scoring_tokens and (window is not None or chunk is not None):
            raise AdapterError(
                f"cache policy {type(policy.cache).__name__} ({policy.cache.kind!r}) scores with tokens "
                f"appended to the prompt, but layer {i} of {type(self.model).__name__} attends within a "
                f"{'sliding window' if window is not None else 'chunk'}: it would cache them"
            )
        if chunk is not None:  # the entries of the last prompt token's chunk (decode clears them at the next)
            pos = view.positions[0]
            keep = (pos >= (int(pos.max()) // chunk) * chunk).nonzero().squeeze(-1)
            k, v = view.key[0][:, keep], view.value[0][:, keep]
            return k, v, pos[keep][None, :].expand(k.shape[0], -1), None
        if window is None:
            return super()._keep(i, policy, view, state)
        self._say_budget_below_window(policy, view.prompt_len, window)
        pos = view.positions[0]
        keep = (pos >= int(pos.max()) + 2 - window).nonzero().squeeze(-1)  # the next query is at max + 1
        k, v = view.key[0][:, keep], view.value[0][:, keep]
        return k, v, pos[keep][None, :].expand(k.shape[0], -1), None

    def _say_budget_below_window(self, policy: Any, prompt_len: int, window: int) -> None:
        """A cache budget below the sliding window does not shrink sliding layers (they keep their
        window: the model attends to all of it); say so instead of silently keeping more."""
        resolve = getattr(policy.cache, "resolved_budget", None)
        budget = resolve(prompt_len) if callable(resolve) else None
        if budget is None or budget >= min(window - 1, prompt_len):
            return
        full = [i for i, w in enumerate(self.windows) if w is None]
        applies = f"the budget applies to the full-attention layers {full}" if full else "every layer slides"
        warnings.warn(
            f"{type(policy.cache).__name__} budget {budget} is below the {window}-token sliding window of "
            f"{type(self.model).__name__}'s sliding layers: they keep their last {window - 1} entries (the "
            f"model attends to all of them); {applies}",
            stacklevel=2,
        )

    def _prefill_layer(
        self,
        i: int,
        layer: nn.Module,
        h: torch.Tensor,
        cos_sin: Any,
        positions: torch.Tensor,
        counts: list[int],
        states: Cache | None = None,
    ) -> tuple[torch.Tensor, Any, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
        call = _LayerCall(self, counts=counts, token_positions=positions)
        h = self._call_layer(i, layer, h, cos_sin, positions, call, states)
        if not self.attends[i]:
            return h, cos_sin, positions, None
        if call.latent is not None and call.qkv is not None:  # MLA: the policies see what is cached
            latent, rotated = call.latent
            key = torch.cat([latent, rotated], dim=-1)
            return (
                h,
                cos_sin,
                positions,
                (self._absorb_query(self.attention(layer), call.qkv[0]), key, latent),
            )
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
        states: Cache | None = None,
    ) -> tuple[torch.Tensor, Any, torch.Tensor | None, torch.Tensor | None]:
        if not self.attends[i]:  # a recurrent layer: its state in ``states`` advances by one token
            h = self._call_layer(i, layer, h, cos_sin, positions[:, None], _LayerCall(self), states)
            return h, cos_sin, None, None
        window, chunk = self.windows[i], self.chunks[i]
        if chunk is not None:  # a token that starts a chunk sees none of the earlier entries
            lc.clear(positions % chunk == 0)
        local = window is not None or chunk is not None  # what the cache policy does not score
        call = _LayerCall(self, cache=lc, positions=positions, want_probs=want_probs and not local)
        h = self._call_layer(i, layer, h, cos_sin, positions[:, None], call, states)
        assert call.qkv is not None
        if window is not None:  # roll: the next token (position p + 1) sees positions > p + 1 - window
            slot_pos = lc.slot_positions()
            never = torch.iinfo(slot_pos.dtype).max
            oldest = slot_pos.masked_fill(slot_pos < 0, never).argmin(dim=-1, keepdim=True)  # (B, H, 1)
            stale = slot_pos.gather(-1, oldest) <= (positions + 1 - window)[:, None, None]
            lc.evict(torch.where(stale, oldest, -1))
        return h, cos_sin, call.qkv[0], call.probs

    @property
    def _final_norm(self) -> nn.Module:
        # a plain attribute lookup (no ``super()`` property): the compiled decode step traces this
        return self._final

    def _logits(self, h_last: torch.Tensor) -> torch.Tensor:
        logits = super()._logits(h_last)
        if self.traits.logits_divisor is not None:
            logits = logits / self.traits.logits_divisor
        if self.traits.final_softcap is not None:
            cap = self.traits.final_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits
