"""The cost model on hand-checked numbers, the machine measurement, and the benchmark runner end to end
on a tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import round_machine, tiny_llama

import kvpolicy
from kvpolicy.bench import ModelShape, decode_bytes_per_token, prefill_flops, speedup_bound
from kvpolicy.bench.cli import markdown_table, parse_policy_spec, random_model
from kvpolicy.bench.costmodel import prefill_peak_bytes, weight_bytes
from kvpolicy.bench.machine import measure_machine
from kvpolicy.bench.runner import (
    FULL,
    HF_BASELINE,
    HF_COMPILED,
    benchmark,
    run_transformers,
    run_transformers_compiled,
)

SHAPE = ModelShape(hidden=8, intermediate=16, layers=2, q_heads=2, kv_heads=1, head_dim=4, vocab=10)
MACHINE = round_machine()


#: A two-layer Llama shape for ``--random-weights`` (written to a config.json by the tests).
TINY_SHAPE = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 64,
    "max_position_embeddings": 256,
}


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
    # A batch reads the weights once and every sequence's KV.
    assert decode_bytes_per_token(SHAPE, [5, 7], 2, batch=3) == weights + 3 * kv


def test_prefill_peak_bytes_by_hand():
    # weights: 2 layers x 592 + final norm 8 + embedding and LM head 2 x 8 x 10, fp16
    assert weight_bytes(SHAPE, 2) == (2 * 592 + 8 + 160) * 2 == 2704
    got = prefill_peak_bytes(SHAPE, 10, 2, 2, [5, 7], mlp_chunk_tokens=4)
    kv = 2 * (5 + 7) * 2 * 1 * 4 * 2  # batch x entries x (K, V) x kv_heads x head_dim x fp16
    rows = 2 * 10
    qkv = rows * (2 + 2 * 1) * 4 * 2
    hidden = rows * 2 * 8 * 2  # residual stream and its normed copy
    mlp = 4 * 3 * 16 * 2  # one chunk of 4 rows: gate, up, product
    attn = rows * 2 * (4 * 2 + 4)  # SDPA output and fp32 log-sum-exp per query head
    logits = 2 * 10 * 2
    assert got == 2704 + kv + qkv + hidden + mlp + attn + logits == 5272
    assert (
        prefill_peak_bytes(SHAPE, 10, 2, 2, [5, 7], mlp_chunk_tokens=4, include_weights=False) == 5272 - 2704
    )
    # A chunk larger than the batch's rows is the rows.
    small = prefill_peak_bytes(SHAPE, 10, 2, 2, [5, 7], mlp_chunk_tokens=4096, include_weights=False)
    assert small == 5272 - 2704 - mlp + rows * 3 * 16 * 2


def test_measure_machine_is_positive_and_finite():
    import torch

    m = measure_machine(
        "cpu", torch.float32, read_bytes=32 * 2**20, gemv_bytes=8 * 2**20, matmul_sizes=(64, 128)
    )
    for rate in (m.read_bytes_per_s, m.matmul_flops_per_s, m.gemv_bytes_per_s):
        assert 0 < rate < math.inf
    assert m.read_bytes == 32 * 2**20 and m.matmul_size in (64, 128) and 0 < m.gemv_bytes <= 8 * 2**20
    assert m.dtype == "torch.float32" and m.seconds > 0


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
        model,
        {200: ids},
        {"fastkv": policy},
        gen=4,
        repeats=2,
        warmup=1,
        progress=lambda: calls.append(1),
        machine=MACHINE,
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
    # Absolute figures, by hand: weights (4 layers x 36992 + LM head 64 x 128) x fp32 = 624640 bytes;
    # KV per layer (kept + gen/2) x (K, V) x 2 heads x 16 x fp32 = 256 bytes an entry; at 1 GB/s.
    weights = (4 * (64 * 16 * 12 + 3 * 64 * 128 + 2 * 64) + 64 * 128) * 4
    assert weights == 624640
    assert full.decode_bound_ms == pytest.approx((weights + 4 * 202 * 256) / 1e9 * 1000)
    assert fast.decode_bound_ms == pytest.approx((weights + 4 * 34 * 256) / 1e9 * 1000)
    assert fast.decode_gemv_bound_ms == pytest.approx(fast.decode_bound_ms / 2)  # GEMV at 2 GB/s
    for row in rows:
        assert row.batch == 1
        assert row.decode_bound_share == pytest.approx(
            row.decode_bound_ms / row.decode_ms_per_token["median"]
        )
        flops = prefill_flops(shape, row.tokens_per_layer)
        assert row.prefill_tflops == pytest.approx(flops / row.prefill_s["median"] / 1e12)
        assert row.prefill_flops_share == pytest.approx(row.prefill_tflops)  # peak 1 TFLOP/s
        kept = [k + 4 for k in row.kv_tokens_per_layer]  # the cache reserves the decode tokens
        assert row.peak_bound_bytes == prefill_peak_bytes(shape, 200, 1, 4, kept, include_weights=False)
    assert fast.peak_bound_bytes < full.peak_bound_bytes


def test_benchmark_batches_report_the_batch():
    """``--batch-size``: a (B, L) batch runs through the batched path; KV bytes are the batch's, the same
    as the transformers baseline holds for full KV."""
    import torch

    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 120), generator=torch.Generator().manual_seed(0)).expand(3, -1)
    policy = kvpolicy.get_policy("snapkv", kv_budget=32)
    rows = benchmark(model, {120: ids}, {"snapkv": policy}, gen=3, repeats=1, warmup=0, machine=MACHINE)
    by_name = {r.variant: r for r in rows}
    assert by_name[HF_BASELINE].kv_bytes == by_name[FULL].kv_bytes
    assert by_name["snapkv"].kv_bytes * 120 == by_name[FULL].kv_bytes * 32
    assert by_name["snapkv"].kv_tokens_per_layer == [32] * 4
    # Decode bound of the batch: weights once (624640 bytes) + 3 sequences x 4 layers x (32 + 3/2)
    # entries x 256 bytes, at 1 GB/s; the speed-up bound uses the same batch bytes.
    snap = by_name["snapkv"]
    assert snap.batch == 3
    assert snap.decode_bound_ms == pytest.approx((624640 + 3 * 4 * 33.5 * 256) / 1e6)
    full_bytes = 624640 + 3 * 4 * (120 + 1.5) * 256
    assert by_name[FULL].decode_bound_ms == pytest.approx(full_bytes / 1e6)
    assert snap.bound["decode"] == pytest.approx(full_bytes / (624640 + 3 * 4 * 33.5 * 256))
    shape = ModelShape.from_config(model.config)
    assert snap.prefill_tflops == pytest.approx(
        3 * prefill_flops(shape, snap.tokens_per_layer) / snap.prefill_s["median"] / 1e12
    )


def test_transformers_compiled_baseline_matches_dynamic_cache(monkeypatch):
    """StaticCache + compiled decode (eager backend here: no inductor in CI) gives the DynamicCache
    baseline's greedy tokens and KV, and runs as a bench variant."""
    import torch

    import kvpolicy.generation

    monkeypatch.setattr(kvpolicy.generation, "COMPILE_BACKEND", "eager")
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 60), generator=torch.Generator().manual_seed(1))
    dynamic = run_transformers(model, ids, 5)
    static = run_transformers_compiled(model, ids, 5)
    assert static.tokens == dynamic.tokens and len(static.tokens) == 2 and len(static.tokens[0]) == 6
    assert static.kv_bytes == dynamic.kv_bytes == 2 * 60 * 2 * 2 * 16 * 4 * 4
    assert static.decode_s_per_token is not None and static.decode_s_per_token > 0
    rows = benchmark(  # the same shapes: the compiled forward is reused, not traced again
        model,
        {60: ids},
        {},
        gen=5,
        repeats=1,
        warmup=0,
        include_transformers_compiled=True,
        machine=MACHINE,
    )
    by_name = {r.variant: r for r in rows}
    assert set(by_name) == {FULL, HF_BASELINE, HF_COMPILED}
    compiled = by_name[HF_COMPILED]
    assert compiled.kv_tokens_per_layer == [60] * 4 and compiled.kv_bytes == by_name[FULL].kv_bytes
    assert compiled.decode_bound_ms == pytest.approx(by_name[FULL].decode_bound_ms)
    # The cache of this shape is reused (reset) across runs, and its bytes count in the peak:
    # 2 sequences x 2 KV heads x 65 positions x 16 x fp32, K and V, 4 layers.
    assert compiled.peak_bytes is not None and compiled.peak_bytes >= 2 * 2 * 65 * 16 * 4 * 2 * 4
    table = markdown_table(rows, 5)
    assert "| `transformers (StaticCache + compile)` | 60 |" in table
    assert "prefill TFLOP/s (of peak) | decode bound ms (reached) | peak MiB (bound) |" in table


