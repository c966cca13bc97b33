"""Compress once, answer many: ``generate(context=..., questions=...)`` (issue 14 item 7)."""

from __future__ import annotations

import pytest
import torch

import kvpolicy
from kvpolicy import generation
from kvpolicy.testing import ByteTokenizer, tiny_llama

N = 12


@pytest.fixture(scope="module")
def ids():
    gen = torch.Generator().manual_seed(3)
    context = torch.randint(0, 128, (70,), generator=gen).tolist()
    questions = [torch.randint(0, 128, (n,), generator=gen).tolist() for n in (5, 9, 1)]
    return context, questions


def answer(model, context, questions, policy="fullkv", n=N):
    return kvpolicy.generate(
        model, None, context_ids=context, question_ids=questions, policy=policy, max_new_tokens=n
    )


def test_fullkv_equals_one_prompt(model, ids):
    context, questions = ids
    outs = answer(model, context, questions)
    assert len(outs) == len(questions)
    for q, out in zip(questions, outs, strict=True):
        alone = kvpolicy.generate(model, None, input_ids=context + q, policy="fullkv", max_new_tokens=N)
        assert out.token_ids == alone.token_ids
        assert out.stats.prompt_tokens == len(context) + len(q)
        assert out.stats.new_tokens == N


@pytest.mark.parametrize("policy", ["fullkv", "h2o", "streamingllm", "h2o-int4", "snapkv-fp8", "h2o-kivi2"])
def test_answers_do_not_depend_on_order(model, ids, policy):
    """Each question is answered from the restored compressed cache (a quantized one's codes and scales
    restored too): answers are the same in any order and alone."""
    context, questions = ids
    name, _, bits = policy.partition("-")
    pol = kvpolicy.get_policy(name) if name == "fullkv" else kvpolicy.get_policy(name, kv_budget=24)
    pol = pol.with_storage(bits or None)
    forward = answer(model, context, questions, pol)
    backward = answer(model, context, questions[::-1], pol)
    assert [o.token_ids for o in forward] == [o.token_ids for o in backward[::-1]]
    alone = [answer(model, context, [q], pol)[0].token_ids for q in questions]
    assert [o.token_ids for o in forward] == alone


def test_context_prefilled_once(model, ids, monkeypatch):
    context, questions = ids
    calls = []
    real = generation._prefill

    def counting(adapter, prompts, *args, **kwargs):
        calls.append([p.shape[0] for p in prompts])
        return real(adapter, prompts, *args, **kwargs)

    monkeypatch.setattr(generation, "_prefill", counting)
    answer(model, context, questions)
    assert calls == [[len(context)]]


def test_snapkv_cache_is_the_budget(model, ids):
    context, questions = ids
    policy = kvpolicy.get_policy("snapkv", kv_budget=20)
    assert kvpolicy.prefill(model, context, policy).cache.kv_lengths == [20] * 4
    outs = answer(model, context, questions, policy)
    for q, out in zip(questions, outs, strict=True):
        # the context's 20 kept entries plus the question's tokens (SnapKV never evicts while decoding)
        assert out.stats.kv_tokens_per_layer == [20 + len(q)] * 4
        assert out.stats.new_tokens == N
    # the answers differ from full KV's only through the context's compression: each still runs
    assert all(len(o.token_ids) == N for o in outs)


def test_decode_evicting_policy_keeps_its_budget(model, ids):
    context, questions = ids
    outs = answer(model, context, questions, kvpolicy.get_policy("h2o", kv_budget=24))
    assert [len(o.token_ids) for o in outs] == [N] * len(questions)


class ChatBytes(ByteTokenizer):
    """Byte tokenizer with a toy chat template (bytes concatenate, so splits are exact)."""

    chat_template = "toy"

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        text = "<u>" + messages[0]["content"] + "</u><a>"
        return self(text)["input_ids"] if tokenize else text


