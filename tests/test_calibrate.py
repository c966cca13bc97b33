"""Calibration: the stability metric on a model built so the answer is known, the recommendation
logic on synthetic accuracy tables, and (slow) a small end-to-end run on the embedded model."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import tiny_llama

from kvpolicy.bench.costmodel import ModelShape
from kvpolicy.calibrate import earliest_layer, layer_scores, recommend, stability

SPECIAL, DECOY = 5, 6


def fixed_attention_model(layers: int = 6, switch: int = 3):
    """Layers < ``switch`` attend to the DECOY token, later ones to the SPECIAL token, by construction.

    Embeddings are zero except a marker feature for each of the two tokens; every layer's output
    projections are zero (the residual stream stays the embedding); keys read the marker feature on
    a RoPE dimension whose rotation is negligible (huge rope_theta), queries are a constant bias.
    """
    model = tiny_llama(
        layers=layers, attention_bias=True, rope_parameters={"rope_type": "default", "rope_theta": 1e30}
    )
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        emb = model.model.embed_tokens.weight
        emb[SPECIAL, 0] = 10.0
        emb[DECOY, 1] = 10.0
        for i, layer in enumerate(model.model.layers):
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
            attn = layer.self_attn
            d = attn.head_dim
            attn.k_proj.weight[d - 1, 0 if i >= switch else 1] = 1.0  # last dim: negligible rotation
            attn.k_proj.weight[2 * d - 1, 0 if i >= switch else 1] = 1.0
            for h in range(model.config.num_attention_heads):
                attn.q_proj.bias[h * d + d - 1] = 5.0
        model.model.norm.weight.fill_(1.0)
    return model


def test_stability_known_by_construction():
    model = fixed_attention_model()
    ids = torch.full((78,), 7)
    ids[20], ids[50] = SPECIAL, DECOY
    scores = layer_scores(model, ids)
    assert scores.shape == (6, 70)
    top = scores.max(-1).values  # max-pooling spreads each peak over its 7 neighbours
    assert bool((scores[:3, 50] == top[:3]).all()) and bool((scores[3:, 20] == top[3:]).all())
    assert bool((scores[:3, 20] < top[:3]).all()) and bool((scores[3:, 50] < top[3:]).all())
    result = stability(scores, top_frac=0.1, answer=[20])  # k = 7: the pooled neighbourhood
    assert result["recall"] == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert result["answer_recall"] == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]


def test_stability_synthetic_scores():
    g = torch.Generator().manual_seed(0)
    stable = torch.rand(100, generator=g)
    scores = torch.stack([torch.rand(100, generator=g) for _ in range(4)] + [stable] * 4)
    result = stability(scores, top_frac=0.1)
    assert result["recall"][4:] == [1.0] * 4
    assert max(result["recall"][:4]) < 0.6
    assert result["answer_recall"] == []


def test_earliest_layer_binary_search():
    seen = []

    def accepts(layer):
        seen.append(layer)
        return layer >= 13

    assert earliest_layer(accepts, 1, 28) == 13
    assert len(seen) <= 7
    assert earliest_layer(lambda layer: False, 1, 28) is None


def test_recommend_on_synthetic_table():
    shape = ModelShape(hidden=64, intermediate=256, layers=30, q_heads=4, kv_heads=2, head_dim=16, vocab=100)
    threshold = {0.1: 24, 0.2: 21, 0.3: 20, 0.5: 15}

    def evaluate(layer, rate, budget):
        if layer is None:
            return 100.0
        good = layer >= threshold[rate] and budget >= 0.3
        return 100.0 if good else 60.0

    rec = recommend(evaluate, shape, 2000, rates=(0.1, 0.2, 0.3, 0.5), budgets=(0.1, 0.2, 0.3, 0.5))
    assert rec.full_accuracy == 100.0
    choice = rec.choice
    assert choice is not None and choice.accuracy == 100.0
    assert choice.tsp_layer == threshold[choice.tsp_rate]  # earliest layer for its rate
    assert choice.kv_budget == 0.3  # smallest budget that holds
    assert choice.prefill_speedup > 1.0 and 0 < choice.kv_fraction < 1
    # The choice is the fastest of the per-rate earliest layers.
    assert all(
        p.prefill_speedup <= choice.prefill_speedup + 1e-9
        for p in rec.points
        if p.accuracy == 100.0 and p.kv_budget == 1.0
    )


@pytest.mark.parametrize("layers", [4, 8, 30, 33])
def test_search_steps_bounds_every_search(layers):
    """The progress display's total: no search evaluates more settings than the bound."""
    from kvpolicy.calibrate import search_steps

    shape = ModelShape(
        hidden=64, intermediate=256, layers=layers, q_heads=4, kv_heads=2, head_dim=16, vocab=100
    )
    rates, budgets = (0.1, 0.2, 0.3, 0.5), (0.05, 0.1, 0.2, 0.3, 0.5)
    for cut in range(0, layers + 1):
        for budget_cut in (0.0, 0.2, 0.6):
            calls = []

            def evaluate(layer, rate, budget, cut=cut, budget_cut=budget_cut, calls=calls):
                calls.append((layer, rate, budget))
                return 100.0 if layer is None or (layer >= cut and budget >= budget_cut) else 0.0

            recommend(evaluate, shape, 1000, rates, budgets)
            assert len(calls) <= search_steps(shape, rates, budgets), (cut, budget_cut)


