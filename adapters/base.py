"""The generic decoder-only adapter: runs the model's own modules in its own layer loop.

Why an adapter owns the loop (design-notes §1): TSP, GemFilter and PyramidInfer change how many
tokens the *next* layer sees, which forward hooks on attention modules cannot do. The adapter calls
only the model's public submodules (embeddings, rotary embedding, each layer's norms, projections,
attention function and MLP), never patches a class, and leaves the model as it found it.

A model family subclasses :class:`DecoderAdapter` and overrides what differs (e.g. per-head q/k norms
in :meth:`DecoderAdapter.project_qkv`); the loop itself is written once, here.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvpolicy.cache import KVPolicyCache
from kvpolicy.devices import module_device
from kvpolicy.interfaces import DecodeView, LayerView, Policy, Propagate, Restart
from kvpolicy.state import RequestState

# Attention backends that apply causality themselves when given no mask.
_MASKLESS_CAUSAL = {"sdpa", "flash_attention_2", "flash_attention_3"}
_FLASH = {"flash_attention_2", "flash_attention_3"}


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
        self.base = model.model
        self.config = model.config
        self.layers = list(self.base.layers)
        attn0 = self.layers[0].self_attn
        # The rotary helper lives in each family's modeling module; use that family's own function.
        self._apply_rotary: Callable[..., Any] = sys.modules[type(attn0).__module__].apply_rotary_pos_emb
        impl = getattr(self.config, "_attn_implementation", None) or "eager"
        self._attn_impl = impl
        self._attn_fn = ALL_ATTENTION_FUNCTIONS.get_interface(impl, _eager_attention)

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
    ) -> torch.Tensor:
        """Attention output ``(B, T, H_q * d)``; ``mask``, when given, is an additive ``(B, 1, T, S)``
        mask that already holds causality (padded batches), and runs through SDPA where the model's
        backend takes no such mask (FlashAttention)."""
        if mask is not None:
            fn = self._attn_fn if self._attn_impl not in _FLASH else ALL_ATTENTION_FUNCTIONS["sdpa"]
            out = fn(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling)[0]
            return out.reshape(*out.shape[:2], -1)
        if causal and self._attn_impl not in _MASKLESS_CAUSAL:
            t_q, t_k = q.shape[-2], k.shape[-2]
            allowed = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril(t_k - t_q)
            mask = torch.zeros(t_q, t_k, dtype=q.dtype, device=q.device)
            mask = mask.masked_fill(~allowed, torch.finfo(q.dtype).min)[None, None]
        out = self._attn_fn(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling)[0]
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
        device = module_device(layer)
        if h.device != device:
            h = h.to(device)
            cos_sin = tuple(t.to(device) for t in cos_sin)
            positions = positions.to(device) if positions is not None else None
        return h, cos_sin, positions, self.project_qkv(layer.self_attn, layer.input_layernorm(h), *cos_sin)

    def _mlp_block(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def _logits(self, h_last: torch.Tensor) -> torch.Tensor:
        h = self.base.norm(h_last.to(module_device(self.base.norm)))
        return self.model.lm_head(h.to(module_device(self.model.lm_head)))[:, -1, :]

    # -- prefill ---------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(
        self, input_ids: torch.Tensor, policy: Policy, reserve: int = 0
    ) -> tuple[torch.Tensor, RequestState]:
        """Run the prompt ``(B, L)`` through the model under ``policy``.

        Returns the last position's logits ``(B, V)`` and the request state holding the compressed
        cache, with room reserved for ``reserve`` decode tokens per layer.
        """
        policy.check_model(self.num_layers)
        b, length = input_ids.shape
        state = RequestState(
            prompt_len=length, num_layers=self.num_layers, cache=KVPolicyCache(self.num_layers)
        )
        ids = input_ids
        positions = torch.arange(length, device=input_ids.device).expand(b, length)
        propagate = True
        while True:
            restart, h_last = self._run_layers(ids, positions, policy, state, reserve, propagate)
            if restart is None:
                break
            # Restart (GemFilter): the selected prompt tokens, fresh positions 0..k-1, no propagation.
            ids = input_ids.gather(1, restart.indices.to(input_ids.device))
            positions = torch.arange(ids.shape[1], device=ids.device).expand(b, ids.shape[1])
            state.cache = KVPolicyCache(self.num_layers)
            state.discarded_tokens_per_layer += state.tokens_per_layer  # the filter pass still cost
            state.tokens_per_layer = []
            propagate = False
        return self._logits(h_last), state

    def _run_layers(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        policy: Policy,
        state: RequestState,
        reserve: int,
        propagate: bool,
    ) -> tuple[Restart | None, torch.Tensor]:
        """Prefill layer loop; returns a restart request (or None) and the last position's hidden state."""
        h = self.base.embed_tokens(ids)
        b, next_position = ids.shape
        cos_sin = self.base.rotary_emb(h, positions)
        uncached: list[int] = []
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h, cos_sin, positions, (q, k, v) = self._enter_layer(layer, h, cos_sin, positions)
            h = h + attn.o_proj(self._attend(attn, q, k, v, causal=True))
            h = self._mlp_block(layer, h)
            state.tokens_per_layer.append(h.shape[1])

            view = LayerView(
                layer=i,
                num_layers=self.num_layers,
                prompt_len=state.prompt_len,
                positions=positions,
                query=q,
                key=k,
                value=v,
                scaling=attn.scaling,
            )
            if propagate and not _call(policy.propagation, "needs_cache", i, view, state):
                uncached.append(i)  # a coming Restart discards this pass's cache (GemFilter)
            else:
                kept_k, kept_v, kv_pos = _kept(policy, i, view, state)
                state.cache.layers[i].store(
                    kept_k, kept_v, kv_pos, next_position=next_position, reserve=reserve
                )

            decision = None
            if propagate and i < self.num_layers - 1:
                decision = _call(policy.propagation, "propagate", i, view, state)
            del q, k, v, view  # this layer's full-length KV is released before the next layer runs
            if isinstance(decision, Restart):
                return decision, h
            if isinstance(decision, Propagate):
                _check_indices(policy.propagation, "propagate", i, decision.indices, (b,), h.shape[1])
                sel = decision.indices.to(h.device)
                h = h.gather(1, sel.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
                positions = positions.gather(1, sel)
                cos_sin = self.base.rotary_emb(h, positions)
        _check_cached(policy, uncached)
        return None, h[:, -1:, :]

    # -- decode ----------------------------------------------------------------------------------
    @torch.no_grad()
    def decode_step(
        self, token_ids: torch.Tensor, policy: Policy, state: RequestState, step: int
    ) -> torch.Tensor:
        """Feed one token per sequence ``(B, 1)``; returns next-token logits ``(B, V)``."""
        cache = state.cache
        evict = policy.cache.evicts_during_decode

        def attend(
            i: int, attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
        ) -> torch.Tensor:
            lc = cache.layers[i]
            keys, values = lc.update(k, v)
            out = self._attend(attn, q, keys, values, causal=False)
            if evict:
                view = DecodeView(
                    layer=i,
                    num_layers=self.num_layers,
                    prompt_len=state.prompt_len,
                    step=step,
                    query=q,
                    key=lc.keys,
                    value=lc.values,
                    positions=lc.positions,
                    scaling=attn.scaling,
                )
                keep = _call(policy.cache, "on_decode", i, view, state)
                if keep is not None:
                    lc.compact(keep.to(lc.keys.device))
            return out

        return self.decode_pass(token_ids, torch.full_like(token_ids, cache.layers[0].next_position), attend)

    def decode_pass(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        attend: Callable[[int, nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """One decode forward of ``token_ids`` ``(B, 1)`` at ``positions`` ``(B, 1)``: every layer's
        attention is ``attend(layer, attn_module, q, k, v)`` (cache update and eviction included);
        returns logits ``(B, V)``."""
        h = self.base.embed_tokens(token_ids)
        cos_sin = self.base.rotary_emb(h, positions)
        for i, layer in enumerate(self.layers):
            h, cos_sin, _, (q, k, v) = self._enter_layer(layer, h, cos_sin)
            h = h + layer.self_attn.o_proj(attend(i, layer.self_attn, q, k, v))
            h = self._mlp_block(layer, h)
        return self._logits(h)


def _gather_entries(
    keep: torch.Tensor, key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cache entries at ``keep`` ``(B, H_kv, n)``: keys, values ``(B, H_kv, n, d)``, positions."""
    idx = keep.unsqueeze(-1)
    return (
        key.gather(2, idx.expand(-1, -1, -1, key.shape[-1])),
        value.gather(2, idx.expand(-1, -1, -1, value.shape[-1])),
        positions.gather(2, keep),
    )


def _kept(
    policy: Policy, layer: int, view: LayerView, state: RequestState
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``(key, value, positions)`` the cache policy keeps at ``layer`` (indices checked)."""
    k, v = view.key, view.value
    keep = _call(policy.cache, "select", layer, view, state)
    kv_pos = view.positions[:, None, :].expand(-1, k.shape[1], -1)
    if keep is None:
        return k, v, kv_pos
    _check_indices(policy.cache, "select", layer, keep, tuple(k.shape[:2]), k.shape[2])
    return _gather_entries(keep, k, v, kv_pos)


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


def _check_indices(policy: Any, method: str, layer: int, idx: Any, lead: tuple[int, ...], limit: int) -> None:
    """Indices a policy returned must be integer, shaped ``(*lead, n)`` and inside ``[0, limit)``."""
    problem = None
    if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32):
        problem = f"must be an integer tensor, got {type(idx).__name__} {getattr(idx, 'dtype', '')}"
    elif idx.dim() != len(lead) + 1 or tuple(idx.shape[:-1]) != lead:
        problem = f"must have shape ({', '.join(map(str, lead))}, n), got {tuple(idx.shape)}"
    elif idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= limit):
        problem = f"must lie in [0, {limit}), got [{int(idx.min())}, {int(idx.max())}]"
    if problem:
        raise AdapterError(
            f"policy {type(policy).__name__} ({policy.kind!r}) {method}() at layer {layer}: indices {problem}"
        )


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
