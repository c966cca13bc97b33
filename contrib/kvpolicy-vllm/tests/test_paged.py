"""The compression step's building blocks with synthetic tensors (no vLLM needed): the request's slots,
the kept entries as vLLM writes tokens, and the policy's selection being kvpolicy's."""

from __future__ import annotations

import kvpolicy
import torch

from kvpolicy_vllm.paged import kept_entries, request_slots, select_for_request

HEADS, DIM = 2, 8


def test_a_requests_slots_follow_its_blocks():
    assert request_slots(torch.tensor([7, 2, 9]), 37, 16).tolist() == (
        list(range(7 * 16, 8 * 16)) + list(range(2 * 16, 3 * 16)) + list(range(9 * 16, 9 * 16 + 5))
    )


def test_each_head_keeps_its_own_entries_in_shared_slots():
    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(37, HEADS, DIM, generator=gen), torch.randn(37, HEADS, DIM, generator=gen)
    keep = torch.stack([torch.arange(0, 36, 3), torch.arange(1, 37, 3)])  # (H, 12): different per head
    kept_keys, kept_values = kept_entries(keys, values, keep)
    assert kept_keys.shape == (12, HEADS, DIM)
    for h in range(HEADS):
        assert torch.equal(kept_keys[:, h], keys[keep[h], h]) and torch.equal(
            kept_values[:, h], values[keep[h], h]
        )


def test_the_selection_is_the_one_kvpolicy_makes():
    """SnapKV through ``select_for_request`` keeps what kvpolicy's own prefill keeps for the same view."""
    from kvpolicy.adapters.base import _kept
    from kvpolicy.interfaces import LayerView
    from kvpolicy.state import RequestState

    gen = torch.Generator().manual_seed(2)
    tokens = 40
    query = torch.randn(tokens, 2 * HEADS, DIM, generator=gen)
    keys, values = (
        torch.randn(tokens, HEADS, DIM, generator=gen),
        torch.randn(tokens, HEADS, DIM, generator=gen),
    )
    policy = kvpolicy.get_policy("snapkv", kv_budget=12)
    keep = select_for_request(policy, 0, 2, query, keys, values, DIM**-0.5)
    assert keep is not None and keep.shape == (HEADS, 12)
    view = LayerView(
        layer=0,
        num_layers=2,
        prompt_len=tokens,
        positions=torch.arange(tokens)[None],
        query=query.permute(1, 0, 2)[None],
        key=keys.permute(1, 0, 2)[None],
        value=values.permute(1, 0, 2)[None],
        scaling=DIM**-0.5,
    )
    ours = _kept(policy, 0, view, RequestState(prompt_len=tokens, num_layers=2))
    assert torch.equal(ours[2].sort(dim=-1).values, keep)  # kvpolicy's kept positions, per head
    assert select_for_request(kvpolicy.get_policy("fullkv"), 0, 2, query, keys, values, DIM**-0.5) is None


def test_after_compaction_new_tokens_go_after_the_held_entries():
    """Two requests in a decode step: one compressed (70 logical, 20 held), one not (33). The first
    reads 21 entries and writes its new token at held index 20; the second as vLLM would."""
    from kvpolicy_vllm.paged import compacted_metadata

    table = torch.tensor([[5, 2, 6, 0, 0], [1, 3, 4, 0, 0]])
    seq_lens = torch.tensor([71, 34])  # after this step's token
    start = torch.tensor([0, 1, 2])
    held, slots = compacted_metadata(seq_lens, start, table, torch.tensor([50, 0]), 16)
    assert held.tolist() == [21, 34]
    assert slots.tolist() == [
        2 * 16 + 4,
        4 * 16 + 1,
    ]  # index 20 -> block 2 (2nd), offset 4; index 33 -> block 4
    # a prefill chunk of 3 tokens on an uncompressed request: slots 0, 1, 2 of its first block
    held, slots = compacted_metadata(
        torch.tensor([3]), torch.tensor([0, 3]), table[:1], torch.tensor([0]), 16
    )
    assert held.tolist() == [3] and slots.tolist() == [80, 81, 82]
