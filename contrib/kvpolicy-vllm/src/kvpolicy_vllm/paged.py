"""A request's compression step on vLLM's paged KV cache: the policy's selection, the kept entries as
vLLM writes tokens, and the slots they go to.

The building blocks of the step the design in ``docs/serving.md`` places in the attention backend,
after a request's prefill, as pure tensor functions (tested without an engine; ``tests/test_vllm_cpu.py``
checks them against vLLM's own cache writer and attention kernel).

The cache itself is written only through vLLM's own writer (``reshape_and_cache``: on the CPU,
``ops.cpu_attn_reshape_and_cache``), never by index: its layout depends on the kernel (on the CPU each
block keeps its keys dimension-major for the ``vec`` kernels and packed for AMX). So the step takes the
prefill's own keys and values (the attention backend's ``key``/``value`` inputs, token-major
``(T, H_kv, d)``, after RoPE), lets the policy choose, and writes the kept entries as ``C`` tokens to the
request's first ``C`` slots: token ``j`` holds, for each KV head ``h``, that head's ``j``-th kept
entry, so each head keeps its own entries in shared slots.
"""

from __future__ import annotations

import torch
from kvpolicy.interfaces import LayerView, PerHead, Policy
from kvpolicy.state import RequestState


def blocks_for(entries: int, block_size: int) -> int:
    """The blocks of ``block_size`` slots that hold ``entries`` entries (what vLLM allocates for them)."""
    return -(-entries // block_size)


def request_slots(blocks: torch.Tensor, count: int, block_size: int) -> torch.Tensor:
    """vLLM slot ids (``block * block_size + offset``) of a request's entries ``0..count-1``: ``(count,)``
    long. ``blocks``: the request's row of vLLM's block table (its block ids in order)."""
    if count > blocks.shape[0] * block_size:
        raise ValueError(
            f"{count} entries need more than the request's {blocks.shape[0]} blocks of {block_size}"
        )
    index = torch.arange(count, device=blocks.device)
    return blocks[index // block_size].long() * block_size + index % block_size


def kept_entries(
    keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept entries as ``C`` tokens for vLLM's cache writer: ``(C, H_kv, d)`` keys and values whose
    token ``j`` holds head ``h``'s ``keep[h, j]``-th entry. ``keys``/``values`` ``(T, H_kv, d)``,
    ``keep`` ``(H_kv, C)``."""
    heads = torch.arange(keys.shape[1], device=keys.device)[None, :]
    index = keep.to(keys.device).t()  # (C, H)
    return keys[index, heads], values[index, heads]


def select_for_request(
    policy: Policy,
    layer: int,
    num_layers: int,
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
) -> torch.Tensor | None:
    """What ``policy`` keeps of a request's prefill at ``layer``: ``(H_kv, C)`` entry indices, sorted,
    or ``None`` to keep everything.

    ``query`` ``(T, H_q, d)``, ``keys``/``values`` ``(T, H_kv, d)``: the request's prefill in vLLM's
    token-major layout, one query per entry (a prompt prefilled in one chunk). The policy sees exactly
    the view ``kvpolicy.generate`` gives it for one sequence, so its selection is the one kvpolicy makes."""
    tokens = keys.shape[0]
    if query.shape[0] != tokens:
        raise ValueError(
            f"selection needs a query per cached entry ({tokens}), got {query.shape[0]}: the prompt must be "
            f"prefilled in one chunk"
        )
    view = LayerView(
        layer=layer,
        num_layers=num_layers,
        prompt_len=tokens,
        positions=torch.arange(tokens, device=keys.device)[None],
        query=query.permute(1, 0, 2)[None],
        key=keys.permute(1, 0, 2)[None],
        value=values.permute(1, 0, 2)[None],
        scaling=scaling,
    )
    keep = policy.cache.select(view, RequestState(prompt_len=tokens, num_layers=num_layers))
    if keep is None:
        return None
    if isinstance(keep, PerHead):
        raise ValueError(
            f"{type(policy.cache).__name__} returned per-head counts, which vLLM's blocks cannot hold"
        )
    return keep[0].sort(dim=-1).values


def compacted_metadata(
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    block_table: torch.Tensor,
    dropped: torch.Tensor,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A step's ``seq_lens`` and ``slot_mapping`` once requests have dropped entries: logical positions
    stay as vLLM counts them (RoPE continues at the original length), while each request reads, and
    writes its new tokens after, only the entries it holds.

    ``seq_lens`` ``(R,)``: logical lengths after this step's tokens; ``query_start_loc`` ``(R + 1,)``:
    where each request's new tokens start in the step; ``block_table`` ``(R, M)``; ``dropped`` ``(R,)``:
    entries each request has dropped (0 for one not compressed). Returns the held lengths ``(R,)`` and
    the slot of each new token ``(num_tokens,)``: a request's ``i``-th held entry is at
    ``block_table[r, i // block_size] * block_size + i % block_size``."""
    held = seq_lens - dropped.to(seq_lens)
    counts = (query_start_loc[1:] - query_start_loc[:-1]).long()
    request = torch.repeat_interleave(torch.arange(seq_lens.shape[0], device=seq_lens.device), counts)
    within = torch.arange(int(counts.sum()), device=seq_lens.device) - query_start_loc[:-1].long()[request]
    entry = (held.long() - counts)[request] + within  # held index of each new token
    slots = block_table[request, entry // block_size].long() * block_size + entry % block_size
    return held, slots
