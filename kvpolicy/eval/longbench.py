"""LongBench v1 (Bai et al. 2023), English tasks: official data files, prompts, lengths and metrics.

Reads ``<task>.jsonl`` (or ``<task>_e.jsonl`` for LongBench-E) from a directory the user gives; nothing
is downloaded. Prompts are the official ``config/dataset2prompt.json`` templates, answers are capped at
the official per-task ``dataset2maxlen`` (as in FastKV's reference), prompts longer than the budget are cut in
the middle (first half + last half of the token budget, decoded back to text as the official
``pred.py`` does), and the chat template wraps every task but trec, triviaqa, samsum, lcc and
repobench-p. Scores: :func:`kvpolicy.eval.metrics.longbench_score`, plus the LongBench-E length bucket.

Malformed lines (not JSON, not an object, missing or mistyped fields) are skipped and counted, or
raise :class:`DataError` naming the file and line with ``strict=True``; a file with no usable record is
always an error (never a silent zero score).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The 16 English tasks of LongBench v1, in the paper's order.
TASKS_EN: tuple[str, ...] = (
    "narrativeqa",
    "qasper",
    "multifieldqa_en",
    "hotpotqa",
    "2wikimqa",
    "musique",
    "gov_report",
    "qmsum",
    "multi_news",
    "trec",
    "triviaqa",
    "samsum",
    "passage_count",
    "passage_retrieval_en",
    "lcc",
    "repobench-p",
)
#: The 13 tasks LongBench-E (length-balanced) has.
TASKS_E: tuple[str, ...] = (
    "qasper",
    "multifieldqa_en",
    "hotpotqa",
    "2wikimqa",
    "gov_report",
    "multi_news",
    "trec",
    "triviaqa",
    "samsum",
    "passage_count",
    "passage_retrieval_en",
    "lcc",
    "repobench-p",
)

#: Official prompt templates (THUDM/LongBench config/dataset2prompt.json), English tasks.
PROMPTS: dict[str, str] = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the question as concisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story as concisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "qasper": 'You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:',
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "hotpotqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "2wikimqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "musique": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
    "passage_retrieval_en": 'Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", etc.\n\nThe answer is: ',
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

#: Official maximum new tokens per task (dataset2maxlen.json).
MAX_NEW_TOKENS: dict[str, int] = {
    "narrativeqa": 128,
    "qasper": 128,
    "multifieldqa_en": 64,
    "hotpotqa": 32,
    "2wikimqa": 32,
    "musique": 32,
    "gov_report": 512,
    "qmsum": 512,
    "multi_news": 512,
    "trec": 64,
    "triviaqa": 32,
    "samsum": 128,
    "passage_count": 32,
    "passage_retrieval_en": 32,
    "lcc": 64,
    "repobench-p": 64,
}

#: Few-shot and code tasks go in without the chat template (official pred.py).
NO_CHAT = frozenset({"trec", "triviaqa", "samsum", "lcc", "repobench-p"})
DATA_ENV = "KVPOLICY_LONGBENCH_DIR"


class DataError(ValueError):
    """An evaluation data file is missing, empty or (with ``strict``) has a malformed line."""


@dataclass
class LoadReport:
    """What reading one task file found: usable records and the malformed lines skipped."""

    path: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    bad_lines: list[tuple[int, str]] = field(default_factory=list)


def find_data_dir(explicit: str | Path | None = None) -> Path:
    """The LongBench folder: ``explicit`` (``--data-dir``), else ``$KVPOLICY_LONGBENCH_DIR``. LongBench's
    files are not shipped (its licence is the data sets'); nothing is searched for."""
    import os

    if explicit is not None or os.environ.get(DATA_ENV):
        path = Path(explicit if explicit is not None else os.environ[DATA_ENV]).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"LongBench data folder {path} does not exist")
        return path
    raise FileNotFoundError(
        f"no LongBench data folder: pass --data-dir (a folder of official <task>.jsonl files, e.g. "
        f"LongBench's data.zip unpacked) or set {DATA_ENV}"
    )


def task_file(data_dir: Path, task: str, longbench_e: bool = False) -> Path:
    return Path(data_dir) / f"{task}{'_e' if longbench_e else ''}.jsonl"


