"""Batched generation with left padding: every policy gives each prompt of a batch exactly the tokens,
KV entries and per-layer token counts it gets alone (tiny model here; the real model, slow, below)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_OPTIONS, tiny_llama

import kvpolicy
from kvpolicy.registry import get_registry

TINY = TINY_OPTIONS


def _presets() -> list[str]:
    """Every preset in the registry, third-party ones included."""
    return sorted(e.name for e in get_registry().entries() if e.category == "preset")


def _options(name: str, table: dict[str, dict]) -> dict:
    return table.get(name, {"kv_budget": 0.5})  # third-party presets: the common budget setting


def _prompts(lengths=(90, 40, 120, 7)) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 128, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("preset", _presets())
def test_batch_equals_each_prompt_alone(model, preset):
    policy = kvpolicy.get_policy(preset, **_options(preset, TINY))
    prompts = _prompts()
    alone = [kvpolicy.generate(model, None, input_ids=p, policy=policy, max_new_tokens=10) for p in prompts]
    batch = kvpolicy.generate(model, None, input_ids=prompts, policy=policy, max_new_tokens=10)
    assert len(batch) == len(prompts)
    for a, b in zip(alone, batch, strict=True):
        assert b.token_ids == a.token_ids
        assert b.stats.prompt_tokens == a.stats.prompt_tokens
        assert b.stats.tokens_per_layer == a.stats.tokens_per_layer
        assert b.stats.kv_tokens_per_layer == a.stats.kv_tokens_per_layer
        assert b.stats.kv_bytes_per_layer == a.stats.kv_bytes_per_layer


def test_batch_size_splits_and_keeps_order(model):
    policy = kvpolicy.get_policy("fastkv", kv_budget=20, tsp_layer=1, tsp_rate=0.5)
    prompts = _prompts((30, 90, 12, 60, 45))
    whole = kvpolicy.generate(model, None, input_ids=prompts, policy=policy, max_new_tokens=6)
    split = kvpolicy.generate(model, None, input_ids=prompts, policy=policy, max_new_tokens=6, batch_size=2)
    assert [o.token_ids for o in split] == [o.token_ids for o in whole]
    assert [o.stats.prompt_tokens for o in split] == [30, 90, 12, 60, 45]


def test_tensor_prompts_and_eos_per_sequence(model):
    prompts = [torch.tensor(p) for p in _prompts()]
    alone = [kvpolicy.generate(model, None, input_ids=p, max_new_tokens=8) for p in prompts]
    model.generation_config.eos_token_id = alone[1].token_ids[2]  # sequence 1 stops early
    try:
        batch = kvpolicy.generate(model, None, input_ids=prompts, max_new_tokens=8)
        for a, b in zip(alone, batch, strict=True):
            stop = next(
                (i for i, t in enumerate(a.token_ids) if t == model.generation_config.eos_token_id), None
            )
            assert b.token_ids == a.token_ids[: None if stop is None else stop + 1]
        assert len(batch[1].token_ids) <= 3
    finally:
        model.generation_config.eos_token_id = None


def test_text_prompts_through_the_chat_template(embedded_tokenizer):
    from conftest import tiny_llama_for

    model = tiny_llama_for(embedded_tokenizer)
    texts = ["What is the capital of France?", "Name three colours of the rainbow, briefly please."]
    alone = [kvpolicy.generate(model, embedded_tokenizer, t, max_new_tokens=5) for t in texts]
    batch = kvpolicy.generate(model, embedded_tokenizer, texts, max_new_tokens=5)
    assert [o.text for o in batch] == [o.text for o in alone]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"input_ids": [[1, 2], []]}, ValueError, "prompt 1: empty prompt"),
        ({"input_ids": [[1, 2], [1, 999]]}, ValueError, r"prompt 1: token ids must be in \[0, 128\)"),
        ({"input_ids": [[1, 2]], "batch_size": 0}, ValueError, "batch_size must be an int >= 1, got 0"),
        ({"input_ids": [[1] * 600]}, ValueError, "prompt 0: prompt plus generation needs 604 positions"),
        ({"prompt": [], "input_ids": None}, ValueError, "empty batch"),
    ],
)
def test_bad_batches_name_the_prompt(model, kwargs, error, message):
    with pytest.raises(error, match=message):
        kvpolicy.generate(model, None, max_new_tokens=4, **kwargs)


#: Presets whose prefill is a per-layer top-k of their own scores, like SnapKV's (which stays here):
#: the engine batches them by the same path, and ``test_batch_equals_each_prompt_alone`` checks each on
#: the tiny model; on the real model (a minute each on CI's two cores) they would add nothing new.
SAME_PATH_AS_SNAPKV = {
    "keydiff",
    "lagkv",
    "compactor",
    "random",
    "chunkkv",
    "criticalkv",
    "defensivekv",
    "qfilters",
}


@pytest.mark.slow
@pytest.mark.parametrize("preset", [p for p in _presets() if p not in SAME_PATH_AS_SNAPKV])
def test_real_model_batch_of_four_equals_alone(real_model, haystack, preset):
    """The issue's acceptance test: 4 needle prompts of different lengths on SmolLM2-135M."""
    from kvpolicy.eval import needle

    model, tokenizer = real_model
    real = {
        **{k: {"kv_budget": 128} for k in TINY if k != "fullkv"},
        "fullkv": {},
        "fastkv": {"kv_budget": 128, "tsp_layer": 20, "tsp_rate": 0.3},
        "pyramidinfer": {"kv_budget": 0.5},
        "duoattention": {"head_map_file": str(Path(__file__).parent / "data" / "duo_smollm2_head_map.json")},
        "qfilters": {"kv_budget": 128, "packaged_filters": "SmolLM2-135M-Instruct"},  # its own, shipped
    }
    policy = kvpolicy.get_policy(preset, **_options(preset, real))
    prompts = [needle.build_sample(tokenizer, n, 0.5, haystack).input_ids for n in (700, 300, 1000, 500)]
    with torch.inference_mode():
        alone = [
            kvpolicy.generate(model, tokenizer, input_ids=p, policy=policy, max_new_tokens=12)
            for p in prompts
        ]
        batch = kvpolicy.generate(model, tokenizer, input_ids=prompts, policy=policy, max_new_tokens=12)
    for a, b in zip(alone, batch, strict=True):
        assert b.token_ids == a.token_ids
        assert b.stats.kv_tokens_per_layer == a.stats.kv_tokens_per_layer


