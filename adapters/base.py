"""The generic decoder-only adapter: runs the model's own modules in its own layer loop.

Why an adapter owns the loop: TSP, GemFilter and PyramidInfer change how many
tokens the *next* layer sees, which forward hooks on attention modules cannot do. The adapter calls
only the model's public submodules (embeddings, rotary embedding, each layer's norms, projections,
attention function and MLP), never patches a class, and leaves the model as it found it.

This is kvpolicy's one engine: one prefill layer loop (:meth:`DecoderAdapter.prefill`) and one
decode step (:meth:`DecoderAdapter.decode_step`) serve one prompt (a batch of one) and many, and
``generate``, ``prefill`` / ``model.generate``, eval, bench and calibrate all run through them. A model
family subclasses :class:`DecoderAdapter` and overrides what differs (e.g. per-head q/k norms in
:meth:`DecoderAdapter.project_qkv`); the loop itself is written once, here.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import sys
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvpolicy.cache import (
    BLOCK_SIZE,
    FLASH_BLOCK_SIZE,
    KVPolicyCache,
    PagedLayer,
    flash_paged_attention,
)
from kvpolicy.devices import module_device
from kvpolicy.interfaces import DecodeView, Evict, LayerView, PerHead, Policy, Propagate, Restart, Selection
from kvpolicy.kernels import decode_attention_for
from kvpolicy.state import Batch, RequestState
from kvpolicy.storage import KVStorage

# Attention backends that apply causality themselves when given no mask.
_MASKLESS_CAUSAL = {"sdpa", "flash_attention_2", "flash_attention_3"}
_FLASH = {"flash_attention_2", "flash_attention_3"}
#: Token rows per chunk of the prefill's q/k/v projections and MLP (bounds their temporaries).
MLP_CHUNK_TOKENS = 4096


class AdapterError(RuntimeError):
    """A policy failed inside the adapter; the message names the policy and the layer."""


class DecoderAdapter:
    """Drives a ``*ForCausalLM`` of the Llama shape (``model.model.layers[i].self_attn/mlp/...``).

    Subclasses set :attr:`name` and :attr:`architectures` (the ``config.architectures`` /
    class names they serve) and register through the ``kvpolicy_register_adapters`` hook.
    """

    name: ClassVar[str] = ""
    architectures: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config
        self.base, self.layers = self._locate(model)
        #: the output projection (``lm_head``; found through transformers' accessor, whatever its name)
        head = model.get_output_embeddings()
        self.lm_head: nn.Module = head if head is not None else model.lm_head
        self._devices: dict[int, torch.device] = {}  # module_device per module, looked up once
        self._attention_fns: dict[torch.device, Callable[..., Any]] = {}
        #: whether each layer attends (keeps keys and values); a hybrid's recurrent, convolution and
        #: MLP-only layers do not, so no policy scores or compresses them
        self.attends: list[bool] = self._attending()
        if not any(self.attends):
            raise ValueError(
                f"{type(model).__name__} has no attention layers: it keeps no KV cache to compress"
            )
        attn0 = self.attention(self.layers[self.attends.index(True)])
        # The rotary helper lives in each family's modeling module; use that family's own function.
        self._apply_rotary: Callable[..., Any] | None = getattr(
            sys.modules[type(attn0).__module__], "apply_rotary_pos_emb", None
        )
        impl = getattr(self.config, "_attn_implementation", None) or "eager"
        self._attn_impl = impl
        get_interface = getattr(ALL_ATTENTION_FUNCTIONS, "get_interface", None)  # transformers 5.1+
        self._attn_fn = (get_interface or ALL_ATTENTION_FUNCTIONS.get)(impl, _eager_attention)
        # Decode attention over the paged cache: flash-attention's paged kernel where the model runs
        # FlashAttention on CUDA and flash-attn is installed, else the torch path (any device, dtype).
        self._paged_kernel: Callable[..., torch.Tensor] | None = None
        if impl in _FLASH and importlib.util.find_spec("flash_attn") is not None:
            self._paged_kernel = flash_paged_attention

    def _locate(self, model: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
        """The module holding the decoder layers, and the layers (Llama shape: ``model.model.layers``)."""
        return model.model, list(model.model.layers)

    def attention(self, layer: nn.Module) -> nn.Module:
        """A decoder layer's attention module (``self_attn`` in the Llama shape)."""
        return layer.self_attn

    def _attending(self) -> list[bool]:
        """Which layers attend (every layer of the Llama shape)."""
        return [True] * len(self.layers)

    @property
    def attention_layers(self) -> list[int]:
        """Indices of the layers that attend (all of them but on hybrid models)."""
        return [i for i, a in enumerate(self.attends) if a]

    def _new_cache(self, block: int, storage: KVStorage | None = None) -> KVPolicyCache:
        """An empty cache for one prefill pass: a paged layer per attention layer, storing entries as
        ``storage`` says (the policy's :class:`~kvpolicy.quant.KVStorage`)."""
        return KVPolicyCache(self.num_layers, block, self._attn_impl, storage=storage)

    def check_policy(self, policy: Policy) -> None:
        """Refuse, naming the policy, the layer and the layers that attend, a propagation policy that
        would decide after a layer without attention (it could never cut there)."""
        policy.check_model(self.num_layers)
        layers = policy.propagation.decision_layers(self.num_layers)
        wrong = sorted(i for i in layers or () if 0 <= i < self.num_layers and not self.attends[i])
        if wrong:
            prop = policy.propagation
            raise ValueError(
                f"{type(prop).__name__} ({prop.kind!r}) decides after layer {wrong[0]}, but layer {wrong[0]} of "
                f"{type(self.model).__name__} has no attention (a recurrent, convolution or MLP-only layer: no "
                f"queries and keys to score); choose one of the attention layers {self.attention_layers}"
            )

    @functools.cached_property
    def plain_rope_theta(self) -> float | None:
        """The RoPE base when the model's rotary embedding is plain RoPE over the whole head (rope type
        ``default``, no partial rotation, one set of parameters for every layer, applied in HF's
        half-rotation layout as :func:`_layer_rotary`'s probe checks), else ``None``."""
        cfg = self.config
        params = getattr(cfg, "rope_parameters", None) or {}
        if any(isinstance(v, dict) for v in params.values()):  # per layer type (Gemma 3): not one RoPE
            return None
        scaling = getattr(cfg, "rope_scaling", None) or {}
        rope_type = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
        theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
        # (transformers 5 keeps the factor in rope_parameters: GPT-NeoX, Phi)
        partial = params.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", None)) or 1.0
        if getattr(cfg, "qk_nope_head_dim", None):  # latent attention (MLA): part of each head unrotated
            partial = 0.0
        if rope_type != "default" or partial != 1.0 or not isinstance(theta, (int, float)):
            return None
        if not any(self.view_rotaries):  # interleaved pairs (Cohere, GLM, Helium, ERNIE 4.5): not this RoPE
            return None
        return float(theta)

    @functools.cached_property
    def view_rotaries(self) -> list[Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None]:
        """Per layer, what :attr:`LayerView.rotary` holds: the model's own rotary embedding, whatever
        its type, as a function of positions (each layer its own where rotaries differ by layer type,
        Gemma 3's local and global); ``None`` on layers without attention and where
        :func:`_layer_rotary` finds none it can offer."""
        return [_layer_rotary(self, i) if attends else None for i, attends in enumerate(self.attends)]

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return type(model).__name__ in cls.architectures

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def max_positions(self) -> int | None:
        return getattr(self.config, "max_position_embeddings", None)

    def check_prompt_length(self, length: int) -> None:
        """Refuse prompts the model cannot position, naming both numbers."""
        limit = self.max_positions
        if limit is not None and length > limit:
            raise ValueError(
                f"prompt plus generation needs {length} positions but the model supports {limit} "
                f"(config.max_position_embeddings); shorten the prompt or max_new_tokens"
            )

    # -- per-family pieces -----------------------------------------------------------------------
    def project_qkv(
        self, attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys, values ``(B, H, T, d)`` after RoPE, as the family's attention computes them."""
        b, t, _ = x.shape
        shape = (b, t, -1, attn.head_dim)
        q = attn.q_proj(x).view(shape).transpose(1, 2)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        q, k = self._apply_rotary(q, k, cos, sin)
        return q, k, v

    # -- building blocks -------------------------------------------------------------------------
    def _attend(
        self,
        attn: nn.Module,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool,
        mask: torch.Tensor | None = None,
        extra: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """Attention output ``(B, T, H_q * d)``; ``mask``, when given, is an additive ``(B, 1, T, S)``
        mask that already holds causality (padded batches), and runs through SDPA where the model's
        backend takes no such mask (FlashAttention). ``extra``: keyword arguments the model's layer
        gives its attention function (e.g. Gemma 2's ``softcap``), passed on."""
        extra = extra or {}
        if mask is not None:
            fn = self._attn_fn if self._attn_impl not in _FLASH else ALL_ATTENTION_FUNCTIONS["sdpa"]
            out = fn(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling, **extra)[0]
            return out.reshape(*out.shape[:2], -1)
        if causal and self._attn_impl not in _MASKLESS_CAUSAL:
            t_q, t_k = q.shape[-2], k.shape[-2]
            allowed = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril(t_k - t_q)
            mask = torch.zeros(t_q, t_k, dtype=q.dtype, device=q.device)
            mask = mask.masked_fill(~allowed, torch.finfo(q.dtype).min)[None, None]
        out = self._attn_fn(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling, **extra)[0]
        return out.reshape(*out.shape[:2], -1)

    def _enter_layer(
        self,
        layer: nn.Module,
        h: torch.Tensor,
        cos_sin: tuple[torch.Tensor, ...],
        positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor | None, tuple[torch.Tensor, ...]]:
        """Move the residual stream (and rotary tables, positions) to ``layer``'s device, then return
        them with the layer's queries, keys and values (``project_qkv`` of its input norm)."""
        device = self._device_of(layer)
        if h.device != device:
            h = h.to(device)
            cos_sin = tuple(t.to(device) for t in cos_sin)
            positions = positions.to(device) if positions is not None else None
        return h, cos_sin, positions, self._chunked_qkv(layer, h, cos_sin)

    def _chunked_qkv(
        self, layer: nn.Module, h: torch.Tensor, cos_sin: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``project_qkv`` of the layer's input norm, in chunks of :data:`MLP_CHUNK_TOKENS` token rows
        for long prompts: the normed input, the unrotated projections and RoPE's temporaries (about
        three times the queries) then exist for one chunk at a time, never for the whole prompt."""
        attn = layer.self_attn
        b, t = h.shape[0], h.shape[1]
        step = max(1, MLP_CHUNK_TOKENS // b)
        if t <= step:
            return self.project_qkv(attn, layer.input_layernorm(h), *cos_sin)
        out: list[torch.Tensor] = []
        for start in range(0, t, step):
            end = min(start + step, t)
            parts = self.project_qkv(
                attn, layer.input_layernorm(h[:, start:end]), *(c[:, start:end] for c in cos_sin)
            )
            if not out:  # (B, H, T, d) each, filled chunk by chunk
                out = [p.new_empty((b, p.shape[1], t, p.shape[3])) for p in parts]
            for whole, part in zip(out, parts, strict=True):
                whole[:, :, start:end] = part
        return out[0], out[1], out[2]

    def _mlp_block(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """Residual MLP block, in place and in chunks of :data:`MLP_CHUNK_TOKENS` token rows.

        The MLP's intermediate activations (``2 x intermediate_size`` per token) are the largest
        tensors of a long prefill; chunking bounds them by a fixed budget (item 6 of the engine
        design: peak prefill memory is one layer's KV plus fixed chunks)."""
        rows = h.shape[0] * h.shape[1]
        if rows <= MLP_CHUNK_TOKENS:
            return h + layer.mlp(layer.post_attention_layernorm(h))
        flat = h.view(rows, h.shape[-1])
        for start in range(0, rows, MLP_CHUNK_TOKENS):
            part = flat[start : start + MLP_CHUNK_TOKENS]
            part += layer.mlp(layer.post_attention_layernorm(part))
        return h

    # -- one layer, as the loops call it (the generic adapter calls the model's layer whole instead) --
    def _embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The residual stream entering the first layer for ``ids`` at ``positions`` (both ``(B, T)``;
        families with learned absolute positions add them here, RoPE families ignore them)."""
        return self.base.embed_tokens(ids)

    def _rotary(self, h: torch.Tensor, positions: torch.Tensor) -> Any:
        """Rotary tables for ``positions`` (what :meth:`_prefill_layer` / :meth:`_decode_layer` take)."""
        return self.base.rotary_emb(h, positions)

    def _prefill_layer(
        self,
        i: int,
        layer: nn.Module,
        h: torch.Tensor,
        cos_sin: Any,
        positions: torch.Tensor,
        counts: list[int],
        states: Any = None,
    ) -> tuple[torch.Tensor, Any, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
        """Layer ``i`` over the present tokens (left-padded, ``counts`` real ones per sequence): the
        residual stream after it, the rotary tables and positions (moved to the layer's device), and
        the layer's post-RoPE ``(q, k, v)`` for the policies (``None`` for a layer without attention,
        whose recurrent state goes into ``states``, the cache's :attr:`~kvpolicy.cache.KVPolicyCache.states`)."""
        attn = layer.self_attn
        h, cos_sin, positions, (q, k, v) = self._enter_layer(layer, h, cos_sin, positions)
        h = h + attn.o_proj(self._attend_prefill(attn, q, k, v, counts))
        return self._mlp_block(layer, h), cos_sin, positions, (q, k, v)

    def _decode_layer(
        self,
        i: int,
        layer: nn.Module,
        h: torch.Tensor,
        cos_sin: Any,
        positions: torch.Tensor,
        lc: PagedLayer,
        want_probs: bool,
        states: Any = None,
    ) -> tuple[torch.Tensor, Any, torch.Tensor | None, torch.Tensor | None]:
        """Layer ``i`` for one new token per sequence: append its k/v to ``lc``, attend over the paged
        cache; returns the residual stream, rotary tables, the query and (``want_probs``) the slot
        probabilities decode-time policies score with (both ``None`` for a layer without attention,
        which updates its recurrent state in ``states`` instead)."""
        attn = layer.self_attn
        h, cos_sin, _, (q, k, v) = self._enter_layer(layer, h, cos_sin)
        lc.write(k, v, positions)
        if self._paged_kernel is not None and not want_probs:
            out, probs = self._paged_kernel(q, lc, attn.scaling), None
        else:
            out, probs = self._decode_attention(q.device)(q, lc, attn.scaling, want_probs=want_probs)
        h = h + attn.o_proj(out.to(h.dtype))
        return self._mlp_block(layer, h), cos_sin, q, probs

    def _keep(
        self, i: int, policy: Policy, view: LayerView, state: RequestState
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """What layer ``i`` caches for one sequence: the cache policy's selection (the generic adapter
        keeps exactly the window on sliding-window layers instead)."""
        return _kept(policy, i, view, state)

    def routing(self) -> Any:
        """Context in which prefill and decode run (the generic adapter routes the model's attention
        through kvpolicy there); a no-op for adapters that call the projections themselves."""
        return contextlib.nullcontext()

    def _logits(self, h_last: torch.Tensor) -> torch.Tensor:
        norm = self._final_norm
        h = norm(h_last.to(self._device_of(norm, default=h_last.device)))
        return self.lm_head(h.to(self._device_of(self.lm_head)))[:, -1, :]

    def _decode_attention(self, device: torch.device) -> Callable[..., Any]:
        """Decode attention over the paged cache on ``device``, chosen once per device
        (:func:`kvpolicy.kernels.decode_attention_for`: the Triton kernel on CUDA, torch elsewhere)."""
        fn = self._attention_fns.get(device)
        if fn is None:
            fn = self._attention_fns[device] = decode_attention_for(device)
        return fn

    def _device_of(self, module: nn.Module, default: torch.device | None = None) -> torch.device:
        """:func:`~kvpolicy.devices.module_device`, looked up once per module (it walks hooks and
        parameters: ~38 us a call, 33 calls a decode step on an 8B model, measured on an H200)."""
        device = self._devices.get(id(module))
        if device is None:
            device = module_device(module, default)
            if default is None or any(True for _ in module.parameters()):  # weightless: follows its input
                self._devices[id(module)] = device
        return device

    @property
    def _final_norm(self) -> nn.Module:
        """The norm after the last layer (``norm``; Phi names it ``final_layernorm``)."""
        norm = getattr(self.base, "norm", None)
        return norm if norm is not None else self.base.final_layernorm

    # -- prefill ---------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(
        self,
        prompts: list[torch.Tensor],
        policy: Policy,
        reserve: int = 0,
        block_size: int | None = None,
    ) -> tuple[torch.Tensor, Batch]:
        """Run prompts ``[(L_b,)]`` (one prompt is a batch of one) under ``policy``.

        The model's work (projections, attention, MLP) runs on the left-padded batch; every policy
        hook runs once per sequence on a view of that sequence's tokens only, with its own request
        state, so padding never enters scores, selections, budgets or positions and a sequence gets
        the same tokens and KV entries as alone. Returns last-position logits ``(B, V)`` and the
        :class:`~kvpolicy.state.Batch` (cache with room for ``reserve`` decode tokens per row).
        """
        self.check_policy(policy)
        lengths = [int(p.shape[0]) for p in prompts]
        states = [self._new_state(n, b, reserve) for b, n in enumerate(lengths)]
        rows = self._with_scoring_suffix(prompts, policy, states)
        ids, counts, propagate = left_pad(rows), [int(r.shape[0]) for r in rows], True
        block = block_size or self.block_size
        with self.routing():
            while True:
                cache = self._new_cache(block, policy.storage)
                restart, h_last = self._run_layers(ids, counts, policy, states, cache, reserve, propagate)
                if restart is None:
                    break
                # Restart (GemFilter): each sequence reruns on the tokens it selected (or, where it did not
                # filter, on its whole prompt, with a fresh state), fresh positions 0..k-1, no propagation.
                chosen = []
                for b, decision in enumerate(restart):
                    if decision is None:
                        chosen.append(prompts[b])
                        states[b] = self._new_state(lengths[b], b, reserve)
                    else:
                        chosen.append(prompts[b][decision.indices[0].to(prompts[b].device)])
                        states[b].discarded_tokens_per_layer += states[b].tokens_per_layer
                        states[b].tokens_per_layer = []
                ids, counts, propagate = left_pad(chosen), [int(c.shape[0]) for c in chosen], False
            # Decode positions continue at each sequence's logical length (a restarted pass: its own;
            # a scoring suffix is not part of it).
            counts = [c - state.scoring_tokens for c, state in zip(counts, states, strict=True)]
            next_positions = torch.tensor(counts, dtype=torch.long, device=ids.device)
            if len(set(counts)) == 1:
                cache.set_next_position(counts[0])
            batch = Batch(states, cache, next_positions)  # points each state at it (weakly)
        return self._logits(h_last), batch

    def _with_scoring_suffix(
        self, prompts: list[torch.Tensor], policy: Policy, states: list[RequestState]
    ) -> list[torch.Tensor]:
        """Each prompt with the segments its cache policy appends to score with (KVzip's
        reconstruction), recorded in its state; the prompts themselves when the policy appends none."""
        rows = []
        for prompt, state in zip(prompts, states, strict=True):
            suffix = _call(policy.cache, "scoring_suffix", 0, prompt, state)
            segments = [suffix] if isinstance(suffix, torch.Tensor) else list(suffix or [])
            bad = [
                s
                for s in segments
                if not isinstance(s, torch.Tensor) or s.dim() != 1 or s.is_floating_point()
            ]
            if bad:
                raise AdapterError(
                    f"policy {type(policy.cache).__name__} ({policy.cache.kind!r}) scoring_suffix() returned "
                    f"{suffix!r}; expected a 1-D tensor of token ids, a list of them, or None"
                )
            segments = [s for s in segments if s.numel()]
            if not segments:
                rows.append(prompt)
                continue
            longest = prompt.shape[0] + max(s.shape[0] for s in segments)  # each segment starts at L
            if self.max_positions is not None and longest > self.max_positions:
                raise ValueError(
                    f"{type(policy.cache).__name__} scores a {prompt.shape[0]}-token prompt with a "
                    f"{longest - prompt.shape[0]}-token pass after it ({longest} positions), beyond the "
                    f"model's {self.max_positions}; use a shorter prompt"
                )
            state.scoring_segments = tuple(int(s.shape[0]) for s in segments)
            state.scoring_tokens = sum(state.scoring_segments)
            rows.append(
                torch.cat([prompt, *(s.to(device=prompt.device, dtype=prompt.dtype) for s in segments)])
            )
        return rows

    @property
    def block_size(self) -> int:
        """Cache page size: flash-attention's paged kernel needs 256; the torch path takes 64."""
        return FLASH_BLOCK_SIZE if self._paged_kernel is not None else BLOCK_SIZE

    def _new_state(self, length: int, index: int, reserve: int) -> RequestState:
        return RequestState(
            prompt_len=length, num_layers=self.num_layers, index=index, max_new_tokens=max(reserve, 0)
        )

    def _run_layers(
        self,
        ids: torch.Tensor,
        counts: list[int],
        policy: Policy,
        states: list[RequestState],
        cache: KVPolicyCache,
        reserve: int,
        propagate: bool,
    ) -> tuple[list[Restart | None] | None, torch.Tensor]:
        """The prefill layer loop: returns per-sequence restart requests (or None) and the last
        position's hidden state ``(B, 1, D)``."""
        width = ids.shape[1]
        positions = _positions(counts, width, ids.device)
        if any(state.scoring_segments for state in states):
            counts = _Counts(counts, [state.scoring_segments for state in states])
            _segment_positions(positions, counts)
        h = self._embed(ids, positions)
        cos_sin = self._rotary(h, positions)
        uncached: list[int] = []
        held: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]] = {}
        for i, layer in enumerate(self.layers):
            h, cos_sin, positions, qkv = self._prefill_layer(
                i, layer, h, cos_sin, positions, counts, states=cache.states
            )
            for b, state in enumerate(states):
                state.tokens_per_layer.append(counts[b])
            if qkv is None:  # no attention (a hybrid's recurrent layer): nothing to score or cache
                if any(state.scoring_tokens for state in states):
                    raise AdapterError(
                        f"cache policy {type(policy.cache).__name__} ({policy.cache.kind!r}) scores with tokens "
                        f"appended to the prompt, but layer {i} has no attention (it is recurrent): its state "
                        "would carry them into decoding"
                    )
                continue
            q, k, v = qkv
            attn = self.attention(layer)
            parts, decisions = [], []
            for b, state in enumerate(states):
                lo = width - counts[b]
                view = LayerView(
                    layer=i,
                    num_layers=self.num_layers,
                    prompt_len=state.prompt_len,
                    positions=positions[b : b + 1, lo:],
                    query=q[b : b + 1, :, lo:],
                    key=k[b : b + 1, :, lo:],
                    value=v[b : b + 1, :, lo:],
                    scaling=attn.scaling,
                    rope_theta=self.plain_rope_theta,
                    rotary=self.view_rotaries[i],
                    out_proj=_out_proj_weight(attn),
                )
                if propagate and not _call(policy.propagation, "needs_cache", i, view, state):
                    parts.append(None)
                else:
                    parts.append(self._keep(i, policy, view, state))
                decision = None
                if propagate and i < self.num_layers - 1:
                    decision = _call(policy.propagation, "propagate", i, view, state)
                    _check_decision(policy, i, decision, counts[b], state.prompt_len)
                    if decision is not None and state.scoring_tokens:
                        raise AdapterError(
                            f"cache policy {type(policy.cache).__name__} ({policy.cache.kind!r}) scores with "
                            f"tokens appended to the prompt, which propagation {type(policy.propagation).__name__} "
                            f"({policy.propagation.kind!r}) cut at layer {i}; compose it with propagation 'all'"
                        )
                decisions.append(decision)
                del view
            if any(isinstance(d, Restart) for d in decisions):
                return [d if isinstance(d, Restart) else None for d in decisions], h
            if any(p is None for p in parts):
                uncached.append(i)  # a coming Restart discards this pass's cache (GemFilter)
            elif policy.cache.selects_after_prefill:
                held[i] = parts  # type: ignore[assignment]  # cached once every layer has run
            else:
                cache.layers[i].store(parts, reserve=reserve)  # type: ignore[arg-type]
            del q, k, v, parts  # this layer's full-length KV is released before the next layer runs
            if any(isinstance(d, Propagate) for d in decisions):
                h, positions, counts, width = _repack(h, positions, counts, width, decisions)
                cos_sin = self._rotary(h, positions)
        _check_cached(policy, uncached)
        if held:
            _store_final(policy, states, cache, held, reserve)
        tails = [state.scoring_tokens for state in states]
        if any(tails):  # the last prompt token's hidden state, before its scoring suffix
            last = torch.tensor([width - 1 - t for t in tails], device=h.device)
            return None, h[torch.arange(h.shape[0], device=h.device), last][:, None, :]
        return None, h[:, -1:, :]

    def _attend_prefill(
        self,
        attn: nn.Module,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        counts: list[int],
        extra: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """Causal prefill attention ``(B, T, H_q * d)`` over each sequence's own tokens.

        Per sequence rather than with a padding mask: a ``(B, 1, T, T)`` mask forces the unfused
        attention kernel (it materialises every score) and costs more than the per-sequence calls,
        which keep the fused causal kernels and give each sequence exactly its unbatched attention.
        Padding rows get zeros."""
        width = q.shape[2]
        segments = getattr(counts, "segments", None) or [()] * len(counts)
        separate = [len(s) > 1 for s in segments]  # several scoring passes: each sees the prompt alone
        if all(c == width for c in counts) and not any(separate):
            return self._attend(attn, q, k, v, causal=True, extra=extra)
        out = q.new_zeros((q.shape[0], width, q.shape[1] * q.shape[3]))
        for b, c in enumerate(counts):
            lo = width - c
            qb, kb, vb = q[b : b + 1, :, lo:], k[b : b + 1, :, lo:], v[b : b + 1, :, lo:]
            if not separate[b]:
                out[b : b + 1, lo:] = self._attend(attn, qb, kb, vb, True, extra=extra)
                continue
            # The prompt causally; each scoring segment over the prompt and causally over itself only.
            n = c - sum(segments[b])
            out[b : b + 1, lo : lo + n] = self._attend(
                attn, qb[:, :, :n], kb[:, :, :n], vb[:, :, :n], True, extra=extra
            )
            mask = _segment_mask(n, segments[b], qb.dtype, qb.device)
            out[b : b + 1, lo + n :] = self._attend(attn, qb[:, :, n:], kb, vb, False, mask=mask, extra=extra)
        return out

    # -- decode ----------------------------------------------------------------------------------
    def decode_step(
        self, token_ids: torch.Tensor, policy: Policy, batch: Batch | RequestState, step: int
    ) -> torch.Tensor:
        """Feed one token per sequence ``(B, 1)``; returns next-token logits ``(B, V)``.

        ``batch`` is the prefill's :class:`~kvpolicy.state.Batch` (or one of its request states).

        Host-side bookkeeping (cache room, growth) happens here; :meth:`decode_forward` is the
        device work, free of host syncs and static in shape between growths, so it compiles.
        """
        if isinstance(batch, RequestState):
            if batch.batch is None:
                raise ValueError("this request state has no cache: run prefill first")
            batch = batch.batch
        self.prepare_step(batch, step)
        with self.routing():
            return self.decode_forward(token_ids, policy, batch, step)

    def prepare_step(self, batch: Batch, step: int) -> None:
        """The host half of a decode step, outside anything compiled or recorded: room for one more
        entry per row (growing the cache if the reserve is spent), the device step counter, and the
        decode attention for each device the cache sits on, chosen before the first step: filled
        inside it, the choice would change what a compiled step's guards saw, and ``compile=True``
        would compile the step twice (60-85 s each for an 8B model)."""
        batch.cache.prepare_append()
        batch.set_step(step)
        if not self._attention_fns:
            for device in {getattr(layer, "device", None) for layer in batch.cache.layers} - {None}:
                self._decode_attention(device)

    @torch.no_grad()
    def decode_forward(
        self, token_ids: torch.Tensor, policy: Policy, batch: Batch, step: int
    ) -> torch.Tensor:
        """The decode forward itself: append, attend (paged), let the cache policy evict, MLP."""
        cache = batch.cache
        evict = policy.cache.evicts_during_decode
        positions = batch.next_positions
        h = self._embed(token_ids, positions[:, None])
        cos_sin = self._rotary(h, positions[:, None])
        for i, layer in enumerate(self.layers):
            lc = cache.layers[i]
            h, cos_sin, q, probs = self._decode_layer(
                i,
                layer,
                h,
                cos_sin,
                positions,
                lc,
                evict,
                states=cache.states,  # type: ignore[arg-type]
            )
            if probs is not None and q is not None:
                _on_decode(
                    policy, i, step, q, probs, lc, batch, self.attention(layer).scaling, self.num_layers
                )
        positions += 1
        batch.step_counter += 1
        return self._logits(h)

    def decode_pass(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        attend: Callable[[int, nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """One forward of ``token_ids`` ``(B, 1)`` at ``positions`` ``(B, 1)`` with a caller's attention
        ``attend(layer, attn_module, q, k, v) -> (B, 1, H_q * d)`` (the bench's plain-transformers
        baselines and tests use it); returns logits ``(B, V)``."""
        if not all(self.attends):
            raise ValueError(
                f"{type(self.model).__name__} has layers without attention, whose recurrent state a caller's "
                f"attention cannot carry; decode it with kvpolicy.generate"
            )
        h = self._embed(token_ids, positions)
        cos_sin = self._rotary(h, positions)
        for i, layer in enumerate(self.layers):
            h, cos_sin, _, (q, k, v) = self._enter_layer(layer, h, cos_sin)
            h = h + layer.self_attn.o_proj(attend(i, layer.self_attn, q, k, v))
            h = self._mlp_block(layer, h)
        return self._logits(h)


def left_pad(prompts: list[torch.Tensor], pad_id: int = 0) -> torch.Tensor:
    """``(B, max L)`` token ids, each prompt ``(L_b,)`` right-aligned; the padding value never matters."""
    width = max(p.shape[0] for p in prompts)
    ids = prompts[0].new_full((len(prompts), width), pad_id)
    for b, p in enumerate(prompts):
        ids[b, width - p.shape[0] :] = p
    return ids


class _Counts(list):
    """Real tokens per (left-padded) sequence, with each sequence's scoring segments (lengths, at the
    end of its row; :meth:`~kvpolicy.interfaces.CachePolicy.scoring_suffix`)."""

    def __init__(self, counts: list[int], segments: list[tuple[int, ...]]) -> None:
        super().__init__(counts)
        self.segments = segments


def _segment_positions(positions: torch.Tensor, counts: _Counts) -> None:
    """Each scoring segment's positions, in place: ``L, L + 1, ...`` for every segment (a separate
    pass after the ``L``-token prompt, as a second forward over the prompt's cache would number it)."""
    width = positions.shape[1]
    for b, (c, segments) in enumerate(zip(counts, counts.segments, strict=True)):
        n = c - sum(segments)
        start = width - c + n
        for length in segments:
            positions[b, start : start + length] = torch.arange(n, n + length, device=positions.device)
            start += length


def _segment_mask(
    prompt: int, segments: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``(1, 1, S, prompt + S)`` additive mask of the scoring segments' queries (``S`` their tokens):
    every segment sees the whole prompt and itself causally, never another segment."""
    total = sum(segments)
    seg = torch.repeat_interleave(
        torch.arange(len(segments), device=device), torch.tensor(segments, device=device), output_size=total
    )
    row = torch.arange(total, device=device)
    allowed = (seg[:, None] == seg[None, :]) & (row[:, None] >= row[None, :])
    allowed = torch.cat([torch.ones(total, prompt, dtype=torch.bool, device=device), allowed], dim=1)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def _positions(counts: list[int], width: int, device: torch.device) -> torch.Tensor:
    """``(B, T)``: 0..n_b-1 over each sequence's tokens, 0 on padding."""
    ar = torch.arange(width, device=device)
    start = torch.tensor([width - c for c in counts], device=device)
    return (ar[None, :] - start[:, None]).clamp_min(0)


def _repack(
    h: torch.Tensor,
    positions: torch.Tensor,
    counts: list[int],
    width: int,
    decisions: list[Propagate | Restart | None],
) -> tuple[torch.Tensor, torch.Tensor, list[int], int]:
    """The tokens each sequence propagates, left-padded again to the longest."""
    keep = []
    for b, decision in enumerate(decisions):
        lo = width - counts[b]
        if isinstance(decision, Propagate):
            keep.append(decision.indices[0].to(h.device) + lo)
        else:
            keep.append(torch.arange(lo, width, device=h.device))
    new_counts = [int(kk.shape[0]) for kk in keep]
    new_width = max(new_counts)
    index = torch.zeros((len(keep), new_width), dtype=torch.long, device=h.device)
    for b, kk in enumerate(keep):
        index[b, new_width - kk.shape[0] :] = kk
    h = h.gather(1, index.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
    return h, positions.gather(1, index.to(positions.device)), new_counts, new_width


def _on_decode(
    policy: Policy,
    layer: int,
    step: int,
    q: torch.Tensor,
    probs: torch.Tensor,
    lc: PagedLayer,
    batch: Batch,
    scaling: float,
    num_layers: int,
) -> None:
    """Decode-time eviction: one ``on_decode`` call per sequence, then one in-place cache update.

    Sync-free: what policies return is checked on the device and read when the generation ends.
    Every op here runs per layer per step, so a batch of one takes its tensors as they are (no
    slicing, no re-assembly of the slots to evict)."""
    positions = lc.slot_positions()
    single = batch.size == 1
    evictions: list[torch.Tensor | None] = []
    cache_policy = policy.cache
    if cache_policy.decodes_batched:  # one call for the whole batch
        lens = tuple(state.prompt_len for state in batch.states)
        view = decode_view(lc, 0, layer, num_layers, lens[0], step, q, probs, scaling, positions, whole=True)
        view.prompt_lens = lens
        view.step_tensor = batch.step_counter
        decision = _call(cache_policy, "on_decode", layer, view, batch)  # type: ignore[arg-type]
        if decision is None:
            return
        if not isinstance(decision, Evict):
            raise AdapterError(
                f"policy {type(cache_policy).__name__} ({cache_policy.kind!r}) on_decode() at layer {layer}: "
                f"a policy with decodes_batched returns Evict or None, got {type(decision).__name__}"
            )
        _check_static(cache_policy, "on_decode", layer, decision.slots, (batch.size, lc.num_heads))
        batch.defer(layer, 0, lc.evict(decision.slots))
        return
    for b, state in enumerate(batch.states):
        view = decode_view(
            lc, b, layer, num_layers, state.prompt_len, step, q, probs, scaling, positions, whole=single
        )
        view.step_tensor = batch.step_counter
        decision = _call(cache_policy, "on_decode", layer, view, state)
        if decision is None:
            evictions.append(None)
        elif isinstance(decision, Evict):
            _check_static(cache_policy, "on_decode", layer, decision.slots, (1, lc.num_heads))
            evictions.append(decision.slots)
        else:
            idx, counts = (
                (decision.indices, decision.counts) if isinstance(decision, PerHead) else (decision, None)
            )
            _check_static(cache_policy, "on_decode", layer, idx, (1, lc.num_heads))
            batch.defer(layer, 1, (idx < 0) | (idx >= lc.lengths[b : b + 1, :, None]))
            lc.keep(idx, counts, seq=b)
            evictions.append(None)
    if single:
        slots = evictions[0]
    elif any(e is not None for e in evictions):
        width = max(e.shape[-1] for e in evictions if e is not None)
        slots = torch.full((batch.size, lc.num_heads, width), -1, dtype=torch.long, device=lc.lengths.device)
        for b, e in enumerate(evictions):
            if e is not None:
                slots[b, :, : e.shape[-1]] = e[0]
    else:
        slots = None
    if slots is not None:
        batch.defer(layer, 0, lc.evict(slots))


def decode_view(
    lc: PagedLayer,
    b: int,
    layer: int,
    num_layers: int,
    prompt_len: int,
    step: int,
    q: torch.Tensor,
    probs: torch.Tensor,
    scaling: float,
    positions: torch.Tensor | None = None,
    whole: bool = False,
) -> DecodeView:
    """Sequence ``b``'s :class:`DecodeView` of a layer's cache after an append (``probs`` from
    :func:`~kvpolicy.cache.paged_attention`); ``positions`` from :meth:`~kvpolicy.cache.PagedLayer.slot_positions`, shared
    across the batch. ``whole``: the batch is this one sequence (its tensors are passed unsliced)."""
    positions = lc.slot_positions() if positions is None else positions
    pick = (lambda t: t) if whole else (lambda t: t[b : b + 1])
    return DecodeView(
        layer=layer,
        num_layers=num_layers,
        prompt_len=prompt_len,
        step=step,
        query=pick(q),
        attention=pick(probs),
        positions=pick(positions),
        lengths=pick(lc.lengths),
        scaling=scaling,
        _dense=_DenseRows(lc, b),
    )


class _DenseRows:
    """Lazy dense keys/values of one sequence's rows, for :class:`DecodeView` (a gather: a copy)."""

    def __init__(self, layer: PagedLayer, b: int) -> None:
        self.layer, self.b = layer, b

    def __call__(self, what: str) -> torch.Tensor:
        pool = self.layer.k_pool if what == "key" else self.layer.v_pool
        return self.layer.dense(pool)[self.b : self.b + 1]


def _kept(
    policy: Policy, layer: int, view: LayerView, state: RequestState
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """What the cache policy keeps at ``layer`` for one sequence: ``(key (H, n, d), value, positions
    (H, n), counts (H,) or None)`` (indices checked: prefill may read them back)."""
    keep = _call(policy.cache, "select", layer, view, state)
    # A scoring suffix (KVzip's reconstruction) is never cached: the selection picks among the prompt.
    tokens = view.num_tokens - state.scoring_tokens
    k, v = view.key[0, :, :tokens], view.value[0, :, :tokens]
    kv_pos = view.positions[0, :tokens][None, :].expand(k.shape[0], -1)
    return _gathered(policy, layer, (k, v, kv_pos, None), keep, "select")


def _gathered(
    policy: Policy,
    layer: int,
    part: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None],
    keep: Selection,
    method: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The entries of ``part`` (``(key (H, n, d), value, positions (H, n), None)``) that ``keep``
    selects (indices checked)."""
    k, v, kv_pos, _ = part
    if keep is None:
        return part
    idx, counts = (keep.indices, keep.counts) if isinstance(keep, PerHead) else (keep, None)
    _check_indices(policy.cache, method, layer, idx, (1, k.shape[0]), k.shape[1], counts=counts)
    idx = idx[0].to(k.device)
    g = idx.unsqueeze(-1)
    kept = (
        k.gather(1, g.expand(-1, -1, k.shape[-1])),
        v.gather(1, g.expand(-1, -1, v.shape[-1])),
        kv_pos.gather(1, idx),
        None if counts is None else counts[0],
    )
    return kept


def _layer_rotary(
    adapter: DecoderAdapter, i: int
) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """Layer ``i``'s rotary tables as a function: ``(B, n)`` long positions to float32 ``(cos, sin)``,
    each ``(B, n, d_rot)``, from the adapter's own :meth:`~DecoderAdapter._rotary` (the model's rotary
    embedding module; per layer type where the model has several).

    ``None`` where the model has no rotary embedding (learned or no positions); where its tables
    change the module's state (rope type ``dynamic``: its frequencies follow the longest position it
    was called with, so a call at future positions would change what the model applies later); and
    where the family's ``apply_rotary_pos_emb`` does not rotate as HF's half-rotation layout does on
    the first ``d_rot`` dimensions and pass the rest through (interleaved pairs, rotary part last,
    other signatures), checked once on a probe: the layout a policy may then rely on.
    """
    cfg = adapter.config
    params = getattr(cfg, "rope_parameters", None) or {}
    scaling = getattr(cfg, "rope_scaling", None) or {}
    kinds = {scaling.get("rope_type", scaling.get("type")), params.get("rope_type")}
    kinds |= {v.get("rope_type") for v in params.values() if isinstance(v, dict)}
    if "dynamic" in kinds or getattr(cfg, "qk_nope_head_dim", None):  # (MLA: the rotary part is last)
        return None
    layer_types = getattr(adapter, "layer_types", None)

    def tables(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.zeros(1, dtype=torch.float32, device=positions.device)  # dtype and device only
        out = adapter._rotary(x, positions)
        if isinstance(out, dict):
            out = out[layer_types[i]]  # type: ignore[index]
        return out[0].float(), out[1].float()

    try:  # a family whose helper takes other arguments or shapes fails the probe: no rotary offered
        if adapter._rotary(torch.zeros(1), torch.zeros(1, 1, dtype=torch.long)) is None:
            return None
        cos, sin = tables(torch.tensor([[1, 5, 50]]))
        attn = adapter.attention(adapter.layers[i])
        d = getattr(attn, "head_dim", None) or getattr(attn, "head_size", None) or getattr(cfg, "head_dim", 0)
        d = d or cfg.hidden_size // cfg.num_attention_heads
        r = cos.shape[-1]
        if adapter._apply_rotary is None or r > d or r % 2:
            return None
        x = torch.arange(3 * d, dtype=torch.float32).sin().reshape(1, 1, 3, d)
        rot, rest = x[..., :r], x[..., r:]
        half = torch.cat((-rot[..., r // 2 :], rot[..., : r // 2]), dim=-1)
        want = torch.cat((rot * cos[:, None] + half * sin[:, None], rest), dim=-1)
        got = adapter._apply_rotary(x, x, cos, sin)[0]
        if got.shape != want.shape or not torch.allclose(got.float(), want, rtol=1e-4, atol=1e-5):
            return None
    except Exception:
        return None
    return tables


def _out_proj_weight(attn: nn.Module) -> torch.Tensor | None:
    """The attention's output projection weight ``(D, H_q * d_v)`` where it has the usual name."""
    for name in ("o_proj", "out_proj", "dense", "c_proj"):
        weight = getattr(getattr(attn, name, None), "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            return weight
    return None


def _store_final(
    policy: Policy,
    states: list[RequestState],
    cache: KVPolicyCache,
    held: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]],
    reserve: int,
) -> None:
    """Cache each held layer as the cache policy's :meth:`~CachePolicy.finish_prefill` selects it."""
    finals = []
    for state in states:
        try:
            final = policy.cache.finish_prefill(state)
        except Exception as exc:  # third-party code: say whose
            raise AdapterError(
                f"policy {type(policy.cache).__name__} ({policy.cache.kind!r}) failed in finish_prefill(): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        finals.append(final or {})
    for i, parts in held.items():
        kept = [
            _gathered(policy, i, part, final.get(i), "finish_prefill")
            for part, final in zip(parts, finals, strict=True)
        ]
        parts.clear()  # each layer's held entries go as soon as its selection is cached
        cache.layers[i].store(kept, reserve=reserve)


def _check_decision(policy: Policy, layer: int, decision: Any, tokens: int, prompt_len: int) -> None:
    """A propagation decision's indices: ``(1, n)``, integer, strictly increasing, in range."""
    prop = policy.propagation
    if decision is None:
        return
    if isinstance(decision, Propagate):
        _check_indices(prop, "propagate", layer, decision.indices, (1,), tokens, ordered=True)
    elif isinstance(decision, Restart):
        _check_indices(prop, "propagate", layer, decision.indices, (1,), prompt_len, ordered=True)
    else:
        raise AdapterError(
            f"policy {type(prop).__name__} ({prop.kind!r}) propagate() at layer {layer} returned "
            f"{type(decision).__name__}; expected Propagate, Restart or None"
        )


def _check_cached(policy: Policy, uncached: list[int]) -> None:
    """Layers whose cache ``needs_cache`` declined are only allowed when a ``Restart`` follows."""
    if uncached:
        prop = policy.propagation
        raise AdapterError(
            f"policy {type(prop).__name__} ({prop.kind!r}) said layers {uncached} need no cache "
            f"(needs_cache) but did not restart, so they have none"
        )


def _call(policy: Any, method: str, layer: int, view: Any, state: RequestState) -> Any:
    """Call a policy hook; turn a failure into an :class:`AdapterError` naming policy and layer."""
    try:
        return getattr(policy, method)(view, state)
    except Exception as exc:  # the policy may be third-party code: say whose and where
        raise AdapterError(
            f"policy {type(policy).__name__} ({policy.kind!r}) failed in {method}() at layer {layer}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def _index_problem(idx: Any, lead: tuple[int, ...]) -> str | None:
    """What is wrong with the type or shape of indices a policy returned (host-side facts only)."""
    if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32):
        return f"must be an integer tensor, got {type(idx).__name__} {getattr(idx, 'dtype', '')}"
    if idx.dim() != len(lead) + 1 or tuple(idx.shape[:-1]) != lead:
        return f"must have shape ({', '.join(map(str, lead))}, n), got {tuple(idx.shape)}"
    return None


def _raise_indices(policy: Any, method: str, layer: int, problem: str) -> None:
    raise AdapterError(
        f"policy {type(policy).__name__} ({policy.kind!r}) {method}() at layer {layer}: indices {problem}"
    )


def _check_static(policy: Any, method: str, layer: int, idx: Any, lead: tuple[int, ...]) -> None:
    """Decode-time check: type and shape only (known on the host); values are checked on the device."""
    problem = _index_problem(idx, lead)
    if problem:
        _raise_indices(policy, method, layer, problem)


def _check_indices(
    policy: Any,
    method: str,
    layer: int,
    idx: Any,
    lead: tuple[int, ...],
    limit: int,
    ordered: bool = False,
    counts: torch.Tensor | None = None,
) -> None:
    """Prefill-time check of indices a policy returned: integer, shaped ``(*lead, n)``, inside
    ``[0, limit)``, distinct per row (each head's first ``counts``), and strictly increasing when
    ``ordered`` (propagation: unsorted indices would break causal attention downstream)."""
    problem = _index_problem(idx, lead)
    if problem is None and counts is not None:
        if not isinstance(counts, torch.Tensor) or tuple(counts.shape) != lead:
            problem = f"need counts of shape {lead}, got {getattr(counts, 'shape', type(counts).__name__)}"
        elif counts.numel() and (int(counts.min()) < 1 or int(counts.max()) > idx.shape[-1]):
            problem = (
                f"counts must lie in [1, {idx.shape[-1]}], got [{int(counts.min())}, {int(counts.max())}]"
            )
    if problem is None and idx.numel():
        valid = None
        if counts is not None:
            valid = torch.arange(idx.shape[-1], device=idx.device) < counts.to(idx.device)[..., None]
        live = idx if valid is None else idx.masked_fill(~valid, 0)
        lo, hi = int(live.min()), int(live.max())
        if lo < 0 or hi >= limit:
            problem = f"must lie in [0, {limit}), got [{lo}, {hi}]"
        elif ordered and idx.shape[-1] > 1 and not bool((idx[..., 1:] > idx[..., :-1]).all()):
            problem = "must be strictly increasing (sorted, no repeats)"
        elif not ordered and idx.shape[-1] > 1:
            big = torch.iinfo(torch.int64).max
            ranked = (live if valid is None else live.masked_fill(~valid, big)).long().sort(dim=-1).values
            step = ranked[..., 1:] != ranked[..., :-1]
            if valid is not None:
                step |= ranked[..., 1:] == big
            if not bool(step.all()):
                problem = "must not repeat an entry within a head"
    if problem:
        _raise_indices(policy, method, layer, problem)


def _eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **_: Any,
) -> tuple[torch.Tensor, None]:
    """Grouped attention in plain torch, for backends transformers does not register."""
    n_rep = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(n_rep, dim=1)
    value = value.repeat_interleave(n_rep, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None
