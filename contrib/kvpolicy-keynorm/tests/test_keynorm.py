"""KeyNorm itself: the scoring, the selection, the plugin registration, the preset and the CLI."""

from __future__ import annotations

import json

import kvpolicy
import pytest
import torch
from kvpolicy.policies import TSP
from kvpolicy.testing import ByteTokenizer, one_thread, tiny_llama

from kvpolicy_keynorm import KeyNorm, KeyNormPreset, keynorm_keep, keynorm_scores


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():  # tiny models: intra-op threads only add overhead
        yield


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(3))


def test_scores_are_key_norms_per_kv_head():
    key = torch.zeros(1, 2, 3, 4)
    key[0, 0, :, 0] = torch.tensor([3.0, 1.0, 2.0])
    key[0, 1, :, :2] = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    scores = keynorm_scores(key)
    assert scores.shape == (1, 2, 3) and scores.dtype == torch.float32
    assert scores.tolist() == [[[3.0, 1.0, 2.0], [5.0, 0.0, 1.0]]]


def test_keeps_lowest_norms_per_head_plus_window():
    norms = torch.tensor([[5.0, 1.0, 4.0, 2.0, 9.0, 8.0], [1.0, 9.0, 2.0, 8.0, 3.0, 7.0]])
    key = torch.zeros(1, 2, 6, 4)
    key[0, :, :, 0] = norms
    assert keynorm_keep(key, keep=2, window=0).tolist() == [[[1, 3], [0, 2]]]
    # The window (the last entry) is kept whatever its norm, and counts against the budget.
    assert keynorm_keep(key, keep=3, window=1).tolist() == [[[1, 3, 5], [0, 2, 5]]]
    assert keynorm_keep(key, keep=6, window=0) is None  # budget covers everything
    assert keynorm_keep(key, keep=2, window=6) is None  # the window covers everything


def test_norm_is_the_same_before_and_after_rope(model, prompt):
    """RoPE rotates pairs of dimensions, so scoring the post-RoPE keys the adapter hands over is exact."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = model.model.layers[0].self_attn
    h = model.model.embed_tokens(prompt)
    k = attn.k_proj(model.model.layers[0].input_layernorm(h)).view(1, 64, -1, attn.head_dim).transpose(1, 2)
    cos, sin = model.model.rotary_emb(h, torch.arange(64)[None])
    _, k_rope = apply_rotary_pos_emb(k, k, cos, sin)
    torch.testing.assert_close(keynorm_scores(k_rope), keynorm_scores(k), rtol=1e-5, atol=1e-5)


def test_cache_keeps_the_lowest_norm_keys(model, prompt):
    pre = kvpolicy.prefill(model, prompt, kvpolicy.compose(cache=KeyNorm(budget=16)))
    # Layer 0's keys depend on the prompt only: recompute them and compare the kept set per head.
    full = kvpolicy.prefill(model, prompt, "fullkv")
    keys = full.cache.layers[0].keys
    want = keynorm_scores(keys).topk(16, dim=-1, largest=False).indices.sort(dim=-1).values
    assert pre.cache.layers[0].positions.tolist() == want.tolist()
    assert pre.cache.kv_lengths == [16] * 4


def test_settings_name_the_bad_value():
    with pytest.raises(ValueError, match=r"window \(8\) is larger than the budget \(4\)"):
        KeyNorm(budget=4, window=8)
    with pytest.raises(kvpolicy.PolicyConfigError, match="invalid settings for keynorm: kv_budget=0"):
        kvpolicy.get_policy("keynorm", kv_budget=0)
    with pytest.raises(kvpolicy.PolicyConfigError, match=r"window \(8\) is larger than the budget \(4\)"):
        kvpolicy.get_policy("keynorm", kv_budget=4, window=8)


def test_plugin_is_listed_with_its_distribution(capsys):
    from importlib.metadata import version

    from kvpolicy.cli import main

    provider = f"kvpolicy-keynorm {version('kvpolicy-keynorm')}"
    registry = kvpolicy.get_registry(refresh=True)
    assert registry.components["keynorm"].obj is KeyNorm
    assert registry.presets["keynorm"].obj is KeyNormPreset
    assert registry.components["keynorm"].provider == registry.presets["keynorm"].provider == provider
    assert main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["entries"]
    assert {(r["category"], r["provider"]) for r in rows if r["name"] == "keynorm"} == {
        ("cache", provider),
        ("preset", provider),
    }


def test_preset_builds_and_round_trips():
    policy = kvpolicy.get_policy("keynorm", kv_budget=0.3, window=4)
    assert policy.cache == KeyNorm(budget=0.3, window=4)
    assert kvpolicy.policy_from_dict(json.loads(json.dumps(policy.to_dict()))) == policy


def test_composes_with_tsp(model, prompt):
    policy = kvpolicy.compose(TSP(layer=1, rate=0.5), KeyNorm(budget=16, window=4))
    out = kvpolicy.generate(model, None, input_ids=prompt, policy=policy, max_new_tokens=6)
    assert out.stats.tokens_per_layer == [64, 64, 32, 32]
    assert out.stats.kv_tokens_per_layer == [16] * 4
    assert kvpolicy.policy_from_dict(policy.to_dict()) == policy


def test_cli_generate_with_the_preset(monkeypatch, capsys):
    from kvpolicy import cli

    byte_model = tiny_llama(vocab=256)
    monkeypatch.setattr(cli, "load_from_args", lambda args: (byte_model, ByteTokenizer()))
    code = cli.main(
        ["generate", "--policy", "keynorm", "--kv-budget", "8", "--prompt", "x" * 40, "--max-new-tokens", "3"]
    )
    assert code == 0, capsys.readouterr().err
    record = capsys.readouterr()
    assert "KeyNorm(budget=8, window=0)" in record.err
    args = [
        "--policy",
        "keynorm",
        "--kv-budget",
        "8",
        "--prompt",
        "x" * 40,
        "--max-new-tokens",
        "3",
        "--json",
    ]
    assert cli.main(["generate", *args]) == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert stats["kv_tokens_per_layer"] == [8] * 4