def test_bench_cli_writes_machine_and_absolute_columns(tmp_path, monkeypatch):
    """The CLI on a random tiny shape (tokenizer and text stubbed out, machine limits fixed): the JSON
    keeps its keys and gains the measured machine and the absolute figures; the table its columns."""
    import torch

    import kvpolicy.bench.cli as bench_cli
    import kvpolicy.generation
    import kvpolicy.models
    from kvpolicy.cli import main

    monkeypatch.setattr(kvpolicy.generation, "COMPILE_BACKEND", "eager")
    monkeypatch.setattr(kvpolicy.models, "load_model", lambda *a, **k: (None, None))
    monkeypatch.setattr(bench_cli, "measure_machine", lambda device, dtype: MACHINE)
    monkeypatch.setattr(
        bench_cli,
        "_inputs",
        lambda tokenizer, model, lengths, batch_size=1: {
            n: torch.randint(0, 64, (batch_size, n), generator=torch.Generator().manual_seed(n))
            for n in lengths
        },
    )
    cfg = dict(TINY_SHAPE)
    shape_file = tmp_path / "shape.json"
    shape_file.write_text(json.dumps(cfg))
    out = tmp_path / "bench.json"
    argv = ["bench", "e2e", "--random-weights", str(shape_file), "--policy", "snapkv:kv_budget=16"]
    argv += ["--lengths", "64", "--gen", "2", "--repeats", "1", "--warmup", "0", "--transformers-compiled"]
    assert main([*argv, "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["machine"]["torch"] and data["machine"]["measured"]["read_bytes_per_s"] == 1e9
    names = {r["variant"] for r in data["results"]}
    assert names == {FULL, HF_BASELINE, HF_COMPILED, "snapkv:kv_budget=16"}
    for r in data["results"]:
        for key in ("prefill_s", "decode_ms_per_token", "kv_bytes", "speedup", "bound", "peak_bytes"):
            assert key in r
        assert r["batch"] == 1 and r["decode_bound_ms"] > 0 and r["decode_bound_share"] > 0
        assert r["prefill_tflops"] > 0 and r["prefill_flops_share"] > 0 and r["peak_bound_bytes"] > 0
    table = out.with_suffix(".md").read_text()
    assert table.startswith(
        "| variant | length | prefill s | prefill speed-up (bound) | decode ms/token | "
        "decode speed-up (bound) | e2e s | KV MiB | prefill TFLOP/s (of peak) | "
        "decode bound ms (reached) | peak MiB (bound) |"
    )
    assert "| `snapkv:kv_budget=16` | 64 |" in table


def test_random_weights_shape_file(tmp_path):
    cfg = dict(TINY_SHAPE)
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


# -- offline random-weight runs, throughput at batch -----------------------------------------------

TINY_CONFIG = Path(__file__).parent / "data" / "tiny-llama.json"


def _shape_file(tmp_path: Path, **changes: object) -> Path:
    path = tmp_path / "shape.json"
    path.write_text(json.dumps({**TINY_SHAPE, **changes}))
    return path


def test_random_weights_bench_runs_offline(tmp_path, monkeypatch):
    """``--random-weights`` needs no tokenizer, no embedded model and no text: with every loader made to
    fail as it does on a machine without network, the bench still runs and writes its JSON."""
    import transformers

    import kvpolicy.bench.cli as bench_cli
    import kvpolicy.models
    from kvpolicy.cli import main
    from kvpolicy.eval import needle

    def offline(*args: object, **kwargs: object) -> None:
        raise RuntimeError("could not fetch the packages of model 'SmolLM2-135M-Instruct'")

    monkeypatch.setattr(kvpolicy.models, "load_model", offline)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    monkeypatch.setattr(needle, "load_haystack", offline)
    monkeypatch.setattr(needle, "find_haystack_dir", offline)
    monkeypatch.setattr(bench_cli, "measure_machine", lambda device, dtype: MACHINE)
    out = tmp_path / "offline.json"
    argv = ["bench", "e2e", "--random-weights", str(TINY_CONFIG), "--policy", "snapkv:kv_budget=16"]
    argv += ["--lengths", "48", "--gen", "2", "--repeats", "1", "--warmup", "0", "--no-transformers-baseline"]
    assert main([*argv, "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["inputs"] == "random token ids" and data["model"] == str(TINY_CONFIG)
    assert {r["variant"] for r in data["results"]} == {FULL, "snapkv:kv_budget=16"}
    assert all(r["decode_ms_per_token"]["median"] > 0 for r in data["results"])


def test_random_inputs_are_seeded_token_ids(tmp_path):
    import torch

    from kvpolicy.bench.cli import random_inputs

    model = random_model(str(_shape_file(tmp_path)), torch.float32, None)
    a = random_inputs(model, [32, 48], batch_size=3, seed=1)
    b = random_inputs(model, [32, 48], batch_size=3, seed=1)
    c = random_inputs(model, [32], batch_size=1, seed=2)
    assert a.keys() == {32, 48} and a[48].shape == (3, 48) and a[48].dtype == torch.long
    assert all(torch.equal(a[n], b[n]) for n in a)  # seeded
    assert not torch.equal(a[32][:1], c[32])  # another seed, another prompt
    assert bool((a[48] == a[48][:1]).all())  # a batch repeats the prompt
    assert int(a[48].min()) >= 0 and int(a[48].max()) < TINY_SHAPE["vocab_size"]


def test_paged_kv_bytes_and_batch_fit_by_hand():
    from kvpolicy.bench.costmodel import fit_batch, paged_kv_bytes, slot_bytes

    # rows own max(1, ceil((kept + reserve) / block)) pages: 5 + 2 -> 2 pages of 4, 1 + 2 -> 1, 0 -> 1
    assert paged_kv_bytes([[5], [1]], reserve=2, block_size=4, bytes_per_slot=10) == 3 * 4 * 10
    assert paged_kv_bytes([[0, 4]], reserve=0, block_size=4, bytes_per_slot=10) == 2 * 4 * 10
    assert slot_bytes(SHAPE, 2) == 2 * 4 * 2 + 8  # K and V of head_dim 4 in fp16, an int64 position
    fit = fit_batch(SHAPE, 2, [[5], [1]], reserve=2, block_size=4, length=6, budget=20_000)
    assert fit.kv_per_sequence == 3 * 4 * 24 == 288
    # workspace: a decode step's (8 slots in the largest layer x 2 query heads per KV head x 24 bytes +
    # 10 logits x (2 + 4)); copies of one prefill are tiled, so joining them needs no more
    assert fit.workspace_per_sequence == 8 * 2 * 24 + 10 * 6 == 444
    # prefill activations of one 6-token prompt (prefill_peak_bytes without KV and weights) x 1.5
    assert fit.prefill == int(prefill_peak_bytes(SHAPE, 6, 1, 2, [0, 0], include_weights=False) * 1.5)
    assert fit.weights == 2704 and fit.fixed == 1000 + 2 * 4 * 24  # 5 % margin + a null page per layer
    assert fit.max_batch == (20_000 - 2704 - 1192) // (288 + 444) == 22
    assert fit.bytes_for(22) <= 20_000 < fit.bytes_for(23)
    # Every sequence prefilled, 4 at a time: the sub-batch's activations come while the batch holds KV.
    sub = fit_batch(SHAPE, 2, [[5], [1]], reserve=2, block_size=4, length=6, budget=12_000, prefill_batch=4)
    act = int(prefill_peak_bytes(SHAPE, 6, 4, 2, [0, 0], include_weights=False) * 1.5)
    free = 12_000 - 2704 - (600 + 192)
    assert sub.prefill == act and sub.max_batch == min(free // 732, (free - act) // 288) == 6
    # joining sub-batches through store holds two copies of the widest layer (1 head x 50 entries of
    # 2 x 32 x 2 + 8 bytes) for a moment: the workspace where that exceeds a decode step's (52 slots)
    wide_heads = ModelShape(
        hidden=64, intermediate=16, layers=2, q_heads=2, kv_heads=1, head_dim=32, vocab=10
    )
    wide = fit_batch(wide_heads, 2, [[50], [1]], 2, 4, length=60, budget=10**7, prefill_batch=1)
    assert wide.workspace_per_sequence == 2 * 50 * 136 > 52 * 2 * 24 + 10 * 6
    assert fit_batch(SHAPE, 2, [[5], [1]], 2, 4, 6, budget=3000).max_batch == 0  # not even one


@pytest.mark.parametrize("preset", ["snapkv", "ada-snapkv", "h2o:evict_during_decode=true", "tova"])
def test_join_decodes_like_one_batch(preset):
    """A batch joined from sub-batch prefills (or copies of one) decodes exactly as the sequences
    prefilled together, and allocates the pages the cost model counts."""
    import torch

    from kvpolicy.bench.costmodel import paged_kv_bytes
    from kvpolicy.bench.runner import timed_decode
    from kvpolicy.bench.throughput import from_prefill, join, snapshot
    from kvpolicy.generation import _prefill
    from kvpolicy.registry import get_adapter

    model = tiny_llama()
    adapter = get_adapter(model)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 128, (96,), generator=gen) for _ in range(3)]
    _, policy = parse_policy_spec(preset, {"kv_budget": 20})
    whole = _prefill(adapter, prompts, policy, reserve=5)
    want = timed_decode(whole, policy, adapter.decode_step, 5)[2]
    a = _prefill(adapter, prompts[:2], policy, reserve=5)
    b = _prefill(adapter, prompts[2:], policy, reserve=5)
    joined = join([from_prefill(a, consume=True), snapshot(b)], reserve=5)
    assert [s.index for s in joined.states] == [0, 1, 2] and all(
        s.batch is joined.batch for s in joined.states
    )
    assert joined.cache.allocated_bytes() == whole.cache.allocated_bytes()
    assert timed_decode(joined, policy, adapter.decode_step, 5)[2] == want
    # copies of one prefill: every sequence decodes as the prompt alone; pages as the cost model counts
    one = _prefill(adapter, prompts[:1], policy, reserve=5)
    heads = one.cache.kv_head_lengths(0)
    source = snapshot(one)
    alone = timed_decode(one, policy, adapter.decode_step, 5)[2]
    copies = join([source], copies=3, reserve=5)
    assert timed_decode(copies, policy, adapter.decode_step, 5)[2] == alone * 3
    kv_slot = 2 * 16 * 4  # K and V, head_dim 16, fp32 (the allocation counts no positions)
    per_seq = paged_kv_bytes(heads, 5, copies.cache.layers[0].block_size, kv_slot)
    null_pages = 4 * copies.cache.layers[0].block_size * kv_slot
    assert copies.cache.allocated_bytes() == 3 * per_seq + null_pages
    assert timed_decode(join([source], copies=2, reserve=5), policy, adapter.decode_step, 5)[2] == alone * 2


@pytest.mark.parametrize("preset", ["snapkv", "ada-snapkv"])
@pytest.mark.parametrize("kv_bits", [16, "int4", "fp8"])
def test_tile_equals_store(preset, kv_bits):
    """Copies of a prefilled layer made by ``tile`` (whole-tensor operations) are field for field the
    layer ``PagedLayer.store`` builds from the repeated sequences (ragged heads too; a quantized layer's
    codes and scales as stored: storing its dequantized entries again gives the same ones)."""
    import torch

    from kvpolicy.bench.throughput import QUANT_FIELDS, TILE_FIELDS, _layer_parts, _moved, tile
    from kvpolicy.cache import layer_storage, paged_layer
    from kvpolicy.generation import _prefill
    from kvpolicy.registry import get_adapter

    adapter = get_adapter(tiny_llama())
    prompt = torch.randint(0, 128, (150,), generator=torch.Generator().manual_seed(4))
    policy = kvpolicy.get_policy(preset, kv_budget=40, kv_bits=kv_bits)
    pre = _prefill(adapter, [prompt], policy, reserve=30)
    for layer in pre.cache.layers:
        pools = {"k_pool", "_v_pool", "pos_pool"} if kv_bits == 16 else {*layer._pools(), *QUANT_FIELDS}
        assert set(vars(layer)) - pools == TILE_FIELDS - {"k_pool", "_v_pool", "pos_pool"}
        tiled = tile(_moved(layer, "cpu"), 3, "cpu")
        stored = paged_layer(layer.block_size, layer_storage(layer))
        stored.store(_layer_parts(layer) * 3, reserve=30)
        stored.next_position = layer.next_position
        assert tiled is not None and set(vars(tiled)) == set(vars(stored))
        for name, want in vars(stored).items():
            got = getattr(tiled, name)
            if isinstance(want, torch.Tensor):
                assert torch.equal(got, want), name
            else:
                assert got == want, name
    if preset == "ada-snapkv":
        assert any(layer.uniform is None for layer in pre.cache.layers)  # ragged rows were tiled
    layer = pre.cache.layers[0]
    layer.extra = torch.zeros(1)  # a field tile does not know: join falls back to store
    assert tile(layer, 2, "cpu") is None


def test_bench_throughput_cli(tmp_path, monkeypatch):
    """``--throughput``: every variant at every batch size and at the largest that fits (the cost
    model's), tokens/s with the bound beside, ratios to full KV; JSON, Markdown and the summary step."""
    import runpy

    import kvpolicy.bench.cli as bench_cli
    from kvpolicy.cli import main

    monkeypatch.setattr(bench_cli, "measure_machine", lambda device, dtype: MACHINE)
    shape = _shape_file(tmp_path)
    out = tmp_path / "tp.json"
    argv = ["bench", "e2e", "--random-weights", str(shape), "--policy", "snapkv:kv_budget=16", "--lengths"]
    argv += ["200", "--gen", "3", "--repeats", "1", "--warmup", "0", "--throughput", "--batch-sizes"]
    argv += ["1,4,max", "--memory-gib", "0.002", "--out", str(out)]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert data["throughput"] is True and data["batch_sizes"] == [1, 4, "max"]
    cells = {(c["variant"], c["requested"]): c for c in data["results"]}
    assert set(cells) == {(v, b) for v in (FULL, "snapkv:kv_budget=16") for b in (1, 4, "max")}
    full, snap = cells[(FULL, "max")], cells[("snapkv:kv_budget=16", "max")]
    # 200 + 3 tokens take 4 pages of 64 per row with full KV, 1 page with 16 kept: more sequences fit
    assert full["batch"] == full["fits"] == full["fit"]["max_batch"] >= 4
    assert snap["batch"] == snap["fits"] > 2 * full["fits"]
    block_bytes = 64 * (2 * 8 * 4 + 8)  # a page: K, V (head_dim 8, fp32) and int64 positions
    assert full["kv_bytes_per_sequence"] == 2 * 2 * 4 * block_bytes
    assert snap["kv_bytes_per_sequence"] == 2 * 2 * 1 * block_bytes
    for c in data["results"]:
        assert c["status"] == "ok" and c["decode_steps"] == 3 and c["tokens_per_s"]["median"] > 0
        assert c["bound_tokens_per_s"] > 0 and c["bound_share"] > 0
        assert c["planned_bytes"] <= 0.002 * 2**30
        # the joined cache's K and V pages: each sequence's (no positions) plus a null page per layer
        assert c["kv_bytes_allocated"] == c["batch"] * c["kv_bytes_per_sequence"] * 64 // 72 + 2 * 64 * 64
    assert full["vs_full_max"] == 1.0 and snap["vs_full_max"] > 0 and snap["vs_full_max_bound"] > 1.0
    assert cells[("snapkv:kv_budget=16", 4)]["speedup"] > 0
    table = out.with_suffix(".md").read_text()
    assert table.startswith("| variant | length | fit (ran) | tok/s @1 | tok/s @4 | tok/s @max |")
    # the GPU script's summary step reads the JSON (with a latency JSON beside it)
    lat = tmp_path / "b1.json"
    argv = ["bench", "e2e", "--random-weights", str(shape), "--lengths", "32", "--gen", "2"]
    argv += ["--repeats", "1", "--warmup", "0", "--policy", "snapkv:kv_budget=16", "--out", str(lat)]
    assert main(argv) == 0
    summarize = runpy.run_path(str(Path(__file__).parents[1] / "bench" / "summarize.py"))["summarize"]
    text = summarize(tmp_path)
    assert "| b1 | eager | `snapkv:kv_budget=16` | 32 | 1 |" in text
    assert f"| tp | `snapkv:kv_budget=16` | 200 | {snap['fits']} |" in text


def test_throughput_prefilling_every_sequence_in_sub_batches(tmp_path):
    """``--prefill-batch``: every sequence prefilled, 3 at a time, the sub-batches joined and decoded
    as one batch of 4; the cost model sizes it with the sub-batch's activations beside the batch's KV."""
    import torch

    from kvpolicy.bench import throughput as tp
    from kvpolicy.bench.cli import random_inputs

    model = random_model(str(_shape_file(tmp_path)), torch.float32, None)
    cells = tp.throughput(
        model,
        random_inputs(model, [200]),
        {"snapkv": kvpolicy.get_policy("snapkv", kv_budget=16)},
        [4],
        gen=3,
        repeats=1,
        warmup=0,
        memory_gib=0.002,
        prefill_batch=3,
        machine=MACHINE,
    )
    for cell in cells:
        assert cell.status == "ok" and cell.batch == 4 and cell.prefill == "prefilled 3 at a time"
        assert cell.fit["prefill_alongside"] is True and cell.tokens_per_s["median"] > 0
        assert cell.kv_bytes_allocated == 4 * cell.kv_bytes_per_sequence * 64 // 72 + 2 * 64 * 64


def test_throughput_halves_a_max_batch_that_runs_out_of_memory(tmp_path):
    """A largest batch that runs out of memory anyway is halved and retried (and the cell says so); a
    fixed batch size that does is reported as out of memory; one larger than fits is not run."""
    import torch

    from kvpolicy.bench import throughput as tp
    from kvpolicy.bench.cli import random_inputs

    model = random_model(str(_shape_file(tmp_path)), torch.float32, None)
    ran: list[int] = []
    # an allocation failure inside a graph capture surfaces as the capture's own error
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError as oom:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture") from oom
    except RuntimeError as wrapped:
        assert tp._is_oom(wrapped) and not tp._is_oom(RuntimeError("shape mismatch"))

    def run(adapter, prompt, policy, source, batch, gen, step_fn, warm, prefill_batch):
        ran.append(batch)
        if batch > 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return tp.Run(batch, 0.01, gen, 0.0, 1, None)

    said: list[str] = []
    cells = tp.throughput(
        model,
        random_inputs(model, [200]),
        {},
        [8, 10_000, "max"],
        gen=3,
        repeats=1,
        warmup=0,
        memory_gib=0.002,
        machine=MACHINE,
        say=said.append,
        run=run,
    )
    by = {c.requested: c for c in cells}
    fits = by["max"].fits
    assert fits > 8
    assert by[8].status == "out of memory" and by[8].batch is None and by[8].oom == [8]
    assert by[10_000].status == "does not fit" and by[10_000].tokens_per_s is None
    halvings = []
    b = fits
    while b > 5:
        halvings.append(b)
        b //= 2
    assert by["max"].oom == halvings and by["max"].batch == b and by["max"].status == "ok"
    assert by["max"].tokens_per_s["median"] == pytest.approx(b / 0.01)
    assert ran == [8, *halvings, b]
    assert any(f"batch {fits} ran out of memory; retrying at {fits // 2}" in line for line in said)
    _, rows = tp.summary_rows(cells, [8, 10_000, "max"])
    assert rows[0][2] == f"{fits} ({b}, OOM at {', '.join(map(str, halvings))})"
    assert rows[0][3:5] == ["OOM", "-"]  # batch 8 ran out of memory; 10000 does not fit
    assert rows[0][5].startswith(f"{b / 0.01:.4g} (") and rows[0][5].endswith(f"%) b={b}")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--throughput", "--batch-sizes", "0"], "--batch-sizes 0: 0 is not a batch size"),
        (["--throughput", "--batch-sizes", "1,x"], "--batch-sizes 1,x: 'x' is neither a batch size"),
        (["--throughput", "--batch-sizes", "8,max,8"], "--batch-sizes 8,max,8: 8 is given twice"),
        (["--batch-sizes", "8"], "--batch-sizes needs --throughput"),
        (["--throughput", "--memory-gib", "0"], "--memory-gib must be > 0, got 0.0"),
        (["--throughput", "--prefill-batch", "0"], "--prefill-batch must be >= 1, got 0"),
        (["--throughput", "--batch-size", "4"], "not --batch-size"),
        (["--also-eager"], "give --compile or --graphs"),
        (["--compile", "--compile-backend", "nope"], "--compile-backend 'nope' is not one of"),
        (["--graphs", "--gen", "1"], "--gen must be > 2, the untimed warm steps"),
        (["--throughput", "--graphs", "--gen", "2"], "--gen must be > 2, the untimed warm steps"),
    ],
)
def test_bench_throughput_bad_input(argv, message, capsys):
    from kvpolicy.cli import main

    assert main(["bench", "e2e", "--lengths", "64", "--random-weights", "llama-3.1-8b", *argv]) == 2
    assert message in capsys.readouterr().err
    assert main(["bench", "prefill", "--throughput", "--lengths", "64"]) == 2
    assert "use `kvpolicy bench e2e --throughput`" in capsys.readouterr().err


def test_also_eager_times_both_paths_from_one_prefill(monkeypatch):
    """``--also-eager``: each kvpolicy variant's eager step timed from the same prefill beside the fast
    one (same tokens: here the graph path, recorded after its untimed warm steps), compared with full
    KV's eager row."""
    import torch

    import kvpolicy.bench.runner as runner
    from kvpolicy.bench.runner import EAGER, run_policy

    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 80), generator=torch.Generator().manual_seed(2))
    policy = kvpolicy.get_policy("h2o", kv_budget=24, evict_during_decode=True)
    sample = run_policy(model, ids, policy, 4, graphs=True, also_eager=True)
    assert sample.eager is not None and sample.eager.tokens == sample.tokens and len(sample.tokens[0]) == 5
    assert sample.eager.prefill_s == sample.prefill_s and sample.eager.decode_s_per_token > 0
    assert sample.warm_s is not None and sample.warm_s > 0 and sample.eager.warm_s is None
    # whether graphs replayed is reported: 4 decode steps = 1 eager + 1 recorded + 2 replayed
    assert sample.graphs == "traced stand-in (no CUDA): 2 of 4 steps replayed (1 recorded, 1 eager)"
    # the rows, with the eager step standing in for the fast one (what is checked is the plumbing)
    monkeypatch.setattr(
        runner, "decode_step", lambda adapter, compile=False, graphs=False: adapter.decode_step
    )
    seen: list[tuple[str, int]] = []
    rows = benchmark(
        model,
        {80: ids},
        {"snapkv": kvpolicy.get_policy("snapkv", kv_budget=24)},
        gen=4,
        repeats=1,
        warmup=1,
        graphs=True,
        also_eager=True,
        machine=MACHINE,
        include_transformers=False,
        on_sample=lambda length, variant, rep, s: seen.append((variant, rep)),
    )
    names = [r.variant for r in rows]
    assert names == [FULL, FULL + EAGER, "snapkv", "snapkv" + EAGER]
    assert seen == [(n, rep) for rep in (-1, 0) for n in names]
    by = {r.variant: r for r in rows}
    eager_full, eager_snap = by[FULL + EAGER], by["snapkv" + EAGER]
    want = eager_full.decode_ms_per_token["median"] / eager_snap.decode_ms_per_token["median"]
    assert eager_snap.speedup["decode"] == pytest.approx(want) and eager_full.speedup["decode"] == 1.0
    assert by["snapkv"].warm_s > 0 and eager_snap.warm_s is None
    assert "| `snapkv (eager)` | 80 |" in markdown_table(rows, 4)


