"""The cost model on hand-checked numbers, and the benchmark runner end to end on a tiny model."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
from conftest import tiny_llama

import kvpolicy
from kvpolicy.bench import ModelShape, decode_bytes_per_token, prefill_flops, speedup_bound
from kvpolicy.bench.cli import parse_policy_spec, random_model
from kvpolicy.bench.runner import FULL, HF_BASELINE, benchmark

SHAPE = ModelShape(hidden=8, intermediate=16, layers=2, q_heads=2, kv_heads=1, head_dim=4, vocab=10)


def test_prefill_flops_by_hand():
    # proj 2*T*8*4*(2*2+2*1)=384T, mlp 2*T*3*8*16=768T, attn 2*2*4*T*(T+1)=16T(T+1); head 2*8*10=160
    t = 3
    per_layer = 384 * t + 768 * t + 16 * t * (t + 1)
    assert prefill_flops(SHAPE, [3, 3]) == 2 * per_layer + 160


def test_decode_bytes_by_hand():
    layer_params = 8 * 4 * (2 * 2 + 2 * 1) + 3 * 8 * 16 + 2 * 8  # 192 + 384 + 16
    weights = (2 * layer_params + 8 * 10) * 2
    kv = (5 + 7) * 2 * 1 * 4 * 2
    assert decode_bytes_per_token(SHAPE, [5, 7], 2) == weights + kv


def test_bound_is_one_for_identical_schedules_and_grows_with_cuts():
    same = speedup_bound(SHAPE, [100, 100], [100, 100], [100, 100], [100, 100], 2)
    assert same.prefill_speedup == pytest.approx(1.0) and same.decode_speedup == pytest.approx(1.0)
    cut = speedup_bound(SHAPE, [100, 100], [100, 100], [100, 20], [10, 10], 2)
    assert cut.prefill_speedup > 1.0 and cut.decode_speedup > 1.0


def test_model_shape_from_config():
    cfg = tiny_llama().config
    shape = ModelShape.from_config(cfg)
    assert (shape.layers, shape.q_heads, shape.kv_heads, shape.head_dim) == (4, 4, 2, 16)


def test_policy_spec_parsing():
    label, policy = parse_policy_spec("fastkv:tsp_rate=0.3,kv_budget=64", {"window": 4})
    assert label == "fastkv:tsp_rate=0.3,kv_budget=64"
    assert policy.propagation.rate == 0.3 and policy.cache.budget == 64 and policy.cache.window == 4
    with pytest.raises(ValueError, match="bad policy spec"):
        parse_policy_spec("fastkv:tsp_rate", {})


def test_benchmark_interleaves_and_reports_ratios():
    import torch

    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(0))
    policy = kvpolicy.get_policy("fastkv", tsp_layer=1, tsp_rate=0.25, kv_budget=32)
    calls = []
    rows = benchmark(
        model, {200: ids}, {"fastkv": policy}, gen=4, repeats=2, warmup=1, progress=lambda: calls.append(1)
    )
    assert len(calls) == 3 * 3  # (warm-up + repeats) x (full, transformers, fastkv)
    by_name = {r.variant: r for r in rows}
    assert set(by_name) == {FULL, HF_BASELINE, "fastkv"}
    fast, full = by_name["fastkv"], by_name[FULL]
    assert fast.tokens_per_layer == [200, 200, 50, 50] and fast.kv_tokens_per_layer == [32] * 4
    assert full.tokens_per_layer == full.kv_tokens_per_layer == [200] * 4
    # The bound is the cost model's, on these schedules.
    shape = ModelShape.from_config(model.config)
    want = speedup_bound(shape, [200] * 4, [200] * 4, [200, 200, 50, 50], [32] * 4, 4, 4)
    assert fast.bound == pytest.approx({"prefill": want.prefill_speedup, "decode": want.decode_speedup})
    assert fast.bound["prefill"] > 1.0 and fast.bound["decode"] > 1.0
    # KV bytes after prefill: entries x (K+V) x 2 KV heads x head_dim 16 x fp32, over 4 layers.
    assert fast.kv_bytes == 32 * 2 * 2 * 16 * 4 * 4 and full.kv_bytes == 200 * 2 * 2 * 16 * 4 * 4
    assert by_name[HF_BASELINE].kv_bytes == full.kv_bytes  # same entries, other cache
    for row in rows:
        # Every variant measured prefill and decode: positive, finite, quartiles in order.
        for stats in (row.prefill_s, row.decode_ms_per_token, row.e2e_s):
            assert stats is not None and 0 < stats["p25"] <= stats["median"] <= stats["p75"] < math.inf
        # Two repeats: the median is their mean, so end-to-end = prefill + gen x decode, of the medians.
        e2e = row.prefill_s["median"] + 4 * row.decode_ms_per_token["median"] / 1000
        assert row.e2e_s["median"] == pytest.approx(e2e)
        # Speed-ups are full KV's medians over the row's.
        assert row.speedup == pytest.approx(
            {
                "prefill": full.prefill_s["median"] / row.prefill_s["median"],
                "decode": full.decode_ms_per_token["median"] / row.decode_ms_per_token["median"],
                "e2e": full.e2e_s["median"] / row.e2e_s["median"],
            }
        )
    assert full.speedup == {"prefill": 1.0, "decode": 1.0, "e2e": 1.0}


def test_benchmark_batches_report_the_batch():
    """``--batch-size``: a (B, L) batch runs through the batched path; KV bytes are the batch's, the same
    as the transformers baseline holds for full KV."""
    import torch

    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 120), generator=torch.Generator().manual_seed(0)).expand(3, -1)
    policy = kvpolicy.get_policy("snapkv", kv_budget=32)
    rows = benchmark(model, {120: ids}, {"snapkv": policy}, gen=3, repeats=1, warmup=0)
    by_name = {r.variant: r for r in rows}
    assert by_name[HF_BASELINE].kv_bytes == by_name[FULL].kv_bytes
    assert by_name["snapkv"].kv_bytes * 120 == by_name[FULL].kv_bytes * 32
    assert by_name["snapkv"].kv_tokens_per_layer == [32] * 4


def test_random_weights_shape_file(tmp_path):
    cfg = {
        "model_type": "llama",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 64,
        "max_position_embeddings": 256,
    }
    path = tmp_path / "shape.json"
    path.write_text(json.dumps(cfg))
    import torch

    model = random_model(str(path), torch.float32, None)
    assert model.config.num_hidden_layers == 2 and type(model).__name__ == "LlamaForCausalLM"
    with pytest.raises(FileNotFoundError, match="neither a known shape"):
        random_model("nope.json", torch.float32, None)


def test_bench_cli_bad_input(capsys):
    from kvpolicy.cli import main

    assert main(["bench", "prefill", "--policy", "fastkv", "--kv-budget", "0", "--lengths", "64"]) == 2
    assert "kv_budget=0" in capsys.readouterr().err
    assert main(["bench", "prefill", "--lengths", "8", "--random-weights", "llama-3.1-8b"]) == 2
    assert "every length >= 16" in capsys.readouterr().err


def test_known_shape_is_llama_31_8b():
    from kvpolicy.bench.cli import SHAPES

    shape = ModelShape.from_config(SimpleNamespace(**{k: v for k, v in SHAPES["llama-3.1-8b"].items()}))
    assert (shape.layers, shape.q_heads, shape.kv_heads, shape.head_dim, shape.vocab) == (
        32,
        32,
        8,
        128,
        128256,
    )


@pytest.mark.slow
def test_bench_cli_on_embedded_model(tmp_path, real_model):
    from kvpolicy.cli import main

    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "e2e",
            "--policy",
            "fastkv:tsp_layer=20",
            "--lengths",
            "256",
            "--gen",
            "2",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    data = json.loads(out.read_text())
    names = {r["variant"] for r in data["results"]}
    assert names == {FULL, HF_BASELINE, "fastkv:tsp_layer=20"}
    assert data["machine"]["torch"]
    assert "| `fastkv:tsp_layer=20` | 256 |" in out.with_suffix(".md").read_text()
