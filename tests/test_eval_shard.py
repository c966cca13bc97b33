"""``--shard i/n``: shards split the samples without overlap, live in folders of their own, and
``compare`` merges them into exactly the unsharded run's records."""

from __future__ import annotations

import pytest
from conftest import tiny_llama_for

from kvpolicy.eval import run_eval
from kvpolicy.eval.report import load_runs
from kvpolicy.eval.shard import parse_shard

NEEDLE = {"lengths": [256, 320], "depths": 3, "max_new_tokens": 3, "quiet": True}


@pytest.fixture(scope="module")
def tiny(embedded_tokenizer):
    return tiny_llama_for(embedded_tokenizer)


def test_shards_merge_into_the_whole_run(tiny, embedded_tokenizer, tmp_path):
    kw = dict(policy="snapkv", policy_options={"kv_budget": 64}, out=tmp_path / "sharded", **NEEDLE)
    parts = [run_eval("needle", tiny, embedded_tokenizer, shard=f"{i}/3", **kw) for i in range(3)]
    ids = [r["id"] for p in parts for r in p.records]
    assert len(ids) == len(set(ids)) == 6, "every sample in exactly one shard"
    assert len({p.run_dir for p in parts}) == 3 and all("shard" in p.run_dir.name for p in parts)

    whole = run_eval("needle", tiny, embedded_tokenizer, **{**kw, "out": tmp_path / "whole"})
    (merged,) = load_runs([tmp_path / "sharded"])
    assert merged.complete and merged.meta["key"] == whole.key
    by_id = {r["id"]: r for r in merged.records}
    for r in whole.records:
        assert by_id[r["id"]]["prediction"] == r["prediction"] and by_id[r["id"]]["score"] == r["score"]
    assert merged.summary["score"] == pytest.approx(whole.summary["score"])


def test_a_missing_shard_leaves_the_merged_run_unfinished(tiny, embedded_tokenizer, tmp_path):
    run_eval("needle", tiny, embedded_tokenizer, shard="1/2", out=tmp_path, **NEEDLE)
    (merged,) = load_runs([tmp_path])
    assert not merged.complete and merged.meta["shards"]["found"] == [1]
    # Rerunning a finished shard skips it; the other shard then completes the merge.
    again = run_eval("needle", tiny, embedded_tokenizer, shard="1/2", out=tmp_path, **NEEDLE)
    assert again.status == "skipped"
    run_eval("needle", tiny, embedded_tokenizer, shard="0/2", out=tmp_path, **NEEDLE)
    (merged,) = load_runs([tmp_path])
    assert merged.complete and merged.summary["n"] == 6


@pytest.mark.parametrize(
    ("spec", "env", "expected"),
    [
        ("0/4", {}, (0, 4)),
        (" 3 / 4 ", {}, (3, 4)),
        ("0/1", {}, None),
        ((1, 2), {}, (1, 2)),
        ("env", {"RANK": "2", "WORLD_SIZE": "8"}, (2, 8)),
        (
            "env",
            {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "8"},
            (4, 8),
        ),
    ],
)
def test_parse_shard(spec, env, expected):
    assert parse_shard(spec, env) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("4/4", "--shard 4/4: the shard index must be in 0..3"),
        ("1-4", "--shard '1-4': expected i/n"),
        ("0/0", "--shard 0/0"),
        ("env", "found neither RANK and WORLD_SIZE"),
    ],
)
def test_bad_shard_names_the_value(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_shard(spec, {})


def test_cli_rejects_a_bad_shard_before_loading_a_model(capsys, tmp_path):
    from kvpolicy.cli import main

    assert (
        main(["eval", "needle", "--shard", "2/2", "--model", str(tmp_path / "nope"), "--out", str(tmp_path)])
        != 0
    )
    assert "--shard 2/2" in capsys.readouterr().err
