"""The three benchmarks as tasks the runner drives: each lists its samples cheaply (ids and recorded
fields), builds one sample's prompt on demand and scores a prediction.

Sample ids are stable across runs of the same configuration, which is what resuming relies on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvpolicy.eval import longbench, metrics, needle, ruler

BENCHMARKS = ("needle", "ruler", "longbench")
DEFAULT_LENGTHS = (1024, 2048, 4096)
NEEDLE_MAX_NEW_TOKENS = 30  # the FastKV reference: greedy, <= 30 new tokens


@dataclass(frozen=True)
class Item:
    """One sample to run: a stable id and the fields recorded with its result."""

    id: str
    meta: dict[str, Any]


@dataclass
class Built:
    """A sample's prompt (token ids), reference and answer length; ``extra`` is recorded too."""

    input_ids: list[int]
    reference: Any
    max_new_tokens: int
    extra: dict[str, Any] = field(default_factory=dict)
    #: query-agnostic: ``input_ids`` is the context, compressed without these question ids
    question_ids: list[int] | None = None


def fingerprint(paths: Sequence[Path]) -> str:
    """SHA-256 over the names and bytes of ``paths`` (data identity, wherever the folder lives)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).name.encode() + b"\0")
        digest.update(Path(path).read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()


def model_window(model: Any) -> int | None:
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(value) if isinstance(value, int) else None


class Task:
    benchmark = ""

    def prepare(self, model: Any, tokenizer: Any) -> None:
        """Load data and check the settings against the model before anything runs."""

    def settings(self) -> dict[str, Any]:
        raise NotImplementedError

    def items(self) -> list[Item]:
        raise NotImplementedError

    def build(self, item: Item, tokenizer: Any) -> Built:
        raise NotImplementedError

    def score(self, item: Item, built: Built, prediction: str) -> dict[str, Any]:
        raise NotImplementedError

    def notes(self) -> dict[str, Any]:
        """Facts about the data worth keeping with the run (e.g. malformed lines skipped)."""
        return {}


def _positive(name: str, values: Sequence[int]) -> list[int]:
    out = [int(v) for v in values]
    if not out or any(v < 1 for v in out):
        raise ValueError(f"{name} must be positive integers, got {list(values)}")
    return out


# -- needle-in-a-haystack -------------------------------------------------------------------------
class NeedleTask(Task):
    """Needle-in-a-haystack: every (length, depth) cell, ``samples`` haystacks each (sample 0 is the
    reference haystack, the essays in sorted file order; sample i starts at the i-th essay)."""

    benchmark = "needle"

    def __init__(
        self,
        lengths: Sequence[int] = DEFAULT_LENGTHS,
        depths: int = 10,
        samples: int = 1,
        haystack_dir: str | Path | None = None,
        max_new_tokens: int | None = None,
        completion: bool = False,
        query_agnostic: bool = False,
    ) -> None:
        self.lengths = _positive("lengths", lengths)
        self.completion = completion  # base models: completion-style prompt (needle.build_sample)
        self.query_agnostic = query_agnostic  # compress the document without the question
        if depths < 1 or samples < 1:
            raise ValueError(f"--depths and --samples must be >= 1, got {depths} and {samples}")
        self.n_depths, self.samples = depths, samples
        self.folder = needle.find_haystack_dir(haystack_dir)
        self.files = sorted(self.folder.glob("*.txt"))
        self.max_new_tokens = max_new_tokens or NEEDLE_MAX_NEW_TOKENS
        self._haystacks: dict[int, str] = {}

    def prepare(self, model: Any, tokenizer: Any) -> None:
        window = model_window(model)
        too_long = [n for n in self.lengths if window is not None and n + self.max_new_tokens > window]
        if too_long:
            raise ValueError(
                f"lengths {too_long} plus {self.max_new_tokens} new tokens exceed the model's {window} positions"
            )

    def settings(self) -> dict[str, Any]:
        return {
            "lengths": self.lengths,
            "depths": [round(d, 6) for d in needle.depths(self.n_depths)],
            "samples": self.samples,
            "max_new_tokens": self.max_new_tokens,
            "needle": needle.NEEDLE,
            "question": needle.QUESTION,
            **({"prompt_style": "completion"} if self.completion else {}),
            **({"query_agnostic": True} if self.query_agnostic else {}),
            "haystack": {"files": len(self.files), "sha256": fingerprint(self.files)},
        }

    def items(self) -> list[Item]:
        out = []
        for length in self.lengths:
            for depth in needle.depths(self.n_depths):
                for i in range(self.samples):
                    rid = f"len={length}/depth={depth:.4f}" + (f"/sample={i}" if self.samples > 1 else "")
                    out.append(Item(rid, {"length": length, "depth": round(depth, 6), "sample": i}))
        return out

    def haystack(self, i: int) -> str:
        if i == 0:
            return needle.load_haystack(self.folder)
        if i not in self._haystacks:
            k = i % len(self.files)
            files = self.files[k:] + self.files[:k]
            self._haystacks[i] = "\n\n".join(
                f.read_text(encoding="utf-8", errors="replace").strip() for f in files
            )
        return self._haystacks[i]

    def build(self, item: Item, tokenizer: Any) -> Built:
        sample = needle.build_sample(
            tokenizer,
            item.meta["length"],
            item.meta["depth"],
            self.haystack(item.meta["sample"]),
            completion=self.completion,
            split=self.query_agnostic,
        )
        return Built(sample.input_ids, needle.NEEDLE, self.max_new_tokens, question_ids=sample.question_ids)

    def score(self, item: Item, built: Built, prediction: str) -> dict[str, Any]:
        # completion style: the needle's first words end the prompt, so recall counts the rest only
        target = needle.NEEDLE.removeprefix(needle.ANSWER_PREFIX) if self.completion else needle.NEEDLE
        return {
            "score": needle.needle_recall(prediction, target),
            "needle_found": needle.needle_found(prediction),
        }


# -- RULER ----------------------------------------------------------------------------------------
class RulerTask(Task):
    """RULER's synthetic tasks at each length, ``samples`` generated samples per (task, length)."""

    benchmark = "ruler"

    def __init__(
        self,
        lengths: Sequence[int] = DEFAULT_LENGTHS,
        tasks: Sequence[str] | None = None,
        samples: int = 5,
        seed: int = 42,
        haystack_dir: str | Path | None = None,
        max_new_tokens: int | None = None,
        query_agnostic: bool = False,
    ) -> None:
        self.lengths = _positive("lengths", lengths)
        self.query_agnostic = query_agnostic  # compress the task's context without its question
        self.tasks = list(tasks) if tasks else list(ruler.TASKS)
        unknown = [t for t in self.tasks if t not in ruler.TASKS]
        if unknown:
            raise ValueError(f"unknown RULER task(s) {', '.join(unknown)}; known: {', '.join(ruler.TASKS)}")
        if samples < 1:
            raise ValueError(f"--samples must be >= 1, got {samples}")
        self.samples, self.seed = samples, seed
        self.max_new_tokens = max_new_tokens
        self.files: list[Path] = []
        self.essay: str | None = None
        if any(ruler.needs_essay(t) for t in self.tasks):
            folder = needle.find_haystack_dir(haystack_dir)
            self.files = sorted(folder.glob("*.txt"))
            self.essay = needle.load_haystack(folder)

    def new_tokens(self, task: str) -> int:
        return self.max_new_tokens or ruler.max_new_tokens(task)

    def prepare(self, model: Any, tokenizer: Any) -> None:
        window = model_window(model)
        problems = []
        for task in self.tasks:
            for length in self.lengths:
                if window is not None and length + self.new_tokens(task) > window:
                    problems.append(f"{task} at {length}: exceeds the model's {window} positions")
                    continue
                try:  # generating sample 0 checks the length can hold the task at all
                    self._sample(task, length, 0, tokenizer)
                except ValueError as exc:
                    problems.append(f"{task} at {length}: {exc}")
        if problems:
            raise ValueError("RULER settings do not fit: " + "; ".join(problems))

    def settings(self) -> dict[str, Any]:
        return {
            "lengths": self.lengths,
            "tasks": self.tasks,
            "samples": self.samples,
            "seed": self.seed,
            "max_new_tokens": {t: self.new_tokens(t) for t in self.tasks},
            "haystack": {"files": len(self.files), "sha256": fingerprint(self.files)} if self.files else None,
            **({"query_agnostic": True} if self.query_agnostic else {}),
        }

    def items(self) -> list[Item]:
        return [
            Item(f"{task}/len={length}/{i}", {"task": task, "length": length, "index": i})
            for task in self.tasks
            for length in self.lengths
            for i in range(self.samples)
        ]

    def _sample(self, task: str, length: int, index: int, tokenizer: Any) -> ruler.RulerSample:
        return ruler.generate_sample(task, tokenizer, length, index, seed=self.seed, essay=self.essay)

    def build(self, item: Item, tokenizer: Any) -> Built:
        m = item.meta
        sample = self._sample(m["task"], m["length"], m["index"], tokenizer)
        if self.query_agnostic:
            context_ids, question_ids = ruler.split_sample(sample, tokenizer)
            return Built(context_ids, sample.outputs, self.new_tokens(m["task"]), question_ids=question_ids)
        return Built(sample.input_ids, sample.outputs, self.new_tokens(m["task"]))

    def score(self, item: Item, built: Built, prediction: str) -> dict[str, Any]:
        return {"score": metrics.string_match_all(prediction, built.reference)}


