"""Run a benchmark under a policy: resumable, keyed by the full configuration, one record per sample.

``run_eval("needle", model, tokenizer, policy="snapkv", policy_options={"kv_budget": 128},
lengths=[1024, 2048], depths=5, out="results/eval")`` runs (or resumes, or skips) one run and returns
an :class:`EvalResult`. See :mod:`kvpolicy.eval.store` for the folder layout and the resume rules.
"""

from __future__ import annotations

import platform
import statistics
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from kvpolicy.calibrated import resolve_policy
from kvpolicy.eval import report
from kvpolicy.eval.store import RunStore, find_run_dir, now, run_key, slug
from kvpolicy.eval.tasks import Item, Task, make_task
from kvpolicy.interfaces import Policy

EMBEDDED_LABEL = "SmolLM2-135M-Instruct (embedded)"


@dataclass
class EvalResult:
    """What :func:`run_eval` did: the run's folder and key, its records and summary.

    ``status`` is ``"complete"`` (finished now), or ``"skipped"`` (it had finished before; pass
    ``force=True`` to rerun). ``ran`` samples ran in this call; ``resumed`` were already done.
    """

    benchmark: str
    run_dir: Path
    key: str
    label: str
    status: str
    records: list[dict[str, Any]]
    summary: dict[str, Any]
    ran: int = 0
    resumed: int = 0
    notes: dict[str, Any] = field(default_factory=dict)


