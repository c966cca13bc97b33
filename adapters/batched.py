"""Batched prefill and decode for prompts of different lengths (left padding), for any
:class:`~kvpolicy.adapters.base.DecoderAdapter`.

The model's work (projections, attention, MLP) runs on the whole padded batch; every policy hook runs
once per sequence on a view of that sequence's tokens only, with that sequence's own request state
(see :mod:`kvpolicy.ragged`). So padding never enters scores, selections, budgets or positions, and a
sequence gets the same tokens, KV entries and TSP counts as when it runs alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvpolicy.cache import KVPolicyCache
from kvpolicy.interfaces import DecodeView, LayerView, Policy, Propagate, Restart
from kvpolicy.ragged import RaggedCache, RaggedLayer
from kvpolicy.state import RequestState

from .base import _call, _check_cached, _check_indices, _gather_entries, _kept

if TYPE_CHECKING:
    from .base import DecoderAdapter


def left_pad(prompts: list[torch.Tensor], pad_id: int = 0) -> torch.Tensor:
    """``(B, max L)`` token ids, each prompt ``(L_b,)`` right-aligned; the padding value never matters."""
    width = max(p.shape[0] for p in prompts)
    ids = prompts[0].new_full((len(prompts), width), pad_id)
    for b, p in enumerate(prompts):
        ids[b, width - p.shape[0] :] = p
    return ids


def _attend_ragged(
    adapter: DecoderAdapter,
    attn: torch.nn.Module,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    counts: list[int],
) -> torch.Tensor:
    """Causal prefill attention ``(B, T, H_q * d)`` over each sequence's own tokens.

    Per sequence rather than with a padding mask: a ``(B, 1, T, T)`` mask forces the unfused
    attention kernel (it materialises every score) and costs more than the per-sequence calls, which
    keep the fused causal kernels and give each sequence exactly its unbatched attention. Padding rows
    get zeros."""
    width = q.shape[2]
    if all(c == width for c in counts):
        return adapter._attend(attn, q, k, v, causal=True)
    out = q.new_zeros((q.shape[0], width, q.shape[1] * q.shape[3]))
    for b, c in enumerate(counts):
        lo = width - c
        out[b : b + 1, lo:] = adapter._attend(
            attn, q[b : b + 1, :, lo:], k[b : b + 1, :, lo:], v[b : b + 1, :, lo:], True
        )
    return out


def prefill_batch(
    adapter: DecoderAdapter, prompts: list[torch.Tensor], policy: Policy, reserve: int = 0
) -> tuple[torch.Tensor, list[RequestState], RaggedCache]:
    """Run prompts ``[(L_b,)]`` as one left-padded batch; returns logits ``(B, V)``, one request
    state per prompt and the batch's cache."""
    policy.check_model(adapter.num_layers)
    lengths = [int(p.shape[0]) for p in prompts]
    states = [_new_state(adapter, n) for n in lengths]
    ids, counts, propagate = left_pad(prompts), list(lengths), True
    while True:
        restart, h_last, cache = _run_layers(adapter, ids, counts, policy, states, reserve, propagate)
        if restart is None:
            return adapter._logits(h_last), states, cache
        # Restart (GemFilter): each sequence reruns on the tokens it selected (or, where it did not
        # filter, on its whole prompt, with a fresh state), fresh positions 0..k-1, no propagation.
        chosen = []
        for b, decision in enumerate(restart):
            if decision is None:
                chosen.append(prompts[b])
                states[b] = _new_state(adapter, lengths[b])
            else:
                chosen.append(prompts[b][decision.indices[0].to(prompts[b].device)])
                states[b].discarded_tokens_per_layer += states[b].tokens_per_layer
                states[b].tokens_per_layer = []
        ids, counts, propagate = left_pad(chosen), [int(c.shape[0]) for c in chosen], False


def _new_state(adapter: DecoderAdapter, length: int) -> RequestState:
    # The per-sequence state's own cache stays empty: the batch's keys live in the RaggedCache.
    return RequestState(prompt_len=length, num_layers=adapter.num_layers, cache=KVPolicyCache(0))


def _positions(counts: list[int], width: int, device: torch.device) -> torch.Tensor:
    """``(B, T)``: 0..n_b-1 over each sequence's tokens, 0 on padding."""
    ar = torch.arange(width, device=device)
    start = torch.tensor([width - c for c in counts], device=device)
    return (ar[None, :] - start[:, None]).clamp_min(0)


