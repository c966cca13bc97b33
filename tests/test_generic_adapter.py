"""The generic adapter (issue 13, first part) on many architectures, from tiny random configs built
offline (no download).

For each family: kvpolicy with full KV reproduces plain transformers' greedy output token for token
(the model's own layers run whole; kvpolicy sees their queries and keys through its routed attention
function), SnapKV and FastKV hold their budgets on every layer and KV head, and the model's config is
as it was afterwards. Architectures it cannot drive are refused at ``get_adapter`` naming the class and
the reason. Sliding-window models (hybrid or not) run prompts longer than their window: sliding layers
attend over original positions within the window and keep exactly the window, full layers are what
the cache policy compresses.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import kvpolicy
from kvpolicy.adapters.generic import GenericAdapter
from kvpolicy.coverage import MLA, MOE, TINY
from kvpolicy.registry import RegistryError

#: model_type -> extra config settings, for the families the generic adapter drives.
FAMILIES: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {},
    "phi3": {},
    "phi": {},
    "olmo": {},
    "olmo2": {},
    "olmoe": MOE,
    "granite": {"embedding_multiplier": 2.0, "logits_scaling": 4.0, "residual_multiplier": 0.5},
    "glm": {},
    "glm4": {},
    "smollm3": {},
    "qwen2_moe": {**MOE, "shared_expert_intermediate_size": 32},
    "qwen3_moe": MOE,
    "mixtral": MOE,
    "starcoder2": {},
    "gemma": {},
    "gemma3_text": {"sliding_window": 512, "query_pre_attn_scalar": 16},
    "cohere": {},
    "cohere2": {},
    "helium": {},
    "exaone4": {},
    "arcee": {},
    "apertus": {},
    "seed_oss": {},
    "ernie4_5": {},
    "hunyuan_v1_dense": {},
    # GPT-2 layouts (issue 22): layers at transformer.h / gpt_neox.layers / model.decoder.layers, learned
    # absolute positions (GPT-2, StarCoder 1, OPT and BioGPT with their offset of 2) or partial RoPE
    "gpt2": {},
    "gpt_bigcode": {},
    "gptj": {"rotary_dim": 8},
    "codegen": {"rotary_dim": 8},
    "gpt_neox": {},
    "opt": {},
    "biogpt": {},
    # latent attention (MLA, issue 22): keys and values per head, as the model's attention expands them
    "deepseek_v3": {**MOE, **MLA},
    "minicpm3": MLA,
}

#: model_type -> (extra settings, attention implementation, what the refusal says).
REFUSED: dict[str, tuple[dict, str, str]] = {
    "minimax": (MOE, "sdpa", "keeps its recurrent state in its own cache class (MiniMaxCache)"),
    "stablelm": ({}, "sdpa", "do not pass keyword arguments to the attention function"),
    "diffllama": ({}, "sdpa", "calls the attention function more than once per layer"),
    "bloom": ({}, "eager", "does not go through transformers' AttentionInterface"),
}


def tiny_model(model_type: str, extra: dict, attn: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**TINY, **extra})
    config._attn_implementation = attn
    config.eos_token_id = None  # random weights: generate the full length
    return AutoModelForCausalLM.from_config(config).eval()


def greedy_with(adapter: GenericAdapter, ids: torch.Tensor, policy_name: str, new: int) -> list[int]:
    policy = kvpolicy.get_policy(policy_name)
    logits, batch = adapter.prefill([ids[0]], policy, reserve=new)
    token = logits.argmax(-1, keepdim=True)
    out = [int(token)]
    for step in range(new - 1):
        token = adapter.decode_step(token, policy, batch, step).argmax(-1, keepdim=True)
        out.append(int(token))
    return out


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_generic_adapter_equals_transformers_and_holds_budgets(model_type):
    model = tiny_model(model_type, FAMILIES[model_type])
    ids = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[0, 40:].tolist()
    adapter = GenericAdapter(model)
    assert greedy_with(adapter, ids, "fullkv", 12) == want
    assert model.config._attn_implementation == "sdpa"  # the model is as it was
    if kvpolicy.get_adapter(model).name == "generic":  # families without an adapter of their own
        out = kvpolicy.generate(model, None, input_ids=ids, policy="fullkv", max_new_tokens=12)
        assert out.token_ids == want
    snap = kvpolicy.get_policy("snapkv", kv_budget=12)
    fast = kvpolicy.get_policy("fastkv", kv_budget=12, tsp_layer=1, tsp_rate=0.5)
    for policy in (snap, fast):
        _, batch = adapter.prefill([ids[0]], policy)
        tokens = batch.states[0].tokens_per_layer
        for lengths, window, n in zip(batch.cache.kv_head_lengths(), adapter.windows, tokens, strict=True):
            # full-attention layers hold the budget; sliding ones (Gemma 3, Cohere 2, Exaone 4 hybrids,
            # windows far above this prompt here) what the next token sees
            # (two KV heads; GPT-2 and GPT-J have no grouped queries, StarCoder 1 has one KV head)
            assert lengths == [12 if window is None else min(n, window - 1)] * len(lengths)
    assert batch.states[0].tokens_per_layer == [40, 40, 20, 20]  # TSP after layer 1


#: model_type -> settings with a 16-token window; prompts of 40 tokens pass it.
SLIDING: dict[str, dict] = {
    "gemma3_text": {"sliding_window": 16, "query_pre_attn_scalar": 16, "sliding_window_pattern": 2},
    "cohere2": {"sliding_window": 16},
    "exaone4": {"sliding_window": 16},
    "mistral": {"sliding_window": 16},  # every layer slides (Mistral v0.1)
    "ministral": {"sliding_window": 16},
    "qwen2": {"sliding_window": 16, "use_sliding_window": True, "max_window_layers": 2},
    "phi3": {"sliding_window": 16},
    "starcoder2": {"sliding_window": 16},
}


@pytest.mark.parametrize("model_type", list(SLIDING))
def test_sliding_window_layers_equal_transformers_past_the_window(model_type):
    model = tiny_model(model_type, SLIDING[model_type])
    assert kvpolicy.get_adapter(model).name == "generic"
    ids = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[0, 40:].tolist()
    out = kvpolicy.generate(model, None, input_ids=ids, policy="fullkv", max_new_tokens=12)
    assert out.token_ids == want
    adapter = kvpolicy.get_adapter(model)
    sliding = [w is not None for w in adapter.windows]
    assert any(sliding)
    # SnapKV compresses the full-attention layers; sliding layers keep their window (15 entries: the
    # positions the next token sees besides itself), whatever the budget.
    pre = kvpolicy.prefill(model, ids, kvpolicy.get_policy("snapkv", kv_budget=12))
    for lengths, slides in zip(pre.cache.kv_head_lengths(), sliding, strict=True):
        assert lengths == ([15, 15] if slides else [12, 12])
    # Decoding keeps the window bounded: 15 + 1 appended - 1 rolled out per step.
    fast = kvpolicy.get_policy("fastkv", kv_budget=12, tsp_layer=1, tsp_rate=0.5)
    assert len(kvpolicy.generate(model, None, input_ids=ids, policy=fast, max_new_tokens=6).token_ids) == 6


#: Families whose attention adds to the scores: Gemma 2 soft-caps them (and its final logits), GPT-OSS
#: adds a learned sink logit per head. Both hybrid (16-token windows here) and run with eager attention.
SCORE_TERMS: dict[str, dict] = {
    "gemma2": {
        "sliding_window": 16,
        "query_pre_attn_scalar": 16,
        "attn_logit_softcapping": 5.0,
        "final_logit_softcapping": 3.0,
    },
    "gpt_oss": {**MOE, "sliding_window": 16},
}


@pytest.mark.parametrize("model_type", list(SCORE_TERMS))
def test_soft_capping_and_attention_sinks_equal_transformers(model_type):
    model = tiny_model(model_type, SCORE_TERMS[model_type], attn="eager")
    if model_type == "gpt_oss":  # random sinks large enough to matter
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(
                    0.0, 2.0, generator=torch.Generator().manual_seed(layer.self_attn.layer_idx)
                )
    ids = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[0, 40:].tolist()
    assert kvpolicy.get_adapter(model).name == "generic"
    out = kvpolicy.generate(model, None, input_ids=ids, policy="fullkv", max_new_tokens=12)
    assert out.token_ids == want
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("model_type", list(REFUSED))
def test_unsupported_architectures_are_refused_naming_class_and_reason(model_type):
    extra, attn, reason = REFUSED[model_type]
    model = tiny_model(model_type, extra, attn)
    with pytest.raises((RegistryError, ValueError)) as err:
        kvpolicy.get_adapter(model)
    assert type(model).__name__ in str(err.value)
    assert reason in str(err.value)


@pytest.mark.parametrize(
    ("model_type", "extra"),
    [("phi3", {}), ("gemma3_text", SLIDING["gemma3_text"]), ("olmoe", MOE), ("gpt2", {}), ("opt", {})],
)
def test_generic_adapter_batch_equals_each_prompt_alone(model_type, extra):
    """A left-padded batch of different lengths (sliding layers past their window included) gives each
    prompt the tokens it gets alone."""
    model = tiny_model(model_type, extra)
    prompts = [torch.randint(1, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in (40, 23, 31)]
    policy = kvpolicy.get_policy("fastkv", kv_budget=12, tsp_layer=1, tsp_rate=0.5)
    alone = [kvpolicy.generate(model, None, input_ids=p, policy=policy, max_new_tokens=8) for p in prompts]
    batch = kvpolicy.generate(model, None, input_ids=prompts, policy=policy, max_new_tokens=8)
    assert [b.token_ids for b in batch] == [a.token_ids for a in alone]


def test_a_budget_below_the_sliding_window_says_so():
    """Sliding layers keep their window whatever the budget (the model attends to all of it): a budget
    below it is reported, naming the window and the full-attention layers the budget applies to."""
    model = tiny_model("gemma3_text", SLIDING["gemma3_text"])
    ids = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(3))
    with pytest.warns(
        UserWarning, match=r"budget 12 is below the 16-token sliding window .* layers \[1, 3\]"
    ):
        kvpolicy.prefill(model, ids, kvpolicy.get_policy("snapkv", kv_budget=12))


@pytest.mark.parametrize(("model_type", "extra"), [("gemma3_text", SLIDING["gemma3_text"]), ("olmoe", MOE)])
def test_compiled_decode_through_the_generic_adapter_equals_eager(model_type, extra, monkeypatch):
    """The decode step compiles whole (``fullgraph``) through the routed attention function, sliding
    layers rolling past their window included (dynamo capture; inductor is tested in test_engine)."""
    import kvpolicy.generation as generation

    monkeypatch.setattr(generation, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    model = tiny_model(model_type, extra)
    ids = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(3))
    policy = kvpolicy.get_policy("fastkv", kv_budget=12, tsp_layer=1, tsp_rate=0.5)
    eager = kvpolicy.generate(model, None, input_ids=ids, policy=policy, max_new_tokens=16)
    compiled = kvpolicy.generate(model, None, input_ids=ids, policy=policy, max_new_tokens=16, compile=True)
    torch._dynamo.reset()
    assert compiled.token_ids == eager.token_ids
    assert model.config._attn_implementation == "sdpa"


#: Llama 4's text model with 16-position chunks: a 40-token prompt spans three chunks, and 16 new
#: tokens cross the boundary at 48.
CHUNKED = {"attention_chunk_size": 16, **MOE}


def test_chunked_attention_equals_transformers_across_chunk_boundaries():
    """Chunked layers attend within their chunk over original positions and keep the last prompt
    token's chunk; at a boundary decode empties them. Full KV and FastKV's keep-all equal
    transformers; SnapKV compresses only the full-attention layer."""
    model = tiny_model("llama4_text", CHUNKED)
    ids = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)[0, 40:].tolist()
    adapter = kvpolicy.get_adapter(model)
    assert adapter.chunks == [16, 16, 16, None]
    for policy in ("fullkv", kvpolicy.get_policy("fastkv", kv_budget=160, tsp_layer=1, tsp_rate=1.0)):
        assert (
            kvpolicy.generate(model, None, input_ids=ids, policy=policy, max_new_tokens=16).token_ids == want
        )
    # the boundary's clearing replays from a recorded step too (the CPU stand-in of CUDA graphs)
    replayed = kvpolicy.generate(model, None, input_ids=ids, max_new_tokens=16, graphs=True)
    assert replayed.token_ids == want
    pre = kvpolicy.prefill(model, ids, kvpolicy.get_policy("snapkv", kv_budget=12))
    held = pre.cache.kv_head_lengths()
    assert held[:3] == [[8] * len(held[0])] * 3  # positions 32..39: the last prompt token's chunk
    assert set(held[3]) == {12}


def test_chunked_layers_refuse_lengths_their_query_scaling_needs_the_cache_for():
    model = tiny_model("llama4_text", {**CHUNKED, "floor_scale": 64})
    ids = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(3))
    kvpolicy.generate(model, None, input_ids=ids, max_new_tokens=23)  # 63 positions: served
    with pytest.raises(ValueError, match=r"64 positions.*attn_temperature_tuning.*up to 63 positions"):
        kvpolicy.generate(model, None, input_ids=ids, max_new_tokens=24)


def test_clearing_rows_of_a_paged_layer():
    """``PagedLayer.clear`` empties the chosen sequences' rows (every head) and nothing else."""
    from kvpolicy.cache import PagedLayer

    layer = PagedLayer(block_size=4)
    k = torch.randn(2, 6, 8)  # (KV heads, entries, head dim), as a layer keeps them
    parts = [(k, k.clone(), torch.arange(6).expand(2, 6), None) for _ in range(2)]
    layer.store(parts, reserve=4)
    layer.clear(torch.tensor([False, True]))
    assert layer.lengths.tolist() == [[6, 6], [0, 0]]
    positions = layer.slot_positions()
    assert (positions[1] == -1).all() and positions[0, :, :6].tolist() == [list(range(6))] * 2