# -- LongBench ------------------------------------------------------------------------------------
class LongBenchTask(Task):
    """LongBench v1 English tasks from official jsonl files; ``samples`` first records per task."""

    benchmark = "longbench"

    def __init__(
        self,
        data_dir: str | Path | None = None,
        tasks: Sequence[str] | None = None,
        samples: int | None = None,
        longbench_e: bool = False,
        max_length: int | None = None,
        max_prompt_tokens: int | None = None,
        max_new_tokens: int | None = None,
        strict: bool = False,
    ) -> None:
        self.dir = longbench.find_data_dir(data_dir)
        self.longbench_e = longbench_e
        known = longbench.TASKS_E if longbench_e else longbench.TASKS_EN
        if tasks:
            unknown = [t for t in tasks if t not in known]
            if unknown:
                raise ValueError(
                    f"unknown LongBench{'-E' if longbench_e else ''} task(s) {', '.join(unknown)}; "
                    f"known: {', '.join(known)}"
                )
            self.tasks = list(tasks)
            missing = [t for t in self.tasks if not longbench.task_file(self.dir, t, longbench_e).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"no data file for {', '.join(missing)} in {self.dir} (expected "
                    f"{longbench.task_file(self.dir, missing[0], longbench_e).name}, the official jsonl)"
                )
        else:
            self.tasks = longbench.available_tasks(self.dir, longbench_e)
            if not self.tasks:
                raise FileNotFoundError(
                    f"{self.dir} holds none of the LongBench files ({', '.join(t + '.jsonl' for t in known[:3])}, ...)"
                )
        if samples is not None and samples < 1:
            raise ValueError(f"--samples must be >= 1, got {samples}")
        if max_length is not None and max_length < 32:
            raise ValueError(f"--max-length must be >= 32, got {max_length}")
        self.samples, self.strict = samples, strict
        self.max_length_arg, self.max_prompt_tokens = max_length, max_prompt_tokens
        self.max_new_tokens_arg = max_new_tokens
        self.reports = {
            t: longbench.load_task(longbench.task_file(self.dir, t, longbench_e), t, strict)
            for t in self.tasks
        }
        self.window: int | None = None
        self.selected: dict[str, list[dict[str, Any]]] = {}
        self.too_long: dict[str, int] = {}

    def new_tokens(self, task: str) -> int:
        return self.max_new_tokens_arg or longbench.MAX_NEW_TOKENS[task]

    def max_length(self, task: str) -> int:
        """The official ``max_length`` (prompt token budget before the chat template)."""
        if self.max_length_arg is not None:
            return self.max_length_arg
        if self.window is None:
            raise ValueError("the model does not say its context window; pass --max-length")
        return self.window - self.new_tokens(task)

    def prepare(self, model: Any, tokenizer: Any) -> None:
        self.window = model_window(model)
        for task in self.tasks:
            self.max_length(task)
            records = self.reports[task].records
            if self.max_prompt_tokens is not None:
                chat = longbench.use_chat(task, tokenizer)
                from kvpolicy.generation import encode_prompt

                keep = []
                for record in records:
                    n = len(encode_prompt(tokenizer, longbench.build_prompt(task, record), chat=chat))
                    if n <= self.max_prompt_tokens:
                        keep.append(record)
                self.too_long[task] = len(records) - len(keep)
                if not keep:
                    raise ValueError(
                        f"no {task} record has a prompt of at most {self.max_prompt_tokens} tokens"
                    )
                records = keep
            self.selected[task] = records[: self.samples] if self.samples else records

    def settings(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            "longbench_e": self.longbench_e,
            "samples": self.samples,
            "max_length": {t: self.max_length(t) for t in self.tasks},
            "max_prompt_tokens": self.max_prompt_tokens,
            "max_new_tokens": {t: self.new_tokens(t) for t in self.tasks},
            "data": {t: fingerprint([self.reports[t].path]) for t in self.tasks},
        }

    def items(self) -> list[Item]:
        if not self.selected:
            raise RuntimeError("LongBenchTask.prepare() must run first")
        out = []
        for task in self.tasks:
            for record in self.selected[task]:
                length = record.get("length")
                if not isinstance(length, int):
                    length = len(record["context"].split())
                out.append(
                    Item(
                        f"{task}/{record['_id']}",
                        {
                            "task": task,
                            "_id": record["_id"],
                            "line": record["_line"],
                            "length": length,
                            "bucket": metrics.longbench_bucket(length),
                        },
                    )
                )
        return out

    def _record(self, item: Item) -> dict[str, Any]:
        for record in self.selected[item.meta["task"]]:
            if record["_id"] == item.meta["_id"]:
                return record
        raise KeyError(item.id)

    def build(self, item: Item, tokenizer: Any) -> Built:
        task = item.meta["task"]
        record = self._record(item)
        gen = self.new_tokens(task)
        ids, truncated, full = longbench.encode(
            task, record, tokenizer, self.max_length(task), self.window, gen
        )
        return Built(
            ids,
            list(record["answers"]),
            gen,
            {"truncated": truncated, "untruncated_tokens": full, "all_classes": record.get("all_classes")},
        )

    def score(self, item: Item, built: Built, prediction: str) -> dict[str, Any]:
        task = item.meta["task"]
        classes = built.extra.get("all_classes")
        return {"score": metrics.longbench_score(task, prediction, built.reference, classes)}

    def notes(self) -> dict[str, Any]:
        bad = {
            t: {
                "count": len(r.bad_lines),
                "lines": [n for n, _ in r.bad_lines[:20]],
                "first": r.bad_lines[0][1],
            }
            for t, r in self.reports.items()
            if r.bad_lines
        }
        out: dict[str, Any] = {"records": {t: len(r.records) for t, r in self.reports.items()}}
        if bad:
            out["malformed_lines"] = bad
        if self.too_long:
            out["skipped_longer_than_max_prompt_tokens"] = self.too_long
        return out


def make_task(benchmark: str, **options: Any) -> Task:
    """The task object for ``benchmark`` with its options (unused ones must be None)."""
    accepted = {
        "needle": (
            "lengths",
            "depths",
            "samples",
            "haystack_dir",
            "max_new_tokens",
            "completion",
            "query_agnostic",
        ),
        "ruler": ("lengths", "tasks", "samples", "seed", "haystack_dir", "max_new_tokens", "query_agnostic"),
        "longbench": (
            "data_dir",
            "tasks",
            "samples",
            "longbench_e",
            "max_length",
            "max_prompt_tokens",
            "max_new_tokens",
            "strict",
        ),
    }
    if benchmark not in accepted:
        raise ValueError(f"unknown benchmark {benchmark!r}; known: {', '.join(BENCHMARKS)}")
    given = {k: v for k, v in options.items() if v is not None and v is not False}
    unused = sorted(set(given) - set(accepted[benchmark]))
    if unused:
        raise ValueError(f"{benchmark} does not take {', '.join(unused)}")
    cls = {"needle": NeedleTask, "ruler": RulerTask, "longbench": LongBenchTask}[benchmark]
    return cls(**given)