def _run_layers(
    adapter: DecoderAdapter,
    ids: torch.Tensor,
    counts: list[int],
    policy: Policy,
    states: list[RequestState],
    reserve: int,
    propagate: bool,
) -> tuple[list[Restart | None] | None, torch.Tensor, RaggedCache]:
    width = ids.shape[1]
    h = adapter.base.embed_tokens(ids)
    positions = _positions(counts, width, ids.device)
    cos_sin = adapter.base.rotary_emb(h, positions)
    cache = RaggedCache(adapter.num_layers, list(counts))  # next position: this pass's length
    uncached: list[int] = []
    for i, layer in enumerate(adapter.layers):
        attn = layer.self_attn
        h, cos_sin, positions, (q, k, v) = adapter._enter_layer(layer, h, cos_sin, positions)
        h = h + attn.o_proj(_attend_ragged(adapter, attn, q, k, v, counts))
        h = adapter._mlp_block(layer, h)

        parts, decisions = [], []
        for b, state in enumerate(states):
            lo = width - counts[b]
            state.tokens_per_layer.append(counts[b])
            view = LayerView(
                layer=i,
                num_layers=adapter.num_layers,
                prompt_len=state.prompt_len,
                positions=positions[b : b + 1, lo:],
                query=q[b : b + 1, :, lo:],
                key=k[b : b + 1, :, lo:],
                value=v[b : b + 1, :, lo:],
                scaling=attn.scaling,
            )
            if propagate and not _call(policy.propagation, "needs_cache", i, view, state):
                parts.append(None)
            else:
                parts.append(_kept(policy, i, view, state))
            decision = None
            if propagate and i < adapter.num_layers - 1:
                decision = _call(policy.propagation, "propagate", i, view, state)
            decisions.append(decision)
        if any(isinstance(d, Restart) for d in decisions):
            return [d if isinstance(d, Restart) else None for d in decisions], h, cache
        if any(p is None for p in parts):
            uncached.append(i)  # a coming Restart discards this pass's cache (GemFilter)
        else:
            cache.layers[i].store(parts, reserve=reserve)  # type: ignore[arg-type]
        del q, k, v
        if any(isinstance(d, Propagate) for d in decisions):
            h, positions, counts, width = _repack(h, positions, counts, width, decisions, policy, i)
            cos_sin = adapter.base.rotary_emb(h, positions)
    _check_cached(policy, uncached)
    return None, h[:, -1:, :], cache


def _repack(
    h: torch.Tensor,
    positions: torch.Tensor,
    counts: list[int],
    width: int,
    decisions: list[Propagate | Restart | None],
    policy: Policy,
    layer: int,
) -> tuple[torch.Tensor, torch.Tensor, list[int], int]:
    """The tokens each sequence propagates, left-padded again to the longest."""
    keep = []
    for b, decision in enumerate(decisions):
        lo = width - counts[b]
        if isinstance(decision, Propagate):
            _check_indices(policy.propagation, "propagate", layer, decision.indices, (1,), counts[b])
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


@torch.no_grad()
def decode_step_batch(
    adapter: DecoderAdapter,
    token_ids: torch.Tensor,
    policy: Policy,
    states: list[RequestState],
    cache: RaggedCache,
    step: int,
) -> torch.Tensor:
    """Feed one token per sequence ``(B, 1)``; returns next-token logits ``(B, V)``."""
    positions = torch.tensor(cache.next_positions, device=token_ids.device)[:, None]
    evict = policy.cache.evicts_during_decode

    def attend(
        i: int, attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        lc = cache.layers[i]
        lc.append(k, v, positions[:, 0])
        padded = any(c != lc.length for c in lc.counts)
        mask = lc.attention_mask(q.dtype) if padded else None
        out = adapter._attend(attn, q, lc.keys, lc.values, causal=False, mask=mask)
        if evict:
            _evict(policy, i, step, q, lc, states, attn.scaling, adapter.num_layers)
        return out

    logits = adapter.decode_pass(token_ids, positions, attend)
    cache.next_positions = [p + 1 for p in cache.next_positions]
    return logits


def _evict(
    policy: Policy,
    layer: int,
    step: int,
    q: torch.Tensor,
    lc: RaggedLayer,
    states: list[RequestState],
    scaling: float,
    num_layers: int,
) -> None:
    """Decode-time eviction, per sequence; rebuilds the layer if any sequence dropped entries."""
    parts, changed = [], False
    for b, state in enumerate(states):
        k, v, pos = lc.sequence(b)
        view = DecodeView(
            layer=layer,
            num_layers=num_layers,
            prompt_len=state.prompt_len,
            step=step,
            query=q[b : b + 1],
            key=k,
            value=v,
            positions=pos,
            scaling=scaling,
        )
        keep = _call(policy.cache, "on_decode", layer, view, state)
        if keep is None:
            parts.append((k, v, pos))
            continue
        _check_indices(policy.cache, "on_decode", layer, keep, (1, k.shape[1]), k.shape[2])
        parts.append(_gather_entries(keep.to(k.device), k, v, pos))
        changed = True
    if changed:
        spare = lc.capacity - lc.length
        lc.store(parts, reserve=spare)