def test_calibration_reports_progress_on_stderr(tmp_path, capsys):
    """Not a terminal: plain lines for both phases, each ending at its total."""
    from kvpolicy.calibrate import run_calibration

    class Tok:
        """Just enough tokenizer for prompt-folder calibration."""

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1 + (ord(c) % 100) for c in text]}

        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(32 + (i % 90)) for i in ids)

    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for i in range(2):
        (prompts / f"p{i}.txt").write_text("The quick brown fox jumps over the lazy dog. " * 3 + str(i))
    run_calibration(
        tiny_llama(layers=4),
        Tok(),
        tmp_path / "out",
        samples=2,
        rates=(0.5,),
        budgets=(0.5,),
        prompts=prompts,
    )
    err = capsys.readouterr().err
    assert "calibrate: importance per layer: 2/2 (100 %)" in err
    assert re.search(r"calibrate: search.*: (\d+)/\1 \(100 %\)", err), err


def test_recommend_reports_none_when_nothing_holds():
    shape = ModelShape(hidden=64, intermediate=256, layers=8, q_heads=4, kv_heads=2, head_dim=16, vocab=100)
    rec = recommend(lambda layer, rate, budget: 100.0 if layer is None else 0.0, shape, 500, rates=(0.2,))
    assert rec.choice is None and rec.points


@pytest.mark.slow
def test_calibrate_end_to_end_on_embedded_model(tmp_path, real_model):
    from kvpolicy.cli import main

    out = tmp_path / "cal"
    args = [
        "calibrate",
        "--length",
        "600",
        "--samples",
        "1",
        "--rates",
        "0.5",
        "--budgets",
        "0.5",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    summary = json.loads((out / "calibration.json").read_text())
    assert len(summary["stability"]["recall"]) == 30
    assert summary["stability"]["answer_recall"], "needle tokens located in the prompt"
    if summary["recommended"]:
        config = json.loads((out / "policy.json").read_text())
        import kvpolicy

        assert kvpolicy.policy_from_dict(config).name == "fastkv"


def test_ruler_calibration_finds_answer_tokens_and_recommends(tmp_path, embedded_tokenizer):
    """--task ruler end to end on a tiny model: every niah prompt's value is located in the prompt,
    the recommendation machinery runs and writes a loadable config."""
    from conftest import tiny_llama_for

    from kvpolicy.calibrate import ruler_samples, run_calibration

    samples = ruler_samples(embedded_tokenizer, 400, 2, ["niah_single_1", "niah_multikey_1"])
    assert len(samples) == 4
    for s in samples:
        answer_text = embedded_tokenizer.decode([s.input_ids[i] for i in s.answer])
        assert any(ch.isdigit() for ch in answer_text), answer_text
        assert s.score is not None and s.score("nothing") == 0.0
    model = tiny_llama_for(embedded_tokenizer)
    summary = run_calibration(
        model,
        embedded_tokenizer,
        tmp_path,
        length=400,
        samples=1,
        rates=(0.5,),
        budgets=(0.5,),
        task="ruler",
        tasks=["niah_single_1"],
    )
    assert summary["task"] == "ruler" and summary["tasks"] == ["niah_single_1"]
    assert len(summary["stability"]["recall"]) == 4 and summary["stability"]["answer_recall"]
    assert summary["full_accuracy"] == 0.0  # a random model finds no needle: every setting is "within"
    assert summary["recommended"]["tsp_layer"] == 1
    import kvpolicy

    assert kvpolicy.policy_from_dict(json.loads((tmp_path / "policy.json").read_text())).name == "fastkv"


def test_prompt_folder_calibration_scores_agreement_with_full_kv(tmp_path, embedded_tokenizer, haystack):
    """--prompts DIR: unlabelled prompts are scored against full KV's own answer, so full KV scores
    100 and a setting that changes the answer scores less."""
    from conftest import tiny_llama_for

    from kvpolicy.calibrate import evaluator, prompt_samples

    folder = tmp_path / "prompts"
    folder.mkdir()
    for i in range(3):
        (folder / f"p{i}.txt").write_text(haystack[i * 3000 : i * 3000 + 1500] + "\nSummarise the text.")
    (folder / "notes.md").write_text("not a prompt")
    samples = prompt_samples(embedded_tokenizer, folder, samples=2, max_new_tokens=8)
    assert len(samples) == 2 and all(s.score is None and not s.answer for s in samples)
    evaluate = evaluator(tiny_llama_for(embedded_tokenizer), embedded_tokenizer, samples)
    assert evaluate(None, 1.0, 1.0) == 100.0
    assert 0.0 <= evaluate(1, 0.05, 0.05) <= 100.0


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing", "is not a folder"),
        (lambda d: d, "holds no .txt file"),
    ],
)
def test_prompt_folder_errors_name_the_folder(tmp_path, embedded_tokenizer, make, message):
    from kvpolicy.calibrate import prompt_samples

    with pytest.raises(ValueError, match=message):
        prompt_samples(embedded_tokenizer, make(tmp_path))


