"""Long runs and shared policies: per-request state keeps results independent and memory flat."""

from __future__ import annotations

import gc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from conftest import tiny_llama

import kvpolicy


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def test_one_policy_shared_across_threads_matches_sequential():
    model = tiny_llama()
    policy = kvpolicy.get_policy("fastkv", tsp_layer=1, tsp_rate=0.3, kv_budget=24)
    prompts = [
        torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(n)) for n in (60, 90, 120, 150)
    ]
    sequential = [
        kvpolicy.generate(model, None, input_ids=p, policy=policy, max_new_tokens=12).token_ids
        for p in prompts
    ]
    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(
            pool.map(
                lambda p: (
                    kvpolicy.generate(model, None, input_ids=p, policy=policy, max_new_tokens=12).token_ids
                ),
                prompts,
            )
        )
    assert threaded == sequential


def test_interleaved_requests_do_not_share_state():
    model = tiny_llama()
    policy = kvpolicy.get_policy("snapkv", kv_budget=16)
    a_ids = torch.randint(0, 128, (1, 80), generator=torch.Generator().manual_seed(1))
    b_ids = torch.randint(0, 128, (1, 50), generator=torch.Generator().manual_seed(2))
    alone = kvpolicy.generate(model, None, input_ids=a_ids, policy=policy, max_new_tokens=6).token_ids
    adapter = kvpolicy.get_adapter(model)
    a = kvpolicy.prefill(model, a_ids, policy, reserve=8)
    b = kvpolicy.prefill(model, b_ids, policy, reserve=8)
    tokens, tok = [], a.next_token
    for step in range(6):
        tokens.append(int(tok))
        adapter.decode_step(b.next_token, policy, b.state, step)  # a second request in between
        tok = adapter.decode_step(tok, policy, a.state, step).argmax(-1, keepdim=True)
    assert tokens == alone


def test_many_generations_do_not_grow_memory():
    model = tiny_llama()
    policies = [
        kvpolicy.get_policy("fullkv"),
        kvpolicy.get_policy("snapkv", kv_budget=0.2),
        kvpolicy.get_policy("fastkv", tsp_layer=1, tsp_rate=0.5, kv_budget=16),
    ]
    ids = torch.randint(0, 128, (1, 120), generator=torch.Generator().manual_seed(0))

    batch = [ids[0, :60].tolist(), ids[0].tolist(), ids[0, :90].tolist()]

    def burst(n: int) -> None:
        for i in range(n):
            prompt = batch if i % 5 == 4 else ids  # every fifth a left-padded batch
            kvpolicy.generate(model, None, input_ids=prompt, policy=policies[i % 3], max_new_tokens=4)
        gc.collect()

    burst(20)  # warm up allocator and caches
    before = _rss()
    burst(100)
    grown = _rss() - before
    assert grown < 20 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 100 generations"