def available_tasks(data_dir: Path, longbench_e: bool = False) -> list[str]:
    tasks = TASKS_E if longbench_e else TASKS_EN
    return [t for t in tasks if task_file(data_dir, t, longbench_e).is_file()]


def _check_record(task: str, record: Any) -> str | None:
    """Why ``record`` is unusable, or None."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    for name in ("input", "context"):
        if not isinstance(record.get(name), str):
            return f"field {name!r} missing or not a string"
    answers = record.get("answers")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        return "field 'answers' missing or not a non-empty list of strings"
    length = record.get("length")
    if length is not None and (not isinstance(length, int) or isinstance(length, bool) or length < 0):
        return f"field 'length' is not a non-negative integer: {length!r}"
    classes = record.get("all_classes")
    if task == "trec" and (not isinstance(classes, list) or not all(isinstance(c, str) for c in classes)):
        return "trec needs 'all_classes', a list of strings"
    if task == "passage_retrieval_en" and not all("Paragraph " in a for a in answers):
        return "passage_retrieval_en answers must name 'Paragraph N'"
    return None


def load_task(path: Path, task: str, strict: bool = False) -> LoadReport:
    """Read one official LongBench jsonl file, skipping (or, ``strict``, refusing) malformed lines."""
    report = LoadReport(Path(path))
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"LongBench file not found: {path}") from None
    seen: dict[str, int] = {}
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
            problem = _check_record(task, record)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            problem = f"not valid JSON ({type(exc).__name__}: {str(exc)[:80]})"
            record = None
        if problem is not None:
            if strict:
                raise DataError(f"{path}, line {number}: {problem}")
            report.bad_lines.append((number, problem))
            continue
        rid = str(record.get("_id") or f"line{number}")
        if rid in seen:  # keep ids unique: records are resumed by id
            rid = f"{rid}#line{number}"
        seen[rid] = number
        record = {**record, "_id": rid, "_line": number}
        report.records.append(record)
    if not report.records:
        detail = (
            f" ({len(report.bad_lines)} malformed lines, first: line {report.bad_lines[0][0]}: {report.bad_lines[0][1]})"
            if report.bad_lines
            else ""
        )
        raise DataError(f"{path} holds no usable LongBench record{detail}")
    return report


def use_chat(task: str, tokenizer: Any) -> bool:
    return task not in NO_CHAT and bool(getattr(tokenizer, "chat_template", None))


def build_prompt(task: str, record: dict[str, Any]) -> str:
    return PROMPTS[task].format(context=record["context"], input=record["input"])


def truncate_middle(tokenizer: Any, prompt: str, max_length: int) -> tuple[str, bool]:
    """Official middle truncation: over ``max_length`` tokens, keep the first and last ``max_length // 2``
    tokens, decoded back to text. Returns ``(prompt, truncated)``."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_length:
        return prompt, False
    half = max_length // 2
    head = tokenizer.decode(ids[:half], skip_special_tokens=True)
    tail = tokenizer.decode(ids[-half:], skip_special_tokens=True)
    return head + tail, True


def encode(
    task: str,
    record: dict[str, Any],
    tokenizer: Any,
    max_length: int,
    window: int | None,
    max_new_tokens: int,
) -> tuple[list[int], bool, int]:
    """Token ids of ``record``'s prompt, truncated in the middle to ``max_length`` prompt tokens, and
    further if the chat-wrapped prompt plus ``max_new_tokens`` would overflow ``window``.

    Returns ``(input_ids, truncated, untruncated_prompt_tokens)``."""
    from kvpolicy.generation import encode_prompt

    chat = use_chat(task, tokenizer)
    prompt = build_prompt(task, record)
    full = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    budget = max_length
    for _ in range(4):
        text, truncated = truncate_middle(tokenizer, prompt, budget)
        ids = encode_prompt(tokenizer, text, chat=chat)
        over = 0 if window is None else len(ids) + max_new_tokens - window
        if over <= 0:
            return ids, truncated, full
        budget -= over  # the chat template and re-tokenisation took room: cut that much more
        if budget < 16:
            break
    raise ValueError(
        f"{task} record {record.get('_id')}: cannot fit the prompt and {max_new_tokens} new tokens in the "
        f"model's {window} positions"
    )