def test_text_with_chat_template_equals_one_prompt():
    model = tiny_llama(vocab=256)
    tok = ChatBytes()
    context, questions = "The key is 42. " * 4, ["What is the key?", "Say hi."]
    ctx_ids, q_ids = kvpolicy.generation.encode_context_questions(tok, context, questions)
    assert bytes(ctx_ids).decode() == "<u>" + context + "\n\n"
    assert bytes(q_ids[0]).decode() == "What is the key?</u><a>"
    outs = kvpolicy.generate(model, tok, context=context, questions=questions, max_new_tokens=6)
    for q, out in zip(questions, outs, strict=True):
        alone = kvpolicy.generate(model, tok, context + "\n\n" + q, max_new_tokens=6)
        assert out.token_ids == alone.token_ids
        assert out.text == alone.text


def test_text_without_chat_template():
    model = tiny_llama(vocab=256)
    outs = kvpolicy.generate(
        model, ByteTokenizer(), context="abc " * 10, questions=["q?"], policy="snapkv", max_new_tokens=3
    )
    assert len(outs) == 1 and len(outs[0].token_ids) == 3


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"context_ids": [1, 2, 3], "question_ids": []}, ValueError, "question_ids is empty"),
        ({"question_ids": [[1, 2]]}, ValueError, "questions need a context"),
        ({"context_ids": [1, 2, 3]}, ValueError, "a context needs questions"),
        ({"context_ids": [], "question_ids": [[1]]}, ValueError, "context: empty prompt"),
        ({"context_ids": [1, 2], "question_ids": [[1], []]}, ValueError, "question 1: empty prompt"),
        ({"context_ids": [1, 2], "question_ids": [[1, 999]]}, ValueError, "question 0: token ids"),
        ({"context_ids": [1, 2], "question_ids": [1, 2]}, TypeError, "question 0: input_ids"),
        ({"input_ids": [1], "context_ids": [1], "question_ids": [[1]]}, ValueError, "not both"),
        ({"context_ids": [1], "question_ids": [[1]], "batch_size": 2}, ValueError, "batch_size=2"),
    ],
)
def test_bad_input_ids(model, kwargs, error, message):
    with pytest.raises(error, match=message):
        kvpolicy.generate(model, None, max_new_tokens=2, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"context": "abc", "questions": []}, ValueError, r"questions is empty \(\[\]\)"),
        ({"questions": ["q"]}, ValueError, "questions need a context"),
        ({"context": "abc", "questions": "q"}, TypeError, "questions must be a list, got str"),
        ({"context": "abc", "questions": ["ok", ""]}, ValueError, "question 1 is empty"),
        ({"context": "", "questions": ["q"]}, ValueError, "context is empty"),
        ({"context": "abc", "question_ids": [[1]]}, ValueError, "not a mix"),
    ],
)
def test_bad_input_text(kwargs, error, message):
    model = tiny_llama(vocab=256)
    with pytest.raises(error, match=message):
        kvpolicy.generate(model, ByteTokenizer(), max_new_tokens=2, **kwargs)


