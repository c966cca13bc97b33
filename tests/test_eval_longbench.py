"""LongBench: official prompts, chat-template exceptions, middle truncation, malformed lines, buckets,
and (when the shared file is there) real multi_news records end to end on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_llama_for

from kvpolicy.eval import longbench, run_eval
from kvpolicy.eval.longbench import DataError, load_task
from kvpolicy.eval.metrics import longbench_bucket


@pytest.fixture(scope="module")
def tokenizer(embedded_tokenizer):
    return embedded_tokenizer


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return tiny_llama_for(tokenizer, max_positions=1024)


def record(task: str, i: int, context: str, question: str, answers: list[str], length: int = 1000, **extra):
    """A record in the official format (fields input, context, answers, length, dataset, language,
    all_classes, _id)."""
    return {
        "input": question,
        "context": context,
        "answers": answers,
        "length": length,
        "dataset": task,
        "language": "en",
        "all_classes": extra.pop("all_classes", None),
        "_id": f"{task}-{i:04d}",
        **extra,
    }


def write_jsonl(path: Path, rows: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def data_dir(tmp_path):
    passages = " ".join(f"Passage {i}: the river number {i} flows north." for i in range(40))
    write_jsonl(
        tmp_path / "hotpotqa.jsonl",
        [record("hotpotqa", i, passages, f"Which river is number {i}?", [f"river {i}"]) for i in range(3)],
    )
    classes = ["Location", "City", "Country", "Person"]
    write_jsonl(
        tmp_path / "trec.jsonl",
        [
            record(
                "trec",
                i,
                "Question: Where is Rome?\nType: City\n",
                "Question: Who is he?\nType:",
                ["Person"],
                all_classes=classes,
            )
            for i in range(2)
        ],
    )
    return tmp_path


def test_malformed_lines_are_counted_or_refused(tmp_path):
    good = [record("hotpotqa", i, "ctx", "q?", ["a"]) for i in range(3)]
    path = write_jsonl(
        tmp_path / "hotpotqa.jsonl",
        [
            good[0],
            "{not json",
            '["a", "list"]',
            json.dumps({k: v for k, v in good[1].items() if k != "answers"}),
            good[1],
            "",
            json.dumps({**good[2], "answers": "a string, not a list"}),
            json.dumps({**good[2], "_id": "ok-2"}),
        ],
    )
    report = load_task(path, "hotpotqa")
    assert [r["_id"] for r in report.records] == ["hotpotqa-0000", "hotpotqa-0001", "ok-2"]
    assert [n for n, _ in report.bad_lines] == [2, 3, 4, 7]
    assert "not valid JSON" in report.bad_lines[0][1] and "answers" in report.bad_lines[2][1]
    with pytest.raises(DataError, match=r"hotpotqa.jsonl, line 2: not valid JSON"):
        load_task(path, "hotpotqa", strict=True)
    write_jsonl(tmp_path / "musique.jsonl", ["{bad", "[]"])
    with pytest.raises(DataError, match=r"no usable LongBench record.*2 malformed"):
        load_task(tmp_path / "musique.jsonl", "musique")
    trec = write_jsonl(tmp_path / "trec.jsonl", [record("trec", 0, "c", "q", ["City"])])  # no all_classes
    with pytest.raises(DataError, match="all_classes"):
        load_task(trec, "trec")


def test_malformed_lines_reported_in_the_run(tiny, tokenizer, data_dir, tmp_path):
    with open(data_dir / "hotpotqa.jsonl", "a") as f:
        f.write("{truncated json\n")
    result = run_eval(
        "longbench",
        tiny,
        tokenizer,
        data_dir=data_dir,
        tasks=["hotpotqa"],
        max_new_tokens=2,
        out=tmp_path,
        quiet=True,
    )
    assert result.summary["n"] == 3
    meta = json.loads((result.run_dir / "run.json").read_text())
    assert meta["data_notes"]["malformed_lines"]["hotpotqa"]["count"] == 1
    assert meta["data_notes"]["malformed_lines"]["hotpotqa"]["lines"] == [4]
    with pytest.raises(DataError, match="line 4"):
        run_eval(
            "longbench",
            tiny,
            tokenizer,
            data_dir=data_dir,
            tasks=["hotpotqa"],
            strict=True,
            out=tmp_path,
            quiet=True,
        )


def test_prompts_and_chat_template_exceptions(tokenizer):
    rec = record("hotpotqa", 0, "CONTEXT-TEXT", "QUESTION-TEXT?", ["x"])
    prompt = longbench.build_prompt("hotpotqa", rec)
    assert prompt.startswith("Answer the question based on the given passages.")
    assert "The following are given passages.\nCONTEXT-TEXT\n\n" in prompt and prompt.endswith(
        "Question: QUESTION-TEXT?\nAnswer:"
    )
    assert longbench.build_prompt("lcc", {"context": "def f():\n", "input": ""}) == (
        "Please complete the code given below. \ndef f():\nNext line of code:\n"
    )
    assert set(longbench.PROMPTS) == set(longbench.TASKS_EN) == set(longbench.MAX_NEW_TOKENS)
    chat = {t for t in longbench.TASKS_EN if longbench.use_chat(t, tokenizer)}
    assert set(longbench.TASKS_EN) - chat == {"trec", "triviaqa", "samsum", "lcc", "repobench-p"}
    ids, truncated, _ = longbench.encode("trec", {**rec, "all_classes": []}, tokenizer, 4000, None, 64)
    assert "<|im_start|>" not in tokenizer.decode(ids) and not truncated
    ids, _, _ = longbench.encode("hotpotqa", rec, tokenizer, 4000, None, 32)
    assert tokenizer.decode(ids).startswith("<|im_start|>system")
    assert (longbench.MAX_NEW_TOKENS["multi_news"], longbench.MAX_NEW_TOKENS["hotpotqa"]) == (512, 32)


def test_middle_truncation(tokenizer):
    context = " ".join(f"word{i}" for i in range(3000))
    rec = record("narrativeqa", 0, context, "What is the last word?", ["word2999"])
    prompt = longbench.build_prompt("narrativeqa", rec)
    text, truncated = longbench.truncate_middle(tokenizer, prompt, 200)
    assert truncated
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert text == tokenizer.decode(ids[:100], skip_special_tokens=True) + tokenizer.decode(
        ids[-100:], skip_special_tokens=True
    )
    assert text.startswith("You are given a story") and text.endswith(
        "Question: What is the last word?\n\nAnswer:"
    )
    assert "word1500 " not in text
    # a window too small for the chat-wrapped prompt plus the answer gets cut further
    ids, truncated, full = longbench.encode("narrativeqa", rec, tokenizer, 400, 300, 64)
    assert (
        truncated
        and len(ids) + 64 <= 300
        and full == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    )


def test_longbench_e_buckets(tiny, tokenizer, tmp_path):
    rows = [
        record("hotpotqa", i, f"River {i} flows.", f"Which river {i}?", [f"river {i}"], length=n)
        for i, n in enumerate((1200, 5000, 9000))
    ]
    write_jsonl(tmp_path / "hotpotqa_e.jsonl", rows)
    result = run_eval(
        "longbench",
        tiny,
        tokenizer,
        data_dir=tmp_path,
        longbench_e=True,
        max_new_tokens=2,
        out=tmp_path / "out",
        quiet=True,
    )
    assert [r["bucket"] for r in result.records] == ["0-4k", "4-8k", "8k+"]
    assert set(result.summary["buckets"]["hotpotqa"]) == {"0-4k", "4-8k", "8k+"}
    with pytest.raises(ValueError, match="unknown LongBench-E task"):
        run_eval(
            "longbench",
            tiny,
            tokenizer,
            data_dir=tmp_path,
            longbench_e=True,
            tasks=["narrativeqa"],
            quiet=True,
        )


def test_fixture_end_to_end(tiny, tokenizer, data_dir, tmp_path):
    result = run_eval(
        "longbench",
        tiny,
        tokenizer,
        policy="snapkv",
        policy_options={"kv_budget": 32},
        data_dir=data_dir,
        samples=2,
        max_new_tokens=3,
        out=tmp_path,
        quiet=True,
    )
    assert [r["id"] for r in result.records] == [
        "hotpotqa/hotpotqa-0000",
        "hotpotqa/hotpotqa-0001",
        "trec/trec-0000",
        "trec/trec-0001",
    ]
    for r in result.records:
        assert 0.0 <= r["score"] <= 100.0 and r["new_tokens"] <= 3 and isinstance(r["reference"], list)
    assert set(result.summary["by_task"]) == {"hotpotqa", "trec"}
    meta = json.loads((result.run_dir / "run.json").read_text())
    assert meta["config"]["settings"]["max_new_tokens"] == {"hotpotqa": 3, "trec": 3}
    assert meta["config"]["settings"]["max_length"] == {"hotpotqa": 1021, "trec": 1021}


def _shared_multi_news() -> Path | None:
    try:
        path = longbench.find_data_dir() / "multi_news.jsonl"
    except FileNotFoundError:
        return None
    return path if path.is_file() else None


@pytest.mark.skipif(_shared_multi_news() is None, reason="shared/data/longbench/multi_news.jsonl not present")
def test_real_multi_news_records(tiny, tokenizer, tmp_path):
    path = _shared_multi_news()
    report = load_task(path, "multi_news")
    assert len(report.records) == 200 and not report.bad_lines
    result = run_eval(
        "longbench",
        tiny,
        tokenizer,
        data_dir=path.parent,
        tasks=["multi_news"],
        samples=2,
        max_length=384,
        max_new_tokens=3,
        out=tmp_path,
        quiet=True,
    )
    assert result.summary["count"] == {"multi_news": 2}
    for r, rec in zip(result.records, report.records[:2], strict=True):
        assert r["_id"] == rec["_id"] and r["reference"] == rec["answers"]
        assert r["truncated"] and r["untruncated_tokens"] > 384 >= r["prompt_tokens"] - 40
        assert r["bucket"] == longbench_bucket(rec["length"]) and r["length"] == rec["length"]
    built = longbench.encode("multi_news", report.records[0], tokenizer, 384, None, 512)[0]
    text = tokenizer.decode(built)
    assert "You are given several news passages." in text and text.rstrip().endswith(
        "Summary:<|im_end|>\n<|im_start|>assistant"
    )
