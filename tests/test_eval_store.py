"""Results storage: run keys, torn lines, locking, resume without loss or duplicates, skip and --force."""

from __future__ import annotations

import json

import pytest
import torch

from kvpolicy.eval import run_eval
from kvpolicy.eval.store import RunStore, StoreError, read_records, run_key


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from kvpolicy.models import embedded_model_dir

    return AutoTokenizer.from_pretrained(embedded_model_dir())


def _tiny(tokenizer, seed=0, layers=4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return _tiny(tokenizer)


NEEDLE = {"lengths": [256], "depths": 4, "max_new_tokens": 4, "quiet": True}


def test_run_key_depends_on_every_part():
    base = {
        "benchmark": "needle",
        "settings": {"lengths": [512], "depths": 5},
        "policy": {"b": 1},
        "model": "m",
    }
    assert run_key(base) == run_key(dict(reversed(list(base.items()))))  # key order is irrelevant
    variants = [
        {**base, "benchmark": "ruler"},
        {**base, "settings": {"lengths": [1024], "depths": 5}},
        {**base, "policy": {"b": 2}},
        {**base, "model": "other"},
    ]
    keys = {run_key(v) for v in variants} | {run_key(base)}
    assert len(keys) == 5


def test_different_configs_never_share_a_folder(tiny, tokenizer, tmp_path):
    runs = [
        run_eval(
            "needle",
            tiny,
            tokenizer,
            policy="snapkv",
            policy_options={"kv_budget": 64},
            out=tmp_path,
            **NEEDLE,
        ),
        run_eval(
            "needle",
            tiny,
            tokenizer,
            policy="snapkv",
            policy_options={"kv_budget": 96},
            out=tmp_path,
            **NEEDLE,
        ),
        run_eval("needle", tiny, tokenizer, policy="fullkv", out=tmp_path, **{**NEEDLE, "depths": 3}),
        run_eval(
            "needle",
            _tiny(tokenizer, seed=1),
            tokenizer,
            policy="fullkv",
            out=tmp_path,
            **{**NEEDLE, "depths": 3},
        ),
    ]
    assert len({r.key for r in runs}) == len({r.run_dir for r in runs}) == 4
    for r in runs:  # each folder still holds its own, complete results
        records, _ = read_records(r.run_dir / "records.jsonl")
        assert len(records) == r.summary["n"]
    # the same configuration under another label finds the existing run
    again = run_eval(
        "needle",
        tiny,
        tokenizer,
        policy="snapkv",
        policy_options={"kv_budget": 64},
        out=tmp_path,
        label="x",
        **NEEDLE,
    )
    assert again.status == "skipped" and again.run_dir == runs[0].run_dir


def test_torn_last_line_is_dropped_and_cut(tmp_path):
    path = tmp_path / "records.jsonl"
    good = [json.dumps({"id": f"s{i}", "score": i}) for i in range(3)]
    path.write_text("\n".join(good) + "\n" + good[0][:-7])
    records, torn = read_records(path)
    assert torn and [r["id"] for r in records] == ["s0", "s1", "s2"]
    assert path.read_text().endswith(good[0][:-7])  # reading alone changes nothing
    records, torn = read_records(path, repair=True)
    assert torn and path.read_text() == "\n".join(good) + "\n"

    path.write_text("\n".join(good))  # complete last record, only its newline lost
    records, torn = read_records(path, repair=True)
    assert not torn and len(records) == 3 and path.read_text().endswith("}\n")

    path.write_text(good[0] + "\n" + good[0] + "\n" + good[1] + "\n")  # duplicates: first wins
    assert [r["id"] for r in read_records(path)[0]] == ["s0", "s1"]

    path.write_text(good[0] + "\n{broken\n" + good[1] + "\n")
    with pytest.raises(StoreError, match="line 2"):
        read_records(path)


def test_one_writer_at_a_time(tmp_path):
    with RunStore(tmp_path / "run") as store:
        store.append({"id": "a"})
        with pytest.raises(StoreError, match="another process"), RunStore(tmp_path / "run"):
            pass
    with RunStore(tmp_path / "run") as store:  # released on exit
        assert [r["id"] for r in store.load()[0]] == ["a"]


def test_resume_after_interrupt_loses_and_repeats_nothing(tiny, tokenizer, tmp_path):
    first = run_eval("needle", tiny, tokenizer, policy="fullkv", out=tmp_path, **NEEDLE)
    assert first.status == "complete" and first.ran == 4
    path = first.run_dir / "records.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    # Simulate a process killed while writing its third record: two whole lines and half a third.
    path.write_text(lines[0] + lines[1] + lines[2][: len(lines[2]) // 2])
    meta = json.loads((first.run_dir / "run.json").read_text())
    meta["status"] = "running"
    (first.run_dir / "run.json").write_text(json.dumps(meta))

    resumed = run_eval("needle", tiny, tokenizer, policy="fullkv", out=tmp_path, **NEEDLE)
    assert resumed.status == "complete" and resumed.resumed == 2 and resumed.ran == 2
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["id"] for r in records] == [r["id"] for r in first.records]  # nothing lost or repeated
    assert [r["prediction"] for r in records] == [r["prediction"] for r in first.records]  # greedy: same
    meta = json.loads((first.run_dir / "run.json").read_text())
    assert meta["history"][-1] == {**meta["history"][-1], "resumed_from": 2, "torn_line_dropped": True}


def test_finished_runs_are_skipped_unless_forced(tiny, tokenizer, tmp_path):
    first = run_eval("needle", tiny, tokenizer, policy="fullkv", out=tmp_path, **NEEDLE)
    skipped = run_eval("needle", tiny, tokenizer, policy="fullkv", out=tmp_path, **NEEDLE)
    assert skipped.status == "skipped" and skipped.ran == 0 and skipped.records == first.records
    forced = run_eval("needle", tiny, tokenizer, policy="fullkv", out=tmp_path, force=True, **NEEDLE)
    assert forced.status == "complete" and forced.ran == 4 and forced.resumed == 0
    assert len((first.run_dir / "records.jsonl").read_text().splitlines()) == 4


def test_prefill_work_counts_a_discarded_filter_pass(tiny, tokenizer, tmp_path):
    """GemFilter's filter pass (layers 0..filter layer on the whole prompt) is prefill work too."""
    gemfilter = {"policy": "gemfilter", "policy_options": {"kv_budget": 32, "filter_layer": 1}}
    result = run_eval("needle", tiny, tokenizer, out=tmp_path, **gemfilter, **{**NEEDLE, "depths": 1})
    (record,) = result.records
    # Filter pass: 2 of 4 layers over the whole prompt; rerun: 4 layers over 32 tokens.
    expected = (2 * record["prompt_tokens"] + 4 * 32) / (4 * record["prompt_tokens"])
    assert record["prefill_token_share"] == pytest.approx(expected, abs=1e-3)


def test_records_carry_the_kv_bytes_kept_and_compare_plots_score_against_them(tiny, tokenizer, tmp_path):
    """Each record holds the KV bytes kept per prompt token as stored (int4: codes and scales), a
    different storage width is another run, and ``eval compare`` plots score against those bytes."""
    from kvpolicy.eval.report import compare

    runs = {}
    for bits in (16, "int4"):
        options = {"kv_budget": 0.5, "kv_bits": bits}
        result = run_eval(
            "needle",
            tiny,
            tokenizer,
            out=tmp_path,
            policy="snapkv",
            policy_options=options,
            **{**NEEDLE, "depths": 1},
        )
        (runs[bits],) = result.records
    full, quant = runs[16]["kv_bytes_per_token"], runs["int4"]["kv_bytes_per_token"]
    assert full > 0 and quant == pytest.approx(full * (0.5 + 4 / 8) / 4, rel=0.01)  # fp32 vs 8-wide groups
    assert len(list(tmp_path.glob("needle/*/run.json"))) == 2
    written = compare([tmp_path], out=tmp_path / "compare")
    assert any(p.name == "needle-by-kv-bytes.png" for p in written["needle"]["plots"])