def test_cli_answers_each_question(tmp_path, capsys, monkeypatch):
    import json

    from kvpolicy import cli

    model = tiny_llama(vocab=256)
    monkeypatch.setattr(cli, "load_from_args", lambda args: (model, ByteTokenizer()))
    context = tmp_path / "context.txt"
    context.write_text("The key is 42. " * 5)
    args = ["generate", "--context-file", str(context), "--question", "Key?", "--question", "Hi?"]
    assert cli.main([*args, "--max-new-tokens", "4", "--policy", "snapkv", "--kv-budget", "20"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Q: Key?\nA: ") and "\n\nQ: Hi?\nA: " in out
    assert cli.main([*args, "--max-new-tokens", "4", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert [a["question"] for a in record["answers"]] == ["Key?", "Hi?"]
    assert all(a["stats"]["new_tokens"] == 4 for a in record["answers"])


def test_cli_question_needs_context(tmp_path, capsys):
    from kvpolicy import cli

    assert cli.main(["generate", "--prompt", "hi", "--question", "q"]) == 2
    assert "--question needs --context-file" in capsys.readouterr().err
    context = tmp_path / "context.txt"
    context.write_text("text")
    assert cli.main(["generate", "--context-file", str(context)]) == 2
    assert "--context-file needs at least one --question" in capsys.readouterr().err


def test_eval_needle_query_agnostic(tmp_path):
    import json

    from kvpolicy.eval import run_eval

    hay = tmp_path / "hay"
    hay.mkdir()
    (hay / "a.txt").write_text("The sky was grey over the bay that morning. " * 40)
    model, tok = tiny_llama(vocab=256), ByteTokenizer()
    preds = {}
    for agnostic in (False, True):
        result = run_eval(
            "needle",
            model,
            tok,
            policy="fullkv",
            lengths=[300],
            depths=2,
            max_new_tokens=3,
            haystack_dir=hay,
            query_agnostic=agnostic,
            out=tmp_path / "runs",
            quiet=True,
        )
        assert result.status == "complete" and result.ran == 2
        meta = json.loads((result.run_dir / "run.json").read_text())
        assert meta["config"]["settings"].get("query_agnostic", False) is agnostic
        records = [json.loads(x) for x in (result.run_dir / "records.jsonl").read_text().splitlines()]
        preds[agnostic] = [(r["prediction"], r["prompt_tokens"]) for r in records]
    # byte tokens concatenate: with full KV the split prompt answers exactly as the whole one
    assert preds[True] == preds[False]


def test_compiled_answers_equal_eager(ids, monkeypatch):
    monkeypatch.setattr(generation, "COMPILE_BACKEND", "eager")  # graph capture only, no codegen
    torch._dynamo.reset()
    try:
        model = tiny_llama()  # a fresh adapter: its compiled step starts empty
        context, questions = ids
        policy = kvpolicy.get_policy("h2o", kv_budget=24)
        eager = answer(model, context, questions, policy, n=6)
        compiled = kvpolicy.generate(
            model,
            None,
            context_ids=context,
            question_ids=questions,
            policy=policy,
            max_new_tokens=6,
            compile=True,
        )
        assert [o.token_ids for o in compiled] == [o.token_ids for o in eager]
    finally:
        torch._dynamo.reset()


def test_eval_ruler_query_agnostic(tmp_path):
    """RULER's query-agnostic form: the task's context (instructions and haystack) is compressed
    alone; its question (the template's last line) and the answer prefix follow, a blank line apart
    (``QUESTION_SEPARATOR``). With full KV the run answers exactly as the joined ids would."""
    import json

    from kvpolicy.eval import ruler, run_eval
    from kvpolicy.generation import QUESTION_SEPARATOR

    model, tok = tiny_llama(vocab=256), ByteTokenizer()
    sample = ruler.generate_sample("niah_single_1", tok, 600, 0, seed=42)
    context_ids, question_ids = ruler.split_sample(sample, tok)
    head, _, question = sample.prompt.rpartition("\n")
    assert question.startswith("What is the special magic number for") and question.endswith("?")
    assert tok.decode(context_ids) == head + QUESTION_SEPARATOR
    assert tok.decode(question_ids) == question + sample.answer_prefix
    result = run_eval(
        "ruler",
        model,
        tok,
        policy="fullkv",
        lengths=[600],
        tasks=["niah_single_1"],
        samples=1,
        max_new_tokens=3,
        query_agnostic=True,
        out=tmp_path / "runs",
        quiet=True,
    )
    assert result.status == "complete" and result.ran == 1
    meta = json.loads((result.run_dir / "run.json").read_text())
    assert meta["config"]["settings"]["query_agnostic"] is True
    (record,) = [json.loads(x) for x in (result.run_dir / "records.jsonl").read_text().splitlines()]
    assert record["prompt_tokens"] == len(context_ids) + len(question_ids)
    joined = kvpolicy.generate(model, tok, input_ids=context_ids + question_ids, max_new_tokens=3)
    assert record["prediction"] == joined.text