def test_eval_batch_size_gives_the_same_records(embedded_tokenizer, tmp_path):
    """``kvpolicy eval --batch-size``: the same predictions and scores as one sample at a time, under
    the same run key (batching is not part of what was measured); RULER mixes answer lengths."""
    from conftest import tiny_llama_for

    from kvpolicy.eval import run_eval

    model = tiny_llama_for(embedded_tokenizer)
    kw = dict(policy="snapkv", policy_options={"kv_budget": 64}, quiet=True, max_new_tokens=None)
    for bench, extra in (
        ("needle", {"lengths": [200, 300], "depths": 3, "max_new_tokens": 4}),
        ("ruler", {"lengths": [700], "tasks": ["niah_single_1", "vt"], "samples": 2}),
    ):
        one = run_eval(bench, model, embedded_tokenizer, out=tmp_path / "one", **{**kw, **extra})
        many = run_eval(
            bench, model, embedded_tokenizer, out=tmp_path / "many", batch_size=3, **{**kw, **extra}
        )
        assert many.key == one.key
        strip = lambda rs: [(r["id"], r["prediction"], r["score"]) for r in rs]  # noqa: E731
        assert strip(many.records) == strip(one.records)
    with pytest.raises(ValueError, match="--batch-size must be an int >= 1, got 0"):
        run_eval("needle", model, embedded_tokenizer, out=tmp_path, batch_size=0, **{**kw, "lengths": [200]})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_batches_have_no_nan_from_padding(dtype):
    """Scores run in fp32 and padding never enters attention: finite logits at prefill and at every
    decode step of a padded half-precision batch, for a cache policy and for TSP."""
    model = tiny_llama().to(dtype)
    prompts = _prompts()
    adapter = kvpolicy.get_adapter(model)
    for policy in (
        kvpolicy.get_policy("snapkv", kv_budget=20),
        kvpolicy.get_policy("fastkv", kv_budget=20, tsp_layer=1, tsp_rate=0.5),
    ):
        pre = kvpolicy.prefill(model, prompts, policy, reserve=4)
        assert torch.isfinite(pre.logits.float()).all()
        assert pre.cache.kv_lengths_of(3) == [7] * 4  # the 7-token prompt is shorter than the budget
        token = pre.next_token
        for step in range(4):
            logits = adapter.decode_step(token, policy, pre.batch, step)
            assert torch.isfinite(logits.float()).all(), f"step {step}"
            token = logits.argmax(-1, keepdim=True)


def test_a_2d_tensor_is_a_batch_of_equal_length_prompts(model):
    ids = torch.randint(0, 128, (3, 50), generator=torch.Generator().manual_seed(5))
    policy = kvpolicy.get_policy("snapkv", kv_budget=20)
    batch = kvpolicy.generate(model, None, input_ids=ids, policy=policy, max_new_tokens=5)
    alone = [kvpolicy.generate(model, None, input_ids=row, policy=policy, max_new_tokens=5) for row in ids]
    assert [o.token_ids for o in batch] == [o.token_ids for o in alone]
    pre = kvpolicy.prefill(model, ids, policy)  # prefill takes the same batch
    assert len(pre.states) == 3 and pre.next_token[:, 0].tolist() == [o.token_ids[0] for o in alone]