def test_calibrate_cli_rejects_unknown_task(capsys):
    from kvpolicy.cli import main

    with pytest.raises(SystemExit):
        main(["calibrate", "--task", "longbench", "--out", "x"])
    assert "invalid choice: 'longbench'" in capsys.readouterr().err


def test_kv_bytes_picks_budget_and_width_together():
    """``--kv-bytes``: each width gets the budget the bytes buy (never more), the most accurate wins, a
    tie goes to the wider storage, and a byte budget no width can use is named."""
    from kvpolicy.bench.costmodel import ModelShape
    from kvpolicy.calibrate import choose_storage, kv_bytes_per_token

    shape = ModelShape(
        hidden=576, intermediate=1536, layers=30, q_heads=9, kv_heads=3, head_dim=64, vocab=49152
    )
    full = kv_bytes_per_token(shape, None, 2)
    assert full == 30 * 3 * 2 * 64 * 2
    assert kv_bytes_per_token(shape, "int4", 2) == 30 * 3 * 2 * 64 * (0.5 + 4 / 32)
    seen = []

    def evaluate(layer, rate, budget, width):
        seen.append((layer, rate, budget, width))
        return {"16": 40.0, "int8": 80.0, "int4": 80.0, "int2": 20.0}[width]

    found = choose_storage(evaluate, shape, 2, full / 8)
    assert [p["kv_bits"] for p in found["candidates"]] == ["16", "int8", "int4", "int2"]
    for p in found["candidates"]:
        assert p["bytes_per_token"] <= full / 8 and 0 < p["kv_budget"] <= 1.0
    assert found["candidates"][0]["kv_budget"] == 0.125
    assert found["recommended"]["kv_bits"] == "int8"  # ties int4 on accuracy: the wider storage
    assert all(layer is None and rate == 1.0 for layer, rate, _, _ in seen)
    assert choose_storage(evaluate, shape, 2, full * 4)["candidates"][0]["kv_budget"] == 1.0
    with pytest.raises(ValueError, match="cannot keep 1 % of the prompt at any width"):
        choose_storage(evaluate, shape, 2, 1.0)


def test_the_search_runs_under_a_storage_width(embedded_tokenizer, haystack, tmp_path):
    """``calibrate --kv-bits 4``: every setting of the search stores its entries at int4 (unlabelled
    prompts are still scored against full KV in the model's dtype)."""
    from conftest import tiny_llama_for

    from kvpolicy.calibrate import evaluator, prompt_samples

    folder = tmp_path / "prompts"
    folder.mkdir()
    (folder / "p.txt").write_text(haystack[:1500] + "\nSummarise the text.")
    samples = prompt_samples(embedded_tokenizer, folder, samples=1, max_new_tokens=6)
    model = tiny_llama_for(embedded_tokenizer)
    plain = evaluator(model, embedded_tokenizer, samples)
    assert plain(None, 1.0, 1.0) == 100.0
    quantized = evaluator(model, embedded_tokenizer, samples, storage=4)
    assert 0.0 <= quantized(None, 1.0, 1.0) <= 100.0
    assert 0.0 <= quantized(None, 1.0, 0.5, "int2") <= 100.0