# -- identity of what ran ---------------------------------------------------------------------------
def model_identity(model: Any, model_name: str | None = None) -> dict[str, Any]:
    """Name, dtype and a hash of the architecture config: part of the run key."""
    import hashlib
    import json

    config = model.config.to_dict()
    for volatile in ("transformers_version", "_name_or_path", "name_or_path", "_commit_hash"):
        config.pop(volatile, None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
    name = model_name or getattr(model.config, "name_or_path", "") or f"config:{digest[:12]}"
    from kvpolicy.models import EMBEDDED, packaged_name_of

    if packaged_name_of(name) == EMBEDDED.name:
        name = EMBEDDED_LABEL
    param = next(model.parameters(), None)
    return {
        "name": str(name),
        "dtype": str(param.dtype).removeprefix("torch.") if param is not None else None,
        "architecture": type(model).__name__,
        "layers": getattr(model.config, "num_hidden_layers", None),
        "config_sha256": digest,
        "weights_sample_sha256": _weights_sample(model),
    }


def _weights_sample(model: Any, per_tensor: int = 256) -> str:
    """SHA-256 of the first ``per_tensor`` values of every parameter: tells apart checkpoints that
    share a name and a config (cheap: a few hundred KiB for a 135M model)."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            head = tensor.detach().reshape(-1)[:per_tensor].to("cpu", torch.float32).contiguous()
            digest.update(name.encode() + b"\0" + head.numpy().tobytes())
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("kvpolicy", "torch", "transformers", "rouge", "rapidfuzz", "wonderwords", "matplotlib"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_state() -> dict[str, Any] | None:
    """Commit (and whether the tree has uncommitted changes) of the kvpolicy checkout, if it is one."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


# -- running --------------------------------------------------------------------------------------
def _record(item: Item, built: Any, out: Any, scores: dict[str, Any], n_layers: int | None) -> dict[str, Any]:
    s = out.stats
    layers = n_layers or len(s.tokens_per_layer) or 1  # full prefill: every layer, every prompt token
    extra = {k: v for k, v in built.extra.items() if k != "all_classes"}
    return {
        "id": item.id,
        **item.meta,
        "prompt_tokens": len(built.input_ids) + len(built.question_ids or []),
        **extra,
        "prediction": out.text,
        "reference": built.reference,
        **scores,
        "new_tokens": s.new_tokens,
        "prefill_s": round(s.prefill_seconds, 4),
        "decode_ms_per_token": round(1000 * s.decode_seconds_per_token, 2),
        "kv_tokens_mean": round(statistics.fmean(s.kv_tokens_per_layer), 1)
        if s.kv_tokens_per_layer
        else None,
        # bytes kept after prefill (every layer and KV head; quantized: codes and scales) per prompt token
        "kv_bytes_per_token": round(s.kv_bytes / max(s.prompt_tokens, 1), 1)
        if s.kv_bytes_per_layer
        else None,
        # Token-layers of every prefill pass, a restart's discarded filter pass (GemFilter) included.
        "prefill_token_share": round(
            (sum(s.tokens_per_layer) + sum(s.discarded_tokens_per_layer))
            / (layers * max(s.prompt_tokens, 1)),
            4,
        ),
    }


def run_eval(
    benchmark: str,
    model: Any = None,
    tokenizer: Any = None,
    *,
    policy: Policy | str | dict[str, Any] | None = "fullkv",
    policy_options: dict[str, Any] | None = None,
    policy_config: str | Path | None = None,
    out: str | Path = "results/eval",
    label: str | None = None,
    model_name: str | None = None,
    force: bool = False,
    quiet: bool = False,
    console: Any = None,
    command: Sequence[str] | None = None,
    lengths: Sequence[int] | None = None,
    depths: int | None = None,
    samples: int | None = None,
    tasks: Sequence[str] | None = None,
    seed: int | None = None,
    haystack_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    longbench_e: bool = False,
    completion: bool = False,
    query_agnostic: bool = False,
    max_length: int | None = None,
    max_prompt_tokens: int | None = None,
    max_new_tokens: int | None = None,
    strict: bool = False,
    shard: str | tuple[int, int] | None = None,
    batch_size: int = 1,
    compile: bool = False,
    graphs: bool = False,
) -> EvalResult:
    """Run ``benchmark`` (``needle``, ``ruler`` or ``longbench``) under ``policy`` and store the results.

    ``model``/``tokenizer`` default to the embedded SmolLM2-135M-Instruct. ``policy`` is a preset name
    (with ``policy_options``), a :class:`~kvpolicy.Policy`, a ``to_dict()`` form, or use
    ``policy_config`` (a JSON file). The run goes to ``out/<benchmark>/<label>-<key>/``; an unfinished
    run with the same configuration resumes, a finished one is skipped unless ``force``. Benchmark
    options: ``lengths``, ``depths``, ``samples``, ``haystack_dir``, ``completion`` (needle: a completion-style prompt for base models), ``query_agnostic`` (needle and
    RULER: the document is compressed without the question, then the question is answered from that
    cache: ``generate(context_ids=..., question_ids=...)``); ``lengths``, ``tasks``,
    ``samples``, ``seed`` (RULER); ``data_dir``, ``tasks``, ``samples``, ``longbench_e``,
    ``max_length``, ``max_prompt_tokens``, ``strict`` (LongBench); ``max_new_tokens`` caps any.
    ``shard="i/n"`` runs every n-th sample from i in a folder of its own (:mod:`kvpolicy.eval.shard`);
    ``compare`` merges the shards. ``batch_size`` generates that many samples at once (left-padded;
    the same answers as one at a time, and not part of the run key); per-sample timings are then the
    batch's. ``compile`` compiles the decode step, ``graphs`` replays it from recorded graphs (same
    answers; neither is part of the run key).
    """
    from rich.console import Console

    from kvpolicy.eval.shard import parse_shard

    if console is None:
        console = Console(quiet=quiet)
        if not console.is_terminal:
            console.width = 200  # logs and pipes: do not wrap wide tables
    part = parse_shard(shard)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be an int >= 1, got {batch_size!r}")
    if model is None:
        from kvpolicy.models import load_model

        model, tokenizer = load_model()
        model_name = model_name or EMBEDDED_LABEL
    elif tokenizer is None:
        raise ValueError("pass the tokenizer with the model")
    pol, default_label, policy_note, folder_label = resolve_policy(
        policy, policy_options, policy_config, model
    )
    if policy_note:
        console.print(f"note: {policy_note}", markup=False)
    folder_label = label or folder_label
    label = label or default_label
    task = make_task(
        benchmark,
        lengths=lengths,
        depths=depths,
        samples=samples,
        tasks=tasks,
        seed=seed,
        haystack_dir=haystack_dir,
        data_dir=data_dir,
        longbench_e=longbench_e,
        completion=completion,
        query_agnostic=query_agnostic,
        max_length=max_length,
        max_prompt_tokens=max_prompt_tokens,
        max_new_tokens=max_new_tokens,
        strict=strict,
    )
    task.prepare(model, tokenizer)
    notes = task.notes()
    _report_notes(console, notes)

    identity = model_identity(model, model_name)
    config = {"benchmark": benchmark, "settings": task.settings(), "policy": pol.to_dict(), "model": identity}
    whole_key = run_key(config)
    key = run_key({**config, "shard": list(part)}) if part else whole_key
    out = Path(out)
    name = slug(folder_label)
    folder = f"{name}-shard{part[0]}of{part[1]}-{key[:12]}" if part else f"{name}-{key[:12]}"
    run_dir = find_run_dir(out, benchmark, key) or out / benchmark / folder
    items = task.items()
    if part:
        items = items[part[0] :: part[1]]
        if not items:
            raise ValueError(
                f"--shard {part[0]}/{part[1]}: this benchmark has only {len(task.items())} samples"
            )

    with RunStore(run_dir) as store:
        previous = store.read_meta() or {}
        if previous.get("status") == "complete" and not force:
            records, _ = store.load()
            summary = report.summarize(benchmark, records)
            console.print(
                f"[bold]{label}[/bold]: {benchmark} run already complete in {run_dir} (--force reruns it)"
            )
            _print_summary(console, benchmark, label, summary)
            return EvalResult(
                benchmark, run_dir, key, label, "skipped", records, summary, 0, len(records), notes
            )
        if force:
            store.reset()
            previous = {}
        records, torn = store.load()
        wanted = {item.id for item in items}
        records = [r for r in records if r["id"] in wanted]
        done = {r["id"] for r in records}
        resumed = len(done)
        if resumed or torn:
            console.print(
                f"resuming {run_dir}: {resumed}/{len(items)} samples already done"
                + ("; dropped a torn last line" if torn else "")
            )
        meta = {
            "benchmark": benchmark,
            "key": key,
            "label": label,
            "status": "running",
            "samples_total": len(items),
            "samples_done": resumed,
            "shard": {"index": part[0], "count": part[1], "whole_key": whole_key} if part else None,
            "config": config,
            "policy": pol.to_dict(),
            "policy_description": pol.describe(),
            "model": identity,
            "versions": library_versions(),
            "git": git_state(),
            "command": list(command) if command is not None else None,
            "batch_size": batch_size,
            "data_notes": notes,
            "created_at": previous.get("created_at") or now(),
            "updated_at": now(),
            "history": [
                *previous.get("history", []),
                {"started_at": now(), "resumed_from": resumed, "torn_line_dropped": torn},
            ],
        }
        store.write_meta(meta)
        pending = [item for item in items if item.id not in done]
        ran = 0
        try:
            ran = _run_items(
                task,
                pending,
                model,
                tokenizer,
                pol,
                store,
                records,
                console,
                quiet,
                len(items),
                label,
                batch_size,
                compile,
                graphs,
            )
        except BaseException:
            meta.update(status="interrupted", samples_done=len(records), updated_at=now())
            store.write_meta(meta)
            console.print(
                f"stopped after {len(records)}/{len(items)} samples; rerun the same command to resume"
            )
            raise
        order = {item.id: i for i, item in enumerate(items)}
        records.sort(key=lambda r: order[r["id"]])
        summary = report.summarize(benchmark, records)
        meta.update(
            status="complete", samples_done=len(records), summary=summary, updated_at=now(), finished_at=now()
        )
        store.write_meta(meta)
        if benchmark == "needle" and not part:
            _heatmap(run_dir, summary, label, console)
    console.print(f"results: {run_dir}")
    _print_summary(console, benchmark, label, summary)
    return EvalResult(benchmark, run_dir, key, label, "complete", records, summary, ran, resumed, notes)


def _run_items(
    task: Task,
    pending: list[Item],
    model: Any,
    tokenizer: Any,
    policy: Policy,
    store: RunStore,
    records: list[dict[str, Any]],
    console: Any,
    quiet: bool,
    total: int,
    label: str,
    batch_size: int = 1,
    compile: bool = False,
    graphs: bool = False,
) -> int:
    from kvpolicy.generation import generate
    from kvpolicy.progress import track

    done_before = total - len(pending)
    with track(f"{task.benchmark} {label}", total, done_before, quiet=quiet, console=console) as progress:
        n_layers = getattr(model.config, "num_hidden_layers", None)
        for group in _batches(task, pending, tokenizer, batch_size):
            progress.describe(group[0][0].id)
            new_tokens = group[0][1].max_new_tokens
            ids = [b.input_ids for _, b in group]
            if group[0][1].question_ids is not None:  # query-agnostic: one context, its question
                outs = [
                    generate(
                        model,
                        tokenizer,
                        context_ids=b.input_ids,
                        question_ids=[b.question_ids],
                        policy=policy,
                        max_new_tokens=new_tokens,
                        compile=compile,
                        graphs=graphs,
                    )[0]
                    for _, b in group
                ]
                outs = outs if len(ids) > 1 else outs[0]
            else:
                outs = generate(
                    model,
                    tokenizer,
                    input_ids=ids if len(ids) > 1 else ids[0],
                    policy=policy,
                    max_new_tokens=new_tokens,
                    compile=compile,
                    graphs=graphs,
                )
            for (item, b), out in zip(group, outs if len(ids) > 1 else [outs], strict=True):
                record = _record(item, b, out, task.score(item, b, out.text), n_layers)
                store.append(record)
                records.append(record)
                progress.advance()
    return len(pending)


def _batches(
    task: Task, pending: list[Item], tokenizer: Any, batch_size: int
) -> Iterator[list[tuple[Item, Any]]]:
    """Pending samples with their built prompts, in groups to generate together: one at a time for
    ``batch_size`` 1 (built lazily); otherwise grouped by answer length and sorted by prompt length,
    so a batch pads little."""
    if batch_size == 1:
        for item in pending:
            yield [(item, task.build(item, tokenizer))]
        return
    built = sorted(
        ((item, task.build(item, tokenizer)) for item in pending),
        key=lambda ib: (ib[1].max_new_tokens, len(ib[1].input_ids)),
    )
    group: list[tuple[Item, Any]] = []
    for pair in built:
        if group and (len(group) == batch_size or pair[1].max_new_tokens != group[0][1].max_new_tokens):
            yield group
            group = []
        group.append(pair)
    if group:
        yield group


def _report_notes(console: Any, notes: dict[str, Any]) -> None:
    for task, bad in notes.get("malformed_lines", {}).items():
        console.print(
            f"[yellow]warning[/yellow]: skipped {bad['count']} malformed line(s) in {task} "
            f"(lines {', '.join(map(str, bad['lines']))}{', ...' if bad['count'] > len(bad['lines']) else ''}; "
            f"first: {bad['first']}); --strict makes this an error"
        )
    for task, n in notes.get("skipped_longer_than_max_prompt_tokens", {}).items():
        if n:
            console.print(f"{task}: left out {n} record(s) longer than --max-prompt-tokens")


def _print_summary(console: Any, benchmark: str, label: str, summary: dict[str, Any]) -> None:
    header, rows = report.run_table(benchmark, summary)
    scale = "recall 0-1" if benchmark == "needle" else "score 0-100"
    console.print(report.rich_table(header, rows, f"{benchmark}: {label} ({scale})"))
    if benchmark == "needle" and summary.get("n"):
        console.print(
            f"needle found (sandwich and Dolores Park named): {summary['found']:.0%} of {summary['n']}"
        )


def _heatmap(run_dir: Path, summary: dict[str, Any], label: str, console: Any) -> None:
    from kvpolicy.eval import plots

    if not summary.get("n") or not plots.have_matplotlib():
        return
    path = plots.needle_heatmap(summary["grid"], run_dir / "heatmap.png", f"needle recall: {label}")
    console.print(f"heatmap: {path}")


def main_command() -> list[str]:
    return ["kvpolicy", *sys.argv[1:]]
