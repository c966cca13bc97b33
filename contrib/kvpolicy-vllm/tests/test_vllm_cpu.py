"""vLLM's CPU build on the embedded model (SmolLM2-135M-Instruct, the folder kvpolicy converts and
caches): the baseline every compressed-serving test compares against. Runs where vLLM is installed
(``make test-vllm`` builds that venv); skipped elsewhere.

So far: vLLM's own greedy output equals kvpolicy's full-KV greedy output on needle prompts, token for
token, so a later difference under a policy is the policy's, not the two stacks'.
"""

from __future__ import annotations

import os

import pytest

vllm = pytest.importorskip("vllm")

from kvpolicy_vllm import check_vllm  # noqa: E402

LENGTHS = (1000, 2000)
DEPTHS = (0.1, 0.5, 0.9)
NEW = 16


@pytest.fixture(scope="module")
def needle_prompts():
    from kvpolicy.eval import needle
    from kvpolicy.models import embedded_model_dir
    from transformers import AutoTokenizer

    path = embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    haystack = needle.load_haystack(needle.find_haystack_dir())
    prompts = [
        needle.build_sample(tokenizer, length, depth, haystack).input_ids
        for length in LENGTHS
        for depth in DEPTHS
    ]
    return path, prompts


@pytest.fixture(scope="module")
def llm(needle_prompts):
    check_vllm()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: plenty for a 135M model's prompts
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
    path, _ = needle_prompts
    return vllm.LLM(model=str(path), dtype="float32", max_model_len=4096, enforce_eager=True, seed=0)


def test_vllm_greedy_equals_kvpolicy_full_kv(llm, needle_prompts):
    import kvpolicy
    from kvpolicy.models import load_model

    _, prompts = needle_prompts
    params = vllm.SamplingParams(max_tokens=NEW, temperature=0.0)
    served = llm.generate([vllm.TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    model, tokenizer = load_model()
    for prompt, out in zip(prompts, served, strict=True):
        ours = kvpolicy.generate(model, tokenizer, input_ids=prompt, policy="fullkv", max_new_tokens=NEW)
        assert list(out.outputs[0].token_ids) == ours.token_ids