def test_gpu_script_parses():
    import subprocess

    script = Path(__file__).parents[1] / "bench" / "gpu-h200.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert "FAST=${FAST:---graphs}" in text and "FAST=--compile is the fallback" in text


def test_quantized_storage_fits_a_larger_decode_batch():
    """The throughput bench sizes its largest batch from the pages a sequence keeps: at 4 bits they hold
    codes and scales (0.625 bytes an element against bf16's 2), so more sequences fit the same memory."""
    from kvpolicy.bench.costmodel import (
        ModelShape,
        decode_bytes_per_token,
        fit_batch,
        kv_element_bytes,
        kv_residual_bytes,
        slot_bytes,
    )
    from kvpolicy.storage import KVStorage

    shape = ModelShape(
        hidden=4096, intermediate=14336, layers=32, q_heads=32, kv_heads=8, head_dim=128, vocab=128256
    )
    heads = [[4096] * 8] * 32
    int4 = kv_element_bytes(KVStorage.parse("int4"), shape, 2)
    assert int4 == 0.625 and kv_element_bytes({"bits": 16}, shape, 2) == 2.0
    assert slot_bytes(shape, 2, positions=False, kv_bytes_per_elem=int4) == 2 * 128 * 0.625
    plain = fit_batch(shape, 2, heads, 64, 64, 4096, 80 * 2**30)
    quant = fit_batch(shape, 2, heads, 64, 64, 4096, 80 * 2**30, kv_bytes_per_elem=int4)
    assert quant.kv_per_sequence < plain.kv_per_sequence / 2
    assert quant.max_batch > 1.5 * plain.max_batch
    # KIVI's layout: the record index per entry, and per sequence its full-precision residual
    kivi = KVStorage(bits=4, layout="kivi")
    assert kv_element_bytes(kivi, shape, 2) == 0.625 + 4 / 256
    assert (
        kv_residual_bytes(kivi, shape, 2) == 32 * 8 * 32 * 256 * 2
        and kv_residual_bytes(KVStorage.parse("int4"), shape, 2) == 0
    )
    args = (kv_element_bytes(kivi, shape, 2), kv_residual_bytes(kivi, shape, 2))
    fit = fit_batch(shape, 2, heads, 64, 64, 4096, 80 * 2**30, None, *args)
    assert fit.kv_per_sequence - quant.kv_per_sequence >= args[1]
    assert decode_bytes_per_token(shape, [4096] * 32, 2, 0, 1, *args) - decode_bytes_per_token(
        shape, [4096] * 32, 2, 0, 1, int4
    ) == pytest.approx(args[1] + 32 * 4096 * 2 * 8 * 128 * 4 / 256)
