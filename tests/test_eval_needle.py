"""Needle-in-a-haystack task: the needle sits at the requested depth on a sentence boundary; a tiny
end-to-end run writes records, the summary and the heatmap."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_llama_for

from kvpolicy.eval import needle, run_eval
from kvpolicy.eval.tasks import NeedleTask


@pytest.fixture(scope="module")
def tokenizer(embedded_tokenizer):
    return embedded_tokenizer


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return tiny_llama_for(tokenizer, max_positions=2048)


def _context(tokenizer, input_ids):
    text = tokenizer.decode(input_ids)
    return text.split("<document>\n", 1)[1].split("\n</document>", 1)[0]


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_needle_at_requested_depth(tokenizer, depth):
    task = NeedleTask(lengths=[1024], depths=5)
    item = next(i for i in task.items() if i.meta["depth"] == depth)
    built = task.build(item, tokenizer)
    assert abs(len(built.input_ids) - 1024) <= 8
    context = _context(tokenizer, built.input_ids)
    pos = context.index(needle.NEEDLE)
    assert context.count(needle.NEEDLE) == 1
    before = len(tokenizer(context[:pos], add_special_tokens=False)["input_ids"])
    total = len(tokenizer(context.replace(needle.NEEDLE, ""), add_special_tokens=False)["input_ids"])
    assert abs(before / total - depth) <= 0.05, (before, total, depth)
    if depth == 1.0:  # appended after the context, as the reference does at 100 %
        assert context.endswith(needle.NEEDLE)
        return
    head = context[:pos].rstrip()
    assert head == "" or head.endswith((".", "?", "!", '."')), head[-40:]  # a sentence boundary


def test_samples_rotate_the_haystack(tokenizer):
    task = NeedleTask(lengths=[512], depths=2, samples=2)
    ids = [i.id for i in task.items()]
    assert len(ids) == len(set(ids)) == 4
    first = task.haystack(0)
    second = task.haystack(1)
    assert first == needle.load_haystack(task.folder)  # sample 0 is the reference haystack
    assert second.startswith(task.files[1].read_text(encoding="utf-8").strip()[:200])
    a, b = (task.build(i, tokenizer) for i in task.items()[:2])
    assert a.input_ids != b.input_ids


def test_needle_end_to_end_tiny(tiny, tokenizer, tmp_path):
    result = run_eval(
        "needle",
        tiny,
        tokenizer,
        policy="snapkv",
        policy_options={"kv_budget": 64},
        lengths=[256, 384],
        depths=3,
        max_new_tokens=4,
        out=tmp_path,
        quiet=True,
    )
    assert result.status == "complete" and result.ran == 6
    lines = (result.run_dir / "records.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["id"] for r in records] == [i.id for i in NeedleTask(lengths=[256, 384], depths=3).items()]
    for r in records:
        assert {
            "length",
            "depth",
            "prompt_tokens",
            "prediction",
            "reference",
            "score",
            "needle_found",
        } <= set(r)
        assert r["reference"] == needle.NEEDLE and 0.0 <= r["score"] <= 1.0
        assert abs(r["prompt_tokens"] - r["length"]) <= 8
    meta = json.loads((result.run_dir / "run.json").read_text())
    assert meta["status"] == "complete" and meta["summary"]["n"] == 6
    assert meta["policy"]["cache"]["budget"] == 64
    assert set(meta["summary"]["grid"]) == {"256", "384"}
    assert (result.run_dir / "heatmap.png").stat().st_size > 1000
