"""``kvpolicy eval leaderboard``: kvpress's ratios become kvpolicy budgets (1 - ratio), the default
methods are whatever the registry holds, the table has the leaderboard's shape, cells resume and
shard like every eval run, and the plot is written."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_llama_for

from kvpolicy.eval import leaderboard as lb
from kvpolicy.eval.report import load_runs

# Short prompts and answers on a 4-layer random model: the whole file runs in seconds.
KW = {"length": 256, "tasks": ["niah_single_1", "niah_multikey_2"], "max_new_tokens": 2, "quiet": True}


@pytest.fixture(scope="module")
def tiny(embedded_tokenizer):
    return tiny_llama_for(embedded_tokenizer)


@pytest.mark.parametrize(
    ("ratio", "budget"), [(0.1, 0.9), (0.25, 0.75), (0.5, 0.5), (0.75, 0.25), (0.875, 0.125), (0.9, 0.1)]
)
def test_ratio_removed_is_budget_kept(ratio, budget):
    assert lb.budget_for(ratio) == budget  # exactly: 1 - 0.9 is 0.09999999999999998 unrounded
    assert isinstance(lb.budget_for(ratio), float)  # a fraction of the context, not a token count


@pytest.mark.parametrize("ratio", [0, 1, 1.5, -0.1, True, "0.5"])
def test_bad_ratio_names_the_value(ratio):
    with pytest.raises(ValueError, match="compression ratio"):
        lb.budget_for(ratio)


def test_method_specs():
    m = lb.parse_method("fastkv:tsp_layer=14,tsp_rate=0.2")
    assert m == lb.Method("fastkv", {"tsp_layer": 14, "tsp_rate": 0.2})
    assert lb.parse_method(m.spec) == m
    with pytest.raises(ValueError, match="kv_budget is set by each compression ratio"):
        lb.parse_method("snapkv:kv_budget=0.5")
    with pytest.raises(ValueError, match="fullkv always runs"):
        lb.parse_method("fullkv")
    with pytest.raises(ValueError, match="key=value"):
        lb.parse_method("snapkv:window")


def test_default_methods_are_the_registry_s_compressing_presets():
    from kvpolicy.registry import get_registry

    presets = get_registry().presets
    expected = {n for n, e in presets.items() if "kv_budget" in e.obj.model_fields and n != "fullkv"}
    names = lb.compressing_presets()
    assert set(names) == expected and len(names) == len(expected)
    assert "snapkv" in names and "duoattention" not in names  # DuoAttention has no kv_budget
    preferred = [n for n in lb.PREFERRED_ORDER if n in expected]
    assert names[: len(preferred)] == preferred  # only an ordering


def test_methods_are_checked_before_anything_runs():
    with pytest.raises(ValueError, match="no kv_budget setting"):
        lb.check_methods([lb.Method("duoattention")], [0.5])
    with pytest.raises(Exception, match="window"):
        lb.check_methods([lb.Method("snapkv", {"window": -3})], [0.5])
    with pytest.raises(Exception, match="snapk"):
        lb.check_methods([lb.Method("snapk")], [0.5])


def test_table_resume_and_plot(tiny, embedded_tokenizer, tmp_path):
    methods = ["snapkv", "streamingllm:sinks=2"]
    res = lb.run_leaderboard(
        tiny, embedded_tokenizer, methods=methods, ratios=[0.75, 0.25], samples=1, out=tmp_path, **KW
    )
    header, rows = lb.table(res)
    assert header == ["method", "0 (full KV)", "0.25", "0.75"]  # ratios sorted
    assert [r[0] for r in rows] == ["full KV", "snapkv", "streamingllm:sinks=2"]
    assert all(cell and cell != "error" and not cell.endswith("*") for r in rows[1:] for cell in r[2:])
    theader, trows = lb.task_table(res)
    assert theader == ["method", "ratio", "niah_single_1", "niah_multikey_2", "average"]
    assert len(trows) == 1 + 2 * 2
    # Every cell is an ordinary query-agnostic RULER run with kv_budget = 1 - ratio.
    for ratio in (0.25, 0.75):
        cell = res.cell("snapkv", ratio)
        meta = json.loads((cell.run_dir / "run.json").read_text())
        assert meta["config"]["settings"]["query_agnostic"] is True
        assert meta["config"]["settings"]["lengths"] == [256]
        assert meta["policy"]["cache"]["budget"] == lb.budget_for(ratio) == 1 - ratio
        assert cell.samples == 2 and cell.complete
    assert "sinks=2" in lb.legend_label(res.cell("streamingllm:sinks=2", 0.25))
    assert "kv_budget" not in lb.legend_label(res.cell("snapkv", 0.25))
    assert res.plot_path is not None and res.plot_path.stat().st_size > 10_000
    saved = json.loads(res.json_path.read_text())
    assert len(saved["cells"]) == 5 and saved["cells"][1]["kv_budget"] in (0.75, 0.25)
    assert "| snapkv |" in res.table_path.read_text()
    assert len(load_runs([tmp_path / "ruler"])) == 5  # also readable by `kvpolicy eval compare`

    # Resume: a finished grid reruns nothing; a cell cut short finishes only what is missing.
    records = res.cell("snapkv", 0.75).run_dir / "records.jsonl"
    first = records.read_text().splitlines()[0]
    records.write_text(first + "\n")
    meta_path = records.parent / "run.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "status": "interrupted"}))
    again = lb.run_leaderboard(
        tiny, embedded_tokenizer, methods=methods, ratios=[0.25, 0.75], samples=1, out=tmp_path, **KW
    )
    assert lb.table(again) == (header, rows)
    assert records.read_text().splitlines()[0] == first and len(records.read_text().splitlines()) == 2
    # A method added later (as a preset registered since) adds its cells; the others are reused.
    more = lb.run_leaderboard(
        tiny,
        embedded_tokenizer,
        methods=[*methods, "h2o"],
        ratios=[0.25, 0.75],
        samples=1,
        out=tmp_path,
        **KW,
    )
    assert [r[0] for r in lb.table(more)[1]] == ["full KV", *methods, "h2o"]
    assert lb.table(more)[1][:3] == rows


def test_shards_fill_the_same_table(tiny, embedded_tokenizer, tmp_path):
    kw = {**KW, "methods": ["snapkv"], "ratios": [0.5], "samples": 2, "plot": False}
    half = lb.run_leaderboard(tiny, embedded_tokenizer, out=tmp_path / "sharded", shard="0/2", **kw)
    assert all(c.samples == 2 and not c.complete for c in half.cells)  # 4 samples per cell, 2 done
    assert lb.table(half)[1][1][2].endswith("*")
    full = lb.run_leaderboard(tiny, embedded_tokenizer, out=tmp_path / "sharded", shard="1/2", **kw)
    assert all(c.samples == 4 and c.complete for c in full.cells)
    whole = lb.run_leaderboard(tiny, embedded_tokenizer, out=tmp_path / "whole", **kw)
    assert lb.table(full) == lb.table(whole)


def test_a_failing_method_leaves_the_others(tiny, embedded_tokenizer, tmp_path):
    # GemFilter's filter layer is checked against the model's depth only when it runs (4 layers here).
    res = lb.run_leaderboard(
        tiny,
        embedded_tokenizer,
        methods=["gemfilter:filter_layer=9", "snapkv"],
        ratios=[0.5],
        samples=1,
        out=tmp_path,
        plot=False,
        **KW,
    )
    assert res.cell("gemfilter:filter_layer=9", 0.5).error
    assert res.cell("snapkv", 0.5).score is not None and "Failed" in res.table_path.read_text()


def test_cli_refuses_bad_input_before_loading_a_model(capsys):
    from kvpolicy.cli import main

    assert main(["eval", "leaderboard", "--ratios", "0", "0.5"]) == 2
    assert "compression ratio 0.0" in capsys.readouterr().err
    assert main(["eval", "leaderboard", "--methods", "snapkv:kv_budget=0.3"]) == 2
    assert "kv_budget is set by each compression ratio" in capsys.readouterr().err
    assert main(["eval", "leaderboard", "--methods", "duoattention"]) == 2
    assert "no kv_budget" in capsys.readouterr().err


def test_help_says_the_embedded_length_and_why(capsys):
    from kvpolicy.cli import main

    with pytest.raises(SystemExit):
        main(["eval", "leaderboard", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"{lb.EMBEDDED_LENGTH} tokens" in text and "still answers with full KV" in text
    assert "4096 tokens" in text and "kv_budget = 1 - ratio" in text


def test_default_runs_every_registered_compressing_preset(tiny, embedded_tokenizer, tmp_path):
    kw = {**KW, "tasks": ["niah_single_1"], "max_new_tokens": 1}
    res = lb.run_leaderboard(
        tiny, embedded_tokenizer, ratios=[0.5], samples=1, out=tmp_path, plot=False, **kw
    )
    names = lb.compressing_presets()
    ran = [m for m in res.methods[1:]]
    left_out = {c.method for c in res.cells if c.error and c.error.startswith("not built with its defaults")}
    assert set(ran) | left_out == set(names) and not set(ran) & left_out
    assert ran == [n for n in names if n not in left_out]  # in the default order
    for name in left_out:  # e.g. a preset that needs a calibration file: said why, in the table file
        assert name in res.table_path.read_text()
