"""Shared fixtures: a tiny random Llama (fast unit tests) and the real embedded model (slow tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(layers: int = 4, attn: str = "sdpa", seed: int = 0, **overrides: object) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        attn_implementation=attn,
        **overrides,
    )
    return LlamaForCausalLM(cfg).eval()


#: Settings that make each built-in preset compress a 7-120-token prompt on the 4-layer tiny model.
TINY_OPTIONS: dict[str, dict[str, object]] = {
    "fullkv": {},
    "snapkv": {"kv_budget": 20},
    "fastkv": {"kv_budget": 20, "tsp_layer": 1, "tsp_rate": 0.5},
    "streamingllm": {"kv_budget": 20},
    "h2o": {"kv_budget": 20},
    "pyramidkv": {"kv_budget": 20},
    "gemfilter": {"kv_budget": 20},
    "pyramidinfer": {"kv_budget": 0.9},
    "ada-snapkv": {"kv_budget": 20},
    "expected_attention": {"kv_budget": 20},
    "tova": {"kv_budget": 20},
    "cake": {"kv_budget": 20, "window": 8},
    "qfilters": {"kv_budget": 20, "filters": [[[0.25] * 16] * 2] * 4},  # the tiny model has no calibration
    "duoattention": {
        "head_map_file": str(Path(__file__).parent / "data" / "duo_tiny_head_map.json"),
        "sink": 4,
        "recent": 16,
    },
}


def tiny_policy(name: str, options: dict[str, object]):
    """The policy a test-table key names: a preset itself (``ada-snapkv``), or a preset with a
    ``-variant`` suffix (``h2o-evicting``), built with the table's options."""
    import kvpolicy
    from kvpolicy.registry import get_registry

    base = name if name in get_registry().presets else name.rsplit("-", 1)[0]
    return kvpolicy.get_policy(base, **options)


def tiny_llama_for(tokenizer, max_positions: int = 2048, layers: int = 4) -> LlamaForCausalLM:
    """A tiny random Llama whose vocabulary fits ``tokenizer`` (for tests that need real text)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def embedded_tokenizer():
    """The embedded model's tokenizer alone (converted on first use, then cached)."""
    from transformers import AutoTokenizer

    from kvpolicy.models import embedded_model_dir

    return AutoTokenizer.from_pretrained(embedded_model_dir())


@pytest.fixture(scope="session")
def tiny_model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="session")
def prompt_ids() -> torch.Tensor:
    return torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    """A tiny model of the module's own: modules that compile its decode step or hook it stay apart."""
    return tiny_llama()


@pytest.fixture(scope="module")
def ids(prompt_ids: torch.Tensor) -> torch.Tensor:
    """``prompt_ids`` under the name the modules that take ``model`` use."""
    return prompt_ids


@pytest.fixture
def single_thread():
    """One intra-op thread: on a tiny model more threads only add overhead (and timing noise)."""
    from kvpolicy.testing import one_thread

    with one_thread():
        yield


@pytest.fixture(scope="session")
def real_model():
    import kvpolicy

    return kvpolicy.load_model()


@pytest.fixture(scope="session")
def haystack() -> str:
    from kvpolicy.eval import needle

    return needle.load_haystack(needle.find_haystack_dir())


def round_machine() -> Any:
    """Round machine limits (1 GB/s read, 2 GB/s GEMV, 1 TFLOP/s), so the bench's absolute figures check
    by hand and no test measures the machine it runs on."""
    from kvpolicy.bench.machine import Machine

    return Machine(
        device="cpu",
        dtype="torch.float32",
        read_bytes_per_s=1e9,
        matmul_flops_per_s=1e12,
        gemv_bytes_per_s=2e9,
        read_bytes=0,
        matmul_size=0,
        gemv_bytes=0,
        seconds=0.0,
    )
