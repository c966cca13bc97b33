"""pytest-benchmark suite: prefill and one decode step per policy, on the tiny model and (slow) the
embedded model at 2K tokens. Track regressions with

    pytest tests/benchmarks --benchmark-enable --benchmark-autosave
    pytest tests/benchmarks --benchmark-enable --benchmark-compare

CI runs it with --benchmark-disable: each case once, as a smoke test, never as a timed assertion.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

import kvpolicy
from kvpolicy.registry import get_adapter

PRESETS = {
    "fullkv": {},
    "snapkv": {"kv_budget": 0.25},
    "fastkv": {"kv_budget": 0.25, "tsp_rate": 0.25},
}


def _policy(name: str, layers: int):
    extra = {"tsp_layer": layers // 2} if name == "fastkv" else {}
    return kvpolicy.get_policy(name, **PRESETS[name], **extra)


@pytest.fixture(scope="module")
def tiny():
    model = tiny_llama(layers=4)
    return model, torch.randint(0, 128, (1, 400), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", list(PRESETS))
def test_prefill_tiny(benchmark, tiny, name):
    model, ids = tiny
    benchmark.group = "prefill-tiny-400"
    pre = benchmark(kvpolicy.prefill, model, ids, _policy(name, 4))
    assert pre.logits.shape == (1, 128)


@pytest.mark.parametrize("name", list(PRESETS))
def test_decode_step_tiny(benchmark, tiny, name):
    model, ids = tiny
    benchmark.group = "decode-step-tiny-400"
    policy = _policy(name, 4)
    pre = kvpolicy.prefill(model, ids, policy, reserve=64)
    adapter = get_adapter(model)
    # Each call appends one token to the request's cache: a bounded number of rounds keeps the
    # positions inside the model's limit.
    logits = benchmark.pedantic(adapter.decode_step, args=(pre.next_token, policy, pre.state, 0), rounds=50)
    assert logits.shape == (1, 128)


@pytest.fixture(scope="module")
def embedded_2k(real_model, haystack):
    from kvpolicy.eval import needle

    model, tokenizer = real_model
    return model, torch.tensor([needle.build_sample(tokenizer, 2048, 0.5, haystack).input_ids])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PRESETS))
def test_prefill_embedded_2k(benchmark, embedded_2k, name):
    model, ids = embedded_2k
    benchmark.group = "prefill-smollm2-2k"
    pre = benchmark.pedantic(kvpolicy.prefill, args=(model, ids, _policy(name, 30)), rounds=3, iterations=1)
    assert pre.logits.shape[0] == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PRESETS))
def test_decode_step_embedded_2k(benchmark, embedded_2k, name):
    model, ids = embedded_2k
    benchmark.group = "decode-step-smollm2-2k"
    policy = _policy(name, 30)
    pre = kvpolicy.prefill(model, ids, policy, reserve=64)
    adapter = get_adapter(model)
    logits = benchmark.pedantic(adapter.decode_step, args=(pre.next_token, policy, pre.state, 0), rounds=20)
    assert logits.shape[0] == 1
