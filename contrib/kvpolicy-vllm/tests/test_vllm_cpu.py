"""vLLM's CPU build on the embedded model (SmolLM2-135M-Instruct, the folder kvpolicy converts and
caches): the baseline every compressed-serving test compares against. Runs where vLLM is installed
(``make test-vllm`` builds that venv); skipped elsewhere.

vLLM's own greedy output equals kvpolicy's full-KV greedy output on needle prompts, token for token, so
a difference under a policy is the policy's, not the two stacks'; and requests served under a policy
(``extra_args={"kvpolicy": ...}``, the plugin installed) give exactly ``kvpolicy.generate``'s tokens
under the same policy, in one batch with requests that ask for none.
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
    # prompts prefilled whole, no prefix caching: what kvpolicy's compression needs
    return vllm.LLM(
        model=str(path),
        dtype="float32",
        max_model_len=4096,
        enable_chunked_prefill=False,
        max_num_batched_tokens=16384,
        enable_prefix_caching=False,
        enforce_eager=True,
        seed=0,
    )


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


def _ours(prompts, specs):
    """``kvpolicy.generate``'s greedy tokens for each prompt under its spec (``None``: full KV)."""
    import kvpolicy
    from kvpolicy.models import load_model

    from kvpolicy_vllm import servable_policy

    model, tokenizer = load_model()
    return [
        kvpolicy.generate(
            model, tokenizer, input_ids=p, policy=servable_policy(s) if s else "fullkv", max_new_tokens=NEW
        ).token_ids
        for p, s in zip(prompts, specs, strict=True)
    ]


def test_requests_under_a_policy_get_kvpolicys_tokens_beside_requests_without(llm, needle_prompts):
    """One batch mixing SnapKV at a quarter of the prompt, StreamingLLM and no policy: each request gets
    the tokens kvpolicy gives it under its policy (and the compressed ones differ from full KV somewhere,
    so the compression really ran)."""
    _, prompts = needle_prompts
    specs = ["snapkv:kv_budget=0.25", None, "streamingllm:kv_budget=0.25"] * 2
    params = [
        vllm.SamplingParams(max_tokens=NEW, temperature=0.0, extra_args={"kvpolicy": s} if s else None)
        for s in specs
    ]
    served = llm.generate([vllm.TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    got = [list(out.outputs[0].token_ids) for out in served]
    assert got == _ours(prompts, specs)
    assert got != _ours(prompts, [None] * len(prompts))


def test_compacted_entries_written_by_vllm_attend_as_the_kept_entries():
    """The compression step against vLLM's own CPU cache writer and attention kernel: a request's
    prefill keys and values, SnapKV's selection, the kept entries written as tokens to the request's
    first slots (each KV head its own entries), the next token written where the compacted metadata
    says; then a decode query attends with vLLM's kernel exactly as over the kept entries and the new
    one (torch reference, per head)."""
    import kvpolicy
    import torch
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from kvpolicy_vllm.paged import compacted_metadata, kept_entries, request_slots, select_for_request

    heads, q_heads, dim, block, tokens = 2, 6, 64, 16, 45
    gen = torch.Generator().manual_seed(0)
    keys, values = (
        torch.randn(tokens, heads, dim, generator=gen),
        torch.randn(tokens, heads, dim, generator=gen),
    )
    query = torch.randn(tokens, q_heads, dim, generator=gen)
    scale = dim**-0.5
    keep = select_for_request(kvpolicy.get_policy("snapkv", kv_budget=20), 0, 2, query, keys, values, scale)
    assert keep is not None and keep.shape == (heads, 20) and not torch.equal(keep[0], keep[1])

    isa = _get_attn_isa(torch.float32, block, dim)
    cache = torch.zeros(8, heads, block, 2 * dim)  # vLLM's CPU layout: (blocks, H_kv, block_size, 2 * d)
    key_cache, value_cache = cache.view(8, heads, 2 * block, dim).chunk(2, dim=2)
    blocks = torch.tensor([5, 2, 6], dtype=torch.int32)
    kept_keys, kept_values = kept_entries(keys, values, keep)
    ops.cpu_attn_reshape_and_cache(
        kept_keys, kept_values, key_cache, value_cache, request_slots(blocks, 20, block), isa
    )

    # the next token, at logical position 45: the metadata reads 21 held entries and writes at the 21st
    new_key, new_value = torch.randn(1, heads, dim, generator=gen), torch.randn(1, heads, dim, generator=gen)
    start = torch.tensor([0, 1], dtype=torch.int32)
    held, slot = compacted_metadata(
        torch.tensor([tokens + 1]), start, blocks[None], torch.tensor([tokens - 20]), block
    )
    ops.cpu_attn_reshape_and_cache(new_key, new_value, key_cache, value_cache, slot, isa)
    seq_lens = held.to(torch.int32)
    decode = torch.randn(1, q_heads, dim, generator=gen)
    meta = ops.cpu_attn_get_scheduler_metadata(
        1, q_heads, heads, dim, seq_lens, torch.float32, start, True, -1, isa, False
    )
    out = torch.empty_like(decode)
    ops.cpu_attention_with_kv_cache(
        decode,
        key_cache,
        value_cache,
        out,
        start,
        seq_lens,
        scale,
        True,
        None,
        -1,
        blocks[None],
        0,
        meta,
        None,
    )
    rep = q_heads // heads
    held_keys, held_values = torch.cat([kept_keys, new_key]), torch.cat([kept_values, new_value])
    for h in range(q_heads):
        k, v = held_keys[:, h // rep], held_values[:, h // rep]
        want = ((decode[0, h] @ k.t()) * scale).softmax(-1) @ v
        torch.testing.assert_close(out[0, h], want, rtol=1e-4, atol=1e-4)
